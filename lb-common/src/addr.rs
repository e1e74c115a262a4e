//! Conversions between `std::net` addresses and the `[u32; 4]` raw network-order form of keys.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::{FAMILY_V4, FAMILY_V6};

/// The raw network-order words of `ip` and its family byte.
pub fn to_words(ip: IpAddr) -> ([u32; 4], u8) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let mut w = [0u32; 4];
            for (i, word) in w.iter_mut().enumerate() {
                *word = u32::from_ne_bytes(o[4 * i..4 * i + 4].try_into().expect("4 bytes"));
            }
            (w, FAMILY_V6)
        }
    }
}

/// The address held by `words` for `family`, or `None` for an unknown family.
pub fn from_words(words: &[u32; 4], family: u8) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))),
        FAMILY_V6 => {
            let mut o = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for s in ["198.18.0.1", "2001:db8::1", "::ffff:1.2.3.4"] {
            let ip: IpAddr = s.parse().unwrap();
            let (w, f) = to_words(ip);
            assert_eq!(from_words(&w, f), Some(ip));
        }
    }
}
