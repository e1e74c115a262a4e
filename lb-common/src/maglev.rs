//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016).
//!
//! The table is a pure function of (backend identities, weights, table size, seed): backends
//! are sorted by identity first, so neither insertion order nor map iteration order matters
//! and two balancers with the same config build bit-identical tables.
//!
//! Weights: each backend gets a quota of `M·w/W` slots (largest remainder, so the counts are
//! exact to one slot), and backends take turns claiming their next preferred free slot in
//! weighted-fair order: backend `i` makes its k-th claim at virtual time `k / w_i`. A backend
//! that has reached its quota stops claiming. Heavier backends therefore claim early and often,
//! as they would with plain Maglev run on `w` copies of themselves, without the copies.

use std::{cmp::Reverse, collections::BinaryHeap, vec::Vec};

use crate::hash::halfsiphash13;

/// One backend as the builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend<'a> {
    /// What makes the backend the same backend on every node (address, port, family bytes).
    pub identity: &'a [u8],
    /// 1..=65535.
    pub weight: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum MaglevError {
    /// The table size must be a prime, so that every skip visits every slot.
    SizeNotPrime(u32),
    /// Two backends share an identity.
    DuplicateBackend(usize, usize),
    /// A weight of zero (or, with this many backends, too small a table to give each a slot).
    ZeroWeight(usize),
    TooManyBackends {
        backends: usize,
        size: u32,
    },
}

impl core::fmt::Display for MaglevError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::SizeNotPrime(m) => write!(f, "table size {m} is not a prime"),
            Self::DuplicateBackend(a, b) => write!(f, "backends {a} and {b} are the same"),
            Self::ZeroWeight(i) => write!(f, "backend {i} has weight 0"),
            Self::TooManyBackends { backends, size } => {
                write!(f, "{backends} backends do not fit a table of {size} slots")
            }
        }
    }
}

impl std::error::Error for MaglevError {}

