//! Scale-out: several balancer nodes behind a router that spreads flows over them by ECMP, each
//! announcing the VIP over BGP through its own BIRD, and backends that learn their return
//! route from the nodes the same way.
//!
//! ```text
//!  client ── c0 ═ r0 ── router rt ── r1 ═ f0 ─┐ front switch (bridge fr on sw)
//!  10.0.1.2        10.0.1.1      10.0.5.1      ├─ f1 ═ l0  node n1  10.0.5.11 ── l1 ═ k1 ─┐
//!                  BIRD: eBGP to every node,   ├─ f2 ═ l0  node n2  10.0.5.12 ── l1 ═ k2 ─┤ back switch
//!                  BFD, ECMP (L4 hash)         └─ f3 ═ l0  node n3  10.0.5.13 ── l1 ═ k3 ─┤ (bridge bk)
//!                                                  BIRD + lb-agent, 10.0.2.N on l1         ├─ e1 ═ e0 b1 10.0.2.11
//!                                                                                          └─ …
//! ```
//!
//! Each node's BIRD has a session to the router (exporting the agent's `lb_vip*` protocols)
//! and one to each backend (exporting `lb_return*`: the client network 10.0.1.0/24), all with
//! BFD at 100 ms × 3. Each backend's BIRD merges the nodes' return routes into one ECMP route
//! (L4 hash), so replies go back through live nodes; the router does the same for the VIP.
//! Everything is a namespace of one [`Topology`] (processes, logs and clean-up are its).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context, Result};
use lb_userspace::{api::Status, maps::KernelMaps};

use crate::{
    harness::{agent_bin, poll},
    topology::{backend_addr, backend_addr6, ip, Topology, CLIENT, VIP},
};

pub const ROUTER_AS: u32 = 65000;
pub const NODE_AS: u32 = 65001;
pub const BACKEND_AS: u32 = 65100;
pub const CLIENT_NET: &str = "10.0.1.0/24";

/// Node `i`'s address toward the router, and toward the backends (1-based).
pub fn node_front(i: usize) -> String {
    format!("10.0.5.{}", 10 + i)
}
pub fn node_back(i: usize) -> String {
    format!("10.0.2.{i}")
}

pub struct Cluster {
    pub topo: Topology,
    pub nodes: usize,
    pub backends: usize,
    /// Node → its agent's handle while it runs.
    agents: BTreeMap<usize, usize>,
    /// Host → its BIRD's handle while it runs.
    birds: BTreeMap<String, usize>,
    /// Node → agents started on it so far.
    runs: BTreeMap<usize, usize>,
    /// Print the agents' logs on drop (tests: shown on failure).
    pub log_on_drop: bool,
}

const BFD: &str = "protocol bfd {\n\tinterface \"*\" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; };\n}\n";

