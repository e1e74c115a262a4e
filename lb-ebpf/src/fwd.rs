//! Delivery: the FIB lookup that picks the next hop, and the verdict that sends the frame there.
//!
//! A FIB answer that says "forward" is kept per CPU in `LB_NEXT_HOPS` and reused for the next
//! packets to the same destination arriving on the same interface, while `LB_ROUTE_EPOCH` is
//! unchanged: the agent moves the epoch on every change of routing state the kernel announces
//! and sets it to `ROUTE_EPOCH_OFF` while answers may depend on more than the destination and
//! the ingress (policy rules, multipath routes), so a reused answer is the one the FIB would
//! give. A hit costs two inlined array reads instead of the FIB walk and the devmap lookup.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    helpers::generated::{bpf_fib_lookup, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{NextHop, FAMILY_V4, ROUTE_EPOCH_OFF};

use core::mem::offset_of;
use network_types::{eth::EthHdr, vlan::VlanHdr};

use crate::{
    events,
    maps::{LB_DEVMAP, LB_NEXT_HOPS, LB_ROUTE_EPOCH},
    parse::write,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NOT_FWDED: i64 = 4;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;
const BPF_FIB_LKUP_RET_FRAG_NEEDED: i64 = 8;

/// What the kernel's FIB says about a destination, seen from the ingress interface.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// Forward out of `ifindex` with `smac` and `dmac`.
    Forward,
    /// Routable, but the next hop's MAC is not known yet.
    NoNeighbour,
    /// Local delivery (the destination is this host) or not a unicast route.
    Local,
    /// Routable, but larger than the egress `mtu`.
    FragNeeded,
    /// Anything else: no route, forwarding disabled on the interface…
    Other,
}

/// A FIB answer. A plain struct with every field set on every path: LLVM spills the unset
/// fields of an enum's other variants as uninitialised registers, which the verifier refuses.
#[derive(Clone, Copy)]
pub struct Route {
    pub kind: RouteKind,
    /// `Forward` out of an interface XDP can send on (the ingress, or one in the devmap).
    pub sendable: bool,
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub mtu: u16,
}

