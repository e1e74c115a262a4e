use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
};

use netlink_packet_core::NetlinkHeader;
use netlink_packet_route::{
    link::LinkMessage,
    neighbour::NeighbourMessage,
    route::{RouteNextHop, RouteProtocol},
};

use super::*;
use crate::routes::NLMSG_HDRLEN;

// --- building messages -------------------------------------------------------------------

fn datagram(messages: Vec<RouteNetlinkMessage>) -> Vec<u8> {
    let mut out = Vec::new();
    for inner in messages {
        let mut m = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(inner));
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        out.extend(buf);
    }
    out
}

/// A bare netlink message of type `kind` (one this crate cannot parse: netconf, nexthop).
fn raw(kind: u16, payload_len: usize) -> Vec<u8> {
    let len = NLMSG_HDRLEN + payload_len;
    let mut m = vec![0u8; len];
    m[..4].copy_from_slice(&(len as u32).to_ne_bytes());
    m[4..6].copy_from_slice(&kind.to_ne_bytes());
    m
}

fn rule(family: AddressFamily, priority: u32, table: u32) -> RuleMessage {
    let mut r = RuleMessage::default();
    r.header.family = family;
    r.header.action = RuleAction::ToTable;
    r.header.table = if table < 256 { table as u8 } else { 252 };
    r.attributes.push(RuleAttribute::Table(table));
    // As the kernel says them: no FRA_PRIORITY for 0, FRA_SUPPRESS_PREFIXLEN -1, a protocol.
    if priority != 0 {
        r.attributes.push(RuleAttribute::Priority(priority));
    }
    r.attributes
        .push(RuleAttribute::SuppressPrefixLen(u32::MAX));
    r.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::Kernel));
    r
}

fn default_rules() -> Vec<RuleMessage> {
    vec![
        rule(AddressFamily::Inet, 0, 255),
        rule(AddressFamily::Inet, 32766, 254),
        rule(AddressFamily::Inet, 32767, 253),
        rule(AddressFamily::Inet6, 0, 255),
        rule(AddressFamily::Inet6, 32766, 254),
    ]
}

fn from_rule(addr: &str, len: u8, priority: u32, table: u32) -> RuleMessage {
    let mut r = rule(AddressFamily::Inet, priority, table);
    r.header.src_len = len;
    r.attributes
        .push(RuleAttribute::Source(addr.parse().unwrap()));
    r
}

fn route(dst: &str, len: u8) -> RouteMessage {
    let addr: IpAddr = dst.parse().unwrap();
    let mut r = RouteMessage::default();
    r.header.address_family = match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    r.header.destination_prefix_length = len;
    r.header.table = 254;
    r.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(addr)));
    r.attributes.push(RouteAttribute::Oif(3));
    r
}

fn multipath(dst: &str, len: u8) -> RouteMessage {
    let mut r = route(dst, len);
    r.attributes
        .retain(|a| !matches!(a, RouteAttribute::Oif(_)));
    let hop = |i| {
        let mut h = RouteNextHop::default();
        h.interface_index = i;
        h
    };
    r.attributes
        .push(RouteAttribute::MultiPath(vec![hop(3), hop(4)]));
    r
}

fn plain_routes() -> Vec<RouteMessage> {
    vec![
        route("10.0.2.0", 24),
        route("0.0.0.0", 0),
        route("fd00:2::", 64),
    ]
}

// --- the kernel, faked ---------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    Set(u32),
    Clear,
}

/// An `EpochMap` that records what is done to it; `fail` makes writes fail.
#[derive(Clone, Default)]
struct FakeMap {
    value: Arc<Mutex<u32>>,
    ops: Arc<Mutex<Vec<Op>>>,
    fail: Arc<Mutex<bool>>,
}

impl FakeMap {
    fn holding(value: u32) -> Self {
        let m = Self::default();
        *m.value.lock().unwrap() = value;
        m
    }
    fn ops(&self) -> Vec<Op> {
        std::mem::take(&mut *self.ops.lock().unwrap())
    }
    fn value(&self) -> u32 {
        *self.value.lock().unwrap()
    }
}

impl EpochMap for FakeMap {
    fn get(&self) -> Result<u32> {
        Ok(self.value())
    }
    fn set(&mut self, epoch: u32) -> Result<()> {
        if *self.fail.lock().unwrap() {
            bail!("EPERM");
        }
        *self.value.lock().unwrap() = epoch;
        self.ops.lock().unwrap().push(Op::Set(epoch));
        Ok(())
    }
    fn clear_next_hops(&mut self) -> Result<()> {
        assert_eq!(
            self.value(),
            0,
            "the cache is cleared only while the epoch is 0"
        );
        self.ops.lock().unwrap().push(Op::Clear);
        Ok(())
    }
}

