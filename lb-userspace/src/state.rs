//! The desired data-plane state: a pure function of the config, the target model and the time.
//!
//! Rules (README "Target lifecycle"):
//! - new flows go to `healthy` targets of a group, weighted; a group with no healthy target
//!   fails open over all its registered, non-draining targets;
//! - a target in slow start has its weight scaled by the elapsed fraction of `slow_start`, in
//!   tenths (so the table changes at most ten times over the period);
//! - draining targets get no new flows and keep forwarding their flows;
//! - unhealthy targets (outside fail-open) get no new flows; their flows are rescheduled when
//!   `connection_termination_on_unhealthy`, else they keep going (for `unhealthy_draining_interval`
//!   when it is not zero);
//! - a removed target's id keeps a tombstone: its flows are dropped, or rescheduled (TCP then
//!   gets a reset from the new target) with `connection_termination_on_deregistration`.
//!
//! Interface roles (`interface_roles`, which attached interfaces face targets) are a pure
//! function too: of the config, the registered targets and the kernel's route answers.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Instant,
};

use lb_common::{
    addr, AddrBucket, DataplaneConfig, EndpointKey, IfaceValue, ListenerValue, ReverseValue,
    TargetValue, VipValue, CONFIG_F_READY, GROUP_F_STICKY_SOURCE, IFACE_F_TARGETS,
    LISTENER_F_ACCESS_LOG, LISTENER_F_ALLOW_ALL_V4, LISTENER_F_ALLOW_ALL_V6, REVERSE_F_ACCESS_LOG,
    REVERSE_F_ALLOW_ALL_V4, REVERSE_F_ALLOW_ALL_V6, REVERSE_F_AMBIGUOUS, TARGET_DROP,
    TARGET_FORWARD, TARGET_F_SHARED_ENDPOINT, TARGET_RESCHEDULE,
};
use serde::{Deserialize, Serialize};

use crate::{
    config::{Cidr, Config, Stickiness, TargetGroupConfig},
    health::TargetState,
    maps::addr_filter_counts,
    model::{Model, Target, TargetKey},
};

/// One member of a group's consistent-hash table.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Member {
    pub target_id: u32,
    /// Address, port and family bytes: the same on every node.
    pub identity: Vec<u8>,
    pub weight: u32,
}

/// What a group's table is built from; equal specs build equal tables.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TableSpec {
    pub flags: u32,
    pub size: u32,
    pub seed: u64,
    /// Sorted by identity.
    pub members: Vec<Member>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    pub config: DataplaneConfig,
    pub vips: BTreeMap<IpAddr, VipValue>,
    pub listeners: BTreeMap<EndpointKey, ListenerValue>,
    /// (listener id, prefix) of listeners that do not allow every source of their family.
    pub sources: BTreeSet<(u32, Cidr)>,
    pub reverse: BTreeMap<EndpointKey, ReverseValue>,
    pub targets: BTreeMap<u32, TargetValue>,
    pub tables: BTreeMap<u32, TableSpec>,
    /// Interfaces XDP is attached to (ifindex) and what each faces.
    pub interfaces: BTreeMap<u32, IfaceValue>,
    /// `LB_ADDR_FILTER`'s non-zero buckets: how many of `vips` and of `reverse`'s endpoints
    /// hash to each (`maps::addr_filter_counts`).
    pub addr_filter: BTreeMap<u32, AddrBucket>,
}

pub fn endpoint_key(ip: IpAddr, port: u16, protocol: u8) -> EndpointKey {
    let (addr, family) = addr::to_words(ip);
    EndpointKey {
        addr,
        port_be: port.to_be(),
        protocol,
        family,
    }
}

/// The target's identity bytes for the consistent hash.
pub fn identity(ip: IpAddr, port: u16) -> Vec<u8> {
    let (words, family) = addr::to_words(ip);
    let mut id: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    id.extend_from_slice(&port.to_be_bytes());
    id.push(family);
    id
}

/// The `REVERSE_F_ALLOW_ALL_*` and `REVERSE_F_ACCESS_LOG` bits of a reply endpoint's one
/// listener, from its flags.
pub fn reverse_allow_flags(listener_flags: u32) -> u32 {
    let mut f = 0;
    if listener_flags & LISTENER_F_ACCESS_LOG != 0 {
        f |= REVERSE_F_ACCESS_LOG;
    }
    if listener_flags & LISTENER_F_ALLOW_ALL_V4 != 0 {
        f |= REVERSE_F_ALLOW_ALL_V4;
    }
    if listener_flags & LISTENER_F_ALLOW_ALL_V6 != 0 {
        f |= REVERSE_F_ALLOW_ALL_V6;
    }
    f
}

