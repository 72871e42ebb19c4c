//! Table-driven BPF_PROG_TEST_RUN cases. Outputs are checked with etherparse
//! (headers, checksums) and GRE is read per RFC 2784/2890, independently of
//! moat's parser. Each case also checks the reason counter that moved.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{Ethernet2HeaderSlice, Ipv4HeaderSlice, Ipv6HeaderSlice};
use moat_common::Reason;
use moat_lab::{
    fixture::{Fixture, GW_MAC, NODE},
    model::Action,
    packet::{self, Frame, L4},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

fn a4(s: &str) -> IpAddr {
    IpAddr::V4(s.parse::<Ipv4Addr>().unwrap())
}
fn a6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse::<Ipv6Addr>().unwrap())
}
fn udp(sport: u16, dport: u16) -> L4 {
    L4::Udp { sport, dport }
}

/// Runs `frame`, asserts the action and that exactly `reason` counted one
/// packet, and that the model agrees on all of it. Returns the output.
fn run(f: &Fixture, frame: &[u8], action: u32, reason: Reason) -> Vec<u8> {
    let before = f.dp.counters([], []).unwrap();
    let r = f.run(frame);
    let after = f.dp.counters([], []).unwrap();
    let moved: Vec<Reason> = Reason::ALL
        .iter()
        .copied()
        .filter(|x| after.packets(*x) != before.packets(*x))
        .collect();
    assert_eq!(r.action, action, "action for {reason:?} case; counted {moved:?}");
    for &x in Reason::ALL {
        let d = after.packets(x) - before.packets(x);
        assert_eq!(
            d,
            u64::from(x == reason),
            "counter {x:?} moved by {d}, expected {reason:?}"
        );
    }
    let expect = f.with_model(|m| m.process(frame)).expect("model predicts this case");
    assert_eq!(
        (expect.action.code(), expect.reason),
        (r.action, reason),
        "model disagrees"
    );
    assert_eq!(expect.output, r.data, "model's bytes differ");
    if let Action::Redirect(i) = expect.action {
        assert!(i != 0);
    }
    r.data
}

/// Checks an encapsulated frame with etherparse and returns (outer
/// destination, GRE key, inner IP packet).
fn open_gre(out: &[u8], dmac_last: u8) -> ([u8; 4], Option<u32>, Vec<u8>) {
    let eth = Ethernet2HeaderSlice::from_slice(out).expect("ethernet");
    assert_eq!(eth.destination(), [0x02, 0, 0, 0, 0xc0, dmac_last]);
    assert_eq!(eth.source(), [0x02, 0, 0, 0, 0xc0, 0x01]);
    assert_eq!(eth.ether_type().0, 0x0800);
    let ip = Ipv4HeaderSlice::from_slice(&out[14..]).expect("outer IPv4");
    let h = ip.to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum(), "outer checksum");
    assert_eq!(ip.protocol().0, 47);
    assert_eq!(ip.source(), NODE.octets());
    assert_eq!(ip.ttl(), 64);
    assert!(ip.dont_fragment());
    assert_eq!(
        usize::from(ip.total_len()),
        out.len() - 14,
        "outer length covers the frame"
    );
    let g = &out[34..];
    let flags = u16::from_be_bytes([g[0], g[1]]);
    assert_eq!(flags & !0x2000, 0, "only the key bit may be set");
    let (key, inner) = if flags & 0x2000 != 0 {
        (Some(u32::from_be_bytes([g[4], g[5], g[6], g[7]])), &g[8..])
    } else {
        (None, &g[4..])
    };
    let proto = u16::from_be_bytes([g[2], g[3]]);
    assert_eq!(
        proto,
        if inner[0] >> 4 == 6 { 0x86dd } else { 0x0800 },
        "GRE protocol type"
    );
    (ip.destination(), key, inner.to_vec())
}

/// The inner packet equals `orig` with TTL/hop limit lowered by one and a
/// valid IPv4 checksum.
fn check_inner(inner: &[u8], orig: &[u8]) {
    assert_eq!(inner.len(), orig.len());
    if orig[0] >> 4 == 4 {
        let i = Ipv4HeaderSlice::from_slice(inner).unwrap();
        let o = Ipv4HeaderSlice::from_slice(orig).unwrap();
        assert_eq!(i.ttl(), o.ttl() - 1);
        let h = i.to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum(), "inner checksum");
        assert_eq!(inner[..8], orig[..8]);
        assert_eq!(inner[9], orig[9]);
        assert_eq!(inner[12..], orig[12..]);
    } else {
        let i = Ipv6HeaderSlice::from_slice(inner).unwrap();
        let o = Ipv6HeaderSlice::from_slice(orig).unwrap();
        assert_eq!(i.hop_limit(), o.hop_limit() - 1);
        assert_eq!(inner[..7], orig[..7]);
        assert_eq!(inner[8..], orig[8..]);
    }
}

fn encap_case(f: &Fixture, ip: &[u8], frame: Frame, action: u32, remote: [u8; 4], key: Option<u32>, dmac_last: u8) {
    let out = run(f, &packet::eth(frame, ip), action, Reason::ForwardEncap);
    let (dst, k, inner) = open_gre(&out, dmac_last);
    assert_eq!((dst, k), (remote, key));
    check_inner(&inner, ip);
}

