//! The TOML config (`../shared/spec/config.md`): types with NLB's defaults, loading that reports
//! every problem as `FILE:LINE: field.path: message`, and semantic validation.
//!
//! Loading never stops at the first problem: a value serde rejects is taken out of the document
//! (the innermost key or table that holds it) and deserialization runs again, so one file can
//! report an unknown key in one listener and a bad port in another. What survives then goes
//! through `validate()`.

mod document;
mod values;

use std::{
    collections::{BTreeSet, HashSet},
    fmt,
    net::IpAddr,
    path::Path,
};

use serde::{Deserialize, Serialize};

pub use values::{Cidr, Duration, HealthCheckPort, Matcher, Port};

use lb_common::maglev::is_prime;
use lb_common::maps::{MAX_GROUPS, MAX_LISTENERS, MAX_TARGETS};

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentConfig,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default, rename = "target_group")]
    pub target_groups: Vec<TargetGroupConfig>,
    #[serde(default)]
    pub announce: AnnounceConfig,
}

/// Scale-out: the VIPs announced over BGP by BIRD (`crate::announce`), while this node can
/// serve them.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AnnounceConfig {
    /// BIRD's control socket; "": nothing is announced.
    pub bird_socket: String,
    /// The file the agent writes one static protocol per route into; BIRD's config includes it.
    pub bird_config: String,
    /// Routes announced to the targets while this node runs and does not drain, so that
    /// their replies come back through live nodes (usually the client networks, or a default
    /// route; exported to the targets' BGP sessions, not to the routers).
    pub return_routes: Vec<Cidr>,
    /// A VIP whose groups only fail open (no healthy target, all checked) is still announced,
    /// as NLB fails open; false: withdrawn, so that a node that lost its targets while the
    /// other nodes see them stops attracting flows.
    pub fail_open: bool,
    /// How long `lb-agent drain` waits, by default, for the client traffic to stop.
    pub drain_timeout: Duration,
    /// At shutdown (without --keep-datapath), after BIRD withdrew the VIPs: the longest the
    /// agent goes on forwarding while client packets still arrive, before it detaches XDP.
    pub withdraw_grace: Duration,
}

impl Default for AnnounceConfig {
    fn default() -> Self {
        Self {
            bird_socket: String::new(),
            bird_config: DEFAULT_BIRD_CONFIG.into(),
            return_routes: Vec::new(),
            fail_open: true,
            drain_timeout: Duration::from_secs(60),
            withdraw_grace: Duration::from_secs(2),
        }
    }
}

/// In a directory of its own that BIRD (its own user) can read: the agent's runtime directory
/// is 0700 (the package's unit makes both).
pub const DEFAULT_BIRD_CONFIG: &str = "/run/lb-agent-bird/vips.conf";

impl AnnounceConfig {
    pub fn enabled(&self) -> bool {
        !self.bird_socket.is_empty()
    }

