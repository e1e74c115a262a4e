use std::time::Instant;

use super::*;

/// The families of the spec (`shared/spec/config.md`, "Metrics"): a contract, names and
/// labels exactly. The histogram's samples also carry `group` (added) and `le`.
const SPEC: [(&str, &[&str]); 10] = [
    ("lb_packets_total", &["listener", "direction"]),
    ("lb_bytes_total", &["listener", "direction"]),
    ("lb_new_flows_total", &["listener"]),
    ("lb_active_flows", &["listener"]),
    ("lb_dropped_packets_total", &["reason"]),
    ("lb_target_healthy", &["group", "target"]),
    ("lb_healthy_targets", &["group"]),
    ("lb_unhealthy_targets", &["group"]),
    ("lb_health_checks_total", &["group", "target", "result"]),
    ("lb_health_check_duration_seconds_bucket", &["group", "le"]),
];

/// One sample line: name, labels (unescaped), value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: String,
}

impl Sample {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The samples of a page (comment lines skipped).
fn samples(page: &str) -> Vec<Sample> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|line| {
            let end = line.find(['{', ' ']).expect("a name");
            let name = line[..end].to_string();
            let mut rest = &line[end..];
            let mut labels = Vec::new();
            if let Some(mut r) = rest.strip_prefix('{') {
                while !r.starts_with('}') {
                    let (key, after) = r.split_once("=\"").expect("key=\"");
                    let mut value = String::new();
                    let mut chars = after.char_indices();
                    let close = loop {
                        match chars.next().expect("a closing quote") {
                            (i, '"') => break i,
                            (_, '\\') => match chars.next().expect("an escape").1 {
                                'n' => value.push('\n'),
                                c => value.push(c),
                            },
                            (_, c) => value.push(c),
                        }
                    };
                    labels.push((key.to_string(), value));
                    r = &after[close + 1..];
                    r = r.strip_prefix(',').unwrap_or(r);
                }
                rest = &r[1..];
            }
            Sample {
                name,
                labels,
                value: rest.trim().to_string(),
            }
        })
        .collect()
}

/// The value of the one sample `name` with exactly `labels`.
fn value(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<String> {
    let found: Vec<Sample> = samples(page)
        .into_iter()
        .filter(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.label(k) == Some(v))
        })
        .collect();
    assert!(found.len() <= 1, "{name} {labels:?} twice in\n{page}");
    found.into_iter().next().map(|s| s.value)
}

const TWO_GROUPS: &str = r#"
[agent]
interfaces = ["eth0"]

[[listener]]
name = "web"
address = "198.18.100.10"
port = 80
protocol = "tcp"
target_group = "web"

[[listener]]
name = "api"
address = "198.18.100.10"
port = 81
protocol = "tcp"
target_group = "api"

[[target_group]]
name = "web"
[[target_group.target]]
address = "198.18.2.11"
port = 8080
[[target_group.target]]
address = "198.18.2.12"
port = 8080

[[target_group]]
name = "api"
[[target_group.target]]
address = "198.18.3.11"
port = 9000
"#;

/// Config, model and agent-side counts of a page.
struct World {
    config: Config,
    model: Model,
    health: HealthMetrics,
}

impl World {
    fn new(toml: &str) -> Self {
        let config = crate::config::parse(toml, "x").unwrap();
        let mut model = Model::default();
        model.sync_config(&config, Instant::now()).unwrap();
        Self {
            config,
            model,
            health: HealthMetrics::default(),
        }
    }

    fn key(&self, group: &str, target: &str) -> TargetKey {
        let addr: std::net::SocketAddr = target.parse().unwrap();
        let key = TargetKey {
            group: group.into(),
            addr: addr.ip(),
            port: addr.port(),
        };
        assert!(self.model.targets.contains_key(&key), "{key}");
        key
    }