/// A `Dumper` answering from lists; `None` fails.
struct FakeDump {
    rules: Option<Vec<RuleMessage>>,
    routes: Option<Vec<RouteMessage>>,
    asked: Vec<&'static str>,
}

impl FakeDump {
    fn plain() -> Self {
        Self {
            rules: Some(default_rules()),
            routes: Some(plain_routes()),
            asked: Vec::new(),
        }
    }
}

impl Dumper for FakeDump {
    fn rules(&mut self) -> Result<Vec<RuleMessage>> {
        self.asked.push("rules");
        self.rules.clone().context("netlink: EBUSY")
    }
    fn routes(&mut self) -> Result<Vec<RouteMessage>> {
        self.asked.push("routes");
        self.routes.clone().context("netlink: EBUSY")
    }
}

/// A keeper, its map and the kernel, stepped by hand: `step` does what the watcher task does
/// once (a dump if due, then the write).
struct Rig {
    keeper: Keeper,
    map: FakeMap,
    kernel: FakeDump,
    now: Instant,
}

impl Rig {
    fn new(configured: bool, found: u32) -> Self {
        let map = FakeMap::holding(found);
        Self {
            keeper: Keeper::new(configured, map.value()),
            map,
            kernel: FakeDump::plain(),
            now: Instant::now(),
        }
    }

    fn step(&mut self) {
        if let Some(due) = self.keeper.take_due(self.now) {
            let d = dump(due, &mut self.kernel);
            self.keeper.dumped(d, self.now);
        }
        if let Some(w) = self.keeper.decide(self.now) {
            let current = self.map.value();
            match execute(&mut self.map, current, w) {
                Ok(()) => self.keeper.written(w),
                Err(_) => self.keeper.write_failed(self.now),
            }
        }
    }

    fn later(&mut self, d: Duration) {
        self.now += d;
    }

    fn asked(&mut self) -> Vec<&'static str> {
        std::mem::take(&mut self.kernel.asked)
    }
}

// --- parsing ------------------------------------------------------------------------------

#[test]
fn a_batch_of_notifications_parses_into_notes() {
    let mut d = datagram(vec![
        RouteNetlinkMessage::NewRoute(route("10.0.9.1", 32)),
        RouteNetlinkMessage::NewRoute(multipath("10.0.9.0", 24)),
        RouteNetlinkMessage::DelRoute(route("10.0.9.1", 32)),
        RouteNetlinkMessage::NewRule(from_rule("10.0.1.3", 32, 100, 100)),
        RouteNetlinkMessage::NewRule(rule(AddressFamily::Inet, 32766, 254)),
        RouteNetlinkMessage::DelRule(from_rule("10.0.1.3", 32, 100, 100)),
        RouteNetlinkMessage::NewLink(LinkMessage::default()),
        RouteNetlinkMessage::NewNeighbour(NeighbourMessage::default()),
    ]);
    // RTM_NEWNETCONF and RTM_NEWNEXTHOP, which netlink-packet-route does not know.
    d.extend(raw(80, 8));
    d.extend(raw(104, 8));
    let parsed = parse(&d);
    assert!(!parsed.unreadable);
    assert_eq!(
        parsed.notes,
        [
            Note::NewRoute { blocks: None },
            Note::NewRoute {
                blocks: Some("route 10.0.9.0/24 table main: multipath (2 next hops)".into())
            },
            Note::DelRoute,
            Note::NewRule {
                blocks: Some("IPv4 rule 100: from 10.0.1.3/32 lookup 100".into())
            },
            Note::NewRule { blocks: None },
            Note::DelRule,
            Note::Other,
            Note::Other,
            Note::Other,
            Note::Other,
        ]
    );
}