    fn validate(&self, problem: &mut impl FnMut(String, String)) {
        for (key, path) in [
            ("bird_socket", &self.bird_socket),
            ("bird_config", &self.bird_config),
        ] {
            let allowed_empty = key == "bird_socket";
            if (path.is_empty() && !allowed_empty) || (!path.is_empty() && !path.starts_with('/')) {
                problem(
                    format!("announce.{key}"),
                    format!("{path:?} is not an absolute path"),
                );
            }
        }
        if self.enabled() && !self.bird_config.ends_with(".conf") {
            problem(
                "announce.bird_config".into(),
                format!(
                    "{:?}: name it *.conf, so that BIRD's `include \"DIR/*.conf\"` finds it",
                    self.bird_config
                ),
            );
        }
        let mut seen = HashSet::new();
        for (i, c) in self.return_routes.iter().enumerate() {
            if !seen.insert(c) {
                problem(
                    format!("announce.return_routes[{i}]"),
                    format!("{}/{} is listed twice", c.addr, c.len),
                );
            }
        }
        let s = std::time::Duration::from_secs;
        if self.drain_timeout.0 < s(1) || self.drain_timeout.0 > s(86_400) {
            problem(
                "announce.drain_timeout".into(),
                format!("{} is outside 1s..86400s", self.drain_timeout),
            );
        }
        if self.withdraw_grace.0 > s(60) {
            problem(
                "announce.withdraw_grace".into(),
                format!("{} is above 60s", self.withdraw_grace),
            );
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum XdpMode {
    #[default]
    Native,
    Generic,
    /// Native, or generic when the driver has no native XDP.
    Auto,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpMode,
    pub api: String,
    pub metrics: String,
    pub pin_path: String,
    pub flow_table_size: u32,
    pub hash_seed: String,
    /// The interfaces replies from targets arrive on (a subset of `interfaces`): reverse NAT
    /// applies only to packets received there. None: derived (one interface: that one;
    /// several: those the kernel routes targets out of).
    pub target_interfaces: Option<Vec<String>>,
    /// New flow-table entries per CPU per second; past it, new flows are forwarded by the
    /// consistent hash without an entry. 0: no limit.
    pub flow_insert_limit: u32,
    /// Let the data path reuse FIB answers (the next-hop cache) while routes, neighbours and
    /// links do not change and no policy routing makes answers depend on more than the
    /// destination (`crate::route_epoch`). false: a FIB lookup for every packet.
    pub route_cache: bool,
    /// Where the access log goes: one JSON line per finished flow of the listeners that have
    /// `access_log` on (reopened on SIGHUP, for logrotate). "": off.
    pub access_log: String,
    /// This node's zone; "": none (zones play no part in balancing).
    pub zone: String,
    /// The default of `target_group.cross_zone`: false = new flows prefer targets in this
    /// node's zone (NLB's default).
    pub cross_zone: bool,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            xdp_mode: XdpMode::Native,
            api: DEFAULT_API.into(),
            metrics: "127.0.0.1:9900".into(),
            pin_path: "/sys/fs/bpf/lb".into(),
            flow_table_size: lb_common::maps::DEFAULT_FLOW_TABLE_SIZE,
            hash_seed: String::new(),
            target_interfaces: None,
            flow_insert_limit: lb_common::maps::DEFAULT_FLOW_INSERT_LIMIT,
            route_cache: true,
            access_log: String::new(),
            zone: String::new(),
            cross_zone: false,
        }
    }
}

pub const DEFAULT_API: &str = "unix:/run/lb-agent/api.sock";

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Tcp,
    Udp,
    TcpUdp,
}

