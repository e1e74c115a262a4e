//! The disruption preview (`lb-agent plan`, `reload --dry-run`): what a new config would
//! change, from the same desired state and the same tables a reload would write
//! (`Controller::preview`, `reconcile::build_table`), changing nothing. Per group: the table
//! slots whose target changes (the share of new flows that would go elsewhere), the targets
//! that start or stop receiving new flows, and the live flows whose target would be removed,
//! terminated or start draining (counted in the flow table).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write,
    net::SocketAddr,
    time::Instant,
};

use anyhow::Result;
use lb_common::{FLOW_F_CLOSING, TARGET_FORWARD};

use crate::{
    api::{GroupPlan, Plan, TargetPlan},
    config::Config,
    control::Controller,
    maps::{FlowTable, FLOW_CHUNK},
    model::{Model, TargetKey},
    reconcile::build_table,
    state::Desired,
};

/// What happens to a target's live flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Stays,
    Added,
    Draining,
    Removed,
    Terminated,
}

impl Fate {
    fn as_str(self) -> &'static str {
        match self {
            Self::Stays => "stays",
            Self::Added => "added",
            Self::Draining => "draining",
            Self::Removed => "removed",
            Self::Terminated => "terminated",
        }
    }
}

/// A plan whose live flows are still to be counted: each target's (id, cookie) now, by
/// group and target index.
pub struct Pending {
    pub plan: Plan,
    ids: Vec<Vec<Option<(u32, u32)>>>,
}

/// Live flows (not closing) by (target id, cookie).
pub type LiveFlows = HashMap<(u32, u32), u64>;

/// Counts the live flows of the flow table, a chunk at a time (on a blocking thread: a big
/// table takes a while). Entries evicted while it reads may be missed.
pub fn count_live(table: &FlowTable) -> Result<LiveFlows> {
    let mut cursor = table.cursor(FLOW_CHUNK);
    let mut live = LiveFlows::new();
    while let Some((_, values)) = cursor.next(table)? {
        for v in values.iter().filter(|v| v.flags & FLOW_F_CLOSING == 0) {
            *live.entry((v.target_id, v.target_cookie)).or_default() += 1;
        }
    }
    Ok(live)
}

impl Pending {
    /// Fills in the live flows.
    pub fn with_flows(mut self, live: &LiveFlows) -> Plan {
        let mut total = 0;
        for (g, ids) in self.plan.groups.iter_mut().zip(&self.ids) {
            for (t, id) in g.targets.iter_mut().zip(ids) {
                t.live_flows = id.and_then(|k| live.get(&k)).copied().unwrap_or(0);
                total += t.live_flows;
                match t.fate.as_str() {
                    "removed" => g.flows_removed += t.live_flows,
                    "terminated" => g.flows_terminated += t.live_flows,
                    "draining" => g.flows_draining += t.live_flows,
                    _ => {}
                }
            }
        }
        self.plan.live_flows = total;
        self.plan
    }
}

/// Target key of every slot of group `gid`'s table in `desired` (empty: no table).
fn slots(desired: &Desired, model: &Model, gid: Option<u32>) -> Result<Vec<Option<TargetKey>>> {
    let Some(spec) = gid.and_then(|g| desired.tables.get(&g)) else {
        return Ok(Vec::new());
    };
    let by_id: HashMap<u32, &TargetKey> = model.targets.iter().map(|(k, t)| (t.id, k)).collect();
    Ok(build_table(spec)?
        .into_iter()
        .map(|id| by_id.get(&id).map(|k| (*k).clone()))
        .collect())
}

fn shares(slots: &[Option<TargetKey>]) -> BTreeMap<TargetKey, f64> {
    let mut out = BTreeMap::new();
    for k in slots.iter().flatten() {
        *out.entry(k.clone()).or_insert(0.0) += 1.0;
    }
    let n = slots.len().max(1) as f64;
    out.values_mut().for_each(|v| *v /= n);
    out
}

