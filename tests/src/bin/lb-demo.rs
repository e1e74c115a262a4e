//! `cargo xtask demo`: the five-minute story. A client, the balancer and three backends in
//! network namespaces; `lb-agent` balancing HTTP and UDP for a VIP; one backend dies and drains
//! out, then comes back. Everything it makes goes away at the end, also on Ctrl-C; the root
//! namespace gets no address or route.
//!
//! Usage: lb-demo PATH-TO-LB-AGENT

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_tests::{
    harness::{poll, Balancer, URL},
    topology::{backend_addr, Options, Topology, CLIENT, VIP},
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

const CONFIG: &str = r#"# Written by the demo: every key not set here takes NLB's default.
[agent]
interfaces = ["l0", "l1"]          # client side, backend side
api = "unix:DIR/api.sock"
metrics = "127.0.0.1:9900"
pin_path = "DIR/bpf/lb"

[[listener]]
name = "web"
address = "10.0.100.10"
port = 80
target_group = "web"

[[listener]]
name = "echo"
address = "10.0.100.10"
port = 5300
protocol = "udp"
target_group = "echo"

[[target_group]]
name = "web"
deregistration_delay = "5s"

[target_group.health_check]
protocol = "http"
path = "/health"
interval = "1s"
timeout = "500ms"
healthy_threshold = 2
unhealthy_threshold = 2

[[target_group.target]]
address = "10.0.2.11"
port = 8080

[[target_group.target]]
address = "10.0.2.12"
port = 8080

[[target_group.target]]
address = "10.0.2.13"
port = 8080

[[target_group]]
name = "echo"

[target_group.health_check]
port = 8080
interval = "1s"
timeout = "500ms"
healthy_threshold = 2
unhealthy_threshold = 2

[[target_group.target]]
address = "10.0.2.11"
port = 5300

[[target_group.target]]
address = "10.0.2.12"
port = 5300

[[target_group.target]]
address = "10.0.2.13"
port = 5300
"#;

fn say(s: &str) {
    println!("\n\x1b[1m== {s}\x1b[0m");
}

fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

/// Waits until `f` holds (giving up on Ctrl-C); the time it took.
fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let start = Instant::now();
    poll(limit, what, || {
        interrupted()?;
        Ok(f()?.then_some(()))
    })?;
    Ok(start.elapsed())
}

/// `n` HTTP requests from the client: the answers per backend, and the client addresses the
/// backends saw.
fn requests(b: &Balancer, n: usize) -> Result<()> {
    interrupted()?;
    let (counts, seen) = b.spread(URL, n)?;
    let errors = counts.get("ERR").copied().unwrap_or(0);
    println!(
        "   {n} requests (new connections) from the client {CLIENT} to {URL}: {errors} errors"
    );
    for (name, count) in counts.iter().filter(|(k, _)| *k != "ERR") {
        println!("     {name}: {count:>3}  {}", "#".repeat(*count));
    }
    let seen: Vec<&String> = seen.iter().collect();
    println!("   the client address the backends saw: {seen:?}");
    Ok(())
}

fn main() -> Result<()> {
    let agent_bin = std::env::args()
        .nth(1)
        .context("usage: lb-demo PATH-TO-LB-AGENT")?;
    std::env::set_var("LB_AGENT_BIN", &agent_bin);
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    say("the topology: network namespaces joined by veth pairs, a bridge for the backends");
    println!(
        "   client {CLIENT} ──l0── balancer (XDP on l0, l1) ──l1── switch ── b1 {}, b2 {}, b3 {}",
        backend_addr(1),
        backend_addr(2),
        backend_addr(3)
    );
    println!("   VIP {VIP}: tcp/80 → group web (HTTP check /health), udp/5300 → group echo");
    let mut topo = Topology::new(Options::default())?;
    let mut backends = Vec::new();
    for i in 1..=3 {
        backends.push(topo.backend(i)?);
    }
    say("starting lb-agent run (health checks: interval 1s, timeout 500ms, 2 to rise, 2 to fall)");
    let mut b = Balancer::start(topo, CONFIG, &[])?;
    b.log_on_drop = false;
    println!("   config: {}", b.config_path.display());
    let result = run(&mut b, &backends);
    if let Err(e) = &result {
        eprintln!("\nlb-demo: {e:#}");
        if !INTERRUPTED.load(Ordering::SeqCst) {
            eprintln!("--- agent log ---\n{}", b.agent_log());
        }
    }
    drop(b);
    say("cleaned up: agent stopped (XDP detached), namespaces removed");
    result
}

fn run(b: &mut Balancer, backends: &[usize]) -> Result<()> {
    let took = wait_for(Duration::from_secs(20), "six healthy targets", || {
        Ok(b.states()
            .map(|s| s.values().filter(|v| *v == "healthy").count() == 6)
            .unwrap_or(false))
    })?;
    println!("   all targets healthy after {:.1} s", took.as_secs_f64());

    say("requests spread over the backends; each sees the client's own address");
    requests(b, 30)?;

    say("UDP through the same VIP: replies come back from the VIP and the listener port");
    let udp = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(2)\nfor i in range(3):\n    s.sendto(b'hello %d' % i,('10.0.100.10',5300))\n    d,a=s.recvfrom(2048)\n    print('   reply from %s:%d: %s' % (a[0],a[1],d.decode()))\n";
    let script = b.topo.dir().join("udp.py");
    std::fs::write(&script, udp)?;
    print!(
        "{}",
        b.topo
            .exec("cli", &format!("python3 {}", script.display()))?
    );

    say("lb-agent status");
    print!("{}", b.cli(&["status"])?.1);

    say("killing backend b2 (its server stops; checks are refused)");
    let b2 = format!("{}:8080", backend_addr(2));
    let killed = Instant::now();
    b.topo.stop(backends[1], libc::SIGKILL)?;
    wait_for(Duration::from_secs(10), "b2 out of the maps", || {
        Ok(!b.table_targets(0)?.contains(&b2))
    })?;
    println!(
        "   b2 out of the maps {:.2} s after it died (worst case interval × unhealthy_threshold = 2 s; + timeout for a silent host)",
        killed.elapsed().as_secs_f64()
    );
    println!(
        "   state: {}",
        b.states()?
            .get(&format!("web/{b2}"))
            .cloned()
            .unwrap_or_default()
    );
    requests(b, 20)?;

    say("restarting b2");
    let restarted = Instant::now();
    b.topo.backend(2)?;
    wait_for(Duration::from_secs(10), "b2 back in the maps", || {
        Ok(b.table_targets(0)?.contains(&b2))
    })?;
    println!(
        "   b2 back in the maps {:.2} s after its restart (healthy_threshold = 2 passing checks)",
        restarted.elapsed().as_secs_f64()
    );
    requests(b, 30)?;

    say("metrics (Prometheus, http://127.0.0.1:9900/metrics in the balancer's namespace), a few lines");
    let page = b
        .topo
        .exec("lb", "curl -s -m 2 http://127.0.0.1:9900/metrics")?;
    for line in page.lines().filter(|l| {
        l.starts_with("lb_new_flows_total")
            || l.starts_with("lb_healthy_targets")
            || l.starts_with("lb_packets_total{listener=\"web\"")
    }) {
        println!("   {line}");
    }
    Ok(())
}