impl Protocol {
    /// The IP protocol numbers this listener serves.
    pub fn ip_protocols(self) -> &'static [u8] {
        use lb_common::{PROTO_TCP, PROTO_UDP};
        match self {
            Self::Tcp => &[PROTO_TCP],
            Self::Udp => &[PROTO_UDP],
            Self::TcpUdp => &[PROTO_TCP, PROTO_UDP],
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub address: IpAddr,
    pub port: Port,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    pub target_group: String,
    #[serde(default = "default_allowed_sources")]
    pub allowed_sources: Vec<Cidr>,
    /// tcp: 350s, udp (and tcp_udp's UDP flows): 120s.
    #[serde(default)]
    pub idle_timeout: Option<Duration>,
    /// Log this listener's flows when `agent.access_log` is set (the default); false: not
    /// logged, and its packets pay nothing for it.
    #[serde(default = "default_true")]
    pub access_log: bool,
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

fn default_allowed_sources() -> Vec<Cidr> {
    vec![
        "0.0.0.0/0".parse().expect("literal"),
        "::/0".parse().expect("literal"),
    ]
}

impl ListenerConfig {
    /// The idle timeout of this listener's flows of IP protocol `proto`.
    pub fn idle_timeout_for(&self, proto: u8) -> std::time::Duration {
        match self.idle_timeout {
            Some(d) => d.0,
            None if proto == lb_common::PROTO_UDP => std::time::Duration::from_secs(120),
            None => std::time::Duration::from_secs(350),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Forwarding {
    #[default]
    Nat,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Stickiness {
    #[default]
    None,
    SourceIp,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TargetGroupConfig {
    pub name: String,
    #[serde(default)]
    pub forwarding: Forwarding,
    #[serde(default)]
    pub stickiness: Stickiness,
    #[serde(default = "default_deregistration_delay")]
    pub deregistration_delay: Duration,
    #[serde(default)]
    pub connection_termination_on_deregistration: bool,
    #[serde(default = "default_true")]
    pub connection_termination_on_unhealthy: bool,
    #[serde(default)]
    pub unhealthy_draining_interval: Duration,
    #[serde(default)]
    pub slow_start: Duration,
    #[serde(default = "default_hash_table_size")]
    pub hash_table_size: u32,
    /// Overrides `agent.cross_zone` for this group.
    #[serde(default)]
    pub cross_zone: Option<bool>,
    #[serde(default)]
    pub health_check: HealthCheckConfig,
    #[serde(default, rename = "target")]
    pub targets: Vec<TargetConfig>,
}

fn default_deregistration_delay() -> Duration {
    Duration::from_secs(300)
}

fn default_true() -> bool {
    true
}

fn default_hash_table_size() -> u32 {
    lb_common::maps::DEFAULT_HASH_TABLE_SIZE
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckProtocol {
    #[default]
    Tcp,
    Http,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    pub protocol: HealthCheckProtocol,
    pub port: HealthCheckPort,
    pub path: String,
    pub matcher: Matcher,
    pub interval: Duration,
    /// Default 10s for tcp, 6s for http.
    pub timeout: Option<Duration>,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    /// Passive health: a healthy target whose last this-many connections failed in a row
    /// (refused, or SYN unanswered, as the data path saw them) turns unhealthy at once; it
    /// comes back through the active checks. 0: off.
    pub passive_unhealthy_after: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            protocol: HealthCheckProtocol::Tcp,
            port: HealthCheckPort::TrafficPort,
            path: "/".into(),
            matcher: Matcher::default(),
            interval: Duration::from_secs(30),
            timeout: None,
            healthy_threshold: 5,
            unhealthy_threshold: 2,
            passive_unhealthy_after: 0,
        }
    }
}

impl HealthCheckConfig {
    pub fn effective_timeout(&self) -> std::time::Duration {
        match (self.timeout, self.protocol) {
            (Some(t), _) => t.0,
            (None, HealthCheckProtocol::Tcp) => std::time::Duration::from_secs(10),
            (None, HealthCheckProtocol::Http) => std::time::Duration::from_secs(6),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub address: IpAddr,
    pub port: Port,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub zone: Option<String>,
}

pub const DEFAULT_WEIGHT: u32 = 100;

fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

/// One thing wrong with a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line in the file (0 when the file could not be read).
    pub line: usize,
    /// `listener[0].port`, or `toml` for a syntax error.
    pub path: String,
    pub message: String,
}

/// Every problem of a config file, printable as `FILE:LINE: field.path: message` lines.
#[derive(Debug)]
pub struct ConfigErrors {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}: {}: {}", self.file, p.line, p.path, p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads, parses and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(src) => parse(&src, &file),
        Err(e) => Err(ConfigErrors {
            file,
            problems: vec![Problem {
                line: 0,
                path: "file".into(),
                message: format!("cannot read: {e}"),
            }],
        }),
    }
}

/// Parses and validates config text; `file` names it in the problems.
pub fn parse(src: &str, file: &str) -> Result<Config, ConfigErrors> {
    let (config, mut problems, removed) = document::deserialize(src);
    if let Some(config) = &config {
        for (path, message) in config.validate() {
            if removed.iter().any(|r| document::is_within(r, &path)) {
                continue; // a consequence of a value already reported
            }
            let line = document::line_of_path(src, &path);
            problems.push(Problem {
                line,
                path,
                message,
            });
        }
    }
    match config {
        Some(config) if problems.is_empty() => Ok(config),
        _ => {
            problems.sort_by_key(|p| p.line);
            Err(ConfigErrors {
                file: file.into(),
                problems,
            })
        }
    }
}

impl Config {
    /// Every semantic problem as (field path, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut problem = |path: String, message: String| out.push((path, message));
        self.agent.validate(&mut problem);
        self.announce.validate(&mut problem);

        let mut names = HashSet::new();
        let mut endpoints = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let at = |f: &str| format!("listener[{i}].{f}");
            if l.name.is_empty() {
                problem(at("name"), "must not be empty".into());
            } else if !names.insert(l.name.as_str()) {
                problem(at("name"), format!("duplicate listener name {:?}", l.name));
            }
            for &proto in l.protocol.ip_protocols() {
                if !endpoints.insert((l.address, l.port.0, proto)) {
                    let p = if proto == lb_common::PROTO_TCP {
                        "tcp"
                    } else {
                        "udp"
                    };
                    problem(
                        at("port"),
                        format!(
                            "another listener already serves {}:{} {p}",
                            l.address, l.port.0
                        ),
                    );
                }
            }
            if self.group(&l.target_group).is_none() {
                problem(
                    at("target_group"),
                    format!("no target_group is named {:?}", l.target_group),
                );
            }
            if l.allowed_sources.is_empty() {
                problem(
                    at("allowed_sources"),
                    "empty: no client could connect (use [\"0.0.0.0/0\", \"::/0\"] for everyone)"
                        .into(),
                );
            }
            if let Some(t) = l.idle_timeout {
                if t.0 < std::time::Duration::from_secs(1)
                    || t.0 > std::time::Duration::from_secs(6000)
                {
                    problem(at("idle_timeout"), format!("{t} is outside 1s..6000s"));
                }
            }
        }
        if self.listeners.len() > MAX_LISTENERS as usize / 2 {
            problem(
                "listener".into(),
                format!(
                    "{} listeners; at most {}",
                    self.listeners.len(),
                    MAX_LISTENERS / 2
                ),
            );
        }

        // Every target is checked as `targets register` checks one (`check_target`), against
        // the counts of the whole file; a group's or the file's limit is reported once.
        let total: usize = self.target_groups.iter().map(|g| g.targets.len()).sum();
        let reverse = reverse_entries(
            self,
            self.target_groups.iter().flat_map(|g| {
                g.targets
                    .iter()
                    .map(move |t| (g.name.as_str(), t.address, t.port.0))
            }),
        );
        let mut reported = HashSet::new();
        let mut names = HashSet::new();
        for (i, g) in self.target_groups.iter().enumerate() {
            let at = |f: &str| format!("target_group[{i}].{f}");
            if g.name.is_empty() {
                problem(at("name"), "must not be empty".into());
            } else if !names.insert(g.name.as_str()) {
                problem(
                    at("name"),
                    format!("duplicate target_group name {:?}", g.name),
                );
            }
            if !is_prime(g.hash_table_size) {
                problem(
                    at("hash_table_size"),
                    format!(
                        "{} is not a prime (try 65537, 16381 or 251)",
                        g.hash_table_size
                    ),
                );
            } else if g.hash_table_size > 1_000_003 {
                problem(
                    at("hash_table_size"),
                    format!("{} is above 1000003", g.hash_table_size),
                );
            }
            let max = std::time::Duration::from_secs(3600);
            if g.deregistration_delay.0 > max {
                problem(
                    at("deregistration_delay"),
                    format!("{} is above 3600s", g.deregistration_delay),
                );
            }
            if g.slow_start.0 > std::time::Duration::from_secs(900) {
                problem(at("slow_start"), format!("{} is above 900s", g.slow_start));
            }
            if g.unhealthy_draining_interval.0 > std::time::Duration::from_secs(360_000) {
                problem(
                    at("unhealthy_draining_interval"),
                    format!("{} is above 360000s", g.unhealthy_draining_interval),
                );
            }
            g.health_check
                .validate(&format!("target_group[{i}].health_check"), &mut problem);
            let mut seen = HashSet::new();
            for (j, t) in g.targets.iter().enumerate() {
                let at = |f: &str| format!("target_group[{i}].target[{j}].{f}");
                if let Some(why) = t.zone.as_deref().and_then(check_zone) {
                    problem(at("zone"), why);
                }
                if !seen.insert((t.address, t.port.0)) {
                    problem(
                        at("address"),
                        format!(
                            "duplicate target {} in group {:?}",
                            endpoint(t.address, t.port.0),
                            g.name
                        ),
                    );
                }
                let counts = TargetCounts {
                    group: g.targets.len(),
                    total,
                    reverse,
                };
                for p in check_target(self, g, t.address, t.port.0, t.weight, counts) {
                    let path = match p.field {
                        TargetField::HashTableSize => format!("target_group[{i}].hash_table_size"),
                        TargetField::Total => "target_group".into(),
                        f => at(f.name()),
                    };
                    if reported.insert((path.clone(), p.message.clone())) {
                        problem(path, p.message);
                    }
                }
            }
        }
        if self.target_groups.len() > MAX_GROUPS as usize {
            problem(
                "target_group".into(),
                format!("more than {MAX_GROUPS} target groups"),
            );
        }
        out
    }

    pub fn group(&self, name: &str) -> Option<&TargetGroupConfig> {
        self.target_groups.iter().find(|g| g.name == name)
    }

    /// One line for `validate`: what the file sets up.
    pub fn summary(&self) -> String {
        let targets: usize = self.target_groups.iter().map(|g| g.targets.len()).sum();
        format!(
            "{} listener(s), {} target group(s), {} target(s); XDP on {} ({:?})",
            self.listeners.len(),
            self.target_groups.len(),
            targets,
            self.agent.interfaces.join(", "),
            self.agent.xdp_mode
        )
    }
}

/// `addr:port`, with brackets for IPv6.
pub fn endpoint(addr: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(addr, port).to_string()
}

/// Targets (not draining) of every group at most: half of the data plane's target slots
/// (`MAX_TARGETS`), so that a reload replacing every target can drain the old ones.
pub const MAX_LIVE_TARGETS: usize = MAX_TARGETS as usize / 2;
/// `LB_REVERSE`'s `max_entries` (lb-ebpf/src/maps.rs): one entry per target endpoint and
/// protocol, draining targets included.
pub const REVERSE_ENTRIES: usize = MAX_TARGETS as usize;
/// A group's consistent-hash table needs at least this many slots per target.
pub const MIN_SLOTS_PER_TARGET: usize = 10;

/// How many there would be with the target being checked, it included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetCounts {
    /// Targets of its group that are not draining (from the config and the API).
    pub group: usize,
    /// Targets of every group that are not draining.
    pub total: usize,
    /// `LB_REVERSE` entries the desired state would write (`reverse_entries`).
    pub reverse: usize,
}

/// What a target problem is about: one of the target's own fields, or its group's table size,
/// or the limits of all targets together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetField {
    Address,
    Port,
    Weight,
    HashTableSize,
    Total,
}

impl TargetField {
    pub fn name(self) -> &'static str {
        match self {
            Self::Address => "address",
            Self::Port => "port",
            Self::Weight => "weight",
            Self::HashTableSize => "hash_table_size",
            Self::Total => "targets",
        }
    }
}