#[test]
fn cut_or_garbled_route_notifications_are_unreadable() {
    let whole = datagram(vec![RouteNetlinkMessage::NewRoute(route("10.0.9.1", 32))]);
    // Cut: the header promises more than there is.
    assert!(parse(&whole[..whole.len() - 4]).unreadable);
    // A route message whose body does not parse.
    let mut bad = raw(RTM_NEWROUTE, 4);
    bad.extend(raw(16, 0));
    let parsed = parse(&bad);
    assert!(parsed.unreadable);
    // The kernel saying it dropped some.
    assert!(parse(&raw(NLMSG_OVERRUN, 0)).unreadable);
    // What parsed before the bad part is kept; a link notification that does not parse is
    // still a change, not a loss.
    let mut d = datagram(vec![RouteNetlinkMessage::DelRoute(route("10.0.9.1", 32))]);
    d.extend(raw(16, 2));
    let parsed = parse(&d);
    assert!(!parsed.unreadable);
    assert_eq!(parsed.notes, [Note::DelRoute, Note::Other]);
    assert_eq!(parse(&[]), Parsed::default());
}

// --- what may be cached ---------------------------------------------------------------------

#[test]
fn only_the_kernels_default_rules_let_answers_be_cached() {
    for r in default_rules() {
        assert_eq!(rule_blocker(&r), None, "{r:?}");
    }
    let blocked = |r: RuleMessage| rule_blocker(&r).unwrap_or_else(|| panic!("not blocked: {r:?}"));
    // IPv6 has no "default" rule of its own.
    assert_eq!(
        blocked(rule(AddressFamily::Inet6, 32767, 253)),
        "IPv6 rule 32767: from all lookup default"
    );
    // Another priority or table.
    assert_eq!(
        blocked(rule(AddressFamily::Inet, 100, 254)),
        "IPv4 rule 100: from all lookup main"
    );
    assert_eq!(
        blocked(rule(AddressFamily::Inet, 32766, 100)),
        "IPv4 rule 32766: from all lookup 100"
    );
    // A default priority and table, with a selector.
    assert_eq!(
        blocked(from_rule("10.0.0.0", 8, 32766, 254)),
        "IPv4 rule 32766: from 10.0.0.0/8 lookup main"
    );
    let with = |a: RuleAttribute| {
        let mut r = rule(AddressFamily::Inet, 32766, 254);
        r.attributes.push(a);
        r
    };
    assert!(blocked(with(RuleAttribute::Iifname("eth0".into()))).contains("iif eth0"));
    assert!(blocked(with(RuleAttribute::FwMark(7))).contains("fwmark 0x7"));
    assert!(blocked(with(RuleAttribute::L3MDev(true))).contains("l3mdev (VRF)"));
    assert!(blocked(with(RuleAttribute::SuppressPrefixLen(0))).contains("suppress_prefixlength 0"));
    let mut tos = rule(AddressFamily::Inet, 32766, 254);
    tos.header.tos = 0x10;
    assert!(blocked(tos).contains("tos 0x10"));
    let mut not = rule(AddressFamily::Inet, 32766, 254);
    not.header.flags = RuleFlags::Invert;
    assert!(blocked(not).starts_with("IPv4 rule 32766: not from"));
    let mut hole = rule(AddressFamily::Inet, 32766, 254);
    hole.header.action = RuleAction::Blackhole;
    assert_eq!(blocked(hole), "IPv4 rule 32766: from all blackhole");
    // Rules of other families never decide an IP packet's route.
    let mut other = rule(AddressFamily::Inet, 100, 100);
    other.header.family = AddressFamily::Mpls;
    assert_eq!(rule_blocker(&other), None);
}

#[test]
fn multipath_nexthop_objects_tos_and_source_routes_block_caching() {
    for r in plain_routes() {
        assert_eq!(route_blocker(&r), None, "{r:?}");
    }
    assert_eq!(
        route_blocker(&multipath("0.0.0.0", 0)).as_deref(),
        Some("route default table main: multipath (2 next hops)")
    );
    let mut nh = route("10.0.9.0", 24);
    nh.attributes.push(RouteAttribute::NhId(5));
    nh.attributes.push(RouteAttribute::Table(1000));
    assert_eq!(
        route_blocker(&nh).as_deref(),
        Some("route 10.0.9.0/24 table 1000: uses nexthop object 5")
    );
    let mut tos = route("10.0.9.0", 24);
    tos.header.tos = 0x10;
    assert_eq!(
        route_blocker(&tos).as_deref(),
        Some("route 10.0.9.0/24 table main: TOS 0x10")
    );
    let mut src = route("fd00:9::", 64);
    src.header.source_prefix_length = 48;
    src.attributes
        .push(RouteAttribute::Source(RouteAddress::from(
            "fd00:1::".parse::<IpAddr>().unwrap(),
        )));
    assert_eq!(
        route_blocker(&src).as_deref(),
        Some("route fd00:9::/64 table main: from fd00:1::/48 (source-specific)")
    );
    // Multicast (ipmr) and other families' routes are not what XDP forwards by.
    let mut mc = multipath("10.0.9.0", 24);
    mc.header.address_family = AddressFamily::Other(128);
    assert_eq!(route_blocker(&mc), None);
    let _ = Ipv4Addr::LOCALHOST;
}

