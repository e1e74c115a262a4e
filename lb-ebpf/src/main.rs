//! The balancer's XDP program: listener traffic is forwarded to a target with the client's
//! address kept (NAT), target replies leave with the VIP as their source, ICMP errors about
//! balanced flows are translated both ways, everything else is passed to the stack
//! untouched. See README "Data path" and "Drop policy".
#![no_std]
#![no_main]

mod conn;
mod events;
mod flow;
mod fwd;
mod icmp;
mod maps;
mod nat;
mod parse;
mod stats;
mod too_big;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    addr_filter_bucket, counter,
    maps::{TAIL_FRAGMENT, TAIL_ICMP_FROM_TARGET, TAIL_ICMP_TO_VIP, TAIL_TOO_BIG},
    next_hop_slot_of_client, next_hop_slot_of_target, AllowV4, AllowV6, DataplaneConfig,
    EndpointKey, FlowKey, FragKey, FragValue, ListenerValue, ReverseValue, VipKey, CONFIG_F_READY,
    FAMILY_V4, FRAG_F_DROP, IFACE_F_TARGETS, LISTENER_F_ALLOW_ALL_V4, LISTENER_F_ALLOW_ALL_V6,
    PROTO_TCP, PROTO_UDP, REVERSE_F_ACCESS_LOG, REVERSE_F_ALLOW_ALL_V4, REVERSE_F_ALLOW_ALL_V6,
    REVERSE_F_AMBIGUOUS,
};

use aya_ebpf::maps::lpm_trie::Key as LpmKey;
use fwd::{Route, RouteKind};
use maps::{
    LB_ADDR_FILTER, LB_ALLOW_V4, LB_ALLOW_V6, LB_CONFIG, LB_IFACES, LB_LISTENERS, LB_PROGS,
    LB_REPLY_FLOWS, LB_REPLY_FRAGS, LB_REVERSE, LB_SCRATCH, LB_VIPS,
};
use nat::End;
use parse::{Packet, Ports, L3, L4_MASK, TCP_FIN, TCP_RST, TCP_SYN};
use stats::{count, traffic, Direction};

/// A verdict that ends processing early, with the counter to bump (if any).
enum Exit {
    Pass,
    Drop(u32),
    PassCounted(u32),
}

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    verdict(try_lb(&ctx))
}

/// The XDP action of a path's result, with its counter bumped.
#[inline(always)]
fn verdict(result: Result<u32, Exit>) -> u32 {
    match result {
        Ok(action) => action,
        Err(Exit::Pass) => xdp_action::XDP_PASS,
        Err(Exit::PassCounted(c)) => {
            count(c);
            xdp_action::XDP_PASS
        }
        Err(Exit::Drop(c)) => {
            count(c);
            xdp_action::XDP_DROP
        }
    }
}

/// ICMP to a VIP (tail-called from `lb_xdp`).
#[xdp]
pub fn lb_xdp_icmp_in(ctx: XdpContext) -> u32 {
    verdict(parsed(&ctx).and_then(|pkt| icmp_to_vip(&ctx, &pkt)))
}

/// ICMP from the target side (tail-called from `lb_xdp`).
#[xdp]
pub fn lb_xdp_icmp_out(ctx: XdpContext) -> u32 {
    verdict(parsed(&ctx).and_then(|pkt| icmp_from_target(&ctx, &pkt)))
}

/// Fragments from the target side (tail-called from `lb_xdp`): IPv4 after the first, IPv6
/// with a fragment header.
#[xdp]
pub fn lb_xdp_fragment(ctx: XdpContext) -> u32 {
    verdict(parsed(&ctx).and_then(|pkt| {
        if pkt.family == FAMILY_V4 {
            later_fragment(&ctx, &pkt, pkt.id)
        } else {
            ipv6_fragment(&ctx, &pkt)
        }
    }))
}

