//! Batched map operations (`lb_userspace::maps::batch`) on the loaded object's real maps: reads
//! return exactly what is there whatever the chunking, writes touch exactly the entries given,
//! deletes skip keys that are gone, and the idle-flow sweep built on them.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use aya::maps::{Array, MapData};
use lb_common::{
    maps::MAP_TABLES, FlowKey, FlowValue, ReverseValue, FAMILY_V4, PROTO_TCP, PROTO_UDP,
};
use lb_userspace::{
    dataplane::{self, MapSizes},
    expiry::{self, ExpiryPlan, ListenerTimeouts},
    maps::{batch, FlowTable, KernelMaps, FLOW_CHUNK},
};

/// Distinct client → VIP 5-tuples.
fn key(n: u32) -> FlowKey {
    FlowKey {
        src_addr: [u32::from_be_bytes([10, 1, 0, 0]) + (n >> 12), 0, 0, 0],
        dst_addr: [u32::from_be_bytes([10, 9, 0, 10]), 0, 0, 0],
        src_port_be: (20000 + (n & 0xfff) as u16).to_be(),
        dst_port_be: 80u16.to_be(),
        protocol: if n.is_multiple_of(3) {
            PROTO_UDP
        } else {
            PROTO_TCP
        },
        family: FAMILY_V4,
        _pad: 0,
    }
}

fn value(n: u32, last_seen_ticks: u32) -> FlowValue {
    FlowValue {
        target_id: (n / 2) % 4,
        target_cookie: n,
        listener_id: n % 2,
        last_seen_ticks,
        flags: 0,
        _pad: 0,
        ..Default::default()
    }
}

fn entries(range: std::ops::Range<u32>) -> (Vec<FlowKey>, Vec<FlowValue>) {
    range.map(|n| (key(n), value(n, n))).unzip()
}

/// The table's entries by key; fails on a key read twice.
fn by_key(list: Vec<(FlowKey, FlowValue)>) -> HashMap<FlowKey, FlowValue> {
    let n = list.len();
    let map: HashMap<FlowKey, FlowValue> = list.into_iter().collect();
    assert_eq!(map.len(), n, "a key was read more than once");
    map
}

/// Fails naming how `got` differs from `want` (counts, not the thousands of entries).
fn assert_same<K, V>(got: &HashMap<K, V>, want: &HashMap<K, V>, what: &str)
where
    K: std::hash::Hash + Eq,
    V: PartialEq,
{
    let missing = want.keys().filter(|k| !got.contains_key(k)).count();
    let extra = got.keys().filter(|k| !want.contains_key(k)).count();
    let differ = want
        .iter()
        .filter(|(k, v)| got.get(k).is_some_and(|g| g != *v))
        .count();
    assert!(
        (missing, extra, differ) == (0, 0, 0),
        "{what}: {} read, {} there; {missing} missing, {extra} not there, {differ} with other values",
        got.len(),
        want.len()
    );
}

/// Fails naming how two key sets differ.
fn assert_same_keys(got: &HashSet<FlowKey>, want: &HashSet<FlowKey>, what: &str) {
    let missing = want.difference(got).count();
    let extra = got.difference(want).count();
    assert!(
        (missing, extra) == (0, 0),
        "{what}: {} there, {} wanted; {missing} missing, {extra} extra",
        got.len(),
        want.len()
    );
}

/// Reads the table through a cursor of `chunk` entries per call.
fn read_with_chunk(table: &FlowTable, chunk: usize) -> Vec<(FlowKey, FlowValue)> {
    let mut cursor = table.cursor(chunk);
    let mut out = Vec::new();
    while let Some((k, v)) = cursor.next(table).expect("batch lookup") {
        assert!(!k.is_empty() && k.len() == v.len());
        out.extend(k.iter().copied().zip(v.iter().copied()));
    }
    out
}