// --- the epoch ----------------------------------------------------------------------------

#[test]
fn the_epoch_stays_off_until_rules_and_routes_are_read_then_moves_on_every_batch() {
    let mut r = Rig::new(true, 0);
    assert_eq!(r.keeper.status().epoch, 0);
    assert!(r.keeper.status().reason.unwrap().contains("not read yet"));
    r.step();
    assert_eq!(r.asked(), ["rules", "routes"]);
    // Found 0: answers an earlier run cached are forgotten before the first epoch.
    assert_eq!(r.map.ops(), [Op::Clear, Op::Set(1)]);
    let s = r.keeper.status();
    assert!(s.enabled);
    assert_eq!((s.epoch, s.changes, s.reason), (1, 1, None));
    // Nothing new: nothing written.
    r.step();
    assert_eq!(r.map.ops(), []);
    // A batch of link, neighbour and plain route notifications: one write, no dump.
    r.keeper.note(&Note::Other);
    r.keeper.note(&Note::NewRoute { blocks: None });
    r.keeper.note(&Note::DelRoute);
    r.keeper.note(&Note::Other);
    r.step();
    assert_eq!(r.map.ops(), [Op::Set(2)]);
    assert!(r.asked().is_empty(), "while on, routes are not read again");
    // The agent changed interfaces itself.
    r.keeper.bump();
    r.step();
    assert_eq!(r.map.ops(), [Op::Set(3)]);
    assert_eq!(r.keeper.status().changes, 3);
}

#[test]
fn a_disqualifying_route_turns_the_cache_off_at_once_and_its_removal_back_on() {
    let mut r = Rig::new(true, 0);
    r.step();
    r.map.ops();
    r.asked();
    let why = "route default table main: multipath (2 next hops)";
    r.keeper.note(&Note::NewRoute {
        blocks: Some(why.into()),
    });
    r.step();
    assert_eq!(r.map.ops(), [Op::Set(0)], "off at once, without a dump");
    assert!(r.asked().is_empty());
    let s = r.keeper.status();
    assert!(!s.enabled);
    assert_eq!(s.reason.as_deref(), Some(why));
    // Neighbour churn while off: nothing to write.
    r.keeper.note(&Note::Other);
    r.step();
    assert_eq!(r.map.ops(), []);
    // The route goes: read again, but not more than once a second after the last dump.
    r.kernel.routes = Some(plain_routes());
    r.keeper.note(&Note::DelRoute);
    r.step();
    assert!(r.asked().is_empty(), "debounced");
    r.later(RECHECK_INTERVAL);
    r.step();
    assert_eq!(r.asked(), ["routes"], "rules need no reading");
    // Back on with an epoch never used before (not 1 again).
    assert_eq!(r.map.ops(), [Op::Set(2)]);
    assert!(r.keeper.status().enabled);
}

#[test]
fn while_off_a_route_dump_that_still_finds_the_blocker_keeps_it_off() {
    let mut r = Rig::new(true, 0);
    r.kernel.routes = Some(vec![route("10.0.2.0", 24), multipath("0.0.0.0", 0)]);
    r.step();
    assert_eq!(r.map.ops(), [], "never on");
    assert!(r.keeper.status().reason.unwrap().contains("multipath"));
    // Some other route goes: read again (a second later); the multipath one is still there.
    r.keeper.note(&Note::DelRoute);
    r.later(RECHECK_INTERVAL);
    r.step();
    assert_eq!(r.asked(), ["rules", "routes", "routes"]);
    assert_eq!(r.map.ops(), []);
    // Replaced by a single path: the notification is plain, the dump says so.
    r.kernel.routes = Some(plain_routes());
    r.keeper.note(&Note::NewRoute { blocks: None });
    r.later(RECHECK_INTERVAL);
    r.step();
    assert_eq!(r.map.ops(), [Op::Clear, Op::Set(1)]);
}

