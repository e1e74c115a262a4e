//! The disruption preview against a running agent: `plan` changes nothing, its predicted
//! shares of new flows are what real clients then see after the reload, and it counts the
//! live flows a change would drain.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result};
use lb_tests::{
    harness::{config, poll, Balancer, URL},
    topology::{backend_addr, Options},
};
use lb_userspace::api::Plan;

fn plan(b: &Balancer, args: &[&str]) -> Result<Plan> {
    let (code, out) = b.cli(args)?;
    anyhow::ensure!(code == 0, "{args:?}: {out}");
    serde_json::from_str(&out).with_context(|| format!("plan JSON: {out}"))
}

fn write(b: &Balancer, name: &str, text: &str) -> Result<String> {
    let dir = b.topo.dir().to_string_lossy().into_owned();
    let path = b.topo.dir().join(name);
    std::fs::write(&path, text.replace("DIR", &dir))?;
    Ok(path.to_string_lossy().into_owned())
}

/// Holds `n` connections to the VIP open (until the test ends).
const HOLD: &str = r#"
import socket, sys, time
socks = [socket.create_connection(("10.0.100.10", 80), timeout=10) for _ in range(int(sys.argv[1]))]
print("open", flush=True)
time.sleep(60)
"#;

#[test]
fn plan_predicts_the_new_flows_a_weight_change_moves_and_changes_nothing() -> Result<()> {
    let base = config(3, "", "", "", "");
    let mut b = Balancer::with_backends(Options::default(), &base)?;
    b.wait_healthy(3)?;
    let table_before = b.table_targets(0)?;

    // b1's weight 100 → 300.
    let b1 = format!("address = \"{}\"\nport = 8080\n", backend_addr(1));
    let heavier = base.replace(&b1, &format!("{b1}weight = 300\n"));
    let new = write(&b, "heavier.toml", &heavier)?;
    let p = plan(&b, &["plan", "--config", &new, "--json"])?;
    let web = &p.groups[0];
    assert_eq!((web.name.as_str(), web.change.as_str()), ("web", "changed"));
    let predicted: Vec<(String, f64)> = web
        .targets
        .iter()
        .map(|t| (t.target.to_string(), t.share_after))
        .collect();
    println!(
        "predicted after: {predicted:?}; {:.1}% of slots move",
        web.share_moved * 100.0
    );
    // It changed nothing: the same table, b1 still at weight 100.
    assert_eq!(b.table_targets(0)?, table_before);
    let status = b.status()?;
    assert!(status.target_groups[0]
        .targets
        .iter()
        .all(|t| t.weight == 100));
    // The table form says the same.
    let (code, text) = b.cli(&["plan", "--config", &new])?;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("web") && text.contains("changed"), "{text}");
    // reload --dry-run previews the agent's own (unchanged) file.
    let same = plan(&b, &["reload", "--dry-run", "--json"])?;
    assert_eq!(same.groups[0].change, "unchanged", "{same:?}");

    // Now the reload, and real clients: each target's share within 5 points of the plan.
    std::fs::copy(&new, &b.config_path)?;
    let (code, out) = b.cli(&["reload"])?;
    assert_eq!(code, 0, "{out}");
    let n = 1500;
    let (counts, _) = b.spread(URL, n)?;
    assert_eq!(counts.get("ERR"), None, "{counts:?}");
    for (i, (target, share)) in predicted.iter().enumerate() {
        let name = format!("b{}", i + 1);
        assert_eq!(target, &format!("{}:8080", backend_addr(i + 1)));
        let measured = counts.get(&name).copied().unwrap_or(0) as f64 / n as f64;
        println!("FIGURE plan accuracy: {name} predicted {share:.3}, measured {measured:.3} of {n} new connections");
        assert!(
            (measured - share).abs() < 0.05,
            "{name}: predicted {share:.3}, measured {measured:.3}: {counts:?}"
        );
    }

    // Live flows: six held connections; a config without b3 would drain b3's.
    let script = b.topo.dir().join("hold.py");
    std::fs::write(&script, HOLD)?;
    let log = "hold";
    b.topo.spawn(
        "cli",
        log,
        Path::new("python3"),
        &["-u", &script.to_string_lossy(), "6"],
    )?;
    poll(Duration::from_secs(10), "connections open", || {
        Ok(b.topo.log(log).contains("open").then_some(()))
    })?;
    let b3 = format!(
        "\n[[target_group.target]]\naddress = \"{}\"\nport = 8080\n",
        backend_addr(3)
    );
    let without_b3 = write(&b, "without-b3.toml", &heavier.replace(&b3, ""))?;
    let p = plan(&b, &["plan", "--config", &without_b3, "--json"])?;
    let web = &p.groups[0];
    let on_b3 = web
        .targets
        .iter()
        .find(|t| t.target.to_string() == format!("{}:8080", backend_addr(3)))
        .context("b3 in the plan")?;
    assert_eq!(on_b3.fate, "draining");
    assert!(on_b3.stops_new_flows);
    assert_eq!(p.live_flows, 6, "{p:?}");
    assert_eq!(web.flows_draining, on_b3.live_flows, "{p:?}");

    // A config that does not validate: exit 2, its problems named.
    let bad = write(
        &b,
        "bad.toml",
        "[agent]\ninterfaces = [\"l0\"]\nflow_table_size = 1\n",
    )?;
    let (code, out) = b.cli(&["plan", "--config", &bad])?;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("bad.toml:3: agent.flow_table_size"), "{out}");
    Ok(())
}