/// A packet to a VIP too big for the target side, DF set (tail-called from `lb_xdp`, the MTU
/// in `LB_SCRATCH`): answered with "fragmentation needed" / "packet too big".
#[xdp]
pub fn lb_xdp_too_big(ctx: XdpContext) -> u32 {
    let mtu = LB_SCRATCH.get(0).copied().unwrap_or(0) as u16;
    verdict(parsed(&ctx).and_then(|pkt| {
        // Only a packet shorter than the quote gets `None`: not one that is too big.
        let action = too_big::answer(&ctx, &pkt, mtu).ok_or(Exit::Drop(counter::DROP_MALFORMED))?;
        // Counted only when the error really leaves (a failed head or tail move drops).
        if action == xdp_action::XDP_TX {
            count(counter::ICMP_TOO_BIG_SENT);
        }
        Ok(action)
    }))
}

/// Hands the packet to a rare path's program. A tail call replaces this program's frame (each
/// program has its own 512 bytes of stack) and costs no BPF function call on the hot path,
/// where calls are dear on machines with return-thunk mitigations. Only when `LB_PROGS` lacks
/// the entry does it return: `fallback` then decides.
#[inline(always)]
fn tail_call(ctx: &XdpContext, index: u32, fallback: Exit) -> Result<u32, Exit> {
    // SAFETY: the program's own context; on success this does not return.
    unsafe { LB_PROGS.tail_call(ctx, index) };
    Err(fallback)
}

/// The floor for per-packet cost figures: the same object, doing nothing.
#[xdp]
pub fn lb_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Could `addr` be a VIP? False only when no VIP's address shares its `LB_ADDR_FILTER`
/// bucket: then it certainly is not, and no hash map needs asking.
#[inline(always)]
fn may_be_vip(addr: &[u32; 4]) -> bool {
    LB_ADDR_FILTER
        .get(addr_filter_bucket(addr))
        .is_some_and(|b| b.vips != 0)
}

/// Could `addr` be a target's? As `may_be_vip`, for the target endpoints of `LB_REVERSE`.
#[inline(always)]
fn may_be_target(addr: &[u32; 4]) -> bool {
    LB_ADDR_FILTER
        .get(addr_filter_bucket(addr))
        .is_some_and(|b| b.targets != 0)
}

#[inline(always)]
fn is_vip(addr: &[u32; 4], family: u8) -> bool {
    may_be_vip(addr) && in_vips(addr, family)
}

#[inline(always)]
fn in_vips(addr: &[u32; 4], family: u8) -> bool {
    // Built as words: a struct literal zeroes the 3 padding bytes with a call to `memset`,
    // which in BPF is a byte loop.
    let words: [u32; 5] = [addr[0], addr[1], addr[2], addr[3], family as u32];
    // SAFETY: VipKey is repr(C), 20 bytes of integers: address words, then the family byte
    // and three zero padding bytes, which is what the little-endian fifth word holds.
    let key: VipKey = unsafe { core::mem::transmute(words) };
    // SAFETY: read-only lookup of a plain value.
    unsafe { LB_VIPS.get(&key) }.is_some()
}

#[inline(always)]
fn is_icmp(pkt: &Packet) -> bool {
    if pkt.family == FAMILY_V4 {
        pkt.protocol == parse::IPPROTO_ICMP
    } else {
        pkt.protocol == parse::IPPROTO_ICMPV6
    }
}

/// The packet's IP headers, or the verdict for a packet that has none to speak of.
#[inline(always)]
fn parsed(ctx: &XdpContext) -> Result<Packet, Exit> {
    match parse::ip(ctx) {
        L3::Ip(pkt) => Ok(pkt),
        L3::Other => Err(Exit::Pass),
        L3::Malformed(dst, family) => Err(if is_vip(&dst, family) {
            Exit::Drop(counter::DROP_MALFORMED)
        } else {
            Exit::Pass
        }),
    }
}

