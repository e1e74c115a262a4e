//! The sweep's own handles on the flow table and the reply-flow table.

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData, MapError};
use lb_common::{FlowKey, FlowValue, ReverseValue};

/// The flow table and the reply-flow table, on descriptors of their own (the sweep runs on a
/// blocking thread while the agent keeps the maps).
pub struct FlowTable {
    flows: HashMap<MapData, FlowKey, FlowValue>,
    replies: HashMap<MapData, FlowKey, ReverseValue>,
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

    /// Every flow entry (entries evicted while the table is read are skipped).
    pub fn flows(&self) -> Vec<(FlowKey, FlowValue)> {
        let keys: Vec<FlowKey> = self.flows.keys().filter_map(Result::ok).collect();
        keys.into_iter()
            .filter_map(|k| Some((k, self.flows.get(&k, 0).ok()?)))
            .collect()
    }

    /// Removes a flow entry; false when it was gone already.
    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<bool> {
        match self.flows.remove(key) {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e).context("removing from LB_FLOWS"),
        }
    }

    /// Removes a reply-flow entry if there is one.
    pub fn remove_reply(&mut self, key: &FlowKey) -> Result<()> {
        match self.replies.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("removing from LB_REPLY_FLOWS"),
        }
    }
}
