//! The flood generator, in two namespaces joined by a veth pair: the
//! generator's side transmits, moat's data plane runs on the other.
//! Checked: every frame arrives (counted by moat under the right reason),
//! frames vary as asked (sources inside the random bits, ports above 1023),
//! and their checksums are right (read with etherparse from a capture).
//! Bounded: fixed counts and a time limit per run; the namespaces go at the
//! end.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use etherparse::{Ipv4HeaderSlice, SlicedPacket, TransportSlice};
use moat_common::{protect, Reason};
use moat_dataplane::{compile, flood::Flood, Dataplane, XdpMode};
use moat_lab::{
    flood::{self, Target},
    netns::{veth, NetNs},
};

/// Captures IPv4 frames arriving on `dev` in the calling thread's
/// namespace (the kernel's own IPv6 neighbour and multicast chatter on a
/// new link is not what the tests look at).
struct Capture(OwnedFd);

impl Capture {
    fn open(ifindex: u32) -> Capture {
        let proto = (libc::ETH_P_IP as u16).to_be();
        // SAFETY: plain socket(2) call.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) };
        assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
        // SAFETY: the kernel returned a new descriptor we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_ll is valid.
        let mut a: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        a.sll_family = libc::AF_PACKET as u16;
        a.sll_protocol = proto;
        a.sll_ifindex = ifindex as i32;
        // SAFETY: bind(2) with a valid sockaddr_ll of the stated size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&a as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        moat_lab::sock::force_receive_buffer(fd.as_fd(), 64 << 20);
        Capture(fd)
    }

    /// Frames until `n` or until none arrives for 300 ms.
    fn take(&self, n: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 4096];
        while out.len() < n {
            let mut p = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut p, 1, 300) } <= 0 {
                break;
            }
            // SAFETY: an all-zero sockaddr_ll is valid.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: recvfrom(2) into our own buffer and address.
            let len = unsafe {
                libc::recvfrom(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut from_len,
                )
            };
            // Only arrivals: the sink's own transmissions are not the flood.
            if len > 0 && from.sll_pkttype != libc::PACKET_OUTGOING {
                out.push(buf[..len as usize].to_vec());
            }
        }
        out
    }
}

struct Pair {
    gen: NetNs,
    sink: NetNs,
    dp: Dataplane,
    target: Target,
    g0: u32,
}

fn pair(tag: &str) -> Pair {
    let gen = NetNs::new(&format!("{tag}-gen")).expect("namespace");
    let sink = NetNs::new(&format!("{tag}-sink")).expect("namespace");
    veth(&gen, "g0", &sink, "s0");
    let mut dp = Dataplane::load().expect("load");
    let mut spec = moat_lab::fixture::standard_spec();
    spec.protections = protect::ALL;
    let compiled = compile(&spec, &|_| None, None).expect("compile");
    dp.apply(&compiled).expect("apply");
    {
        let _in = sink.enter().expect("enter sink");
        dp.attach("s0", XdpMode::Driver).expect("attach natively");
    }
    let target = Target::acme(&gen, "g0", &sink, "s0");
    let g0 = gen.ifindex("g0");
    Pair {
        gen,
        sink,
        dp,
        target,
        g0,
    }
}

fn send(p: &Pair, flood: &mut Flood, t: &moat_dataplane::flood::Template, n: u64) -> moat_dataplane::flood::Report {
    let _in = p.gen.enter().expect("enter generator namespace");
    flood.run(t, p.g0, n, Duration::from_secs(20)).expect("flood")
}

