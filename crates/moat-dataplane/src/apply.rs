//! Reading the maps back and applying a compiled state as a diff.
//!
//! Order of an apply, so that no packet ever meets a hole:
//! 1. tunnels (a route set may point at them next), each written into its
//!    idle slot and then made live with one store,
//! 2. ECMP tables, each into a slot no route set uses yet,
//! 3. route sets, one atomic `u32` each (a destination entry may point at
//!    them next),
//! 4. anti-spoofing sources, decapsulation entries, local addresses,
//! 5. destination entries (they make traffic reach everything above) and
//!    the multibit table built from them, published with one store;
//!
//! then removals in the reverse order: destination entries, local
//! addresses, decapsulation entries, sources, tunnels. Route sets and ECMP
//! tables need no removal: once no destination entry refers to them they
//! are unreachable, and their slots are reused by a later apply, after
//! packets that might still read them have finished.
//!
//! Reading back follows references from the destination and
//! decapsulation tables, so it sees exactly what packets can reach.

use std::collections::{BTreeMap, BTreeSet};

use aya::{
    maps::{lpm_trie::Key, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues},
    Pod,
};
use moat_common::{
    limits::{DIR_NODE, DIR_NODES, DIR_NONE, DIR_ROOT, MAX_ECMP_TABLES, NO_ROUTE_SET},
    EcmpTable, Tunnel, ROUTE_SET_TABLE, TUNNEL_PRESENT,
};

use crate::{
    compile::{Compiled, Lpm, RouteSetEntry},
    dir::{self, Dir},
    error::Error,
    loader::Dataplane,
    mmap::MmapWords,
};

/// What an apply changed, entry by entry over all maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
    /// Per family (IPv4, IPv6): the multibit table exceeded its capacity and
    /// the slower LPM tables serve destination lookups.
    pub lpm_fallback: [bool; 2],
}

impl ApplyReport {
    pub fn is_empty(&self) -> bool {
        self.added + self.changed + self.removed == 0
    }

    fn count<V: PartialEq>(&mut self, have: Option<&V>, want: &V) -> bool {
        match have {
            Some(h) if h == want => return false,
            Some(_) => self.changed += 1,
            None => self.added += 1,
        }
        true
    }
}

fn read_lpm<const N: usize, V: Pod>(
    map: &LpmTrie<MapData, [u8; N], V>,
    name: &'static str,
) -> Result<BTreeMap<Lpm<N>, V>, Error> {
    let mut out = BTreeMap::new();
    for item in map.iter() {
        let (k, v) = item.map_err(Error::map(name))?;
        out.insert((k.prefix_len(), k.data()), v);
    }
    Ok(out)
}

fn read_hash<K: Pod + Ord, V: Pod>(map: &HashMap<MapData, K, V>, name: &'static str) -> Result<BTreeMap<K, V>, Error> {
    let mut out = BTreeMap::new();
    for item in map.iter() {
        let (k, v) = item.map_err(Error::map(name))?;
        out.insert(k, v);
    }
    Ok(out)
}

fn upsert_lpm<const N: usize, V: Pod + PartialEq>(
    map: &mut LpmTrie<MapData, [u8; N], V>,
    name: &'static str,
    want: &BTreeMap<Lpm<N>, V>,
    have: &BTreeMap<Lpm<N>, V>,
    report: &mut ApplyReport,
) -> Result<(), Error> {
    for (k, v) in want {
        if report.count(have.get(k), v) {
            map.insert(&Key::new(k.0, k.1), v, 0).map_err(Error::map(name))?;
        }
    }
    Ok(())
}

fn remove_lpm<const N: usize, V: Pod>(
    map: &mut LpmTrie<MapData, [u8; N], V>,
    name: &'static str,
    want: &BTreeMap<Lpm<N>, V>,
    have: &BTreeMap<Lpm<N>, V>,
    report: &mut ApplyReport,
) -> Result<(), Error> {
    for k in have.keys().filter(|k| !want.contains_key(*k)) {
        map.remove(&Key::new(k.0, k.1)).map_err(Error::map(name))?;
        report.removed += 1;
    }
    Ok(())
}

