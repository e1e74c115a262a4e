//! Address and port rewriting with incremental checksum updates (RFC 1624).
//!
//! The L4 checksum covers the pseudo-header, so an address change updates it too. An IPv4 UDP
//! checksum of 0 means "none" and stays 0; a computed UDP checksum of 0 is sent as 0xffff.

use aya_ebpf::programs::XdpContext;
use lb_common::{csum, FAMILY_V4, PROTO_TCP, PROTO_UDP};

use crate::parse::{
    read, write, Packet, IPV4_CHECK, IPV4_DST, IPV4_SRC, IPV4_TTL, IPV6_DST, IPV6_NEXT_HDR,
    IPV6_SRC, L3_MASK, L4_DST_PORT, L4_MASK, L4_SRC_PORT, TCP_CHECK, UDP_CHECK,
};

/// Which end of the packet is rewritten.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Client → target: the VIP becomes the target.
    Destination,
    /// Target → client: the target becomes the VIP.
    Source,
}

/// Rewrites one end's address in the IP header (IPv4 header checksum fixed) and decrements
/// the TTL / hop limit when `forwarding` (a packet handed back to the stack keeps its TTL:
/// the kernel decrements it). Returns the checksum delta of the address change, for the
/// checksums that cover a pseudo-header (TCP, UDP, ICMPv6).
#[inline(always)]
pub fn rewrite_ip(
    ctx: &XdpContext,
    pkt: &Packet,
    end: End,
    addr: &[u32; 4],
    forwarding: bool,
) -> Option<u32> {
    let l3 = pkt.l3_off & L3_MASK;
    let old_addr = if end == End::Destination {
        &pkt.dst
    } else {
        &pkt.src
    };
    if pkt.family == FAMILY_V4 {
        let addr_off = l3
            + if end == End::Destination {
                IPV4_DST
            } else {
                IPV4_SRC
            };
        let delta = csum::acc32(0, old_addr[0], addr[0]);
        let mut ip_acc = delta;
        if forwarding {
            // TTL and protocol share a 16-bit word of the header checksum.
            let old_word = read::<[u8; 2]>(ctx, l3 + IPV4_TTL)?;
            let new_word = [old_word[0].wrapping_sub(1), old_word[1]];
            ip_acc = csum::acc16(
                ip_acc,
                u16::from_ne_bytes(old_word),
                u16::from_ne_bytes(new_word),
            );
            write(ctx, l3 + IPV4_TTL, new_word)?;
        }
        let ip_check = read::<u16>(ctx, l3 + IPV4_CHECK)?;
        write(ctx, l3 + IPV4_CHECK, csum::apply(ip_check, ip_acc))?;
        write(ctx, addr_off, addr[0])?;
        Some(delta)
    } else {
        let addr_off = l3
            + if end == End::Destination {
                IPV6_DST
            } else {
                IPV6_SRC
            };
        if forwarding {
            // Next header and hop limit, read as a pair (see `parse::read`).
            let word = read::<[u8; 2]>(ctx, l3 + IPV6_NEXT_HDR)?;
            write(ctx, l3 + IPV6_NEXT_HDR, [word[0], word[1].wrapping_sub(1)])?;
        }
        write(ctx, addr_off, *addr)?;
        Some(csum::acc_addr(0, old_addr, addr))
    }
}

/// Rewrites one end's address and port of a TCP/UDP packet (or first fragment), with every
/// checksum.
#[inline(always)]
pub fn rewrite(
    ctx: &XdpContext,
    pkt: &Packet,
    end: End,
    addr: &[u32; 4],
    port_be: u16,
    forwarding: bool,
) -> Option<()> {
    let l4 = pkt.l4_off & L4_MASK;
    let port_off = l4
        + if end == End::Destination {
            L4_DST_PORT
        } else {
            L4_SRC_PORT
        };
    let old_port = read::<u16>(ctx, port_off)?;
    let check_off = match pkt.protocol {
        PROTO_TCP => l4 + TCP_CHECK,
        PROTO_UDP => l4 + UDP_CHECK,
        _ => return None,
    };
    let old_check = read::<u16>(ctx, check_off)?;
    let delta = rewrite_ip(ctx, pkt, end, addr, forwarding)?;
    if !(pkt.protocol == PROTO_UDP && old_check == 0) {
        let acc = csum::acc16(delta, old_port, port_be);
        write(
            ctx,
            check_off,
            l4_check(pkt.protocol, csum::apply(old_check, acc)),
        )?;
    }
    write(ctx, port_off, port_be)
}

#[inline(always)]
pub fn l4_check(protocol: u8, check: u16) -> u16 {
    if protocol == PROTO_UDP && check == 0 {
        0xffff
    } else {
        check
    }
}