/// Waits until `reason` moved by `n` (or 2 s); returns how far it moved.
fn counted(p: &Pair, reason: Reason, before: u64, n: u64) -> u64 {
    let started = Instant::now();
    loop {
        let now = p.dp.counters([], []).expect("counters").packets(reason) - before;
        if now >= n || started.elapsed() > Duration::from_secs(2) {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_attack_arrives_and_is_counted_under_its_reason() {
    let p = pair("flood");
    let mut flood = Flood::load().expect("load the generator");
    let t = p.target;
    // (template, what moat does with it)
    let attacks = [
        (flood::tcp(&t, 80, 0x03), Reason::DropInvalidTcpFlags),
        (flood::tcp(&t, 80, 0x00), Reason::DropInvalidTcpFlags),
        (flood::udp(&t, 0, 64), Reason::DropZeroPort),
        (
            flood::udp(
                &Target {
                    src: t.dst,
                    random_bits: 0,
                    ..t
                },
                53,
                64,
            ),
            Reason::DropLand,
        ),
        // Valid-looking attacks reach routing; the tunnel's next hop is
        // unresolved in this pair, so they end there.
        (flood::udp(&t, 53, 64), Reason::DropNoNextHop),
        (flood::tcp(&t, 443, 0x02), Reason::DropNoNextHop),
        (flood::tcp(&t, 443, 0x10), Reason::DropNoNextHop),
        (flood::reflection(&t, 11211, 1000), Reason::DropReflection),
        (flood::fragments(&t, 200), Reason::DropNoNextHop),
    ];
    for (template, reason) in &attacks {
        let before = p.dp.counters([], []).expect("counters").packets(*reason);
        let report = send(&p, &mut flood, template, 5_000);
        assert_eq!(report.sent, 5_000);
        let n = counted(&p, *reason, before, 5_000);
        // A frame the veth ring had no room for never reaches moat (rare,
        // with other tests flooding on the same CPUs); none is counted twice.
        assert!((4_950..=5_000).contains(&n), "{reason:?}: {n} of 5,000 counted");
    }
}

#[test]
fn frames_vary_as_asked_with_right_checksums() {
    let p = pair("fvary");
    let mut flood = Flood::load().expect("load the generator");
    // To an address moat does not protect: passed to the sink's kernel,
    // where a packet socket sees it.
    let t = Target {
        dst: Ipv4Addr::new(198, 51, 100, 9),
        ..p.target
    };
    let capture = {
        let _in = p.sink.enter().expect("enter sink");
        Capture::open(p.sink.ifindex("s0"))
    };
    for (template, tcp) in [(flood::tcp(&t, 80, 0x02), true), (flood::udp(&t, 53, 32), false)] {
        send(&p, &mut flood, &template, 2_000);
        let frames = capture.take(2_000);
        assert!(frames.len() >= 1_900, "captured {} of 2,000", frames.len());
        let (mut sources, mut ports) = (BTreeSet::new(), BTreeSet::new());
        for f in &frames {
            assert_eq!(
                (&f[..6], &f[6..12]),
                (&t.frame.dst[..], &t.frame.src[..]),
                "the Ethernet addresses the generator restores"
            );
            let ip = Ipv4HeaderSlice::from_slice(&f[14..]).expect("IPv4");
            let h = ip.to_header();
            assert_eq!(h.header_checksum, h.calc_header_checksum(), "IPv4 checksum");
            assert_eq!(h.time_to_live, 64, "the TTL the generator restores");
            let src = ip.source_addr();
            assert_eq!(
                u32::from(src) >> 16,
                u32::from(t.src) >> 16,
                "source outside the random bits"
            );
            assert_eq!(ip.destination_addr(), t.dst);
            sources.insert(src);
            let s = SlicedPacket::from_ethernet(f).expect("parse");
            match s.transport {
                Some(TransportSlice::Tcp(tcp_h)) => {
                    assert!(tcp);
                    let want = tcp_h
                        .to_header()
                        .calc_checksum_ipv4(&h, tcp_h.payload())
                        .expect("checksum");
                    assert_eq!(tcp_h.checksum(), want, "TCP checksum");
                    assert!(tcp_h.syn() && !tcp_h.ack());
                    assert!(tcp_h.source_port() >= 1024);
                    assert_eq!(tcp_h.destination_port(), 80);
                    ports.insert(tcp_h.source_port());
                }
                Some(TransportSlice::Udp(u)) => {
                    assert!(!tcp);
                    assert_eq!(u.checksum(), 0, "UDP without checksum");
                    assert!(u.source_port() >= 1024);
                    assert_eq!(u.destination_port(), 53);
                    ports.insert(u.source_port());
                }
                other => panic!("unexpected transport {other:?}"),
            }
        }
        // Random sources over 16 bits and random ports: nearly all distinct.
        let n = frames.len();
        assert!(sources.len() > n * 9 / 10, "{} sources in {n} frames", sources.len());
        assert!(ports.len() > n * 8 / 10, "{} ports in {n} frames", ports.len());
    }
}

/// The rate reached, printed (not asserted: timing belongs to benchmarks).
#[test]
fn a_million_frames_within_the_time_limit() {
    let p = pair("frate");
    let mut flood = Flood::load().expect("load the generator");
    let template = flood::tcp(&p.target, 80, 0x03);
    let before =
        p.dp.counters([], [])
            .expect("counters")
            .packets(Reason::DropInvalidTcpFlags);
    let report = send(&p, &mut flood, &template, 1_000_000);
    let n = counted(&p, Reason::DropInvalidTcpFlags, before, report.sent);
    println!(
        "flood: {} frames in {:.2} s ({:.2} s sending, {} calls), {:.2} Mpps from one core; {n} counted by moat",
        report.sent,
        report.elapsed.as_secs_f64(),
        report.busy.as_secs_f64(),
        report.calls,
        report.rate() / 1e6
    );
    assert_eq!(report.sent, 1_000_000);
    // Frames the veth could not queue are lost at the transmit side: most arrive.
    assert!(n >= report.sent * 9 / 10, "{n} of {} arrived", report.sent);
}

/// A run bounded by time fills it with a few long system calls (each call's
/// setup sends nothing), ends near its limit, and reports the time frames
/// flowed apart from the time the calls took.
#[test]
fn a_time_bounded_run_makes_few_long_calls_and_ends_near_its_limit() {
    let p = pair("fcalls");
    let mut flood = Flood::load().expect("load the generator");
    let template = flood::tcp(&p.target, 80, 0x03);
    let limit = Duration::from_secs(1);
    let report = {
        let _in = p.gen.enter().expect("enter generator namespace");
        flood.run(&template, p.g0, u64::MAX, limit).expect("flood")
    };
    println!(
        "{} frames in {} calls: {:.3} s, {:.3} s of it sending",
        report.sent,
        report.calls,
        report.elapsed.as_secs_f64(),
        report.busy.as_secs_f64()
    );
    // A probe, then calls sized to what is left.
    assert!((2..=5).contains(&report.calls), "{} calls", report.calls);
    assert!(
        report.elapsed > limit * 8 / 10 && report.elapsed < limit * 3 / 2,
        "a run of {:?} for a limit of {limit:?}",
        report.elapsed
    );
    assert!(
        report.busy < report.elapsed && report.busy > report.elapsed / 2,
        "sending {:?} of {:?}",
        report.busy,
        report.elapsed
    );
}
