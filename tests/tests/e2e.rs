//! End to end: the real `lb-agent` and XDP program between real clients and servers, each test
//! on its own topology of network namespaces (see `lb_tests::topology`).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_common::{hash, PROTO_TCP};
use lb_tests::{
    harness::{config, poll, Balancer, URL},
    topology::{
        backend_addr, backend_addr6, Options, Topology, CLIENT, CLIENT6, CLIENT_B, ONE_ARM_CLIENT,
        VIP, VIP6,
    },
    world::flow_key,
};
use lb_userspace::{
    health::Reason,
    reconcile::build_table,
    state::{self, Member, TableSpec},
};

fn start(backends: usize, options: Options, config: &str) -> Result<Balancer> {
    let mut topo = Topology::new(Options {
        backends,
        ..options
    })?;
    for i in 1..=backends {
        topo.backend(i)?;
    }
    Balancer::start(topo, config, &[])
}

#[test]
fn new_connections_spread_evenly_and_keep_the_client_address() -> Result<()> {
    let b = start(3, Options::default(), &config(3, "", "", "", ""))?;
    b.wait_healthy(3)?;
    // 1,200 connections: each target within ±15% of a third is 3.7 standard deviations of a
    // fair split, so a fair balancer fails this about once in 1,500 runs.
    let n = 1200;
    let (counts, seen) = b.spread(URL, n)?;
    println!("spread of {n} connections: {counts:?}");
    assert_eq!(counts.get("ERR"), None, "{counts:?}");
    for name in ["b1", "b2", "b3"] {
        let c = counts.get(name).copied().unwrap_or(0) as f64;
        assert!((c - 400.0).abs() <= 60.0, "{name}: {c} of {n}: {counts:?}");
    }
    assert_eq!(
        seen,
        [CLIENT.to_string()].into(),
        "backends must see the client's own address"
    );
    // The backends' own logs say the same.
    for i in 1..=3 {
        let log = b.topo.log(&format!("backend-b{i}"));
        assert!(
            log.lines()
                .filter(|l| l.ends_with(" /"))
                .all(|l| l.contains(&format!(" {CLIENT} "))),
            "{log}"
        );
    }
    assert_eq!(b.metric("lb_new_flows_total{listener=\"web\"}")?, n as f64);
    Ok(())
}

#[test]
fn failover_and_recovery_as_the_clients_see_it() -> Result<()> {
    let b = start(3, Options::default(), &config(3, "", "", "", ""))?;
    b.wait_healthy(3)?;
    // Clients request every 20 ms for 9 s; backend 2 goes silent at ~2 s and returns at ~6 s.
    let script = b.topo.dir().join("client.py");
    std::fs::write(&script, include_str!("../src/client.py"))?;
    let mut topo_client = std::process::Command::new("ip");
    topo_client
        .args(["netns", "exec", &b.topo.ns("cli"), "python3"])
        .arg(&script)
        .args(["loop", URL, "12", "0.02"]);
    let started = Instant::now();
    let child = topo_client.stdout(std::process::Stdio::piped()).spawn()?;
    std::thread::sleep(Duration::from_secs(2)); // let the clients run on a healthy group
    let died = started.elapsed().as_secs_f64();
    b.topo.set_backend_link(2, false)?;
    poll(Duration::from_secs(10), "b2 out of the table", || {
        Ok((!b.table_targets(0)?.contains("10.0.2.12:8080")).then_some(()))
    })?;
    let removed = started.elapsed().as_secs_f64();
    poll(Duration::from_secs(10), "3.5 s after the death", || {
        Ok((started.elapsed().as_secs_f64() > died + 3.6).then_some(()))
    })?;
    let revived = started.elapsed().as_secs_f64();
    b.topo.set_backend_link(2, true)?;
    let out = child.wait_with_output()?;
    let lines: Vec<(f64, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (t, r) = l.split_once(' ')?;
            Some((t.parse().ok()?, r.to_string()))
        })
        .collect();
    // interval × unhealthy_threshold + timeout, + 1 s of slack.
    let bound = died + 1.0 * 2.0 + 0.5 + 1.0;
    let errors_after: Vec<_> = lines
        .iter()
        .filter(|(t, r)| *t > bound && *t < revived && r == "ERR")
        .collect();
    assert!(
        errors_after.is_empty(),
        "errors after {bound:.1} s: {errors_after:?}"
    );
    let b2_after: Vec<_> = lines
        .iter()
        .filter(|(t, r)| *t > bound && *t < revived && r == "b2")
        .collect();
    assert!(b2_after.is_empty(), "b2 answered while dead: {b2_after:?}");
    // Recovery: two passing checks (≤ 2 intervals + the check's own jitter) and b2 answers again.
    let back = lines
        .iter()
        .find(|(t, r)| *t > revived && r == "b2")
        .map(|l| l.0);
    let back = back.expect("b2 answered again before the clients stopped");
    assert!(
        back - revived <= 2.0 + 1.0,
        "b2 back after {:.1} s",
        back - revived
    );
    let first_error = lines
        .iter()
        .find(|(t, r)| *t > died && r == "ERR")
        .map(|l| l.0);
    println!(
        "FIGURE failover: removed from the maps {:.2} s after death, last client error {:.2} s after death (first at {:?}); back {:.2} s after recovery",
        removed - died,
        lines.iter().filter(|(t, r)| *t > died && r == "ERR").map(|l| l.0).fold(died, f64::max) - died,
        first_error.map(|t| format!("{:.2}", t - died)),
        back - revived
    );
    Ok(())
}

