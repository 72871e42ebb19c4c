//! Reading the maps back and applying a compiled state as a diff.
//!
//! What to write: after a successful apply the data plane keeps the state
//! it applied (`Dataplane::applied`, one shared piece per customer) and
//! what it wrote beside it (the multibit tables as a model, where each
//! ECMP table is). The next apply compares pieces: customers whose piece
//! is the same (shared) are skipped without looking at their entries; for
//! the others, old and new entries are diffed and only differences are
//! written; the multibit table is changed in place over the ranges of the
//! changed destination entries, and only the root entries and nodes that
//! changed (plus those the idle buffer missed last time) are written into
//! the idle buffer before the one store that makes it live. Without a kept
//! state (first apply, after a failed apply, after a restart without
//! `Dataplane::adopt`) every map is read back, following references from
//! the destination and decapsulation tables so as to see exactly what
//! packets can reach, and the diff is taken against that.
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
//! packets that might still read them have finished. Ids are stable by
//! identity and a new or changed object takes an id the applied state
//! does not use (see `compile`), so an id never changes meaning within
//! one apply.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
};

use aya::{
    maps::{lpm_trie::Key, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues},
    Pod,
};
use moat_common::{
    limits::{DIR_NODE, DIR_NODES, DIR_NONE, DIR_ROOT, MAX_ECMP_TABLES, NO_ROUTE_SET},
    DestValue, EcmpTable, Tunnel, ROUTE_SET_TABLE, TUNNEL_PRESENT,
};

use crate::{
    compile::{get, Compiled, Contents, Entries, Lpm, RouteSetEntry},
    dir::{Dir, Model},
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
) -> Result<Vec<(Lpm<N>, V)>, Error> {
    let mut out = Vec::new();
    for item in map.iter() {
        let (k, v) = item.map_err(Error::map(name))?;
        out.push(((k.prefix_len(), k.data()), v));
    }
    out.sort_by_key(|a| a.0);
    out.dedup_by(|a, b| a.0 == b.0);
    Ok(out)
}

fn read_hash<K: Pod + Ord, V: Pod>(map: &HashMap<MapData, K, V>, name: &'static str) -> Result<Vec<(K, V)>, Error> {
    let mut out = Vec::new();
    for item in map.iter() {
        let (k, v) = item.map_err(Error::map(name))?;
        out.push((k, v));
    }
    out.sort_by_key(|a| a.0);
    out.dedup_by(|a, b| a.0 == b.0);
    Ok(out)
}

/// Writes the entries of `want` that `have` lacks or holds otherwise.
fn upsert<K: Ord, V: PartialEq>(
    want: &[(K, V)],
    have: &[(K, V)],
    report: &mut ApplyReport,
    mut write: impl FnMut(&K, &V) -> Result<(), Error>,
) -> Result<(), Error> {
    for (k, v) in want {
        if report.count(get(have, k), v) {
            write(k, v)?;
        }
    }
    Ok(())
}

/// Removes the entries of `have` that `want` lacks.
fn remove<K: Ord, V>(
    want: &[(K, V)],
    have: &[(K, V)],
    report: &mut ApplyReport,
    mut delete: impl FnMut(&K) -> Result<(), Error>,
) -> Result<(), Error> {
    for (k, _) in have {
        if get(want, k).is_none() {
            delete(k)?;
            report.removed += 1;
        }
    }
    Ok(())
}

fn lpm_insert<'m, const N: usize, V: Pod>(
    map: &'m mut LpmTrie<MapData, [u8; N], V>,
    name: &'static str,
) -> impl FnMut(&Lpm<N>, &V) -> Result<(), Error> + 'm {
    move |k, v| map.insert(&Key::new(k.0, k.1), v, 0).map_err(Error::map(name))
}

fn lpm_remove<'m, const N: usize, V: Pod>(
    map: &'m mut LpmTrie<MapData, [u8; N], V>,
    name: &'static str,
) -> impl FnMut(&Lpm<N>) -> Result<(), Error> + 'm {
    move |k| map.remove(&Key::new(k.0, k.1)).map_err(Error::map(name))
}

