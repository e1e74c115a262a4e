//! Header parsing. `ptr_at` is the one bounds-checked access to packet memory; everything else
//! reads and writes through it. Offsets are kept small and masked so the verifier can bound
//! them after they pass through the stack.

use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const IPV6_HLEN: usize = 40;
pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Largest L3 offset (Ethernet + one VLAN tag) and L4 offset (+ a 60-byte IPv4 header).
pub const L3_MASK: usize = 0x1f;
pub const L4_MASK: usize = 0x7f;

/// The packet's start and end.
#[inline(always)]
pub fn bounds(ctx: &XdpContext) -> (usize, usize) {
    (ctx.data(), ctx.data_end())
}

/// A pointer to a `T` at `offset` bytes into the packet, if the packet holds all of it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let (start, end) = bounds(ctx);
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Reads a `T` from the packet. Never use it for a single byte: LLVM turns that bounds check
/// into `p >= end`, from which the verifier learns no range.
#[inline(always)]
pub fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: `ptr_at` checked that the packet holds `size_of::<T>()` bytes at `offset`.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

#[inline(always)]
pub fn write<T: Copy>(ctx: &XdpContext, offset: usize, v: T) -> Option<()> {
    // SAFETY: as in `read`; the packet is writable in XDP.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { core::ptr::write_unaligned(p, v) })
}

/// What the rest of the program needs to know about an IP packet.
#[derive(Clone, Copy)]
pub struct Packet {
    pub l3_off: usize,
    pub l4_off: usize,
    pub family: u8,
    /// L4 protocol (IPv4 protocol / IPv6 next header).
    pub protocol: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// TTL or hop limit.
    pub ttl: u8,
    /// IPv4 type of service (for the FIB lookup); 0 for IPv6.
    pub tos: u8,
    /// IP packet length as the header states it (IPv6: payload length + 40, never wrapped).
    pub ip_len: u32,
    /// Fragment: MF set or offset ≠ 0 (IPv4), or a fragment header (IPv6).
    pub fragment: bool,
    /// IPv4: offset ≠ 0, so no L4 header in this fragment.
    pub later_fragment: bool,
    /// IPv4: DF set. IPv6 packets are never fragmented on the way: always true.
    pub dont_fragment: bool,
    /// IPv4 identification (network order, zero-extended); 0 for IPv6.
    pub id: u32,
}

/// L4 ports and TCP flags.
#[derive(Clone, Copy)]
pub struct Ports {
    pub src_be: u16,
    pub dst_be: u16,
    pub tcp_flags: u8,
}

/// Why a packet is not an IP packet we can read an L3 header of.
pub enum L3 {
    Ip(Packet),
    /// Not IP, or too short to tell where it goes: left to the stack.
    Other,
    /// The destination is readable but the header is inconsistent (IPv4 IHL < 5, version).
    Malformed([u32; 4], u8),
}

/// The L3 offset after Ethernet and at most one 802.1Q/802.1ad tag, and the ethertype.
#[inline(always)]
pub fn ethernet(ctx: &XdpContext) -> Option<(usize, u16)> {
    let proto = u16::from_be(read::<u16>(ctx, 12)?);
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        let inner = u16::from_be(read::<u16>(ctx, ETH_HLEN + 2)?);
        return Some((ETH_HLEN + 4, inner));
    }
    // Ethernet header must be whole even when not tagged.
    read::<[u8; ETH_HLEN]>(ctx, 0)?;
    Some((ETH_HLEN, proto))
}

