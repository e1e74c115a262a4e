//! Network-namespace topologies with real hosts, for tests that run the agent and real clients.
//!
//! ```text
//!  client ── c0 ═ l0 ── balancer ── l1 ═ s0 ──┐ switch (bridge br0)
//!  10.0.1.2       10.0.1.1     10.0.2.1        ├─ s1 ═ e0  backend 1  10.0.2.11
//!                                              ├─ s2 ═ e0  backend 2  10.0.2.12
//!                                              └─ ...
//! ```
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
pub const VIP: &str = "10.0.100.10";

/// Backend `i` (1-based).
pub fn backend_addr(i: usize) -> String {
    format!("10.0.2.{}", 10 + i)
}

pub struct Topology {
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
    /// Client, balancer, switch and `backends` backends, wired as in the module doc.
    pub fn routed(backends: usize) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "lbt{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir)?;
        let mut t = Self {
            bpffs: dir.join("bpf"),
            prefix,
            hosts: Vec::new(),
            dir,
            children: Vec::new(),
        };
        t.build(backends)?;
        Ok(t)
    }

    fn build(&mut self, backends: usize) -> Result<()> {
        let mut names = vec!["cli".to_string(), "lb".into(), "sw".into()];
        names.extend((1..=backends).map(|i| format!("b{i}")));
        for n in &names {
            let ns = self.ns(n);
            ip(&format!("netns add {ns}"))?;
            self.hosts.push(ns.clone());
            ip(&format!("-n {ns} link set lo up"))?;
        }
        let (cli, lb, sw) = (self.ns("cli"), self.ns("lb"), self.ns("sw"));
        ip(&format!(
            "link add c0 netns {cli} type veth peer name l0 netns {lb}"
        ))?;
        ip(&format!(
            "link add l1 netns {lb} type veth peer name s0 netns {sw}"
        ))?;
        ip(&format!("-n {sw} link add br0 type bridge"))?;
        ip(&format!("-n {sw} link set br0 up"))?;
        ip(&format!("-n {sw} link set s0 master br0 up"))?;
        for i in 1..=backends {
            let b = self.ns(&format!("b{i}"));
            ip(&format!(
                "link add e0 netns {b} type veth peer name s{i} netns {sw}"
            ))?;
            ip(&format!("-n {sw} link set s{i} master br0 up"))?;
            ip(&format!("-n {b} addr add {}/24 dev e0", backend_addr(i)))?;
            ip(&format!("-n {b} link set e0 up"))?;
            ip(&format!("-n {b} route add default via 10.0.2.1"))?;
            self.exec(&format!("b{i}"), "ethtool -K e0 tx off")?;
        }
        ip(&format!("-n {cli} addr add {CLIENT}/24 dev c0"))?;
        ip(&format!("-n {cli} link set c0 up"))?;
        ip(&format!("-n {cli} route add default via 10.0.1.1"))?;
        // tx off: the client's checksums are complete before XDP forwards its frames; gro on:
        // the peers of interfaces that receive XDP_TX/redirected frames need NAPI.
        self.exec("cli", "ethtool -K c0 tx off gro on")?;
        self.exec("sw", "ethtool -K s0 gro on")?;
        ip(&format!("-n {lb} addr add 10.0.1.1/24 dev l0"))?;
        ip(&format!("-n {lb} link set l0 up"))?;
        ip(&format!("-n {lb} addr add 10.0.2.1/24 dev l1"))?;
        ip(&format!("-n {lb} link set l1 up"))?;
        self.exec("lb", "sysctl -qw net.ipv4.ip_forward=1")?;
        std::fs::create_dir_all(&self.bpffs)?;
        run(Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&self.bpffs))?;
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

    /// Starts an HTTP server on backend `i` (port 8080) whose index page is its own name.
    pub fn http_backend(&mut self, i: usize) -> Result<usize> {
        let root = self.dir.join(format!("www{i}"));
        std::fs::create_dir_all(&root)?;
        std::fs::write(root.join("index.html"), format!("b{i}\n"))?;
        let addr = backend_addr(i);
        let root = root.to_string_lossy().into_owned();
        self.spawn(
            &format!("b{i}"),
            &format!("http-b{i}"),
            Path::new("python3"),
            &[
                "-m",
                "http.server",
                "8080",
                "--bind",
                &addr,
                "--directory",
                &root,
            ],
        )
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
