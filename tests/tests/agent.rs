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
        topo.backend(i)?;
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
        seen.insert(
            body.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert_eq!(
        seen,
        ["b1", "b2", "b3"].map(String::from).into(),
        "responses from {seen:?}"
    );

    // Backend 2 dies silently (its link goes down: checks time out). Removal from the maps:
    // two failed checks (interval 1s, timeout 500ms).
    h.topo.set_backend_link(2, false)?;
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
        assert!(
            body.starts_with("b1 ") || body.starts_with("b3 "),
            "{body:?}"
        );
    }

    // It comes back: in the table again after two passing checks.
    h.topo.set_backend_link(2, true)?;
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

const TWO_LISTENERS: &str = r#"[agent]
interfaces = ["l0", "l1"]
api = "unix:DIR/api.sock"
metrics = ""
pin_path = "DIR/bpf/lb"
flow_table_size = 65536

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
idle_timeout = "2s"

[[target_group]]
name = "web"
hash_table_size = 251

[target_group.health_check]
protocol = "http"
interval = "1s"
timeout = "500ms"
healthy_threshold = 2

[[target_group.target]]
address = "10.0.2.11"
port = 8080

[[target_group.target]]
address = "10.0.2.12"
port = 8080

[[target_group]]
name = "echo"
hash_table_size = 251

[target_group.health_check]
port = 8080
interval = "1s"
timeout = "500ms"
healthy_threshold = 2

[[target_group.target]]
address = "10.0.2.11"
port = 5300
"#;

/// One datagram to the UDP listener; the reply's source and payload.
const UDP_CLIENT: &str = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(3)\ns.sendto(b'ping',('10.0.100.10',5300))\nd,a=s.recvfrom(2048)\nprint(a[0],a[1],d.decode())\n";

fn udp_flows(maps: &KernelMaps) -> usize {
    maps.flow_keys()
        .filter_map(Result::ok)
        .filter(|k| k.protocol == lb_common::PROTO_UDP)
        .count()
}

#[test]
fn keep_datapath_restart_adopts_the_pins_and_keeps_flows() -> Result<()> {
    let mut topo = Topology::routed(2)?;
    for i in 1..=2 {
        topo.backend(i)?;
    }
    std::fs::write(topo.dir().join("udp_client.py"), UDP_CLIENT)?;
    let dir = topo.dir().to_string_lossy().into_owned();
    let config_path = topo.dir().join("lb.toml");
    std::fs::write(&config_path, TWO_LISTENERS.replace("DIR", &dir))?;
    let state_file = lb_userspace::datapath::state_file(&topo.bpffs().join("lb"));
    let bin = agent_bin();
    let config_arg = config_path.to_string_lossy().into_owned();
    let first = topo.spawn(
        "lb",
        "agent1",
        &bin,
        &["run", "--config", &config_arg, "--keep-datapath"],
    )?;
    let mut h = Harness {
        topo,
        agent: first,
        config_path,
        api: format!("unix:{dir}/api.sock"),
    };
    let result = restart_scenario(&mut h, &bin, &config_arg);
    let _ = std::fs::remove_file(&state_file);
    if result.is_err() {
        eprintln!(
            "--- first agent ---\n{}\n--- second agent ---\n{}",
            h.topo.log("agent1"),
            h.topo.log("agent2")
        );
    }
    result
}

