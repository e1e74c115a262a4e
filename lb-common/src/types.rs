//! Map keys and values. Layouts are fixed: `#[repr(C)]`, explicit padding, size asserted.

/// Address families, as the `family` byte of keys and values.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// IP protocol numbers used in keys.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `LB_CONFIG[0]`: data-plane wide settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataplaneConfig {
    /// The secret key of the flow hash (HalfSipHash-1-3).
    pub hash_key: [u32; 2],
    /// `CONFIG_F_*` bits.
    pub flags: u32,
    /// New flow-table entries a CPU may create per second (`agent.flow_insert_limit`); past
    /// it, new flows are forwarded by the consistent hash without an entry. 0: no limit.
    pub flow_insert_limit: u32,
}
const _: () = assert!(core::mem::size_of::<DataplaneConfig>() == 16);

/// Set once the agent has written the config: without it the program forwards nothing.
pub const CONFIG_F_READY: u32 = 1;

/// Key of `LB_VIPS`: is this destination address a VIP?
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 20);

/// Value of `LB_VIPS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipValue {
    /// Listeners on this VIP (informational; the key's presence is what matters).
    pub listener_count: u32,
}
const _: () = assert!(core::mem::size_of::<VipValue>() == 4);

/// An (address, port, protocol): the key of `LB_LISTENERS` (VIP side) and of `LB_REVERSE`
/// (target side).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub addr: [u32; 4],
    pub port_be: u16,
    pub protocol: u8,
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<EndpointKey>() == 20);

/// Value of `LB_LISTENERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerValue {
    /// Index into `LB_STATS` and the `allowed_sources` tries.
    pub listener_id: u32,
    /// Index into `LB_GROUPS`.
    pub group_id: u32,
    /// `LISTENER_F_*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<ListenerValue>() == 12);

/// `allowed_sources` covers every address of the family: skip the trie lookup.
pub const LISTENER_F_ALLOW_ALL_V4: u32 = 1;
pub const LISTENER_F_ALLOW_ALL_V6: u32 = 2;
/// Access logs are on for the listener: its flows count their packets and bytes and send
/// their start and end to `LB_FLOW_EVENTS`.
pub const LISTENER_F_ACCESS_LOG: u32 = 4;

/// Data of an `LB_ALLOW_V4` trie key: the prefix length counts the 32 listener bits first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowV4 {
    pub listener_id_be: u32,
    pub addr: u32,
}
const _: () = assert!(core::mem::size_of::<AllowV4>() == 8);

/// Data of an `LB_ALLOW_V6` trie key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowV6 {
    pub listener_id_be: u32,
    pub addr: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<AllowV6>() == 20);

/// Value of `LB_GROUPS[group_id]`: where the group's consistent-hash table lives.
///
/// Double buffer: the agent writes the inactive half of `LB_TABLES`, then its size, then flips
/// `active`. Each of those writes changes only fields a reader of the active half ignores.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupValue {
    /// First slot in `LB_TABLES` of each half.
    pub table_base: [u32; 2],
    /// Slots in each half (0: the half is empty).
    pub table_size: [u32; 2],
    /// Which half new flows use (0 or 1).
    pub active: u32,
    /// `GROUP_F_*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<GroupValue>() == 24);

/// `stickiness = "source_ip"`: new flows hash the source address only.
pub const GROUP_F_STICKY_SOURCE: u32 = 1;

/// A slot of `LB_TABLES` that holds no target.
pub const NO_TARGET: u32 = u32::MAX;

/// Value of `LB_TARGETS[target_id]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetValue {
    pub addr: [u32; 4],
    pub port_be: u16,
    pub family: u8,
    /// `TARGET_*`: what happens to the flows already on this target.
    pub state: u8,
    /// Changes whenever the id is given to another target: a flow recorded with an older
    /// cookie belongs to a removed target.
    pub cookie: u32,
    /// `TARGET_F_*` bits.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<TargetValue>() == 32);

/// The target's endpoint serves more than one listener: new flows also record a
/// `LB_REPLY_FLOWS` entry so that replies find their VIP.
pub const TARGET_F_SHARED_ENDPOINT: u32 = 1;

