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
//! With a router (`Options::router_mtu`), the client reaches the balancer through a router `rt`
//! whose client-facing interface is narrower than the rest of the path (a PPPoE or VPN link):
//!
//! ```text
//!  client ── c0 ═ r0 ── router ── r1 ═ l0 ── balancer ── l1 ═ s0 ── ... (as above)
//!  10.0.1.2  1500  1400  10.0.1.1   10.0.5.2   10.0.5.1
//!  fd00:1::2       (MTU) fd00:1::1  fd00:5::2  fd00:5::1
//! ```
//!
//! The veth pair c0 ═ r0 has asymmetric MTUs: the client still advertises an MSS of 1460, and
//! the router answers bigger packets toward the client with "fragmentation needed" / "packet
//! too big". The balancer routes the client networks via the router; the router routes the
//! VIPs and the backend networks via the balancer.
//!
//! With `Options::client_vlan`, the client's side is 802.1Q-tagged: the client's addresses are
//! on `c0.ID` over `c0`, the balancer's on `l0.ID` over `l0`, and XDP (attached to `l0`) sees
//! the tagged frames. Kernels are often built without 802.1Q devices (`CONFIG_VLAN_8021Q`),
//! so `c0.ID` and `l0.ID` are macvlans over their parents, and the parents tag and untag at tc
//! (a tiny BPF classifier each way): everything leaving `c0`/`l0` is pushed tag ID in the
//! frame itself (tx VLAN offload off, as on a wire), and on ingress — after XDP — frames
//! tagged ID are untagged and everything else dropped, as a VLAN subinterface would. So the
//! routes to the client go through `l0.ID`, not `l0` (XDP cannot redirect there), and a frame
//! reaching the client untagged is lost.
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
/// The router's and the balancer's addresses on their link (`Options::router_mtu`).
pub const ROUTER: &str = "10.0.5.2";
pub const ROUTER6: &str = "fd00:5::2";
pub const BALANCER_TO_ROUTER: &str = "10.0.5.1";
pub const BALANCER_TO_ROUTER6: &str = "fd00:5::1";

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
    /// A router `rt` between the client and the balancer, whose interface facing the client
    /// has this MTU (the client's own stays 1500). Routed topology only.
    pub router_mtu: Option<u32>,
    /// The MTU of the balancer's client-side interface `l0` (the client's `c0` stays 1500).
    pub balancer_client_mtu: Option<u32>,
    /// The balancer's target-side interface (l1) MTU, when narrower than 1500.
    pub balancer_target_mtu: Option<u32>,
    /// The client side is 802.1Q-tagged with this VLAN id (`c0.ID` ═ `l0.ID`, XDP on `l0`).
    /// Routed topology without a router only.
    pub client_vlan: Option<u16>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            backends: 3,
            one_arm: false,
            client_tx_offload: false,
            router_mtu: None,
            balancer_client_mtu: None,
            balancer_target_mtu: None,
            client_vlan: None,
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

