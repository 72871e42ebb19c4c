//! Control-plane benchmark: how long compiling and applying a large
//! configuration takes, and how much memory it needs.
//!
//! Builds a synthetic specification of 10,000 customers, 100,000 protected
//! prefixes (a fifth of the customers hold two IPv6 /48s among their ten),
//! about 21,000 tunnels (a third keyed) and 100,000 routes (1,500 ECMP route
//! sets of 2-4 members, some routes longer than their prefix), loads the data
//! plane (nothing is attached, no packet is sent) and prints:
//! - the cold compile and apply (empty maps -> that configuration),
//! - one-customer changes of four kinds (add a prefix and its route, remove
//!   a route, change a tunnel's MTU, add a customer): median and max of
//!   compile + apply,
//! - a no-op re-apply,
//! - adoption of the maps by a data plane that forgot what it applied (a
//!   restarted daemon), and that the apply following it is empty,
//! - the process's peak resident memory (VmHWM).
//!
//! Usage: moat-apply-bench [--quick | --customers N]
//!   --quick: a tenth of the sizes; --customers: N customers of 10 prefixes each

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use moat_dataplane::{compile, CustomerSpec, Dataplane, NextHop, RouteSpec, Spec, TunnelSpec};

/// Fixed fake next hops: no kernel routing is needed.
fn next_hop(t: &TunnelSpec) -> Option<NextHop> {
    let r = u32::from(t.remote);
    Some(NextHop {
        ifindex: 2 + r % 4,
        smac: [0x02, 0, 0, 0, 0, 1],
        dmac: [0x02, 0, 0, 0, 1, (r % 4) as u8],
        link_mtu: 1500,
    })
}

fn v4(base: Ipv4Addr, index: u32, len: u8) -> IpNet {
    IpNet::V4(Ipv4Net::new(Ipv4Addr::from(u32::from(base) + (index << 8)), len).expect("prefix"))
}

fn v6(index: u32) -> IpNet {
    let a = Ipv6Addr::from((0x2001_0db8u128 << 96) | (u128::from(index) << 80));
    IpNet::V6(Ipv6Net::new(a, 48).expect("prefix"))
}

fn tunnel(c: u32, t: u32, remote: u32) -> TunnelSpec {
    TunnelSpec {
        name: format!("t{t}"),
        local: Ipv4Addr::new(192, 0, 2, 1 + (c % 4) as u8),
        remote: Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + remote),
        key: c.is_multiple_of(3).then_some(c * 8 + t),
        mtu: 1476,
        ttl: 64,
        penalty: 0,
    }
}

fn route(prefix: IpNet, tunnel: u32) -> RouteSpec {
    RouteSpec {
        prefix,
        tunnel: format!("t{tunnel}"),
        priority: 100,
        weight: 100,
    }
}

/// Numbering state of the synthetic configuration, so changes can add
/// more objects that collide with nothing.
struct Gen {
    prefixes4: u32,
    prefixes6: u32,
    remotes: u32,
}

