//! What the agent shows: the status (`GET /v1/status`) and the metrics page, built from the
//! controller, the data path and the agent's own counters.

use std::collections::{BTreeMap, BTreeSet};

use super::Agent;
use crate::{
    api::{
        AccessLogStatus, DatapathStatus, Drops, GroupStatus, InterfaceStatus, LastCheck,
        ListenerStatus, MapsStatus, PassiveSignals, Status, TargetStatus, Traffic,
    },
    health::TargetState,
    metrics,
    model::TargetKey,
    state::{self, RoleSource, ZoneScope},
};

impl Agent {
    pub(super) fn status(&self) -> Status {
        let c = &self.ctl.config;
        let listeners = c
            .listeners
            .iter()
            .map(|l| ListenerStatus {
                name: l.name.clone(),
                address: l.address,
                port: l.port.0,
                protocol: l.protocol,
                target_group: l.target_group.clone(),
                allowed_sources: l.allowed_sources.clone(),
                traffic: self.traffic(&l.name),
            })
            .collect();
        let desired = self.ctl.reconciler.shadow();
        let groups = c
            .target_groups
            .iter()
            .map(|g| {
                let gid = self.ctl.model.group_ids.get(&g.name);
                let in_table: BTreeSet<u32> = gid
                    .and_then(|id| desired.tables.get(&id))
                    .map(|t| t.members.iter().map(|m| m.target_id).collect())
                    .unwrap_or_default();
                let targets = self
                    .ctl
                    .model
                    .targets
                    .iter()
                    .filter(|(k, _)| k.group == g.name)
                    .map(|(k, t)| {
                        let (state, reason) = self.ctl.model.shown_state(c, k, t);
                        TargetStatus {
                            target: std::net::SocketAddr::new(k.addr, k.port),
                            weight: t.weight,
                            zone: t.zone.clone(),
                            origin: t.origin,
                            state,
                            reason,
                            receives_new_flows: in_table.contains(&t.id),
                            last_check: t.last_check.as_ref().map(|l| LastCheck {
                                result: l.result.to_string(),
                                detail: l.detail.clone(),
                                latency_ms: l.latency_ms,
                            }),
                            passive: self.passive_signals(k, t.id),
                        }
                    })
                    .collect();
                let healthy = self
                    .ctl
                    .model
                    .targets
                    .iter()
                    .filter(|(k, t)| {
                        k.group == g.name
                            && t.draining_until.is_none()
                            && t.health == TargetState::Healthy
                    })
                    .count();
                GroupStatus {
                    name: g.name.clone(),
                    fail_open: healthy == 0 && !in_table.is_empty(),
                    cross_zone: g.cross_zone.unwrap_or(c.agent.cross_zone),
                    zone_scope: state::zone_scope(c, g, self.ctl.model.group_targets(&g.name)),
                    health_check: g.health_check.clone(),
                    targets,
                }
            })
            .collect();
        let roles = self.ctl.interface_roles();
        let routes = self.ctl.routes.egress();
        let addresses = self.ctl.target_addresses();
        let interfaces = self
            .dp
            .attached
            .iter()
            .map(|(n, (i, m))| {
                // How many target addresses the kernel routes out of it, when that decides.
                let routed = matches!(roles.source, RoleSource::Routes | RoleSource::Fallback)
                    .then(|| {
                        addresses
                            .iter()
                            .filter(|a| routes.get(a) == Some(i))
                            .count() as u64
                    });
                InterfaceStatus {
                    name: n.clone(),
                    ifindex: *i,
                    mode: m.to_string(),
                    reattachments: self.dp.reattachments.get(n).copied().unwrap_or(0),
                    faces_targets: roles.targets.contains(i),
                    role_source: roles.source,
                    role: roles.source.describe().into(),
                    targets_routed: routed,
                }
            })
            .collect();
        let counters = self.dp.maps.counters();
        let drops = match &counters {
            Ok(counters) => lb_common::counter::DROP_REASONS
                .iter()
                .map(|&(i, reason)| Drops {
                    reason: reason.into(),
                    packets: counters[i as usize],
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        Status {
            announce: self
                .announcer
                .as_ref()
                .map(|(a, _)| a.status(self.drain.is_some())),
            zone: (!c.agent.zone.is_empty()).then(|| c.agent.zone.clone()),
            listeners,
            target_groups: groups,
            datapath: DatapathStatus {
                pin_path: self.dp.pin_dir.clone(),
                interfaces,
                maps: MapsStatus {
                    in_sync: self.retry_at.is_none() && !self.building,
                    entries_in_doubt: self.ctl.reconciler.in_doubt() as u64,
                    tables_building: self.building,
                    failed_reconciliations: self.failed_reconciliations,
                    last_error: self.last_write_error.clone(),
                },
                route_cache: self.route_cache.status(),
                drops,
                access_log: self.access_log_status(counters.ok().as_ref()),
            },
        }
    }

    /// A target's passive health signals (None when they cannot be read).
    pub(super) fn passive_signals(&self, key: &TargetKey, id: u32) -> Option<PassiveSignals> {
        let s = self.signals.as_ref()?.get(id).ok()?;
        Some(PassiveSignals {
            new_flows: s.stats.new_flows,
            answered: s.stats.answered,
            resets: s.stats.resets,
            syns_unanswered: s.stats.syns_unanswered,
            refused: s.stats.refused,
            failures_in_a_row: s.failures_in_a_row,
            ejections: self.passive_ejections.get(key).copied().unwrap_or(0),
        })
    }

    /// The access log's counters, when it is on.
    pub(super) fn access_log_status(
        &self,
        counters: Option<&[u64; lb_common::counter::COUNT as usize]>,
    ) -> Option<AccessLogStatus> {
        let path = &self.ctl.config.agent.access_log;
        let log = self.access_log.as_ref().filter(|_| !path.is_empty())?;
        let lost = counters.map(|c| c[lb_common::counter::FLOW_EVENTS_LOST as usize]);
        Some(log.stats.status(path, lost))
    }

    /// A listener's counters (None when they cannot be read).
    fn traffic(&self, listener: &str) -> Option<Traffic> {
        let id = self.ctl.model.listener_ids.get(&listener.to_string())?;
        let s = self.dp.maps.listener_stats(id).ok()?;
        Some(Traffic {
            packets_in: s.in_packets,
            packets_out: s.out_packets,
            bytes_in: s.in_bytes,
            bytes_out: s.out_bytes,
            new_flows: s.new_flows,
            active_flows: self.active_flows.get(listener).copied().unwrap_or(0),
        })
    }

    /// Every listener's counters by name (those that could be read).
    pub(super) fn listener_stats(&self) -> BTreeMap<String, lb_common::ListenerStats> {
        let mut out = BTreeMap::new();
        for l in &self.ctl.config.listeners {
            if let Some(id) = self.ctl.model.listener_ids.get(&l.name) {
                if let Ok(s) = self.dp.maps.listener_stats(id) {
                    out.insert(l.name.clone(), s);
                }
            }
        }
        out
    }

    pub(super) fn metrics_page(&self) -> String {
        let listener_stats = self.listener_stats();
        let interfaces = self.dp.attached.keys();
        metrics::render(&metrics::Inputs {
            config: &self.ctl.config,
            model: &self.ctl.model,
            listener_stats,
            counters: self.dp.maps.counters().ok(),
            access_log: self.access_log_status(None),
            announce: self.announcer.as_ref().map(|(a, _)| a.metrics()),
            draining: self.drain.is_some(),
            passive: self
                .ctl
                .model
                .targets
                .iter()
                .filter_map(|(k, t)| Some((k.clone(), self.passive_signals(k, t.id)?)))
                .collect(),
            zone_fallback: self
                .zone_scopes
                .iter()
                .filter(|(g, _)| {
                    let c = &self.ctl.config;
                    !c.agent.zone.is_empty()
                        && c.group(g)
                            .is_some_and(|g| !g.cross_zone.unwrap_or(c.agent.cross_zone))
                })
                .map(|(g, (scope, n, _))| (g.clone(), (*scope == ZoneScope::Fallback, *n)))
                .collect(),
            active_flows: self.active_flows.clone(),
            health: &self.health_metrics,
            writes: metrics::MapWrites {
                failed_reconciliations: self.failed_reconciliations,
                in_doubt: self.ctl.reconciler.in_doubt(),
            },
            reattachments: interfaces
                .map(|n| {
                    (
                        n.clone(),
                        self.dp.reattachments.get(n).copied().unwrap_or(0),
                    )
                })
                .collect(),
            route_cache: self.route_cache.status(),
        })
    }
}
