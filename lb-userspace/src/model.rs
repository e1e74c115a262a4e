//! What the agent knows about its targets: registration (from the config or the API), health as
//! the checkers last reported it, and lifecycle (draining, slow start, unhealthy draining).
//! Stable numeric ids for listeners, groups and targets live here too: they are what the maps
//! are keyed by, so they must survive reloads (and, through the state file, restarts).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{Config, TargetGroupConfig},
    health::{Outcome, Reason, TargetState, Transition},
};

/// A target's identity: its group and endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TargetKey {
    pub group: String,
    pub addr: IpAddr,
    pub port: u16,
}

impl std::fmt::Display for TargetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}",
            self.group,
            SocketAddr::new(self.addr, self.port)
        )
    }
}

/// Where a target's registration came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Config,
    Api,
}

/// One registered (or draining) target.
#[derive(Clone, Debug)]
pub struct Target {
    pub weight: u32,
    pub zone: Option<String>,
    pub origin: Origin,
    pub id: u32,
    pub cookie: u32,
    /// As the checker reports it: `Initial`, `Healthy` or `Unhealthy`.
    pub health: TargetState,
    pub reason: Option<Reason>,
    /// Set when the target became healthy while others in its group were: its share ramps up
    /// over `slow_start` from here.
    pub slow_start_from: Option<Instant>,
    pub unhealthy_since: Option<Instant>,
    /// Deregistered: draining until this moment, then removed.
    pub draining_until: Option<Instant>,
    pub last_check: Option<LastCheck>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LastCheck {
    pub result: &'static str,
    pub detail: String,
    pub latency_ms: f64,
}

/// Numeric ids handed out once per name and kept until the name is gone; a freed id is only
/// reused when no never-used id is left, so stale flow entries rarely meet a new owner (and a
/// new cookie tells them apart when they do).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ids<K: Ord> {
    #[serde(with = "pairs")]
    #[serde(bound(serialize = "K: Serialize", deserialize = "K: Deserialize<'de>"))]
    assigned: BTreeMap<K, u32>,
    freed: BTreeSet<u32>,
    next: u32,
}

impl<K: Ord> Default for Ids<K> {
    fn default() -> Self {
        Self {
            assigned: BTreeMap::new(),
            freed: BTreeSet::new(),
            next: 0,
        }
    }
}

impl<K: Ord + Clone> Ids<K> {
    pub fn get(&self, key: &K) -> Option<u32> {
        self.assigned.get(key).copied()
    }

    pub fn assign(&mut self, key: &K, limit: u32) -> Option<u32> {
        if let Some(id) = self.get(key) {
            return Some(id);
        }
        let id = if self.next < limit {
            self.next += 1;
            self.next - 1
        } else {
            self.freed.pop_first()?
        };
        self.assigned.insert(key.clone(), id);
        Some(id)
    }

    pub fn release(&mut self, key: &K) -> Option<u32> {
        let id = self.assigned.remove(key)?;
        self.freed.insert(id);
        Some(id)
    }

    /// Releases the ids of keys not in `keys`, then assigns one to every key in it; None when
    /// ids ran out.
    pub fn sync<'a>(&mut self, keys: impl Iterator<Item = &'a K> + Clone, limit: u32) -> Option<()>
    where
        K: 'a,
    {
        let wanted: BTreeSet<&K> = keys.clone().collect();
        let stale: Vec<K> = self
            .assigned
            .keys()
            .filter(|k| !wanted.contains(k))
            .cloned()
            .collect();
        for k in &stale {
            self.release(k);
        }
        for k in keys {
            self.assign(k, limit)?;
        }
        Some(())
    }
}

/// A map as a list of pairs (JSON keys must be strings; target keys are not).
mod pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize, S: Serializer>(
        m: &BTreeMap<K, u32>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter())
    }

    pub fn deserialize<'de, K: Deserialize<'de> + Ord, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<K, u32>, D::Error> {
        Ok(Vec::<(K, u32)>::deserialize(d)?.into_iter().collect())
    }
}

