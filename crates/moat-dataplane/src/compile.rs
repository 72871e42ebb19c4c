//! Spec -> the exact contents every data-plane map should hold.
//!
//! The destination tables flatten protected prefixes and customer routes
//! into one longest-prefix-match table per family, so a packet needs a
//! single LPM lookup to learn both its customer and its route set:
//! - every route prefix maps to its own route set;
//! - every protected prefix maps to the longest route prefix that covers it
//!   (or to no route set).
//!
//! Because routes lie inside their customer's prefixes and customers'
//! prefixes do not overlap, the longest match over that union gives the
//! right customer and the longest covering route for every address.
//!
//! The result is kept per customer ([`Compiled`] holds one shared piece per
//! customer), so that compiling a configuration in which one customer
//! changed recompiles that customer only and reuses every other piece as
//! is (same spec and same next hops give the same entries and ids), and so
//! that `apply` finds what changed by comparing pieces, not entries.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{Hash, Hasher},
    sync::Arc,
};

use ipnet::IpNet;
use moat_common::{
    header, limits::*, DecapKey, DecapValue, DestValue, Tunnel, LOCAL_NODE_ADDRESS, LOCAL_TUNNEL_ENDPOINT,
    TUNNEL_HAS_KEY, TUNNEL_HEADER_MAX, TUNNEL_NEXTHOP_VALID, TUNNEL_PRESENT,
};

use crate::{
    ecmp::{self, Member},
    error::Error,
    spec::{CustomerSpec, NextHop, Spec, TunnelSpec},
};

/// How a route set picks its tunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteSetEntry {
    /// One member: every flow goes to this tunnel.
    Single(u32),
    /// Several members: the slot table (tunnel id per flow-hash slot).
    Table(Arc<[u16; ECMP_SLOTS]>),
}

/// LPM key: (prefix length, address bytes).
pub type Lpm<const N: usize> = (u32, [u8; N]);

/// The contents of every map, flat, plus names for reporting: what
/// [`crate::Dataplane::read_back`] finds (without names) and what
/// [`Compiled::contents`] spells out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Contents {
    pub dest4: BTreeMap<Lpm<4>, DestValue>,
    pub dest6: BTreeMap<Lpm<16>, DestValue>,
    pub source4: BTreeSet<Lpm<8>>,
    pub source6: BTreeSet<Lpm<20>>,
    pub route_sets: BTreeMap<u32, RouteSetEntry>,
    pub tunnels: BTreeMap<u32, Tunnel>,
    pub decap: BTreeMap<DecapKey, DecapValue>,
    pub local_addrs: BTreeMap<[u8; 4], u32>,
    /// The protections word of `ACTIVE`.
    pub protections: u32,
    /// Customer id -> name.
    pub customers: BTreeMap<u32, String>,
    /// Tunnel id -> (customer name, tunnel name).
    pub tunnel_names: BTreeMap<u32, (String, String)>,
    /// Route set id -> (customer name, route prefix).
    pub route_set_keys: BTreeMap<u32, (String, IpNet)>,
}

/// Looks `k` up in a slice sorted by key.
pub(crate) fn get<'a, K: Ord, V>(v: &'a [(K, V)], k: &K) -> Option<&'a V> {
    v.binary_search_by(|(x, _)| x.cmp(k)).ok().map(|i| &v[i].1)
}

/// Sorts by key; of equal keys the last one stays (as a map's insert).
fn sort_dedup<K: Ord, V>(v: &mut Vec<(K, V)>) {
    v.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = 0;
    for i in 0..v.len() {
        if out > 0 && v[out - 1].0 == v[i].0 {
            v.swap(out - 1, i);
        } else {
            v.swap(out, i);
            out += 1;
        }
    }
    v.truncate(out);
}

/// Map contents as sorted vectors (unique keys): what `apply` diffs and
/// writes. Compact, and cheap to build from pieces.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Entries {
    pub dest4: Vec<(Lpm<4>, DestValue)>,
    pub dest6: Vec<(Lpm<16>, DestValue)>,
    pub source4: Vec<(Lpm<8>, ())>,
    pub source6: Vec<(Lpm<20>, ())>,
    pub route_sets: Vec<(u32, RouteSetEntry)>,
    pub tunnels: Vec<(u32, Tunnel)>,
    pub decap: Vec<(DecapKey, DecapValue)>,
    pub local_addrs: Vec<([u8; 4], u32)>,
    pub protections: u32,
}

impl Entries {
    /// Sorts every kind after pieces were added.
    pub(crate) fn finish(mut self) -> Self {
        sort_dedup(&mut self.dest4);
        sort_dedup(&mut self.dest6);
        sort_dedup(&mut self.source4);
        sort_dedup(&mut self.source6);
        sort_dedup(&mut self.route_sets);
        sort_dedup(&mut self.tunnels);
        sort_dedup(&mut self.decap);
        sort_dedup(&mut self.local_addrs);
        self
    }

    /// The public, flat form (without names).
    pub(crate) fn into_contents(self) -> Contents {
        Contents {
            dest4: self.dest4.into_iter().collect(),
            dest6: self.dest6.into_iter().collect(),
            source4: self.source4.into_iter().map(|(k, ())| k).collect(),
            source6: self.source6.into_iter().map(|(k, ())| k).collect(),
            route_sets: self.route_sets.into_iter().collect(),
            tunnels: self.tunnels.into_iter().collect(),
            decap: self.decap.into_iter().collect(),
            local_addrs: self.local_addrs.into_iter().collect(),
            protections: self.protections,
            ..Contents::default()
        }
    }
}

/// Names by id, from [`Compiled::names`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    pub customers: BTreeMap<u32, String>,
    /// Tunnel id -> (customer, tunnel, the tunnel's data-plane flags).
    pub tunnels: BTreeMap<u32, (String, String, u8)>,
}

/// Everything one customer puts into the maps, and the ids it holds;
/// every kind a vector sorted by key.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Piece {
    pub name: String,
    /// What it was compiled from: the customer and its tunnels' next hops,
    /// encoded (see [`encode`]). `None` for a piece rebuilt from the maps
    /// (adoption): never reused.
    pub source: Option<Box<[u8]>>,
    pub id: u32,
    pub tunnels: Vec<(u32, Tunnel)>,
    /// Tunnel name -> id.
    pub tunnel_ids: Vec<(String, u32)>,
    pub decap: Vec<(DecapKey, DecapValue)>,
    pub route_sets: Vec<(u32, RouteSetEntry)>,
    /// Route prefix -> route set id.
    pub set_ids: Vec<(IpNet, u32)>,
    pub dest4: Vec<(Lpm<4>, DestValue)>,
    pub dest6: Vec<(Lpm<16>, DestValue)>,
    pub source4: Vec<(Lpm<8>, ())>,
    pub source6: Vec<(Lpm<20>, ())>,
}

