//! Prometheus text exposition of the spec's metrics: traffic per listener (from the per-CPU
//! counters), drops by reason, other data-plane events, flows, and health.

use std::{collections::BTreeMap, fmt::Write};

use lb_common::{counter, ListenerStats};

use crate::{
    config::Config,
    health::TargetState,
    model::{Model, TargetKey},
};

/// Upper bounds (seconds) of the health-check duration histogram.
pub const DURATION_BUCKETS: [f64; 10] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// What the agent counts itself (health checks); the rest is read from the maps.
#[derive(Debug, Default)]
pub struct HealthMetrics {
    /// (target, result label) → checks.
    pub checks: BTreeMap<(TargetKey, &'static str), u64>,
    /// Cumulative counts per bucket of `DURATION_BUCKETS`, then +Inf.
    pub buckets: [u64; DURATION_BUCKETS.len() + 1],
    pub sum_seconds: f64,
}

impl HealthMetrics {
    pub fn observe(&mut self, target: &TargetKey, result: &'static str, seconds: f64) {
        *self.checks.entry((target.clone(), result)).or_default() += 1;
        for (i, &bound) in DURATION_BUCKETS.iter().enumerate() {
            if seconds <= bound {
                self.buckets[i] += 1;
            }
        }
        self.buckets[DURATION_BUCKETS.len()] += 1;
        self.sum_seconds += seconds;
    }
}

/// Label value escaping (backslash, quote, newline).
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Everything the page is made of.
pub struct Inputs<'a> {
    pub config: &'a Config,
    pub model: &'a Model,
    /// Listener name → its traffic.
    pub listener_stats: BTreeMap<String, ListenerStats>,
    pub counters: [u64; counter::COUNT as usize],
    /// Listener name → flow entries, as of the last sweep.
    pub active_flows: BTreeMap<String, u64>,
    pub health: &'a HealthMetrics,
    pub writes: MapWrites,
}

/// How the map writes are going.
#[derive(Clone, Debug, Default)]
pub struct MapWrites {
    /// Reconciliations in which a write failed.
    pub failed_reconciliations: u64,
    /// Entries the kernel may or may not hold (their last write failed).
    pub in_doubt: usize,
}

