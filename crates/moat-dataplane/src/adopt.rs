//! Adoption: a restarted daemon takes over a data plane that is still
//! forwarding (its maps opened from their pins) without knowing what was
//! applied. The maps are read back and matched to the new configuration's
//! identities, so that the next compile keeps every id whose meaning it
//! keeps, and an apply of the configuration the maps were made from
//! writes nothing:
//! - a customer gets the id its protected prefixes map to in the
//!   destination tables;
//! - a tunnel (customer, name) gets the id the decapsulation entry of its
//!   (local, remote, key) names, when that entry belongs to the customer;
//! - a route set (customer, prefix) gets the route set its prefix maps to
//!   (each route set to one prefix, shortest first).
//!
//! Everything else found in the maps stays as it is, under its ids, inside
//! pieces named with a leading NUL (no configured name can equal them):
//! the next compile does not reuse those ids while packets may still meet
//! them, and the next apply removes their entries.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use ipnet::IpNet;
use moat_common::{limits::NO_ROUTE_SET, DecapKey, LOCAL_NODE_ADDRESS};

use crate::{
    apply::{ecmp_indexes, ApplyState, Carry},
    compile::{get, Compiled, Piece},
    error::Error,
    loader::Dataplane,
    spec::Spec,
};

/// What adoption matched, and what it kept only to hold ids.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdoptReport {
    /// Customers of the spec found in the maps (by their prefixes).
    pub customers: usize,
    /// Tunnels of the spec found in the maps (by their decapsulation key).
    pub tunnels: usize,
    /// Route sets of the spec found in the maps (by their prefix).
    pub route_sets: usize,
    /// Ids in the maps that match nothing in the spec, kept taken.
    pub orphan_customers: usize,
    pub orphan_tunnels: usize,
    pub orphan_route_sets: usize,
}

