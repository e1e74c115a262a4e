//! Keeping `LB_ROUTE_EPOCH` right, so that the data path's next-hop cache (`LB_NEXT_HOPS`)
//! never serves an answer the kernel would no longer give.
//!
//! The data path reuses a FIB answer (egress interface, MACs, MTU) for the next packets to the
//! same destination arriving on the same interface, only while the epoch it was stored under is
//! current, and never while the epoch is `ROUTE_EPOCH_OFF` (0). The agent:
//!
//! - moves the epoch (old + 1, skipping 0) on every notification of the rtnetlink groups that
//!   can change a FIB answer — links, neighbours, IPv4/IPv6 routes, rules and forwarding
//!   settings (netconf), nexthop objects — once per batch read (the socket is drained, then the
//!   epoch written once), and when the agent itself changes the interfaces of `LB_DEVMAP` /
//!   `LB_IFACES` ([`RouteCache::bump`]);
//! - holds the epoch at 0 while a cached answer could be wrong for another packet to the same
//!   destination: while any policy routing rule other than the kernel's defaults exists (IPv4:
//!   0 `local`, 32766 `main`, 32767 `default`; IPv6: 0 `local`, 32766 `main`; no selectors),
//!   VRF (l3mdev) rules included, or any route of any table is multipath, uses a nexthop object
//!   (perhaps a group), has a TOS, or (IPv6) a source prefix — answers would then depend on the
//!   source, the TOS or the flow hash. Which holds is read by dumping rules and routes, at the
//!   start and after lost notifications; a notification of a new disqualifying rule or route
//!   turns the cache off at once, and while it is off, rule and route notifications make the
//!   agent read them again (at most once a second) so that it comes back on;
//! - holds it at 0 for good with `agent.route_cache = false`, when it cannot watch the
//!   notifications, and when it exits ([`RouteCache::stop`]; with `--keep-datapath` the data
//!   plane then looks every packet up until the next agent takes over).
//!
//! The decisions are [`Keeper`]'s, a plain state machine over parsed notifications and dumps;
//! `Dumper` and `EpochMap` are the seams to the kernel.

use std::{
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_DUMP_INTR};
use netlink_packet_route::{
    route::{RouteAddress, RouteAttribute, RouteMessage},
    rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};
use serde::{Deserialize, Serialize};
use tokio::{io::unix::AsyncFd, sync::Notify};
use tracing::{debug, info, warn};

use crate::maps::RouteEpoch;

// Netlink message types (linux/netlink.h, linux/rtnetlink.h).
const NLMSG_OVERRUN: u16 = 4;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
/// Below this, netlink control messages (NOOP, ERROR, DONE, OVERRUN).
const NLMSG_MIN_TYPE: u16 = 16;

/// The rtnetlink groups whose notifications can change a FIB answer.
const GROUPS: [(u32, &str); 9] = [
    (libc::RTNLGRP_LINK, "link"),
    (libc::RTNLGRP_NEIGH, "neighbour"),
    (libc::RTNLGRP_IPV4_ROUTE, "IPv4 route"),
    (libc::RTNLGRP_IPV6_ROUTE, "IPv6 route"),
    (libc::RTNLGRP_IPV4_RULE, "IPv4 rule"),
    (libc::RTNLGRP_IPV6_RULE, "IPv6 rule"),
    (libc::RTNLGRP_IPV4_NETCONF, "IPv4 netconf"),
    (libc::RTNLGRP_IPV6_NETCONF, "IPv6 netconf"),
    (libc::RTNLGRP_NEXTHOP, "nexthop"),
];

/// The kernel's receive buffer for notifications: room for bursts (a routing daemon
/// installing a table).
const RECEIVE_BUFFER: usize = 4 << 20;
/// Datagrams read before the epoch is written, at most (a flood does not hold the write back).
const MAX_BATCH: usize = 256;
/// Rules and routes are read again at most this often while the cache is off (or rules
/// changed), and at least ten times the last dump's duration apart.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(1);
/// After a failed write of the epoch, or a failed read of the socket, the next try.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// One notification, as far as the epoch cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    /// RTM_NEWROUTE (added or changed); `blocks`: why this route makes answers depend on more
    /// than the destination.
    NewRoute {
        blocks: Option<String>,
    },
    DelRoute,
    /// RTM_NEWRULE; `blocks`: why this is not one of the kernel's default rules.
    NewRule {
        blocks: Option<String>,
    },
    DelRule,
    /// Links, neighbours, forwarding settings, nexthop objects: answers may change, whether
    /// they may be cached does not.
    Other,
}

