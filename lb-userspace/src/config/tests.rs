use super::*;

const EXAMPLE: &str = include_str!("example.toml");

/// A small valid config; cases below change one thing in it.
const BASE: &str = r#"[agent]
interfaces = ["eth0"]

[[listener]]
name = "web"
address = "198.18.100.10"
port = 80
target_group = "web"

[[target_group]]
name = "web"

[target_group.health_check]
interval = "10s"
timeout = "5s"

[[target_group.target]]
address = "198.18.2.11"
port = 8080

[[target_group.target]]
address = "198.18.2.12"
port = 8080
"#;

fn problems(src: &str) -> Vec<String> {
    match parse(src, "lb.toml") {
        Ok(_) => Vec::new(),
        Err(e) => e.to_string().lines().map(String::from).collect(),
    }
}

/// `src` is rejected with exactly one problem, `lb.toml:LINE: PATH: ...MESSAGE...`.
#[track_caller]
fn rejects(src: &str, line: usize, path: &str, message: &str) {
    let got = problems(src);
    assert_eq!(got.len(), 1, "expected one problem, got {got:#?}");
    let prefix = format!("lb.toml:{line}: {path}: ");
    assert!(
        got[0].starts_with(&prefix) && got[0].contains(message),
        "expected {prefix}…{message}…, got {:?}",
        got[0]
    );
}

#[test]
fn example_sets_every_key() {
    let c = parse(EXAMPLE, "example.toml").expect("the spec's example is valid");
    assert_eq!(c.agent.interfaces, ["eth0"]);
    assert_eq!(c.agent.xdp_mode, XdpMode::Native);
    assert_eq!(c.agent.api, "unix:/run/lb-agent/api.sock");
    assert_eq!(c.agent.metrics, "127.0.0.1:9900");
    assert_eq!(c.agent.pin_path, "/sys/fs/bpf/lb");
    assert_eq!(c.agent.flow_table_size, 1_048_576);
    assert_eq!(c.agent.hash_seed, "");
    assert_eq!(c.agent.target_interfaces, Some(vec!["eth0".to_string()]));
    assert_eq!(c.agent.flow_insert_limit, 125_000);
    assert!(c.agent.route_cache);
    let l = &c.listeners[0];
    assert_eq!(
        (l.name.as_str(), l.port.0, l.protocol),
        ("web", 80, Protocol::Tcp)
    );
    assert_eq!(l.address, "198.18.100.10".parse::<IpAddr>().unwrap());
    assert_eq!(l.allowed_sources.len(), 2);
    assert_eq!(l.idle_timeout, Some(Duration::from_secs(350)));
    let g = &c.target_groups[0];
    assert_eq!(g.forwarding, Forwarding::Nat);
    assert_eq!(g.stickiness, Stickiness::None);
    assert_eq!(g.deregistration_delay, Duration::from_secs(300));
    assert!(!g.connection_termination_on_deregistration);
    assert!(g.connection_termination_on_unhealthy);
    assert_eq!(g.unhealthy_draining_interval, Duration::from_secs(0));
    assert_eq!(g.slow_start, Duration::from_secs(0));
    assert_eq!(g.hash_table_size, 65537);
    let h = &g.health_check;
    assert_eq!(h.protocol, HealthCheckProtocol::Http);
    assert_eq!(h.port, HealthCheckPort::TrafficPort);
    assert_eq!(h.path, "/health");
    assert_eq!(h.matcher.to_string(), "200-399");
    assert_eq!(
        (h.interval, h.timeout),
        (Duration::from_secs(10), Some(Duration::from_secs(6)))
    );
    assert_eq!((h.healthy_threshold, h.unhealthy_threshold), (3, 3));
    let t = &g.targets[0];
    assert_eq!(
        (t.port.0, t.weight, t.zone.as_deref()),
        (8080, 100, Some("a"))
    );
    let a = &c.announce;
    assert!(!a.enabled());
    assert_eq!(a.bird_config, "/run/lb-agent-bird/vips.conf");
    assert!(a.return_routes.is_empty());
    assert!(a.fail_open);
    assert_eq!(
        (a.drain_timeout, a.withdraw_grace),
        (Duration::from_secs(60), Duration::from_secs(2))
    );
    // Every key of the spec is in the example: serializing the parsed config gives no key the
    // example lacks (the Option keys left unset in the spec are the only exceptions).
    let reparsed: Config = toml::from_str(EXAMPLE).unwrap();
    assert_eq!(reparsed, c);
}

