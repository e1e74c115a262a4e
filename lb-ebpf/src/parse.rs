//! Header parsing. `ptr_at` is the one bounds-checked access to packet memory; everything else
//! reads and writes through it. Offsets are kept small and masked so the verifier can bound
//! them after they pass through the stack.
//!
//! The headers are network-types' (`EthHdr`, `VlanHdr`, `Ipv4Hdr`, `Ipv6Hdr`, `TcpHdr`,
//! `UdpHdr`, and in `too_big` its ICMP headers): read whole, or written field by field at their
//! `offset_of!` (each store bounds-checked where it lands, as before). Their fields are byte
//! arrays (alignment 1), as packet memory is: the loads are the ones plain arrays gave.
//! Hand-written, because network-types has no such item: the IPv6 fragment header (see
//! `lb_xdp_fragment`), the bits of the IPv4 fragment flags and of the TCP flags byte (the
//! program tests several flags with one mask; `TcpHdr` has a getter per flag), and the ICMP
//! type numbers of `icmp::kind`.

use aya_ebpf::programs::XdpContext;
use core::mem::offset_of;
use lb_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

/// Ethertypes as `EthHdr::ether_type` holds them (network order, read natively).
const ETH_P_IP: u16 = EtherType::Ipv4 as u16;
const ETH_P_IPV6: u16 = EtherType::Ipv6 as u16;
const ETH_P_8021Q: u16 = EtherType::Ieee8021q as u16;
const ETH_P_8021AD: u16 = EtherType::Ieee8021ad as u16;

pub const IPPROTO_ICMP: u8 = IpProto::Icmp as u8;
pub const IPPROTO_FRAGMENT: u8 = IpProto::Ipv6Frag as u8;
pub const IPPROTO_ICMPV6: u8 = IpProto::Ipv6Icmp as u8;

/// `Ipv4Hdr::frag_flags` bits (RFC 791): more fragments, don't fragment.
const IP_MF: u8 = 0b001;
const IP_DF: u8 = 0b010;

/// The TCP flags byte (RFC 9293), the one after the data offset.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Field offsets of the headers the program rewrites.
pub const IPV4_TTL: usize = offset_of!(Ipv4Hdr, ttl);
pub const IPV4_CHECK: usize = offset_of!(Ipv4Hdr, check);
pub const IPV4_SRC: usize = offset_of!(Ipv4Hdr, src_addr);
pub const IPV4_DST: usize = offset_of!(Ipv4Hdr, dst_addr);
/// Next header, then hop limit: read and written as a pair (see `read`).
pub const IPV6_NEXT_HDR: usize = offset_of!(Ipv6Hdr, next_hdr);
pub const IPV6_SRC: usize = offset_of!(Ipv6Hdr, src_addr);
pub const IPV6_DST: usize = offset_of!(Ipv6Hdr, dst_addr);
/// TCP and UDP ports lie alike; their checksums do not.
pub const L4_SRC_PORT: usize = offset_of!(TcpHdr, source);
pub const L4_DST_PORT: usize = offset_of!(TcpHdr, dest);
pub const TCP_CHECK: usize = offset_of!(TcpHdr, check);
pub const UDP_CHECK: usize = offset_of!(UdpHdr, check);
const _: () = assert!(offset_of!(UdpHdr, src) == L4_SRC_PORT);
const _: () = assert!(offset_of!(UdpHdr, dst) == L4_DST_PORT);
// TTL and protocol share a 16-bit word of the header checksum; so do next header and hop limit.
const _: () = assert!(offset_of!(Ipv4Hdr, proto) == IPV4_TTL + 1 && IPV4_TTL % 2 == 0);
const _: () = assert!(offset_of!(Ipv6Hdr, hop_limit) == IPV6_NEXT_HDR + 1);

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

