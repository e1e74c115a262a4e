//! Idle-flow expiry. The XDP program stamps each flow entry with a coarse tick (~1.07 s) on every
//! packet; the sweep forgets entries idle longer than their listener's `idle_timeout` (entries
//! that saw a FIN or RST after `CLOSING_FLOW_TIMEOUT`), with their reply-flow entries, and counts
//! the live ones per listener for `lb_active_flows`.
//!
//! The sweep has its own handles on the two flow maps, so the agent runs it on a blocking
//! thread: a big flow table never stalls health transitions or API calls.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use anyhow::Result;
use lb_common::{
    FlowKey, FlowValue, FLOW_F_CLOSING, FLOW_F_LOG, FLOW_F_LOGGED, FLOW_TICK_SHIFT, PROTO_UDP,
};
use tracing::warn;

use crate::maps::{FlowTable, FLOW_CHUNK};

/// A flow that has seen a FIN or RST is forgotten after this long without packets.
pub const CLOSING_FLOW_TIMEOUT: Duration = Duration::from_secs(10);

/// What a listener's flows may idle for.
#[derive(Clone, Debug)]
pub struct ListenerTimeouts {
    pub name: String,
    pub tcp: Duration,
    pub udp: Duration,
}

/// What the sweep needs to know of the config: listeners by id, target endpoints by id (to find
/// a flow's reply-flow entry).
#[derive(Clone, Debug, Default)]
pub struct ExpiryPlan {
    pub listeners: HashMap<u32, ListenerTimeouts>,
    /// Target id → (address words, port in network order).
    pub targets: HashMap<u32, ([u32; 4], u16)>,
    /// The access log is on: report access-logged flows (`Sweep::logged`).
    pub access_log: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    pub expired: usize,
    /// Listener name → live flow entries.
    pub active: BTreeMap<String, u64>,
    /// With `ExpiryPlan::access_log`: what the access log learns from the pass.
    pub logged: LoggedFlows,
}

/// The access-logged flows a sweep saw (`crate::access_log`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoggedFlows {
    /// When the pass began (CLOCK_MONOTONIC_COARSE ns): a logged flow that started before
    /// and is neither in `live` nor in `ended` was evicted. 0: the pass did not look at every
    /// entry (access log off, or it stopped on an error), so nothing can be said of evictions.
    pub began_ns: u64,
    /// Entries it removed whose end was not logged yet (the data path marks the ones it
    /// logged): idle, or closed without a last packet after the FINs.
    pub ended: Vec<(FlowKey, FlowValue)>,
    /// Logged flows it left in the table.
    pub live: HashSet<FlowKey>,
}

/// The tick the XDP program stamps now (`bpf_ktime_get_coarse_ns() >> FLOW_TICK_SHIFT`).
pub fn now_ticks() -> u32 {
    (now_coarse_ns() >> FLOW_TICK_SHIFT) as u32
}

