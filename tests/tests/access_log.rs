//! The access log (`agent.access_log`) with real clients: every finished flow gives one JSON
//! line with the right close reason, under load too, and the file is reopened on SIGHUP.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_common::{FlowKey, FAMILY_V4, PROTO_TCP};
use lb_tests::{
    harness::{config, poll, Balancer},
    topology::{backend_addr, Options, CLIENT, VIP},
};
use lb_userspace::access_log::AccessRecord;

fn log_path(b: &Balancer) -> PathBuf {
    b.topo.dir().join("access.log")
}

/// The records in `path` (none when it does not exist yet).
fn records(path: &Path) -> Result<Vec<AccessRecord>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("record {l:?}")))
        .collect()
}

fn wait_records(path: &Path, n: usize, limit: Duration) -> Result<Vec<AccessRecord>> {
    poll(limit, &format!("{n} records in {}", path.display()), || {
        let r = records(path)?;
        Ok((r.len() >= n).then_some(r))
    })
}

fn start(backends: usize, listener: &str, group: &str) -> Result<Balancer> {
    let agent = "access_log = \"DIR/access.log\"";
    Balancer::with_backends(
        Options {
            backends,
            ..Options::default()
        },
        &config(backends, listener, group, "", agent),
    )
}

/// Clients that open `n` connections to the VIP, print "open PORT" for each, wait for the file
/// `go`, then on each send a request, read the answer to its end and print "PORT ANSWER".
const HOLD: &str = r#"
import os, socket, sys, time
n, go = int(sys.argv[1]), sys.argv[2]
socks = []
for _ in range(n):
    s = socket.create_connection(("10.0.100.10", 80), timeout=10)
    socks.append(s)
    print("open", s.getsockname()[1], flush=True)
while not os.path.exists(go):
    time.sleep(0.02)
for s in socks:
    port = s.getsockname()[1]
    try:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        body = data.split(b"\r\n\r\n", 1)[-1].split(b" ")[0].decode() or "EMPTY"
        print(port, body, flush=True)
    except OSError as e:
        print(port, "ERR", e, flush=True)
    s.close()
print("done", flush=True)
"#;

/// Opens `n` connections from the client and holds them; their local ports.
fn hold(b: &mut Balancer, name: &str, n: usize) -> Result<(usize, Vec<u16>, PathBuf)> {
    let script = b.topo.dir().join("hold.py");
    std::fs::write(&script, HOLD)?;
    let go = b.topo.dir().join(format!("{name}.go"));
    let (s, g, count) = (
        script.to_string_lossy().into_owned(),
        go.to_string_lossy().into_owned(),
        n.to_string(),
    );
    let handle = b
        .topo
        .spawn("cli", name, Path::new("python3"), &["-u", &s, &count, &g])?;
    let ports = poll(Duration::from_secs(10), "connections open", || {
        let ports: Vec<u16> = b
            .topo
            .log(name)
            .lines()
            .filter_map(|l| l.strip_prefix("open ")?.parse().ok())
            .collect();
        Ok((ports.len() == n).then_some(ports))
    })?;
    Ok((handle, ports, go))
}

/// Lets held connections go on, and waits until they are done.
fn release(b: &Balancer, name: &str, go: &Path) -> Result<()> {
    std::fs::write(go, b"")?;
    poll(Duration::from_secs(20), "held connections done", || {
        Ok(b.topo.log(name).contains("done").then_some(()))
    })
}

fn target_of(r: &AccessRecord) -> String {
    r.target.map(|t| t.to_string()).unwrap_or_default()
}

