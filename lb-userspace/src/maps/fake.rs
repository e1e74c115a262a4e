//! The maps in memory, with the kernel's answers: `NotFound` for removing what is absent,
//! `Full` for a new entry in a full map. Tests read what was written (`view`, `ops`) and, with
//! `check_references`, whether a packet could ever have met a reference to something missing
//! or an address filter that hides an entry.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::{anyhow, Result};
use lb_common::{
    addr, maps, AddrBucket, DataplaneConfig, EndpointKey, IfaceValue, ListenerValue, ReverseValue,
    TargetValue, VipValue, TARGET_FORWARD,
};

use super::{MapView, MapWriter, SourcePrefix, WriteError};

/// Entries each map holds, as `max_entries` in the object.
#[derive(Clone, Copy, Debug)]
pub struct Capacities {
    pub vips: usize,
    pub listeners: usize,
    /// Per family, as `LB_ALLOW_V4` and `LB_ALLOW_V6`.
    pub sources: usize,
    pub reverse: usize,
    pub targets: u32,
    pub groups: u32,
    pub interfaces: usize,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            vips: maps::MAX_VIPS as usize,
            listeners: maps::MAX_LISTENERS as usize,
            sources: maps::MAX_ALLOW_PREFIXES as usize,
            reverse: maps::MAX_TARGETS as usize,
            targets: maps::MAX_TARGETS,
            groups: maps::MAX_GROUPS,
            interfaces: maps::MAX_INTERFACES as usize,
        }
    }
}

#[derive(Debug, Default)]
pub struct FakeMaps {
    /// Every successful write, in order (`put_target 3 state=1`, `publish 0`, …).
    pub ops: Vec<String>,
    /// What the maps hold; `tables` also keeps published empty tables, `devmap` follows
    /// `interfaces`.
    pub held: MapView,
    pub capacities: Capacities,
    /// With `checking`, every write that left a dangling reference (`check_references`).
    pub violations: Vec<String>,
    pub checking: bool,
}

impl std::ops::Deref for FakeMaps {
    type Target = MapView;
    fn deref(&self) -> &MapView {
        &self.held
    }
}

fn put<K: Ord, V>(
    map: &mut BTreeMap<K, V>,
    capacity: usize,
    key: K,
    value: V,
    what: impl FnOnce() -> String,
) -> Result<(), WriteError> {
    if !map.contains_key(&key) && map.len() >= capacity {
        return Err(WriteError::Full(what()));
    }
    map.insert(key, value);
    Ok(())
}

fn remove<K: Ord, V>(
    map: &mut BTreeMap<K, V>,
    key: &K,
    what: impl FnOnce() -> String,
) -> Result<(), WriteError> {
    match map.remove(key) {
        Some(_) => Ok(()),
        None => Err(WriteError::NotFound(what())),
    }
}

impl FakeMaps {
    /// A fake that records a violation whenever a write leaves a dangling reference.
    pub fn checking() -> Self {
        Self {
            checking: true,
            ..Default::default()
        }
    }

    /// How many slots of group `gid`'s table each target id has.
    pub fn slots(&self, gid: u32) -> BTreeMap<u32, usize> {
        let mut out = BTreeMap::new();
        for &id in self
            .tables
            .get(&gid)
            .map(|t| t.1.as_slice())
            .unwrap_or_default()
        {
            *out.entry(id).or_default() += 1;
        }
        out
    }

    /// What a packet could meet that is not there: a listener whose VIP or group table is
    /// missing, a table slot naming a target that does not forward; and an `LB_ADDR_FILTER`
    /// bucket counting fewer VIPs or target endpoints than the maps hold there (the data path
    /// would pass their packets untouched).
    pub fn check_references(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (k, l) in &self.held.listeners {
            let vip = addr::from_words(&k.addr, k.family);
            if !vip.is_some_and(|ip| self.held.vips.contains_key(&ip)) {
                out.push(format!(
                    "listener {} on {vip:?}: VIP missing",
                    l.listener_id
                ));
            }
            if !self.held.tables.contains_key(&l.group_id) {
                out.push(format!(
                    "listener {}: group {} has no table",
                    l.listener_id, l.group_id
                ));
            }
        }
        for (gid, (_, table)) in &self.held.tables {
            let ids: BTreeSet<u32> = table.iter().copied().collect();
            for id in ids {
                let state = self.held.targets.get(&id).map(|t| t.state);
                if state != Some(TARGET_FORWARD) {
                    out.push(format!(
                        "group {gid}'s table names target {id}, whose state is {state:?}"
                    ));
                }
            }
        }
        out.extend(self.held.filter_shortfalls());
        out
    }

    fn done(&mut self, op: String) -> Result<(), WriteError> {
        if self.checking {
            for v in self.check_references() {
                self.violations.push(format!("after {op}: {v}"));
            }
        }
        self.ops.push(op);
        Ok(())
    }
}