/// The notifications of one datagram.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub notes: Vec<Note>,
    /// A route or rule notification did not parse (or the kernel said it dropped some): what
    /// it said is unknown.
    pub unreadable: bool,
}

/// Splits a datagram into its netlink messages and reads what each says. Only route and rule
/// notifications are parsed; any other message is a change of some kind (`Note::Other`).
pub fn parse(datagram: &[u8]) -> Parsed {
    let (messages, unreadable) = crate::routes::split_messages(datagram);
    let mut parsed = Parsed {
        unreadable,
        ..Parsed::default()
    };
    for message in messages {
        let kind = u16::from_ne_bytes(message[4..6].try_into().expect("a whole header"));
        match kind {
            RTM_NEWROUTE | RTM_DELROUTE | RTM_NEWRULE | RTM_DELRULE => {
                match NetlinkMessage::<RouteNetlinkMessage>::deserialize(message) {
                    Ok(m) => match m.payload {
                        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)) => {
                            parsed.notes.push(Note::NewRoute {
                                blocks: route_blocker(&r),
                            })
                        }
                        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRoute(_)) => {
                            parsed.notes.push(Note::DelRoute)
                        }
                        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRule(r)) => {
                            parsed.notes.push(Note::NewRule {
                                blocks: rule_blocker(&r),
                            })
                        }
                        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRule(_)) => {
                            parsed.notes.push(Note::DelRule)
                        }
                        _ => parsed.unreadable = true,
                    },
                    Err(_) => parsed.unreadable = true,
                }
            }
            NLMSG_OVERRUN => parsed.unreadable = true,
            k if k < NLMSG_MIN_TYPE => {}
            _ => parsed.notes.push(Note::Other),
        }
    }
    parsed
}

fn family_name(f: AddressFamily) -> Option<&'static str> {
    match f {
        AddressFamily::Inet => Some("IPv4"),
        AddressFamily::Inet6 => Some("IPv6"),
        _ => None,
    }
}

fn table_name(t: u32) -> String {
    match t {
        255 => "local".into(),
        254 => "main".into(),
        253 => "default".into(),
        t => t.to_string(),
    }
}

/// Why `rule` is not one of the kernel's default rules (IPv4: priority 0 table `local`, 32766
/// `main`, 32767 `default`; IPv6: 0 `local`, 32766 `main`; each without selectors), which
/// make every FIB answer depend on the destination alone; None when it is one of them (or a
/// rule of another family, which IP forwarding never consults).
pub fn rule_blocker(rule: &RuleMessage) -> Option<String> {
    let h = &rule.header;
    let family = family_name(h.family)?;
    let defaults: &[(u32, u32)] = match h.family {
        AddressFamily::Inet => &[(0, 255), (32766, 254), (32767, 253)],
        _ => &[(0, 255), (32766, 254)],
    };
    let mut table = u32::from(h.table);
    let mut priority = 0;
    let (mut from, mut to) = (None, None);
    let mut selectors = Vec::new();
    for a in &rule.attributes {
        match a {
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::Priority(p) => priority = *p,
            // Who made it says nothing about what it matches; -1 is "not set".
            RuleAttribute::Protocol(_)
            | RuleAttribute::SuppressPrefixLen(u32::MAX)
            | RuleAttribute::SuppressIfGroup(u32::MAX) => {}
            RuleAttribute::Source(a) => from = Some(*a),
            RuleAttribute::Destination(a) => to = Some(*a),
            RuleAttribute::Iifname(n) => selectors.push(format!("iif {n}")),
            RuleAttribute::Oifname(n) => selectors.push(format!("oif {n}")),
            RuleAttribute::FwMark(m) => selectors.push(format!("fwmark {m:#x}")),
            RuleAttribute::FwMask(m) => selectors.push(format!("fwmask {m:#x}")),
            RuleAttribute::L3MDev(_) => selectors.push("l3mdev (VRF)".into()),
            RuleAttribute::Goto(g) => selectors.push(format!("goto {g}")),
            RuleAttribute::SuppressPrefixLen(l) => {
                selectors.push(format!("suppress_prefixlength {l}"))
            }
            other => selectors.push(format!("{other:?}")),
        }
    }
    let plain = h.dst_len == 0
        && h.src_len == 0
        && h.tos == 0
        && h.flags == RuleFlags::empty()
        && h.action == RuleAction::ToTable
        && from.is_none()
        && to.is_none()
        && selectors.is_empty();
    if plain && defaults.contains(&(priority, table)) {
        return None;
    }
    let mut text = format!("{family} rule {priority}:");
    if h.flags.contains(RuleFlags::Invert) {
        text.push_str(" not");
    }
    let prefix = |a: Option<IpAddr>, len: u8| match a {
        Some(a) => format!("{a}/{len}"),
        None if len == 0 => "all".to_string(),
        None => format!("?/{len}"),
    };
    text.push_str(&format!(" from {}", prefix(from, h.src_len)));
    if to.is_some() || h.dst_len != 0 {
        text.push_str(&format!(" to {}", prefix(to, h.dst_len)));
    }
    if h.tos != 0 {
        text.push_str(&format!(" tos {:#x}", h.tos));
    }
    for s in &selectors {
        text.push(' ');
        text.push_str(s);
    }
    match h.action {
        RuleAction::ToTable => text.push_str(&format!(" lookup {}", table_name(table))),
        other => text.push_str(&format!(" {other:?}").to_lowercase()),
    }
    Some(text)
}