/// A removed target's id, kept in the map until the id is reused: its flows are dropped or
/// rescheduled (`lb_common::TARGET_DROP` / `TARGET_RESCHEDULE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub cookie: u32,
    pub terminate: bool,
}

/// All targets, and the ids of everything.
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub targets: BTreeMap<TargetKey, Target>,
    pub listener_ids: Ids<String>,
    pub group_ids: Ids<String>,
    pub target_ids: Ids<TargetKey>,
    pub tombstones: BTreeMap<u32, Tombstone>,
    /// Cookie of the next target that takes an id.
    pub next_cookie: u32,
}

/// A change of a target's state as the status shows it, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateChange {
    pub target: TargetKey,
    pub from: TargetState,
    pub to: TargetState,
    pub reason: Option<Reason>,
}

impl Model {
    /// Registers `key` (or updates its weight and zone). A draining target registered again
    /// comes back, keeping its health.
    pub fn register(
        &mut self,
        key: TargetKey,
        weight: u32,
        zone: Option<String>,
        origin: Origin,
    ) -> Result<(), String> {
        if let Some(t) = self.targets.get_mut(&key) {
            t.weight = weight;
            t.zone = zone;
            t.origin = origin;
            t.draining_until = None;
            return Ok(());
        }
        let id = self
            .target_ids
            .assign(&key, lb_common::maps::MAX_TARGETS)
            .ok_or_else(|| {
                format!(
                    "no free target id (at most {})",
                    lb_common::maps::MAX_TARGETS
                )
            })?;
        self.tombstones.remove(&id);
        self.next_cookie = self.next_cookie.wrapping_add(1).max(1);
        self.targets.insert(
            key,
            Target {
                weight,
                zone,
                origin,
                id,
                cookie: self.next_cookie,
                health: TargetState::Initial,
                reason: Some(Reason::InitialHealthChecking),
                slow_start_from: None,
                unhealthy_since: None,
                draining_until: None,
                last_check: None,
            },
        );
        Ok(())
    }

    /// Starts draining `key` for `delay`; false if it is not registered. Draining again does
    /// not extend the deadline.
    pub fn deregister(&mut self, key: &TargetKey, now: Instant, delay: Duration) -> bool {
        match self.targets.get_mut(key) {
            Some(t) => {
                t.draining_until.get_or_insert(now + delay);
                true
            }
            None => false,
        }
    }

    /// Applies a checker's report.
    pub fn record_check(
        &mut self,
        key: &TargetKey,
        outcome: &Outcome,
        latency: Duration,
        transition: Option<Transition>,
        at: Instant,
    ) {
        let others_healthy = self.targets.iter().any(|(k, t)| {
            k != key
                && k.group == key.group
                && t.health == TargetState::Healthy
                && t.draining_until.is_none()
        });
        let Some(t) = self.targets.get_mut(key) else {
            return;
        };
        let (result, detail) = match outcome {
            Outcome::Pass => ("pass", String::new()),
            Outcome::Fail(_, d) => (outcome.label(), d.clone()),
        };
        t.last_check = Some(LastCheck {
            result,
            detail,
            latency_ms: latency.as_secs_f64() * 1000.0,
        });
        if let Outcome::Fail(reason, _) = outcome {
            if t.health == TargetState::Unhealthy {
                t.reason = Some(*reason);
            }
        }
        if let Some(tr) = transition {
            t.health = tr.to;
            t.reason = tr.reason;
            match tr.to {
                TargetState::Healthy => {
                    t.unhealthy_since = None;
                    t.slow_start_from = others_healthy.then_some(at);
                }
                TargetState::Unhealthy => {
                    t.unhealthy_since = Some(at);
                    t.slow_start_from = None;
                }
                _ => {}
            }
        }
    }

