//! Differential test: the BPF program and the reference model (moat_lab::
//! model) must agree on action, reason and output bytes for >= 100,000
//! random and mutated packets against a random configuration. Reasons are
//! compared in aggregate against the data plane's counters.
//! Seed: MOAT_SEED (printed on every run, so failures reproduce).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use ipnet::IpNet;
use moat_common::Reason;
use moat_dataplane::{Spec, TunnelSpec};
use moat_lab::{
    fixture::{Fixture, NODE},
    packet::{self, Frame, L4},
    random::{self, random_in},
};
use rand::{rngs::StdRng, seq::SliceRandom, Rng};

/// Random configurations, applied in turn to one data plane; more (up to
/// MAX_CONFIGS) while some reason has not been reached yet.
const CONFIGS: usize = 4;
const MAX_CONFIGS: usize = 16;
/// Packets compared per configuration (100,000 in all).
const PACKETS: usize = 25_000;

fn random_l4(rng: &mut StdRng) -> L4 {
    // Now and then a port 0, for the built-in protection.
    let port = |rng: &mut StdRng| if rng.gen_ratio(1, 20) { 0 } else { rng.gen() };
    match rng.gen_range(0..4) {
        3 => L4::TcpFlags {
            sport: port(rng),
            dport: port(rng),
            flags: rng.gen::<u8>() & 0x3f,
        },
        0 => L4::Udp {
            // Now and then a reflector's source port, for that protection.
            sport: if rng.gen_ratio(1, 5) {
                *moat_common::protect::REFLECTOR_PORTS.choose(rng).unwrap()
            } else {
                port(rng)
            },
            dport: port(rng),
        },
        1 => L4::Tcp {
            sport: rng.gen(),
            dport: rng.gen(),
            syn: rng.gen(),
        },
        _ => L4::Echo {
            id: rng.gen(),
            seq: rng.gen(),
        },
    }
}

fn random_addr(rng: &mut StdRng, spec: &Spec, v6: bool, ours: bool) -> IpAddr {
    let pool: Vec<IpNet> = spec
        .customers
        .iter()
        .flat_map(|c| c.prefixes.iter().chain(&c.egress_prefixes))
        .copied()
        .filter(|p| matches!(p, IpNet::V6(_)) == v6)
        .collect();
    if ours && !pool.is_empty() {
        let p = *pool.choose(rng).unwrap();
        return random_in(rng, p);
    }
    let v4_pools = [
        "192.0.2.0/24",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "169.254.100.0/24",
        "198.51.100.240/28",
    ];
    let wide: IpNet = if v6 {
        "2001:db8::/32".parse().unwrap()
    } else {
        v4_pools.choose(rng).unwrap().parse().unwrap()
    };
    random_in(rng, wide)
}

fn random_ip(rng: &mut StdRng, spec: &Spec, ours: bool) -> Vec<u8> {
    let v6 = rng.gen_bool(0.35);
    let src_ours = rng.gen_bool(0.5);
    let src = random_addr(rng, spec, v6, src_ours);
    let dst = random_addr(rng, spec, v6, ours);
    let ttl = *[0u8, 1, 2, 64, 255].choose(rng).unwrap();
    let size = match rng.gen_range(0..4) {
        0 => rng.gen_range(0..64),
        1 => rng.gen_range(500..600),
        2 => rng.gen_range(1350..1480),
        _ => rng.gen_range(0..1600),
    };
    let payload: Vec<u8> = (0..size).map(|_| rng.gen()).collect();
    let mut ip = packet::ip(src, dst, ttl, random_l4(rng), &payload);
    if v6 && rng.gen_bool(0.2) {
        let exts: Vec<(u8, usize)> = (0..rng.gen_range(1..=3))
            .map(|_| (*[0u8, 43, 60].choose(rng).unwrap(), 8 * rng.gen_range(1..=4)))
            .collect();
        ip = packet::ipv6_with_ext(&ip, &exts);
    }
    if rng.gen_bool(0.15) && ip.len() > 200 {
        let frags = if v6 {
            packet::ipv6_fragments(&ip, 128, rng.gen())
        } else {
            packet::ipv4_fragments(&ip, 128, rng.gen())
        };
        ip = frags.choose(rng).unwrap().clone();
    }
    ip
}

fn random_frame(rng: &mut StdRng, spec: &Spec) -> Vec<u8> {
    let frame = Frame {
        vlan: rng.gen_bool(0.2).then(|| rng.gen_range(1..4095)),
        ..Frame::default()
    };
    let ip = if rng.gen_bool(0.3) {
        // Return traffic: GRE to our endpoint from a known or unknown remote.
        let tunnels: Vec<&TunnelSpec> = spec.customers.iter().flat_map(|c| &c.tunnels).collect();
        let t = tunnels.choose(rng).unwrap();
        let remote = if rng.gen_bool(0.85) {
            t.remote.octets()
        } else {
            [192, 0, 2, rng.gen()]
        };
        let key = if rng.gen_bool(0.9) {
            t.key
        } else {
            rng.gen_bool(0.5).then(|| rng.gen())
        };
        let mut inner = random_ip(rng, spec, false);
        if rng.gen_bool(0.05) {
            inner = packet::ip(
                IpAddr::V4(t.remote),
                IpAddr::V4(Ipv4Addr::new(169, 254, 10, 0)),
                64,
                L4::Echo { id: 1, seq: 1 },
                &[0; 8],
            );
        }
        packet::gre(remote, NODE.octets(), 64, key, &inner)
    } else {
        let ours = rng.gen_bool(0.8);
        random_ip(rng, spec, ours)
    };
    let mut b = packet::eth(frame, &ip);
    match rng.gen_range(0..10) {
        // Flip a few bytes in the headers.
        0..=1 => {
            for _ in 0..rng.gen_range(1..=3) {
                let at = rng.gen_range(12..b.len().min(100));
                b[at] ^= 1 << rng.gen_range(0..8);
            }
        }
        // Truncate (test runs need at least an Ethernet header).
        2 => {
            let len = rng.gen_range(14..=b.len());
            b.truncate(len);
        }
        // Trailing bytes after the IP packet.
        3 => b.extend((0..rng.gen_range(1..40)).map(|_| rng.gen::<u8>())),
        _ => {}
    }
    b
}

