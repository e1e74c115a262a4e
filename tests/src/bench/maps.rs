//! Map-writing figures: the idle-flow sweep of a full 1,048,576-entry flow table and the publish
//! of a 65,537-slot consistent-hash table, with batched map operations (what the agent does)
//! and, on request, one syscall per entry (how it was done before, for comparison).

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use aya::maps::{Array, MapData};
use lb_common::{
    maps::{DEFAULT_FLOW_TABLE_SIZE, DEFAULT_HASH_TABLE_SIZE, MAP_TABLES},
    FlowKey, FlowValue, ReverseValue, FAMILY_V4, FLOW_TICK_SHIFT, PROTO_TCP,
};
use lb_userspace::{
    dataplane::{self, MapSizes},
    expiry::{self, ExpiryPlan, ListenerTimeouts},
    maps::{FlowTable, KernelMaps},
};

/// Runs per figure; the median is reported.
const RUNS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One row: what, median ms, min ms, max ms.
pub type Row = (String, f64, f64, f64);

fn row(what: String, times: Vec<f64>) -> Row {
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let max = times.iter().copied().fold(0.0, f64::max);
    (what, median(times), min, max)
}

fn flow_key(n: u32) -> FlowKey {
    FlowKey {
        src_addr: [u32::from_be_bytes([10, 0, 0, 0]) + (n >> 14), 0, 0, 0],
        dst_addr: [u32::from_be_bytes([10, 9, 0, 10]), 0, 0, 0],
        src_port_be: (1024 + (n & 0x3fff) as u16).to_be(),
        dst_port_be: 80u16.to_be(),
        protocol: PROTO_TCP,
        family: FAMILY_V4,
        _pad: 0,
    }
}

const TARGETS: u32 = 100;

fn plan() -> ExpiryPlan {
    ExpiryPlan {
        listeners: [(
            0,
            ListenerTimeouts {
                name: "web".into(),
                tcp: std::time::Duration::from_secs(350),
                udp: std::time::Duration::from_secs(120),
            },
        )]
        .into(),
        targets: (0..TARGETS)
            .map(|t| {
                (
                    t,
                    (
                        [u32::from_be_bytes([10, 2, 0, 0]) + t, 0, 0, 0],
                        8080u16.to_be(),
                    ),
                )
            })
            .collect(),
        access_log: false,
    }
}

/// `entries` flows, every other one idle for ~1,000 s at `now`.
fn flows(entries: u32, now: u32) -> (Vec<FlowKey>, Vec<FlowValue>) {
    (0..entries)
        .map(|n| {
            let seen = if n % 2 == 0 {
                now.wrapping_sub(1000)
            } else {
                now
            };
            (
                flow_key(n),
                FlowValue {
                    target_id: n % TARGETS,
                    target_cookie: 1,
                    listener_id: 0,
                    last_seen_ticks: seen,
                    flags: 0,
                    _pad: 0,
                    ..Default::default()
                },
            )
        })
        .unzip()
}

/// The reply-flow entries of the flows to one target in `every` (the target endpoints shared
/// between listeners have them; most have none).
fn replies(keys: &[FlowKey], values: &[FlowValue], every: u32) -> Vec<FlowKey> {
    let plan = plan();
    keys.iter()
        .zip(values)
        .filter(|(_, v)| v.target_id.is_multiple_of(every))
        .map(|(k, v)| {
            let (addr, port_be) = plan.targets[&v.target_id];
            lb_userspace::expiry::reply_key(k, addr, port_be)
        })
        .collect()
}

fn fill(
    table: &mut FlowTable,
    keys: &[FlowKey],
    values: &[FlowValue],
    reply_keys: &[FlowKey],
) -> Result<()> {
    table.insert_flows(keys, values)?;
    let reply = ReverseValue {
        vip_addr: [0; 4],
        vip_port_be: 0,
        _pad: 0,
        listener_id: 0,
        flags: 0,
    };
    table.insert_replies(reply_keys, &vec![reply; reply_keys.len()])
}

