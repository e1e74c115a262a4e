use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use lb_common::{IFACE_F_TARGETS, TARGET_DROP, TARGET_FORWARD, TARGET_RESCHEDULE};

use super::*;
use crate::{
    health::{Outcome, Reason, Transition},
    maps::FakeMaps,
    state::{self, RoleSource, ZoneScope},
};

const CONFIG: &str = r#"[agent]
interfaces = ["eth0"]

[[listener]]
name = "web"
address = "10.9.0.10"
port = 80
target_group = "web"

[[target_group]]
name = "web"
hash_table_size = 1009
deregistration_delay = "30s"

[target_group.health_check]
interval = "1s"
timeout = "500ms"

[[target_group.target]]
address = "10.2.0.11"
port = 8080

[[target_group.target]]
address = "10.2.0.12"
port = 8080

[[target_group.target]]
address = "10.2.0.13"
port = 8080

[[target_group]]
name = "spare"

[[target_group.target]]
address = "10.2.0.21"
port = 8080
"#;

fn key(last: u8) -> TargetKey {
    TargetKey {
        group: "web".into(),
        addr: format!("10.2.0.{last}").parse().unwrap(),
        port: 8080,
    }
}

struct World {
    c: Controller,
    maps: FakeMaps,
    t0: Instant,
}

impl World {
    /// One interface (eth0, ifindex 3), first reconciliation done.
    fn new(patch: impl Fn(&mut Config)) -> Self {
        let mut w = Self::on(&[("eth0", 3)], patch);
        w.step(0);
        w
    }

