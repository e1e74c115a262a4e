//! Flow tracking and scheduling: which target a packet of a listener's flow goes to.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{
    counter, hash, DataplaneConfig, FlowKey, FlowValue, ListenerValue, ReverseValue, TargetValue,
    FLOW_F_CLOSING, FLOW_F_LOG, FLOW_TICK_SHIFT, GROUP_F_STICKY_SOURCE, LISTENER_F_ACCESS_LOG,
    NO_TARGET, REVERSE_F_ACCESS_LOG, TARGET_DROP, TARGET_FORWARD, TARGET_F_SHARED_ENDPOINT,
};

use crate::{
    conn, events,
    maps::{LB_FLOOD, LB_FLOWS, LB_GROUPS, LB_REPLY_FLOWS, LB_TABLES, LB_TARGETS},
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats::count,
};

/// Where a listener's packet goes.
pub struct Decision {
    pub target_id: u32,
    pub target: TargetValue,
    pub new_flow: bool,
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
fn ticks(ns: u64) -> u32 {
    (ns >> FLOW_TICK_SHIFT) as u32
}

/// The flow's recorded target, when the entry still holds: `Ok(Some)` forward to it,
/// `Ok(None)` schedule afresh (no entry, target removed or rescheduled, id reused, a new SYN on
/// a closed tuple), `Err` drop.
#[inline(always)]
fn recorded(entry: &FlowValue, tcp_flags: u8) -> Result<Option<&'static TargetValue>, u32> {
    let fresh_syn = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let Some(target) = LB_TARGETS.get(entry.target_id) else {
        return Ok(None);
    };
    if target.cookie != entry.target_cookie || (fresh_syn && entry.flags & FLOW_F_CLOSING != 0) {
        return Ok(None);
    }
    match target.state {
        TARGET_FORWARD => Ok(Some(target)),
        TARGET_DROP => Err(counter::DROP_TARGET_TERMINATED),
        _ => Ok(None),
    }
}

/// The target of a listener's packet: the flow's recorded target while it is eligible,
/// otherwise one chosen by the group's consistent-hash table (recorded for the next packets,
/// within the per-CPU insert budget).
///
/// A packet with no flow entry is scheduled like a SYN whatever its flags: an entry lost to
/// LRU eviction, a restart or another balancer node must land on the same target again.
#[inline(always)]
pub fn decide(
    key: &FlowKey,
    listener: &ListenerValue,
    tcp_flags: u8,
    config: &DataplaneConfig,
    len: u64,
) -> Result<Decision, u32> {
    let now = now_ns();
    if let Some(entry) = LB_FLOWS.get_ptr_mut(key) {
        // SAFETY: a live map value; concurrent updates of these u32 fields are benign.
        let entry = unsafe { &mut *entry };
        match recorded(entry, tcp_flags) {
            Ok(Some(target)) => {
                if entry.last_seen_ticks != ticks(now) {
                    entry.last_seen_ticks = ticks(now);
                }
                if tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 || entry.flags & FLOW_F_LOG != 0 {
                    conn::from_client(entry, key, tcp_flags, len);
                }
                if target.flags & TARGET_F_SHARED_ENDPOINT != 0 {
                    // Its reply-flow entry may have been evicted: replies need it.
                    record_reply(key, target, listener, false, now, config);
                }
                return Ok(Decision {
                    target_id: entry.target_id,
                    target: *target,
                    new_flow: false,
                });
            }
            // Removed, rescheduled, or a new connection on a closed tuple: schedule afresh.
            Ok(None) => conn::replaced(entry, key),
            Err(drop) => {
                conn::replaced(entry, key);
                return Err(drop);
            }
        }
        count(counter::FLOWS_RESCHEDULED);
    }
    let (target_id, target) = schedule(key, listener, config)?;
    conn::signal(target_id, conn::Signal::NewFlow);
    if insert_allowed(now, config.flow_insert_limit) {
        let log = listener.flags & LISTENER_F_ACCESS_LOG != 0;
        let entry = FlowValue {
            target_id,
            target_cookie: target.cookie,
            listener_id: listener.listener_id,
            last_seen_ticks: ticks(now),
            flags: conn::first_flags(tcp_flags, log),
            _pad: 0,
            start_ns: now,
            packets_in: log as u64,
            bytes_in: if log { len } else { 0 },
            packets_out: 0,
            bytes_out: 0,
        };
        match LB_FLOWS.insert(key, &entry, 0) {
            Ok(()) if log => conn::started(key, &entry),
            Ok(()) => {}
            Err(e) => events::insert_failed(events::Table::Flows, e),
        }
    } else {
        count(counter::FLOW_INSERT_SKIPPED);
    }
    if target.flags & TARGET_F_SHARED_ENDPOINT != 0 {
        record_reply(key, &target, listener, true, now, config);
    }
    Ok(Decision {
        target_id,
        target,
        new_flow: true,
    })
}

