//! End to end, on one namespace topology (client ⇄ balancer ⇄ bridge ⇄ three backends), four
//! ways through the balancer host one after another:
//!
//! - `xdp`: this balancer (`lb-agent`, XDP native on both veths);
//! - `nftables`: kube-proxy-style DNAT in the balancer namespace, a random choice over the
//!   same three backends (`numgen random`), client address kept, replies un-NATed by conntrack
//!   on their way back through the balancer;
//! - `haproxy`: HAProxy in TCP mode in the balancer namespace (a full proxy: two connections);
//! - `direct`: no balancer, plain kernel routing through the balancer namespace to backend 1.
//!
//! Backends serve HTTP with HAProxy (`http-request return`: a C server, so the backends are not
//! the bottleneck) on port 80, and iperf3 on backend 1. Measured: new connections per second
//! (`wrk`, `Connection: close`), TCP throughput (iperf3, 4 streams), UDP packets per second
//! delivered with 64-byte payloads (iperf3 `-u -l 64 -b 0`; HAProxy has no UDP), and the
//! machine's busy CPU time (all CPUs, /proc/stat) per connection and per UDP packet.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{
    harness::Balancer,
    topology::{backend_addr, Topology, CLIENT_B, VIP},
};

#[derive(Clone, Debug, Default)]
pub struct Row {
    pub balancer: &'static str,
    pub conns_per_s: f64,
    pub cpu_us_per_conn: f64,
    pub tcp_gbit_s: f64,
    /// None where the balancer has no UDP.
    pub udp_pps: Option<f64>,
    pub cpu_us_per_udp_packet: Option<f64>,
}

/// Busy and total jiffies of all CPUs.
fn cpu_jiffies() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    let total: u64 = v.iter().take(8).sum();
    Ok((total - idle, total))
}

/// Runs `f` and returns its result with the machine's busy CPU seconds meanwhile.
fn with_cpu<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (b0, _) = cpu_jiffies()?;
    let out = f()?;
    let (b1, _) = cpu_jiffies()?;
    Ok((out, (b1 - b0) as f64 / hz))
}

const BACKEND_HTTP: &str = "global\n  maxconn 4000\ndefaults\n  mode http\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\nfrontend web\n  bind ADDR:80\n  http-request return status 200 content-type text/plain string NAME\n";

const PROXY: &str = "global\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\nfrontend web\n  bind 10.0.100.10:80\n  default_backend web\nbackend web\n  balance roundrobin\n  server b1 10.0.2.11:80\n  server b2 10.0.2.12:80\n  server b3 10.0.2.13:80\nfrontend perf\n  bind 10.0.100.10:5201\n  default_backend perf\nbackend perf\n  server b1 10.0.2.11:5201\n";

const NFT: &str = "table ip lbbench {\n  chain pre {\n    type nat hook prerouting priority dstnat; policy accept;\n    ip daddr 10.0.100.10 tcp dport 80 dnat to numgen random mod 3 map { 0 : 10.0.2.11, 1 : 10.0.2.12, 2 : 10.0.2.13 }\n    ip daddr 10.0.100.10 tcp dport 5201 dnat to 10.0.2.11\n    ip daddr 10.0.100.10 udp dport 5201 dnat to 10.0.2.11\n  }\n}\n";

fn agent_config() -> String {
    let mut c = String::from(
        "[agent]\ninterfaces = [\"l0\", \"l1\"]\napi = \"unix:DIR/api.sock\"\nmetrics = \"\"\npin_path = \"DIR/bpf/lb\"\n\n\
         [[listener]]\nname = \"web\"\naddress = \"10.0.100.10\"\nport = 80\ntarget_group = \"web\"\n\n\
         [[listener]]\nname = \"perf\"\naddress = \"10.0.100.10\"\nport = 5201\nprotocol = \"tcp_udp\"\ntarget_group = \"perf\"\n\n\
         [[target_group]]\nname = \"web\"\n\n[target_group.health_check]\ninterval = \"2s\"\ntimeout = \"1s\"\nhealthy_threshold = 2\n",
    );
    for i in 1..=3 {
        c.push_str(&format!(
            "\n[[target_group.target]]\naddress = \"{}\"\nport = 80\n",
            backend_addr(i)
        ));
    }
    c.push_str("\n[[target_group]]\nname = \"perf\"\n\n[target_group.health_check]\nport = 80\ninterval = \"2s\"\ntimeout = \"1s\"\nhealthy_threshold = 2\n\n[[target_group.target]]\naddress = \"10.0.2.11\"\nport = 5201\n");
    c
}