impl MapWriter for FakeMaps {
    fn set_config(&mut self, config: &DataplaneConfig) -> Result<(), WriteError> {
        self.held.config = *config;
        self.done("config".into())
    }
    fn put_vip(&mut self, ip: IpAddr, value: VipValue) -> Result<(), WriteError> {
        put(&mut self.held.vips, self.capacities.vips, ip, value, || {
            format!("adding VIP {ip}")
        })?;
        self.done(format!("put_vip {ip}"))
    }
    fn remove_vip(&mut self, ip: IpAddr) -> Result<(), WriteError> {
        remove(&mut self.held.vips, &ip, || format!("removing VIP {ip}"))?;
        self.done(format!("remove_vip {ip}"))
    }
    fn put_listener(&mut self, key: EndpointKey, v: ListenerValue) -> Result<(), WriteError> {
        put(
            &mut self.held.listeners,
            self.capacities.listeners,
            key,
            v,
            || format!("writing listener {}", v.listener_id),
        )?;
        self.done(format!("put_listener {}", v.listener_id))
    }
    fn remove_listener(&mut self, key: &EndpointKey) -> Result<(), WriteError> {
        remove(&mut self.held.listeners, key, || {
            "removing a listener".into()
        })?;
        self.done("remove_listener".into())
    }
    fn allow_source(&mut self, id: u32, p: SourcePrefix) -> Result<(), WriteError> {
        let family = self
            .sources
            .iter()
            .filter(|(_, q)| q.addr.is_ipv4() == p.addr.is_ipv4())
            .count();
        if !self.held.sources.contains(&(id, p)) && family >= self.capacities.sources {
            return Err(WriteError::Full(format!("allowing {}/{}", p.addr, p.len)));
        }
        self.held.sources.insert((id, p));
        self.done(format!("allow {id} {}/{}", p.addr, p.len))
    }
    fn disallow_source(&mut self, id: u32, p: SourcePrefix) -> Result<(), WriteError> {
        if !self.held.sources.remove(&(id, p)) {
            return Err(WriteError::NotFound(format!(
                "disallowing {}/{}",
                p.addr, p.len
            )));
        }
        self.done(format!("disallow {id} {}/{}", p.addr, p.len))
    }
    fn put_target(&mut self, id: u32, v: &TargetValue) -> Result<(), WriteError> {
        if id >= self.capacities.targets {
            return Err(WriteError::Full(format!("writing target {id}")));
        }
        if *v == TargetValue::default() {
            self.held.targets.remove(&id);
        } else {
            self.held.targets.insert(id, *v);
        }
        self.done(format!("put_target {id} state={}", v.state))
    }
    fn put_reverse(&mut self, key: EndpointKey, v: ReverseValue) -> Result<(), WriteError> {
        put(
            &mut self.held.reverse,
            self.capacities.reverse,
            key,
            v,
            || "writing LB_REVERSE".into(),
        )?;
        self.done("put_reverse".into())
    }
    fn remove_reverse(&mut self, key: &EndpointKey) -> Result<(), WriteError> {
        remove(&mut self.held.reverse, key, || {
            "removing from LB_REVERSE".into()
        })?;
        self.done("remove_reverse".into())
    }
    fn add_interface(&mut self, i: u32, v: IfaceValue) -> Result<(), WriteError> {
        put(
            &mut self.held.interfaces,
            self.capacities.interfaces,
            i,
            v,
            || format!("adding interface {i}"),
        )?;
        self.held.devmap.insert(i);
        self.done(format!("add_interface {i} {:#x}", v.flags))
    }
    fn remove_interface(&mut self, i: u32) -> Result<(), WriteError> {
        remove(&mut self.held.interfaces, &i, || {
            format!("removing interface {i}")
        })?;
        self.held.devmap.remove(&i);
        self.done(format!("remove_interface {i}"))
    }
    fn publish_table(&mut self, gid: u32, flags: u32, table: &[u32]) -> Result<(), WriteError> {
        if gid >= self.capacities.groups {
            return Err(anyhow!("group id {gid} ≥ {}", self.capacities.groups).into());
        }
        self.held.tables.insert(gid, (flags, table.to_vec()));
        self.done(format!("publish {gid}"))
    }
    fn remove_table(&mut self, gid: u32) -> Result<(), WriteError> {
        self.held.tables.remove(&gid);
        self.done(format!("remove_table {gid}"))
    }
    fn put_addr_bucket(&mut self, b: u32, v: AddrBucket) -> Result<(), WriteError> {
        if b >= maps::ADDR_FILTER_BUCKETS {
            return Err(WriteError::Full(format!("writing LB_ADDR_FILTER[{b}]")));
        }
        if v == AddrBucket::default() {
            self.held.addr_filter.remove(&b);
        } else {
            self.held.addr_filter.insert(b, v);
        }
        self.done(format!(
            "put_addr_bucket {b} vips={} targets={}",
            v.vips, v.targets
        ))
    }
    fn view(&self) -> Result<MapView> {
        let mut v = self.held.clone();
        v.tables
            .retain(|_, (flags, t)| *flags != 0 || !t.is_empty());
        Ok(v)
    }
}