    fn inputs(&self) -> Inputs<'_> {
        Inputs {
            config: &self.config,
            model: &self.model,
            listener_stats: BTreeMap::new(),
            counters: Some([0; counter::COUNT as usize]),
            active_flows: BTreeMap::new(),
            health: &self.health,
            writes: MapWrites::default(),
            reattachments: BTreeMap::new(),
            route_cache: RouteCacheStatus::default(),
            access_log: Some(crate::api::AccessLogStatus {
                path: "/var/log/lb-agent/access.log".into(),
                records: crate::access_log::REASONS
                    .iter()
                    .map(|r| (r.to_string(), 1))
                    .collect(),
                write_errors: 0,
                events_lost: Some(0),
                open_flows: 2,
            }),
            zone_fallback: [("web".to_string(), (true, 1))].into(),
            announce: Some(crate::announce::AnnounceMetrics {
                routes: vec![
                    (
                        crate::announce::Route::Vip("198.18.100.10".parse().unwrap()),
                        true,
                        true,
                        1,
                    ),
                    (
                        crate::announce::Route::Return("0.0.0.0/0".parse().unwrap()),
                        true,
                        true,
                        1,
                    ),
                ],
                bird_up: true,
                sessions: vec![crate::api::BgpSession {
                    name: "uplink".into(),
                    protocol: "BGP".into(),
                    state: "up".into(),
                    info: "Established".into(),
                    since: "10:00:00.000".into(),
                }],
                last_change: Some(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000),
                ),
            }),
            draining: false,
            passive: self
                .model
                .targets
                .keys()
                .map(|k| (k.clone(), crate::api::PassiveSignals::default()))
                .collect(),
        }
    }

    fn page(&self) -> String {
        render(&self.inputs())
    }
}

/// The example config with traffic, a few counters, a health check of two outcomes, an
/// attached interface and the next-hop cache.
fn sample_page() -> String {
    let mut w = World::new(include_str!("../config/example.toml"));
    let key = w.model.targets.keys().next().unwrap().clone();
    w.health.observe(&key, "pass", 0.003);
    w.health.observe(&key, "timeout", 6.0);
    let mut counters = [0u64; counter::COUNT as usize];
    counters[counter::DROP_NO_LISTENER as usize] = 7;
    counters[counter::DROP_ICMP_UNMATCHED as usize] = 11;
    counters[counter::FLOW_INSERT_SKIPPED as usize] = 13;
    let stats = ListenerStats {
        in_packets: 5,
        in_bytes: 300,
        out_packets: 4,
        out_bytes: 200,
        new_flows: 2,
        ..Default::default()
    };
    render(&Inputs {
        listener_stats: [("web".to_string(), stats)].into(),
        counters: Some(counters),
        active_flows: [("web".to_string(), 3)].into(),
        writes: MapWrites {
            failed_reconciliations: 2,
            in_doubt: 1,
        },
        reattachments: [("eth0".to_string(), 1)].into(),
        route_cache: RouteCacheStatus {
            enabled: true,
            reason: None,
            epoch: 7,
            changes: 9,
        },
        ..w.inputs()
    })
}

/// The names a query uses for the families of a page: counters with `_total`, info with
/// `_info`, the histogram by its family name.
fn exposed_names(page: &str) -> Vec<String> {
    page.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').unwrap();
            match kind {
                "counter" => format!("{name}_total"),
                "info" => format!("{name}_info"),
                _ => name.to_string(),
            }
        })
        .collect()
}