#[inline(always)]
fn try_lb(ctx: &XdpContext) -> Result<u32, Exit> {
    let pkt = parsed(ctx)?;
    if !may_be_vip(&pkt.dst) {
        return from_target(ctx, &pkt);
    }
    // A listener's traffic, found by its listener alone: a listener is written only once its
    // VIP is, so its entry says the destination is a VIP, and the common case costs one
    // hash lookup instead of two. Anything else takes the long way.
    if !pkt.fragment && (pkt.protocol == PROTO_TCP || pkt.protocol == PROTO_UDP) {
        if let Some(header) = parse::l4(ctx, &pkt) {
            if header.consistent {
                let lkey = listener_key(&pkt, &header.ports);
                // SAFETY: read-only lookup; the value is copied out.
                if let Some(listener) = unsafe { LB_LISTENERS.get(&lkey) } {
                    let listener = *listener;
                    return to_listener(ctx, &pkt, &header.ports, &lkey, listener);
                }
            }
        }
    }
    if in_vips(&pkt.dst, pkt.family) {
        // Fragments of ICMP are `dropped_at_vip`'s to drop.
        if is_icmp(&pkt) && !pkt.fragment {
            return tail_call(
                ctx,
                TAIL_ICMP_TO_VIP,
                Exit::Drop(counter::DROP_ICMP_UNMATCHED),
            );
        }
        Err(dropped_at_vip(ctx, &pkt))
    } else {
        from_target(ctx, &pkt)
    }
}

/// The listener of `lkey` (a VIP endpoint), when `client` is one of its allowed sources, and
/// the data plane's config once it is ready; else the drop counter that says why.
#[inline(always)]
fn listener_for(
    lkey: &EndpointKey,
    client: &[u32; 4],
    no_listener: u32,
    not_allowed: u32,
) -> Result<(ListenerValue, &'static DataplaneConfig), Exit> {
    // SAFETY: read-only lookup; the value is copied out.
    let listener = *unsafe { LB_LISTENERS.get(lkey) }.ok_or(Exit::Drop(no_listener))?;
    admitted(lkey, client, listener, not_allowed)
}

/// `listener` with the data plane's config, when `client` is one of its allowed sources and
/// the config is ready.
#[inline(always)]
fn admitted(
    lkey: &EndpointKey,
    client: &[u32; 4],
    listener: ListenerValue,
    not_allowed: u32,
) -> Result<(ListenerValue, &'static DataplaneConfig), Exit> {
    if !source_allowed(client, lkey.family, listener.listener_id, listener.flags) {
        return Err(Exit::Drop(not_allowed));
    }
    Ok((listener, ready_config()?))
}

/// The `LB_LISTENERS` key of a packet to a VIP.
#[inline(always)]
fn listener_key(pkt: &Packet, ports: &Ports) -> EndpointKey {
    EndpointKey {
        addr: pkt.dst,
        port_be: ports.dst_be,
        protocol: pkt.protocol,
        family: pkt.family,
    }
}

#[inline(always)]
fn ready_config() -> Result<&'static DataplaneConfig, Exit> {
    let config = LB_CONFIG
        .get(0)
        .ok_or(Exit::Drop(counter::DROP_NOT_READY))?;
    if config.flags & CONFIG_F_READY == 0 {
        return Err(Exit::Drop(counter::DROP_NOT_READY));
    }
    Ok(config)
}

/// A packet for a VIP, neither ICMP nor taken by a listener (whole, consistent TCP/UDP finds
/// its listener in `try_lb`): dropped, with the reason.
#[inline(always)]
fn dropped_at_vip(ctx: &XdpContext, pkt: &Packet) -> Exit {
    Exit::Drop(if pkt.fragment {
        counter::DROP_FRAGMENT
    } else if pkt.family != FAMILY_V4 && parse::is_ipv6_extension(pkt.protocol) {
        counter::DROP_IPV6_EXTENSION
    } else if pkt.protocol != PROTO_TCP && pkt.protocol != PROTO_UDP {
        counter::DROP_NO_LISTENER
    } else {
        match parse::l4(ctx, pkt) {
            Some(h) if h.consistent => counter::DROP_NO_LISTENER,
            _ => counter::DROP_MALFORMED,
        }
    })
}

