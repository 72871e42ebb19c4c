//! `moat demo`: the daemon on a throw-away topology of network namespaces
//! (moat_lab::edge: an internet host, an attacker, the moat node, two
//! customer sites with userspace GRE endpoints), run with the bundled
//! configuration (demo.yaml). Traffic stays inside namespaces created here,
//! uses documentation addresses only, is bounded in count and time, and
//! everything is removed on exit, also on Ctrl-C.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use moat_dataplane::flood::Flood;
use moat_lab::{
    daemon::Daemon,
    edge::{Edge, ATTACKER, ENDPOINT, INET_HOST},
    flood::{self, Target},
    gre::{self, RawGre},
    http,
    packet::{self, Frame, L4},
};

/// The bundled configuration.
pub const CONFIG: &str = include_str!("demo.yaml");
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

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
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
    let started = Instant::now();
    println!("moat demo");
    println!();
    println!(
        "  internet host 198.51.100.100 ─┐                      ┌─ acme site: router 192.0.2.10, server 203.0.113.5"
    );
    println!("                                ├─ node (moat, XDP) ───┤");
    println!("  attacker      198.51.100.130 ─┘  endpoint 198.51.100.1 └─ globex site: router 192.0.2.26, server 203.0.113.133");
    println!();
    let edge = Edge::new("demo").context("building the namespace topology")?;
    let exe = std::env::current_exe().context("locating the moat binary")?;
    let mut daemon = Daemon::start(&exe, &edge.node, CONFIG).context("starting moat run")?;
    println!("moat run -c demo.yaml (in the node's namespace):");
    print!("{}", indent(&daemon.log()));
    println!();
    let result = scenes(&edge, &mut daemon, requests);
    let down = daemon.down().context("moat down")?;
    println!("moat down: {}", String::from_utf8_lossy(&down.stdout).trim());
    drop(edge);
    println!(
        "cleaned up: namespaces removed ({:.1} s in all)",
        started.elapsed().as_secs_f64()
    );
    result
}

/// Scene 3: the attacker floods acme's server with invalid TCP and
/// memcached reflection from 65,536 spoofed sources (the flood generator)
/// while the internet host keeps making HTTP requests; moat drops the flood
/// at its built-in protection and the operator's rule.
fn attack_scene(edge: &Edge, requests: u32) -> Result<bool> {
    println!(
        "3. an attack: SYN+FIN and memcached reflection from 65,536 spoofed sources at acme's server, while HTTP continues"
    );
    stopping()?;
    let counted = |text: &str| {
        (
            http::metric(text, "moat_reason_packets_total{reason=\"drop_invalid_tcp_flags\"}").unwrap_or(0),
            http::metric(
                text,
                "moat_rule_matched_packets_total{set=\"mitigation\",customer=\"\",rule=\"memcached\"}",
            )
            .unwrap_or(0),
        )
    };
    let before = counted(&http::scrape_metrics(&edge.node)?);
    let target = Target {
        frame: Frame {
            src: edge.attacker.mac("a0"),
            dst: edge.node.mac("n-atk"),
            vlan: None,
        },
        src: std::net::Ipv4Addr::new(198, 18, 0, 0),
        random_bits: 16,
        dst: edge.sites[0].server,
    };
    let templates = [flood::tcp(&target, 80, 0x03), flood::reflection(&target, 11211, 64)];
    let ifindex = edge.attacker.ifindex("a0");
    let flooding = AtomicBool::new(true);
    let (answered, sent, took) = std::thread::scope(|scope| -> Result<(u32, u64, Duration)> {
        let attacker = scope.spawn(|| -> Result<(u64, Duration)> {
            let _in = edge.attacker.enter()?;
            let mut generator = Flood::load().context("loading the flood generator")?;
            let (mut sent, started, mut round) = (0u64, Instant::now(), 0);
            // Bounded: until the requests are done, at most 60 s.
            while flooding.load(Ordering::Relaxed)
                && started.elapsed() < Duration::from_secs(60)
                && !STOP.load(Ordering::SeqCst)
            {
                sent += generator
                    .run(&templates[round % 2], ifindex, 1 << 18, Duration::from_secs(2))?
                    .sent;
                round += 1;
            }
            Ok((sent, started.elapsed()))
        });
        std::thread::sleep(Duration::from_millis(300));
        let answered = http::get_many(&edge.inet, edge.sites[0].server, requests);
        flooding.store(false, Ordering::Relaxed);
        let (sent, took) = attacker
            .join()
            .map_err(|_| anyhow::anyhow!("the attacker thread panicked"))??;
        Ok((answered, sent, took))
    })?;
    std::thread::sleep(Duration::from_millis(200));
    let after = counted(&http::scrape_metrics(&edge.node)?);
    let (invalid, memcached) = (after.0 - before.0, after.1 - before.1);
    println!(
        "   {ATTACKER} sent {sent} frames in {:.1} s ({:.2} Mpps from one core); moat dropped {invalid} as invalid TCP \
         flags and {memcached} by the rule 'memcached'",
        took.as_secs_f64(),
        sent as f64 / took.as_secs_f64().max(1e-9) / 1e6
    );
    println!("   meanwhile: {answered}/{requests} complete HTTP answers from acme's server");
    Ok(answered == requests && invalid > 0 && memcached > 0)
}

