//! Scale-out with real processes: three balancer nodes behind a router running BIRD (eBGP,
//! ECMP with an L4 hash, BFD), each node with its own BIRD and lb-agent (same config and
//! hash_seed), backends that learn their return route from the nodes (`tests/src/cluster.rs`).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    cluster::{nodes_in, return_nodes_in, Cluster},
    harness::poll,
    topology::{backend_addr, CLIENT, VIP},
};
use lb_userspace::api::{AnnounceStatus, RouteAnnouncement};

const URL: &str = "http://10.0.100.10/";
const CHECK: &str =
    "interval = \"1s\"\ntimeout = \"500ms\"\nhealthy_threshold = 2\nunhealthy_threshold = 2";
/// The group's id in every node's maps (the only group).
const GID: u32 = 0;

/// One cluster at a time: ten BIRDs and three agents each, and BFD at 100 ms on two cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Three nodes started in the order 3, 1, 2, each with the targets listed in another order;
/// all healthy, the VIP on three paths at the router, the return route on three at every
/// backend; with the lock of [`ONE_AT_A_TIME`], to be dropped after the cluster.
fn cluster() -> Result<(std::sync::MutexGuard<'static, ()>, Cluster)> {
    let serial = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut c = Cluster::new(3, 3)?;
    for (i, order) in [(3, [2, 3, 1]), (1, [1, 2, 3]), (2, [3, 1, 2])] {
        let config = c.config(i, &order, CHECK);
        c.start_node(i, &config)?;
    }
    c.wait_healthy(3)?;
    poll(Duration::from_secs(30), "the VIP routed to 3 nodes", || {
        Ok((c.vip_nodes()?.len() == 3).then_some(()))
    })?;
    for j in 1..=3 {
        poll(
            Duration::from_secs(30),
            "return routes over 3 nodes",
            || Ok((c.return_nodes(j)?.len() == 3).then_some(())),
        )?;
    }
    Ok((serial, c))
}

fn client(c: &Cluster, args: &str) -> Result<Vec<String>> {
    let script = c.topo.dir().join("client.py");
    if !script.exists() {
        std::fs::write(&script, include_str!("../src/client.py"))?;
    }
    let out = c
        .topo
        .exec("cli", &format!("python3 {} {args}", script.display()))?;
    Ok(out.lines().map(String::from).collect())
}

fn new_flows(c: &Cluster) -> Result<Vec<u64>> {
    (1..=c.nodes)
        .map(|i| c.new_flows(i).with_context(|| format!("n{i}'s counters")))
        .collect()
}

/// The VIP's line in a node's announce status.
fn vip_route(a: &AnnounceStatus) -> Result<&RouteAnnouncement> {
    a.routes.iter().find(|r| r.kind == "vip").context("the VIP")
}

fn tables(c: &Cluster) -> Result<Vec<Vec<String>>> {
    (1..=c.nodes).map(|i| c.table(i, GID)).collect()
}