#[test]
fn encapsulation_cases() {
    let f = Fixture::new("cases-encap");
    let untagged = Frame::default();
    let tagged = Frame {
        vlan: Some(100),
        ..Frame::default()
    };
    let payload = [0xabu8; 100];
    // IPv4 inner, untagged and tagged, no key (acme-a).
    let v4 = packet::ip(a4("192.0.2.99"), a4("203.0.113.5"), 64, udp(4000, 53), &payload);
    encap_case(&f, &v4, untagged, XDP_REDIRECT, [192, 0, 2, 10], None, 0);
    encap_case(&f, &v4, tagged, XDP_REDIRECT, [192, 0, 2, 10], None, 0);
    // Key 42 (acme-b, longer route), TCP.
    let tcp = packet::ip(
        a4("192.0.2.99"),
        a4("203.0.113.70"),
        30,
        L4::Tcp {
            sport: 5555,
            dport: 443,
            syn: true,
        },
        &[],
    );
    encap_case(&f, &tcp, untagged, XDP_REDIRECT, [192, 0, 2, 11], Some(42), 1);
    // IPv6 inner, with and without a tag, and with extension headers.
    let v6 = packet::ip(a6("2001:db8:1::1"), a6("2001:db8:100::5"), 64, udp(4000, 53), &payload);
    encap_case(&f, &v6, untagged, XDP_REDIRECT, [192, 0, 2, 11], Some(42), 1);
    encap_case(&f, &v6, tagged, XDP_REDIRECT, [192, 0, 2, 11], Some(42), 1);
    let ext = packet::ipv6_with_ext(&v6, &[(0, 8), (43, 24), (60, 16)]);
    encap_case(&f, &ext, untagged, XDP_REDIRECT, [192, 0, 2, 11], Some(42), 1);
    // ICMP echo into a tunnel behind the ingress interface: XDP_TX.
    let icmp = packet::ip(
        a4("192.0.2.99"),
        a4("203.0.113.200"),
        64,
        L4::Echo { id: 1, seq: 1 },
        &payload,
    );
    encap_case(&f, &icmp, untagged, XDP_TX, [192, 0, 2, 20], None, 0);
    // TTL 2 leaves with 1.
    let ttl2 = packet::ip(a4("192.0.2.99"), a4("203.0.113.5"), 2, udp(1, 2), &payload);
    encap_case(&f, &ttl2, untagged, XDP_REDIRECT, [192, 0, 2, 10], None, 0);
    // Ethernet padding after a short packet is not carried into the tunnel.
    let short = packet::ip(a4("192.0.2.99"), a4("203.0.113.5"), 64, udp(1, 2), &[]);
    let mut padded = packet::eth(untagged, &short);
    padded.resize(60, 0);
    let out = run(&f, &padded, XDP_REDIRECT, Reason::ForwardEncap);
    check_inner(&open_gre(&out, 0).2, &short);
}

#[test]
fn mtu_boundary() {
    let f = Fixture::new("cases-mtu");
    // acme-a (no key), tunnel MTU 1476: 1476 bytes pass, 1477 exceed the tunnel MTU.
    let (s, d) = (a4("192.0.2.99"), a4("203.0.113.5"));
    let exact = packet::ip(s, d, 64, udp(1, 2), &vec![7u8; 1476 - 28]);
    assert_eq!(exact.len(), 1476);
    encap_case(&f, &exact, Frame::default(), XDP_REDIRECT, [192, 0, 2, 10], None, 0);
    let over = packet::eth(
        Frame::default(),
        &packet::ip(s, d, 64, udp(1, 2), &vec![7u8; 1477 - 28]),
    );
    assert_eq!(
        run(&f, &over, XDP_DROP, Reason::DropMtuExceeded),
        over,
        "dropped packet untouched"
    );
    // acme-b carries a key (28 bytes of overhead): on a 1500-byte link the
    // largest packet is 1472; 1476 fits the tunnel MTU but not the link.
    let (s, d) = (a6("2001:db8:1::1"), a6("2001:db8:100::5"));
    let fits = packet::ip(s, d, 64, udp(1, 2), &vec![7u8; 1472 - 48]);
    encap_case(&f, &fits, Frame::default(), XDP_REDIRECT, [192, 0, 2, 11], Some(42), 1);
    let link = packet::eth(
        Frame::default(),
        &packet::ip(s, d, 64, udp(1, 2), &vec![7u8; 1476 - 48]),
    );
    run(&f, &link, XDP_DROP, Reason::DropNextHopMtu);
    let over = packet::eth(
        Frame::default(),
        &packet::ip(s, d, 64, udp(1, 2), &vec![7u8; 1477 - 48]),
    );
    run(&f, &over, XDP_DROP, Reason::DropMtuExceeded);
}

#[test]
fn ttl_expiry() {
    let f = Fixture::new("cases-ttl");
    for ttl in [0u8, 1] {
        let p = packet::eth(
            Frame::default(),
            &packet::ip(a4("192.0.2.99"), a4("203.0.113.5"), ttl, udp(1, 2), &[1, 2, 3]),
        );
        run(&f, &p, XDP_DROP, Reason::DropTtlExpired);
        let p6 = packet::eth(
            Frame::default(),
            &packet::ip(a6("2001:db8:1::1"), a6("2001:db8:100::5"), ttl, udp(1, 2), &[1]),
        );
        run(&f, &p6, XDP_DROP, Reason::DropTtlExpired);
    }
}