/// The plan of `new` (read from `name`) against what `ctl` runs at `now`, but for the live
/// flows (`Pending::with_flows`).
pub fn plan(ctl: &Controller, new: Config, name: &str, now: Instant) -> Result<Pending> {
    let before = ctl.desired(now);
    let (config, model, after, notes) = ctl.preview(new, now)?;
    let names: BTreeSet<&String> = ctl
        .config
        .target_groups
        .iter()
        .chain(&config.target_groups)
        .map(|g| &g.name)
        .collect();
    let mut groups = Vec::new();
    let mut ids = Vec::new();
    for name in names {
        let gid_before = ctl
            .config
            .group(name)
            .and_then(|_| ctl.model.group_ids.get(name));
        let gid_after = config.group(name).and_then(|_| model.group_ids.get(name));
        let old = slots(&before, &ctl.model, gid_before)?;
        let new = slots(&after, &model, gid_after)?;
        let slots_moved = if old.len() == new.len() {
            old.iter().zip(&new).filter(|(a, b)| a != b).count()
        } else {
            old.len().max(new.len())
        } as u64;
        let (share_old, share_new) = (shares(&old), shares(&new));
        let keys: BTreeSet<&TargetKey> = ctl
            .model
            .targets
            .keys()
            .chain(model.targets.keys())
            .filter(|k| &k.group == name)
            .collect();
        let mut targets = Vec::new();
        let mut target_ids = Vec::new();
        for key in keys {
            let now_t = ctl.model.targets.get(key);
            let next_t = model.targets.get(key);
            let fate = match (now_t, next_t) {
                (None, _) => Fate::Added,
                (Some(_), None) => Fate::Removed,
                (Some(a), Some(b)) => {
                    let forwarding = |d: &Desired, id: u32| {
                        d.targets
                            .get(&id)
                            .is_some_and(|v| v.state == TARGET_FORWARD)
                    };
                    if b.draining_until.is_some() && a.draining_until.is_none() {
                        Fate::Draining
                    } else if forwarding(&before, a.id) && !forwarding(&after, b.id) {
                        Fate::Terminated
                    } else {
                        Fate::Stays
                    }
                }
            };
            let (sb, sa) = (
                share_old.get(key).copied().unwrap_or(0.0),
                share_new.get(key).copied().unwrap_or(0.0),
            );
            targets.push(TargetPlan {
                target: SocketAddr::new(key.addr, key.port),
                share_before: sb,
                share_after: sa,
                starts_new_flows: sb == 0.0 && sa > 0.0,
                stops_new_flows: sb > 0.0 && sa == 0.0,
                fate: fate.as_str().into(),
                live_flows: 0,
            });
            target_ids.push(now_t.map(|t| (t.id, t.cookie)));
        }
        let change = match (gid_before.is_some(), gid_after.is_some()) {
            (false, true) => "added",
            (true, false) => "removed",
            _ if slots_moved > 0 || targets.iter().any(|t| t.fate != "stays") => "changed",
            _ => "unchanged",
        };
        let size = old.len().max(new.len()).max(1) as f64;
        groups.push(GroupPlan {
            name: name.clone(),
            change: change.into(),
            table_size_before: old.len() as u32,
            table_size_after: new.len() as u32,
            slots_moved,
            share_moved: slots_moved as f64 / size,
            flows_removed: 0,
            flows_terminated: 0,
            flows_draining: 0,
            targets,
        });
        ids.push(target_ids);
    }
    Ok(Pending {
        plan: Plan {
            config: name.to_string(),
            notes,
            groups,
            live_flows: 0,
        },
        ids,
    })
}

/// The plan as `lb-agent plan` prints it.
pub fn table(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "plan for {} (nothing changed; {} live flows)",
        plan.config, plan.live_flows
    );
    let pct = |x: f64| format!("{:.1}%", x * 100.0);
    let _ = writeln!(
        out,
        "\n{:<20} {:<10} {:>12} {:>9} {:>11} {:>9}",
        "GROUP", "CHANGE", "SLOTS MOVED", "REMOVED", "TERMINATED", "DRAINING"
    );
    for g in &plan.groups {
        let _ = writeln!(
            out,
            "{:<20} {:<10} {:>12} {:>9} {:>11} {:>9}",
            g.name,
            g.change,
            pct(g.share_moved),
            g.flows_removed,
            g.flows_terminated,
            g.flows_draining
        );
    }
    for g in plan.groups.iter().filter(|g| g.change != "unchanged") {
        let _ = writeln!(
            out,
            "\n{}: {} of {} slots move\n  {:<40} {:>8} {:>8} {:<12} {:<11} {:>10}",
            g.name,
            g.slots_moved,
            g.table_size_after.max(g.table_size_before),
            "TARGET",
            "SHARE",
            "AFTER",
            "NEW FLOWS",
            "FATE",
            "LIVE FLOWS"
        );
        for t in &g.targets {
            let new_flows = if t.starts_new_flows {
                "start"
            } else if t.stops_new_flows {
                "stop"
            } else if t.share_after > 0.0 {
                "yes"
            } else {
                "no"
            };
            let _ = writeln!(
                out,
                "  {:<40} {:>8} {:>8} {:<12} {:<11} {:>10}",
                t.target.to_string(),
                pct(t.share_before),
                pct(t.share_after),
                new_flows,
                t.fate,
                t.live_flows
            );
        }
    }
    for n in &plan.notes {
        let _ = writeln!(out, "\nnote: {n}");
    }
    out
}

#[cfg(test)]
mod tests;