fn target_value(key: &TargetKey, cookie: u32, state: u8, flags: u32) -> TargetValue {
    let (addr, family) = addr::to_words(key.addr);
    TargetValue {
        addr,
        port_be: key.port.to_be(),
        family,
        state,
        cookie,
        flags,
        _pad: 0,
    }
}

/// Is a target in slow start at `now`, and with what share of its weight (tenths, 1..=10)?
fn slow_start_tenths(t: &Target, slow_start: std::time::Duration, now: Instant) -> u32 {
    match t.slow_start_from {
        Some(from) if !slow_start.is_zero() => {
            let elapsed = now.saturating_duration_since(from).as_secs_f64();
            let tenths = (10.0 * elapsed / slow_start.as_secs_f64()).ceil() as u32;
            tenths.clamp(1, 10)
        }
        _ => 10,
    }
}

/// How the attached interfaces' roles were decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoleSource {
    /// `agent.target_interfaces`.
    Configured,
    /// Derived: the only attached interface (one-arm) faces clients and targets.
    OneArm,
    /// Derived: the interfaces the kernel routes at least one target's address out of.
    Routes,
    /// Derived: targets exist but no route leads out of an attached interface, so every
    /// attached interface is marked (reverse NAT is then not restricted).
    Fallback,
}

impl RoleSource {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Configured => "configured (agent.target_interfaces)",
            Self::OneArm => "derived: one interface (one-arm)",
            Self::Routes => "derived: routes to the targets",
            Self::Fallback => "derived: no target routed out of an attached interface, so all",
        }
    }
}

/// Which attached interfaces face targets (replies from targets arrive there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceRoles {
    pub source: RoleSource,
    /// Ifindexes of the attached interfaces that face targets.
    pub targets: BTreeSet<u32>,
}

impl InterfaceRoles {
    /// `LB_IFACES` values for every attached interface.
    pub fn values(&self, attached: &BTreeMap<String, u32>) -> BTreeMap<u32, IfaceValue> {
        attached
            .values()
            .map(|&i| {
                let flags = if self.targets.contains(&i) {
                    IFACE_F_TARGETS
                } else {
                    0
                };
                (i, IfaceValue { flags })
            })
            .collect()
    }
}

/// Which of the `attached` interfaces (name → ifindex) face targets: those of
/// `agent.target_interfaces` when set; else the only one; else those that `routes` (target
/// address → egress ifindex, as the kernel answered) send at least one registered target out
/// of; and when that is none while targets exist, every attached interface.
pub fn interface_roles(
    config: &Config,
    model: &Model,
    attached: &BTreeMap<String, u32>,
    routes: &BTreeMap<IpAddr, u32>,
) -> InterfaceRoles {
    if let Some(names) = &config.agent.target_interfaces {
        return InterfaceRoles {
            source: RoleSource::Configured,
            targets: names
                .iter()
                .filter_map(|n| attached.get(n))
                .copied()
                .collect(),
        };
    }
    let all: BTreeSet<u32> = attached.values().copied().collect();
    if all.len() == 1 {
        return InterfaceRoles {
            source: RoleSource::OneArm,
            targets: all,
        };
    }
    let targets: BTreeSet<u32> = model
        .targets
        .keys()
        .filter_map(|k| routes.get(&k.addr))
        .filter(|i| all.contains(i))
        .copied()
        .collect();
    if targets.is_empty() && !model.targets.is_empty() {
        return InterfaceRoles {
            source: RoleSource::Fallback,
            targets: all,
        };
    }
    InterfaceRoles {
        source: RoleSource::Routes,
        targets,
    }
}

