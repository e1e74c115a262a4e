//! The controller converges whatever the maps answer: random sequences of reloads,
//! registrations, health transitions, time, restarts and injected write faults; once the
//! faults stop, what the maps hold equals the desired state (the address filter's counts
//! included), and at no point did a packet meet a reference to something not written, or an
//! address filter that counts fewer VIPs or target endpoints than the maps hold.

use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::{
    health::{Outcome, Reason, Transition},
    maps::{FakeMaps, Fault, FaultyMaps, MapWriter},
    reconcile::{expected_view, Reconciler},
};

/// A config out of a few knobs: the group's name (a rename is a blue/green switch), its table
/// size, which static targets it lists, and group options.
#[derive(Clone, Debug)]
struct Shape {
    generation: u8,
    size: u32,
    targets: u8,
    terminate_unhealthy: bool,
    slow_start: bool,
    second_listener: bool,
}

const ADDRS: [&str; 5] = [
    "10.2.0.11",
    "10.2.0.12",
    "10.2.0.13",
    "10.2.0.14",
    "10.2.0.15",
];

fn config(s: &Shape) -> Config {
    let group = format!("web-{}", s.generation);
    let mut text = format!(
        r#"[agent]
interfaces = ["eth0", "eth1"]
target_interfaces = ["eth1"]

[[listener]]
name = "web"
address = "10.9.0.10"
port = 80
target_group = "{group}"
"#
    );
    if s.second_listener {
        text += r#"
[[listener]]
name = "dns"
address = "10.9.0.11"
port = 53
protocol = "udp"
target_group = "dns"
allowed_sources = ["10.1.0.0/24", "10.3.0.0/16"]

[[target_group]]
name = "dns"
hash_table_size = 101

[[target_group.target]]
address = "10.2.0.11"
port = 53
"#;
    }
    text += &format!(
        r#"
[[target_group]]
name = "{group}"
hash_table_size = {}
deregistration_delay = "2s"
connection_termination_on_unhealthy = {}
slow_start = "{}"
"#,
        s.size,
        s.terminate_unhealthy,
        if s.slow_start { "10s" } else { "0s" }
    );
    for (i, a) in ADDRS.iter().enumerate() {
        if s.targets & (1 << i) != 0 {
            text += &format!("\n[[target_group.target]]\naddress = \"{a}\"\nport = 8080\n");
        }
    }
    crate::config::parse(&text, "converge.toml").expect("a valid config")
}

#[derive(Clone, Debug)]
enum Op {
    Reload(Shape),
    Register(usize),
    Deregister(usize),
    Health(usize, bool),
    Wait(u64),
    /// The write `n` writes from now fails so.
    Fault(u64, Fault),
    Reconcile,
    /// The agent stops (wherever the writes were) and a new one adopts the maps.
    Restart,
}

