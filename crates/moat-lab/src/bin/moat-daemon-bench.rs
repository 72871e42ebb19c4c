//! Daemon-level benchmark: `moat run` on a large configuration, end to end.
//!
//! Builds a throw-away namespace pair (the node's `n0` holds 198.51.100.1,
//! its peer 198.51.100.2 is the gateway towards every tunnel remote in
//! 192.0.2.0/24, with a permanent neighbour entry so every next hop resolves
//! at once), writes a configuration of 10,000 customers, 100,000 protected
//! prefixes (IPv6 /64s in 2001:db8::/32 and the /32s of 203.0.113.0/24),
//! 20,000 keyed tunnels and about 100,000 routes, starts the daemon on it
//! (nothing is sent: no traffic at all) and prints:
//! - `moat validate` on the file (YAML parse + validation, in its own process),
//! - spawn to ready (parse, validate, load, compile, apply, attach) and the
//!   daemon's own apply line,
//! - one-customer changes through `moat reload` (the file rewritten with one
//!   customer changed): the command's time and the daemon's apply time,
//!   median and max,
//! - a reload without change,
//! - `moat status --json` time,
//! - the daemon's peak resident memory (VmHWM).
//!
//! The `moat` binary is taken from next to this one: build it first
//! (`cargo build --release -p moat`).
//!
//! Usage: moat-daemon-bench [--quick]   (--quick: a tenth of the sizes)

use std::{
    fmt::Write as _,
    process::Command,
    time::{Duration, Instant},
};

use moat_lab::{
    daemon::Daemon,
    netns::{veth, NetNs},
};

/// The configuration's shape.
struct Sizes {
    customers: u32,
}

/// Protected prefix `i` (0-based): the first 256 are the /32s of
/// 203.0.113.0/24, the rest IPv6 /64s of 2001:db8::/32.
fn prefix(i: u32) -> String {
    if i < 256 {
        format!("203.0.113.{i}/32")
    } else {
        format!("2001:db8:{:x}:{:x}::/64", i >> 16, i & 0xffff)
    }
}

/// Customer `c` (generation `gen` changes its first tunnel's MTU).
fn customer(out: &mut String, c: u32, gen: u32) {
    let _ = writeln!(out, "  - name: c{c}\n    prefixes:");
    for k in 0..10 {
        let _ = writeln!(out, "      - {}", prefix(c * 10 + k));
    }
    let _ = writeln!(out, "    tunnels:");
    for t in 0..2 {
        let id = c * 2 + t;
        let mtu = if t == 0 { 1476 - (gen % 2) * 76 } else { 1476 };
        let _ = writeln!(
            out,
            "      - name: t{t}\n        remote: 192.0.2.{}\n        key: {id}\n        mtu: {mtu}",
            1 + id % 250
        );
    }
    let _ = writeln!(out, "    routes:");
    for k in 0..10 {
        let _ = writeln!(
            out,
            "      - prefix: {}\n        tunnel: t{}",
            prefix(c * 10 + k),
            k % 2
        );
        if k == 0 && c.is_multiple_of(20) {
            // ECMP over both tunnels.
            let _ = writeln!(out, "      - prefix: {}\n        tunnel: t1", prefix(c * 10));
        }
    }
}

