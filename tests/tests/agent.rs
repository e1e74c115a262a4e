//! `lb-agent` itself in network namespaces, with real backends and a real client: the maps
//! follow a target that dies and comes back; register, deregister and reload through the CLI;
//! a clean exit detaches and unpins; `--keep-datapath` restarts adopt the pins; idle flows
//! expire; bad setups are refused with clear errors. Prints the measured figures (FIGURE lines).

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_tests::{
    harness::{agent_bin, config, poll, Balancer, URL},
    topology::{backend_addr, Topology, CLIENT, VIP},
};
use lb_userspace::{
    api::ApiError,
    health::{Reason, TargetState},
    maps::KernelMaps,
};

fn start(backends: usize, config: &str, args: &[&str]) -> Result<Balancer> {
    let mut topo = Topology::routed(backends)?;
    for i in 1..=backends {
        topo.backend(i)?;
    }
    Balancer::start(topo, config, args)
}

/// One control-API call over the socket, without the CLI: the status code and the answer.
fn api_post(b: &Balancer, path: &str, body: &str) -> Result<(u16, String)> {
    let (status, answer) = b.api_request("POST", path, body.as_bytes())?;
    Ok((status, String::from_utf8_lossy(&answer).into_owned()))
}

/// A call the API refuses: the status code and the message of its JSON error.
fn api_error(b: &Balancer, method: &str, path: &str, body: &[u8]) -> Result<(u16, String)> {
    let (status, answer) = b.api_request(method, path, body)?;
    let e: ApiError = serde_json::from_slice(&answer).with_context(|| {
        format!(
            "{method} {path}: {status} {}",
            String::from_utf8_lossy(&answer)
        )
    })?;
    Ok((status, e.error))
}

/// The capabilities `lb-agent run` needs (`caps_only`).
const AGENT_CAPS: &str = "bpf,+net_admin,+perfmon";