fn load(flow_table: u32, table_slots: u32) -> (aya::Ebpf, KernelMaps) {
    let mut ebpf = dataplane::load(MapSizes {
        flow_table,
        table_slots,
    })
    .expect("load");
    let maps = KernelMaps::new(&mut ebpf).expect("maps");
    (ebpf, maps)
}

#[test]
fn batch_lookup_returns_exactly_the_entries_there_around_chunk_boundaries() {
    let (_ebpf, maps) = load(65_536, 1024);
    let mut table = maps.flow_table().expect("flow table");
    let c = FLOW_CHUNK as u32;
    for n in [0, 1, 2, 3000, c - 1, c, c + 1, 2 * c + 1, 20_000] {
        let (keys, values) = entries(0..n);
        table.insert_flows(&keys, &values).expect("insert");
        let want: HashMap<FlowKey, FlowValue> = keys.iter().copied().zip(values).collect();
        let got = by_key(table.flows().expect("flows"));
        assert_same(&got, &want, &format!("{n} entries"));
        // Cross-checked against the kernel's own iteration (one key per syscall, aya's).
        let via_keys: HashSet<FlowKey> = maps
            .flow_keys()
            .collect::<anyhow::Result<_>>()
            .expect("keys");
        assert_eq!(via_keys.len(), n as usize, "{n} entries by key iteration");
        assert_eq!(table.remove_flows(&keys).expect("remove"), n as usize);
        assert!(table.flows().expect("flows").is_empty(), "{n}: left over");
    }
}

/// Chunks smaller than a hash bucket (the kernel answers ENOSPC: the cursor grows its buffer)
/// and chunks that end mid-table still give every entry once.
#[test]
fn batch_lookup_with_small_chunks_reads_every_entry_once() {
    let (_ebpf, maps) = load(4096, 1024);
    let mut table = maps.flow_table().expect("flow table");
    // 3,000 entries in 4,096 buckets: many buckets hold two or more.
    let (keys, values) = entries(0..3000);
    table.insert_flows(&keys, &values).expect("insert");
    let want: HashMap<FlowKey, FlowValue> = keys.iter().copied().zip(values).collect();
    for chunk in [1, 2, 7, 1000, 2999, 3000, 3001] {
        let got = by_key(read_with_chunk(&table, chunk));
        assert_same(&got, &want, &format!("chunk of {chunk}"));
    }
}

/// Removing the entries a chunk handed out before reading the next (what the sweep does) does
/// not disturb the walk.
#[test]
fn removing_entries_between_chunks_keeps_the_walk_whole() {
    let (_ebpf, maps) = load(65_536, 1024);
    let mut table = maps.flow_table().expect("flow table");
    let (keys, values) = entries(0..20_000);
    table.insert_flows(&keys, &values).expect("insert");
    let mut cursor = table.cursor(1000);
    let mut seen = HashSet::new();
    while let Some((k, _)) = cursor.next(&table).expect("lookup") {
        let chunk: Vec<FlowKey> = k.to_vec();
        for k in &chunk {
            assert!(seen.insert(*k), "key read twice");
        }
        assert_eq!(table.remove_flows(&chunk).expect("remove"), chunk.len());
    }
    assert_eq!(seen.len(), 20_000);
    assert!(table.flows().expect("flows").is_empty());
}

/// Keys that are not there (evicted, deleted meanwhile) are skipped, not an error, and do not
/// stop the keys after them from going.
#[test]
fn batch_delete_skips_missing_keys() {
    let (_ebpf, maps) = load(4096, 1024);
    let mut table = maps.flow_table().expect("flow table");
    let (keys, values) = entries(0..100);
    table.insert_flows(&keys, &values).expect("insert");
    // Present keys 0..50 interleaved with missing ones (1000..), two missing in a row, and a
    // missing one first and last.
    let mut doomed = vec![key(1000)];
    for n in 0..50 {
        doomed.push(key(n));
        if n % 5 == 0 {
            doomed.push(key(1001 + n));
        }
        if n % 10 == 0 {
            doomed.push(key(2001 + n));
        }
    }
    doomed.push(key(3000));
    assert_eq!(table.remove_flows(&doomed).expect("remove"), 50);
    let left: HashSet<FlowKey> = table
        .flows()
        .expect("flows")
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_same_keys(&left, &(50..100).map(key).collect(), "left");
    // Nothing there at all.
    assert_eq!(table.remove_flows(&doomed).expect("remove"), 0);
}

