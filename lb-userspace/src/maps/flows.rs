//! The sweep's own handles on the flow table and the reply-flow table.

use std::collections::HashSet;

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData};
use lb_common::{FlowKey, FlowValue, ReverseValue};

use super::batch::{self, BatchCursor};

/// Flow entries read per `BPF_MAP_LOOKUP_BATCH` call (64 bytes each: 512 KiB of buffer).
pub const FLOW_CHUNK: usize = 8192;

/// The flow table and the reply-flow table, on descriptors of their own (the sweep runs on a
/// blocking thread while the agent keeps the maps).
pub struct FlowTable {
    flows: HashMap<MapData, FlowKey, FlowValue>,
    replies: HashMap<MapData, FlowKey, ReverseValue>,
}

/// Reads the flow table a chunk at a time (`FlowTable::cursor`).
pub struct FlowCursor(BatchCursor<FlowKey, FlowValue>);

impl FlowCursor {
    /// The next entries of the flow table, or `None` at the end. Entries handed out may be
    /// removed before the next call without disturbing the walk.
    pub fn next<'a>(
        &'a mut self,
        table: &FlowTable,
    ) -> Result<Option<(&'a [FlowKey], &'a [FlowValue])>> {
        self.0.next(&table.flows).context("reading LB_FLOWS")
    }
}

impl FlowTable {
    pub(crate) fn from_maps(flows: MapData, replies: MapData) -> Result<Self> {
        Ok(Self {
            flows: super::typed_map(flows)?
                .try_into()
                .context("LB_FLOWS layout")?,
            replies: super::typed_map(replies)?
                .try_into()
                .context("LB_REPLY_FLOWS layout")?,
        })
    }

    /// A walk over the flow table, `chunk` entries per syscall.
    pub fn cursor(&self, chunk: usize) -> FlowCursor {
        FlowCursor(BatchCursor::new(chunk))
    }

    /// Every flow entry (entries evicted while the table is read may be missing).
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>> {
        batch::lookup_all(&self.flows, FLOW_CHUNK).context("reading LB_FLOWS")
    }

    /// Every reply-flow entry.
    pub fn replies(&self) -> Result<Vec<(FlowKey, ReverseValue)>> {
        batch::lookup_all(&self.replies, FLOW_CHUNK).context("reading LB_REPLY_FLOWS")
    }

    /// The (address, port, protocol) of every target endpoint that has reply-flow entries
    /// (one walk of the reply-flow table, `FLOW_CHUNK` entries per call).
    pub fn reply_endpoints(&self) -> Result<HashSet<([u32; 4], u16, u8)>> {
        let mut cursor = BatchCursor::<FlowKey, ReverseValue>::new(FLOW_CHUNK);
        let mut out = HashSet::new();
        while let Some((keys, _)) = cursor
            .next(&self.replies)
            .context("reading LB_REPLY_FLOWS")?
        {
            out.extend(keys.iter().map(|k| (k.src_addr, k.src_port_be, k.protocol)));
        }
        Ok(out)
    }

    /// Writes flow entries (`BPF_MAP_UPDATE_BATCH`), for tests and benchmarks.
    pub fn insert_flows(&mut self, keys: &[FlowKey], values: &[FlowValue]) -> Result<()> {
        batch::update_batch(&mut self.flows, keys, values).context("writing LB_FLOWS")
    }

    /// Writes reply-flow entries (`BPF_MAP_UPDATE_BATCH`), for tests and benchmarks.
    pub fn insert_replies(&mut self, keys: &[FlowKey], values: &[ReverseValue]) -> Result<()> {
        batch::update_batch(&mut self.replies, keys, values).context("writing LB_REPLY_FLOWS")
    }

    /// Removes flow entries; how many were there (keys gone already are skipped).
    pub fn remove_flows(&mut self, keys: &[FlowKey]) -> Result<usize> {
        batch::delete_batch(&mut self.flows, keys).context("removing from LB_FLOWS")
    }

    /// Removes the reply-flow entries there are of `keys`; how many were there.
    pub fn remove_replies(&mut self, keys: &[FlowKey]) -> Result<usize> {
        batch::delete_batch(&mut self.replies, keys).context("removing from LB_REPLY_FLOWS")
    }
}