/// `setpriv` arguments that run the agent (as root) with only the capabilities `caps`
/// (`bpf,+net_admin`): effective, permitted, inheritable, ambient and bounding sets alike.
fn caps_only(caps: &str) -> Vec<String> {
    let set = format!("-all,+{caps}");
    vec![
        "setpriv".into(),
        format!("--inh-caps={set}"),
        format!("--ambient-caps={set}"),
        format!("--bounding-set={set}"),
        "--".into(),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn state(b: &Balancer, target: &str) -> Result<Option<String>> {
    Ok(b.states()?.get(&format!("web/{target}")).cloned())
}

#[test]
fn agent_follows_a_target_that_dies_and_comes_back() -> Result<()> {
    let mut b = start(
        3,
        &config(3, "", "deregistration_delay = \"2s\"", "", ""),
        &[],
    )?;
    b.wait_healthy(3)?;
    let all: BTreeSet<String> = (1..=3)
        .map(|i| format!("{}:8080", backend_addr(i)))
        .collect();
    assert_eq!(b.table_targets(0)?, all);
    let (counts, _) = b.spread(URL, 30)?;
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["b1", "b2", "b3"],
        "{counts:?}"
    );

    // Backend 2 goes silent (its link goes down: checks time out). Out of the maps after two
    // failed checks (interval 1s, timeout 500ms).
    b.topo.set_backend_link(2, false)?;
    let died = Instant::now();
    let b2 = format!("{}:8080", backend_addr(2));
    poll(
        Duration::from_secs(10),
        "backend 2 out of the table",
        || Ok((!b.table_targets(0)?.contains(&b2)).then_some(())),
    )?;
    let removal = died.elapsed();
    println!(
        "FIGURE death → removal from the maps: {} ms (interval 1s, timeout 500ms, unhealthy_threshold 2)",
        removal.as_millis()
    );
    assert!(
        removal >= Duration::from_millis(500),
        "removed before a check could time out: {removal:?}"
    );
    assert!(removal <= Duration::from_millis(3500), "{removal:?}");
    let s = b.status()?;
    let t = s.target_groups[0]
        .targets
        .iter()
        .find(|t| t.target.to_string() == b2)
        .with_context(|| format!("{b2} not in {s:?}"))?;
    assert_eq!(
        (t.state, t.reason),
        (TargetState::Unhealthy, Some(Reason::Timeout)),
        "{t:?}"
    );
    let (counts, _) = b.spread(URL, 10)?;
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["b1", "b3"],
        "{counts:?}"
    );

    // It comes back after two passing checks.
    b.topo.set_backend_link(2, true)?;
    let back = Instant::now();
    poll(
        Duration::from_secs(10),
        "backend 2 back in the table",
        || Ok(b.table_targets(0)?.contains(&b2).then_some(())),
    )?;
    println!(
        "FIGURE recovery → back in the maps: {} ms (healthy_threshold 2)",
        back.elapsed().as_millis()
    );

    // Metrics name the states.
    assert_eq!(
        b.metric(&format!(
            "lb_target_healthy{{group=\"web\",target=\"{b2}\"}}"
        ))?,
        1.0
    );
    assert!(
        b.metric(&format!(
            "lb_health_checks_total{{group=\"web\",target=\"{b2}\",result=\"timeout\"}}"
        ))? >= 2.0
    );
    assert!(b.metric("lb_packets_total{listener=\"web\",direction=\"in\"}")? > 0.0);

    // Register a fourth target (nothing listens there): LB_TARGETS holds it when the call returns.
    let started = Instant::now();
    let (code, text) = b.cli(&[
        "targets",
        "register",
        "--group",
        "web",
        "10.0.2.14:8080",
        "--weight",
        "50",
    ])?;
    let call = started.elapsed();
    assert_eq!(code, 0, "{text}");
    let maps = b.maps()?;
    let new_target: std::net::IpAddr = "10.0.2.14".parse()?;
    let found = (0..16).filter_map(|id| maps.target(id).ok()).any(|t| {
        t.port_be == 8080u16.to_be()
            && lb_common::addr::from_words(&t.addr, t.family) == Some(new_target)
    });
    assert!(found, "register returned before LB_TARGETS held the target");
    println!(
        "FIGURE targets register → maps written: {} ms for the whole CLI call ({})",
        call.as_millis(),
        text.trim()
    );
    assert_eq!(
        b.cli(&["targets", "register", "--group", "nope", "10.0.2.14:8080"])?
            .0,
        2,
        "bad input: exit 2"
    );
    // A target the config could not list is refused as the config's would be, naming why: the
    // API answers 400 for bad input, 409 for a conflict with the config or a limit; the CLI
    // exits 2 on either.
    let (code, text) = b.cli(&["targets", "register", "--group", "web", "127.0.0.1:8080"])?;
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("web/127.0.0.1:8080 refused: address: 127.0.0.1 is a loopback address; it cannot be a target"),
        "{text}"
    );
    // Nothing announced here ([announce] off): a drain could not withdraw anything.
    let (code, text) = b.cli(&["drain", "--no-wait"])?;
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("nothing is announced here"), "{text}");
    let on_vip = format!("{VIP}:8080");
    let (code, text) = b.cli(&["targets", "register", "--group", "web", &on_vip])?;
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains(&format!("address: {VIP} is the VIP of listener \"web\"")),
        "{text}"
    );
    let register = |target: &str| {
        api_post(
            &b,
            "/v1/targets/register",
            &format!(r#"{{"group":"web","target":"{target}"}}"#),
        )
    };
    assert_eq!(register("127.0.0.1:8080")?.0, 400);
    let register_zone = |zone: &str| {
        api_post(
            &b,
            "/v1/targets/register",
            &format!(r#"{{"group":"web","target":"10.0.2.14:8080","zone":"{zone}"}}"#),
        )
    };
    let (status, answer) = register(&on_vip)?;
    assert_eq!(status, 409, "{answer}");
    // The API's own refusals, each a JSON error: a bad body names the field, a body over the
    // limit is a 413, an unknown path a 404, a wrong method a 405.
    let (status, error) = api_error(
        &b,
        "POST",
        "/v1/targets/register",
        br#"{"group":"web","target":"10.0.2.14"}"#,
    )?;
    assert_eq!(status, 400, "{error}");
    assert!(
        error.contains("bad request body: target: invalid socket address syntax"),
        "{error}"
    );
    let (status, answer) = register_zone(&"z".repeat(65))?;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer.contains("zone: 65 characters; at most 64"),
        "{answer}"
    );
    let big = format!(
        r#"{{"group":"web","target":"10.0.2.14:8080","zone":"{}"}}"#,
        "z".repeat(100_000)
    );
    assert_eq!(
        api_error(&b, "POST", "/v1/targets/register", big.as_bytes())?.0,
        413
    );
    assert_eq!(
        api_error(&b, "GET", "/v1/nope", b"")?,
        (404, "no such endpoint /v1/nope".to_string())
    );
    assert_eq!(
        api_error(&b, "GET", "/v1/reload", b"")?,
        (405, "method not allowed".to_string())
    );

    // Deregister backend 3: draining (no new flows), then removed after 2s.
    assert!(
        b.metric(
            "lb_health_checks_total{group=\"web\",target=\"10.0.2.13:8080\",result=\"pass\"}"
        )? >= 1.0
    );
    let (code, text) = b.cli(&["targets", "deregister", "--group", "web", "10.0.2.13:8080"])?;
    assert_eq!(code, 0, "{text}");
    assert!(!b.table_targets(0)?.contains("10.0.2.13:8080"));
    assert_eq!(state(&b, "10.0.2.13:8080")?.as_deref(), Some("draining"));
    poll(
        Duration::from_secs(10),
        "backend 3 removed after deregistration_delay",
        || Ok(state(&b, "10.0.2.13:8080")?.is_none().then_some(())),
    )?;
    // Its series left the metrics page with it (its health checks included); the others stay.
    let page = b.metrics_page()?;
    assert!(!page.contains("target=\"10.0.2.13:8080\""), "{page}");
    assert!(
        page.contains(
            "lb_health_checks_total{group=\"web\",target=\"10.0.2.12:8080\",result=\"pass\"}"
        ),
        "{page}"
    );
    assert!(page.contains("lb_build_info{version="), "{page}");

    // Reload: an invalid file is refused and the running config stays; a valid one applies.
    let good = std::fs::read_to_string(&b.config_path)?;
    std::fs::write(&b.config_path, good.replace("port = 80\n", "port = 0\n"))?;
    let (code, text) = b.cli(&["reload"])?;
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("lb.toml:12: listener[0].port: port 0 is outside 1..=65535"),
        "{text}"
    );
    assert_eq!(b.status()?.listeners[0].port, 80);
    let without_b1 = good.replace(
        "[[target_group.target]]\naddress = \"10.0.2.11\"\nport = 8080\n",
        "",
    );
    std::fs::write(&b.config_path, without_b1)?;
    let (code, text) = b.cli(&["reload"])?;
    assert_eq!(code, 0, "{text}");
    assert_eq!(state(&b, "10.0.2.11:8080")?.as_deref(), Some("draining"));

    // SIGTERM: exit 0, XDP detached, pins gone.
    let status = b.stop_agent(libc::SIGTERM)?;
    assert!(status.success(), "agent exit: {status}");
    let links = b.topo.exec("lb", "ip -d link show")?;
    assert!(!links.contains(" xdp"), "{links}");
    assert!(!b.topo.bpffs().join("lb").exists());
    Ok(())
}

