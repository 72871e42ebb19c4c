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
    /// Customer id -> name.
    pub customers: BTreeMap<u32, String>,
    /// Tunnel id -> (customer name, tunnel name).
    pub tunnel_names: BTreeMap<u32, (String, String)>,
    /// Route set id -> (customer name, route prefix).
    pub route_set_keys: BTreeMap<u32, (String, IpNet)>,
}

/// Everything one customer puts into the maps, and the ids it holds.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Piece {
    pub name: String,
    /// What it was compiled from: the customer and its tunnels' next hops.
    /// `None` for a piece rebuilt from the maps (adoption): never reused.
    pub source: Option<(CustomerSpec, Vec<Option<NextHop>>)>,
    pub id: u32,
    pub tunnels: BTreeMap<u32, Tunnel>,
    /// Tunnel name -> id.
    pub tunnel_ids: BTreeMap<String, u32>,
    pub decap: BTreeMap<DecapKey, DecapValue>,
    pub route_sets: BTreeMap<u32, RouteSetEntry>,
    /// Route prefix -> route set id.
    pub set_ids: BTreeMap<IpNet, u32>,
    pub dest4: BTreeMap<Lpm<4>, DestValue>,
    pub dest6: BTreeMap<Lpm<16>, DestValue>,
    pub source4: BTreeSet<Lpm<8>>,
    pub source6: BTreeSet<Lpm<20>>,
}