impl Piece {
    fn tables(&self) -> usize {
        self.route_sets
            .iter()
            .filter(|(_, e)| matches!(e, RouteSetEntry::Table(_)))
            .count()
    }

    /// Adds this piece's entries to `out` (call [`Entries::finish`] after).
    pub(crate) fn add_entries(&self, out: &mut Entries) {
        out.dest4.extend_from_slice(&self.dest4);
        out.dest6.extend_from_slice(&self.dest6);
        out.source4.extend_from_slice(&self.source4);
        out.source6.extend_from_slice(&self.source6);
        out.route_sets.extend_from_slice(&self.route_sets);
        out.tunnels.extend_from_slice(&self.tunnels);
        out.decap.extend_from_slice(&self.decap);
    }
}

/// Entry counts of a state, per kind, kept as pieces come and go.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Totals {
    dest4: isize,
    dest6: isize,
    source4: isize,
    source6: isize,
    route_sets: isize,
    tables: isize,
}

impl Totals {
    pub(crate) fn mark(&mut self, p: &Piece, on: bool) {
        let s = if on { 1 } else { -1 };
        self.dest4 += s * p.dest4.len() as isize;
        self.dest6 += s * p.dest6.len() as isize;
        self.source4 += s * p.source4.len() as isize;
        self.source6 += s * p.source6.len() as isize;
        self.route_sets += s * p.route_sets.len() as isize;
        self.tables += s * p.tables() as isize;
    }
}

/// Which ids of a kind a state uses, one bit each (and, while
/// allocating, the first word that may have a free bit).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Bitmap(Vec<u64>, usize);

impl Bitmap {
    pub fn set(&mut self, i: u32) {
        let w = i as usize / 64;
        if self.0.len() <= w {
            self.0.resize(w + 1, 0);
        }
        self.0[w] |= 1 << (i % 64);
    }
    pub fn get(&self, i: u32) -> bool {
        self.0.get(i as usize / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    pub fn clear(&mut self, i: u32) {
        if let Some(w) = self.0.get_mut(i as usize / 64) {
            *w &= !(1 << (i % 64));
        }
    }
    /// The lowest id below `limit` not set, from the words not yet full
    /// (allocation only sets bits, so full words stay full).
    fn first_free(&mut self, limit: u32) -> Option<u32> {
        let from = self.1.min(self.0.len());
        let word = from
            + self.0[from..]
                .iter()
                .position(|w| *w != u64::MAX)
                .unwrap_or(self.0.len() - from);
        self.1 = word;
        let bit = self.0.get(word).map_or(0, |w| w.trailing_ones());
        let i = (word as u32) * 64 + bit;
        (i < limit).then_some(i)
    }
    fn count(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }
}

/// The ids a state uses, per kind.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Used {
    pub customers: Bitmap,
    pub tunnels: Bitmap,
    pub route_sets: Bitmap,
}

impl Used {
    pub(crate) fn mark(&mut self, p: &Piece, on: bool) {
        let f = |b: &mut Bitmap, i: u32| if on { b.set(i) } else { b.clear(i) };
        f(&mut self.customers, p.id);
        for (id, _) in &p.tunnels {
            f(&mut self.tunnels, *id);
        }
        for (id, _) in &p.route_sets {
            f(&mut self.route_sets, *id);
        }
    }
}

/// A map split into shards shared between states: changing a few keys
/// copies a few small shards, not the map.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Sharded<K, V>(Vec<Arc<BTreeMap<K, V>>>);

const SHARDS: u64 = 64;

impl<K: Ord + Hash + Clone, V: Clone> Default for Sharded<K, V> {
    fn default() -> Self {
        Sharded((0..SHARDS).map(|_| Arc::new(BTreeMap::new())).collect())
    }
}

impl<K: Ord + Hash + Clone, V: Clone> Sharded<K, V> {
    fn shard(k: &K) -> usize {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        k.hash(&mut h);
        (h.finish() % SHARDS) as usize
    }
    pub fn get(&self, k: &K) -> Option<&V> {
        self.0[Self::shard(k)].get(k)
    }
    pub fn insert(&mut self, k: K, v: V) {
        Arc::make_mut(&mut self.0[Self::shard(&k)]).insert(k, v);
    }
    pub fn remove(&mut self, k: &K) {
        Arc::make_mut(&mut self.0[Self::shard(k)]).remove(k);
    }
}

/// Customer name -> piece, split into shards shared between states:
/// cloning is cheap, and changing a piece copies one small shard.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Pieces {
    shards: Vec<Arc<BTreeMap<Arc<str>, Arc<Piece>>>>,
    len: usize,
}

const PIECE_SHARDS: usize = 64;

impl Default for Pieces {
    fn default() -> Self {
        Pieces {
            shards: (0..PIECE_SHARDS).map(|_| Arc::new(BTreeMap::new())).collect(),
            len: 0,
        }
    }
}

impl Pieces {
    fn shard(name: &str) -> usize {
        let mut h = NameHasher::default();
        h.write(name.as_bytes());
        (h.finish() % PIECE_SHARDS as u64) as usize
    }
    pub fn get(&self, name: &str) -> Option<&Arc<Piece>> {
        self.shards[Self::shard(name)].get(name)
    }
    pub fn insert(&mut self, piece: Arc<Piece>) {
        let name: Arc<str> = piece.name.as_str().into();
        if Arc::make_mut(&mut self.shards[Self::shard(&name)])
            .insert(name, piece)
            .is_none()
        {
            self.len += 1;
        }
    }
    pub fn remove(&mut self, name: &str) {
        if Arc::make_mut(&mut self.shards[Self::shard(name)])
            .remove(name)
            .is_some()
        {
            self.len -= 1;
        }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<Piece>)> {
        self.shards.iter().flat_map(|s| s.iter())
    }
    pub fn values(&self) -> impl Iterator<Item = &Arc<Piece>> {
        self.shards.iter().flat_map(|s| s.values())
    }
    pub fn keys(&self) -> impl Iterator<Item = &Arc<str>> {
        self.shards.iter().flat_map(|s| s.keys())
    }
    /// The shards (the same name falls into the same shard in every state).
    pub fn shards(&self) -> &[Arc<BTreeMap<Arc<str>, Arc<Piece>>>] {
        &self.shards
    }
}