/// One datagram to the UDP listener; the reply's source and payload.
const UDP_CLIENT: &str = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(3)\ns.sendto(b'ping',('10.0.100.10',5300))\nd,a=s.recvfrom(2048)\nprint(a[0],a[1],d.decode())\n";

fn udp_flows(maps: &KernelMaps) -> usize {
    maps.flow_keys()
        .filter_map(Result::ok)
        .filter(|k| k.protocol == lb_common::PROTO_UDP)
        .count()
}

#[test]
fn keep_datapath_restart_adopts_the_pins_and_keeps_flows() -> Result<()> {
    // Two web targets, and a UDP listener with a 2 s idle timeout.
    let mut c = config(2, "", "", "", "");
    c.push_str("\n[[listener]]\nname = \"echo\"\naddress = \"10.0.100.10\"\nport = 5300\nprotocol = \"udp\"\ntarget_group = \"echo\"\nidle_timeout = \"2s\"\n\n[[target_group]]\nname = \"echo\"\nhash_table_size = 251\n\n[target_group.health_check]\nport = 8080\ninterval = \"1s\"\ntimeout = \"500ms\"\nhealthy_threshold = 2\n\n[[target_group.target]]\naddress = \"10.0.2.11\"\nport = 5300\n");
    let mut b = start(2, &c, &["--keep-datapath"])?;
    b.wait_healthy(3)?;

    // UDP through the VIP: the reply comes from the VIP and listener port.
    std::fs::write(b.topo.dir().join("udp_client.py"), UDP_CLIENT)?;
    let reply = b.topo.exec(
        "cli",
        &format!("python3 {}/udp_client.py", b.topo.dir().display()),
    )?;
    assert!(
        reply.starts_with(&format!("{VIP} 5300 b1 saw {CLIENT} "))
            && reply.trim_end().ends_with(": ping"),
        "{reply}"
    );
    assert_eq!(udp_flows(&b.maps()?), 1);
    // The sweep forgets it after the 2 s idle timeout (flow ticks are ~1.07 s; it sweeps every second here).
    let sent = Instant::now();
    poll(Duration::from_secs(8), "idle UDP flow expired", || {
        Ok((udp_flows(&b.maps()?) == 0).then_some(()))
    })?;
    let idle = sent.elapsed();
    assert!(
        idle >= Duration::from_millis(1500),
        "expired after {idle:?}, before its idle timeout"
    );
    println!(
        "FIGURE idle UDP flow (idle_timeout 2s) expired after {} ms",
        idle.as_millis()
    );

    // A 4-second download runs across the restart.
    let download = b.topo.spawn(
        "cli",
        "download",
        std::path::Path::new("curl"),
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
            &format!("http://{VIP}/stream?seconds=4&rate=1000000"),
        ],
    )?;
    let (flow, entry) = poll(Duration::from_secs(5), "the download's flow", || {
        let maps = b.maps()?;
        let key = maps
            .flow_keys()
            .filter_map(Result::ok)
            .find(|k| k.protocol == lb_common::PROTO_TCP && u16::from_be(k.dst_port_be) == 80);
        Ok(match key {
            Some(k) => maps.flow(&k)?.map(|v| (k, v)),
            None => None,
        })
    })?;
    let new_flows = |b: &Balancer| -> Result<u64> {
        Ok(b.maps()?.listener_stats(entry.listener_id)?.new_flows)
    };
    let new_flows_before = new_flows(&b)?;

    // The agent exits and leaves the data plane running.
    let status = b.stop_agent(libc::SIGTERM)?;
    assert!(status.success(), "{status}");
    assert!(
        b.topo.exec("lb", "ip -d link show l0")?.contains(" xdp"),
        "XDP must stay attached"
    );
    assert!(b.topo.bpffs().join("lb/links/l0").exists());

    // The next agent adopts: no new attach, target states carried over, no flapping.
    b.run_agent(&[])?;
    poll(Duration::from_secs(10), "the second agent's API", || {
        Ok(b.status().ok())
    })?;
    let after = b.maps()?.flow(&flow)?;
    assert_eq!(
        after.map(|v| (v.target_id, v.target_cookie, v.listener_id)),
        Some((entry.target_id, entry.target_cookie, entry.listener_id)),
        "the download's flow entry did not survive the restart"
    );
    assert_eq!(
        b.states()?.values().filter(|s| *s == "healthy").count(),
        3,
        "states carried over (not initial again)"
    );
    let log = b.agent_log();
    assert!(log.contains("adopted the pinned data plane"), "{log}");
    assert!(!log.contains("XDP attached"), "second attach: {log}");
    assert!(
        !log.contains("target state changed"),
        "states must not flap on adoption: {log}"
    );

    // The download completes, whole, on the flow entry made before the restart: had the
    // entry been lost, its next packet would have made a new one (a new flow in the stats),
    // even on the same target and with the same cookie.
    let done = b.topo.stop_wait(download, Duration::from_secs(30))?;
    assert!(done.success(), "curl: {done}");
    assert_eq!(b.topo.log("download"), "200 4000000");
    assert_eq!(
        new_flows(&b)?,
        new_flows_before,
        "the download was scheduled again after the restart: its flow entry was lost"
    );

    // SIGHUP reloads: a weight change shows in the status.
    let text = std::fs::read_to_string(&b.config_path)?;
    std::fs::write(
        &b.config_path,
        text.replacen("port = 8080\n", "port = 8080\nweight = 7\n", 1),
    )?;
    let agent = b.agent.expect("running");
    // SAFETY: signalling the agent this test started.
    unsafe { libc::kill(b.topo.pid(agent) as i32, libc::SIGHUP) };
    poll(Duration::from_secs(5), "weight 7 after SIGHUP", || {
        Ok((b.status()?.target_groups[0].targets[0].weight == 7).then_some(()))
    })?;

    let status = b.stop_agent(libc::SIGTERM)?;
    assert!(status.success(), "{status}");
    assert!(!b.topo.exec("lb", "ip -d link show l0")?.contains(" xdp"));
    Ok(())
}