/// Slot free, or target removed: its flows are rescheduled through the hash table.
pub const TARGET_REMOVED: u8 = 0;
/// Established flows keep going to the target (healthy, draining, unhealthy without
/// termination).
pub const TARGET_FORWARD: u8 = 1;
/// Established flows are moved to a target chosen by the hash table (for TCP the new target
/// answers with a reset, which terminates the connection quickly; UDP flows fail over).
pub const TARGET_RESCHEDULE: u8 = 2;
/// Established flows are dropped.
pub const TARGET_DROP: u8 = 3;

/// Value of `LB_REVERSE` (key: the target's endpoint): the source a reply leaves with.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReverseValue {
    pub vip_addr: [u32; 4],
    pub vip_port_be: u16,
    pub _pad: u16,
    pub listener_id: u32,
    /// `REVERSE_F_*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<ReverseValue>() == 28);

/// The target endpoint serves more than one listener: the reply's VIP comes from the
/// per-flow `LB_REPLY_FLOWS` entry, not from this value.
pub const REVERSE_F_AMBIGUOUS: u32 = 1;
/// The endpoint's one listener allows every source of the family (its `LISTENER_F_ALLOW_ALL_*`):
/// a reply to any address is plausible. Without it, a reply's destination must be one of the
/// listener's `allowed_sources`, or the packet is not a reply of balanced traffic.
pub const REVERSE_F_ALLOW_ALL_V4: u32 = 2;
pub const REVERSE_F_ALLOW_ALL_V6: u32 = 4;
/// The endpoint's listener is access-logged: every reply updates its flow's entry.
pub const REVERSE_F_ACCESS_LOG: u32 = 8;

/// A flow's 5-tuple: key of `LB_FLOWS` (client → VIP) and of `LB_REPLY_FLOWS`
/// (target → client).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_addr: [u32; 4],
    pub dst_addr: [u32; 4],
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub protocol: u8,
    pub family: u8,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

impl FlowKey {
    /// The key as the ten 32-bit words the flow hash consumes.
    #[inline(always)]
    pub fn words(&self) -> [u32; 10] {
        let a = &self.src_addr;
        let b = &self.dst_addr;
        [
            a[0],
            a[1],
            a[2],
            a[3],
            b[0],
            b[1],
            b[2],
            b[3],
            (self.src_port_be as u32) << 16 | self.dst_port_be as u32,
            (self.protocol as u32) << 8 | self.family as u32,
        ]
    }
}

/// Value of `LB_FLOWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    pub target_id: u32,
    /// The target's cookie when the flow was recorded.
    pub target_cookie: u32,
    pub listener_id: u32,
    /// Last time a packet was seen, in ticks of 2^30 ns of CLOCK_MONOTONIC; written only when
    /// it changes, so an established flow costs no map write per packet.
    pub last_seen_ticks: u32,
    /// `FLOW_F_*` bits.
    pub flags: u32,
    pub _pad: u32,
    /// The rest is kept only for an access-logged flow (`FLOW_F_LOG`): when it started
    /// (`bpf_ktime_get_coarse_ns`, CLOCK_MONOTONIC_COARSE), and its packets and bytes (whole
    /// frames as received) each way, client → target (`in`) and target → client (`out`).
    pub start_ns: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
}
const _: () = assert!(core::mem::size_of::<FlowValue>() == 64);

/// A FIN or RST was seen: the agent expires the entry after a short linger instead of the
/// listener's idle timeout, and a new SYN on the same tuple is scheduled afresh.
pub const FLOW_F_CLOSING: u32 = 1;
/// The flow is access-logged (its listener has `LISTENER_F_ACCESS_LOG`): its packets and bytes
/// are counted in the entry, and its start and end are sent to `LB_FLOW_EVENTS`.
pub const FLOW_F_LOG: u32 = 2;
/// The flow's end was sent to `LB_FLOW_EVENTS` (or the sweep logged it): never again.
pub const FLOW_F_LOGGED: u32 = 4;
/// A FIN from the client was seen.
pub const FLOW_F_FIN_IN: u32 = 8;
/// A FIN from the target was seen.
pub const FLOW_F_FIN_OUT: u32 = 16;
/// An RST was seen, either way.
pub const FLOW_F_RST: u32 = 32;
/// The target answered the connection (a SYN-ACK from it was seen).
pub const FLOW_F_ANSWERED: u32 = 64;
/// The client sent its SYN again before the target answered: counted once as unanswered.
pub const FLOW_F_SYN_RETRIED: u32 = 128;

