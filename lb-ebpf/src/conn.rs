//! What a flow's packets say beyond where they go: the TCP handshake and close as both sides
//! sent them (flags in the flow entry), what that says of the target (`LB_TARGET_STATS`,
//! `LB_TARGET_FAILS`: the passive health signals), and for an access-logged flow its packets
//! and bytes each way and its start and end (`LB_FLOW_EVENTS`).
//!
//! Nothing here runs per packet unless the flow is access-logged: a flow that is not pays a
//! flag test on its packets, and this code only on packets with SYN, FIN or RST.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::bpf_ktime_get_coarse_ns,
};
use lb_common::{
    counter, FlowEvent, FlowKey, FlowValue, FLOW_END_FIN, FLOW_END_RST, FLOW_END_TARGET_REMOVED,
    FLOW_END_TARGET_UNHEALTHY, FLOW_EVENT_END, FLOW_EVENT_START, FLOW_F_ANSWERED, FLOW_F_CLOSING,
    FLOW_F_FIN_IN, FLOW_F_FIN_OUT, FLOW_F_LOG, FLOW_F_LOGGED, FLOW_F_RST, FLOW_F_SYN_RETRIED,
};

use crate::{
    maps::{LB_FLOWS, LB_FLOW_EVENTS, LB_TARGETS, LB_TARGET_FAILS, LB_TARGET_STATS},
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats::count,
};

/// Unread bytes of `LB_FLOW_EVENTS` past which a record wakes the agent.
const WAKE_AT: u64 = lb_common::maps::FLOW_EVENTS_BYTES as u64 / 4;

/// A `TargetStats` field.
#[derive(Clone, Copy)]
pub enum Signal {
    NewFlow,
    Answered,
    Reset,
    SynUnanswered,
    Refused,
}

/// Counts `signal` for target `target_id` (this CPU's value).
#[inline(always)]
pub fn signal(target_id: u32, signal: Signal) {
    if let Some(s) = LB_TARGET_STATS.get_ptr_mut(target_id) {
        // SAFETY: this CPU's value; XDP runs with preemption off.
        let s = unsafe { &mut *s };
        match signal {
            Signal::NewFlow => s.new_flows += 1,
            Signal::Answered => s.answered += 1,
            Signal::Reset => s.resets += 1,
            Signal::SynUnanswered => s.syns_unanswered += 1,
            Signal::Refused => s.refused += 1,
        }
    }
}

/// One more connection of the target failed in a row.
#[inline(always)]
fn failed(target_id: u32) {
    if let Some(p) = LB_TARGET_FAILS.get_ptr_mut(target_id) {
        // SAFETY: a live map value shared by every CPU. Not an atomic add (the BPF target has
        // none in core): two CPUs failing at the same instant may count one failure, which
        // only delays an ejection by a connection; the order of failures and answers, which
        // is what "in a row" means, is kept.
        unsafe { *p += 1 };
    }
}

/// A connection of the target was answered: the failures in a row start again from 0.
#[inline(always)]
fn answered(target_id: u32) {
    if let Some(p) = LB_TARGET_FAILS.get_ptr_mut(target_id) {
        // SAFETY: as in `failed`; written only when not already 0, so that answered
        // connections do not all write the same cache line.
        unsafe {
            if *p != 0 {
                *p = 0;
            }
        }
    }
}

/// Sends a record of `kind` (`reason` for an end) about flow `key`, with its entry `value`
/// and `flags` as its flags; false when the ring buffer had no room for it (counted as lost).
#[inline(always)]
pub fn event(kind: u32, reason: u32, key: &FlowKey, value: &FlowValue, flags: u32) -> bool {
    match LB_FLOW_EVENTS.reserve::<FlowEvent>(0) {
        Some(mut record) => {
            let p = record.as_mut_ptr();
            // SAFETY: `p` is the reserved record, written field by field before it is
            // submitted; the helper takes no arguments.
            unsafe {
                (*p).kind = kind;
                (*p).reason = reason;
                (*p).time_ns = bpf_ktime_get_coarse_ns();
                (*p).key = *key;
                (*p).value = *value;
                (*p).value.flags = flags;
            }
            // No wakeup per record: the agent reads the ring every 100 ms (a wakeup per
            // record, when the reader has caught up, costs an irq_work of several µs). Only a
            // ring a quarter full wakes it at once.
            let wake = if LB_FLOW_EVENTS.query(BPF_RB_AVAIL_DATA as u64) > WAKE_AT {
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            };
            record.submit(wake as u64);
            true
        }
        None => {
            count(counter::FLOW_EVENTS_LOST);
            false
        }
    }
}

/// The flags a new entry starts with: what this first packet said, and for a flow first seen
/// after its handshake (moved here by ECMP, evicted, or older than a restart) that it was
/// answered.
#[inline(always)]
pub fn first_flags(tcp_flags: u8, log: bool) -> u32 {
    let mut f = if log { FLOW_F_LOG } else { 0 };
    if tcp_flags & TCP_SYN == 0 {
        f |= FLOW_F_ANSWERED;
    }
    if tcp_flags & TCP_FIN != 0 {
        f |= FLOW_F_CLOSING | FLOW_F_FIN_IN;
    }
    if tcp_flags & TCP_RST != 0 {
        f |= FLOW_F_CLOSING | FLOW_F_RST;
    }
    f
}