/// The desired state. `interfaces` are the interfaces XDP is attached to (ifindex) with what
/// each faces (`interface_roles`).
pub fn desired(
    config: &Config,
    model: &Model,
    hash_key: [u32; 2],
    interfaces: &BTreeMap<u32, IfaceValue>,
    now: Instant,
) -> Desired {
    let mut d = Desired {
        config: DataplaneConfig {
            hash_key,
            flags: CONFIG_F_READY,
            flow_insert_limit: config.agent.flow_insert_limit,
        },
        interfaces: interfaces.clone(),
        ..Default::default()
    };
    let seed = (hash_key[0] as u64) << 32 | hash_key[1] as u64;

    // Tombstones first: a live target that took the id overwrites it below.
    for (&id, t) in &model.tombstones {
        let state = if t.terminate {
            TARGET_RESCHEDULE
        } else {
            TARGET_DROP
        };
        d.targets.insert(
            id,
            TargetValue {
                state,
                cookie: t.cookie,
                ..Default::default()
            },
        );
    }

    // Which listeners each target endpoint serves decides how replies find their VIP.
    let mut served: BTreeMap<EndpointKey, Vec<(u32, IpAddr, u16, u32)>> = BTreeMap::new();
    for l in &config.listeners {
        let (Some(lid), Some(gid)) = (
            model.listener_ids.get(&l.name),
            model.group_ids.get(&l.target_group),
        ) else {
            continue;
        };
        let all_v4 = l
            .allowed_sources
            .iter()
            .any(|c| c.len == 0 && c.addr.is_ipv4());
        let all_v6 = l
            .allowed_sources
            .iter()
            .any(|c| c.len == 0 && c.addr.is_ipv6());
        let mut flags = 0;
        if l.access_log && !config.agent.access_log.is_empty() {
            flags |= LISTENER_F_ACCESS_LOG;
        }
        if all_v4 {
            flags |= LISTENER_F_ALLOW_ALL_V4;
        }
        if all_v6 {
            flags |= LISTENER_F_ALLOW_ALL_V6;
        }
        for c in &l.allowed_sources {
            let covered = if c.addr.is_ipv4() { all_v4 } else { all_v6 };
            if !covered && c.addr.is_ipv4() == l.address.is_ipv4() {
                d.sources.insert((lid, *c));
            }
        }
        d.vips.entry(l.address).or_default().listener_count += 1;
        for &proto in l.protocol.ip_protocols() {
            d.listeners.insert(
                endpoint_key(l.address, l.port.0, proto),
                ListenerValue {
                    listener_id: lid,
                    group_id: gid,
                    flags,
                },
            );
            for key in model.targets.keys().filter(|k| k.group == l.target_group) {
                served
                    .entry(endpoint_key(key.addr, key.port, proto))
                    .or_default()
                    .push((lid, l.address, l.port.0, flags));
            }
        }
    }
    for (key, listeners) in &served {
        let (lid, vip, port, listener_flags) = listeners[0];
        d.reverse.insert(
            *key,
            ReverseValue {
                vip_addr: addr::to_words(vip).0,
                vip_port_be: port.to_be(),
                _pad: 0,
                listener_id: lid,
                flags: if listeners.len() > 1 {
                    REVERSE_F_AMBIGUOUS
                } else {
                    reverse_allow_flags(listener_flags)
                },
            },
        );
    }

    // Target endpoints (address, port_be) that serve more than one listener: their flows also
    // record reply-flow entries.
    let shared: BTreeSet<([u32; 4], u16)> = served
        .iter()
        .filter(|(_, l)| l.len() > 1)
        .map(|(k, _)| (k.addr, k.port_be))
        .collect();
    for g in &config.target_groups {
        let Some(gid) = model.group_ids.get(&g.name) else {
            continue;
        };
        if !config.listeners.iter().any(|l| l.target_group == g.name) {
            continue; // unused: no table, no target entries
        }
        let members: Vec<(&TargetKey, &Target)> = model
            .targets
            .iter()
            .filter(|(k, _)| k.group == g.name)
            .collect();
        let scope = zone_scope(config, g, members.iter().map(|(_, t)| *t));
        let in_scope = |t: &Target| scope.includes(&config.agent.zone, t);
        let any_healthy = members
            .iter()
            .any(|(_, t)| in_scope(t) && serving(t) && t.health == TargetState::Healthy);
        let mut table = Vec::new();
        for (key, t) in &members {
            let endpoint = (addr::to_words(key.addr).0, key.port.to_be());
            let flags = if shared.contains(&endpoint) {
                TARGET_F_SHARED_ENDPOINT
            } else {
                0
            };
            let draining = t.draining_until.is_some();
            let eligible =
                !draining && in_scope(t) && (t.health == TargetState::Healthy || !any_healthy);
            let state = if draining || eligible {
                TARGET_FORWARD
            } else {
                // Unhealthy (or initial) outside fail-open.
                let keep_going = !g.connection_termination_on_unhealthy
                    && (g.unhealthy_draining_interval.0.is_zero()
                        || t.unhealthy_since
                            .is_none_or(|s| now < s + g.unhealthy_draining_interval.0));
                if keep_going || t.health == TargetState::Initial {
                    TARGET_FORWARD
                } else {
                    TARGET_RESCHEDULE
                }
            };
            d.targets
                .insert(t.id, target_value(key, t.cookie, state, flags));
            if eligible {
                let tenths = if any_healthy {
                    slow_start_tenths(t, g.slow_start.0, now)
                } else {
                    10
                };
                table.push(Member {
                    target_id: t.id,
                    identity: identity(key.addr, key.port),
                    weight: (t.weight * tenths).div_ceil(10).max(1),
                });
            }
        }
        table.sort_by(|a, b| a.identity.cmp(&b.identity));
        d.tables.insert(
            gid,
            TableSpec {
                flags: if g.stickiness == Stickiness::SourceIp {
                    GROUP_F_STICKY_SOURCE
                } else {
                    0
                },
                size: g.hash_table_size,
                seed,
                members: table,
            },
        );
    }
    d.addr_filter = addr_filter_counts(d.vips.keys(), d.reverse.keys());
    d
}