/// Why `route` makes FIB answers depend on more than the destination (and the ingress
/// interface): multipath (the flow hash picks the path), a nexthop object (perhaps a group:
/// the same), a TOS, or a source prefix (IPv6 source routing); None otherwise, and for routes
/// of other families.
pub fn route_blocker(route: &RouteMessage) -> Option<String> {
    let h = &route.header;
    family_name(h.address_family)?;
    let mut table = u32::from(h.table);
    let (mut dst, mut src) = (None, None);
    let mut why = None;
    for a in &route.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(d) => dst = Some(address(d)),
            RouteAttribute::Source(s) => src = Some(address(s)),
            RouteAttribute::MultiPath(hops) => {
                why = Some(format!("multipath ({} next hops)", hops.len()))
            }
            RouteAttribute::NhId(id) if why.is_none() => {
                why = Some(format!("uses nexthop object {id}"))
            }
            _ => {}
        }
    }
    if why.is_none() && h.tos != 0 {
        why = Some(format!("TOS {:#x}", h.tos));
    }
    if why.is_none() && h.source_prefix_length != 0 {
        why = Some(format!(
            "from {}/{} (source-specific)",
            src.unwrap_or_else(|| "?".into()),
            h.source_prefix_length
        ));
    }
    let dst = match (dst, h.destination_prefix_length) {
        (_, 0) => "default".to_string(),
        (d, len) => format!("{}/{len}", d.unwrap_or_else(|| "?".into())),
    };
    why.map(|w| format!("route {dst} table {}: {w}", table_name(table)))
}

fn address(a: &RouteAddress) -> String {
    match a {
        RouteAddress::Inet(a) => a.to_string(),
        RouteAddress::Inet6(a) => a.to_string(),
        other => format!("{other:?}"),
    }
}

/// Reads the kernel's policy routing rules and routes (the seam: `NetlinkDump` asks the
/// kernel, tests answer from lists).
pub trait Dumper {
    /// Every IPv4 and IPv6 rule.
    fn rules(&mut self) -> Result<Vec<RuleMessage>>;
    /// Every IPv4 and IPv6 route of every table.
    fn routes(&mut self) -> Result<Vec<RouteMessage>>;
}

/// Writes the epoch (the seam: `maps::RouteEpoch` writes `LB_ROUTE_EPOCH`).
pub trait EpochMap {
    fn get(&self) -> Result<u32>;
    fn set(&mut self, epoch: u32) -> Result<()>;
    /// Forgets every cached answer (only called while the epoch is 0).
    fn clear_next_hops(&mut self) -> Result<()>;
}

impl EpochMap for RouteEpoch {
    fn get(&self) -> Result<u32> {
        RouteEpoch::get(self)
    }
    fn set(&mut self, epoch: u32) -> Result<()> {
        RouteEpoch::set(self, epoch)
    }
    fn clear_next_hops(&mut self) -> Result<()> {
        RouteEpoch::clear_next_hops(self)
    }
}

