//! The maps, named as `lb_common::maps` names them and sized by its defaults (the agent
//! resizes the large ones at load time).

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use lb_common::{
    counter, maps::*, AddrBucket, AllowV4, AllowV6, DataplaneConfig, EndpointKey, FlowKey,
    FlowValue, FragKey, FragValue, GroupValue, IfaceValue, InsertBudget, ListenerStats,
    ListenerValue, NextHop, ReverseValue, TargetStats, TargetValue, VipKey, VipValue,
};

#[map]
pub static LB_CONFIG: Array<DataplaneConfig> = Array::with_max_entries(1, 0);
#[map]
pub static LB_VIPS: HashMap<VipKey, VipValue> = HashMap::with_max_entries(MAX_VIPS, 0);
#[map]
pub static LB_LISTENERS: HashMap<EndpointKey, ListenerValue> =
    HashMap::with_max_entries(MAX_LISTENERS, 0);
/// BPF_F_NO_PREALLOC, which LPM tries require.
#[map]
pub static LB_ALLOW_V4: LpmTrie<AllowV4, u8> = LpmTrie::with_max_entries(MAX_ALLOW_PREFIXES, 1);
#[map]
pub static LB_ALLOW_V6: LpmTrie<AllowV6, u8> = LpmTrie::with_max_entries(MAX_ALLOW_PREFIXES, 1);
#[map]
pub static LB_GROUPS: Array<GroupValue> = Array::with_max_entries(MAX_GROUPS, 0);
#[map]
pub static LB_TABLES: Array<u32> = Array::with_max_entries(DEFAULT_TABLE_SLOTS, 0);
#[map]
pub static LB_TARGETS: Array<TargetValue> = Array::with_max_entries(MAX_TARGETS, 0);
#[map]
pub static LB_REVERSE: HashMap<EndpointKey, ReverseValue> =
    HashMap::with_max_entries(MAX_TARGETS, 0);
#[map]
pub static LB_FLOWS: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);
#[map]
pub static LB_REPLY_FLOWS: LruHashMap<FlowKey, ReverseValue> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);
#[map]
pub static LB_DEVMAP: DevMapHash = DevMapHash::with_max_entries(MAX_INTERFACES, 0);
#[map]
pub static LB_STATS: PerCpuArray<ListenerStats> = PerCpuArray::with_max_entries(MAX_LISTENERS, 0);
#[map]
pub static LB_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);
#[map]
pub static LB_FLOOD: PerCpuArray<InsertBudget> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static LB_REPLY_FRAGS: LruHashMap<FragKey, FragValue> =
    LruHashMap::with_max_entries(MAX_REPLY_FRAGS, 0);
#[map]
pub static LB_IFACES: HashMap<u32, IfaceValue> = HashMap::with_max_entries(MAX_INTERFACES, 0);
/// The rare paths' programs, by `lb_common::maps::TAIL_*` index (the agent fills it).
#[map]
pub static LB_PROGS: ProgramArray = ProgramArray::with_max_entries(TAIL_CALLS.len() as u32, 0);
/// Per-CPU scratch for a tail call's argument: the egress MTU for `lb_xdp_too_big`.
#[map]
pub static LB_SCRATCH: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);
/// The routing state's epoch (`lb_common::ROUTE_EPOCH_OFF`: do not reuse FIB answers).
#[map]
pub static LB_ROUTE_EPOCH: Array<u32> = Array::with_max_entries(1, 0);
/// Per-CPU cache of FIB answers, valid while `LB_ROUTE_EPOCH` is unchanged.
#[map]
pub static LB_NEXT_HOPS: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(NEXT_HOP_SLOTS, 0);
/// Per address bucket: are there VIPs / target endpoints here at all?
#[map]
pub static LB_ADDR_FILTER: Array<AddrBucket> = Array::with_max_entries(ADDR_FILTER_BUCKETS, 0);
/// Starts and ends of access-logged flows (`lb_common::FlowEvent`), for the agent's access log.
#[map]
pub static LB_FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(FLOW_EVENTS_BYTES, 0);
/// Per CPU, by target id: what the traffic says of each target (passive health signals).
#[map]
pub static LB_TARGET_STATS: PerCpuArray<TargetStats> =
    PerCpuArray::with_max_entries(MAX_TARGETS, 0);
/// By target id: connections that failed in a row (refused, or SYN unanswered), back to 0 at
/// each answered one. Shared by every CPU.
#[map]
pub static LB_TARGET_FAILS: Array<u64> = Array::with_max_entries(MAX_TARGETS, 0);
