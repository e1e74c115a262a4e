//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624, eq. 3).
//!
//! Values are read from and written to the packet in memory order on both sides, so the
//! arithmetic never byte-swaps: the one's-complement sum is the same in either byte order.
//! An update is accumulated as a 32-bit sum of `~old + new` terms, then applied once.

/// Folds a 32-bit one's-complement accumulator into 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Adds the change of a 16-bit field from `old` to `new` to an update accumulator.
#[inline(always)]
pub fn acc16(acc: u32, old: u16, new: u16) -> u32 {
    acc + (!old) as u32 + new as u32
}

/// Adds the change of a 32-bit field (two 16-bit words) to an update accumulator.
#[inline(always)]
pub fn acc32(acc: u32, old: u32, new: u32) -> u32 {
    let not_old = !old;
    acc + (not_old >> 16) + (not_old & 0xffff) + (new >> 16) + (new & 0xffff)
}

/// Adds the change of an address held as four 32-bit words (an IPv4 address uses word 0 and
/// the others stay zero, so they add nothing).
#[inline(always)]
pub fn acc_addr(acc: u32, old: &[u32; 4], new: &[u32; 4]) -> u32 {
    let acc = acc32(acc, old[0], new[0]);
    let acc = acc32(acc, old[1], new[1]);
    let acc = acc32(acc, old[2], new[2]);
    acc32(acc, old[3], new[3])
}

/// Applies an accumulated update to a checksum field: `~(~check + Σ(~old + new))`.
#[inline(always)]
pub fn apply(check: u16, acc: u32) -> u16 {
    !fold((!check) as u32 + acc)
}

/// The one's-complement sum of `data` as 16-bit words in memory order (odd byte padded),
/// not yet complemented.
pub fn sum_bytes(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc = fold_wide(acc as u64 + u16::from_ne_bytes([c[0], c[1]]) as u64);
    }
    if let [last] = chunks.remainder() {
        acc = fold_wide(acc as u64 + u16::from_ne_bytes([*last, 0]) as u64);
    }
    acc
}

#[inline(always)]
fn fold_wide(s: u64) -> u32 {
    ((s & 0xffff_ffff) + (s >> 32)) as u32
}

/// The Internet checksum of `data` (as it would be stored, memory order).
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum_bytes(data, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_matches_full_recompute() {
        let mut hdr: [u8; 20] = [
            0x45, 0, 0, 60, 0x1c, 0x46, 0x40, 0, 64, 6, 0, 0, 172, 16, 10, 99, 172, 16, 10, 12,
        ];
        let c = checksum(&hdr);
        hdr[10..12].copy_from_slice(&c.to_ne_bytes());
        assert_eq!(checksum(&hdr), 0, "a header with its checksum sums to zero");

        let old_dst = u32::from_ne_bytes(hdr[16..20].try_into().unwrap());
        let new_dst = u32::from_ne_bytes([10, 1, 2, 3]);
        let old_ttl = u16::from_ne_bytes([hdr[8], hdr[9]]);
        let new_ttl = u16::from_ne_bytes([hdr[8] - 1, hdr[9]]);
        let acc = acc16(acc32(0, old_dst, new_dst), old_ttl, new_ttl);
        let updated = apply(c, acc);
        hdr[16..20].copy_from_slice(&new_dst.to_ne_bytes());
        hdr[8] -= 1;
        hdr[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(updated, checksum(&hdr));
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(checksum(&[0x01]), checksum(&[0x01, 0x00]));
    }
}