fn shape() -> impl Strategy<Value = Shape> {
    (
        0u8..4,
        prop::sample::select(vec![97u32, 101, 211]),
        0u8..32,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(generation, size, targets, terminate_unhealthy, slow_start, second_listener)| Shape {
                generation,
                size,
                targets,
                terminate_unhealthy,
                slow_start,
                second_listener,
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    let fault = prop_oneof![Just(Fault::Fail), Just(Fault::Full), Just(Fault::FailAfter)];
    prop_oneof![
        2 => shape().prop_map(Op::Reload),
        2 => (0..ADDRS.len()).prop_map(Op::Register),
        1 => (0..ADDRS.len()).prop_map(Op::Deregister),
        3 => (0..ADDRS.len(), any::<bool>()).prop_map(|(i, h)| Op::Health(i, h)),
        2 => prop::sample::select(vec![100u64, 1000, 3000, 6000]).prop_map(Op::Wait),
        3 => (0u64..12, fault).prop_map(|(n, f)| Op::Fault(n, f)),
        4 => Just(Op::Reconcile),
        1 => Just(Op::Restart),
    ]
}

struct Run {
    c: Controller,
    maps: FaultyMaps,
    now: Instant,
}

fn interfaces() -> BTreeMap<String, u32> {
    [("eth0".to_string(), 3), ("eth1".to_string(), 4)].into()
}

impl Run {
    fn group(&self) -> String {
        self.c
            .config
            .listeners
            .iter()
            .find(|l| l.name == "web")
            .map(|l| l.target_group.clone())
            .expect("the web listener")
    }

    fn key(&self, i: usize) -> TargetKey {
        TargetKey {
            group: self.group(),
            addr: ADDRS[i].parse().expect("address"),
            port: 8080,
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Reload(s) => {
                let mut config = config(&s);
                let (agent, _) = reloaded_agent(&self.c.config.agent, &config.agent);
                config.agent = agent;
                // A reload the model refuses (ids exhausted) leaves the old config: fine here.
                let _ = self.c.reload(config, self.now);
            }
            Op::Register(i) => {
                let _ = self.c.register(self.key(i), 1 + i as u32, None);
            }
            Op::Deregister(i) => {
                let _ = self.c.deregister(&self.key(i), self.now);
            }
            Op::Health(i, healthy) => {
                let k = self.key(i);
                let Some(t) = self.c.model.targets.get(&k) else {
                    return;
                };
                let to = if healthy {
                    TargetState::Healthy
                } else {
                    TargetState::Unhealthy
                };
                if t.health == to {
                    return;
                }
                let event = HealthEvent {
                    target: (),
                    generation: 0,
                    outcome: if healthy {
                        Outcome::Pass
                    } else {
                        Outcome::Fail(Reason::Timeout, "timeout".into())
                    },
                    latency: Duration::from_millis(1),
                    at: tokio::time::Instant::from_std(self.now),
                    transition: Some(Transition {
                        from: t.health,
                        to,
                        reason: (!healthy).then_some(Reason::Timeout),
                    }),
                };
                self.c.record(&k, &event);
            }
            Op::Wait(ms) => self.now += Duration::from_millis(ms),
            Op::Fault(n, f) => self.maps.fail_in(n, f),
            Op::Reconcile => {
                // Failures are the point; convergence is checked at the end.
                let _ = self.c.reconcile(&mut self.maps, self.now);
            }
            Op::Restart => {
                let saved = self.c.model.save(self.now);
                let view = self.maps.view().expect("a fake's view");
                let model = crate::model::Model::restore(saved, self.now);
                self.c = Controller::adopted(
                    self.c.config.clone(),
                    model,
                    view.config.hash_key,
                    interfaces(),
                    Reconciler::from_view(&view),
                );
                // Adoption starts from a fresh build of every table, as at start-up.
                self.c.reconciler.build_inline = true;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn converges_once_faults_stop(first in shape(), ops in prop::collection::vec(op(), 1..40)) {
        let t0 = Instant::now();
        let c = Controller::new(config(&first), [7, 9], interfaces(), t0).expect("controller");
        let mut run = Run { c, maps: FaultyMaps::new(FakeMaps::checking()), now: t0 };
        for (n, op) in ops.into_iter().enumerate() {
            run.apply(op.clone());
            // The address filter never hides an entry the maps hold (the fake also checks
            // this after every single write).
            let shortfalls = run.maps.view().expect("view").filter_shortfalls();
            prop_assert!(shortfalls.is_empty(), "after step {} ({:?}): {:#?}", n, op, shortfalls);
        }
        run.maps.faults.clear();
        let step = run.c.reconcile(&mut run.maps, run.now);
        prop_assert!(step.is_ok(), "a reconcile without faults failed: {:?}", step.err());
        let again = run.c.reconcile(&mut run.maps, run.now).expect("a second reconcile");
        prop_assert_eq!(again.applied, Default::default(), "the second reconcile wrote again");
        let desired = expected_view(&run.c.desired(run.now)).expect("building the desired tables");
        let view = run.maps.view().expect("view");
        prop_assert_eq!(view, desired);
        prop_assert!(
            run.maps.inner.violations.is_empty(),
            "a packet could meet a dangling reference: {:#?}",
            run.maps.inner.violations
        );
    }
}