/// The sweep as it was: the keys one `BPF_MAP_GET_NEXT_KEY` at a time, each value one lookup,
/// each expired entry and its reply-flow entry one delete each.
fn sweep_per_syscall(maps: &mut KernelMaps, plan: &ExpiryPlan, now: u32) -> Result<usize> {
    let keys: Vec<FlowKey> = maps.flow_keys().filter_map(Result::ok).collect();
    let idle_ticks = (plan.listeners[&0].tcp.as_nanos() >> FLOW_TICK_SHIFT) as u32 + 1;
    let mut expired = 0;
    for k in keys {
        let Some(v) = maps.flow(&k)? else { continue };
        if now.wrapping_sub(v.last_seen_ticks) > idle_ticks {
            maps.remove_flow(&k)?;
            expired += 1;
            let (addr, port_be) = plan.targets[&v.target_id];
            let reply = lb_userspace::expiry::reply_key(&k, addr, port_be);
            let _ = maps.remove_reply_flow(&reply);
        }
    }
    Ok(expired)
}

/// The idle-flow sweep of a full `DEFAULT_FLOW_TABLE_SIZE` (1,048,576) flow table, half of it
/// idle, the flows to one target in `reply_every` with reply-flow entries: the batched sweep (median
/// of `RUNS`, the table refilled with UPDATE_BATCH before each), and with `per_syscall` the
/// old way once.
pub fn sweep(reply_every: u32, per_syscall: bool) -> Result<Vec<Row>> {
    let entries = DEFAULT_FLOW_TABLE_SIZE;
    // Room beyond the entries: an LRU map starts evicting while up to 127 free nodes per CPU
    // are left (it moves free nodes to per-CPU lists 128 at a time, evicting to make up the
    // difference), and the figure is for exactly `entries` (checked below).
    let mut ebpf = dataplane::load(MapSizes {
        flow_table: entries + 16_384,
        table_slots: 1024,
    })?;
    let mut maps = KernelMaps::new(&mut ebpf)?;
    let mut table = maps.flow_table()?;
    let plan = plan();
    let now = expiry::now_ticks();
    let (keys, values) = flows(entries, now);
    let reply_keys = replies(&keys, &values, reply_every);
    // The reply-flow entries of live (odd) flows stay.
    let replies_kept = (0..entries)
        .filter(|&n| n % 2 == 1 && (n % TARGETS).is_multiple_of(reply_every))
        .count();
    let mut fills = Vec::new();
    let mut times = Vec::new();
    for _ in 0..RUNS {
        let start = Instant::now();
        fill(&mut table, &keys, &values, &reply_keys)?;
        fills.push(start.elapsed().as_secs_f64() * 1e3);
        let start = Instant::now();
        let s = expiry::sweep(&mut table, &plan, now);
        times.push(start.elapsed().as_secs_f64() * 1e3);
        ensure!(
            s.expired == entries as usize / 2 && s.active.get("web") == Some(&(entries as u64 / 2)),
            "the sweep expired {} and kept {:?} of {entries} (an LRU eviction?)",
            s.expired,
            s.active
        );
        ensure!(
            table.replies()?.len() == replies_kept,
            "reply-flow entries of expired flows left"
        );
    }
    let replies_note = format!("reply-flow entries for the flows to 1 target in {reply_every}");
    let mut rows = vec![
        row(
            format!(
                "idle-flow sweep, 1,048,576 flows ({replies_note}), half idle: LOOKUP_BATCH in \
                 chunks of 8,192 + DELETE_BATCH"
            ),
            times,
        ),
        row(
            "filling the 1,048,576 flows: UPDATE_BATCH".to_string(),
            fills,
        ),
    ];
    if per_syscall {
        fill(&mut table, &keys, &values, &reply_keys)?;
        let start = Instant::now();
        let expired = sweep_per_syscall(&mut maps, &plan, now)?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        ensure!(
            expired == entries as usize / 2,
            "per-syscall sweep expired {expired}"
        );
        rows.push(row(
            format!("the same sweep, one syscall per key (before; {replies_note}; once)"),
            vec![ms],
        ));
    }
    Ok(rows)
}

