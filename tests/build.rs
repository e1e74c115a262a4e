//! Builds the bench-only XDP object (lb-bench-ebpf: the frame generator and the sink of the
//! forwarding-capacity figures) into OUT_DIR, where `bench::forward` embeds it. The toolchain
//! is chosen as lb-userspace's build script chooses it.
use std::{env, path::PathBuf, process::Command};

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.parent().expect("workspace root").to_path_buf();
    let ebpf_dir = root.join("lb-bench-ebpf");
    println!("cargo:rerun-if-changed={}", ebpf_dir.display());
    println!("cargo:rerun-if-env-changed=LB_EBPF_TOOLCHAIN");

    let toolchain = match env::var("LB_EBPF_TOOLCHAIN") {
        Ok(t) if !t.is_empty() => t,
        _ => detect_toolchain(),
    };
    if toolchain != "nightly" && env::var_os("RUSTC_BOOTSTRAP").is_none() {
        // SAFETY: the build script is single-threaded here; the variable is for the child cargo.
        unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    }
    let package = aya_build::Package {
        name: "lb-bench-ebpf",
        root_dir: ebpf_dir.to_str().expect("utf-8 path"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain))
}

fn detect_toolchain() -> String {
    let listed = Command::new("rustup").args(["toolchain", "list"]).output();
    match listed {
        Ok(out)
            if String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.starts_with("nightly")) =>
        {
            "nightly".into()
        }
        _ => "stable".into(),
    }
}