/// UPDATE_BATCH writes exactly the slots it is given, across the per-call limit (65,536), and
/// reports the entry the kernel refused with the ones before it written.
#[test]
fn batch_update_writes_exactly_the_slots_given() {
    const SLOTS: u32 = 2 * 65_537 + 100;
    let mut ebpf = dataplane::load(MapSizes {
        flow_table: 1024,
        table_slots: SLOTS,
    })
    .expect("load");
    let mut tables: Array<MapData, u32> = ebpf
        .take_map(MAP_TABLES)
        .expect("LB_TABLES")
        .try_into()
        .expect("array");
    let untouched = 0xdead_beef;
    // The baseline, one slot per syscall (aya's own path).
    for i in 0..SLOTS {
        tables.set(i, untouched, 0).expect("set");
    }
    // Every other slot from 5, then a few scattered: 65,539 entries, keys out of order at the
    // end.
    let mut keys: Vec<u32> = (0..65_537).map(|i| 5 + 2 * i).collect();
    keys.extend([SLOTS - 1, 0, 2]);
    let values: Vec<u32> = keys.iter().map(|k| k.wrapping_mul(7) ^ 1).collect();
    batch::update_batch(&mut tables, &keys, &values).expect("update batch");
    let written: BTreeMap<u32, u32> = keys.iter().copied().zip(values.iter().copied()).collect();
    for i in 0..SLOTS {
        let want = written.get(&i).copied().unwrap_or(untouched);
        assert_eq!(tables.get(&i, 0).expect("get"), want, "slot {i}");
    }

    // An index past the end: the entries before it are written, the error names it.
    let keys = [10, 12, SLOTS, 14];
    let err = batch::update_batch(&mut tables, &keys, &[1, 2, 3, 4]).expect_err("out of range");
    assert!(format!("{err:#}").contains("entry 2 of 4"), "{err:#}");
    assert_eq!(tables.get(&10, 0).expect("get"), 1);
    assert_eq!(tables.get(&12, 0).expect("get"), 2);
    assert_eq!(tables.get(&14, 0).expect("get"), untouched);

    let err = batch::update_batch(&mut tables, &[1, 2], &[1]).expect_err("lengths differ");
    assert!(
        format!("{err:#}").contains("2 keys but 1 values"),
        "{err:#}"
    );
}

/// A 65,537-slot table published through `KernelMaps` (one UPDATE_BATCH for the changed slots)
/// reads back exactly, first in full, then with one target changed.
#[test]
fn published_big_tables_read_back_exactly() {
    let (_ebpf, mut maps) = load(1024, 4 * 65_537);
    let first: Vec<u32> = (0..65_537).map(|i| i % 100).collect();
    let mut second = first.clone();
    for slot in second.iter_mut().filter(|t| **t == 42) {
        *slot = 7;
    }
    for (n, t) in [&first, &first, &second, &second, &first]
        .iter()
        .enumerate()
    {
        maps.publish_table(3, 0, t).expect("publish");
        let got = maps.active_table(3).expect("read");
        let wrong = got.iter().zip(t.iter()).filter(|(a, b)| a != b).count();
        assert!(
            got.len() == t.len() && wrong == 0,
            "publish {n}: {} slots read, {} published, {wrong} differ",
            got.len(),
            t.len()
        );
    }
}