#[test]
fn fails_open_when_every_target_fails_its_checks() -> Result<()> {
    let b = start(3, Options::default(), &config(3, "", "", "", ""))?;
    b.wait_healthy(3)?;
    for i in 1..=3 {
        b.topo.set_sick(i, true)?; // /health answers 500; / still serves
    }
    poll(Duration::from_secs(10), "every target unhealthy", || {
        Ok(b.states()?.values().all(|s| s == "unhealthy").then_some(()))
    })?;
    let s = b.status()?;
    assert!(s.target_groups[0].fail_open);
    assert_eq!(
        s.target_groups[0].targets[0].reason,
        Some(Reason::ResponseCodeMismatch)
    );
    let (counts, _) = b.spread(URL, 60)?;
    assert_eq!(counts.get("ERR"), None, "{counts:?}");
    assert_eq!(
        counts.len(),
        3,
        "fail-open spreads over all targets: {counts:?}"
    );
    assert_eq!(b.metric("lb_healthy_targets{group=\"web\"}")?, 0.0);
    Ok(())
}

#[test]
fn ipv6_listener_with_ipv6_targets_and_udp_reverse_nat() -> Result<()> {
    let mut c = config(0, "", "", "", "").replace(
        "address = \"10.0.100.10\"",
        &format!("address = \"{VIP6}\""),
    );
    for i in 1..=2 {
        c.push_str(&format!(
            "\n[[target_group.target]]\naddress = \"{}\"\nport = 8080\n",
            backend_addr6(i)
        ));
    }
    c.push_str(&format!(
        "\n[[listener]]\nname = \"echo6\"\naddress = \"{VIP6}\"\nport = 5300\nprotocol = \"udp\"\ntarget_group = \"echo6\"\n\n[[target_group]]\nname = \"echo6\"\nhash_table_size = 251\n\n[target_group.health_check]\nport = 8080\ninterval = \"1s\"\ntimeout = \"500ms\"\nhealthy_threshold = 2\n\n[[target_group.target]]\naddress = \"{}\"\nport = 5300\n",
        backend_addr6(1)
    ));
    let b = start(2, Options::default(), &c)?;
    b.wait_healthy(3)?;
    let (counts, seen) = b.spread(&format!("http://[{VIP6}]/"), 40)?;
    assert_eq!(counts.get("ERR"), None, "{counts:?}");
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert_eq!(seen, [CLIENT6.to_string()].into());
    let udp = format!(
        "import socket\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\ns.settimeout(3)\ns.sendto(b'ping',('{VIP6}',5300))\nd,a=s.recvfrom(2048)\nprint(a[0],a[1],d.decode())\n"
    );
    std::fs::write(b.topo.dir().join("udp6.py"), udp)?;
    let reply = b.topo.exec(
        "cli",
        &format!("python3 {}/udp6.py", b.topo.dir().display()),
    )?;
    assert!(
        reply.starts_with(&format!("{VIP6} 5300 b1 saw {CLIENT6} "))
            && reply.trim_end().ends_with(": ping"),
        "{reply}"
    );
    Ok(())
}

