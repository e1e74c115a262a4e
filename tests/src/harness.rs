//! The real `lb-agent` binary running on a topology's balancer, with what tests ask of it: the
//! CLI, the status, the pinned maps, metrics, and clients on the client host.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use lb_userspace::{api::Status, health::TargetState, maps::KernelMaps};

use crate::topology::{backend_addr, Topology};

pub const URL: &str = "http://10.0.100.10/";

/// A config for `backends` backends behind VIP:80 (tcp), with the given extra listener keys,
/// group keys and health-check keys; `DIR` is the topology's scratch directory.
pub fn config(backends: usize, listener: &str, group: &str, check: &str, agent: &str) -> String {
    let mut c = format!(
        r#"[agent]
interfaces = ["l0", "l1"]
api = "unix:DIR/api.sock"
metrics = "127.0.0.1:9900"
pin_path = "DIR/bpf/lb"
flow_table_size = 65536
{agent}

[[listener]]
name = "web"
address = "10.0.100.10"
port = 80
target_group = "web"
{listener}

[[target_group]]
name = "web"
hash_table_size = 4099
{group}

[target_group.health_check]
protocol = "http"
path = "/health"
interval = "1s"
timeout = "500ms"
healthy_threshold = 2
unhealthy_threshold = 2
{check}
"#
    );
    for i in 1..=backends {
        c.push_str(&format!(
            "\n[[target_group.target]]\naddress = \"{}\"\nport = 8080\n",
            backend_addr(i)
        ));
    }
    c
}

/// A further listener with its own target group, to append to a [`config`]: `name` on
/// `address:port` (`protocol`), balancing to `targets` at `target_port`, each checked by TCP
/// connections to `check_port` every second (two passes to be healthy, two failures not).
pub fn listener_group(
    name: &str,
    address: &str,
    port: u16,
    protocol: &str,
    targets: &[String],
    target_port: u16,
    check_port: u16,
) -> String {
    let mut c = format!(
        r#"
[[listener]]
name = "{name}"
address = "{address}"
port = {port}
protocol = "{protocol}"
target_group = "{name}"

[[target_group]]
name = "{name}"
hash_table_size = 251

[target_group.health_check]
protocol = "tcp"
port = {check_port}
interval = "1s"
timeout = "500ms"
healthy_threshold = 2
unhealthy_threshold = 2
"#
    );
    for t in targets {
        c.push_str(&format!(
            "\n[[target_group.target]]\naddress = \"{t}\"\nport = {target_port}\n"
        ));
    }
    c
}

/// What curl reported for one download.
#[derive(Clone, Debug, PartialEq)]
pub struct Download {
    /// curl's exit code (28: `--max-time` reached).
    pub exit: i32,
    pub http_code: u16,
    pub bytes: u64,
    pub seconds: f64,
}

/// A datagram the client received (`Balancer::udp_exchange`).
#[derive(Clone, Debug, PartialEq)]
pub struct Datagram {
    pub source: String,
    pub port: u16,
    pub len: usize,
    /// The payload up to its first ": " (the echo's "NAME saw ADDR PORT").
    pub head: String,
}

/// The agent binary: `LB_AGENT_BIN` (set by `cargo xtask test`), else the debug build.
pub fn agent_bin() -> PathBuf {
    std::env::var_os("LB_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lb-agent"))
}

/// Polls `f` every 10 ms until it returns Some, for at most `limit`.
pub fn poll<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
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

pub struct Balancer {
    /// The topology the agent runs on (`b.topo.exec(…)`); `into_topology` hands it back.
    pub topo: Held,
    /// The running agent's handle in `topo`.
    pub agent: Option<usize>,
    pub config_path: PathBuf,
    pub api: String,
    runs: usize,
    /// Print the agent's log when dropped (tests: the harness shows it only on failure).
    pub log_on_drop: bool,
}

impl Balancer {
    /// A topology with `options`, `backend.py` on each of its backends, and `lb-agent run` with
    /// `config`.
    pub fn with_backends(options: crate::topology::Options, config: &str) -> Result<Self> {
        let mut topo = Topology::new(options)?;
        for i in 1..=options.backends {
            topo.backend(i)?;
        }
        Self::start(topo, config, &[])
    }