/// The pieces in the order of the spec they were compiled from, with
/// their sources end to end, in chunks shared between states: the next
/// compile compares customer `i` with the `i`-th source first, reading
/// memory in order and touching no piece.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Hint {
    chunks: Vec<Arc<HintChunk>>,
}

#[derive(Debug, Default, PartialEq)]
struct HintChunk {
    bytes: Vec<u8>,
    ends: Vec<usize>,
    /// The pieces' customer ids.
    ids: Vec<u32>,
    pieces: Vec<Arc<Piece>>,
}

const HINT_CHUNK: usize = 256;

impl Hint {
    fn get(&self, i: usize) -> Option<&[u8]> {
        let c = self.chunks.get(i / HINT_CHUNK)?;
        let j = i % HINT_CHUNK;
        let end = *c.ends.get(j)?;
        let start = if j == 0 { 0 } else { c.ends[j - 1] };
        Some(&c.bytes[start..end])
    }
    fn id(&self, i: usize) -> u32 {
        self.chunks[i / HINT_CHUNK].ids[i % HINT_CHUNK]
    }
    fn piece(&self, i: usize) -> &Arc<Piece> {
        &self.chunks[i / HINT_CHUNK].pieces[i % HINT_CHUNK]
    }
}

/// Where a customer's piece comes from in a compile.
enum Origin {
    /// The previous state's piece at this position of its hint.
    Hinted,
    /// Another previous piece.
    Kept(Arc<Piece>),
    /// A fresh piece (filled in once made).
    Fresh,
}

/// A compiled configuration: one shared piece per customer, plus what is
/// global (node addresses, tunnel endpoints, the ids in use). Cloning it
/// is cheap (pieces are shared); [`Compiled::contents`] spells it out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Compiled {
    /// Customer name -> its piece. Names of pieces kept only to hold ids
    /// found in the maps (adoption) start with a NUL and match nothing.
    /// Shared as a whole too: an unchanged state is one pointer.
    pub(crate) pieces: Pieces,
    /// The pieces in the order of the spec they were compiled from.
    pub(crate) hint: Arc<Hint>,
    pub(crate) node_addresses: BTreeSet<[u8; 4]>,
    pub(crate) protections: u32,
    /// The operator's mitigation rules, compiled.
    pub(crate) rules: Option<Arc<crate::rules::RuleTables>>,
    /// What `rules` was compiled from.
    pub(crate) rule_source: Option<Arc<RuleSource>>,
    /// What the rule maps hold is not known (an adopted data plane): the
    /// next apply writes the rule sets whatever they are.
    pub(crate) rules_unknown: bool,
    /// Tunnel endpoint -> number of tunnels using it.
    pub(crate) endpoints: BTreeMap<[u8; 4], u32>,
    pub(crate) used: Used,
    pub(crate) totals: Totals,
    /// Decapsulation key -> customer id, over all pieces.
    pub(crate) decap_owner: Sharded<DecapKey, u32>,
    /// What `apply` keeps between applies (never compared, never cloned).
    pub(crate) state: crate::apply::Carry,
    /// [`Compiled::contents`], spelt out on first use through `Deref`.
    pub(crate) flat: Flat,
}

/// The spelt-out contents, made once and shared by clones.
#[derive(Clone, Default)]
pub(crate) struct Flat(Arc<std::sync::OnceLock<Contents>>);

impl PartialEq for Flat {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Flat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Flat")
    }
}

/// Reading a compiled state as flat map contents (`c.dest4`,
/// `c.customers`, ...) spells it out once (O(entries)); the compile and
/// apply paths never do.
impl std::ops::Deref for Compiled {
    type Target = Contents;

    fn deref(&self) -> &Contents {
        self.flat.0.get_or_init(|| self.contents())
    }
}

impl Compiled {
    /// The rule sets (mitigation rules, then firewalls), compiled and laid
    /// out; `None` when there is no rule.
    pub fn rules(&self) -> Option<&crate::rules::RuleTables> {
        self.rules.as_deref()
    }

    /// The `LOCAL_ADDRS` contents.
    pub fn local_addrs(&self) -> BTreeMap<[u8; 4], u32> {
        let mut out: BTreeMap<[u8; 4], u32> = self.node_addresses.iter().map(|a| (*a, LOCAL_NODE_ADDRESS)).collect();
        for a in self.endpoints.keys() {
            *out.entry(*a).or_default() |= LOCAL_TUNNEL_ENDPOINT | LOCAL_NODE_ADDRESS;
        }
        out
    }

    /// Every map's entries (no names), sorted.
    pub(crate) fn entries(&self) -> Entries {
        let mut out = Entries {
            local_addrs: self.local_addrs().into_iter().collect(),
            protections: self.protections,
            ..Entries::default()
        };
        for p in self.pieces.values() {
            p.add_entries(&mut out);
        }
        out.finish()
    }

    /// One kind of entry over all pieces, sorted.
    pub(crate) fn collect<K: Ord + Copy, V: Copy>(&self, f: impl Fn(&Piece) -> &[(K, V)]) -> Vec<(K, V)> {
        let mut out = Vec::with_capacity(self.pieces.values().map(|p| f(p).len()).sum());
        for p in self.pieces.values() {
            out.extend_from_slice(f(p));
        }
        sort_dedup(&mut out);
        out
    }

    /// Every map's contents, flat, with names.
    pub fn contents(&self) -> Contents {
        let mut out = Contents {
            local_addrs: self.local_addrs(),
            protections: self.protections,
            ..Contents::default()
        };
        for p in self.pieces.values() {
            p.add_to(&mut out);
        }
        out
    }

    /// Names by id, without spelling out the entries (cheap: one walk over
    /// the customers): customer id -> name, tunnel id -> (customer, tunnel).
    pub fn names(&self) -> Names {
        let mut out = Names::default();
        for p in self.pieces.values() {
            if p.name.starts_with('\0') {
                continue;
            }
            out.customers.insert(p.id, p.name.clone());
            for (name, id) in &p.tunnel_ids {
                let flags = p.tunnels.iter().find(|(t, _)| t == id).map_or(0, |(_, t)| t.flags);
                out.tunnels.insert(*id, (p.name.clone(), name.clone(), flags));
            }
        }
        out
    }

