//! The multibit destination table the data plane looks addresses up in
//! without any kernel call: a root of 2^16 entries indexed by the top 16
//! address bits and nodes of 256 entries, one level per following byte.
//! Entries are empty, a child node, or a leaf (customer + route set) with
//! shorter prefixes pushed down into longer ranges.
//!
//! Built from the destination entries (the LPM tables stay the canonical
//! record): prefixes are painted in increasing length, so a range being
//! painted never holds a child yet, and a node created for a longer prefix
//! starts as a copy of the leaf that covered it.

use std::collections::BTreeMap;

use moat_common::{
    dir_leaf,
    limits::{DIR_NODE, DIR_NODES, DIR_ROOT},
    DestValue, DIR_CHILD,
};

use crate::compile::Lpm;

/// One complete table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dir {
    pub root: Vec<u64>,
    pub nodes: Vec<[u64; DIR_NODE as usize]>,
}

/// The table for `dest`, or the number of nodes it would need when that
/// exceeds the capacity.
pub fn build<const N: usize>(dest: &BTreeMap<Lpm<N>, DestValue>) -> Result<Dir, usize> {
    let mut dir = Dir {
        root: vec![0; DIR_ROOT as usize],
        nodes: Vec::new(),
    };
    let mut order: Vec<(&Lpm<N>, &DestValue)> = dest.iter().collect();
    order.sort_by_key(|((len, _), _)| *len);
    for ((len, addr), value) in order {
        let leaf = dir_leaf(*value);
        let byte = |i: usize| usize::from(addr[i]);
        // Index within the root (16 bits), then within nodes (8 bits).
        let mut depth = 16u32;
        let mut slot = (byte(0) << 8) | byte(1);
        let mut node: Option<usize> = None;
        while *len > depth {
            let entry = match node {
                None => dir.root[slot],
                Some(n) => dir.nodes[n][slot],
            };
            let child = if entry & DIR_CHILD != 0 {
                (entry & 0xffff_ffff) as usize
            } else {
                dir.nodes.push([entry; DIR_NODE as usize]);
                let c = dir.nodes.len() - 1;
                let e = DIR_CHILD | c as u64;
                match node {
                    None => dir.root[slot] = e,
                    Some(n) => dir.nodes[n][slot] = e,
                }
                c
            };
            node = Some(child);
            slot = byte((depth / 8) as usize);
            depth += 8;
        }
        let span = 1usize << (depth - len);
        let start = slot & !(span - 1);
        let entries: &mut [u64] = match node {
            None => &mut dir.root,
            Some(n) => &mut dir.nodes[n],
        };
        for e in &mut entries[start..start + span] {
            *e = leaf;
        }
    }
    if dir.nodes.len() > DIR_NODES as usize {
        return Err(dir.nodes.len());
    }
    Ok(dir)
}

/// Looks `addr` up the way the data plane does (for tests and checks).
pub fn lookup<const N: usize>(dir: &Dir, addr: [u8; N]) -> Option<DestValue> {
    let mut e = dir.root[(usize::from(addr[0]) << 8) | usize::from(addr[1])];
    let mut i = 2;
    while e & DIR_CHILD != 0 && i < N {
        e = dir.nodes[(e & 0xffff_ffff) as usize][usize::from(addr[i])];
        i += 1;
    }
    (e & moat_common::DIR_LEAF != 0).then(|| moat_common::dir_value(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dv(c: u32) -> DestValue {
        DestValue {
            customer: c,
            route_set: c + 100,
        }
    }

    /// Longest match by linear scan, for comparison.
    fn scan<const N: usize>(dest: &BTreeMap<Lpm<N>, DestValue>, a: [u8; N]) -> Option<DestValue> {
        let bits = |x: &[u8; N]| x.iter().fold(0u128, |v, b| (v << 8) | u128::from(*b)) << (128 - 8 * N);
        dest.iter()
            .filter(|((len, p), _)| *len == 0 || (bits(p) ^ bits(&a)) >> (128 - len) == 0)
            .max_by_key(|((len, _), _)| *len)
            .map(|(_, v)| *v)
    }

    #[test]
    fn agrees_with_a_linear_scan() {
        let mut d: BTreeMap<Lpm<4>, DestValue> = BTreeMap::new();
        d.insert((8, [10, 0, 0, 0]), dv(1));
        d.insert((16, [10, 1, 0, 0]), dv(2));
        d.insert((22, [10, 1, 4, 0]), dv(3));
        d.insert((24, [10, 1, 5, 0]), dv(4));
        d.insert((25, [10, 1, 5, 128]), dv(5));
        d.insert((32, [10, 1, 5, 129]), dv(6));
        d.insert((12, [203, 0, 0, 0]), dv(7));
        let dir = build(&d).unwrap();
        let mut state = 12345u32;
        for _ in 0..200_000 {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let mut a = state.to_be_bytes();
            // Bias towards the configured space.
            if a[3] & 1 == 0 {
                a[0] = 10;
                if a[3] & 2 == 0 {
                    a[1] = 1;
                    a[2] = 4 + (a[2] & 3);
                }
            }
            assert_eq!(lookup(&dir, a), scan(&d, a), "address {a:?}");
        }
        assert_eq!(lookup(&dir, [10, 1, 5, 129]), Some(dv(6)));
        assert_eq!(lookup(&dir, [10, 1, 5, 130]), Some(dv(5)));
        assert_eq!(lookup(&dir, [10, 1, 5, 1]), Some(dv(4)));
        assert_eq!(lookup(&dir, [10, 1, 6, 1]), Some(dv(3)));
        assert_eq!(lookup(&dir, [10, 2, 0, 0]), Some(dv(1)));
        assert_eq!(lookup(&dir, [11, 0, 0, 0]), None);
    }

    #[test]
    fn ipv6_depths() {
        let mut d: BTreeMap<Lpm<16>, DestValue> = BTreeMap::new();
        let mut a = [0u8; 16];
        a[..6].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0x01, 0x00]);
        d.insert((48, a), dv(1));
        let mut b = a;
        b[7] = 0x80;
        d.insert((57, b), dv(2));
        d.insert(
            (128, {
                let mut c = a;
                c[15] = 1;
                c
            }),
            dv(3),
        );
        let dir = build(&d).unwrap();
        assert_eq!(lookup(&dir, a), Some(dv(1)));
        let mut x = b;
        x[15] = 9;
        assert_eq!(lookup(&dir, x), Some(dv(2)));
        x[7] = 0x7f;
        assert_eq!(lookup(&dir, x), Some(dv(1)));
        let mut h = a;
        h[15] = 1;
        assert_eq!(lookup(&dir, h), Some(dv(3)));
        h[15] = 2;
        assert_eq!(lookup(&dir, h), Some(dv(1)));
        a[5] = 1;
        assert_eq!(lookup(&dir, a), None);
    }

    #[test]
    fn capacity_is_reported() {
        let mut d: BTreeMap<Lpm<4>, DestValue> = BTreeMap::new();
        for i in 0..(DIR_NODES + 1) {
            d.insert((32, [10, (i >> 8) as u8, i as u8, 1]), dv(1));
        }
        assert!(matches!(build(&d), Err(n) if n > DIR_NODES as usize));
    }
}