#[test]
fn fragments_all_take_one_tunnel() {
    let f = Fixture::new("cases-frag");
    // The ECMP route 203.0.113.96/27 spreads flows; fragments hash on L3
    // only, so first, middle and last fragments must share a tunnel.
    for src_last in 1..40u8 {
        let src = IpAddr::V4(Ipv4Addr::new(192, 0, 2, src_last));
        let whole = packet::ip(
            src,
            a4("203.0.113.100"),
            64,
            udp(1000 + u16::from(src_last), 53),
            &vec![9u8; 3000],
        );
        let frags = packet::ipv4_fragments(&whole, 1400, u16::from(src_last));
        assert_eq!(frags.len(), 3, "first, middle, last");
        let mut remotes = Vec::new();
        for fr in &frags {
            let out = run(
                &f,
                &packet::eth(Frame::default(), fr),
                XDP_REDIRECT,
                Reason::ForwardEncap,
            );
            let eth_dst_last = out[5];
            let (remote, _, inner) = open_gre(&out, eth_dst_last);
            check_inner(&inner, fr);
            remotes.push(remote);
        }
        assert!(
            remotes.windows(2).all(|w| w[0] == w[1]),
            "fragments of one datagram split over tunnels: {remotes:?}"
        );
    }
    let whole6 = packet::ip(
        a6("2001:db8:1::1"),
        a6("2001:db8:100::5"),
        64,
        udp(1, 2),
        &vec![9u8; 3000],
    );
    for fr in packet::ipv6_fragments(&whole6, 1400, 7) {
        encap_case(&f, &fr, Frame::default(), XDP_REDIRECT, [192, 0, 2, 11], Some(42), 1);
    }
}

#[test]
fn not_ours_passes_untouched() {
    let f = Fixture::new("cases-miss");
    for ip in [
        packet::ip(a4("192.0.2.1"), a4("192.0.2.99"), 64, udp(1, 2), &[0; 20]),
        packet::ip(a4("192.0.2.1"), a4("198.51.100.1"), 64, L4::Echo { id: 1, seq: 2 }, &[]),
        packet::ip(a6("2001:db8::1"), a6("2001:db8:300::1"), 64, udp(1, 2), &[0; 20]),
    ] {
        let frame = packet::eth(Frame::default(), &ip);
        assert_eq!(run(&f, &frame, XDP_PASS, Reason::PassNotProtected), frame);
    }
    let arp = packet::eth_typed(Frame::default(), 0x0806, &[0u8; 28]);
    assert_eq!(run(&f, &arp, XDP_PASS, Reason::PassNotIp), arp);
}

#[test]
fn routing_failures_are_counted() {
    let f = Fixture::new("cases-noroute");
    let v6 = packet::eth(
        Frame::default(),
        &packet::ip(a6("2001:db8:1::1"), a6("2001:db8:200::1"), 64, udp(1, 2), &[]),
    );
    run(&f, &v6, XDP_DROP, Reason::DropNoRoute);
    let nh = packet::eth(
        Frame::default(),
        &packet::ip(a4("192.0.2.1"), a4("203.0.113.40"), 64, udp(1, 2), &[]),
    );
    run(&f, &nh, XDP_DROP, Reason::DropNoNextHop);
    let c = f.dp.counters([0, 1], []).unwrap();
    assert_eq!(c.customers[&1].in_dropped.packets, 1, "globex counted its drop");
    assert_eq!(c.customers[&0].in_dropped.packets, 1, "acme counted its drop");
    assert_eq!(c.customers[&0].in_received.packets, 1);
}

/// The data plane counts inbound packets as forwarded or dropped; received,
/// which userspace reports as their sum, must still count every packet
/// and byte once.
#[test]
fn received_is_every_forwarded_and_dropped_packet() {
    let f = Fixture::new("cases-received");
    let to_acme = |len: usize| {
        packet::eth(
            Frame::default(),
            &packet::ip(a4("192.0.2.99"), a4("203.0.113.5"), 64, udp(1, 2), &vec![0u8; len]),
        )
    };
    let (a, b) = (to_acme(10), to_acme(300));
    run(&f, &a, XDP_REDIRECT, Reason::ForwardEncap);
    run(&f, &b, XDP_REDIRECT, Reason::ForwardEncap);
    // Land: source and destination alike, dropped by a protection.
    let land = packet::eth(
        Frame::default(),
        &packet::ip(a4("203.0.113.5"), a4("203.0.113.5"), 64, udp(1, 2), &[0u8; 7]),
    );
    run(&f, &land, XDP_DROP, Reason::DropLand);
    let c = f.dp.counters([0], []).unwrap().customers[&0];
    assert_eq!((c.in_forwarded.packets, c.in_dropped.packets), (2, 1));
    assert_eq!(c.in_received.packets, 3);
    assert_eq!(c.in_received.bytes, (a.len() + b.len() + land.len()) as u64);
    assert_eq!(c.in_forwarded.bytes, (a.len() + b.len()) as u64);
    assert_eq!(c.in_dropped.bytes, land.len() as u64);
}

fn gre_frame(remote: [u8; 4], key: Option<u32>, inner: &[u8]) -> Vec<u8> {
    packet::eth(Frame::default(), &packet::gre(remote, NODE.octets(), 64, key, inner))
}

