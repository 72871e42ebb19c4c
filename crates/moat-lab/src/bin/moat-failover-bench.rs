//! Failover benchmark: `moat run` on the edge topology (moat_lab::edge)
//! with a customer site behind a primary (priority 100) and a backup
//! (priority 200) tunnel, both probed at one rate. Each trial starts a
//! fresh daemon, waits until both tunnels have answered a probe, waits a
//! random part of the probe interval, sends a stream of 1,000 packets/s
//! to the site, cuts the primary at the site (its GRE, probes included,
//! is dropped) and measures the time from the cut to the first stream
//! packet the site receives through the backup. Prints median and max per
//! rate.
//!
//! Then the probe load: 10,000 tunnels at the mid rate (1 s), all answered
//! by the site's one endpoint, and the daemon's CPU time over 10 s as a
//! share of one core, with the probe packets per second.
//!
//! The `moat` binary is taken from next to this one: build it first
//! (`cargo build --release -p moat`). Traffic stays inside the namespaces
//! created here; everything is removed at the end.
//!
//! Usage: moat-failover-bench [--quick] [--load-only | --no-load] [--trials N] [--rates high,mid,low]
//!   --quick: 2 trials at the high rate, 1,000 tunnels; --load-only: only the probe load;
//!   --no-load: only the failover trials; --trials: trials per rate (20); --rates: which rates (all)