#[test]
fn flows_spread_over_the_nodes_and_every_node_builds_the_same_table() -> Result<()> {
    let (_serial, mut c) = cluster()?; // the lock goes last
    let before = new_flows(&c)?;
    let answers = client(&c, &format!("count {URL} 600"))?;
    let after = new_flows(&c)?;
    let per_node: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for line in &answers {
        let mut w = line.split_whitespace();
        let name = w.next().unwrap_or("ERR").to_string();
        if name != "ERR" {
            seen.insert(w.next().unwrap_or_default().to_string());
        }
        *per_backend.entry(name).or_default() += 1;
    }
    println!("FIGURE scale-out spread: 600 connections over nodes {per_node:?}, backends {per_backend:?}");
    assert_eq!(answers.len(), 600);
    assert!(!per_backend.contains_key("ERR"), "{per_backend:?}");
    assert_eq!(
        seen,
        BTreeSet::from([CLIENT.to_string()]),
        "backends see the client"
    );
    assert_eq!(
        per_node.iter().sum::<u64>(),
        600,
        "each connection is one node's"
    );
    assert!(
        per_node.iter().all(|&n| n >= 120),
        "every node takes a share: {per_node:?}"
    );

    // What each node announces, and BIRD's sessions, as status shows them.
    for i in 1..=3 {
        let a = c.status(i)?.announce.context("announce status")?;
        assert_eq!(a.bird_error, None);
        let vip = vip_route(&a)?;
        assert_eq!(
            (
                vip.prefix.as_str(),
                vip.wanted,
                vip.reason.as_str(),
                vip.announced
            ),
            ("10.0.100.10/32", true, "serving", Some(true))
        );
        let uplink = a
            .sessions
            .iter()
            .find(|s| s.name == "uplink")
            .context("uplink")?;
        assert_eq!(
            (uplink.state.as_str(), uplink.info.as_str()),
            ("up", "Established")
        );
        assert_eq!(a.sessions.iter().filter(|s| s.protocol == "BGP").count(), 4);
    }

    // Identical tables, though the nodes started in another order with the targets listed in
    // another order each.
    let t = tables(&c)?;
    assert_eq!(t[0].len(), 4099);
    assert!(t.iter().all(|x| *x == t[0]), "the nodes' tables differ");

    // A backend dies: every node takes it out within its thresholds, and the tables stay alike.
    let dead = backend_addr(2);
    c.topo.exec("b2", "ip link set e0 down")?;
    let died = Instant::now();
    for i in 1..=3 {
        poll(Duration::from_secs(10), "b2 out of every table", || {
            Ok((!c.table(i, GID)?.iter().any(|e| e.starts_with(&dead))).then_some(()))
        })?;
    }
    println!(
        "FIGURE scale-out backend death: out of all 3 nodes' tables {:.1} s after its link went down (checks every 1 s, unhealthy after 2)",
        died.elapsed().as_secs_f64()
    );
    let t = tables(&c)?;
    assert!(
        t.iter().all(|x| *x == t[0]),
        "the nodes' tables differ after the removal"
    );
    let answers = client(&c, &format!("count {URL} 150"))?;
    assert!(
        answers
            .iter()
            .all(|l| l.starts_with("b1 ") || l.starts_with("b3 ")),
        "{answers:?}"
    );

    // A node that loses its own way to the targets (n2's target-side link down) fails open
    // alone; with `announce.fail_open = false`, applied by a reload, it withdraws the VIP.
    let config = c
        .config(2, &[3, 1, 2], CHECK)
        .replace("[announce]\n", "[announce]\nfail_open = false\n");
    std::fs::write(c.node_dir(2).join("lb.toml"), config)?;
    let (code, text) = c.cli(2, &["reload"])?;
    assert_eq!(code, 0, "{text}");
    c.topo.exec("n2", "ip link set l1 down")?;
    let cut = Instant::now();
    poll(
        Duration::from_secs(15),
        "the router's route without n2",
        || Ok((!c.vip_nodes()?.contains(&2)).then_some(())),
    )?;
    println!(
        "FIGURE scale-out node cut off from its targets: withdrawn {:.1} s after its target-side link went down (fail_open = false)",
        cut.elapsed().as_secs_f64()
    );
    let a = c.status(2)?.announce.context("announce status")?;
    let vip = vip_route(&a)?;
    assert_eq!(
        (vip.reason.as_str(), vip.wanted),
        ("fail_open_withdrawn", false)
    );
    let n2 = c.new_flows(2);
    let answers = client(&c, &format!("count {URL} 150"))?;
    assert!(answers.iter().all(|l| !l.starts_with("ERR")), "{answers:?}");
    assert_eq!(
        c.new_flows(2),
        n2,
        "a new flow reached the node that withdrew"
    );
    // Its link back: its checks pass again and it announces again.
    c.topo.exec("n2", "ip link set l1 up")?;
    poll(
        Duration::from_secs(15),
        "the router's route with n2 again",
        || Ok(c.vip_nodes()?.contains(&2).then_some(())),
    )?;

    // A stop withdraws before XDP detaches: when the agent has exited, the router's route
    // has already left n2.
    assert!(c.stop_agent(2)?.success());
    assert!(!c.vip_nodes()?.contains(&2), "n2 stopped and still routed");
    // A restart with --keep-datapath withdraws nothing: the pinned data plane goes on
    // serving, and the next run takes the announcements over without a flap.
    c.run_agent(2, &["--keep-datapath"])?;
    poll(Duration::from_secs(15), "n2 announced again", || {
        Ok(c.vip_nodes()?.contains(&2).then_some(()))
    })?;
    c.monitor_routes("rt")?;
    std::thread::sleep(Duration::from_millis(200)); // `ip monitor` subscribed
    let restart = SystemTime::now();
    assert!(c.stop_agent(2)?.success());
    assert!(
        c.vip_nodes()?.contains(&2),
        "a --keep-datapath stop withdrew"
    );
    c.run_agent(2, &["--keep-datapath"])?;
    poll(Duration::from_secs(15), "the new agent serving", || {
        let Ok(s) = c.status(2) else { return Ok(None) };
        Ok(s.announce
            .is_some_and(|a| {
                a.routes
                    .iter()
                    .all(|r| r.announced == Some(true) && r.wanted)
            })
            .then_some(()))
    })?;
    let flaps = vip_route_without(&c, 2, restart);
    assert_eq!(flaps, None, "the restart took n2 out of the router's route");
    Ok(())
}