/// A TCP/UDP packet for `listener` (at `lkey`): forwarded to a target of its group.
#[inline(always)]
fn to_listener(
    ctx: &XdpContext,
    pkt: &Packet,
    ports: &Ports,
    lkey: &EndpointKey,
    listener: ListenerValue,
) -> Result<u32, Exit> {
    let (listener, config) = admitted(lkey, &pkt.src, listener, counter::DROP_SOURCE_NOT_ALLOWED)?;
    if pkt.ttl <= 1 {
        return Err(Exit::PassCounted(counter::PASS_TTL_EXPIRED));
    }
    let key = flow_key(pkt, ports);
    let len = frame_len(ctx);
    let decision =
        flow::decide(&key, &listener, ports.tcp_flags, config, len).map_err(Exit::Drop)?;
    let target = decision.target;
    traffic(listener.listener_id, Direction::In, len, decision.new_flow);
    let route = fwd::route_cached(
        ctx,
        next_hop_slot_of_target(decision.target_id),
        pkt.family,
        &pkt.src,
        &target.addr,
        pkt.tos,
        pkt.ip_len,
    );
    if route.kind == RouteKind::FragNeeded {
        let mtu = route.mtu;
        if pkt.dont_fragment {
            // The client must hear it about its own packet (to the VIP): answered from the
            // VIP by `lb_xdp_too_big`; without it, the stack's error would quote the
            // translated packet, which the client cannot match.
            if let Some(slot) = LB_SCRATCH.get_ptr_mut(0) {
                // SAFETY: this CPU's value; XDP runs with preemption off.
                unsafe { *slot = mtu as u32 };
                // SAFETY: the program's own context; on success this does not return.
                unsafe { LB_PROGS.tail_call(ctx, TAIL_TOO_BIG) };
            }
        }
    }
    finish(
        ctx,
        pkt,
        route,
        false,
        Rewrite::Ports {
            end: End::Destination,
            addr: &target.addr,
            port_be: target.port_be,
        },
    )
}

/// An ICMP message for a VIP: an error about a reply of a balanced flow goes to the flow's
/// target (found like the flow's packets: flow table, else the group's table); echo is dropped
/// as `no_listener`, anything else as `icmp_unmatched`.
#[inline(always)]
fn icmp_to_vip(ctx: &XdpContext, pkt: &Packet) -> Result<u32, Exit> {
    let head = parse::read::<[u8; 4]>(ctx, pkt.l4_off & L4_MASK)
        .ok_or(Exit::Drop(counter::DROP_MALFORMED))?;
    match icmp::kind(pkt.family, head[0]) {
        icmp::Kind::Error => {}
        icmp::Kind::NeighbourDiscovery => return Err(Exit::Pass),
        icmp::Kind::Echo => return Err(Exit::Drop(counter::DROP_NO_LISTENER)),
        icmp::Kind::Other => return Err(Exit::Drop(counter::DROP_ICMP_UNMATCHED)),
    }
    if !parse::ip_len_fits(ctx, pkt) {
        return Err(Exit::Drop(counter::DROP_MALFORMED));
    }
    let q = icmp::quote(ctx, pkt).map_err(Exit::Drop)?;
    // A reply of a balanced flow: from this VIP, to a client.
    if q.src != pkt.dst {
        return Err(Exit::Drop(counter::DROP_ICMP_UNMATCHED));
    }
    let lkey = EndpointKey {
        addr: q.src,
        port_be: q.src_port_be,
        protocol: q.protocol,
        family: pkt.family,
    };
    let (listener, config) = listener_for(
        &lkey,
        &q.dst,
        counter::DROP_ICMP_UNMATCHED,
        counter::DROP_ICMP_UNMATCHED,
    )?;
    if pkt.ttl <= 1 {
        return Err(Exit::PassCounted(counter::PASS_TTL_EXPIRED));
    }
    // The flow's own key: client → VIP, the quoted reply turned around.
    let key = q.reversed_key(pkt.family);
    let target =
        flow::lookup(&key, &listener, config).ok_or(Exit::Drop(counter::DROP_ICMP_UNMATCHED))?;
    count(counter::ICMP_TO_TARGET);
    traffic(listener.listener_id, Direction::In, frame_len(ctx), false);
    let route = fwd::route(ctx, pkt.family, &pkt.src, &target.addr, pkt.tos, pkt.ip_len);
    finish(
        ctx,
        pkt,
        route,
        false,
        Rewrite::Icmp {
            quote: &q,
            outer: End::Destination,
            inner: End::Source,
            addr: &target.addr,
            port_be: target.port_be,
        },
    )
}

