//! A fake that fails on purpose: the chosen write operations (counted from 0 over every write
//! made through it) fail, with or without having been carried out.

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{anyhow, Result};
use lb_common::{
    AddrBucket, DataplaneConfig, EndpointKey, IfaceValue, ListenerValue, ReverseValue, TargetValue,
    VipValue,
};

use super::{FakeMaps, MapView, MapWriter, SourcePrefix, WriteError};

/// How a write fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Not carried out; an I/O error.
    Fail,
    /// Not carried out; the map is full.
    Full,
    /// Carried out, then reported as failed (the caller cannot tell it happened).
    FailAfter,
}

#[derive(Debug, Default)]
pub struct FaultyMaps {
    pub inner: FakeMaps,
    /// Operation number → its fault.
    pub faults: BTreeMap<u64, Fault>,
    /// Writes attempted so far.
    pub attempts: u64,
}

impl FaultyMaps {
    pub fn new(inner: FakeMaps) -> Self {
        Self {
            inner,
            ..Default::default()
        }
    }

    /// Makes the write `n` operations from now fail with `fault`.
    pub fn fail_in(&mut self, n: u64, fault: Fault) {
        self.faults.insert(self.attempts + n, fault);
    }

    fn run(
        &mut self,
        what: &str,
        op: impl FnOnce(&mut FakeMaps) -> Result<(), WriteError>,
    ) -> Result<(), WriteError> {
        let n = self.attempts;
        self.attempts += 1;
        match self.faults.remove(&n) {
            None => op(&mut self.inner),
            Some(Fault::Fail) => Err(anyhow!("{what}: injected failure (operation {n})").into()),
            Some(Fault::Full) => Err(WriteError::Full(format!(
                "{what}: injected E2BIG (operation {n})"
            ))),
            Some(Fault::FailAfter) => {
                let _ = op(&mut self.inner);
                Err(anyhow!("{what}: injected failure after the write (operation {n})").into())
            }
        }
    }
}

impl MapWriter for FaultyMaps {
    fn set_config(&mut self, c: &DataplaneConfig) -> Result<(), WriteError> {
        self.run("config", |m| m.set_config(c))
    }
    fn put_vip(&mut self, ip: IpAddr, v: VipValue) -> Result<(), WriteError> {
        self.run("put_vip", |m| m.put_vip(ip, v))
    }
    fn remove_vip(&mut self, ip: IpAddr) -> Result<(), WriteError> {
        self.run("remove_vip", |m| m.remove_vip(ip))
    }
    fn put_listener(&mut self, k: EndpointKey, v: ListenerValue) -> Result<(), WriteError> {
        self.run("put_listener", |m| m.put_listener(k, v))
    }
    fn remove_listener(&mut self, k: &EndpointKey) -> Result<(), WriteError> {
        self.run("remove_listener", |m| m.remove_listener(k))
    }
    fn allow_source(&mut self, id: u32, p: SourcePrefix) -> Result<(), WriteError> {
        self.run("allow_source", |m| m.allow_source(id, p))
    }
    fn disallow_source(&mut self, id: u32, p: SourcePrefix) -> Result<(), WriteError> {
        self.run("disallow_source", |m| m.disallow_source(id, p))
    }
    fn put_target(&mut self, id: u32, v: &TargetValue) -> Result<(), WriteError> {
        self.run("put_target", |m| m.put_target(id, v))
    }
    fn put_reverse(&mut self, k: EndpointKey, v: ReverseValue) -> Result<(), WriteError> {
        self.run("put_reverse", |m| m.put_reverse(k, v))
    }
    fn remove_reverse(&mut self, k: &EndpointKey) -> Result<(), WriteError> {
        self.run("remove_reverse", |m| m.remove_reverse(k))
    }
    fn add_interface(&mut self, i: u32, v: IfaceValue) -> Result<(), WriteError> {
        self.run("add_interface", |m| m.add_interface(i, v))
    }
    fn remove_interface(&mut self, i: u32) -> Result<(), WriteError> {
        self.run("remove_interface", |m| m.remove_interface(i))
    }
    fn publish_table(&mut self, gid: u32, flags: u32, t: &[u32]) -> Result<(), WriteError> {
        self.run("publish_table", |m| m.publish_table(gid, flags, t))
    }
    fn remove_table(&mut self, gid: u32) -> Result<(), WriteError> {
        self.run("remove_table", |m| m.remove_table(gid))
    }
    fn put_addr_bucket(&mut self, b: u32, v: AddrBucket) -> Result<(), WriteError> {
        self.run("put_addr_bucket", |m| m.put_addr_bucket(b, v))
    }
    fn view(&self) -> Result<MapView> {
        self.inner.view()
    }
}