/// What `route_cache` shows in `status` (under `datapath`) and the metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteCacheStatus {
    /// The data path may reuse FIB answers (the epoch is not 0).
    pub enabled: bool,
    /// Why it may not; None while enabled.
    pub reason: Option<String>,
    /// `LB_ROUTE_EPOCH` as last written (or found).
    pub epoch: u32,
    /// Writes of a new epoch since the agent started.
    pub changes: u64,
}

/// Whether one part of the routing state (rules, or routes) lets answers be cached.
#[derive(Clone, Debug, Default)]
struct Part {
    /// The first disqualifying rule or route seen (None: none).
    blocker: Option<String>,
    /// To be read again (by dump).
    recheck: bool,
}

/// What to read from the kernel (`Keeper::take_due`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Due {
    pub rules: bool,
    pub routes: bool,
}

/// What a dump returned (`dump`).
pub struct Dumped {
    pub rules: Option<Result<Vec<RuleMessage>>>,
    pub routes: Option<Result<Vec<RouteMessage>>>,
    /// How long it took.
    pub took: Duration,
}

/// Reads what `due` asks for.
pub fn dump(due: Due, dumper: &mut impl Dumper) -> Dumped {
    let started = Instant::now();
    let rules = due.rules.then(|| dumper.rules());
    let routes = due.routes.then(|| dumper.routes());
    Dumped {
        rules,
        routes,
        took: started.elapsed(),
    }
}

/// One write of the epoch (`Keeper::decide`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Write {
    pub epoch: u32,
    /// Forget every cached answer first (with the epoch at 0 meanwhile): the history of the
    /// epochs is unknown (the first enabling write of a run that found 0), or they wrapped.
    pub clear: bool,
}

/// The decisions: when to read rules and routes, what the epoch is to be.
#[derive(Debug)]
pub struct Keeper {
    configured: bool,
    rules: Part,
    routes: Part,
    /// Whether answers may be cached is not known (start, notifications lost, a dump failed):
    /// why.
    unknown: Option<String>,
    /// What `LB_ROUTE_EPOCH` holds, as last written.
    epoch: u32,
    /// The last epoch other than 0 (the next enabling write follows it).
    last: u32,
    /// The next enabling write clears the cache first.
    clear_first: bool,
    /// Something changed since the epoch was last written.
    moved: bool,
    changes: u64,
    /// When the last dump ended (at first: when the keeper was made), and how long the next
    /// waits after it.
    last_dump: Instant,
    dumped_once: bool,
    dump_interval: Duration,
    /// A failed write is tried again then.
    retry_at: Option<Instant>,
}

impl Keeper {
    /// A keeper for `LB_ROUTE_EPOCH` that holds `found` (0 on a fresh data plane or after an
    /// agent that exited; something else after one that was killed). Nothing is known about
    /// the rules and routes yet: the epoch is to be 0 until they are read.
    pub fn new(configured: bool, found: u32) -> Self {
        Self {
            configured,
            rules: Part {
                blocker: None,
                recheck: configured,
            },
            routes: Part {
                blocker: None,
                recheck: configured,
            },
            unknown: configured.then(|| "rules and routes not read yet".to_string()),
            epoch: found,
            last: found,
            // Answers stored under epochs of an earlier run may still be in the cache, and
            // 0 says nothing about which: forget them before counting on from 0.
            clear_first: found == 0,
            moved: true,
            changes: 0,
            last_dump: Instant::now(),
            dumped_once: false,
            dump_interval: RECHECK_INTERVAL,
            retry_at: None,
        }
    }

    /// Takes one notification.
    pub fn note(&mut self, note: &Note) {
        self.moved = true;
        match note {
            Note::NewRoute { blocks: Some(why) } => {
                self.routes.blocker.get_or_insert_with(|| why.clone());
            }
            // Perhaps it replaced the disqualifying one.
            Note::NewRoute { blocks: None } => {
                if self.routes.blocker.is_some() {
                    self.routes.recheck = true;
                }
            }
            // A deletion cannot make answers source-dependent; it may end what did.
            Note::DelRoute => {
                if self.routes.blocker.is_some() {
                    self.routes.recheck = true;
                }
            }
            Note::NewRule { blocks } => {
                if let Some(why) = blocks {
                    if self.rules.blocker.is_none() {
                        self.rules.blocker = Some(why.clone());
                    }
                }
                self.rules.recheck = true;
            }
            Note::DelRule => self.rules.recheck = true,
            Note::Other => {}
        }
    }