/// Rewrites an ICMP error: the outer `outer` end becomes `addr`, the quote's `inner` end
/// becomes `addr`:`port_be`, every checksum follows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn translate_icmp(
    ctx: &XdpContext,
    pkt: &Packet,
    q: &icmp::Quote,
    outer: End,
    inner: End,
    addr: &[u32; 4],
    port_be: u16,
    forwarding: bool,
) -> Option<()> {
    let quote_delta = icmp::rewrite_quote(ctx, pkt, q, inner, addr, port_be)?;
    let pseudo_delta = nat::rewrite_ip(ctx, pkt, outer, addr, forwarding)?;
    // ICMPv6's checksum covers a pseudo-header with the outer addresses; ICMPv4's does not.
    let delta = if pkt.family == FAMILY_V4 {
        quote_delta
    } else {
        quote_delta + pseudo_delta
    };
    icmp::update_checksum(ctx, pkt, delta)
}

/// Is the packet received on an interface that faces targets?
#[inline(always)]
fn from_target_side(ctx: &XdpContext) -> bool {
    // SAFETY: reading the context field the kernel provides for XDP.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    // SAFETY: read-only lookup.
    unsafe { LB_IFACES.get(&ifindex) }.is_some_and(|v| v.flags & IFACE_F_TARGETS != 0)
}

/// May a reply of the listener in `reverse` go to `dst`? Replies go to clients, and clients
/// are the listener's allowed sources.
#[inline(always)]
fn reply_allowed(reverse: &ReverseValue, dst: &[u32; 4], family: u8) -> bool {
    let all = if family == FAMILY_V4 {
        REVERSE_F_ALLOW_ALL_V4
    } else {
        REVERSE_F_ALLOW_ALL_V6
    };
    reverse.flags & all != 0 || source_allowed(dst, family, reverse.listener_id, 0)
}

/// A packet not for a VIP: a target's reply (every fragment of it) or ICMP error about a
/// balanced flow is reverse-NATed; anything else is passed.
#[inline(always)]
fn from_target(ctx: &XdpContext, pkt: &Packet) -> Result<u32, Exit> {
    if is_icmp(pkt) {
        return if pkt.fragment {
            Err(Exit::Pass)
        } else {
            tail_call(ctx, TAIL_ICMP_FROM_TARGET, Exit::Pass)
        };
    }
    let later_v4 = pkt.family == FAMILY_V4 && pkt.later_fragment;
    if later_v4 || (pkt.family != FAMILY_V4 && pkt.protocol == parse::IPPROTO_FRAGMENT) {
        return tail_call(ctx, TAIL_FRAGMENT, Exit::Pass);
    }
    if pkt.protocol != PROTO_TCP && pkt.protocol != PROTO_UDP {
        return Err(Exit::Pass);
    }
    let frag = (pkt.family == FAMILY_V4 && pkt.fragment).then_some(pkt.id);
    reply(ctx, pkt, frag)
}

/// An IPv6 packet with a fragment header from a target: a first fragment is a reply like any
/// other, the later ones follow it.
#[inline(always)]
fn ipv6_fragment(ctx: &XdpContext, pkt: &Packet) -> Result<u32, Exit> {
    // Next header, reserved, offset and flags, identification (hand-written: network-types has
    // no IPv6 fragment header).
    let fh = parse::read::<[u8; 8]>(ctx, pkt.l4_off & L4_MASK).ok_or(Exit::Pass)?;
    let id = u32::from_ne_bytes([fh[4], fh[5], fh[6], fh[7]]);
    let inner = Packet {
        protocol: fh[0],
        l4_off: ((pkt.l4_off & L4_MASK) + 8) & L4_MASK,
        ..*pkt
    };
    if u16::from_be_bytes([fh[2], fh[3]]) >> 3 != 0 {
        return later_fragment(ctx, &inner, id);
    }
    if inner.protocol != PROTO_TCP && inner.protocol != PROTO_UDP {
        return Err(Exit::Pass);
    }
    reply(ctx, &inner, Some(id))
}

#[inline(always)]
fn frag_key(pkt: &Packet, id: u32) -> FragKey {
    FragKey {
        src_addr: pkt.src,
        dst_addr: pkt.dst,
        id,
        protocol: pkt.protocol,
        family: pkt.family,
        _pad: 0,
    }
}