fn healthy_count(h: &Harness) -> usize {
    h.status()
        .ok()
        .map(|s| {
            s["target_groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["targets"].as_array().cloned().unwrap_or_default())
                .filter(|t| t["state"] == "healthy")
                .count()
        })
        .unwrap_or(0)
}

fn restart_scenario(h: &mut Harness, bin: &Path, config_arg: &str) -> Result<()> {
    poll(Duration::from_secs(20), "three healthy targets", || {
        Ok((healthy_count(h) == 3).then_some(()))
    })?;

    // UDP through the VIP: the reply comes from the VIP and listener port.
    let client = h
        .topo
        .dir()
        .join("udp_client.py")
        .to_string_lossy()
        .into_owned();
    let reply = h.topo.exec("cli", &format!("python3 {client}"))?;
    assert!(
        reply.starts_with("10.0.100.10 5300 b1 saw 10.0.1.2 ")
            && reply.trim_end().ends_with(": ping"),
        "{reply}"
    );
    assert_eq!(udp_flows(&h.maps()?), 1);
    // The listener's idle_timeout is 2s: the sweep forgets the flow (ticks are ~1.07 s, the
    // sweep runs every second here).
    let sent = Instant::now();
    poll(Duration::from_secs(8), "idle UDP flow expired", || {
        Ok((udp_flows(&h.maps()?) == 0).then_some(()))
    })?;
    let idle = sent.elapsed();
    assert!(
        idle >= Duration::from_millis(1500),
        "expired after {idle:?}, before its idle timeout"
    );
    println!(
        "FIGURE idle UDP flow (idle_timeout 2s) expired after {} ms",
        idle.as_millis()
    );

    // A slow download runs across the restart.
    let download = h.topo.spawn(
        "cli",
        "download",
        Path::new("curl"),
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
            &format!("http://{VIP}/stream?seconds=4&rate=1000000"),
        ],
    )?;
    poll(Duration::from_secs(5), "the download's flow", || {
        Ok(h.maps()?
            .flow_keys()
            .filter_map(Result::ok)
            .any(|k| k.protocol == lb_common::PROTO_TCP && u16::from_be(k.dst_port_be) == 80)
            .then_some(()))
    })?;

    // The agent exits and leaves the data plane running.
    let status = h.topo.stop(h.agent, libc::SIGTERM)?;
    assert!(status.success(), "{status}");
    assert!(
        h.topo.exec("lb", "ip -d link show l0")?.contains(" xdp"),
        "XDP must stay attached"
    );
    assert!(h.topo.bpffs().join("lb/links/l0").exists());

    // The next agent adopts: no new attach, target states carried over.
    h.agent = h
        .topo
        .spawn("lb", "agent2", bin, &["run", "--config", config_arg])?;
    poll(Duration::from_secs(10), "the second agent's API", || {
        Ok(h.status().ok())
    })?;
    assert_eq!(
        healthy_count(h),
        3,
        "states carried over (not initial again)"
    );
    let log = h.topo.log("agent2");
    assert!(log.contains("adopted the pinned data plane"), "{log}");
    assert!(!log.contains("XDP attached"), "second attach: {log}");
    assert!(
        !log.contains("target state changed"),
        "states must not flap on adoption: {log}"
    );

    // The download completes, whole.
    let done = h.topo.stop_wait(download, Duration::from_secs(30))?;
    assert!(done.success(), "curl: {done}");
    assert_eq!(h.topo.log("download"), "200 4000000");

    // SIGHUP reloads: a weight change shows in the status.
    let text = std::fs::read_to_string(&h.config_path)?;
    std::fs::write(
        &h.config_path,
        text.replacen("port = 8080\n", "port = 8080\nweight = 7\n", 1),
    )?;
    // SAFETY: signalling the agent this test started.
    unsafe { libc::kill(h.topo.pid(h.agent) as i32, libc::SIGHUP) };
    poll(Duration::from_secs(5), "weight 7 after SIGHUP", || {
        Ok(h.status()?["target_groups"][0]["targets"][0]["weight"]
            .eq(&7)
            .then_some(()))
    })?;

    let status = h.topo.stop(h.agent, libc::SIGTERM)?;
    assert!(status.success(), "{status}");
    assert!(!h.topo.exec("lb", "ip -d link show l0")?.contains(" xdp"));
    Ok(())
}

#[test]
fn run_refuses_bad_setups_with_clear_errors() -> Result<()> {
    let topo = Topology::routed(0)?;
    let dir = topo.dir().to_string_lossy().into_owned();
    let run = |config: &str, prefix: &[&str]| -> Result<(i32, String)> {
        let path = topo.dir().join("bad.toml");
        std::fs::write(&path, config.replace("DIR", &dir))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &topo.ns("lb")])
            .args(prefix)
            .arg(agent_bin())
            .args(["run", "--config"])
            .arg(&path);
        let out = cmd.output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    // An invalid config: exit 2 before touching the kernel.
    let (code, err) = run(
        &CONFIG.replace("port = 80\n", "port = 80\ncolour = 1\n"),
        &[],
    )?;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("bad.toml:12: listener[0].colour: unknown field `colour`"),
        "{err}"
    );
    // No such interface.
    let (code, err) = run(&CONFIG.replace("\"l1\"", "\"nosuch0\""), &[])?;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("interface nosuch0 not found"), "{err}");
    // Not root.
    let (code, err) = run(
        CONFIG,
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ],
    )?;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("needs root, or the capabilities CAP_BPF and CAP_NET_ADMIN"),
        "{err}"
    );
    // A pin path holding someone else's pins.
    std::fs::create_dir_all(topo.bpffs().join("lb"))?;
    let foreign = topo.bpffs().join("lb/foreign");
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&foreign)
        .args([
            "type", "array", "key", "4", "value", "4", "entries", "1", "name", "foreign",
        ])
        .output()?;
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, err) = run(CONFIG, &[])?;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is in use by a foreign program"), "{err}");
    assert!(foreign.exists(), "the foreign pin must be left alone");
    assert!(
        !topo.exec("lb", "ip -d link show")?.contains(" xdp"),
        "nothing attached"
    );
    Ok(())
}

#[test]
fn validate_prints_a_summary_or_every_problem() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("lb-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let good = dir.join("good.toml");
    std::fs::write(&good, CONFIG.replace("DIR", "/run/x"))?;
    let out = Command::new(agent_bin())
        .args(["validate", "--config"])
        .arg(&good)
        .output()?;
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("ok: 1 listener(s), 1 target group(s), 3 target(s)"),
        "{stdout}"
    );
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        CONFIG
            .replace("DIR", "/run/x")
            .replace("port = 80\n", "port = 0\n")
            .replace("timeout = \"500ms\"", "timeout = \"1s\""),
    )?;
    let out = Command::new(agent_bin())
        .args(["validate", "--config"])
        .arg(&bad)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let b = bad.display();
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [
            format!("{b}:11: listener[0].port: port 0 is outside 1..=65535"),
            format!(
                "{b}:23: target_group[0].health_check.timeout: 1s must be shorter than interval 1s"
            ),
        ]
    );
    // Bad arguments: exit 2 too.
    let out = Command::new(agent_bin()).args(["validate"]).output()?;
    assert_eq!(out.status.code(), Some(2));
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