    /// Number of customers (pieces kept for ids found in the maps excepted).
    pub fn customer_count(&self) -> usize {
        self.pieces.keys().filter(|n| !n.starts_with('\0')).count()
    }
}

impl Piece {
    /// Adds this piece's entries (and names) to `out`.
    pub(crate) fn add_to(&self, out: &mut Contents) {
        out.dest4.extend(self.dest4.iter().map(|(k, v)| (*k, *v)));
        out.dest6.extend(self.dest6.iter().map(|(k, v)| (*k, *v)));
        out.source4.extend(self.source4.iter().map(|(k, ())| *k));
        out.source6.extend(self.source6.iter().map(|(k, ())| *k));
        out.route_sets
            .extend(self.route_sets.iter().map(|(k, v)| (*k, v.clone())));
        out.tunnels.extend(self.tunnels.iter().map(|(k, v)| (*k, *v)));
        out.decap.extend(self.decap.iter().map(|(k, v)| (*k, *v)));
        out.customers.insert(self.id, self.name.clone());
        for (t, id) in &self.tunnel_ids {
            out.tunnel_names.insert(*id, (self.name.clone(), t.clone()));
        }
        for (p, id) in &self.set_ids {
            out.route_set_keys.insert(*id, (self.name.clone(), *p));
        }
    }
}