/// Which zones a group's new flows go to (NLB's cross-zone load balancing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ZoneScope {
    /// Every zone: the node has no zone (`agent.zone` empty) or the group balances across
    /// zones (`cross_zone`).
    All,
    /// The node's zone, and targets without a zone (reachable from every zone).
    Local,
    /// The node's zone has no healthy target while other zones have: every zone's healthy
    /// targets. (NLB would take the zone out of DNS; one node cannot.)
    Fallback,
}

impl ZoneScope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Local => "local",
            Self::Fallback => "fallback",
        }
    }

    /// Is `t` in this scope, on a node in `node_zone`?
    pub fn includes(self, node_zone: &str, t: &Target) -> bool {
        match self {
            Self::All | Self::Fallback => true,
            Self::Local => in_zone(node_zone, t),
        }
    }
}

/// Is `t` in `node_zone` (or without a zone, and so in every zone)?
pub fn in_zone(node_zone: &str, t: &Target) -> bool {
    t.zone
        .as_deref()
        .is_none_or(|z| z.is_empty() || z == node_zone)
}

/// Registered and not draining: may take new flows when healthy (or in fail-open).
fn serving(t: &Target) -> bool {
    t.draining_until.is_none()
}

/// The zones group `g`'s new flows go to, given its `targets`: all of them unless the node has
/// a zone and the group's `cross_zone` (else `agent.cross_zone`) is off; then the node's zone
/// while it has a healthy target; else, while another zone has one, every zone (fallback);
/// and with no healthy target anywhere (fail-open), the node's zone if it has a target that
/// is not draining, else every zone.
pub fn zone_scope<'a>(
    config: &Config,
    g: &TargetGroupConfig,
    targets: impl Iterator<Item = &'a Target> + Clone,
) -> ZoneScope {
    let node = config.agent.zone.as_str();
    if node.is_empty() || g.cross_zone.unwrap_or(config.agent.cross_zone) {
        return ZoneScope::All;
    }
    let healthy = |t: &&Target| serving(t) && t.health == TargetState::Healthy;
    if targets.clone().filter(healthy).any(|t| in_zone(node, t)) {
        ZoneScope::Local
    } else if targets.clone().any(|t| healthy(&t)) {
        ZoneScope::Fallback
    } else if targets.filter(|t| serving(t)).any(|t| in_zone(node, t)) {
        ZoneScope::Local
    } else {
        ZoneScope::All
    }
}

/// When the desired state will next change by itself (slow-start steps, draining deadlines,
/// unhealthy draining intervals): the agent recomputes then.
pub fn next_deadline(config: &Config, model: &Model, now: Instant) -> Option<Instant> {
    let mut next: Option<Instant> = None;
    let mut consider = |t: Instant| {
        if t > now && next.is_none_or(|n| t < n) {
            next = Some(t);
        }
    };
    for (key, t) in &model.targets {
        let Some(g) = config.group(&key.group) else {
            continue;
        };
        if let Some(d) = t.draining_until {
            // Even when past: the loop may have been busy when it passed, and the next
            // reconcile removes the target, so it cannot come back.
            consider(d.max(now + std::time::Duration::from_nanos(1)));
        }
        if let Some(from) = t.slow_start_from {
            let step = g.slow_start.0 / 10;
            if !step.is_zero() {
                for i in 1..=10 {
                    consider(from + step * i);
                }
            }
        }
        if let Some(s) = t.unhealthy_since {
            if !g.unhealthy_draining_interval.0.is_zero() {
                consider(s + g.unhealthy_draining_interval.0);
            }
        }
    }
    next
}