#[test]
fn closed_ports_and_disallowed_sources_get_no_answer() -> Result<()> {
    let b = start(
        2,
        Options::default(),
        &config(
            2,
            &format!("allowed_sources = [\"{CLIENT}/32\"]"),
            "",
            "",
            "",
        ),
    )?;
    b.wait_healthy(2)?;
    // A port of the VIP that no listener serves: dropped (no reset, no answer).
    let closed = b.client("count http://10.0.100.10:81/ 3")?;
    assert!(closed.iter().all(|l| l == "ERR TimeoutError"), "{closed:?}");
    assert!(b.metric("lb_dropped_packets_total{reason=\"no_listener\"}")? >= 3.0);
    // The listener from an address outside allowed_sources: dropped.
    let other = b.client(&format!("count {URL} 3 {CLIENT_B}"))?;
    assert!(other.iter().all(|l| l == "ERR TimeoutError"), "{other:?}");
    assert!(b.metric("lb_dropped_packets_total{reason=\"source_not_allowed\"}")? >= 3.0);
    // The allowed address is served.
    let ok = b.client(&format!("count {URL} 3 {CLIENT}"))?;
    assert!(ok.iter().all(|l| l.ends_with(CLIENT)), "{ok:?}");
    Ok(())
}

/// Which backend a stream went to, from the backends' logs.
fn stream_backend(b: &Balancer, n: usize) -> Option<usize> {
    (1..=n).find(|i| b.topo.log(&format!("backend-b{i}")).contains(" /stream"))
}

#[test]
fn deregistered_target_drains_then_goes() -> Result<()> {
    let b = start(
        3,
        Options::default(),
        &config(3, "", "deregistration_delay = \"4s\"", "", ""),
    )?;
    b.wait_healthy(3)?;
    // An open connection: a 3-second stream.
    let stream = b.topo.dir().join("stream.log");
    let cmd = format!("curl -s -o /dev/null -w '%{{http_code}} %{{size_download}}' 'http://{VIP}/stream?seconds=3&rate=100000' > {} &", stream.display());
    b.topo.exec("cli", &cmd)?;
    let i = poll(Duration::from_secs(5), "the stream's backend", || {
        Ok(stream_backend(&b, 3))
    })?;
    let target = format!("{}:8080", backend_addr(i));
    let (code, text) = b.cli(&["targets", "deregister", "--group", "web", &target])?;
    assert_eq!(code, 0, "{text}");
    assert_eq!(b.states()?[&format!("web/{target}")], "draining");
    // No new flows to it…
    let (counts, _) = b.spread(URL, 40)?;
    assert_eq!(counts.get(&format!("b{i}")), None, "{counts:?}");
    assert_eq!(counts.get("ERR"), None, "{counts:?}");
    // …while its open connection completes.
    poll(Duration::from_secs(10), "the stream's end", || {
        Ok(std::fs::read_to_string(&stream)
            .ok()
            .filter(|s| !s.is_empty()))
    })?;
    assert_eq!(std::fs::read_to_string(&stream)?, "200 300000");
    // Removed after deregistration_delay.
    poll(Duration::from_secs(10), "removed after 4 s", || {
        Ok((!b.states()?.contains_key(&format!("web/{target}"))).then_some(()))
    })?;
    Ok(())
}

/// The table the agent builds for the `config()` group "web" over backends `members` (weight
/// 100, 4099 slots, the tables' seed from `hash_key`): backend number per slot. Built with the
/// agent's own table code (`reconcile::build_table`).
fn web_table(hash_key: [u32; 2], members: &[usize]) -> Result<Vec<u32>> {
    let mut members: Vec<Member> = members
        .iter()
        .map(|&i| {
            Ok(Member {
                target_id: i as u32,
                identity: state::identity(backend_addr(i).parse()?, 8080),
                weight: lb_userspace::config::DEFAULT_WEIGHT,
            })
        })
        .collect::<Result<_>>()?;
    members.sort_by(|a, b| a.identity.cmp(&b.identity));
    build_table(&TableSpec {
        flags: 0,
        size: 4099,
        seed: (hash_key[0] as u64) << 32 | hash_key[1] as u64,
        members,
    })
}

