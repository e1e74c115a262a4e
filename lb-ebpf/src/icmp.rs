//! ICMP errors about balanced flows (RFC 792, RFC 4443): what kind a message is, the packet
//! an error quotes, and the rewrite of that quote.
//!
//! An error about a reply (quote VIP:vp → C:cp, sent to the VIP by a router beyond the
//! balancer) is forwarded to the flow's target with the quote's source made T:tp; an error a
//! target sends about a forwarded packet (quote C:cp → T:tp) leaves from the VIP with the
//! quote's destination made VIP:vp. Either way the quote reads as the packet its receiver
//! sent, so the receiver's stack finds the socket (and learns a path MTU).

use core::mem::offset_of;
use lb_common::{counter, csum, FlowKey, FAMILY_V4, PROTO_TCP, PROTO_UDP};
use network_types::{
    icmp::{Icmpv4Hdr, Icmpv6Hdr},
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    nat::{l4_check, End},
    parse::{
        read, words, write, Packet, IPV4_CHECK, IPV4_DST, IPV4_SRC, IPV6_DST, IPV6_SRC, L3_MASK,
        L4_DST_PORT, L4_MASK, L4_SRC_PORT, TCP_CHECK, UDP_CHECK,
    },
};

/// The ICMP header before the quote: type, code, checksum, 4 bytes (the same in ICMPv6).
const ICMP_HLEN: usize = Icmpv4Hdr::LEN;
const ICMP_CHECK: usize = offset_of!(Icmpv4Hdr, check);
const _: () = assert!(Icmpv6Hdr::LEN == ICMP_HLEN && offset_of!(Icmpv6Hdr, check) == ICMP_CHECK);

/// What an ICMP message to a VIP is, for the drop policy.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Destination unreachable (fragmentation needed included), packet too big, time
    /// exceeded: about a packet the VIP sent.
    Error,
    /// Echo request: NLB does not answer pings to the VIP, nor do we.
    Echo,
    /// IPv6 neighbour discovery: the stack's business.
    NeighbourDiscovery,
    Other,
}

/// The kind of an ICMP message of `family` by its type. The types are written out:
/// network-types' `Icmpv4Type` lacks time exceeded (11), its `Icmpv6Type` destination
/// unreachable (1), time exceeded (3) and neighbour discovery (133–136).
#[inline(always)]
pub fn kind(family: u8, icmp_type: u8) -> Kind {
    if family == FAMILY_V4 {
        match icmp_type {
            3 | 11 => Kind::Error,
            8 => Kind::Echo,
            _ => Kind::Other,
        }
    } else {
        match icmp_type {
            1..=3 => Kind::Error,
            128 => Kind::Echo,
            133..=137 => Kind::NeighbourDiscovery,
            _ => Kind::Other,
        }
    }
}

/// The TCP/UDP packet an ICMP error quotes.
pub struct Quote {
    pub l3_off: usize,
    pub l4_off: usize,
    pub protocol: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub src_port_be: u16,
    pub dst_port_be: u16,
}

impl Quote {
    /// The 5-tuple of a packet going the other way: the quoted packet turned around.
    #[inline(always)]
    pub fn reversed_key(&self, family: u8) -> FlowKey {
        FlowKey {
            src_addr: self.dst,
            dst_addr: self.src,
            src_port_be: self.dst_port_be,
            dst_port_be: self.src_port_be,
            protocol: self.protocol,
            family,
            _pad: 0,
        }
    }
}

const INNER_L3_MASK: usize = 0xff;
const INNER_L4_MASK: usize = 0x1ff;

