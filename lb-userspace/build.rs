//! Builds the XDP object (lb-ebpf) and leaves it in OUT_DIR, where `dataplane.rs` embeds it:
//! the agent binary and the program it loads can never drift apart.

#[path = "../ebpf-build.rs"]
mod ebpf_build;

fn main() -> anyhow::Result<()> {
    ebpf_build::build("lb-ebpf", &["lb-common/src"])
}