use std::{
    fmt::Write as _,
    net::{SocketAddr, UdpSocket},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use moat_lab::{daemon::Daemon, edge::Edge, site::GreTunEndpoint};
use rand::Rng;

fn failover_config(rate: &str) -> String {
    let mut s = Edge::node_yaml("edge-failover");
    let _ = write!(
        s,
        "customers:
  - name: acme
    prefixes: [203.0.113.0/25]
    tunnels:
      - {{ name: primary, remote: 192.0.2.10, key: 1, mtu: 1472, health_check: {{ rate: {rate} }} }}
      - {{ name: backup, remote: 192.0.2.10, key: 2, mtu: 1472, health_check: {{ rate: {rate} }} }}
    routes:
      - {{ prefix: 203.0.113.0/25, tunnel: primary, priority: 100 }}
      - {{ prefix: 203.0.113.0/25, tunnel: backup, priority: 200 }}
"
    );
    s
}

/// 100 customers (one /32 each) with `per` tunnels each, keys 1.., all to
/// the site router.
fn load_config(per: u32) -> String {
    let mut s = Edge::node_yaml("edge-probes");
    s.push_str("customers:\n");
    for c in 0..100u32 {
        let _ = writeln!(s, "  - name: c{c}\n    prefixes: [203.0.113.{c}/32]\n    tunnels:");
        for t in 0..per {
            let key = c * per + t + 1;
            let _ = writeln!(s, "      - {{ name: t{t}, remote: 192.0.2.10, key: {key}, mtu: 1472 }}");
        }
        let _ = writeln!(s, "    routes:\n      - {{ prefix: 203.0.113.{c}/32, tunnel: t0 }}");
    }
    s
}

fn status_health(d: &Daemon) -> Vec<String> {
    d.status()
        .ok()
        .and_then(|s| {
            Some(
                s["tunnels"]
                    .as_array()?
                    .iter()
                    .map(|t| t["health"].as_str().unwrap_or("").to_string())
                    .collect(),
            )
        })
        .unwrap_or_default()
}

/// The fewest answered probes of any tunnel.
fn min_succeeded(d: &Daemon) -> u64 {
    d.status()
        .ok()
        .and_then(|s| {
            s["tunnels"]
                .as_array()?
                .iter()
                .map(|t| t["probes"]["succeeded"].as_u64().unwrap_or(0))
                .min()
        })
        .unwrap_or(0)
}

/// One trial: the time from the cut to the first stream packet through the backup.
fn trial(edge: &Edge, bin: &Path, endpoint: &GreTunEndpoint, rate: &str) -> Result<Duration, String> {
    endpoint.restore(Some(1));
    let mut d = Daemon::start(bin, &edge.node, &failover_config(rate)).map_err(|e| e.to_string())?;
    // Steady state: both tunnels answered at least once and are healthy;
    // then the cut comes at a random point of the probe interval (the
    // stream starts 200 ms before it).
    let started = Instant::now();
    while !status_health(&d).iter().all(|h| h == "healthy") || min_succeeded(&d) < 1 {
        if started.elapsed() > Duration::from_secs(30) {
            return Err("tunnels not healthy".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let interval = match rate {
        "high" => 100,
        "mid" => 1_000,
        _ => 10_000,
    };
    std::thread::sleep(Duration::from_millis(rand::thread_rng().gen_range(0..interval)));
    let sender = {
        let _in = edge.inet.enter().map_err(|e| e.to_string())?;
        UdpSocket::bind("198.51.100.100:40000").map_err(|e| e.to_string())?
    };
    let to = SocketAddr::from((edge.sites[0].server, 9000));
    let sending = Arc::new(AtomicBool::new(true));
    let flag = sending.clone();
    let stream = std::thread::spawn(move || {
        let t = Instant::now();
        while flag.load(Ordering::Relaxed) && t.elapsed() < Duration::from_secs(60) {
            let _ = sender.send_to(b"stream", to);
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    endpoint.flows(true);
    endpoint.cut(Some(1));
    let cut = Instant::now();
    let result = loop {
        if endpoint.flows(false).get(&40000) == Some(&Some(2)) {
            break Ok(cut.elapsed());
        }
        if cut.elapsed() > Duration::from_secs(60) {
            break Err("no failover within 60 s".to_string());
        }
        std::thread::sleep(Duration::from_micros(500));
    };
    sending.store(false, Ordering::Relaxed);
    let _ = stream.join();
    let _ = d.down();
    result
}

/// (user, system) CPU ticks of a process.
fn cpu_ticks(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of /proc/PID/stat (1-based),
    // 12 and 13 after the command name.
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (field(11), field(12))
}

/// Kernel threads whose name starts with `prefix`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let load_only = args.iter().any(|a| a == "--load-only");
    let no_load = args.iter().any(|a| a == "--no-load");
    let value = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1));
    let trials: Option<u32> = match value("--trials") {
        Some(v) => Some(v.parse().map_err(|_| format!("--trials {v}: not a number"))?),
        None => None,
    };
    let chosen: Option<Vec<&str>> = value("--rates").map(|v| v.split(',').collect());
    if let Some(bad) = chosen.iter().flatten().find(|r| !["high", "mid", "low"].contains(r)) {
        return Err(format!("--rates: unknown rate {bad:?} (high, mid, low)").into());
    }
    let bin = std::env::current_exe()?.with_file_name("moat");
    if !bin.exists() {
        return Err(format!(
            "{} is missing: build it first (cargo build --release -p moat)",
            bin.display()
        )
        .into());
    }
    let edge = Edge::new("fobench")?;
    let keys: Vec<Option<u32>> = (1..=10_000).map(Some).collect();
    let endpoint = edge.start_site_multi(0, &keys, Some(2))?;

    println!("failover: from the cut of the primary tunnel to the first packet through the backup");
    let rates: Vec<(&str, u32)> = if load_only {
        Vec::new()
    } else if quick && chosen.is_none() && trials.is_none() {
        vec![("high", 2)]
    } else {
        ["high", "mid", "low"]
            .into_iter()
            .filter(|r| chosen.as_ref().is_none_or(|c| c.contains(r)))
            .map(|r| (r, trials.unwrap_or(20)))
            .collect()
    };
    for (rate, trials) in rates {
        let mut times = Vec::new();
        for _ in 0..trials {
            match trial(&edge, &bin, &endpoint, rate) {
                Ok(t) => times.push(t),
                Err(e) => println!("  {rate}: a trial failed: {e}"),
            }
        }
        times.sort();
        if let (Some(max), false) = (times.last(), times.is_empty()) {
            let median = times[times.len() / 2];
            println!(
                "  {rate:<4} ({} trials): median {:.0} ms, min {:.0} ms, max {:.0} ms",
                times.len(),
                median.as_secs_f64() * 1e3,
                times[0].as_secs_f64() * 1e3,
                max.as_secs_f64() * 1e3
            );
        }
    }
    endpoint.restore(Some(1));
    if no_load {
        return Ok(());
    }

    // With veth, a receiver's kernel work runs in the sender's context
    // unless the receiving device polls in its own thread: the site's
    // receive work for the probes (the customer router's in real life)
    // would be charged to the daemon, and the node's receive work for the
    // answers to the responder. Both devices poll in threads, so the
    // daemon's figure is its own work and the node's receive work is
    // measured apart (its NAPI thread). veth hands a TSO-capable sender's
    // packets to the site device's NAPI only with UDP GRO forwarding on;
    // the node's device has NAPI once the data plane's program is attached.
    let threaded = |ns: &moat_lab::netns::NetNs, dev: &str| {
        ns.exec("sh", &["-c", &format!("echo 1 > /sys/class/net/{dev}/threaded")])
    };
    edge.sites[0]
        .ns
        .exec("ethtool", &["-K", "s0", "rx-udp-gro-forwarding", "on"])?;
    threaded(&edge.sites[0].ns, "s0")?;
    let per = if quick { 10 } else { 100 };
    let tunnels = 100 * per;
    let mut d = Daemon::start(&bin, &edge.node, &load_config(per))?;
    threaded(&edge.node, "n-site1")?;
    std::thread::sleep(Duration::from_secs(3));
    let pid = d.pid().ok_or("daemon not running")?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let probes_before = endpoint.counters.decapsulated.load(Ordering::Relaxed);
    let node_napi = moat_lab::sock::napi_threads("napi/n-site1-");
    let napi_ticks = || node_napi.iter().map(|&p| cpu_ticks(p).0 + cpu_ticks(p).1).sum::<u64>();
    let (t0, (u0, s0), n0) = (Instant::now(), cpu_ticks(pid), napi_ticks());
    std::thread::sleep(Duration::from_secs(10));
    let (u1, s1) = cpu_ticks(pid);
    let node_receive = napi_ticks() - n0;
    let (secs, user, system) = (t0.elapsed().as_secs_f64(), u1 - u0, s1 - s0);
    let ticks = user + system;
    let probes = endpoint.counters.decapsulated.load(Ordering::Relaxed) - probes_before;
    let healthy = status_health(&d).iter().filter(|h| *h == "healthy").count();
    println!(
        "probe load: {tunnels} tunnels at the mid rate: daemon CPU {:.1}% of one core over {secs:.0} s \
         (user {:.1}%, system {:.1}%), {:.0} probes/s answered, {healthy} of {tunnels} tunnels healthy; \
         the node's receive work (XDP and IP for every packet on the site link, answers included, \
         {} NAPI thread(s)) {:.1}% more",
        ticks as f64 / hz / secs * 100.0,
        user as f64 / hz / secs * 100.0,
        system as f64 / hz / secs * 100.0,
        probes as f64 / secs,
        node_napi.len(),
        node_receive as f64 / hz / secs * 100.0
    );
    if std::env::var_os("MOAT_BENCH_LOG").is_some() {
        let log = d.log();
        for line in log.lines().filter(|l| !l.contains("tunnel health changed")).take(40) {
            eprintln!("{line}");
        }
        let changes: Vec<&str> = log.lines().filter(|l| l.contains("tunnel health changed")).collect();
        for line in changes.iter().take(5) {
            eprintln!("{line}");
        }
        eprintln!("{} health changes", changes.len());
    }
    let _ = d.down();
    Ok(())
}
