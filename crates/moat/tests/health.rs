//! Health-steered routing end to end (root, namespaces): a customer site
//! reachable through two tunnels (priority 100 and 200) whose userspace
//! GRE endpoint answers probes. Cutting tunnel 1 under a continuous stream
//! moves the traffic to tunnel 2; restoring it brings the traffic back once
//! tunnel 1 is healthy again (3 successes -> degraded, 30 -> healthy).

use std::{
    collections::BTreeSet,
    net::{SocketAddr, UdpSocket},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use moat_lab::{
    daemon::Daemon,
    edge::{Edge, ENDPOINT},
    http,
    site::GreTunEndpoint,
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_moat");

fn config() -> String {
    let mut s = Edge::node_yaml("edge-health");
    s.push_str(
        "customers:
  - name: acme
    prefixes: [203.0.113.0/25]
    tunnels:
      - name: acme-1
        remote: 192.0.2.10
        key: 1
        mtu: 1472
        health_check: { rate: high }
      - name: acme-2
        remote: 192.0.2.10
        key: 2
        mtu: 1472
        health_check: { rate: high }
    routes:
      - { prefix: 203.0.113.0/25, tunnel: acme-1, priority: 100 }
      - { prefix: 203.0.113.0/25, tunnel: acme-2, priority: 200 }
",
    );
    s
}

fn tunnel(d: &Daemon, name: &str) -> Value {
    let s = d.status().unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    s["tunnels"]
        .as_array()
        .expect("tunnels")
        .iter()
        .find(|t| t["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no tunnel {name}"))
}

fn tx(d: &Daemon, name: &str) -> u64 {
    tunnel(d, name)["tx"]["packets"].as_u64().expect("tx")
}

fn wait_for(d: &Daemon, what: &str, limit: Duration, ok: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    while !ok() {
        assert!(started.elapsed() < limit, "{what} not within {limit:?}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    started.elapsed()
}

/// Sends `count` forged reply-style answers for tunnel id 1 from the
/// attacker host (raw IPv4 with a spoofed source); returns how many.
fn forge_replies(edge: &Edge, count: u32) -> u64 {
    use moat_health::probe::{build_probe, ProbePayload};
    let _in = edge.attacker.enter().expect("enter attacker");
    // SAFETY: plain socket(2) call; IPPROTO_RAW sends our own IPv4 header.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    let spec = moat_health::ProbeSpec {
        style: moat_health::ProbeStyle::Reply,
        ident: 1,
        node: ENDPOINT,
        target: std::net::Ipv4Addr::new(192, 0, 2, 10),
    };
    let dst = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ENDPOINT.octets()),
        },
        sin_zero: [0; 8],
    };
    let mut sent = 0;
    for i in 0..count {
        let token = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(u64::from(i) + 1);
        let pkt = build_probe(
            &spec,
            &ProbePayload {
                tunnel: 1,
                seq: i,
                token,
            },
        );
        // SAFETY: sendto(2) with our buffer and a valid sockaddr_in.
        let n = unsafe {
            libc::sendto(
                fd,
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&dst as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n > 0 {
            sent += 1;
        }
    }
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(fd) };
    sent
}

#[test]
fn failover_to_the_backup_tunnel_and_back() {
    let edge = Edge::new("health").expect("topology");
    let site = &edge.sites[0];
    let endpoint = edge
        .start_site_multi(0, &[Some(1), Some(2)], Some(2))
        .expect("site endpoint");
    let mut d = Daemon::start(Path::new(BIN), &edge.node, &config()).expect("moat run");

    // Both tunnels answer their probes.
    wait_for(&d, "both tunnels probed healthy", Duration::from_secs(10), || {
        ["acme-1", "acme-2"].iter().all(|n| {
            let t = tunnel(&d, n);
            t["health"] == "healthy" && t["probes"]["succeeded"].as_u64().unwrap_or(0) >= 5
        })
    });

    // A continuous stream to the customer's server: 1,000 packets/s.
    let receiver = {
        let _in = site.ns.enter().expect("enter site");
        UdpSocket::bind((site.server, 9000)).expect("bind")
    };
    receiver
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let sender = {
        let _in = edge.inet.enter().expect("enter inet");
        UdpSocket::bind("198.51.100.100:0").expect("bind")
    };
    let counting = std::thread::spawn(move || {
        let mut seen = BTreeSet::new();
        let mut buf = [0u8; 16];
        while let Ok(8) = receiver.recv(&mut buf) {
            seen.insert(u64::from_be_bytes(buf[..8].try_into().expect("8 bytes")));
        }
        seen
    });
    let sending = Arc::new(AtomicBool::new(true));
    let flag = sending.clone();
    let to = SocketAddr::from((site.server, 9000));
    let traffic = std::thread::spawn(move || {
        let (mut n, t) = (0u64, Instant::now());
        while flag.load(Ordering::Relaxed) && t.elapsed() < Duration::from_secs(60) {
            sender.send_to(&n.to_be_bytes(), to).expect("send");
            n += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        n
    });

    std::thread::sleep(Duration::from_millis(500));
    let (a1, a2) = (tx(&d, "acme-1"), tx(&d, "acme-2"));
    assert!(a1 > 200, "the primary tunnel carries the stream: {a1}");
    assert_eq!(a2, 0, "the backup carries nothing while the primary is healthy");

    // Cut tunnel 1: the site drops its GRE (probes included).
    endpoint.cut(Some(1));
    let failover = wait_for(&d, "traffic on the backup tunnel", Duration::from_secs(5), || {
        tx(&d, "acme-2") > 0
    });
    eprintln!(
        "failover at the high rate: {} ms from the cut to traffic on the backup",
        failover.as_millis()
    );
    // Degraded (2 losses) already moves the traffic; the third makes it down.
    wait_for(&d, "tunnel 1 down", Duration::from_secs(3), || {
        tunnel(&d, "acme-1")["health"] == "down"
    });

    // Forged answers (right addresses and identifier, guessed sequence and
    // token) from the attacker do not bring the dead tunnel back, and a
    // reload keeps its health (same identity).
    let forged = forge_replies(&edge, 2_000);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(tunnel(&d, "acme-1")["health"], "down", "forged answers must not count");
    let m = http::scrape_metrics(&edge.node).expect("metrics");
    let rejected: u64 = ["unknown", "stale", "duplicate", "wrong_tunnel", "malformed"]
        .iter()
        .filter_map(|k| http::metric(&m, &format!("moat_probe_replies_total{{kind=\"{k}\"}}")))
        .sum();
    assert!(
        rejected >= forged / 2,
        "the forged answers reached the daemon and were refused: {rejected} of {forged}\n{m}"
    );
    let out = d.cli(&["reload"]).expect("moat reload");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(tunnel(&d, "acme-1")["health"], "down", "health survives a reload");

    // A restart keeps the steering until new verdicts: the dead primary
    // stays down (nothing rewritten), the stream stays on the backup.
    d.restart().expect("restart");
    let t1 = tunnel(&d, "acme-1");
    assert_eq!(t1["health"], "down", "{t1}");
    assert_eq!(t1["probes"]["reason"], "kept across a daemon restart", "{t1}");
    let log = d.log();
    let after = &log[log.rfind("adopted the running data plane").expect("adopted")..];
    let applied = after.lines().find(|l| l.contains("INFO applied ")).expect("apply line");
    assert!(applied.contains(": 0 added, 0 changed, 0 removed in"), "{applied}");
    let b2 = tx(&d, "acme-2");
    std::thread::sleep(Duration::from_millis(300));
    assert!(tx(&d, "acme-2") > b2 + 100, "the stream stays on the backup");
    std::thread::sleep(Duration::from_millis(500));
    let (b1, b2) = (tx(&d, "acme-1"), tx(&d, "acme-2"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(tx(&d, "acme-1"), b1, "nothing more into the dead tunnel");
    assert!(tx(&d, "acme-2") > b2 + 200, "the stream flows through the backup");

    // Restore: down -> degraded after 3 answers, healthy after 30; only
    // then does traffic go back (degraded is +500,000 > priority 200).
    endpoint.restore(Some(1));
    wait_for(&d, "tunnel 1 degraded", Duration::from_secs(5), || {
        tunnel(&d, "acme-1")["health"] == "degraded"
    });
    let c1 = tx(&d, "acme-1");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        tx(&d, "acme-1"),
        c1,
        "a degraded primary still loses to the healthy backup"
    );
    wait_for(&d, "tunnel 1 healthy", Duration::from_secs(10), || {
        tunnel(&d, "acme-1")["health"] == "healthy"
    });
    let r1 = tx(&d, "acme-1");
    std::thread::sleep(Duration::from_millis(500));
    assert!(tx(&d, "acme-1") > r1 + 200, "traffic is back on the primary");

    sending.store(false, Ordering::Relaxed);
    let sent = traffic.join().expect("sender");
    let seen = counting.join().expect("receiver");
    eprintln!(
        "stream: {sent} sent, {} received, {} lost around the cut",
        seen.len(),
        sent - seen.len() as u64
    );
    let log = d.log();
    assert!(
        log.contains("tunnel health changed") && log.contains("3 probes failed in a row"),
        "{log}"
    );
    assert!(log.contains("health steering applied"), "{log}");
}

#[test]
fn weighted_split_and_a_failed_tunnel_moves_only_its_flows() {
    let edge = Edge::new("weights").expect("topology");
    let site = &edge.sites[0];
    let endpoint = edge
        .start_site_multi(0, &[Some(1), Some(2)], Some(2))
        .expect("site endpoint");
    let config = config()
        .replace(
            "tunnel: acme-1, priority: 100 }",
            "tunnel: acme-1, priority: 100, weight: 64 }",
        )
        .replace(
            "tunnel: acme-2, priority: 200 }",
            "tunnel: acme-2, priority: 100, weight: 192 }",
        );
    let d = Daemon::start(Path::new(BIN), &edge.node, &config).expect("moat run");
    wait_for(&d, "both tunnels probed healthy", Duration::from_secs(10), || {
        ["acme-1", "acme-2"].iter().all(|n| {
            let t = tunnel(&d, n);
            t["health"] == "healthy" && t["probes"]["succeeded"].as_u64().unwrap_or(0) >= 3
        })
    });

    // 2,000 flows (source ports), one packet each per round.
    let sockets: Vec<UdpSocket> = {
        let _in = edge.inet.enter().expect("enter inet");
        (0..2000u16)
            .map(|i| UdpSocket::bind(("198.51.100.100", 20000 + i)).expect("bind"))
            .collect()
    };
    let to = SocketAddr::from((site.server, 9000));
    let round = |endpoint: &GreTunEndpoint| {
        endpoint.flows(true);
        for s in &sockets {
            s.send_to(b"flow", to).expect("send");
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(Duration::from_millis(300));
        endpoint.flows(false)
    };
    let before = round(&endpoint);
    assert!(before.len() >= 1990, "flows seen: {}", before.len());
    let on1 = before.values().filter(|k| **k == Some(1)).count();
    let share = on1 as f64 / before.len() as f64;
    eprintln!(
        "weights 1:3: {on1} of {} flows on tunnel 1 ({:.1}%)",
        before.len(),
        share * 100.0
    );
    assert!((share - 0.25).abs() < 0.04, "share on the weight-1 tunnel: {share}");

    // Fail tunnel 1: its flows move to tunnel 2, the others keep theirs.
    endpoint.cut(Some(1));
    wait_for(&d, "tunnel 1 down", Duration::from_secs(5), || {
        tunnel(&d, "acme-1")["health"] == "down"
    });
    let after = round(&endpoint);
    let stayed = before
        .iter()
        .filter(|(_, k)| **k == Some(2))
        .filter(|(p, _)| after.get(p) == Some(&Some(2)))
        .count();
    let was2 = before.values().filter(|k| **k == Some(2)).count();
    let moved = before
        .iter()
        .filter(|(_, k)| **k == Some(1))
        .filter(|(p, _)| after.get(p) == Some(&Some(2)))
        .count();
    eprintln!("after failing tunnel 1: {stayed} of {was2} tunnel-2 flows kept their tunnel, {moved} of {on1} moved");
    assert!(stayed as f64 >= 0.99 * was2 as f64, "{stayed} of {was2}");
    assert!(moved as f64 >= 0.99 * on1 as f64, "{moved} of {on1}");
}

fn styles_config() -> String {
    let mut s = Edge::node_yaml("edge-styles");
    s.push_str(
        "customers:
  - name: acme
    prefixes: [203.0.113.0/25]
    tunnels:
      - name: request-uni
        remote: 192.0.2.10
        key: 11
        mtu: 1472
        health_check: { type: request, rate: high }
      - name: reply-bi
        remote: 192.0.2.10
        key: 12
        mtu: 1472
        interface_address: 169.254.10.0/31
        health_check: { direction: bidirectional, rate: high }
    routes:
      - { prefix: 203.0.113.0/25, tunnel: request-uni }
  - name: globex
    prefixes: [203.0.113.128/25]
    tunnels:
      - name: request-bi
        remote: 192.0.2.26
        key: 13
        mtu: 1472
        interface_address: 169.254.10.2/31
        health_check: { type: request, direction: bidirectional, rate: high }
    routes:
      - { prefix: 203.0.113.128/25, tunnel: request-bi }
",
    );
    s
}

/// Request-style probes (the site's kernel answers an echo request) and
/// bidirectional ones (the answer comes back inside the tunnel, to our
/// interface address): each keeps its tunnel healthy, and each tunnel
/// goes down when its GRE is cut, alone, and recovers when restored.
#[test]
fn request_style_and_bidirectional_probes() {
    let edge = Edge::new("styles").expect("topology");
    // Site 1 answers bidirectional probes through key 12, site 2 through 13;
    // request-style unidirectional answers go back over the internet.
    let site1 = edge
        .start_site_multi(0, &[Some(11), Some(12)], Some(12))
        .expect("site 1 endpoint");
    let site2 = edge
        .start_site_multi(1, &[Some(13)], Some(13))
        .expect("site 2 endpoint");
    let d = Daemon::start(Path::new(BIN), &edge.node, &styles_config()).expect("moat run");
    let names = ["request-uni", "reply-bi", "request-bi"];
    let healthy_with = |n: u64| {
        names.iter().all(|name| {
            let t = tunnel(&d, name);
            t["health"] == "healthy" && t["probes"]["succeeded"].as_u64().unwrap_or(0) >= n
        })
    };
    wait_for(&d, "every tunnel probed healthy", Duration::from_secs(10), || {
        healthy_with(10)
    });
    for name in names {
        let t = tunnel(&d, name);
        assert_eq!(t["probes"]["failed"], 0, "{name}: {t}");
        let rtt = t["probes"]["rtt_ms"].as_f64().expect("rtt");
        assert!(rtt > 0.0 && rtt < 250.0, "{name}: rtt {rtt} ms");
    }
    // Bidirectional answers came back encapsulated by the sites.
    let (e1, e2) = (
        site1.counters.encapsulated.load(Ordering::Relaxed),
        site2.counters.encapsulated.load(Ordering::Relaxed),
    );
    assert!(e1 >= 10 && e2 >= 10, "answers sent back into the tunnels: {e1}, {e2}");
    let replies = http::scrape_metrics(&edge.node).expect("metrics");
    let matched = http::metric(&replies, "moat_probe_replies_total{kind=\"matched\"}").expect("matched");
    let refused: u64 = ["malformed", "unknown", "wrong_tunnel", "stale", "duplicate"]
        .iter()
        .filter_map(|k| http::metric(&replies, &format!("moat_probe_replies_total{{kind=\"{k}\"}}")))
        .sum();
    assert!(matched >= 30, "matched answers: {matched}");
    assert_eq!(refused, 0, "answers refused:\n{replies}");

    // Each cut takes down its tunnel only; restoring brings it back.
    for (name, key, site) in [
        ("request-uni", 11, &site1),
        ("reply-bi", 12, &site1),
        ("request-bi", 13, &site2),
    ] {
        site.cut(Some(key));
        wait_for(&d, &format!("{name} down"), Duration::from_secs(3), || {
            tunnel(&d, name)["health"] == "down"
        });
        for other in names.iter().filter(|n| **n != name) {
            assert_eq!(tunnel(&d, other)["health"], "healthy", "{other} while {name} is cut");
        }
        site.restore(Some(key));
        // Down -> degraded after 3 answers, -> healthy after 30 more (100 ms apart).
        wait_for(&d, &format!("{name} healthy again"), Duration::from_secs(10), || {
            tunnel(&d, name)["health"] == "healthy"
        });
    }
}