fn upsert_hash<K: Pod + Ord, V: Pod + PartialEq>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    want: &BTreeMap<K, V>,
    have: &BTreeMap<K, V>,
    report: &mut ApplyReport,
) -> Result<(), Error> {
    for (k, v) in want {
        if report.count(have.get(k), v) {
            map.insert(k, v, 0).map_err(Error::map(name))?;
        }
    }
    Ok(())
}

fn remove_hash<K: Pod + Ord, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    want: &BTreeMap<K, V>,
    have: &BTreeMap<K, V>,
    report: &mut ApplyReport,
) -> Result<(), Error> {
    for k in have.keys().filter(|k| !want.contains_key(*k)) {
        match map.remove(k) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(Error::map(name)(e)),
        }
        report.removed += 1;
    }
    Ok(())
}

/// Makes `dir` the live multibit table of `family` (0: IPv4, 1: IPv6):
/// an unchanged table is left alone, another is written into the idle
/// buffer and then made live with one store. Returns false when the table
/// exceeds its capacity and the data plane is switched to the LPM tables.
fn publish_dir(active: &MmapWords, family: u32, root: &MmapWords, nodes: &MmapWords, dir: Result<Dir, usize>) -> bool {
    let live = active.get(family) as u32;
    let Ok(dir) = dir else {
        active.set(family, u64::from(DIR_NONE));
        return false;
    };
    let node_base = |buf: u32, n: usize| (buf * DIR_NODES + n as u32) * DIR_NODE;
    if live < DIR_NONE {
        let same_root = dir
            .root
            .iter()
            .enumerate()
            .all(|(i, e)| root.get(live * DIR_ROOT + i as u32) == *e);
        let same_nodes = dir.nodes.iter().enumerate().all(|(n, node)| {
            node.iter()
                .enumerate()
                .all(|(i, e)| nodes.get(node_base(live, n) + i as u32) == *e)
        });
        if same_root && same_nodes {
            return true;
        }
    }
    let idle = if live == 0 { 1 } else { 0 };
    for (i, e) in dir.root.iter().enumerate() {
        root.set(idle * DIR_ROOT + i as u32, *e);
    }
    for (n, node) in dir.nodes.iter().enumerate() {
        for (i, e) in node.iter().enumerate() {
            nodes.set(node_base(idle, n) + i as u32, *e);
        }
    }
    active.set(family, u64::from(idle));
    true
}

fn set_to_map<const N: usize>(s: &BTreeSet<Lpm<N>>) -> BTreeMap<Lpm<N>, u32> {
    s.iter().map(|k| (*k, 1u32)).collect()
}

fn zero_per_cpu<V: Pod + Default>(
    map: &mut PerCpuArray<MapData, V>,
    name: &'static str,
    index: u32,
) -> Result<(), Error> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| Error::map(name)(MapError::IoError(e)))?;
    let zeros = PerCpuValues::try_from(vec![V::default(); cpus]).map_err(|e| Error::map(name)(MapError::IoError(e)))?;
    map.set(index, zeros, 0).map_err(Error::map(name))
}

impl Dataplane {
    /// The live slot of tunnel `id`.
    fn live_slot(&self, id: u32) -> Result<u32, Error> {
        Ok(self.maps.tunnel_slot.get(&id, 0).map_err(Error::map("TUNNEL_SLOT"))? & 1)
    }

    /// Writes `t` into tunnel `id`'s idle slot, then makes that slot live.
    fn write_tunnel(&mut self, id: u32, t: &Tunnel) -> Result<(), Error> {
        let idle = self.live_slot(id)? ^ 1;
        self.maps
            .tunnels
            .set(id * 2 + idle, t, 0)
            .map_err(Error::map("TUNNELS"))?;
        self.maps
            .tunnel_slot
            .set(id, idle, 0)
            .map_err(Error::map("TUNNEL_SLOT"))
    }

