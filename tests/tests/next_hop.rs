//! The next-hop cache against real changes of the routing state, with the real agent: the data
//! path reuses FIB answers (`LB_NEXT_HOPS`) while `LB_ROUTE_EPOCH` holds, and the agent's route
//! watcher moves the epoch on every change the kernel announces, so that a change of the target's
//! neighbour, of its route, or of the egress interface is followed within a second. A policy
//! rule turns the cache off (answers could depend on the source) and its removal back on; an
//! agent that exits leaves it off.
//!
//! ```text
//!  client ── l0  balancer  l1 ── switch ─┬─ b1 (10.0.2.11)  ┐ each holds 10.0.9.1 (the
//!                          │             └─ b2 (10.0.2.12)  │ target) on lo, and answers
//!                          l2 ════ a0 alt (10.0.4.2)         ┘ UDP 5399 and TCP 8081 on it
//! ```
//!
//! The balancer routes 10.0.9.1 via b1 (metric 10) with a fallback via alt (metric 20). The
//! client sends a datagram every 2 ms to VIP:5399 from one socket (one flow), each carrying its
//! sequence number and its send time (CLOCK_MONOTONIC, shared by every namespace); each sink logs
//! what reaches it. "Followed within 1 s" means: after the change returned at T, no datagram sent
//! after T + 1 s reaches the old place, and one sent before T + 1 s reaches the new one.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{bail, ensure, Context, Result};
use lb_tests::{
    harness::{poll, Balancer},
    topology::{Options, Topology, CLIENT, VIP},
};
use lb_userspace::route_epoch::RouteCacheStatus;

const TARGET: &str = "10.0.9.1";
const PORT: u16 = 5399;
const CHECK_PORT: u16 = 8081;
/// A MAC no host has.
const WRONG_MAC: &str = "02:00:00:00:be:ef";
/// How soon a change must be followed (seconds).
const FOLLOW: f64 = 1.0;

/// A sink: logs "HOST SEQ SENT" per datagram on UDP PORT, accepts (and closes) TCP CHECK_PORT.
const SINK: &str = r#"import socket, sys, threading
name, port, check = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", port))
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", check))
t.listen(64)
def accept():
    while True:
        c, _ = t.accept()
        c.close()
threading.Thread(target=accept, daemon=True).start()
print("listening", flush=True)
while True:
    data, _ = u.recvfrom(2048)
    print(name, data.decode(errors="replace"), flush=True)
"#;

/// The client's traffic: a datagram every 2 ms, "SEQ SENT", each also logged. Pinned to one
/// CPU: XDP on the balancer's veth runs on the sender's CPU, so every datagram meets the same
/// per-CPU cache entry (one that moves between CPUs would look up afresh on the other one and
/// hide a stale entry).
const SENDER: &str = r#"import os, socket, sys, time
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
addr, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
seq = 0
while True:
    t = time.monotonic()
    s.sendto(f"{seq} {t:.6f}".encode(), (addr, port))
    print(seq, f"{t:.6f}", flush=True)
    seq += 1
    time.sleep(0.002)
"#;

fn config() -> String {
    format!(
        r#"[agent]
interfaces = ["l0", "l1", "l2"]
api = "unix:DIR/api.sock"
metrics = "127.0.0.1:9900"
pin_path = "DIR/bpf/lb"
flow_table_size = 65536

[[listener]]
name = "sink"
address = "{VIP}"
port = {PORT}
protocol = "udp"
target_group = "sink"

[[target_group]]
name = "sink"
hash_table_size = 251
# A check that fails while the neighbour is wrong must not end the flow.
connection_termination_on_unhealthy = false

[target_group.health_check]
protocol = "tcp"
port = {CHECK_PORT}
interval = "1s"
timeout = "500ms"
healthy_threshold = 2
unhealthy_threshold = 5

[[target_group.target]]
address = "{TARGET}"
port = {PORT}
"#
    )
}

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("spawning ip")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A namespace this test adds beside the topology's; killed and deleted on drop (also on
/// failure). Declared before the balancer, so that it goes after it.
struct ExtraHost(String);