#[test]
fn decapsulation_cases() {
    let f = Fixture::new("cases-decap");
    let payload = [5u8; 64];
    let inner = packet::ip(a4("203.0.113.5"), a4("198.51.100.77"), 64, udp(53, 4000), &payload);
    // Valid remote, no key: decapsulated and sent toward the upstream gateway.
    let out = run(
        &f,
        &gre_frame([192, 0, 2, 10], None, &inner),
        XDP_REDIRECT,
        Reason::ForwardDecap,
    );
    let eth = Ethernet2HeaderSlice::from_slice(&out).unwrap();
    assert_eq!(eth.destination(), GW_MAC);
    assert_eq!(eth.source(), f.up_mac);
    assert_eq!(eth.ether_type().0, 0x0800);
    check_inner(&out[14..], &inner);
    // Keyed tunnel with its key; IPv6 inner; source from egress_prefixes.
    run(
        &f,
        &gre_frame([192, 0, 2, 11], Some(42), &inner),
        XDP_REDIRECT,
        Reason::ForwardDecap,
    );
    let inner6 = packet::ip(a6("2001:db8:100::5"), a6("2001:db8:9::1"), 64, udp(53, 4000), &payload);
    let out6 = run(
        &f,
        &gre_frame([192, 0, 2, 11], Some(42), &inner6),
        XDP_REDIRECT,
        Reason::ForwardDecap,
    );
    assert_eq!(Ethernet2HeaderSlice::from_slice(&out6).unwrap().ether_type().0, 0x86dd);
    check_inner(&out6[14..], &inner6);
    let egress = packet::ip(a4("192.0.2.130"), a4("198.51.100.77"), 64, udp(53, 4000), &payload);
    run(
        &f,
        &gre_frame([192, 0, 2, 10], None, &egress),
        XDP_REDIRECT,
        Reason::ForwardDecap,
    );
    // Unknown remote, wrong key, missing key, unexpected key: dropped.
    for (remote, key) in [
        ([192, 0, 2, 99], None),
        ([192, 0, 2, 11], Some(41)),
        ([192, 0, 2, 11], None),
        ([192, 0, 2, 10], Some(1)),
    ] {
        let frame = gre_frame(remote, key, &inner);
        assert_eq!(run(&f, &frame, XDP_DROP, Reason::DropGreUnknownTunnel), frame);
    }
    // Spoofed inner source (globex's prefix through acme's tunnel, and an outside address).
    for src in ["203.0.113.200", "192.0.2.50"] {
        let spoofed = packet::ip(a4(src), a4("198.51.100.77"), 64, udp(53, 4000), &payload);
        run(
            &f,
            &gre_frame([192, 0, 2, 10], None, &spoofed),
            XDP_DROP,
            Reason::DropSpoofedSource,
        );
    }
    // ICMP for the node (probe replies) stays encapsulated and goes up.
    for dst in ["169.254.10.0", "198.51.100.1"] {
        let probe = packet::ip(a4("169.254.10.1"), a4(dst), 64, L4::Echo { id: 7, seq: 1 }, &[1; 16]);
        let frame = gre_frame([192, 0, 2, 10], None, &probe);
        assert_eq!(run(&f, &frame, XDP_PASS, Reason::PassTunnelToNode), frame);
    }
    // Inner TTL 1 cannot be forwarded.
    let expiring = packet::ip(a4("203.0.113.5"), a4("198.51.100.77"), 1, udp(53, 4000), &payload);
    run(
        &f,
        &gre_frame([192, 0, 2, 10], None, &expiring),
        XDP_DROP,
        Reason::DropTtlExpired,
    );
    // GRE with routing bit, another version, and a non-IP payload.
    let mut bad = gre_frame([192, 0, 2, 10], None, &inner);
    bad[34] |= 0x40;
    run(&f, &bad, XDP_DROP, Reason::DropGreMalformed);
    let mut v1 = gre_frame([192, 0, 2, 10], None, &inner);
    v1[35] |= 0x01;
    run(&f, &v1, XDP_DROP, Reason::DropGreMalformed);
    let mut eth_payload = gre_frame([192, 0, 2, 10], None, &inner);
    eth_payload[36..38].copy_from_slice(&0x6558u16.to_be_bytes());
    run(&f, &eth_payload, XDP_DROP, Reason::DropGreUnsupportedPayload);
    let c = f.dp.counters([0], [0, 1]).unwrap();
    // acme-a accepted: valid, egress source, 2 spoofed, 2 probes, TTL 1,
    // non-IP payload (the malformed GRE headers never matched a tunnel).
    assert_eq!(c.tunnels[&0].rx.packets, 8);
    assert_eq!(
        c.customers[&0].out_dropped.packets, 4,
        "2 spoofed, TTL 1, non-IP payload"
    );
    assert_eq!(
        c.customers[&0].out_forwarded.packets, 4,
        "across acme's tunnels a and b"
    );
}