/// A new access-logged entry was recorded.
#[inline(always)]
pub fn started(key: &FlowKey, entry: &FlowValue) {
    event(FLOW_EVENT_START, 0, key, entry, entry.flags);
}

/// With `f` the flow's flags after a packet with `tcp_flags`: when that packet ended the flow
/// (an RST, or the first packet without FIN once both sides sent theirs), sends its end; the
/// flags to keep. An end the ring buffer had no room for is not marked logged: the sweep
/// logs it when it removes the entry.
#[inline(always)]
fn ended(entry: &FlowValue, key: &FlowKey, f: u32, tcp_flags: u8) -> u32 {
    if f & FLOW_F_LOGGED != 0 {
        return f;
    }
    let both_fins = FLOW_F_FIN_IN | FLOW_F_FIN_OUT;
    let reason = if tcp_flags & TCP_RST != 0 {
        FLOW_END_RST
    } else if f & both_fins == both_fins && tcp_flags & TCP_FIN == 0 {
        FLOW_END_FIN
    } else {
        return f;
    };
    if event(FLOW_EVENT_END, reason, key, entry, f | FLOW_F_LOGGED) {
        f | FLOW_F_LOGGED
    } else {
        f
    }
}

/// A client's packet of a flow whose entry holds (its target still forwarding): only called
/// for an access-logged flow, or a packet with SYN, FIN or RST. `len`: the frame's bytes.
#[inline(always)]
pub fn from_client(entry: &mut FlowValue, key: &FlowKey, tcp_flags: u8, len: u64) {
    let mut f = entry.flags;
    if tcp_flags & TCP_FIN != 0 {
        f |= FLOW_F_CLOSING | FLOW_F_FIN_IN;
    }
    if tcp_flags & TCP_RST != 0 {
        f |= FLOW_F_CLOSING | FLOW_F_RST;
    }
    // The SYN again, before the target answered: the client's retransmission timer (1 s on
    // Linux) ran out. Counted once per connection.
    if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && f & (FLOW_F_ANSWERED | FLOW_F_SYN_RETRIED | FLOW_F_CLOSING) == 0
    {
        f |= FLOW_F_SYN_RETRIED;
        signal(entry.target_id, Signal::SynUnanswered);
        failed(entry.target_id);
    }
    if f & FLOW_F_LOG != 0 {
        entry.packets_in += 1;
        entry.bytes_in += len;
    }
    settle(entry, key, f, tcp_flags);
}

/// A target's reply of the flow `key` (client → VIP): only called for an access-logged
/// listener's reply, or a reply with SYN, FIN or RST. `len`: the frame's bytes.
#[inline(always)]
pub fn from_target(key: &FlowKey, tcp_flags: u8, len: u64) {
    let Some(entry) = LB_FLOWS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a live map value; concurrent updates of its fields are benign.
    let entry = unsafe { &mut *entry };
    let mut f = entry.flags;
    if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK && f & FLOW_F_ANSWERED == 0 {
        f |= FLOW_F_ANSWERED;
        signal(entry.target_id, Signal::Answered);
        answered(entry.target_id);
    }
    if tcp_flags & TCP_FIN != 0 {
        f |= FLOW_F_CLOSING | FLOW_F_FIN_OUT;
    }
    if tcp_flags & TCP_RST != 0 {
        if f & FLOW_F_RST == 0 {
            signal(entry.target_id, Signal::Reset);
            if f & FLOW_F_ANSWERED == 0 {
                // Refused: nothing listens (or a firewall rejects) on the target's port.
                signal(entry.target_id, Signal::Refused);
                failed(entry.target_id);
            }
        }
        f |= FLOW_F_CLOSING | FLOW_F_RST;
    }
    if f & FLOW_F_LOG != 0 {
        entry.packets_out += 1;
        entry.bytes_out += len;
    }
    settle(entry, key, f, tcp_flags);
}

/// Keeps the flow's flags `f` after a packet with `tcp_flags` (written only when they
/// changed), having sent its end when the packet ended an access-logged flow.
#[inline(always)]
fn settle(entry: &mut FlowValue, key: &FlowKey, mut f: u32, tcp_flags: u8) {
    if f & FLOW_F_LOG != 0 {
        f = ended(entry, key, f, tcp_flags);
    }
    if f != entry.flags {
        entry.flags = f;
    }
}

/// The entry of an access-logged flow is about to be replaced or dropped by (its target was
/// removed or stopped forwarding, or a new connection reuses its closed tuple): its end, once.
#[inline(always)]
pub fn replaced(entry: &mut FlowValue, key: &FlowKey) {
    let f = entry.flags;
    if f & (FLOW_F_LOG | FLOW_F_LOGGED) != FLOW_F_LOG {
        return;
    }
    let reason = if f & FLOW_F_RST != 0 {
        FLOW_END_RST
    } else if f & FLOW_F_CLOSING != 0 {
        FLOW_END_FIN
    } else {
        // A live target's value names its address; a removed one's (a tombstone) does not.
        match LB_TARGETS.get(entry.target_id) {
            Some(t) if t.cookie == entry.target_cookie && t.family != 0 => {
                FLOW_END_TARGET_UNHEALTHY
            }
            _ => FLOW_END_TARGET_REMOVED,
        }
    };
    if event(FLOW_EVENT_END, reason, key, entry, f | FLOW_F_LOGGED) {
        entry.flags = f | FLOW_F_LOGGED;
    }
}
