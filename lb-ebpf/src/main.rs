//! The balancer's XDP program: listener traffic is forwarded to a target with the client's
//! address kept (NAT), target replies leave with the VIP as their source, everything else is
//! passed to the stack untouched. See README "Data path" and "Drop policy".
#![no_std]
#![no_main]

mod flow;
mod fwd;
mod maps;
mod nat;
mod parse;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    counter, AllowV4, AllowV6, EndpointKey, FlowKey, VipKey, CONFIG_F_READY, FAMILY_V4,
    LISTENER_F_ALLOW_ALL_V4, LISTENER_F_ALLOW_ALL_V6, PROTO_TCP, PROTO_UDP, REVERSE_F_AMBIGUOUS,
};

use aya_ebpf::maps::lpm_trie::Key as LpmKey;
use fwd::Route;
use maps::{
    LB_ALLOW_V4, LB_ALLOW_V6, LB_CONFIG, LB_LISTENERS, LB_REPLY_FLOWS, LB_REVERSE, LB_VIPS,
};
use nat::End;
use parse::{Packet, Ports, L3};
use stats::{count, traffic, Direction};

/// A verdict that ends processing early, with the counter to bump (if any).
enum Exit {
    Pass,
    Drop(u32),
    PassCounted(u32),
}

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match try_lb(&ctx) {
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

/// The floor for per-packet cost figures: the same object, doing nothing.
#[xdp]
pub fn lb_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn is_vip(addr: &[u32; 4], family: u8) -> bool {
    let key = VipKey {
        addr: *addr,
        family,
        _pad: [0; 3],
    };
    // SAFETY: read-only lookup of a plain value.
    unsafe { LB_VIPS.get(&key) }.is_some()
}

#[inline(always)]
fn try_lb(ctx: &XdpContext) -> Result<u32, Exit> {
    let pkt = match parse::ip(ctx) {
        L3::Ip(pkt) => pkt,
        L3::Other => return Err(Exit::Pass),
        L3::Malformed(dst, family) => {
            return Err(if is_vip(&dst, family) {
                Exit::Drop(counter::DROP_MALFORMED)
            } else {
                Exit::Pass
            })
        }
    };
    if is_vip(&pkt.dst, pkt.family) {
        to_vip(ctx, &pkt)
    } else {
        from_target(ctx, &pkt)
    }
}

/// A packet for a VIP: a listener's traffic is forwarded; everything else is dropped.
#[inline(always)]
fn to_vip(ctx: &XdpContext, pkt: &Packet) -> Result<u32, Exit> {
    if pkt.fragment {
        return Err(Exit::Drop(counter::DROP_FRAGMENT));
    }
    if pkt.family != FAMILY_V4 && parse::is_ipv6_extension(pkt.protocol) {
        return Err(Exit::Drop(counter::DROP_IPV6_EXTENSION));
    }
    if pkt.protocol == parse::IPPROTO_ICMPV6 {
        // Neighbour discovery for the VIP (types 133..=137) is the stack's business.
        let icmp_type =
            parse::read::<[u8; 2]>(ctx, pkt.l4_off & parse::L4_MASK).map_or(0, |b| b[0]);
        if (133..=137).contains(&icmp_type) {
            return Err(Exit::Pass);
        }
    }
    if pkt.protocol != PROTO_TCP && pkt.protocol != PROTO_UDP {
        return Err(Exit::Drop(counter::DROP_NO_LISTENER));
    }
    if !parse::ip_len_fits(ctx, pkt) {
        return Err(Exit::Drop(counter::DROP_MALFORMED));
    }
    let ports = parse::ports(ctx, pkt).ok_or(Exit::Drop(counter::DROP_MALFORMED))?;
    let lkey = EndpointKey {
        addr: pkt.dst,
        port_be: ports.dst_be,
        protocol: pkt.protocol,
        family: pkt.family,
    };
    // SAFETY: read-only lookup; the value is copied out.
    let listener =
        *unsafe { LB_LISTENERS.get(&lkey) }.ok_or(Exit::Drop(counter::DROP_NO_LISTENER))?;
    if !source_allowed(pkt, listener.listener_id, listener.flags) {
        return Err(Exit::Drop(counter::DROP_SOURCE_NOT_ALLOWED));
    }
    let config = LB_CONFIG
        .get(0)
        .ok_or(Exit::Drop(counter::DROP_NOT_READY))?;
    if config.flags & CONFIG_F_READY == 0 {
        return Err(Exit::Drop(counter::DROP_NOT_READY));
    }
    if pkt.ttl <= 1 {
        return Err(Exit::PassCounted(counter::PASS_TTL_EXPIRED));
    }
    let key = flow_key(pkt, &ports);
    let decision =
        flow::decide(&key, &listener, ports.tcp_flags, config.hash_key).map_err(Exit::Drop)?;
    let target = decision.target;
    if decision.new_flow {
        flow::record_reply(&key, &target, &listener);
    }
    traffic(
        listener.listener_id,
        Direction::In,
        frame_len(ctx),
        decision.new_flow,
    );
    deliver(
        ctx,
        pkt,
        End::Destination,
        &target.addr,
        target.port_be,
        &pkt.src,
        &target.addr,
    )
}

/// A packet not for a VIP: a target's reply is reverse-NATed; anything else is passed.
#[inline(always)]
fn from_target(ctx: &XdpContext, pkt: &Packet) -> Result<u32, Exit> {
    if pkt.later_fragment || (pkt.protocol != PROTO_TCP && pkt.protocol != PROTO_UDP) {
        return Err(Exit::Pass);
    }
    let ports = parse::ports(ctx, pkt).ok_or(Exit::Pass)?;
    let key = EndpointKey {
        addr: pkt.src,
        port_be: ports.src_be,
        protocol: pkt.protocol,
        family: pkt.family,
    };
    // SAFETY: read-only lookup; the value is copied out.
    let mut reverse = *unsafe { LB_REVERSE.get(&key) }.ok_or(Exit::Pass)?;
    if pkt.fragment || !parse::ip_len_fits(ctx, pkt) {
        return Err(Exit::Pass);
    }
    if reverse.flags & REVERSE_F_AMBIGUOUS != 0 {
        let reply_key = flow_key(pkt, &ports);
        // SAFETY: as above.
        reverse = *unsafe { LB_REPLY_FLOWS.get(&reply_key) }
            .ok_or(Exit::Drop(counter::DROP_REPLY_UNKNOWN))?;
    }
    if pkt.ttl <= 1 {
        return Err(Exit::PassCounted(counter::PASS_TTL_EXPIRED));
    }
    // Replies to this host itself (the agent's health checks) are not NATed: only a reply that
    // the FIB would forward is one of a balanced flow.
    let route = fwd::route(
        ctx,
        pkt.family,
        &reverse.vip_addr,
        &pkt.dst,
        pkt.tos,
        pkt.ip_len,
    );
    if matches!(route, Route::Local | Route::Other) {
        return Err(Exit::PassCounted(counter::PASS_FIB_OTHER));
    }
    traffic(reverse.listener_id, Direction::Out, frame_len(ctx), false);
    finish(
        ctx,
        pkt,
        End::Source,
        &reverse.vip_addr,
        reverse.vip_port_be,
        route,
    )
}

/// Routes toward `route_dst` (from `route_src`), then rewrites and sends.
#[inline(always)]
fn deliver(
    ctx: &XdpContext,
    pkt: &Packet,
    end: End,
    addr: &[u32; 4],
    port_be: u16,
    route_src: &[u32; 4],
    route_dst: &[u32; 4],
) -> Result<u32, Exit> {
    let route = fwd::route(ctx, pkt.family, route_src, route_dst, pkt.tos, pkt.ip_len);
    finish(ctx, pkt, end, addr, port_be, route)
}

#[inline(always)]
fn finish(
    ctx: &XdpContext,
    pkt: &Packet,
    end: End,
    addr: &[u32; 4],
    port_be: u16,
    route: Route,
) -> Result<u32, Exit> {
    match route {
        Route::Forward {
            ifindex,
            smac,
            dmac,
        } if fwd::can_send(ctx, ifindex) => {
            nat::rewrite(ctx, pkt, end, addr, port_be, true)
                .ok_or(Exit::Drop(counter::DROP_MALFORMED))?;
            Ok(fwd::send(ctx, ifindex, smac, dmac))
        }
        other => {
            // The stack finishes the job (resolves the neighbour, routes, delivers locally,
            // sends ICMP) with the rewritten packet, and decrements the TTL itself.
            nat::rewrite(ctx, pkt, end, addr, port_be, false)
                .ok_or(Exit::Drop(counter::DROP_MALFORMED))?;
            Err(Exit::PassCounted(match other {
                Route::NoNeighbour => counter::PASS_NO_NEIGHBOUR,
                _ => counter::PASS_FIB_OTHER,
            }))
        }
    }
}

#[inline(always)]
fn source_allowed(pkt: &Packet, listener_id: u32, flags: u32) -> bool {
    if pkt.family == FAMILY_V4 {
        if flags & LISTENER_F_ALLOW_ALL_V4 != 0 {
            return true;
        }
        let key = LpmKey::new(
            64,
            AllowV4 {
                listener_id_be: listener_id.to_be(),
                addr: pkt.src[0],
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
                addr: pkt.src,
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
    (ctx.data_end() - ctx.data()) as u64
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
