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
//!
//! [`Model`] keeps a table in step with changing entries without rebuilding
//! it: a changed entry's range is repainted from the entries covering it and
//! inside it, nodes that end up uniform are folded back into their parent,
//! and the changed root entries and nodes are remembered so that publishing
//! writes only those into the idle buffer.

use std::collections::{BTreeMap, BTreeSet};

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
    build_from(dest.iter())
}

/// [`build`] from entries with unique keys, in any order.
fn build_from<'a, const N: usize>(dest: impl Iterator<Item = (&'a Lpm<N>, &'a DestValue)>) -> Result<Dir, usize> {
    let mut dir = Dir {
        root: vec![0; DIR_ROOT as usize],
        nodes: Vec::new(),
    };
    let mut order: Vec<(&Lpm<N>, &DestValue)> = dest.collect();
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

fn trunc<const N: usize>(addr: [u8; N], len: u32) -> [u8; N] {
    let mut out = addr;
    for (i, b) in out.iter_mut().enumerate() {
        let keep = len.saturating_sub(8 * i as u32).min(8);
        *b &= if keep == 0 { 0 } else { 0xffu8 << (8 - keep) };
    }
    out
}

fn last<const N: usize>(addr: [u8; N], len: u32) -> [u8; N] {
    let mut out = trunc(addr, len);
    for (i, b) in out.iter_mut().enumerate() {
        let keep = len.saturating_sub(8 * i as u32).min(8);
        *b |= if keep >= 8 { 0 } else { 0xffu8 >> keep };
    }
    out
}

/// A table kept in step with the destination entries and updated in place
/// when some change: each changed entry's address range is repainted from
/// the entries covering and inside it. Remembers which root entries and
/// nodes changed, so that only those are written to a buffer.
#[derive(Debug)]
pub struct Model<const N: usize> {
    pub dir: Dir,
    free: Vec<usize>,
    /// The destination entries in address order: (address, length).
    index: BTreeMap<([u8; N], u32), DestValue>,
    /// Root entries and nodes changed since the last [`Model::take_dirty`].
    dirty_root: BTreeSet<u32>,
    dirty_nodes: BTreeSet<u32>,
    /// What the idle buffer lacks: the changes published last time, or
    /// `None` when its contents are unknown.
    pub pending: Option<(BTreeSet<u32>, BTreeSet<u32>)>,
}

impl<const N: usize> Model<N> {
    /// The model of `dest` (unique keys), built in full; `Err` as [`build`].
    pub fn new(dest: &[(Lpm<N>, DestValue)]) -> Result<Self, usize> {
        Ok(Model {
            dir: build_from(dest.iter().map(|(k, v)| (k, v)))?,
            free: Vec::new(),
            index: dest.iter().map(|((l, a), v)| ((*a, *l), *v)).collect(),
            dirty_root: BTreeSet::new(),
            dirty_nodes: BTreeSet::new(),
            pending: None,
        })
    }

    /// Nodes in use (an index beyond the capacity makes the table unusable).
    pub fn nodes(&self) -> usize {
        self.dir.nodes.len()
    }

    /// Applies a change of the destination entries: `removed` keys go,
    /// `upserted` entries are added or replaced. Returns false when the
    /// table no longer fits its capacity.
    pub fn update(&mut self, removed: &[Lpm<N>], upserted: &[(Lpm<N>, DestValue)]) -> bool {
        for (l, a) in removed {
            self.index.remove(&(*a, *l));
        }
        for ((l, a), v) in upserted {
            self.index.insert((*a, *l), *v);
        }
        for (l, a) in removed.iter().chain(upserted.iter().map(|(k, _)| k)) {
            self.repaint(*l, *a);
        }
        self.dir.nodes.len() <= DIR_NODES as usize
    }

    /// Root entries and nodes changed since the last call.
    pub fn take_dirty(&mut self) -> (BTreeSet<u32>, BTreeSet<u32>) {
        (
            std::mem::take(&mut self.dirty_root),
            std::mem::take(&mut self.dirty_nodes),
        )
    }

    fn get(&self, node: Option<usize>, i: usize) -> u64 {
        match node {
            None => self.dir.root[i],
            Some(n) => self.dir.nodes[n][i],
        }
    }

    fn set(&mut self, node: Option<usize>, i: usize, v: u64) {
        match node {
            None if self.dir.root[i] != v => {
                self.dir.root[i] = v;
                self.dirty_root.insert(i as u32);
            }
            Some(n) if self.dir.nodes[n][i] != v => {
                self.dir.nodes[n][i] = v;
                self.dirty_nodes.insert(n as u32);
            }
            _ => {}
        }
    }

    fn alloc(&mut self, fill: u64) -> usize {
        let n = match self.free.pop() {
            Some(n) => {
                self.dir.nodes[n] = [fill; DIR_NODE as usize];
                n
            }
            None => {
                self.dir.nodes.push([fill; DIR_NODE as usize]);
                self.dir.nodes.len() - 1
            }
        };
        self.dirty_nodes.insert(n as u32);
        n
    }