fn maglev_ids(targets: &[u32]) -> Result<Vec<u32>> {
    let spec = super::table_spec(
        targets.iter().copied(),
        |t| std::net::Ipv4Addr::new(10, 2, (t / 256) as u8, (t % 256) as u8).into(),
        DEFAULT_HASH_TABLE_SIZE,
    );
    lb_userspace::reconcile::build_table(&spec)
}

/// Publishing a 65,537-slot table over 100 targets: in full (a group's first table), and after
/// one target left (only the slots that changed). With `per_syscall`, the same slot writes one
/// `BPF_MAP_UPDATE_ELEM` each, once.
pub fn publish(per_syscall: bool) -> Result<Vec<Row>> {
    let slots = DEFAULT_HASH_TABLE_SIZE;
    let all: Vec<u32> = (0..TARGETS).collect();
    let one_left: Vec<u32> = (0..TARGETS).filter(|&t| t != 42).collect();
    let full = maglev_ids(&all)?;
    let changed_table = maglev_ids(&one_left)?;
    let changed = full
        .iter()
        .zip(&changed_table)
        .filter(|(a, b)| a != b)
        .count();

    let mut ebpf = dataplane::load(MapSizes {
        flow_table: 1024,
        table_slots: 2 * slots * (RUNS as u32 + 1),
    })?;
    let mut maps = KernelMaps::new(&mut ebpf)?;
    // A group's first table: every slot.
    let mut full_times = Vec::new();
    for group in 1..=RUNS as u32 {
        let start = Instant::now();
        maps.publish_table(group, 0, &full)?;
        full_times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    // Each half lags two publishes: after the first two, the sequence full, full, changed,
    // changed, full, full, … writes only the slots that differ every time.
    maps.publish_table(0, 0, &full)?;
    maps.publish_table(0, 0, &full)?;
    let mut change_times = Vec::new();
    for i in 0..2 * RUNS {
        let t = if (i / 2) % 2 == 0 {
            &changed_table
        } else {
            &full
        };
        let start = Instant::now();
        maps.publish_table(0, 0, t)?;
        change_times.push(start.elapsed().as_secs_f64() * 1e3);
        ensure!(
            &maps.active_table(0)? == t,
            "published table reads back wrong"
        );
    }
    let mut rows = vec![
        row(
            "publish a 65,537-slot table in full (a group's first): one UPDATE_BATCH".into(),
            full_times,
        ),
        row(
            format!("publish it after one of 100 targets left ({changed} slots): one UPDATE_BATCH"),
            change_times,
        ),
    ];
    if per_syscall {
        let mut ebpf = dataplane::load(MapSizes {
            flow_table: 1024,
            table_slots: 2 * slots,
        })?;
        let mut tables: Array<MapData, u32> =
            ebpf.take_map(MAP_TABLES).context("LB_TABLES")?.try_into()?;
        let start = Instant::now();
        for (i, &t) in full.iter().enumerate() {
            tables.set(i as u32, t, 0)?;
        }
        let full_ms = start.elapsed().as_secs_f64() * 1e3;
        let start = Instant::now();
        for (i, (&a, &b)) in full.iter().zip(&changed_table).enumerate() {
            if a != b {
                tables.set(i as u32, b, 0)?;
            }
        }
        let change_ms = start.elapsed().as_secs_f64() * 1e3;
        rows.push(row(
            "the full write, one syscall per slot (before; once)".into(),
            vec![full_ms],
        ));
        rows.push(row(
            "the one-target write, one syscall per slot (before; once)".into(),
            vec![change_ms],
        ));
    }
    Ok(rows)
}