/// The outer Ethernet + IPv4 (DF, id 0) + GRE header template of a tunnel,
/// with total length, checksum and GRE protocol left zero.
pub fn outer_header(
    nh: &NextHop,
    local: [u8; 4],
    remote: [u8; 4],
    ttl: u8,
    key: Option<u32>,
) -> [u8; TUNNEL_HEADER_MAX] {
    let mut h = [0u8; TUNNEL_HEADER_MAX];
    h[header::ETH_DST..header::ETH_DST + 6].copy_from_slice(&nh.dmac);
    h[header::ETH_SRC..header::ETH_SRC + 6].copy_from_slice(&nh.smac);
    h[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    h[header::IP] = 0x45;
    h[header::IP + 6] = 0x40;
    h[header::IP_TTL] = ttl;
    h[header::IP_TTL + 1] = 47;
    h[header::IP_SRC..header::IP_SRC + 4].copy_from_slice(&local);
    h[header::IP_DST..header::IP_DST + 4].copy_from_slice(&remote);
    if let Some(k) = key {
        h[header::GRE] = 0x20;
        h[header::GRE_KEY..header::GRE_KEY + 4].copy_from_slice(&k.to_be_bytes());
    }
    h
}

/// Sum of the outer IPv4 header's 16-bit words with total length and
/// checksum zero (DF set, id zero), folded.
pub fn outer_csum_partial(local: [u8; 4], remote: [u8; 4], ttl: u8) -> u16 {
    let words = [
        0x4500u32,
        0x4000,
        (u32::from(ttl) << 8) | 47,
        u32::from(u16::from_be_bytes([local[0], local[1]])),
        u32::from(u16::from_be_bytes([local[2], local[3]])),
        u32::from(u16::from_be_bytes([remote[0], remote[1]])),
        u32::from(u16::from_be_bytes([remote[2], remote[3]])),
    ];
    let mut sum: u32 = words.iter().sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// What the rule sets are compiled from: the mitigation rules and each
/// firewall with its customer's id and name.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct RuleSource {
    mitigation: Vec<crate::spec::RuleSpec>,
    firewalls: Vec<(u32, String, Vec<crate::spec::RuleSpec>)>,
}

/// The rule sets of `spec`, firewalls placed by the ids of `pieces`; the
/// previous state's when made from the same rules (compiling 1,024 rules
/// per set is not free, and health changes compile often).
fn rules_for(spec: &Spec, pieces: &Pieces, prev: &Compiled) -> Result<RulesAndSource, Error> {
    let mut source = RuleSource {
        mitigation: spec.mitigation.clone(),
        firewalls: Vec::new(),
    };
    for c in spec.customers.iter().filter(|c| !c.firewall.is_empty()) {
        let Some(piece) = pieces.get(c.name.as_str()) else {
            return Err(Error::Spec(format!("customer {}: no id for its firewall", c.name)));
        };
        source.firewalls.push((piece.id, c.name.clone(), c.firewall.clone()));
    }
    if prev.rule_source.as_deref() == Some(&source) {
        return Ok((prev.rules.clone(), prev.rule_source.clone()));
    }
    let firewalls: Vec<(u32, &str, &[crate::spec::RuleSpec])> = source
        .firewalls
        .iter()
        .map(|(id, name, rules)| (*id, name.as_str(), rules.as_slice()))
        .collect();
    let rules = match crate::rules::compile(&source.mitigation, &firewalls)? {
        Some(r) if prev.rules.as_deref() == Some(&*r) => prev.rules.clone(),
        r => r,
    };
    Ok((rules, Some(Arc::new(source))))
}

type RulesAndSource = (Option<Arc<crate::rules::RuleTables>>, Option<Arc<RuleSource>>);

pub(crate) fn check_capacity(what: &'static str, have: usize, limit: u32) -> Result<(), Error> {
    if have > limit as usize {
        return Err(Error::Capacity {
            what,
            have,
            limit: limit as usize,
        });
    }
    Ok(())
}

/// Fresh ids: never used by the previous state nor taken earlier in this
/// compile (so an id never changes meaning within one apply).
fn fresh(taken: &mut Bitmap, limit: u32, what: &'static str) -> Result<u32, Error> {
    let id = taken.first_free(limit).ok_or(Error::Capacity {
        what,
        have: taken.count() + 1,
        limit: limit as usize,
    })?;
    taken.set(id);
    Ok(id)
}

/// Where the encoding of a customer goes.
trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

fn put_str(w: &mut impl Sink, s: &str) {
    w.put(&(s.len() as u32).to_le_bytes());
    w.put(s.as_bytes());
}

fn put_net(w: &mut impl Sink, n: &IpNet) {
    match n {
        IpNet::V4(n) => {
            let a = n.addr().octets();
            w.put(&[4, n.prefix_len(), a[0], a[1], a[2], a[3]]);
        }
        IpNet::V6(n) => {
            w.put(&[6, n.prefix_len()]);
            w.put(&n.addr().octets());
        }
    }
}

/// A self-delimiting encoding of everything a piece is compiled from: the
/// customer (field by field, lengths first) and its tunnels' next hops.
/// Equal encodings mean equal inputs.
fn encode(w: &mut impl Sink, c: &CustomerSpec, hops: &mut dyn FnMut(&TunnelSpec) -> Option<NextHop>) {
    put_str(w, &c.name);
    for list in [&c.prefixes, &c.egress_prefixes] {
        w.put(&(list.len() as u32).to_le_bytes());
        for p in list {
            put_net(w, p);
        }
    }
    w.put(&(c.tunnels.len() as u32).to_le_bytes());
    for t in &c.tunnels {
        put_str(w, &t.name);
        let (l, r) = (t.local.octets(), t.remote.octets());
        let k = t.key.unwrap_or(0).to_le_bytes();
        let m = t.mtu.to_le_bytes();
        let p = t.penalty.to_le_bytes();
        w.put(&[
            l[0],
            l[1],
            l[2],
            l[3],
            r[0],
            r[1],
            r[2],
            r[3],
            u8::from(t.key.is_some()),
            k[0],
            k[1],
            k[2],
            k[3],
            m[0],
            m[1],
            t.ttl,
            p[0],
            p[1],
            p[2],
            p[3],
        ]);
        match hops(t) {
            None => w.put(&[0]),
            Some(h) => {
                let i = h.ifindex.to_le_bytes();
                let m = h.link_mtu.to_le_bytes();
                w.put(&[1, i[0], i[1], i[2], i[3], m[0], m[1]]);
                w.put(&h.smac);
                w.put(&h.dmac);
            }
        }
    }
    w.put(&(c.routes.len() as u32).to_le_bytes());
    for r in &c.routes {
        put_net(w, &r.prefix);
        put_str(w, &r.tunnel);
        let p = r.priority.to_le_bytes();
        let g = r.weight.to_le_bytes();
        w.put(&[p[0], p[1], p[2], p[3], g[0], g[1]]);
    }
}

/// A fast hasher for names (not keyed: the names come from the config).
#[derive(Default)]
struct NameHasher(u64);

impl Hasher for NameHasher {
    fn finish(&self) -> u64 {
        ecmp::splitmix64(self.0)
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
        let mut w = [0u8; 8];
        w[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        self.0 =
            (self.0.rotate_left(5) ^ u64::from_le_bytes(w) ^ bytes.len() as u64).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

type NameSet<'a> = std::collections::HashSet<&'a str, std::hash::BuildHasherDefault<NameHasher>>;

/// Compiles `spec`. `next_hop` resolves each tunnel's next hop; `None`
/// leaves the tunnel installed but marked unresolved (its packets are
/// dropped and counted until it is resolved).
///
/// `previous` is the state currently applied (see [`crate::Dataplane::applied`]).
/// Ids stay stable across applies: a customer keeps its id by name, a
/// tunnel by (customer, tunnel name), a route set by (customer, prefix) as
/// long as its content is unchanged; anything new or changed gets an id
/// the previous state does not use. The apply order relies on this: an
/// entry still pointing at an old id never meets new content. Each kind
/// may therefore use at most half of its table in one configuration.
///
/// A customer whose spec and tunnel next hops equal those it was compiled
/// from in `previous` keeps its compiled piece as is (shared, not copied).
/// When nothing changed at all, the result shares the previous state.
pub fn compile(
    spec: &Spec,
    next_hop: &dyn Fn(&TunnelSpec) -> Option<NextHop>,
    previous: Option<&Compiled>,
) -> Result<Compiled, Error> {
    check_capacity("customers", spec.customers.len(), MAX_CUSTOMERS / 2)?;
    let tunnel_count: usize = spec.customers.iter().map(|c| c.tunnels.len()).sum();
    check_capacity("tunnels", tunnel_count, MAX_TUNNELS / 2)?;
    let empty = Compiled::default();
    let prev = previous.unwrap_or(&empty);

    let twice = |name: &str| Error::Spec(format!("customer {name} is defined twice"));
    // Names defined twice: a previous piece claimed twice (by its id), or
    // a new name twice.
    let mut claimed = Bitmap::default();
    let mut new_names = NameSet::default();
    let mut taken = prev.used.clone();
    let mut fresh_pieces = Vec::new();
    let mut released: Vec<Arc<Piece>> = Vec::new();
    let mut found = 0usize;
    // Pieces in spec order; `None` for fresh ones (filled in below).
    let mut order: Vec<Origin> = Vec::with_capacity(spec.customers.len());
    let mut scratch = Vec::new();
    for (i, customer) in spec.customers.iter().enumerate() {
        scratch.clear();
        encode(&mut scratch, customer, &mut |t| next_hop(t));
        let source = &scratch[..];
        // The encoding starts with the name: an equal source at the same
        // position is this customer's piece, unchanged.
        let hinted = prev.hint.get(i);
        if hinted == Some(source) {
            // Only the id is read (no piece is touched).
            let id = prev.hint.id(i);
            if claimed.get(id) {
                return Err(twice(&customer.name));
            }
            claimed.set(id);
            found += 1;
            order.push(Origin::Hinted);
            continue;
        }
        let (old, same) = match hinted {
            Some(_) if prev.hint.piece(i).name == customer.name => (Some(prev.hint.piece(i)), hinted == Some(source)),
            _ => match prev.pieces.get(customer.name.as_str()) {
                Some(p) => (Some(p), p.source.as_deref() == Some(source)),
                None => (None, false),
            },
        };
        match old {
            Some(old) => {
                if claimed.get(old.id) {
                    return Err(twice(&customer.name));
                }
                claimed.set(old.id);
                found += 1;
            }
            None => {
                if !new_names.insert(customer.name.as_str()) {
                    return Err(twice(&customer.name));
                }
            }
        }
        match old {
            Some(old) if same => order.push(Origin::Kept(old.clone())),
            _ => {
                let piece = compile_customer(customer, next_hop, Box::from(source), old.map(|p| &**p), &mut taken)?;
                fresh_pieces.push((i, piece));
                released.extend(old.cloned());
                order.push(Origin::Fresh);
            }
        }
    }
    let node_addresses: BTreeSet<[u8; 4]> = spec.node_addresses.iter().map(|a| a.octets()).collect();
    if fresh_pieces.is_empty()
        && found == prev.pieces.len()
        && node_addresses == prev.node_addresses
        && spec.protections == prev.protections
        && rules_for(spec, &prev.pieces, prev)?.0 == prev.rules
    {
        // Nothing changed: the same state (pieces shared as a whole).
        return Ok(prev.clone());
    }

    let mut out = Compiled {
        node_addresses,
        protections: spec.protections,
        endpoints: prev.endpoints.clone(),
        used: prev.used.clone(),
        totals: prev.totals,
        decap_owner: prev.decap_owner.clone(),
        ..Compiled::default()
    };
    // Start from the previous pieces (shared) and replace what changed.
    let mut pieces = prev.pieces.clone();
    if found < prev.pieces.len() {
        // Customers gone (and pieces that only held ids).
        for (name, old) in prev.pieces.iter() {
            if !claimed.get(old.id) {
                pieces.remove(name);
                released.push(old.clone());
            }
        }
    }
    // Pieces of the previous state not kept: release their ids, endpoints
    // and decapsulation keys; then claim those of the new pieces.
    for old in &released {
        out.used.mark(old, false);
        out.totals.mark(old, false);
        for (k, v) in &old.decap {
            if out.decap_owner.get(k) == Some(&v.customer) {
                out.decap_owner.remove(k);
            }
            if let Some(n) = out.endpoints.get_mut(&k.local) {
                *n -= 1;
                if *n == 0 {
                    out.endpoints.remove(&k.local);
                }
            }
        }
    }
    for (i, piece) in fresh_pieces {
        out.used.mark(&piece, true);
        out.totals.mark(&piece, true);
        for (k, v) in &piece.decap {
            if out.decap_owner.get(k).is_some() {
                return Err(Error::Spec(format!(
                    "customer {}: tunnel (local {:?}, remote {:?}, key {:?}) is used by another tunnel",
                    piece.name,
                    k.local,
                    k.remote,
                    (k.has_key != 0).then(|| u32::from_be_bytes(k.key))
                )));
            }
            out.decap_owner.insert(*k, v.customer);
            *out.endpoints.entry(k.local).or_default() += 1;
        }
        let piece = Arc::new(piece);
        pieces.insert(piece.clone());
        order[i] = Origin::Kept(piece);
    }
    out.pieces = pieces;
    (out.rules, out.rule_source) = rules_for(spec, &out.pieces, prev)?;
    // Chunks of pieces all hinted at their own position are shared.
    let mut chunks = Vec::with_capacity(order.len().div_ceil(HINT_CHUNK));
    for (k, chunk) in order.chunks(HINT_CHUNK).enumerate() {
        let same = prev.hint.chunks.get(k).filter(|c| c.ends.len() == chunk.len());
        match same {
            Some(c) if chunk.iter().all(|o| matches!(o, Origin::Hinted)) => chunks.push(c.clone()),
            _ => {
                let mut c = HintChunk::default();
                for (j, o) in chunk.iter().enumerate() {
                    let i = k * HINT_CHUNK + j;
                    let p = match o {
                        Origin::Hinted => prev.hint.piece(i),
                        Origin::Kept(p) => p,
                        Origin::Fresh => unreachable!("fresh pieces are filled in"),
                    };
                    c.bytes.extend_from_slice(p.source.as_deref().unwrap_or_default());
                    c.ends.push(c.bytes.len());
                    c.ids.push(p.id);
                    c.pieces.push(p.clone());
                }
                chunks.push(Arc::new(c));
            }
        }
    }
    out.hint = Arc::new(Hint { chunks });

    let t = out.totals;
    check_capacity("IPv4 destination entries", t.dest4 as usize, MAX_DEST_ENTRIES)?;
    check_capacity("IPv6 destination entries", t.dest6 as usize, MAX_DEST_ENTRIES)?;
    check_capacity("IPv4 source entries", t.source4 as usize, MAX_SOURCE_ENTRIES)?;
    check_capacity("IPv6 source entries", t.source6 as usize, MAX_SOURCE_ENTRIES)?;
    check_capacity("route sets", t.route_sets as usize, MAX_ROUTE_SETS / 2)?;
    check_capacity("multi-tunnel route sets", t.tables as usize, MAX_ECMP_SETS)?;
    check_capacity("local addresses", out.local_addrs().len(), MAX_LOCAL_ADDRS)?;
    Ok(out)
}

/// Compiles one customer; ids by identity from `old` (its piece in the
/// previous state), fresh ones from `taken`.
fn compile_customer(
    customer: &CustomerSpec,
    next_hop: &dyn Fn(&TunnelSpec) -> Option<NextHop>,
    source: Box<[u8]>,
    old: Option<&Piece>,
    taken: &mut Used,
) -> Result<Piece, Error> {
    let cid = match old {
        Some(p) => p.id,
        None => fresh(&mut taken.customers, MAX_CUSTOMERS, "customers")?,
    };
    let mut b = Building::default();

    // Tunnels.
    let mut tunnel_ids: BTreeMap<&str, (u32, u64, u32)> = BTreeMap::new();
    for t in &customer.tunnels {
        let id = match old.and_then(|p| get(&p.tunnel_ids, &t.name)) {
            Some(id) => *id,
            None => fresh(&mut taken.tunnels, MAX_TUNNELS, "tunnels")?,
        };
        let (local, remote) = (t.local.octets(), t.remote.octets());
        let mut flags = TUNNEL_PRESENT;
        if t.key.is_some() {
            flags |= TUNNEL_HAS_KEY;
        }
        let nh = next_hop(t);
        if nh.is_some() {
            flags |= TUNNEL_NEXTHOP_VALID;
        }
        let nh = nh.unwrap_or(NextHop {
            ifindex: 0,
            smac: [0; 6],
            dmac: [0; 6],
            link_mtu: 0,
        });
        b.tunnels.insert(
            id,
            Tunnel {
                header: outer_header(&nh, local, remote, t.ttl, t.key),
                customer: cid,
                ifindex: nh.ifindex,
                mtu: t.mtu,
                link_mtu: nh.link_mtu,
                outer_csum_partial: outer_csum_partial(local, remote, t.ttl),
                flags,
                header_len: if t.key.is_some() { 42 } else { 38 },
            },
        );
        if b.tunnel_ids.insert(t.name.clone(), id).is_some() {
            return Err(Error::Spec(format!(
                "customer {}: tunnel {} is defined twice",
                customer.name, t.name
            )));
        }
        let dk = DecapKey {
            local,
            remote,
            key: t.key.unwrap_or(0).to_be_bytes(),
            has_key: u32::from(t.key.is_some()),
        };
        if b.decap
            .insert(
                dk,
                DecapValue {
                    tunnel: id,
                    customer: cid,
                },
            )
            .is_some()
        {
            return Err(Error::Spec(format!(
                "tunnel {}/{}: (local {}, remote {}, key {:?}) is used by another tunnel",
                customer.name, t.name, t.local, t.remote, t.key
            )));
        }
        tunnel_ids.insert(&t.name, (id, ecmp::tunnel_identity(local, remote, t.key), t.penalty));
    }

    // Route sets: one per distinct route prefix, holding the members of
    // the best effective priority.
    let mut groups: BTreeMap<IpNet, Vec<(u64, u32, u32, u64)>> = BTreeMap::new();
    for r in &customer.routes {
        let (tid, identity, penalty) = *tunnel_ids.get(r.tunnel.as_str()).ok_or_else(|| {
            Error::Spec(format!(
                "customer {}: route {} names unknown tunnel {}",
                customer.name, r.prefix, r.tunnel
            ))
        })?;
        let effective = u64::from(r.priority) + u64::from(penalty);
        groups
            .entry(r.prefix.trunc())
            .or_default()
            .push((effective, tid, u32::from(r.weight), identity));
    }
    for (prefix, routes) in &groups {
        let best = routes.iter().map(|r| r.0).min().unwrap_or(0);
        let mut members: BTreeMap<u32, Member> = BTreeMap::new();
        for &(eff, tid, weight, identity) in routes {
            if eff == best {
                members
                    .entry(tid)
                    .or_insert(Member {
                        tunnel: tid as u16,
                        weight: 0,
                        identity,
                    })
                    .weight += weight;
            }
        }
        let members: Vec<Member> = members.into_values().collect();
        let old_set = old.and_then(|p| get(&p.set_ids, prefix).map(|id| (*id, p)));
        let entry = if members.len() == 1 {
            RouteSetEntry::Single(u32::from(members[0].tunnel))
        } else {
            // The same members give the same table: share the old one.
            let table = ecmp::build_table(&members);
            match old_set.and_then(|(id, p)| get(&p.route_sets, &id)) {
                Some(RouteSetEntry::Table(t)) if **t == *table => RouteSetEntry::Table(t.clone()),
                _ => RouteSetEntry::Table(Arc::from(table)),
            }
        };
        let id = match old_set {
            Some((id, p)) if get(&p.route_sets, &id) == Some(&entry) => id,
            _ => fresh(&mut taken.route_sets, MAX_ROUTE_SETS, "route sets")?,
        };
        b.route_sets.insert(id, entry);
        b.set_ids.insert(*prefix, id);
    }

    // Destination entries: prefixes (inheriting the longest covering
    // route), then route prefixes.
    for p in &customer.prefixes {
        let p = p.trunc();
        let covering = (0..=p.prefix_len())
            .rev()
            .find_map(|len| IpNet::new(p.addr(), len).ok().and_then(|n| b.set_ids.get(&n.trunc())));
        let value = DestValue {
            customer: cid,
            route_set: covering.copied().unwrap_or(NO_ROUTE_SET),
        };
        b.insert_dest(p, value);
    }
    let sets: Vec<(IpNet, u32)> = b.set_ids.iter().map(|(p, id)| (*p, *id)).collect();
    for (prefix, set) in sets {
        b.insert_dest(
            prefix,
            DestValue {
                customer: cid,
                route_set: set,
            },
        );
    }

    // Anti-spoofing sources.
    for p in customer.prefixes.iter().chain(&customer.egress_prefixes) {
        let p = p.trunc();
        let c = cid.to_be_bytes();
        match p {
            IpNet::V4(n) => {
                let a = n.addr().octets();
                b.source4.insert((
                    32 + u32::from(n.prefix_len()),
                    [c[0], c[1], c[2], c[3], a[0], a[1], a[2], a[3]],
                ));
            }
            IpNet::V6(n) => {
                let mut k = [0u8; 20];
                k[..4].copy_from_slice(&c);
                k[4..].copy_from_slice(&n.addr().octets());
                b.source6.insert((32 + u32::from(n.prefix_len()), k));
            }
        }
    }
    Ok(Piece {
        name: customer.name.clone(),
        source: Some(source),
        id: cid,
        tunnels: b.tunnels.into_iter().collect(),
        tunnel_ids: b.tunnel_ids.into_iter().collect(),
        decap: b.decap.into_iter().collect(),
        route_sets: b.route_sets.into_iter().collect(),
        set_ids: b.set_ids.into_iter().collect(),
        dest4: b.dest4.into_iter().collect(),
        dest6: b.dest6.into_iter().collect(),
        source4: b.source4.into_iter().map(|k| (k, ())).collect(),
        source6: b.source6.into_iter().map(|k| (k, ())).collect(),
    })
}

/// A piece while it is compiled.
#[derive(Default)]
struct Building {
    tunnels: BTreeMap<u32, Tunnel>,
    tunnel_ids: BTreeMap<String, u32>,
    decap: BTreeMap<DecapKey, DecapValue>,
    route_sets: BTreeMap<u32, RouteSetEntry>,
    set_ids: BTreeMap<IpNet, u32>,
    dest4: BTreeMap<Lpm<4>, DestValue>,
    dest6: BTreeMap<Lpm<16>, DestValue>,
    source4: BTreeSet<Lpm<8>>,
    source6: BTreeSet<Lpm<20>>,
}

impl Building {
    fn insert_dest(&mut self, prefix: IpNet, value: DestValue) {
        match prefix {
            IpNet::V4(n) => {
                self.dest4.insert((u32::from(n.prefix_len()), n.addr().octets()), value);
            }
            IpNet::V6(n) => {
                self.dest6.insert((u32::from(n.prefix_len()), n.addr().octets()), value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::spec::{CustomerSpec, RouteSpec};

    fn tunnel(name: &str, remote: [u8; 4]) -> TunnelSpec {
        TunnelSpec {
            name: name.into(),
            local: Ipv4Addr::new(198, 51, 100, 1),
            remote: remote.into(),
            key: None,
            mtu: 1476,
            ttl: 64,
            penalty: 0,
        }
    }

    fn route(prefix: &str, tunnel: &str, priority: u32) -> RouteSpec {
        RouteSpec {
            prefix: prefix.parse().unwrap(),
            tunnel: tunnel.into(),
            priority,
            weight: 100,
        }
    }

    #[test]
    fn prefixes_inherit_the_longest_covering_route() {
        let spec = Spec {
            protections: 0,
            mitigation: vec![],
            node_addresses: vec![],
            customers: vec![CustomerSpec {
                name: "acme".into(),
                prefixes: vec!["203.0.113.0/24".parse().unwrap(), "203.0.113.128/26".parse().unwrap()],
                egress_prefixes: vec![],
                tunnels: vec![tunnel("a", [192, 0, 2, 10]), tunnel("b", [192, 0, 2, 11])],
                routes: vec![route("203.0.113.0/24", "a", 100), route("203.0.113.128/25", "b", 100)],
                firewall: Vec::new(),
            }],
        };
        let c = compile(&spec, &|_| None, None).unwrap().contents();
        let set = |k: (u32, [u8; 4])| c.dest4[&k].route_set;
        let s24 = set((24, [203, 0, 113, 0]));
        let s25 = set((25, [203, 0, 113, 128]));
        assert_ne!(s24, s25);
        assert_eq!(
            set((26, [203, 0, 113, 128])),
            s25,
            "the /26 prefix lies in the /25 route"
        );
        assert_eq!(c.route_sets[&s24], RouteSetEntry::Single(0));
        assert_eq!(c.route_sets[&s25], RouteSetEntry::Single(1));
    }

    #[test]
    fn unchanged_rules_are_not_compiled_again() {
        let rule = |text: &str, action| {
            let condition = moat_expr::parse(text, &|_| false).unwrap();
            let terms = moat_expr::normal::terms(&condition, &|_| Vec::new(), 64).unwrap();
            crate::spec::RuleSpec {
                name: "r".into(),
                condition,
                terms,
                action,
            }
        };
        let mut spec = Spec {
            protections: 0,
            mitigation: vec![rule("udp.dstport == 53", crate::spec::RuleAction::Drop)],
            node_addresses: vec![],
            customers: vec![CustomerSpec {
                name: "acme".into(),
                prefixes: vec!["203.0.113.0/24".parse().unwrap()],
                egress_prefixes: vec![],
                tunnels: vec![tunnel("a", [192, 0, 2, 10])],
                routes: vec![route("203.0.113.0/24", "a", 100)],
                firewall: vec![rule("tcp.dstport == 3389", crate::spec::RuleAction::Drop)],
            }],
        };
        let a = compile(&spec, &|_| None, None).unwrap();
        // A health penalty changes, the rules do not: the same tables.
        spec.customers[0].tunnels[0].penalty = 500_000;
        let b = compile(&spec, &|_| None, Some(&a)).unwrap();
        assert!(Arc::ptr_eq(a.rules.as_ref().unwrap(), b.rules.as_ref().unwrap()));
        // A rule's action changes: new tables.
        spec.customers[0].firewall[0].action = crate::spec::RuleAction::Pass;
        let c = compile(&spec, &|_| None, Some(&b)).unwrap();
        assert_ne!(c.rules, b.rules);
        assert_eq!(
            c.rules.as_ref().unwrap().sets[1].rules[0].1,
            crate::spec::RuleAction::Pass
        );
    }

    #[test]
    fn penalties_change_the_best_set_and_routes_are_never_removed() {
        let mut t2 = tunnel("b", [192, 0, 2, 11]);
        t2.penalty = 0;
        let mut t1 = tunnel("a", [192, 0, 2, 10]);
        t1.penalty = 1_000_000;
        let spec = Spec {
            protections: 0,
            mitigation: vec![],
            node_addresses: vec![],
            customers: vec![CustomerSpec {
                name: "acme".into(),
                prefixes: vec!["203.0.113.0/24".parse().unwrap()],
                egress_prefixes: vec![],
                tunnels: vec![t1, t2],
                routes: vec![route("203.0.113.0/24", "a", 100), route("203.0.113.0/24", "b", 200)],
                firewall: Vec::new(),
            }],
        };
        let c = compile(&spec, &|_| None, None).unwrap().contents();
        assert_eq!(
            c.route_sets[&0],
            RouteSetEntry::Single(1),
            "penalised tunnel a loses to b"
        );
        let mut spec2 = spec.clone();
        for t in &mut spec2.customers[0].tunnels {
            t.penalty = 1_000_000;
        }
        let c2 = compile(&spec2, &|_| None, None).unwrap().contents();
        assert_eq!(
            c2.route_sets[&0],
            RouteSetEntry::Single(0),
            "all down: best priority still wins"
        );
    }

    #[test]
    fn outer_checksum_partial_matches_a_full_computation() {
        let (local, remote, ttl) = ([198, 51, 100, 1], [192, 0, 2, 10], 64);
        for len in [48u16, 1500, 65535] {
            let mut h = [0u8; 20];
            h[0] = 0x45;
            h[2..4].copy_from_slice(&len.to_be_bytes());
            h[6] = 0x40;
            h[8] = ttl;
            h[9] = 47;
            h[12..16].copy_from_slice(&local);
            h[16..20].copy_from_slice(&remote);
            let full = etherparse::Ipv4HeaderSlice::from_slice(&h)
                .unwrap()
                .to_header()
                .calc_header_checksum();
            let mut sum = u32::from(outer_csum_partial(local, remote, ttl)) + u32::from(len);
            sum = (sum & 0xffff) + (sum >> 16);
            sum = (sum & 0xffff) + (sum >> 16);
            assert_eq!(!(sum as u16), full, "length {len}");
        }
    }

    #[test]
    fn duplicate_tunnel_identity_is_an_error() {
        let spec = Spec {
            protections: 0,
            mitigation: vec![],
            node_addresses: vec![],
            customers: vec![CustomerSpec {
                name: "acme".into(),
                prefixes: vec![],
                egress_prefixes: vec![],
                tunnels: vec![tunnel("a", [192, 0, 2, 10]), tunnel("b", [192, 0, 2, 10])],
                routes: vec![],
                firewall: Vec::new(),
            }],
        };
        assert!(matches!(compile(&spec, &|_| None, None), Err(Error::Spec(_))));
    }
}