impl Cluster {
    /// The namespaces, links and addresses; BIRD on the router and on every backend, and
    /// `backend.py` on every backend. No node runs anything yet ([`Cluster::start_node`]).
    pub fn new(nodes: usize, backends: usize) -> Result<Self> {
        let mut topo = Topology::bare()?;
        let mut names = vec!["cli".to_string(), "rt".into(), "sw".into()];
        names.extend((1..=nodes).map(|i| format!("n{i}")));
        names.extend((1..=backends).map(|i| format!("b{i}")));
        for n in &names {
            topo.add_host(n)?;
        }
        let (cli, rt, sw) = (topo.ns("cli"), topo.ns("rt"), topo.ns("sw"));
        for br in ["fr", "bk"] {
            ip(&format!("-n {sw} link add {br} type bridge"))?;
            ip(&format!("-n {sw} link set {br} up"))?;
        }
        // Client ═ router.
        ip(&format!(
            "link add c0 netns {cli} type veth peer name r0 netns {rt}"
        ))?;
        ip(&format!("-n {cli} addr add {CLIENT}/24 dev c0"))?;
        ip(&format!("-n {cli} link set c0 up"))?;
        ip(&format!("-n {cli} route add default via 10.0.1.1"))?;
        ip(&format!("-n {rt} addr add 10.0.1.1/24 dev r0"))?;
        ip(&format!("-n {rt} link set r0 up"))?;
        // Router ═ front switch.
        ip(&format!(
            "link add r1 netns {rt} type veth peer name f0 netns {sw}"
        ))?;
        ip(&format!("-n {sw} link set f0 master fr up"))?;
        ip(&format!("-n {rt} addr add 10.0.5.1/24 dev r1"))?;
        ip(&format!("-n {rt} link set r1 up"))?;
        // Nodes: l0 on the front switch, l1 on the back one.
        for i in 1..=nodes {
            let n = topo.ns(&format!("n{i}"));
            ip(&format!(
                "link add l0 netns {n} type veth peer name f{i} netns {sw}"
            ))?;
            ip(&format!(
                "link add l1 netns {n} type veth peer name k{i} netns {sw}"
            ))?;
            ip(&format!("-n {sw} link set f{i} master fr up"))?;
            ip(&format!("-n {sw} link set k{i} master bk up"))?;
            ip(&format!("-n {n} addr add {}/24 dev l0", node_front(i)))?;
            ip(&format!("-n {n} addr add {}/24 dev l1", node_back(i)))?;
            ip(&format!("-n {n} link set l0 up"))?;
            ip(&format!("-n {n} link set l1 up"))?;
            ip(&format!("-n {n} route add {CLIENT_NET} via 10.0.5.1"))?;
            topo.exec(&format!("n{i}"), "sysctl -qw net.ipv4.ip_forward=1")?;
            // The switch ports receive what XDP redirects out of l0 and l1: NAPI (gro on).
            topo.exec(
                "sw",
                &format!("ethtool -K f{i} gro on && ethtool -K k{i} gro on"),
            )?;
        }
        // Backends on the back switch: no default route until BIRD learns one from the nodes.
        for j in 1..=backends {
            let b = topo.ns(&format!("b{j}"));
            ip(&format!(
                "link add e0 netns {b} type veth peer name e{j} netns {sw}"
            ))?;
            ip(&format!("-n {sw} link set e{j} master bk up"))?;
            ip(&format!("-n {b} addr add {}/24 dev e0", backend_addr(j)))?;
            ip(&format!(
                "-n {b} addr add {}/64 dev e0 nodad",
                backend_addr6(j)
            ))?;
            ip(&format!("-n {b} link set e0 up"))?;
            topo.exec(
                &format!("b{j}"),
                "ethtool -K e0 tx off && sysctl -qw net.ipv4.fib_multipath_hash_policy=1 net.ipv4.fib_multipath_use_neigh=1",
            )?;
        }
        topo.exec("cli", "ethtool -K c0 tx off")?;
        topo.exec(
            "rt",
            "sysctl -qw net.ipv4.ip_forward=1 net.ipv4.fib_multipath_hash_policy=1 && ethtool -K r0 tx off && ethtool -K r1 tx off",
        )?;
        let mut c = Self {
            topo,
            nodes,
            backends,
            agents: BTreeMap::new(),
            birds: BTreeMap::new(),
            runs: BTreeMap::new(),
            log_on_drop: true,
        };
        c.start_bird("rt", &c.router_bird())?;
        for j in 1..=backends {
            c.start_bird(&format!("b{j}"), &c.backend_bird(j))?;
            c.topo.backend(j)?;
        }
        Ok(c)
    }

    /// The router: a session to every node, their VIP routes merged (ECMP) into the kernel.
    fn router_bird(&self) -> String {
        let mut s = format!(
            "router id 10.0.5.1;\nlog stderr all;\nprotocol device {{}}\n{BFD}protocol kernel {{\n\tipv4 {{ import none; export all; }};\n\tmerge paths on;\n}}\n"
        );
        for i in 1..=self.nodes {
            s.push_str(&format!(
                "protocol bgp n{i} {{\n\tlocal 10.0.5.1 as {ROUTER_AS};\n\tneighbor {} as {NODE_AS};\n\tbfd on;\n\tipv4 {{ import all; export none; }};\n}}\n",
                node_front(i)
            ));
        }
        s
    }