#[test]
fn every_truncation_point_is_dropped_and_counted() {
    let f = Fixture::new("cases-trunc");
    let tagged = Frame {
        vlan: Some(7),
        ..Frame::default()
    };
    let frames = [
        packet::eth(
            tagged,
            &packet::ip(a4("192.0.2.99"), a4("203.0.113.5"), 64, udp(1, 2), &[3; 30]),
        ),
        packet::eth(
            Frame::default(),
            &packet::ip(
                a6("2001:db8:1::1"),
                a6("2001:db8:100::5"),
                64,
                L4::Tcp {
                    sport: 1,
                    dport: 2,
                    syn: false,
                },
                &[3; 30],
            ),
        ),
        gre_frame(
            [192, 0, 2, 11],
            Some(42),
            &packet::ip(a4("203.0.113.70"), a4("198.51.100.77"), 64, udp(1, 2), &[3; 30]),
        ),
    ];
    for full in &frames {
        let l3 = if full[12..14] == [0x81, 0x00] { 18 } else { 14 };
        // BPF_PROG_TEST_RUN refuses frames under 14 bytes (no driver delivers
        // them either); every longer cut is tried.
        for len in 14..full.len() {
            let cut = &full[..len];
            let reason = if len < l3 {
                Reason::DropTruncatedEthernet
            } else {
                Reason::DropTruncatedIp
            };
            assert_eq!(run(&f, cut, XDP_DROP, reason), cut, "truncated at {len}");
        }
    }
    // An IP length that ends inside the L4 header.
    let mut ip = packet::ip(a4("192.0.2.99"), a4("203.0.113.5"), 64, udp(1, 2), &[]);
    ip.truncate(24);
    ip[2..4].copy_from_slice(&24u16.to_be_bytes());
    let frame = packet::eth(Frame::default(), &ip);
    run(&f, &frame, XDP_DROP, Reason::DropTruncatedL4);
    // Malformed: IHL below 5, total length below the header, wrong version.
    for (at, value) in [(14usize, 0x44u8), (17, 10), (14, 0x65)] {
        let mut m = packet::eth(
            Frame::default(),
            &packet::ip(a4("192.0.2.99"), a4("203.0.113.5"), 64, udp(1, 2), &[]),
        );
        m[at] = value;
        if at == 17 {
            m[16] = 0;
        }
        run(&f, &m, XDP_DROP, Reason::DropMalformedIp);
    }
}

#[test]
fn weighted_spread_and_consistency_on_failure() {
    let mut f = Fixture::new("cases-ecmp");
    let flows: Vec<Vec<u8>> = (0..4000u32)
        .map(|i| {
            let src = IpAddr::V4(Ipv4Addr::new(192, 0, 2, (i % 250) as u8));
            packet::eth(
                Frame::default(),
                &packet::ip(
                    src,
                    a4("203.0.113.100"),
                    64,
                    udp(1024 + (i / 250) as u16 * 97, 443),
                    &[0; 8],
                ),
            )
        })
        .collect();
    let remote = |out: &[u8]| [out[30], out[31], out[32], out[33]];
    let before: Vec<[u8; 4]> = flows.iter().map(|p| remote(&f.run(p).data)).collect();
    let on_b = before.iter().filter(|r| **r == [192, 0, 2, 11]).count() as f64 / flows.len() as f64;
    assert!(
        (on_b - 0.75).abs() < 0.04,
        "weights 1:3 gave {on_b:.3} on the weight-3 tunnel"
    );
    // Tunnel a goes down (penalised): only its flows move.
    let mut spec = f.spec.clone();
    spec.customers[0].tunnels[0].penalty = 1_000_000;
    f.apply(spec);
    let after: Vec<[u8; 4]> = flows.iter().map(|p| remote(&f.run(p).data)).collect();
    for (b, a) in before.iter().zip(&after) {
        if *b == [192, 0, 2, 11] {
            assert_eq!(a, b, "a flow on the surviving tunnel moved");
        }
        assert_eq!(*a, [192, 0, 2, 11], "every flow now on the surviving tunnel");
    }
    // Back up: exactly the original assignment returns.
    let mut spec = f.spec.clone();
    spec.customers[0].tunnels[0].penalty = 0;
    f.apply(spec);
    let restored: Vec<[u8; 4]> = flows.iter().map(|p| remote(&f.run(p).data)).collect();
    assert_eq!(restored, before);
}

#[test]
fn lookups_fall_back_to_the_lpm_tables_beyond_the_multibit_capacity() {
    let mut f = Fixture::new("cases-fallback");
    // 4,097 IPv6 /64s under distinct /56s need more multibit nodes than a
    // buffer holds: the data plane must switch to the LPM tables, correctly.
    let mut spec = f.spec.clone();
    for i in 0..4097u32 {
        let p = format!("2001:db8:{:x}:{:x}::/64", 0x300 + (i >> 8), (i & 0xff) << 8);
        spec.customers[1].prefixes.push(p.parse().unwrap());
    }
    let report = f.apply(spec);
    assert_eq!(report.lpm_fallback, [false, true]);
    let hit = packet::eth(
        Frame::default(),
        &packet::ip(a6("2001:db8:1::1"), a6("2001:db8:300:1000::9"), 64, udp(1, 2), &[]),
    );
    run(&f, &hit, XDP_DROP, Reason::DropNoRoute);
    let miss = packet::eth(
        Frame::default(),
        &packet::ip(a6("2001:db8:1::1"), a6("2001:db8:300:1001::9"), 64, udp(1, 2), &[]),
    );
    run(&f, &miss, XDP_PASS, Reason::PassNotProtected);
    let v6 = packet::ip(a6("2001:db8:1::1"), a6("2001:db8:100::5"), 64, udp(4000, 53), &[1; 20]);
    encap_case(&f, &v6, Frame::default(), XDP_REDIRECT, [192, 0, 2, 11], Some(42), 1);
    // Back within capacity: the multibit table serves again.
    let report = f.apply(moat_lab::fixture::standard_spec());
    assert_eq!(report.lpm_fallback, [false, false]);
    run(&f, &hit, XDP_PASS, Reason::PassNotProtected);
    encap_case(&f, &v6, Frame::default(), XDP_REDIRECT, [192, 0, 2, 11], Some(42), 1);
}