/// The ifindex `/v1/status` shows for an attached interface, and its re-attachments.
fn status_interface(b: &Balancer, name: &str) -> Result<(u64, u64)> {
    let s = b.status()?;
    let i = s
        .datapath
        .interfaces
        .iter()
        .find(|i| i.name == name)
        .with_context(|| format!("no interface {name} in {s:?}"))?;
    Ok((u64::from(i.ifindex), i.reattachments))
}

/// The keys of a pinned map keyed by ifindex (`LB_IFACES`, `LB_DEVMAP`), read with bpftool.
fn ifindex_keys(b: &Balancer, map: &str) -> Result<BTreeSet<u32>> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(b.topo.bpffs().join("lb/maps").join(map))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    entries
        .iter()
        .map(|e| {
            let bytes: Vec<u8> = e["key"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| u8::from_str_radix(b.as_str().unwrap_or("").trim_start_matches("0x"), 16))
                .collect::<Result<_, _>>()?;
            let key: [u8; 4] = bytes[..]
                .try_into()
                .map_err(|_| anyhow::anyhow!("{map}: a key of {} bytes", bytes.len()))?;
            Ok(u32::from_ne_bytes(key))
        })
        .collect()
}

/// After `l1` was made again with ifindex `new` (it was `old`): XDP runs on it, the maps name
/// the new ifindex and not the old, the metric and the status count one re-attachment, and
/// traffic through the VIP works (the targets' checks recover on their own).
fn assert_reattached(b: &Balancer, old: u32, new: u32) -> Result<()> {
    assert_ne!(new, old, "l1 made again with its old ifindex");
    assert_eq!(status_interface(b, "l1")?, (new as u64, 1));
    assert_eq!(
        b.metric("lb_xdp_reattachments_total{interface=\"l1\"}")?,
        1.0
    );
    assert_eq!(
        b.metric("lb_xdp_reattachments_total{interface=\"l0\"}")?,
        0.0
    );
    assert!(
        b.topo.exec("lb", "ip -d link show l1")?.contains(" xdp"),
        "no XDP on the new l1"
    );
    for map in ["LB_IFACES", "LB_DEVMAP"] {
        let keys = ifindex_keys(b, map)?;
        assert!(
            keys.contains(&new) && !keys.contains(&old),
            "{map} holds {keys:?} (old l1 {old}, new {new})"
        );
    }
    b.wait_healthy(2)?;
    let (counts, _) = b.spread(URL, 10)?;
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["b1", "b2"],
        "{counts:?}"
    );
    // The maps are in step: a call that writes them succeeds (removing the old ifindex, whose
    // LB_DEVMAP entry the kernel dropped with the interface, did not wedge the reconciler).
    let (code, text) = b.cli(&["targets", "register", "--group", "web", "10.0.2.14:8080"])?;
    assert_eq!(code, 0, "{text}");
    let log = b.agent_log();
    assert!(!log.contains("writing the maps failed"), "{log}");
    Ok(())
}