/// The agent keeps the config it applied in its state file (JSON): it must read back equal.
#[test]
fn config_round_trips_through_json() {
    let mut c = parse(EXAMPLE, "example.toml").unwrap();
    c.target_groups[0].health_check.port = HealthCheckPort::Port(8081);
    c.target_groups[0].targets[0].zone = None;
    let json = serde_json::to_string(&c).unwrap();
    let back: Config = serde_json::from_str(&json).unwrap();
    assert_eq!(back, c);
}

#[test]
fn defaults_follow_nlb() {
    let c = parse(BASE, "lb.toml").unwrap();
    assert_eq!(c.agent.xdp_mode, XdpMode::Native);
    assert_eq!(c.agent.api, DEFAULT_API);
    assert_eq!(c.agent.target_interfaces, None, "derived unless set");
    assert_eq!(
        c.agent.flow_insert_limit,
        lb_common::maps::DEFAULT_FLOW_INSERT_LIMIT
    );
    assert!(
        c.agent.route_cache,
        "the next-hop cache is on unless turned off"
    );
    let l = &c.listeners[0];
    assert_eq!(l.protocol, Protocol::Tcp);
    assert_eq!(l.idle_timeout_for(lb_common::PROTO_TCP).as_secs(), 350);
    assert_eq!(l.idle_timeout_for(lb_common::PROTO_UDP).as_secs(), 120);
    assert_eq!(l.allowed_sources, default_allowed_sources());
    let g = &c.target_groups[0];
    assert_eq!(g.deregistration_delay.0.as_secs(), 300);
    assert!(g.connection_termination_on_unhealthy);
    let h = &g.health_check;
    assert_eq!(h.protocol, HealthCheckProtocol::Tcp);
    assert_eq!(h.effective_timeout().as_secs(), 5);
    assert_eq!((h.healthy_threshold, h.unhealthy_threshold), (5, 2));
    assert_eq!(g.targets[0].weight, DEFAULT_WEIGHT);
    let http = HealthCheckConfig {
        protocol: HealthCheckProtocol::Http,
        ..Default::default()
    };
    assert_eq!(http.effective_timeout().as_secs(), 6);
    assert_eq!(HealthCheckConfig::default().interval.0.as_secs(), 30);
}

#[test]
fn unknown_key() {
    let src = BASE.replace("port = 80\n", "port = 80\ncolour = \"blue\"\n");
    rejects(&src, 8, "listener[0].colour", "unknown field `colour`");
    let src = BASE.replace("[agent]\n", "[agent]\nintreface = \"x\"\n");
    rejects(&src, 2, "agent.intreface", "unknown field");
    rejects(
        &format!("{BASE}\n[extra]\n"),
        25,
        "extra",
        "unknown field `extra`",
    );
}

#[test]
fn wrong_type() {
    rejects(
        &BASE.replace("port = 80\n", "port = \"80\"\n"),
        7,
        "listener[0].port",
        "invalid type",
    );
    rejects(
        &BASE.replace("interfaces = [\"eth0\"]", "interfaces = \"eth0\""),
        2,
        "agent.interfaces",
        "invalid type",
    );
    rejects(
        &BASE.replace("interval = \"10s\"", "interval = 10"),
        14,
        "target_group[0].health_check.interval",
        "duration",
    );
}

#[test]
fn bad_enum_value() {
    rejects(
        &BASE.replace("port = 80\n", "port = 80\nprotocol = \"sctp\"\n"),
        8,
        "listener[0].protocol",
        "unknown variant `sctp`",
    );
}

#[test]
fn duplicate_names() {
    let two_listeners = BASE.replace(
        "[[target_group]]",
        "[[listener]]\nname = \"web\"\naddress = \"198.18.100.11\"\nport = 80\ntarget_group = \"web\"\n\n[[target_group]]",
    );
    rejects(
        &two_listeners,
        11,
        "listener[1].name",
        "duplicate listener name \"web\"",
    );
    let two_groups = format!("{BASE}\n[[target_group]]\nname = \"web\"\n");
    rejects(
        &two_groups,
        26,
        "target_group[1].name",
        "duplicate target_group name",
    );
}

