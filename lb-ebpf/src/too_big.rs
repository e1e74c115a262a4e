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

use crate::parse::{bounds, ptr_at, read, write, Packet, L3_MASK};

/// Bytes of the client's packet quoted: its IP header (IPv4 options included) and the head of
/// its L4 header and payload; a multiple of 4 (`bpf_csum_diff`).
const QUOTE: usize = 128;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const ICMP_HLEN: usize = 8;

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
    // The old L2 header: MACs, then (tag and) ethertype.
    let eth = read::<[u8; 18]>(ctx, 0)?;
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
    Some(build(ctx, pkt, &eth, l3, v4, mtu).unwrap_or(xdp_action::XDP_DROP))
}

#[inline(always)]
fn build(
    ctx: &XdpContext,
    pkt: &Packet,
    eth: &[u8; 18],
    l3: usize,
    v4: bool,
    mtu: u16,
) -> Option<u32> {
    // L2: back to the sender, from the address it sent to.
    write(ctx, 0, [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11]])?;
    write(ctx, 6, [eth[0], eth[1], eth[2], eth[3], eth[4], eth[5]])?;
    if l3 > 14 {
        write(
            ctx,
            12,
            [eth[12], eth[13], eth[14], eth[15], eth[16], eth[17]],
        )?;
    } else {
        write(ctx, 12, [eth[12], eth[13]])?;
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
        let mut h = [0u8; IPV4_HLEN];
        h[0] = 0x45;
        h[1] = 0xc0; // internetwork control, as the kernel sends ICMP errors
        h[2..4].copy_from_slice(&((IPV4_HLEN as u16) + icmp_len).to_be_bytes());
        h[8] = 64;
        h[9] = 1;
        h[12..16].copy_from_slice(&pkt.dst[0].to_ne_bytes());
        h[16..20].copy_from_slice(&pkt.src[0].to_ne_bytes());
        let c = csum::checksum(&h);
        h[10..12].copy_from_slice(&c.to_ne_bytes());
        write(ctx, l3 & 0x1f, h)?;
        ([3u8, 4, 0, 0, 0, 0, mtu_be[0], mtu_be[1]], quote_sum)
    } else {
        let mut h = [0u8; IPV6_HLEN];
        h[0] = 0x60;
        h[4..6].copy_from_slice(&icmp_len.to_be_bytes());
        h[6] = 58;
        h[7] = 64;
        let mut pseudo = quote_sum;
        for (i, w) in pkt.dst.iter().chain(pkt.src.iter()).enumerate() {
            h[8 + 4 * i..12 + 4 * i].copy_from_slice(&w.to_ne_bytes());
            pseudo += (w & 0xffff) as u64 + (w >> 16) as u64;
        }
        write(ctx, l3 & 0x1f, h)?;
        // Pseudo-header: length (32 bits) and next header (58), in memory order.
        pseudo +=
            u16::from_ne_bytes(icmp_len.to_be_bytes()) as u64 + u16::from_ne_bytes([0, 58]) as u64;
        ([2u8, 0, 0, 0, 0, 0, mtu_be[0], mtu_be[1]], pseudo)
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