    /// XDP on `interfaces` (name, ifindex), which the config lists too; nothing written yet.
    fn on(interfaces: &[(&str, u32)], patch: impl Fn(&mut Config)) -> Self {
        let mut config = crate::config::parse(CONFIG, "test.toml").unwrap();
        config.agent.interfaces = interfaces.iter().map(|(n, _)| n.to_string()).collect();
        patch(&mut config);
        let t0 = Instant::now();
        let attached = interfaces.iter().map(|&(n, i)| (n.into(), i)).collect();
        let c = Controller::new(config, [1, 2], attached, t0).unwrap();
        Self {
            c,
            maps: FakeMaps::default(),
            t0,
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn step(&mut self, ms: u64) -> Step {
        let now = self.at(ms);
        self.c.reconcile(&mut self.maps, now).unwrap()
    }

    /// A checker's report that completes a transition of target `last` to `to`.
    fn transition(&mut self, last: u8, to: TargetState, ms: u64) {
        let event = self.report(last, to, ms, 0);
        self.c.record(&key(last), &event);
    }

    /// The report of checker `generation` that completes a transition of target `last` to `to`.
    fn report(
        &self,
        last: u8,
        to: TargetState,
        ms: u64,
        generation: u64,
    ) -> HealthEvent<TargetKey> {
        let k = key(last);
        let from = self.c.model.targets[&k].health;
        let outcome = if to == TargetState::Healthy {
            Outcome::Pass
        } else {
            Outcome::Fail(Reason::Timeout, "no connect within 500ms".into())
        };
        HealthEvent {
            target: k,
            generation,
            outcome,
            latency: Duration::from_millis(3),
            at: tokio::time::Instant::from_std(self.at(ms)),
            transition: Some(Transition {
                from,
                to,
                reason: (to == TargetState::Unhealthy).then_some(Reason::Timeout),
            }),
        }
    }

    fn id(&self, last: u8) -> u32 {
        self.c.model.target_ids.get(&key(last)).unwrap()
    }

    fn web(&self) -> u32 {
        self.c.model.group_ids.get(&"web".to_string()).unwrap()
    }

    /// Table slots per target (by last address byte).
    fn slots(&self) -> Vec<(u8, usize)> {
        let by_id = self.maps.slots(self.web());
        [11, 12, 13]
            .into_iter()
            .filter_map(|l| {
                let id = self.c.model.target_ids.get(&key(l))?;
                by_id.get(&id).map(|&n| (l, n))
            })
            .collect()
    }

    fn target_state(&self, last: u8) -> u8 {
        self.maps.targets[&self.id(last)].state
    }
}

#[test]
fn fails_open_until_a_target_is_healthy() {
    let mut w = World::new(|_| {});
    // All initial: no healthy target, so new flows spread over all three.
    assert_eq!(w.slots().len(), 3);
    assert!(w.slots().iter().all(|&(_, n)| n > 300), "{:?}", w.slots());
    w.transition(11, TargetState::Healthy, 1000);
    w.step(1000);
    assert_eq!(w.slots(), [(11, 1009)]);
    w.transition(12, TargetState::Healthy, 1100);
    w.step(1100);
    assert_eq!(w.slots().len(), 2);
    // Both healthy targets fail: open again over every registered target.
    w.transition(11, TargetState::Unhealthy, 5000);
    w.transition(12, TargetState::Unhealthy, 5000);
    w.step(5000);
    assert_eq!(w.slots().len(), 3);
    for l in [11, 12, 13] {
        assert_eq!(w.target_state(l), TARGET_FORWARD);
    }
}

/// A checker restarted (its spec changed) may still have reports on their way: the old
/// generation's report changes neither the model nor the desired state; the new one's applies.
#[test]
fn reports_of_a_restarted_or_stopped_checker_are_dropped() {
    let mut w = World::new(|_| {});
    let spec = |s: &str| {
        (
            s.to_string(),
            crate::health::Schedule {
                interval: Duration::from_secs(1),
                healthy_threshold: 2,
                unhealthy_threshold: 2,
            },
        )
    };
    let mut checkers = Checkers::default();
    for l in [11, 12, 13] {
        let g = checkers.start(key(l), spec("tcp :8080")).generation;
        let e = w.report(l, TargetState::Healthy, 100, g);
        assert!(w.c.record_current(&checkers, &e));
    }
    w.step(100);
    assert_eq!(w.slots().len(), 3);
    let old = checkers.generation(&key(11)).unwrap();
    let new = checkers.start(key(11), spec("tcp :9090")).generation;

    // The old checker's report: 11 unhealthy. Dropped.
    let desired = w.c.desired(w.at(200));
    let late = w.report(11, TargetState::Unhealthy, 200, old);
    assert!(!w.c.record_current(&checkers, &late));
    assert_eq!(w.c.model.targets[&key(11)].health, TargetState::Healthy);
    let last = |w: &World| {
        w.c.model.targets[&key(11)]
            .last_check
            .as_ref()
            .map(|c| c.result)
    };
    assert_eq!(last(&w), Some("pass"));
    assert_eq!(w.c.desired(w.at(200)), desired);
    assert_eq!(w.step(200).applied, Applied::default());
    assert_eq!(w.slots().len(), 3);

    // The new checker's report applies.
    let current = w.report(11, TargetState::Unhealthy, 300, new);
    assert!(w.c.record_current(&checkers, &current));
    assert_eq!(w.c.model.targets[&key(11)].health, TargetState::Unhealthy);
    w.step(300);
    assert_eq!(w.slots().iter().map(|s| s.0).collect::<Vec<_>>(), [12, 13]);

    // A target whose checker was stopped: its last report is dropped too.
    let g13 = checkers.generation(&key(13)).unwrap();
    checkers.retain(|k, _| *k != key(13));
    let late = w.report(13, TargetState::Unhealthy, 400, g13);
    assert!(!w.c.record_current(&checkers, &late));
    assert_eq!(w.c.model.targets[&key(13)].health, TargetState::Healthy);
}

#[test]
fn nothing_is_written_when_nothing_changed() {
    let mut w = World::new(|_| {});
    let before = w.maps.ops.len();
    let s = w.step(500);
    assert_eq!(s.applied, Applied::default());
    assert_eq!(w.maps.ops.len(), before);
    // A failed check that completes no transition changes nothing either.
    w.transition(11, TargetState::Healthy, 600);
    w.step(600);
    let before = w.maps.ops.len();
    let event = HealthEvent {
        target: (),
        generation: 0,
        outcome: Outcome::Pass,
        latency: Duration::from_millis(1),
        at: tokio::time::Instant::from_std(w.at(700)),
        transition: None,
    };
    w.c.record(&key(11), &event);
    assert_eq!(w.step(700).applied, Applied::default());
    assert_eq!(w.maps.ops.len(), before);
}

#[test]
fn first_write_orders_targets_tables_then_listeners() {
    let w = World::new(|_| {});
    let pos = |p: &str| w.maps.ops.iter().position(|o| o.starts_with(p)).unwrap();
    assert!(pos("put_target") < pos("publish"));
    assert!(pos("publish") < pos("put_listener"));
    assert!(pos("put_reverse") < pos("put_listener"));
    // The unused group ("spare", no listener) gets no table and no target entries.
    assert_eq!(w.maps.tables.len(), 1);
    assert_eq!(w.maps.targets.len(), 3);
    let spare = TargetKey {
        group: "spare".into(),
        addr: "10.2.0.21".parse().unwrap(),
        port: 8080,
    };
    let t = &w.c.model.targets[&spare];
    assert_eq!(
        w.c.model.shown_state(&w.c.config, &spare, t).0,
        TargetState::Unused
    );
}

#[test]
fn unhealthy_target_leaves_the_table_and_its_flows_move() {
    let mut w = World::new(|_| {});
    for l in [11, 12, 13] {
        w.transition(l, TargetState::Healthy, 0);
    }
    w.step(0);
    w.transition(13, TargetState::Unhealthy, 2500);
    let s = w.step(2500);
    assert_eq!(s.applied.tables, 1);
    assert_eq!(w.slots().iter().map(|s| s.0).collect::<Vec<_>>(), [11, 12]);
    assert_eq!(w.target_state(13), TARGET_RESCHEDULE);
    assert_eq!(s.changes.len(), 1);
    assert_eq!(
        (s.changes[0].from, s.changes[0].to, s.changes[0].reason),
        (
            TargetState::Healthy,
            TargetState::Unhealthy,
            Some(Reason::Timeout)
        )
    );
}

#[test]
fn unhealthy_draining_interval_keeps_flows_then_moves_them() {
    let mut w = World::new(|c| {
        c.target_groups[0].connection_termination_on_unhealthy = false;
        c.target_groups[0].unhealthy_draining_interval = crate::config::Duration::from_secs(10);
    });
    for l in [11, 12, 13] {
        w.transition(l, TargetState::Healthy, 0);
    }
    w.step(0);
    w.transition(13, TargetState::Unhealthy, 1000);
    w.step(1000);
    assert_eq!(w.slots().len(), 2, "no new flows");
    assert_eq!(w.target_state(13), TARGET_FORWARD, "old flows keep going");
    assert_eq!(w.c.next_deadline(w.at(1000)), Some(w.at(11_000)));
    w.step(10_999);
    assert_eq!(w.target_state(13), TARGET_FORWARD);
    w.step(11_000);
    assert_eq!(w.target_state(13), TARGET_RESCHEDULE);
}

#[test]
fn termination_off_without_interval_keeps_flows() {
    let mut w = World::new(|c| c.target_groups[0].connection_termination_on_unhealthy = false);
    for l in [11, 12, 13] {
        w.transition(l, TargetState::Healthy, 0);
    }
    w.transition(12, TargetState::Unhealthy, 1000);
    w.step(1_000_000);
    assert_eq!(w.target_state(12), TARGET_FORWARD);
    assert_eq!(w.slots().len(), 2);
}

#[test]
fn draining_timeline() {
    for terminate in [false, true] {
        let mut w =
            World::new(|c| c.target_groups[0].connection_termination_on_deregistration = terminate);
        for l in [11, 12, 13] {
            w.transition(l, TargetState::Healthy, 0);
        }
        w.step(0);
        let id = w.id(12);
        w.c.deregister(&key(12), w.at(1000)).unwrap();
        let s = w.step(1000);
        assert_eq!(s.changes[0].to, TargetState::Draining);
        assert_eq!(s.changes[0].reason, Some(Reason::DeregistrationInProgress));
        assert_eq!(
            w.slots().iter().map(|s| s.0).collect::<Vec<_>>(),
            [11, 13],
            "no new flows"
        );
        assert_eq!(w.target_state(12), TARGET_FORWARD, "its flows keep going");
        assert_eq!(w.c.next_deadline(w.at(1000)), Some(w.at(31_000)));
        // The loop was busy when the deadline passed: it is still due, at once.
        let late = w.at(31_500);
        assert!(
            w.c.next_deadline(late)
                .is_some_and(|d| d <= late + Duration::from_millis(1)),
            "a passed draining deadline was forgotten"
        );
        assert!(w.step(30_999).removed.is_empty());
        assert_eq!(w.maps.targets[&id].state, TARGET_FORWARD);
        let s = w.step(31_000);
        assert_eq!(s.removed, [key(12)]);
        let expect = if terminate {
            TARGET_RESCHEDULE
        } else {
            TARGET_DROP
        };
        assert_eq!(w.maps.targets[&id].state, expect, "terminate={terminate}");
        assert!(!w.c.model.targets.contains_key(&key(12)));
        // Registering it again gives a new cookie: flows of the old registration never
        // count as its own.
        let old_cookie = w.maps.targets[&id].cookie;
        w.c.register(key(12), 100, None).unwrap();
        w.step(32_000);
        let new_id = w.id(12);
        assert_ne!(w.maps.targets[&new_id].cookie, old_cookie);
    }
}

#[test]
fn draining_target_registered_again_comes_back() {
    let mut w = World::new(|_| {});
    for l in [11, 12, 13] {
        w.transition(l, TargetState::Healthy, 0);
    }
    w.c.deregister(&key(12), w.at(0)).unwrap();
    w.step(0);
    assert_eq!(w.slots().len(), 2);
    w.c.register(key(12), 100, None).unwrap();
    w.step(100);
    assert_eq!(w.slots().len(), 3);
}

#[test]
fn slow_start_ramps_a_new_healthy_target() {
    let mut w =
        World::new(|c| c.target_groups[0].slow_start = crate::config::Duration::from_secs(100));
    w.transition(11, TargetState::Healthy, 0);
    w.transition(12, TargetState::Healthy, 0);
    w.step(0);
    // (12 became healthy beside 11, so it ramps too: over by 100 s.)
    w.transition(13, TargetState::Healthy, 200_000);
    let share = |w: &mut World, ms: u64| {
        w.step(ms);
        let slots = w.slots();
        slots
            .iter()
            .find(|s| s.0 == 13)
            .map_or(0.0, |s| s.1 as f64 / 1009.0)
    };
    // Weight 100 ×0.1 against two of 100: 10/210 of the slots at first.
    let first = share(&mut w, 200_000);
    assert!(
        (first - 10.0 / 210.0).abs() < 0.01,
        "{first} {:?}",
        w.slots()
    );
    let half = share(&mut w, 250_000);
    assert!((half - 50.0 / 250.0).abs() < 0.01, "{half}");
    let full = share(&mut w, 300_000);
    assert!((full - 1.0 / 3.0).abs() < 0.01, "{full}");
    // The ramp is in tenths: ten table changes at most over the period.
    assert_eq!(w.c.next_deadline(w.at(200_000)), Some(w.at(210_000)));
    // A target that becomes healthy alone gets no slow start (nothing to share the load with).
    let mut w =
        World::new(|c| c.target_groups[0].slow_start = crate::config::Duration::from_secs(100));
    w.transition(11, TargetState::Healthy, 0);
    w.step(0);
    assert_eq!(w.slots(), [(11, 1009)]);
}

#[test]
fn reload_drains_removed_targets_and_keeps_ids() {
    let mut w = World::new(|_| {});
    let id11 = w.id(11);
    let mut config = w.c.config.clone();
    config.target_groups[0].targets.remove(1); // 10.2.0.12
    w.c.reload(config, w.at(1000)).unwrap();
    let s = w.step(1000);
    assert_eq!(s.changes.len(), 1);
    assert_eq!(
        (&s.changes[0].target, s.changes[0].to),
        (&key(12), TargetState::Draining)
    );
    assert_eq!(w.id(11), id11);
    assert_eq!(s.applied.tables, 1);
    // A listener removed by reload goes away from the maps; its group becomes unused.
    let mut config = w.c.config.clone();
    config.listeners.clear();
    w.c.reload(config, w.at(2000)).unwrap();
    let s = w.step(2000);
    assert!(w.maps.ops.iter().any(|o| o == "remove_listener"));
    assert!(w.maps.vips.is_empty());
    assert!(s
        .changes
        .iter()
        .all(|c| c.to == TargetState::Unused || c.to == TargetState::Draining));
}

#[test]
fn endpoints_serving_two_listeners_are_marked_shared() {
    use lb_common::{REVERSE_F_ALLOW_ALL_V4, REVERSE_F_AMBIGUOUS, TARGET_F_SHARED_ENDPOINT};
    let w = World::new(|c| {
        let mut second = c.listeners[0].clone();
        second.name = "web-b".into();
        second.address = "10.9.0.11".parse().unwrap();
        c.listeners.push(second);
    });
    let d = w.c.desired(w.t0);
    for last in [11, 12, 13] {
        assert_eq!(
            d.targets[&w.id(last)].flags,
            TARGET_F_SHARED_ENDPOINT,
            "target {last}"
        );
    }
    assert!(d.reverse.values().all(|r| r.flags == REVERSE_F_AMBIGUOUS));
    // One listener alone: nothing shared, and replies may go to any IPv4 address (the
    // listener allows every source by default).
    let w = World::new(|_| {});
    let d = w.c.desired(w.t0);
    assert!(d.targets.values().all(|t| t.flags == 0));
    assert!(d.reverse.values().all(
        |r| r.flags & (REVERSE_F_AMBIGUOUS | REVERSE_F_ALLOW_ALL_V4) == REVERSE_F_ALLOW_ALL_V4
    ));
}

#[test]
fn replies_of_a_listener_with_allowed_sources_are_checked() {
    use lb_common::{REVERSE_F_ALLOW_ALL_V4, REVERSE_F_ALLOW_ALL_V6};
    let w = World::new(|c| {
        c.listeners[0].allowed_sources = vec!["10.1.0.0/24".parse().unwrap()];
    });
    let d = w.c.desired(w.t0);
    assert!(!d.reverse.is_empty());
    assert!(d
        .reverse
        .values()
        .all(|r| r.flags & (REVERSE_F_ALLOW_ALL_V4 | REVERSE_F_ALLOW_ALL_V6) == 0));
}

/// Routes from a table: an address not in it has no route.
#[derive(Default)]
struct FakeRoutes {
    routes: BTreeMap<IpAddr, Result<u32, &'static str>>,
    asked: Vec<IpAddr>,
}

impl FakeRoutes {
    fn with(routes: &[(&str, Result<u32, &'static str>)]) -> Self {
        Self {
            routes: routes
                .iter()
                .map(|(a, r)| (a.parse().unwrap(), *r))
                .collect(),
            asked: Vec::new(),
        }
    }
}

impl RouteLookup for FakeRoutes {
    fn egress(&mut self, addr: IpAddr) -> Result<Option<u32>> {
        self.asked.push(addr);
        match self.routes.get(&addr) {
            None => Ok(None),
            Some(Ok(i)) => Ok(Some(*i)),
            Some(Err(e)) => Err(anyhow::anyhow!("{e}")),
        }
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `LB_IFACES` as the desired state has it: (ifindex, flags).
fn iface_flags(w: &World) -> Vec<(u32, u32)> {
    w.c.desired(w.t0)
        .interfaces
        .iter()
        .map(|(&i, v)| (i, v.flags))
        .collect()
}

const TWO: [(&str, u32); 2] = [("eth0", 3), ("eth1", 4)];

#[test]
fn configured_target_interfaces_are_exactly_those() {
    let mut w = World::on(&TWO, |c| {
        c.agent.target_interfaces = Some(vec!["eth1".into()]);
    });
    assert!(!w.c.derives_roles());
    let mut routes = FakeRoutes::default();
    assert!(w.c.lookup_routes(&mut routes, true).is_empty());
    assert!(routes.asked.is_empty(), "no lookups when configured");
    let s = w.step(0);
    assert_eq!(iface_flags(&w), [(3, 0), (4, IFACE_F_TARGETS)]);
    let roles = s.roles.expect("the first reconcile reports the roles");
    assert_eq!(roles.source, RoleSource::Configured);
    assert!(w.maps.ops.iter().any(|o| o == "add_interface 3 0x0"));
    assert!(w.maps.ops.iter().any(|o| o == "add_interface 4 0x1"));
    assert!(w.step(10).roles.is_none(), "reported only when they change");
}

#[test]
fn one_interface_faces_targets_one_arm() {
    let w = World::new(|_| {});
    assert!(!w.c.derives_roles());
    assert_eq!(w.c.route_queries(true), Vec::<IpAddr>::new());
    assert_eq!(iface_flags(&w), [(3, IFACE_F_TARGETS)]);
    assert_eq!(w.c.interface_roles().source, RoleSource::OneArm);
    assert_eq!(w.maps.ops[1], "add_interface 3 0x1");
}

#[test]
fn roles_derived_from_the_routes_to_every_target() {
    // The web targets are routed out of eth1; the unused group's target has no route.
    let mut routes = FakeRoutes::with(&[
        ("10.2.0.11", Ok(4)),
        ("10.2.0.12", Ok(4)),
        ("10.2.0.13", Ok(4)),
    ]);
    let mut w = World::on(&TWO, |_| {});
    assert!(w.c.derives_roles());
    let notes = w.c.lookup_routes(&mut routes, false);
    assert_eq!(
        routes.asked.len(),
        4,
        "every registered target, of any group"
    );
    assert_eq!(
        notes,
        [RouteNote::Useless {
            addr: ip("10.2.0.21"),
            answer: Answer::NoRoute
        }],
        "a target without a route is said once"
    );
    w.step(0);
    assert_eq!(iface_flags(&w), [(3, 0), (4, IFACE_F_TARGETS)]);
    assert_eq!(w.c.interface_roles().source, RoleSource::Routes);

    // A target registered through the API, routed out of eth0: only it is looked up.
    routes.routes.insert(ip("10.3.0.5"), Ok(3));
    routes.asked.clear();
    let api = TargetKey {
        group: "spare".into(),
        addr: ip("10.3.0.5"),
        port: 80,
    };
    w.c.register(api.clone(), 100, None).unwrap();
    assert!(w.c.lookup_routes(&mut routes, false).is_empty());
    assert_eq!(routes.asked, [ip("10.3.0.5")]);
    w.step(100);
    assert_eq!(
        iface_flags(&w),
        [(3, IFACE_F_TARGETS), (4, IFACE_F_TARGETS)]
    );

    // The periodic re-check asks for every address; nothing new, nothing said.
    routes.asked.clear();
    assert!(w.c.lookup_routes(&mut routes, true).is_empty());
    assert_eq!(routes.asked.len(), 5);

    // Deregistered and removed: its interface no longer faces targets.
    w.c.deregister(&api, w.at(200)).unwrap();
    w.step(200);
    assert_eq!(
        iface_flags(&w),
        [(3, IFACE_F_TARGETS), (4, IFACE_F_TARGETS)]
    );
    w.step(200 + 300_000); // "spare" keeps the default deregistration_delay
    assert!(!w.c.model.targets.contains_key(&api));
    assert_eq!(iface_flags(&w), [(3, 0), (4, IFACE_F_TARGETS)]);
}

#[test]
fn no_routed_target_falls_back_to_every_interface() {
    let mut routes = FakeRoutes::with(&[
        ("10.2.0.11", Err("netlink socket: permission denied")),
        ("10.2.0.12", Ok(1)), // lo: XDP is not attached there
    ]);
    let mut w = World::on(&TWO, |_| {});
    let notes = w.c.lookup_routes(&mut routes, false);
    assert_eq!(notes.len(), 4, "each unusable answer said once: {notes:?}");
    let s = w.step(0);
    assert_eq!(s.roles.unwrap().source, RoleSource::Fallback);
    assert_eq!(
        iface_flags(&w),
        [(3, IFACE_F_TARGETS), (4, IFACE_F_TARGETS)]
    );
    assert!(
        w.c.lookup_routes(&mut routes, true).is_empty(),
        "not said again at the re-check"
    );
    // Without any target there is nothing to fall back for.
    let mut w = World::on(&TWO, |c| {
        for g in &mut c.target_groups {
            g.targets.clear();
        }
    });
    w.c.lookup_routes(&mut routes, false);
    assert_eq!(w.c.interface_roles().source, RoleSource::Routes);
    assert_eq!(iface_flags(&w), [(3, 0), (4, 0)]);
}

#[test]
fn reconciler_rewrites_an_interface_whose_role_changed() {
    let mut routes = FakeRoutes::with(&[
        ("10.2.0.11", Ok(4)),
        ("10.2.0.12", Ok(4)),
        ("10.2.0.13", Ok(4)),
        ("10.2.0.21", Ok(4)),
    ]);
    let mut w = World::on(&TWO, |_| {});
    w.c.lookup_routes(&mut routes, false);
    w.step(0);
    // The targets' routes move to eth0: the re-check follows.
    for r in routes.routes.values_mut() {
        *r = Ok(3);
    }
    let notes = w.c.lookup_routes(&mut routes, true);
    assert_eq!(notes.len(), 4, "{notes:?}");
    let before = w.maps.ops.len();
    let s = w.step(1000);
    assert_eq!(s.applied.writes, 2);
    assert_eq!(
        w.maps.ops[before..],
        ["add_interface 3 0x1", "add_interface 4 0x0"]
    );
    assert_eq!(s.roles.unwrap().targets, [3].into());
    // A config that names the interface instead: a reload switches to it, no lookups.
    let mut config = w.c.config.clone();
    config.agent.target_interfaces = Some(vec!["eth1".into()]);
    w.c.reload(config, w.at(2000)).unwrap();
    assert!(w.c.route_queries(true).is_empty());
    let before = w.maps.ops.len();
    w.step(2000);
    assert_eq!(
        w.maps.ops[before..],
        ["add_interface 3 0x0", "add_interface 4 0x1"]
    );
}

#[test]
fn flow_insert_limit_comes_from_the_config_and_reloads() {
    let mut w = World::new(|c| c.agent.flow_insert_limit = 5000);
    assert_eq!(w.c.desired(w.t0).config.flow_insert_limit, 5000);
    let mut config = w.c.config.clone();
    config.agent.flow_insert_limit = 0;
    let (agent, notes) = reloaded_agent(&w.c.config.agent, &config.agent);
    assert!(notes.is_empty(), "{notes:?}");
    config.agent = agent;
    w.c.reload(config, w.at(1000)).unwrap();
    let before = w.maps.ops.len();
    w.step(1000);
    assert_eq!(w.maps.ops[before..], ["config"]);
    assert_eq!(w.c.reconciler.shadow().config.flow_insert_limit, 0);
}

#[test]
fn reload_applies_only_the_reloadable_agent_keys() {
    let running = crate::config::parse(CONFIG, "test.toml").unwrap().agent;
    let mut new = running.clone();
    new.flow_insert_limit = 1000;
    new.target_interfaces = Some(vec!["eth0".into()]);
    new.pin_path = "/sys/fs/bpf/other".into();
    new.access_log = "/var/log/lb-agent/access.log".into();
    new.zone = "a".into();
    new.cross_zone = true;
    let (agent, notes) = reloaded_agent(&running, &new);
    assert_eq!(agent.flow_insert_limit, 1000);
    assert_eq!(
        (
            agent.access_log.as_str(),
            agent.zone.as_str(),
            agent.cross_zone
        ),
        ("/var/log/lb-agent/access.log", "a", true)
    );
    assert_eq!(agent.target_interfaces, new.target_interfaces);
    assert_eq!(agent.pin_path, running.pin_path, "needs a restart");
    assert_eq!(notes.len(), 1);
    assert!(
        notes[0].contains(
            "other than target_interfaces, flow_insert_limit, access_log, zone, cross_zone"
        ),
        "{notes:?}"
    );
    // An interface added in the same reload is not attached yet: its role waits too.
    new.interfaces.push("eth1".into());
    new.target_interfaces = Some(vec!["eth1".into()]);
    new.pin_path = running.pin_path.clone();
    let (agent, notes) = reloaded_agent(&running, &new);
    assert_eq!(agent.interfaces, running.interfaces);
    assert_eq!(agent.target_interfaces, None);
    assert_eq!(agent.flow_insert_limit, 1000);
    assert_eq!(notes.len(), 2, "{notes:?}");
}

/// `register` refuses what config validation refuses (`config::check_target`): the status the
/// API answers and the message, which names the field or limit.
fn refused(w: &mut World, group: &str, target: &str, weight: u32) -> (u16, String) {
    let addr: std::net::SocketAddr = target.parse().unwrap();
    let key = TargetKey {
        group: group.into(),
        addr: addr.ip(),
        port: addr.port(),
    };
    let before = w.c.model.targets.len();
    let e =
        w.c.register(key, weight, None)
            .expect_err("registration accepted");
    assert_eq!(
        w.c.model.targets.len(),
        before,
        "a refused target was registered"
    );
    let r = e.downcast_ref::<Refused>().expect("a Refused");
    (r.status, r.message.clone())
}

#[test]
fn register_refuses_bad_targets_with_400() {
    let mut w = World::new(|_| {});
    for (group, target, weight, message) in [
        ("nope", "10.2.0.14:8080", 100, "no target group is named \"nope\""),
        (
            "web",
            "127.0.0.1:8080",
            100,
            "web/127.0.0.1:8080 refused: address: 127.0.0.1 is a loopback address; it cannot be a target",
        ),
        ("web", "224.0.0.9:8080", 100, "address: 224.0.0.9 is a multicast address"),
        ("web", "0.0.0.0:8080", 100, "address: 0.0.0.0 is an unspecified address"),
        ("web", "10.2.0.14:0", 100, "port: port 0 is outside 1..=65535"),
        ("web", "10.2.0.14:8080", 0, "weight: 0 is outside 1..=65535"),
        ("web", "10.2.0.14:8080", 65536, "weight: 65536 is outside 1..=65535"),
    ] {
        let (status, text) = refused(&mut w, group, target, weight);
        assert_eq!(status, 400, "{target}: {text}");
        assert!(text.contains(message), "{target}: {text}");
    }
    w.c.register(tkey("web", "10.2.0.14:8080"), 65535, None)
        .unwrap();
}

fn tkey(group: &str, target: &str) -> TargetKey {
    let addr: std::net::SocketAddr = target.parse().unwrap();
    TargetKey {
        group: group.into(),
        addr: addr.ip(),
        port: addr.port(),
    }
}

#[test]
fn register_refuses_conflicts_with_the_config_with_409() {
    let mut w = World::new(|_| {});
    let (status, text) = refused(&mut w, "web", "10.9.0.10:8080", 100);
    assert_eq!(
        (status, text.as_str()),
        (
            409,
            "web/10.9.0.10:8080 refused: address: 10.9.0.10 is the VIP of listener \"web\"; a target must be another host"
        )
    );
    let (status, text) = refused(&mut w, "web", "[fd00::14]:8080", 100);
    assert_eq!(status, 409, "{text}");
    assert!(
        text.contains("address: fd00::14 and VIP 10.9.0.10 of listener \"web\" are of different address families"),
        "{text}"
    );
    // A group no listener uses has no family yet.
    w.c.register(tkey("spare", "[fd00::14]:8080"), 100, None)
        .unwrap();
}

#[test]
fn register_counts_the_group_against_its_table_size() {
    // web: 1009 slots, 3 targets from the config; room for 100 at 10 slots per target.
    let mut w = World::new(|_| {});
    for i in 0..97u32 {
        let t = format!("10.3.{}.{}:8080", i / 200, i % 200 + 1);
        w.c.register(tkey("web", &t), 100, None).unwrap();
    }
    let (status, text) = refused(&mut w, "web", "10.4.0.1:8080", 100);
    assert_eq!(status, 409, "{text}");
    assert!(
        text.contains("hash_table_size: 1009 slots for 101 targets in group \"web\"; use at least 10 slots per target"),
        "{text}"
    );
    // Registering a target again (a new weight) adds none.
    w.c.register(tkey("web", "10.3.0.1:8080"), 50, None)
        .unwrap();
    // A draining target is out of the table: it leaves room.
    w.c.deregister(&key(11), w.at(0)).unwrap();
    w.c.register(tkey("web", "10.4.0.1:8080"), 100, None)
        .unwrap();
}

/// World with `n` targets from the config in "web" (1000003 slots), served over `protocol`;
/// nothing written (the table would take long to build in a debug build).
fn crowded(n: u32, protocol: crate::config::Protocol) -> World {
    World::on(&[("eth0", 3)], |c| {
        c.listeners[0].protocol = protocol;
        let g = &mut c.target_groups[0];
        g.hash_table_size = 1_000_003;
        g.targets = (0..n)
            .map(|i| crate::config::TargetConfig {
                address: IpAddr::from([10, 5, (i >> 8) as u8, i as u8]),
                port: crate::config::Port(8080),
                weight: 100,
                zone: None,
            })
            .collect();
    })
}

#[test]
fn register_counts_every_target_against_half_the_target_slots() {
    // 8191 in web and 1 in spare: 8192 in all, the most there can be.
    let mut w = crowded(8191, crate::config::Protocol::Tcp);
    let (status, text) = refused(&mut w, "web", "10.6.0.1:8080", 100);
    assert_eq!(
        (status, text.as_str()),
        (
            409,
            "web/10.6.0.1:8080 refused: targets: 8193 targets in all; at most 8192 (half of the data plane's 16384 target slots; the other half is for draining)"
        )
    );
    // Any group counts.
    let (status, _) = refused(&mut w, "spare", "10.6.0.1:8080", 100);
    assert_eq!(status, 409);
    let first = w.c.model.targets.keys().next().unwrap().clone();
    w.c.deregister(&first, w.at(0)).unwrap();
    w.c.register(tkey("web", "10.6.0.1:8080"), 100, None)
        .unwrap();
}

#[test]
fn register_counts_reply_entries_against_lb_reverse() {
    // tcp_udp: every web endpoint takes two LB_REVERSE entries, draining ones included.
    let mut w = crowded(8191, crate::config::Protocol::TcpUdp);
    let web: Vec<TargetKey> =
        w.c.model
            .targets
            .keys()
            .filter(|k| k.group == "web")
            .take(2)
            .cloned()
            .collect();
    w.c.deregister(&web[0], w.at(0)).unwrap();
    w.c.register(tkey("web", "10.6.0.1:8080"), 100, None)
        .unwrap();
    // What the check counted is what the desired state writes: LB_REVERSE is full.
    assert_eq!(w.c.desired(w.at(0)).reverse.len(), 16384);
    w.c.deregister(&web[1], w.at(0)).unwrap();
    // 8192 targets not draining, but 8193 endpoints with entries.
    let (status, text) = refused(&mut w, "web", "10.6.0.2:8080", 100);
    assert_eq!(
        (status, text.as_str()),
        (
            409,
            "web/10.6.0.2:8080 refused: targets: 16386 reply entries (target endpoint × listener protocol, draining targets included); LB_REVERSE holds at most 16384"
        )
    );
    // An endpoint in two groups that listeners serve has one entry per protocol: the count
    // follows the desired state there too.
    let mut both = crate::config::parse(CONFIG, "test.toml").unwrap();
    both.listeners[0].protocol = crate::config::Protocol::TcpUdp;
    both.listeners.push(crate::config::ListenerConfig {
        name: "spare".into(),
        address: "10.9.0.11".parse().unwrap(),
        target_group: "spare".into(),
        ..both.listeners[0].clone()
    });
    let mut w = World::on(&[("eth0", 3)], |c| *c = both.clone());
    let shared = TargetKey {
        group: "spare".into(),
        ..key(11)
    };
    w.c.register(shared, 100, None).unwrap();
    let counted = crate::config::reverse_entries(
        &w.c.config,
        w.c.model
            .targets
            .keys()
            .map(|k| (k.group.as_str(), k.addr, k.port)),
    );
    assert_eq!((counted, w.c.desired(w.at(0)).reverse.len()), (8, 8));
}

#[test]
fn reload_refuses_a_config_the_api_targets_do_not_fit() {
    let mut w = World::new(|_| {});
    let api = tkey("web", "10.2.0.14:8080");
    w.c.register(api.clone(), 100, None).unwrap();
    w.step(0);
    let running = w.c.config.clone();
    let with = |f: &dyn Fn(&mut Config)| {
        let mut c = running.clone();
        f(&mut c);
        assert_eq!(c.validate(), [], "the file alone is valid");
        c
    };
    // 3 targets from the file and 1 from the API: 37 slots are too few.
    let small = with(&|c| c.target_groups[0].hash_table_size = 37);
    let e = w.c.reload(small, w.at(0)).expect_err("reload accepted");
    assert!(
        format!("{e:#}").contains("hash_table_size: 37 slots for 4 targets in group \"web\""),
        "{e:#}"
    );
    // A listener on the API target's address.
    let vip = with(&|c| {
        let mut l = c.listeners[0].clone();
        l.name = "api".into();
        l.address = api.addr;
        c.listeners.push(l);
    });
    let e = w.c.reload(vip, w.at(0)).expect_err("reload accepted");
    assert!(
        format!("{e:#}")
            .contains("web/10.2.0.14:8080: address: 10.2.0.14 is the VIP of listener \"api\""),
        "{e:#}"
    );
    // The running config stays.
    assert_eq!(w.c.config, running);
    assert_eq!(w.step(0).applied, Applied::default());
    // 41 slots are enough; once the API target drains, 37 are too.
    w.c.reload(with(&|c| c.target_groups[0].hash_table_size = 41), w.at(0))
        .unwrap();
    w.c.deregister(&api, w.at(0)).unwrap();
    w.c.reload(with(&|c| c.target_groups[0].hash_table_size = 37), w.at(0))
        .unwrap();
}

/// A reload that opens a listener to every source while its group's table is still being
/// built: at every moment the listener's clients are allowed, by the old prefix or the new
/// flags (the old prefix goes only once the listener is written).
#[test]
fn a_listener_opening_up_while_its_table_builds_keeps_its_clients() {
    let mut w =
        World::new(|c| c.listeners[0].allowed_sources = vec!["10.1.0.0/24".parse().unwrap()]);
    let allowed = |m: &FakeMaps| {
        let open = m
            .listeners
            .values()
            .all(|l| l.flags & lb_common::LISTENER_F_ALLOW_ALL_V4 != 0);
        let prefix = m.sources.iter().any(|(_, p)| p.len == 24);
        open || prefix
    };
    assert!(allowed(&w.maps));
    w.c.reconciler.build_inline = false;
    let mut config = w.c.config.clone();
    config.listeners[0].allowed_sources = vec!["0.0.0.0/0".parse().unwrap()];
    config.target_groups[0].targets[0].weight = 300; // the table changes too
    w.c.reload(config, w.at(1000)).unwrap();
    let s = w.step(1000);
    assert_eq!(s.applied.pending, 1, "the table waits for its build");
    assert!(allowed(&w.maps), "clients refused while the table builds");
    for spec in w.c.reconciler.pending().to_vec() {
        let table = crate::reconcile::build_table(&spec).unwrap();
        w.c.reconciler.add_built(spec, table);
    }
    w.step(1000);
    assert!(w.maps.sources.is_empty());
    assert!(allowed(&w.maps));
}

/// An interface that came back with the same ifindex (the kernel dropped its devmap entry):
/// marked in doubt, it is written again by the next reconciliation.
#[test]
fn an_interface_in_doubt_is_written_again() {
    let mut w = World::new(|_| {});
    assert_eq!(w.step(100).applied, Applied::default());
    w.c.reconciler.doubt_interface(3);
    let before = w.maps.ops.len();
    w.step(200);
    assert_eq!(w.maps.ops[before..], ["add_interface 3 0x1"]);
    assert_eq!(w.step(300).applied, Applied::default());
}

/// The node in zone "a"; 11 and 12 in zone "a", 13 in zone "b" (unless `zone13` says).
fn zoned(zone13: Option<&str>, patch: impl Fn(&mut Config)) -> World {
    World::new(|c| {
        c.agent.zone = "a".into();
        let web = &mut c.target_groups[0];
        web.targets[0].zone = Some("a".into());
        web.targets[1].zone = Some("a".into());
        web.targets[2].zone = zone13.map(str::to_string);
        patch(c);
    })
}

impl World {
    fn scope(&self) -> ZoneScope {
        let g = &self.c.config.target_groups[0];
        state::zone_scope(&self.c.config, g, self.c.model.group_targets("web"))
    }

    fn all_healthy(&mut self, ms: u64) {
        for l in [11, 12, 13] {
            self.transition(l, TargetState::Healthy, ms);
        }
        self.step(ms);
    }
}

#[test]
fn new_flows_stay_in_the_nodes_zone_and_fall_back_when_it_has_no_healthy_target() {
    let mut w = zoned(Some("b"), |_| {});
    // Nothing healthy yet: fail-open, but within the node's zone.
    assert_eq!((w.scope(), w.slots().len()), (ZoneScope::Local, 2));
    assert!(w.slots().iter().all(|&(l, _)| l != 13), "{:?}", w.slots());
    w.all_healthy(1000);
    assert_eq!(w.scope(), ZoneScope::Local);
    let local = w.slots();
    assert_eq!(local.iter().map(|s| s.0).collect::<Vec<_>>(), [11, 12]);
    assert!(
        local.iter().all(|&(_, n)| n > 400),
        "weighted as usual: {local:?}"
    );
    // Zone a's targets fail: its flows fall back to zone b's healthy target.
    w.transition(11, TargetState::Unhealthy, 2000);
    w.transition(12, TargetState::Unhealthy, 2000);
    w.step(2000);
    assert_eq!(
        (w.scope(), w.slots()),
        (ZoneScope::Fallback, vec![(13, 1009)])
    );
    // Zone b's fails too: nothing healthy anywhere, fail-open over the node's zone.
    w.transition(13, TargetState::Unhealthy, 3000);
    w.step(3000);
    assert_eq!(w.scope(), ZoneScope::Local);
    assert_eq!(w.slots().iter().map(|s| s.0).collect::<Vec<_>>(), [11, 12]);
    // One of zone a's back: only it.
    w.transition(11, TargetState::Healthy, 4000);
    w.step(4000);
    assert_eq!((w.scope(), w.slots()), (ZoneScope::Local, vec![(11, 1009)]));
}

#[test]
fn cross_zone_or_a_node_without_a_zone_spreads_over_every_zone() {
    for (agent_zone, agent_cross, group_cross, want) in [
        ("a", false, Some(true), ZoneScope::All),
        ("a", true, None, ZoneScope::All),
        ("a", true, Some(false), ZoneScope::Local),
        ("", false, None, ZoneScope::All),
        ("", false, Some(false), ZoneScope::All),
    ] {
        let mut w = zoned(Some("b"), |c| {
            c.agent.zone = agent_zone.into();
            c.agent.cross_zone = agent_cross;
            c.target_groups[0].cross_zone = group_cross;
        });
        w.all_healthy(1000);
        let n = if want == ZoneScope::All { 3 } else { 2 };
        assert_eq!(
            (w.scope(), w.slots().len()),
            (want, n),
            "zone {agent_zone:?}, agent cross_zone {agent_cross}, group {group_cross:?}"
        );
    }
}

#[test]
fn a_target_without_a_zone_serves_every_zone() {
    let mut w = zoned(None, |_| {});
    w.all_healthy(1000);
    assert_eq!(w.slots().len(), 3, "{:?}", w.slots());
    // Zone a's two fail: the zone-less target is still local, so no fallback.
    w.transition(11, TargetState::Unhealthy, 2000);
    w.transition(12, TargetState::Unhealthy, 2000);
    w.step(2000);
    assert_eq!((w.scope(), w.slots()), (ZoneScope::Local, vec![(13, 1009)]));
}

#[test]
fn nodes_of_one_zone_build_the_same_table_whatever_the_order() {
    let table = |reverse: bool| {
        let mut w = zoned(Some("b"), |c| {
            if reverse {
                c.target_groups[0].targets.reverse();
            }
        });
        w.all_healthy(1000);
        let by_id: BTreeMap<u32, u8> = [11u8, 12, 13].into_iter().map(|l| (w.id(l), l)).collect();
        let held = &w.maps.held.tables[&w.web()].1;
        held.iter().map(|id| by_id[id]).collect::<Vec<u8>>()
    };
    let (a, b) = (table(false), table(true));
    assert_eq!(a.len(), 1009);
    assert_eq!(a, b, "same zone, same config: the same table");
}

#[test]
fn passive_ejection_takes_only_a_healthy_target_out() {
    let mut w = World::new(|_| {});
    // Initial targets are not ejected (their checks decide).
    assert!(!w.c.model.eject(&key(11), w.at(0)));
    w.all_healthy(1000);
    assert!(w.c.model.eject(&key(12), w.at(2000)));
    let t = &w.c.model.targets[&key(12)];
    assert_eq!(
        (t.health, t.reason),
        (TargetState::Unhealthy, Some(Reason::ConnectionsFailed))
    );
    assert!(!w.c.model.eject(&key(12), w.at(2100)), "already unhealthy");
    w.step(2000);
    assert_eq!(
        w.slots().iter().map(|s| s.0).collect::<Vec<_>>(),
        [11, 13],
        "out of the table at once"
    );
    assert_eq!(
        w.target_state(12),
        TARGET_RESCHEDULE,
        "termination on unhealthy"
    );
    // A draining target is not ejected.
    w.c.model
        .deregister(&key(13), w.at(3000), Duration::from_secs(30));
    assert!(!w.c.model.eject(&key(13), w.at(3000)));
}