    /// Raw route set values referenced by destination entries.
    fn read_route_sets(&self, state: &Compiled) -> Result<BTreeMap<u32, u32>, Error> {
        let ids: BTreeSet<u32> = state
            .dest4
            .values()
            .chain(state.dest6.values())
            .map(|d| d.route_set)
            .filter(|r| *r != NO_ROUTE_SET)
            .collect();
        let mut out = BTreeMap::new();
        for id in ids {
            out.insert(id, self.maps.route_sets.get(&id, 0).map_err(Error::map("ROUTE_SETS"))?);
        }
        Ok(out)
    }

    /// Reads every map back into the shape `compile` produces (names
    /// excepted), following references the way packets do.
    pub fn read_back(&self) -> Result<Compiled, Error> {
        Ok(self.read_back_with_route_sets()?.0)
    }

    /// [`Dataplane::read_back`], plus the raw route set values it followed.
    fn read_back_with_route_sets(&self) -> Result<(Compiled, BTreeMap<u32, u32>), Error> {
        let m = &self.maps;
        let mut out = Compiled {
            dest4: read_lpm(&m.dest4, "DEST4")?,
            dest6: read_lpm(&m.dest6, "DEST6")?,
            source4: read_lpm(&m.source4, "SOURCE4")?.into_keys().collect(),
            source6: read_lpm(&m.source6, "SOURCE6")?.into_keys().collect(),
            decap: read_hash(&m.decap, "DECAP")?,
            local_addrs: read_hash(&m.local_addrs, "LOCAL_ADDRS")?,
            ..Compiled::default()
        };
        let mut tunnel_ids: BTreeSet<u32> = out.decap.values().map(|d| d.tunnel).collect();
        let raw_sets = self.read_route_sets(&out)?;
        for (&id, &v) in &raw_sets {
            let entry = if v & ROUTE_SET_TABLE == 0 {
                tunnel_ids.insert(v);
                RouteSetEntry::Single(v)
            } else {
                let t = m
                    .ecmp_tables
                    .get(&(v & !ROUTE_SET_TABLE), 0)
                    .map_err(Error::map("ECMP_TABLES"))?;
                tunnel_ids.extend(t.slots.iter().map(|s| u32::from(*s)));
                RouteSetEntry::Table(Box::new(t.slots))
            };
            out.route_sets.insert(id, entry);
        }
        for id in tunnel_ids {
            let slot = id
                .checked_mul(2)
                .ok_or(Error::Spec(format!("tunnel id {id} out of range")))?
                + self.live_slot(id)?;
            let t = m.tunnels.get(&slot, 0).map_err(Error::map("TUNNELS"))?;
            if t.flags & TUNNEL_PRESENT != 0 {
                out.tunnels.insert(id, t);
            }
        }
        Ok((out, raw_sets))
    }