    /// Notifications were lost (or did not parse): anything may have changed. The epoch goes
    /// to 0 until rules and routes are read again.
    pub fn lost(&mut self, why: &str) {
        self.moved = true;
        if self.configured {
            self.unknown = Some(why.to_string());
            self.rules.recheck = true;
            self.routes.recheck = true;
        }
    }

    /// The agent changed the interfaces of `LB_DEVMAP` / `LB_IFACES`.
    pub fn bump(&mut self) {
        self.moved = true;
    }

    /// When rules or routes are to be read next (None: not needed).
    pub fn dump_at(&self) -> Option<Instant> {
        if !self.configured || !(self.rules.recheck || self.routes.recheck) {
            return None;
        }
        Some(if self.dumped_once {
            self.last_dump + self.dump_interval
        } else {
            self.last_dump
        })
    }

    /// What to read now, if it is due; `dumped` takes the answer.
    pub fn take_due(&mut self, now: Instant) -> Option<Due> {
        let at = self.dump_at()?;
        if at > now {
            return None;
        }
        let due = Due {
            rules: self.rules.recheck,
            routes: self.routes.recheck,
        };
        self.rules.recheck = false;
        self.routes.recheck = false;
        Some(due)
    }

    /// Takes what a dump read, at `now` (when it ended).
    pub fn dumped(&mut self, d: Dumped, now: Instant) {
        self.last_dump = now;
        self.dumped_once = true;
        self.dump_interval = RECHECK_INTERVAL.max(d.took * 10);
        let mut failed = None;
        match d.rules {
            Some(Ok(rules)) => self.rules.blocker = rules.iter().find_map(rule_blocker),
            Some(Err(e)) => {
                self.rules.recheck = true;
                failed = Some(format!("reading the routing rules failed: {e:#}"));
            }
            None => {}
        }
        match d.routes {
            Some(Ok(routes)) => self.routes.blocker = routes.iter().find_map(route_blocker),
            Some(Err(e)) => {
                self.routes.recheck = true;
                failed = Some(format!("reading the routes failed: {e:#}"));
            }
            None => {}
        }
        if let Some(why) = failed {
            self.unknown = Some(why);
        } else if !self.rules.recheck && !self.routes.recheck {
            self.unknown = None;
        }
    }

    /// Why answers may not be cached now; None when they may.
    pub fn off_reason(&self) -> Option<String> {
        if !self.configured {
            return Some("agent.route_cache = false".into());
        }
        if let Some(u) = &self.unknown {
            return Some(u.clone());
        }
        if let Some(r) = &self.rules.blocker {
            return Some(format!("policy routing: {r}"));
        }
        self.routes.blocker.clone()
    }

    /// The write the epoch needs now, if any: 0 while answers may not be cached, otherwise a
    /// new epoch when something changed since the last write (or it was 0).
    pub fn decide(&self, now: Instant) -> Option<Write> {
        if self.retry_at.is_some_and(|t| t > now) {
            return None;
        }
        if self.off_reason().is_some() {
            return (self.epoch != 0).then_some(Write {
                epoch: 0,
                clear: false,
            });
        }
        if self.epoch != 0 && !self.moved {
            return None;
        }
        let (epoch, wrapped) = match self.last.wrapping_add(1) {
            0 => (1, true),
            e => (e, false),
        };
        Some(Write {
            epoch,
            clear: self.clear_first || wrapped,
        })
    }

    /// `w` was written.
    pub fn written(&mut self, w: Write) {
        if w.epoch != self.epoch {
            self.changes += 1;
        }
        self.epoch = w.epoch;
        if w.epoch != 0 {
            self.last = w.epoch;
            self.clear_first = false;
        }
        self.moved = false;
        self.retry_at = None;
    }

    /// Writing failed: the next try after a second.
    pub fn write_failed(&mut self, now: Instant) {
        self.retry_at = Some(now + RETRY_AFTER);
    }

    /// When `decide` wants to be asked again (a failed write's retry).
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    pub fn status(&self) -> RouteCacheStatus {
        let reason = self.off_reason();
        RouteCacheStatus {
            enabled: self.epoch != 0,
            reason: if self.epoch == 0 {
                reason.or_else(|| Some("LB_ROUTE_EPOCH not written yet".into()))
            } else {
                None
            },
            epoch: self.epoch,
            changes: self.changes,
        }
    }
}