/// A TCP/UDP packet (or first fragment, `frag` its identification) that may be a target's
/// reply.
#[inline(always)]
fn reply(ctx: &XdpContext, pkt: &Packet, frag: Option<u32>) -> Result<u32, Exit> {
    if !may_be_target(&pkt.src) {
        return Err(Exit::Pass);
    }
    let header = parse::l4(ctx, pkt).ok_or(Exit::Pass)?;
    let ports = header.ports;
    let key = EndpointKey {
        addr: pkt.src,
        port_be: ports.src_be,
        protocol: pkt.protocol,
        family: pkt.family,
    };
    // SAFETY: read-only lookup; the value is copied out.
    let reverse = *unsafe { LB_REVERSE.get(&key) }.ok_or(Exit::Pass)?;
    if !from_target_side(ctx) {
        return Err(Exit::PassCounted(counter::PASS_NOT_A_REPLY));
    }
    // A first fragment's L4 lengths are the whole datagram's.
    let valid = if frag.is_some() {
        parse::ip_len_fits(ctx, pkt)
    } else {
        header.consistent
    };
    if !valid {
        return Err(Exit::Drop(counter::DROP_MALFORMED));
    }
    let (reverse, route) = match reply_way(ctx, pkt, &reverse, &flow_key(pkt, &ports)) {
        Err(Exit::Drop(counter::DROP_REPLY_UNKNOWN)) => {
            if let Some(id) = frag {
                remember_fragments(pkt, id, &reverse, FRAG_F_DROP);
            }
            return Err(Exit::Drop(counter::DROP_REPLY_UNKNOWN));
        }
        way => way?,
    };
    if let Some(id) = frag {
        remember_fragments(pkt, id, &reverse, 0);
        count(counter::REPLY_FRAGMENTS);
    }
    let len = frame_len(ctx);
    if ports.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0
        || reverse.flags & REVERSE_F_ACCESS_LOG != 0
    {
        // The flow's own key: client → VIP.
        let key = FlowKey {
            src_addr: pkt.dst,
            dst_addr: reverse.vip_addr,
            src_port_be: ports.dst_be,
            dst_port_be: reverse.vip_port_be,
            protocol: pkt.protocol,
            family: pkt.family,
            _pad: 0,
        };
        conn::from_target(&key, ports.tcp_flags, len);
    }
    traffic(reverse.listener_id, Direction::Out, len, false);
    finish(
        ctx,
        pkt,
        route,
        pkt.dont_fragment,
        Rewrite::Ports {
            end: End::Source,
            addr: &reverse.vip_addr,
            port_be: reverse.vip_port_be,
        },
    )
}

/// Where a packet from the target side (a reply, or an ICMP error about a forwarded packet)
/// goes, and with which VIP: the listener of its endpoint, or for an endpoint serving several
/// listeners the one its flow recorded under `reply_key` (target → client). Not a reply when
/// addressed outside the listener's `allowed_sources`; not NATed when addressed to this host
/// (the agent's health checks) or unroutable.
#[inline(always)]
fn reply_way(
    ctx: &XdpContext,
    pkt: &Packet,
    reverse: &ReverseValue,
    reply_key: &FlowKey,
) -> Result<(ReverseValue, Route), Exit> {
    let reverse = if reverse.flags & REVERSE_F_AMBIGUOUS != 0 {
        // SAFETY: read-only lookup; the value is copied out.
        *unsafe { LB_REPLY_FLOWS.get(reply_key) }.ok_or(Exit::Drop(counter::DROP_REPLY_UNKNOWN))?
    } else if reply_allowed(reverse, &pkt.dst, pkt.family) {
        *reverse
    } else {
        return Err(Exit::PassCounted(counter::PASS_NOT_A_REPLY));
    };
    if pkt.ttl <= 1 {
        return Err(Exit::PassCounted(counter::PASS_TTL_EXPIRED));
    }
    let route = fwd::route_cached(
        ctx,
        next_hop_slot_of_client(&pkt.dst),
        pkt.family,
        &reverse.vip_addr,
        &pkt.dst,
        pkt.tos,
        pkt.ip_len,
    );
    if matches!(route.kind, RouteKind::Local | RouteKind::Other) {
        return Err(Exit::PassCounted(counter::PASS_FIB_OTHER));
    }
    Ok((reverse, route))
}

