//! Passive health with real clients: a target whose service stops while its health port
//! still answers is taken out on its failed connections, well within a check interval, and
//! comes back through the active checks.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_tests::{
    harness::{poll, Balancer},
    topology::{backend_addr, Options, Topology, VIP},
};

/// Serves port 9000 on ADDR: answers "NAME\n" and closes.
const SERVICE: &str = r#"
import socket, sys
name, addr = sys.argv[1], sys.argv[2]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, 9000))
s.listen(128)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(name.encode() + b"\n")
    c.close()
"#;

/// Clients: a connection every 20 ms for SECONDS, each line "ELAPSED ANSWER" (ERR: refused or
/// failed).
const CLIENT: &str = r#"
import socket, sys, time
vip, seconds = sys.argv[1], float(sys.argv[2])
start = time.monotonic()
while time.monotonic() - start < seconds:
    t = time.monotonic() - start
    try:
        s = socket.create_connection((vip, 80), timeout=1)
        answer = s.recv(64).decode().strip() or "EMPTY"
        s.close()
    except OSError:
        answer = "ERR"
    print(f"{t:.3f} {answer}", flush=True)
    time.sleep(0.02)
"#;

const INTERVAL_S: f64 = 4.0;

fn config() -> String {
    let mut c = String::from(
        r#"[agent]
interfaces = ["l0", "l1"]
api = "unix:DIR/api.sock"
metrics = "127.0.0.1:9900"
pin_path = "DIR/bpf/lb"
flow_table_size = 65536

[[listener]]
name = "web"
address = "10.0.100.10"
port = 80
target_group = "web"

[[target_group]]
name = "web"
hash_table_size = 4099

[target_group.health_check]
protocol = "http"
path = "/health"
port = 8080
interval = "4s"
timeout = "1s"
healthy_threshold = 2
unhealthy_threshold = 2
passive_unhealthy_after = 3
"#,
    );
    for i in 1..=2 {
        c.push_str(&format!(
            "\n[[target_group.target]]\naddress = \"{}\"\nport = 9000\n",
            backend_addr(i)
        ));
    }
    c
}

fn service(topo: &mut Topology, i: usize) -> Result<usize> {
    let script = topo.dir().join("service.py");
    std::fs::write(&script, SERVICE)?;
    let name = format!("b{i}");
    let log = format!("service-{name}-{}", Instant::now().elapsed().as_nanos());
    let handle = topo.spawn(
        &name,
        &log,
        Path::new("python3"),
        &["-u", &script.to_string_lossy(), &name, &backend_addr(i)],
    )?;
    poll(Duration::from_secs(10), "service listening", || {
        Ok(topo.log(&log).contains("listening").then_some(()))
    })?;
    Ok(handle)
}

fn state(b: &Balancer, i: usize) -> Result<Option<(String, Option<String>)>> {
    let status = match b.status() {
        Ok(s) => s,
        Err(_) => return Ok(None), // not answering yet
    };
    let want = format!("{}:9000", backend_addr(i));
    Ok(status.target_groups[0]
        .targets
        .iter()
        .find(|t| t.target.to_string() == want)
        .map(|t| {
            (
                t.state.to_string(),
                t.reason.map(|r| r.as_str().to_string()),
            )
        }))
}

fn healthy(b: &Balancer, i: usize) -> Result<bool> {
    Ok(state(b, i)?.is_some_and(|(s, _)| s == "healthy"))
}

/// Two targets, their services on 9000 and health ports on 8080, both healthy; the balancer,
/// and b2's service's handle.
fn healthy_pair() -> Result<(Balancer, usize)> {
    let mut topo = Topology::new(Options {
        backends: 2,
        ..Options::default()
    })?;
    for i in 1..=2 {
        topo.backend(i)?; // the health port, 8080
    }
    let _s1 = service(&mut topo, 1)?;
    let s2 = service(&mut topo, 2)?;
    let b = Balancer::start(topo, &config(), &[])?;
    poll(Duration::from_secs(20), "both targets healthy", || {
        Ok((healthy(&b, 1)? && healthy(&b, 2)?).then_some(()))
    })?;
    Ok((b, s2))
}