fn scenes(edge: &Edge, daemon: &mut Daemon, requests: u32) -> Result<()> {
    let keys = [Some(42), Some(7)];
    let acme = edge
        .start_site_multi(0, &[keys[0], Some(43)], keys[0])
        .context("acme's GRE endpoint")?;
    let _globex = edge.start_site(1, keys[1]).context("globex's GRE endpoint")?;
    let stop = Arc::new(AtomicBool::new(false));
    let servers = [
        http::serve(&edge.sites[0].ns, edge.sites[0].server, stop.clone())?,
        http::serve(&edge.sites[1].ns, edge.sites[1].server, stop.clone())?,
    ];
    let mut ok = true;

    println!("1. legitimate traffic: HTTP from the internet host to each customer's server (TCP through moat, GRE to the site, and back)");
    for (i, name) in ["acme", "globex"].iter().enumerate() {
        stopping()?;
        let answered = http::get_many(&edge.inet, edge.sites[i].server, requests);
        println!(
            "   {name}: {answered}/{requests} complete answers from http://{}/",
            edge.sites[i].server
        );
        ok &= answered == requests;
    }
    println!();

    println!("2. the attacker: GRE claiming to be a tunnel (from a host that is none), and a site spoofing its source");
    let stranger = {
        let _in = edge.attacker.enter()?;
        RawGre::open().context("raw GRE socket on the attacker")?
    };
    let inner = packet::ip(
        edge.sites[0].server.into(),
        INET_HOST.into(),
        64,
        L4::Udp { sport: 80, dport: 9 },
        b"x",
    );
    for _ in 0..50 {
        stranger.send_to(ENDPOINT, &gre::encapsulate(Some(42), &inner))?;
    }
    println!("   {ATTACKER} sent 50 GRE packets with acme's key to the tunnel endpoint");
    let site = {
        let _in = edge.sites[0].ns.enter()?;
        RawGre::open().context("raw GRE socket at the site")?
    };
    let victim = {
        let _in = edge.inet.enter()?;
        UdpSocket::bind("198.51.100.100:0")?
    };
    for _ in 0..10 {
        let spoofed = packet::ip(
            [192, 0, 2, 66].into(),
            INET_HOST.into(),
            64,
            L4::Udp {
                sport: 80,
                dport: victim.local_addr()?.port(),
            },
            b"spoofed",
        );
        site.send_to(ENDPOINT, &gre::encapsulate(Some(42), &spoofed))?;
    }
    victim.set_read_timeout(Some(Duration::from_millis(300)))?;
    let leaked = victim.recv_from(&mut [0u8; 64]).is_ok();
    println!(
        "   acme's site sent 10 packets with a source it does not own (192.0.2.66): {}",
        if leaked { "DELIVERED (wrong)" } else { "none delivered" }
    );
    ok &= !leaked;
    println!();

    ok &= attack_scene(edge, requests)?;
    println!();

    println!("4. a bad configuration: the operator reloads a file with an overlap; moat rejects it and keeps running");
    daemon.write_config(&CONFIG.replace("203.0.113.128/25]", "203.0.113.64/26]"))?;
    let out = daemon.cli(&["reload"])?;
    print!("{}", indent(&String::from_utf8_lossy(&out.stderr)));
    daemon.write_config(CONFIG)?;
    let answered = http::get_many(&edge.inet, edge.sites[0].server, 10);
    println!("   acme still answers: {answered}/10");
    ok &= !out.status.success() && answered == 10;
    println!();

    println!("5. a daemon restart under traffic: 1,000 packets/s to acme while moat run stops and starts again");
    let receiver = {
        let _in = edge.sites[0].ns.enter()?;
        UdpSocket::bind((edge.sites[0].server, 9000))?
    };
    receiver.set_read_timeout(Some(Duration::from_millis(300)))?;
    let sender = {
        let _in = edge.inet.enter()?;
        UdpSocket::bind("198.51.100.100:0")?
    };
    let counting = std::thread::spawn(move || {
        let (mut n, mut idle) = (0u64, 0);
        while idle < 5 {
            match receiver.recv(&mut [0u8; 16]) {
                Ok(_) => {
                    n += 1;
                    idle = 0;
                }
                Err(_) => idle += 1,
            }
        }
        n
    });
    let sending = Arc::new(AtomicBool::new(true));
    let flag = sending.clone();
    let to = SocketAddr::from((edge.sites[0].server, 9000));
    let traffic = std::thread::spawn(move || {
        let (mut n, t) = (0u64, Instant::now());
        while flag.load(Ordering::Relaxed) && t.elapsed() < Duration::from_secs(15) {
            let _ = sender.send_to(&n.to_be_bytes(), to);
            n += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        n
    });
    std::thread::sleep(Duration::from_millis(300));
    let restart = daemon.restart();
    std::thread::sleep(Duration::from_millis(300));
    sending.store(false, Ordering::Relaxed);
    let sent = traffic.join().map_err(|_| anyhow::anyhow!("sender panicked"))?;
    let received = counting.join().map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    restart.context("restarting moat run")?;
    println!("   {sent} sent, {received} received at the site; the new daemon adopted the running data plane:");
    let log = daemon.log();
    for line in log.lines().filter(|l| l.contains("adopted") || l.contains("exiting")) {
        println!("    {line}");
    }
    ok &= sent == received;
    println!();
    stopping()?;

    println!(
        "6. a tunnel fails: acme's site stops taking GRE on acme-site (probes included) while 1,000 packets/s flow"
    );
    let tx = |d: &Daemon, name: &str| -> u64 {
        d.status()
            .ok()
            .and_then(|s| s["tunnels"].as_array()?.iter().find(|t| t["name"] == name)?["tx"]["packets"].as_u64())
            .unwrap_or(0)
    };
    let health = |d: &Daemon, name: &str| -> String {
        d.status()
            .ok()
            .and_then(|s| {
                let t = s["tunnels"].as_array()?.iter().find(|t| t["name"] == name)?.clone();
                Some(format!(
                    "{} ({})",
                    t["health"].as_str()?,
                    t["probes"]["reason"].as_str().unwrap_or("")
                ))
            })
            .unwrap_or_default()
    };
    let stream_to = SocketAddr::from((edge.sites[0].server, 9001));
    let streamer = {
        let _in = edge.inet.enter()?;
        UdpSocket::bind("198.51.100.100:0")?
    };
    let streaming = Arc::new(AtomicBool::new(true));
    let flag = streaming.clone();
    let stream = std::thread::spawn(move || {
        let t = Instant::now();
        while flag.load(Ordering::Relaxed) && t.elapsed() < Duration::from_secs(30) {
            let _ = streamer.send_to(b"stream", stream_to);
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let backup_before = tx(daemon, "acme-backup");
    acme.cut(keys[0]);
    let cut = Instant::now();
    let mut moved = None;
    while cut.elapsed() < Duration::from_secs(5) {
        if tx(daemon, "acme-backup") > backup_before {
            moved = Some(cut.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    match moved {
        Some(t) => println!("   traffic on acme-backup {} ms after the cut", t.as_millis()),
        None => println!("   traffic did NOT move to acme-backup within 5 s"),
    }
    ok &= moved.is_some();
    std::thread::sleep(Duration::from_millis(300));
    println!("   acme-site: {}", health(daemon, "acme-site"));
    acme.restore(keys[0]);
    let restored = Instant::now();
    while restored.elapsed() < Duration::from_secs(10) && !health(daemon, "acme-site").starts_with("healthy") {
        std::thread::sleep(Duration::from_millis(50));
    }
    let healthy = health(daemon, "acme-site");
    let primary = tx(daemon, "acme-site");
    std::thread::sleep(Duration::from_millis(300));
    let back = tx(daemon, "acme-site") > primary;
    println!(
        "   restored: acme-site {} after {:.1} s; traffic {} on it",
        healthy,
        restored.elapsed().as_secs_f64(),
        if back { "back" } else { "NOT back" }
    );
    ok &= healthy.starts_with("healthy") && back;
    streaming.store(false, Ordering::Relaxed);
    let _ = stream.join();
    println!();

    println!("moat status (read back from the data plane's maps):");
    let status = daemon.cli(&["status"])?;
    print!("{}", indent(&String::from_utf8_lossy(&status.stdout)));
    ok &= status.status.success();
    let json = daemon.status()?;
    let reason = |r: &str| json["reasons"][r]["packets"].as_u64().unwrap_or(0);
    ok &= reason("drop_gre_unknown_tunnel") == 50 && reason("drop_spoofed_source") == 10;

    stop.store(true, Ordering::Relaxed);
    for s in servers {
        let _ = s.join();
    }
    if !ok {
        bail!("the demo did not go as expected (see above)");
    }
    Ok(())
}
