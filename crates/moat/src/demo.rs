//! `moat demo`: the data plane on a throw-away topology of network
//! namespaces (see moat_lab::topology). Traffic stays inside namespaces
//! created here, uses documentation addresses only, is bounded in count and
//! time, and everything is removed on exit, also on Ctrl-C.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use moat_common::Reason;
use moat_dataplane::{compile, nexthop::Resolver, Dataplane};
use moat_lab::{
    gre::{self, RawGre},
    packet::{self, L4},
    topology::{Transit, ENDPOINT, INET_HOST, SERVER, SITE_ROUTER},
};

const KEY: u32 = 42;
const BODY: usize = 4096;
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn stopping() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

pub fn run(requests: u32) -> Result<()> {
    // SAFETY: plain syscall without arguments.
    if unsafe { libc::geteuid() } != 0 {
        bail!("moat demo needs root (it creates network namespaces and loads XDP programs)");
    }
    // SAFETY: installing an async-signal-safe handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let deadline = Instant::now() + Duration::from_secs(60);

    println!("moat demo: data plane only (the daemon arrives with the next release step)");
    println!();
    println!("  internet host 198.51.100.100 ── node: moat XDP (native) ── customer site: router 192.0.2.10");
    println!("  customer acme protects 203.0.113.0/24; tunnel acme-site: GRE 198.51.100.1 -> 192.0.2.10, key {KEY}");
    println!();
    let t = Transit::new("demo");
    let mut dp = Dataplane::load().context("loading the XDP data plane")?;
    let hop = {
        let _in = t.node.enter()?;
        Resolver::new()?.resolve(SITE_ROUTER)?
    };
    let Some(nh) = hop.next_hop() else {
        bail!("the node cannot resolve the tunnel's next hop: {hop:?}");
    };
    println!(
        "next hop of acme-site from the node's routing and neighbour tables: ifindex {}, MAC {}, link MTU {}",
        nh.ifindex,
        nh.dmac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"),
        nh.link_mtu
    );
    let spec = Transit::spec(Some(KEY));
    let compiled = compile(&spec, &|_| Some(nh), dp.applied()).context("compiling the configuration")?;
    let report = dp.apply(&compiled).context("applying the configuration")?;
    println!("applied: {} map entries", report.added);
    t.attach(&mut dp).context("attaching to the node's interfaces")?;
    println!("attached: n-inet, n-site (native XDP)");
    println!();

    // The customer site: a userspace GRE endpoint (raw GRE socket + TUN,
    // inner MTU leaving room for outer IPv4 + keyed GRE) and an HTTP server.
    let endpoint = t.start_site(Some(KEY)).context("the site's GRE endpoint")?;
    let listener = {
        let _in = t.site.enter()?;
        TcpListener::bind((SERVER, 80)).context("HTTP server at the site")?
    };
    listener.set_nonblocking(true)?;
    let server = std::thread::spawn(move || serve(listener, requests, deadline));

    let (mut answered, mut bytes) = (0u32, 0usize);
    {
        let _in = t.inet.enter()?;
        for i in 0..requests {
            stopping()?;
            if Instant::now() > deadline {
                bail!("took longer than 60 s");
            }
            match get(i) {
                Ok(n) => {
                    answered += 1;
                    bytes += n;
                }
                Err(e) => println!("  request {i} failed: {e}"),
            }
        }
    }
    let served = server
        .join()
        .map_err(|_| anyhow::anyhow!("the HTTP server thread panicked"))?;
    println!(
        "{requests} HTTP requests from the internet host to http://203.0.113.5/ (TCP through moat and the tunnel)"
    );
    println!("  {served} served at the site, {answered} complete responses ({bytes} bytes) back at the internet host");
    println!(
        "  site GRE endpoint: {} packets decapsulated from moat, {} encapsulated back",
        endpoint.counters.decapsulated.load(Ordering::Relaxed),
        endpoint.counters.encapsulated.load(Ordering::Relaxed)
    );

    let site = {
        let _in = t.site.enter()?;
        RawGre::open().context("raw GRE socket at the site")?
    };
    let other = {
        let _in = t.inet.enter()?;
        UdpSocket::bind("198.51.100.100:0")?
    };

    // The site tries to send with a source it does not own.
    for _ in 0..10 {
        let spoofed = packet::ip(
            [192, 0, 2, 66].into(),
            INET_HOST.into(),
            64,
            L4::Udp {
                sport: 80,
                dport: other.local_addr()?.port(),
            },
            b"spoofed",
        );
        site.send_to(ENDPOINT, &gre::encapsulate(Some(KEY), &spoofed))?;
    }
    other.set_read_timeout(Some(Duration::from_millis(300)))?;
    let mut buf = [0u8; 64];
    let leaked = other.recv_from(&mut buf).is_ok();
    println!(
        "10 packets from the site with a spoofed source (192.0.2.66): {}",
        if leaked { "DELIVERED (wrong)" } else { "all dropped" }
    );

    // GRE from a host that is not a configured tunnel endpoint.
    let stranger = {
        let _in = t.inet.enter()?;
        RawGre::open().context("raw GRE socket on the internet host")?
    };
    let inner = packet::ip(
        SERVER.into(),
        INET_HOST.into(),
        64,
        L4::Udp { sport: 80, dport: 9 },
        b"x",
    );
    for _ in 0..5 {
        stranger.send_to(ENDPOINT, &gre::encapsulate(Some(KEY), &inner))?;
    }
    std::thread::sleep(Duration::from_millis(100));
    println!("5 GRE packets to the node from 198.51.100.100, which is not a tunnel of any customer: see drop_gre_unknown_tunnel");
    println!();
    stopping()?;

    let c = dp.counters([0], [0])?;
    let s = c.customers[&0];
    let tun = c.tunnels[&0];
    println!("counters read back from the data plane:");
    println!(
        "  customer acme   in: received {} forwarded {} dropped {}   out: received {} forwarded {} dropped {}",
        s.in_received.packets,
        s.in_forwarded.packets,
        s.in_dropped.packets,
        s.out_received.packets,
        s.out_forwarded.packets,
        s.out_dropped.packets
    );
    println!(
        "  tunnel acme-site  tx {} packets / {} bytes, rx {} packets / {} bytes",
        tun.tx.packets, tun.tx.bytes, tun.rx.packets, tun.rx.bytes
    );
    println!("  by reason (packets):");
    for (r, n) in c.reasons.iter().filter(|(_, n)| n.packets > 0) {
        println!("    {:<28} {}", r.name(), n.packets);
    }
    dp.detach_all()?;
    drop(t);
    println!();
    println!("cleaned up: namespaces removed, programs detached");
    drop(endpoint);
    let ok = served == requests
        && answered == requests
        && !leaked
        && c.packets(Reason::DropSpoofedSource) == 10
        && c.packets(Reason::DropGreUnknownTunnel) == 5;
    if !ok {
        bail!("the demo did not go as expected (see above)");
    }
    Ok(())
}

