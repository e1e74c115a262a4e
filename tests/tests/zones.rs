//! Zones and cross-zone load balancing with real clients: a node in zone a sends new flows to
//! zone a's targets, to every zone with cross_zone on, and to zone b's when zone a's die.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Result;
use lb_tests::{
    harness::{config, poll, Balancer, URL},
    topology::{backend_addr, Options},
};
use lb_userspace::state::ZoneScope;

/// Four backends: b1, b2 in zone a, b3, b4 in zone b; the node in zone a.
fn zoned_config(cross_zone: bool) -> String {
    let mut c = config(
        4,
        "",
        "",
        "",
        &format!("zone = \"a\"\ncross_zone = {cross_zone}"),
    );
    for (i, zone) in [(1, "a"), (2, "a"), (3, "b"), (4, "b")] {
        let target = format!("address = \"{}\"\nport = 8080\n", backend_addr(i));
        c = c.replace(&target, &format!("{target}zone = \"{zone}\"\n"));
    }
    c
}

fn spread(b: &Balancer, n: usize) -> Result<BTreeMap<String, usize>> {
    let (counts, _) = b.spread(URL, n)?;
    assert_eq!(counts.get("ERR"), None, "{counts:?}");
    Ok(counts)
}

fn reload(b: &Balancer, config: &str) -> Result<()> {
    let dir = b.topo.dir().to_string_lossy().into_owned();
    std::fs::write(&b.config_path, config.replace("DIR", &dir))?;
    let (code, out) = b.cli(&["reload"])?;
    anyhow::ensure!(code == 0, "reload: {out}");
    Ok(())
}

fn scope(b: &Balancer) -> Result<ZoneScope> {
    Ok(b.status()?.target_groups[0].zone_scope)
}

#[test]
fn a_node_keeps_new_flows_in_its_zone_and_falls_back_when_the_zone_dies() -> Result<()> {
    let b = Balancer::with_backends(
        Options {
            backends: 4,
            ..Options::default()
        },
        &zoned_config(false),
    )?;
    poll(Duration::from_secs(20), "4 healthy targets", || {
        let Ok(s) = b.states() else {
            return Ok(None); // not answering yet
        };
        Ok((s.values().filter(|v| *v == "healthy").count() == 4).then_some(()))
    })?;
    let status = b.status()?;
    assert_eq!(status.zone.as_deref(), Some("a"));
    assert_eq!(
        (status.target_groups[0].cross_zone, scope(&b)?),
        (false, ZoneScope::Local)
    );

    // Cross-zone off: only zone a's targets, about evenly.
    let local = spread(&b, 200)?;
    println!("cross_zone off: {local:?}");
    assert_eq!(local.keys().collect::<Vec<_>>(), ["b1", "b2"], "{local:?}");
    assert!(local.values().all(|&n| n >= 60), "{local:?}");

    // Cross-zone on (reload): every zone.
    reload(&b, &zoned_config(true))?;
    poll(Duration::from_secs(5), "scope all", || {
        Ok((scope(&b)? == ZoneScope::All).then_some(()))
    })?;
    let all = spread(&b, 400)?;
    println!("cross_zone on: {all:?}");
    assert_eq!(all.len(), 4, "{all:?}");
    assert!(all.values().all(|&n| n >= 50), "{all:?}");

    // Off again, and zone a's targets die: new flows fall back to zone b's.
    reload(&b, &zoned_config(false))?;
    b.topo.set_backend_link(1, false)?;
    b.topo.set_backend_link(2, false)?;
    poll(Duration::from_secs(10), "zone a unhealthy", || {
        let s = b.states()?;
        let a = |i: usize| {
            s.get(&format!("web/{}:8080", backend_addr(i)))
                .map(String::as_str)
                == Some("unhealthy")
        };
        Ok((a(1) && a(2)).then_some(()))
    })?;
    assert_eq!(scope(&b)?, ZoneScope::Fallback);
    let fallback = spread(&b, 200)?;
    println!("zone a dead: {fallback:?}");
    assert_eq!(
        fallback.keys().collect::<Vec<_>>(),
        ["b3", "b4"],
        "{fallback:?}"
    );
    assert_eq!(b.metric("lb_zone_fallback{group=\"web\"}")?, 1.0);
    assert_eq!(b.metric("lb_zone_fallbacks_total{group=\"web\"}")?, 1.0);
    assert!(b.agent_log().contains("zone fallback"), "{}", b.agent_log());

    // Zone a back: the fallback ends.
    b.topo.set_backend_link(1, true)?;
    b.topo.set_backend_link(2, true)?;
    poll(Duration::from_secs(10), "back in zone a", || {
        Ok((scope(&b)? == ZoneScope::Local).then_some(()))
    })?;
    let back = spread(&b, 100)?;
    assert!(back.keys().all(|k| k == "b1" || k == "b2"), "{back:?}");
    assert_eq!(b.metric("lb_zone_fallback{group=\"web\"}")?, 0.0);
    Ok(())
}