#[test]
fn agent_reattaches_an_interface_deleted_and_made_again() -> Result<()> {
    let b = start(2, &config(2, "", "", "", ""), &[])?;
    b.wait_healthy(2)?;
    let old = b.topo.ifindex("lb", "l1")?;
    assert_eq!(status_interface(&b, "l1")?, (old as u64, 0));
    assert_eq!(
        b.metric("lb_xdp_reattachments_total{interface=\"l1\"}")?,
        0.0
    );

    // The target side goes away: said once, the pin stays.
    b.topo.exec("lb", "ip link del l1")?;
    poll(Duration::from_secs(5), "the agent saw l1 go", || {
        Ok(b.agent_log().contains("interface gone").then_some(()))
    })?;
    assert!(b.topo.bpffs().join("lb/links/l1").exists(), "pin dropped");

    // It comes back under the same name: a new ifindex, no XDP until the agent attaches; down
    // and without addresses at first, so no route to the targets yet.
    b.topo.add_balancer_target_link()?;
    let new = b.topo.ifindex("lb", "l1")?;
    poll(Duration::from_secs(5), "the agent re-attached l1", || {
        Ok((status_interface(&b, "l1")?.0 == new as u64).then_some(()))
    })?;
    // Its addresses, and up: interface roles follow the routes out of the new l1 at once (not
    // at the 30 s re-check), l1 alone facing targets again.
    b.topo.configure_balancer_target_link()?;
    poll(Duration::from_secs(5), "l1 alone facing targets", || {
        let s = b.status()?;
        let faces: Vec<bool> = ["l0", "l1"]
            .iter()
            .map(|n| {
                s.datapath
                    .interfaces
                    .iter()
                    .find(|i| i.name == *n)
                    .is_some_and(|i| i.faces_targets)
            })
            .collect();
        Ok((faces == [false, true]).then_some(()))
    })?;
    assert_reattached(&b, old, new)?;
    let log = b.agent_log();
    assert!(log.contains("XDP re-attached"), "{log}");
    Ok(())
}

#[test]
fn keep_datapath_restart_reattaches_an_interface_made_again() -> Result<()> {
    let mut b = start(2, &config(2, "", "", "", ""), &["--keep-datapath"])?;
    b.wait_healthy(2)?;
    let old = b.topo.ifindex("lb", "l1")?;
    let status = b.stop_agent(libc::SIGTERM)?;
    assert!(status.success(), "{status}");

    // While no agent runs, l1 is deleted and made again: the pinned link is detached for good.
    b.topo.exec("lb", "ip link del l1")?;
    b.topo.remake_balancer_target_link()?;
    let new = b.topo.ifindex("lb", "l1")?;
    assert!(!b.topo.exec("lb", "ip -d link show l1")?.contains(" xdp"));

    // The next agent checks what it adopts and attaches afresh.
    b.run_agent(&[])?;
    poll(Duration::from_secs(10), "the second agent's API", || {
        Ok(b.status().ok())
    })?;
    let log = b.agent_log();
    assert!(
        log.contains("the pinned XDP link no longer serves the interface"),
        "{log}"
    );
    assert!(log.contains("adopted the pinned data plane"), "{log}");
    assert_reattached(&b, old, new)?;

    // A clean stop detaches from both.
    let status = b.stop_agent(libc::SIGTERM)?;
    assert!(status.success(), "{status}");
    assert!(!b.topo.exec("lb", "ip -d link show")?.contains(" xdp"));
    assert!(!b.topo.bpffs().join("lb").exists());
    Ok(())
}

