//! The XDP program's log reaches the agent's: a rare event (a FIB answer the program has no
//! case for: forwarding disabled on the client-side interface) is written to the agent's log
//! as a `lb_xdp` line, by the agent that loaded the program and by one that adopted it after
//! a `--keep-datapath` restart.

use std::time::Duration;

use anyhow::Result;
use lb_tests::{
    harness::{config, poll, Balancer, URL},
    topology::{backend_addr, Topology},
};

/// The agent's lines about the FIB's "forwarding disabled" answer for a backend.
fn fib_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            l.contains(
                "answered 5 (forwarding disabled on the ingress interface): passed to the stack",
            ) && l.contains("xdp_event=\"fib\"")
                && (1..=2).any(|i| l.contains(&format!("FIB lookup for {} ", backend_addr(i))))
        })
        .map(str::to_string)
        .collect()
}

/// One connection attempt from the client (it fails: the balancer does not forward).
fn knock(b: &Balancer) {
    let _ = b
        .topo
        .exec("cli", &format!("curl -s -o /dev/null --max-time 0.5 {URL}"));
}

#[test]
fn a_rare_event_of_the_program_reaches_the_agent_log_also_after_adoption() -> Result<()> {
    let mut topo = Topology::routed(2)?;
    for i in 1..=2 {
        topo.backend(i)?;
    }
    let mut b = Balancer::start(topo, &config(2, "", "", "", ""), &["--keep-datapath"])?;
    b.wait_healthy(2)?;
    assert!(fib_lines(&b.agent_log()).is_empty(), "no event yet");

    // Forwarding off on the client side: the FIB answers BPF_FIB_LKUP_RET_FWD_DISABLED for
    // every packet to the VIP.
    b.topo
        .exec("lb", "sysctl -qw net.ipv4.conf.l0.forwarding=0")?;
    knock(&b);
    let first = poll(
        Duration::from_secs(10),
        "the event in the agent's log",
        || {
            let lines = fib_lines(&b.agent_log());
            Ok((!lines.is_empty()).then_some(lines))
        },
    )?;
    assert!(
        first[0].contains(" WARN ") && first[0].contains("; 1 on this CPU so far"),
        "{first:?}"
    );

    // The next agent adopts the running program and reads its log: more events (each CPU
    // logs at the next power of two of its count) reach the new agent's log.
    let status = b.stop_agent(libc::SIGTERM)?;
    assert!(status.success(), "{status}");
    b.run_agent(&["--keep-datapath"])?;
    poll(Duration::from_secs(10), "the second agent's API", || {
        Ok(b.status().ok())
    })?;
    poll(
        Duration::from_secs(30),
        "the event in the second agent's log",
        || {
            knock(&b);
            Ok((!fib_lines(&b.agent_log()).is_empty()).then_some(()))
        },
    )?;
    assert!(
        !b.agent_log().contains("log is not forwarded"),
        "{}",
        b.agent_log()
    );
    Ok(())
}