/// One reason a target cannot be added.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetProblem {
    pub field: TargetField,
    /// The target itself is wrong, whatever else is set up (a port, a weight, an address that
    /// can never be a target); else it conflicts with the rest of the config or a data-plane
    /// limit (a VIP, the family of the group's listeners, table slots, target counts,
    /// `LB_REVERSE` entries).
    pub invalid: bool,
    pub message: String,
}

/// A zone's name: at most 64 printable characters (it is a metric label and a status field);
/// why not, else None.
pub fn check_zone(zone: &str) -> Option<String> {
    if zone.len() > 64 {
        Some(format!("{} characters; at most 64", zone.len()))
    } else if zone.chars().any(char::is_control) {
        Some(format!("{zone:?} has a control character"))
    } else {
        None
    }
}

/// The one check of a target, from the config (`target_group[i].target[j]`) or registered
/// through the API: its address, port and weight, and whether its group (`group`, with
/// `counts` including the target) and the data plane have room for it.
pub fn check_target(
    config: &Config,
    group: &TargetGroupConfig,
    addr: IpAddr,
    port: u16,
    weight: u32,
    counts: TargetCounts,
) -> Vec<TargetProblem> {
    let mut out = Vec::new();
    let mut problem = |field, invalid, message| {
        out.push(TargetProblem {
            field,
            invalid,
            message,
        })
    };
    let kind = if addr.is_unspecified() {
        Some("an unspecified")
    } else if addr.is_loopback() {
        Some("a loopback")
    } else if addr.is_multicast() {
        Some("a multicast")
    } else {
        None
    };
    if let Some(kind) = kind {
        problem(
            TargetField::Address,
            true,
            format!("{addr} is {kind} address; it cannot be a target"),
        );
    }
    if port == 0 {
        problem(
            TargetField::Port,
            true,
            "port 0 is outside 1..=65535".into(),
        );
    }
    if !(1..=65535).contains(&weight) {
        problem(
            TargetField::Weight,
            true,
            format!("{weight} is outside 1..=65535"),
        );
    }
    if let Some(l) = config.listeners.iter().find(|l| l.address == addr) {
        problem(
            TargetField::Address,
            false,
            format!(
                "{addr} is the VIP of listener {:?}; a target must be another host",
                l.name
            ),
        );
    }
    let other_family = config
        .listeners
        .iter()
        .find(|l| l.target_group == group.name && l.address.is_ipv4() != addr.is_ipv4());
    if let Some(l) = other_family {
        problem(
            TargetField::Address,
            false,
            format!(
                "{addr} and VIP {} of listener {:?} are of different address families (NAT cannot translate between them)",
                l.address, l.name
            ),
        );
    }
    if (group.hash_table_size as usize) < counts.group.saturating_mul(MIN_SLOTS_PER_TARGET) {
        problem(
            TargetField::HashTableSize,
            false,
            format!(
                "{} slots for {} targets in group {:?}; use at least {MIN_SLOTS_PER_TARGET} slots per target (100 for even spread)",
                group.hash_table_size, counts.group, group.name
            ),
        );
    }
    if counts.total > MAX_LIVE_TARGETS {
        problem(
            TargetField::Total,
            false,
            format!(
                "{} targets in all; at most {MAX_LIVE_TARGETS} (half of the data plane's {MAX_TARGETS} target slots; the other half is for draining)",
                counts.total
            ),
        );
    }
    if counts.reverse > REVERSE_ENTRIES {
        problem(
            TargetField::Total,
            false,
            format!(
                "{} reply entries (target endpoint × listener protocol, draining targets included); LB_REVERSE holds at most {REVERSE_ENTRIES}",
                counts.reverse
            ),
        );
    }
    out
}

