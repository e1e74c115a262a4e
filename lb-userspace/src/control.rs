//! The agent's decisions without its I/O: config and target model in, map writes and state
//! changes out. The runtime (`agent`) feeds it health events, API calls and the clock; tests feed
//! it the same with a fake clock and an in-memory map writer.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Instant,
};

use anyhow::{bail, Result};

use crate::{
    config::{self, AgentConfig, Config, TargetCounts},
    health::{Checkers, HealthEvent, TargetState},
    maps::MapWriter,
    model::{state_changes, Model, Origin, StateChange, TargetKey},
    reconcile::{Applied, Reconciler},
    routes::{Answer, RouteAnswers, RouteLookup, RouteNote},
    state::{self, Desired, InterfaceRoles},
};

pub struct Controller {
    pub config: Config,
    pub model: Model,
    pub reconciler: Reconciler,
    pub hash_key: [u32; 2],
    /// The interfaces XDP is attached to: name → ifindex.
    pub interfaces: BTreeMap<String, u32>,
    /// The kernel's routes to the targets, when interface roles are derived from them.
    pub routes: RouteAnswers,
    shown: BTreeMap<TargetKey, (TargetState, Option<crate::health::Reason>)>,
    /// The interface roles of the last reconciliation.
    roles: Option<InterfaceRoles>,
}

/// The outcome of one reconciliation.
#[derive(Debug, Default)]
pub struct Step {
    pub applied: Applied,
    pub changes: Vec<StateChange>,
    pub removed: Vec<TargetKey>,
    /// The interface roles, when they differ from the last reconciliation's (or it is the
    /// first).
    pub roles: Option<InterfaceRoles>,
}

/// A registration the agent refuses, with the status the API answers: 400 when the request is
/// wrong on its own (an unknown group, a weight or port out of range, an address that can
/// never be a target), 409 when the target conflicts with the running config or a limit of
/// the data plane (a VIP, the family of the group's listeners, table slots per target, targets
/// in all, `LB_REVERSE` entries, free target ids).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    pub status: u16,
    pub message: String,
}

/// `[agent]` keys a reload applies; the others need a restart.
pub const RELOADABLE_AGENT_KEYS: [&str; 5] = [
    "target_interfaces",
    "flow_insert_limit",
    "access_log",
    "zone",
    "cross_zone",
];

/// The `[agent]` a reload runs with: the running one with the new file's reloadable keys, and
/// notes on what it leaves for the next start. `target_interfaces` naming an interface XDP is
/// not attached to now (the file also changed `interfaces`) waits for the restart too.
pub fn reloaded_agent(running: &AgentConfig, new: &AgentConfig) -> (AgentConfig, Vec<String>) {
    let mut agent = running.clone();
    let mut notes = Vec::new();
    agent.flow_insert_limit = new.flow_insert_limit;
    agent.access_log = new.access_log.clone();
    agent.zone = new.zone.clone();
    agent.cross_zone = new.cross_zone;
    let attached = new
        .target_interfaces
        .iter()
        .flatten()
        .all(|n| running.interfaces.contains(n));
    if attached {
        agent.target_interfaces = new.target_interfaces.clone();
    } else {
        notes.push(
            "agent.target_interfaces names an interface XDP is not attached to yet; it takes effect at the next start".to_string(),
        );
    }
    let mut rest = new.clone();
    rest.flow_insert_limit = agent.flow_insert_limit;
    rest.access_log = agent.access_log.clone();
    rest.zone = agent.zone.clone();
    rest.cross_zone = agent.cross_zone;
    rest.target_interfaces = agent.target_interfaces.clone();
    if rest != agent {
        notes.push(format!(
            "[agent] changes other than {} take effect at the next start (not applied by reload)",
            RELOADABLE_AGENT_KEYS.join(", ")
        ));
    }
    (agent, notes)
}