#[test]
fn built_in_protections_drop_and_count_each_attack_and_can_be_turned_off() {
    use moat_common::protect;
    let mut f = Fixture::new("cases-protect");
    let tcp = |sport, dport, flags| L4::TcpFlags { sport, dport, flags };
    let to = |l4: L4, src: &str| packet::eth(Frame::default(), &packet::ip(a4(src), a4("203.0.113.5"), 64, l4, &[]));
    // (frame, the protection that drops it, its reason)
    let attacks = [
        (
            to(tcp(1000, 80, 0x03), "192.0.2.99"),
            protect::INVALID_TCP_FLAGS,
            Reason::DropInvalidTcpFlags,
        ), // SYN+FIN
        (
            to(tcp(1000, 80, 0x06), "192.0.2.99"),
            protect::INVALID_TCP_FLAGS,
            Reason::DropInvalidTcpFlags,
        ), // SYN+RST
        (
            to(tcp(1000, 80, 0x00), "192.0.2.99"),
            protect::INVALID_TCP_FLAGS,
            Reason::DropInvalidTcpFlags,
        ), // null
        (
            to(tcp(1000, 80, 0x3f), "192.0.2.99"),
            protect::INVALID_TCP_FLAGS,
            Reason::DropInvalidTcpFlags,
        ), // all six
        (to(udp(4000, 1000), "203.0.113.5"), protect::LAND, Reason::DropLand),
        (to(tcp(1000, 80, 0x02), "203.0.113.5"), protect::LAND, Reason::DropLand),
        (to(udp(0, 53), "192.0.2.99"), protect::ZERO_PORTS, Reason::DropZeroPort),
        (
            to(udp(4000, 0), "192.0.2.99"),
            protect::ZERO_PORTS,
            Reason::DropZeroPort,
        ),
        (
            to(udp(11211, 4000), "192.0.2.99"),
            protect::REFLECTION,
            Reason::DropReflection,
        ),
        (
            to(tcp(1000, 0, 0x02), "192.0.2.99"),
            protect::ZERO_PORTS,
            Reason::DropZeroPort,
        ),
    ];
    for (frame, _, reason) in &attacks {
        run(&f, frame, XDP_DROP, *reason);
    }
    // Valid flag combinations pass the protection (and are encapsulated).
    for flags in [0x02, 0x12, 0x10, 0x18, 0x11, 0x14, 0x04, 0x01, 0x19] {
        let ok = packet::ip(a4("192.0.2.99"), a4("203.0.113.5"), 64, tcp(1000, 80, flags), &[]);
        encap_case(&f, &ok, Frame::default(), XDP_REDIRECT, [192, 0, 2, 10], None, 0);
    }
    // Each protection turned off alone lets its attacks through (to the
    // tunnel) and still drops the others'.
    for off in [
        protect::INVALID_TCP_FLAGS,
        protect::LAND,
        protect::ZERO_PORTS,
        protect::REFLECTION,
    ] {
        let mut spec = moat_lab::fixture::standard_spec();
        spec.protections = protect::ALL & !off;
        f.apply(spec);
        for (frame, which, reason) in &attacks {
            if *which == off {
                run(&f, frame, XDP_REDIRECT, Reason::ForwardEncap);
            } else {
                run(&f, frame, XDP_DROP, *reason);
            }
        }
    }
    let mut spec = moat_lab::fixture::standard_spec();
    spec.protections = 0;
    f.apply(spec);
    for (frame, _, _) in &attacks {
        run(&f, frame, XDP_REDIRECT, Reason::ForwardEncap);
    }
}