/// The `LB_REVERSE` entries the desired state writes for `targets` (group, address, port): one
/// per distinct target endpoint and protocol of a listener of its group.
pub fn reverse_entries<'a>(
    config: &Config,
    targets: impl IntoIterator<Item = (&'a str, IpAddr, u16)>,
) -> usize {
    let mut entries = BTreeSet::new();
    for (group, addr, port) in targets {
        for l in config.listeners.iter().filter(|l| l.target_group == group) {
            for &proto in l.protocol.ip_protocols() {
                entries.insert((addr, port, proto));
            }
        }
    }
    entries.len()
}

impl AgentConfig {
    fn validate(&self, problem: &mut impl FnMut(String, String)) {
        if let Some(why) = check_zone(&self.zone) {
            problem("agent.zone".into(), why);
        }
        if self.interfaces.is_empty() {
            problem(
                "agent.interfaces".into(),
                "no interfaces: list where XDP attaches, e.g. [\"eth0\"]".into(),
            );
        }
        let mut seen = HashSet::new();
        for (i, name) in self.interfaces.iter().enumerate() {
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                problem(
                    format!("agent.interfaces[{i}]"),
                    format!("{name:?} is not an interface name"),
                );
            } else if !seen.insert(name) {
                problem(
                    format!("agent.interfaces[{i}]"),
                    format!("{name:?} is listed twice"),
                );
            }
        }
        if let Some(targets) = &self.target_interfaces {
            if targets.is_empty() {
                problem(
                    "agent.target_interfaces".into(),
                    "empty: reverse NAT would apply on no interface; list the interfaces replies from targets arrive on, or leave the key out to derive them".into(),
                );
            }
            let mut seen = HashSet::new();
            for (i, name) in targets.iter().enumerate() {
                if !self.interfaces.contains(name) {
                    problem(
                        format!("agent.target_interfaces[{i}]"),
                        format!("{name:?} is not one of agent.interfaces"),
                    );
                } else if !seen.insert(name) {
                    problem(
                        format!("agent.target_interfaces[{i}]"),
                        format!("{name:?} is listed twice"),
                    );
                }
            }
        }
        if !self.api.starts_with("unix:/") {
            problem(
                "agent.api".into(),
                format!("{:?}: expected unix:/absolute/path.sock", self.api),
            );
        }
        if !self.metrics.is_empty() && self.metrics.parse::<std::net::SocketAddr>().is_err() {
            problem(
                "agent.metrics".into(),
                format!(
                    "{:?}: expected ADDRESS:PORT (e.g. 127.0.0.1:9900) or \"\"",
                    self.metrics
                ),
            );
        }
        if !self.pin_path.starts_with('/') {
            problem(
                "agent.pin_path".into(),
                format!("{:?} is not an absolute path", self.pin_path),
            );
        }
        if !(1024..=1 << 27).contains(&self.flow_table_size) {
            problem(
                "agent.flow_table_size".into(),
                format!("{} is outside 1024..=134217728", self.flow_table_size),
            );
        }
    }
}

