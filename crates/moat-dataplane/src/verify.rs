//! Checking the live multibit destination tables against the destination
//! entries they are meant to serve. Packets look destinations up in the
//! multibit table first, so reading back only the LPM records would miss
//! damage there. The live buffer is walked in place (no copy) beside a
//! table built from the wanted entries; two tables agree when every
//! address resolves to the same leaf, whatever their node layout.

use std::fmt::Write as _;

use moat_common::{
    dir_value,
    limits::{DIR_NODE, DIR_NODES, DIR_NONE, DIR_ROOT},
    DIR_CHILD, DIR_LEAF,
};

use crate::{
    compile::{Contents, Lpm},
    dir::{self, Dir},
    loader::Dataplane,
    mmap::MmapWords,
};

/// At most this many differing /16 ranges are described per family.
const MAX_REPORTED: usize = 20;

struct Live<'a> {
    root: &'a MmapWords,
    nodes: &'a MmapWords,
    buf: u32,
}

impl Live<'_> {
    fn root(&self, i: u32) -> u64 {
        self.root.get(self.buf * DIR_ROOT + i)
    }
    fn node(&self, entry: u64, byte: u32) -> Option<u64> {
        let node = entry as u32;
        (node < DIR_NODES).then(|| self.nodes.get((self.buf * DIR_NODES + node) * DIR_NODE + byte))
    }
}

fn describe(e: u64) -> String {
    if e & DIR_LEAF != 0 {
        let v = dir_value(e);
        format!("customer {} route set {}", v.customer, v.route_set)
    } else {
        "nothing".into()
    }
}

fn prefix<const N: usize>(path: &[u8]) -> String {
    let mut addr = [0u8; N];
    addr[..path.len()].copy_from_slice(path);
    let len = 8 * path.len();
    if N == 4 {
        format!(
            "{}/{len}",
            std::net::Ipv4Addr::from([addr[0], addr[1], addr[2], addr[3]])
        )
    } else {
        let mut a = [0u8; 16];
        a.copy_from_slice(&addr[..16]);
        format!("{}/{len}", std::net::Ipv6Addr::from(a))
    }
}

/// Walks a live entry and a wanted entry covering the same range (`path`),
/// descending where either has a child.
fn walk<const N: usize>(
    live: &Live,
    want: &Dir,
    have_e: u64,
    want_e: u64,
    path: &mut Vec<u8>,
    out: &mut Vec<String>,
    count: &mut usize,
) {
    let have_child = have_e & DIR_CHILD != 0 && path.len() < N;
    let want_child = want_e & DIR_CHILD != 0 && path.len() < N;
    if !have_child && !want_child {
        let leaf = |e: u64| (e & DIR_LEAF != 0).then_some(e & !DIR_CHILD);
        if leaf(have_e) != leaf(want_e) {
            *count += 1;
            if out.is_empty() {
                out.push(format!(
                    "{} holds {}, the entries give {}",
                    prefix::<N>(path),
                    describe(have_e),
                    describe(want_e)
                ));
            }
        }
        return;
    }
    for byte in 0..DIR_NODE {
        let h = if have_child {
            match live.node(have_e, byte) {
                Some(e) => e,
                None => {
                    *count += 1;
                    if out.is_empty() {
                        out.push(format!(
                            "{} points at node {}, out of range",
                            prefix::<N>(path),
                            have_e as u32
                        ));
                    }
                    return;
                }
            }
        } else {
            have_e
        };
        let w = if want_child {
            want.nodes[(want_e as u32) as usize][byte as usize]
        } else {
            want_e
        };
        path.push(byte as u8);
        walk::<N>(live, want, h, w, path, out, count);
        path.pop();
    }
}

fn check<const N: usize>(
    family: &str,
    active: u32,
    root: &MmapWords,
    nodes: &MmapWords,
    dest: &std::collections::BTreeMap<Lpm<N>, moat_common::DestValue>,
    out: &mut Vec<String>,
) {
    let want = match dir::build(dest) {
        Ok(d) => d,
        // Beyond the table's capacity the LPM table serves lookups.
        Err(_) if active >= DIR_NONE => return,
        Err(n) => {
            out.push(format!(
                "multibit {family} table is live although the entries need {n} nodes (more than it holds)"
            ));
            return;
        }
    };
    if active >= DIR_NONE {
        out.push(format!(
            "no multibit {family} table is live: lookups use the slower LPM table"
        ));
        return;
    }
    let live = Live {
        root,
        nodes,
        buf: active,
    };
    let mut path = Vec::with_capacity(N);
    let (mut reported, mut more) = (0, 0);
    for i in 0..DIR_ROOT {
        path.clear();
        path.extend_from_slice(&[(i >> 8) as u8, i as u8]);
        let (mut first, mut count) = (Vec::new(), 0);
        walk::<N>(
            &live,
            &want,
            live.root(i),
            want.root[i as usize],
            &mut path,
            &mut first,
            &mut count,
        );
        if count == 0 {
            continue;
        }
        if reported == MAX_REPORTED {
            more += 1;
            continue;
        }
        reported += 1;
        let mut line = String::new();
        let _ = write!(
            line,
            "multibit destination table, {}: {count} differing ranges, e.g. {}",
            prefix::<N>(&path[..2]),
            first.first().map_or("", String::as_str)
        );
        out.push(line);
    }
    if more > 0 {
        out.push(format!("multibit {family} table: {more} more /16 ranges differ"));
    }
}

impl Dataplane {
    /// Differences between the live multibit tables and the ones the
    /// destination entries of `want` call for (empty when they agree).
    pub fn verify_dir(&self, want: &Contents) -> Vec<String> {
        let m = &self.maps;
        let mut out = Vec::new();
        check(
            "IPv4",
            m.active.get(moat_common::active::DIR4) as u32,
            &m.dir4_root,
            &m.dir4_nodes,
            &want.dest4,
            &mut out,
        );
        check(
            "IPv6",
            m.active.get(moat_common::active::DIR6) as u32,
            &m.dir6_root,
            &m.dir6_nodes,
            &want.dest6,
            &mut out,
        );
        out
    }
}