    /// Makes the maps hold exactly `want`, changing only what differs.
    pub fn apply(&mut self, want: &Compiled) -> Result<ApplyReport, Error> {
        let mut report = ApplyReport::default();
        let (have, have_sets) = self.read_back_with_route_sets()?;

        // 1. Tunnels; fresh ids start with zeroed counters.
        for (id, t) in &want.tunnels {
            if !have.tunnels.contains_key(id) {
                zero_per_cpu(&mut self.maps.tunnel_stats, "TUNNEL_STATS", *id)?;
            }
            if report.count(have.tunnels.get(id), t) {
                self.write_tunnel(*id, t)?;
            }
        }

        // 2 + 3. ECMP tables into unused slots, then route sets.
        let m = &mut self.maps;
        let mut used: BTreeSet<u32> = have_sets
            .values()
            .filter(|v| *v & ROUTE_SET_TABLE != 0)
            .map(|v| v & !ROUTE_SET_TABLE)
            .collect();
        let mut free = (0..MAX_ECMP_TABLES)
            .filter(|i| !used.contains(i))
            .collect::<Vec<_>>()
            .into_iter();
        for (id, entry) in &want.route_sets {
            if !report.count(have.route_sets.get(id), entry) {
                continue;
            }
            let value = match entry {
                RouteSetEntry::Single(t) => *t,
                RouteSetEntry::Table(slots) => {
                    let index = free.next().ok_or(Error::Capacity {
                        what: "ECMP tables",
                        have: used.len() + 1,
                        limit: MAX_ECMP_TABLES as usize,
                    })?;
                    used.insert(index);
                    m.ecmp_tables
                        .set(index, EcmpTable { slots: **slots }, 0)
                        .map_err(Error::map("ECMP_TABLES"))?;
                    index | ROUTE_SET_TABLE
                }
            };
            m.route_sets.set(*id, value, 0).map_err(Error::map("ROUTE_SETS"))?;
        }

        // 4. Sources, decapsulation, local addresses.
        let (want_s4, have_s4) = (set_to_map(&want.source4), set_to_map(&have.source4));
        let (want_s6, have_s6) = (set_to_map(&want.source6), set_to_map(&have.source6));
        upsert_lpm(&mut m.source4, "SOURCE4", &want_s4, &have_s4, &mut report)?;
        upsert_lpm(&mut m.source6, "SOURCE6", &want_s6, &have_s6, &mut report)?;
        let customers = |c: &Compiled| -> BTreeSet<u32> {
            c.decap
                .values()
                .map(|d| d.customer)
                .chain(c.dest4.values().chain(c.dest6.values()).map(|d| d.customer))
                .collect()
        };
        for c in customers(want).difference(&customers(&have)) {
            zero_per_cpu(&mut m.customer_stats, "CUSTOMER_STATS", *c)?;
        }
        upsert_hash(&mut m.decap, "DECAP", &want.decap, &have.decap, &mut report)?;
        upsert_hash(
            &mut m.local_addrs,
            "LOCAL_ADDRS",
            &want.local_addrs,
            &have.local_addrs,
            &mut report,
        )?;

        // 5. Destinations: the LPM entries (the record), then the multibit
        // table built from them, written into its idle buffer and made live
        // with one store (or, beyond its capacity, the LPM tables serve).
        upsert_lpm(&mut m.dest4, "DEST4", &want.dest4, &have.dest4, &mut report)?;
        upsert_lpm(&mut m.dest6, "DEST6", &want.dest6, &have.dest6, &mut report)?;
        report.lpm_fallback[0] = !publish_dir(&m.dir_active, 0, &m.dir4_root, &m.dir4_nodes, dir::build(&want.dest4));
        report.lpm_fallback[1] = !publish_dir(&m.dir_active, 1, &m.dir6_root, &m.dir6_nodes, dir::build(&want.dest6));

        // Removals, in reverse.
        remove_lpm(&mut m.dest6, "DEST6", &want.dest6, &have.dest6, &mut report)?;
        remove_lpm(&mut m.dest4, "DEST4", &want.dest4, &have.dest4, &mut report)?;
        remove_hash(
            &mut m.local_addrs,
            "LOCAL_ADDRS",
            &want.local_addrs,
            &have.local_addrs,
            &mut report,
        )?;
        remove_hash(&mut m.decap, "DECAP", &want.decap, &have.decap, &mut report)?;
        remove_lpm(&mut m.source6, "SOURCE6", &want_s6, &have_s6, &mut report)?;
        remove_lpm(&mut m.source4, "SOURCE4", &want_s4, &have_s4, &mut report)?;
        report.removed += have
            .route_sets
            .keys()
            .filter(|id| !want.route_sets.contains_key(*id))
            .count();
        let gone: Vec<u32> = have
            .tunnels
            .keys()
            .filter(|id| !want.tunnels.contains_key(*id))
            .copied()
            .collect();
        for id in gone {
            self.write_tunnel(
                id,
                &Tunnel {
                    flags: 0,
                    ..have.tunnels[&id]
                },
            )?;
            report.removed += 1;
        }
        self.applied = Some(want.clone());
        Ok(report)
    }
}