impl Controller {
    pub fn new(
        config: Config,
        hash_key: [u32; 2],
        interfaces: BTreeMap<String, u32>,
        now: Instant,
    ) -> Result<Self> {
        let mut model = Model::default();
        model
            .sync_config(&config, now)
            .map_err(anyhow::Error::msg)?;
        Ok(Self {
            config,
            model,
            reconciler: Reconciler::default(),
            hash_key,
            interfaces,
            routes: RouteAnswers::default(),
            shown: Default::default(),
            roles: None,
        })
    }

    /// A controller that carries on from an earlier run: its config and model, and a reconciler
    /// that knows what the maps hold (`Reconciler::from_view`). No state change is reported for what the earlier run already showed.
    pub fn adopted(
        config: Config,
        model: Model,
        hash_key: [u32; 2],
        interfaces: BTreeMap<String, u32>,
        reconciler: Reconciler,
    ) -> Self {
        let shown = model.shown_states(&config);
        Self {
            config,
            model,
            reconciler,
            hash_key,
            interfaces,
            routes: RouteAnswers::default(),
            shown,
            roles: None,
        }
    }

    pub fn desired(&self, now: Instant) -> Desired {
        let flags = self.interface_roles().values(&self.interfaces);
        state::desired(&self.config, &self.model, self.hash_key, &flags, now)
    }

    /// What a reload with `config` would make of the registrations and the desired state,
    /// changing nothing: the config as it would run, the model, the desired state, and notes
    /// on what the reload would leave for the next start. Refused as `reload` would refuse it.
    pub fn preview(
        &self,
        mut config: Config,
        now: Instant,
    ) -> Result<(Config, Model, Desired, Vec<String>)> {
        self.check_registrations(&config)?;
        let (agent, notes) = reloaded_agent(&self.config.agent, &config.agent);
        config.agent = agent;
        let mut model = self.model.clone();
        model
            .sync_config(&config, now)
            .map_err(anyhow::Error::msg)?;
        let roles =
            state::interface_roles(&config, &model, &self.interfaces, &self.routes.egress());
        let desired = state::desired(
            &config,
            &model,
            self.hash_key,
            &roles.values(&self.interfaces),
            now,
        );
        Ok((config, model, desired, notes))
    }

    /// Which attached interfaces face targets, and how that was decided.
    pub fn interface_roles(&self) -> InterfaceRoles {
        state::interface_roles(
            &self.config,
            &self.model,
            &self.interfaces,
            &self.routes.egress(),
        )
    }

    /// Are interface roles derived from the routes to the targets (no `target_interfaces`,
    /// more than one interface)?
    pub fn derives_roles(&self) -> bool {
        self.config.agent.target_interfaces.is_none() && self.interfaces.len() > 1
    }

    /// The addresses of every registered target, of any group and origin.
    pub fn target_addresses(&self) -> BTreeSet<IpAddr> {
        self.model.targets.keys().map(|k| k.addr).collect()
    }

    /// The addresses whose routes to look up: none unless roles are derived from routes; then
    /// every target's (`all`, the periodic re-check) or those with no answer yet.
    pub fn route_queries(&self, all: bool) -> Vec<IpAddr> {
        if !self.derives_roles() {
            return Vec::new();
        }
        let current = self.target_addresses();
        if all {
            current.into_iter().collect()
        } else {
            self.routes.missing(&current)
        }
    }

    /// Takes the kernel's answers (the next reconcile follows them) and returns what is worth
    /// a log line.
    pub fn routes_answered(
        &mut self,
        answers: impl IntoIterator<Item = (IpAddr, Answer)>,
    ) -> Vec<RouteNote> {
        if !self.derives_roles() {
            self.routes.clear();
            return Vec::new();
        }
        let attached: BTreeSet<u32> = self.interfaces.values().copied().collect();
        self.routes
            .record(answers, &self.target_addresses(), &attached)
    }