impl Dataplane {
    /// Rebuilds what was applied from the maps, matched to `spec`'s
    /// identities (see the module documentation). Follow it with
    /// `compile(spec, .., dp.applied())` and `apply`.
    pub fn adopt(&mut self, spec: &Spec) -> Result<AdoptReport, Error> {
        let (flat, raw_sets) = self.read_entries()?;
        let mut groups: BTreeMap<u32, Piece> = BTreeMap::new();
        fn group(groups: &mut BTreeMap<u32, Piece>, cid: u32) -> &mut Piece {
            groups.entry(cid).or_insert_with(|| Piece {
                id: cid,
                ..Piece::default()
            })
        }
        // Entries come sorted, so each group's vectors are sorted too.
        let mut set_owner: BTreeMap<u32, u32> = BTreeMap::new();
        for (k, v) in &flat.dest4 {
            group(&mut groups, v.customer).dest4.push((*k, *v));
            set_owner.entry(v.route_set).or_insert(v.customer);
        }
        for (k, v) in &flat.dest6 {
            group(&mut groups, v.customer).dest6.push((*k, *v));
            set_owner.entry(v.route_set).or_insert(v.customer);
        }
        for (k, ()) in &flat.source4 {
            let b = k.1;
            group(&mut groups, u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .source4
                .push((*k, ()));
        }
        for (k, ()) in &flat.source6 {
            let b = k.1;
            group(&mut groups, u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .source6
                .push((*k, ()));
        }
        for (k, v) in &flat.decap {
            group(&mut groups, v.customer).decap.push((*k, *v));
        }
        for (id, t) in &flat.tunnels {
            group(&mut groups, t.customer).tunnels.push((*id, *t));
        }
        for (id, entry) in &flat.route_sets {
            if let Some(cid) = set_owner.get(id) {
                group(&mut groups, *cid).route_sets.push((*id, entry.clone()));
            }
        }

        // Customers of the spec, by the id their prefixes map to.
        let mut report = AdoptReport::default();
        let mut claimed: BTreeMap<u32, &crate::spec::CustomerSpec> = BTreeMap::new();
        for c in &spec.customers {
            let cid = c.prefixes.iter().find_map(|p| match p.trunc() {
                IpNet::V4(n) => get(&flat.dest4, &(u32::from(n.prefix_len()), n.addr().octets())),
                IpNet::V6(n) => get(&flat.dest6, &(u32::from(n.prefix_len()), n.addr().octets())),
            });
            if let Some(v) = cid {
                if !claimed.contains_key(&v.customer) && groups.contains_key(&v.customer) {
                    claimed.insert(v.customer, c);
                }
            }
        }

        let mut out = Compiled {
            node_addresses: flat
                .local_addrs
                .iter()
                .filter(|(_, f)| *f & LOCAL_NODE_ADDRESS != 0)
                .map(|(a, _)| *a)
                .collect(),
            protections: flat.protections,
            ..Compiled::default()
        };
        let mut pieces = crate::compile::Pieces::default();
        for (cid, mut piece) in groups {
            match claimed.get(&cid) {
                Some(c) => {
                    report.customers += 1;
                    piece.name = c.name.clone();
                    let mut taken = BTreeSet::new();
                    let mut tunnel_ids = BTreeMap::new();
                    for t in &c.tunnels {
                        let dk = DecapKey {
                            local: t.local.octets(),
                            remote: t.remote.octets(),
                            key: t.key.unwrap_or(0).to_be_bytes(),
                            has_key: u32::from(t.key.is_some()),
                        };
                        if let Some(v) = get(&piece.decap, &dk) {
                            if get(&piece.tunnels, &v.tunnel).is_some() && taken.insert(v.tunnel) {
                                tunnel_ids.insert(t.name.clone(), v.tunnel);
                            }
                        }
                    }
                    piece.tunnel_ids = tunnel_ids.into_iter().collect();
                    report.tunnels += piece.tunnel_ids.len();
                    report.orphan_tunnels += piece.tunnels.len() - piece.tunnel_ids.len();
                    let mut prefixes: Vec<IpNet> = c.routes.iter().map(|r| r.prefix.trunc()).collect();
                    prefixes.sort_by_key(|p| (p.prefix_len(), *p));
                    prefixes.dedup();
                    let mut taken = BTreeSet::new();
                    let mut set_ids = BTreeMap::new();
                    for p in prefixes {
                        let v = match p {
                            IpNet::V4(n) => get(&piece.dest4, &(u32::from(n.prefix_len()), n.addr().octets())),
                            IpNet::V6(n) => get(&piece.dest6, &(u32::from(n.prefix_len()), n.addr().octets())),
                        };
                        if let Some(v) = v {
                            if v.route_set != NO_ROUTE_SET
                                && get(&piece.route_sets, &v.route_set).is_some()
                                && taken.insert(v.route_set)
                            {
                                set_ids.insert(p, v.route_set);
                            }
                        }
                    }
                    piece.set_ids = set_ids.into_iter().collect();
                    report.route_sets += piece.set_ids.len();
                    report.orphan_route_sets += piece.route_sets.len() - piece.set_ids.len();
                }
                None => {
                    report.orphan_customers += 1;
                    report.orphan_tunnels += piece.tunnels.len();
                    report.orphan_route_sets += piece.route_sets.len();
                    piece.name = format!("\0orphan customer {cid}");
                }
            }
            out.used.mark(&piece, true);
            out.totals.mark(&piece, true);
            for (k, v) in &piece.decap {
                out.decap_owner.insert(*k, v.customer);
                *out.endpoints.entry(k.local).or_default() += 1;
            }
            pieces.insert(Arc::new(piece));
        }
        out.pieces = pieces;
        // The rule sets are not read back: the first apply rewrites them
        // (into the idle copy, made live with one store).
        out.rules_unknown = true;
        out.state = Carry(Some(Box::new(ApplyState {
            ecmp: ecmp_indexes(&raw_sets),
            ..ApplyState::default()
        })));
        self.applied = Some(out);
        Ok(report)
    }

    /// Forgets what was applied, as a restarted process would (the maps
    /// keep their contents). For tests and benchmarks of [`Dataplane::adopt`].
    #[doc(hidden)]
    pub fn forget_applied(&mut self) {
        self.applied = None;
    }
}