/// The sweep over more than one chunk: idle entries go with their reply-flow entries (where
/// there is one), live ones stay and are counted per listener. Whether most expired flows have
/// a reply-flow entry (removed chunk by chunk) or few do (looked up in one walk at the end).
#[test]
fn sweep_removes_idle_flows_and_their_reply_flows_across_chunks() {
    sweep_case("every flow", |_| true);
    sweep_case("one flow in 3", |i| i % 3 == 0);
    sweep_case("flows to target 1", |i| (i / 2) % 4 == 1);
    sweep_case("one flow in 4,096 (to target 0)", |i| i % 4096 == 0);
    sweep_case("no flow", |_| false);
}

/// Flows `i` for which `has_reply(i)` have a reply-flow entry (flow `i` goes to target
/// `(i / 2) % 4`, idle when `i` is even).
fn sweep_case(what: &str, has_reply: fn(usize) -> bool) {
    let (_ebpf, maps) = load(65_536, 1024);
    let mut table = maps.flow_table().expect("flow table");
    let now = expiry::now_ticks();
    let n = 3 * FLOW_CHUNK as u32 + 17;
    // Even n: idle for ~1,000 s; odd n: seen now. Ticks wrap, as the sweep reads them: a
    // machine up for less than 1,000 s has fewer.
    let (keys, values): (Vec<FlowKey>, Vec<FlowValue>) = (0..n)
        .map(|i| {
            let seen = if i % 2 == 0 {
                now.wrapping_sub(1000)
            } else {
                now
            };
            (key(i), value(i, seen))
        })
        .unzip();
    table.insert_flows(&keys, &values).expect("insert");
    // Targets 0..4.
    let targets: HashMap<u32, ([u32; 4], u16)> = (0..4)
        .map(|t| {
            (
                t,
                (
                    [u32::from_be_bytes([10, 2, 0, 11 + t as u8]), 0, 0, 0],
                    8080u16.to_be(),
                ),
            )
        })
        .collect();
    let reply_key = |k: &FlowKey, v: &FlowValue| {
        let (addr, port_be) = targets[&v.target_id];
        expiry::reply_key(k, addr, port_be)
    };
    let with_reply: Vec<usize> = (0..n as usize).filter(|&i| has_reply(i)).collect();
    let rkeys: Vec<FlowKey> = with_reply
        .iter()
        .map(|&i| reply_key(&keys[i], &values[i]))
        .collect();
    let rvalues = vec![
        ReverseValue {
            vip_addr: [0; 4],
            vip_port_be: 0,
            _pad: 0,
            listener_id: 0,
            flags: 0,
        };
        rkeys.len()
    ];
    table
        .insert_replies(&rkeys, &rvalues)
        .expect("insert replies");

    let timeouts = |name: &str| ListenerTimeouts {
        name: name.into(),
        tcp: Duration::from_secs(350),
        udp: Duration::from_secs(120),
    };
    let plan = ExpiryPlan {
        listeners: [(0, timeouts("l0")), (1, timeouts("l1"))].into(),
        targets: targets.clone(),
        access_log: false,
    };
    let s = expiry::sweep(&mut table, &plan, now + 1);
    // Even flows (listener 0) expired; odd ones (listener 1) live.
    assert_eq!(s.expired, n.div_ceil(2) as usize);
    assert_eq!(s.active, [("l1".to_string(), (n / 2) as u64)].into());
    let left: HashSet<FlowKey> = table
        .flows()
        .expect("flows")
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_same_keys(
        &left,
        &(0..n).filter(|i| i % 2 == 1).map(key).collect(),
        "flows left",
    );
    let replies_left: HashSet<FlowKey> = table
        .replies()
        .expect("replies")
        .into_iter()
        .map(|e| e.0)
        .collect();
    let want: HashSet<FlowKey> = with_reply
        .iter()
        .filter(|&&i| i % 2 == 1)
        .map(|&i| reply_key(&keys[i], &values[i]))
        .collect();
    assert_same_keys(
        &replies_left,
        &want,
        &format!("reply-flow entries left ({what} with one)"),
    );
    // Nothing more to expire.
    assert_eq!(expiry::sweep(&mut table, &plan, now + 1).expired, 0);
}