/// Group 0's live table as backend numbers per slot.
fn live_web_table(b: &Balancer) -> Result<Vec<u32>> {
    let maps = b.maps()?;
    let backend_of: BTreeMap<u32, u32> = maps
        .active_table(0)?
        .into_iter()
        .collect::<BTreeSet<u32>>()
        .into_iter()
        .map(|id| {
            let t = maps.target(id)?;
            let ip = lb_common::addr::from_words(&t.addr, t.family).context("target address")?;
            let n = (1..=4)
                .find(|&i| backend_addr(i) == ip.to_string())
                .with_context(|| format!("target {id} ({ip}) is no backend"))?;
            Ok((id, n as u32))
        })
        .collect::<Result<_>>()?;
    Ok(maps
        .active_table(0)?
        .into_iter()
        .map(|id| backend_of[&id])
        .collect())
}

#[test]
fn a_long_transfer_survives_targets_added_and_removed() -> Result<()> {
    // b4 is up but not registered; the group starts with b1..b3.
    let mut topo = Topology::new(Options {
        backends: 4,
        ..Options::default()
    })?;
    for i in 1..=4 {
        topo.backend(i)?;
    }
    let mut b = Balancer::start(topo, &config(3, "", "", "", ""), &[])?;
    b.wait_healthy(3)?;
    // A client port whose flow the changes move: b4 joins and another backend than the
    // stream's leaves, and afterwards the flow's slot belongs to another backend. Only the
    // flow table keeps the transfer on its backend.
    let hash_key = b.maps()?.config()?.hash_key;
    let before = web_table(hash_key, &[1, 2, 3])?;
    assert_eq!(
        live_web_table(&b)?,
        before,
        "the predicted table is not the agent's"
    );
    let afters: Vec<(usize, Vec<u32>)> = (1..=3)
        .map(|gone| {
            let left: Vec<usize> = (1..=4).filter(|&j| j != gone).collect();
            Ok((gone, web_table(hash_key, &left)?))
        })
        .collect::<Result<_>>()?;
    let (port, serving, other, slot) = (40_000u16..41_000)
        .find_map(|port| {
            let key = flow_key(CLIENT, port, VIP, 80, PROTO_TCP);
            let slot = (hash::flow_hash(hash_key, &key) % 4099) as usize;
            let serving = before[slot];
            afters
                .iter()
                .find(|(gone, after)| *gone as u32 != serving && after[slot] != serving)
                .map(|(gone, _)| (port, serving as usize, *gone, slot))
        })
        .context("no client port whose slot moves")?;
    let stream = b.topo.spawn(
        "cli",
        "stream",
        std::path::Path::new("curl"),
        &[
            "-s",
            "-o",
            "/dev/null",
            "--local-port",
            &port.to_string(),
            "-w",
            "%{http_code} %{size_download}",
            &format!("http://{VIP}/stream?seconds=8&rate=400000"),
        ],
    )?;
    let key = flow_key(CLIENT, port, VIP, 80, PROTO_TCP);
    let entry = poll(Duration::from_secs(5), "the stream's flow entry", || {
        b.maps()?.flow(&key)
    })?;
    let recorded = b.maps()?.target(entry.target_id)?;
    assert_eq!(
        lb_common::addr::from_words(&recorded.addr, recorded.family).map(|a| a.to_string()),
        Some(backend_addr(serving)),
        "the stream's flow is not on the backend its slot gave"
    );
    // Add a target, and take away another one (not the stream's).
    let (code, text) = b.cli(&[
        "targets",
        "register",
        "--group",
        "web",
        &format!("{}:8080", backend_addr(4)),
    ])?;
    assert_eq!(code, 0, "{text}");
    b.wait_healthy(4)?;
    let (code, text) = b.cli(&[
        "targets",
        "deregister",
        "--group",
        "web",
        &format!("{}:8080", backend_addr(other)),
    ])?;
    assert_eq!(code, 0, "{text}");
    let gone = format!("{}:8080", backend_addr(other));
    poll(
        Duration::from_secs(5),
        "the deregistered target out of the table",
        || Ok((!b.table_targets(0)?.contains(&gone)).then_some(())),
    )?;
    let now = live_web_table(&b)?;
    assert_ne!(
        now[slot] as usize, serving,
        "the stream's slot {slot} did not move off b{serving}: the test proves nothing"
    );
    match b.topo.log("stream").as_str() {
        "" => {}
        "200 3200000" => panic!("the stream ended before its slot moved: the test proves nothing"),
        cut => panic!("the transfer was cut ({cut:?}) while the table changed"),
    }
    let done = b.topo.stop_wait(stream, Duration::from_secs(20))?;
    assert_eq!(
        (done.success(), b.topo.log("stream").as_str()),
        (true, "200 3200000"),
        "the transfer was cut (its slot moved from b{serving} to b{})",
        now[slot]
    );
    Ok(())
}

