//! The one owner of the data plane's maps: everything that reads or writes them through aya is
//! here. The reconciler writes through `MapWriter`, implemented by the kernel's maps
//! (`KernelMaps`) and, for tests, by an in-memory copy (`FakeMaps`); the idle-flow sweep uses
//! its own handles on the flow tables (`FlowTable`). `batch` does many entries per syscall,
//! which aya lacks.

use std::net::IpAddr;

use anyhow::{bail, Context, Result};
use aya::maps::{Map, MapData, MapType};
use lb_common::{
    DataplaneConfig, EndpointKey, IfaceValue, ListenerValue, ReverseValue, TargetValue, VipValue,
    NO_TARGET,
};

pub mod batch;
mod fake;
mod flows;
mod kernel;

pub use fake::FakeMaps;
pub use flows::{FlowCursor, FlowTable, FLOW_CHUNK};
pub use kernel::{KernelMaps, TableLayout};

/// An `allowed_sources` prefix of one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourcePrefix {
    pub addr: IpAddr,
    pub len: u8,
}

/// The map operations the reconciler needs; `KernelMaps` writes the kernel's maps, `FakeMaps`
/// records them for tests.
pub trait MapWriter {
    fn set_config(&mut self, config: &DataplaneConfig) -> Result<()>;
    fn put_vip(&mut self, ip: IpAddr, value: VipValue) -> Result<()>;
    fn remove_vip(&mut self, ip: IpAddr) -> Result<()>;
    fn put_listener(&mut self, key: EndpointKey, value: ListenerValue) -> Result<()>;
    fn remove_listener(&mut self, key: &EndpointKey) -> Result<()>;
    fn allow_source(&mut self, listener_id: u32, prefix: SourcePrefix) -> Result<()>;
    fn disallow_source(&mut self, listener_id: u32, prefix: SourcePrefix) -> Result<()>;
    fn put_target(&mut self, target_id: u32, value: &TargetValue) -> Result<()>;
    fn put_reverse(&mut self, key: EndpointKey, value: ReverseValue) -> Result<()>;
    fn remove_reverse(&mut self, key: &EndpointKey) -> Result<()>;
    fn add_interface(&mut self, ifindex: u32, value: IfaceValue) -> Result<()>;
    fn remove_interface(&mut self, ifindex: u32) -> Result<()>;
    fn publish_table(&mut self, group_id: u32, flags: u32, table: &[u32]) -> Result<()>;
}

macro_rules! delegate {
    ($($name:ident(&mut self $(, $arg:ident: $ty:ty)*);)*) => {
        impl MapWriter for KernelMaps {
            $(fn $name(&mut self $(, $arg: $ty)*) -> Result<()> {
                KernelMaps::$name(self $(, $arg)*)
            })*
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
