//! The reconciler: diffs the desired state against the shadow of what the maps hold and writes
//! only what changed, in an order where a packet never meets a reference to something not
//! written: targets before the tables that name them; tables before the listeners that use
//! them; a target leaves the tables before it stops forwarding; removals last, each only once
//! nothing written refers to it any more.
//!
//! A failed write does not stop the others: what depends on it waits, the rest is written, and
//! the shadow records exactly what succeeded, so the next call retries the rest. Removing what
//! is already gone counts as done. After a restart the shadow is read back from the maps
//! (`from_view`), so whatever an earlier run left half-written converges.
//!
//! The address filter. The data path trusts `LB_ADDR_FILTER`: a packet whose destination's
//! bucket counts no VIP is not looked up in `LB_VIPS`, one whose source's bucket counts no
//! target endpoint is not looked up in `LB_REVERSE`. So this invariant holds at every instant,
//! for every bucket `b`:
//!
//!   every value the kernel may hold at `LB_ADDR_FILTER[b]` has `.vips` ≥ the `LB_VIPS` entries
//!   and `.targets` ≥ the `LB_REVERSE` entries (endpoints) the kernel may hold whose address
//!   hashes to `b` (`lb_common::addr_filter_bucket`),
//!
//! where "may hold" is the shadow plus the entries in doubt; once converged the counts equal
//! the desired ones (a stale count would slow non-VIP traffic, not break it). It holds because
//! a bucket is written (`write_filter`) with the count over what the kernel may hold *and*
//! what is desired (`filter_bound`) twice per `apply`: before the VIP and reply-entry writes,
//! which wait for their bucket (a bucket write that failed holds them back: the kernel then
//! holds the old count or the new one, both cover what it may hold), and after the removals,
//! which lowers the counts to what is left. No entry is ever added to a bucket in doubt.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use anyhow::{anyhow, Context, Result};
use lb_common::{
    addr, addr_filter_bucket, maglev, AddrBucket, EndpointKey, IfaceValue, TargetValue,
    TARGET_FORWARD,
};

use crate::{
    config::Cidr,
    maps::{addr_filter_counts, table_of_ids, MapView, MapWriter, SourcePrefix, WriteError},
    state::{Desired, TableSpec},
};

/// What one reconciliation wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub writes: usize,
    pub tables: usize,
    /// Tables (and what depends on them) waiting for their build (`Reconciler::pending`).
    pub pending: usize,
}

/// A map entry, to remember the ones whose write failed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Entry {
    Config,
    Interface(u32),
    Target(u32),
    Vip(IpAddr),
    Reverse(EndpointKey),
    Source((u32, Cidr)),
    Listener(EndpointKey),
    /// An `LB_ADDR_FILTER` bucket.
    Bucket(u32),
}

/// Keeps the shadow of what the maps hold.
#[derive(Debug)]
pub struct Reconciler {
    shadow: Desired,
    /// Groups read back from the maps whose table is not known to match any spec: the target
    /// ids they name. They are published again (or removed).
    unknown_tables: BTreeMap<u32, BTreeSet<u32>>,
    /// Entries whose last write failed: the kernel may or may not hold them.
    in_doubt: BTreeSet<Entry>,
    /// Tables built ahead (`add_built`), by spec.
    built: HashMap<TableSpec, Vec<u32>>,
    /// Specs `apply` found neither built nor publishable inline.
    pending: Vec<TableSpec>,
    /// Build missing tables inside `apply` (the default); else they wait for `add_built`.
    pub build_inline: bool,
}

impl Default for Reconciler {
    fn default() -> Self {
        Self {
            shadow: Desired::default(),
            unknown_tables: BTreeMap::new(),
            in_doubt: BTreeSet::new(),
            built: HashMap::new(),
            pending: Vec::new(),
            build_inline: true,
        }
    }
}

