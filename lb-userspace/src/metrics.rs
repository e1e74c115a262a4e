//! The metrics page, OpenMetrics text encoded by `prometheus-client`: traffic per listener,
//! every data-plane counter (drops and passes by reason, flows rescheduled, flow inserts failed
//! or skipped, ICMP, reply fragments, …), flows, target health, health checks (results per
//! target, durations per group), map writes, XDP re-attachments, the next-hop cache and the
//! build.
//!
//! What is read at scrape time (the maps, the model) is encoded by a `Collector` over a
//! snapshot taken for that scrape, so a listener, target or interface that went away is simply
//! not on the next page. What the agent counts itself (health checks) lives in `Family`s of
//! `HealthMetrics`; their series of a target or group that left are removed (`prune`) when
//! the page is made.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Mutex,
};

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
    },
    registry::{Registry, Unit},
};

use crate::{
    api::{AccessLogStatus, PassiveSignals},
    config::Config,
    health::TargetState,
    model::{Model, TargetKey},
    route_epoch::RouteCacheStatus,
};

/// The page's media type: OpenMetrics 1.0 text (what `prometheus-client` encodes, and what
/// Prometheus asks for first).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds (seconds) of the health-check duration histogram.
pub const DURATION_BUCKETS: [f64; 10] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// A family of data-plane counters: its name (without the `_total` every counter sample
/// gets), help, and series.
pub struct CounterFamily {
    pub name: &'static str,
    pub help: &'static str,
    pub series: Series,
}

