//! The forwarding-capacity method (`lb_tests::bench::forward`) on a short run: every case
//! delivers each frame it sends to the sink behind the target-side veth, with the destination
//! each path must give it (the balancer's and nftables' rewritten to a target, the floor's and
//! kernel routing's the VIP), no tail call fails, and the stack receives the frames of the
//! XDP_PASS cases and none of the others. `run` checks all of this after every round and fails
//! naming the case and the counts.

use anyhow::Result;
use lb_tests::bench::forward;

#[test]
fn every_frame_reaches_the_sink_rewritten() -> Result<()> {
    let frames = 20_000;
    let rows = forward::run(frames, 1, &[])?;
    let names: Vec<&str> = rows.iter().map(|r| r.name).collect();
    assert_eq!(rows.len(), 7, "cases measured: {names:?}");
    for r in &rows {
        assert_eq!(r.frames, frames);
        assert!(r.median() > 0.0, "{}: {} ns/frame", r.name, r.median());
    }
    Ok(())
}
