//! Map and program names (shared with the kernel statics, each < 16 bytes) and default sizes.

pub const PROGRAM_XDP: &str = "lb_xdp";
/// An empty `XDP_PASS` program in the same object: the floor for per-packet cost figures.
pub const PROGRAM_XDP_PASS: &str = "lb_xdp_pass";
/// The rare paths, reached from `lb_xdp` by tail call through `LB_PROGS` (each a program of
/// its own: a tail call replaces the caller's stack frame, and on machines with return-thunk
/// mitigations a BPF function call on the hot path costs tens of nanoseconds).
pub const PROGRAM_XDP_ICMP_TO_VIP: &str = "lb_xdp_icmp_in";
pub const PROGRAM_XDP_ICMP_FROM_TARGET: &str = "lb_xdp_icmp_out";
pub const PROGRAM_XDP_FRAGMENT: &str = "lb_xdp_fragment";
pub const PROGRAM_XDP_TOO_BIG: &str = "lb_xdp_too_big";
/// `LB_PROGS` index of each tail-called program.
pub const TAIL_ICMP_TO_VIP: u32 = 0;
pub const TAIL_ICMP_FROM_TARGET: u32 = 1;
pub const TAIL_FRAGMENT: u32 = 2;
pub const TAIL_TOO_BIG: u32 = 3;
/// (index, program) of every entry of `LB_PROGS`.
pub const TAIL_CALLS: [(u32, &str); 4] = [
    (TAIL_ICMP_TO_VIP, PROGRAM_XDP_ICMP_TO_VIP),
    (TAIL_ICMP_FROM_TARGET, PROGRAM_XDP_ICMP_FROM_TARGET),
    (TAIL_FRAGMENT, PROGRAM_XDP_FRAGMENT),
    (TAIL_TOO_BIG, PROGRAM_XDP_TOO_BIG),
];

pub const MAP_CONFIG: &str = "LB_CONFIG";
pub const MAP_VIPS: &str = "LB_VIPS";
pub const MAP_LISTENERS: &str = "LB_LISTENERS";
pub const MAP_ALLOW_V4: &str = "LB_ALLOW_V4";
pub const MAP_ALLOW_V6: &str = "LB_ALLOW_V6";
pub const MAP_GROUPS: &str = "LB_GROUPS";
pub const MAP_TABLES: &str = "LB_TABLES";
pub const MAP_TARGETS: &str = "LB_TARGETS";
pub const MAP_REVERSE: &str = "LB_REVERSE";
pub const MAP_FLOWS: &str = "LB_FLOWS";
pub const MAP_REPLY_FLOWS: &str = "LB_REPLY_FLOWS";
pub const MAP_DEVMAP: &str = "LB_DEVMAP";
pub const MAP_STATS: &str = "LB_STATS";
pub const MAP_COUNTERS: &str = "LB_COUNTERS";
pub const MAP_FLOOD: &str = "LB_FLOOD";
pub const MAP_REPLY_FRAGS: &str = "LB_REPLY_FRAGS";
pub const MAP_IFACES: &str = "LB_IFACES";
pub const MAP_PROGS: &str = "LB_PROGS";
pub const MAP_SCRATCH: &str = "LB_SCRATCH";
pub const MAP_ROUTE_EPOCH: &str = "LB_ROUTE_EPOCH";
pub const MAP_NEXT_HOPS: &str = "LB_NEXT_HOPS";
pub const MAP_ADDR_FILTER: &str = "LB_ADDR_FILTER";
pub const MAP_FLOW_EVENTS: &str = "LB_FLOW_EVENTS";
pub const MAP_TARGET_STATS: &str = "LB_TARGET_STATS";
pub const MAP_TARGET_FAILS: &str = "LB_TARGET_FAILS";

/// Every map the object defines (a test checks that each resolves in the loaded object).
pub const ALL_MAPS: [&str; 25] = [
    MAP_CONFIG,
    MAP_VIPS,
    MAP_LISTENERS,
    MAP_ALLOW_V4,
    MAP_ALLOW_V6,
    MAP_GROUPS,
    MAP_TABLES,
    MAP_TARGETS,
    MAP_REVERSE,
    MAP_FLOWS,
    MAP_REPLY_FLOWS,
    MAP_DEVMAP,
    MAP_STATS,
    MAP_COUNTERS,
    MAP_FLOOD,
    MAP_REPLY_FRAGS,
    MAP_IFACES,
    MAP_PROGS,
    MAP_SCRATCH,
    MAP_ROUTE_EPOCH,
    MAP_NEXT_HOPS,
    MAP_ADDR_FILTER,
    MAP_FLOW_EVENTS,
    MAP_TARGET_STATS,
    MAP_TARGET_FAILS,
];

/// Listeners (and so VIP:port:protocol entries) the data plane holds.
pub const MAX_LISTENERS: u32 = 1024;
pub const MAX_VIPS: u32 = 1024;
/// Target groups; also the index range of `LB_GROUPS`.
pub const MAX_GROUPS: u32 = 256;
/// Target slots; `TargetValue`s are indexed by target id.
pub const MAX_TARGETS: u32 = 16384;
/// `allowed_sources` prefixes per family, over all listeners.
pub const MAX_ALLOW_PREFIXES: u32 = 16384;
/// Default flow-table size (`agent.flow_table_size`).
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 1_048_576;
/// Default consistent-hash table size (`target_group.hash_table_size`), a prime.
pub const DEFAULT_HASH_TABLE_SIZE: u32 = 65_537;
/// Slots of `LB_TABLES` by default: both halves of the double buffer for 16 groups at the
/// default table size. The agent sizes it from the config at load time.
pub const DEFAULT_TABLE_SLOTS: u32 = 2 * 16 * DEFAULT_HASH_TABLE_SIZE;
/// Fragmented replies tracked at once (first fragment seen, later ones expected).
pub const MAX_REPLY_FRAGS: u32 = 8192;
/// Default `agent.flow_insert_limit`: new flow-table entries per CPU per second.
pub const DEFAULT_FLOW_INSERT_LIMIT: u32 = 125_000;
/// Interfaces in the redirect devmap.
pub const MAX_INTERFACES: u32 = 64;
/// Entries of the per-CPU `LB_NEXT_HOPS` cache: the first half by target id (packets to
/// targets), the second by a hash of the destination (replies to clients). A power of two.
pub const NEXT_HOP_SLOTS: u32 = 4096;
/// Bytes of the `LB_FLOW_EVENTS` ring buffer (a power of two of pages): 64k records of 128
/// bytes with their header.
pub const FLOW_EVENTS_BYTES: u32 = 8 << 20;
/// Buckets of `LB_ADDR_FILTER`. A power of two.
pub const ADDR_FILTER_BUCKETS: u32 = 4096;
