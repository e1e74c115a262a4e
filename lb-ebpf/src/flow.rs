//! Flow tracking and scheduling: which target a packet of a listener's flow goes to.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{
    counter, hash, FlowKey, FlowValue, ListenerValue, ReverseValue, TargetValue, FLOW_F_CLOSING,
    FLOW_TICK_SHIFT, GROUP_F_STICKY_SOURCE, NO_TARGET, TARGET_DROP, TARGET_FORWARD,
    TARGET_F_SHARED_ENDPOINT,
};

use crate::{
    maps::{LB_FLOWS, LB_GROUPS, LB_REPLY_FLOWS, LB_TABLES, LB_TARGETS},
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats::count,
};

/// Where a listener's packet goes.
pub struct Decision {
    pub target: TargetValue,
    pub new_flow: bool,
}

#[inline(always)]
fn now_ticks() -> u32 {
    // SAFETY: helper without arguments.
    (unsafe { bpf_ktime_get_coarse_ns() } >> FLOW_TICK_SHIFT) as u32
}

#[inline(always)]
fn closing(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_FIN | TCP_RST) != 0
}

/// The target of a listener's packet: the flow's recorded target while it is eligible,
/// otherwise one chosen by the group's consistent-hash table (recorded for the next packets).
///
/// A packet with no flow entry is scheduled like a SYN whatever its flags: an entry lost to
/// LRU eviction, a restart or another balancer node must land on the same target again.
#[inline(always)]
pub fn decide(
    key: &FlowKey,
    listener: &ListenerValue,
    tcp_flags: u8,
    hash_key: [u32; 2],
) -> Result<Decision, u32> {
    if let Some(entry) = LB_FLOWS.get_ptr_mut(key) {
        // SAFETY: a live map value; concurrent updates of these u32 fields are benign.
        let entry = unsafe { &mut *entry };
        let fresh_syn = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        if let Some(target) = LB_TARGETS.get(entry.target_id) {
            if target.cookie == entry.target_cookie
                && !(fresh_syn && entry.flags & FLOW_F_CLOSING != 0)
            {
                if target.state == TARGET_FORWARD {
                    let now = now_ticks();
                    if entry.last_seen_ticks != now {
                        entry.last_seen_ticks = now;
                    }
                    if closing(tcp_flags) && entry.flags & FLOW_F_CLOSING == 0 {
                        entry.flags |= FLOW_F_CLOSING;
                    }
                    return Ok(Decision {
                        target: *target,
                        new_flow: false,
                    });
                }
                if target.state == TARGET_DROP {
                    return Err(counter::DROP_TARGET_TERMINATED);
                }
            }
        }
        // Removed, rescheduled, or a new connection on a closed tuple: schedule afresh.
        count(counter::FLOWS_RESCHEDULED);
    }
    schedule(key, listener, tcp_flags, hash_key)
}

#[inline(always)]
fn schedule(
    key: &FlowKey,
    listener: &ListenerValue,
    tcp_flags: u8,
    hash_key: [u32; 2],
) -> Result<Decision, u32> {
    let group = LB_GROUPS
        .get(listener.group_id)
        .ok_or(counter::DROP_NO_TARGET)?;
    let half = (group.active & 1) as usize;
    let size = group.table_size[half];
    if size == 0 {
        return Err(counter::DROP_NO_TARGET);
    }
    let h = if group.flags & GROUP_F_STICKY_SOURCE != 0 {
        hash::source_hash(hash_key, &key.src_addr)
    } else {
        hash::flow_hash(hash_key, key)
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
    let entry = FlowValue {
        target_id,
        target_cookie: target.cookie,
        listener_id: listener.listener_id,
        last_seen_ticks: now_ticks(),
        flags: if closing(tcp_flags) {
            FLOW_F_CLOSING
        } else {
            0
        },
        _pad: 0,
    };
    if LB_FLOWS.insert(key, &entry, 0).is_err() {
        count(counter::FLOW_INSERT_FAILED);
    }
    Ok(Decision {
        target,
        new_flow: true,
    })
}

/// Records the VIP a reply from a shared target endpoint must leave with.
#[inline(always)]
pub fn record_reply(key: &FlowKey, target: &TargetValue, listener: &ListenerValue) {
    if target.flags & TARGET_F_SHARED_ENDPOINT == 0 {
        return;
    }
    let reply_key = FlowKey {
        src_addr: target.addr,
        dst_addr: key.src_addr,
        src_port_be: target.port_be,
        dst_port_be: key.src_port_be,
        protocol: key.protocol,
        family: key.family,
        _pad: 0,
    };
    let value = ReverseValue {
        vip_addr: key.dst_addr,
        vip_port_be: key.dst_port_be,
        _pad: 0,
        listener_id: listener.listener_id,
        flags: 0,
    };
    if LB_REPLY_FLOWS.insert(&reply_key, &value, 0).is_err() {
        count(counter::FLOW_INSERT_FAILED);
    }
}