/// Serves `count` HTTP/1.0 requests (or until the deadline), closing each
/// connection gracefully. Returns how many were served.
fn serve(listener: TcpListener, count: u32, deadline: Instant) -> u32 {
    let body = vec![b'm'; BODY];
    let mut served = 0;
    while served < count && Instant::now() < deadline && !STOP.load(Ordering::SeqCst) {
        let Ok((mut s, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        };
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut req = Vec::new();
        let mut chunk = [0u8; 512];
        while !req.ends_with(b"\r\n\r\n") {
            match s.read(&mut chunk) {
                Ok(n) if n > 0 => req.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
        if !req.starts_with(b"GET /") {
            continue;
        }
        let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {BODY}\r\n\r\n");
        if s.write_all(head.as_bytes()).and_then(|_| s.write_all(&body)).is_ok() {
            served += 1;
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
        let _ = s.read(&mut chunk);
    }
    served
}

/// One HTTP/1.0 GET to the server; the number of body bytes received.
fn get(i: u32) -> Result<usize> {
    let mut c = TcpStream::connect_timeout(&SocketAddr::from((SERVER, 80)), Duration::from_secs(2))?;
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(c, "GET /{i} HTTP/1.0\r\nHost: 203.0.113.5\r\n\r\n")?;
    let mut resp = Vec::new();
    c.read_to_end(&mut resp)?;
    let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {BODY}\r\n\r\n");
    if !resp.starts_with(head.as_bytes()) || resp.len() != head.len() + BODY {
        bail!("incomplete response ({} bytes)", resp.len());
    }
    Ok(BODY)
}
