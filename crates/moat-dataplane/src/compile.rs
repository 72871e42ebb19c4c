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

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ipnet::IpNet;
use moat_common::{
    header, limits::*, DecapKey, DecapValue, DestValue, Tunnel, LOCAL_NODE_ADDRESS, LOCAL_TUNNEL_ENDPOINT,
    TUNNEL_HAS_KEY, TUNNEL_HEADER_MAX, TUNNEL_NEXTHOP_VALID, TUNNEL_PRESENT,
};

use crate::{
    ecmp::{self, Member},
    error::Error,
    spec::{NextHop, Spec, TunnelSpec},
};

/// How a route set picks its tunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteSetEntry {
    /// One member: every flow goes to this tunnel.
    Single(u32),
    /// Several members: the slot table (tunnel id per flow-hash slot).
    Table(Box<[u16; ECMP_SLOTS]>),
}

/// LPM key: (prefix length, address bytes).
pub type Lpm<const N: usize> = (u32, [u8; N]);

/// The desired contents of every map, plus names for reporting.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Compiled {
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

/// Allocates ids: reused ones by identity, fresh ones never used by the
/// previous state (so an id never changes meaning within one apply).
struct Ids {
    taken: BTreeSet<u32>,
    next: u32,
    limit: u32,
    what: &'static str,
}

impl Ids {
    fn new(previous: impl IntoIterator<Item = u32>, limit: u32, what: &'static str) -> Ids {
        Ids {
            taken: previous.into_iter().collect(),
            next: 0,
            limit,
            what,
        }
    }

    fn fresh(&mut self) -> Result<u32, Error> {
        while self.taken.contains(&self.next) {
            self.next += 1;
        }
        if self.next >= self.limit {
            return Err(Error::Capacity {
                what: self.what,
                have: self.taken.len() + 1,
                limit: self.limit as usize,
            });
        }
        self.taken.insert(self.next);
        Ok(self.next)
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
    let prev_customer: HashMap<&str, u32> = prev.customers.iter().map(|(id, n)| (n.as_str(), *id)).collect();
    let prev_tunnel: HashMap<(&str, &str), u32> = prev
        .tunnel_names
        .iter()
        .map(|(id, (c, t))| ((c.as_str(), t.as_str()), *id))
        .collect();
    let prev_set: HashMap<(&str, IpNet), u32> = prev
        .route_set_keys
        .iter()
        .map(|(id, (c, p))| ((c.as_str(), *p), *id))
        .collect();
    let mut customer_ids = Ids::new(prev.customers.keys().copied(), MAX_CUSTOMERS, "customers");
    let mut tunnel_ids_alloc = Ids::new(prev.tunnel_names.keys().copied(), MAX_TUNNELS, "tunnels");
    let mut set_ids = Ids::new(prev.route_sets.keys().copied(), MAX_ROUTE_SETS, "route sets");

    let mut out = Compiled::default();
    for a in &spec.node_addresses {
        *out.local_addrs.entry(a.octets()).or_default() |= LOCAL_NODE_ADDRESS;
    }
    let mut tables = 0usize;

    for customer in &spec.customers {
        let cid = match prev_customer.get(customer.name.as_str()) {
            Some(id) => *id,
            None => customer_ids.fresh()?,
        };
        out.customers.insert(cid, customer.name.clone());

        // Tunnels.
        let mut tunnel_ids: HashMap<&str, (u32, u64)> = HashMap::new();
        for t in &customer.tunnels {
            let id = match prev_tunnel.get(&(customer.name.as_str(), t.name.as_str())) {
                Some(id) => *id,
                None => tunnel_ids_alloc.fresh()?,
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
            out.tunnel_names.insert(id, (customer.name.clone(), t.name.clone()));
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
            *out.local_addrs.entry(local).or_default() |= LOCAL_TUNNEL_ENDPOINT | LOCAL_NODE_ADDRESS;
            tunnel_ids.insert(&t.name, (id, ecmp::tunnel_identity(local, remote, t.key)));
        }

        // Route sets: one per distinct route prefix, holding the members of
        // the best effective priority.
        let mut groups: BTreeMap<IpNet, Vec<(u64, u32, u32, u64)>> = BTreeMap::new();
        for r in &customer.routes {
            let (tid, identity) = *tunnel_ids.get(r.tunnel.as_str()).ok_or_else(|| {
                Error::Spec(format!(
                    "customer {}: route {} names unknown tunnel {}",
                    customer.name, r.prefix, r.tunnel
                ))
            })?;
            let penalty = customer
                .tunnels
                .iter()
                .find(|t| t.name == r.tunnel)
                .map_or(0, |t| t.penalty);
            let effective = u64::from(r.priority) + u64::from(penalty);
            groups
                .entry(r.prefix.trunc())
                .or_default()
                .push((effective, tid, u32::from(r.weight), identity));
        }
        let mut set_of: BTreeMap<IpNet, u32> = BTreeMap::new();
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
                tables += 1;
                RouteSetEntry::Table(ecmp::build_table(&members.into_values().collect::<Vec<_>>()))
            };
            let id = match prev_set.get(&(customer.name.as_str(), *prefix)) {
                Some(id) if prev.route_sets.get(id) == Some(&entry) => *id,
                _ => set_ids.fresh()?,
            };
            out.route_sets.insert(id, entry);
            out.route_set_keys.insert(id, (customer.name.clone(), *prefix));
            set_of.insert(*prefix, id);
        }

        // Destination entries: prefixes (inheriting the longest covering
        // route), then route prefixes.
        for p in &customer.prefixes {
            let p = p.trunc();
            let covering = (0..=p.prefix_len())
                .rev()
                .find_map(|len| IpNet::new(p.addr(), len).ok().and_then(|n| set_of.get(&n.trunc())));
            let value = DestValue {
                customer: cid,
                route_set: covering.copied().unwrap_or(NO_ROUTE_SET),
            };
            insert_dest(&mut out, p, value);
        }
        for (prefix, set) in &set_of {
            insert_dest(
                &mut out,
                *prefix,
                DestValue {
                    customer: cid,
                    route_set: *set,
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
    }

    check_capacity("IPv4 destination entries", out.dest4.len(), MAX_DEST_ENTRIES)?;
    check_capacity("IPv6 destination entries", out.dest6.len(), MAX_DEST_ENTRIES)?;
    check_capacity("IPv4 source entries", out.source4.len(), MAX_SOURCE_ENTRIES)?;
    check_capacity("IPv6 source entries", out.source6.len(), MAX_SOURCE_ENTRIES)?;
    check_capacity("route sets", out.route_sets.len(), MAX_ROUTE_SETS / 2)?;
    check_capacity("multi-tunnel route sets", tables, MAX_ECMP_SETS)?;
    check_capacity("local addresses", out.local_addrs.len(), MAX_LOCAL_ADDRS)?;
    Ok(out)
}

fn insert_dest(out: &mut Compiled, prefix: IpNet, value: DestValue) {
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
        let c = compile(&spec, &|_| None, None).unwrap();
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
        let c = compile(&spec, &|_| None, None).unwrap();
        assert_eq!(
            c.route_sets[&0],
            RouteSetEntry::Single(1),
            "penalised tunnel a loses to b"
        );
        let mut spec2 = spec.clone();
        for t in &mut spec2.customers[0].tunnels {
            t.penalty = 1_000_000;
        }
        let c2 = compile(&spec2, &|_| None, None).unwrap();
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
