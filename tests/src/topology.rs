//! Network-namespace topologies with real hosts, for tests that run the agent and real clients.
//!
//! Routed (two-arm):
//!
//! ```text
//!  client ── c0 ═ l0 ── balancer ── l1 ═ s0 ──┐ switch (bridge br0)
//!  10.0.1.2       10.0.1.1     10.0.2.1        ├─ s1 ═ e0  backend 1  10.0.2.11
//!  10.0.1.3       fd00:1::1    fd00:2::1       ├─ s2 ═ e0  backend 2  10.0.2.12
//!  fd00:1::2                                   └─ ...      (fd00:2::11, ...)
//! ```
//!
//! One-arm: the balancer has only `l1` on the switch (10.0.2.1 and 10.0.3.1); the client sits
//! on the switch too, in its own subnet (10.0.3.2, via 10.0.3.1), so that backends' replies to
//! it go through the balancer; XDP sends everything back out of `l1` (XDP_TX).
//!
//! Every host is a namespace this topology made, named with a prefix unique to the process and
//! the topology; the root namespace gets no address or route. The client routes everything via
//! the balancer, and the backends' default route is the balancer (NAT needs replies back through
//! it). Senders' veths have tx checksum offload off (see the README). Everything — processes,
//! namespaces, the bpffs mount and the scratch directory — goes away on drop, also on failure.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{bail, Context, Result};

pub const CLIENT: &str = "10.0.1.2";
/// A second client address (routed topology), for `allowed_sources` tests.
pub const CLIENT_B: &str = "10.0.1.3";
pub const CLIENT6: &str = "fd00:1::2";
pub const ONE_ARM_CLIENT: &str = "10.0.3.2";
pub const VIP: &str = "10.0.100.10";
pub const VIP6: &str = "fd00:100::10";

/// Backend `i` (1-based).
pub fn backend_addr(i: usize) -> String {
    format!("10.0.2.{}", 10 + i)
}

pub fn backend_addr6(i: usize) -> String {
    format!("fd00:2::{}", 10 + i)
}

/// How a topology is built.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub backends: usize,
    /// The balancer has one interface (l1) and answers with XDP_TX.
    pub one_arm: bool,
    /// Leave tx checksum offload on at the client (its frames carry partial checksums).
    pub client_tx_offload: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            backends: 3,
            one_arm: false,
            client_tx_offload: false,
        }
    }
}

pub struct Topology {
    /// XDP programs the topology attached itself (see `attach_xdp_pass`).
    xdp_pass: Vec<aya::Ebpf>,
    prefix: String,
    hosts: Vec<String>,
    dir: PathBuf,
    bpffs: PathBuf,
    children: Vec<(String, Child)>,
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &str) -> Result<String> {
    run(Command::new("ip").args(args.split_whitespace()))
}

impl Topology {
    /// Client, balancer, switch and `backends` backends, routed as in the module doc.
    pub fn routed(backends: usize) -> Result<Self> {
        Self::new(Options {
            backends,
            ..Options::default()
        })
    }