/// Operator rules, then the customer's firewall, then the reflection
/// protection, each first match deciding; every match counted per rule.
#[test]
fn mitigation_rules_firewalls_and_reflection_in_order() {
    use moat_dataplane::RuleAction::{Drop, Pass};
    use moat_lab::rules::spec_rule as rule;
    let mut f = Fixture::new("cases-rules");
    let mut spec = moat_lab::fixture::standard_spec();
    spec.mitigation = vec![
        rule("no-9999", "udp.dstport == 9999", Drop),
        rule("trusted", "ip.src in {192.0.2.77 2001:db8:77::/48}", Pass),
        rule("ttl-1", "ip.ttl == 1 and ip.version == 4", Drop),
    ];
    spec.customers[0].firewall = vec![
        rule("no-rdp", "tcp.dstport == 3389 and not ip.src in {192.0.2.0/28}", Drop),
        rule("resolver", "udp.srcport == 53 and ip.dst == 203.0.113.20", Pass),
        rule("bad-v6", "ip.src in {2001:db8:bad::/48}", Drop),
    ];
    f.apply(spec.clone());
    let tcp = |dport| L4::Tcp {
        sport: 40000,
        dport,
        syn: true,
    };
    let v4 = |src: &str, dst: &str, ttl, l4| packet::eth(Frame::default(), &packet::ip(a4(src), a4(dst), ttl, l4, &[]));
    let v6 = |src: &str, l4| {
        packet::eth(
            Frame::default(),
            &packet::ip(a6(src), a6("2001:db8:100::5"), 64, l4, &[]),
        )
    };
    let cases: Vec<(Vec<u8>, u32, Reason)> = vec![
        // The operator's drop, before its pass (first match decides).
        (
            v4("192.0.2.77", "203.0.113.5", 64, udp(4000, 9999)),
            XDP_DROP,
            Reason::DropMitigationRule,
        ),
        // The firewall: RDP blocked except from the admins.
        (
            v4("192.0.2.99", "203.0.113.5", 64, tcp(3389)),
            XDP_DROP,
            Reason::DropFirewall,
        ),
        (
            v4("192.0.2.5", "203.0.113.5", 64, tcp(3389)),
            XDP_REDIRECT,
            Reason::ForwardEncap,
        ),
        // Reflection: dropped unless the firewall or the operator allowed it.
        (
            v4("192.0.2.99", "203.0.113.5", 64, udp(53, 4000)),
            XDP_DROP,
            Reason::DropReflection,
        ),
        (
            v4("192.0.2.99", "203.0.113.20", 64, udp(53, 4000)),
            XDP_REDIRECT,
            Reason::ForwardEncap,
        ),
        (
            v4("192.0.2.77", "203.0.113.5", 64, udp(123, 4000)),
            XDP_REDIRECT,
            Reason::ForwardEncap,
        ),
        // An operator pass does not skip the customer's firewall.
        (
            v4("192.0.2.77", "203.0.113.5", 64, tcp(3389)),
            XDP_DROP,
            Reason::DropFirewall,
        ),
        // A firewall of one customer does not apply to another (globex's
        // tunnel leaves by the ingress link in this fixture).
        (
            v4("192.0.2.99", "203.0.113.200", 64, tcp(3389)),
            XDP_TX,
            Reason::ForwardEncap,
        ),
        // IPv6 through both sets.
        (v6("2001:db8:bad::1", udp(4000, 80)), XDP_DROP, Reason::DropFirewall),
        (v6("2001:db8:77::1", udp(53, 80)), XDP_REDIRECT, Reason::ForwardEncap),
        (v6("2001:db8:99::1", udp(53, 80)), XDP_DROP, Reason::DropReflection),
        (
            v6("2001:db8:99::1", udp(4000, 9999)),
            XDP_DROP,
            Reason::DropMitigationRule,
        ),
    ];
    for (frame, action, reason) in &cases {
        run(&f, frame, *action, *reason);
    }
    let counts: Vec<(Option<String>, String, u64)> =
        f.dp.rule_counters()
            .unwrap()
            .into_iter()
            .map(|c| (c.customer, c.rule, c.packets))
            .collect();
    let acme = || Some("acme".to_string());
    assert_eq!(
        counts,
        vec![
            (None, "no-9999".into(), 2),
            (None, "trusted".into(), 3),
            (None, "ttl-1".into(), 0),
            (acme(), "no-rdp".into(), 2),
            (acme(), "resolver".into(), 1),
            (acme(), "bad-v6".into(), 1),
        ]
    );
    // New rule sets: counters restart; a rule removed stops matching at once.
    spec.customers[0].firewall.remove(0);
    f.apply(spec.clone());
    run(&f, &cases[1].0, XDP_REDIRECT, Reason::ForwardEncap);
    assert!(f.dp.rule_counters().unwrap().iter().all(|c| c.packets == 0));
    // No rules at all: nothing is classified; reflection still applies.
    spec.mitigation.clear();
    spec.customers[0].firewall.clear();
    f.apply(spec.clone());
    assert!(f.dp.rule_counters().unwrap().is_empty());
    run(&f, &cases[0].0, XDP_REDIRECT, Reason::ForwardEncap);
    run(&f, &cases[3].0, XDP_DROP, Reason::DropReflection);
}

/// A rate-limited rule passes its burst (10 ms of its rate) at once and
/// drops the rest of a back-to-back run; each bucket is per rule, per
/// destination or per source as configured.
#[test]
fn rate_limit_rules_pass_a_burst_then_drop() {
    use moat_dataplane::{RateLimit, RatePer, RuleAction};
    let mut f = Fixture::new("cases-rate");
    let limit = |per| {
        RuleAction::RateLimit(RateLimit {
            pps: 1_000, // a burst of 10 packets
            per,
        })
    };
    let frame = |src: &str, dst: &str| {
        packet::eth(
            Frame::default(),
            &packet::ip(a4(src), a4(dst), 64, udp(4000, 5000), &[]),
        )
    };
    for (per, pairs, buckets) in [
        // Two destinations share the rule's bucket.
        (
            RatePer::Rule,
            [("192.0.2.99", "203.0.113.5"), ("192.0.2.99", "203.0.113.6")],
            1,
        ),
        (
            RatePer::DstIp,
            [("192.0.2.99", "203.0.113.5"), ("192.0.2.99", "203.0.113.6")],
            2,
        ),
        (
            RatePer::SrcIp,
            [("192.0.2.98", "203.0.113.5"), ("192.0.2.99", "203.0.113.5")],
            2,
        ),
    ] {
        let mut spec = moat_lab::fixture::standard_spec();
        spec.mitigation = vec![moat_lab::rules::spec_rule(
            "udp-5000",
            "udp.dstport == 5000",
            limit(per),
        )];
        f.apply(spec);
        let mut passed = 0;
        let start = std::time::Instant::now();
        for i in 0..60 {
            let (src, dst) = pairs[i % 2];
            let r = f.run(&frame(src, dst));
            if r.action == XDP_REDIRECT {
                passed += 1;
            } else {
                assert_eq!(r.action, XDP_DROP);
            }
        }
        // Per bucket: its first packet and the burst of 10, plus one
        // packet per millisecond the run took (1,000 pps).
        let ms = start.elapsed().as_millis() as usize + 1;
        let (least, most) = (buckets * 11, buckets * (11 + ms));
        assert!(
            (least..=most.min(59)).contains(&passed),
            "{per:?}: {passed} of 60 passed in {ms} ms, expected {least}..={most}"
        );
        let c = f.dp.rule_counters().unwrap();
        assert_eq!(c[0].packets, 60, "every packet matched the rule");
        let drops = f.dp.counters([], []).unwrap().packets(Reason::DropRateLimit);
        assert!(drops >= (60 - passed) as u64, "{per:?}: drops counted: {drops}");
    }
}

