//! Scale-out with real processes: three balancer nodes behind a router running BIRD (eBGP,
//! ECMP with an L4 hash, BFD), each node with its own BIRD and lb-agent (same config and
//! hash_seed), backends that learn their return route from the nodes (`tests/src/cluster.rs`).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    cluster::{nodes_in, Cluster},
    harness::poll,
    topology::{backend_addr, CLIENT, VIP},
};

const URL: &str = "http://10.0.100.10/";
const CHECK: &str = "interval = \"1s\"\ntimeout = \"500ms\"\nhealthy_threshold = 2\nunhealthy_threshold = 2";
/// The group's id in every node's maps (the only group).
const GID: u32 = 0;

/// Three nodes started in the order 3, 1, 2, each with the targets listed in another order;
/// all healthy, the VIP on three paths at the router, the return route on three at every
/// backend.
fn cluster() -> Result<Cluster> {
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
        poll(Duration::from_secs(30), "return routes over 3 nodes", || {
            Ok((c.return_nodes(j)?.len() == 3).then_some(()))
        })?;
    }
    Ok(c)
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

fn tables(c: &Cluster) -> Result<Vec<Vec<String>>> {
    (1..=c.nodes).map(|i| c.table(i, GID)).collect()
}

#[test]
fn flows_spread_over_the_nodes_and_every_node_builds_the_same_table() -> Result<()> {
    let c = cluster()?;
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
    assert_eq!(seen, BTreeSet::from([CLIENT.to_string()]), "backends see the client");
    assert_eq!(per_node.iter().sum::<u64>(), 600, "each connection is one node's");
    assert!(
        per_node.iter().all(|&n| n >= 120),
        "every node takes a share: {per_node:?}"
    );

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
    assert!(t.iter().all(|x| *x == t[0]), "the nodes' tables differ after the removal");
    let answers = client(&c, &format!("count {URL} 150"))?;
    assert!(
        answers.iter().all(|l| l.starts_with("b1 ") || l.starts_with("b3 ")),
        "{answers:?}"
    );
    Ok(())
}
