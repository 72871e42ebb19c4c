//! Applying never exposes a hole: while one thread applies a sequence of
//! random configurations, another runs packets through the program. Every
//! encapsulated packet must go to a tunnel of the customer (by name) that
//! owns its destination in the configuration before or after the apply in
//! progress, in that customer's old or new state: never to another
//! customer's tunnel, never through a half-written entry. No packet may meet
//! a missing route set or tunnel (drop_internal).

use std::{
    net::IpAddr,
    os::fd::AsFd,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
};

use ipnet::IpNet;
use moat_common::Reason;
use moat_dataplane::Spec;
use moat_lab::{
    baseline::run_fd,
    fixture::Fixture,
    packet::{self, Frame, L4},
    random::{self, random_in},
};
use rand::seq::SliceRandom;

const CONFIGS: usize = 40;
const FRAMES: usize = 2000;

/// The customer owning `dst` in `spec`.
fn owner(spec: &Spec, dst: IpAddr) -> Option<String> {
    spec.customers
        .iter()
        .find(|c| c.prefixes.iter().any(|p| p.contains(&dst)))
        .map(|c| c.name.clone())
}

/// Whether `remote` is a tunnel remote of customer `name` in `spec`.
fn has_remote(spec: &Spec, name: &str, remote: [u8; 4]) -> bool {
    spec.customers
        .iter()
        .any(|c| c.name == name && c.tunnels.iter().any(|t| t.remote.octets() == remote))
}

#[test]
fn applies_never_send_a_packet_into_another_customers_tunnel() {
    let (seed, mut rng) = random::seeded();
    let mut f = Fixture::new("order");
    let specs: Vec<Spec> = (0..CONFIGS).map(|_| random::spec(&mut rng)).collect();
    let space: Vec<IpNet> = ["203.0.113.0/24", "198.51.100.128/25", "2001:db8:100::/44"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let frames: Vec<(IpAddr, Vec<u8>)> = (0..FRAMES)
        .map(|_| {
            let net = *space.choose(&mut rng).unwrap();
            let dst = random_in(&mut rng, net);
            let src: IpAddr = if dst.is_ipv4() {
                "192.0.2.99".parse().unwrap()
            } else {
                "2001:db8:1::1".parse().unwrap()
            };
            (
                dst,
                packet::eth(
                    Frame::default(),
                    &packet::ip(src, dst, 64, L4::Udp { sport: 1000, dport: 53 }, &[0; 16]),
                ),
            )
        })
        .collect();
    let owners: Vec<Vec<Option<String>>> = specs
        .iter()
        .map(|s| frames.iter().map(|(d, _)| owner(s, *d)).collect())
        .collect();
    let specs_for_checker = specs.clone();

    f.apply(specs[0].clone());
    let fd = f.dp.program_fd().unwrap();
    let lo = Arc::new(AtomicUsize::new(0));
    let hi = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let checker = {
        let (lo, hi, stop) = (lo.clone(), hi.clone(), stop.clone());
        let specs = specs_for_checker;
        std::thread::spawn(move || {
            let (mut runs, mut encapsulated, mut violations) = (0u64, 0u64, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                for (i, (dst, frame)) in frames.iter().enumerate() {
                    let before = lo.load(Ordering::SeqCst);
                    let (action, out) = run_fd(fd.as_fd(), frame).expect("test run");
                    let after = hi.load(Ordering::SeqCst);
                    runs += 1;
                    if action == 3 || action == 4 {
                        encapsulated += 1;
                        let remote = [out[30], out[31], out[32], out[33]];
                        let ok = (before..=after).any(|k| {
                            owners[k][i]
                                .as_ref()
                                .is_some_and(|name| (before..=after).any(|j| has_remote(&specs[j], name, remote)))
                        });
                        if !ok {
                            violations.push(format!(
                                "{dst} went to {remote:?} during configurations {before}..={after}"
                            ));
                        }
                    }
                }
            }
            (runs, encapsulated, violations)
        })
    };
    for (k, spec) in specs.iter().enumerate().skip(1) {
        hi.store(k, Ordering::SeqCst);
        f.apply(spec.clone());
        lo.store(k, Ordering::SeqCst);
    }
    // Let the checker see the last configuration too.
    std::thread::sleep(std::time::Duration::from_millis(50));
    stop.store(true, Ordering::SeqCst);
    let (runs, encapsulated, violations) = checker.join().expect("checker");
    println!("seed {seed}: {runs} packets run during {CONFIGS} applies, {encapsulated} encapsulated");
    assert!(
        violations.is_empty(),
        "seed {seed}: {} packets into a wrong tunnel, e.g. {:?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );
    assert!(
        encapsulated > 1000,
        "the checker must overlap the applies (only {encapsulated} encapsulated)"
    );
    let c = f.dp.counters([], []).unwrap();
    assert_eq!(
        c.packets(Reason::DropInternal),
        0,
        "seed {seed}: a packet met a missing route set or tunnel"
    );
}