    /// Writes `config` (every `DIR` replaced by the topology's scratch directory) and starts
    /// `lb-agent run` on the balancer with `args`.
    pub fn start(topo: Topology, config: &str, args: &[&str]) -> Result<Self> {
        Self::start_via(topo, config, &[], args)
    }

    /// As [`Balancer::start`], with the agent run by `wrapper` (`setpriv … --`, say).
    pub fn start_via(
        topo: Topology,
        config: &str,
        wrapper: &[&str],
        args: &[&str],
    ) -> Result<Self> {
        let bin = agent_bin();
        anyhow::ensure!(
            bin.exists(),
            "{} missing: `cargo build -p lb-userspace` (cargo xtask test does)",
            bin.display()
        );
        let dir = topo.dir().to_string_lossy().into_owned();
        let config_path = topo.dir().join("lb.toml");
        std::fs::write(&config_path, config.replace("DIR", &dir))?;
        let mut b = Self {
            topo: Held(Some(topo)),
            agent: None,
            config_path,
            api: format!("unix:{dir}/api.sock"),
            runs: 0,
            log_on_drop: true,
        };
        b.run_agent_via(wrapper, args)?;
        Ok(b)
    }

    /// Starts (another) `lb-agent run`; its log is `agent` for the first, then `agent2`, ….
    pub fn run_agent(&mut self, args: &[&str]) -> Result<()> {
        self.run_agent_via(&[], args)
    }

    /// As [`Balancer::run_agent`], with the agent run by `wrapper` (a command and its
    /// arguments, the agent's command line after them).
    pub fn run_agent_via(&mut self, wrapper: &[&str], args: &[&str]) -> Result<()> {
        self.runs += 1;
        let log = self.log_name(self.runs);
        let bin = agent_bin().to_string_lossy().into_owned();
        let config = self.config_path.to_string_lossy().into_owned();
        let mut all: Vec<&str> = wrapper.iter().skip(1).copied().collect();
        if !wrapper.is_empty() {
            all.push(&bin);
        }
        all.extend(["run", "--config", &config]);
        all.extend_from_slice(args);
        let program = wrapper.first().map_or(bin.as_str(), |w| w);
        self.agent = Some(self.topo.spawn("lb", &log, Path::new(program), &all)?);
        Ok(())
    }

    fn log_name(&self, run: usize) -> String {
        if run == 1 {
            "agent".into()
        } else {
            format!("agent{run}")
        }
    }

    /// The log of the current (or last) agent.
    pub fn agent_log(&self) -> String {
        self.topo.log(&self.log_name(self.runs))
    }

    /// Sends `signal` to the agent; its exit status.
    pub fn stop_agent(&mut self, signal: i32) -> Result<std::process::ExitStatus> {
        let handle = self.agent.take().context("no agent running")?;
        self.topo.stop(handle, signal)
    }