#[test]
fn a_target_whose_service_stops_is_ejected_on_its_connections_and_comes_back_by_checks(
) -> Result<()> {
    let (mut b, s2) = healthy_pair()?;

    // b2's service dies; its health port goes on answering.
    b.topo.stop(s2, libc::SIGKILL)?;
    let script = b.topo.dir().join("clients.py");
    std::fs::write(&script, CLIENT)?;
    let clients = std::process::Command::new("ip")
        .args(["netns", "exec", &b.topo.ns("cli"), "python3"])
        .arg(&script)
        .args([VIP, "3"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let died = Instant::now();
    let ejected = poll(Duration::from_secs(10), "b2 ejected", || {
        Ok(state(&b, 2)?
            .filter(|(s, _)| s == "unhealthy")
            .map(|(_, r)| (died.elapsed(), r)))
    })?;
    let out = clients.wait_with_output()?;
    let lines: Vec<(f64, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (t, a) = l.split_once(' ')?;
            Some((t.parse().ok()?, a.to_string()))
        })
        .collect();
    assert_eq!(
        ejected.1.as_deref(),
        Some("Target.ConnectionsFailed"),
        "the passive reason"
    );
    let errors: Vec<f64> = lines
        .iter()
        .filter(|(_, a)| a == "ERR")
        .map(|l| l.0)
        .collect();
    let last_error = errors.last().copied().context("some connections failed")?;
    println!(
        "FIGURE passive ejection: the clients' last failed connection {:.0} ms after b2's service died ({} failed, of {} connections); the status showed b2 unhealthy {:.0} ms after (check interval {INTERVAL_S} s)",
        last_error * 1000.0,
        errors.len(),
        lines.len(),
        ejected.0.as_secs_f64() * 1000.0,
    );
    assert!(
        ejected.0.as_secs_f64() < INTERVAL_S / 2.0,
        "ejected after {:?}, not well within the {INTERVAL_S} s interval",
        ejected.0
    );
    // The third failure in a row crosses passive_unhealthy_after; the agent reads the counters
    // every 200 ms, so failures go on for at most one poll (and a map write) after it. How many
    // that is depends on the clients' pace (about 25 a second reach b2), so the bound is time.
    assert!(errors.len() >= 3, "{errors:?}");
    assert!(
        errors[errors.len() - 1] - errors[2] < 0.3,
        "failures went on more than a poll after the third: {errors:?}"
    );
    let after: Vec<&(f64, String)> = lines.iter().filter(|(t, _)| *t > last_error).collect();
    assert!(
        after.len() > 20 && after.iter().all(|(_, a)| a == "b1"),
        "after the ejection every connection goes to b1: {after:?}"
    );
    let target = format!("{}:9000", backend_addr(2));
    let labels = format!("{{group=\"web\",target=\"{target}\"}}");
    assert!(b.metric(&format!("lb_target_connections_refused_total{labels}"))? >= 3.0);
    assert_eq!(
        b.metric(&format!("lb_passive_ejections_total{labels}"))?,
        1.0
    );

    // Its service back: the active checks bring it back after healthy_threshold passes (its
    // checker started again from unhealthy), not at its next passing check.
    let _s2 = service(&mut b.topo, 2)?;
    let back = poll(Duration::from_secs(20), "b2 healthy again", || {
        Ok(healthy(&b, 2)?.then(|| died.elapsed()))
    })?;
    println!(
        "FIGURE passive recovery: b2 healthy again {:.1} s after its ejection",
        (back - ejected.0).as_secs_f64()
    );
    assert!(
        (back - ejected.0).as_secs_f64() > INTERVAL_S * 0.9,
        "two passes take at least an interval: back after {:?}",
        back - ejected.0
    );
    Ok(())
}

/// Parallel clients: 8 threads, each connecting for SECONDS with a 3 s timeout.
const PARALLEL: &str = r#"
import socket, sys, threading, time
vip, seconds = sys.argv[1], float(sys.argv[2])
start = time.monotonic()
lock = threading.Lock()
def run():
    while time.monotonic() - start < seconds:
        t = time.monotonic() - start
        try:
            s = socket.create_connection((vip, 80), timeout=3)
            answer = s.recv(64).decode().strip() or "EMPTY"
            s.close()
        except OSError:
            answer = "ERR"
        with lock:
            print(f"{t:.3f} {answer}", flush=True)
        time.sleep(0.05)
threads = [threading.Thread(target=run) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
"#;

#[test]
fn a_target_that_stops_answering_syns_is_ejected_on_its_unanswered_connections() -> Result<()> {
    let (b, _s2) = healthy_pair()?;
    // b2's firewall drops its service's SYNs; its health port still answers.
    b.topo.exec(
        "b2",
        "nft add table inet lbtest && nft add chain inet lbtest input '{ type filter hook input priority 0; }' && nft add rule inet lbtest input tcp dport 9000 drop",
    )?;
    let script = b.topo.dir().join("parallel.py");
    std::fs::write(&script, PARALLEL)?;
    let clients = std::process::Command::new("ip")
        .args(["netns", "exec", &b.topo.ns("cli"), "python3"])
        .arg(&script)
        .args([VIP, "4"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let dropping = Instant::now();
    let ejected = poll(Duration::from_secs(10), "b2 ejected", || {
        Ok(state(&b, 2)?
            .filter(|(s, _)| s == "unhealthy")
            .map(|(_, r)| (dropping.elapsed(), r)))
    })?;
    let out = clients.wait_with_output()?;
    let answers: Vec<&str> = std::str::from_utf8(&out.stdout)?
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(_, a)| a))
        .collect();
    println!(
        "FIGURE passive ejection (SYNs dropped): b2 unhealthy {:.0} ms after its SYNs began to be dropped (clients retransmit a SYN after 1 s; check interval {INTERVAL_S} s); {} of {} connections failed",
        ejected.0.as_secs_f64() * 1000.0,
        answers.iter().filter(|a| **a == "ERR").count(),
        answers.len()
    );
    assert_eq!(ejected.1.as_deref(), Some("Target.ConnectionsFailed"));
    assert!(
        ejected.0.as_secs_f64() < INTERVAL_S,
        "ejected after {:?}",
        ejected.0
    );
    let labels = format!("{{group=\"web\",target=\"{}:9000\"}}", backend_addr(2));
    assert!(b.metric(&format!("lb_target_syns_unanswered_total{labels}"))? >= 3.0);
    assert_eq!(
        b.metric(&format!("lb_passive_ejections_total{labels}"))?,
        1.0
    );
    // Connections whose SYN was sent again after the ejection were rescheduled to b1, which
    // answered them: only those that gave up before fail.
    assert!(
        answers.iter().filter(|a| **a == "b1").count() > 20,
        "{answers:?}"
    );
    Ok(())
}
