//! An in-memory map writer for tests.

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::Result;
use lb_common::{
    DataplaneConfig, EndpointKey, IfaceValue, ListenerValue, ReverseValue, TargetValue, VipValue,
};

use super::{MapWriter, SourcePrefix};

/// An in-memory map writer: the maps' contents and a log of every operation.
#[derive(Debug, Default)]
pub struct FakeMaps {
    pub ops: Vec<String>,
    pub targets: BTreeMap<u32, (u8, u32)>,
    pub tables: BTreeMap<u32, Vec<u32>>,
    pub listeners: usize,
    pub vips: usize,
}

impl MapWriter for FakeMaps {
    fn set_config(&mut self, _: &DataplaneConfig) -> Result<()> {
        self.ops.push("config".into());
        Ok(())
    }
    fn put_vip(&mut self, ip: IpAddr, _: VipValue) -> Result<()> {
        self.vips += 1;
        self.ops.push(format!("put_vip {ip}"));
        Ok(())
    }
    fn remove_vip(&mut self, ip: IpAddr) -> Result<()> {
        self.vips -= 1;
        self.ops.push(format!("remove_vip {ip}"));
        Ok(())
    }
    fn put_listener(&mut self, _: EndpointKey, v: ListenerValue) -> Result<()> {
        self.listeners += 1;
        self.ops.push(format!("put_listener {}", v.listener_id));
        Ok(())
    }
    fn remove_listener(&mut self, _: &EndpointKey) -> Result<()> {
        self.listeners -= 1;
        self.ops.push("remove_listener".into());
        Ok(())
    }
    fn allow_source(&mut self, id: u32, p: SourcePrefix) -> Result<()> {
        self.ops.push(format!("allow {id} {}/{}", p.addr, p.len));
        Ok(())
    }
    fn disallow_source(&mut self, id: u32, p: SourcePrefix) -> Result<()> {
        self.ops.push(format!("disallow {id} {}/{}", p.addr, p.len));
        Ok(())
    }
    fn put_target(&mut self, id: u32, v: &TargetValue) -> Result<()> {
        self.targets.insert(id, (v.state, v.cookie));
        self.ops.push(format!("put_target {id} state={}", v.state));
        Ok(())
    }
    fn put_reverse(&mut self, _: EndpointKey, _: ReverseValue) -> Result<()> {
        self.ops.push("put_reverse".into());
        Ok(())
    }
    fn remove_reverse(&mut self, _: &EndpointKey) -> Result<()> {
        self.ops.push("remove_reverse".into());
        Ok(())
    }
    fn add_interface(&mut self, i: u32, v: IfaceValue) -> Result<()> {
        self.ops.push(format!("add_interface {i} {:#x}", v.flags));
        Ok(())
    }
    fn remove_interface(&mut self, i: u32) -> Result<()> {
        self.ops.push(format!("remove_interface {i}"));
        Ok(())
    }
    fn publish_table(&mut self, gid: u32, _: u32, table: &[u32]) -> Result<()> {
        self.tables.insert(gid, table.to_vec());
        self.ops.push(format!("publish {gid}"));
        Ok(())
    }
}

impl FakeMaps {
    /// How many slots of group `gid`'s table each target id has.
    pub fn slots(&self, gid: u32) -> BTreeMap<u32, usize> {
        let mut out = BTreeMap::new();
        for &id in self.tables.get(&gid).map(Vec::as_slice).unwrap_or_default() {
            *out.entry(id).or_default() += 1;
        }
        out
    }
}
