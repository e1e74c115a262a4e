//! The kernel's maps behind `MapWriter`.
//!
//! Tables are published double-buffered: the group's inactive half of `LB_TABLES` is written
//! first, then the group's size for that half, then the `active` index flips; a packet reads
//! either the old table or the new one, never a mix. Where each half lives is
//! `regions::TableSpace`'s business; after a restart it is read back from `LB_GROUPS`.

use std::{
    collections::HashMap as StdHashMap, net::IpAddr, os::fd::AsFd, path::Path, time::Instant,
};

use super::{
    batch,
    epoch::RouteEpoch,
    events::FlowEvents,
    flows::FlowTable,
    regions::{NoRoom, TableSpace},
    signals::TargetSignals,
    typed_map, MapView, SourcePrefix, WriteError,
};
use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{
        lpm_trie::Key as LpmKey, xdp::DevMapHash, Array, HashMap, IterableMap, LpmTrie, Map,
        MapData, PerCpuArray, ProgramArray,
    },
    programs::Xdp,
    Ebpf,
};
use lb_common::{
    addr, counter, maps::*, AddrBucket, AllowV4, AllowV6, DataplaneConfig, EndpointKey, FlowKey,
    FlowValue, FragKey, FragValue, GroupValue, IfaceValue, ListenerStats, ListenerValue, NextHop,
    ReverseValue, TargetValue, VipKey, VipValue, FAMILY_V4, FAMILY_V6,
};

/// Typed handles on every map of a loaded object.
pub struct KernelMaps {
    config: Array<MapData, DataplaneConfig>,
    vips: HashMap<MapData, VipKey, VipValue>,
    listeners: HashMap<MapData, EndpointKey, ListenerValue>,
    allow_v4: LpmTrie<MapData, AllowV4, u8>,
    allow_v6: LpmTrie<MapData, AllowV6, u8>,
    groups: Array<MapData, GroupValue>,
    tables: Array<MapData, u32>,
    targets: Array<MapData, TargetValue>,
    reverse: HashMap<MapData, EndpointKey, ReverseValue>,
    flows: HashMap<MapData, FlowKey, FlowValue>,
    reply_flows: HashMap<MapData, FlowKey, ReverseValue>,
    devmap: DevMapHash<MapData>,
    ifaces: HashMap<MapData, u32, IfaceValue>,
    reply_frags: HashMap<MapData, FragKey, FragValue>,
    /// The rare paths' programs. Held (and pinned) for as long as the data plane lives: the
    /// kernel empties a program array when its last user reference goes.
    progs: ProgramArray<MapData>,
    stats: PerCpuArray<MapData, ListenerStats>,
    counters: PerCpuArray<MapData, u64>,
    addr_filter: Array<MapData, AddrBucket>,
    /// Held for the route watcher (`route_epoch`), and pinned with the rest.
    route_epoch: Array<MapData, u32>,
    next_hops: PerCpuArray<MapData, NextHop>,
    /// Held for the access log (`flow_events`) and the passive health signals
    /// (`target_signals`), and pinned with the rest.
    flow_events: MapData,
    target_stats: MapData,
    target_fails: MapData,
    /// Where each group's two halves live in `LB_TABLES`.
    space: TableSpace,
    /// What this process last wrote to each (group, half): its base and slots. Unchanged slots
    /// are not written again.
    written: StdHashMap<(u32, usize), (u32, Vec<u32>)>,
}

/// Classifies an aya error on `what` for the reconciler.
trait Written<T> {
    fn written(self, what: impl FnOnce() -> String) -> Result<T, WriteError>;
}

impl<T> Written<T> for Result<T, aya::maps::MapError> {
    fn written(self, what: impl FnOnce() -> String) -> Result<T, WriteError> {
        self.map_err(|e| WriteError::from_kernel(what(), e))
    }
}

/// Writes `target_id` at slot `base + offset` for each `(offset, target_id)` of `slots`, with
/// one `BPF_MAP_UPDATE_BATCH` (not a syscall per slot).
pub(crate) fn write_slots(
    tables: &mut Array<MapData, u32>,
    base: u32,
    slots: &[(u32, u32)],
) -> Result<()> {
    let keys: Vec<u32> = slots.iter().map(|&(offset, _)| base + offset).collect();
    let values: Vec<u32> = slots.iter().map(|&(_, target_id)| target_id).collect();
    batch::update_batch(tables, &keys, &values)
        .with_context(|| format!("writing {} slots of LB_TABLES from {base}", slots.len()))
}