/// The target a packet of the flow `key` would go to, without touching the flow table: for
/// ICMP errors about a flow, found the way the flow's own packets are. `None`: no target.
#[inline(always)]
pub fn lookup(
    key: &FlowKey,
    listener: &ListenerValue,
    config: &DataplaneConfig,
) -> Option<TargetValue> {
    // SAFETY: read-only lookup of a live value.
    if let Some(entry) = unsafe { LB_FLOWS.get(key) } {
        match recorded(entry, TCP_ACK) {
            Ok(Some(target)) => return Some(*target),
            Ok(None) => {}
            Err(_) => return None,
        }
    }
    schedule(key, listener, config).ok().map(|(_, t)| t)
}

/// The target the group's consistent-hash table gives the flow.
#[inline(always)]
fn schedule(
    key: &FlowKey,
    listener: &ListenerValue,
    config: &DataplaneConfig,
) -> Result<(u32, TargetValue), u32> {
    let group = LB_GROUPS
        .get(listener.group_id)
        .ok_or(counter::DROP_NO_TARGET)?;
    let half = (group.active & 1) as usize;
    let size = group.table_size[half];
    if size == 0 {
        return Err(counter::DROP_NO_TARGET);
    }
    let h = if group.flags & GROUP_F_STICKY_SOURCE != 0 {
        hash::source_hash(config.hash_key, &key.src_addr)
    } else {
        hash::flow_hash(config.hash_key, key)
    };
    let slot = group.table_base[half].wrapping_add(h % size);
    let target_id = *LB_TABLES.get(slot).ok_or(counter::DROP_NO_TARGET)?;
    if target_id == NO_TARGET {
        return Err(counter::DROP_NO_TARGET);
    }
    let target = *LB_TARGETS.get(target_id).ok_or(counter::DROP_NO_TARGET)?;
    if target.state != TARGET_FORWARD {
        return Err(counter::DROP_NO_TARGET);
    }
    Ok((target_id, target))
}

/// May this CPU create another flow-table entry this second? Past `limit` (0: none) new
/// flows are forwarded by the hash without an entry, so that a flood of junk cannot evict
/// the established flows from the LRU.
#[inline(always)]
fn insert_allowed(now_ns: u64, limit: u32) -> bool {
    if limit == 0 {
        return true;
    }
    let Some(budget) = LB_FLOOD.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: this CPU's value; XDP runs with preemption off.
    let budget = unsafe { &mut *budget };
    let second = now_ns / 1_000_000_000;
    if budget.second != second {
        budget.second = second;
        budget.inserts = 0;
    }
    if budget.inserts >= limit as u64 {
        return false;
    }
    budget.inserts += 1;
    true
}

/// Records the VIP a reply from a shared target endpoint must leave with: on a flow's first
/// packet (`new_flow`), or on a later one whose entry has gone.
#[inline(always)]
fn record_reply(
    key: &FlowKey,
    target: &TargetValue,
    listener: &ListenerValue,
    new_flow: bool,
    now_ns: u64,
    config: &DataplaneConfig,
) {
    let reply_key = FlowKey {
        src_addr: target.addr,
        dst_addr: key.src_addr,
        src_port_be: target.port_be,
        dst_port_be: key.src_port_be,
        protocol: key.protocol,
        family: key.family,
        _pad: 0,
    };
    // SAFETY: read-only lookup.
    if !new_flow && unsafe { LB_REPLY_FLOWS.get(&reply_key) }.is_some() {
        return;
    }
    if !insert_allowed(now_ns, config.flow_insert_limit) {
        count(counter::FLOW_INSERT_SKIPPED);
        return;
    }
    let value = ReverseValue {
        vip_addr: key.dst_addr,
        vip_port_be: key.dst_port_be,
        _pad: 0,
        listener_id: listener.listener_id,
        flags: if listener.flags & LISTENER_F_ACCESS_LOG != 0 {
            REVERSE_F_ACCESS_LOG
        } else {
            0
        },
    };
    if let Err(e) = LB_REPLY_FLOWS.insert(&reply_key, &value, 0) {
        events::insert_failed(events::Table::ReplyFlows, e);
    }
}