/// The L3 offset after Ethernet and at most one 802.1Q/802.1ad tag, and the ethertype (as
/// `EthHdr::ether_type` holds it).
#[inline(always)]
pub fn ethernet(ctx: &XdpContext) -> Option<(usize, u16)> {
    let eth = read::<EthHdr>(ctx, 0)?;
    if eth.ether_type == ETH_P_8021Q || eth.ether_type == ETH_P_8021AD {
        let tag = read::<VlanHdr>(ctx, EthHdr::LEN)?;
        return Some((EthHdr::LEN + VlanHdr::LEN, tag.ether_type));
    }
    Some((EthHdr::LEN, eth.ether_type))
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

/// An IPv6 address as the maps hold it: network-order bytes in native words.
#[inline(always)]
pub fn words(addr: [u8; 16]) -> [u32; 4] {
    // SAFETY: 16 bytes either way; every bit pattern is a valid u32.
    unsafe { core::mem::transmute(addr) }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, l3_off: usize) -> L3 {
    // The fixed 20 bytes; anything shorter cannot be told apart from noise: the stack drops it.
    let Some(hdr) = read::<Ipv4Hdr>(ctx, l3_off) else {
        return L3::Other;
    };
    let dst = [u32::from_ne_bytes(hdr.dst_addr), 0, 0, 0];
    let src = [u32::from_ne_bytes(hdr.src_addr), 0, 0, 0];
    let ihl = hdr.ihl() as usize;
    let ip_len = hdr.tot_len() as u32;
    if hdr.version() != 4 || ihl < Ipv4Hdr::LEN || (ip_len as usize) < ihl {
        return L3::Malformed(dst, FAMILY_V4);
    }
    let (flags, offset) = (hdr.frag_flags(), hdr.frag_offset());
    L3::Ip(Packet {
        l3_off,
        l4_off: (l3_off + ihl) & L4_MASK,
        family: FAMILY_V4,
        protocol: hdr.proto,
        src,
        dst,
        ttl: hdr.ttl,
        tos: hdr.tos,
        ip_len,
        fragment: flags & IP_MF != 0 || offset != 0,
        later_fragment: offset != 0,
        dont_fragment: flags & IP_DF != 0,
        id: u16::from_ne_bytes(hdr.id) as u32,
    })
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, l3_off: usize) -> L3 {
    let Some(hdr) = read::<Ipv6Hdr>(ctx, l3_off) else {
        return L3::Other;
    };
    let next = hdr.next_hdr;
    L3::Ip(Packet {
        l3_off,
        l4_off: (l3_off + Ipv6Hdr::LEN) & L4_MASK,
        family: FAMILY_V6,
        protocol: next,
        src: words(hdr.src_addr),
        dst: words(hdr.dst_addr),
        ttl: hdr.hop_limit,
        tos: 0,
        ip_len: hdr.payload_len() as u32 + Ipv6Hdr::LEN as u32,
        fragment: next == IPPROTO_FRAGMENT,
        later_fragment: next == IPPROTO_FRAGMENT,
        dont_fragment: true,
        id: 0,
    })
}

/// Is `next` an IPv6 extension header (RFC 8200 §4, RFC 7045)?
#[inline(always)]
pub fn is_ipv6_extension(next: u8) -> bool {
    const HOP_BY_HOP: u8 = IpProto::HopOpt as u8;
    const ROUTING: u8 = IpProto::Ipv6Route as u8;
    const ESP: u8 = IpProto::Esp as u8;
    const AH: u8 = IpProto::Ah as u8;
    const DESTINATION: u8 = IpProto::Ipv6Opts as u8;
    const MOBILITY: u8 = IpProto::MobilityHeader as u8;
    const HIP: u8 = IpProto::Hip as u8;
    const SHIM6: u8 = IpProto::Shim6 as u8;
    const TEST1: u8 = IpProto::Test1 as u8;
    const TEST2: u8 = IpProto::Test2 as u8;
    matches!(
        next,
        HOP_BY_HOP
            | ROUTING
            | IPPROTO_FRAGMENT
            | ESP
            | AH
            | DESTINATION
            | MOBILITY
            | HIP
            | SHIM6
            | TEST1
            | TEST2
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
            let h = read::<TcpHdr>(ctx, l4)?;
            // The data offset's byte, shifted: `doff()` gathers its 4 bits one by one, which
            // LLVM leaves as 8 instructions; whole bytes it reads as one load.
            let doff = (h._bitfield_1.get(0, 8) >> 4) as usize * 4;
            Some(L4Header {
                ports: Ports {
                    src_be: u16::from_ne_bytes(h.source),
                    dst_be: u16::from_ne_bytes(h.dest),
                    tcp_flags: h._bitfield_1.get(8, 8) as u8, // the flags byte
                },
                consistent: fits
                    && payload >= TcpHdr::LEN
                    && doff >= TcpHdr::LEN
                    && doff <= payload,
            })
        }
        PROTO_UDP => {
            let h = read::<UdpHdr>(ctx, l4)?;
            let len = h.len() as usize;
            let zero_v6 = pkt.family != FAMILY_V4 && h.check == [0, 0];
            Some(L4Header {
                ports: Ports {
                    src_be: u16::from_ne_bytes(h.src),
                    dst_be: u16::from_ne_bytes(h.dst),
                    tcp_flags: 0,
                },
                consistent: fits
                    && payload >= UdpHdr::LEN
                    && len >= UdpHdr::LEN
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