/// Looks up the route from `src` to `dst` as a packet of `ip_len` bytes arriving on the
/// interface the packet came in on.
#[inline(always)]
pub fn route(
    ctx: &XdpContext,
    family: u8,
    src: &[u32; 4],
    dst: &[u32; 4],
    tos: u8,
    ip_len: u32,
) -> Route {
    // Zeroed in place by sixteen volatile word stores: LLVM turns any other zero-fill into a
    // call to `memset`, which in BPF is a byte loop (64 iterations on every forwarded packet).
    const _: () = assert!(core::mem::size_of::<FibParams>() == 64);
    const _: () = assert!(core::mem::align_of::<FibParams>() >= 4);
    let mut slot = core::mem::MaybeUninit::<FibParams>::uninit();
    let words = slot.as_mut_ptr() as *mut u32;
    for i in 0..16 {
        // SAFETY: `words` covers the 64 bytes of `slot`, which is at least 4-byte aligned.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    // SAFETY: every byte was written; all-zero is a valid FibParams (integers and unions).
    let p = unsafe { slot.assume_init_mut() };
    // SAFETY: reading the context field the kernel provides for XDP.
    p.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    p.__bindgen_anon_1.tot_len = ip_len.min(u16::MAX as u32) as u16;
    if family == FAMILY_V4 {
        p.family = AF_INET;
        p.__bindgen_anon_2.tos = tos;
        p.__bindgen_anon_3.ipv4_src = src[0];
        p.__bindgen_anon_4.ipv4_dst = dst[0];
    } else {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = *src;
        p.__bindgen_anon_4.ipv6_dst = *dst;
    }
    // SAFETY: `p` is a valid bpf_fib_lookup of the size passed; ctx is the program's context.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    // SAFETY: both fields of the union are u16; the kernel writes the MTU on FRAG_NEEDED.
    let mtu = unsafe { p.__bindgen_anon_1.mtu_result };
    let kind = match rc {
        BPF_FIB_LKUP_RET_SUCCESS => RouteKind::Forward,
        BPF_FIB_LKUP_RET_NO_NEIGH => RouteKind::NoNeighbour,
        BPF_FIB_LKUP_RET_NOT_FWDED => RouteKind::Local,
        BPF_FIB_LKUP_RET_FRAG_NEEDED => RouteKind::FragNeeded,
        _ => {
            events::fib_unexpected(rc, family, dst);
            RouteKind::Other
        }
    };
    Route {
        kind,
        sendable: kind == RouteKind::Forward && can_send(ctx, p.ifindex),
        ifindex: p.ifindex,
        smac: p.smac,
        dmac: p.dmac,
        mtu,
    }
}

/// `route`, answered from `LB_NEXT_HOPS[slot]` when the slot holds a current answer for
/// `dst` on this ingress and the packet fits its MTU; a FIB answer that forwards on an
/// interface XDP can send on is stored there for the next packets.
#[inline(always)]
pub fn route_cached(
    ctx: &XdpContext,
    slot: u32,
    family: u8,
    src: &[u32; 4],
    dst: &[u32; 4],
    tos: u8,
    ip_len: u32,
) -> Route {
    // Read before the FIB is asked: an answer stored under an epoch the agent has since moved
    // past is never used, even if the change raced with this lookup.
    let epoch = LB_ROUTE_EPOCH.get(0).copied().unwrap_or(ROUTE_EPOCH_OFF);
    if epoch == ROUTE_EPOCH_OFF {
        return route(ctx, family, src, dst, tos, ip_len);
    }
    // SAFETY: reading the context field the kernel provides for XDP.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let Some(entry) = LB_NEXT_HOPS.get_ptr_mut(slot) else {
        return route(ctx, family, src, dst, tos, ip_len);
    };
    // SAFETY: this CPU's value; XDP runs with preemption off, so nothing else writes it.
    let entry = unsafe { &mut *entry };
    if entry.epoch == epoch
        && entry.ingress_ifindex == ingress
        && entry.dst == *dst
        && entry.family == family
        && ip_len <= entry.mtu as u32
    {
        return Route {
            kind: RouteKind::Forward,
            sendable: true,
            ifindex: entry.ifindex,
            smac: entry.smac,
            dmac: entry.dmac,
            mtu: entry.mtu,
        };
    }
    let r = route(ctx, family, src, dst, tos, ip_len);
    // The kernel reports the route's MTU with a forwarding answer; 0 would mean it did not.
    if r.sendable && r.mtu != 0 {
        *entry = NextHop {
            epoch,
            ingress_ifindex: ingress,
            dst: *dst,
            ifindex: r.ifindex,
            smac: r.smac,
            dmac: r.dmac,
            mtu: r.mtu,
            family,
            _pad: 0,
            _pad2: 0,
        };
    }
    r
}

/// Can frames be sent out of `ifindex` from XDP (is it in the devmap, or the ingress)?
#[inline(always)]
pub fn can_send(ctx: &XdpContext, ifindex: u32) -> bool {
    // SAFETY: as in `route`.
    ifindex == unsafe { (*ctx.ctx).ingress_ifindex } || LB_DEVMAP.get(ifindex).is_some()
}

/// Sets the MAC addresses and sends the frame out of `ifindex`: back out of the ingress
/// interface with XDP_TX (one-arm), otherwise through the devmap. The FIB's egress is a
/// device XDP can send on, so an untagged one: a frame that came in with a VLAN tag
/// (`l3_off` past the Ethernet header) leaves without it.
#[inline(always)]
pub fn send(ctx: &XdpContext, l3_off: usize, ifindex: u32, smac: [u8; 6], dmac: [u8; 6]) -> u32 {
    let tag = if l3_off > EthHdr::LEN {
        VlanHdr::LEN
    } else {
        0
    };
    let (dst, src) = (offset_of!(EthHdr, dst_addr), offset_of!(EthHdr, src_addr));
    if write(ctx, tag + dst, dmac).is_none() || write(ctx, tag + src, smac).is_none() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: the context is the program's; moving the start forward past the old MACs and
    // tag leaves the new MACs followed by the inner ethertype.
    if tag != 0 && unsafe { bpf_xdp_adjust_head(ctx.ctx, tag as i32) } != 0 {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: as in `route`.
    if ifindex == unsafe { (*ctx.ctx).ingress_ifindex } {
        return xdp_action::XDP_TX;
    }
    match LB_DEVMAP.redirect(ifindex, xdp_action::XDP_PASS as u64) {
        Ok(action) => action,
        Err(action) => {
            events::redirect_failed(ifindex);
            action
        }
    }
}