/// `N` downloads of `SECONDS` at `RATE` bytes/s started together on the client, in the
/// background: log `downloads`, a line "HTTP_CODE BYTES CURL_EXIT" each as it ends.
fn start_downloads(c: &mut Cluster, n: usize, seconds: u32, rate: u32) -> Result<usize> {
    let script = format!(
        "for k in $(seq {n}); do (r=$(curl -s -o /dev/null --max-time {} -w '%{{http_code}} %{{size_download}}' '{URL}stream?seconds={seconds}&rate={rate}'); echo \"$r $?\") & done; wait",
        seconds * 4
    );
    c.topo.spawn(
        "cli",
        "downloads",
        std::path::Path::new("sh"),
        &["-c", &script],
    )
}

/// The downloads' results once they all ended: (complete, of), and the lines.
fn downloads_done(
    c: &mut Cluster,
    handle: usize,
    expect_bytes: u64,
    limit: Duration,
) -> Result<(usize, usize, String)> {
    c.topo.stop_wait(handle, limit)?;
    let log = c.topo.log("downloads");
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    let complete = lines
        .iter()
        .filter(|l| *l.trim() == *format!("200 {expect_bytes} 0"))
        .count();
    Ok((complete, lines.len(), log))
}

/// When (after `from`) the router's route to the VIP first left out node `i`.
fn vip_route_without(c: &Cluster, i: usize, from: SystemTime) -> Option<SystemTime> {
    c.route_events("rt")
        .into_iter()
        .filter(|(t, m)| *t >= from && m.contains(VIP))
        .find(|(_, m)| m.starts_with("Deleted") || !nodes_in(m).contains(&i))
        .map(|(t, _)| t)
}

fn ms_after(t: SystemTime, from: SystemTime) -> f64 {
    t.duration_since(from).unwrap_or_default().as_secs_f64() * 1e3
}

