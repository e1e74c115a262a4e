//! `cargo xtask setup | build-ebpf | build | package | test | demo | bench`: the project's
//! commands.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// Debian packages the build, the tests, the demo and the benchmarks use.
const PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "curl",
    "bpftool",
    "tcpdump",
    "iperf3",
    "haproxy",
    "socat",
    "wrk",
    "nftables",
    "fonts-dejavu-core",
    "python3",
    "util-linux",
    // sysctl and ping in the namespace tests (not in a minimal Debian).
    "procps",
    "iputils-ping",
    // The status page's test renders it in headless Chromium.
    "chromium",
    // The package: cargo-deb works out its shared-library depends with dpkg-shlibdeps, and
    // its test verifies the unit (systemd-analyze, which looks up its man pages with man).
    "dpkg-dev",
    "systemd",
    "man-db",
    // /etc/services: wrk (tests, bench) resolves the "http" of its URLs through it.
    "netbase",
    // Scale-out: BIRD 2 announces the VIPs over BGP (the router and the nodes of its
    // namespace test each run one).
    "bird2",
];
const BPF_LINKER_VERSION: &str = "0.13";
/// Builds the Debian package (`cargo xtask package`); pinned: its `--profile dev` (the tests'
/// package of the debug build) is deprecated upstream.
const CARGO_DEB_VERSION: &str = "3.8.0";

