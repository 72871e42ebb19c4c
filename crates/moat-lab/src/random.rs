//! Random configurations for differential and apply tests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use moat_dataplane::{CustomerSpec, RouteSpec, Spec, TunnelSpec};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

use crate::fixture::NODE;

/// A generator seeded from MOAT_SEED, or randomly; the seed is printed so
/// a failing run can be repeated.
pub fn seeded() -> (u64, StdRng) {
    let seed: u64 = std::env::var("MOAT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("MOAT_SEED={seed}");
    (seed, StdRng::seed_from_u64(seed))
}

/// A random configuration in the documentation ranges: 1-4 customers,
/// nested prefixes, tunnels with and without keys and penalties, routes
/// at several lengths and priorities (some prefixes without any), never
/// overlapping between customers.
pub fn spec(rng: &mut StdRng) -> Spec {
    // Sometimes whole /24s (uniform blocks for the block table), sometimes
    // /26s (blocks the LPM table serves).
    let v4: &[&str] = if rng.gen_bool(0.5) {
        &["203.0.113.0/24", "198.51.100.128/25"]
    } else {
        &[
            "203.0.113.0/26",
            "203.0.113.64/26",
            "203.0.113.128/26",
            "203.0.113.192/26",
            "198.51.100.128/26",
            "198.51.100.192/26",
        ]
    };
    let v6 = [
        "2001:db8:100::/48",
        "2001:db8:101::/48",
        "2001:db8:102::/48",
        "2001:db8:106::/47",
        "2001:db8:108::/46",
    ];
    let mut blocks: Vec<IpNet> = v4.iter().chain(v6.iter()).map(|s| s.parse().unwrap()).collect();
    blocks.shuffle(rng);
    let n = rng.gen_range(1..=4);
    let mut customers = Vec::new();
    let mut remote = 10u8;
    for ci in 0..n {
        let mine: Vec<IpNet> = blocks.iter().skip(ci).step_by(n).copied().collect();
        let mut prefixes = mine.clone();
        // Nested prefixes of the same customer are allowed.
        for p in &mine {
            if rng.gen_bool(0.3) {
                prefixes.push(sub(rng, *p, 4));
            }
        }
        let tunnels: Vec<TunnelSpec> = (0..rng.gen_range(1..=4))
            .map(|ti| {
                remote += 1;
                TunnelSpec {
                    name: format!("t{ti}"),
                    local: NODE,
                    remote: Ipv4Addr::new(192, 0, 2, remote),
                    key: rng.gen_bool(0.4).then(|| rng.gen()),
                    mtu: *[576u16, 1400, 1476, 9000].choose(rng).unwrap(),
                    ttl: rng.gen_range(1..=255),
                    penalty: *[0u32, 0, 500_000, 1_000_000].choose(rng).unwrap(),
                }
            })
            .collect();
        let mut routes = Vec::new();
        for (pi, p) in mine.iter().enumerate() {
            // Some prefixes get no route at all (always the first one of the first customer).
            if (ci == 0 && pi == 0) || rng.gen_bool(0.15) {
                continue;
            }
            for _ in 0..rng.gen_range(1..=4) {
                let prefix = if rng.gen_bool(0.5) { *p } else { sub(rng, *p, 6) };
                routes.push(RouteSpec {
                    prefix,
                    tunnel: tunnels.choose(rng).unwrap().name.clone(),
                    priority: *[50u32, 100, 100, 200].choose(rng).unwrap(),
                    weight: rng.gen_range(1..=256),
                });
            }
        }
        customers.push(CustomerSpec {
            name: format!("c{ci}"),
            prefixes,
            egress_prefixes: vec![sub(rng, "192.0.2.0/24".parse().unwrap(), 4)],
            tunnels,
            routes,
            firewall: if rng.gen_bool(0.5) {
                random_rules(rng, 8)
            } else {
                Vec::new()
            },
        });
    }
    Spec {
        node_addresses: vec![Ipv4Addr::new(169, 254, 10, 0)],
        customers,
        // Any combination of the built-in protections.
        protections: rng.gen_range(0..=moat_common::protect::ALL),
        mitigation: random_rules(rng, 30),
    }
}

/// Up to `max` rules (mitigation or firewall) from the shared random
/// conditions (no lists: the data plane's specification carries none),
/// drop (block) or pass (allow).
pub fn random_rules(rng: &mut StdRng, max: usize) -> Vec<moat_dataplane::RuleSpec> {
    let mut out = Vec::new();
    while out.len() < rng.gen_range(0..=max) {
        let e = crate::rules::expr(rng, 2);
        if format!("{e}").contains('$') {
            continue;
        }
        let Ok(terms) = moat_expr::normal::terms(&e, &|_| Vec::new(), moat_expr::normal::MAX_TERMS) else {
            continue;
        };
        out.push(moat_dataplane::RuleSpec {
            name: format!("r{}", out.len()),
            condition: e,
            terms,
            action: if rng.gen_bool(0.5) {
                moat_dataplane::RuleAction::Drop
            } else {
                moat_dataplane::RuleAction::Pass
            },
        });
    }
    out
}

/// A random sub-prefix of `p`, up to `extra` bits longer.
pub fn sub(rng: &mut StdRng, p: IpNet, extra: u8) -> IpNet {
    let len = (p.prefix_len() + rng.gen_range(0..=extra)).min(p.max_prefix_len());
    IpNet::new(random_in(rng, p), len).unwrap().trunc()
}

pub fn random_in(rng: &mut StdRng, p: IpNet) -> IpAddr {
    match p {
        IpNet::V4(n) => {
            let host = u32::MAX.checked_shr(u32::from(n.prefix_len())).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) | (rng.gen::<u32>() & host)))
        }
        IpNet::V6(n) => {
            let host = u128::MAX.checked_shr(u32::from(n.prefix_len())).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | (rng.gen::<u128>() & host)))
        }
    }
}
