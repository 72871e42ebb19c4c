//! Live traffic through namespaces: internet host -> veth -> node (moat
//! attached natively) -> veth -> customer site, where a raw GRE socket
//! receives the encapsulated packets; and GRE sent back from the site
//! reaches the internet host decapsulated. Bounded: a fixed number of
//! packets each way, with receive timeouts.

use std::{
    net::{SocketAddrV4, UdpSocket},
    time::Duration,
};

use etherparse::{Ipv4HeaderSlice, SlicedPacket, TransportSlice};
use moat_common::Reason;
use moat_dataplane::{
    compile,
    nexthop::{Resolution, Resolver},
    Dataplane,
};
use moat_lab::{
    gre::{self, RawGre},
    packet::{self, L4},
    topology::{Transit, ENDPOINT, INET_HOST, SERVER, SITE_ROUTER},
};

const N: usize = 200;
const KEY: Option<u32> = Some(0x00c0_ffee);

#[test]
fn traffic_crosses_the_tunnel_both_ways() {
    let t = Transit::new("ns");
    let mut dp = Dataplane::load().expect("load");
    // The tunnel's next hop, as the kernel's tables in the node namespace say.
    let hop = {
        let _in = t.node.enter().unwrap();
        Resolver::new().unwrap().resolve(SITE_ROUTER).unwrap()
    };
    assert_eq!(hop, Resolution::Ready(t.site_nexthop));
    let compiled = compile(&Transit::spec(KEY), &|_| hop.next_hop(), None).expect("compile");
    dp.apply(&compiled).expect("apply");
    t.attach(&mut dp).expect("attach natively to veth");

    let site_gre = {
        let _in = t.site.enter().unwrap();
        RawGre::open().expect("raw GRE socket")
    };
    let (client, listener) = {
        let _in = t.inet.enter().unwrap();
        let c = UdpSocket::bind("198.51.100.100:0").unwrap();
        let l = UdpSocket::bind("198.51.100.100:7777").unwrap();
        l.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        (c, l)
    };

    // Internet -> customer: every datagram arrives in the tunnel, intact.
    for i in 0..N {
        let payload = format!("request {i}");
        client
            .send_to(payload.as_bytes(), SocketAddrV4::new(SERVER, 9999))
            .unwrap();
        let pkt = loop {
            let p = site_gre
                .recv(Duration::from_secs(2))
                .unwrap()
                .unwrap_or_else(|| panic!("packet {i} never reached the site"));
            // The raw socket may also see unrelated GRE; ours comes from the endpoint.
            if p[12..16] == ENDPOINT.octets() {
                break p;
            }
        };
        let outer = Ipv4HeaderSlice::from_slice(&pkt).expect("outer IPv4");
        assert_eq!(outer.destination_addr(), SITE_ROUTER);
        assert_eq!(outer.ttl(), 64);
        let (_, key, inner) = gre::open(&pkt).expect("GRE");
        assert_eq!(key, KEY);
        let sliced = SlicedPacket::from_ip(inner).expect("inner packet");
        let Some(TransportSlice::Udp(udp)) = sliced.transport else {
            panic!("inner UDP expected")
        };
        assert_eq!(udp.destination_port(), 9999);
        assert_eq!(udp.payload(), payload.as_bytes());
        let ip = Ipv4HeaderSlice::from_slice(inner).unwrap();
        assert_eq!(ip.ttl(), 63, "one hop through moat");
        assert_eq!(ip.destination_addr(), SERVER);
    }

    // Customer -> internet: GRE from the site router is decapsulated and
    // forwarded to the internet host.
    for i in 0..N {
        let payload = format!("response {i}");
        let inner = packet::ip(
            SERVER.into(),
            INET_HOST.into(),
            64,
            L4::Udp {
                sport: 9999,
                dport: 7777,
            },
            payload.as_bytes(),
        );
        site_gre.send_to(ENDPOINT, &gre::encapsulate(KEY, &inner)).unwrap();
        let mut buf = [0u8; 2048];
        let (n, from) = listener
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("response {i} never arrived: {e}"));
        assert_eq!(&buf[..n], payload.as_bytes());
        assert_eq!(from, std::net::SocketAddr::V4(SocketAddrV4::new(SERVER, 9999)));
    }
    // A spoofed source from the site is dropped, not delivered.
    let spoofed = packet::ip(
        [192, 0, 2, 77].into(),
        INET_HOST.into(),
        64,
        L4::Udp { sport: 1, dport: 7777 },
        b"spoofed",
    );
    site_gre.send_to(ENDPOINT, &gre::encapsulate(KEY, &spoofed)).unwrap();
    let mut buf = [0u8; 64];
    listener.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(listener.recv_from(&mut buf).is_err(), "spoofed packet delivered");

    let c = dp.counters([0], [0]).unwrap();
    assert_eq!(c.tunnels[&0].tx.packets, N as u64, "encapsulated into the tunnel");
    assert_eq!(c.tunnels[&0].rx.packets, N as u64 + 1, "accepted from the tunnel");
    assert_eq!(c.packets(Reason::ForwardEncap), N as u64);
    assert_eq!(c.packets(Reason::ForwardDecap), N as u64);
    assert_eq!(c.packets(Reason::DropSpoofedSource), 1);
    assert_eq!(c.customers[&0].in_forwarded.packets, N as u64);
    assert_eq!(c.customers[&0].out_forwarded.packets, N as u64);
    dp.detach_all().expect("detach");
}
