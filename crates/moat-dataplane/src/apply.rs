//! Reading the maps back and applying a compiled state as a diff.
//!
//! Order of an apply, so that no packet ever meets a hole:
//! 1. tunnels (a route set may point at them next),
//! 2. ECMP tables, each into a slot no route set uses yet,
//! 3. route sets (a destination entry may point at them next),
//! 4. anti-spoofing sources, decapsulation entries, local addresses,
//! 5. destination entries (they make traffic reach everything above);
//!
//! then removals in the reverse order: destination entries, local
//! addresses, decapsulation entries, sources, route sets, tunnels. A freed
//! ECMP table slot is only reused by a later apply, after packets that
//! might still read it have finished.

use std::collections::{BTreeMap, BTreeSet};

use aya::{
    maps::{lpm_trie::Key, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues},
    Pod,
};
use moat_common::{limits::MAX_ECMP_TABLES, EcmpTable, RouteSet};

use crate::{
    compile::{Compiled, Lpm, RouteSetEntry},
    error::Error,
    loader::Dataplane,
};

/// What an apply changed, entry by entry over all maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
}

impl ApplyReport {
    pub fn is_empty(&self) -> bool {
        self.added + self.changed + self.removed == 0
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

fn read_hash<K: Pod + Ord, V: Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<BTreeMap<K, V>, Error> {
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
        match have.get(k) {
            Some(h) if h == v => continue,
            Some(_) => report.changed += 1,
            None => report.added += 1,
        }
        map.insert(&Key::new(k.0, k.1), v, 0)
            .map_err(Error::map(name))?;
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
        match have.get(k) {
            Some(h) if h == v => continue,
            Some(_) => report.changed += 1,
            None => report.added += 1,
        }
        map.insert(k, v, 0).map_err(Error::map(name))?;
    }
    Ok(())
}

fn remove_hash<K: Pod + Ord, V: Pod, W>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    want: &BTreeMap<K, W>,
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

fn set_to_map<const N: usize>(s: &BTreeSet<Lpm<N>>) -> BTreeMap<Lpm<N>, u32> {
    s.iter().map(|k| (*k, 1u32)).collect()
}

fn zero_per_cpu<V: Pod + Default>(
    map: &mut PerCpuArray<MapData, V>,
    name: &'static str,
    index: u32,
) -> Result<(), Error> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| Error::map(name)(MapError::IoError(e)))?;
    let zeros = PerCpuValues::try_from(vec![V::default(); cpus])
        .map_err(|e| Error::map(name)(MapError::IoError(e)))?;
    map.set(index, zeros, 0).map_err(Error::map(name))
}

impl Dataplane {
    /// Reads every map back into the shape `compile` produces (names
    /// excepted), resolving ECMP tables through their slots.
    pub fn read_back(&self) -> Result<Compiled, Error> {
        let m = &self.maps;
        let mut out = Compiled {
            dest4: read_lpm(&m.dest4, "DEST4")?,
            dest6: read_lpm(&m.dest6, "DEST6")?,
            source4: read_lpm(&m.source4, "SOURCE4")?.into_keys().collect(),
            source6: read_lpm(&m.source6, "SOURCE6")?.into_keys().collect(),
            tunnels: read_hash(&m.tunnels, "TUNNELS")?,
            decap: read_hash(&m.decap, "DECAP")?,
            local_addrs: read_hash(&m.local_addrs, "LOCAL_ADDRS")?,
            ..Compiled::default()
        };
        for (id, rs) in read_hash(&m.route_sets, "ROUTE_SETS")? {
            let entry = if rs.members <= 1 {
                RouteSetEntry::Single(rs.tunnel)
            } else {
                let t = m
                    .ecmp_tables
                    .get(&rs.table, 0)
                    .map_err(Error::map("ECMP_TABLES"))?;
                RouteSetEntry::Table(Box::new(t.slots))
            };
            out.route_sets.insert(id, entry);
        }
        Ok(out)
    }