    /// Looks up the routes `route_queries(all)` names and takes the answers.
    pub fn lookup_routes(&mut self, lookup: &mut dyn RouteLookup, all: bool) -> Vec<RouteNote> {
        let answers: Vec<(IpAddr, Answer)> = self
            .route_queries(all)
            .into_iter()
            .map(|a| (a, lookup.egress(a).into()))
            .collect();
        self.routes_answered(answers)
    }

    /// Expires what is due, writes the difference to the maps, and reports what changed.
    pub fn reconcile(&mut self, w: &mut impl MapWriter, now: Instant) -> Result<Step> {
        let removed = self.model.expire_draining(&self.config, now);
        let roles = self.interface_roles();
        let flags = roles.values(&self.interfaces);
        let desired = state::desired(&self.config, &self.model, self.hash_key, &flags, now);
        let applied = self.reconciler.apply(&desired, w)?;
        let shown = self.model.shown_states(&self.config);
        let changes = state_changes(&self.shown, &shown);
        self.shown = shown;
        let roles = (self.roles.as_ref() != Some(&roles)).then(|| {
            self.roles = Some(roles.clone());
            roles
        });
        Ok(Step {
            applied,
            changes,
            removed,
            roles,
        })
    }

    pub fn record<K>(&mut self, key: &TargetKey, event: &HealthEvent<K>) {
        self.model.record_check(
            key,
            &event.outcome,
            event.latency,
            event.transition,
            event.at.into_std(),
        );
    }

    /// Applies a checker's report when it comes from the current checker of its target in
    /// `checkers`; drops it (and says so) when that checker was stopped or restarted since
    /// (it may have probed with the old spec, and the new checker started from the state the
    /// model holds).
    pub fn record_current(
        &mut self,
        checkers: &Checkers<TargetKey>,
        event: &HealthEvent<TargetKey>,
    ) -> bool {
        if !checkers.is_current(event) {
            return false;
        }
        self.record(&event.target, event);
        true
    }

    /// Registers a target at run time, checked as a config target is (`config::check_target`)
    /// with the targets registered now; a refusal is a `Refused`.
    pub fn register(&mut self, key: TargetKey, weight: u32, zone: Option<String>) -> Result<()> {
        let Some(group) = self.config.group(&key.group) else {
            return Err(Refused {
                status: 400,
                message: format!("no target group is named {:?}", key.group),
            }
            .into());
        };
        if let Some(why) = zone.as_deref().and_then(config::check_zone) {
            return Err(Refused {
                status: 400,
                message: format!("{key} refused: zone: {why}"),
            }
            .into());
        }
        let problems = config::check_target(
            &self.config,
            group,
            key.addr,
            key.port,
            weight,
            self.counts_with(&key),
        );
        if !problems.is_empty() {
            let invalid = problems.iter().any(|p| p.invalid);
            let why: Vec<String> = problems
                .iter()
                .map(|p| format!("{}: {}", p.field.name(), p.message))
                .collect();
            return Err(Refused {
                status: if invalid { 400 } else { 409 },
                message: format!("{key} refused: {}", why.join("; ")),
            }
            .into());
        }
        self.model
            .register(key.clone(), weight, zone, Origin::Api)
            .map_err(|e| {
                Refused {
                    status: 409,
                    message: format!("{key} refused: {e}"),
                }
                .into()
            })
    }

    /// The counts `check_target` checks, were `key` registered (again): targets not draining,
    /// of its group and in all, and the `LB_REVERSE` entries of every target, draining included.
    fn counts_with(&self, key: &TargetKey) -> TargetCounts {
        let live: BTreeSet<&TargetKey> = self
            .model
            .targets
            .iter()
            .filter(|(_, t)| t.draining_until.is_none())
            .map(|(k, _)| k)
            .chain([key])
            .collect();
        let all = self.model.targets.keys().chain([key]);
        TargetCounts {
            group: live.iter().filter(|k| k.group == key.group).count(),
            total: live.len(),
            reverse: config::reverse_entries(
                &self.config,
                all.map(|k| (k.group.as_str(), k.addr, k.port)),
            ),
        }
    }