#[test]
fn a_policy_rule_turns_the_cache_off_and_its_removal_back_on() {
    let mut r = Rig::new(true, 0);
    r.step();
    r.map.ops();
    r.asked();
    let added = from_rule("10.0.1.3", 32, 100, 100);
    r.keeper.note(&Note::NewRule {
        blocks: rule_blocker(&added),
    });
    r.step();
    assert_eq!(r.map.ops(), [Op::Set(0)]);
    assert_eq!(
        r.keeper.status().reason.as_deref(),
        Some("policy routing: IPv4 rule 100: from 10.0.1.3/32 lookup 100")
    );
    // Rules are read again after any rule notification (here: still there).
    let mut with = default_rules();
    with.push(added);
    r.kernel.rules = Some(with);
    r.later(RECHECK_INTERVAL);
    r.step();
    assert_eq!(r.asked(), ["rules"]);
    assert_eq!(r.map.ops(), []);
    // Deleted.
    r.kernel.rules = Some(default_rules());
    r.keeper.note(&Note::DelRule);
    r.later(RECHECK_INTERVAL);
    r.step();
    assert_eq!(r.asked(), ["rules"]);
    assert_eq!(r.map.ops(), [Op::Set(2)]);
}

#[test]
fn lost_notifications_turn_the_cache_off_until_everything_is_read_again() {
    let mut r = Rig::new(true, 0);
    r.step();
    r.map.ops();
    r.asked();
    r.later(Duration::from_millis(100));
    r.keeper
        .lost("notifications lost (receive buffer overflowed)");
    r.step();
    assert_eq!(r.map.ops(), [Op::Set(0)]);
    assert!(
        r.asked().is_empty(),
        "debounced after the dump at the start"
    );
    r.later(RECHECK_INTERVAL);
    r.step();
    assert_eq!(r.asked(), ["rules", "routes"]);
    assert_eq!(r.map.ops(), [Op::Set(2)]);
}

#[test]
fn a_failed_dump_keeps_the_cache_off_and_is_tried_again() {
    let mut r = Rig::new(true, 0);
    r.kernel.routes = None;
    r.step();
    assert_eq!(r.map.ops(), []);
    let s = r.keeper.status();
    assert!(!s.enabled);
    assert!(s.reason.unwrap().starts_with("reading the routes failed"));
    assert_eq!(r.keeper.dump_at(), Some(r.now + RECHECK_INTERVAL));
    r.kernel.routes = Some(plain_routes());
    r.later(RECHECK_INTERVAL);
    r.step();
    assert_eq!(r.asked(), ["rules", "routes", "routes"]);
    assert_eq!(r.map.ops(), [Op::Clear, Op::Set(1)]);
}

#[test]
fn slow_dumps_are_spaced_ten_times_their_duration() {
    let mut k = Keeper::new(true, 0);
    let now = Instant::now();
    let due = k.take_due(now).unwrap();
    assert_eq!(
        due,
        Due {
            rules: true,
            routes: true
        }
    );
    k.dumped(
        Dumped {
            rules: Some(Ok(default_rules())),
            routes: Some(Ok(vec![multipath("0.0.0.0", 0)])),
            took: Duration::from_millis(500),
        },
        now,
    );
    k.note(&Note::DelRoute);
    assert_eq!(k.dump_at(), Some(now + Duration::from_secs(5)));
}

#[test]
fn an_epoch_left_by_a_killed_agent_goes_off_then_counts_on_from_it() {
    let mut r = Rig::new(true, 41);
    // Before anything is read: off (the routes may have changed while nobody watched).
    let w = r.keeper.decide(r.now).unwrap();
    assert_eq!(
        w,
        Write {
            epoch: 0,
            clear: false
        }
    );
    execute(&mut r.map, 41, w).unwrap();
    r.keeper.written(w);
    r.step();
    // Read, then on after 41: answers stored under 41 or before are never valid again, and no
    // clear is needed.
    assert_eq!(r.map.ops(), [Op::Set(0), Op::Set(42)]);
}

#[test]
fn the_epoch_wraps_past_zero_with_the_cache_cleared() {
    let mut r = Rig::new(true, u32::MAX - 1);
    r.step();
    assert_eq!(r.map.ops(), [Op::Set(u32::MAX)]);
    r.keeper.note(&Note::Other);
    r.step();
    // 0 first (nothing is stored meanwhile), cleared, then 1.
    assert_eq!(r.map.ops(), [Op::Set(0), Op::Clear, Op::Set(1)]);
    r.keeper.note(&Note::Other);
    r.step();
    assert_eq!(r.map.ops(), [Op::Set(2)]);
}