fn hash_insert<'m, K: Pod, V: Pod>(
    map: &'m mut HashMap<MapData, K, V>,
    name: &'static str,
) -> impl FnMut(&K, &V) -> Result<(), Error> + 'm {
    move |k, v| map.insert(k, v, 0).map_err(Error::map(name))
}

fn hash_remove<'m, K: Pod, V: Pod>(
    map: &'m mut HashMap<MapData, K, V>,
    name: &'static str,
) -> impl FnMut(&K) -> Result<(), Error> + 'm {
    move |k| match map.remove(k) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(Error::map(name)(e)),
    }
}

fn node_base(buf: u32, n: usize) -> u32 {
    (buf * DIR_NODES + n as u32) * DIR_NODE
}

fn write_all(root: &MmapWords, nodes: &MmapWords, buf: u32, dir: &Dir) {
    for (i, e) in dir.root.iter().enumerate() {
        root.set(buf * DIR_ROOT + i as u32, *e);
    }
    for (n, node) in dir.nodes.iter().enumerate() {
        for (i, e) in node.iter().enumerate() {
            nodes.set(node_base(buf, n) + i as u32, *e);
        }
    }
}

/// Makes `model` the live multibit table of `family` (its `ACTIVE` word:
/// `active::DIR4` or `active::DIR6`)
/// after a full build: a table equal to the live one is left alone,
/// another is written into the idle buffer and then made live with one
/// store.
fn publish_full<const N: usize>(
    active: &MmapWords,
    family: u32,
    root: &MmapWords,
    nodes: &MmapWords,
    model: &mut Model<N>,
) {
    let live = active.get(family) as u32;
    model.take_dirty();
    model.pending = None;
    let dir = &model.dir;
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
            return;
        }
    }
    let idle = if live == 0 { 1 } else { 0 };
    write_all(root, nodes, idle, dir);
    active.set(family, u64::from(idle));
}

/// Publishes what changed in `model` since it was last published: the
/// idle buffer gets those root entries and nodes plus the ones it missed
/// last time, then becomes live with one store.
fn publish_changes<const N: usize>(
    active: &MmapWords,
    family: u32,
    root: &MmapWords,
    nodes: &MmapWords,
    model: &mut Model<N>,
) {
    let live = active.get(family) as u32;
    let (dirty_root, dirty_nodes) = model.take_dirty();
    if live >= DIR_NONE {
        write_all(root, nodes, 0, &model.dir);
        active.set(family, 0);
        model.pending = None;
        return;
    }
    if dirty_root.is_empty() && dirty_nodes.is_empty() {
        return;
    }
    let idle = live ^ 1;
    match model.pending.take() {
        None => write_all(root, nodes, idle, &model.dir),
        Some((r, n)) => {
            for i in r.union(&dirty_root) {
                root.set(idle * DIR_ROOT + i, model.dir.root[*i as usize]);
            }
            for n in n.union(&dirty_nodes) {
                if let Some(node) = model.dir.nodes.get(*n as usize) {
                    for (i, e) in node.iter().enumerate() {
                        nodes.set(node_base(idle, *n as usize) + i as u32, *e);
                    }
                }
            }
        }
    }
    active.set(family, u64::from(idle));
    model.pending = Some((dirty_root, dirty_nodes));
}