#[test]
fn listener_naming_missing_group() {
    rejects(
        &BASE.replace("target_group = \"web\"", "target_group = \"api\""),
        8,
        "listener[0].target_group",
        "no target_group is named \"api\"",
    );
}

#[test]
fn vip_and_target_of_different_families() {
    rejects(
        &BASE.replace("\"198.18.2.12\"", "\"fd00::12\""),
        22,
        "target_group[0].target[1].address",
        "fd00::12 and VIP 198.18.100.10 of listener \"web\" are of different address families",
    );
}

#[test]
fn port_out_of_range() {
    rejects(
        &BASE.replace("port = 80\n", "port = 0\n"),
        7,
        "listener[0].port",
        "port 0 is outside 1..=65535",
    );
    rejects(
        &BASE.replace("port = 80\n", "port = 65536\n"),
        7,
        "listener[0].port",
        "port 65536 is outside",
    );
    rejects(
        &BASE.replace("interval = \"10s\"", "interval = \"10s\"\nport = 70000"),
        15,
        "target_group[0].health_check.port",
        "outside 1..=65535",
    );
}

#[test]
fn thresholds_outside_2_to_10() {
    rejects(
        &BASE.replace(
            "interval = \"10s\"",
            "interval = \"10s\"\nhealthy_threshold = 1",
        ),
        15,
        "target_group[0].health_check.healthy_threshold",
        "1 is outside 2..=10",
    );
    rejects(
        &BASE.replace(
            "interval = \"10s\"",
            "interval = \"10s\"\nunhealthy_threshold = 11",
        ),
        15,
        "target_group[0].health_check.unhealthy_threshold",
        "11 is outside 2..=10",
    );
}

#[test]
fn timeout_not_below_interval() {
    rejects(
        &BASE.replace("timeout = \"5s\"", "timeout = \"10s\""),
        15,
        "target_group[0].health_check.timeout",
        "must be shorter than interval 10s",
    );
    // The tcp default timeout (10s) against a 5s interval, though timeout is not written.
    rejects(
        &BASE.replace("interval = \"10s\"\ntimeout = \"5s\"", "interval = \"5s\""),
        13,
        "target_group[0].health_check.timeout",
        "10s must be shorter than interval 5s",
    );
    rejects(
        &BASE.replace(
            "interval = \"10s\"\ntimeout = \"5s\"",
            "interval = \"500ms\"\ntimeout = \"100ms\"",
        ),
        14,
        "target_group[0].health_check.interval",
        "outside 1s..300s",
    );
}

#[test]
fn bad_matcher() {
    rejects(
        &BASE.replace(
            "interval = \"10s\"",
            "interval = \"10s\"\nmatcher = \"200-99x\"",
        ),
        15,
        "target_group[0].health_check.matcher",
        "not an HTTP status code",
    );
}

#[test]
fn weight_outside_range() {
    rejects(
        &BASE.replace("port = 8080\n\n", "port = 8080\nweight = 0\n\n"),
        20,
        "target_group[0].target[0].weight",
        "0 is outside 1..=65535",
    );
    rejects(
        &BASE.replace("port = 8080\n\n", "port = 8080\nweight = 65536\n\n"),
        20,
        "target_group[0].target[0].weight",
        "65536 is outside",
    );
}

#[test]
fn bad_cidr() {
    rejects(
        &BASE.replace(
            "port = 80\n",
            "port = 80\nallowed_sources = [\"10.0.0.1/8\"]\n",
        ),
        8,
        "listener[0].allowed_sources[0]",
        "host bits set",
    );
    rejects(
        &BASE.replace(
            "port = 80\n",
            "port = 80\nallowed_sources = [\"10.0.0.0/40\"]\n",
        ),
        8,
        "listener[0].allowed_sources[0]",
        "length must be 0..=32",
    );
}