fn main() -> Result<()> {
    let args: Vec<String> = env::args().skip(1).collect();
    let rest = &args.get(1..).unwrap_or_default();
    match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("build-ebpf") => build_ebpf(),
        Some("build") => cargo(&["build", "--release"], &[]),
        Some("package") => package(rest).map(|deb| println!("{}", deb.display())),
        Some("test") => test(rest),
        Some("bench") => bench(rest),
        Some("demo") => demo(),
        _ => {
            eprintln!(
                "usage: cargo xtask <setup|build-ebpf|build|package [--dev]|test|demo|bench> [args]"
            );
            std::process::exit(2);
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cargo(args: &[&str], envs: &[(&str, &str)]) -> Result<()> {
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args).current_dir(root());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    run(&mut cmd)
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

/// The toolchain that builds the eBPF side: `nightly` if rustup has one, else `stable` with
/// RUSTC_BOOTSTRAP=1 (both need rust-src for build-std).
fn ebpf_toolchain() -> String {
    if let Ok(t) = env::var("LB_EBPF_TOOLCHAIN") {
        if !t.is_empty() {
            return t;
        }
    }
    let list = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if list.lines().any(|l| l.starts_with("nightly")) {
        "nightly".into()
    } else {
        "stable".into()
    }
}

fn setup() -> Result<()> {
    if !is_root() {
        bail!("setup installs Debian packages: run it as root");
    }
    // 1. Debian packages, only the missing ones.
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        eprintln!("packages: all present ({})", PACKAGES.join(" "));
    } else {
        eprintln!("packages: installing {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }

    // 2. rust-src for build-std.
    let tc = ebpf_toolchain();
    eprintln!("eBPF toolchain: {tc}");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", &tc]))?;
    // rustfmt and clippy for the userspace crates (CI runs both).
    run(Command::new("rustup").args(["component", "add", "rustfmt", "clippy"]))?;
    // cargo-deb for the package (and its test).
    ensure_cargo_deb()?;

    // 3. bpf-linker, linked against the toolchain's own libLLVM.
    let have = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if have.contains(&format!(" {BPF_LINKER_VERSION}.")) {
        eprintln!("bpf-linker: present ({})", have.trim());
        return Ok(());
    }
    let sysroot = output(
        Command::new("rustc")
            .arg(format!("+{tc}"))
            .args(["--print", "sysroot"]),
    )
    .context("rustc --print sysroot")?;
    let libdir = PathBuf::from(sysroot.trim()).join("lib");
    let lib = std::fs::read_dir(&libdir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find(|n| n.starts_with("libLLVM") && n.ends_with(".so"))
        .with_context(|| format!("no libLLVM*.so in {}", libdir.display()))?;
    let verbose =
        output(Command::new("rustc").arg(format!("+{tc}")).arg("-vV")).context("rustc -vV")?;
    let llvm_major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc -vV names no LLVM version")?
        .to_string();
    let libname = lib.trim_start_matches("lib").trim_end_matches(".so");
    let dir = libdir.display();
    let rustflags =
        format!("-C link-arg=-L{dir} -C link-arg=-l{libname} -C link-arg=-Wl,-rpath,{dir}");
    eprintln!("bpf-linker: building {BPF_LINKER_VERSION} against {lib} (LLVM {llvm_major})");
    let mut cmd = Command::new("cargo");
    cmd.arg(format!("+{tc}"))
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            &format!("~{BPF_LINKER_VERSION}"),
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major},no-llvm-linking"),
        ])
        .env("RUSTFLAGS", rustflags);
    if tc != "nightly" {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    run(&mut cmd)
}

/// Installs cargo-deb at the pinned version unless it is there.
fn ensure_cargo_deb() -> Result<()> {
    let have = output(Command::new("cargo").args(["deb", "--version"])).unwrap_or_default();
    if have.trim() == format!("cargo-deb {CARGO_DEB_VERSION}") {
        eprintln!("cargo-deb: present ({})", have.trim());
        return Ok(());
    }
    eprintln!("cargo-deb: installing {CARGO_DEB_VERSION}");
    run(Command::new("cargo").args([
        "install",
        "cargo-deb",
        "--locked",
        "--version",
        &format!("={CARGO_DEB_VERSION}"),
    ]))
}

/// `cargo xtask package [--dev]`: the Debian package of `lb-agent` (see
/// `[package.metadata.deb]` in lb-userspace/Cargo.toml), in target/debian/; its path. Builds
/// the release binary (the XDP object inside, as `cargo xtask build` does), or with `--dev`
/// packages the debug build, quickly, into target/debian-dev/ (what `cargo xtask test`
/// checks: the same files, another build of the binary); writes the man pages and shell
/// completions, generated from the CLI by `lb-agent-docgen`, into target/lb-agent-docs/
/// first.
fn package(args: &[String]) -> Result<PathBuf> {
    let dev = match args {
        [] => false,
        [a] if a == "--dev" => true,
        _ => bail!("usage: cargo xtask package [--dev]"),
    };
    ensure_cargo_deb()?;
    let profile = if dev { "dev" } else { "release" };
    cargo(
        &[
            "build",
            "--profile",
            profile,
            "-p",
            "lb-userspace",
            "--bin",
            "lb-agent",
            "--bin",
            "lb-agent-docgen",
        ],
        &[],
    )?;
    let out_dir = if dev { "debug" } else { "release" };
    let docs = root().join("target/lb-agent-docs");
    if docs.exists() {
        std::fs::remove_dir_all(&docs).with_context(|| format!("removing {}", docs.display()))?;
    }
    // Its list of files to stderr: this command's stdout is the package's path alone.
    run(
        Command::new(root().join("target").join(out_dir).join("lb-agent-docgen"))
            .arg(&docs)
            .stdout(std::io::stderr()),
    )?;
    let mut deb = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    deb.args([
        "deb",
        "-p",
        "lb-userspace",
        "--no-build",
        "--profile",
        profile,
    ])
    .arg("--output")
    .arg(root().join(if dev {
        "target/debian-dev"
    } else {
        "target/debian"
    }))
    .current_dir(root());
    if dev {
        // Its warnings are about the dev profile, which it discourages for releases.
        deb.args(["--fast", "--quiet"]);
    }
    eprintln!("+ {deb:?}");
    let out = deb
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("spawning {deb:?}"))?;
    if !out.status.success() {
        bail!("{deb:?} failed: {}", out.status);
    }
    // cargo-deb prints the package's path last.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout
        .lines()
        .rev()
        .find(|l| l.trim_end().ends_with(".deb"))
        .with_context(|| format!("cargo deb named no .deb: {stdout}"))?;
    Ok(root().join(path.trim()))
}

fn build_ebpf() -> Result<()> {
    let tc = ebpf_toolchain();
    let mut cmd = Command::new("cargo");
    cmd.arg(format!("+{tc}"))
        .args(["build", "--release"])
        .current_dir(root().join("lb-ebpf"));
    if tc != "nightly" {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    run(&mut cmd)?;
    eprintln!("object: target/bpfel-unknown-none/release/lb-xdp");
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    if !is_root() {
        bail!("the data-plane tests load BPF programs and make network namespaces: run as root");
    }
    // What the build and the tests need (quick when everything is there): on a fresh machine
    // this command is all a user types.
    setup()?;
    // The agent tests run the real binary (in network namespaces); tests/package.rs checks
    // the Debian package, here of that debug build (quick; same layout as the release's).
    cargo(&["build", "-p", "lb-userspace", "--bin", "lb-agent"], &[])?;
    let deb = package(&["--dev".into()])?;
    let bin = root().join("target/debug/lb-agent");
    let mut a = vec!["test"];
    a.extend(args.iter().map(String::as_str));
    cargo(
        &a,
        &[
            ("LB_AGENT_BIN", bin.to_str().context("path")?),
            ("LB_DEB", deb.to_str().context("path")?),
        ],
    )
}

fn demo() -> Result<()> {
    if !is_root() {
        bail!("the demo makes network namespaces and attaches XDP: run as root");
    }
    setup()?;
    cargo(
        &["build", "-q", "-p", "lb-userspace", "--bin", "lb-agent"],
        &[],
    )?;
    let bin = root().join("target/debug/lb-agent");
    cargo(
        &[
            "run",
            "-q",
            "-p",
            "lb-tests",
            "--bin",
            "lb-demo",
            "--",
            bin.to_str().context("path")?,
        ],
        &[],
    )
}

fn bench(args: &[String]) -> Result<()> {
    if !is_root() {
        bail!("the benchmarks load BPF programs: run as root");
    }
    setup()?;
    let mut a = vec![
        "run",
        "--release",
        "-q",
        "-p",
        "lb-tests",
        "--bin",
        "lb-bench",
        "--",
    ];
    a.extend(args.iter().map(String::as_str));
    if args
        .windows(2)
        .any(|w| w[0] == "--only" && matches!(w[1].as_str(), "maps" | "forwarding" | "packet"))
    {
        // The per-packet, map and forwarding figures load the objects themselves: no agent to
        // build.
        return cargo(&a, &[]);
    }
    // The agent the end-to-end and control-plane figures run: a release build.
    cargo(
        &[
            "build",
            "--release",
            "-q",
            "-p",
            "lb-userspace",
            "--bin",
            "lb-agent",
        ],
        &[],
    )?;
    let bin = root().join("target/release/lb-agent");
    cargo(&a, &[("LB_AGENT_BIN", bin.to_str().context("path")?)])
}