/// Brings the table of one family in line with the destination entries:
/// from a model kept since the last apply, changed where entries changed,
/// or built in full. Returns false when the table exceeds its capacity
/// (the data plane is switched to the LPM tables).
#[expect(clippy::too_many_arguments, reason = "one family's maps and its entries")]
fn update_dir<'a, const N: usize>(
    model: &mut Option<Model<N>>,
    active: &MmapWords,
    family: u32,
    root: &MmapWords,
    nodes: &MmapWords,
    have: &[(Lpm<N>, DestValue)],
    want: &[(Lpm<N>, DestValue)],
    full: &dyn Fn() -> Cow<'a, [(Lpm<N>, DestValue)]>,
) -> bool {
    if let Some(m) = model {
        let removed: Vec<Lpm<N>> = have
            .iter()
            .filter(|(k, _)| get(want, k).is_none())
            .map(|(k, _)| *k)
            .collect();
        let upserted: Vec<(Lpm<N>, DestValue)> =
            want.iter().filter(|(k, v)| get(have, k) != Some(v)).copied().collect();
        if m.update(&removed, &upserted) {
            publish_changes(active, family, root, nodes, m);
            return true;
        }
    } else if let Ok(mut m) = Model::new(&full()) {
        publish_full(active, family, root, nodes, &mut m);
        *model = Some(m);
        return true;
    }
    *model = None;
    active.set(family, u64::from(DIR_NONE));
    false
}

/// What `apply` keeps from one apply to the next, beside the compiled
/// state: the multibit tables as written, and where ECMP tables are.
#[derive(Debug, Default)]
pub(crate) struct ApplyState {
    pub(crate) dir4: Option<Model<4>>,
    pub(crate) dir6: Option<Model<16>>,
    /// Route set id -> its `ECMP_TABLES` index, for every route set with
    /// a table that the maps hold.
    pub(crate) ecmp: BTreeMap<u32, u32>,
}

/// Carries [`ApplyState`] inside [`Compiled`]: never compared, and not
/// cloned (a clone carries nothing; an apply without it reads the maps).
#[derive(Default)]
pub(crate) struct Carry(pub(crate) Option<Box<ApplyState>>);

impl Clone for Carry {
    fn clone(&self) -> Self {
        Carry(None)
    }
}

impl PartialEq for Carry {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Carry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Carry(state)"
        } else {
            "Carry(none)"
        })
    }
}

/// Where the entries written by an apply come from.
enum Mode<'a> {
    /// `have` was read from the maps, `want` is everything.
    Full,
    /// `have` and `want` hold the changed customers only; `all` is the
    /// whole wanted state.
    Changes { all: &'a Compiled },
}