/// Is `n` a prime (trial division; table sizes are small).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u64;
    while d * d <= n as u64 {
        if (n as u64).is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

fn identity_words(identity: &[u8]) -> [u32; 8] {
    // Up to 32 identity bytes; longer identities are folded in by xor (not needed by ours).
    let mut w = [0u32; 8];
    for (i, b) in identity.iter().enumerate() {
        w[(i / 4) % 8] ^= (*b as u32) << (8 * (i % 4));
    }
    w
}

/// Builds the table: `table[slot]` is an index into `backends`. An empty `backends` gives an
/// empty table.
pub fn build(backends: &[Backend<'_>], size: u32, seed: u64) -> Result<Vec<u32>, MaglevError> {
    if !is_prime(size) {
        return Err(MaglevError::SizeNotPrime(size));
    }
    if backends.is_empty() {
        return Ok(Vec::new());
    }
    if backends.len() > size as usize {
        return Err(MaglevError::TooManyBackends {
            backends: backends.len(),
            size,
        });
    }
    if let Some(i) = backends.iter().position(|b| b.weight == 0) {
        return Err(MaglevError::ZeroWeight(i));
    }
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by(|&a, &b| backends[a].identity.cmp(backends[b].identity));
    for pair in order.windows(2) {
        if backends[pair[0]].identity == backends[pair[1]].identity {
            return Err(MaglevError::DuplicateBackend(pair[0], pair[1]));
        }
    }

    let m = size as u64;
    let key1 = [seed as u32, (seed >> 32) as u32];
    let key2 = [key1[0] ^ 0x9e37_79b9, key1[1] ^ 0x7f4a_7c15];
    let total: u64 = backends.iter().map(|b| b.weight as u64).sum();

    // Per backend (in identity order): permutation, quota, claims made.
    struct State {
        offset: u64,
        skip: u64,
        next: u64,
        quota: u64,
        claimed: u64,
        weight: u64,
    }
    let mut states: Vec<State> = order
        .iter()
        .map(|&i| {
            let b = &backends[i];
            let w = identity_words(b.identity);
            State {
                offset: halfsiphash13(key1, &w) as u64 % m,
                skip: halfsiphash13(key2, &w) as u64 % (m - 1) + 1,
                next: 0,
                quota: m * b.weight as u64 / total,
                claimed: 0,
                weight: b.weight as u64,
            }
        })
        .collect();
    // Largest remainder: the slots floor() left over go to the largest fractions (ties to the
    // earlier identity), so quotas sum to exactly M.
    let assigned: u64 = states.iter().map(|s| s.quota).sum();
    let mut by_remainder: Vec<usize> = (0..states.len()).collect();
    by_remainder.sort_by_key(|&j| Reverse((m * states[j].weight) % total));
    for &j in by_remainder.iter().take((m - assigned) as usize) {
        states[j].quota += 1;
    }

    // Weighted-fair turns: the heap holds (virtual time of the next claim, backend), where
    // the k-th claim of backend j happens at k / w_j (compared by cross-multiplication).
    #[derive(PartialEq, Eq)]
    struct Turn {
        claims: u64,
        weight: u64,
        backend: usize,
    }
    impl Ord for Turn {
        fn cmp(&self, other: &Self) -> core::cmp::Ordering {
            // Min-heap by claims/weight, then by backend index.
            let a = self.claims as u128 * other.weight as u128;
            let b = other.claims as u128 * self.weight as u128;
            b.cmp(&a).then(other.backend.cmp(&self.backend))
        }
    }
    impl PartialOrd for Turn {
        fn partial_cmp(&self, other: &Self) -> Option<core::cmp::Ordering> {
            Some(self.cmp(other))
        }
    }

    let mut slots = vec_filled(size as usize, u32::MAX);
    let mut heap: BinaryHeap<Turn> = states
        .iter()
        .enumerate()
        .filter(|(_, s)| s.quota > 0)
        .map(|(j, s)| Turn {
            claims: 1,
            weight: s.weight,
            backend: j,
        })
        .collect();
    let mut filled = 0u64;
    while filled < m {
        let Some(turn) = heap.pop() else { break };
        let s = &mut states[turn.backend];
        loop {
            let slot = ((s.offset + s.next * s.skip) % m) as usize;
            s.next += 1;
            if slots[slot] == u32::MAX {
                slots[slot] = order[turn.backend] as u32;
                break;
            }
        }
        s.claimed += 1;
        filled += 1;
        if s.claimed < s.quota {
            heap.push(Turn {
                claims: turn.claims + 1,
                weight: turn.weight,
                backend: turn.backend,
            });
        }
    }
    Ok(slots)
}

fn vec_filled(n: usize, v: u32) -> Vec<u32> {
    let mut out = Vec::with_capacity(n);
    out.resize(n, v);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{format, vec::Vec};

    const M: u32 = 65_537;

    fn ids(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("10.0.{}.{}:80", i / 256, i % 256).into_bytes())
            .collect()
    }

    fn backends<'a>(ids: &'a [Vec<u8>], weights: &[u32]) -> Vec<Backend<'a>> {
        ids.iter()
            .zip(weights)
            .map(|(id, &weight)| Backend {
                identity: id,
                weight,
            })
            .collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<u64> {
        let mut c = vec_filled(n, 0)
            .into_iter()
            .map(u64::from)
            .collect::<Vec<_>>();
        for &t in table {
            c[t as usize] += 1;
        }
        c
    }

    /// Each backend's share of slots is within 1% of its weight share (relative), allowing
    /// the one slot of rounding a finite table forces.
    fn assert_shares(table: &[u32], weights: &[u32]) {
        assert!(
            table.iter().all(|&t| (t as usize) < weights.len()),
            "unfilled slot"
        );
        let total: u64 = weights.iter().map(|&w| w as u64).sum();
        for (i, c) in counts(table, weights.len()).into_iter().enumerate() {
            let want = table.len() as f64 * weights[i] as f64 / total as f64;
            let err = (c as f64 - want).abs();
            assert!(
                err <= (0.01 * want).max(1.0),
                "backend {i}: {c} slots, want {want:.1}"
            );
        }
    }

    #[test]
    fn equal_weights_share_evenly() {
        for n in [3, 10, 100, 1000] {
            let ids = ids(n);
            let weights = vec_filled(n, 1);
            let table = build(&backends(&ids, &weights), M, 42).unwrap();
            assert_eq!(table.len(), M as usize);
            assert_shares(&table, &weights);
        }
    }

    #[test]
    fn weighted_shares_follow_weights() {
        for n in [3, 10, 100, 1000] {
            let ids = ids(n);
            let weights: Vec<u32> = (0..n as u32).map(|i| 1 + (i * 37) % 100).collect();
            let table = build(&backends(&ids, &weights), M, 7).unwrap();
            assert_shares(&table, &weights);
        }
    }

    #[test]
    fn removing_one_moves_little_and_adding_back_restores() {
        for n in [3, 10, 100, 1000] {
            let ids = ids(n);
            let weights = vec_filled(n, 1);
            let all = backends(&ids, &weights);
            let before = build(&all, M, 1).unwrap();
            for removed in [0, n / 2, n - 1] {
                let rest: Vec<Backend> = all
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != removed)
                    .map(|(_, b)| *b)
                    .collect();
                let after = build(&rest, M, 1).unwrap();
                // Map `rest` indices back to `all` indices to compare slot owners.
                let back = |j: u32| if (j as usize) < removed { j } else { j + 1 };
                let moved = before
                    .iter()
                    .zip(&after)
                    .filter(|(b, a)| **b != back(**a))
                    .count();
                let limit = M as f64 * (1.0 / n as f64 + 0.02);
                assert!(
                    moved as f64 <= limit,
                    "n={n}: {moved} slots moved, limit {limit:.0}"
                );
                let restored = build(&all, M, 1).unwrap();
                assert_eq!(restored, before);
            }
        }
    }

    #[test]
    fn independent_of_input_order() {
        let ids = ids(50);
        let weights: Vec<u32> = (0..50).map(|i| 1 + i % 7).collect();
        let fwd = backends(&ids, &weights);
        let mut rev = fwd.clone();
        rev.reverse();
        let a = build(&fwd, M, 99).unwrap();
        let b = build(&rev, M, 99).unwrap();
        let n = fwd.len() as u32;
        assert!(a.iter().zip(&b).all(|(x, y)| *x == n - 1 - *y));
    }

    #[test]
    fn stable_across_versions() {
        // Nodes that share VIPs must build bit-identical tables from the same config, also
        // when they run different releases: this digest must never change.
        let ids = ids(10);
        let weights: Vec<u32> = (1..=10).collect();
        let table = build(&backends(&ids, &weights), 251, 0x5eed).unwrap();
        let words: Vec<u32> = table.clone();
        let mut digest = 0u32;
        for chunk in words.chunks(8) {
            let mut w = [0u32; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            digest = halfsiphash13([digest, 1], &w);
        }
        assert_eq!(digest, GOLDEN, "table digest changed");
    }
    const GOLDEN: u32 = 2_077_002_693;

    #[test]
    fn rejects_bad_input() {
        let ids = ids(2);
        let b = backends(&ids, &[1, 1]);
        assert_eq!(build(&b, 65_536, 0), Err(MaglevError::SizeNotPrime(65_536)));
        assert_eq!(
            build(&backends(&ids, &[1, 0]), M, 0),
            Err(MaglevError::ZeroWeight(1))
        );
        let dup = [b[0], b[0]];
        assert!(matches!(
            build(&dup, M, 0),
            Err(MaglevError::DuplicateBackend(_, _))
        ));
        assert_eq!(build(&[], M, 0), Ok(Vec::new()));
        assert!(is_prime(65_537) && is_prime(2) && !is_prime(1) && !is_prime(65_535));
    }
}
