use std::{collections::BTreeMap, net::IpAddr, time::Instant};

use super::*;
use crate::{config::Config, health::TargetState, model::Model};

/// Two VIPs: .10 with listeners on groups "web" (two targets) and "api" (one), .20 with one
/// on "web"; node in zone a, "web"'s second target in zone b.
const CONFIG: &str = r#"[agent]
interfaces = ["eth0"]
zone = "a"

[announce]
bird_socket = "/run/bird/bird.ctl"
return_routes = ["10.0.1.0/24"]

[[listener]]
name = "web"
address = "10.9.0.10"
port = 80
target_group = "web"

[[listener]]
name = "api"
address = "10.9.0.10"
port = 8443
target_group = "api"

[[listener]]
name = "web2"
address = "10.9.0.20"
port = 80
target_group = "web"

[[target_group]]
name = "web"

[[target_group.target]]
address = "10.2.0.11"
port = 8080
zone = "a"

[[target_group.target]]
address = "10.2.0.12"
port = 8080
zone = "b"

[[target_group]]
name = "api"

[[target_group.target]]
address = "10.2.0.21"
port = 8080
"#;

fn world() -> (Config, Model) {
    let config = crate::config::parse(CONFIG, "lb.toml").expect("config");
    let mut model = Model::default();
    model.sync_config(&config, Instant::now()).expect("model");
    (config, model)
}