impl Drop for ExtraHost {
    fn drop(&mut self) {
        if let Ok(pids) = ip(&["netns", "pids", &self.0]) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: killing processes of a namespace this test made.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = ip(&["netns", "del", &self.0]);
    }
}

/// CLOCK_MONOTONIC in seconds, as Python's `time.monotonic()`.
fn now() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Send times of the datagrams that reached `host`.
fn arrivals(topo: &Topology, host: &str) -> Vec<f64> {
    topo.log(&format!("sink-{host}"))
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == host).then_some(())?;
            w.nth(1)?.parse().ok()
        })
        .collect()
}

/// The send time of the client's last datagram.
fn last_sent(topo: &Topology) -> f64 {
    topo.log("sender")
        .lines()
        .rev()
        .find_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0)
}

/// Waits until the client has sent a datagram at `t` or later.
fn sent_past(topo: &Topology, t: f64) -> Result<()> {
    let limit = Duration::from_secs_f64((t - now()).max(0.0) + 3.0);
    poll(limit, "the client sending", || {
        Ok((last_sent(topo) >= t).then_some(()))
    })
}

/// How long after `t` the first datagram sent at `t` or later reached `host` (polled for up
/// to 3 s), as send time − `t`: the change made at `t` was followed by then.
fn reaches(topo: &Topology, host: &str, t: f64) -> Result<f64> {
    poll(
        Duration::from_secs(3),
        &format!("a datagram sent after the change reaching {host}"),
        || {
            Ok(arrivals(topo, host)
                .into_iter()
                .filter(|&s| s >= t)
                .reduce(f64::min)
                .map(|s| s - t))
        },
    )
}

/// Checks that no datagram sent more than `FOLLOW` after `t` reached `host` (waiting until
/// the client has sent for `FOLLOW` + 0.5 s after `t`); the last one that did, as send time − `t`
/// (negative: sent before the change).
fn stops_reaching(topo: &Topology, host: &str, t: f64) -> Result<f64> {
    sent_past(topo, t + FOLLOW + 0.5)?;
    let after: Vec<f64> = arrivals(topo, host)
        .into_iter()
        .filter(|&s| s >= t - 0.5)
        .collect();
    let late = after.iter().filter(|&&s| s >= t + FOLLOW).count();
    let last = after.iter().copied().fold(f64::MIN, f64::max) - t;
    ensure!(
        late == 0,
        "{late} datagrams sent more than {FOLLOW} s after the change still reached {host} (the last sent {last:.3} s after it): the data path kept a stale next hop"
    );
    Ok(last)
}

/// `datapath.route_cache` of the agent's status.
fn route_cache(b: &Balancer) -> Result<RouteCacheStatus> {
    Ok(b.status()?.datapath.route_cache)
}