#[test]
fn run_refuses_bad_setups_with_clear_errors() -> Result<()> {
    let topo = Topology::routed(0)?;
    let dir = topo.dir().to_string_lossy().into_owned();
    let good = config(3, "", "", "", "");
    let run = |config: &str, prefix: &[&str]| -> Result<(i32, String)> {
        let path = topo.dir().join("bad.toml");
        std::fs::write(&path, config.replace("DIR", &dir))?;
        let out = Command::new("ip")
            .args(["netns", "exec", &topo.ns("lb")])
            .args(prefix)
            .arg(agent_bin())
            .args(["run", "--config"])
            .arg(&path)
            .output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    // An invalid config: exit 2 before touching the kernel.
    let (code, err) = run(&good.replace("port = 80\n", "port = 80\ncolour = 1\n"), &[])?;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("bad.toml:13: listener[0].colour: unknown field `colour`"),
        "{err}"
    );
    // No such interface.
    let (code, err) = run(&good.replace("\"l1\"", "\"nosuch0\""), &[])?;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("interface nosuch0 not found"), "{err}");
    // An interface without native XDP (a bridge), after one with it: nothing stays attached.
    topo.exec("lb", "ip link add d0 type bridge && ip link set d0 up")?;
    let (code, err) = run(&good.replace("\"l1\"", "\"d0\""), &[])?;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("attaching XDP to d0 in native mode"), "{err}");
    assert!(
        !topo.exec("lb", "ip -d link show l0")?.contains(" xdp"),
        "l0 left attached"
    );
    assert!(!topo.bpffs().join("lb").exists(), "pins left behind");
    // Not root.
    let (code, err) = run(
        &good,
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ],
    )?;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("needs the capabilities CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (root has them); this process lacks CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON (CapEff=0x0)"),
        "{err}"
    );
    // Root with some of them: the message names what is missing.
    let (code, err) = run(&good, &strs(&caps_only("bpf")))?;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("this process lacks CAP_NET_ADMIN, CAP_PERFMON (CapEff=0x8000000000)"),
        "{err}"
    );
    let (code, err) = run(&good, &strs(&caps_only("bpf,+net_admin")))?;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("this process lacks CAP_PERFMON (CapEff="),
        "{err}"
    );
    // bpffs to mount (under `ip netns exec`, /sys/fs/bpf is a fresh directory), without the
    // CAP_SYS_ADMIN mounting needs.
    let (code, err) = run(
        &good.replace("DIR/bpf/lb", &format!("/sys/fs/bpf/{}", topo.ns("lb"))),
        &strs(&caps_only(AGENT_CAPS)),
    )?;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("mounting one at /sys/fs/bpf needs CAP_SYS_ADMIN, which this process lacks"),
        "{err}"
    );
    // A pin path holding someone else's pins.
    std::fs::create_dir_all(topo.bpffs().join("lb"))?;
    let foreign = topo.bpffs().join("lb/foreign");
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&foreign)
        .args([
            "type", "array", "key", "4", "value", "4", "entries", "1", "name", "foreign",
        ])
        .output()?;
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, err) = run(&good, &[])?;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is in use by a foreign program"), "{err}");
    assert!(foreign.exists(), "the foreign pin must be left alone");
    assert!(
        !topo.exec("lb", "ip -d link show")?.contains(" xdp"),
        "nothing attached"
    );
    Ok(())
}

#[test]
fn validate_prints_a_summary_or_every_problem() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("lb-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let good_config = config(3, "", "", "", "").replace("DIR", "/run/x");
    let good = dir.join("good.toml");
    std::fs::write(&good, &good_config)?;
    let out = Command::new(agent_bin())
        .args(["validate", "--config"])
        .arg(&good)
        .output()?;
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("ok: 1 listener(s), 1 target group(s), 3 target(s)"),
        "{stdout}"
    );
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        good_config
            .replace("port = 80\n", "port = 0\n")
            .replace("timeout = \"500ms\"", "timeout = \"1s\""),
    )?;
    let out = Command::new(agent_bin())
        .args(["validate", "--config"])
        .arg(&bad)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let b = bad.display();
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [
            format!("{b}:12: listener[0].port: port 0 is outside 1..=65535"),
            format!(
                "{b}:25: target_group[0].health_check.timeout: 1s must be shorter than interval 1s"
            ),
        ]
    );
    // Bad arguments: exit 2 too.
    let out = Command::new(agent_bin()).args(["validate"]).output()?;
    assert_eq!(out.status.code(), Some(2));
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Sends `signal` to the running agent as soon as its log says `line`, and waits for its exit;
/// also the log as it was right after the signal was sent.
fn signal_at(
    b: &mut Balancer,
    line: &str,
    signal: i32,
) -> Result<(std::process::ExitStatus, String)> {
    let handle = b.agent.take().expect("an agent runs");
    poll(Duration::from_secs(10), line, || {
        Ok(b.agent_log().contains(line).then_some(()))
    })?;
    // SAFETY: signalling the agent this test started.
    unsafe { libc::kill(b.topo.pid(handle) as i32, signal) };
    let at_signal = b.agent_log();
    let status = b.topo.stop_wait(handle, Duration::from_secs(30))?;
    Ok((status, at_signal))
}

