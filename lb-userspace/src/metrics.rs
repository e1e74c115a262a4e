//! The metrics page, encoded by prometheus-client (OpenMetrics text): traffic per listener
//! (from the per-CPU counters), drops by reason and the data plane's other events, flows,
//! health, map writes, XDP re-attachments, the next-hop cache and the build.
//!
//! What is read from the maps or derived from the model is a snapshot taken at each scrape
//! ([`Inputs`] → a [`Collector`] owning its samples): a listener, target or group that went
//! away is simply not in the next page. What the agent counts itself, the health checks, lives
//! in [`HealthMetrics`]' families, pruned ([`HealthMetrics::prune`]) when targets or groups
//! leave the model.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{counter, ListenerStats};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::Histogram,
        info::Info,
        MetricType,
    },
    registry::Registry,
};

use crate::{
    config::Config,
    health::TargetState,
    model::{Model, TargetKey},
    route_epoch::RouteCacheStatus,
};

/// The page's content type (OpenMetrics text, which Prometheus asks for first).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds (seconds) of the health-check duration histogram.
pub const DURATION_BUCKETS: [f64; 10] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// `lb_health_checks_total`'s labels, in the spec's order.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct CheckLabels {
    group: String,
    target: String,
    result: String,
}

/// `lb_health_check_duration_seconds`' label: one histogram per target group.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct GroupLabel {
    group: String,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// What the agent counts itself (health checks); the rest is read from the maps.
#[derive(Debug)]
pub struct HealthMetrics {
    checks: Family<CheckLabels, Counter>,
    durations: Family<GroupLabel, Histogram, fn() -> Histogram>,
    /// The label sets in the families, to prune them.
    check_labels: BTreeSet<CheckLabels>,
    groups: BTreeSet<String>,
}

impl Default for HealthMetrics {
    fn default() -> Self {
        Self {
            checks: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
            check_labels: BTreeSet::new(),
            groups: BTreeSet::new(),
        }
    }
}

impl HealthMetrics {
    pub fn observe(&mut self, target: &TargetKey, result: &'static str, seconds: f64) {
        let labels = CheckLabels {
            group: target.group.clone(),
            target: target_label(target),
            result: result.to_string(),
        };
        self.checks.get_or_create(&labels).inc();
        self.check_labels.insert(labels);
        let group = GroupLabel {
            group: target.group.clone(),
        };
        self.durations.get_or_create(&group).observe(seconds);
        self.groups.insert(target.group.clone());
    }

    /// Drops the series of targets no longer in the model and the histograms of groups no
    /// longer in the config, so that the page does not grow with every target ever seen.
    pub fn prune(&mut self, config: &Config, model: &Model) {
        let present: BTreeSet<(&str, String)> = model
            .targets
            .keys()
            .map(|k| (k.group.as_str(), target_label(k)))
            .collect();
        let gone: Vec<CheckLabels> = self
            .check_labels
            .iter()
            .filter(|l| !present.contains(&(l.group.as_str(), l.target.clone())))
            .cloned()
            .collect();
        for l in gone {
            self.checks.remove(&l);
            self.check_labels.remove(&l);
        }
        let groups: BTreeSet<&str> = config
            .target_groups
            .iter()
            .map(|g| g.name.as_str())
            .collect();
        let gone: Vec<String> = self
            .groups
            .iter()
            .filter(|g| !groups.contains(g.as_str()))
            .cloned()
            .collect();
        for g in gone {
            self.durations.remove(&GroupLabel { group: g.clone() });
            self.groups.remove(&g);
        }
    }
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
    /// Attached interface → how often XDP was attached to it afresh since the agent started.
    pub reattachments: BTreeMap<String, u64>,
    pub route_cache: RouteCacheStatus,
}

/// How the map writes are going.
#[derive(Clone, Debug, Default)]
pub struct MapWrites {
    /// Reconciliations in which a write failed.
    pub failed_reconciliations: u64,
    /// Entries the kernel may or may not hold (their last write failed).
    pub in_doubt: usize,
}

