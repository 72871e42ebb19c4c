//! Adoption: a data plane that forgot what it applied (a restarted daemon
//! on pinned maps) rebuilds it from the maps and a configuration's
//! identities. Re-applying the configuration the maps were made from must
//! write nothing and keep every id; applying another one must leave the
//! same maps (up to the numbering of new objects) as applying it directly.

use std::collections::{BTreeMap, BTreeSet};

use moat_common::{limits::NO_ROUTE_SET, Tunnel};
use moat_dataplane::{compile, Compiled, Contents, Dataplane, NextHop, RouteSetEntry, Spec, TunnelSpec};
use moat_lab::random;
use rand::{rngs::StdRng, Rng};

/// Fixed next hops: a few unresolved, the rest on one of two interfaces.
fn hop(t: &TunnelSpec) -> Option<NextHop> {
    let r = t.remote.octets()[3];
    (!r.is_multiple_of(5)).then_some(NextHop {
        ifindex: 1 + u32::from(r % 2),
        smac: [2, 0, 0, 0, 0, 1],
        dmac: [2, 0, 0, 0, 1, r],
        link_mtu: 1500,
    })
}

fn apply(dp: &mut Dataplane, spec: &Spec) -> moat_dataplane::ApplyReport {
    let c = compile(spec, &hop, dp.applied()).expect("compile");
    dp.apply(&c).expect("apply")
}

/// A tunnel by what identifies it on the wire and what it carries, with
/// its customer by name.
type TunnelView = (String, [u8; 4], [u8; 4], Option<u32>, u16, u8, u8);

/// A destination entry: its customer by name and the tunnels of its route
/// set (one, or one per slot), if any.
type DestView = (String, Option<Vec<TunnelView>>);

/// The maps with ids replaced by names and wire identities.
#[derive(Debug, PartialEq)]
struct View {
    dest: BTreeMap<(u32, Vec<u8>), DestView>,
    sources: BTreeSet<(String, u32, Vec<u8>)>,
    decap: BTreeMap<moat_common::DecapKey, TunnelView>,
    local_addrs: BTreeMap<[u8; 4], u32>,
}

fn view(maps: &Contents, names: &Compiled) -> View {
    let customer = |id: u32| names.customers.get(&id).cloned().unwrap_or_else(|| format!("?{id}"));
    let tunnel = |id: u32| {
        let t: &Tunnel = &maps.tunnels[&id];
        (
            customer(t.customer),
            t.local(),
            t.remote(),
            t.key(),
            t.mtu,
            t.flags,
            t.ttl(),
        )
    };
    let set = |id: u32| {
        (id != NO_ROUTE_SET).then(|| match &maps.route_sets[&id] {
            RouteSetEntry::Single(t) => vec![tunnel(*t)],
            RouteSetEntry::Table(slots) => slots.iter().map(|t| tunnel(u32::from(*t))).collect(),
        })
    };
    let mut dest = BTreeMap::new();
    for ((len, a), v) in &maps.dest4 {
        dest.insert((*len, a.to_vec()), (customer(v.customer), set(v.route_set)));
    }
    for ((len, a), v) in &maps.dest6 {
        dest.insert((*len, a.to_vec()), (customer(v.customer), set(v.route_set)));
    }
    let src = |len: u32, k: &[u8]| {
        (
            customer(u32::from_be_bytes([k[0], k[1], k[2], k[3]])),
            len,
            k[4..].to_vec(),
        )
    };
    View {
        dest,
        sources: maps
            .source4
            .iter()
            .map(|(l, k)| src(*l, k))
            .chain(maps.source6.iter().map(|(l, k)| src(*l, k)))
            .collect(),
        decap: maps.decap.iter().map(|(k, v)| (*k, tunnel(v.tunnel))).collect(),
        local_addrs: maps.local_addrs.clone(),
    }
}

/// `spec` with a few single-customer changes.
fn mutate(rng: &mut StdRng, spec: &Spec) -> Spec {
    let mut s = spec.clone();
    for c in &mut s.customers {
        if rng.gen_bool(0.5) {
            if let Some(t) = c.tunnels.first_mut() {
                t.mtu -= 20;
            }
        }
        if rng.gen_bool(0.5) && !c.routes.is_empty() {
            c.routes.remove(0);
        }
    }
    s
}

#[test]
fn adopting_the_maps_keeps_ids_and_applies_like_a_direct_apply() {
    let (seed, mut rng) = random::seeded();
    // Rule sets are recognised in the maps (their digest, then every
    // entry): adopting the same configuration rewrites nothing, rules
    // included.
    let spec = |rng: &mut _| random::spec(rng);
    for round in 0..6 {
        let a = spec(&mut rng);
        let b = if round % 2 == 0 {
            spec(&mut rng)
        } else {
            mutate(&mut rng, &a)
        };

        // Same configuration: nothing to write, same ids and names.
        let mut dp = Dataplane::load().expect("load (as root)");
        apply(&mut dp, &a);
        let before = dp.applied().expect("applied").contents();
        let maps = dp.read_back().expect("read back");
        dp.forget_applied();
        let report = dp.adopt(&a).expect("adopt");
        assert_eq!(report.orphan_customers, 0, "seed {seed} round {round}: {report:?}");
        let r = apply(&mut dp, &a);
        assert!(r.is_empty(), "seed {seed} round {round}: re-applying wrote {r:?}");
        assert_eq!(
            dp.verify_rules(dp.applied().unwrap()).unwrap(),
            Vec::<String>::new(),
            "seed {seed} round {round}"
        );
        assert_eq!(
            dp.applied().expect("applied").contents(),
            before,
            "seed {seed} round {round}"
        );
        assert_eq!(dp.read_back().expect("read back"), maps, "seed {seed} round {round}");

        // Another configuration: the same maps as applying it directly.
        dp.forget_applied();
        dp.adopt(&b).expect("adopt");
        apply(&mut dp, &b);
        let adopted = view(&dp.read_back().expect("read back"), dp.applied().expect("applied"));
        let mut direct = Dataplane::load().expect("load");
        apply(&mut direct, &a);
        apply(&mut direct, &b);
        let want = view(
            &direct.read_back().expect("read back"),
            direct.applied().expect("applied"),
        );
        assert_eq!(adopted, want, "seed {seed} round {round}");
        // And the next apply after adoption is incremental and empty.
        assert!(apply(&mut dp, &b).is_empty(), "seed {seed} round {round}");
    }
}
