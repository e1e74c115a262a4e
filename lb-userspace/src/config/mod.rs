//! The TOML config (`../shared/spec/config.md`): types with NLB's defaults, loading that reports
//! every problem as `FILE:LINE: field.path: message`, and semantic validation.
//!
//! Loading never stops at the first problem: a value serde rejects is taken out of the document
//! (the innermost key or table that holds it) and deserialization runs again, so one file can
//! report an unknown key in one listener and a bad port in another. What survives then goes
//! through `validate()`.

mod document;
mod values;

use std::{collections::HashSet, fmt, net::IpAddr, path::Path};

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
            match self.target_groups.iter().find(|g| g.name == l.target_group) {
                None => problem(
                    at("target_group"),
                    format!("no target_group is named {:?}", l.target_group),
                ),
                Some(g) => {
                    for (j, t) in g.targets.iter().enumerate() {
                        if t.address.is_ipv4() != l.address.is_ipv4() {
                            problem(
                                at("target_group"),
                                format!(
                                    "VIP {} and target_group {:?} target[{j}] {} are of different address families (NAT cannot translate between them)",
                                    l.address, g.name, t.address
                                ),
                            );
                        }
                    }
                }
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

        let vips: HashSet<IpAddr> = self.listeners.iter().map(|l| l.address).collect();
        let mut names = HashSet::new();
        let mut total_targets = 0;
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
            } else if (g.hash_table_size as usize) < g.targets.len() * 10 {
                problem(
                    at("hash_table_size"),
                    format!(
                        "{} slots for {} targets; use at least 10 slots per target (100 for even spread)",
                        g.hash_table_size,
                        g.targets.len()
                    ),
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
                if !(1..=65535).contains(&t.weight) {
                    problem(at("weight"), format!("{} is outside 1..=65535", t.weight));
                }
                if vips.contains(&t.address) {
                    problem(
                        at("address"),
                        format!(
                            "{} is a listener's VIP; a target must be another host",
                            t.address
                        ),
                    );
                }
                if t.address.is_unspecified() || t.address.is_multicast() || t.address.is_loopback()
                {
                    problem(at("address"), format!("{} cannot be a target", t.address));
                }
            }
            total_targets += g.targets.len();
        }
        if self.target_groups.len() > MAX_GROUPS as usize {
            problem(
                "target_group".into(),
                format!("more than {MAX_GROUPS} target groups"),
            );
        }
        if total_targets > MAX_TARGETS as usize / 2 {
            problem(
                "target_group".into(),
                format!(
                    "{total_targets} targets in all; at most {}",
                    MAX_TARGETS / 2
                ),
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

impl AgentConfig {
    fn validate(&self, problem: &mut impl FnMut(String, String)) {
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
