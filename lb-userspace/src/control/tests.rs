use std::time::Duration;

use lb_common::{TARGET_DROP, TARGET_FORWARD, TARGET_RESCHEDULE};

use super::*;
use crate::{
    health::{Outcome, Reason, Transition},
    reconcile::FakeMaps,
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
    fn new(patch: impl Fn(&mut Config)) -> Self {
        let mut config = crate::config::parse(CONFIG, "test.toml").unwrap();
        patch(&mut config);
        let t0 = Instant::now();
        let c = Controller::new(config, [1, 2], [3].into(), t0).unwrap();
        let mut w = Self {
            c,
            maps: FakeMaps::default(),
            t0,
        };
        w.step(0);
        w
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
        let k = key(last);
        let from = self.c.model.targets[&k].health;
        let outcome = if to == TargetState::Healthy {
            Outcome::Pass
        } else {
            Outcome::Fail(Reason::Timeout, "no connect within 500ms".into())
        };
        let event = HealthEvent {
            target: (),
            outcome,
            latency: Duration::from_millis(3),
            at: tokio::time::Instant::from_std(self.at(ms)),
            transition: Some(Transition {
                from,
                to,
                reason: (to == TargetState::Unhealthy).then_some(Reason::Timeout),
            }),
        };
        self.c.record(&k, &event);
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
        self.maps.targets[&self.id(last)].0
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
        assert!(w.step(30_999).removed.is_empty());
        assert_eq!(w.maps.targets[&id].0, TARGET_FORWARD);
        let s = w.step(31_000);
        assert_eq!(s.removed, [key(12)]);
        let expect = if terminate {
            TARGET_RESCHEDULE
        } else {
            TARGET_DROP
        };
        assert_eq!(w.maps.targets[&id].0, expect, "terminate={terminate}");
        assert!(!w.c.model.targets.contains_key(&key(12)));
        // Registering it again gives a new cookie: flows of the old registration never
        // count as its own.
        let old_cookie = w.maps.targets[&id].1;
        w.c.register(key(12), 100, None).unwrap();
        w.step(32_000);
        let new_id = w.id(12);
        assert_ne!(w.maps.targets[&new_id].1, old_cookie);
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
    assert_eq!(w.maps.vips, 0);
    assert!(s
        .changes
        .iter()
        .all(|c| c.to == TargetState::Unused || c.to == TargetState::Draining));
}

#[test]
fn endpoints_serving_two_listeners_are_marked_shared() {
    use lb_common::{REVERSE_F_AMBIGUOUS, TARGET_F_SHARED_ENDPOINT};
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
    // One listener alone: nothing shared.
    let w = World::new(|_| {});
    let d = w.c.desired(w.t0);
    assert!(d.targets.values().all(|t| t.flags == 0));
    assert!(d.reverse.values().all(|r| r.flags == 0));
}
