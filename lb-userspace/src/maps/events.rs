//! The access log's own handle on `LB_FLOW_EVENTS`, the ring buffer the XDP program sends
//! access-logged flows' starts and ends to.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use lb_common::FlowEvent;

pub struct FlowEvents {
    ring: RingBuf<MapData>,
}

impl FlowEvents {
    pub(crate) fn from_map(ring: MapData) -> Result<Self> {
        Ok(Self {
            ring: super::typed_map(ring)?
                .try_into()
                .context("LB_FLOW_EVENTS layout")?,
        })
    }

    /// The next record, if one is waiting (records of another size are skipped).
    pub fn next_event(&mut self) -> Option<FlowEvent> {
        loop {
            let item = self.ring.next()?;
            if item.len() == size_of::<FlowEvent>() {
                // SAFETY: FlowEvent is plain old data of exactly this size; read unaligned
                // since the ring's records are only 8-byte aligned by contract.
                return Some(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
            }
        }
    }
}

impl AsRawFd for FlowEvents {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

impl AsFd for FlowEvents {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor lives as long as the ring buffer, which `self` owns.
        unsafe { BorrowedFd::borrow_raw(self.ring.as_raw_fd()) }
    }
}