/// A flow slower than its limit loses nothing, though each CPU keeps its
/// own reading of the clock for the rate limiter and reads the clock
/// again only when the kernel's tick has moved or the reading has served
/// a number of packets: paced packets, far fewer than that number, must
/// each find the clock moved on. 100 pps allows one packet per 10 ms
/// (a burst of one); 40 packets come 25 ms apart.
#[test]
fn rate_limits_pass_a_flow_under_the_limit_whole() {
    use moat_dataplane::{RateLimit, RatePer, RuleAction};
    let mut f = Fixture::new("cases-rate-slow");
    let mut spec = moat_lab::fixture::standard_spec();
    spec.mitigation = vec![moat_lab::rules::spec_rule(
        "udp-5000",
        "udp.dstport == 5000",
        RuleAction::RateLimit(RateLimit {
            pps: 100,
            per: RatePer::Rule,
        }),
    )];
    f.apply(spec);
    let frame = packet::eth(
        Frame::default(),
        &packet::ip(a4("192.0.2.99"), a4("203.0.113.5"), 64, udp(4000, 5000), &[]),
    );
    for i in 0..40 {
        if i > 0 {
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        let r = f.run(&frame);
        assert_eq!(
            r.action, XDP_REDIRECT,
            "packet {i} of a 40 pps flow under a 100 pps limit"
        );
    }
    let drops = f.dp.counters([], []).unwrap().packets(Reason::DropRateLimit);
    assert_eq!(drops, 0, "no packet counted as over the limit");
}

/// A first fragment carries its datagram's L4 header: rules and the
/// reflection protection judge it by its ports, and when they drop it, the
/// datagram's later fragments (which carry no ports) are dropped for the
/// same reason. Other datagrams' later fragments are not. A first fragment
/// too short for its L4 header is dropped as truncated; a customer's allow
/// by source port lets a whole fragmented datagram through.
#[test]
fn fragmented_attacks_are_dropped_whole() {
    use moat_dataplane::RuleAction::Drop;
    let mut f = Fixture::new("cases-fragatk");
    let mut spec = moat_lab::fixture::standard_spec();
    spec.mitigation = vec![moat_lab::rules::spec_rule("memcached", "udp.srcport == 11211", Drop)];
    spec.customers[0].firewall = vec![moat_lab::rules::spec_rule(
        "resolver",
        "udp.srcport == 53 and ip.src == 198.51.100.9",
        moat_dataplane::RuleAction::Pass,
    )];
    f.apply(spec);
    let hits = |f: &Fixture| {
        f.dp.rule_counters()
            .unwrap()
            .iter()
            .find(|c| c.rule == "memcached")
            .map(|c| c.packets)
            .unwrap()
    };
    let dst = a4("203.0.113.5");
    let send = |ip: &[u8], action, reason| run(&f, &packet::eth(Frame::default(), ip), action, reason);
    let mut id = 100u16;
    for (sport, reason) in [(53u16, Reason::DropReflection), (11211, Reason::DropMitigationRule)] {
        id += 1;
        let whole = packet::ip(a4("198.51.100.7"), dst, 64, udp(sport, 4444), &vec![7u8; 3000]);
        let frags = packet::ipv4_fragments(&whole, 1400, id);
        assert_eq!(frags.len(), 3);
        let before = hits(&f);
        // A later fragment that arrives before its first is not known yet.
        let early = packet::ipv4_fragments(&whole, 1400, id + 1000);
        send(&early[2], XDP_REDIRECT, Reason::ForwardEncap);
        for fr in &frags {
            send(fr, XDP_DROP, reason);
        }
        // The rule matched the first fragment only; the later ones were
        // dropped as its datagram's.
        let want = u64::from(reason == Reason::DropMitigationRule);
        assert_eq!(hits(&f) - before, want, "rule counter after {sport}");
        // The same source's next datagram is judged on its own.
        let other = packet::ipv4_fragments(&whole, 1400, id + 2000);
        send(&other[1], XDP_REDIRECT, Reason::ForwardEncap);
    }
    // IPv6: the fragment header's identification names the datagram.
    let whole6 = packet::ip(
        a6("2001:db8:1::1"),
        a6("2001:db8:100::5"),
        64,
        udp(123, 4444),
        &vec![9u8; 3000],
    );
    let frags6 = packet::ipv6_fragments(&whole6, 1400, 0x0102_0304);
    for fr in &frags6 {
        send(fr, XDP_DROP, Reason::DropReflection);
    }
    let other6 = packet::ipv6_fragments(&whole6, 1400, 0x0102_0305);
    send(&other6[1], XDP_REDIRECT, Reason::ForwardEncap);
    // A TCP first fragment of 8 bytes holds less than the TCP header.
    let syn = packet::ip(
        a4("198.51.100.8"),
        dst,
        64,
        L4::Tcp {
            sport: 40000,
            dport: 80,
            syn: true,
        },
        &[1u8; 64],
    );
    let tiny = packet::ipv4_fragments(&syn, 8, 77);
    send(&tiny[0], XDP_DROP, Reason::DropTruncatedL4);
    // A customer's allow of the resolver's answers covers their first
    // fragments, and so the whole datagram passes.
    let answer = packet::ip(a4("198.51.100.9"), dst, 64, udp(53, 4444), &vec![5u8; 3000]);
    for fr in &packet::ipv4_fragments(&answer, 1400, 300) {
        send(fr, XDP_REDIRECT, Reason::ForwardEncap);
    }
}
