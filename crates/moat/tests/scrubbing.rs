//! Under attack, in namespaces: while the flood generator sends invalid TCP
//! (SYN+FIN) and memcached reflection (UDP from port 11211), both from
//! random sources, at the customer's prefix from the attacker host, HTTP
//! from the internet host to the customer's server through moat completes
//! every request, and the flood is counted as dropped by the built-in
//! protection and by the operator's rule (its own counter in the metrics). Bounded: the flood stops when the requests are done
//! or after 120 s; namespaces and pins are removed at the end.

use std::{
    net::Ipv4Addr,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use moat_dataplane::flood::Flood;
use moat_lab::{
    daemon::Daemon,
    edge::Edge,
    flood::{self, Target},
    http,
    packet::Frame,
};

const BIN: &str = env!("CARGO_BIN_EXE_moat");
const REQUESTS: u32 = 10_000;

#[test]
fn http_completes_while_a_flood_is_dropped() {
    let edge = Edge::new("scrub").expect("topology");
    let _site = edge.start_site(0, Some(42)).expect("site endpoint");
    let config = Edge::config_yaml(&[(0, 42)])
        + "mitigation:\n  rules:\n    - name: memcached\n      expression: 'udp.srcport == 11211'\n      action: drop\n";
    let d = Daemon::start(Path::new(BIN), &edge.node, &config).expect("moat run");
    let stop = Arc::new(AtomicBool::new(false));
    let server = http::serve(&edge.sites[0].ns, edge.sites[0].server, stop.clone()).expect("server");
    assert_eq!(http::get_many(&edge.inet, edge.sites[0].server, 5), 5, "{}", d.log());
    let before = http::scrape_metrics(&edge.node).expect("metrics");
    let dropped = |m: &str| {
        http::metric(m, "moat_reason_packets_total{reason=\"drop_invalid_tcp_flags\"}").unwrap_or(0)
            + http::metric(m, "moat_reason_packets_total{reason=\"drop_mitigation_rule\"}").unwrap_or(0)
    };
    let by_rule = |m: &str| {
        http::metric(
            m,
            "moat_rule_matched_packets_total{set=\"mitigation\",customer=\"\",rule=\"memcached\"}",
        )
        .unwrap_or(0)
    };
    let (dropped_before, rule_before) = (dropped(&before), by_rule(&before));

    // The attacker floods acme's server: SYN+FIN from 65,536 sources.
    let target = Target {
        frame: Frame {
            src: edge.attacker.mac("a0"),
            dst: edge.node.mac("n-atk"),
            vlan: None,
        },
        src: Ipv4Addr::new(198, 18, 0, 0),
        random_bits: 16,
        dst: edge.sites[0].server,
    };
    let flooding = AtomicBool::new(true);
    let ifindex = edge.attacker.ifindex("a0");
    let templates = [flood::tcp(&target, 80, 0x03), flood::reflection(&target, 11211, 64)];
    let (answered, took, sent, flood_time) = std::thread::scope(|scope| {
        let attacker = scope.spawn(|| {
            let _in = edge.attacker.enter().expect("enter attacker");
            let mut generator = Flood::load().expect("load the generator");
            let (mut sent, started) = (0u64, Instant::now());
            let mut round = 0;
            while flooding.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                let r = generator
                    .run(&templates[round % 2], ifindex, 1 << 20, Duration::from_secs(5))
                    .expect("flood");
                sent += r.sent;
                round += 1;
            }
            (sent, started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(500));
        let started = Instant::now();
        let answered = http::get_many(&edge.inet, edge.sites[0].server, REQUESTS);
        let took = started.elapsed();
        flooding.store(false, Ordering::Relaxed);
        let (sent, flood_time) = attacker.join().expect("attacker thread");
        (answered, took, sent, flood_time)
    });
    std::thread::sleep(Duration::from_millis(300));
    let after = http::scrape_metrics(&edge.node).expect("metrics");
    let rule_dropped = by_rule(&after) - rule_before;
    let dropped = dropped(&after) - dropped_before;
    let rate = sent as f64 / flood_time.as_secs_f64();
    println!(
        "under a flood of {sent} SYN+FIN and memcached-reflection frames at {:.2} Mpps ({dropped} dropped by moat, \
         {rule_dropped} of them by the rule 'memcached'): {answered}/{REQUESTS} HTTP requests complete in {:.1} s",
        rate / 1e6,
        took.as_secs_f64()
    );
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    assert_eq!(answered, REQUESTS, "failed requests under attack\n{}", d.log());
    // Frames the veth could not queue never reach moat; the rest are all
    // dropped under the protection's reason.
    assert!(dropped >= sent * 9 / 10, "{dropped} of {sent} flood frames counted");
    assert!(dropped <= sent, "{dropped} counted for {sent} sent");
    assert!(rate >= 1e6, "the flood reached only {:.2} Mpps", rate / 1e6);
    assert!(rule_dropped > 0, "the reflection flood was not counted under its rule");
    assert!(
        rule_dropped < dropped,
        "the SYN+FIN flood was not counted under its protection"
    );
}
