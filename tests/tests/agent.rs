//! `lb-agent run` in a network namespace, with real HTTP backends and a real client: the maps
//! follow a target that dies and comes back; register, deregister and reload through the CLI;
//! a clean exit detaches and unpins. Prints the measured failover and register figures.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_tests::topology::{backend_addr, Topology, VIP};
use lb_userspace::maps::KernelMaps;

fn agent_bin() -> PathBuf {
    std::env::var_os("LB_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lb-agent"))
}

const CONFIG: &str = r#"[agent]
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
hash_table_size = 251
deregistration_delay = "2s"

[target_group.health_check]
protocol = "http"
path = "/"
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
"#;

/// Polls `f` every 10 ms until it returns Some, for at most `limit`.
fn poll<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct Harness {
    topo: Topology,
    agent: usize,
    config_path: PathBuf,
    api: String,
}

impl Harness {
    fn cli(&self, args: &[&str]) -> Result<(i32, String)> {
        let out = Command::new(agent_bin())
            .arg("--api")
            .arg(&self.api)
            .args(args)
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.code().unwrap_or(-1), text))
    }

    fn status(&self) -> Result<serde_json::Value> {
        let (code, text) = self.cli(&["status", "--json"])?;
        if code != 0 {
            bail!("status failed ({code}): {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }

    fn maps(&self) -> Result<KernelMaps> {
        KernelMaps::from_pins(&self.topo.bpffs().join("lb/maps"))
    }

    /// Target ids in the group's live table, and the address of each (from LB_TARGETS).
    fn table_targets(&self) -> Result<BTreeSet<String>> {
        let maps = self.maps()?;
        let mut out = BTreeSet::new();
        for id in maps.active_table(0)?.into_iter().collect::<BTreeSet<u32>>() {
            let t = maps.target(id)?;
            let ip = lb_common::addr::from_words(&t.addr, t.family).context("target address")?;
            out.insert(format!("{ip}:{}", u16::from_be(t.port_be)));
        }
        Ok(out)
    }

    fn states(&self) -> Result<Vec<(String, String)>> {
        let s = self.status()?;
        Ok(s["target_groups"][0]["targets"]
            .as_array()
            .context("targets")?
            .iter()
            .map(|t| {
                (
                    t["target"].as_str().unwrap_or_default().to_string(),
                    t["state"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect())
    }
}

fn all(n: usize) -> BTreeSet<String> {
    (1..=n)
        .map(|i| format!("{}:8080", backend_addr(i)))
        .collect()
}

#[test]
fn agent_follows_a_target_that_dies_and_comes_back() -> Result<()> {
    let mut topo = Topology::routed(3)?;
    for i in 1..=3 {
        topo.http_backend(i)?;
    }
    let dir = topo.dir().to_string_lossy().into_owned();
    let config_path = topo.dir().join("lb.toml");
    std::fs::write(&config_path, CONFIG.replace("DIR", &dir))?;
    let state_file = lb_userspace::datapath::state_file(&topo.bpffs().join("lb"));
    let bin = agent_bin();
    anyhow::ensure!(
        bin.exists(),
        "{} missing: `cargo build -p lb-userspace` (cargo xtask test does)",
        bin.display()
    );
    let agent = topo.spawn(
        "lb",
        "agent",
        &bin,
        &["run", "--config", config_path.to_str().unwrap()],
    )?;
    let mut h = Harness {
        topo,
        agent,
        config_path,
        api: format!("unix:{dir}/api.sock"),
    };
    let result = scenario(&mut h);
    let _ = std::fs::remove_file(&state_file);
    if result.is_err() {
        eprintln!("--- agent log ---\n{}", h.topo.log("agent"));
    }
    result
}

fn scenario(h: &mut Harness) -> Result<()> {
    // All three healthy and in the table.
    poll(Duration::from_secs(20), "three healthy targets", || {
        Ok(h.status().ok().and_then(|_| {
            let states = h.states().ok()?;
            (states.iter().filter(|(_, s)| s == "healthy").count() == 3).then_some(())
        }))
    })?;
    assert_eq!(h.table_targets()?, all(3));

    // Real requests through the VIP reach every backend.
    let mut seen = BTreeSet::new();
    for _ in 0..30 {
        let body = h.topo.exec("cli", &format!("curl -s -m 3 http://{VIP}/"))?;
        seen.insert(body.trim().to_string());
    }
    assert_eq!(
        seen,
        ["b1", "b2", "b3"].map(String::from).into(),
        "responses from {seen:?}"
    );

    // Backend 2 dies silently (its link goes down: checks time out). Removal from the maps:
    // two failed checks (interval 1s, timeout 500ms).
    h.topo.exec("b2", "ip link set e0 down")?;
    let died = Instant::now();
    let b2 = format!("{}:8080", backend_addr(2));
    poll(
        Duration::from_secs(10),
        "backend 2 out of the table",
        || Ok((!h.table_targets()?.contains(&b2)).then_some(())),
    )?;
    let removal = died.elapsed();
    println!("FIGURE death → removal from the maps: {} ms (interval 1s, timeout 500ms, unhealthy_threshold 2)", removal.as_millis());
    assert!(
        removal >= Duration::from_millis(500),
        "removed before a check could time out: {removal:?}"
    );
    assert!(removal <= Duration::from_millis(3500), "{removal:?}");
    let s = h.status()?;
    let t = s["target_groups"][0]["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == b2.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        (t["state"].as_str(), t["reason"].as_str()),
        (Some("unhealthy"), Some("Target.Timeout")),
        "{t}"
    );
    // The client sees no error from the remaining two.
    for _ in 0..10 {
        let body = h.topo.exec("cli", &format!("curl -s -m 3 http://{VIP}/"))?;
        assert!(body.trim() == "b1" || body.trim() == "b3", "{body:?}");
    }

    // It comes back: in the table again after two passing checks.
    h.topo.exec("b2", "ip link set e0 up")?;
    let back = Instant::now();
    poll(
        Duration::from_secs(10),
        "backend 2 back in the table",
        || Ok(h.table_targets()?.contains(&b2).then_some(())),
    )?;
    println!(
        "FIGURE recovery → back in the maps: {} ms (healthy_threshold 2)",
        back.elapsed().as_millis()
    );

    // Metrics name the states.
    let page = h
        .topo
        .exec("lb", "curl -s -m 3 http://127.0.0.1:9900/metrics")?;
    assert!(
        page.contains(&format!(
            "lb_target_healthy{{group=\"web\",target=\"{b2}\"}} 1"
        )),
        "{page}"
    );
    assert!(
        page.contains(
            "lb_health_checks_total{group=\"web\",target=\"10.0.2.12:8080\",result=\"timeout\"}"
        ),
        "{page}"
    );
    assert!(
        page.lines().any(
            |l| l.starts_with("lb_packets_total{listener=\"web\",direction=\"in\"} ")
                && !l.ends_with(" 0")
        ),
        "{page}"
    );

    // Register a fourth target (nothing listens there): LB_TARGETS has it as soon as the call returns.
    let started = Instant::now();
    let (code, text) = h.cli(&[
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
    let maps = h.maps()?;
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
    // Bad input: exit code 2.
    assert_eq!(
        h.cli(&["targets", "register", "--group", "nope", "10.0.2.14:8080"])?
            .0,
        2
    );

    // Deregister backend 3: draining (no new flows), then removed after 2s.
    let (code, text) = h.cli(&["targets", "deregister", "--group", "web", "10.0.2.13:8080"])?;
    assert_eq!(code, 0, "{text}");
    assert!(!h.table_targets()?.contains("10.0.2.13:8080"));
    assert!(h
        .states()?
        .contains(&("10.0.2.13:8080".into(), "draining".into())));
    poll(
        Duration::from_secs(10),
        "backend 3 removed after deregistration_delay",
        || Ok((!h.states()?.iter().any(|(t, _)| t == "10.0.2.13:8080")).then_some(())),
    )?;

    // Reload: an invalid file is refused and the running config stays; a valid one applies.
    let good = std::fs::read_to_string(&h.config_path)?;
    std::fs::write(&h.config_path, good.replace("port = 80\n", "port = 0\n"))?;
    let (code, text) = h.cli(&["reload"])?;
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("lb.toml:11: listener[0].port: port 0 is outside 1..=65535"),
        "{text}"
    );
    assert_eq!(h.status()?["listeners"][0]["port"], 80);
    std::fs::write(
        &h.config_path,
        good.replace(
            "[[target_group.target]]\naddress = \"10.0.2.11\"\nport = 8080\n",
            "",
        ),
    )?;
    let (code, text) = h.cli(&["reload"])?;
    assert_eq!(code, 0, "{text}");
    assert!(
        h.states()?
            .contains(&("10.0.2.11:8080".into(), "draining".into())),
        "{:?}",
        h.states()?
    );

    // SIGTERM: exit 0, XDP detached, pins gone.
    let status = h.topo.stop(h.agent, libc::SIGTERM)?;
    assert!(status.success(), "agent exit: {status}");
    let links = h.topo.exec("lb", "ip -d link show")?;
    assert!(!links.contains(" xdp"), "{links}");
    assert!(!h.topo.bpffs().join("lb").exists());
    Ok(())
}
