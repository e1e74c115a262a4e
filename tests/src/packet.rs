//! Builds Ethernet / 802.1Q / IPv4 (with options, fragments) / IPv6 (with an extension
//! header) / TCP / UDP frames with every checksum computed from scratch, and checks the
//! checksums of frames the program wrote, independently of its incremental arithmetic.

use std::net::IpAddr;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        seq: u32,
    },
    /// `zero_checksum`: send without a checksum (IPv4 only).
    Udp {
        sport: u16,
        dport: u16,
        zero_checksum: bool,
    },
    /// ICMP (IPv4) or ICMPv6 (IPv6, by the packet's family): type, code, the 4 bytes after the
    /// checksum (MTU, pointer, unused), then `quote` (the packet's payload is not used).
    Icmp {
        icmp_type: u8,
        code: u8,
        rest: [u8; 4],
        quote: Vec<u8>,
    },
    /// Any other protocol: raw header and payload bytes.
    Raw { protocol: u8, bytes: Vec<u8> },
}

#[derive(Clone, Debug)]
pub struct Packet {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    /// IPv4 options (a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// IPv4 flags + fragment offset field (e.g. 0x2000 = MF).
    pub frag: u16,
    /// IPv6: an extension header (next-header code, 8 bytes) between IPv6 and L4.
    pub ipv6_ext: Option<u8>,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl Packet {
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Self {
        Self::new(
            src,
            dst,
            L4::Tcp {
                sport,
                dport,
                flags,
                seq: 1000,
            },
        )
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self::new(
            src,
            dst,
            L4::Udp {
                sport,
                dport,
                zero_checksum: false,
            },
        )
    }

    pub fn new(src: &str, dst: &str, l4: L4) -> Self {
        Self {
            src_mac: [0x02, 0xcc, 0, 0, 0, 0x02],
            dst_mac: [0x02, 0, 0, 0, 0x01, 0x01],
            vlan: None,
            src: src.parse().expect("src address"),
            dst: dst.parse().expect("dst address"),
            ttl: 64,
            ip_options: Vec::new(),
            frag: 0x4000, // DF
            ipv6_ext: None,
            l4,
            payload: b"hello, balancer".to_vec(),
        }
    }

    /// An ICMP error from `src` to `dst` quoting `quote` (an IP packet's bytes, as cut).
    pub fn icmp(
        src: &str,
        dst: &str,
        icmp_type: u8,
        code: u8,
        rest: [u8; 4],
        quote: Vec<u8>,
    ) -> Self {
        Self::new(
            src,
            dst,
            L4::Icmp {
                icmp_type,
                code,
                rest,
                quote,
            },
        )
    }

    pub fn protocol(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::Icmp { .. } if self.src.is_ipv4() => 1,
            L4::Icmp { .. } => 58,
            L4::Raw { protocol, .. } => protocol,
        }
    }

    /// The IP packet (the frame without its Ethernet header and tag), as an ICMP error quotes
    /// it: cut to `len` bytes.
    pub fn quoted(&self, len: usize) -> Vec<u8> {
        let f = self.bytes();
        let l3 = if self.vlan.is_some() { 18 } else { 14 };
        f[l3..(l3 + len).min(f.len())].to_vec()
    }

    /// The frame's fragments: the L4 bytes (header and payload, checksum over all of them)
    /// cut into pieces of `first` bytes, then of `rest` (multiples of 8), each its own frame
    /// (IPv4 fragment fields, or an IPv6 fragment header with `id`).
    pub fn fragments(&self, first: usize, rest: usize, id: u32) -> Vec<Vec<u8>> {
        assert!(first.is_multiple_of(8) && rest.is_multiple_of(8));
        let whole = self.bytes();
        let l3 = if self.vlan.is_some() { 18 } else { 14 };
        let (hlen, v4) = if self.src.is_ipv4() {
            ((whole[l3] & 0x0f) as usize * 4, true)
        } else {
            (40, false)
        };
        let l4 = &whole[l3 + hlen..];
        let mut out = Vec::new();
        let mut off = 0;
        while off < l4.len() {
            let size = if off == 0 { first } else { rest };
            let end = (off + size).min(l4.len());
            let more = end < l4.len();
            let mut f = whole[..l3 + hlen].to_vec();
            if v4 {
                let total = (hlen + end - off) as u16;
                f[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
                let field = (self.frag & 0x4000) | if more { 0x2000 } else { 0 } | (off / 8) as u16;
                f[l3 + 6..l3 + 8].copy_from_slice(&field.to_be_bytes());
                f[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
                let c = internet_checksum(&[&f[l3..l3 + hlen]]);
                f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
            } else {
                let plen = (8 + end - off) as u16;
                f[l3 + 4..l3 + 6].copy_from_slice(&plen.to_be_bytes());
                f[l3 + 6] = 44;
                let field = ((off / 8) as u16) << 3 | more as u16;
                f.extend_from_slice(&[self.protocol(), 0]);
                f.extend_from_slice(&field.to_be_bytes());
                f.extend_from_slice(&id.to_be_bytes());
            }
            f.extend_from_slice(&l4[off..end]);
            out.push(f);
            off = end;
        }
        out
    }

    /// The same packet with the destination (address, port) replaced.
    pub fn with_dst(mut self, ip: &str, port: u16) -> Self {
        self.dst = ip.parse().expect("address");
        match &mut self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport = port,
            L4::Icmp { .. } | L4::Raw { .. } => panic!("no port"),
        }
        self
    }

    /// The same packet with the source (address, port) replaced.
    pub fn with_src(mut self, ip: &str, port: u16) -> Self {
        self.src = ip.parse().expect("address");
        match &mut self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => *sport = port,
            L4::Icmp { .. } | L4::Raw { .. } => panic!("no port"),
        }
        self
    }

