//! Builds the XDP object (lb-ebpf) and leaves it in OUT_DIR, where `dataplane.rs` embeds it:
//! the agent binary and the program it loads can never drift apart. Also names the commit the
//! agent is built from (`LB_GIT_COMMIT`, for `lb_build_info`) when the source is a git checkout.

#[path = "../ebpf-build.rs"]
mod ebpf_build;

use std::{path::Path, process::Command};

fn main() -> anyhow::Result<()> {
    git_commit();
    ebpf_build::build("lb-ebpf", &["lb-common/src"])
}

/// `LB_GIT_COMMIT` = HEAD's commit, and the files whose change moves it (HEAD, the branch's
/// ref, packed-refs) to rerun on. Nothing when git or the checkout is missing.
fn git_commit() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(args)
            .current_dir(&dir)
            .output()
            .ok()?;
        let s = String::from_utf8(out.stdout).ok()?;
        (out.status.success() && !s.trim().is_empty()).then(|| s.trim().to_string())
    };
    let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return;
    };
    println!("cargo:rustc-env=LB_GIT_COMMIT={commit}");
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    for name in ["HEAD", "packed-refs"].into_iter().chain(branch.as_deref()) {
        // Only files that exist: a missing one would rerun the script on every build.
        if let Some(path) = git(&["rev-parse", "--git-path", name]) {
            let path = Path::new(&dir).join(path);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}