/// Record of `LB_FLOW_EVENTS` (a BPF ring buffer): an access-logged flow started or ended.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `FLOW_EVENT_*`.
    pub kind: u32,
    /// `FLOW_END_*` for an end.
    pub reason: u32,
    /// When it happened (`bpf_ktime_get_coarse_ns`).
    pub time_ns: u64,
    pub key: FlowKey,
    /// The entry as it was then (counters included).
    pub value: FlowValue,
}
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 120);

pub const FLOW_EVENT_START: u32 = 1;
pub const FLOW_EVENT_END: u32 = 2;

/// Why a flow ended, as the data path (or the sweep) saw it.
pub const FLOW_END_FIN: u32 = 1;
pub const FLOW_END_RST: u32 = 2;
pub const FLOW_END_IDLE: u32 = 3;
/// Its target was removed (deregistered with `connection_termination_on_deregistration`, or
/// its group went away).
pub const FLOW_END_TARGET_REMOVED: u32 = 4;
pub const FLOW_END_EVICTED: u32 = 5;
/// Its target turned unhealthy, with `connection_termination_on_unhealthy`.
pub const FLOW_END_TARGET_UNHEALTHY: u32 = 6;

/// Value of `LB_TARGET_STATS` (per CPU, by target id): what the traffic says of a target.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetStats {
    /// Flows scheduled to it (flow-table entries created, or forwarded without one).
    pub new_flows: u64,
    /// TCP connections it answered (SYN-ACKs seen from it).
    pub answered: u64,
    /// RSTs it sent.
    pub resets: u64,
    /// Connections whose SYN the client sent again before the target answered.
    pub syns_unanswered: u64,
    /// Connections it refused: an RST before any SYN-ACK.
    pub refused: u64,
}
const _: () = assert!(core::mem::size_of::<TargetStats>() == 40);

/// `ns >> FLOW_TICK_SHIFT` is the tick count stored in `FlowValue::last_seen_ticks`.
pub const FLOW_TICK_SHIFT: u32 = 30;

/// Value of `LB_FLOOD[0]` (per CPU): flow-table entries this CPU created in the current
/// second, for `DataplaneConfig::flow_insert_limit`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InsertBudget {
    /// CLOCK_MONOTONIC seconds of the window.
    pub second: u64,
    /// Entries created in it.
    pub inserts: u64,
}
const _: () = assert!(core::mem::size_of::<InsertBudget>() == 16);

/// Key of `LB_REPLY_FRAGS`: one fragmented datagram from a target (RFC 791 / RFC 8200
/// reassembly key: source, destination, identification, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src_addr: [u32; 4],
    pub dst_addr: [u32; 4],
    /// IPv4 identification (16 bits, zero-extended) or IPv6 fragment identification, as read
    /// from the packet (network order).
    pub id: u32,
    pub protocol: u8,
    pub family: u8,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);

/// Value of `LB_REPLY_FRAGS`: how every fragment of the datagram leaves.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    /// The VIP the datagram's fragments leave with (its first fragment's reverse NAT).
    pub vip_addr: [u32; 4],
    pub listener_id: u32,
    /// `FRAG_F_*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<FragValue>() == 24);

/// The first fragment was a reply that could not be translated (dropped): drop the rest.
pub const FRAG_F_DROP: u32 = 1;

/// Value of `LB_IFACES[ifindex]`: what an interface XDP is attached to faces.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceValue {
    /// `IFACE_F_*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<IfaceValue>() == 4);

/// Replies from targets arrive here: reverse NAT (and ICMP from targets) applies only to
/// packets received on such an interface.
pub const IFACE_F_TARGETS: u32 = 1;