    /// As forwarded: TTL one less, new MAC addresses.
    pub fn forwarded(mut self, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Self {
        self.ttl -= 1;
        self.src_mac = src_mac;
        self.dst_mac = dst_mac;
        self
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let mut b = match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
                seq,
            } => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[4..8].copy_from_slice(&seq.to_be_bytes());
                h[12] = 5 << 4;
                h[13] = *flags;
                h[14..16].copy_from_slice(&64240u16.to_be_bytes());
                h
            }
            L4::Udp { sport, dport, .. } => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                let len = (8 + self.payload.len()) as u16;
                h[4..6].copy_from_slice(&len.to_be_bytes());
                h
            }
            L4::Icmp {
                icmp_type,
                code,
                rest,
                quote,
            } => {
                let mut h = vec![*icmp_type, *code, 0, 0];
                h.extend_from_slice(rest);
                h.extend_from_slice(quote);
                let c = if self.src.is_ipv4() {
                    internet_checksum(&[&h])
                } else {
                    internet_checksum(&[&pseudo_header(self.src, self.dst, 58, h.len()), &h])
                };
                h[2..4].copy_from_slice(&c.to_be_bytes());
                return h;
            }
            L4::Raw { bytes, .. } => bytes.clone(),
        };
        b.extend_from_slice(&self.payload);
        let zero = matches!(
            self.l4,
            L4::Udp {
                zero_checksum: true,
                ..
            }
        );
        let check_at = match self.l4 {
            L4::Tcp { .. } => Some(16),
            L4::Udp { .. } if !zero => Some(6),
            _ => None,
        };
        if let Some(at) = check_at {
            let mut c = internet_checksum(&[
                &pseudo_header(self.src, self.dst, self.protocol(), b.len()),
                &b,
            ]);
            if c == 0 && matches!(self.l4, L4::Udp { .. }) {
                c = 0xffff;
            }
            b[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        b
    }

    /// The frame's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        let ethertype: u16 = if self.src.is_ipv4() { 0x0800 } else { 0x86dd };
        if let Some(tci) = self.vlan {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        let l4 = self.l4_bytes();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                assert_eq!(self.ip_options.len() % 4, 0);
                let hlen = 20 + self.ip_options.len();
                let mut h = vec![0u8; hlen];
                h[0] = 0x40 | (hlen / 4) as u8;
                h[2..4].copy_from_slice(&((hlen + l4.len()) as u16).to_be_bytes());
                h[4..6].copy_from_slice(&0x1c46u16.to_be_bytes());
                h[6..8].copy_from_slice(&self.frag.to_be_bytes());
                h[8] = self.ttl;
                h[9] = self.protocol();
                h[12..16].copy_from_slice(&s.octets());
                h[16..20].copy_from_slice(&d.octets());
                h[20..].copy_from_slice(&self.ip_options);
                let c = internet_checksum(&[&h]);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                f.extend_from_slice(&h);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let ext_len = if self.ipv6_ext.is_some() { 8 } else { 0 };
                let mut h = vec![0u8; 40];
                h[0] = 0x60;
                h[4..6].copy_from_slice(&((ext_len + l4.len()) as u16).to_be_bytes());
                h[6] = self.ipv6_ext.unwrap_or(self.protocol());
                h[7] = self.ttl;
                h[8..24].copy_from_slice(&s.octets());
                h[24..40].copy_from_slice(&d.octets());
                f.extend_from_slice(&h);
                if self.ipv6_ext.is_some() {
                    f.extend_from_slice(&[self.protocol(), 0, 0, 0, 0, 0, 0, 0]);
                }
            }
            _ => panic!("mixed address families"),
        }
        f.extend_from_slice(&l4);
        f
    }
}

