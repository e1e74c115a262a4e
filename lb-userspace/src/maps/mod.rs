//! The one owner of the data plane's maps: everything that reads or writes them through aya is
//! here. The reconciler writes through `MapWriter`, implemented by the kernel's maps
//! (`KernelMaps`) and, for tests, by an in-memory copy (`FakeMaps`); the idle-flow sweep uses
//! its own handles on the flow tables (`FlowTable`), the route watcher its own on the route
//! epoch and the next-hop cache (`RouteEpoch`). `batch` does many entries per syscall, which
//! aya lacks.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::{bail, Context, Result};
use aya::maps::{Map, MapData, MapError, MapType};
use lb_common::{
    addr, addr_filter_bucket, AddrBucket, DataplaneConfig, EndpointKey, IfaceValue, ListenerValue,
    ReverseValue, TargetValue, VipValue, NO_TARGET,
};

pub mod batch;
mod epoch;
mod events;
mod fake;
mod faulty;
mod flows;
mod kernel;
pub mod regions;
mod signals;

pub use epoch::RouteEpoch;
pub use events::FlowEvents;
pub use fake::{Capacities, FakeMaps};
pub use faulty::{Fault, FaultyMaps};
pub use flows::{FlowCursor, FlowTable, FLOW_CHUNK};
pub use kernel::KernelMaps;
pub use signals::{Signals, TargetSignals};

/// An `allowed_sources` prefix of one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourcePrefix {
    pub addr: IpAddr,
    pub len: u8,
}

/// Why a map write failed, in the terms the reconciler acts on.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Removing an entry that is not there (the kernel's ENOENT): a removal is then done.
    #[error("{0}: no such entry")]
    NotFound(String),
    /// The map has no room for another entry (E2BIG, ENOSPC).
    #[error("{0}: the map is full")]
    Full(String),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl WriteError {
    /// An aya error on `what`, classified.
    pub fn from_kernel(what: String, e: MapError) -> Self {
        let errno = match &e {
            MapError::KeyNotFound => Some(libc::ENOENT),
            MapError::SyscallError(s) => s.io_error.raw_os_error(),
            _ => None,
        };
        match errno {
            Some(libc::ENOENT) => Self::NotFound(what),
            Some(libc::E2BIG | libc::ENOSPC) => Self::Full(what),
            _ => Self::Failed(anyhow::Error::new(e).context(what)),
        }
    }
}

/// What the data-plane maps hold, in the reconciler's terms: read back from the kernel (or a
/// fake) to adopt a data plane, and compared with the desired state in tests.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MapView {
    pub config: DataplaneConfig,
    pub vips: BTreeMap<IpAddr, VipValue>,
    pub listeners: BTreeMap<EndpointKey, ListenerValue>,
    pub sources: BTreeSet<(u32, SourcePrefix)>,
    pub reverse: BTreeMap<EndpointKey, ReverseValue>,
    /// Target slots that are not all zero.
    pub targets: BTreeMap<u32, TargetValue>,
    /// Groups with flags or a table: (flags, the active table's target ids by slot).
    pub tables: BTreeMap<u32, (u32, Vec<u32>)>,
    /// `LB_IFACES`; every one is also in `LB_DEVMAP` (`devmap`).
    pub interfaces: BTreeMap<u32, IfaceValue>,
    pub devmap: BTreeSet<u32>,
    /// `LB_ADDR_FILTER` buckets that are not all zero.
    pub addr_filter: BTreeMap<u32, AddrBucket>,
}

impl MapView {
    /// The buckets of `LB_ADDR_FILTER` that count fewer VIPs or target endpoints than
    /// `LB_VIPS` and `LB_REVERSE` hold there: traffic to those VIPs, or replies from those
    /// targets, would pass untouched.
    pub fn filter_shortfalls(&self) -> Vec<String> {
        let counted = addr_filter_counts(self.vips.keys(), self.reverse.keys());
        counted
            .iter()
            .filter_map(|(b, need)| {
                let has = self.addr_filter.get(b).copied().unwrap_or_default();
                (has.vips < need.vips || has.targets < need.targets).then(|| {
                    format!(
                        "LB_ADDR_FILTER[{b}] counts {} VIPs and {} target endpoints; the maps hold {} and {} there",
                        has.vips, has.targets, need.vips, need.targets
                    )
                })
            })
            .collect()
    }
}

/// The non-zero buckets of `LB_ADDR_FILTER` that count these `LB_VIPS` and `LB_REVERSE` keys
/// (each key once: pass sets). A count saturates at `u16::MAX`, far above any map's size.
pub fn addr_filter_counts<'a>(
    vips: impl IntoIterator<Item = &'a IpAddr>,
    reverse: impl IntoIterator<Item = &'a EndpointKey>,
) -> BTreeMap<u32, AddrBucket> {
    let mut out: BTreeMap<u32, AddrBucket> = BTreeMap::new();
    for ip in vips {
        let b = out
            .entry(addr_filter_bucket(&addr::to_words(*ip).0))
            .or_default();
        b.vips = b.vips.saturating_add(1);
    }
    for key in reverse {
        let b = out.entry(addr_filter_bucket(&key.addr)).or_default();
        b.targets = b.targets.saturating_add(1);
    }
    out
}