    /// The targets of group `group`.
    pub fn group_targets<'a>(
        &'a self,
        group: &'a str,
    ) -> impl Iterator<Item = &'a Target> + Clone + 'a {
        self.targets
            .iter()
            .filter(move |(k, _)| k.group == group)
            .map(|(_, t)| t)
    }

    /// Every target's id and the cookie it holds the id with.
    pub fn cookies(&self) -> std::collections::HashMap<u32, u32> {
        self.targets.values().map(|t| (t.id, t.cookie)).collect()
    }

    /// Passive health: `key` turns unhealthy at once (its connections failed); false when it is
    /// not a healthy, registered target.
    pub fn eject(&mut self, key: &TargetKey, at: Instant) -> bool {
        match self.targets.get_mut(key) {
            Some(t) if t.health == TargetState::Healthy && t.draining_until.is_none() => {
                t.health = TargetState::Unhealthy;
                t.reason = Some(Reason::ConnectionsFailed);
                t.unhealthy_since = Some(at);
                t.slow_start_from = None;
                true
            }
            _ => false,
        }
    }

    /// Removes targets whose draining ended (leaving tombstones for their ids); their keys.
    pub fn expire_draining(&mut self, config: &Config, now: Instant) -> Vec<TargetKey> {
        let done: Vec<TargetKey> = self
            .targets
            .iter()
            .filter(|(_, t)| t.draining_until.is_some_and(|d| d <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in &done {
            let terminate = config
                .group(&key.group)
                .is_some_and(|g| g.connection_termination_on_deregistration);
            self.remove(key, terminate);
        }
        done
    }

    /// Forgets `key` now, leaving a tombstone that drops (`terminate` = false) or resets
    /// (true) its flows.
    pub fn remove(&mut self, key: &TargetKey, terminate: bool) {
        if let Some(t) = self.targets.remove(key) {
            self.target_ids.release(key);
            self.tombstones.insert(
                t.id,
                Tombstone {
                    cookie: t.cookie,
                    terminate,
                },
            );
        }
    }

    /// Brings registrations in line with a (new) config: config targets are registered or
    /// updated, config targets no longer listed start draining (API registrations stay), and
    /// targets of groups that no longer exist are removed at once.
    pub fn sync_config(&mut self, config: &Config, now: Instant) -> Result<(), String> {
        self.group_ids
            .sync(
                config.target_groups.iter().map(|g| &g.name),
                lb_common::maps::MAX_GROUPS,
            )
            .ok_or("no free group id")?;
        self.listener_ids
            .sync(
                config.listeners.iter().map(|l| &l.name),
                lb_common::maps::MAX_LISTENERS,
            )
            .ok_or("no free listener id")?;
        let mut listed = BTreeSet::new();
        for g in &config.target_groups {
            for t in &g.targets {
                let key = TargetKey {
                    group: g.name.clone(),
                    addr: t.address,
                    port: t.port.0,
                };
                self.register(key.clone(), t.weight, t.zone.clone(), Origin::Config)?;
                listed.insert(key);
            }
        }
        let gone: Vec<(TargetKey, Option<&TargetGroupConfig>)> = self
            .targets
            .iter()
            .filter(|(k, t)| {
                t.origin == Origin::Config && !listed.contains(*k)
                    || config.group(&k.group).is_none()
            })
            .map(|(k, _)| (k.clone(), config.group(&k.group)))
            .collect();
        for (key, group) in gone {
            match group {
                Some(g) => {
                    self.deregister(&key, now, g.deregistration_delay.0);
                }
                None => self.remove(&key, true),
            }
        }
        Ok(())
    }

    /// The state a target shows: health, overridden by draining and by an unused group.
    pub fn shown_state(
        &self,
        config: &Config,
        key: &TargetKey,
        t: &Target,
    ) -> (TargetState, Option<Reason>) {
        if t.draining_until.is_some() {
            (
                TargetState::Draining,
                Some(Reason::DeregistrationInProgress),
            )
        } else if !config.listeners.iter().any(|l| l.target_group == key.group) {
            (TargetState::Unused, Some(Reason::NotInUse))
        } else {
            (t.health, t.reason)
        }
    }

    /// Every target's shown state, for the transition log.
    pub fn shown_states(
        &self,
        config: &Config,
    ) -> BTreeMap<TargetKey, (TargetState, Option<Reason>)> {
        self.targets
            .iter()
            .map(|(k, t)| (k.clone(), self.shown_state(config, k, t)))
            .collect()
    }
}

/// The changes between two snapshots of shown states (targets that appeared start from
/// `initial`; targets that went away are not reported here).
pub fn state_changes(
    before: &BTreeMap<TargetKey, (TargetState, Option<Reason>)>,
    after: &BTreeMap<TargetKey, (TargetState, Option<Reason>)>,
) -> Vec<StateChange> {
    after
        .iter()
        .filter_map(|(k, &(to, reason))| {
            let from = before.get(k).map_or(TargetState::Initial, |s| s.0);
            (from != to).then(|| StateChange {
                target: k.clone(),
                from,
                to,
                reason,
            })
        })
        .collect()
}

/// A target as the state file keeps it (times as milliseconds left or passed, since `Instant`s
/// do not survive a restart).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SavedTarget {
    key: TargetKey,
    weight: u32,
    zone: Option<String>,
    origin: Origin,
    id: u32,
    cookie: u32,
    health: TargetState,
    reason: Option<Reason>,
    draining_left_ms: Option<u64>,
    unhealthy_for_ms: Option<u64>,
}