/// RFC 1071, written plainly: big-endian 16-bit words, 32-bit sum, folded, complemented.
pub fn internet_checksum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
    let mut sum: u32 = 0;
    for pair in bytes.chunks(2) {
        let word = (pair[0] as u32) << 8 | *pair.get(1).unwrap_or(&0) as u32;
        sum += word;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_header(src: IpAddr, dst: IpAddr, protocol: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, protocol]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, protocol]);
        }
        _ => panic!("mixed address families"),
    }
    p
}

/// Checks every checksum of a frame by summing it from scratch: the IPv4 header; TCP/UDP with
/// the pseudo-header (not for a fragment, whose L4 checksum covers the whole datagram);
/// ICMP (ICMPv6 with the pseudo-header) and the IPv4 header it quotes. Returns a description
/// of the first bad one.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    let mut off = 12;
    let mut ethertype = u16::from_be_bytes([frame[off], frame[off + 1]]);
    if ethertype == 0x8100 {
        off += 4;
        ethertype = u16::from_be_bytes([frame[off], frame[off + 1]]);
    }
    let l3 = off + 2;
    let (src, dst, proto, l4, fragment) = match ethertype {
        0x0800 => {
            let hlen = (frame[l3] & 0x0f) as usize * 4;
            let total = u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]) as usize;
            if internet_checksum(&[&frame[l3..l3 + hlen]]) != 0 {
                return Err("IPv4 header checksum".into());
            }
            let s: [u8; 4] = frame[l3 + 12..l3 + 16].try_into().unwrap();
            let d: [u8; 4] = frame[l3 + 16..l3 + 20].try_into().unwrap();
            let frag = u16::from_be_bytes([frame[l3 + 6], frame[l3 + 7]]) & 0x3fff != 0;
            (
                IpAddr::from(s),
                IpAddr::from(d),
                frame[l3 + 9],
                frame
                    .get(l3 + hlen..l3 + total)
                    .ok_or("IPv4 total length beyond the frame")?,
                frag,
            )
        }
        0x86dd => {
            let plen = u16::from_be_bytes([frame[l3 + 4], frame[l3 + 5]]) as usize;
            let s: [u8; 16] = frame[l3 + 8..l3 + 24].try_into().unwrap();
            let d: [u8; 16] = frame[l3 + 24..l3 + 40].try_into().unwrap();
            (
                IpAddr::from(s),
                IpAddr::from(d),
                frame[l3 + 6],
                frame
                    .get(l3 + 40..l3 + 40 + plen)
                    .ok_or("IPv6 payload length beyond the frame")?,
                frame[l3 + 6] == 44,
            )
        }
        _ => return Ok(()),
    };
    if fragment {
        return Ok(());
    }
    match proto {
        6 if l4.len() < 20 => return Err("TCP header cut".into()),
        17 if l4.len() < 8 => return Err("UDP header cut".into()),
        6 | 17 => {
            let udp_unset = proto == 17 && l4[6] == 0 && l4[7] == 0 && src.is_ipv4();
            if !udp_unset
                && internet_checksum(&[&pseudo_header(src, dst, proto, l4.len()), l4]) != 0
            {
                return Err(format!("L4 (protocol {proto}) checksum"));
            }
        }
        1 => {
            if internet_checksum(&[l4]) != 0 {
                return Err("ICMP checksum".into());
            }
            if l4.len() >= 28 && l4[8] >> 4 == 4 {
                let hlen = (l4[8] & 0x0f) as usize * 4;
                if l4.len() >= 8 + hlen && internet_checksum(&[&l4[8..8 + hlen]]) != 0 {
                    return Err("quoted IPv4 header checksum".into());
                }
            }
        }
        58 if internet_checksum(&[&pseudo_header(src, dst, 58, l4.len()), l4]) != 0 => {
            return Err("ICMPv6 checksum".into());
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_verify_and_corruption_is_caught() {
        for p in [
            Packet::tcp("10.0.0.1", 1234, "10.0.0.2", 80, TCP_SYN),
            Packet::udp("fd00::1", 1234, "fd00::2", 53),
            Packet::udp("10.0.0.1", 1, "10.0.0.2", 2),
        ] {
            let mut f = p.bytes();
            verify_checksums(&f).unwrap();
            let n = f.len();
            f[n - 1] ^= 0x40;
            assert!(verify_checksums(&f).is_err());
        }
    }
}