/// `LB_ROUTE_EPOCH[0]`: the routing state's epoch. The data path reuses a FIB answer (in
/// `LB_NEXT_HOPS`) only while the epoch it was stored under is current; the agent moves the
/// epoch on every change of routes, neighbours, links, rules or forwarding the kernel
/// announces, and sets it to `ROUTE_EPOCH_OFF` while FIB answers may depend on more than the
/// destination and the ingress interface (policy rules, multipath routes…).
pub const ROUTE_EPOCH_OFF: u32 = 0;

/// A value of the per-CPU `LB_NEXT_HOPS` cache: a FIB answer that said "forward", kept for
/// the next packets to the same destination arriving on the same interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// `LB_ROUTE_EPOCH` when the answer was stored (never `ROUTE_EPOCH_OFF`).
    pub epoch: u32,
    /// The interface the packet arrived on (part of the FIB question).
    pub ingress_ifindex: u32,
    /// The destination asked about.
    pub dst: [u32; 4],
    /// The answer: out of `ifindex`, from `smac` to `dmac`; packets up to `mtu` bytes.
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub mtu: u16,
    pub family: u8,
    pub _pad: u8,
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<NextHop>() == 48);

/// The `LB_NEXT_HOPS` slot of packets to target `target_id`.
#[inline(always)]
pub fn next_hop_slot_of_target(target_id: u32) -> u32 {
    target_id & (crate::maps::NEXT_HOP_SLOTS / 2 - 1)
}

/// The `LB_NEXT_HOPS` slot of replies to `client`.
#[inline(always)]
pub fn next_hop_slot_of_client(client: &[u32; 4]) -> u32 {
    crate::maps::NEXT_HOP_SLOTS / 2 + (addr_hash(client) & (crate::maps::NEXT_HOP_SLOTS / 2 - 1))
}

/// A cheap, unkeyed hash of an address, for direct-mapped tables where a collision costs a
/// lookup, never a wrong answer.
#[inline(always)]
pub fn addr_hash(addr: &[u32; 4]) -> u32 {
    let mut h =
        addr[0] ^ addr[1].rotate_left(8) ^ addr[2].rotate_left(16) ^ addr[3].rotate_left(24);
    // MurmurHash3's finaliser: every output bit depends on every input bit, so addresses that
    // differ only in their last byte (the word's top byte) spread over all buckets.
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Value of `LB_ADDR_FILTER[addr_filter_bucket(addr)]`: how many `LB_VIPS` entries and how
/// many `LB_REVERSE` entries (target endpoints) have an address that hashes to the bucket. A
/// packet whose destination's bucket counts no VIP is not to a VIP, and a TCP/UDP packet
/// whose source's bucket counts no target endpoint is not a reply: both skip the hash-map
/// lookups. The agent raises a count before it writes the entry it counts and lowers it only
/// after removing it, so a count is never lower than the kernel's entries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddrBucket {
    pub vips: u16,
    pub targets: u16,
}
const _: () = assert!(core::mem::size_of::<AddrBucket>() == 4);

/// The `LB_ADDR_FILTER` bucket of an address (of either family).
#[inline(always)]
pub fn addr_filter_bucket(addr: &[u32; 4]) -> u32 {
    addr_hash(addr) & (crate::maps::ADDR_FILTER_BUCKETS - 1)
}

/// Value of `LB_STATS[listener_id]` (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerStats {
    /// Client → target packets and bytes (direction "in").
    pub in_packets: u64,
    pub in_bytes: u64,
    /// Target → client replies (direction "out").
    pub out_packets: u64,
    pub out_bytes: u64,
    /// Flow-table entries created.
    pub new_flows: u64,
    pub _pad: u64,
}
const _: () = assert!(core::mem::size_of::<ListenerStats>() == 48);