/// The model as the state file keeps it.
#[derive(Debug, Serialize, Deserialize)]
pub struct SavedModel {
    targets: Vec<SavedTarget>,
    listener_ids: Ids<String>,
    group_ids: Ids<String>,
    target_ids: Ids<TargetKey>,
    tombstones: Vec<(u32, Tombstone)>,
    next_cookie: u32,
}

impl Model {
    pub fn save(&self, now: Instant) -> SavedModel {
        SavedModel {
            targets: self
                .targets
                .iter()
                .map(|(k, t)| SavedTarget {
                    key: k.clone(),
                    weight: t.weight,
                    zone: t.zone.clone(),
                    origin: t.origin,
                    id: t.id,
                    cookie: t.cookie,
                    health: t.health,
                    reason: t.reason,
                    draining_left_ms: t
                        .draining_until
                        .map(|d| d.saturating_duration_since(now).as_millis() as u64),
                    unhealthy_for_ms: t
                        .unhealthy_since
                        .map(|s| now.saturating_duration_since(s).as_millis() as u64),
                })
                .collect(),
            listener_ids: self.listener_ids.clone(),
            group_ids: self.group_ids.clone(),
            target_ids: self.target_ids.clone(),
            tombstones: self.tombstones.iter().map(|(&i, &t)| (i, t)).collect(),
            next_cookie: self.next_cookie,
        }
    }

    pub fn restore(saved: SavedModel, now: Instant) -> Self {
        let ms = Duration::from_millis;
        Self {
            targets: saved
                .targets
                .into_iter()
                .map(|s| {
                    let t = Target {
                        weight: s.weight,
                        zone: s.zone,
                        origin: s.origin,
                        id: s.id,
                        cookie: s.cookie,
                        health: s.health,
                        reason: s.reason,
                        slow_start_from: None,
                        unhealthy_since: s
                            .unhealthy_for_ms
                            .map(|m| now.checked_sub(ms(m)).unwrap_or(now)),
                        draining_until: s.draining_left_ms.map(|m| now + ms(m)),
                        last_check: None,
                    };
                    (s.key, t)
                })
                .collect(),
            listener_ids: saved.listener_ids,
            group_ids: saved.group_ids,
            target_ids: saved.target_ids,
            tombstones: saved.tombstones.into_iter().collect(),
            next_cookie: saved.next_cookie,
        }
    }
}