#[test]
fn turned_off_by_config_the_epoch_stays_zero_and_nothing_is_read() {
    let mut r = Rig::new(false, 9);
    r.step();
    assert_eq!(r.map.ops(), [Op::Set(0)]);
    r.keeper.note(&Note::Other);
    r.keeper.note(&Note::NewRule { blocks: None });
    r.keeper.lost("lost");
    r.keeper.bump();
    r.step();
    assert_eq!(r.map.ops(), []);
    assert!(r.asked().is_empty());
    assert_eq!(r.keeper.dump_at(), None);
    let s = r.keeper.status();
    assert_eq!(
        (s.enabled, s.reason.as_deref()),
        (false, Some("agent.route_cache = false"))
    );
}

#[test]
fn a_failed_write_is_tried_again_a_second_later() {
    let mut r = Rig::new(true, 0);
    *r.map.fail.lock().unwrap() = true;
    r.step();
    assert_eq!(r.map.ops(), [Op::Clear]);
    assert!(!r.keeper.status().enabled);
    assert_eq!(r.keeper.retry_at(), Some(r.now + RETRY_AFTER));
    *r.map.fail.lock().unwrap() = false;
    r.step();
    assert_eq!(r.map.ops(), [], "not before the retry");
    r.later(RETRY_AFTER);
    r.step();
    assert_eq!(r.map.ops(), [Op::Clear, Op::Set(1)]);
}

#[test]
fn the_agents_handle_turns_the_cache_off_for_good() {
    // Off by config: no watcher; the epoch an earlier run left goes to 0 at once.
    let map = FakeMap::holding(5);
    let cache = RouteCache::start(false, map.clone());
    assert_eq!(map.ops(), [Op::Set(0)]);
    let s = cache.status();
    assert_eq!((s.enabled, s.epoch, s.changes), (false, 0, 1));
    cache.bump();
    cache.stop("the agent exited");
    assert_eq!(map.ops(), [], "already 0");

    // On, stopped by the agent: 0, and no write after (the keeper is held off).
    let map = FakeMap::holding(7);
    let shared = Arc::new(Shared {
        state: Mutex::new(SharedState {
            map: Box::new(map.clone()),
            stopped: false,
            status: RouteCacheStatus {
                epoch: 7,
                ..RouteCacheStatus::default()
            },
        }),
        bumped: Notify::new(),
    });
    let mut keeper = Keeper::new(true, 7);
    let due = keeper.take_due(Instant::now()).unwrap();
    assert_eq!(
        due,
        Due {
            rules: true,
            routes: true
        }
    );
    keeper.dumped(
        Dumped {
            rules: Some(Ok(default_rules())),
            routes: Some(Ok(plain_routes())),
            took: Duration::ZERO,
        },
        Instant::now(),
    );
    shared.apply(&mut keeper);
    assert_eq!(map.ops(), [Op::Set(8)]);
    let cache = RouteCache {
        shared: shared.clone(),
    };
    assert!(cache.status().enabled);
    cache.stop("the agent exited");
    assert_eq!(map.ops(), [Op::Set(0)]);
    keeper.note(&Note::Other);
    shared.apply(&mut keeper);
    assert_eq!(map.ops(), [], "stopped: nothing written any more");
    let s = cache.status();
    assert_eq!(
        (s.enabled, s.epoch, s.reason.as_deref()),
        (false, 0, Some("the agent exited"))
    );
}

/// The real dumps need no privileges: every network namespace has the kernel's rules, and
/// the loopback routes of its `local` table.
#[test]
fn netlink_dumps_read_rules_and_routes() {
    let mut d = NetlinkDump::default();
    let rules = d.rules().unwrap();
    let local = rules
        .iter()
        .find(|r| {
            r.header.family == AddressFamily::Inet
                && r.attributes.contains(&RuleAttribute::Table(255))
        })
        .expect("the IPv4 local rule");
    assert_eq!(rule_blocker(local), None, "{local:?}");
    let routes = d.routes().unwrap();
    let loopback = RouteAddress::from("127.0.0.1".parse::<IpAddr>().unwrap());
    assert!(
        routes.iter().any(|r| r
            .attributes
            .contains(&RouteAttribute::Destination(loopback.clone()))),
        "no route to 127.0.0.1 among {} routes",
        routes.len()
    );
    // The same socket serves the next dump.
    assert!(!d.rules().unwrap().is_empty());
}