    /// A backend: a session to every node, their return routes merged into the kernel.
    fn backend_bird(&self, j: usize) -> String {
        let mut s = format!(
            "router id {};\nlog stderr all;\nprotocol device {{}}\n{BFD}protocol kernel {{\n\tipv4 {{ import none; export all; }};\n\tmerge paths on;\n}}\n",
            backend_addr(j)
        );
        for i in 1..=self.nodes {
            s.push_str(&format!(
                "protocol bgp n{i} {{\n\tlocal {} as {BACKEND_AS};\n\tneighbor {} as {NODE_AS};\n\tbfd on;\n\tipv4 {{ import all; export none; }};\n}}\n",
                backend_addr(j),
                node_back(i)
            ));
        }
        s
    }

    /// Node `i`: the agent's protocols (included), a session to the router exporting the
    /// VIPs, one to each backend exporting the return routes.
    fn node_bird(&self, i: usize) -> String {
        let dir = self.node_dir(i);
        let mut s = format!(
            "router id {};\nlog stderr all;\nprotocol device {{}}\n{BFD}include \"{}/bird/*.conf\";\n",
            node_front(i),
            dir.display()
        );
        s.push_str(&format!(
            "protocol bgp uplink {{\n\tlocal {} as {NODE_AS};\n\tneighbor 10.0.5.1 as {ROUTER_AS};\n\tbfd on;\n\tipv4 {{ import none; export where proto ~ \"lb_vip*\"; }};\n}}\n",
            node_front(i)
        ));
        for j in 1..=self.backends {
            s.push_str(&format!(
                "protocol bgp target{j} {{\n\tlocal {} as {NODE_AS};\n\tneighbor {} as {BACKEND_AS};\n\tbfd on;\n\tipv4 {{ import none; export where proto ~ \"lb_return*\"; }};\n}}\n",
                node_back(i),
                backend_addr(j)
            ));
        }
        s
    }

    /// Starts BIRD on `host` with `config`: socket `DIR/bird-HOST.ctl`, log `bird-HOST`.
    fn start_bird(&mut self, host: &str, config: &str) -> Result<()> {
        let conf = self.topo.dir().join(format!("bird-{host}.conf"));
        std::fs::write(&conf, config)?;
        let sock = self.bird_socket(host);
        let handle = self.topo.spawn(
            host,
            &format!("bird-{host}"),
            Path::new("bird"),
            &[
                "-f",
                "-c",
                &conf.to_string_lossy(),
                "-s",
                &sock.to_string_lossy(),
                "-P",
                &self
                    .topo
                    .dir()
                    .join(format!("bird-{host}.pid"))
                    .to_string_lossy(),
            ],
        )?;
        self.birds.insert(host.to_string(), handle);
        poll(Duration::from_secs(10), &format!("BIRD on {host}"), || {
            Ok(sock.exists().then_some(()))
        })
        .with_context(|| self.topo.log(&format!("bird-{host}")))?;
        Ok(())
    }

    pub fn bird_socket(&self, host: &str) -> PathBuf {
        self.topo.dir().join(format!("bird-{host}.ctl"))
    }

    /// `birdc -s … COMMAND` for `host`'s BIRD; its output.
    pub fn birdc(&self, host: &str, command: &str) -> Result<String> {
        let out = Command::new("birdc")
            .arg("-s")
            .arg(self.bird_socket(host))
            .args(command.split_whitespace())
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.topo.dir().join(format!("n{i}"))
    }

    pub fn api(&self, i: usize) -> String {
        format!("unix:{}/api.sock", self.node_dir(i).display())
    }

    /// Node `i`'s agent config: the same on every node but for its own paths, with the
    /// targets listed in `order` (backend numbers).
    pub fn config(&self, i: usize, order: &[usize], check: &str) -> String {
        let dir = self.node_dir(i);
        let d = dir.display();
        let mut c = format!(
            r#"[agent]
interfaces = ["l0", "l1"]
api = "unix:{d}/api.sock"
metrics = ""
pin_path = "{bpffs}/n{i}"
flow_table_size = 65536
hash_seed = "scale-out test cluster"

[announce]
bird_socket = "{sock}"
bird_config = "{d}/bird/vips.conf"
return_routes = ["{CLIENT_NET}"]
drain_timeout = "20s"

[[listener]]
name = "web"
address = "{VIP}"
port = 80
target_group = "web"

[[target_group]]
name = "web"
hash_table_size = 4099
deregistration_delay = "5s"

[target_group.health_check]
protocol = "http"
path = "/health"
{check}
"#,
            bpffs = self.topo.bpffs().display(),
            sock = self.bird_socket(&format!("n{i}")).display(),
        );
        for &j in order {
            c.push_str(&format!(
                "\n[[target_group.target]]\naddress = \"{}\"\nport = 8080\n",
                backend_addr(j)
            ));
        }
        c
    }

