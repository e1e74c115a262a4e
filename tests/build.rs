//! Builds the bench-only XDP object (lb-bench-ebpf: the frame generator and the sink of the
//! forwarding-capacity figures) into OUT_DIR, where `bench::forward` embeds it.

#[path = "../ebpf-build.rs"]
mod ebpf_build;

fn main() -> anyhow::Result<()> {
    ebpf_build::build("lb-bench-ebpf", &[])
}