/// Records how the rest of a fragmented reply leaves (or that it is dropped).
#[inline(always)]
fn remember_fragments(pkt: &Packet, id: u32, reverse: &ReverseValue, flags: u32) {
    let value = FragValue {
        vip_addr: reverse.vip_addr,
        listener_id: reverse.listener_id,
        flags,
    };
    if let Err(e) = LB_REPLY_FRAGS.insert(&frag_key(pkt, id), &value, 0) {
        events::insert_failed(events::Table::ReplyFrags, e);
    }
}

/// A fragment after the first (no L4 header): reverse-NATed like its first fragment was.
#[inline(always)]
fn later_fragment(ctx: &XdpContext, pkt: &Packet, id: u32) -> Result<u32, Exit> {
    // SAFETY: read-only lookup; the value is copied out.
    let v = *unsafe { LB_REPLY_FRAGS.get(&frag_key(pkt, id)) }.ok_or(Exit::Pass)?;
    if !from_target_side(ctx) {
        return Err(Exit::PassCounted(counter::PASS_NOT_A_REPLY));
    }
    if v.flags & FRAG_F_DROP != 0 {
        return Err(Exit::Drop(counter::DROP_REPLY_FRAGMENT));
    }
    if !parse::ip_len_fits(ctx, pkt) {
        return Err(Exit::Drop(counter::DROP_MALFORMED));
    }
    if pkt.ttl <= 1 {
        return Err(Exit::PassCounted(counter::PASS_TTL_EXPIRED));
    }
    let route = fwd::route(ctx, pkt.family, &v.vip_addr, &pkt.dst, pkt.tos, pkt.ip_len);
    if matches!(route.kind, RouteKind::Local | RouteKind::Other) {
        return Err(Exit::PassCounted(counter::PASS_FIB_OTHER));
    }
    count(counter::REPLY_FRAGMENTS);
    traffic(v.listener_id, Direction::Out, frame_len(ctx), false);
    finish(
        ctx,
        pkt,
        route,
        pkt.dont_fragment,
        Rewrite::Source { addr: &v.vip_addr },
    )
}

/// An ICMP error sent by a target (or a router on its side) about a packet this balancer
/// forwarded (quote C:cp → T:tp): it leaves from the VIP, quoting C:cp → VIP:vp.
#[inline(always)]
fn icmp_from_target(ctx: &XdpContext, pkt: &Packet) -> Result<u32, Exit> {
    let head = parse::read::<[u8; 4]>(ctx, pkt.l4_off & L4_MASK).ok_or(Exit::Pass)?;
    if icmp::kind(pkt.family, head[0]) != icmp::Kind::Error || !parse::ip_len_fits(ctx, pkt) {
        return Err(Exit::Pass);
    }
    let q = icmp::quote(ctx, pkt).map_err(|_| Exit::Pass)?;
    let key = EndpointKey {
        addr: q.dst,
        port_be: q.dst_port_be,
        protocol: q.protocol,
        family: pkt.family,
    };
    // SAFETY: read-only lookup; the value is copied out.
    let reverse = *unsafe { LB_REVERSE.get(&key) }.ok_or(Exit::Pass)?;
    // About a packet to the target from the client this error goes to.
    if q.src != pkt.dst {
        return Err(Exit::Pass);
    }
    if !from_target_side(ctx) {
        return Err(Exit::PassCounted(counter::PASS_NOT_A_REPLY));
    }
    // The reply-flow key (target → client): the quoted packet turned around.
    let reply_key = q.reversed_key(pkt.family);
    let (reverse, route) = reply_way(ctx, pkt, &reverse, &reply_key)?;
    count(counter::ICMP_FROM_TARGET);
    traffic(reverse.listener_id, Direction::Out, frame_len(ctx), false);
    finish(
        ctx,
        pkt,
        route,
        true,
        Rewrite::Icmp {
            quote: &q,
            outer: End::Source,
            inner: End::Destination,
            addr: &reverse.vip_addr,
            port_be: reverse.vip_port_be,
        },
    )
}