#[test]
fn a_signal_during_start_up_ends_in_a_clean_stop() -> Result<()> {
    const INSTALLED: &str = "signal handlers installed";
    let mut b = start(0, &config(2, "", "", "", ""), &[])?;
    let pins = b.topo.bpffs().join("lb");
    let state_file = lb_userspace::datapath::state_file(&pins);

    // SIGTERM while the agent still loads its object: it finishes starting, then stops as on
    // any SIGTERM (exit 0, detached, unpinned).
    let (status, at_signal) = signal_at(&mut b, INSTALLED, libc::SIGTERM)?;
    assert!(
        !at_signal.contains("XDP attached"),
        "the agent had attached before the signal: start-up not probed\n{at_signal}"
    );
    let log = b.agent_log();
    assert!(status.success(), "agent exit: {status}\n{log}");
    assert!(
        log.contains("XDP attached") && log.contains("lb-agent running"),
        "{log}"
    );
    assert!(log.contains("XDP detached from every interface"), "{log}");
    assert!(!pins.exists(), "pins left behind");
    assert!(!state_file.exists(), "state file left behind");
    assert!(!b.topo.exec("lb", "ip -d link show")?.contains(" xdp"));

    // With --keep-datapath: it finishes starting, saves its state and leaves the data plane
    // running, which the next agent adopts.
    b.run_agent(&["--keep-datapath"])?;
    let (status, at_signal) = signal_at(&mut b, INSTALLED, libc::SIGTERM)?;
    assert!(!at_signal.contains("XDP attached"), "{at_signal}");
    let log = b.agent_log();
    assert!(status.success(), "agent exit: {status}\n{log}");
    assert!(
        log.contains("the data plane stays attached and pinned"),
        "{log}"
    );
    assert!(b.topo.exec("lb", "ip -d link show l0")?.contains(" xdp"));
    assert!(pins.join("links/l0").exists());
    assert!(state_file.exists());
    b.run_agent(&[])?;
    poll(Duration::from_secs(10), "the third agent's API", || {
        Ok(b.status().ok())
    })?;
    assert!(
        b.agent_log().contains("adopted the pinned data plane"),
        "{}",
        b.agent_log()
    );
    let status = b.stop_agent(libc::SIGTERM)?;
    assert!(status.success(), "{status}");
    assert!(!pins.exists());
    Ok(())
}

#[test]
fn a_second_agent_on_the_same_pin_path_is_refused() -> Result<()> {
    let mut b = start(0, &config(2, "", "", "", ""), &[])?;
    poll(Duration::from_secs(10), "the first agent's API", || {
        Ok(b.status().ok())
    })?;
    let first = b.topo.pid(b.agent.expect("running"));
    let pins = b.topo.bpffs().join("lb");
    let lock = lb_userspace::statefile::lock_path_in(
        std::path::Path::new(lb_userspace::statefile::STATE_DIR),
        &pins,
    );
    assert_eq!(std::fs::read_to_string(&lock)?, format!("{first}\n"));

    // Another API socket and metrics port, the same pin path.
    let dir = b.topo.dir().to_path_buf();
    let second = std::fs::read_to_string(&b.config_path)?
        .replace("api.sock", "api2.sock")
        .replace("127.0.0.1:9900", "127.0.0.1:9901");
    let second_path = dir.join("second.toml");
    std::fs::write(&second_path, second)?;
    let config = second_path.to_string_lossy().into_owned();
    let h = b
        .topo
        .spawn("lb", "second", &agent_bin(), &["run", "--config", &config])?;
    let status = b.topo.stop_wait(h, Duration::from_secs(20))?;
    let log = b.topo.log("second");
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "another lb-agent (pid {first}) runs on agent.pin_path {}",
            pins.display()
        )),
        "{log}"
    );
    assert!(
        !dir.join("api2.sock").exists(),
        "the second agent bound its API"
    );

    // The first runs on, and releases the lock when it stops.
    assert!(!b.status()?.datapath.interfaces.is_empty());
    let status = b.stop_agent(libc::SIGTERM)?;
    assert!(status.success(), "{status}");
    assert!(!lock.exists(), "the lock file goes with the agent");
    assert!(!pins.exists());
    Ok(())
}

#[test]
fn keep_datapath_refuses_a_bpffs_that_dies_with_the_agent() -> Result<()> {
    let mut topo = Topology::routed(0)?;
    // Under `ip netns exec` /sys is the namespace's own: the agent mounts a bpffs at
    // /sys/fs/bpf in its private mount namespace, which goes away with it.
    let pin_path = format!("/sys/fs/bpf/{}", topo.ns("lb"));
    let dir = topo.dir().to_string_lossy().into_owned();
    let path = topo.dir().join("lb.toml");
    std::fs::write(
        &path,
        config(2, "", "", "", "")
            .replace("DIR/bpf/lb", &pin_path)
            .replace("DIR", &dir),
    )?;
    let config = path.to_string_lossy().into_owned();
    let bin = agent_bin();
    let h = topo.spawn(
        "lb",
        "keep",
        &bin,
        &["run", "--config", &config, "--keep-datapath"],
    )?;
    let status = topo.stop_wait(h, Duration::from_secs(20))?;
    let log = topo.log("keep");
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("mounted bpffs at /sys/fs/bpf"), "{log}");
    assert!(
        log.contains(&format!("--keep-datapath: agent.pin_path {pin_path} is on a bpffs mounted only in this process's mount namespace, not in PID 1's")),
        "{log}"
    );
    assert!(
        log.contains("Mount bpffs in the root mount namespace")
            && log.contains("set agent.pin_path into it"),
        "{log}"
    );
    assert!(!log.contains("XDP attached"), "{log}");
    assert!(!topo.exec("lb", "ip -d link show")?.contains(" xdp"));

    // Without --keep-datapath the same pin path serves, and the agent says it will not last.
    let h = topo.spawn("lb", "nokeep", &bin, &["run", "--config", &config])?;
    poll(Duration::from_secs(20), "the agent running", || {
        Ok(topo
            .log("nokeep")
            .contains("lb-agent running")
            .then_some(()))
    })?;
    let log = topo.log("nokeep");
    assert!(
        log.contains("the data plane will not outlive this process"),
        "{log}"
    );
    let status = topo.stop(h, libc::SIGTERM)?;
    assert!(status.success(), "{status}\n{}", topo.log("nokeep"));
    assert!(!topo.exec("lb", "ip -d link show")?.contains(" xdp"));
    Ok(())
}