/// The topology with HAProxy HTTP backends and an iperf3 server on backend 1.
pub fn topology() -> Result<Topology> {
    let mut topo = Topology::routed(3)?;
    for i in 1..=3 {
        let cfg = topo.dir().join(format!("backend{i}.cfg"));
        std::fs::write(
            &cfg,
            BACKEND_HTTP
                .replace("ADDR", &backend_addr(i))
                .replace("NAME", &format!("b{i}")),
        )?;
        let cfg = cfg.to_string_lossy().into_owned();
        topo.spawn(
            &format!("b{i}"),
            &format!("haproxy-b{i}"),
            std::path::Path::new("haproxy"),
            &["-db", "-f", &cfg],
        )?;
    }
    topo.spawn(
        "b1",
        "iperf3",
        std::path::Path::new("iperf3"),
        &["-s", "-B", &backend_addr(1)],
    )?;
    // Up when backend 1 answers through plain routing.
    let start = std::time::Instant::now();
    while topo
        .exec("cli", "curl -s -m 1 http://10.0.2.11/")
        .map(|b| b.trim() == "b1")
        .ok()
        != Some(true)
    {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("backends did not come up");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(topo)
}

fn wrk(topo: &Topology, host: &str, seconds: u64) -> Result<f64> {
    let out = topo.exec(
        "cli",
        &format!("wrk -t2 -c32 -d{seconds}s -H 'Connection: close' http://{host}/"),
    )?;
    let rate = out
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Requests/sec:")?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .with_context(|| format!("no Requests/sec in wrk's output:\n{out}"))?;
    if out.contains("Non-2xx") || out.contains("Socket errors") {
        // Errors mean the figure is not a clean rate.
        eprintln!("wrk to {host} reported errors:\n{out}");
    }
    if std::env::var_os("LB_BENCH_VERBOSE").is_some() {
        eprintln!("{out}");
    }
    Ok(rate)
}

fn iperf_json(topo: &Topology, args: &str) -> Result<serde_json::Value> {
    let out = topo.exec("cli", &format!("iperf3 -J {args}"))?;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 JSON")?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    Ok(v)
}

/// (conns/s, CPU µs per conn, TCP Gbit/s, UDP pps, CPU µs per UDP packet) to `host`.
fn measure(
    topo: &Topology,
    name: &'static str,
    host: &str,
    udp: bool,
    seconds: u64,
) -> Result<Row> {
    let (rate, cpu) = with_cpu(|| wrk(topo, host, seconds))?;
    let conns = rate * seconds as f64;
    let tcp = iperf_json(topo, &format!("-c {host} -P 4 -t {seconds}"))?;
    let bits = tcp["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 TCP result")?;
    let (udp_pps, cpu_per_packet) = if udp {
        let (v, cpu) =
            with_cpu(|| iperf_json(topo, &format!("-c {host} -u -l 64 -b 0 -t {seconds}")))?;
        let sum = &v["end"]["sum"];
        let packets =
            sum["packets"].as_f64().unwrap_or(0.0) - sum["lost_packets"].as_f64().unwrap_or(0.0);
        (
            Some(packets / seconds as f64),
            Some(cpu * 1e6 / packets.max(1.0)),
        )
    } else {
        (None, None)
    };
    Ok(Row {
        balancer: name,
        conns_per_s: rate,
        cpu_us_per_conn: cpu * 1e6 / conns.max(1.0),
        tcp_gbit_s: bits / 1e9,
        udp_pps,
        cpu_us_per_udp_packet: cpu_per_packet,
    })
}

/// All of them, one after another on one topology; `seconds` per measurement. Rows in the order
/// xdp native, xdp generic, nftables, haproxy, direct.
pub fn run(seconds: u64) -> Result<Vec<Row>> {
    // (a) this balancer, native XDP (the mode users run), then generic XDP for comparison.
    let mut topo = topology()?;
    let mut xdp_rows = Vec::new();
    for (name, mode) in [
        ("xdp (lb-agent)", "native"),
        ("xdp, generic mode", "generic"),
    ] {
        let config =
            agent_config().replace("[agent]\n", &format!("[agent]\nxdp_mode = \"{mode}\"\n"));
        let mut b = Balancer::start(topo, &config, &[])?;
        if let Err(e) = b.wait_healthy(4) {
            bail!("{e:#}\n--- agent log ---\n{}", b.agent_log());
        }
        b.log_on_drop = false;
        xdp_rows.push(measure(&b.topo, name, VIP, true, seconds)?);
        topo = b.into_topology();
    }

    // (b) nftables DNAT.
    let nft = topo.dir().join("lb.nft");
    std::fs::write(&nft, NFT)?;
    topo.exec("lb", &format!("nft -f {}", nft.display()))?;
    let nft_row = measure(&topo, "nftables DNAT", VIP, true, seconds)?;
    topo.exec("lb", "nft delete table ip lbbench")?;

    // (c) HAProxy, TCP mode: the VIP is a local address of the balancer.
    topo.exec("lb", &format!("ip addr add {VIP}/32 dev lo"))?;
    let cfg = topo.dir().join("proxy.cfg");
    std::fs::write(&cfg, PROXY)?;
    let cfg = cfg.to_string_lossy().into_owned();
    let proxy = topo.spawn(
        "lb",
        "haproxy-lb",
        std::path::Path::new("haproxy"),
        &["-db", "-f", &cfg],
    )?;
    let start = std::time::Instant::now();
    while topo
        .exec("cli", &format!("curl -s -m 1 http://{VIP}/"))
        .map(|b| b.starts_with('b'))
        .ok()
        != Some(true)
    {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("haproxy did not come up: {}", topo.log("haproxy-lb"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let proxy_row = measure(&topo, "haproxy (TCP mode)", VIP, false, seconds)?;
    topo.stop(proxy, libc::SIGTERM)?;
    topo.exec("lb", &format!("ip addr del {VIP}/32 dev lo"))?;

    // (d) no balancer: routed straight to backend 1, from the client's second address. The
    // runs above left backend 1 with TIME_WAIT sockets for (client address, port) tuples whose
    // TCP timestamps follow the (client, VIP) pair; a direct connection from the same address
    // reusing such a port carries timestamps of the (client, backend) pair, fails PAWS, and
    // waits for a SYN retransmission. The same happens the other way round.
    topo.exec(
        "cli",
        &format!(
            "ip route add {}/32 via 10.0.1.1 src {CLIENT_B}",
            backend_addr(1)
        ),
    )?;
    let direct_row = measure(
        &topo,
        "direct (no balancer)",
        &backend_addr(1),
        true,
        seconds,
    )?;
    xdp_rows.extend([nft_row, proxy_row, direct_row]);
    Ok(xdp_rows)
}
