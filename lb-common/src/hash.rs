//! The keyed flow hash: HalfSipHash-1-3 over 32-bit words, the function the Linux kernel uses
//! (as `hsiphash`) where an attacker must not be able to pick inputs that collide. Keyed with a
//! secret per balancer (or per group of balancers sharing VIPs), nobody can aim flows at one
//! target by choosing their ports.

#[inline(always)]
fn round(v: &mut [u32; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(5);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(16);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(8);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(7);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(16);
}

/// HalfSipHash-1-3 of `words` (as 4·N message bytes) under the 64-bit `key`.
#[inline(always)]
pub fn halfsiphash13<const N: usize>(key: [u32; 2], words: &[u32; N]) -> u32 {
    let mut v = [key[0], key[1], 0x6c79_6765 ^ key[0], 0x7465_6462 ^ key[1]];
    let mut i = 0;
    while i < N {
        let m = words[i];
        v[3] ^= m;
        round(&mut v);
        v[0] ^= m;
        i += 1;
    }
    let b = ((4 * N) as u32) << 24;
    v[3] ^= b;
    round(&mut v);
    v[0] ^= b;
    v[2] ^= 0xff;
    round(&mut v);
    round(&mut v);
    round(&mut v);
    v[1] ^ v[3]
}

/// The hash that places a new flow: the whole 5-tuple.
#[inline(always)]
pub fn flow_hash(key: [u32; 2], flow: &crate::FlowKey) -> u32 {
    halfsiphash13(key, &flow.words())
}

/// The hash that places a new flow under `stickiness = "source_ip"`: the source address only.
#[inline(always)]
pub fn source_hash(key: [u32; 2], src_addr: &[u32; 4]) -> u32 {
    halfsiphash13(key, src_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_on_key_and_every_word() {
        let base = [1u32, 2, 3, 4];
        let h = halfsiphash13([7, 9], &base);
        assert_ne!(h, halfsiphash13([7, 10], &base));
        for i in 0..4 {
            let mut w = base;
            w[i] ^= 1;
            assert_ne!(h, halfsiphash13([7, 9], &w), "word {i} ignored");
        }
    }

    #[test]
    fn stable_across_versions() {
        // Balancers sharing VIPs must agree on placements: this value must never change.
        assert_eq!(
            halfsiphash13([0x0102_0304, 0x0506_0708], &[0u32; 10]),
            GOLDEN
        );
    }
    const GOLDEN: u32 = 1_128_269_872;
}
