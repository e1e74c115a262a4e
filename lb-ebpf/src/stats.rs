//! Per-CPU counters: events by `lb_common::counter` index, traffic by listener.

use crate::maps::{LB_COUNTERS, LB_STATS};

#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = LB_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU value of this CPU; XDP runs with preemption off.
        unsafe { *c += 1 };
    }
}

pub enum Direction {
    In,
    Out,
}

#[inline(always)]
pub fn traffic(listener_id: u32, dir: Direction, bytes: u64, new_flow: bool) {
    if let Some(s) = LB_STATS.get_ptr_mut(listener_id) {
        // SAFETY: as in `count`.
        let s = unsafe { &mut *s };
        match dir {
            Direction::In => {
                s.in_packets += 1;
                s.in_bytes += bytes;
            }
            Direction::Out => {
                s.out_packets += 1;
                s.out_bytes += bytes;
            }
        }
        if new_flow {
            s.new_flows += 1;
        }
    }
}