/// Indices of `LB_COUNTERS` (per-CPU `u64`): drops by reason, then other events.
pub mod counter {
    /// A header toward a VIP is truncated or inconsistent (IHL < 5, lengths).
    pub const DROP_MALFORMED: u32 = 0;
    /// An IP fragment toward a VIP.
    pub const DROP_FRAGMENT: u32 = 1;
    /// An IPv6 packet toward a VIP with an extension header.
    pub const DROP_IPV6_EXTENSION: u32 = 2;
    /// To a VIP but no listener for that port and protocol (or not TCP/UDP/ICMP error).
    pub const DROP_NO_LISTENER: u32 = 3;
    /// The source is outside the listener's `allowed_sources`.
    pub const DROP_SOURCE_NOT_ALLOWED: u32 = 4;
    /// The listener's group has no target in its table.
    pub const DROP_NO_TARGET: u32 = 5;
    /// The flow's target is in `TARGET_DROP`.
    pub const DROP_TARGET_TERMINATED: u32 = 6;
    /// Data plane not configured yet.
    pub const DROP_NOT_READY: u32 = 7;
    /// Passed to the stack: TTL / hop limit would expire (the kernel sends time exceeded).
    pub const PASS_TTL_EXPIRED: u32 = 8;
    /// Passed to the stack after rewrite: next-hop neighbour unknown, the kernel resolves it.
    pub const PASS_NO_NEIGHBOUR: u32 = 9;
    /// Passed to the stack after rewrite: the FIB lookup failed otherwise (no route,
    /// forwarding disabled, egress not in the devmap…).
    pub const PASS_FIB_OTHER: u32 = 10;
    /// Flows whose target was removed or terminated and that were scheduled again.
    pub const FLOWS_RESCHEDULED: u32 = 11;
    /// The flow table refused an insert (the packet is still forwarded).
    pub const FLOW_INSERT_FAILED: u32 = 12;
    /// A reply from a target endpoint that serves several listeners, with no reply-flow entry:
    /// its VIP is unknown, so it is dropped rather than leaked with the target's address.
    pub const DROP_REPLY_UNKNOWN: u32 = 13;
    /// An ICMP error to a VIP that quotes no balanced flow, or any other ICMP to a VIP but
    /// echo and neighbour discovery.
    pub const DROP_ICMP_UNMATCHED: u32 = 14;
    /// A later fragment of a reply whose first fragment could not be translated.
    pub const DROP_REPLY_FRAGMENT: u32 = 15;
    /// Passed untouched: from a target endpoint but not a reply of balanced traffic: received
    /// on an interface that does not face targets (a forged or misrouted packet), or addressed
    /// outside the listener's `allowed_sources`.
    pub const PASS_NOT_A_REPLY: u32 = 16;
    /// New flows past `flow_insert_limit`: forwarded by the consistent hash without an entry.
    pub const FLOW_INSERT_SKIPPED: u32 = 17;
    /// Too big for the egress MTU: passed so that the kernel answers the sender with
    /// "fragmentation needed" / "packet too big" (DF set, IPv6), or fragments it (DF clear).
    pub const PASS_FRAG_NEEDED: u32 = 18;
    /// ICMP errors about a balanced flow forwarded to the flow's target.
    pub const ICMP_TO_TARGET: u32 = 19;
    /// ICMP errors from a target about a flow's packet, sent on to the client from the VIP.
    pub const ICMP_FROM_TARGET: u32 = 20;
    /// Fragments of replies reverse-NATed (the first included).
    pub const REPLY_FRAGMENTS: u32 = 21;
    /// Packets to a VIP too big for the target side with DF set (or IPv6): answered with
    /// "fragmentation needed" / "packet too big" from the VIP, quoting the client's packet.
    pub const ICMP_TOO_BIG_SENT: u32 = 22;
    /// Passed to the stack: the FIB (or the next-hop cache) sent the frame out of an interface
    /// `LB_DEVMAP` does not hold (removed meanwhile), so the redirect fell back to XDP_PASS.
    pub const REDIRECT_FAILED: u32 = 23;
    /// FIB answers the program has no case for (blackhole, unreachable or prohibited route,
    /// forwarding disabled on the ingress interface, …); those packets are also counted as
    /// `PASS_FIB_OTHER`.
    pub const FIB_UNEXPECTED: u32 = 24;
    /// Access-log records (flow starts and ends) lost because `LB_FLOW_EVENTS` was full.
    pub const FLOW_EVENTS_LOST: u32 = 25;
    pub const COUNT: u32 = 26;