/// How a packet is rewritten on its way out.
enum Rewrite<'a> {
    /// TCP/UDP (or a first fragment): one end's address and port.
    Ports {
        end: End,
        addr: &'a [u32; 4],
        port_be: u16,
    },
    /// A later fragment: the source address only.
    Source { addr: &'a [u32; 4] },
    /// An ICMP error: the outer `outer` end and the quote's `inner` end.
    Icmp {
        quote: &'a icmp::Quote,
        outer: End,
        inner: End,
        addr: &'a [u32; 4],
        port_be: u16,
    },
}

/// Rewrites (with `forwarding` when XDP sends the frame itself) and sends, or hands the
/// rewritten packet to the stack: it resolves the neighbour, routes, fragments or sends ICMP
/// errors, and decrements the TTL itself. `untouched_if_too_big`: a packet too big for the
/// egress goes to the stack as it came, so that the kernel's "fragmentation needed" / "packet
/// too big" quotes the packet its sender sent (a reply with DF set, or IPv6).
#[inline(always)]
fn finish(
    ctx: &XdpContext,
    pkt: &Packet,
    route: Route,
    untouched_if_too_big: bool,
    rewrite: Rewrite,
) -> Result<u32, Exit> {
    let (send, pass_counter) = match route.kind {
        RouteKind::Forward if route.sendable => (true, 0),
        RouteKind::FragNeeded if untouched_if_too_big => {
            return Err(Exit::PassCounted(counter::PASS_FRAG_NEEDED))
        }
        RouteKind::FragNeeded => (false, counter::PASS_FRAG_NEEDED),
        RouteKind::NoNeighbour => (false, counter::PASS_NO_NEIGHBOUR),
        _ => (false, counter::PASS_FIB_OTHER),
    };
    let forwarding = send;
    match rewrite {
        Rewrite::Ports { end, addr, port_be } => {
            nat::rewrite(ctx, pkt, end, addr, port_be, forwarding)
        }
        Rewrite::Source { addr } => {
            nat::rewrite_ip(ctx, pkt, End::Source, addr, forwarding).map(|_| ())
        }
        Rewrite::Icmp {
            quote,
            outer,
            inner,
            addr,
            port_be,
        } => translate_icmp(ctx, pkt, quote, outer, inner, addr, port_be, forwarding),
    }
    .ok_or(Exit::Drop(counter::DROP_MALFORMED))?;
    if send {
        Ok(fwd::send(
            ctx,
            pkt.l3_off,
            route.ifindex,
            route.smac,
            route.dmac,
        ))
    } else {
        Err(Exit::PassCounted(pass_counter))
    }
}

#[inline(always)]
fn source_allowed(src: &[u32; 4], family: u8, listener_id: u32, flags: u32) -> bool {
    if family == FAMILY_V4 {
        if flags & LISTENER_F_ALLOW_ALL_V4 != 0 {
            return true;
        }
        let key = LpmKey::new(
            64,
            AllowV4 {
                listener_id_be: listener_id.to_be(),
                addr: src[0],
            },
        );
        LB_ALLOW_V4.get(&key).is_some()
    } else {
        if flags & LISTENER_F_ALLOW_ALL_V6 != 0 {
            return true;
        }
        let key = LpmKey::new(
            160,
            AllowV6 {
                listener_id_be: listener_id.to_be(),
                addr: *src,
            },
        );
        LB_ALLOW_V6.get(&key).is_some()
    }
}

#[inline(always)]
fn flow_key(pkt: &Packet, ports: &Ports) -> FlowKey {
    FlowKey {
        src_addr: pkt.src,
        dst_addr: pkt.dst,
        src_port_be: ports.src_be,
        dst_port_be: ports.dst_be,
        protocol: pkt.protocol,
        family: pkt.family,
        _pad: 0,
    }
}

#[inline(always)]
fn frame_len(ctx: &XdpContext) -> u64 {
    let (start, end) = parse::bounds(ctx);
    (end - start) as u64
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