#[test]
fn a_drained_node_is_withdrawn_at_once_its_flows_carry_on_and_it_stops_with_nothing_reset(
) -> Result<()> {
    let (_serial, mut c) = cluster()?; // the lock goes last
    c.monitor_routes("rt")?;
    // Long downloads; the node that carries the most of them is drained (`d`).
    let before = new_flows(&c)?;
    let downloads = start_downloads(&mut c, 15, 8, 100_000)?;
    let per_node = poll(Duration::from_secs(5), "15 downloads under way", || {
        let now = new_flows(&c)?;
        let started: u64 = now.iter().zip(&before).map(|(a, b)| a - b).sum();
        Ok((started >= 15)
            .then(|| -> Vec<u64> { now.iter().zip(&before).map(|(a, b)| a - b).collect() }))
    })?;
    let (d, through) = per_node
        .iter()
        .enumerate()
        .max_by_key(|(_, n)| **n)
        .map(|(i, n)| (i + 1, *n))
        .context("nodes")?;
    ensure!(through > 0, "no download under way");

    // The drain, as an operator runs it: the command waits until the router sends nothing here.
    let asked = SystemTime::now();
    let drain = std::process::Command::new(lb_tests::harness::agent_bin())
        .args(["--api", &c.api(d), "drain", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let withdrawn = poll(
        Duration::from_secs(5),
        "the router's VIP route without the drained node",
        || Ok(vip_route_without(&c, d, asked)),
    )?;
    let flows_d = c.new_flows(d).context("the drained node")?;
    // New flows meanwhile: none reaches the drained node.
    let answers = client(&c, &format!("count {URL} 200"))?;
    assert!(answers.iter().all(|l| !l.starts_with("ERR")), "{answers:?}");
    assert_eq!(
        c.new_flows(d),
        Some(flows_d),
        "a new flow reached the drained node"
    );
    let out = drain.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "drain: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let drained: lb_userspace::api::DrainStatus = serde_json::from_str(&text)?;
    assert!(drained.done && drained.withdrawn, "{drained:?}");
    // The targets' return routes left it too (replies go through the other two).
    for j in 1..=3 {
        poll(
            Duration::from_secs(5),
            "return routes without the drained node",
            || Ok((!c.return_nodes(j)?.contains(&d)).then_some(())),
        )?;
    }
    let status = c.status(d)?;
    let a = status.announce.context("announce status")?;
    assert!(
        a.draining
            && a.routes
                .iter()
                .all(|r| r.announced == Some(false) && !r.wanted),
        "{a:?}"
    );
    let (_, text) = c.cli(d, &["status"])?;
    assert!(
        text.contains("; DRAINING") && text.contains("10.0.100.10/32"),
        "{text}"
    );
    println!(
        "FIGURE scale-out drain: the router's route left n{d} {:.1} ms after `lb-agent drain` was started (the agent had BIRD's confirmation {:.1} ms after the command reached it); drained (no client packet for 1 s) after {:.1} s; {} of 15 downloads went through n{d}; 200 new connections meanwhile, none to it",
        ms_after(withdrawn, asked),
        drained.withdrawn_after_ms.unwrap_or(f64::NAN),
        drained.elapsed_s,
        through,
    );
    assert!(
        ms_after(withdrawn, asked) < 1000.0,
        "withdrawn by BGP, not by a timer"
    );

    // Then it stops (SIGTERM: nothing left to withdraw, XDP detached) while the downloads run.
    let exit = c.stop_agent(d)?;
    assert!(exit.success(), "{exit:?}");
    let (complete, of, log) = downloads_done(&mut c, downloads, 800_000, Duration::from_secs(40))?;
    println!("FIGURE scale-out drain: {complete} of {of} downloads (8 s each) complete across the drain and n{d}'s stop");
    assert_eq!((complete, of), (15, 15), "downloads:\n{log}");
    Ok(())
}

/// When (after `from`) host `b`'s return route first left out node `i`.
fn return_route_without(c: &Cluster, host: &str, i: usize, from: SystemTime) -> Option<SystemTime> {
    c.route_events(host)
        .into_iter()
        .filter(|(t, m)| *t >= from && m.contains(lb_tests::cluster::CLIENT_NET))
        .find(|(_, m)| m.starts_with("Deleted") || !return_nodes_in(m).contains(&i))
        .map(|(t, _)| t)
}

#[test]
fn a_node_that_dies_leaves_ecmp_within_half_a_second_and_every_download_completes() -> Result<()> {
    use lb_tests::bench::plot;
    use lb_userspace::maps::KernelMaps;

    let (_serial, mut c) = cluster()?; // the lock goes last
    for h in ["rt", "b1", "b2", "b3"] {
        c.monitor_routes(h)?;
    }
    let maps: Vec<KernelMaps> = (1..=3)
        .map(|i| KernelMaps::from_pins(&c.topo.bpffs().join(format!("n{i}/maps"))))
        .collect::<Result<_>>()?;
    let flows = |m: &KernelMaps| m.listener_stats(0).map(|s| s.new_flows).unwrap_or(0);

    // Short requests from six clients for the picture, and long downloads.
    const SECONDS: f64 = 8.0;
    let script = c.topo.dir().join("client.py");
    std::fs::write(&script, include_str!("../src/client.py"))?;
    let start = Instant::now();
    let origin = plot::monotonic_seconds();
    let clients = std::process::Command::new("ip")
        .args(["netns", "exec", &c.topo.ns("cli"), "python3"])
        .arg(&script)
        .args([
            "loop",
            URL,
            &SECONDS.to_string(),
            "0.02",
            "6",
            &format!("{origin:.6}"),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let downloads = start_downloads(&mut c, 15, 7, 100_000)?;

    // New flows per node per 100 ms; node 3 dies at 3 s (links down, agent and BIRD kill -9).
    let mut buckets: Vec<BTreeMap<String, u32>> = vec![BTreeMap::new(); (SECONDS * 10.0) as usize];
    let mut last: Vec<u64> = maps.iter().map(flows).collect();
    let mut killed: Option<(f64, SystemTime)> = None;
    for (k, bucket) in buckets.iter_mut().enumerate() {
        std::thread::sleep(
            (start + Duration::from_millis(100 * (k as u64 + 1)))
                .saturating_duration_since(Instant::now()),
        );
        for (i, m) in maps.iter().enumerate() {
            let now = flows(m);
            bucket.insert(format!("n{}", i + 1), (now - last[i]) as u32);
            last[i] = now;
        }
        if killed.is_none() && start.elapsed().as_secs_f64() >= 3.0 {
            killed = Some((start.elapsed().as_secs_f64(), c.kill_node(3)?));
        }
    }
    let (killed_s, killed_at) = killed.context("n3 killed")?;
    let out = clients.wait_with_output()?;
    let mut requests = 0;
    let mut errors = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((t, who)) = line.split_once(' ') else {
            continue;
        };
        let Ok(t) = t.parse::<f64>() else { continue };
        requests += 1;
        if who == "ERR" {
            errors.push(t);
            if let Some(b) = buckets.get_mut((t * 10.0) as usize) {
                *b.entry("ERR".into()).or_default() += 1;
            }
        }
    }
    let router_out = vip_route_without(&c, 3, killed_at).context("the router kept n3")?;
    let backends_out: Vec<f64> = ["b1", "b2", "b3"]
        .iter()
        .map(|h| {
            return_route_without(&c, h, 3, killed_at)
                .map(|t| ms_after(t, killed_at))
                .with_context(|| format!("{h} kept n3 in its return route"))
        })
        .collect::<Result<_>>()?;
    let (complete, of, log) = downloads_done(&mut c, downloads, 700_000, Duration::from_secs(40))?;
    let router_ms = ms_after(router_out, killed_at);
    println!(
        "FIGURE scale-out node death: n3 died (links down, then agent and BIRD kill -9); the router's VIP route left it after {router_ms:.0} ms, the backends' return routes after {:.0}/{:.0}/{:.0} ms (BFD 100 ms x 3); {complete} of {of} downloads (7 s each) complete; {} of {requests} short requests failed ({:?} s after the start; n3 killed at {killed_s:.1} s)",
        backends_out[0], backends_out[1], backends_out[2],
        errors.len(),
        errors,
    );
    if let Some(path) = std::env::var_os("LB_SCALE_OUT_PNG") {
        let series = vec![
            ("n1", "node 1".to_string(), plotters::style::BLUE),
            ("n2", "node 2".to_string(), plotters::style::GREEN),
            ("n3", "node 3".to_string(), plotters::style::RED),
            ("ERR", "client errors".to_string(), plotters::style::BLACK),
        ];
        let out_s = killed_s + router_ms / 1e3;
        plot::draw_picture(
            &plot::Picture {
                caption: "Flows taken on per node per 100 ms (6 clients, 15 downloads): node 3 dies at 3 s",
                y_desc: "new flow entries / 100 ms",
                buckets: &buckets,
                series,
                markers: vec![(killed_s, "n3 dies"), (out_s, "router: n3 out (BFD)")],
            },
            std::path::Path::new(&path),
        )?;
    }
    // Every node served before; after the death (and the route's update) n1 and n2 alone.
    let before: u32 = buckets[..25].iter().map(|b| b["n3"]).sum();
    let after: u32 = buckets[((killed_s * 10.0) as usize + 10)..]
        .iter()
        .map(|b| b["n3"])
        .sum();
    assert!(
        before > 0 && after == 0,
        "n3: {before} new flows before, {after} after"
    );
    assert!(
        router_ms < 1000.0,
        "BFD, not the hold timer: {router_ms} ms"
    );
    assert!(
        backends_out.iter().all(|&ms| ms < 1000.0),
        "{backends_out:?}"
    );
    assert_eq!((complete, of), (15, 15), "downloads:\n{log}");
    Ok(())
}