impl Piece {
    fn tables(&self) -> usize {
        self.route_sets
            .values()
            .filter(|e| matches!(e, RouteSetEntry::Table(_)))
            .count()
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
        for id in p.tunnels.keys() {
            f(&mut self.tunnels, *id);
        }
        for id in p.route_sets.keys() {
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

/// A compiled configuration: one shared piece per customer, plus what is
/// global (node addresses, tunnel endpoints, the ids in use). Cloning it
/// is cheap (pieces are shared); [`Compiled::contents`] spells it out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Compiled {
    /// Customer name -> its piece. Names of pieces kept only to hold ids
    /// found in the maps (adoption) start with a NUL and match nothing.
    pub(crate) pieces: BTreeMap<Arc<str>, Arc<Piece>>,
    pub(crate) node_addresses: BTreeSet<[u8; 4]>,
    /// Tunnel endpoint -> number of tunnels using it.
    pub(crate) endpoints: BTreeMap<[u8; 4], u32>,
    pub(crate) used: Used,
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
    /// The `LOCAL_ADDRS` contents.
    pub fn local_addrs(&self) -> BTreeMap<[u8; 4], u32> {
        let mut out: BTreeMap<[u8; 4], u32> = self.node_addresses.iter().map(|a| (*a, LOCAL_NODE_ADDRESS)).collect();
        for a in self.endpoints.keys() {
            *out.entry(*a).or_default() |= LOCAL_TUNNEL_ENDPOINT | LOCAL_NODE_ADDRESS;
        }
        out
    }

    /// Every map's contents, flat, with names.
    pub fn contents(&self) -> Contents {
        let mut out = Contents {
            local_addrs: self.local_addrs(),
            ..Contents::default()
        };
        for p in self.pieces.values() {
            p.add_to(&mut out);
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
        out.source4.extend(self.source4.iter().copied());
        out.source6.extend(self.source6.iter().copied());
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

fn check_capacity(what: &'static str, have: usize, limit: u32) -> Result<(), Error> {
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

/// Whether `old` was compiled from exactly this customer and next hops.
fn reusable(old: &Piece, customer: &CustomerSpec, next_hop: &dyn Fn(&TunnelSpec) -> Option<NextHop>) -> bool {
    match &old.source {
        Some((spec, hops)) => spec == customer && customer.tunnels.iter().zip(hops).all(|(t, h)| next_hop(t) == *h),
        None => false,
    }
}

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

    let mut out = Compiled {
        node_addresses: spec.node_addresses.iter().map(|a| a.octets()).collect(),
        endpoints: prev.endpoints.clone(),
        used: prev.used.clone(),
        decap_owner: prev.decap_owner.clone(),
        ..Compiled::default()
    };
    let mut taken = prev.used.clone();
    // Start from the previous pieces (shared) and replace what changed.
    out.pieces = prev.pieces.clone();
    let names: std::collections::HashSet<&str> = spec.customers.iter().map(|c| c.name.as_str()).collect();
    if names.len() != spec.customers.len() {
        let mut seen = std::collections::HashSet::new();
        let twice = spec.customers.iter().find(|c| !seen.insert(c.name.as_str()));
        return Err(Error::Spec(format!(
            "customer {} is defined twice",
            twice.map_or("?", |c| c.name.as_str())
        )));
    }
    let mut fresh_pieces = Vec::new();
    let mut released: Vec<Arc<Piece>> = Vec::new();
    let mut found = 0usize;
    for customer in &spec.customers {
        let old = prev.pieces.get(customer.name.as_str());
        found += usize::from(old.is_some());
        match old {
            Some(old) if reusable(old, customer, next_hop) => {}
            _ => {
                fresh_pieces.push(compile_customer(customer, next_hop, old.map(|p| &**p), &mut taken)?);
                released.extend(old.cloned());
            }
        }
    }
    if found < prev.pieces.len() {
        // Customers gone (and pieces that only held ids).
        for (name, old) in &prev.pieces {
            if !names.contains(&**name) {
                out.pieces.remove(name);
                released.push(old.clone());
            }
        }
    }
    // Pieces of the previous state not kept: release their ids, endpoints
    // and decapsulation keys; then claim those of the new pieces.
    for old in &released {
        out.used.mark(old, false);
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
    for piece in fresh_pieces {
        out.used.mark(&piece, true);
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
        out.pieces.insert(piece.name.as_str().into(), Arc::new(piece));
    }

    let total = |f: fn(&Piece) -> usize| out.pieces.values().map(|p| f(p)).sum::<usize>();
    check_capacity("IPv4 destination entries", total(|p| p.dest4.len()), MAX_DEST_ENTRIES)?;
    check_capacity("IPv6 destination entries", total(|p| p.dest6.len()), MAX_DEST_ENTRIES)?;
    check_capacity("IPv4 source entries", total(|p| p.source4.len()), MAX_SOURCE_ENTRIES)?;
    check_capacity("IPv6 source entries", total(|p| p.source6.len()), MAX_SOURCE_ENTRIES)?;
    check_capacity("route sets", total(|p| p.route_sets.len()), MAX_ROUTE_SETS / 2)?;
    check_capacity("multi-tunnel route sets", total(Piece::tables), MAX_ECMP_SETS)?;
    check_capacity("local addresses", out.local_addrs().len(), MAX_LOCAL_ADDRS)?;
    Ok(out)
}

/// Compiles one customer; ids by identity from `old` (its piece in the
/// previous state), fresh ones from `taken`.
fn compile_customer(
    customer: &CustomerSpec,
    next_hop: &dyn Fn(&TunnelSpec) -> Option<NextHop>,
    old: Option<&Piece>,
    taken: &mut Used,
) -> Result<Piece, Error> {
    let cid = match old {
        Some(p) => p.id,
        None => fresh(&mut taken.customers, MAX_CUSTOMERS, "customers")?,
    };
    let mut hops = Vec::with_capacity(customer.tunnels.len());
    let mut out = Piece {
        name: customer.name.clone(),
        id: cid,
        ..Piece::default()
    };

    // Tunnels.
    let mut tunnel_ids: BTreeMap<&str, (u32, u64, u32)> = BTreeMap::new();
    for t in &customer.tunnels {
        let id = match old.and_then(|p| p.tunnel_ids.get(&t.name)) {
            Some(id) => *id,
            None => fresh(&mut taken.tunnels, MAX_TUNNELS, "tunnels")?,
        };
        let (local, remote) = (t.local.octets(), t.remote.octets());
        let mut flags = TUNNEL_PRESENT;
        if t.key.is_some() {
            flags |= TUNNEL_HAS_KEY;
        }
        let nh = next_hop(t);
        hops.push(nh);
        if nh.is_some() {
            flags |= TUNNEL_NEXTHOP_VALID;
        }
        let nh = nh.unwrap_or(NextHop {
            ifindex: 0,
            smac: [0; 6],
            dmac: [0; 6],
            link_mtu: 0,
        });
        out.tunnels.insert(
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
        if out.tunnel_ids.insert(t.name.clone(), id).is_some() {
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
        if out
            .decap
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
        let entry = if members.len() == 1 {
            RouteSetEntry::Single(*members.keys().next().unwrap_or(&0))
        } else {
            RouteSetEntry::Table(Arc::from(ecmp::build_table(&members.into_values().collect::<Vec<_>>())))
        };
        let id = match old.and_then(|p| p.set_ids.get(prefix).map(|id| (*id, p))) {
            Some((id, p)) if p.route_sets.get(&id) == Some(&entry) => id,
            _ => fresh(&mut taken.route_sets, MAX_ROUTE_SETS, "route sets")?,
        };
        out.route_sets.insert(id, entry);
        out.set_ids.insert(*prefix, id);
    }

    // Destination entries: prefixes (inheriting the longest covering
    // route), then route prefixes.
    for p in &customer.prefixes {
        let p = p.trunc();
        let covering = (0..=p.prefix_len())
            .rev()
            .find_map(|len| IpNet::new(p.addr(), len).ok().and_then(|n| out.set_ids.get(&n.trunc())));
        let value = DestValue {
            customer: cid,
            route_set: covering.copied().unwrap_or(NO_ROUTE_SET),
        };
        insert_dest(&mut out, p, value);
    }
    let sets: Vec<(IpNet, u32)> = out.set_ids.iter().map(|(p, id)| (*p, *id)).collect();
    for (prefix, set) in sets {
        insert_dest(
            &mut out,
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
                out.source4.insert((
                    32 + u32::from(n.prefix_len()),
                    [c[0], c[1], c[2], c[3], a[0], a[1], a[2], a[3]],
                ));
            }
            IpNet::V6(n) => {
                let mut k = [0u8; 20];
                k[..4].copy_from_slice(&c);
                k[4..].copy_from_slice(&n.addr().octets());
                out.source6.insert((32 + u32::from(n.prefix_len()), k));
            }
        }
    }
    out.source = Some((customer.clone(), hops));
    Ok(out)
}

fn insert_dest(out: &mut Piece, prefix: IpNet, value: DestValue) {
    match prefix {
        IpNet::V4(n) => {
            out.dest4.insert((u32::from(n.prefix_len()), n.addr().octets()), value);
        }
        IpNet::V6(n) => {
            out.dest6.insert((u32::from(n.prefix_len()), n.addr().octets()), value);
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
            node_addresses: vec![],
            customers: vec![CustomerSpec {
                name: "acme".into(),
                prefixes: vec!["203.0.113.0/24".parse().unwrap(), "203.0.113.128/26".parse().unwrap()],
                egress_prefixes: vec![],
                tunnels: vec![tunnel("a", [192, 0, 2, 10]), tunnel("b", [192, 0, 2, 11])],
                routes: vec![route("203.0.113.0/24", "a", 100), route("203.0.113.128/25", "b", 100)],
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
    fn penalties_change_the_best_set_and_routes_are_never_removed() {
        let mut t2 = tunnel("b", [192, 0, 2, 11]);
        t2.penalty = 0;
        let mut t1 = tunnel("a", [192, 0, 2, 10]);
        t1.penalty = 1_000_000;
        let spec = Spec {
            node_addresses: vec![],
            customers: vec![CustomerSpec {
                name: "acme".into(),
                prefixes: vec!["203.0.113.0/24".parse().unwrap()],
                egress_prefixes: vec![],
                tunnels: vec![t1, t2],
                routes: vec![route("203.0.113.0/24", "a", 100), route("203.0.113.0/24", "b", 200)],
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
            node_addresses: vec![],
            customers: vec![CustomerSpec {
                name: "acme".into(),
                prefixes: vec![],
                egress_prefixes: vec![],
                tunnels: vec![tunnel("a", [192, 0, 2, 10]), tunnel("b", [192, 0, 2, 10])],
                routes: vec![],
            }],
        };
        assert!(matches!(compile(&spec, &|_| None, None), Err(Error::Spec(_))));
    }
}