/// Carries out `w` on `map`, which holds `current`: with `clear`, the epoch goes to 0 first,
/// then the cache is emptied, then the new epoch written.
pub fn execute(map: &mut dyn EpochMap, current: u32, w: Write) -> Result<()> {
    if w.clear {
        if current != 0 {
            map.set(0)?;
        }
        map.clear_next_hops()?;
    }
    map.set(w.epoch)
}

/// Rule and route dumps over an rtnetlink socket (opened on first use, and again after a
/// failure).
#[derive(Default)]
pub struct NetlinkDump {
    socket: Option<Socket>,
    sequence: u32,
}

/// Dumps interrupted by a concurrent change (NLM_F_DUMP_INTR) are started again this often.
const DUMP_ATTEMPTS: usize = 3;

impl NetlinkDump {
    fn dump_all(
        &mut self,
        request: impl Fn(AddressFamily) -> RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut attempt = 0;
            loop {
                attempt += 1;
                match self.dump_once(request(family)) {
                    Ok(Some(messages)) => {
                        out.extend(messages);
                        break;
                    }
                    Ok(None) if attempt < DUMP_ATTEMPTS => continue,
                    Ok(None) => bail!("the dump was interrupted {DUMP_ATTEMPTS} times"),
                    Err(e) => {
                        self.socket = None; // no stale answer can meet the next question
                        return Err(e);
                    }
                }
            }
        }
        Ok(out)
    }

    /// One dump; None when the kernel says it was interrupted (the answer may be
    /// inconsistent). A family the kernel lacks (IPv6 disabled) answers nothing.
    fn dump_once(
        &mut self,
        request: RouteNetlinkMessage,
    ) -> Result<Option<Vec<RouteNetlinkMessage>>> {
        if self.socket.is_none() {
            self.socket = Some(crate::routes::NetlinkRoutes::open()?);
        }
        let socket = self.socket.as_ref().expect("opened above");
        self.sequence = self.sequence.wrapping_add(1);
        let sequence = self.sequence;
        crate::routes::NetlinkRoutes::send(
            socket,
            request,
            NLM_F_DUMP,
            sequence,
            "the dump request",
        )?;

        let mut out = Vec::new();
        let mut interrupted = false;
        loop {
            let (datagram, _) = socket.recv_from_full().context("reading the dump")?;
            let (messages, unreadable) = crate::routes::split_messages(&datagram);
            if unreadable {
                bail!("parsing the dump: a message's length does not fit the datagram");
            }
            for message in messages {
                let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(message)
                    .context("parsing the dump")?;
                if message.header.sequence_number != sequence {
                    continue; // the end of an earlier dump
                }
                interrupted |= message.header.flags & NLM_F_DUMP_INTR != 0;
                match message.payload {
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    NetlinkPayload::Done(_) => return Ok((!interrupted).then_some(out)),
                    NetlinkPayload::Error(e) => match e.code.map(|c| -c.get()) {
                        None => return Ok((!interrupted).then_some(out)),
                        Some(libc::EAFNOSUPPORT) => return Ok(Some(Vec::new())),
                        Some(errno) => {
                            return Err(std::io::Error::from_raw_os_error(errno))
                                .context("the kernel refused the dump")
                        }
                    },
                    _ => {}
                }
            }
        }
    }
}

impl Dumper for NetlinkDump {
    fn rules(&mut self) -> Result<Vec<RuleMessage>> {
        let all = self
            .dump_all(|family| {
                let mut r = RuleMessage::default();
                r.header.family = family;
                RouteNetlinkMessage::GetRule(r)
            })
            .context("dumping the policy routing rules")?;
        Ok(all
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRule(r) => Some(r),
                _ => None,
            })
            .collect())
    }

    fn routes(&mut self) -> Result<Vec<RouteMessage>> {
        let all = self
            .dump_all(|family| {
                let mut r = RouteMessage::default();
                r.header.address_family = family;
                RouteNetlinkMessage::GetRoute(r)
            })
            .context("dumping the routes")?;
        Ok(all
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Some(r),
                _ => None,
            })
            .collect())
    }
}

/// What the agent and the watcher task share.
struct Shared {
    state: Mutex<SharedState>,
    /// `RouteCache::bump` → the watcher.
    bumped: Notify,
}