impl HealthCheckConfig {
    fn validate(&self, at: &str, problem: &mut impl FnMut(String, String)) {
        let s = std::time::Duration::from_secs;
        if self.interval.0 < s(1) || self.interval.0 > s(300) {
            problem(
                format!("{at}.interval"),
                format!("{} is outside 1s..300s", self.interval),
            );
        }
        let timeout = self.effective_timeout();
        if timeout.is_zero() {
            problem(format!("{at}.timeout"), "must be above 0s".into());
        } else if timeout >= self.interval.0 {
            problem(
                format!("{at}.timeout"),
                format!(
                    "{} must be shorter than interval {}",
                    Duration(timeout),
                    self.interval
                ),
            );
        }
        for (key, v) in [
            ("healthy_threshold", self.healthy_threshold),
            ("unhealthy_threshold", self.unhealthy_threshold),
        ] {
            if !(2..=10).contains(&v) {
                problem(format!("{at}.{key}"), format!("{v} is outside 2..=10"));
            }
        }
        if self.passive_unhealthy_after > 1000 {
            problem(
                format!("{at}.passive_unhealthy_after"),
                format!(
                    "{} is outside 0..=1000 (0: off)",
                    self.passive_unhealthy_after
                ),
            );
        }
        let bad_path = !self.path.starts_with('/')
            || self.path.len() > 1024
            || self.path.chars().any(|c| c.is_ascii_control() || c == ' ');
        if self.protocol == HealthCheckProtocol::Http && bad_path {
            problem(
                format!("{at}.path"),
                format!(
                    "{:?}: expected an absolute path like \"/health\"",
                    self.path
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests;