    fn release(&mut self, n: usize) {
        for i in 0..DIR_NODE as usize {
            let e = self.dir.nodes[n][i];
            if e & DIR_CHILD != 0 {
                self.release((e & 0xffff_ffff) as usize);
            }
        }
        self.free.push(n);
    }

    /// The node holding the range of (len, addr) and the range's first
    /// entry and span there, creating nodes on the way when `create`.
    /// `path` receives (parent node, entry) of every node passed.
    fn locate(
        &mut self,
        len: u32,
        addr: [u8; N],
        create: bool,
        path: &mut Vec<(Option<usize>, usize)>,
    ) -> Option<(Option<usize>, usize, usize)> {
        let byte = |i: usize| usize::from(addr[i]);
        let mut depth = 16u32;
        let mut slot = (byte(0) << 8) | byte(1);
        let mut node: Option<usize> = None;
        while len > depth {
            let entry = self.get(node, slot);
            let child = if entry & DIR_CHILD != 0 {
                (entry & 0xffff_ffff) as usize
            } else if create {
                let c = self.alloc(entry);
                self.set(node, slot, DIR_CHILD | c as u64);
                c
            } else {
                return None;
            };
            path.push((node, slot));
            node = Some(child);
            slot = byte((depth / 8) as usize);
            depth += 8;
        }
        let span = 1usize << (depth - len);
        Some((node, slot & !(span - 1), span))
    }

    /// Makes the range of (len, addr) hold `value` throughout.
    fn paint(&mut self, len: u32, addr: [u8; N], value: u64) {
        let mut path = Vec::new();
        if let Some((node, start, span)) = self.locate(len, addr, true, &mut path) {
            for i in start..start + span {
                let e = self.get(node, i);
                if e & DIR_CHILD != 0 {
                    self.release((e & 0xffff_ffff) as usize);
                }
                self.set(node, i, value);
            }
        }
    }

    /// Recomputes the range of (len, addr) from the entries.
    fn repaint(&mut self, len: u32, addr: [u8; N]) {
        let base = (0..len)
            .rev()
            .find_map(|l| self.index.get(&(trunc(addr, l), l)))
            .map_or(0, |v| dir_leaf(*v));
        self.paint(len, addr, base);
        let mut inner: Vec<(u32, [u8; N], DestValue)> = self
            .index
            .range((trunc(addr, len), len)..=(last(addr, len), u32::MAX))
            .map(|((a, l), v)| (*l, *a, *v))
            .collect();
        inner.sort_by_key(|e| e.0);
        for (l, a, v) in inner {
            self.paint(l, a, dir_leaf(v));
        }
        // Nodes on the way that now hold one value throughout become that
        // value in their parent.
        let mut path = Vec::new();
        if self.locate(len, addr, false, &mut path).is_none() {
            // The range lies in a leaf above `len`: its path ends earlier.
        }
        while let Some((parent, slot)) = path.pop() {
            let n = (self.get(parent, slot) & 0xffff_ffff) as usize;
            let first = self.dir.nodes[n][0];
            if first & DIR_CHILD != 0 || self.dir.nodes[n].iter().any(|e| *e != first) {
                break;
            }
            self.set(parent, slot, first);
            self.free.push(n);
        }
    }
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

    #[test]
    fn a_model_updated_in_place_agrees_with_a_linear_scan() {
        let mut state = 99u32;
        let mut next = move || {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            state >> 8
        };
        let mut d: BTreeMap<Lpm<4>, DestValue> = BTreeMap::new();
        let mut model = Model::new(&[]).unwrap();
        for round in 0..300 {
            let mut removed = Vec::new();
            let mut upserted = Vec::new();
            for _ in 0..1 + next() % 4 {
                if next() % 3 == 0 && !d.is_empty() {
                    let k = *d.keys().nth(next() as usize % d.len()).unwrap();
                    d.remove(&k);
                    upserted.retain(|(u, _)| *u != k);
                    removed.push(k);
                } else {
                    let len = [8, 12, 16, 20, 23, 24, 25, 28, 32][next() as usize % 9];
                    let a = [10, (next() % 2) as u8, (next() % 4) as u8, next() as u8];
                    let k = (len, trunc(a, len));
                    let v = dv(next() % 5);
                    d.insert(k, v);
                    removed.retain(|r| *r != k);
                    upserted.push((k, v));
                }
            }
            assert!(model.update(&removed, &upserted));
            for _ in 0..200 {
                let a = [10, (next() % 2) as u8, (next() % 4) as u8, next() as u8];
                assert_eq!(lookup(&model.dir, a), scan(&d, a), "round {round}, address {a:?}");
            }
        }
        // Nodes no longer needed were given back.
        d.clear();
        let keys: Vec<Lpm<4>> = model.index.iter().map(|((a, l), _)| (*l, *a)).collect();
        assert!(model.update(&keys, &[]));
        assert!(model.dir.root.iter().all(|e| *e == 0));
        assert_eq!(model.free.len(), model.dir.nodes.len());
    }
}