/// The map operations the reconciler needs; `KernelMaps` writes the kernel's maps, `FakeMaps`
/// keeps them in memory for tests and `FaultyMaps` makes a fake fail on purpose.
///
/// Removals of absent entries answer `WriteError::NotFound`, as the kernel does; the reconciler
/// counts them as done.
pub trait MapWriter {
    fn set_config(&mut self, config: &DataplaneConfig) -> Result<(), WriteError>;
    fn put_vip(&mut self, ip: IpAddr, value: VipValue) -> Result<(), WriteError>;
    fn remove_vip(&mut self, ip: IpAddr) -> Result<(), WriteError>;
    fn put_listener(&mut self, key: EndpointKey, value: ListenerValue) -> Result<(), WriteError>;
    fn remove_listener(&mut self, key: &EndpointKey) -> Result<(), WriteError>;
    fn allow_source(&mut self, listener_id: u32, prefix: SourcePrefix) -> Result<(), WriteError>;
    fn disallow_source(&mut self, listener_id: u32, prefix: SourcePrefix)
        -> Result<(), WriteError>;
    /// Writes a target slot; the all-zero value clears it.
    fn put_target(&mut self, target_id: u32, value: &TargetValue) -> Result<(), WriteError>;
    fn put_reverse(&mut self, key: EndpointKey, value: ReverseValue) -> Result<(), WriteError>;
    fn remove_reverse(&mut self, key: &EndpointKey) -> Result<(), WriteError>;
    fn add_interface(&mut self, ifindex: u32, value: IfaceValue) -> Result<(), WriteError>;
    fn remove_interface(&mut self, ifindex: u32) -> Result<(), WriteError>;
    /// Publishes a group's table (`table[slot]` = target id) with `flags`; a packet sees the
    /// old table or the new one, never a mix.
    fn publish_table(&mut self, group_id: u32, flags: u32, table: &[u32])
        -> Result<(), WriteError>;
    /// Empties a group's table and gives its slots back.
    fn remove_table(&mut self, group_id: u32) -> Result<(), WriteError>;
    /// Writes `LB_ADDR_FILTER[bucket]`; the all-zero value clears it.
    fn put_addr_bucket(&mut self, bucket: u32, value: AddrBucket) -> Result<(), WriteError>;
    /// Everything the maps hold.
    fn view(&self) -> Result<MapView>;
}

macro_rules! delegate {
    ($($name:ident(&mut self $(, $arg:ident: $ty:ty)*);)*) => {
        impl MapWriter for KernelMaps {
            $(fn $name(&mut self $(, $arg: $ty)*) -> Result<(), WriteError> {
                KernelMaps::$name(self $(, $arg)*)
            })*
            fn view(&self) -> Result<MapView> {
                KernelMaps::view(self)
            }
        }
    };
}

delegate! {
    set_config(&mut self, config: &DataplaneConfig);
    put_vip(&mut self, ip: IpAddr, value: VipValue);
    remove_vip(&mut self, ip: IpAddr);
    put_listener(&mut self, key: EndpointKey, value: ListenerValue);
    remove_listener(&mut self, key: &EndpointKey);
    allow_source(&mut self, listener_id: u32, prefix: SourcePrefix);
    disallow_source(&mut self, listener_id: u32, prefix: SourcePrefix);
    put_target(&mut self, target_id: u32, value: &TargetValue);
    put_reverse(&mut self, key: EndpointKey, value: ReverseValue);
    remove_reverse(&mut self, key: &EndpointKey);
    add_interface(&mut self, ifindex: u32, value: IfaceValue);
    remove_interface(&mut self, ifindex: u32);
    publish_table(&mut self, group_id: u32, flags: u32, table: &[u32]);
    remove_table(&mut self, group_id: u32);
    put_addr_bucket(&mut self, bucket: u32, value: AddrBucket);
}

/// A map handle as the `Map` variant its kernel type calls for.
pub(crate) fn typed_map(data: MapData) -> Result<Map> {
    let map_type = data
        .info()
        .and_then(|i| i.map_type())
        .context("reading the map's type")?;
    Ok(match map_type {
        MapType::Array => Map::Array(data),
        MapType::Hash => Map::HashMap(data),
        MapType::LruHash => Map::LruHashMap(data),
        MapType::LpmTrie => Map::LpmTrie(data),
        MapType::PerCpuArray => Map::PerCpuArray(data),
        MapType::DevMapHash => Map::DevMapHash(data),
        MapType::ProgramArray => Map::ProgramArray(data),
        MapType::RingBuf => Map::RingBuf(data),
        other => bail!("unexpected map type {other:?}"),
    })
}

/// Maps target indices of a built table to target ids (`NO_TARGET` never appears in a full
/// table; an empty table stays empty).
pub fn table_of_ids(indices: &[u32], ids: &[u32]) -> Vec<u32> {
    indices
        .iter()
        .map(|&i| ids.get(i as usize).copied().unwrap_or(NO_TARGET))
        .collect()
}