    /// Prometheus `reason` label of each drop counter, by index.
    pub const DROP_REASONS: [(u32, &str); 11] = [
        (DROP_MALFORMED, "malformed"),
        (DROP_FRAGMENT, "fragment"),
        (DROP_IPV6_EXTENSION, "ipv6_extension_header"),
        (DROP_NO_LISTENER, "no_listener"),
        (DROP_SOURCE_NOT_ALLOWED, "source_not_allowed"),
        (DROP_NO_TARGET, "no_target"),
        (DROP_TARGET_TERMINATED, "target_terminated"),
        (DROP_NOT_READY, "not_ready"),
        (DROP_REPLY_UNKNOWN, "reply_unknown"),
        (DROP_ICMP_UNMATCHED, "icmp_unmatched"),
        (DROP_REPLY_FRAGMENT, "reply_fragment"),
    ];

    /// Prometheus `event` label of every other counter, by index.
    pub const EVENTS: [(u32, &str); 15] = [
        (PASS_TTL_EXPIRED, "pass_ttl_expired"),
        (PASS_NO_NEIGHBOUR, "pass_no_neighbour"),
        (PASS_FIB_OTHER, "pass_fib_other"),
        (PASS_NOT_A_REPLY, "pass_not_a_reply"),
        (PASS_FRAG_NEEDED, "pass_frag_needed"),
        (FLOWS_RESCHEDULED, "flow_rescheduled"),
        (FLOW_INSERT_FAILED, "flow_insert_failed"),
        (FLOW_INSERT_SKIPPED, "flow_insert_skipped"),
        (ICMP_TO_TARGET, "icmp_to_target"),
        (ICMP_FROM_TARGET, "icmp_from_target"),
        (REPLY_FRAGMENTS, "reply_fragment_translated"),
        (ICMP_TOO_BIG_SENT, "icmp_too_big_sent"),
        (REDIRECT_FAILED, "redirect_failed"),
        (FIB_UNEXPECTED, "fib_unexpected"),
        (FLOW_EVENTS_LOST, "flow_events_lost"),
    ];
}

#[cfg(test)]
mod tests {
    use super::counter::*;

    /// The addresses of one /24 (differing in the last byte only) fill the filter's buckets
    /// and the cache's client slots about as evenly as random ones would.
    #[test]
    fn addresses_of_one_subnet_spread_over_the_buckets() {
        let mut buckets = [0u32; crate::maps::ADDR_FILTER_BUCKETS as usize];
        let mut slots = [0u32; crate::maps::NEXT_HOP_SLOTS as usize];
        for last in 0..=255u8 {
            let a = [u32::from_ne_bytes([10, 1, 0, last]), 0, 0, 0];
            buckets[super::addr_filter_bucket(&a) as usize] += 1;
            slots[super::next_hop_slot_of_client(&a) as usize] += 1;
        }
        // 256 balls in 4096 (2048) bins: a few collide, none piles up.
        assert!(buckets.iter().filter(|&&n| n > 0).count() > 240);
        assert!(slots.iter().filter(|&&n| n > 0).count() > 230);
        assert!(buckets.iter().chain(slots.iter()).all(|&n| n <= 3));
    }

    #[test]
    fn every_counter_has_exactly_one_label() {
        let mut seen = [0u32; COUNT as usize];
        for (i, _) in DROP_REASONS.iter().chain(EVENTS.iter()) {
            seen[*i as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: each type is #[repr(C)], made only of integers and integer arrays, with every
    // padding byte an explicit field, so any bit pattern is valid and no byte is undefined.
    unsafe impl aya::Pod for DataplaneConfig {}
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipValue {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for ListenerValue {}
    unsafe impl aya::Pod for AllowV4 {}
    unsafe impl aya::Pod for AllowV6 {}
    unsafe impl aya::Pod for GroupValue {}
    unsafe impl aya::Pod for TargetValue {}
    unsafe impl aya::Pod for ReverseValue {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for ListenerStats {}
    unsafe impl aya::Pod for InsertBudget {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for IfaceValue {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for AddrBucket {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for TargetStats {}
}