pub fn render(i: &Inputs<'_>) -> String {
    let mut o = String::new();
    let family = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        &mut o,
        "lb_map_write_failures_total",
        "counter",
        "Reconciliations in which a map write failed (the rest were written; retried every second).",
    );
    let _ = writeln!(
        o,
        "lb_map_write_failures_total {}",
        i.writes.failed_reconciliations
    );
    family(
        &mut o,
        "lb_map_entries_in_doubt",
        "gauge",
        "Map entries whose last write failed, waiting to be written again.",
    );
    let _ = writeln!(o, "lb_map_entries_in_doubt {}", i.writes.in_doubt);
    family(
        &mut o,
        "lb_packets_total",
        "counter",
        "Packets of a listener's flows, by direction (in: client to target; out: replies).",
    );
    for (l, s) in &i.listener_stats {
        let _ = writeln!(
            o,
            "lb_packets_total{{listener=\"{}\",direction=\"in\"}} {}",
            esc(l),
            s.in_packets
        );
        let _ = writeln!(
            o,
            "lb_packets_total{{listener=\"{}\",direction=\"out\"}} {}",
            esc(l),
            s.out_packets
        );
    }
    family(
        &mut o,
        "lb_bytes_total",
        "counter",
        "Bytes of a listener's flows, by direction.",
    );
    for (l, s) in &i.listener_stats {
        let _ = writeln!(
            o,
            "lb_bytes_total{{listener=\"{}\",direction=\"in\"}} {}",
            esc(l),
            s.in_bytes
        );
        let _ = writeln!(
            o,
            "lb_bytes_total{{listener=\"{}\",direction=\"out\"}} {}",
            esc(l),
            s.out_bytes
        );
    }
    family(
        &mut o,
        "lb_new_flows_total",
        "counter",
        "Flows scheduled to a target.",
    );
    for (l, s) in &i.listener_stats {
        let _ = writeln!(
            o,
            "lb_new_flows_total{{listener=\"{}\"}} {}",
            esc(l),
            s.new_flows
        );
    }
    family(
        &mut o,
        "lb_active_flows",
        "gauge",
        "Flow-table entries of the listener, as of the last expiry sweep.",
    );
    for l in &i.config.listeners {
        let n = i.active_flows.get(&l.name).copied().unwrap_or(0);
        let _ = writeln!(o, "lb_active_flows{{listener=\"{}\"}} {n}", esc(&l.name));
    }
    family(
        &mut o,
        "lb_dropped_packets_total",
        "counter",
        "Packets dropped by the XDP program, by reason.",
    );
    for &(index, reason) in counter::DROP_REASONS.iter() {
        let _ = writeln!(
            o,
            "lb_dropped_packets_total{{reason=\"{reason}\"}} {}",
            i.counters[index as usize]
        );
    }
    family(
        &mut o,
        "lb_dataplane_events_total",
        "counter",
        "Other events of the XDP program: packets passed to the stack and why, flows rescheduled, flow-table inserts failed or skipped (flow_insert_limit), ICMP errors and reply fragments translated.",
    );
    for &(index, event) in counter::EVENTS.iter() {
        let _ = writeln!(
            o,
            "lb_dataplane_events_total{{event=\"{event}\"}} {}",
            i.counters[index as usize]
        );
    }
    family(
        &mut o,
        "lb_target_healthy",
        "gauge",
        "1 when the target is healthy, else 0.",
    );
    let mut healthy: BTreeMap<&str, (u64, u64)> = i
        .config
        .target_groups
        .iter()
        .map(|g| (g.name.as_str(), (0, 0)))
        .collect();
    for (k, t) in &i.model.targets {
        let (state, _) = i.model.shown_state(i.config, k, t);
        let up = state == TargetState::Healthy;
        let _ = writeln!(
            o,
            "lb_target_healthy{{group=\"{}\",target=\"{}\"}} {}",
            esc(&k.group),
            target_label(k),
            up as u8
        );
        if let Some(c) = healthy.get_mut(k.group.as_str()) {
            match state {
                TargetState::Healthy => c.0 += 1,
                TargetState::Unhealthy => c.1 += 1,
                _ => {}
            }
        }
    }
    family(
        &mut o,
        "lb_healthy_targets",
        "gauge",
        "Healthy targets of the group.",
    );
    for (g, (up, _)) in &healthy {
        let _ = writeln!(o, "lb_healthy_targets{{group=\"{}\"}} {up}", esc(g));
    }
    family(
        &mut o,
        "lb_unhealthy_targets",
        "gauge",
        "Unhealthy targets of the group.",
    );
    for (g, (_, down)) in &healthy {
        let _ = writeln!(o, "lb_unhealthy_targets{{group=\"{}\"}} {down}", esc(g));
    }
    family(&mut o, "lb_health_checks_total", "counter", "Health checks by result (pass, timeout, response_code_mismatch, connection_refused, failed).");
    for ((k, result), n) in &i.health.checks {
        let _ = writeln!(
            o,
            "lb_health_checks_total{{group=\"{}\",target=\"{}\",result=\"{result}\"}} {n}",
            esc(&k.group),
            target_label(k)
        );
    }
    family(
        &mut o,
        "lb_health_check_duration_seconds",
        "histogram",
        "Duration of health checks.",
    );
    for (bound, n) in DURATION_BUCKETS.iter().zip(i.health.buckets) {
        let _ = writeln!(
            o,
            "lb_health_check_duration_seconds_bucket{{le=\"{bound}\"}} {n}"
        );
    }
    let total = i.health.buckets[DURATION_BUCKETS.len()];
    let _ = writeln!(
        o,
        "lb_health_check_duration_seconds_bucket{{le=\"+Inf\"}} {total}"
    );
    let _ = writeln!(
        o,
        "lb_health_check_duration_seconds_sum {}",
        i.health.sum_seconds
    );
    let _ = writeln!(o, "lb_health_check_duration_seconds_count {total}");
    o
}

/// `lb_xdp_reattachments_total{interface}`: for each attached interface (`interfaces`), how
/// often XDP was attached to it afresh since the agent started (the interface was deleted and
/// made again), appended to a page of `render`.
pub fn render_reattachments<'a>(
    o: &mut String,
    interfaces: impl Iterator<Item = &'a str>,
    counts: &BTreeMap<String, u64>,
) {
    let _ = writeln!(
        o,
        "# HELP lb_xdp_reattachments_total XDP attached afresh to an interface that no longer ran it (deleted and made again), since the agent started.\n# TYPE lb_xdp_reattachments_total counter"
    );
    for name in interfaces {
        let n = counts.get(name).copied().unwrap_or(0);
        let _ = writeln!(
            o,
            "lb_xdp_reattachments_total{{interface=\"{}\"}} {n}",
            esc(name)
        );
    }
}

/// The next-hop cache: whether the data path may reuse FIB answers, and how often the route
/// epoch moved (each move makes the data path look every destination up again).
pub fn render_route_cache(o: &mut String, status: &crate::route_epoch::RouteCacheStatus) {
    let _ = writeln!(
        o,
        "# HELP lb_route_epoch_changes_total Writes of a new route epoch (LB_ROUTE_EPOCH), since the agent started: each makes the data path look every destination up again.\n# TYPE lb_route_epoch_changes_total counter\nlb_route_epoch_changes_total {}",
        status.changes
    );
    let _ = writeln!(
        o,
        "# HELP lb_route_cache_enabled Whether the data path may reuse FIB answers (1), or looks every packet up (0: agent.route_cache = false, policy routing or multipath routes, or starting).\n# TYPE lb_route_cache_enabled gauge\nlb_route_cache_enabled {}",
        u8::from(status.enabled)
    );
}