    /// Starts node `i`: its BIRD, then `lb-agent run` with `config`.
    pub fn start_node(&mut self, i: usize, config: &str) -> Result<()> {
        let dir = self.node_dir(i);
        std::fs::create_dir_all(dir.join("bird"))?;
        let bird = self.node_bird(i);
        self.start_bird(&format!("n{i}"), &bird)?;
        std::fs::write(dir.join("lb.toml"), config)?;
        self.run_agent(i, &[])
    }

    /// Starts (another) `lb-agent run` on node `i` with its config and `args`; the first
    /// run's log is `agent-nI`, the next ones `agent-nI-2`, ….
    pub fn run_agent(&mut self, i: usize, args: &[&str]) -> Result<()> {
        let bin = agent_bin();
        anyhow::ensure!(
            bin.exists(),
            "{} missing: cargo build -p lb-userspace",
            bin.display()
        );
        let runs = self.runs.entry(i).or_default();
        *runs += 1;
        let log = match *runs {
            1 => format!("agent-n{i}"),
            n => format!("agent-n{i}-{n}"),
        };
        let path = self.node_dir(i).join("lb.toml");
        let mut all = vec!["run", "--config", path.to_str().context("path")?];
        all.extend_from_slice(args);
        let handle = self.topo.spawn(&format!("n{i}"), &log, &bin, &all)?;
        self.agents.insert(i, handle);
        Ok(())
    }

    /// `lb-agent --api (node i) ARGS`: exit code and output.
    pub fn cli(&self, i: usize, args: &[&str]) -> Result<(i32, String)> {
        let out = Command::new(agent_bin())
            .arg("--api")
            .arg(self.api(i))
            .args(args)
            .output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    }