    /// Starts draining a target; it is removed after its group's `deregistration_delay`.
    pub fn deregister(&mut self, key: &TargetKey, now: Instant) -> Result<()> {
        let Some(group) = self.config.group(&key.group) else {
            bail!("no target group is named {:?}", key.group);
        };
        if !self
            .model
            .deregister(key, now, group.deregistration_delay.0)
        {
            bail!("{key} is not registered");
        }
        Ok(())
    }

    /// Takes a new (validated) config: registrations follow it; the next reconcile writes the
    /// difference. Its `[agent]` must fit the running data plane (`reloaded_agent`); the
    /// addresses of new targets are then due a route lookup (`lookup_routes`). Refused (the
    /// running config stays) when the targets registered through the API do not fit it.
    pub fn reload(&mut self, config: Config, now: Instant) -> Result<()> {
        self.check_registrations(&config)?;
        self.model
            .sync_config(&config, now)
            .map_err(anyhow::Error::msg)?;
        self.config = config;
        if !self.derives_roles() {
            self.routes.clear();
        }
        Ok(())
    }

    /// Checks every target `config` would leave registered, the API's among them, as `register`
    /// checks one (`config::check_target`), with the counts of them all: validation of the
    /// file alone cannot see the API's targets.
    fn check_registrations(&self, config: &Config) -> Result<()> {
        let api = self.model.targets.iter().filter(|(k, t)| {
            t.origin == Origin::Api
                && t.draining_until.is_none()
                && config.group(&k.group).is_some()
        });
        // Not draining after the reload: the file's targets, then the API's.
        let mut live: BTreeMap<TargetKey, u32> = config
            .target_groups
            .iter()
            .flat_map(|g| {
                g.targets.iter().map(|t| {
                    let key = TargetKey {
                        group: g.name.clone(),
                        addr: t.address,
                        port: t.port.0,
                    };
                    (key, t.weight)
                })
            })
            .collect();
        let files = live.len();
        for (k, t) in api {
            live.entry(k.clone()).or_insert(t.weight);
        }
        if live.len() == files {
            return Ok(()); // validation checked these
        }
        let mut per_group: BTreeMap<&str, usize> = BTreeMap::new();
        for k in live.keys() {
            *per_group.entry(k.group.as_str()).or_default() += 1;
        }
        // Draining ones keep their LB_REVERSE entries.
        let kept = self
            .model
            .targets
            .keys()
            .filter(|k| config.group(&k.group).is_some());
        let reverse = config::reverse_entries(
            config,
            kept.chain(live.keys())
                .map(|k| (k.group.as_str(), k.addr, k.port)),
        );
        let mut problems = BTreeSet::new();
        for (k, &weight) in &live {
            let group = config
                .group(&k.group)
                .expect("live targets are of its groups");
            let counts = TargetCounts {
                group: per_group[k.group.as_str()],
                total: live.len(),
                reverse,
            };
            for p in config::check_target(config, group, k.addr, k.port, weight, counts) {
                problems.insert(match p.field {
                    config::TargetField::HashTableSize | config::TargetField::Total => {
                        format!("{}: {}", p.field.name(), p.message)
                    }
                    f => format!("{k}: {}: {}", f.name(), p.message),
                });
            }
        }
        if !problems.is_empty() {
            bail!(
                "the targets registered through the API do not fit the new config (deregister them first): {}",
                problems.into_iter().collect::<Vec<_>>().join("; ")
            );
        }
        Ok(())
    }

    /// When the desired state will next change with time alone.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        state::next_deadline(&self.config, &self.model, now)
    }
}

#[cfg(test)]
mod converge;
#[cfg(test)]
mod tests;