/// Opens a pinned map with the variant its kernel type calls for.
fn open_pinned(dir: &Path, name: &str) -> Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    typed_map(data).with_context(|| format!("pinned map {}", path.display()))
}

impl KernelMaps {
    /// Takes the maps out of a freshly loaded object (the programs keep using them) and fills
    /// `LB_PROGS` with its rare-path programs.
    pub fn new(ebpf: &mut Ebpf) -> Result<Self> {
        let mut maps = Self::open(|name| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the object"))
        })?;
        maps.fill_tail_calls(ebpf)?;
        Ok(maps)
    }

    fn fill_tail_calls(&mut self, ebpf: &Ebpf) -> Result<()> {
        for (index, name) in TAIL_CALLS {
            let prog: &Xdp = ebpf
                .program(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()
                .with_context(|| format!("program {name} is not XDP"))?;
            let fd = prog
                .fd()
                .with_context(|| format!("program {name} is not loaded"))?;
            self.progs
                .set(index, fd, 0)
                .with_context(|| format!("writing {name} to LB_PROGS[{index}]"))?;
        }
        Ok(())
    }

    /// As `new`, pinning every map as `pin_dir/NAME` first.
    pub fn new_pinned(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<Self> {
        let mut maps = Self::open(|name| {
            let map = ebpf
                .take_map(name)
                .with_context(|| format!("map {name} missing from the object"))?;
            let path = pin_dir.join(name);
            map.pin(&path)
                .with_context(|| format!("pinning map {name} at {}", path.display()))?;
            Ok(map)
        })?;
        maps.fill_tail_calls(ebpf)?;
        Ok(maps)
    }

    /// The maps pinned under `pin_dir` by an earlier run; where its tables live is read back
    /// from `LB_GROUPS`.
    pub fn from_pins(pin_dir: &Path) -> Result<Self> {
        let mut maps = Self::open(|name| open_pinned(pin_dir, name))?;
        let mut groups = Vec::new();
        for gid in 0..MAX_GROUPS {
            let g = maps.group(gid)?;
            groups.push((
                gid,
                g.active as usize & 1,
                [
                    (g.table_base[0], g.table_size[0]),
                    (g.table_base[1], g.table_size[1]),
                ],
            ));
        }
        maps.space = TableSpace::adopt(maps.space.total(), groups)?;
        Ok(maps)
    }

    fn open(mut take: impl FnMut(&str) -> Result<Map>) -> Result<Self> {
        macro_rules! typed {
            ($name:expr) => {
                take($name)?
                    .try_into()
                    .with_context(|| format!("map {} has an unexpected type or layout", $name))?
            };
        }
        let tables: Array<MapData, u32> = typed!(MAP_TABLES);
        let space = TableSpace::new(tables.len());
        Ok(Self {
            config: typed!(MAP_CONFIG),
            vips: typed!(MAP_VIPS),
            listeners: typed!(MAP_LISTENERS),
            allow_v4: typed!(MAP_ALLOW_V4),
            allow_v6: typed!(MAP_ALLOW_V6),
            groups: typed!(MAP_GROUPS),
            tables,
            targets: typed!(MAP_TARGETS),
            reverse: typed!(MAP_REVERSE),
            flows: typed!(MAP_FLOWS),
            reply_flows: typed!(MAP_REPLY_FLOWS),
            devmap: typed!(MAP_DEVMAP),
            ifaces: typed!(MAP_IFACES),
            reply_frags: typed!(MAP_REPLY_FRAGS),
            progs: typed!(MAP_PROGS),
            stats: typed!(MAP_STATS),
            counters: typed!(MAP_COUNTERS),
            addr_filter: typed!(MAP_ADDR_FILTER),
            route_epoch: typed!(MAP_ROUTE_EPOCH),
            next_hops: typed!(MAP_NEXT_HOPS),
            flow_events: map_data(take(MAP_FLOW_EVENTS)?, MAP_FLOW_EVENTS)?,
            target_stats: map_data(take(MAP_TARGET_STATS)?, MAP_TARGET_STATS)?,
            target_fails: map_data(take(MAP_TARGET_FAILS)?, MAP_TARGET_FAILS)?,
            space,
            written: StdHashMap::new(),
        })
    }

    pub fn config(&self) -> Result<DataplaneConfig> {
        self.config.get(&0, 0).context("reading LB_CONFIG")
    }

    pub fn set_config(&mut self, config: &DataplaneConfig) -> Result<(), WriteError> {
        self.config
            .set(0, config, 0)
            .written(|| "writing LB_CONFIG".into())
    }

    pub fn put_vip(&mut self, ip: IpAddr, value: VipValue) -> Result<(), WriteError> {
        self.vips
            .insert(vip_key(ip), value, 0)
            .written(|| format!("adding VIP {ip}"))
    }

    pub fn remove_vip(&mut self, ip: IpAddr) -> Result<(), WriteError> {
        self.vips
            .remove(&vip_key(ip))
            .written(|| format!("removing VIP {ip}"))
    }

    pub fn put_listener(
        &mut self,
        key: EndpointKey,
        value: ListenerValue,
    ) -> Result<(), WriteError> {
        self.listeners
            .insert(key, value, 0)
            .written(|| format!("writing listener {}", value.listener_id))
    }

    pub fn remove_listener(&mut self, key: &EndpointKey) -> Result<(), WriteError> {
        self.listeners
            .remove(key)
            .written(|| "removing from LB_LISTENERS".into())
    }

    /// Allows `prefix` as a source of listener `listener_id`.
    pub fn allow_source(
        &mut self,
        listener_id: u32,
        prefix: SourcePrefix,
    ) -> Result<(), WriteError> {
        self.update_source(listener_id, prefix, true)
    }

    pub fn disallow_source(
        &mut self,
        listener_id: u32,
        prefix: SourcePrefix,
    ) -> Result<(), WriteError> {
        self.update_source(listener_id, prefix, false)
    }

    fn update_source(
        &mut self,
        listener_id: u32,
        prefix: SourcePrefix,
        add: bool,
    ) -> Result<(), WriteError> {
        let (words, family) = addr::to_words(prefix.addr);
        let id_be = listener_id.to_be();
        let len = prefix.len as u32;
        let result = match family {
            FAMILY_V4 => {
                if len > 32 {
                    return Err(anyhow!("IPv4 prefix length {len} > 32").into());
                }
                let key = LpmKey::new(
                    32 + len,
                    AllowV4 {
                        listener_id_be: id_be,
                        addr: words[0],
                    },
                );
                if add {
                    self.allow_v4.insert(&key, 1, 0)
                } else {
                    self.allow_v4.remove(&key)
                }
            }
            FAMILY_V6 => {
                if len > 128 {
                    return Err(anyhow!("IPv6 prefix length {len} > 128").into());
                }
                let key = LpmKey::new(
                    32 + len,
                    AllowV6 {
                        listener_id_be: id_be,
                        addr: words,
                    },
                );
                if add {
                    self.allow_v6.insert(&key, 1, 0)
                } else {
                    self.allow_v6.remove(&key)
                }
            }
            _ => unreachable!("to_words gives v4 or v6"),
        };
        result.written(|| {
            format!(
                "updating allowed source {}/{len} of listener {listener_id}",
                prefix.addr
            )
        })
    }

    pub fn put_target(&mut self, target_id: u32, value: &TargetValue) -> Result<(), WriteError> {
        self.targets
            .set(target_id, value, 0)
            .written(|| format!("writing target {target_id}"))
    }

    pub fn target(&self, target_id: u32) -> Result<TargetValue> {
        self.targets
            .get(&target_id, 0)
            .with_context(|| format!("reading target {target_id}"))
    }

    pub fn put_reverse(&mut self, key: EndpointKey, value: ReverseValue) -> Result<(), WriteError> {
        self.reverse
            .insert(key, value, 0)
            .written(|| "writing LB_REVERSE".into())
    }

    pub fn remove_reverse(&mut self, key: &EndpointKey) -> Result<(), WriteError> {
        self.reverse
            .remove(key)
            .written(|| "removing from LB_REVERSE".into())
    }

    /// Writes `LB_ADDR_FILTER[bucket]` (the all-zero value: no VIP, no target endpoint there).
    pub fn put_addr_bucket(&mut self, bucket: u32, value: AddrBucket) -> Result<(), WriteError> {
        self.addr_filter
            .set(bucket, value, 0)
            .written(|| format!("writing LB_ADDR_FILTER[{bucket}]"))
    }

    /// Lets the program redirect frames out of `ifindex`, and says what the interface faces
    /// (`IFACE_F_TARGETS`: replies from targets are reverse-NATed only when received there).
    /// Writing it again changes only what it faces.
    pub fn add_interface(&mut self, ifindex: u32, value: IfaceValue) -> Result<(), WriteError> {
        self.devmap.insert(ifindex, ifindex, None, 0).map_err(|e| {
            let what = format!("adding interface {ifindex} to LB_DEVMAP");
            match e {
                aya::maps::xdp::XdpMapError::MapError(e) => WriteError::from_kernel(what, e),
                other => WriteError::Failed(anyhow::Error::new(other).context(what)),
            }
        })?;
        self.ifaces
            .insert(ifindex, value, 0)
            .written(|| format!("writing interface {ifindex} to LB_IFACES"))
    }

    /// Forgets an interface; done when either map still had it.
    pub fn remove_interface(&mut self, ifindex: u32) -> Result<(), WriteError> {
        let ifaces = self
            .ifaces
            .remove(&ifindex)
            .written(|| format!("removing interface {ifindex} from LB_IFACES"));
        let devmap = self
            .devmap
            .remove(ifindex)
            .written(|| format!("removing interface {ifindex} from LB_DEVMAP"));
        match (ifaces, devmap) {
            (Err(WriteError::NotFound(_)), Err(e @ WriteError::NotFound(_))) => Err(e),
            (Ok(()) | Err(WriteError::NotFound(_)), Ok(()) | Err(WriteError::NotFound(_))) => {
                Ok(())
            }
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    }

    /// How the fragments of a datagram from a target are being translated, if tracked.
    pub fn reply_fragment(&self, key: &FragKey) -> Result<Option<FragValue>> {
        match self.reply_frags.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading LB_REPLY_FRAGS"),
        }
    }

    pub fn group(&self, group_id: u32) -> Result<GroupValue> {
        self.groups
            .get(&group_id, 0)
            .with_context(|| format!("reading group {group_id}"))
    }

    /// The table packets of group `group_id` use now (target id per slot).
    pub fn active_table(&self, group_id: u32) -> Result<Vec<u32>> {
        let g = self.group(group_id)?;
        let half = g.active as usize & 1;
        (0..g.table_size[half])
            .map(|i| {
                self.tables
                    .get(&(g.table_base[half] + i), 0)
                    .context("reading LB_TABLES")
            })
            .collect()
    }

    /// Publishes a group's new consistent-hash table (`table[slot]` = target id, or empty for
    /// a group with no target) with `flags`, without a packet ever seeing a half-written table.
    pub fn publish_table(
        &mut self,
        group_id: u32,
        flags: u32,
        table: &[u32],
    ) -> Result<(), WriteError> {
        if group_id >= MAX_GROUPS {
            return Err(anyhow!("group id {group_id} ≥ {MAX_GROUPS}").into());
        }
        let size = u32::try_from(table.len()).context("table too large")?;
        let mut group = self.group(group_id)?;
        let inactive = (group.active as usize & 1) ^ 1;
        let placed = match self.space.place(group_id, inactive, size, Instant::now()) {
            Ok(p) => p,
            Err(NoRoom::NotYet { free_at }) => {
                return Err(anyhow!(
                    "LB_TABLES: no room for group {group_id}'s table of {size} slots until freed slots come out of quarantine in {:?}",
                    free_at.saturating_duration_since(Instant::now())
                )
                .into())
            }
            Err(NoRoom::Exhausted { wanted, free, total }) => {
                return Err(anyhow!(
                    "LB_TABLES has {total} slots, {free} free; group {group_id}'s table needs {wanted} in one piece (the budget is sized when the data plane is loaded, from the groups' hash_table_size: a restart without --keep-datapath sizes it anew)"
                )
                .into())
            }
        };
        let base = placed.base;
        let written = self.write_half(group_id, inactive, base, flags, table, &mut group);
        if let Err(e) = written {
            self.space.undo(group_id, inactive, placed);
            return Err(e);
        }
        self.space.settle(placed, Instant::now());
        // 2: the flip.
        let old_active = group.active as usize & 1;
        group.active = inactive as u32;
        self.groups
            .set(group_id, group, 0)
            .written(|| format!("flipping group {group_id}"))?;
        if size == 0 {
            // An empty table: the half it replaced gives its slots back.
            group.table_size[old_active] = 0;
            self.groups
                .set(group_id, group, 0)
                .written(|| format!("writing group {group_id}"))?;
            self.space.free_half(group_id, old_active, Instant::now());
            self.written.remove(&(group_id, old_active));
        }
        Ok(())
    }

    /// Writes a half's slots (those that changed), then its place and size in `LB_GROUPS`
    /// (step 1 of a publish: nothing reads the half yet).
    fn write_half(
        &mut self,
        group_id: u32,
        half: usize,
        base: u32,
        flags: u32,
        table: &[u32],
        group: &mut GroupValue,
    ) -> Result<(), WriteError> {
        // Only the slots that differ from what this half already holds: a consistent-hash
        // table changes in few slots when one target comes or goes.
        let before = match self.written.remove(&(group_id, half)) {
            Some((b, slots)) if b == base => slots,
            _ => Vec::new(),
        };
        let changed: Vec<(u32, u32)> = table
            .iter()
            .enumerate()
            .filter(|&(i, t)| before.get(i) != Some(t))
            .map(|(i, &t)| (i as u32, t))
            .collect();
        write_slots(&mut self.tables, base, &changed)
            .with_context(|| format!("writing group {group_id}'s table"))?;
        self.written
            .insert((group_id, half), (base, table.to_vec()));
        group.table_base[half] = base;
        group.table_size[half] = table.len() as u32;
        group.flags = flags;
        self.groups
            .set(group_id, *group, 0)
            .written(|| format!("writing group {group_id}"))
    }

    /// Publishes an empty table for a group no listener uses, then gives its slots back.
    pub fn remove_table(&mut self, group_id: u32) -> Result<(), WriteError> {
        self.publish_table(group_id, 0, &[])?;
        self.space.release(group_id, Instant::now());
        self.written.retain(|(g, _), _| *g != group_id);
        Ok(())
    }

    /// Everything the maps hold, in the reconciler's terms.
    pub fn view(&self) -> Result<MapView> {
        let mut v = MapView {
            config: self.config()?,
            ..Default::default()
        };
        for kv in self.vips.iter() {
            let (k, value) = kv.context("reading LB_VIPS")?;
            let ip = addr::from_words(&k.addr, k.family).context("LB_VIPS: a key of no family")?;
            v.vips.insert(ip, value);
        }
        for kv in self.listeners.iter() {
            let (k, value) = kv.context("reading LB_LISTENERS")?;
            v.listeners.insert(k, value);
        }
        for k in self.allow_v4.keys() {
            let k = k.context("reading LB_ALLOW_V4")?;
            let data = k.data();
            let addr = addr::from_words(&[data.addr, 0, 0, 0], FAMILY_V4).context("v4")?;
            let prefix = SourcePrefix {
                addr,
                len: (k.prefix_len() - 32) as u8,
            };
            v.sources
                .insert((u32::from_be(data.listener_id_be), prefix));
        }
        for k in self.allow_v6.keys() {
            let k = k.context("reading LB_ALLOW_V6")?;
            let data = k.data();
            let prefix = SourcePrefix {
                addr: addr::from_words(&data.addr, FAMILY_V6).context("v6")?,
                len: (k.prefix_len() - 32) as u8,
            };
            v.sources
                .insert((u32::from_be(data.listener_id_be), prefix));
        }
        for kv in self.reverse.iter() {
            let (k, value) = kv.context("reading LB_REVERSE")?;
            v.reverse.insert(k, value);
        }
        for id in 0..self.targets.len() {
            let t = self.target(id)?;
            if t != TargetValue::default() {
                v.targets.insert(id, t);
            }
        }
        for gid in 0..MAX_GROUPS {
            let g = self.group(gid)?;
            let table = self.active_table(gid)?;
            if g.flags != 0 || !table.is_empty() {
                v.tables.insert(gid, (g.flags, table));
            }
        }
        for kv in self.ifaces.iter() {
            let (i, value) = kv.context("reading LB_IFACES")?;
            v.interfaces.insert(i, value);
        }
        for i in self.devmap.keys() {
            v.devmap.insert(i.context("reading LB_DEVMAP")?);
        }
        let buckets = batch::lookup_all(&self.addr_filter, ADDR_FILTER_BUCKETS as usize)
            .context("reading LB_ADDR_FILTER")?;
        v.addr_filter = buckets
            .into_iter()
            .filter(|(_, b)| *b != AddrBucket::default())
            .collect();
        Ok(v)
    }

    /// The flow entry of a client → VIP 5-tuple, if any.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>> {
        match self.flows.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading LB_FLOWS"),
        }
    }

    /// The reply-flow entry of a target → client 5-tuple, if any.
    pub fn reply_flow(&self, key: &FlowKey) -> Result<Option<ReverseValue>> {
        match self.reply_flows.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading LB_REPLY_FLOWS"),
        }
    }

    pub fn remove_reply_flow(&mut self, key: &FlowKey) -> Result<()> {
        self.reply_flows
            .remove(key)
            .context("removing from LB_REPLY_FLOWS")
    }

    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<()> {
        self.flows.remove(key).context("removing from LB_FLOWS")
    }

    /// Handles of its own on the flow tables (duplicated descriptors), for the expiry sweep
    /// on another thread. Needs no privilege beyond the descriptors this process holds.
    pub fn flow_table(&self) -> Result<FlowTable> {
        FlowTable::from_maps(
            dup(self.flows.map().fd(), MAP_FLOWS)?,
            dup(self.reply_flows.map().fd(), MAP_REPLY_FLOWS)?,
        )
    }

    /// Handles of its own on `LB_ROUTE_EPOCH` and `LB_NEXT_HOPS` (duplicated descriptors),
    /// for the route watcher.
    pub fn route_epoch(&self) -> Result<RouteEpoch> {
        RouteEpoch::from_maps(
            dup(self.route_epoch.map().fd(), MAP_ROUTE_EPOCH)?,
            dup(self.next_hops.map().fd(), MAP_NEXT_HOPS)?,
        )
    }

    /// A reader of its own on `LB_FLOW_EVENTS` (a duplicated descriptor): the access log's.
    pub fn flow_events(&self) -> Result<FlowEvents> {
        FlowEvents::from_map(dup_data(&self.flow_events, MAP_FLOW_EVENTS)?)
    }

    /// Handles of its own on `LB_TARGET_STATS` and `LB_TARGET_FAILS`.
    pub fn target_signals(&self) -> Result<TargetSignals> {
        TargetSignals::from_maps(
            dup_data(&self.target_stats, MAP_TARGET_STATS)?,
            dup_data(&self.target_fails, MAP_TARGET_FAILS)?,
        )
    }

    pub fn flow_keys(&self) -> impl Iterator<Item = Result<FlowKey>> + '_ {
        self.flows.keys().map(|k| k.context("iterating LB_FLOWS"))
    }

    /// A listener's traffic, summed over CPUs.
    pub fn listener_stats(&self, listener_id: u32) -> Result<ListenerStats> {
        let per_cpu = self
            .stats
            .get(&listener_id, 0)
            .context("reading LB_STATS")?;
        Ok(per_cpu.iter().fold(ListenerStats::default(), |mut a, s| {
            a.in_packets += s.in_packets;
            a.in_bytes += s.in_bytes;
            a.out_packets += s.out_packets;
            a.out_bytes += s.out_bytes;
            a.new_flows += s.new_flows;
            a
        }))
    }

    /// Every `lb_common::counter`, summed over CPUs.
    pub fn counters(&self) -> Result<[u64; counter::COUNT as usize]> {
        let mut out = [0u64; counter::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = self
                .counters
                .get(&(i as u32), 0)
                .context("reading LB_COUNTERS")?
                .iter()
                .sum();
        }
        Ok(out)
    }
}

/// A map handle of its own on the map behind `fd` (a duplicated descriptor).
fn dup(fd: &aya::maps::MapFd, name: &str) -> Result<MapData> {
    let owned = fd
        .as_fd()
        .try_clone_to_owned()
        .with_context(|| format!("duplicating the descriptor of {name}"))?;
    MapData::from_fd(owned).with_context(|| format!("reopening {name}"))
}

/// The handle inside `map`, for maps kept only to hand out handles of their own.
fn map_data(map: Map, name: &str) -> Result<MapData> {
    match map {
        Map::RingBuf(d) | Map::PerCpuArray(d) | Map::Array(d) => Ok(d),
        _ => Err(anyhow!("map {name} has an unexpected type")),
    }
}

fn dup_data(data: &MapData, name: &str) -> Result<MapData> {
    dup(data.fd(), name)
}

fn vip_key(ip: IpAddr) -> VipKey {
    let (addr, family) = addr::to_words(ip);
    VipKey {
        addr,
        family,
        _pad: [0; 3],
    }
}