/// One family of the snapshot: its samples, each with its labels.
#[derive(Debug)]
struct Snapshot {
    /// Name without the `_total` of counters (the encoder adds it).
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    samples: Vec<(Vec<(&'static str, String)>, u64)>,
}

impl Snapshot {
    fn new(name: &'static str, kind: MetricType, help: &'static str) -> Self {
        Self {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    fn one(mut self, value: u64) -> Self {
        self.samples.push((Vec::new(), value));
        self
    }

    fn add(&mut self, labels: &[(&'static str, &str)], value: u64) {
        let labels = labels.iter().map(|&(k, v)| (k, v.to_string())).collect();
        self.samples.push((labels, value));
    }
}

/// The families read at this scrape.
#[derive(Debug)]
struct Snapshots(Vec<Snapshot>);

impl Collector for Snapshots {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let mut metric = encoder.encode_descriptor(
                f.name,
                // (The encoder ends the help with a full stop of its own.)
                f.help.trim_end_matches('.'),
                None,
                f.kind,
            )?;
            match f.samples.as_slice() {
                // An unlabelled family: its one sample right under its descriptor.
                [(labels, value)] if labels.is_empty() => encode_value(f.kind, *value, metric)?,
                samples => {
                    for (labels, value) in samples {
                        encode_value(f.kind, *value, metric.encode_family(labels)?)?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn encode_value(
    kind: MetricType,
    value: u64,
    m: prometheus_client::encoding::MetricEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    match kind {
        MetricType::Counter => ConstCounter::new(value).encode(m),
        _ => ConstGauge::new(value).encode(m),
    }
}

/// The page: every family, encoded as OpenMetrics text.
pub fn render(i: &Inputs<'_>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot(i)));
    registry.register(
        "lb_health_checks",
        "Health checks by result (pass, timeout, response_code_mismatch, connection_refused, failed)",
        i.health.checks.clone(),
    );
    registry.register(
        "lb_health_check_duration_seconds",
        "Duration of health checks, per target group",
        i.health.durations.clone(),
    );
    registry.register(
        "lb_build",
        "The agent's version (the value is always 1)",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    let mut page = String::new();
    prometheus_client::encoding::text::encode(&mut page, &registry)
        .expect("writing to a String does not fail");
    page
}

/// The families read from the maps and derived from the model, as of now.
fn snapshot(i: &Inputs<'_>) -> Snapshots {
    use MetricType::{Counter as C, Gauge as G};
    let mut families = vec![
        Snapshot::new(
            "lb_map_write_failures",
            C,
            "Reconciliations in which a map write failed (the rest were written; retried every second).",
        )
        .one(i.writes.failed_reconciliations),
        Snapshot::new(
            "lb_map_entries_in_doubt",
            G,
            "Map entries whose last write failed, waiting to be written again.",
        )
        .one(i.writes.in_doubt as u64),
    ];

    let mut packets = Snapshot::new(
        "lb_packets",
        C,
        "Packets of a listener's flows, by direction (in: client to target; out: replies).",
    );
    let mut bytes = Snapshot::new("lb_bytes", C, "Bytes of a listener's flows, by direction.");
    let mut new_flows = Snapshot::new("lb_new_flows", C, "Flows scheduled to a target.");
    for (l, s) in &i.listener_stats {
        packets.add(&[("listener", l), ("direction", "in")], s.in_packets);
        packets.add(&[("listener", l), ("direction", "out")], s.out_packets);
        bytes.add(&[("listener", l), ("direction", "in")], s.in_bytes);
        bytes.add(&[("listener", l), ("direction", "out")], s.out_bytes);
        new_flows.add(&[("listener", l)], s.new_flows);
    }
    let mut active = Snapshot::new(
        "lb_active_flows",
        G,
        "Flow-table entries of the listener, as of the last expiry sweep.",
    );
    for l in &i.config.listeners {
        let n = i.active_flows.get(&l.name).copied().unwrap_or(0);
        active.add(&[("listener", &l.name)], n);
    }
    families.extend([packets, bytes, new_flows, active]);

    let mut dropped = Snapshot::new(
        "lb_dropped_packets",
        C,
        "Packets dropped by the XDP program, by reason.",
    );
    for &(index, reason) in counter::DROP_REASONS.iter() {
        dropped.add(&[("reason", reason)], i.counters[index as usize]);
    }
    let mut events = Snapshot::new(
        "lb_dataplane_events",
        C,
        "Other events of the XDP program: packets passed to the stack and why, flows rescheduled, flow-table inserts failed or skipped (flow_insert_limit), ICMP errors and reply fragments translated, redirects failed, FIB answers unexpected.",
    );
    for &(index, event) in counter::EVENTS.iter() {
        events.add(&[("event", event)], i.counters[index as usize]);
    }
    families.extend([dropped, events]);

    let mut target_healthy = Snapshot::new(
        "lb_target_healthy",
        G,
        "1 when the target is healthy, else 0.",
    );
    let mut per_group: BTreeMap<&str, (u64, u64)> = i
        .config
        .target_groups
        .iter()
        .map(|g| (g.name.as_str(), (0, 0)))
        .collect();
    for (k, t) in &i.model.targets {
        let (state, _) = i.model.shown_state(i.config, k, t);
        let up = state == TargetState::Healthy;
        target_healthy.add(
            &[("group", &k.group), ("target", &target_label(k))],
            u64::from(up),
        );
        if let Some(c) = per_group.get_mut(k.group.as_str()) {
            match state {
                TargetState::Healthy => c.0 += 1,
                TargetState::Unhealthy => c.1 += 1,
                _ => {}
            }
        }
    }
    let mut healthy = Snapshot::new("lb_healthy_targets", G, "Healthy targets of the group.");
    let mut unhealthy = Snapshot::new("lb_unhealthy_targets", G, "Unhealthy targets of the group.");
    for (g, (up, down)) in &per_group {
        healthy.add(&[("group", g)], *up);
        unhealthy.add(&[("group", g)], *down);
    }
    families.extend([target_healthy, healthy, unhealthy]);

    let mut reattachments = Snapshot::new(
        "lb_xdp_reattachments",
        C,
        "XDP attached afresh to an interface that no longer ran it (deleted and made again), since the agent started.",
    );
    for (name, n) in &i.reattachments {
        reattachments.add(&[("interface", name)], *n);
    }
    families.push(reattachments);
    families.push(
        Snapshot::new(
            "lb_route_epoch_changes",
            C,
            "Writes of a new route epoch (LB_ROUTE_EPOCH), since the agent started: each makes the data path look every destination up again.",
        )
        .one(i.route_cache.changes),
    );
    families.push(
        Snapshot::new(
            "lb_route_cache_enabled",
            G,
            "Whether the data path may reuse FIB answers (1), or looks every packet up (0: agent.route_cache = false, policy routing or multipath routes, or starting).",
        )
        .one(u64::from(i.route_cache.enabled)),
    );
    Snapshots(families)
}

fn target_label(k: &TargetKey) -> String {
    crate::config::endpoint(k.addr, k.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inputs of the example config with a few counts and a health check of each outcome.
    fn sample(model: &Model, config: &Config, health: &HealthMetrics) -> String {
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
            config,
            model,
            listener_stats: [("web".to_string(), stats)].into(),
            counters,
            active_flows: [("web".to_string(), 3)].into(),
            health,
            writes: MapWrites {
                failed_reconciliations: 2,
                in_doubt: 1,
            },
            reattachments: [("l0".to_string(), 0), ("l1".to_string(), 2)].into(),
            route_cache: RouteCacheStatus {
                enabled: true,
                reason: None,
                epoch: 7,
                changes: 9,
            },
        })
    }

    fn example() -> (Config, Model, TargetKey, HealthMetrics) {
        let config = crate::config::parse(include_str!("config/example.toml"), "x").unwrap();
        let mut model = Model::default();
        model
            .sync_config(&config, std::time::Instant::now())
            .unwrap();
        let key = model.targets.keys().next().unwrap().clone();
        let mut health = HealthMetrics::default();
        health.observe(&key, "pass", 0.003);
        health.observe(&key, "timeout", 6.0);
        (config, model, key, health)
    }

    fn sample_page() -> String {
        let (config, model, _, health) = example();
        sample(&model, &config, &health)
    }

    /// The families' names as exposed: a counter's samples end in `_total`.
    fn exposed_families(page: &str) -> Vec<String> {
        page.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let (name, kind) = (w.next()?, w.next()?);
                Some(match kind {
                    "counter" => format!("{name}_total"),
                    "info" => format!("{name}_info"),
                    _ => name.to_string(),
                })
            })
            .collect()
    }

    /// docs/config.md, the reference, names every metric family and every label value the
    /// agent exports.
    #[test]
    fn the_reference_names_every_family_and_label() {
        let reference = include_str!("../../docs/config.md");
        let page = sample_page();
        let families = exposed_families(&page);
        assert!(families.len() >= 17, "{families:?}");
        let labels = counter::DROP_REASONS
            .iter()
            .chain(counter::EVENTS.iter())
            .map(|(_, l)| l.to_string());
        let missing: Vec<String> = families
            .into_iter()
            .chain(labels)
            .filter(|name| !reference.contains(&format!("`{name}`")))
            .collect();
        assert!(
            missing.is_empty(),
            "docs/config.md does not name {missing:?}"
        );
    }

    /// The spec's families keep their names and labels (outside scripts are written against
    /// them).
    #[test]
    fn every_family_of_the_spec_is_on_the_page() {
        let page = sample_page();
        let families = exposed_families(&page);
        for name in [
            "lb_packets_total",
            "lb_bytes_total",
            "lb_new_flows_total",
            "lb_active_flows",
            "lb_dropped_packets_total",
            "lb_target_healthy",
            "lb_healthy_targets",
            "lb_unhealthy_targets",
            "lb_health_checks_total",
            "lb_health_check_duration_seconds",
            "lb_build_info",
        ] {
            assert!(
                families.iter().any(|f| f == name),
                "{name} not in {families:?}"
            );
        }
        assert!(page.ends_with("# EOF\n"), "not OpenMetrics:\n{page}");
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
            "# TYPE lb_dataplane_events counter",
            "lb_target_healthy{group=\"web\",target=\"198.18.2.11:8080\"} 0",
            "lb_healthy_targets{group=\"web\"} 0",
            "lb_unhealthy_targets{group=\"web\"} 0",
            "lb_health_checks_total{group=\"web\",target=\"198.18.2.11:8080\",result=\"timeout\"} 1",
            "lb_health_check_duration_seconds_bucket{le=\"0.005\",group=\"web\"} 1",
            "lb_health_check_duration_seconds_bucket{le=\"+Inf\",group=\"web\"} 2",
            "lb_health_check_duration_seconds_count{group=\"web\"} 2",
            "# TYPE lb_health_check_duration_seconds histogram",
            "lb_xdp_reattachments_total{interface=\"l0\"} 0",
            "lb_xdp_reattachments_total{interface=\"l1\"} 2",
            "lb_route_epoch_changes_total 9",
            "lb_route_cache_enabled 1",
            concat!("lb_build_info{version=\"", env!("CARGO_PKG_VERSION"), "\"} 1"),
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

    /// A target that leaves the model takes its health-check series with it, and a group
    /// that leaves the config its histogram; what stays keeps counting.
    #[test]
    fn series_of_targets_and_groups_gone_are_pruned() {
        let (config, mut model, key, mut health) = example();
        let other = TargetKey {
            group: "gone".into(),
            addr: key.addr,
            port: key.port,
        };
        health.observe(&other, "pass", 0.001);
        let series = |page: &str, target: &TargetKey| {
            let label = format!(
                "group=\"{}\",target=\"{}\"",
                target.group,
                target_label(target)
            );
            page.lines().filter(|l| l.contains(&label)).count()
        };
        let page = sample(&model, &config, &health);
        assert!(page.contains("lb_health_check_duration_seconds_count{group=\"gone\"} 1"));
        assert_eq!(series(&page, &other), 1);

        // "gone" is in no config: its target's checks and its histogram go.
        health.prune(&config, &model);
        let page = sample(&model, &config, &health);
        assert_eq!(series(&page, &other), 0, "{page}");
        assert!(!page.contains("group=\"gone\""), "{page}");
        assert_eq!(series(&page, &key), 3, "{page}"); // healthy, pass, timeout

        // The example's target removed from the model: its series go too.
        model.targets.remove(&key);
        health.prune(&config, &model);
        let page = sample(&model, &config, &health);
        assert_eq!(series(&page, &key), 0, "{page}");
        // The group is still configured: its histogram stays.
        assert!(page.contains("lb_health_check_duration_seconds_count{group=\"web\"} 2"));
    }
}
