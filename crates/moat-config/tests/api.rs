//! The public API beyond the golden files: defaults, load errors, the data
//! plane spec, capacity limits and speed on a large configuration.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use moat_config::*;

const HEAD: &str = "version: 1
node:
  name: edge-1
  interfaces:
    - name: eth0
  tunnel_endpoint: 198.51.100.1
";

fn errors(text: &str) -> Vec<String> {
    match parse(text, "t.yaml") {
        Ok(_) => panic!("expected errors"),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn defaults_are_filled_in() {
    let text = format!(
        "{HEAD}customers:
  - name: acme
    prefixes: [203.0.113.0/24]
    tunnels:
      - name: t1
        remote: 192.0.2.10
        interface_address: 169.254.10.4/30
    routes:
      - prefix: 203.0.113.0/24
        tunnel: t1
"
    );
    let loaded = parse(&text, "t.yaml").expect("valid");
    assert!(loaded.warnings.is_empty(), "no rules, no warning");
    let c = &loaded.config;
    assert_eq!(c.node.interfaces[0].xdp_mode, XdpMode::Native);
    assert_eq!(c.node.metrics, Some("127.0.0.1:9477".parse().unwrap()));
    let t = &c.customers[0].tunnels[0];
    assert_eq!(
        t.local,
        Ipv4Addr::new(198, 51, 100, 1),
        "local defaults to the node's endpoint"
    );
    assert_eq!((t.mtu, t.ttl, t.key), (1476, 64, None));
    assert_eq!(
        t.health_check,
        HealthCheck {
            enabled: true,
            kind: ProbeKind::Reply,
            direction: Direction::Unidirectional,
            rate: Rate::Mid,
            target: Ipv4Addr::new(192, 0, 2, 10),
        }
    );
    assert_eq!(t.our_address(), Some(Ipv4Addr::new(169, 254, 10, 5)));
    assert_eq!(t.customer_address(), Some(Ipv4Addr::new(169, 254, 10, 6)));
    let r = &c.customers[0].routes[0];
    assert_eq!((r.priority, r.weight), (100, 100));
    assert_eq!(Rate::Low.interval(), Duration::from_secs(10));
    assert_eq!(Rate::High.interval(), Duration::from_millis(100));
    assert_eq!(c.summary(), "ok: 1 customers, 1 prefixes, 1 tunnels, 1 routes");
}

#[test]
fn metrics_off_disables_metrics() {
    let text = HEAD.replace("  tunnel_endpoint", "  metrics: off\n  tunnel_endpoint");
    let loaded = parse(&text, "t.yaml").expect("valid");
    assert_eq!(loaded.config.node.metrics, None);
}

#[test]
fn an_unreadable_file_is_one_error_at_1_1() {
    let errors = load(Path::new("tests/golden/no-such-file.yaml")).expect_err("missing file");
    assert_eq!(errors.len(), 1);
    let e = errors[0].to_string();
    assert!(
        e.starts_with("tests/golden/no-such-file.yaml:1:1: error: cannot read the file: "),
        "{e}"
    );
}

#[test]
fn spec_carries_penalties_and_node_addresses() {
    let loaded = load(Path::new("tests/golden/valid/ecmp.yaml")).expect("valid");
    let spec = loaded.config.to_spec();
    assert_eq!(
        spec.node_addresses,
        vec![Ipv4Addr::new(169, 254, 10, 0), Ipv4Addr::new(169, 254, 10, 5)]
    );
    assert!(spec.customers.iter().flat_map(|c| &c.tunnels).all(|t| t.penalty == 0));
    let spec = loaded
        .config
        .to_spec_with_penalties(|c, t| if (c, t) == ("acme", "lon") { 1_000_000 } else { 0 });
    for c in &spec.customers {
        for t in &c.tunnels {
            let expected = if (c.name.as_str(), t.name.as_str()) == ("acme", "lon") {
                1_000_000
            } else {
                0
            };
            assert_eq!(t.penalty, expected, "{}/{}", c.name, t.name);
        }
    }
}

#[test]
fn errors_are_sorted_by_position() {
    let text = format!(
        "{HEAD}customers:
  - name: b
    prefixes: [198.18.0.0/24]
  - name: A
    prefixes: [198.18.0.0/25]
    tunnels: [{{ name: t, remote: 0.0.0.0, mtu: 1 }}]
"
    );
    let e = errors(&text);
    let positions: Vec<(usize, usize)> = e
        .iter()
        .map(|l| {
            let mut parts = l.split(':').skip(1);
            let line = parts.next().unwrap().parse().unwrap();
            let col = parts.next().unwrap().parse().unwrap();
            (line, col)
        })
        .collect();
    let mut sorted = positions.clone();
    sorted.sort();
    assert_eq!(positions, sorted, "{e:#?}");
    assert_eq!(e.len(), 4, "{e:#?}");
}

/// `n` customers, each with `per` IPv4 prefixes (a /24 and `per - 1` /28s
/// inside it, so `per` <= 17), one tunnel and one route for the /24.
fn big_config(n: usize, per: usize) -> String {
    let mut s = String::from(HEAD);
    s += "customers:\n";
    for i in 0..n {
        let remote = Ipv4Addr::from(0x0b00_0000 + i as u32);
        let base = Ipv4Addr::from(0x6400_0000 + (i as u32) * 256);
        write!(
            s,
            "  - name: c{i}\n    tunnels:\n      - name: t\n        remote: {remote}\n    prefixes:\n      - {base}/24\n"
        )
        .unwrap();
        for k in 1..per as u32 {
            writeln!(s, "      - {}/28", Ipv4Addr::from(u32::from(base) + k * 16)).unwrap();
        }
        writeln!(s, "    routes:\n      - {{ prefix: {base}/24, tunnel: t }}").unwrap();
    }
    s
}

#[test]
fn ten_thousand_customers_and_a_hundred_thousand_prefixes_validate_fast() {
    let text = big_config(10_000, 10);
    let start = Instant::now();
    let loaded = parse(&text, "big.yaml").unwrap_or_else(|e| panic!("{} errors, first: {}", e.len(), e[0]));
    let took = start.elapsed();
    println!(
        "validated {} bytes, {} in {took:?}",
        text.len(),
        loaded.config.summary()
    );
    assert_eq!(
        loaded.config.summary(),
        "ok: 10000 customers, 100000 prefixes, 10000 tunnels, 10000 routes"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn too_many_customers_name_the_limit() {
    let mut text = format!("{HEAD}customers:\n");
    for i in 0..16_385 {
        writeln!(text, "  - name: c{i}").unwrap();
    }
    assert_eq!(
        errors(&text),
        vec!["t.yaml:8:3: error: 16385 customers exceed the limit of 16384 (half of the data plane's 32768 customer ids)"]
    );
}

#[test]
fn too_many_ecmp_route_sets_name_the_limit() {
    let mut text = format!(
        "{HEAD}customers:
  - name: acme
    prefixes: [100.64.0.0/10]
    tunnels:
      - {{ name: a, remote: 192.0.2.10 }}
      - {{ name: b, remote: 192.0.2.11 }}
    routes:
"
    );
    for i in 0..2049u32 {
        let p = Ipv4Addr::from(0x6440_0000 + i * 256);
        writeln!(text, "      - {{ prefix: {p}/24, tunnel: a }}").unwrap();
        writeln!(text, "      - {{ prefix: {p}/24, tunnel: b }}").unwrap();
    }
    assert_eq!(
        errors(&text),
        vec![
            "t.yaml:8:3: error: 2049 route prefixes with several routes exceed the limit of 2048 \
             (half of the data plane's 4096 ECMP tables)"
        ]
    );
}

#[test]
fn too_many_local_addresses_name_the_limit() {
    let mut text = format!("{HEAD}customers:\n  - name: acme\n    tunnels:\n");
    for i in 0..4097u32 {
        let local = Ipv4Addr::from(0x0a00_0000 + i);
        writeln!(text, "      - {{ name: t{i}, remote: 192.0.2.10, local: {local} }}").unwrap();
    }
    assert_eq!(
        errors(&text),
        vec![
            "t.yaml:8:3: error: 4097 local addresses (tunnel endpoints and our interface addresses) exceed \
             the limit of 4096 (the data plane's local address table)"
        ]
    );
}