    /// `lb-agent --api … ARGS`: (exit code, stdout and stderr).
    pub fn cli(&self, args: &[&str]) -> Result<(i32, String)> {
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

    /// `lb-agent status --json`, read as the API's type.
    pub fn status(&self) -> Result<Status> {
        let (code, text) = self.cli(&["status", "--json"])?;
        if code != 0 {
            bail!("status failed ({code}): {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("status --json printed {text}"))
    }

    /// One control-API request as it is, without the CLI: the status code and the answer's
    /// body.
    pub fn api_request(&self, method: &str, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>)> {
        let api = lb_userspace::client::Api::new(&self.api)?;
        let method = method.parse().context("an HTTP method")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (status, answer) = runtime.block_on(api.raw(method, path, body.to_vec()))?;
        Ok((status.as_u16(), answer.to_vec()))
    }

    /// target (`group/addr:port`) → state, over every group.
    pub fn states(&self) -> Result<BTreeMap<String, String>> {
        let s = self.status()?;
        let mut out = BTreeMap::new();
        for g in &s.target_groups {
            for t in &g.targets {
                out.insert(format!("{}/{}", g.name, t.target), t.state.to_string());
            }
        }
        Ok(out)
    }

    /// Waits until `n` targets (over every group) are healthy and in their group's table (the
    /// agent builds tables off its runtime thread, so the table follows a moment later).
    pub fn wait_healthy(&self, n: usize) -> Result<()> {
        poll(
            Duration::from_secs(20),
            &format!("{n} healthy targets receiving new flows"),
            || {
                let Ok(s) = self.status() else {
                    return Ok(None);
                };
                let ready = s
                    .target_groups
                    .iter()
                    .flat_map(|g| &g.targets)
                    .filter(|t| t.state == TargetState::Healthy && t.receives_new_flows)
                    .count();
                Ok((ready == n).then_some(()))
            },
        )
    }

    pub fn maps(&self) -> Result<KernelMaps> {
        KernelMaps::from_pins(&self.topo.bpffs().join("lb/maps"))
    }

    /// Endpoints (`addr:port`) in group `gid`'s live table.
    pub fn table_targets(&self, gid: u32) -> Result<BTreeSet<String>> {
        let maps = self.maps()?;
        let mut out = BTreeSet::new();
        for id in maps
            .active_table(gid)?
            .into_iter()
            .collect::<BTreeSet<u32>>()
        {
            let t = maps.target(id)?;
            let ip = lb_common::addr::from_words(&t.addr, t.family).context("target address")?;
            out.insert(lb_userspace::config::endpoint(ip, u16::from_be(t.port_be)));
        }
        Ok(out)
    }

    /// The data plane's non-zero drop and event counters, read from the pinned maps, as
    /// `label=value` (labels from `lb_common::counter`), for test output.
    pub fn counters_text(&self) -> Result<String> {
        let c = self.maps()?.counters()?;
        let all = lb_common::counter::DROP_REASONS
            .iter()
            .chain(lb_common::counter::EVENTS.iter());
        Ok(all
            .filter(|(i, _)| c[*i as usize] != 0)
            .map(|(i, label)| format!("{label}={}", c[*i as usize]))
            .collect::<Vec<_>>()
            .join(" "))
    }

    /// The agent's metrics page, from its endpoint at 127.0.0.1:9900 on the balancer; an error
    /// unless it is served as OpenMetrics text and complete (`# EOF`).
    pub fn metrics_page(&self) -> Result<String> {
        let out = self
            .topo
            .exec("lb", "curl -s -i -m 3 http://127.0.0.1:9900/metrics")?;
        let (head, page) = out
            .split_once("\r\n\r\n")
            .with_context(|| format!("no HTTP header in {out:?}"))?;
        let kind = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim())
        });
        ensure!(
            kind == Some(lb_userspace::metrics::CONTENT_TYPE),
            "metrics served as {kind:?}:\n{head}"
        );
        ensure!(page.ends_with("\n# EOF\n"), "an incomplete page:\n{page}");
        Ok(page.to_string())
    }

    /// The value of one metric line (`name{labels}`), from the agent's metrics page.
    pub fn metric(&self, series: &str) -> Result<f64> {
        let page = self.metrics_page()?;
        page.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .with_context(|| format!("no {series} in\n{page}"))
    }

    /// Runs `client.py ARGS` on the client host; its output lines.
    pub fn client(&self, args: &str) -> Result<Vec<String>> {
        let script = self.topo.dir().join("client.py");
        if !script.exists() {
            std::fs::write(&script, include_str!("client.py"))?;
        }
        let out = self
            .topo
            .exec("cli", &format!("python3 {} {args}", script.display()))?;
        Ok(out.lines().map(String::from).collect())
    }

    /// Downloads `url` with curl on the client, giving up after `max_time` seconds.
    pub fn download(&self, url: &str, max_time: u32) -> Result<Download> {
        let out = self.topo.exec(
            "cli",
            &format!(
                "curl -g -s -o /dev/null --max-time {max_time} -w '%{{http_code}} %{{size_download}} %{{time_total}}' '{url}'; echo \" $?\""
            ),
        )?;
        let w: Vec<&str> = out.split_whitespace().collect();
        let [code, bytes, seconds, exit] = w[..] else {
            bail!("unexpected curl output: {out:?}");
        };
        Ok(Download {
            exit: exit.parse()?,
            http_code: code.parse()?,
            bytes: bytes.parse()?,
            seconds: seconds.parse()?,
        })
    }

