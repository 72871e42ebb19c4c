//! Real TCP through moat: an HTTP server at a customer site (behind a
//! userspace GRE endpoint: raw GRE socket + TUN), a client on the internet
//! host, moat's data plane attached natively on the node in between.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::atomic::Ordering,
    time::Duration,
};

use moat_common::Reason;
use moat_dataplane::{compile, nexthop::Resolver, Dataplane};
use moat_lab::topology::{Transit, SERVER, SITE_ROUTER};

const KEY: Option<u32> = Some(7);
const REQUESTS: usize = 20;
const BODY: usize = 20_000;

#[test]
fn http_over_tcp_through_the_tunnel() {
    let t = Transit::new("tcp");
    let mut dp = Dataplane::load().expect("load");
    let hop = {
        let _in = t.node.enter().unwrap();
        Resolver::new()
            .unwrap()
            .resolve(SITE_ROUTER)
            .unwrap()
            .next_hop()
            .expect("next hop")
    };
    dp.apply(&compile(&Transit::spec(KEY), &|_| Some(hop), None).unwrap())
        .unwrap();
    t.attach(&mut dp).unwrap();
    let site = t.start_site(KEY).expect("site GRE endpoint");

    let listener = {
        let _in = t.site.enter().unwrap();
        TcpListener::bind((SERVER, 80)).unwrap()
    };
    let server = std::thread::spawn(move || {
        let body = vec![b'm'; BODY];
        for _ in 0..REQUESTS {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut req = Vec::new();
            let mut chunk = [0u8; 512];
            while !req.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut chunk).unwrap();
                assert!(n > 0, "request cut short");
                req.extend_from_slice(&chunk[..n]);
            }
            assert!(req.starts_with(b"GET /"), "request arrived intact");
            write!(s, "HTTP/1.0 200 OK\r\nContent-Length: {BODY}\r\n\r\n").unwrap();
            s.write_all(&body).unwrap();
            // Graceful close: half-close, then wait for the client's FIN.
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let _ = s.read(&mut chunk);
        }
    });

    let _in = t.inet.enter().unwrap();
    for i in 0..REQUESTS {
        let mut c = TcpStream::connect_timeout(&SocketAddr::from((SERVER, 80)), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(c, "GET /{i} HTTP/1.0\r\n\r\n").unwrap();
        let mut resp = Vec::new();
        if let Err(e) = c.read_to_end(&mut resp) {
            let k = dp.counters([0], [0]).unwrap();
            let moved: Vec<_> = k
                .reasons
                .iter()
                .filter(|(_, v)| v.packets > 0)
                .map(|(r, v)| (r.name(), v.packets))
                .collect();
            panic!(
                "response {i}: {e}; got {} bytes; counters {moved:?}; site {} enc {} dec",
                resp.len(),
                site.counters.encapsulated.load(Ordering::Relaxed),
                site.counters.decapsulated.load(Ordering::Relaxed)
            );
        }
        let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {BODY}\r\n\r\n");
        assert!(resp.starts_with(head.as_bytes()), "response {i} header");
        assert_eq!(resp.len(), head.len() + BODY, "response {i} complete");
    }
    server.join().expect("server");

    let c = dp.counters([0], [0]).unwrap();
    assert!(c.packets(Reason::ForwardEncap) >= (REQUESTS * 3) as u64);
    assert!(
        c.packets(Reason::ForwardDecap) >= (REQUESTS * (BODY / 1432)) as u64,
        "responses came out of the tunnel"
    );
    assert_eq!(
        c.packets(Reason::DropGreMalformed),
        0,
        "no fragmented GRE from the site"
    );
    assert_eq!(
        c.packets(Reason::DropMtuExceeded),
        0,
        "MSS kept every segment within the tunnel MTU"
    );
    assert_eq!(c.packets(Reason::DropSpoofedSource), 0);
    // The site endpoint's thread may still be moving the last packets:
    // give it up to a second to agree with moat's tunnel counters.
    let agree = || {
        let k = dp.counters([], [0]).unwrap();
        (
            (
                site.counters.decapsulated.load(Ordering::Relaxed),
                site.counters.encapsulated.load(Ordering::Relaxed),
            ),
            (k.tunnels[&0].tx.packets, k.tunnels[&0].rx.packets),
        )
    };
    let mut seen = agree();
    for _ in 0..100 {
        if seen.0 == seen.1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        seen = agree();
    }
    assert_eq!(
        seen.0, seen.1,
        "site endpoint (decapsulated, encapsulated) vs tunnel (tx, rx)"
    );
    drop(_in);
    dp.detach_all().unwrap();
}