#[test]
fn duplicate_target() {
    rejects(
        &BASE.replace("198.18.2.12", "198.18.2.11"),
        22,
        "target_group[0].target[1].address",
        "duplicate target 198.18.2.11:8080",
    );
}

#[test]
fn target_equal_to_vip() {
    rejects(
        &BASE.replace("198.18.2.12", "198.18.100.10"),
        22,
        "target_group[0].target[1].address",
        "198.18.100.10 is the VIP of listener \"web\"",
    );
}

#[test]
fn addresses_that_can_never_be_targets() {
    for (addr, kind) in [
        ("127.0.0.1", "a loopback"),
        ("224.0.0.9", "a multicast"),
        ("0.0.0.0", "an unspecified"),
    ] {
        rejects(
            &BASE.replace("198.18.2.12", addr),
            22,
            "target_group[0].target[1].address",
            &format!("{addr} is {kind} address; it cannot be a target"),
        );
    }
}

#[test]
fn fewer_than_10_slots_per_target() {
    // Two targets, 13 slots: one problem for the group, not one per target.
    rejects(
        &BASE.replace(
            "name = \"web\"\n\n[target_group.health_check]",
            "name = \"web\"\nhash_table_size = 13\n\n[target_group.health_check]",
        ),
        12,
        "target_group[0].hash_table_size",
        "13 slots for 2 targets in group \"web\"; use at least 10 slots per target",
    );
    let ok = BASE.replace(
        "name = \"web\"\n\n[target_group.health_check]",
        "name = \"web\"\nhash_table_size = 23\n\n[target_group.health_check]",
    );
    assert_eq!(problems(&ok), Vec::<String>::new());
}

/// BASE with `n` targets in its group (a table large enough for them), served over `protocol`.
fn with_targets(n: u32, protocol: Protocol) -> Config {
    let mut c = parse(BASE, "lb.toml").unwrap();
    c.listeners[0].protocol = protocol;
    let g = &mut c.target_groups[0];
    g.hash_table_size = 1_000_003;
    g.targets = (0..n)
        .map(|i| TargetConfig {
            address: IpAddr::from([10, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8]),
            port: Port(8080),
            weight: DEFAULT_WEIGHT,
            zone: None,
        })
        .collect();
    c
}

#[test]
fn at_most_half_the_target_slots_in_all() {
    assert_eq!(with_targets(8192, Protocol::Tcp).validate(), []);
    assert_eq!(
        with_targets(8193, Protocol::Tcp).validate(),
        [(
            "target_group".to_string(),
            "8193 targets in all; at most 8192 (half of the data plane's 16384 target slots; the other half is for draining)".to_string()
        )]
    );
}

#[test]
fn reply_entries_fit_lb_reverse() {
    // tcp_udp: two LB_REVERSE entries per target endpoint. From the file alone, 16384 entries
    // need more targets than 8192, so both limits are named.
    assert_eq!(with_targets(8192, Protocol::TcpUdp).validate(), []);
    let problems = with_targets(8193, Protocol::TcpUdp).validate();
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert_eq!(problems[1].0, "target_group");
    assert!(
        problems[1]
            .1
            .starts_with("16386 reply entries (target endpoint × listener protocol, draining targets included); LB_REVERSE holds at most 16384"),
        "{problems:#?}"
    );
}

#[test]
fn table_size_not_prime() {
    rejects(
        &BASE.replace(
            "name = \"web\"\n\n[target_group.health_check]",
            "name = \"web\"\nhash_table_size = 65536\n\n[target_group.health_check]",
        ),
        12,
        "target_group[0].hash_table_size",
        "65536 is not a prime",
    );
}

#[test]
fn no_interfaces() {
    rejects(
        &BASE.replace("interfaces = [\"eth0\"]", "interfaces = []"),
        2,
        "agent.interfaces",
        "no interfaces",
    );
    // No [agent] table at all: the problem is still reported, at line 1.
    let src = BASE.replace("[agent]\ninterfaces = [\"eth0\"]\n", "");
    rejects(&src, 1, "agent.interfaces", "no interfaces");
}

/// `[agent]` in BASE with two interfaces and `extra` lines after them.
fn two_interfaces(extra: &str) -> String {
    BASE.replace(
        "interfaces = [\"eth0\"]\n",
        &format!("interfaces = [\"eth0\", \"eth1\"]\n{extra}"),
    )
}

