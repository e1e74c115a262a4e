//! The agent's decisions without its I/O: config and target model in, map writes and state
//! changes out. The runtime (`agent`) feeds it health events, API calls and the clock; tests feed
//! it the same with a fake clock and an in-memory map writer.

use std::{collections::BTreeSet, time::Instant};

use anyhow::{bail, Result};

use crate::{
    config::Config,
    health::{HealthEvent, TargetState},
    model::{state_changes, Model, Origin, StateChange, TargetKey},
    reconcile::{Applied, MapWriter, Reconciler},
    state::{self, Desired},
};

pub struct Controller {
    pub config: Config,
    pub model: Model,
    pub reconciler: Reconciler,
    pub hash_key: [u32; 2],
    pub interfaces: BTreeSet<u32>,
    shown: std::collections::BTreeMap<TargetKey, (TargetState, Option<crate::health::Reason>)>,
}

/// The outcome of one reconciliation.
#[derive(Debug, Default)]
pub struct Step {
    pub applied: Applied,
    pub changes: Vec<StateChange>,
    pub removed: Vec<TargetKey>,
}

impl Controller {
    pub fn new(
        config: Config,
        hash_key: [u32; 2],
        interfaces: BTreeSet<u32>,
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
            shown: Default::default(),
        })
    }

    /// A controller that carries on from an earlier run: its config, model and the shadow of
    /// what it wrote. No state change is reported for what the earlier run already showed.
    pub fn adopted(
        config: Config,
        model: Model,
        hash_key: [u32; 2],
        interfaces: BTreeSet<u32>,
        shadow: Desired,
    ) -> Self {
        let shown = model.shown_states(&config);
        Self {
            config,
            model,
            reconciler: Reconciler::with_shadow(shadow),
            hash_key,
            interfaces,
            shown,
        }
    }

    pub fn desired(&self, now: Instant) -> Desired {
        state::desired(
            &self.config,
            &self.model,
            self.hash_key,
            &self.interfaces,
            now,
        )
    }

    /// Expires what is due, writes the difference to the maps, and reports what changed.
    pub fn reconcile(&mut self, w: &mut impl MapWriter, now: Instant) -> Result<Step> {
        let removed = self.model.expire_draining(&self.config, now);
        let desired = self.desired(now);
        let applied = self.reconciler.apply(&desired, w)?;
        let shown = self.model.shown_states(&self.config);
        let changes = state_changes(&self.shown, &shown);
        self.shown = shown;
        Ok(Step {
            applied,
            changes,
            removed,
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

    /// Registers a target at run time.
    pub fn register(&mut self, key: TargetKey, weight: u32, zone: Option<String>) -> Result<()> {
        let Some(_) = self.config.group(&key.group) else {
            bail!("no target group is named {:?}", key.group);
        };
        if !(1..=65535).contains(&weight) {
            bail!("weight {weight} is outside 1..=65535");
        }
        if self.config.listeners.iter().any(|l| l.address == key.addr) {
            bail!("{} is a listener's VIP", key.addr);
        }
        let family_clash = self
            .config
            .listeners
            .iter()
            .any(|l| l.target_group == key.group && l.address.is_ipv4() != key.addr.is_ipv4());
        if family_clash {
            bail!(
                "{} is not of the address family of the group's listeners",
                key.addr
            );
        }
        self.model
            .register(key, weight, zone, Origin::Api)
            .map_err(anyhow::Error::msg)
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
    /// difference.
    pub fn reload(&mut self, config: Config, now: Instant) -> Result<()> {
        self.model
            .sync_config(&config, now)
            .map_err(anyhow::Error::msg)?;
        self.config = config;
        Ok(())
    }

    /// When the desired state will next change with time alone.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        state::next_deadline(&self.config, &self.model, now)
    }
}

#[cfg(test)]
mod tests;
