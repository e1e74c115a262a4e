//! The route watcher's own handles on `LB_ROUTE_EPOCH` and the next-hop cache `LB_NEXT_HOPS`
//! (see [`crate::route_epoch`]).

use anyhow::{Context, Result};
use aya::maps::{Array, MapData, PerCpuArray, PerCpuValues};
use lb_common::NextHop;

/// `LB_ROUTE_EPOCH` and `LB_NEXT_HOPS`, on descriptors of their own (the watcher runs as a task
/// of its own while the agent keeps the maps).
pub struct RouteEpoch {
    epoch: Array<MapData, u32>,
    next_hops: PerCpuArray<MapData, NextHop>,
}

impl RouteEpoch {
    pub(crate) fn from_maps(epoch: MapData, next_hops: MapData) -> Result<Self> {
        Ok(Self {
            epoch: super::typed_map(epoch)?
                .try_into()
                .context("LB_ROUTE_EPOCH layout")?,
            next_hops: super::typed_map(next_hops)?
                .try_into()
                .context("LB_NEXT_HOPS layout")?,
        })
    }

    /// `LB_ROUTE_EPOCH[0]`.
    pub fn get(&self) -> Result<u32> {
        self.epoch.get(&0, 0).context("reading LB_ROUTE_EPOCH")
    }

    /// Writes `LB_ROUTE_EPOCH[0]`.
    pub fn set(&mut self, epoch: u32) -> Result<()> {
        self.epoch
            .set(0, epoch, 0)
            .with_context(|| format!("writing {epoch} to LB_ROUTE_EPOCH"))
    }

    /// Zeroes every slot of `LB_NEXT_HOPS` on every CPU: no answer stored before is valid
    /// under any epoch afterwards. One syscall per slot (4096); only done while the epoch is
    /// `ROUTE_EPOCH_OFF` (the data path stores nothing then).
    pub fn clear_next_hops(&mut self) -> Result<()> {
        for slot in 0..self.next_hops.len() {
            self.put_next_hop(slot, NextHop::default())?;
        }
        Ok(())
    }

    /// Every CPU's entry of slot `slot` of `LB_NEXT_HOPS`, for tests.
    pub fn next_hop(&self, slot: u32) -> Result<Vec<NextHop>> {
        let values = self
            .next_hops
            .get(&slot, 0)
            .with_context(|| format!("reading LB_NEXT_HOPS[{slot}]"))?;
        Ok(values.iter().copied().collect())
    }

    /// Writes `hop` into slot `slot` of `LB_NEXT_HOPS` on every CPU, for tests.
    pub fn put_next_hop(&mut self, slot: u32, hop: NextHop) -> Result<()> {
        let cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| anyhow::Error::new(e).context(what))
            .context("counting the possible CPUs")?;
        let values =
            PerCpuValues::try_from(vec![hop; cpus]).context("per-CPU values for LB_NEXT_HOPS")?;
        self.next_hops
            .set(slot, values, 0)
            .with_context(|| format!("writing LB_NEXT_HOPS[{slot}]"))
    }
}