#[test]
fn run_needs_only_cap_bpf_cap_net_admin_and_cap_perfmon() -> Result<()> {
    let mut c = config(2, "", "", "", "");
    c.push_str("\n[[listener]]\nname = \"echo\"\naddress = \"10.0.100.10\"\nport = 5300\nprotocol = \"udp\"\ntarget_group = \"echo\"\nidle_timeout = \"2s\"\n\n[[target_group]]\nname = \"echo\"\nhash_table_size = 251\n\n[target_group.health_check]\nport = 8080\ninterval = \"1s\"\ntimeout = \"500ms\"\nhealthy_threshold = 2\n\n[[target_group.target]]\naddress = \"10.0.2.11\"\nport = 5300\n");
    let mut topo = Topology::routed(2)?;
    for i in 1..=2 {
        topo.backend(i)?;
    }
    // Every other capability dropped, bpffs mounted (the topology's).
    let wrapper = caps_only(AGENT_CAPS);
    let mut b = Balancer::start_via(topo, &c, &strs(&wrapper), &[])?;

    // Attached, checking, serving TCP and UDP.
    b.wait_healthy(3)?;
    // The agent (its API answers) has only those capabilities.
    let pid = b.topo.pid(b.agent.expect("running"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    assert!(status.starts_with("Name:\tlb-agent\n"), "{status}");
    let cap = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    // CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN
    let only = format!("{:016x}", (1u64 << 39) | (1 << 38) | (1 << 12));
    assert_eq!(
        (cap("CapEff:"), cap("CapPrm:"), cap("CapBnd:")),
        (Some(only.clone()), Some(only.clone()), Some(only)),
        "{status}"
    );
    let (counts, _) = b.spread(URL, 20)?;
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["b1", "b2"],
        "{counts:?}"
    );
    std::fs::write(b.topo.dir().join("udp_client.py"), UDP_CLIENT)?;
    let reply = b.topo.exec(
        "cli",
        &format!("python3 {}/udp_client.py", b.topo.dir().display()),
    )?;
    assert!(reply.starts_with(&format!("{VIP} 5300 b1 saw")), "{reply}");
    // The sweep expires the idle UDP flow.
    assert_eq!(udp_flows(&b.maps()?), 1);
    poll(Duration::from_secs(8), "idle UDP flow expired", || {
        Ok((udp_flows(&b.maps()?) == 0).then_some(()))
    })?;

    // And stops cleanly.
    let status = b.stop_agent(libc::SIGTERM)?;
    assert!(status.success(), "{status}\n{}", b.agent_log());
    assert!(!b.topo.exec("lb", "ip -d link show")?.contains(" xdp"));
    assert!(!b.topo.bpffs().join("lb").exists());
    let log = b.agent_log();
    assert!(!log.contains("WARN") && !log.contains("ERROR"), "{log}");
    Ok(())
}

/// `xdp_mode = "auto"` attaches generic XDP to a veth (both of the routed topology's
/// interfaces are veths), and the balancer forwards in that mode.
#[test]
fn auto_mode_picks_generic_xdp_on_veth() -> Result<()> {
    let b = start(1, &config(1, "", "", "", "xdp_mode = \"auto\""), &[])?;
    b.wait_healthy(1)?;
    let s = b.status()?;
    let modes: BTreeMap<String, String> = s
        .datapath
        .interfaces
        .iter()
        .map(|i| (i.name.clone(), i.mode.clone()))
        .collect();
    assert_eq!(
        modes,
        BTreeMap::from([
            ("l0".to_string(), "generic".to_string()),
            ("l1".to_string(), "generic".to_string())
        ]),
        "{s:?}"
    );
    for iface in ["l0", "l1"] {
        let link = b.topo.exec("lb", &format!("ip -d link show {iface}"))?;
        assert!(link.contains("xdpgeneric"), "{iface}: {link}");
    }
    let d = b.download(&format!("http://{VIP}/"), 5)?;
    assert_eq!((d.exit, d.http_code), (0, 200), "{d:?}");
    Ok(())
}