/// The series of a `CounterFamily`, by `lb_common::counter` index.
pub enum Series {
    /// One series without labels.
    One(u32),
    /// A series per counter, labelled `label` = its value.
    ByLabel(&'static str, &'static [(u32, &'static str)]),
}

/// Every counter of the data plane, each in exactly one family (a test checks that none is
/// left out).
/// `lb_dataplane_events_total{event}`: every counter but the drops under one family, as
/// before the families of [`DATAPLANE_FAMILIES`] (a duplicate, for compatibility).
pub const COMPAT_EVENTS: &str = "lb_dataplane_events";

pub const DATAPLANE_FAMILIES: [CounterFamily; 10] = [
    CounterFamily {
        name: "lb_dropped_packets",
        help: "Packets dropped by the XDP program, by reason.",
        series: Series::ByLabel("reason", &counter::DROP_REASONS),
    },
    CounterFamily {
        name: "lb_passed_packets",
        help: "Packets the XDP program passed to the kernel instead of forwarding them, by reason.",
        series: Series::ByLabel(
            "reason",
            &[
                (counter::PASS_TTL_EXPIRED, "ttl_expired"),
                (counter::PASS_NO_NEIGHBOUR, "no_neighbour"),
                (counter::PASS_FIB_OTHER, "fib_other"),
                (counter::PASS_NOT_A_REPLY, "not_a_reply"),
                (counter::PASS_FRAG_NEEDED, "frag_needed"),
                (counter::REDIRECT_FAILED, "redirect_failed"),
            ],
        ),
    },
    CounterFamily {
        name: "lb_flows_rescheduled",
        help: "Flows whose target was removed or terminated and that were scheduled to another target.",
        series: Series::One(counter::FLOWS_RESCHEDULED),
    },
    CounterFamily {
        name: "lb_flow_insert_failures",
        help: "Inserts the flow, reply-flow or reply-fragment table refused; the packets are still forwarded.",
        series: Series::One(counter::FLOW_INSERT_FAILED),
    },
    CounterFamily {
        name: "lb_flow_inserts_skipped",
        help: "New flows past flow_insert_limit, forwarded by the consistent hash without an entry.",
        series: Series::One(counter::FLOW_INSERT_SKIPPED),
    },
    CounterFamily {
        name: "lb_icmp_errors_forwarded",
        help: "ICMP errors about a balanced flow: to_target (from the network, sent to the flow's target), to_client (from a target, sent to the client from the VIP).",
        series: Series::ByLabel(
            "direction",
            &[
                (counter::ICMP_TO_TARGET, "to_target"),
                (counter::ICMP_FROM_TARGET, "to_client"),
            ],
        ),
    },
    CounterFamily {
        name: "lb_icmp_too_big_sent",
        help: "Packets to a VIP too big for the target side (DF set, or IPv6), answered with fragmentation needed / packet too big from the VIP.",
        series: Series::One(counter::ICMP_TOO_BIG_SENT),
    },
    CounterFamily {
        name: "lb_reply_fragments_translated",
        help: "Fragments of replies reverse-NATed (the first one included).",
        series: Series::One(counter::REPLY_FRAGMENTS),
    },
    CounterFamily {
        name: "lb_fib_unexpected_answers",
        help: "FIB answers the XDP program has no case for (blackhole, unreachable or prohibited route, forwarding disabled, ...); those packets are passed (reason fib_other).",
        series: Series::One(counter::FIB_UNEXPECTED),
    },
    CounterFamily {
        name: "lb_access_log_events_lost",
        help: "Access-logged flow starts and ends the XDP program could not send because its ring buffer was full (an end lost this way is logged by the sweep instead, with reason from the entry's flags).",
        series: Series::One(counter::FLOW_EVENTS_LOST),
    },
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    group: String,
    target: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    group: String,
}

type Durations = Family<GroupLabels, Histogram, fn() -> Histogram>;

/// What the agent counts itself: health checks by target and result, and their durations by
/// target group.
#[derive(Debug)]
pub struct HealthMetrics {
    checks: Family<CheckLabels, Counter>,
    durations: Durations,
    /// The label sets in the families (a `Family` cannot list them), for `prune`.
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    checks: BTreeSet<(TargetKey, &'static str)>,
    groups: BTreeSet<String>,
}

impl Default for HealthMetrics {
    fn default() -> Self {
        Self {
            checks: Family::default(),
            durations: Durations::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
            seen: Mutex::default(),
        }
    }
}

impl HealthMetrics {
    /// A check of `target` ended with `result` (`health::Outcome::label`) after `seconds`.
    pub fn observe(&mut self, target: &TargetKey, result: &'static str, seconds: f64) {
        self.checks
            .get_or_create(&check_labels(target, result))
            .inc();
        self.durations
            .get_or_create(&GroupLabels {
                group: target.group.clone(),
            })
            .observe(seconds);
        let seen = self.seen.get_mut().unwrap_or_else(|e| e.into_inner());
        seen.checks.insert((target.clone(), result));
        seen.groups.insert(target.group.clone());
    }

    /// Removes the series of targets that are no longer in the model, and the durations of
    /// groups that neither the config nor the model (a draining target) has any more.
    pub fn prune(&self, config: &Config, model: &Model) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.checks.retain(|(target, result)| {
            let keep = model.targets.contains_key(target);
            if !keep {
                self.checks.remove(&check_labels(target, result));
            }
            keep
        });
        seen.groups.retain(|group| {
            let keep = config.target_groups.iter().any(|g| &g.name == group)
                || model.targets.keys().any(|k| &k.group == group);
            if !keep {
                self.durations.remove(&GroupLabels {
                    group: group.clone(),
                });
            }
            keep
        });
    }
}

fn check_labels(target: &TargetKey, result: &'static str) -> CheckLabels {
    CheckLabels {
        group: target.group.clone(),
        target: target_label(target),
        result,
    }
}

/// How the map writes are going.
#[derive(Clone, Debug, Default)]
pub struct MapWrites {
    /// Reconciliations in which a write failed.
    pub failed_reconciliations: u64,
    /// Entries the kernel may or may not hold (their last write failed).
    pub in_doubt: usize,
}

/// Everything the page is made of.
pub struct Inputs<'a> {
    pub config: &'a Config,
    pub model: &'a Model,
    /// Listener name → its traffic (listeners whose counters could be read).
    pub listener_stats: BTreeMap<String, ListenerStats>,
    /// The data plane's counters, None when they cannot be read (their series are left out
    /// rather than shown as 0).
    pub counters: Option<[u64; counter::COUNT as usize]>,
    /// Listener name → flow entries, as of the last sweep.
    pub active_flows: BTreeMap<String, u64>,
    pub health: &'a HealthMetrics,
    pub writes: MapWrites,
    /// Attached interface → times XDP was attached to it afresh since the agent started.
    pub reattachments: BTreeMap<String, u64>,
    pub route_cache: RouteCacheStatus,
    /// The access log's counters, when it is on.
    pub access_log: Option<AccessLogStatus>,
    /// Group → (in zone fallback now, times it entered it), for groups that balance by zone.
    pub zone_fallback: BTreeMap<String, (bool, u64)>,
    /// Each target's passive health signals (targets whose counters could be read).
    pub passive: BTreeMap<TargetKey, PassiveSignals>,
    /// Scale-out: what is announced through BIRD (None: `[announce]` never on), and whether
    /// a drain is in progress.
    pub announce: Option<crate::announce::AnnounceMetrics>,
    pub draining: bool,
}

/// The page: every family, then `# EOF`.
pub fn render(i: &Inputs<'_>) -> String {
    i.health.prune(i.config, i.model);
    let mut registry = Registry::default();
    registry.register("lb_build", "The agent's version and commit", build_info());
    registry.register(
        "lb_health_checks",
        "Health checks by target and result (pass, timeout, response_code_mismatch, connection_refused, failed)",
        i.health.checks.clone(),
    );
    registry.register_with_unit(
        "lb_health_check_duration",
        "Duration of health checks, by target group",
        Unit::Seconds,
        i.health.durations.clone(),
    );
    registry.register_collector(Box::new(Snapshot::new(i)));
    let mut page = String::new();
    prometheus_client::encoding::text::encode(&mut page, &registry)
        .expect("encoding into a String does not fail");
    page
}

/// `lb_build_info{version, git_commit}` (git_commit when built from a git checkout).
fn build_info() -> Info<Vec<(&'static str, &'static str)>> {
    let mut labels = vec![("version", env!("CARGO_PKG_VERSION"))];
    if let Some(commit) = option_env!("LB_GIT_COMMIT") {
        labels.push(("git_commit", commit));
    }
    Info::new(labels)
}

/// What one scrape reads from the maps and the model, owned (a `Collector` is 'static).
#[derive(Debug)]
struct Snapshot {
    /// Listener → its traffic, when readable.
    traffic: Vec<(String, ListenerStats)>,
    /// Every configured listener → its flow entries.
    active_flows: Vec<(String, u64)>,
    counters: Option<[u64; counter::COUNT as usize]>,
    /// (group, target, healthy).
    targets: Vec<(String, String, bool)>,
    /// Group → (healthy, unhealthy).
    groups: BTreeMap<String, (u64, u64)>,
    writes: MapWrites,
    reattachments: Vec<(String, u64)>,
    route_cache: RouteCacheStatus,
    access_log: Option<AccessLogStatus>,
    zone_fallback: Vec<(String, bool, u64)>,
    /// (group, target label, signals).
    passive: Vec<(String, String, PassiveSignals)>,
    /// (group, target, zone) of every target that has a zone.
    zones: Vec<(String, String, String)>,
    node_zone: String,
    announce: Option<crate::announce::AnnounceMetrics>,
    draining: bool,
}

impl Snapshot {
    fn new(i: &Inputs<'_>) -> Self {
        let mut groups: BTreeMap<String, (u64, u64)> = i
            .config
            .target_groups
            .iter()
            .map(|g| (g.name.clone(), (0, 0)))
            .collect();
        let mut targets = Vec::new();
        for (k, t) in &i.model.targets {
            let (state, _) = i.model.shown_state(i.config, k, t);
            targets.push((
                k.group.clone(),
                target_label(k),
                state == TargetState::Healthy,
            ));
            if let Some(c) = groups.get_mut(&k.group) {
                match state {
                    TargetState::Healthy => c.0 += 1,
                    TargetState::Unhealthy => c.1 += 1,
                    _ => {}
                }
            }
        }
        Self {
            traffic: i
                .listener_stats
                .iter()
                .map(|(l, s)| (l.clone(), *s))
                .collect(),
            active_flows: i
                .config
                .listeners
                .iter()
                .map(|l| {
                    let n = i.active_flows.get(&l.name).copied().unwrap_or(0);
                    (l.name.clone(), n)
                })
                .collect(),
            counters: i.counters,
            targets,
            groups,
            writes: i.writes.clone(),
            reattachments: i
                .reattachments
                .iter()
                .map(|(n, c)| (n.clone(), *c))
                .collect(),
            route_cache: i.route_cache.clone(),
            access_log: i.access_log.clone(),
            zone_fallback: i
                .zone_fallback
                .iter()
                .map(|(g, (now, n))| (g.clone(), *now, *n))
                .collect(),
            zones: i
                .model
                .targets
                .iter()
                .filter_map(|(k, t)| {
                    let z = t.zone.as_deref().filter(|z| !z.is_empty())?;
                    Some((k.group.clone(), target_label(k), z.to_string()))
                })
                .collect(),
            node_zone: i.config.agent.zone.clone(),
            announce: i.announce.clone(),
            draining: i.draining,
            passive: i
                .passive
                .iter()
                .map(|(k, p)| (k.group.clone(), target_label(k), *p))
                .collect(),
        }
    }
}

/// One family of a collector: its descriptor, then a sample per (labels, value).
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, M)>,
) -> std::fmt::Result {
    let mut family = None;
    for (labels, metric) in series {
        if family.is_none() {
            family = Some(encoder.encode_descriptor(name, help, None, metric.metric_type())?);
        }
        if let Some(f) = family.as_mut() {
            metric.encode(f.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// A family of one series without labels.
fn single(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    metric: impl EncodeMetric,
) -> std::fmt::Result {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(v: u64) -> ConstGauge<u64> {
    ConstGauge::new(v)
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let directions = |f: fn(&ListenerStats) -> (u64, u64)| {
            self.traffic.iter().flat_map(move |(l, s)| {
                let (i, o) = f(s);
                [
                    ([("listener", l.as_str()), ("direction", "in")], i),
                    ([("listener", l.as_str()), ("direction", "out")], o),
                ]
            })
        };
        family(
            &mut e,
            "lb_packets",
            "Packets of a listener's flows, by direction (in: client to target; out: replies).",
            directions(|s| (s.in_packets, s.out_packets)).map(|(l, v)| (l, ConstCounter::new(v))),
        )?;
        family(
            &mut e,
            "lb_bytes",
            "Bytes of a listener's flows, by direction.",
            directions(|s| (s.in_bytes, s.out_bytes)).map(|(l, v)| (l, ConstCounter::new(v))),
        )?;
        family(
            &mut e,
            "lb_new_flows",
            "Flows scheduled to a target.",
            self.traffic
                .iter()
                .map(|(l, s)| ([("listener", l.as_str())], ConstCounter::new(s.new_flows))),
        )?;
        family(
            &mut e,
            "lb_active_flows",
            "Flow-table entries of the listener, as of the last expiry sweep.",
            self.active_flows
                .iter()
                .map(|(l, n)| ([("listener", l.as_str())], gauge(*n))),
        )?;
        type Field = fn(&PassiveSignals) -> u64;
        let passive: [(&str, &str, Field); 6] = [
            ("lb_target_new_flows", "Flows scheduled to the target (its entries created, or forwarded without one).", |p| p.new_flows),
            ("lb_target_connections_answered", "TCP connections the target answered (SYN-ACK seen).", |p| p.answered),
            ("lb_target_resets", "TCP connections the target reset (an RST from it).", |p| p.resets),
            ("lb_target_syns_unanswered", "TCP connections whose SYN the client sent again before the target answered.", |p| p.syns_unanswered),
            ("lb_target_connections_refused", "TCP connections the target refused (an RST before any SYN-ACK).", |p| p.refused),
            ("lb_passive_ejections", "Times passive health made the target unhealthy (passive_unhealthy_after failed connections in a row).", |p| p.ejections),
        ];
        for (name, help, field) in passive {
            family(
                &mut e,
                name,
                help,
                self.passive.iter().map(|(g, t, p)| {
                    (
                        [("group", g.as_str()), ("target", t.as_str())],
                        ConstCounter::new(field(p)),
                    )
                }),
            )?;
        }
        family(
            &mut e,
            "lb_target_failed_connections_in_a_row",
            "TCP connections of the target that failed (refused or unanswered) since its last answered one.",
            self.passive.iter().map(|(g, t, p)| {
                (
                    [("group", g.as_str()), ("target", t.as_str())],
                    gauge(p.failures_in_a_row),
                )
            }),
        )?;
        if !self.node_zone.is_empty() {
            family(
                &mut e,
                "lb_node_zone_info",
                "This node's zone (agent.zone); absent when it has none.",
                [([("zone", self.node_zone.as_str())], gauge(1))],
            )?;
        }
        family(
            &mut e,
            "lb_target_zone_info",
            "A target's zone (targets without one are not listed).",
            self.zones.iter().map(|(g, t, z)| {
                (
                    [
                        ("group", g.as_str()),
                        ("target", t.as_str()),
                        ("zone", z.as_str()),
                    ],
                    gauge(1),
                )
            }),
        )?;
        family(
            &mut e,
            "lb_zone_fallback",
            "1 while a group's new flows go to other zones because this node's zone has no healthy target (cross_zone off).",
            self.zone_fallback
                .iter()
                .map(|(g, now, _)| ([("group", g.as_str())], gauge(*now as u64))),
        )?;
        family(
            &mut e,
            "lb_zone_fallbacks",
            "Times a group entered the zone fallback.",
            self.zone_fallback
                .iter()
                .map(|(g, _, n)| ([("group", g.as_str())], ConstCounter::new(*n))),
        )?;
        if let Some(a) = &self.announce {
            self.encode_announce(&mut e, a)?;
        }
        if let Some(log) = &self.access_log {
            family(
                &mut e,
                "lb_access_log_records",
                "Access-log records written, by close reason (fin, rst, idle_timeout, target_removed, target_unhealthy, evicted).",
                log.records
                    .iter()
                    .map(|(r, n)| ([("reason", r.as_str())], ConstCounter::new(*n))),
            )?;
            single(
                &mut e,
                "lb_access_log_write_errors",
                "Access-log records that could not be written (the file could not be opened or written).",
                ConstCounter::new(log.write_errors),
            )?;
            single(
                &mut e,
                "lb_access_log_open_flows",
                "Access-logged flows whose start was seen and whose end was not yet.",
                gauge(log.open_flows),
            )?;
        }
        if let Some(counters) = &self.counters {
            for f in &DATAPLANE_FAMILIES {
                let value = |index: u32| ConstCounter::new(counters[index as usize]);
                match f.series {
                    Series::One(index) => single(&mut e, f.name, f.help, value(index))?,
                    Series::ByLabel(label, series) => family(
                        &mut e,
                        f.name,
                        f.help,
                        series.iter().map(|&(i, v)| ([(label, v)], value(i))),
                    )?,
                }
            }
            // The same events under the one family earlier versions exported them in, kept so
            // that dashboards and alerts written against it go on working.
            family(
                &mut e,
                COMPAT_EVENTS,
                "The XDP program's events other than drops, by event (the same counts as the families above; kept for dashboards written before them).",
                counter::EVENTS
                    .iter()
                    .map(|&(i, v)| ([("event", v)], ConstCounter::new(counters[i as usize]))),
            )?;
        }
        family(
            &mut e,
            "lb_target_healthy",
            "1 when the target is healthy, else 0.",
            self.targets.iter().map(|(g, t, up)| {
                (
                    [("group", g.as_str()), ("target", t.as_str())],
                    gauge(u64::from(*up)),
                )
            }),
        )?;
        family(
            &mut e,
            "lb_healthy_targets",
            "Healthy targets of the group.",
            self.groups
                .iter()
                .map(|(g, (up, _))| ([("group", g.as_str())], gauge(*up))),
        )?;
        family(
            &mut e,
            "lb_unhealthy_targets",
            "Unhealthy targets of the group.",
            self.groups
                .iter()
                .map(|(g, (_, down))| ([("group", g.as_str())], gauge(*down))),
        )?;
        single(
            &mut e,
            "lb_map_write_failures",
            "Reconciliations in which a map write failed (the rest were written; retried every second).",
            ConstCounter::new(self.writes.failed_reconciliations),
        )?;
        single(
            &mut e,
            "lb_map_entries_in_doubt",
            "Map entries whose last write failed, waiting to be written again.",
            gauge(self.writes.in_doubt as u64),
        )?;
        family(
            &mut e,
            "lb_xdp_reattachments",
            "XDP attached afresh to an interface that no longer ran it (deleted and made again), since the agent started.",
            self.reattachments
                .iter()
                .map(|(n, c)| ([("interface", n.as_str())], ConstCounter::new(*c))),
        )?;
        single(
            &mut e,
            "lb_route_epoch_changes",
            "Writes of a new route epoch (LB_ROUTE_EPOCH), since the agent started: each makes the data path look every destination up again.",
            ConstCounter::new(self.route_cache.changes),
        )?;
        single(
            &mut e,
            "lb_route_cache_enabled",
            "Whether the data path may reuse FIB answers (1), or looks every packet up (0: agent.route_cache = false, policy routing or multipath routes, or starting).",
            gauge(u64::from(self.route_cache.enabled)),
        )
    }
}

impl Snapshot {
    /// `lb_vip_*`, `lb_bird_up`, `lb_bgp_session_up`, `lb_announce_*`, `lb_draining`.
    fn encode_announce(
        &self,
        e: &mut DescriptorEncoder<'_>,
        a: &crate::announce::AnnounceMetrics,
    ) -> std::fmt::Result {
        let vips: Vec<(String, bool, bool, u64)> = a
            .routes
            .iter()
            .filter_map(|(r, w, up, n)| match r {
                crate::announce::Route::Vip(ip) => Some((ip.to_string(), *w, *up, *n)),
                crate::announce::Route::Return(_) => None,
            })
            .collect();
        let returns: Vec<(String, bool)> = a
            .routes
            .iter()
            .filter_map(|(r, _, up, _)| match r {
                crate::announce::Route::Return(c) => Some((format!("{}/{}", c.addr, c.len), *up)),
                crate::announce::Route::Vip(_) => None,
            })
            .collect();
        family(
            e,
            "lb_return_route_announced",
            "1 while BIRD announces the return route to the targets (announce.return_routes).",
            returns
                .iter()
                .map(|(p, up)| ([("prefix", p.as_str())], gauge(u64::from(*up)))),
        )?;
        family(
            e,
            "lb_vip_announced",
            "1 while BIRD announces the VIP (its static protocol up), as BIRD last reported.",
            vips.iter()
                .map(|(v, _, up, _)| ([("vip", v.as_str())], gauge(u64::from(*up)))),
        )?;
        family(
            e,
            "lb_vip_announce_wanted",
            "1 while the agent wants the VIP announced (a listener of it can serve, no drain).",
            vips.iter()
                .map(|(v, w, _, _)| ([("vip", v.as_str())], gauge(u64::from(*w)))),
        )?;
        family(
            e,
            "lb_vip_announce_changes",
            "Announcements and withdrawals of the VIP BIRD confirmed, since the agent started.",
            vips.iter()
                .map(|(v, _, _, n)| ([("vip", v.as_str())], ConstCounter::new(*n))),
        )?;
        single(
            e,
            "lb_bird_up",
            "1 while the agent talks to BIRD over its control socket.",
            gauge(u64::from(a.bird_up)),
        )?;
        family(
            e,
            "lb_bgp_session_up",
            "1 while BIRD's BGP or BFD protocol is up (a BGP session established), as BIRD reports.",
            a.sessions.iter().map(|s| {
                (
                    [("protocol", s.name.as_str()), ("kind", s.protocol.as_str())],
                    gauge(u64::from(s.state == "up")),
                )
            }),
        )?;
        if let Some(t) = a.last_change {
            let secs = t
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            single(
                e,
                "lb_announce_last_change_timestamp_seconds",
                "When BIRD last confirmed a VIP announced or withdrawn (Unix time).",
                ConstGauge::new(secs),
            )?;
        }
        single(
            e,
            "lb_draining",
            "1 while `lb-agent drain` keeps the VIPs withdrawn.",
            gauge(u64::from(self.draining)),
        )
    }
}

fn target_label(k: &TargetKey) -> String {
    crate::config::endpoint(k.addr, k.port)
}

#[cfg(test)]
mod tests;