/// The whole file; `changed` = (customer, generation) of the one customer
/// that differs from generation 0.
fn config(s: &Sizes, changed: Option<(u32, u32)>) -> String {
    let mut out = String::with_capacity(s.customers as usize * 900);
    out.push_str(
        "version: 1\nnode:\n  name: bench\n  interfaces:\n    - name: n0\n  tunnel_endpoint: 198.51.100.1\n  metrics: \"off\"\ncustomers:\n",
    );
    for c in 0..s.customers {
        let gen = match changed {
            Some((cc, g)) if cc == c => g,
            _ => 0,
        };
        customer(&mut out, c, gen);
    }
    out
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median_max(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[v.len() - 1])
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// The daemon's log lines containing `what`.
fn lines(d: &Daemon, what: &str) -> Vec<String> {
    d.log()
        .lines()
        .filter(|l| l.contains(what))
        .map(str::to_string)
        .collect()
}

/// "... in 12.3 ms" at the end of a log line (before any trailing fields).
fn in_ms(line: &str) -> Option<f64> {
    let at = line.rfind(" in ")?;
    line[at + 4..].split_whitespace().next()?.parse().ok()
}

/// From the log line's message on (timestamps and levels dropped).
fn message(line: &str) -> &str {
    line.find("applied").map_or(line, |i| &line[i..])
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes = Sizes {
        customers: if quick { 1_000 } else { 10_000 },
    };
    let bin = std::env::current_exe()?.with_file_name("moat");
    if !bin.exists() {
        return Err(format!(
            "{} not found: build the daemon first (cargo build --release -p moat)",
            bin.display()
        )
        .into());
    }

    // Topology: the node's n0 and a peer that is the gateway to the remotes.
    let node = NetNs::new("dbench-node")?;
    let peer = NetNs::new("dbench-peer")?;
    veth(&node, "n0", &peer, "p0");
    node.ip(&["addr", "add", "198.51.100.1/24", "dev", "n0"]);
    peer.ip(&["addr", "add", "198.51.100.2/24", "dev", "p0"]);
    let peer_mac = peer.mac("p0");
    let mac = peer_mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    node.ip(&[
        "neigh",
        "replace",
        "198.51.100.2",
        "lladdr",
        &mac,
        "dev",
        "n0",
        "nud",
        "permanent",
    ]);
    node.ip(&["route", "add", "192.0.2.0/24", "via", "198.51.100.2", "dev", "n0"]);

    let yaml = config(&sizes, None);
    let tunnels = sizes.customers * 2;
    let routes = sizes.customers * 10 + sizes.customers.div_ceil(20);
    println!(
        "configuration: {} customers, {} prefixes, {tunnels} tunnels, {routes} routes, {:.1} MiB of YAML",
        sizes.customers,
        sizes.customers * 10,
        yaml.len() as f64 / (1 << 20) as f64
    );

    // Parse + validate alone, in its own process.
    let file = std::env::temp_dir().join(format!("moat-t-dbench-{}.yaml", std::process::id()));
    std::fs::write(&file, &yaml)?;
    let t = Instant::now();
    let out = Command::new(&bin).arg("validate").arg("-c").arg(&file).output()?;
    let validate_t = t.elapsed();
    let _ = std::fs::remove_file(&file);
    println!(
        "moat validate (parse + validate, one process): {:.0} ms: {}",
        ms(validate_t),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    if !out.status.success() {
        return Err(format!("validate failed: {}", String::from_utf8_lossy(&out.stdout)).into());
    }

    // Cold start.
    let t = Instant::now();
    let mut d = Daemon::start(&bin, &node, &yaml)?;
    let ready = t.elapsed();
    let pid = d.pid().ok_or("daemon not running")?;
    let cold = lines(&d, "applied ");
    println!("cold start, spawn to ready: {:.0} ms", ms(ready));
    if let Some(l) = cold.last() {
        println!("  daemon: {}", message(l));
    }
    println!("  daemon peak RSS after start: {} MiB", vm_hwm_kib(pid) / 1024);

    // One-customer changes through `moat reload`.
    let rounds = 7;
    let mut cmd_t = Vec::new();
    let mut apply_t = Vec::new();
    for i in 0..rounds {
        let c = (i * 1_237 + 5) % sizes.customers;
        d.write_config(&config(&sizes, Some((c, 1))))?;
        let before = lines(&d, "reload applied").len();
        let t = Instant::now();
        let out = d.cli(&["reload"])?;
        let took = t.elapsed();
        if !out.status.success() {
            return Err(format!("reload failed: {}", String::from_utf8_lossy(&out.stdout)).into());
        }
        let after = lines(&d, "reload applied");
        let line = after.get(before).cloned().unwrap_or_default();
        cmd_t.push(ms(took));
        apply_t.extend(in_ms(&line));
        if i == 0 {
            println!("  first reload: {}", message(&line));
        }
        // Back to generation 0 for the next round's base.
        d.write_config(&yaml)?;
        let out = d.cli(&["reload"])?;
        if !out.status.success() {
            return Err("reload back failed".into());
        }
    }
    let (cm, cx) = median_max(cmd_t);
    let (am, ax) = median_max(apply_t);
    println!(
        "one-customer change via `moat reload` ({rounds} times): command median {cm:.0} ms, max {cx:.0} ms; \
         daemon compile+apply median {am:.1} ms, max {ax:.1} ms"
    );

    // No change.
    let before = lines(&d, "reload applied").len();
    let t = Instant::now();
    let out = d.cli(&["reload"])?;
    let took = t.elapsed();
    let line = lines(&d, "reload applied").get(before).cloned().unwrap_or_default();
    println!(
        "no-change reload: command {:.0} ms ({}); daemon: {}",
        ms(took),
        if out.status.success() { "ok" } else { "failed" },
        message(&line)
    );

    // Status.
    let mut status_t = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let out = d.cli(&["status", "--json"])?;
        status_t.push(ms(t.elapsed()));
        if !out.status.success() {
            return Err(format!("status failed: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        if status_t.len() == 1 {
            println!(
                "  status --json: {:.1} MiB of JSON",
                out.stdout.len() as f64 / (1 << 20) as f64
            );
        }
    }
    println!(
        "moat status --json: first {:.0} ms, then {:.0} ms, {:.0} ms",
        status_t[0], status_t[1], status_t[2]
    );
    println!("daemon peak RSS (VmHWM): {} MiB", vm_hwm_kib(pid) / 1024);

    let out = d.down()?;
    if !out.status.success() {
        eprintln!("moat down: {}", String::from_utf8_lossy(&out.stderr));
    }
    drop(d);
    drop(peer);
    drop(node);
    Ok(())
}