#[test]
fn target_interface_not_attached() {
    rejects(
        &two_interfaces("target_interfaces = [\"eth1\", \"eth2\"]\n"),
        3,
        "agent.target_interfaces[1]",
        "\"eth2\" is not one of agent.interfaces",
    );
    assert!(problems(&two_interfaces("target_interfaces = [\"eth1\"]\n")).is_empty());
}

#[test]
fn target_interface_listed_twice() {
    rejects(
        &two_interfaces("target_interfaces = [\"eth1\", \"eth1\"]\n"),
        3,
        "agent.target_interfaces[1]",
        "\"eth1\" is listed twice",
    );
}

#[test]
fn target_interfaces_empty() {
    rejects(
        &two_interfaces("target_interfaces = []\n"),
        3,
        "agent.target_interfaces",
        "empty: reverse NAT would apply on no interface",
    );
}

#[test]
fn flow_insert_limit_outside_u32() {
    for bad in ["-1", "4294967296"] {
        rejects(
            &two_interfaces(&format!("flow_insert_limit = {bad}\n")),
            3,
            "agent.flow_insert_limit",
            "invalid value",
        );
    }
    let c = parse(&two_interfaces("flow_insert_limit = 0\n"), "lb.toml").unwrap();
    assert_eq!(c.agent.flow_insert_limit, 0, "0: no limit");
}

#[test]
fn route_cache_is_a_bool() {
    rejects(
        &two_interfaces("route_cache = \"no\"\n"),
        3,
        "agent.route_cache",
        "invalid type",
    );
    let c = parse(&two_interfaces("route_cache = false\n"), "lb.toml").unwrap();
    assert!(!c.agent.route_cache);
}

#[test]
fn missing_required_key() {
    rejects(
        &BASE.replace("port = 80\n", ""),
        4,
        "listener[0]",
        "missing field `port`",
    );
}

#[test]
fn syntax_error() {
    rejects(&BASE.replace("port = 80\n", "port = = 80\n"), 7, "toml", "");
}

#[test]
fn every_problem_is_reported_not_only_the_first() {
    let src = BASE
        .replace("port = 80\n", "port = 80\ncolour = \"blue\"\n")
        .replace(
            "interval = \"10s\"",
            "interval = \"10s\"\nhealthy_threshold = 1\nmatcher = \"abc\"",
        )
        .replace("port = 8080\n\n", "port = 0\n\n")
        .replace("interfaces = [\"eth0\"]", "interfaces = []");
    let got = problems(&src);
    let paths: Vec<&str> = got.iter().map(|l| l.split(": ").nth(1).unwrap()).collect();
    assert_eq!(
        paths,
        [
            "agent.interfaces",
            "listener[0].colour",
            "target_group[0].health_check.healthy_threshold",
            "target_group[0].health_check.matcher",
            "target_group[0].target[0].port",
        ],
        "{got:#?}"
    );
}

#[test]
fn never_panics_on_any_prefix_or_mangling() {
    for end in 0..=EXAMPLE.len() {
        if EXAMPLE.is_char_boundary(end) {
            let _ = parse(&EXAMPLE[..end], "x.toml");
        }
    }
    for (from, to) in [
        ("\"", ""),
        ("=", "=="),
        ("]", ""),
        ("80", "-1"),
        ("10s", "10"),
        ("\n", " "),
    ] {
        let _ = parse(&EXAMPLE.replacen(from, to, 3), "x.toml");
    }
}

/// Every key path of a TOML document (`agent.interfaces`, `listener.name`, …; arrays of
/// tables by their table's name).
fn key_paths(doc: &str) -> std::collections::BTreeSet<String> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut std::collections::BTreeSet<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    if !matches!(v, toml::Value::Table(_))
                        && !matches!(v, toml::Value::Array(a) if a.iter().all(toml::Value::is_table) && !a.is_empty())
                    {
                        out.insert(path.clone());
                    }
                    walk(&path, v, out);
                }
            }
            toml::Value::Array(a) => {
                for v in a.iter().filter(|v| v.is_table()) {
                    walk(prefix, v, out);
                }
            }
            _ => {}
        }
    }
    let mut out = std::collections::BTreeSet::new();
    walk("", &toml::from_str(doc).expect("TOML"), &mut out);
    out
}