struct SharedState {
    map: Box<dyn EpochMap + Send>,
    /// The epoch stays 0 for good (the agent is exiting, or the watcher stopped).
    stopped: bool,
    status: RouteCacheStatus,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SharedState> {
        // A panic while the lock was held leaves nothing half-done worth refusing.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Carries out what `keeper` decides, unless stopped; publishes its status.
    fn apply(&self, keeper: &mut Keeper) {
        let mut s = self.lock();
        if s.stopped {
            return;
        }
        let before = s.status.clone();
        if let Some(w) = keeper.decide(Instant::now()) {
            let current = s.status.epoch;
            match execute(s.map.as_mut(), current, w) {
                Ok(()) => keeper.written(w),
                Err(e) => {
                    warn!(error = %format!("{e:#}"), epoch = w.epoch, "writing LB_ROUTE_EPOCH failed; retrying in 1 s");
                    keeper.write_failed(Instant::now());
                }
            }
        }
        s.status = keeper.status();
        let now = &s.status;
        if now.enabled != before.enabled || (!now.enabled && now.reason != before.reason) {
            match (&now.reason, now.enabled) {
                (_, true) => info!(
                    epoch = now.epoch,
                    "next-hop cache on: the data path reuses FIB answers until routes, neighbours or links change"
                ),
                (Some(why), false) => info!(
                    why = %why,
                    "next-hop cache off: the data path looks every packet up"
                ),
                (None, false) => {}
            }
        } else if now.epoch != before.epoch {
            debug!(epoch = now.epoch, "route epoch moved");
        }
    }

    /// The epoch to 0 for good.
    fn stop(&self, why: &str) {
        let mut s = self.lock();
        if s.stopped {
            return;
        }
        s.stopped = true;
        if s.status.epoch != 0 {
            if let Err(e) = s.map.set(0) {
                warn!(error = %format!("{e:#}"), "could not turn the next-hop cache off (LB_ROUTE_EPOCH = 0)");
                return;
            }
            s.status.changes += 1;
        }
        s.status.epoch = 0;
        s.status.enabled = false;
        s.status.reason = Some(why.to_string());
    }
}

/// The agent's handle on the route epoch: the watcher task runs on its own; the agent says
/// when it changed interfaces itself, reads the status, and turns the cache off when it exits.
#[derive(Clone)]
pub struct RouteCache {
    shared: Arc<Shared>,
}

impl RouteCache {
    /// Starts keeping the epoch of `map` (on the current tokio runtime): with `configured`
    /// (`agent.route_cache`), a watcher task; without, or when the notifications cannot be
    /// watched, the epoch is set to 0 and stays there.
    pub fn start(configured: bool, map: impl EpochMap + Send + 'static) -> Self {
        let found = map.get().unwrap_or_else(|e| {
            warn!(error = %format!("{e:#}"), "reading LB_ROUTE_EPOCH failed");
            0
        });
        let mut keeper = Keeper::new(configured, found);
        let shared = Arc::new(Shared {
            state: Mutex::new(SharedState {
                map: Box::new(map),
                stopped: false,
                status: keeper.status(),
            }),
            bumped: Notify::new(),
        });
        // Until the rules and routes are read: 0 (an earlier agent may have been killed).
        shared.apply(&mut keeper);
        let cache = Self { shared };
        if !configured {
            info!("agent.route_cache = false: the data path looks every packet up (no next-hop cache)");
            return cache;
        }
        match open_socket() {
            Ok(socket) => {
                let watcher = Watcher {
                    socket,
                    dumper: Some(NetlinkDump::default()),
                    keeper,
                    shared: cache.shared.clone(),
                };
                tokio::spawn(watcher.run());
            }
            Err(e) => {
                let why = format!("cannot watch the routing state: {e:#}");
                warn!(error = %format!("{e:#}"), "not watching routes: the next-hop cache stays off");
                cache.shared.stop(&why);
            }
        }
        cache
    }

    /// The agent changed the interfaces of `LB_DEVMAP` / `LB_IFACES`: cached answers out of
    /// them are to be looked up again.
    pub fn bump(&self) {
        self.shared.bumped.notify_one();
    }

    pub fn status(&self) -> RouteCacheStatus {
        self.shared.lock().status.clone()
    }

