//! Shared by the build scripts that compile an XDP object (lb-userspace: lb-ebpf; tests: the
//! bench-only lb-bench-ebpf) into OUT_DIR, included with `#[path]`.
//!
//! The eBPF side needs a nightly compiler (build-std). When rustup has a `nightly` toolchain
//! it is used; otherwise the stable one is used with RUSTC_BOOTSTRAP=1 (what `cargo xtask
//! setup` prepared). `LB_EBPF_TOOLCHAIN` overrides the choice.
use std::{env, path::PathBuf, process::Command};

/// Builds the workspace's eBPF crate `name` (directory `name`), rebuilt when it or any of
/// `also` (paths under the workspace root) changes.
pub fn build(name: &str, also: &[&str]) -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.parent().expect("workspace root").to_path_buf();
    let ebpf_dir = root.join(name);
    println!("cargo:rerun-if-changed={}", ebpf_dir.display());
    for path in also {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }
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
        name,
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