pub(crate) fn zero_per_cpu<V: Pod + Default>(
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
    fn read_route_sets(&self, state: &Entries) -> Result<Vec<(u32, u32)>, Error> {
        let mut ids: Vec<u32> = state
            .dest4
            .iter()
            .map(|(_, d)| d.route_set)
            .chain(state.dest6.iter().map(|(_, d)| d.route_set))
            .filter(|r| *r != NO_ROUTE_SET)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push((id, self.maps.route_sets.get(&id, 0).map_err(Error::map("ROUTE_SETS"))?));
        }
        Ok(out)
    }

    /// Reads every map back into the shape `compile` produces (names
    /// excepted), following references the way packets do.
    pub fn read_back(&self) -> Result<Contents, Error> {
        Ok(self.read_entries()?.0.into_contents())
    }

    /// [`Dataplane::read_back`] as sorted entries, plus the raw route set
    /// values it followed.
    pub(crate) fn read_entries(&self) -> Result<(Entries, Vec<(u32, u32)>), Error> {
        let m = &self.maps;
        let mut out = Entries {
            dest4: read_lpm(&m.dest4, "DEST4")?,
            dest6: read_lpm(&m.dest6, "DEST6")?,
            source4: read_lpm(&m.source4, "SOURCE4")?
                .into_iter()
                .map(|(k, _)| (k, ()))
                .collect(),
            source6: read_lpm(&m.source6, "SOURCE6")?
                .into_iter()
                .map(|(k, _)| (k, ()))
                .collect(),
            decap: read_hash(&m.decap, "DECAP")?,
            local_addrs: read_hash(&m.local_addrs, "LOCAL_ADDRS")?,
            protections: m.active.get(moat_common::active::PROTECTIONS) as u32,
            ..Entries::default()
        };
        let mut tunnel_ids: BTreeSet<u32> = out.decap.iter().map(|(_, d)| d.tunnel).collect();
        let raw_sets = self.read_route_sets(&out)?;
        for &(id, v) in &raw_sets {
            let entry = if v & ROUTE_SET_TABLE == 0 {
                tunnel_ids.insert(v);
                RouteSetEntry::Single(v)
            } else {
                let t = m
                    .ecmp_tables
                    .get(&(v & !ROUTE_SET_TABLE), 0)
                    .map_err(Error::map("ECMP_TABLES"))?;
                tunnel_ids.extend(t.slots.iter().map(|s| u32::from(*s)));
                RouteSetEntry::Table(std::sync::Arc::new(t.slots))
            };
            out.route_sets.push((id, entry));
        }
        for id in tunnel_ids {
            let slot = id
                .checked_mul(2)
                .ok_or(Error::Spec(format!("tunnel id {id} out of range")))?
                + self.live_slot(id)?;
            let t = m.tunnels.get(&slot, 0).map_err(Error::map("TUNNELS"))?;
            if t.flags & TUNNEL_PRESENT != 0 {
                out.tunnels.push((id, t));
            }
        }
        Ok((out, raw_sets))
    }

    /// Makes the maps hold exactly `want`, changing only what differs.
    ///
    /// After a successful apply the data plane remembers `want` and diffs
    /// the next apply against it, customer piece by customer piece;
    /// without it (first apply, after a failed one, after a restart
    /// without [`Dataplane::adopt`]) it reads every map back first.
    pub fn apply(&mut self, want: &Compiled) -> Result<ApplyReport, Error> {
        let mut prev = self.applied.take();
        let state = prev.as_mut().and_then(|p| p.state.0.take());
        let result = match (&prev, state) {
            (Some(p), Some(mut state)) => {
                let (have, changed) = changed_pieces(p, want);
                self.write(&have, &changed, &mut state, Mode::Changes { all: want })
                    .map(|r| (r, state))
            }
            _ => self.apply_full(want),
        };
        // Rule sets: rewritten when they changed (into the idle copy, made
        // live with one store).
        let result = result.and_then(|(mut report, state)| {
            let unknown = prev.as_ref().is_none_or(|p| p.rules_unknown) || want.rules_unknown;
            let same = if unknown {
                // Not known (adopted, or after a failed apply or a repair):
                // the live copy is read back and compared.
                self.rules_differences(want.rules.as_deref())?.is_empty()
            } else {
                prev.as_ref().map(|p| &p.rules) == Some(&want.rules)
            };
            if !same && self.write_rules(want.rules.as_deref())? > 0 {
                report.changed += 1;
            }
            Ok((report, state))
        });
        match result {
            Ok((report, state)) => {
                let mut applied = want.clone();
                applied.rules_unknown = false;
                applied.state.0 = Some(state);
                self.applied = Some(applied);
                Ok(report)
            }
            Err(e) => {
                // Keep the ids (the next compile must not reuse them) but
                // not the state: the next apply reads the maps back.
                self.applied = prev;
                Err(e)
            }
        }
    }

    fn apply_full(&mut self, want: &Compiled) -> Result<(ApplyReport, Box<ApplyState>), Error> {
        let (have, have_sets) = self.read_entries()?;
        let mut state = Box::new(ApplyState {
            ecmp: ecmp_indexes(&have_sets),
            ..ApplyState::default()
        });
        let report = self.write(&have, &want.entries(), &mut state, Mode::Full)?;
        Ok((report, state))
    }

    /// Writes the difference from `have` to `want` in the documented order.
    fn write(
        &mut self,
        have: &Entries,
        want: &Entries,
        state: &mut ApplyState,
        mode: Mode<'_>,
    ) -> Result<ApplyReport, Error> {
        let mut report = ApplyReport::default();

        // 1. Tunnels; fresh ids start with zeroed counters.
        for (id, t) in &want.tunnels {
            let old = get(&have.tunnels, id);
            if old.is_none() {
                zero_per_cpu(&mut self.maps.tunnel_stats, "TUNNEL_STATS", *id)?;
            }
            if report.count(old, t) {
                self.write_tunnel(*id, t)?;
            }
        }

        // 2 + 3. ECMP tables into unused slots, then route sets.
        let m = &mut self.maps;
        let mut used: BTreeSet<u32> = state.ecmp.values().copied().collect();
        let mut next_free = 0u32;
        for (id, entry) in &want.route_sets {
            if !report.count(get(&have.route_sets, id), entry) {
                continue;
            }
            let value = match entry {
                RouteSetEntry::Single(t) => *t,
                RouteSetEntry::Table(slots) => {
                    while next_free < MAX_ECMP_TABLES && used.contains(&next_free) {
                        next_free += 1;
                    }
                    if next_free >= MAX_ECMP_TABLES {
                        return Err(Error::Capacity {
                            what: "ECMP tables",
                            have: used.len() + 1,
                            limit: MAX_ECMP_TABLES as usize,
                        });
                    }
                    let index = next_free;
                    used.insert(index);
                    m.ecmp_tables
                        .set(index, EcmpTable { slots: **slots }, 0)
                        .map_err(Error::map("ECMP_TABLES"))?;
                    state.ecmp.insert(*id, index);
                    index | ROUTE_SET_TABLE
                }
            };
            m.route_sets.set(*id, value, 0).map_err(Error::map("ROUTE_SETS"))?;
        }

        // 4. Sources, decapsulation, local addresses.
        upsert(&want.source4, &have.source4, &mut report, |k, ()| {
            m.source4
                .insert(&Key::new(k.0, k.1), 1, 0)
                .map_err(Error::map("SOURCE4"))
        })?;
        upsert(&want.source6, &have.source6, &mut report, |k, ()| {
            m.source6
                .insert(&Key::new(k.0, k.1), 1, 0)
                .map_err(Error::map("SOURCE6"))
        })?;
        let customers = |c: &Entries| -> BTreeSet<u32> {
            c.decap
                .iter()
                .map(|(_, d)| d.customer)
                .chain(c.dest4.iter().map(|(_, d)| d.customer))
                .chain(c.dest6.iter().map(|(_, d)| d.customer))
                .collect()
        };
        for c in customers(want).difference(&customers(have)) {
            zero_per_cpu(&mut m.customer_stats, "CUSTOMER_STATS", *c)?;
        }
        upsert(
            &want.decap,
            &have.decap,
            &mut report,
            hash_insert(&mut m.decap, "DECAP"),
        )?;
        upsert(
            &want.local_addrs,
            &have.local_addrs,
            &mut report,
            hash_insert(&mut m.local_addrs, "LOCAL_ADDRS"),
        )?;

        // Built-in protections: one value, written before the destinations
        // it applies to.
        if want.protections != have.protections {
            // The reflector ports first (fixed; written again at no harm).
            let mut words = std::collections::BTreeMap::<u32, u64>::new();
            for p in moat_common::protect::REFLECTOR_PORTS {
                *words.entry(u32::from(p) / 64).or_default() |= 1 << (p % 64);
            }
            for (w, bits) in words {
                m.reflect_ports.set(w, bits, 0).map_err(Error::map("REFLECT_PORTS"))?;
            }
            m.active
                .set(moat_common::active::PROTECTIONS, u64::from(want.protections));
            report.changed += 1;
        }

        // 5. Destinations: the LPM entries (the record), then the multibit
        // table, changed in its idle buffer and made live with one store
        // (or, beyond its capacity, the LPM tables serve).
        upsert(&want.dest4, &have.dest4, &mut report, lpm_insert(&mut m.dest4, "DEST4"))?;
        upsert(&want.dest6, &have.dest6, &mut report, lpm_insert(&mut m.dest6, "DEST6"))?;
        if matches!(mode, Mode::Full) {
            state.dir4 = None;
            state.dir6 = None;
        }
        let full4 = || match mode {
            Mode::Full => Cow::Borrowed(&want.dest4[..]),
            Mode::Changes { all } => Cow::Owned(all.collect(|p| &p.dest4)),
        };
        let full6 = || match mode {
            Mode::Full => Cow::Borrowed(&want.dest6[..]),
            Mode::Changes { all } => Cow::Owned(all.collect(|p| &p.dest6)),
        };
        report.lpm_fallback[0] = !update_dir(
            &mut state.dir4,
            &m.active,
            moat_common::active::DIR4,
            &m.dir4_root,
            &m.dir4_nodes,
            &have.dest4,
            &want.dest4,
            &full4,
        );
        report.lpm_fallback[1] = !update_dir(
            &mut state.dir6,
            &m.active,
            moat_common::active::DIR6,
            &m.dir6_root,
            &m.dir6_nodes,
            &have.dest6,
            &want.dest6,
            &full6,
        );

        // Removals, in reverse.
        remove(&want.dest6, &have.dest6, &mut report, lpm_remove(&mut m.dest6, "DEST6"))?;
        remove(&want.dest4, &have.dest4, &mut report, lpm_remove(&mut m.dest4, "DEST4"))?;
        remove(
            &want.local_addrs,
            &have.local_addrs,
            &mut report,
            hash_remove(&mut m.local_addrs, "LOCAL_ADDRS"),
        )?;
        remove(
            &want.decap,
            &have.decap,
            &mut report,
            hash_remove(&mut m.decap, "DECAP"),
        )?;
        remove(
            &want.source6,
            &have.source6,
            &mut report,
            lpm_remove(&mut m.source6, "SOURCE6"),
        )?;
        remove(
            &want.source4,
            &have.source4,
            &mut report,
            lpm_remove(&mut m.source4, "SOURCE4"),
        )?;
        for (id, _) in &have.route_sets {
            if get(&want.route_sets, id).is_none() {
                // Its table slot is free for a later apply.
                state.ecmp.remove(id);
                report.removed += 1;
            }
        }
        let gone: Vec<(u32, Tunnel)> = have
            .tunnels
            .iter()
            .filter(|(id, _)| get(&want.tunnels, id).is_none())
            .copied()
            .collect();
        for (id, t) in gone {
            self.write_tunnel(id, &Tunnel { flags: 0, ..t })?;
            report.removed += 1;
        }
        Ok(report)
    }
}