    pub fn new(options: Options) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "lbt{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir)?;
        let mut t = Self {
            xdp_pass: Vec::new(),
            bpffs: dir.join("bpf"),
            prefix,
            hosts: Vec::new(),
            dir,
            children: Vec::new(),
        };
        t.build(options)?;
        Ok(t)
    }

    fn build(&mut self, o: Options) -> Result<()> {
        let backends = o.backends;
        let mut names = vec!["cli".to_string(), "lb".into(), "sw".into()];
        names.extend((1..=backends).map(|i| format!("b{i}")));
        for n in &names {
            let ns = self.ns(n);
            ip(&format!("netns add {ns}"))?;
            self.hosts.push(ns.clone());
            ip(&format!("-n {ns} link set lo up"))?;
        }
        let (cli, lb, sw) = (self.ns("cli"), self.ns("lb"), self.ns("sw"));
        ip(&format!("-n {sw} link add br0 type bridge"))?;
        ip(&format!("-n {sw} link set br0 up"))?;
        ip(&format!(
            "link add l1 netns {lb} type veth peer name s0 netns {sw}"
        ))?;
        ip(&format!("-n {sw} link set s0 master br0 up"))?;
        for i in 1..=backends {
            let b = self.ns(&format!("b{i}"));
            ip(&format!(
                "link add e0 netns {b} type veth peer name s{i} netns {sw}"
            ))?;
            ip(&format!("-n {sw} link set s{i} master br0 up"))?;
            ip(&format!("-n {b} addr add {}/24 dev e0", backend_addr(i)))?;
            ip(&format!(
                "-n {b} addr add {}/64 dev e0 nodad",
                backend_addr6(i)
            ))?;
            ip(&format!("-n {b} link set e0 up"))?;
            ip(&format!("-n {b} route add default via 10.0.2.1"))?;
            ip(&format!("-n {b} -6 route add default via fd00:2::1"))?;
            self.exec(&format!("b{i}"), "ethtool -K e0 tx off")?;
        }
        ip(&format!("-n {lb} addr add 10.0.2.1/24 dev l1"))?;
        ip(&format!("-n {lb} addr add fd00:2::1/64 dev l1 nodad"))?;
        ip(&format!("-n {lb} link set l1 up"))?;
        // gro on: the peers of interfaces that receive XDP_TX/redirected frames need NAPI.
        self.exec("sw", "ethtool -K s0 gro on")?;
        let client_if = if o.one_arm {
            ip(&format!(
                "link add c0 netns {cli} type veth peer name s99 netns {sw}"
            ))?;
            ip(&format!("-n {sw} link set s99 master br0 up"))?;
            ip(&format!("-n {lb} addr add 10.0.3.1/24 dev l1"))?;
            ip(&format!("-n {cli} addr add {ONE_ARM_CLIENT}/24 dev c0"))?;
            ip(&format!("-n {cli} link set c0 up"))?;
            ip(&format!("-n {cli} route add default via 10.0.3.1"))?;
            // XDP_TX on a veth hands the frame to its peer's ring, but only wakes the peer's
            // NAPI when the peer runs an XDP program of its own (GRO alone is not enough).
            self.attach_xdp_pass("sw", "s0")?;
            "c0"
        } else {
            ip(&format!(
                "link add c0 netns {cli} type veth peer name l0 netns {lb}"
            ))?;
            ip(&format!("-n {cli} addr add {CLIENT}/24 dev c0"))?;
            ip(&format!("-n {cli} addr add {CLIENT_B}/24 dev c0"))?;
            ip(&format!("-n {cli} addr add {CLIENT6}/64 dev c0 nodad"))?;
            ip(&format!("-n {cli} link set c0 up"))?;
            ip(&format!(
                "-n {cli} route add default via 10.0.1.1 src {CLIENT}"
            ))?;
            ip(&format!("-n {cli} -6 route add default via fd00:1::1"))?;
            ip(&format!("-n {lb} addr add 10.0.1.1/24 dev l0"))?;
            ip(&format!("-n {lb} addr add fd00:1::1/64 dev l0 nodad"))?;
            ip(&format!("-n {lb} link set l0 up"))?;
            self.exec("cli", "ethtool -K c0 gro on")?;
            "c0"
        };
        // tx off: the client's checksums are complete before XDP forwards its frames.
        if !o.client_tx_offload {
            self.exec("cli", &format!("ethtool -K {client_if} tx off"))?;
        }
        self.exec(
            "lb",
            "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
        )?;
        std::fs::create_dir_all(&self.bpffs)?;
        run(Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&self.bpffs))?;
        Ok(())
    }

    /// Attaches the object's `lb_xdp_pass` (XDP_PASS) to `ifname` on host `name`, natively.
    pub fn attach_xdp_pass(&mut self, name: &str, ifname: &str) -> Result<()> {
        let ns = format!("/var/run/netns/{}", self.ns(name));
        let ifname = ifname.to_string();
        let ebpf = std::thread::spawn(move || -> Result<aya::Ebpf> {
            let f = std::fs::File::open(&ns).with_context(|| format!("opening {ns}"))?;
            // SAFETY: moves only this short-lived thread into the namespace.
            if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0
            {
                return Err(std::io::Error::last_os_error()).context("setns");
            }
            let mut ebpf = lb_userspace::dataplane::load(lb_userspace::dataplane::MapSizes {
                flow_table: 1024,
                table_slots: 1024,
            })?;
            let prog =
                lb_userspace::dataplane::program_mut(&mut ebpf, lb_common::maps::PROGRAM_XDP_PASS)?;
            prog.attach(&ifname, aya::programs::XdpMode::Driver)
                .with_context(|| format!("attaching XDP_PASS to {ifname}"))?;
            Ok(ebpf)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("attach thread panicked"))??;
        self.xdp_pass.push(ebpf);
        Ok(())
    }

    /// The namespace of host `name` (cli, lb, sw, b1, ...).
    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// A scratch directory that lives as long as the topology.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A bpffs mount (outside /sys, so that every `ip netns exec` sees the same pins).
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// Runs a shell command on host `name`; its stdout.
    pub fn exec(&self, name: &str, cmd: &str) -> Result<String> {
        run(Command::new("ip").args(["netns", "exec", &self.ns(name), "sh", "-c", cmd]))
    }

    /// Starts a long-running command on host `name`, output to `DIR/LOG.log`; a handle to stop it.
    pub fn spawn(&mut self, name: &str, log: &str, program: &Path, args: &[&str]) -> Result<usize> {
        let out = std::fs::File::create(self.dir.join(format!("{log}.log")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(name)])
            .arg(program)
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {} on {name}", program.display()))?;
        self.children.push((log.to_string(), child));
        Ok(self.children.len() - 1)
    }

    /// Starts `backend.py` on backend `i`: HTTP on 8080 and UDP echo on 5300, IPv4 and IPv6,
    /// answering with its name and the client address it saw; log `backend-bI`.
    pub fn backend(&mut self, i: usize) -> Result<usize> {
        let script = self.dir.join("backend.py");
        if !script.exists() {
            std::fs::write(&script, include_str!("backend.py"))?;
        }
        let dir = self.dir.join(format!("b{i}"));
        std::fs::create_dir_all(&dir)?;
        let (name, d, a4, a6) = (
            format!("b{i}"),
            dir.to_string_lossy().into_owned(),
            backend_addr(i),
            backend_addr6(i),
        );
        let script = script.to_string_lossy().into_owned();
        let handle = self.spawn(
            &name,
            &format!("backend-{name}"),
            Path::new("python3"),
            &["-u", &script, &name, &d, &a4, &a6],
        )?;
        let log = format!("backend-{name}");
        let start = std::time::Instant::now();
        while !self.log(&log).contains("listening") {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("backend {name} did not start: {}", self.log(&log));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(handle)
    }

    /// Takes backend `i`'s link down (the host goes silent: checks time out) or back up, with
    /// its routes and IPv6 address (a link going down takes them with it).
    pub fn set_backend_link(&self, i: usize, up: bool) -> Result<()> {
        let host = format!("b{i}");
        if up {
            self.exec(
                &host,
                &format!(
                    "ip link set e0 up && ip route replace default via 10.0.2.1 && ip addr replace {}/64 dev e0 nodad && ip -6 route replace default via fd00:2::1",
                    backend_addr6(i)
                ),
            )?;
        } else {
            self.exec(&host, "ip link set e0 down")?;
        }
        Ok(())
    }

    /// Makes backend `i`'s `/health` answer 500 (`sick`) or 200.
    pub fn set_sick(&self, i: usize, sick: bool) -> Result<()> {
        let flag = self.dir.join(format!("b{i}/sick"));
        if sick {
            std::fs::write(flag, b"")?;
        } else if flag.exists() {
            std::fs::remove_file(flag)?;
        }
        Ok(())
    }

    /// Sends `signal` to a started process and waits for it; its exit status.
    pub fn stop(&mut self, handle: usize, signal: i32) -> Result<std::process::ExitStatus> {
        let child = &mut self.children[handle].1;
        // `ip netns exec` execs the program: the child's pid is the program's.
        // SAFETY: signalling a child we started.
        unsafe { libc::kill(child.id() as i32, signal) };
        Ok(child.wait()?)
    }

    /// Waits up to `limit` for a started process to end by itself.
    pub fn stop_wait(
        &mut self,
        handle: usize,
        limit: Duration,
    ) -> Result<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        let child = &mut self.children[handle].1;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() > limit {
                bail!(
                    "process {} still running after {limit:?}",
                    self.children[handle].0
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pid of a started process.
    pub fn pid(&self, handle: usize) -> u32 {
        self.children[handle].1.id()
    }

    /// The log of a started process.
    pub fn log(&self, log: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{log}.log"))).unwrap_or_default()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in &self.hosts {
            // Anything still running in the namespace (a server's own children).
            if let Ok(pids) = ip(&format!("netns pids {ns}")) {
                for pid in pids
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    // SAFETY: killing processes of a namespace this topology made.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            let _ = ip(&format!("netns del {ns}"));
        }
        let _ = Command::new("umount").arg(&self.bpffs).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