#[test]
fn data_plane_agrees_with_the_reference_model() {
    let (seed, mut rng) = random::seeded();
    let mut f = Fixture::new("diff");
    let mut all: BTreeMap<Reason, u64> = BTreeMap::new();
    let mut total = 0;
    // Matches of mitigation rules (false) and firewall rules (true).
    let mut rule_matches: BTreeMap<bool, u64> = BTreeMap::new();
    // Reasons the random packets must reach (rate limits depend on time:
    // moat-lab's rate-limit test covers them).
    let missing = |all: &BTreeMap<Reason, u64>| -> Vec<Reason> {
        Reason::ALL
            .iter()
            .copied()
            .filter(|r| !matches!(r, Reason::DropInternal | Reason::DropRateLimit) && !all.contains_key(r))
            .collect()
    };
    let mut rounds = 0;
    for round in 0..MAX_CONFIGS {
        if round >= CONFIGS && missing(&all).is_empty() {
            break;
        }
        rounds += 1;
        let mut spec = random::spec(&mut rng);
        if round == 0 {
            // Random mitigation rules often hold a drop that matches nearly
            // everything, hiding the steps after them (the firewall, the
            // reflection protection, forwarding): one configuration without
            // them reaches those steps whatever the seed.
            spec.mitigation.clear();
            spec.protections |= moat_common::protect::REFLECTION;
        }
        f.apply(spec.clone());
        f.rule_hits.borrow_mut().clear();
        let before = f.dp.counters([], []).unwrap();
        let mut expected: BTreeMap<Reason, u64> = BTreeMap::new();
        let (mut compared, mut skipped, mut either) = (0usize, 0usize, 0u64);
        {
            let _in = f.ns.enter().unwrap();
            while compared < PACKETS {
                let frame = random_frame(&mut rng, &spec);
                let got = f.dp.run(&frame, f.ingress).unwrap();
                let Some(want) = f.with_model(|m| m.process(&frame)) else {
                    // The model cannot predict the kernel's FIB for this
                    // destination: it only reaches the last step of the
                    // return path. Forward and pass are told apart by the
                    // action; a drop is unroutable or too big (checked as a sum).
                    match got.action {
                        3 | 4 => *expected.entry(Reason::ForwardDecap).or_default() += 1,
                        2 => *expected.entry(Reason::PassDecapToKernel).or_default() += 1,
                        _ => either += 1,
                    }
                    skipped += 1;
                    continue;
                };
                assert_eq!(
                    (got.action, &got.data),
                    (want.action.code(), &want.output),
                    "seed {seed}, configuration {round}: packet {compared} ({:?}) differs\ninput {:02x?}",
                    want.reason,
                    frame
                );
                *expected.entry(want.reason).or_default() += 1;
                compared += 1;
            }
        }
        let after = f.dp.counters([], []).unwrap();
        let moved = |r| after.packets(r) - before.packets(r);
        let want = |r| expected.get(&r).copied().unwrap_or(0);
        for &r in Reason::ALL {
            if matches!(r, Reason::DropDecapUnroutable | Reason::DropDecapMtu) {
                assert!(moved(r) >= want(r), "seed {seed}, configuration {round}: reason {r:?}");
            } else {
                assert_eq!(moved(r), want(r), "seed {seed}, configuration {round}: reason {r:?}");
            }
        }
        assert_eq!(
            moved(Reason::DropDecapUnroutable) + moved(Reason::DropDecapMtu),
            want(Reason::DropDecapUnroutable) + want(Reason::DropDecapMtu) + either,
            "seed {seed}, configuration {round}: unroutable + too big"
        );
        assert!(skipped < compared / 20, "too many unpredictable packets: {skipped}");
        // Every rule matched as often as the model says (counters restart
        // with each new rule set): the data plane picked the same rules.
        let hits = f.rule_hits.borrow().clone();
        let mut rules_compared = 0;
        for c in f.dp.rule_counters().unwrap() {
            let key = (c.customer.clone(), c.rule.clone());
            let want = hits.get(&key).copied().unwrap_or(0);
            assert_eq!(
                c.packets, want,
                "seed {seed}, configuration {round}: matches of rule {key:?}"
            );
            rules_compared += 1;
            *rule_matches.entry(c.customer.is_some()).or_default() += want;
        }
        let rules_in_spec = spec.mitigation.len() + spec.customers.iter().map(|c| c.firewall.len()).sum::<usize>();
        assert_eq!(rules_compared, rules_in_spec, "every rule has a counter");
        for (r, n) in expected {
            *all.entry(r).or_default() += n;
        }
        total += compared;
    }
    println!(
        "compared {total} packets over {rounds} configurations; reasons: {all:?}; \
         rule matches (mitigation, firewall): {rule_matches:?}"
    );
    assert!(!all.contains_key(&Reason::DropInternal), "internal errors: {all:?}");
    assert!(
        missing(&all).is_empty(),
        "seed {seed}: reasons never reached by the random packets in {rounds} configurations: {:?}",
        missing(&all)
    );
}
