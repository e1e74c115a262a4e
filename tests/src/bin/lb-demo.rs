//! `cargo xtask demo`: the five-minute story. A client, the balancer and three backends in
//! network namespaces; `lb-agent` balancing HTTP and UDP for a VIP; one backend dies and drains
//! out, then comes back. Everything it makes goes away at the end, also on Ctrl-C; the root
//! namespace gets no address or route.
//!
//! Usage: lb-demo PATH-TO-LB-AGENT

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_tests::topology::{backend_addr, Options, Topology, CLIENT, VIP};
use lb_userspace::maps::KernelMaps;

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

/// Polls `f` every 20 ms until it holds; the time it took.
fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let start = Instant::now();
    loop {
        interrupted()?;
        if f()? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Demo {
    topo: Topology,
    agent_bin: PathBuf,
    api: String,
    agent: usize,
}

impl Demo {
    fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.agent_bin)
            .arg("--api")
            .arg(&self.api)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "lb-agent {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn web_states(&self) -> Result<BTreeMap<String, String>> {
        let s: serde_json::Value = serde_json::from_str(&self.cli(&["status", "--json"])?)?;
        Ok(s["target_groups"][0]["targets"]
            .as_array()
            .context("targets")?
            .iter()
            .map(|t| {
                (
                    t["target"].as_str().unwrap_or_default().into(),
                    t["state"].as_str().unwrap_or_default().into(),
                )
            })
            .collect())
    }

    /// Target endpoints in the web group's live table, read from the pinned maps.
    fn web_table(&self) -> Result<Vec<String>> {
        let maps = KernelMaps::from_pins(&self.topo.bpffs().join("lb/maps"))?;
        let mut ids = maps.active_table(0)?;
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter()
            .map(|id| {
                let t = maps.target(id)?;
                let ip = lb_common::addr::from_words(&t.addr, t.family).context("address")?;
                Ok(format!("{ip}:{}", u16::from_be(t.port_be)))
            })
            .collect()
    }

    /// `n` HTTP requests from the client; the answers by backend, and what each saw.
    fn requests(&self, n: usize) -> Result<()> {
        let mut by_backend: BTreeMap<String, usize> = BTreeMap::new();
        let mut saw: BTreeMap<String, String> = BTreeMap::new();
        let mut errors = 0;
        for _ in 0..n {
            interrupted()?;
            match self
                .topo
                .exec("cli", &format!("curl -s -m 2 http://{VIP}/"))
            {
                Ok(body) => {
                    // "b1 saw 10.0.1.2 43512"
                    let mut words = body.split_whitespace();
                    let name = words.next().unwrap_or("?").to_string();
                    let seen = words.nth(1).unwrap_or("?").to_string();
                    *by_backend.entry(name.clone()).or_default() += 1;
                    saw.insert(name, seen);
                }
                Err(_) => errors += 1,
            }
        }
        println!("   {n} requests from the client {CLIENT} to http://{VIP}/ ({errors} errors):");
        for (b, count) in &by_backend {
            println!(
                "     {b}: {count:>3}  {}  (the client address {b} saw: {})",
                "#".repeat(*count),
                saw[b]
            );
        }
        Ok(())
    }
}

fn main() -> Result<()> {
    let agent_bin = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: lb-demo PATH-TO-LB-AGENT")?,
    );
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    let topo = Topology::new(Options::default())?;
    let dir = topo.dir().to_string_lossy().into_owned();
    let mut demo = Demo {
        topo,
        agent_bin,
        api: format!("unix:{dir}/api.sock"),
        agent: usize::MAX,
    };
    let result = run(&mut demo, &dir);
    let state = lb_userspace::datapath::state_file(&demo.topo.bpffs().join("lb"));
    if demo.agent != usize::MAX {
        let _ = demo.topo.stop(demo.agent, libc::SIGTERM);
    }
    let _ = std::fs::remove_file(state);
    say("cleaned up: agent stopped (XDP detached), namespaces removed");
    if let Err(e) = &result {
        eprintln!("\nlb-demo: {e:#}");
        let log = demo.topo.log("agent");
        if !log.is_empty() && !INTERRUPTED.load(Ordering::SeqCst) {
            eprintln!("--- agent log ---\n{log}");
        }
    }
    result
}

fn run(d: &mut Demo, dir: &str) -> Result<()> {
    say("the topology: network namespaces joined by veth pairs, a bridge for the backends");
    println!(
        "   client {CLIENT} ──l0── balancer (XDP on l0, l1) ──l1── switch ── b1 {}, b2 {}, b3 {}",
        backend_addr(1),
        backend_addr(2),
        backend_addr(3)
    );
    println!("   VIP {VIP}: tcp/80 → group web (HTTP check /health), udp/5300 → group echo");
    let mut backends = Vec::new();
    for i in 1..=3 {
        backends.push(d.topo.backend(i)?);
    }
    let config = d.topo.dir().join("lb.toml");
    std::fs::write(&config, CONFIG.replace("DIR", dir))?;
    println!("   config: {}", config.display());

    say("starting lb-agent run (health checks: interval 1s, timeout 500ms, 2 to rise, 2 to fall)");
    let config_arg = config.to_string_lossy().into_owned();
    let bin = d.agent_bin.clone();
    d.agent = d
        .topo
        .spawn("lb", "agent", &bin, &["run", "--config", &config_arg])?;
    let took = wait_for(Duration::from_secs(20), "three healthy web targets", || {
        Ok(d.web_states()
            .map(|s| s.values().filter(|v| *v == "healthy").count() == 3)
            .unwrap_or(false))
    })?;
    println!(
        "   all three backends healthy after {:.1} s",
        took.as_secs_f64()
    );

    say("requests spread over the backends; each sees the client's own address");
    d.requests(30)?;

    say("UDP through the same VIP: replies come back from the VIP and the listener port");
    let udp = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(2)\nfor i in range(3):\n    s.sendto(b'hello %d' % i,('10.0.100.10',5300))\n    d,a=s.recvfrom(2048)\n    print('   reply from %s:%d: %s' % (a[0],a[1],d.decode()))\n";
    std::fs::write(d.topo.dir().join("udp.py"), udp)?;
    print!("{}", d.topo.exec("cli", &format!("python3 {dir}/udp.py"))?);

    say("lb-agent status");
    print!("{}", d.cli(&["status"])?);

    say("killing backend b2 (its server stops; checks are refused)");
    let b2 = format!("{}:8080", backend_addr(2));
    let killed = Instant::now();
    d.topo.stop(backends[1], libc::SIGKILL)?;
    wait_for(Duration::from_secs(10), "b2 out of the maps", || {
        Ok(!d.web_table()?.contains(&b2))
    })?;
    let out = killed.elapsed();
    println!(
        "   b2 out of the maps {:.2} s after it died (worst case interval × unhealthy_threshold = 2 s; + timeout for a silent host)",
        out.as_secs_f64()
    );
    println!(
        "   state: {}",
        d.web_states()?.get(&b2).cloned().unwrap_or_default()
    );
    d.requests(20)?;

    say("restarting b2");
    let restarted = Instant::now();
    d.topo.backend(2)?;
    wait_for(Duration::from_secs(10), "b2 back in the maps", || {
        Ok(d.web_table()?.contains(&b2))
    })?;
    println!(
        "   b2 back in the maps {:.2} s after its restart (healthy_threshold = 2 passing checks)",
        restarted.elapsed().as_secs_f64()
    );
    d.requests(30)?;

    say("metrics (Prometheus, http://127.0.0.1:9900/metrics in the balancer's namespace), a few lines");
    let page = d
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