/// docs/config.md, the reference: its example is valid and uses every key the example file
/// does, and each key has a row in its section's table.
#[test]
fn the_reference_documents_every_key() {
    let reference = include_str!("../../../docs/config.md");
    let example = reference
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a ```toml example in docs/config.md");
    parse(example, "docs/config.md").expect("the reference's example is valid");
    assert_eq!(
        key_paths(example),
        key_paths(EXAMPLE),
        "the reference's example and example.toml use different keys"
    );
    let mut missing = Vec::new();
    for path in key_paths(EXAMPLE) {
        let (section, key) = path.rsplit_once('.').expect("every key is in a section");
        let heading = match section {
            "agent" => "### `[agent]`".to_string(),
            "listener" | "target_group" => format!("### `[[{section}]]`"),
            "target_group.health_check" => "### `[target_group.health_check]`".to_string(),
            "target_group.target" => "### `[[target_group.target]]`".to_string(),
            "announce" => "### `[announce]`".to_string(),
            other => panic!("a section the reference does not know: {other}"),
        };
        let table = reference
            .split(&heading)
            .nth(1)
            .and_then(|rest| rest.split("\n### ").next())
            .unwrap_or_default();
        if !table.contains(&format!("| `{key}` |")) {
            missing.push(path);
        }
    }
    assert!(
        missing.is_empty(),
        "docs/config.md has no row for {missing:?}"
    );
}

#[test]
fn announce_keys_have_bounds() {
    let with =
        |keys: &str| format!("{BASE}\n[announce]\nbird_socket = \"/run/bird/bird.ctl\"\n{keys}\n");
    let line = BASE.lines().count() + 4;
    rejects(
        &with("bird_config = \"vips.conf\""),
        line,
        "announce.bird_config",
        "\"vips.conf\" is not an absolute path",
    );
    rejects(
        &with("bird_config = \"/etc/bird/vips\""),
        line,
        "announce.bird_config",
        "name it *.conf",
    );
    rejects(
        &with("return_routes = [\"0.0.0.0/0\", \"0.0.0.0/0\"]"),
        line,
        "announce.return_routes[1]",
        "0.0.0.0/0 is listed twice",
    );
    rejects(
        &with("drain_timeout = \"0s\""),
        line,
        "announce.drain_timeout",
        "0s is outside 1s..86400s",
    );
    rejects(
        &with("withdraw_grace = \"2m\""),
        line,
        "announce.withdraw_grace",
        "above 60s",
    );
    rejects(
        &format!("{BASE}\n[announce]\nbird_socket = \"bird.ctl\"\n"),
        line - 1,
        "announce.bird_socket",
        "\"bird.ctl\" is not an absolute path",
    );
    assert!(problems(&with("return_routes = [\"0.0.0.0/0\", \"::/0\"]")).is_empty());
}

#[test]
fn passive_ejection_and_zones_have_bounds() {
    rejects(
        &BASE.replace(
            "interval = \"10s\"",
            "interval = \"10s\"\npassive_unhealthy_after = 1001",
        ),
        15,
        "target_group[0].health_check.passive_unhealthy_after",
        "1001 is outside 0..=1000",
    );
    rejects(
        &BASE.replace(
            "interfaces = [\"eth0\"]",
            &format!("interfaces = [\"eth0\"]\nzone = \"{}\"", "z".repeat(65)),
        ),
        3,
        "agent.zone",
        "65 characters; at most 64",
    );
    rejects(
        &BASE.replacen("port = 8080\n", "port = 8080\nzone = \"a\\tb\"\n", 1),
        20,
        "target_group[0].target[0].zone",
        "has a control character",
    );
    let ok = BASE.replace("interfaces = [\"eth0\"]", "interfaces = [\"eth0\"]\nzone = \"eu-west-1a\"\ncross_zone = true\naccess_log = \"/var/log/lb/access.log\"");
    assert_eq!(problems(&ok), Vec::<String>::new());
}