fn set(model: &mut Model, group: &str, last: u8, health: TargetState) {
    let t = model
        .targets
        .iter_mut()
        .find(|(k, _)| k.group == group && k.addr.to_string() == format!("10.2.0.{last}"))
        .expect("target");
    t.1.health = health;
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn vip(s: &str) -> Route {
    Route::Vip(ip(s))
}

fn reasons(w: &BTreeMap<Route, Why>) -> Vec<(String, &'static str, bool)> {
    w.iter()
        .map(|(r, why)| {
            let p = r.prefix();
            (
                format!("{}/{}", p.addr, p.len),
                why.as_str(),
                why.announce(),
            )
        })
        .collect()
}

#[test]
fn a_starting_node_announces_only_once_checks_say_it_can_serve() {
    let (config, mut model) = world();
    let w = wanted(&config, &model, NodeMode::Serving);
    assert_eq!(
        reasons(&w),
        [
            ("10.9.0.10/32".into(), "checking", false),
            ("10.9.0.20/32".into(), "checking", false),
            // Replies pass through any node: its return route is announced from the start.
            ("10.0.1.0/24".into(), "serving", true),
        ]
    );
    // One healthy target behind one of .10's listeners is enough for .10; .20 follows "web".
    set(&mut model, "api", 21, TargetState::Healthy);
    let w = wanted(&config, &model, NodeMode::Serving);
    assert_eq!(w[&vip("10.9.0.10")], Why::Serving);
    assert_eq!(w[&vip("10.9.0.20")], Why::Checking);
}

#[test]
fn fail_open_announces_once_every_candidate_was_checked() {
    let (config, mut model) = world();
    // "api": its one target checked and down: fail-open, as the data plane does.
    set(&mut model, "api", 21, TargetState::Unhealthy);
    assert_eq!(
        wanted(&config, &model, NodeMode::Serving)[&vip("10.9.0.10")],
        Why::FailOpen
    );
    // "web" in zone a: zone a's only target down, zone b's unchecked: the group fails open
    // within zone a (the data plane's scope), which was checked.
    set(&mut model, "web", 11, TargetState::Unhealthy);
    assert_eq!(
        wanted(&config, &model, NodeMode::Serving)[&vip("10.9.0.20")],
        Why::FailOpen
    );
    // Zone b healthy: the zone fallback serves.
    set(&mut model, "web", 12, TargetState::Healthy);
    assert_eq!(
        wanted(&config, &model, NodeMode::Serving)[&vip("10.9.0.20")],
        Why::Serving
    );
}

#[test]
fn fail_open_withdraws_when_told_to() {
    let (mut config, mut model) = world();
    config.announce.fail_open = false;
    set(&mut model, "api", 21, TargetState::Unhealthy);
    let w = wanted(&config, &model, NodeMode::Serving);
    assert_eq!(w[&vip("10.9.0.10")], Why::FailOpenWithdrawn);
    assert!(!w[&vip("10.9.0.10")].announce());
    // Another listener of the same VIP that serves announces it all the same.
    set(&mut model, "web", 11, TargetState::Healthy);
    assert_eq!(
        wanted(&config, &model, NodeMode::Serving)[&vip("10.9.0.10")],
        Why::Serving
    );
}

#[test]
fn one_unchecked_candidate_keeps_fail_open_from_announcing() {
    let (mut config, mut model) = world();
    config.agent.zone = String::new(); // every zone: both of web's targets are candidates
    set(&mut model, "web", 11, TargetState::Unhealthy);
    assert_eq!(
        wanted(&config, &model, NodeMode::Serving)[&vip("10.9.0.20")],
        Why::Checking
    );
    set(&mut model, "web", 12, TargetState::Unhealthy);
    assert_eq!(
        wanted(&config, &model, NodeMode::Serving)[&vip("10.9.0.20")],
        Why::FailOpen
    );
}

#[test]
fn draining_targets_do_not_serve_and_a_group_without_targets_withdraws() {
    let (config, mut model) = world();
    for t in model.targets.values_mut() {
        t.health = TargetState::Healthy;
        t.draining_until = Some(Instant::now());
    }
    let w = wanted(&config, &model, NodeMode::Serving);
    assert_eq!(w[&vip("10.9.0.10")], Why::NoTarget);
    assert!(!w[&vip("10.9.0.10")].announce());
}

#[test]
fn drain_and_stop_withdraw_every_vip_and_return_route() {
    let (config, mut model) = world();
    for t in model.targets.values_mut() {
        t.health = TargetState::Healthy;
    }
    for (mode, why) in [
        (NodeMode::Draining, Why::Draining),
        (NodeMode::Stopping, Why::Stopping),
    ] {
        let w = wanted(&config, &model, mode);
        assert_eq!(w.len(), 3);
        assert!(w.values().all(|&w| w == why && !w.announce()), "{w:?}");
    }
}

#[test]
fn protocol_names_are_bird_symbols() {
    let routes = [
        (vip("198.18.100.10"), "lb_vip_198_18_100_10"),
        (vip("fd00:100::10"), "lb_vip6_fd00_100__10"),
        (
            Route::Return("0.0.0.0/0".parse().unwrap()),
            "lb_return_0_0_0_0_0",
        ),
        (
            Route::Return("fd00:1::/64".parse().unwrap()),
            "lb_return6_fd00_1___64",
        ),
    ];
    for (route, name) in routes {
        assert_eq!(route.protocol(), name);
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        assert!(is_ours(name));
    }
    assert!(!is_ours("uplink"));
}

#[test]
fn the_include_file_holds_one_static_protocol_per_route_disabled_unless_announced() {
    let routes = BTreeMap::from([
        (vip("10.9.0.10"), true),
        (vip("fd00:100::10"), false),
        (Route::Return("0.0.0.0/0".parse().unwrap()), true),
    ]);
    let text = render(&routes);
    for want in [
        "protocol static lb_vip_10_9_0_10 {\n\tipv4;\n\troute 10.9.0.10/32 blackhole;\n\tdisabled no;\n}",
        "protocol static lb_vip6_fd00_100__10 {\n\tipv6;\n\troute fd00:100::10/128 blackhole;\n\tdisabled yes;\n}",
        "protocol static lb_return_0_0_0_0_0 {\n\tipv4;\n\troute 0.0.0.0/0 blackhole;\n\tdisabled no;\n}",
    ] {
        assert!(text.contains(want), "{want}\nnot in\n{text}");
    }
    assert_eq!(text.matches("protocol static").count(), 3);
}