impl Gen {
    fn customer(&mut self, c: u32) -> CustomerSpec {
        let tunnels_n = if c.is_multiple_of(20) { 4 } else { 2 };
        let tunnels: Vec<TunnelSpec> = (0..tunnels_n)
            .map(|t| {
                self.remotes += 1;
                tunnel(c, t, self.remotes)
            })
            .collect();
        let mut prefixes = Vec::new();
        let mut routes = Vec::new();
        for k in 0..10u32 {
            let p = if c.is_multiple_of(5) && k >= 8 {
                self.prefixes6 += 1;
                v6(self.prefixes6)
            } else {
                self.prefixes4 += 1;
                v4(Ipv4Addr::new(10, 0, 0, 0), self.prefixes4, 24)
            };
            prefixes.push(p);
            if c.is_multiple_of(50) && k == 7 {
                // A route longer than its prefix: the rest has no route.
                let IpNet::V4(n) = p else { unreachable!() };
                routes.push(route(IpNet::V4(Ipv4Net::new(n.addr(), 25).expect("prefix")), 0));
            } else {
                routes.push(route(p, k % tunnels_n));
            }
            if c.is_multiple_of(20) && k < 3 {
                // ECMP: 2, 3 or 4 members.
                for extra in 1..=k + 1 {
                    routes.push(route(p, (k + extra) % tunnels_n));
                }
            }
        }
        CustomerSpec {
            name: format!("customer-{c}"),
            prefixes,
            egress_prefixes: if c.is_multiple_of(7) {
                vec![v4(Ipv4Addr::new(100, 64, 0, 0), c, 24)]
            } else {
                vec![]
            },
            tunnels,
            routes,
            firewall: Vec::new(),
        }
    }
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Compiles `spec` against what `dp` applied and applies it.
fn step(dp: &mut Dataplane, spec: &Spec) -> (Duration, Duration, moat_dataplane::ApplyReport) {
    let t0 = Instant::now();
    let compiled = compile(spec, &next_hop, dp.applied()).expect("compile");
    let t1 = Instant::now();
    let report = dp.apply(&compiled).expect("apply");
    let t2 = Instant::now();
    drop(compiled);
    (t1 - t0, t2 - t1, report)
}

/// One single-customer change of kind `kind` to customer `c`.
fn change(spec: &mut Spec, g: &mut Gen, kind: usize, c: usize) -> &'static str {
    match kind {
        0 => {
            g.prefixes4 += 1;
            let p = v4(Ipv4Addr::new(12, 0, 0, 0), g.prefixes4, 24);
            let cust = &mut spec.customers[c];
            cust.prefixes.push(p);
            cust.routes.push(route(p, 0));
            "add prefix+route"
        }
        1 => {
            let cust = &mut spec.customers[c];
            cust.routes.remove(0);
            "remove a route"
        }
        2 => {
            let t = &mut spec.customers[c].tunnels[0];
            t.mtu = if t.mtu == 1476 { 1400 } else { 1476 };
            "change tunnel mtu"
        }
        _ => {
            let n = spec.customers.len() as u32 + 1_000_000;
            let cust = g.customer(n);
            spec.customers.push(cust);
            "add a customer"
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let customers: u32 = match args.iter().position(|a| a == "--customers").map(|i| args.get(i + 1)) {
        Some(Some(v)) => match v.parse() {
            Ok(n) if n >= 10 => n,
            _ => {
                eprintln!("moat-apply-bench: --customers {v}: a number of at least 10");
                std::process::exit(2);
            }
        },
        Some(None) => {
            eprintln!("moat-apply-bench: --customers needs a number");
            std::process::exit(2);
        }
        None if quick => 1_000,
        None => 10_000,
    };
    let mut g = Gen {
        prefixes4: 0,
        prefixes6: 0,
        remotes: 0,
    };
    let mut spec = Spec {
        node_addresses: vec![Ipv4Addr::new(192, 0, 2, 100)],
        customers: (0..customers).map(|c| g.customer(c)).collect(),
        protections: moat_common::protect::ALL,
        mitigation: vec![],
    };
    let count = |f: fn(&CustomerSpec) -> usize| spec.customers.iter().map(f).sum::<usize>();
    println!(
        "configuration: {} customers, {} prefixes, {} tunnels, {} routes",
        spec.customers.len(),
        count(|c| c.prefixes.len()),
        count(|c| c.tunnels.len()),
        count(|c| c.routes.len())
    );
    println!("peak RSS before loading: {} MiB", peak_rss_kib() / 1024);

    let mut dp = Dataplane::load().expect("load the data plane (as root)");
    let (compile_t, apply_t, report) = step(&mut dp, &spec);
    let entries = report.added;
    println!(
        "cold: compile {:.1} ms, apply {:.1} ms, {} entries written, LPM fallback {:?}",
        ms(compile_t),
        ms(apply_t),
        entries,
        report.lpm_fallback
    );

    let mut totals: Vec<(usize, Duration, Duration)> = Vec::new();
    let changes = 24;
    for i in 0..changes {
        let kind = i % 4;
        let c = (i * 397 + 11) % customers as usize;
        change(&mut spec, &mut g, kind, c);
        let (ct, at, report) = step(&mut dp, &spec);
        assert!(!report.is_empty(), "change {i} changed nothing");
        totals.push((kind, ct, at));
    }
    let kinds = [
        "add prefix+route",
        "remove a route",
        "change tunnel mtu",
        "add a customer",
    ];
    let summary = |v: Vec<Duration>| {
        let mut v: Vec<f64> = v.into_iter().map(ms).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        (v[v.len() / 2], v[v.len() - 1])
    };
    let (med, max) = summary(totals.iter().map(|t| t.1 + t.2).collect());
    let min = ms(totals.iter().map(|t| t.1 + t.2).min().unwrap_or_default());
    let (cmed, _) = summary(totals.iter().map(|t| t.1).collect());
    let (amed, _) = summary(totals.iter().map(|t| t.2).collect());
    println!(
        "one-customer change ({changes} changes): compile+apply median {med:.2} ms, min {min:.2} ms, max {max:.2} ms \
         (compile median {cmed:.2} ms, apply median {amed:.2} ms)"
    );
    for (k, name) in kinds.iter().enumerate() {
        let (m, x) = summary(totals.iter().filter(|t| t.0 == k).map(|t| t.1 + t.2).collect());
        println!("  {name}: median {m:.2} ms, max {x:.2} ms");
    }

    // Repeated: the figure is small and a busy machine disturbs it.
    let mut noop = Vec::new();
    let mut empty = true;
    for _ in 0..10 {
        let (ct, at, report) = step(&mut dp, &spec);
        empty &= report.is_empty();
        noop.push((ct, at));
    }
    let (cmed, cmin) = (
        summary(noop.iter().map(|t| t.0).collect()).0,
        ms(noop.iter().map(|t| t.0).min().unwrap_or_default()),
    );
    let amed = summary(noop.iter().map(|t| t.1).collect()).0;
    println!(
        "no-op re-apply (10 times): compile median {cmed:.2} ms (min {cmin:.2} ms), apply median {amed:.2} ms, reports empty: {empty}"
    );

    adoption(&mut dp, &spec);
    println!("peak RSS: {} MiB", peak_rss_kib() / 1024);
}

/// A restarted daemon: the maps stay, what was applied is forgotten.
fn adoption(dp: &mut Dataplane, spec: &Spec) {
    dp.forget_applied();
    let t0 = Instant::now();
    let adopted = dp.adopt(spec).expect("adopt");
    let t1 = Instant::now();
    let (ct, at, report) = step(dp, spec);
    println!(
        "adopt: {:.1} ms ({adopted:?}); then compile {:.2} ms, apply {:.2} ms, report empty: {}",
        ms(t1 - t0),
        ms(ct),
        ms(at),
        report.is_empty()
    );
}