    pub fn status(&self, i: usize) -> Result<Status> {
        let (code, text) = self.cli(i, &["status", "--json"])?;
        if code != 0 {
            bail!("status of n{i} failed ({code}): {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("status --json printed {text}"))
    }

    /// New flows node `i` has created (its listener's counter); None while it does not answer.
    pub fn new_flows(&self, i: usize) -> Option<u64> {
        let s = self.status(i).ok()?;
        s.listeners.first()?.traffic.map(|t| t.new_flows)
    }

    /// The nodes the router's route to the VIP goes to (by node number).
    pub fn vip_nodes(&self) -> Result<BTreeSet<usize>> {
        let out = self.topo.exec("rt", &format!("ip route show {VIP}"))?;
        Ok(nodes_in(&out))
    }

    /// The nodes backend `j`'s route to the client network goes through.
    pub fn return_nodes(&self, j: usize) -> Result<BTreeSet<usize>> {
        let out = self
            .topo
            .exec(&format!("b{j}"), &format!("ip route show {CLIENT_NET}"))?;
        Ok(return_nodes_in(&out)
            .into_iter()
            .filter(|&n| n >= 1 && n <= self.nodes)
            .collect())
    }

    /// Node `i`'s table of group id `gid` as its pinned maps hold it, slot by slot, each slot
    /// the target's address and port (ids are each node's own; addresses are what must agree).
    pub fn table(&self, i: usize, gid: u32) -> Result<Vec<String>> {
        let maps = KernelMaps::from_pins(&self.topo.bpffs().join(format!("n{i}/maps")))?;
        let mut names: BTreeMap<u32, String> = BTreeMap::new();
        let mut out = Vec::new();
        for id in maps.active_table(gid)? {
            if let std::collections::btree_map::Entry::Vacant(e) = names.entry(id) {
                let t = maps.target(id)?;
                let ip = lb_common::addr::from_words(&t.addr, t.family).context("address")?;
                e.insert(lb_userspace::config::endpoint(ip, u16::from_be(t.port_be)));
            }
            out.push(names[&id].clone());
        }
        Ok(out)
    }

    /// Waits until every node's agent reports `n` healthy targets.
    pub fn wait_healthy(&self, n: usize) -> Result<()> {
        for i in 1..=self.nodes {
            poll(
                Duration::from_secs(30),
                &format!("n{i}: {n} healthy"),
                || {
                    let Ok(s) = self.status(i) else {
                        return Ok(None);
                    };
                    let healthy = s.target_groups[0]
                        .targets
                        .iter()
                        .filter(|t| t.state.to_string() == "healthy")
                        .count();
                    Ok((healthy == n).then_some(()))
                },
            )?;
        }
        Ok(())
    }

    /// Node `i` dies as a box does: its links go down first (nothing more leaves it: no BGP
    /// notification, no TCP FIN from a killed BIRD), then kill -9 of its agent and BIRD.
    /// The moment the links went down.
    pub fn kill_node(&mut self, i: usize) -> Result<SystemTime> {
        let at = SystemTime::now();
        self.topo.exec(
            &format!("n{i}"),
            "ip link set l0 down && ip link set l1 down",
        )?;
        if let Some(h) = self.agents.remove(&i) {
            self.topo.stop(h, libc::SIGKILL)?;
        }
        if let Some(h) = self.birds.remove(&format!("n{i}")) {
            self.topo.stop(h, libc::SIGKILL)?;
        }
        Ok(at)
    }

    /// Stops node `i`'s agent with SIGTERM (it withdraws, then detaches; started with
    /// `--keep-datapath`, it leaves everything as it is); its exit status.
    pub fn stop_agent(&mut self, i: usize) -> Result<std::process::ExitStatus> {
        let h = self.agents.remove(&i).context("no agent")?;
        self.topo.stop(h, libc::SIGTERM)
    }

    pub fn agent_log(&self, i: usize) -> String {
        self.topo.log(&format!("agent-n{i}"))
    }

    /// Starts `ip -tshort monitor route` on `host`, log `routes-HOST`.
    pub fn monitor_routes(&mut self, host: &str) -> Result<()> {
        self.topo.spawn(
            host,
            &format!("routes-{host}"),
            Path::new("ip"),
            &["-tshort", "monitor", "route"],
        )?;
        Ok(())
    }

    /// The route changes `monitor_routes` saw on `host`: (wall-clock time, the message).
    pub fn route_events(&self, host: &str) -> Vec<(SystemTime, String)> {
        let mut out: Vec<(SystemTime, String)> = Vec::new();
        for line in self.topo.log(&format!("routes-{host}")).lines() {
            if let Some(rest) = line.strip_prefix('[') {
                if let Some((ts, msg)) = rest.split_once(']') {
                    if let Ok(t) = humantime::parse_rfc3339(&format!("{ts}Z")) {
                        out.push((t, msg.trim().to_string()));
                        continue;
                    }
                }
            }
            if let Some(last) = out.last_mut() {
                last.1.push('\n');
                last.1.push_str(line);
            }
        }
        out
    }
}

/// Node numbers in `ip route` output (`nexthop via 10.0.5.1N`, `via 10.0.5.1N`).
pub fn nodes_in(route: &str) -> BTreeSet<usize> {
    route
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("10.0.5.1"))
        .filter_map(|n| n.parse().ok())
        .filter(|&n: &usize| n >= 1)
        .collect()
}

/// Node numbers in a backend's `ip route` output (`nexthop via 10.0.2.N`): the nodes' addresses
/// on the back network, and the backends' own (10.0.2.1N) beyond them.
pub fn return_nodes_in(route: &str) -> BTreeSet<usize> {
    route
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("10.0.2."))
        .filter_map(|n| n.parse().ok())
        .collect()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Captured by the test harness: shown when the test fails.
        if self.log_on_drop {
            for i in 1..=self.nodes {
                println!("--- agent n{i} ---\n{}", self.agent_log(i));
            }
        }
    }
}