/// Route set id -> ECMP table index, from raw `ROUTE_SETS` values.
pub(crate) fn ecmp_indexes(raw: &[(u32, u32)]) -> BTreeMap<u32, u32> {
    raw.iter()
        .filter(|(_, v)| *v & ROUTE_SET_TABLE != 0)
        .map(|(id, v)| (*id, v & !ROUTE_SET_TABLE))
        .collect()
}

/// The entries of the customers whose pieces differ between `prev` and
/// `want` (a shared piece is unchanged), as (have, want); local addresses
/// in full.
fn changed_pieces(prev: &Compiled, want: &Compiled) -> (Entries, Entries) {
    let mut have = Entries {
        local_addrs: prev.local_addrs().into_iter().collect(),
        protections: prev.protections,
        ..Entries::default()
    };
    let mut next = Entries {
        local_addrs: want.local_addrs().into_iter().collect(),
        protections: want.protections,
        ..Entries::default()
    };
    for (sa, sb) in prev.pieces.shards().iter().zip(want.pieces.shards()) {
        if std::sync::Arc::ptr_eq(sa, sb) {
            continue;
        }
        let mut a = sa.iter().peekable();
        let mut b = sb.iter().peekable();
        loop {
            match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some((_, pa)), Some((_, pb))) if std::sync::Arc::ptr_eq(pa, pb) => {
                    a.next();
                    b.next();
                }
                (Some((na, pa)), Some((nb, pb))) if na == nb => {
                    pa.add_entries(&mut have);
                    pb.add_entries(&mut next);
                    a.next();
                    b.next();
                }
                (Some((na, pa)), Some((nb, _))) if na < nb => {
                    pa.add_entries(&mut have);
                    a.next();
                }
                (Some((_, pa)), None) => {
                    pa.add_entries(&mut have);
                    a.next();
                }
                (_, Some((_, pb))) => {
                    pb.add_entries(&mut next);
                    b.next();
                }
            }
        }
    }
    (have.finish(), next.finish())
}
