//! The reconciler: diffs the desired state against the last-applied shadow and writes only
//! what changed, in an order where a packet never meets a reference to something not yet
//! written (targets before the tables that name them; tables before the listeners that use
//! them; removals last).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use lb_common::{maglev, TargetValue};

use crate::{
    maps::{table_of_ids, MapWriter, SourcePrefix},
    state::{Desired, TableSpec},
};

/// What one reconciliation wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub writes: usize,
    pub tables: usize,
}

/// Keeps the shadow of what was last written.
#[derive(Debug, Default)]
pub struct Reconciler {
    shadow: Desired,
}

fn prefix(c: &crate::config::Cidr) -> SourcePrefix {
    SourcePrefix {
        addr: c.addr,
        len: c.len,
    }
}

/// Builds a group's table: target ids by slot.
pub fn build_table(spec: &TableSpec) -> Result<Vec<u32>> {
    let backends: Vec<maglev::Backend<'_>> = spec
        .members
        .iter()
        .map(|m| maglev::Backend {
            identity: &m.identity,
            weight: m.weight,
        })
        .collect();
    let indices = maglev::build(&backends, spec.size, spec.seed).context("building a table")?;
    let ids: Vec<u32> = spec.members.iter().map(|m| m.target_id).collect();
    Ok(table_of_ids(&indices, &ids))
}

impl Reconciler {
    /// A reconciler that believes `shadow` is in the maps (adopting pinned maps).
    pub fn with_shadow(shadow: Desired) -> Self {
        Self { shadow }
    }

    pub fn shadow(&self) -> &Desired {
        &self.shadow
    }

    /// Writes the difference between `desired` and the shadow. On an error the shadow holds
    /// what was written before it, so the next call retries the rest.
    pub fn apply(&mut self, desired: &Desired, w: &mut impl MapWriter) -> Result<Applied> {
        let mut n = Applied::default();
        let s = &mut self.shadow;
        if s.config != desired.config {
            w.set_config(&desired.config)?;
            s.config = desired.config;
            n.writes += 1;
        }
        for (&ifindex, &value) in &desired.interfaces {
            if s.interfaces.get(&ifindex) != Some(&value) {
                w.add_interface(ifindex, value)?;
                s.interfaces.insert(ifindex, value);
                n.writes += 1;
            }
        }
        for (&id, v) in &desired.targets {
            if s.targets.get(&id) != Some(v) {
                w.put_target(id, v)?;
                s.targets.insert(id, *v);
                n.writes += 1;
            }
        }
        for (&gid, spec) in &desired.tables {
            if s.tables.get(&gid) != Some(spec) {
                let table = build_table(spec)?;
                w.publish_table(gid, spec.flags, &table)?;
                s.tables.insert(gid, spec.clone());
                n.tables += 1;
            }
        }
        for (&ip, v) in &desired.vips {
            if s.vips.get(&ip) != Some(v) {
                w.put_vip(ip, *v)?;
                s.vips.insert(ip, *v);
                n.writes += 1;
            }
        }
        for (key, v) in &desired.reverse {
            if s.reverse.get(key) != Some(v) {
                w.put_reverse(*key, *v)?;
                s.reverse.insert(*key, *v);
                n.writes += 1;
            }
        }
        for src in desired.sources.difference(&s.sources.clone()) {
            w.allow_source(src.0, prefix(&src.1))?;
            s.sources.insert(*src);
            n.writes += 1;
        }
        for (key, v) in &desired.listeners {
            if s.listeners.get(key) != Some(v) {
                w.put_listener(*key, *v)?;
                s.listeners.insert(*key, *v);
                n.writes += 1;
            }
        }
        // Removals, users before what they use.
        for key in gone(&s.listeners, &desired.listeners) {
            w.remove_listener(&key)?;
            s.listeners.remove(&key);
            n.writes += 1;
        }
        for src in s.sources.clone().difference(&desired.sources) {
            w.disallow_source(src.0, prefix(&src.1))?;
            s.sources.remove(src);
            n.writes += 1;
        }
        for key in gone(&s.reverse, &desired.reverse) {
            w.remove_reverse(&key)?;
            s.reverse.remove(&key);
            n.writes += 1;
        }
        for ip in gone(&s.vips, &desired.vips) {
            w.remove_vip(ip)?;
            s.vips.remove(&ip);
            n.writes += 1;
        }
        for gid in gone(&s.tables, &desired.tables) {
            // No listener points at the group any more: leave an empty table behind.
            w.publish_table(gid, 0, &[])?;
            s.tables.remove(&gid);
            n.tables += 1;
        }
        for id in gone(&s.targets, &desired.targets) {
            w.put_target(id, &TargetValue::default())?;
            s.targets.remove(&id);
            n.writes += 1;
        }
        for ifindex in gone(&s.interfaces, &desired.interfaces) {
            w.remove_interface(ifindex)?;
            s.interfaces.remove(&ifindex);
            n.writes += 1;
        }
        Ok(n)
    }
}

fn gone<K: Ord + Copy, V>(old: &BTreeMap<K, V>, new: &BTreeMap<K, V>) -> Vec<K> {
    old.keys()
        .filter(|k| !new.contains_key(k))
        .copied()
        .collect()
}