#[test]
fn ten_thousand_short_connections_give_ten_thousand_records_and_sighup_reopens() -> Result<()> {
    let mut b = start(2, "", "")?;
    b.wait_healthy(2)?;
    let path = log_path(&b);
    // 10,000 HTTP/1.0 requests, 8 at a time, each on its own connection read to its end.
    let n = 10_000;
    let started = Instant::now();
    let out = b.topo.python(
        "cli",
        "short",
        &format!(
            r#"
import socket, threading
ok, errors = [0], [0]
lock = threading.Lock()
def run(k):
    for _ in range(k):
        try:
            s = socket.create_connection(("{VIP}", 80), timeout=5)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            while s.recv(65536):
                pass
            s.close()
            with lock: ok[0] += 1
        except OSError:
            with lock: errors[0] += 1
threads = [threading.Thread(target=run, args=({n} // 8,)) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(ok[0], errors[0])
"#
        ),
    )?;
    let sent = started.elapsed();
    assert_eq!(out.trim(), format!("{n} 0"), "client: ok, errors");
    let all = wait_records(&path, n, Duration::from_secs(60))?;
    let logged = started.elapsed();
    assert_eq!(all.len(), n, "exactly one record per connection");
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    let mut targets: BTreeMap<String, usize> = BTreeMap::new();
    for r in &all {
        *reasons.entry(r.reason.as_str()).or_default() += 1;
        *targets.entry(target_of(r)).or_default() += 1;
        assert_eq!(r.client.ip().to_string(), CLIENT, "{r:?}");
        assert_eq!(r.vip.to_string(), format!("{VIP}:80"), "{r:?}");
        assert_eq!((r.listener.as_str(), r.protocol.as_str()), ("web", "tcp"));
        assert_eq!(r.group.as_deref(), Some("web"), "{r:?}");
        // SYN, ACK, request, FIN, last ACK in; SYN-ACK, answer, FIN out (at least).
        let (pi, po) = (r.packets_in.unwrap(), r.packets_out.unwrap());
        assert!(pi >= 4 && po >= 3, "{r:?}");
        assert!(
            r.bytes_in.unwrap() >= pi * 54 && r.bytes_out.unwrap() >= po * 54,
            "{r:?}"
        );
        assert!(r.start <= r.end, "{r:?}");
    }
    assert_eq!(reasons, [("fin", n)].into(), "close reasons");
    assert_eq!(targets.len(), 2, "{targets:?}");
    for t in [1, 2] {
        assert!(targets.contains_key(&format!("{}:8080", backend_addr(t))));
    }
    let status = b.status()?;
    let log = status.datapath.access_log.context("access log status")?;
    assert_eq!(log.records.get("fin"), Some(&(n as u64)));
    assert_eq!((log.write_errors, log.events_lost), (0, Some(0)));
    assert_eq!(
        b.metric("lb_access_log_records_total{reason=\"fin\"}")?,
        n as f64
    );
    println!(
        "FIGURE access log: {n} connections sent in {:.2} s ({:.0}/s); all {n} records written {:.2} s after the first connection",
        sent.as_secs_f64(),
        n as f64 / sent.as_secs_f64(),
        logged.as_secs_f64()
    );

    // logrotate: move the file away, SIGHUP; new records go to a new file at the old path.
    let rotated = b.topo.dir().join("access.log.1");
    std::fs::rename(&path, &rotated)?;
    let pid = b.topo.pid(b.agent.context("agent")?);
    nix_kill(pid, "HUP")?;
    poll(Duration::from_secs(10), "the reload after SIGHUP", || {
        Ok(b.agent_log().contains("config reloaded").then_some(()))
    })?;
    let (spread, _) = b.spread(lb_tests::harness::URL, 5)?;
    assert_eq!(spread.get("ERR"), None);
    let fresh = wait_records(&path, 5, Duration::from_secs(10))?;
    assert_eq!(fresh.len(), 5);
    assert_eq!(
        records(&rotated)?.len(),
        n,
        "the rotated file is left alone"
    );
    let _ = b.stop_agent(libc::SIGTERM);
    Ok(())
}

fn nix_kill(pid: u32, signal: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -{signal} {pid}");
    Ok(())
}

#[test]
fn flows_ended_by_their_target_say_why() -> Result<()> {
    let group = "deregistration_delay = \"0s\"\nconnection_termination_on_deregistration = true";
    let mut b = start(2, "", group)?;
    b.wait_healthy(2)?;
    let path = log_path(&b);
    let (b1, b2) = (
        format!("{}:8080", backend_addr(1)),
        format!("{}:8080", backend_addr(2)),
    );

    // 16 connections over both targets; b2 turns unhealthy (termination on, the default):
    // its flows end with target_unhealthy at their next packet, b1's finish.
    let (_, ports, go) = hold(&mut b, "hold1", 16)?;
    b.topo.set_sick(2, true)?;
    poll(Duration::from_secs(10), "b2 unhealthy", || {
        Ok(
            (b.states()?.get(&format!("web/{b2}")).map(String::as_str) == Some("unhealthy"))
                .then_some(()),
        )
    })?;
    release(&b, "hold1", &go)?;
    // Per held connection: on b1 one record, fin; on b2 a record with target_unhealthy, and
    // its next packet (the request) rescheduled to b1, which resets it (rst).
    let by_port = poll(Duration::from_secs(15), "the held flows' records", || {
        let mut by_port: BTreeMap<u16, Vec<(String, String)>> = BTreeMap::new();
        for r in records(&path)? {
            if ports.contains(&r.client.port()) {
                by_port
                    .entry(r.client.port())
                    .or_default()
                    .push((target_of(&r), r.reason.clone()));
            }
        }
        let complete = by_port.len() == 16
            && by_port
                .values()
                .all(|v| v.len() == 1 || v.iter().any(|(t, _)| t == &b1));
        Ok(complete.then_some(by_port))
    })?;
    let finished = vec![(b1.clone(), "fin".to_string())];
    let terminated = vec![
        (b2.clone(), "target_unhealthy".to_string()),
        (b1.clone(), "rst".to_string()),
    ];
    for (port, seen) in &by_port {
        assert!(
            *seen == finished || *seen == terminated,
            "port {port}: {seen:?}"
        );
    }
    let on_b2 = by_port.values().filter(|v| **v == terminated).count();
    println!("held flows: {on_b2} of 16 were on b2");
    assert!(on_b2 > 0 && on_b2 < 16, "16 flows over two targets");

    // Now every new flow goes to b1; it is deregistered with termination and no delay: its
    // flows end with target_removed.
    let (_, ports, go) = hold(&mut b, "hold2", 8)?;
    let (code, out) = b.cli(&["targets", "deregister", "--group", "web", &b1])?;
    assert_eq!(code, 0, "{out}");
    poll(Duration::from_secs(10), "b1 removed", || {
        Ok((!b.states()?.contains_key(&format!("web/{b1}"))).then_some(()))
    })?;
    release(&b, "hold2", &go)?;
    let removed = poll(Duration::from_secs(15), "records of b1's flows", || {
        let held: Vec<AccessRecord> = records(&path)?
            .into_iter()
            .filter(|r| ports.contains(&r.client.port()) && target_of(r) == b1)
            .collect();
        Ok((held.len() == 8).then_some(held))
    })?;
    for r in &removed {
        assert_eq!(r.reason, "target_removed", "{r:?}");
        assert_eq!(
            r.group.as_deref(),
            Some("web"),
            "a removed target is still named"
        );
    }
    Ok(())
}

#[test]
fn idle_reset_and_evicted_flows_are_logged() -> Result<()> {
    let mut b = start(1, "idle_timeout = \"2s\"", "")?;
    b.wait_healthy(1)?;
    let path = log_path(&b);

    // A connection that never sends: the sweep ends it after the idle timeout.
    let (_, idle, _) = hold(&mut b, "idle", 1)?;
    let r = poll(Duration::from_secs(15), "the idle flow's record", || {
        Ok(records(&path)?
            .into_iter()
            .find(|r| r.client.port() == idle[0]))
    })?;
    assert_eq!(r.reason, "idle_timeout", "{r:?}");
    assert_eq!((r.packets_in, r.packets_out), (Some(2), Some(1)), "{r:?}");

    // A connection the client resets (SO_LINGER 0): logged at once with reason rst.
    let out = b.topo.python(
        "cli",
        "reset",
        &format!(
            r#"
import socket, struct
s = socket.create_connection(("{VIP}", 80), timeout=5)
print(s.getsockname()[1])
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
"#
        ),
    )?;
    let reset: u16 = out.trim().parse()?;
    let r = poll(Duration::from_secs(5), "the reset flow's record", || {
        Ok(records(&path)?
            .into_iter()
            .find(|r| r.client.port() == reset))
    })?;
    assert_eq!(r.reason, "rst", "{r:?}");

    // An entry that vanishes from the table without the sweep (what LRU eviction does): the
    // next sweep says it was evicted.
    let (_, gone, go) = hold(&mut b, "evict", 1)?;
    let key = FlowKey {
        src_addr: [
            u32::from_ne_bytes(CLIENT.parse::<std::net::Ipv4Addr>()?.octets()),
            0,
            0,
            0,
        ],
        dst_addr: [
            u32::from_ne_bytes(VIP.parse::<std::net::Ipv4Addr>()?.octets()),
            0,
            0,
            0,
        ],
        src_port_be: gone[0].to_be(),
        dst_port_be: 80u16.to_be(),
        protocol: PROTO_TCP,
        family: FAMILY_V4,
        _pad: 0,
    };
    let mut maps = b.maps()?;
    anyhow::ensure!(maps.flow(&key)?.is_some(), "the held flow has an entry");
    maps.remove_flow(&key)?;
    let r = poll(Duration::from_secs(10), "the evicted flow's record", || {
        Ok(records(&path)?
            .into_iter()
            .find(|r| r.client.port() == gone[0]))
    })?;
    assert_eq!(r.reason, "evicted", "{r:?}");
    assert_eq!(r.packets_in, None, "its counters went with its entry");
    std::fs::write(go, b"")?;
    Ok(())
}