#[inline(always)]
pub fn ip(ctx: &XdpContext) -> L3 {
    let Some((l3_off, proto)) = ethernet(ctx) else {
        return L3::Other;
    };
    let l3_off = l3_off & L3_MASK;
    match proto {
        ETH_P_IP => ipv4(ctx, l3_off),
        ETH_P_IPV6 => ipv6(ctx, l3_off),
        _ => L3::Other,
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, l3_off: usize) -> L3 {
    // The fixed 20 bytes; anything shorter cannot be told apart from noise: the stack drops it.
    let Some(hdr) = read::<[u8; 20]>(ctx, l3_off) else {
        return L3::Other;
    };
    let dst = [
        u32::from_ne_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]),
        0,
        0,
        0,
    ];
    let src = [
        u32::from_ne_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]),
        0,
        0,
        0,
    ];
    let ihl = (hdr[0] & 0x0f) as usize * 4;
    let ip_len = u16::from_be_bytes([hdr[2], hdr[3]]) as u32;
    if hdr[0] >> 4 != 4 || ihl < 20 || (ip_len as usize) < ihl {
        return L3::Malformed(dst, FAMILY_V4);
    }
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    L3::Ip(Packet {
        l3_off,
        l4_off: (l3_off + ihl) & L4_MASK,
        family: FAMILY_V4,
        protocol: hdr[9],
        src,
        dst,
        ttl: hdr[8],
        tos: hdr[1],
        ip_len,
        fragment: frag & 0x3fff != 0,
        later_fragment: frag & 0x1fff != 0,
        dont_fragment: frag & 0x4000 != 0,
        id: u16::from_ne_bytes([hdr[4], hdr[5]]) as u32,
    })
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, l3_off: usize) -> L3 {
    let Some(hdr) = read::<[u32; 10]>(ctx, l3_off) else {
        return L3::Other;
    };
    let b = hdr[1].to_ne_bytes();
    let next = b[2];
    L3::Ip(Packet {
        l3_off,
        l4_off: (l3_off + IPV6_HLEN) & L4_MASK,
        family: FAMILY_V6,
        protocol: next,
        src: [hdr[2], hdr[3], hdr[4], hdr[5]],
        dst: [hdr[6], hdr[7], hdr[8], hdr[9]],
        ttl: b[3],
        tos: 0,
        ip_len: u16::from_be_bytes([b[0], b[1]]) as u32 + IPV6_HLEN as u32,
        fragment: next == IPPROTO_FRAGMENT,
        later_fragment: next == IPPROTO_FRAGMENT,
        dont_fragment: true,
        id: 0,
    })
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Is `next` an IPv6 extension header (RFC 8200 §4, RFC 7045)?
#[inline(always)]
pub fn is_ipv6_extension(next: u8) -> bool {
    matches!(
        next,
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254
    )
}

/// A TCP or UDP header that is in the frame: its ports (and TCP flags), and whether it is
/// consistent with a whole (not fragmented) packet: the frame holds the IP length, the IP
/// length holds the L4 header (a short packet in a padded frame does not), TCP's data offset
/// is at least 5 and within the packet, UDP's length is at least 8 and within the packet, and
/// an IPv6 UDP checksum is not 0 (RFC 8200 §8.1: such a datagram is invalid). One read of the
/// header answers both.
#[derive(Clone, Copy)]
pub struct L4Header {
    pub ports: Ports,
    pub consistent: bool,
}

/// The packet's TCP/UDP header, if the frame holds it.
#[inline(always)]
pub fn l4(ctx: &XdpContext, pkt: &Packet) -> Option<L4Header> {
    let l3 = pkt.l3_off & L3_MASK;
    let l4 = pkt.l4_off & L4_MASK;
    let fits = ip_len_fits(ctx, pkt);
    // Bytes of IP payload the header announces.
    let payload = pkt.ip_len as usize + l3 - l4.min(pkt.ip_len as usize + l3);
    match pkt.protocol {
        PROTO_TCP => {
            let h = read::<[u8; TCP_HLEN]>(ctx, l4)?;
            let doff = (h[12] >> 4) as usize * 4;
            Some(L4Header {
                ports: Ports {
                    src_be: u16::from_ne_bytes([h[0], h[1]]),
                    dst_be: u16::from_ne_bytes([h[2], h[3]]),
                    tcp_flags: h[13],
                },
                consistent: fits && payload >= TCP_HLEN && doff >= TCP_HLEN && doff <= payload,
            })
        }
        PROTO_UDP => {
            let h = read::<[u8; UDP_HLEN]>(ctx, l4)?;
            let len = u16::from_be_bytes([h[4], h[5]]) as usize;
            let zero_v6 = pkt.family != FAMILY_V4 && h[6] == 0 && h[7] == 0;
            Some(L4Header {
                ports: Ports {
                    src_be: u16::from_ne_bytes([h[0], h[1]]),
                    dst_be: u16::from_ne_bytes([h[2], h[3]]),
                    tcp_flags: 0,
                },
                consistent: fits
                    && payload >= UDP_HLEN
                    && len >= UDP_HLEN
                    && len <= payload
                    && !zero_v6,
            })
        }
        _ => None,
    }
}

/// Does the packet hold the whole IP packet its header announces?
#[inline(always)]
pub fn ip_len_fits(ctx: &XdpContext, pkt: &Packet) -> bool {
    let (start, end) = bounds(ctx);
    start + (pkt.l3_off & L3_MASK) + pkt.ip_len as usize <= end
}