fn prefix(c: &Cidr) -> SourcePrefix {
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

/// What the maps hold once `desired` is fully written.
pub fn expected_view(desired: &Desired) -> Result<MapView> {
    let mut tables = BTreeMap::new();
    for (&gid, spec) in &desired.tables {
        let table = build_table(spec)?;
        if spec.flags != 0 || !table.is_empty() {
            tables.insert(gid, (spec.flags, table));
        }
    }
    Ok(MapView {
        config: desired.config,
        vips: desired.vips.clone(),
        listeners: desired.listeners.clone(),
        sources: desired
            .sources
            .iter()
            .map(|(id, c)| (*id, prefix(c)))
            .collect(),
        reverse: desired.reverse.clone(),
        targets: desired
            .targets
            .iter()
            .filter(|(_, t)| **t != TargetValue::default())
            .map(|(&id, t)| (id, *t))
            .collect(),
        tables,
        interfaces: desired.interfaces.clone(),
        devmap: desired.interfaces.keys().copied().collect(),
        addr_filter: desired.addr_filter.clone(),
    })
}

/// A write's outcome for the shadow: done, or failed (recorded in `errors`). With `removal`,
/// an entry already absent counts as removed.
fn done(result: Result<(), WriteError>, removal: bool, errors: &mut Vec<String>) -> bool {
    match result {
        Ok(()) => true,
        Err(WriteError::NotFound(_)) if removal => true,
        Err(e) => {
            errors.push(format!("{:#}", anyhow::Error::from(e)));
            false
        }
    }
}

/// The outcome of one `apply`'s writes.
#[derive(Default)]
struct Log {
    errors: Vec<String>,
    writes: usize,
}

impl Log {
    /// Records a write of entry `e`: done (no longer in doubt, counted) or failed (the error
    /// kept, the entry in doubt). With `removal`, an entry already absent counts as removed.
    fn settle(
        &mut self,
        doubt: &mut BTreeSet<Entry>,
        e: Entry,
        result: Result<(), WriteError>,
        removal: bool,
    ) -> bool {
        let ok = done(result, removal, &mut self.errors);
        if ok {
            doubt.remove(&e);
            self.writes += 1;
        } else {
            doubt.insert(e);
        }
        ok
    }
}

/// Never equal to a value the desired state holds: the entry is written again.
const UNKNOWN_IFACE: IfaceValue = IfaceValue { flags: u32::MAX };

impl Reconciler {
    /// A reconciler whose shadow is what the maps hold (adopting pinned maps). Tables cannot be
    /// told from their slots alone, so every group that has one is published again.
    pub fn from_view(view: &MapView) -> Self {
        let mut shadow = Desired {
            config: view.config,
            vips: view.vips.clone(),
            listeners: view.listeners.clone(),
            sources: view
                .sources
                .iter()
                .map(|(id, p)| {
                    (
                        *id,
                        Cidr {
                            addr: p.addr,
                            len: p.len,
                        },
                    )
                })
                .collect(),
            reverse: view.reverse.clone(),
            targets: view.targets.clone(),
            addr_filter: view.addr_filter.clone(),
            ..Default::default()
        };
        for i in view.devmap.iter().chain(view.interfaces.keys()) {
            let value = match view.interfaces.get(i) {
                Some(v) if view.devmap.contains(i) => *v,
                _ => UNKNOWN_IFACE,
            };
            shadow.interfaces.insert(*i, value);
        }
        Self {
            shadow,
            unknown_tables: view
                .tables
                .iter()
                .map(|(&g, (_, t))| (g, t.iter().copied().collect()))
                .collect(),
            ..Default::default()
        }
    }

    pub fn shadow(&self) -> &Desired {
        &self.shadow
    }

    /// A table built ahead for `spec` (on another thread): the next `apply` publishes it.
    pub fn add_built(&mut self, spec: TableSpec, table: Vec<u32>) {
        self.built.insert(spec, table);
    }

    /// Entries whose last write failed, and tables read back but not republished yet.
    pub fn in_doubt(&self) -> usize {
        self.in_doubt.len() + self.unknown_tables.len()
    }

    /// The kernel may have dropped interface `ifindex`'s entries (the interface went away and
    /// came back with the same ifindex): the next `apply` writes them again.
    pub fn doubt_interface(&mut self, ifindex: u32) {
        self.in_doubt.insert(Entry::Interface(ifindex));
    }

    /// The specs the last `apply` could not publish for want of a build.
    pub fn pending(&self) -> &[TableSpec] {
        &self.pending
    }

    /// Is target `id` named by a table the maps hold?
    fn in_a_table(&self, id: u32) -> bool {
        self.shadow
            .tables
            .values()
            .any(|t| t.members.iter().any(|m| m.target_id == id))
            || self.unknown_tables.values().any(|ids| ids.contains(&id))
    }

    /// What `LB_ADDR_FILTER` must count now, per bucket: the VIPs and target endpoints the
    /// kernel may hold (the shadow's and those in doubt) together with the desired ones, each
    /// once. Writing it never undercounts what the kernel holds, and covers every desired entry
    /// written next.
    fn filter_bound(&self, desired: &Desired) -> BTreeMap<u32, AddrBucket> {
        let mut vips: BTreeSet<&IpAddr> = self.shadow.vips.keys().collect();
        vips.extend(desired.vips.keys());
        let mut reverse: BTreeSet<&EndpointKey> = self.shadow.reverse.keys().collect();
        reverse.extend(desired.reverse.keys());
        for e in &self.in_doubt {
            match e {
                Entry::Vip(ip) => {
                    vips.insert(ip);
                }
                Entry::Reverse(k) => {
                    reverse.insert(k);
                }
                _ => {}
            }
        }
        addr_filter_counts(vips, reverse)
    }

    /// Writes every bucket whose count is not `bound`'s (or is in doubt).
    fn write_filter(
        &mut self,
        bound: &BTreeMap<u32, AddrBucket>,
        w: &mut impl MapWriter,
        log: &mut Log,
    ) {
        let buckets: BTreeSet<u32> = bound
            .keys()
            .chain(self.shadow.addr_filter.keys())
            .copied()
            .chain(self.in_doubt.iter().filter_map(|e| match e {
                Entry::Bucket(b) => Some(*b),
                _ => None,
            }))
            .collect();
        for b in buckets {
            let want = bound.get(&b).copied().unwrap_or_default();
            let held = self.shadow.addr_filter.get(&b).copied().unwrap_or_default();
            let e = Entry::Bucket(b);
            if (held != want || self.in_doubt.contains(&e))
                && log.settle(&mut self.in_doubt, e, w.put_addr_bucket(b, want), false)
            {
                if want == AddrBucket::default() {
                    self.shadow.addr_filter.remove(&b);
                } else {
                    self.shadow.addr_filter.insert(b, want);
                }
            }
        }
    }

    /// Writes the difference between `desired` and the shadow. Errors are collected: every
    /// write that does not depend on a failed one is still made. An entry whose write failed
    /// is in doubt (the kernel may have made it anyway) until a later write of it succeeds.
    pub fn apply(&mut self, desired: &Desired, w: &mut impl MapWriter) -> Result<Applied> {
        let mut n = Applied::default();
        let mut log = Log::default();
        self.pending.clear();
        let doubt = &mut self.in_doubt;

        let s = &mut self.shadow;
        if (s.config != desired.config || doubt.contains(&Entry::Config))
            && log.settle(doubt, Entry::Config, w.set_config(&desired.config), false)
        {
            s.config = desired.config;
        }
        for (&ifindex, &value) in &desired.interfaces {
            let e = Entry::Interface(ifindex);
            if (s.interfaces.get(&ifindex) != Some(&value) || doubt.contains(&e))
                && log.settle(doubt, e, w.add_interface(ifindex, value), false)
            {
                s.interfaces.insert(ifindex, value);
            }
        }
        // Targets that forward (those tables name among them) before the tables.
        for (&id, v) in &desired.targets {
            let e = Entry::Target(id);
            if v.state == TARGET_FORWARD
                && (s.targets.get(&id) != Some(v) || doubt.contains(&e))
                && log.settle(doubt, e, w.put_target(id, v), false)
            {
                s.targets.insert(id, *v);
            }
        }
        for (&gid, spec) in &desired.tables {
            let s = &mut self.shadow;
            if s.tables.get(&gid) == Some(spec) && !self.unknown_tables.contains_key(&gid) {
                continue;
            }
            let members_written = spec.members.iter().all(|m| {
                s.targets.get(&m.target_id) == desired.targets.get(&m.target_id)
                    && !self.in_doubt.contains(&Entry::Target(m.target_id))
            });
            if !members_written {
                continue; // a target write failed: recorded above
            }
            let table = match self.built.get(spec) {
                Some(t) => t.clone(),
                None if self.build_inline => match build_table(spec) {
                    Ok(t) => t,
                    Err(e) => {
                        log.errors.push(format!("group {gid}: {e:#}"));
                        continue;
                    }
                },
                None => {
                    self.pending.push(spec.clone());
                    n.pending += 1;
                    continue;
                }
            };
            if done(
                w.publish_table(gid, spec.flags, &table),
                false,
                &mut log.errors,
            ) {
                s.tables.insert(gid, spec.clone());
                self.unknown_tables.remove(&gid);
                n.tables += 1;
            } else {
                // Old table, new table or anything between: it may name either's members.
                let mut ids = self.unknown_tables.remove(&gid).unwrap_or_default();
                if let Some(old) = s.tables.remove(&gid) {
                    ids.extend(old.members.iter().map(|m| m.target_id));
                }
                ids.extend(spec.members.iter().map(|m| m.target_id));
                self.unknown_tables.insert(gid, ids);
            }
        }
        // The address filter counts the VIPs and reply entries before they are written.
        let bound = self.filter_bound(desired);
        self.write_filter(&bound, w, &mut log);
        let s = &mut self.shadow;
        let doubt = &mut self.in_doubt;
        let counted = |s: &Desired, doubt: &BTreeSet<Entry>, words: &[u32; 4]| {
            let b = addr_filter_bucket(words);
            let (held, need) = (s.addr_filter.get(&b), bound.get(&b));
            !doubt.contains(&Entry::Bucket(b))
                && held.is_some_and(|h| need.is_some_and(|n| covers(h, n)))
        };
        for (&ip, v) in &desired.vips {
            let e = Entry::Vip(ip);
            if (s.vips.get(&ip) != Some(v) || doubt.contains(&e))
                && counted(s, doubt, &addr::to_words(ip).0)
                && log.settle(doubt, e, w.put_vip(ip, *v), false)
            {
                s.vips.insert(ip, *v);
            }
        }
        for (key, v) in &desired.reverse {
            let e = Entry::Reverse(*key);
            if (s.reverse.get(key) != Some(v) || doubt.contains(&e))
                && counted(s, doubt, &key.addr)
                && log.settle(doubt, e, w.put_reverse(*key, *v), false)
            {
                s.reverse.insert(*key, *v);
            }
        }
        for src in &desired.sources {
            let e = Entry::Source(*src);
            if (!s.sources.contains(src) || doubt.contains(&e))
                && log.settle(doubt, e, w.allow_source(src.0, prefix(&src.1)), false)
            {
                s.sources.insert(*src);
            }
        }
        for (key, v) in &desired.listeners {
            let e = Entry::Listener(*key);
            if s.listeners.get(key) == Some(v) && !doubt.contains(&e) {
                continue;
            }
            let vip_written = addr::from_words(&key.addr, key.family)
                .is_some_and(|ip| s.vips.contains_key(&ip) && !doubt.contains(&Entry::Vip(ip)));
            // The group's table as desired; or, for a listener that stays on its group (a
            // change of its flags), whatever complete table the group has now.
            let published =
                s.tables.contains_key(&v.group_id) || self.unknown_tables.contains_key(&v.group_id);
            let table_ready = (s.tables.get(&v.group_id) == desired.tables.get(&v.group_id)
                && published
                && !self.unknown_tables.contains_key(&v.group_id))
                || (published
                    && s.listeners
                        .get(key)
                        .is_some_and(|l| l.group_id == v.group_id));
            if !(vip_written && table_ready) {
                continue;
            }
            if log.settle(doubt, e, w.put_listener(*key, *v), false) {
                s.listeners.insert(*key, *v);
            }
        }

        // Removals, users before what they use. An entry in doubt that is not desired is
        // removed too (absent already counts as removed).
        let (s, doubt) = (&self.shadow, &self.in_doubt);
        let listeners = leaving(
            s.listeners.keys().copied(),
            doubt,
            |e| match e {
                Entry::Listener(k) => Some(*k),
                _ => None,
            },
            |k| desired.listeners.contains_key(k),
        );
        let sources = leaving(
            s.sources.iter().copied(),
            doubt,
            |e| match e {
                Entry::Source(k) => Some(*k),
                _ => None,
            },
            |k| desired.sources.contains(k),
        );
        let reverse = leaving(
            s.reverse.keys().copied(),
            doubt,
            |e| match e {
                Entry::Reverse(k) => Some(*k),
                _ => None,
            },
            |k| desired.reverse.contains_key(k),
        );
        let vips = leaving(
            s.vips.keys().copied(),
            doubt,
            |e| match e {
                Entry::Vip(k) => Some(*k),
                _ => None,
            },
            |k| desired.vips.contains_key(k),
        );
        let interfaces = leaving(
            s.interfaces.keys().copied(),
            doubt,
            |e| match e {
                Entry::Interface(k) => Some(*k),
                _ => None,
            },
            |k| desired.interfaces.contains_key(k),
        );

        let s = &mut self.shadow;
        let doubt = &mut self.in_doubt;
        for key in listeners {
            let e = Entry::Listener(key);
            if log.settle(doubt, e, w.remove_listener(&key), true) {
                s.listeners.remove(&key);
            }
        }
        // A listener not written as desired yet keeps its old sources: narrowing them before
        // it allows everyone would refuse its clients meanwhile.
        let unsettled: BTreeSet<u32> = desired
            .listeners
            .iter()
            .filter(|(k, v)| s.listeners.get(k) != Some(v) || doubt.contains(&Entry::Listener(**k)))
            .map(|(_, v)| v.listener_id)
            .collect();
        for src in sources {
            if unsettled.contains(&src.0) {
                continue;
            }
            let e = Entry::Source(src);
            if log.settle(doubt, e, w.disallow_source(src.0, prefix(&src.1)), true) {
                s.sources.remove(&src);
            }
        }
        for key in reverse {
            let e = Entry::Reverse(key);
            if log.settle(doubt, e, w.remove_reverse(&key), true) {
                s.reverse.remove(&key);
            }
        }
        for ip in vips {
            let (words, family) = addr::to_words(ip);
            let used = s
                .listeners
                .keys()
                .any(|k| k.addr == words && k.family == family)
                || doubt.iter().any(
                    |e| matches!(e, Entry::Listener(k) if k.addr == words && k.family == family),
                );
            if used {
                continue;
            }
            let e = Entry::Vip(ip);
            if log.settle(doubt, e, w.remove_vip(ip), true) {
                s.vips.remove(&ip);
            }
        }
        let old_tables: BTreeSet<u32> = s
            .tables
            .keys()
            .chain(self.unknown_tables.keys())
            .filter(|g| !desired.tables.contains_key(g))
            .copied()
            .collect();
        for gid in old_tables {
            let s = &mut self.shadow;
            // A listener in doubt may point anywhere: keep every table until it is settled.
            let used = s.listeners.values().any(|l| l.group_id == gid)
                || self
                    .in_doubt
                    .iter()
                    .any(|e| matches!(e, Entry::Listener(_)));
            if used {
                continue;
            }
            if done(w.remove_table(gid), true, &mut log.errors) {
                s.tables.remove(&gid);
                self.unknown_tables.remove(&gid);
                n.tables += 1;
            } else {
                let mut ids = self.unknown_tables.remove(&gid).unwrap_or_default();
                if let Some(old) = s.tables.remove(&gid) {
                    ids.extend(old.members.iter().map(|m| m.target_id));
                }
                self.unknown_tables.insert(gid, ids);
            }
        }
        // Targets that stop forwarding, or go, once no table names them.
        let changed: Vec<(u32, TargetValue)> = desired
            .targets
            .iter()
            .filter(|(id, v)| {
                v.state != TARGET_FORWARD
                    && (self.shadow.targets.get(id) != Some(v)
                        || self.in_doubt.contains(&Entry::Target(**id)))
            })
            .map(|(&id, &v)| (id, v))
            .chain(
                leaving(
                    self.shadow.targets.keys().copied(),
                    &self.in_doubt,
                    |e| match e {
                        Entry::Target(id) => Some(*id),
                        _ => None,
                    },
                    |id| desired.targets.contains_key(id),
                )
                .into_iter()
                .map(|id| (id, TargetValue::default())),
            )
            .collect();
        for (id, v) in changed {
            if self.in_a_table(id) {
                continue; // the table that drops it is not published yet
            }
            let e = Entry::Target(id);
            if log.settle(&mut self.in_doubt, e, w.put_target(id, &v), false) {
                if v == TargetValue::default() {
                    self.shadow.targets.remove(&id);
                } else {
                    self.shadow.targets.insert(id, v);
                }
            }
        }
        for ifindex in interfaces {
            let e = Entry::Interface(ifindex);
            if log.settle(&mut self.in_doubt, e, w.remove_interface(ifindex), true) {
                self.shadow.interfaces.remove(&ifindex);
            }
        }
        // The address filter's counts come down once the removals they counted are done.
        let bound = self.filter_bound(desired);
        self.write_filter(&bound, w, &mut log);
        self.built
            .retain(|spec, _| desired.tables.values().any(|t| t == spec));
        n.writes = log.writes;
        if log.errors.is_empty() {
            Ok(n)
        } else {
            Err(anyhow!(
                "{} of the map writes failed (the rest were made): {}",
                log.errors.len(),
                log.errors.join("; ")
            ))
        }
    }
}

/// Does bucket value `held` count at least what `need` does?
fn covers(held: &AddrBucket, need: &AddrBucket) -> bool {
    held.vips >= need.vips && held.targets >= need.targets
}

/// The keys to remove: those the maps hold or may hold (in doubt) that are not `wanted`.
fn leaving<K: Ord>(
    held: impl Iterator<Item = K>,
    doubt: &BTreeSet<Entry>,
    pick: impl Fn(&Entry) -> Option<K>,
    wanted: impl Fn(&K) -> bool,
) -> BTreeSet<K> {
    held.chain(doubt.iter().filter_map(pick))
        .filter(|k| !wanted(k))
        .collect()
}

#[cfg(test)]
mod tests;