#[test]
fn one_arm_balancer_answers_with_xdp_tx() -> Result<()> {
    let c =
        config(2, "", "", "", "").replace("interfaces = [\"l0\", \"l1\"]", "interfaces = [\"l1\"]");
    let b = start(
        2,
        Options {
            one_arm: true,
            ..Options::default()
        },
        &c,
    )?;
    b.wait_healthy(2)?;
    let (counts, seen) = b.spread(URL, 40)?;
    assert_eq!(counts.get("ERR"), None, "{counts:?}");
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert_eq!(seen, [ONE_ARM_CLIENT.to_string()].into());
    // Both directions went back out of the one interface by XDP_TX, not through the stack.
    let stats = b.topo.exec("lb", "ethtool -S l1")?;
    let xdp_tx: u64 = stats
        .lines()
        .find_map(|l| l.trim().strip_prefix("rx_queue_0_xdp_tx: ")?.parse().ok())
        .unwrap_or(0);
    assert!(xdp_tx >= 80, "XDP_TX frames: {xdp_tx}\n{stats}");
    Ok(())
}

#[test]
fn generic_mode_works_too() -> Result<()> {
    let b = start(
        2,
        Options::default(),
        &config(2, "", "", "", "xdp_mode = \"generic\""),
    )?;
    b.wait_healthy(2)?;
    assert!(b
        .topo
        .exec("lb", "ip -d link show l0")?
        .contains(" xdpgeneric"));
    let s = b.status()?;
    assert_eq!(s.datapath.interfaces[0].mode, "generic");
    let (counts, seen) = b.spread(URL, 30)?;
    assert_eq!(counts.get("ERR"), None, "{counts:?}");
    assert_eq!(seen, [CLIENT.to_string()].into());
    Ok(())
}

/// With tx checksum offload on, a local socket's frames leave the client over veth with a
/// partial checksum (pseudo-header only; the "hardware" would finish it). XDP sees raw frames
/// with no checksum state and updates that partial value incrementally as if it were final, so
/// the target receives a bad TCP checksum and drops the segment: connections through the
/// balancer fail. Real NICs finish the checksum before the wire, so this concerns veth
/// topologies only (and is why every other test turns tx offload off on sending hosts).
#[test]
fn client_tx_checksum_offload_on_veth_breaks_forwarded_flows() -> Result<()> {
    let b = start(
        2,
        Options {
            client_tx_offload: true,
            ..Options::default()
        },
        &config(2, "", "", "", ""),
    )?;
    b.wait_healthy(2)?;
    let out = b.client(&format!("count {URL} 5"))?;
    println!("with client tx offload on: {out:?}");
    assert!(out.iter().all(|l| l.starts_with("ERR")), "{out:?}");
    // The balancer did forward them: the SYNs were scheduled to targets.
    assert!(b.metric("lb_new_flows_total{listener=\"web\"}")? >= 5.0);
    // Turning offload off on the client is the whole fix.
    b.topo.exec("cli", "ethtool -K c0 tx off")?;
    let out = b.client(&format!("count {URL} 5"))?;
    assert!(out.iter().all(|l| l.ends_with(CLIENT)), "{out:?}");
    Ok(())
}
