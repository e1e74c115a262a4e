use std::time::Duration;

use super::*;
use crate::{health::TargetState, maps::FakeMaps};

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

[[target_group.target]]
address = "10.2.0.11"
port = 8080

[[target_group.target]]
address = "10.2.0.12"
port = 8080

[[target_group.target]]
address = "10.2.0.13"
port = 8080
"#;

/// A controller on CONFIG (patched by `edit`), its maps written.
fn running(edit: &str) -> (Controller, FakeMaps, Instant) {
    let config = crate::config::parse(&format!("{CONFIG}{edit}"), "t.toml").expect("config");
    let t0 = Instant::now();
    let mut ctl =
        Controller::new(config, [1, 2], [("eth0".to_string(), 3)].into(), t0).expect("controller");
    let mut maps = FakeMaps::default();
    ctl.reconcile(&mut maps, t0).expect("reconcile");
    (ctl, maps, t0)
}

fn parse(text: &str) -> Config {
    crate::config::parse(text, "new.toml").expect("new config")
}

fn group<'a>(p: &'a Plan, name: &str) -> &'a GroupPlan {
    p.groups.iter().find(|g| g.name == name).expect("group")
}

fn target(g: &GroupPlan, last: u8) -> &TargetPlan {
    let want = format!("10.2.0.{last}:8080");
    g.targets
        .iter()
        .find(|t| t.target.to_string() == want)
        .expect("target")
}

/// Slots of group 0's table in `maps` by target id.
fn table(maps: &FakeMaps, gid: u32) -> Vec<u32> {
    maps.held.tables[&gid].1.clone()
}

#[test]
fn a_weight_change_moves_what_the_reload_then_moves() {
    let (mut ctl, mut maps, t0) = running("");
    let new = CONFIG.replacen("port = 8080\n", "port = 8080\nweight = 300\n", 1);
    let p = plan(&ctl, parse(&new), "new.toml", t0)
        .expect("plan")
        .with_flows(&LiveFlows::new());
    let web = group(&p, "web");
    assert_eq!(web.change, "changed");
    let (b11, b12) = (target(web, 11), target(web, 12));
    assert!((b11.share_before - 1.0 / 3.0).abs() < 0.02, "{b11:?}");
    assert!((b11.share_after - 0.6).abs() < 0.03, "{b11:?}");
    assert!((b12.share_after - 0.2).abs() < 0.03, "{b12:?}");
    assert_eq!(b11.fate, "stays");

    // The reload itself moves exactly the slots the plan said.
    let gid = ctl.model.group_ids.get(&"web".to_string()).unwrap();
    let before = table(&maps, gid);
    ctl.reload(parse(&new), t0).expect("reload");
    ctl.reconcile(&mut maps, t0).expect("reconcile");
    let after = table(&maps, gid);
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count() as u64;
    assert_eq!(web.slots_moved, moved);
    assert!(moved > 200, "{moved}");
}

#[test]
fn nothing_changed_moves_nothing() {
    let (ctl, _, t0) = running("");
    let p = plan(&ctl, parse(CONFIG), "same.toml", t0)
        .unwrap()
        .with_flows(&LiveFlows::new());
    assert_eq!(group(&p, "web").change, "unchanged");
    assert_eq!(group(&p, "web").slots_moved, 0);
}

#[test]
fn live_flows_of_a_removed_target_are_draining_and_of_a_removed_group_removed() {
    let (ctl, _, t0) = running("");
    let id = |last: u8| {
        let k = TargetKey {
            group: "web".into(),
            addr: format!("10.2.0.{last}").parse().unwrap(),
            port: 8080,
        };
        let t = &ctl.model.targets[&k];
        (t.id, t.cookie)
    };
    let live: LiveFlows = [(id(11), 5), (id(12), 7), (id(13), 2), ((id(13).0, 999), 40)].into();

    // b13 leaves the config: it drains (its 2 flows go on; the stale cookie's do not count).
    let without_13 = CONFIG.replace(
        "\n[[target_group.target]]\naddress = \"10.2.0.13\"\nport = 8080\n",
        "",
    );
    let p = plan(&ctl, parse(&without_13), "n.toml", t0)
        .unwrap()
        .with_flows(&live);
    let web = group(&p, "web");
    assert_eq!(target(web, 13).fate, "draining");
    assert!(target(web, 13).stops_new_flows);
    assert_eq!(
        (web.flows_draining, web.flows_removed, web.flows_terminated),
        (2, 0, 0)
    );
    assert_eq!(p.live_flows, 14);

    // The group goes (its listener too): every flow of its targets is removed.
    let no_group = "[agent]\ninterfaces = [\"eth0\"]\n";
    let p = plan(&ctl, parse(no_group), "n.toml", t0)
        .unwrap()
        .with_flows(&live);
    let web = group(&p, "web");
    assert_eq!(web.change, "removed");
    assert_eq!((web.flows_removed, web.share_moved), (14, 1.0));
    assert!(web
        .targets
        .iter()
        .all(|t| t.fate == "removed" && t.stops_new_flows));
}

#[test]
fn flows_of_an_unhealthy_target_are_terminated_when_termination_turns_on() {
    let (mut ctl, mut maps, t0) = running("");
    let kept = CONFIG.replace(
        "deregistration_delay = \"30s\"",
        "deregistration_delay = \"30s\"\nconnection_termination_on_unhealthy = false",
    );
    ctl.reload(parse(&kept), t0).unwrap();
    // 11 and 12 healthy, 13 unhealthy: its flows keep going (termination off).
    for (last, state) in [
        (11, TargetState::Healthy),
        (12, TargetState::Healthy),
        (13, TargetState::Unhealthy),
    ] {
        let k = TargetKey {
            group: "web".into(),
            addr: format!("10.2.0.{last}").parse().unwrap(),
            port: 8080,
        };
        let outcome = if state == TargetState::Healthy {
            crate::health::Outcome::Pass
        } else {
            crate::health::Outcome::Fail(crate::health::Reason::Timeout, String::new())
        };
        let transition = crate::health::Transition {
            from: TargetState::Initial,
            to: state,
            reason: None,
        };
        ctl.model
            .record_check(&k, &outcome, Duration::ZERO, Some(transition), t0);
    }
    ctl.reconcile(&mut maps, t0).unwrap();
    let t13 = ctl
        .model
        .targets
        .values()
        .find(|t| t.health == TargetState::Unhealthy)
        .unwrap();
    let live: LiveFlows = [((t13.id, t13.cookie), 3)].into();
    let p = plan(&ctl, parse(CONFIG), "n.toml", t0)
        .unwrap()
        .with_flows(&live);
    let web = group(&p, "web");
    assert_eq!(target(web, 13).fate, "terminated");
    assert_eq!(web.flows_terminated, 3);
}