    /// Makes the maps hold exactly `want`, changing only what differs.
    pub fn apply(&mut self, want: &Compiled) -> Result<ApplyReport, Error> {
        let mut report = ApplyReport::default();
        let have = self.read_back()?;
        let have_sets = read_hash(&self.maps.route_sets, "ROUTE_SETS")?;
        let m = &mut self.maps;

        // 1. Tunnels; fresh ids start with zeroed counters.
        for id in want
            .tunnels
            .keys()
            .filter(|id| !have.tunnels.contains_key(*id))
        {
            zero_per_cpu(&mut m.tunnel_stats, "TUNNEL_STATS", *id)?;
        }
        upsert_hash(
            &mut m.tunnels,
            "TUNNELS",
            &want.tunnels,
            &have.tunnels,
            &mut report,
        )?;

        // 2 + 3. ECMP tables into unused slots, then route sets.
        let mut used: BTreeSet<u32> = have_sets
            .values()
            .filter(|rs| rs.members > 1)
            .map(|rs| rs.table)
            .collect();
        let mut free = (0..MAX_ECMP_TABLES)
            .filter(|i| !used.contains(i))
            .collect::<Vec<_>>()
            .into_iter();
        for (id, entry) in &want.route_sets {
            if have.route_sets.get(id) == Some(entry) {
                continue;
            }
            let value = match entry {
                RouteSetEntry::Single(t) => RouteSet {
                    members: 1,
                    tunnel: *t,
                    table: 0,
                    _pad: 0,
                },
                RouteSetEntry::Table(slots) => {
                    let index = free.next().ok_or(Error::Capacity {
                        what: "ECMP tables",
                        have: used.len() + 1,
                        limit: MAX_ECMP_TABLES as usize,
                    })?;
                    used.insert(index);
                    let members = slots.iter().collect::<BTreeSet<_>>().len() as u32;
                    m.ecmp_tables
                        .set(index, EcmpTable { slots: **slots }, 0)
                        .map_err(Error::map("ECMP_TABLES"))?;
                    RouteSet {
                        members,
                        tunnel: 0,
                        table: index,
                        _pad: 0,
                    }
                }
            };
            if have.route_sets.contains_key(id) {
                report.changed += 1;
            } else {
                report.added += 1;
            }
            m.route_sets
                .insert(id, value, 0)
                .map_err(Error::map("ROUTE_SETS"))?;
        }

        // 4. Sources, decapsulation, local addresses.
        let (want_s4, have_s4) = (set_to_map(&want.source4), set_to_map(&have.source4));
        let (want_s6, have_s6) = (set_to_map(&want.source6), set_to_map(&have.source6));
        upsert_lpm(&mut m.source4, "SOURCE4", &want_s4, &have_s4, &mut report)?;
        upsert_lpm(&mut m.source6, "SOURCE6", &want_s6, &have_s6, &mut report)?;
        let mut fresh_customers: BTreeSet<u32> = want.decap.values().map(|d| d.customer).collect();
        fresh_customers.extend(
            want.dest4
                .values()
                .chain(want.dest6.values())
                .map(|d| d.customer),
        );
        for d in have.decap.values() {
            fresh_customers.remove(&d.customer);
        }
        for d in have.dest4.values().chain(have.dest6.values()) {
            fresh_customers.remove(&d.customer);
        }
        for c in fresh_customers {
            zero_per_cpu(&mut m.customer_stats, "CUSTOMER_STATS", c)?;
        }
        upsert_hash(&mut m.decap, "DECAP", &want.decap, &have.decap, &mut report)?;
        upsert_hash(
            &mut m.local_addrs,
            "LOCAL_ADDRS",
            &want.local_addrs,
            &have.local_addrs,
            &mut report,
        )?;

        // 5. Destinations.
        upsert_lpm(&mut m.dest4, "DEST4", &want.dest4, &have.dest4, &mut report)?;
        upsert_lpm(&mut m.dest6, "DEST6", &want.dest6, &have.dest6, &mut report)?;

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
        remove_hash(
            &mut m.route_sets,
            "ROUTE_SETS",
            &want.route_sets,
            &have_sets,
            &mut report,
        )?;
        remove_hash(
            &mut m.tunnels,
            "TUNNELS",
            &want.tunnels,
            &have.tunnels,
            &mut report,
        )?;
        Ok(report)
    }
}