    /// Sends one UDP datagram `payload` from the client to `addr:port` (IPv4 or IPv6) from an
    /// unconnected socket, and collects what comes back: every datagram received within
    /// `wait`, and no longer than half a second after the last one.
    pub fn udp_exchange(
        &self,
        addr: &str,
        port: u16,
        payload: &str,
        wait: Duration,
    ) -> Result<Vec<Datagram>> {
        let family = if addr.contains(':') {
            "AF_INET6"
        } else {
            "AF_INET"
        };
        let out = self.topo.python(
            "cli",
            "udp_exchange",
            &format!(
                r#"import socket, time
s = socket.socket(socket.{family}, socket.SOCK_DGRAM)
s.sendto({payload:?}.encode(), ("{addr}", {port}))
deadline = time.monotonic() + {wait}
while True:
    left = deadline - time.monotonic()
    if left <= 0:
        break
    s.settimeout(left)
    try:
        data, peer = s.recvfrom(65535)
    except socket.timeout:
        break
    print(peer[0], peer[1], len(data), data.split(b": ")[0].decode(errors="replace"), flush=True)
    deadline = min(deadline, time.monotonic() + 0.5)
"#,
                wait = wait.as_secs_f64()
            ),
        )?;
        out.lines()
            .map(|l| {
                let mut w = l.splitn(4, ' ');
                let (Some(addr), Some(port), Some(len), head) =
                    (w.next(), w.next(), w.next(), w.next())
                else {
                    bail!("unexpected line {l:?}");
                };
                Ok(Datagram {
                    source: addr.to_string(),
                    port: port.parse()?,
                    len: len.parse()?,
                    head: head.unwrap_or_default().to_string(),
                })
            })
            .collect()
    }

    /// `n` requests to `url` from the client: answers per backend name (errors under "ERR"),
    /// and the set of client addresses the backends saw.
    pub fn spread(
        &self,
        url: &str,
        n: usize,
    ) -> Result<(BTreeMap<String, usize>, BTreeSet<String>)> {
        let mut counts = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for line in self.client(&format!("count {url} {n}"))? {
            let mut w = line.split_whitespace();
            let name = w.next().unwrap_or("ERR").to_string();
            if name != "ERR" {
                seen.insert(w.next().unwrap_or_default().to_string());
            }
            *counts.entry(name).or_default() += 1;
        }
        Ok((counts, seen))
    }
}

impl Balancer {
    /// Stops the agent (if running) and hands the topology back, for more runs on it.
    pub fn into_topology(mut self) -> Topology {
        self.shut_down();
        self.topo
            .0
            .take()
            .expect("a balancer holds its topology until this call")
    }

    fn shut_down(&mut self) {
        let log = self.log_name(self.runs);
        let Some(topo) = self.topo.0.as_mut() else {
            return; // handed back by `into_topology`, which shut the agent down first
        };
        // Captured by the test harness: shown only when the test fails.
        if self.log_on_drop {
            eprintln!("--- agent log ---\n{}", topo.log(&log));
        }
        if let Some(h) = self.agent.take() {
            let _ = topo.stop(h, libc::SIGTERM);
        }
        let _ = std::fs::remove_file(lb_userspace::datapath::state_file(&topo.bpffs().join("lb")));
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// A balancer's topology, owned until `Balancer::into_topology` takes it; reads as the
/// topology itself.
pub struct Held(Option<Topology>);

impl std::ops::Deref for Held {
    type Target = Topology;

    fn deref(&self) -> &Topology {
        self.0
            .as_ref()
            .expect("a balancer holds its topology until into_topology")
    }
}

impl std::ops::DerefMut for Held {
    fn deref_mut(&mut self) -> &mut Topology {
        self.0
            .as_mut()
            .expect("a balancer holds its topology until into_topology")
    }
}
