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
    pub _pad: u32,
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
}
const _: () = assert!(core::mem::size_of::<FlowValue>() == 24);

/// A FIN or RST was seen: the agent expires the entry after a short linger instead of the
/// listener's idle timeout, and a new SYN on the same tuple is scheduled afresh.
pub const FLOW_F_CLOSING: u32 = 1;

/// `ns >> FLOW_TICK_SHIFT` is the tick count stored in `FlowValue::last_seen_ticks`.
pub const FLOW_TICK_SHIFT: u32 = 30;

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
    /// To a VIP but no listener for that port and protocol (or not TCP/UDP).
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
    /// forwarding disabled, needs fragmentation…).
    pub const PASS_FIB_OTHER: u32 = 10;
    /// Flows whose target was removed or terminated and that were scheduled again.
    pub const FLOWS_RESCHEDULED: u32 = 11;
    /// The flow table refused an insert (the packet is still forwarded).
    pub const FLOW_INSERT_FAILED: u32 = 12;
    /// A reply for a target endpoint that serves several listeners, with no reply-flow entry.
    pub const PASS_REPLY_UNKNOWN: u32 = 13;
    pub const COUNT: u32 = 14;

    /// Prometheus `reason` label of each drop counter, by index.
    pub const DROP_REASONS: [(u32, &str); 8] = [
        (DROP_MALFORMED, "malformed"),
        (DROP_FRAGMENT, "fragment"),
        (DROP_IPV6_EXTENSION, "ipv6_extension_header"),
        (DROP_NO_LISTENER, "no_listener"),
        (DROP_SOURCE_NOT_ALLOWED, "source_not_allowed"),
        (DROP_NO_TARGET, "no_target"),
        (DROP_TARGET_TERMINATED, "target_terminated"),
        (DROP_NOT_READY, "not_ready"),
    ];
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
}