fn target_label(k: &TargetKey) -> String {
    crate::config::endpoint(k.addr, k.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reattachments_are_counted_per_interface() {
        let mut page = String::new();
        let counts: BTreeMap<String, u64> = [("l1".to_string(), 2)].into();
        render_reattachments(&mut page, ["l0", "l1"].into_iter(), &counts);
        assert_eq!(
            page.lines().skip(1).collect::<Vec<_>>(),
            [
                "# TYPE lb_xdp_reattachments_total counter",
                "lb_xdp_reattachments_total{interface=\"l0\"} 0",
                "lb_xdp_reattachments_total{interface=\"l1\"} 2",
            ]
        );
    }

    #[test]
    fn route_cache_shows_changes_and_whether_enabled() {
        let mut page = String::new();
        let status = crate::route_epoch::RouteCacheStatus {
            enabled: true,
            reason: None,
            epoch: 7,
            changes: 9,
        };
        render_route_cache(&mut page, &status);
        let samples: Vec<&str> = page.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            ["lb_route_epoch_changes_total 9", "lb_route_cache_enabled 1"]
        );
        assert!(page.contains("# TYPE lb_route_epoch_changes_total counter"));
        assert!(page.contains("# TYPE lb_route_cache_enabled gauge"));
        let mut page = String::new();
        render_route_cache(&mut page, &crate::route_epoch::RouteCacheStatus::default());
        assert!(page.lines().any(|l| l == "lb_route_cache_enabled 0"));
    }

    /// The page of the example config with a few counts, a health check of each outcome, and
    /// the families rendered apart (re-attachments, the next-hop cache).
    fn sample_page() -> String {
        let config = crate::config::parse(include_str!("config/example.toml"), "x").unwrap();
        let mut model = Model::default();
        model
            .sync_config(&config, std::time::Instant::now())
            .unwrap();
        let key = model.targets.keys().next().unwrap().clone();
        let mut health = HealthMetrics::default();
        health.observe(&key, "pass", 0.003);
        health.observe(&key, "timeout", 6.0);
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
        let mut page = render(&Inputs {
            config: &config,
            model: &model,
            listener_stats: [("web".to_string(), stats)].into(),
            counters,
            active_flows: [("web".to_string(), 3)].into(),
            health: &health,
            writes: MapWrites {
                failed_reconciliations: 2,
                in_doubt: 1,
            },
        });
        render_reattachments(&mut page, ["l0"].into_iter(), &BTreeMap::new());
        render_route_cache(&mut page, &crate::route_epoch::RouteCacheStatus::default());
        page
    }

    /// docs/config.md, the reference, names every metric family and every label value the
    /// agent exports.
    #[test]
    fn the_reference_names_every_family_and_label() {
        let reference = include_str!("../../docs/config.md");
        let page = sample_page();
        let families: Vec<&str> = page
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert!(families.len() >= 16, "{families:?}");
        let labels = counter::DROP_REASONS
            .iter()
            .chain(counter::EVENTS.iter())
            .map(|(_, l)| *l);
        let missing: Vec<String> = families
            .iter()
            .copied()
            .chain(labels)
            .filter(|name| !reference.contains(&format!("`{name}`")))
            .map(String::from)
            .collect();
        assert!(
            missing.is_empty(),
            "docs/config.md does not name {missing:?}"
        );
    }

    #[test]
    fn page_has_every_family_and_counts() {
        let page = sample_page();
        for line in [
            "lb_packets_total{listener=\"web\",direction=\"in\"} 5",
            "lb_bytes_total{listener=\"web\",direction=\"out\"} 200",
            "lb_new_flows_total{listener=\"web\"} 2",
            "lb_active_flows{listener=\"web\"} 3",
            "lb_map_write_failures_total 2",
            "lb_map_entries_in_doubt 1",
            "lb_dropped_packets_total{reason=\"no_listener\"} 7",
            "lb_dropped_packets_total{reason=\"icmp_unmatched\"} 11",
            "lb_dataplane_events_total{event=\"flow_insert_skipped\"} 13",
            "lb_dataplane_events_total{event=\"pass_ttl_expired\"} 0",
            "# TYPE lb_dataplane_events_total counter",
            "lb_target_healthy{group=\"web\",target=\"198.18.2.11:8080\"} 0",
            "lb_healthy_targets{group=\"web\"} 0",
            "lb_unhealthy_targets{group=\"web\"} 0",
            "lb_health_checks_total{group=\"web\",target=\"198.18.2.11:8080\",result=\"timeout\"} 1",
            "lb_health_check_duration_seconds_bucket{le=\"0.005\"} 1",
            "lb_health_check_duration_seconds_bucket{le=\"+Inf\"} 2",
            "lb_health_check_duration_seconds_count 2",
            "# TYPE lb_health_check_duration_seconds histogram",
        ] {
            assert!(page.lines().any(|l| l == line), "missing {line:?} in\n{page}");
        }
        // One line per counter: every drop reason and every event, each once.
        for (name, label, list) in [
            (
                "lb_dropped_packets_total",
                "reason",
                &counter::DROP_REASONS[..],
            ),
            ("lb_dataplane_events_total", "event", &counter::EVENTS[..]),
        ] {
            for (_, value) in list {
                let prefix = format!("{name}{{{label}=\"{value}\"}} ");
                let n = page.lines().filter(|l| l.starts_with(&prefix)).count();
                assert_eq!(n, 1, "{prefix}");
            }
        }
    }
}