/// `ip ARGS` (split on whitespace); its stdout.
pub fn ip(args: &str) -> Result<String> {
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
        let mut t = Self::bare()?;
        t.build(options)?;
        Ok(t)
    }

    /// No host yet: the scratch directory and the bpffs mount, for topologies of other shapes
    /// (`crate::cluster`) made with [`Topology::add_host`] and `ip`, with this one's processes,
    /// logs and clean-up.
    pub fn bare() -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "lbt{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir)?;
        let t = Self {
            xdp_pass: Vec::new(),
            bpffs: dir.join("bpf"),
            prefix,
            hosts: Vec::new(),
            dir,
            children: Vec::new(),
        };
        std::fs::create_dir_all(&t.bpffs)?;
        run(Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&t.bpffs))?;
        Ok(t)
    }

    /// A new host (namespace) `name`, its loopback up.
    pub fn add_host(&mut self, name: &str) -> Result<String> {
        let ns = self.ns(name);
        ip(&format!("netns add {ns}"))?;
        self.hosts.push(ns.clone());
        ip(&format!("-n {ns} link set lo up"))?;
        Ok(ns)
    }

    fn build(&mut self, o: Options) -> Result<()> {
        let backends = o.backends;
        if o.one_arm && (o.router_mtu.is_some() || o.client_vlan.is_some()) {
            bail!("a router or a client VLAN needs the routed topology");
        }
        if o.router_mtu.is_some() && o.client_vlan.is_some() {
            bail!("a router and a client VLAN together are not supported");
        }
        let mut names = vec!["cli".to_string(), "lb".into(), "sw".into()];
        if o.router_mtu.is_some() {
            names.push("rt".into());
        }
        names.extend((1..=backends).map(|i| format!("b{i}")));
        for n in &names {
            self.add_host(n)?;
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
            "c0".to_string()
        } else if let Some(mtu) = o.router_mtu {
            let rt = self.ns("rt");
            // Client ═ router: the router's side is the narrow one.
            ip(&format!(
                "link add c0 netns {cli} type veth peer name r0 netns {rt}"
            ))?;
            self.client_addresses("c0")?;
            ip(&format!("-n {rt} link set r0 mtu {mtu}"))?;
            ip(&format!("-n {rt} addr add 10.0.1.1/24 dev r0"))?;
            ip(&format!("-n {rt} addr add fd00:1::1/64 dev r0 nodad"))?;
            ip(&format!("-n {rt} link set r0 up"))?;
            // Router ═ balancer, 1500 unless `balancer_client_mtu` narrows l0.
            ip(&format!(
                "link add r1 netns {rt} type veth peer name l0 netns {lb}"
            ))?;
            ip(&format!("-n {rt} addr add {ROUTER}/24 dev r1"))?;
            ip(&format!("-n {rt} addr add {ROUTER6}/64 dev r1 nodad"))?;
            ip(&format!("-n {rt} link set r1 up"))?;
            ip(&format!("-n {lb} addr add {BALANCER_TO_ROUTER}/24 dev l0"))?;
            ip(&format!(
                "-n {lb} addr add {BALANCER_TO_ROUTER6}/64 dev l0 nodad"
            ))?;
            self.set_balancer_client_mtu(o)?;
            ip(&format!("-n {lb} link set l0 up"))?;
            ip(&format!("-n {lb} route add 10.0.1.0/24 via {ROUTER}"))?;
            ip(&format!("-n {lb} -6 route add fd00:1::/64 via {ROUTER6}"))?;
            for net in [format!("{VIP}/32"), "10.0.2.0/24".into()] {
                ip(&format!("-n {rt} route add {net} via {BALANCER_TO_ROUTER}"))?;
            }
            for net in [format!("{VIP6}/128"), "fd00:2::/64".into()] {
                ip(&format!(
                    "-n {rt} -6 route add {net} via {BALANCER_TO_ROUTER6}"
                ))?;
            }
            self.exec(
                "rt",
                "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
            )?;
            // r1 receives what XDP redirects out of l0.
            self.exec("rt", "ethtool -K r1 gro on")?;
            "c0".to_string()
        } else if let Some(id) = o.client_vlan {
            ip(&format!(
                "link add c0 netns {cli} type veth peer name l0 netns {lb}"
            ))?;
            let (cvlan, lvlan) = (format!("c0.{id}"), format!("l0.{id}"));
            ip(&format!("-n {cli} link set c0 up"))?;
            self.set_balancer_client_mtu(o)?;
            ip(&format!("-n {lb} link set l0 up"))?;
            self.tag_vlan("cli", "c0", id)?;
            self.tag_vlan("lb", "l0", id)?;
            ip(&format!(
                "-n {cli} link add link c0 name {cvlan} type macvlan mode bridge"
            ))?;
            self.client_addresses(&cvlan)?;
            ip(&format!(
                "-n {lb} link add link l0 name {lvlan} type macvlan mode bridge"
            ))?;
            ip(&format!("-n {lb} addr add 10.0.1.1/24 dev {lvlan}"))?;
            ip(&format!("-n {lb} addr add fd00:1::1/64 dev {lvlan} nodad"))?;
            ip(&format!("-n {lb} link set {lvlan} up"))?;
            self.exec("cli", "ethtool -K c0 gro on")?;
            // The frames are checksummed on c0 (the macvlan hands them down).
            if !o.client_tx_offload {
                self.exec("cli", "ethtool -K c0 tx off")?;
            }
            cvlan
        } else {
            ip(&format!(
                "link add c0 netns {cli} type veth peer name l0 netns {lb}"
            ))?;
            self.client_addresses("c0")?;
            ip(&format!("-n {lb} addr add 10.0.1.1/24 dev l0"))?;
            ip(&format!("-n {lb} addr add fd00:1::1/64 dev l0 nodad"))?;
            self.set_balancer_client_mtu(o)?;
            ip(&format!("-n {lb} link set l0 up"))?;
            self.exec("cli", "ethtool -K c0 gro on")?;
            "c0".to_string()
        };
        // tx off: the client's checksums are complete before XDP forwards its frames.
        if !o.client_tx_offload {
            self.exec("cli", &format!("ethtool -K {client_if} tx off"))?;
        }
        self.exec(
            "lb",
            "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
        )?;
        Ok(())
    }

    /// The client's addresses and default routes on `dev` (routed topologies), via 10.0.1.1 and
    /// fd00:1::1 (the balancer, or the router).
    fn client_addresses(&self, dev: &str) -> Result<()> {
        let cli = self.ns("cli");
        ip(&format!("-n {cli} addr add {CLIENT}/24 dev {dev}"))?;
        ip(&format!("-n {cli} addr add {CLIENT_B}/24 dev {dev}"))?;
        ip(&format!("-n {cli} addr add {CLIENT6}/64 dev {dev} nodad"))?;
        ip(&format!("-n {cli} link set {dev} up"))?;
        ip(&format!(
            "-n {cli} route add default via 10.0.1.1 src {CLIENT}"
        ))?;
        ip(&format!("-n {cli} -6 route add default via fd00:1::1"))?;
        Ok(())
    }

    fn set_balancer_client_mtu(&self, o: Options) -> Result<()> {
        if let Some(mtu) = o.balancer_client_mtu {
            ip(&format!("-n {} link set l0 mtu {mtu}", self.ns("lb")))?;
        }
        if let Some(mtu) = o.balancer_target_mtu {
            ip(&format!("-n {} link set l1 mtu {mtu}", self.ns("lb")))?;
        }
        Ok(())
    }

    /// 802.1Q tag `id` on `dev` of host `name`, at tc: every frame leaving is tagged (in the
    /// frame: tx VLAN offload off), every frame arriving (after XDP) is untagged if tagged `id`
    /// and dropped otherwise.
    fn tag_vlan(&self, name: &str, dev: &str, id: u16) -> Result<()> {
        self.exec(name, &format!("ethtool -K {dev} txvlan off"))?;
        let push = self.bpffs.join(format!("vlan-push-{name}-{dev}"));
        let pop = self.bpffs.join(format!("vlan-pop-{name}-{dev}"));
        tc_bpf::load_pinned(&tc_bpf::vlan_push(id), &push)?;
        tc_bpf::load_pinned(&tc_bpf::vlan_pop_or_drop(id), &pop)?;
        self.exec(
            name,
            &format!(
                "tc qdisc add dev {dev} clsact && tc filter add dev {dev} egress bpf da object-pinned {} && tc filter add dev {dev} ingress bpf da object-pinned {}",
                push.display(),
                pop.display()
            ),
        )?;
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

    /// Writes `code` to `DIR/SCRIPT.py` and runs it with python3 on host `name`; its stdout.
    pub fn python(&self, name: &str, script: &str, code: &str) -> Result<String> {
        let path = self.dir.join(format!("{script}.py"));
        std::fs::write(&path, code)?;
        self.exec(name, &format!("python3 {}", path.display()))
    }

    /// A kernel SNMP counter of host `name` (`nstat` names: `IcmpOutDestUnreachs`,
    /// `Icmp6OutPktTooBigs`, …); 0 when the kernel has not counted any.
    pub fn snmp(&self, name: &str, counter: &str) -> Result<u64> {
        // -a absolute, -s leave nstat's history file alone, -z zeros too.
        let out = self.exec(name, &format!("nstat -asz {counter}"))?;
        Ok(out
            .lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next()? == counter).then(|| w.next()?.parse().ok())?
            })
            .unwrap_or(0))
    }

    /// Frames `dev` of host `name` received for another host and dropped (`otherhost` of
    /// `ip -s -s link`, which shows it only when it is not 0: among them, 802.1Q-tagged frames
    /// on a host without that VLAN).
    pub fn otherhost_drops(&self, name: &str, dev: &str) -> Result<u64> {
        let out = self.exec(name, &format!("ip -s -s link show {dev}"))?;
        let mut lines = out.lines();
        if lines.any(|l| l.contains("otherhost")) {
            if let Some(n) = lines.next().and_then(|l| l.split_whitespace().last()) {
                return Ok(n.parse()?);
            }
        }
        Ok(0)
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

    /// Makes the balancer's target-side interface `l1` again, after it was deleted (`ip link
    /// del l1` on `lb`: its peer `s0` on the switch goes with it), with the same name, addresses
    /// and switch port: a new ifindex, no XDP program (routed topology; `balancer_target_mtu`
    /// is not applied again).
    pub fn remake_balancer_target_link(&self) -> Result<()> {
        self.add_balancer_target_link()?;
        self.configure_balancer_target_link()
    }

    /// The first half of `remake_balancer_target_link`: `l1` and its switch port, `l1` down
    /// and without addresses.
    pub fn add_balancer_target_link(&self) -> Result<()> {
        let (lb, sw) = (self.ns("lb"), self.ns("sw"));
        ip(&format!(
            "link add l1 netns {lb} type veth peer name s0 netns {sw}"
        ))?;
        ip(&format!("-n {sw} link set s0 master br0 up"))?;
        self.exec("sw", "ethtool -K s0 gro on")?;
        Ok(())
    }

    /// The second half: `l1`'s addresses, and up.
    pub fn configure_balancer_target_link(&self) -> Result<()> {
        let lb = self.ns("lb");
        ip(&format!("-n {lb} addr add 10.0.2.1/24 dev l1"))?;
        ip(&format!("-n {lb} addr add fd00:2::1/64 dev l1 nodad"))?;
        ip(&format!("-n {lb} link set l1 up"))?;
        Ok(())
    }

    /// The ifindex of interface `dev` on host `name`.
    pub fn ifindex(&self, name: &str, dev: &str) -> Result<u32> {
        let out = self.exec(name, &format!("cat /sys/class/net/{dev}/ifindex"))?;
        out.trim()
            .parse()
            .with_context(|| format!("ifindex of {dev}: {out:?}"))
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

/// Two tc classifiers (direct action) written as raw BPF instructions, for 802.1Q tagging
/// without the kernel's 8021q module (`Topology::tag_vlan`).
mod tc_bpf {
    use std::{ffi::CString, os::unix::ffi::OsStrExt, path::Path};

    use anyhow::{bail, Result};

    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
    const FUNC_SKB_VLAN_PUSH: i32 = 18;
    const FUNC_SKB_VLAN_POP: i32 = 19;
    const TC_ACT_OK: i32 = 0;
    const TC_ACT_SHOT: i32 = 2;
    /// `struct __sk_buff` offsets.
    const SKB_VLAN_PRESENT: i16 = 20;
    const SKB_VLAN_TCI: i16 = 24;

    type Insn = [u8; 8];

    fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        let (o, i) = (off.to_le_bytes(), imm.to_le_bytes());
        [code, src << 4 | dst, o[0], o[1], i[0], i[1], i[2], i[3]]
    }
    fn mov_imm(dst: u8, imm: i32) -> Insn {
        insn(0xb7, dst, 0, 0, imm)
    }
    fn mov_reg(dst: u8, src: u8) -> Insn {
        insn(0xbf, dst, src, 0, 0)
    }
    fn load_u32(dst: u8, src: u8, off: i16) -> Insn {
        insn(0x61, dst, src, off, 0)
    }
    fn call(func: i32) -> Insn {
        insn(0x85, 0, 0, 0, func)
    }
    fn exit() -> Insn {
        insn(0x95, 0, 0, 0, 0)
    }

    /// `bpf_skb_vlan_push(skb, htons(ETH_P_8021Q), id); return TC_ACT_OK;`
    pub fn vlan_push(id: u16) -> Vec<Insn> {
        vec![
            mov_imm(2, i32::from(0x8100u16.to_be())),
            mov_imm(3, i32::from(id)),
            call(FUNC_SKB_VLAN_PUSH),
            mov_imm(0, TC_ACT_OK),
            exit(),
        ]
    }

    /// `if (!skb->vlan_present || (skb->vlan_tci & 0xfff) != id) return TC_ACT_SHOT;
    /// bpf_skb_vlan_pop(skb); return TC_ACT_OK;`
    pub fn vlan_pop_or_drop(id: u16) -> Vec<Insn> {
        vec![
            mov_reg(6, 1),
            load_u32(2, 6, SKB_VLAN_PRESENT),
            insn(0x15, 2, 0, 7, 0), // if r2 == 0 goto drop
            load_u32(2, 6, SKB_VLAN_TCI),
            insn(0x57, 2, 0, 0, 0xfff),         // r2 &= 0xfff
            insn(0x55, 2, 0, 4, i32::from(id)), // if r2 != id goto drop
            mov_reg(1, 6),
            call(FUNC_SKB_VLAN_POP),
            mov_imm(0, TC_ACT_OK),
            exit(),
            mov_imm(0, TC_ACT_SHOT), // drop:
            exit(),
        ]
    }

    #[repr(C)]
    #[derive(Default)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
    }

    #[repr(C)]
    #[derive(Default)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }

    /// Loads `insns` as a tc classifier and pins it at `path` (on a bpffs).
    pub fn load_pinned(insns: &[Insn], path: &Path) -> Result<()> {
        let license = c"GPL";
        let mut log = vec![0u8; 65536];
        let attr = ProgLoad {
            prog_type: BPF_PROG_TYPE_SCHED_CLS,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            ..ProgLoad::default()
        };
        // SAFETY: `attr` is a valid BPF_PROG_LOAD attribute of the size passed; the pointers
        // it holds (instructions, license, log) outlive the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_LOAD,
                &attr as *const ProgLoad,
                std::mem::size_of::<ProgLoad>(),
            )
        };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            bail!(
                "loading a tc program: {err}\n{}",
                String::from_utf8_lossy(&log[..end])
            );
        }
        // SAFETY: the kernel just gave us this descriptor; nobody else owns it.
        let fd =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        let c_path = CString::new(path.as_os_str().as_bytes())?;
        let pin = ObjPin {
            pathname: c_path.as_ptr() as u64,
            bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
            file_flags: 0,
        };
        // SAFETY: as above, for BPF_OBJ_PIN; `c_path` and `fd` outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_PIN,
                &pin as *const ObjPin,
                std::mem::size_of::<ObjPin>(),
            )
        };
        if rc < 0 {
            bail!(
                "pinning a tc program at {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }
}
