//! The passive health signals' own handles on `LB_TARGET_STATS` and `LB_TARGET_FAILS`: what
//! the traffic says of each target (see `lb-ebpf/src/conn.rs`).

use anyhow::{Context, Result};
use aya::maps::{Array, MapData, PerCpuArray, PerCpuValues};
use aya::util::nr_cpus;
use lb_common::TargetStats;

/// A target's signals: its counters summed over CPUs, and its failed connections in a row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Signals {
    pub stats: TargetStats,
    pub failures_in_a_row: u64,
}

pub struct TargetSignals {
    stats: PerCpuArray<MapData, TargetStats>,
    fails: Array<MapData, u64>,
}

impl TargetSignals {
    pub(crate) fn from_maps(stats: MapData, fails: MapData) -> Result<Self> {
        Ok(Self {
            stats: super::typed_map(stats)?
                .try_into()
                .context("LB_TARGET_STATS layout")?,
            fails: super::typed_map(fails)?
                .try_into()
                .context("LB_TARGET_FAILS layout")?,
        })
    }

    /// Target `id`'s signals.
    pub fn get(&self, id: u32) -> Result<Signals> {
        let per_cpu = self
            .stats
            .get(&id, 0)
            .with_context(|| format!("reading LB_TARGET_STATS[{id}]"))?;
        let stats = per_cpu.iter().fold(TargetStats::default(), |mut a, s| {
            a.new_flows += s.new_flows;
            a.answered += s.answered;
            a.resets += s.resets;
            a.syns_unanswered += s.syns_unanswered;
            a.refused += s.refused;
            a
        });
        let failures_in_a_row = self
            .fails
            .get(&id, 0)
            .with_context(|| format!("reading LB_TARGET_FAILS[{id}]"))?;
        Ok(Signals {
            stats,
            failures_in_a_row,
        })
    }

    /// Target `id`'s failed connections in a row (one syscall: the ejection poll's read).
    pub fn failures_in_a_row(&self, id: u32) -> Result<u64> {
        self.fails
            .get(&id, 0)
            .with_context(|| format!("reading LB_TARGET_FAILS[{id}]"))
    }

    /// Zeroes target `id`'s counters (a new target took the id) on every CPU.
    pub fn reset(&mut self, id: u32) -> Result<()> {
        let cpus = nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
        let zeros = PerCpuValues::try_from(vec![TargetStats::default(); cpus])
            .context("building per-CPU zeros")?;
        self.stats
            .set(id, zeros, 0)
            .with_context(|| format!("zeroing LB_TARGET_STATS[{id}]"))?;
        self.clear_failures(id)
    }

    /// Starts target `id`'s failures in a row from 0 (it was ejected, or came back).
    pub fn clear_failures(&mut self, id: u32) -> Result<()> {
        self.fails
            .set(id, 0, 0)
            .with_context(|| format!("zeroing LB_TARGET_FAILS[{id}]"))
    }
}