/// CLOCK_MONOTONIC_COARSE in ns: the clock of the XDP program's `bpf_ktime_get_coarse_ns`.
pub fn now_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Ticks a flow may idle for `d` (rounded up, plus one for the stamp's own coarseness).
fn ticks(d: Duration) -> u32 {
    (d.as_nanos() >> FLOW_TICK_SHIFT) as u32 + 1
}

/// The reply-flow key of flow `key` (client → VIP) forwarded to the target at `addr`,
/// `port_be`: target → client.
pub fn reply_key(key: &FlowKey, addr: [u32; 4], port_be: u16) -> FlowKey {
    FlowKey {
        src_addr: addr,
        dst_addr: key.src_addr,
        src_port_be: port_be,
        dst_port_be: key.src_port_be,
        protocol: key.protocol,
        family: key.family,
        _pad: 0,
    }
}

/// One pass over the flow table at tick `now`, a chunk of `FLOW_CHUNK` entries at a time, each
/// chunk's expired entries removed with one `BPF_MAP_DELETE_BATCH`; their reply-flow entries
/// as `Replies` says. A map error ends the pass (logged); what was counted until then is
/// returned.
pub fn sweep(table: &mut FlowTable, plan: &ExpiryPlan, now: u32) -> Sweep {
    let mut out = Sweep::default();
    let began_ns = now_coarse_ns();
    match sweep_chunks(table, plan, now, FLOW_CHUNK, &mut out) {
        Ok(()) if plan.access_log => out.logged.began_ns = began_ns,
        Ok(()) => {}
        // A partial pass cannot tell evicted flows from unvisited ones.
        Err(e) => warn!("idle-flow sweep stopped: {e:#}"),
    }
    out
}

/// Reply-flow keys tried before the sweep picks how to remove them.
const REPLY_PROBE: usize = 256;

/// How the sweep removes the reply-flow entries of expired flows. Only flows to a target
/// endpoint that serves several listeners have one, and `BPF_MAP_DELETE_BATCH` stops at each
/// key that is not there (one more syscall per missing key). So the sweep tries every expired
/// flow's reply key while most are there; once `REPLY_PROBE` keys showed that most are not, it
/// walks `LB_REPLY_FLOWS` once for the endpoints that have entries (cheap: the table is then
/// mostly empty) and tries only the keys of those from then on.
enum Replies {
    /// Every key: (keys tried, entries removed).
    All(usize, usize),
    /// Only keys from these (target address, port, protocol).
    Endpoints(HashSet<([u32; 4], u16, u8)>),
}

fn sweep_chunks(
    table: &mut FlowTable,
    plan: &ExpiryPlan,
    now: u32,
    chunk: usize,
    out: &mut Sweep,
) -> Result<()> {
    let mut cursor = table.cursor(chunk);
    let mut expired = Vec::new();
    let mut replies = Vec::new();
    let mut mode = Replies::All(0, 0);
    // Live entries by listener id (names at the end).
    let mut active: HashMap<u32, u64> = HashMap::new();
    loop {
        expired.clear();
        replies.clear();
        let Some((keys, values)) = cursor.next(table)? else {
            break;
        };
        for (key, v) in keys.iter().zip(values) {
            let idle = match plan.listeners.get(&v.listener_id) {
                Some(l) if key.protocol == PROTO_UDP => l.udp,
                Some(l) => l.tcp,
                None if key.protocol == PROTO_UDP => Duration::from_secs(120),
                None => Duration::from_secs(350),
            };
            let idle = if v.flags & FLOW_F_CLOSING != 0 {
                idle.min(CLOSING_FLOW_TIMEOUT)
            } else {
                idle
            };
            let logged = plan.access_log && v.flags & FLOW_F_LOG != 0;
            if now.wrapping_sub(v.last_seen_ticks) > ticks(idle) {
                expired.push(*key);
                if logged && v.flags & FLOW_F_LOGGED == 0 {
                    out.logged.ended.push((*key, *v));
                }
                if let Some(&(addr, port_be)) = plan.targets.get(&v.target_id) {
                    replies.push(reply_key(key, addr, port_be));
                }
            } else {
                *active.entry(v.listener_id).or_default() += 1;
                if logged {
                    out.logged.live.insert(*key);
                }
            }
        }
        // The walk has left these entries' buckets: removing them does not disturb it.
        out.expired += table.remove_flows(&expired)?;
        match &mut mode {
            Replies::All(tried, removed) => {
                *tried += replies.len();
                *removed += table.remove_replies(&replies)?;
                if *tried >= REPLY_PROBE && *removed * 2 < *tried {
                    mode = Replies::Endpoints(table.reply_endpoints()?);
                }
            }
            Replies::Endpoints(endpoints) => {
                replies.retain(|k| endpoints.contains(&(k.src_addr, k.src_port_be, k.protocol)));
                table.remove_replies(&replies)?;
            }
        }
    }
    for (id, n) in active {
        if let Some(l) = plan.listeners.get(&id) {
            *out.active.entry(l.name.clone()).or_default() += n;
        }
    }
    Ok(())
}