    /// Sets the epoch to 0 for good (nobody watches the routes once the agent is gone).
    pub fn stop(&self, why: &str) {
        self.shared.stop(why);
    }
}

fn open_socket() -> Result<AsyncFd<Socket>> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
    socket.bind_auto().context("binding the netlink socket")?;
    for (group, name) in GROUPS {
        socket
            .add_membership(group)
            .with_context(|| format!("joining the rtnetlink {name} group"))?;
    }
    if let Err(e) = socket.set_rx_buf_sz(RECEIVE_BUFFER) {
        warn!(error = %e, "could not enlarge the route watcher's receive buffer");
    }
    socket
        .set_non_blocking(true)
        .context("making the netlink socket non-blocking")?;
    // SAFETY: the socket owns its descriptor, which nothing closes or replaces while the
    // AsyncFd holds it.
    unsafe { AsyncFd::register(socket) }.context("registering the netlink socket")
}

/// The watcher task: notifications and dumps in, epoch writes out.
struct Watcher {
    socket: AsyncFd<Socket>,
    /// None while a dump runs on a blocking thread.
    dumper: Option<NetlinkDump>,
    keeper: Keeper,
    shared: Arc<Shared>,
}

impl Drop for Watcher {
    /// The task ended (the runtime shut down, or it panicked): nobody moves the epoch any
    /// more, so the cache goes off.
    fn drop(&mut self) {
        self.shared.stop("the route watcher stopped");
    }
}

impl Watcher {
    async fn run(mut self) {
        loop {
            if let Some(due) = self.keeper.take_due(Instant::now()) {
                self.dump(due).await;
            }
            self.shared.apply(&mut self.keeper);
            let wake = [self.keeper.dump_at(), self.keeper.retry_at()]
                .into_iter()
                .flatten()
                .min();
            let sleep = async move {
                match wake {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ready = self.socket.readable() => match ready {
                    Ok(mut guard) => drain(&mut self.keeper, &mut guard),
                    Err(e) => {
                        warn!(error = %e, "route watcher: waiting on the netlink socket failed");
                        self.keeper.lost("the netlink socket failed");
                        self.shared.apply(&mut self.keeper);
                        tokio::time::sleep(RETRY_AFTER).await;
                    }
                },
                _ = self.shared.bumped.notified() => self.keeper.bump(),
                _ = sleep => {}
            }
        }
    }

    /// Reads rules and/or routes on a blocking thread (a full routing table takes a while).
    async fn dump(&mut self, due: Due) {
        let mut dumper = self.dumper.take().unwrap_or_default();
        let joined = tokio::task::spawn_blocking(move || {
            let d = dump(due, &mut dumper);
            (dumper, d)
        })
        .await;
        let d = match joined {
            Ok((dumper, d)) => {
                self.dumper = Some(dumper);
                d
            }
            Err(e) => Dumped {
                rules: due
                    .rules
                    .then(|| Err(anyhow::anyhow!("the dump failed: {e}"))),
                routes: due
                    .routes
                    .then(|| Err(anyhow::anyhow!("the dump failed: {e}"))),
                took: Duration::ZERO,
            },
        };
        for (what, r) in [
            ("rules", d.rules.as_ref().map(|r| r.as_ref().err())),
            ("routes", d.routes.as_ref().map(|r| r.as_ref().err())),
        ] {
            if let Some(Some(e)) = r {
                warn!(error = %format!("{e:#}"), "route watcher: reading the {what} failed; the next-hop cache stays off until they are read");
            }
        }
        self.keeper.dumped(d, Instant::now());
    }
}

/// Reads every notification there is (up to `MAX_BATCH` datagrams).
fn drain(keeper: &mut Keeper, guard: &mut tokio::io::unix::AsyncFdReadyGuard<'_, Socket>) {
    for _ in 0..MAX_BATCH {
        match guard.try_io(|s| s.get_ref().recv_from_full()) {
            Err(_would_block) => return,
            Ok(Ok((datagram, _))) => {
                let parsed = parse(&datagram);
                for n in &parsed.notes {
                    keeper.note(n);
                }
                if parsed.unreadable {
                    keeper.lost("an unreadable route or rule notification");
                }
            }
            Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                keeper.lost("notifications lost (receive buffer overflowed)");
            }
            Ok(Err(e)) => {
                warn!(error = %e, "route watcher: reading the netlink socket failed");
                keeper.lost("reading the notifications failed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