#[test]
fn page_has_every_spec_family_with_exactly_its_labels() {
    let page = sample_page();
    let all = samples(&page);
    for (name, labels) in SPEC {
        let of: Vec<&Sample> = all.iter().filter(|s| s.name == name).collect();
        assert!(!of.is_empty(), "no {name} in\n{page}");
        for s in of {
            let keys: BTreeSet<&str> = s.labels.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(keys, labels.iter().copied().collect(), "{s:?}");
        }
    }
    for line in [
        "lb_packets_total{listener=\"web\",direction=\"in\"} 5",
        "lb_packets_total{listener=\"web\",direction=\"out\"} 4",
        "lb_bytes_total{listener=\"web\",direction=\"in\"} 300",
        "lb_bytes_total{listener=\"web\",direction=\"out\"} 200",
        "lb_new_flows_total{listener=\"web\"} 2",
        "lb_active_flows{listener=\"web\"} 3",
        "lb_dropped_packets_total{reason=\"no_listener\"} 7",
        "lb_dropped_packets_total{reason=\"icmp_unmatched\"} 11",
        "lb_flow_inserts_skipped_total 13",
        "lb_target_healthy{group=\"web\",target=\"198.18.2.11:8080\"} 0",
        "lb_healthy_targets{group=\"web\"} 0",
        "lb_unhealthy_targets{group=\"web\"} 0",
        "lb_health_checks_total{group=\"web\",target=\"198.18.2.11:8080\",result=\"timeout\"} 1",
        "lb_health_checks_total{group=\"web\",target=\"198.18.2.11:8080\",result=\"pass\"} 1",
        "lb_map_write_failures_total 2",
        "lb_map_entries_in_doubt 1",
        "lb_xdp_reattachments_total{interface=\"eth0\"} 1",
        "lb_route_epoch_changes_total 9",
        "lb_route_cache_enabled 1",
        "# TYPE lb_packets counter",
        "# TYPE lb_active_flows gauge",
        "# TYPE lb_health_check_duration_seconds histogram",
        "# UNIT lb_health_check_duration_seconds seconds",
        "# TYPE lb_build info",
    ] {
        assert!(page.lines().any(|l| l == line), "no {line:?} in\n{page}");
    }
    let build = samples(&page)
        .into_iter()
        .find(|s| s.name == "lb_build_info")
        .unwrap();
    assert_eq!(build.label("version"), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(build.value, "1");
    // OpenMetrics: the page ends with EOF; no family twice.
    assert!(page.ends_with("\n# EOF\n"), "{page}");
    let names = exposed_names(&page);
    let distinct: BTreeSet<&String> = names.iter().collect();
    assert_eq!(distinct.len(), names.len(), "{names:?}");
}

/// docs/config.md, the reference, names every metric family and every label value of the
/// data plane's counters.
#[test]
fn the_reference_names_every_family_and_label() {
    let reference = include_str!("../../../docs/config.md");
    let page = sample_page();
    let names = exposed_names(&page);
    assert!(names.len() >= 24, "{names:?}");
    let values = DATAPLANE_FAMILIES.iter().flat_map(|f| match f.series {
        Series::One(_) => &[][..],
        Series::ByLabel(_, series) => series,
    });
    let missing: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .chain(values.map(|(_, v)| *v))
        .filter(|name| !reference.contains(&format!("`{name}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/config.md does not name {missing:?}"
    );
}

/// Each counter of the data plane is one series of the page, with its value from the map.
#[test]
fn every_dataplane_counter_is_one_series_with_its_value() {
    let w = World::new(TWO_GROUPS);
    let mut counters = [0u64; counter::COUNT as usize];
    for (i, c) in counters.iter_mut().enumerate() {
        *c = 1000 + i as u64;
    }
    let page = render(&Inputs {
        counters: Some(counters),
        ..w.inputs()
    });
    for i in 0..counter::COUNT as u64 {
        let with = samples(&page)
            .into_iter()
            .filter(|s| s.value == (1000 + i).to_string())
            .filter(|s| s.name != format!("{COMPAT_EVENTS}_total"))
            .count();
        assert_eq!(with, 1, "counter {i} in\n{page}");
    }
    for (name, labels, index) in [
        (
            "lb_passed_packets_total",
            &[("reason", "ttl_expired")][..],
            counter::PASS_TTL_EXPIRED,
        ),
        (
            "lb_passed_packets_total",
            &[("reason", "redirect_failed")],
            counter::REDIRECT_FAILED,
        ),
        (
            "lb_flows_rescheduled_total",
            &[],
            counter::FLOWS_RESCHEDULED,
        ),
        (
            "lb_flow_insert_failures_total",
            &[],
            counter::FLOW_INSERT_FAILED,
        ),
        (
            "lb_flow_inserts_skipped_total",
            &[],
            counter::FLOW_INSERT_SKIPPED,
        ),
        (
            "lb_icmp_errors_forwarded_total",
            &[("direction", "to_client")],
            counter::ICMP_FROM_TARGET,
        ),
        (
            "lb_icmp_too_big_sent_total",
            &[],
            counter::ICMP_TOO_BIG_SENT,
        ),
        (
            "lb_reply_fragments_translated_total",
            &[],
            counter::REPLY_FRAGMENTS,
        ),
        (
            "lb_fib_unexpected_answers_total",
            &[],
            counter::FIB_UNEXPECTED,
        ),
        (
            "lb_dropped_packets_total",
            &[("reason", "reply_unknown")],
            counter::DROP_REPLY_UNKNOWN,
        ),
    ] {
        assert_eq!(
            value(&page, name, labels),
            Some((1000 + index).to_string()),
            "{name} {labels:?}"
        );
    }
}

/// The table of families holds every counter index exactly once (a counter added to
/// `lb_common::counter` must be exported).
#[test]
fn the_families_hold_every_counter_once() {
    let mut seen = [0; counter::COUNT as usize];
    for f in &DATAPLANE_FAMILIES {
        match f.series {
            Series::One(i) => seen[i as usize] += 1,
            Series::ByLabel(_, series) => series.iter().for_each(|(i, _)| seen[*i as usize] += 1),
        }
    }
    assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
}

/// Counters that cannot be read are left out, not shown as 0 (which would read as a reset).
#[test]
fn unreadable_counters_are_left_out() {
    let w = World::new(TWO_GROUPS);
    let page = render(&Inputs {
        counters: None,
        ..w.inputs()
    });
    assert!(!page.contains("lb_dropped_packets"), "{page}");
    assert!(!page.contains("lb_passed_packets"), "{page}");
    assert!(
        page.contains("lb_healthy_targets{group=\"api\"} 0"),
        "{page}"
    );
}

/// The durations are a histogram per target group.
#[test]
fn check_durations_are_a_histogram_per_group() {
    let mut w = World::new(TWO_GROUPS);
    let (web1, web2) = (
        w.key("web", "198.18.2.11:8080"),
        w.key("web", "198.18.2.12:8080"),
    );
    let api = w.key("api", "198.18.3.11:9000");
    w.health.observe(&web1, "pass", 0.002);
    w.health.observe(&web2, "pass", 0.02);
    w.health.observe(&api, "timeout", 6.0);
    let page = w.page();
    let bucket = |group: &str, le: &str| {
        value(
            &page,
            "lb_health_check_duration_seconds_bucket",
            &[("group", group), ("le", le)],
        )
    };
    assert_eq!(bucket("web", "0.001").as_deref(), Some("0"));
    assert_eq!(bucket("web", "0.0025").as_deref(), Some("1"));
    assert_eq!(bucket("web", "0.025").as_deref(), Some("2"));
    assert_eq!(bucket("web", "+Inf").as_deref(), Some("2"));
    assert_eq!(bucket("api", "5.0").as_deref(), Some("0"));
    assert_eq!(bucket("api", "+Inf").as_deref(), Some("1"));
    let count = |group| {
        value(
            &page,
            "lb_health_check_duration_seconds_count",
            &[("group", group)],
        )
    };
    assert_eq!(count("web").as_deref(), Some("2"));
    assert_eq!(count("api").as_deref(), Some("1"));
    let sum = value(
        &page,
        "lb_health_check_duration_seconds_sum",
        &[("group", "web")],
    )
    .unwrap();
    assert!((sum.parse::<f64>().unwrap() - 0.022).abs() < 1e-9, "{sum}");
    assert_eq!(
        value(
            &page,
            "lb_health_checks_total",
            &[
                ("group", "api"),
                ("target", "198.18.3.11:9000"),
                ("result", "timeout")
            ]
        )
        .as_deref(),
        Some("1")
    );
}

/// A target that leaves the model takes its series with it (its checks and its health), and
/// a group that leaves the config its durations; the others stay.
#[test]
fn series_of_targets_and_groups_that_left_are_pruned() {
    let mut w = World::new(TWO_GROUPS);
    let web1 = w.key("web", "198.18.2.11:8080");
    let web2 = w.key("web", "198.18.2.12:8080");
    let api = w.key("api", "198.18.3.11:9000");
    for k in [&web1, &web2, &api] {
        w.health.observe(k, "pass", 0.001);
    }
    let page = w.page();
    let target = |t: &str| format!("target=\"{t}\"");
    assert!(page.contains(&target("198.18.2.12:8080")), "{page}");
    w.model.remove(&web2, false);
    let page = w.page();
    assert!(!page.contains(&target("198.18.2.12:8080")), "{page}");
    assert!(page.contains(&target("198.18.2.11:8080")), "{page}");
    assert!(page.contains("group=\"api\""), "{page}");

    // The api group leaves the config (and its target the model).
    let web_only = TWO_GROUPS
        .split("[[target_group]]\nname = \"api\"")
        .next()
        .unwrap()
        .replace(
            "[[listener]]\nname = \"api\"\naddress = \"198.18.100.10\"\nport = 81\nprotocol = \"tcp\"\ntarget_group = \"api\"\n",
            "",
        );
    w.config = crate::config::parse(&web_only, "x").unwrap();
    w.model.remove(&api, false);
    let page = w.page();
    assert!(!page.contains("group=\"api\""), "{page}");
    assert_eq!(
        value(
            &page,
            "lb_health_check_duration_seconds_count",
            &[("group", "web")]
        )
        .as_deref(),
        Some("2")
    );
    // Checked again, a target that came back starts from 0.
    w.model
        .sync_config(
            &crate::config::parse(TWO_GROUPS, "x").unwrap(),
            Instant::now(),
        )
        .unwrap();
    w.health.observe(&web2, "timeout", 0.5);
    let page = w.page();
    let checks = |result| {
        value(
            &page,
            "lb_health_checks_total",
            &[
                ("group", "web"),
                ("target", "198.18.2.12:8080"),
                ("result", result),
            ],
        )
    };
    assert_eq!(checks("timeout").as_deref(), Some("1"));
    assert_eq!(checks("pass"), None);
}

/// Label values are escaped (a quote, a backslash, a newline) and read back as they were.
#[test]
fn label_values_are_escaped() {
    let w = World::new(TWO_GROUPS);
    let name = "we\"b\\\n";
    let page = render(&Inputs {
        listener_stats: [(name.to_string(), ListenerStats::default())].into(),
        ..w.inputs()
    });
    assert!(
        page.contains(r#"lb_new_flows_total{listener="we\"b\\\n"} 0"#),
        "{page}"
    );
    assert_eq!(
        value(&page, "lb_new_flows_total", &[("listener", name)]).as_deref(),
        Some("0")
    );
}

#[test]
fn reattachments_are_counted_per_attached_interface() {
    let w = World::new(TWO_GROUPS);
    let page = render(&Inputs {
        reattachments: [("l0".to_string(), 0), ("l1".to_string(), 2)].into(),
        ..w.inputs()
    });
    let lines: Vec<&str> = page
        .lines()
        .filter(|l| l.contains("lb_xdp_reattachments"))
        .collect();
    assert_eq!(
        lines[1..],
        [
            "# TYPE lb_xdp_reattachments counter",
            "lb_xdp_reattachments_total{interface=\"l0\"} 0",
            "lb_xdp_reattachments_total{interface=\"l1\"} 2",
        ]
    );
}

#[test]
fn route_cache_shows_changes_and_whether_enabled() {
    let w = World::new(TWO_GROUPS);
    let page = render(&Inputs {
        route_cache: RouteCacheStatus {
            enabled: true,
            reason: None,
            epoch: 7,
            changes: 9,
        },
        ..w.inputs()
    });
    assert_eq!(
        value(&page, "lb_route_epoch_changes_total", &[]).as_deref(),
        Some("9")
    );
    assert_eq!(
        value(&page, "lb_route_cache_enabled", &[]).as_deref(),
        Some("1")
    );
    assert!(page.contains("# TYPE lb_route_epoch_changes counter"));
    assert!(page.contains("# TYPE lb_route_cache_enabled gauge"));
    let page = w.page();
    assert_eq!(
        value(&page, "lb_route_cache_enabled", &[]).as_deref(),
        Some("0")
    );
}