/// The quote of the ICMP error `pkt` (whose IP length the frame holds). `Err` is the drop
/// counter: `DROP_MALFORMED` when the quote is cut before the ports (RFC 792 guarantees the
/// IP header and 8 bytes) or its header is inconsistent, `DROP_ICMP_UNMATCHED` when it is not
/// a TCP/UDP packet's head of the same family.
#[inline(always)]
pub fn quote(ctx: &aya_ebpf::programs::XdpContext, pkt: &Packet) -> Result<Quote, u32> {
    let l3 = ((pkt.l4_off & L4_MASK) + ICMP_HLEN) & INNER_L3_MASK;
    // Where the ICMP message ends: anything past it in the frame is padding.
    let end = (pkt.l3_off & L3_MASK) + pkt.ip_len as usize;
    let (l4, protocol, src, dst) = if pkt.family == FAMILY_V4 {
        let h = read::<Ipv4Hdr>(ctx, l3).ok_or(counter::DROP_MALFORMED)?;
        let ihl = h.ihl() as usize;
        if h.version() != 4 || ihl < Ipv4Hdr::LEN {
            return Err(counter::DROP_MALFORMED);
        }
        if h.frag_offset() != 0 {
            return Err(counter::DROP_ICMP_UNMATCHED); // a later fragment: no ports
        }
        (
            (l3 + ihl) & INNER_L4_MASK,
            h.proto,
            [u32::from_ne_bytes(h.src_addr), 0, 0, 0],
            [u32::from_ne_bytes(h.dst_addr), 0, 0, 0],
        )
    } else {
        let h = read::<Ipv6Hdr>(ctx, l3).ok_or(counter::DROP_MALFORMED)?;
        if h.version() != 6 {
            return Err(counter::DROP_MALFORMED);
        }
        (
            (l3 + Ipv6Hdr::LEN) & INNER_L4_MASK,
            h.next_hdr,
            words(h.src_addr),
            words(h.dst_addr),
        )
    };
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return Err(counter::DROP_ICMP_UNMATCHED);
    }
    // The ports alone (the first 4 bytes of TCP and UDP alike: not a whole `TcpHdr`/`UdpHdr`,
    // which a quote need not hold).
    const _: () = assert!(L4_SRC_PORT == 0 && L4_DST_PORT == 2);
    let ports = read::<[u16; 2]>(ctx, l4).ok_or(counter::DROP_MALFORMED)?;
    if l4 + 4 > end {
        return Err(counter::DROP_MALFORMED);
    }
    Ok(Quote {
        l3_off: l3,
        l4_off: l4,
        protocol,
        src,
        dst,
        src_port_be: ports[0],
        dst_port_be: ports[1],
    })
}

/// Rewrites one end of the quote (address, IPv4 header checksum, port, and the L4 checksum
/// when the quote holds it) and returns the change to the ICMP checksum.
#[inline(always)]
pub fn rewrite_quote(
    ctx: &aya_ebpf::programs::XdpContext,
    pkt: &Packet,
    q: &Quote,
    end: End,
    addr: &[u32; 4],
    port_be: u16,
) -> Option<u32> {
    let l3 = q.l3_off & INNER_L3_MASK;
    let l4 = q.l4_off & INNER_L4_MASK;
    let msg_end = (pkt.l3_off & L3_MASK) + pkt.ip_len as usize;
    let old_addr = if end == End::Source { &q.src } else { &q.dst };
    let (pseudo, mut icmp) = if pkt.family == FAMILY_V4 {
        let addr_off = l3
            + if end == End::Source {
                IPV4_SRC
            } else {
                IPV4_DST
            };
        let pseudo = csum::acc32(0, old_addr[0], addr[0]);
        let old_check = read::<u16>(ctx, l3 + IPV4_CHECK)?;
        let new_check = csum::apply(old_check, pseudo);
        write(ctx, addr_off, addr[0])?;
        write(ctx, l3 + IPV4_CHECK, new_check)?;
        (pseudo, csum::acc16(pseudo, old_check, new_check))
    } else {
        let addr_off = l3
            + if end == End::Source {
                IPV6_SRC
            } else {
                IPV6_DST
            };
        write(ctx, addr_off, *addr)?;
        let pseudo = csum::acc_addr(0, old_addr, addr);
        (pseudo, pseudo)
    };
    let port_off = l4
        + if end == End::Source {
            L4_SRC_PORT
        } else {
            L4_DST_PORT
        };
    let old_port = if end == End::Source {
        q.src_port_be
    } else {
        q.dst_port_be
    };
    write(ctx, port_off, port_be)?;
    icmp = csum::acc16(icmp, old_port, port_be);
    let check_off = l4
        + if q.protocol == PROTO_TCP {
            TCP_CHECK
        } else {
            UDP_CHECK
        };
    // The quote may stop before the L4 checksum (RFC 792 promises only 8 bytes).
    if check_off + 2 <= msg_end {
        if let Some(old) = read::<u16>(ctx, check_off) {
            let unset = q.protocol == PROTO_UDP && old == 0;
            if !unset {
                let new = l4_check(
                    q.protocol,
                    csum::apply(old, csum::acc16(pseudo, old_port, port_be)),
                );
                write(ctx, check_off, new)?;
                icmp = csum::acc16(icmp, old, new);
            }
        }
    }
    Some(icmp)
}

/// Applies `acc` to the ICMP checksum of `pkt`.
#[inline(always)]
pub fn update_checksum(ctx: &aya_ebpf::programs::XdpContext, pkt: &Packet, acc: u32) -> Option<()> {
    let off = (pkt.l4_off & L4_MASK) + ICMP_CHECK;
    let old = read::<u16>(ctx, off)?;
    write(ctx, off, csum::apply(old, acc))
}
