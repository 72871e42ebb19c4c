//! The fast layers in front of the destination LPM tables, computed from
//! them (the LPM tables stay the single source of truth):
//! - the prefilter: one bit per block of the top 24 address bits that any
//!   destination entry overlaps; a clear bit answers "not protected";
//! - the block tables: for each IPv4 /24 or IPv6 /48 that the LPM table
//!   maps uniformly (no longer entry inside it), the answer of the LPM
//!   table, found with one exact-match lookup.

use std::collections::{BTreeMap, HashSet};

use moat_common::{
    limits::{BLOCK_EXPAND_MAX, FILTER_BITS},
    DestValue,
};

use crate::compile::Lpm;

fn to_u128<const N: usize>(a: &[u8; N]) -> u128 {
    let mut v = 0u128;
    for b in a {
        v = (v << 8) | u128::from(*b);
    }
    v << (128 - 8 * N)
}

fn from_u128<const N: usize>(v: u128) -> [u8; N] {
    let bytes = v.to_be_bytes();
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

fn mask(v: u128, len: u32) -> u128 {
    if len == 0 {
        0
    } else {
        v & (u128::MAX << (128 - len))
    }
}

/// Prefilter words (index -> 64 bits) for the destination entries.
pub fn filter<const N: usize, V>(dest: &BTreeMap<Lpm<N>, V>) -> BTreeMap<u32, u64> {
    let mut words: BTreeMap<u32, u64> = BTreeMap::new();
    for (len, addr) in dest.keys() {
        let top = (to_u128(addr) >> (128 - FILTER_BITS)) as u32;
        let (first, count) = if *len >= FILTER_BITS {
            (top, 1u64)
        } else {
            let span = FILTER_BITS - len;
            (top & !((1u32 << span) - 1), 1u64 << span)
        };
        let mut bit = u64::from(first);
        let end = bit + count;
        while bit < end {
            let word = (bit / 64) as u32;
            let lo = bit % 64;
            let n = (end - bit).min(64 - lo);
            let bits = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << lo };
            *words.entry(word).or_default() |= bits;
            bit += n;
        }
    }
    words
}

/// Uniform blocks of `block_len` bits and their values. Keys are the
/// block's network-order bytes, `K` of them (zero-padded).
pub fn blocks<const N: usize, const K: usize>(
    dest: &BTreeMap<Lpm<N>, DestValue>,
    block_len: u32,
) -> BTreeMap<[u8; K], DestValue> {
    let key = |v: u128| -> [u8; K] { from_u128::<K>(v) };
    let mixed: HashSet<u128> = dest
        .keys()
        .filter(|(len, _)| *len > block_len)
        .map(|(_, a)| mask(to_u128(a), block_len))
        .collect();
    let mut out = BTreeMap::new();
    for (len, addr) in dest.keys().filter(|(len, _)| *len <= block_len) {
        let span = block_len - len;
        if span >= 32 || (1u64 << span) > u64::from(BLOCK_EXPAND_MAX) {
            continue;
        }
        let base = mask(to_u128(addr), *len);
        for i in 0..(1u128 << span) {
            let block = base | (i << (128 - block_len));
            if mixed.contains(&block) || out.contains_key(&key(block)) {
                continue;
            }
            // The longest entry covering the whole block.
            let value = (0..=block_len)
                .rev()
                .find_map(|l| dest.get(&(l, from_u128::<N>(mask(block, l)))));
            if let Some(v) = value {
                out.insert(key(block), *v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dv(c: u32) -> DestValue {
        DestValue {
            customer: c,
            route_set: c,
        }
    }

    #[test]
    fn filter_marks_exactly_the_overlapped_blocks() {
        let mut d: BTreeMap<Lpm<4>, DestValue> = BTreeMap::new();
        d.insert((25, [203, 0, 113, 128]), dv(1));
        d.insert((16, [198, 18, 0, 0]), dv(2));
        let f = filter(&d);
        let bit = |a: [u8; 4]| {
            let top = u32::from_be_bytes(a) >> 8;
            f.get(&(top / 64)).is_some_and(|w| w >> (top % 64) & 1 == 1)
        };
        assert!(bit([203, 0, 113, 0]));
        assert!(!bit([203, 0, 112, 0]));
        assert!(bit([198, 18, 0, 0]) && bit([198, 18, 255, 0]));
        assert!(!bit([198, 19, 0, 0]) && !bit([198, 17, 255, 0]));
        assert_eq!(f.values().map(|w| w.count_ones()).sum::<u32>(), 1 + 256);
    }

    #[test]
    fn blocks_are_uniform_only() {
        let mut d: BTreeMap<Lpm<4>, DestValue> = BTreeMap::new();
        d.insert((22, [203, 0, 112, 0]), dv(1));
        d.insert((26, [203, 0, 113, 64]), dv(2));
        d.insert((8, [10, 0, 0, 0]), dv(3));
        let b = blocks::<4, 4>(&d, 24);
        assert_eq!(b.get(&[203, 0, 112, 0]), Some(&dv(1)));
        assert_eq!(b.get(&[203, 0, 114, 0]), Some(&dv(1)));
        assert_eq!(
            b.get(&[203, 0, 113, 0]),
            None,
            "holds a /26: mixed, left to the LPM table"
        );
        assert_eq!(b.len(), 3, "a /8 covers too many blocks to expand");
    }

    #[test]
    fn ipv6_blocks_are_48_bits() {
        let mut d: BTreeMap<Lpm<16>, DestValue> = BTreeMap::new();
        let mut a = [0u8; 16];
        a[..6].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0x01, 0x00]);
        d.insert((48, a), dv(7));
        let b = blocks::<16, 8>(&d, 48);
        assert_eq!(b.get(&[0x20, 0x01, 0x0d, 0xb8, 0x01, 0x00, 0, 0]), Some(&dv(7)));
    }
}
