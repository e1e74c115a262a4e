//! The embedded XDP object: loading it (with map sizes from config) and attaching it.

use anyhow::{Context, Result};
use aya::{programs::Xdp, Ebpf, EbpfLoader};
use lb_common::maps::{
    DEFAULT_FLOW_TABLE_SIZE, DEFAULT_TABLE_SLOTS, MAP_FLOWS, MAP_REPLY_FLOWS, MAP_TABLES,
    PROGRAM_XDP, PROGRAM_XDP_PASS, TAIL_CALLS,
};

/// The object this binary was built with.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-xdp"));

/// A digest of the embedded object (FNV-1a, hex): pins made by another build are not adopted.
pub fn object_digest() -> String {
    let h = OBJECT.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!("{h:016x}")
}

/// Sizes of the maps that scale with the config.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// `agent.flow_table_size`: entries of the flow table (and of the reply-flow table).
    pub flow_table: u32,
    /// Slots of `LB_TABLES`: both halves of every group's consistent-hash table.
    pub table_slots: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            flow_table: DEFAULT_FLOW_TABLE_SIZE,
            table_slots: DEFAULT_TABLE_SLOTS,
        }
    }
}

/// Loads the object into the kernel: maps created with `sizes`, every program verified (the
/// entry point, the floor, and the rare paths `maps::KernelMaps` puts in `LB_PROGS`). On a
/// verifier rejection aya loads again with logging on and the error carries the log.
pub fn load(sizes: MapSizes) -> Result<Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(MAP_FLOWS, sizes.flow_table)
        .map_max_entries(MAP_REPLY_FLOWS, sizes.flow_table)
        .map_max_entries(MAP_TABLES, sizes.table_slots)
        .load(OBJECT)
        .context("loading the XDP object (maps and BTF)")?;
    let names = [PROGRAM_XDP, PROGRAM_XDP_PASS]
        .into_iter()
        .chain(TAIL_CALLS.iter().map(|&(_, name)| name));
    for name in names {
        if let Err(e) = program_mut(&mut ebpf, name)?.load() {
            // aya's error holds the whole verifier log; its end says why.
            let text = format!("{e:#}");
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(25)..].join("\n");
            anyhow::bail!("the kernel's verifier rejected program {name}; end of its log:\n{tail}");
        }
    }
    Ok(ebpf)
}

/// The XDP program `name` of a loaded object.
pub fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))?
        .try_into()
        .with_context(|| format!("program {name} is not XDP"))
}