/// The epoch of a cached next hop to the target, if the data path stored one under the
/// current epoch (on any CPU).
fn cached_under(b: &Balancer, epoch: u64) -> Result<bool> {
    let maps = b.maps()?.route_epoch()?;
    let dst = lb_common::addr::to_words(TARGET.parse()?).0;
    for slot in 0..lb_common::maps::NEXT_HOP_SLOTS / 2 {
        if maps
            .next_hop(slot)?
            .iter()
            .any(|h| h.dst == dst && u64::from(h.epoch) == epoch)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Builds the topology of the module doc, starts the sinks and the agent (`--keep-datapath`).
fn start() -> Result<(ExtraHost, Balancer)> {
    let mut topo = Topology::new(Options {
        backends: 2,
        ..Options::default()
    })?;
    let alt = ExtraHost(topo.ns("alt"));
    ip(&["netns", "add", &alt.0])?;
    let lb = topo.ns("lb");
    let n = |host: &str, cmd: &str| topo.exec(host, cmd);
    n("alt", "ip link set lo up")?;
    ip(&[
        "link", "add", "l2", "netns", &lb, "type", "veth", "peer", "name", "a0", "netns", &alt.0,
    ])?;
    n("lb", "ip addr add 10.0.4.1/24 dev l2 && ip link set l2 up")?;
    // gro on: a0 receives frames XDP redirects out of l2.
    n(
        "alt",
        "ip addr add 10.0.4.2/24 dev a0 && ip link set a0 up && ethtool -K a0 gro on >/dev/null && ip route add default via 10.0.4.1",
    )?;
    for host in ["b1", "b2", "alt"] {
        n(host, &format!("ip addr add {TARGET}/32 dev lo"))?;
    }
    n(
        "lb",
        &format!("ip route add {TARGET}/32 via 10.0.2.11 dev l1 metric 10 && ip route add {TARGET}/32 via 10.0.4.2 dev l2 metric 20"),
    )?;
    // No neighbour is resolved while the test runs (IPv6 off on the balancer, every neighbour
    // on both sides of each link permanent): a change of route is then announced by the route
    // notification alone, and a watcher that missed it would not be saved by some neighbour
    // notification that happened to come along.
    n(
        "lb",
        "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1",
    )?;
    let mac = |host: &str, dev: &str| -> Result<String> {
        Ok(n(host, &format!("cat /sys/class/net/{dev}/address"))?
            .trim()
            .to_string())
    };
    let permanent = |host: &str, addr: &str, mac: &str, dev: &str| {
        n(
            host,
            &format!("ip neigh replace {addr} lladdr {mac} dev {dev} nud permanent"),
        )
    };
    for (host, dev, addr, lb_dev, gateway) in [
        ("b1", "e0", "10.0.2.11", "l1", "10.0.2.1"),
        ("b2", "e0", "10.0.2.12", "l1", "10.0.2.1"),
        ("alt", "a0", "10.0.4.2", "l2", "10.0.4.1"),
        ("cli", "c0", CLIENT, "l0", "10.0.1.1"),
    ] {
        permanent("lb", addr, &mac(host, dev)?, lb_dev)?;
        permanent(host, gateway, &mac("lb", lb_dev)?, dev)?;
    }
    let dir = topo.dir().to_path_buf();
    std::fs::write(dir.join("sink.py"), SINK)?;
    std::fs::write(dir.join("sender.py"), SENDER)?;
    let sink = dir.join("sink.py").to_string_lossy().into_owned();
    for host in ["b1", "b2", "alt"] {
        let log = format!("sink-{host}");
        topo.spawn(
            host,
            &log,
            Path::new("python3"),
            &[
                "-u",
                &sink,
                host,
                &PORT.to_string(),
                &CHECK_PORT.to_string(),
            ],
        )?;
        poll(Duration::from_secs(10), &format!("sink on {host}"), || {
            Ok(topo.log(&log).contains("listening").then_some(()))
        })?;
    }
    let b = Balancer::start(topo, &config(), &["--keep-datapath"])?;
    b.wait_healthy(1)?;
    Ok((alt, b))
}

#[test]
fn next_hop_changes_are_followed_within_a_second_while_the_data_path_caches() -> Result<()> {
    let (_alt, mut b) = start()?;
    let sender = b
        .topo
        .dir()
        .join("sender.py")
        .to_string_lossy()
        .into_owned();
    b.topo.spawn(
        "cli",
        "sender",
        Path::new("python3"),
        &["-u", &sender, VIP, &PORT.to_string()],
    )?;
    let t = now();
    let first = reaches(&b.topo, "b1", t)?;
    println!("traffic reaches b1 ({first:.3} s after the sender started)");

    // The cache is on, and the data path really answers from it.
    let rc = route_cache(&b)?;
    ensure!(
        rc.enabled && rc.epoch != 0,
        "the next-hop cache is not on: {rc:?}"
    );
    poll(
        Duration::from_secs(3),
        "a next hop to the target cached under the current epoch",
        || {
            let epoch = u64::from(route_cache(&b)?.epoch);
            cached_under(&b, epoch).map(|c| c.then_some(()))
        },
    )?;
    ensure!(b.metric("lb_route_cache_enabled")? == 1.0);

    // (i) The target's neighbour gets a wrong MAC: traffic stops; the right one back: resumes.
    let real_mac = b.topo.exec("b1", "cat /sys/class/net/e0/address")?;
    let real_mac = real_mac.trim();
    let changes = b.metric("lb_route_epoch_changes_total")?;
    b.topo.exec(
        "lb",
        &format!("ip neigh replace 10.0.2.11 lladdr {WRONG_MAC} dev l1 nud permanent"),
    )?;
    let t = now();
    let stop = stops_reaching(&b.topo, "b1", t)?;
    ensure!(
        b.metric("lb_route_epoch_changes_total")? > changes,
        "the epoch did not move"
    );
    b.topo.exec(
        "lb",
        &format!("ip neigh replace 10.0.2.11 lladdr {real_mac} dev l1 nud permanent"),
    )?;
    let t = now();
    let resume = reaches(&b.topo, "b1", t)?;
    println!(
        "FIGURE neighbour MAC changed: the last datagram to reach b1 was sent {:.0} ms after the change; changed back: resumed with one sent {:.0} ms after",
        stop * 1000.0,
        resume * 1000.0
    );
    ensure!(
        resume < FOLLOW,
        "resumed {resume:.3} s after the MAC came back"
    );

    // (ii) The route moves to b2 (same address, another next hop on the same link).
    b.topo.exec(
        "lb",
        &format!("ip route replace {TARGET}/32 via 10.0.2.12 dev l1 metric 10"),
    )?;
    let t = now();
    let moved = reaches(&b.topo, "b2", t)?;
    ensure!(
        moved < FOLLOW,
        "reached b2 {moved:.3} s after the route moved"
    );
    let stop = stops_reaching(&b.topo, "b1", t)?;
    println!(
        "FIGURE route moved to another next hop: b2 reached by a datagram sent {:.0} ms after; the last to reach b1 was sent {:.0} ms after",
        moved * 1000.0,
        stop * 1000.0
    );

    // (iii) The egress interface goes down: the fallback route through alt takes over.
    b.topo.exec("lb", "ip link set l1 down")?;
    let t = now();
    let fallback = reaches(&b.topo, "alt", t)?;
    ensure!(
        fallback < FOLLOW,
        "reached alt {fallback:.3} s after l1 went down"
    );
    println!(
        "FIGURE egress interface down: the fallback route's host reached by a datagram sent {:.0} ms after",
        fallback * 1000.0
    );
    let rc = route_cache(&b)?;
    ensure!(rc.enabled, "the cache went off: {rc:?}");

    // A policy rule makes answers depend on the source: off at once; removed: back on.
    b.topo
        .exec("lb", "ip rule add from 10.0.1.3 table 100 pref 100")?;
    let off = poll(
        Duration::from_secs(1),
        "the cache off after ip rule add",
        || {
            let rc = route_cache(&b)?;
            Ok((!rc.enabled).then_some(rc))
        },
    )?;
    ensure!(off.epoch == 0, "{off:?}");
    let reason = off.reason.as_deref().unwrap_or_default();
    ensure!(
        reason.contains("policy routing") && reason.contains("from 10.0.1.3/32 lookup 100"),
        "{off:?}"
    );
    ensure!(b.metric("lb_route_cache_enabled")? == 0.0);
    b.topo
        .exec("lb", "ip rule del from 10.0.1.3 table 100 pref 100")?;
    let on = poll(
        Duration::from_secs(3),
        "the cache on after ip rule del",
        || {
            let rc = route_cache(&b)?;
            Ok(rc.enabled.then_some(rc))
        },
    )?;
    ensure!(on.epoch != 0, "{on:?}");
    // Traffic still flows (through alt).
    reaches(&b.topo, "alt", now())?;

    // The agent exits and leaves the data plane (--keep-datapath): nobody watches the routes,
    // so the cache is off.
    let status = b.stop_agent(libc::SIGTERM)?;
    ensure!(status.success(), "the agent exited with {status}");
    let epoch = b.maps()?.route_epoch()?.get()?;
    if epoch != 0 {
        bail!("LB_ROUTE_EPOCH is {epoch} after the agent exited (--keep-datapath): cached next hops outlive the agent");
    }
    Ok(())
}
