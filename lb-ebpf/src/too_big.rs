//! "Fragmentation needed" (ICMP type 3 code 4) / "packet too big" (ICMPv6 type 2) built by the
//! program for a client's packet to a VIP that is too big for the target side: sent back out
//! of the interface it came in on (XDP_TX, its MACs swapped, a VLAN tag kept), from the VIP,
//! quoting the first `QUOTE` bytes of the client's own packet, so the client's stack finds
//! the socket and lowers its path MTU toward the VIP.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{csum, FAMILY_V4};
use network_types::{
    eth::EthHdr,
    icmp::{Icmpv4Hdr, Icmpv4Type, Icmpv6Hdr, Icmpv6Type},
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
    vlan::VlanHdr,
};

use crate::parse::{bounds, ptr_at, read, write, Packet, L3_MASK};

/// Bytes of the client's packet quoted: its IP header (IPv4 options included) and the head of
/// its L4 header and payload; a multiple of 4 (`bpf_csum_diff`).
const QUOTE: usize = 128;
const IPV4_HLEN: usize = Ipv4Hdr::LEN;
const IPV6_HLEN: usize = Ipv6Hdr::LEN;
const ICMP_HLEN: usize = Icmpv4Hdr::LEN;
const _: () = assert!(Icmpv6Hdr::LEN == ICMP_HLEN);
/// Destination unreachable's code "fragmentation needed and DF set" (RFC 792; network-types
/// names the types, not the codes).
const FRAG_NEEDED: u8 = 4;

/// The bytes of a header: network-types' headers are byte arrays and bytes, without padding.
#[inline(always)]
fn bytes<T: Copy, const N: usize>(h: T) -> [u8; N] {
    const { assert!(core::mem::size_of::<T>() == N) };
    // SAFETY: same size (checked above); every byte of these headers is initialised.
    unsafe { core::mem::transmute_copy(&h) }
}

/// Turns the frame into the error and returns the action that sends it. `None`, with the
/// frame untouched: the packet is shorter than the quote.
#[inline(always)]
pub fn answer(ctx: &XdpContext, pkt: &Packet, mtu: u16) -> Option<u32> {
    if (pkt.ip_len as usize) < QUOTE {
        return None;
    }
    let v4 = pkt.family == FAMILY_V4;
    let l3 = pkt.l3_off & L3_MASK;
    let ip_hlen = if v4 { IPV4_HLEN } else { IPV6_HLEN };
    let grow = ip_hlen + ICMP_HLEN;
    // The old L2 header (and the tag that follows the ethertype when there is one).
    let eth = read::<EthHdr>(ctx, 0)?;
    let tag = read::<VlanHdr>(ctx, EthHdr::LEN)?;
    // SAFETY: the program's context; room for the new headers in front of the old frame.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } != 0 {
        return Some(xdp_action::XDP_DROP);
    }
    let (start, end) = bounds(ctx);
    let want = grow + l3 + QUOTE;
    // SAFETY: as above; cuts the frame after the quote.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, want as i32 - (end - start) as i32) } != 0 {
        return Some(xdp_action::XDP_DROP);
    }
    Some(build(ctx, pkt, &eth, &tag, l3, v4, mtu).unwrap_or(xdp_action::XDP_DROP))
}

#[inline(always)]
fn build(
    ctx: &XdpContext,
    pkt: &Packet,
    eth: &EthHdr,
    tag: &VlanHdr,
    l3: usize,
    v4: bool,
    mtu: u16,
) -> Option<u32> {
    // L2: back to the sender, from the address it sent to.
    let back = EthHdr {
        dst_addr: eth.src_addr,
        src_addr: eth.dst_addr,
        ether_type: eth.ether_type,
    };
    write(ctx, 0, back)?;
    if l3 > EthHdr::LEN {
        write(ctx, EthHdr::LEN, *tag)?;
    }
    let ip_hlen = if v4 { IPV4_HLEN } else { IPV6_HLEN };
    let icmp_off = (l3 + ip_hlen) & 0x7f;
    let quote_off = (icmp_off + ICMP_HLEN) & 0x7f;
    let quote = ptr_at::<[u8; QUOTE]>(ctx, quote_off)?;
    // SAFETY: `quote` covers QUOTE bytes of the packet (checked by ptr_at).
    let quote_sum =
        unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, quote as *mut u32, QUOTE as u32, 0) }
            as u32 as u64;
    let icmp_len = (ICMP_HLEN + QUOTE) as u16;
    let mtu_be = mtu.to_be_bytes();
    let (icmp_head, mut sum) = if v4 {
        let mut h = Ipv4Hdr {
            vihl: 0x45,
            tos: 0xc0, // internetwork control, as the kernel sends ICMP errors
            tot_len: ((IPV4_HLEN as u16) + icmp_len).to_be_bytes(),
            id: [0; 2],
            frags: [0; 2],
            ttl: 64,
            proto: IpProto::Icmp as u8,
            check: [0; 2],
            src_addr: pkt.dst[0].to_ne_bytes(),
            dst_addr: pkt.src[0].to_ne_bytes(),
        };
        h.check = csum::checksum(&bytes::<_, IPV4_HLEN>(h)).to_ne_bytes();
        write(ctx, l3 & 0x1f, h)?;
        let head = Icmpv4Hdr {
            type_: Icmpv4Type::DestinationUnreachable as u8,
            code: FRAG_NEEDED,
            check: [0; 2],
            data: [0, 0, mtu_be[0], mtu_be[1]],
        };
        (bytes::<_, ICMP_HLEN>(head), quote_sum)
    } else {
        let h = Ipv6Hdr {
            vcf: [0x60, 0, 0, 0],
            payload_len: icmp_len.to_be_bytes(),
            next_hdr: IpProto::Ipv6Icmp as u8,
            hop_limit: 64,
            src_addr: bytes::<_, 16>(pkt.dst),
            dst_addr: bytes::<_, 16>(pkt.src),
        };
        let mut pseudo = quote_sum;
        for i in 0..4 {
            let (d, s) = (pkt.dst[i], pkt.src[i]);
            pseudo +=
                (d & 0xffff) as u64 + (d >> 16) as u64 + (s & 0xffff) as u64 + (s >> 16) as u64;
        }
        write(ctx, l3 & 0x1f, h)?;
        // Pseudo-header: length (32 bits) and next header (58), in memory order.
        pseudo += u16::from_ne_bytes(icmp_len.to_be_bytes()) as u64
            + u16::from_ne_bytes([0, IpProto::Ipv6Icmp as u8]) as u64;
        let head = Icmpv6Hdr {
            type_: Icmpv6Type::PacketTooBig as u8,
            code: 0,
            check: [0; 2],
            data: [0, 0, mtu_be[0], mtu_be[1]],
        };
        (bytes::<_, ICMP_HLEN>(head), pseudo)
    };
    for pair in icmp_head.chunks_exact(2) {
        sum += u16::from_ne_bytes([pair[0], pair[1]]) as u64;
    }
    // Fold the 64-bit sum to 16 bits (each step at most one carry more).
    for _ in 0..4 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let folded = sum as u16;
    let mut head = icmp_head;
    head[2..4].copy_from_slice(&(!folded).to_ne_bytes());
    write(ctx, icmp_off, head)?;
    Some(xdp_action::XDP_TX)
}
