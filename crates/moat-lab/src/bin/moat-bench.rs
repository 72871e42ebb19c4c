//! Data-plane benchmark: kernel-timed ns/packet (BPF_PROG_TEST_RUN) for
//! moat's paths, each as a ratio to a bare XDP_DROP program timed in the
//! same run, with 1 customer and with 10,000 customers / 100,000 prefixes.
//!
//! The kernel reuses the packet buffer between repeats, so paths that
//! rewrite the packet (encapsulation, decapsulation) run inside a harness
//! program of the same object that restores the packet after each run
//! (moat_bench). The harness's own cost is timed around no pipeline
//! (moat_bench_nop, minus the bare drop) and subtracted. Before timing,
//! each case checks that 1,000 harness runs leave the input intact with the
//! verdict of a plain run, and the miss path (which rewrites nothing) is also timed
//! directly as a check of the correction.
//!
//! Usage: moat-bench [--quick] [--live-only]
//! (`--live-only`: only the live-frames table)

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use moat_dataplane::{RateLimit, RatePer, RouteSpec, RuleAction, Spec, TunnelSpec};
use moat_lab::{
    baseline::BareDrop,
    fixture::{self, Fixture, NODE},
    packet::{self, Frame, L4},
    rules::spec_rule,
};

struct Plan {
    rounds: usize,
    repeat: u32,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Adds `customers` filler customers holding `prefixes` prefixes in all
/// (half IPv4 /31s in the benchmarking range 198.18.0.0/15, half IPv6 /56s
/// in 2001:db8::/32), each with two tunnels and a route per prefix.
fn scaled(mut spec: Spec, customers: usize, prefixes: usize) -> Spec {
    let per = prefixes / customers;
    let mut n4 = 0u32;
    let mut n6 = 0u128;
    for c in 0..customers {
        let tunnels: Vec<TunnelSpec> = (0..2)
            .map(|t| {
                // Remotes in the benchmarking range 198.18.0.0/15.
                let i = (c * 2 + t) as u32;
                let remote = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (i << 1) + 1);
                TunnelSpec {
                    remote,
                    ..fixture::tunnel(&format!("t{t}"), [0; 4], None)
                }
            })
            .collect();
        let mut prefs = Vec::new();
        for k in 0..per {
            if k % 2 == 0 {
                let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (n4 << 1));
                n4 += 1;
                prefs.push(IpNet::V4(Ipv4Net::new(a, 31).expect("prefix")));
            } else {
                let a = Ipv6Addr::from((0x2001_0db8u128 << 96) | (n6 << 72));
                n6 += 1;
                prefs.push(IpNet::V6(Ipv6Net::new(a, 56).expect("prefix")));
            }
        }
        let routes = prefs
            .iter()
            .enumerate()
            .map(|(k, p)| RouteSpec {
                prefix: *p,
                tunnel: format!("t{}", k % 2),
                priority: 100,
                weight: 100,
            })
            .collect();
        spec.customers.push(fixture::filler(c, prefs, tunnels, routes));
    }
    spec
}

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    /// XDP action the case must produce (checked before timing).
    action: u32,
}

fn cases() -> Vec<Case> {
    let a4 = |s: &str| IpAddr::V4(s.parse().expect("address"));
    let a6 = |s: &str| IpAddr::V6(s.parse().expect("address"));
    let udp = L4::Udp { sport: 4000, dport: 53 };
    let f = Frame::default();
    // Payload sizes giving 64- and 1400-byte frames.
    let v4 = |size: usize, dst| {
        packet::eth(
            f,
            &packet::ip(a4("192.0.2.99"), a4(dst), 64, udp, &vec![0u8; size - 42]),
        )
    };
    let v6 = |size: usize| {
        packet::eth(
            f,
            &packet::ip(
                a6("2001:db8:1::1"),
                a6("2001:db8:100::5"),
                64,
                udp,
                &vec![0u8; size - 62],
            ),
        )
    };
    let inner = packet::ip(a4("203.0.113.5"), a4("198.51.100.77"), 64, udp, &[0u8; 2]);
    let decap = packet::eth(f, &packet::gre([192, 0, 2, 10], NODE.octets(), 64, None, &inner));
    vec![
        Case {
            name: "miss (not protected), IPv4 64 B",
            frame: v4(64, "192.0.2.200"),
            action: 2,
        },
        Case {
            name: "encap IPv4 64 B",
            frame: v4(64, "203.0.113.5"),
            action: 4,
        },
        Case {
            name: "encap IPv4 1400 B",
            frame: v4(1400, "203.0.113.5"),
            action: 4,
        },
        Case {
            name: "encap IPv4 64 B, XDP_TX (next hop on the ingress link)",
            frame: v4(64, "203.0.113.200"),
            action: 3,
        },
        Case {
            name: "encap IPv6 64 B (key)",
            frame: v6(64),
            action: 4,
        },
        Case {
            name: "encap IPv6 1400 B (key)",
            frame: v6(1400),
            action: 4,
        },
        Case {
            name: "decap IPv4 (FIB lookup)",
            frame: decap,
            action: 4,
        },
    ]
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Pins this thread to the highest CPU it may run on: the machine's last,
/// unless an affinity mask (e.g. from taskset) allows fewer.
fn pin() -> usize {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it for
    // this thread, CPU_ISSET only reads it.
    let allowed = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            (0..libc::CPU_SETSIZE as usize)
                .rev()
                .find(|c| libc::CPU_ISSET(*c, &set))
        } else {
            None
        }
    };
    let cpu = allowed.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()) - 1);
    moat_lab::sock::pin_thread(cpu);
    cpu
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let plan = if quick {
        Plan {
            rounds: 3,
            repeat: 20_000,
        }
    } else {
        Plan {
            rounds: 11,
            repeat: 1_000_000,
        }
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    // SAFETY: sysconf only reads.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let cpu = pin();
    println!("# moat data-plane benchmark (BPF_PROG_TEST_RUN, kernel-timed)");
    println!();
    println!(
        "CPU: {}, {cpus} CPUs (pinned to CPU {cpu}), kernel {}",
        cpu_model(),
        kernel.trim()
    );
    let srso =
        std::fs::read_to_string("/sys/devices/system/cpu/vulnerabilities/spec_rstack_overflow").unwrap_or_default();
    println!(
        "SRSO mitigation: {} (with \"Safe RET\" every non-inlined BPF helper or map call costs tens of ns)",
        srso.trim()
    );
    println!(
        "Each round times the bare XDP_DROP, the harness alone and every path back to back ({} repeats each); \
         figures are medians over {} rounds, ratios are medians of the per-round ratios.",
        plan.repeat, plan.rounds
    );
    println!();
    if std::env::args().any(|a| a == "--live-only") {
        live(&plan);
        return;
    }

    let bare = BareDrop::load().expect("loading the bare XDP_DROP program");
    let cases = cases();
    let probe = cases[0].frame.clone();
    let mut f = Fixture::new("bench");
    f.dp.load_bench_programs().expect("loading the benchmark harness");
    let _in = f.ns.enter().expect("enter namespace");
    let scales = [
        ("1 customer", 0usize, 0usize),
        ("10,000 customers / 100,000 prefixes", 10_000, 100_000),
    ];
    // [scale][case] -> (median ns, median ratio); the last case is the direct miss check.
    let mut table: Vec<Vec<(f64, f64)>> = Vec::new();
    for (label, customers, prefixes) in scales {
        let spec = if customers == 0 {
            fixture::standard_spec()
        } else {
            scaled(fixture::standard_spec(), customers - 2, prefixes)
        };
        let t = Instant::now();
        f.apply(spec);
        eprintln!("loaded {label} in {:.2?}", t.elapsed());
        for c in &cases {
            let once = f.dp.run(&c.frame, f.ingress).expect("run");
            assert_eq!(once.action, c.action, "{}: unexpected action", c.name);
            // After 1,000 runs the buffer must be the input again, with the same verdict.
            let many = f.dp.run_harness(&c.frame, 1000, f.ingress).expect("harness run");
            assert_eq!(
                (many.action, &many.data),
                (once.action, &c.frame),
                "{}: the harness does not restore the packet",
                c.name
            );
        }
        let n = cases.len() + 1;
        let mut ns: Vec<Vec<f64>> = vec![Vec::new(); n];
        let mut ratio: Vec<Vec<f64>> = vec![Vec::new(); n];
        let (mut bases, mut overheads) = (Vec::new(), Vec::new());
        for _ in 0..plan.rounds {
            let base = bare.time_repeat(&probe, plan.repeat).expect("bare");
            let overhead =
                f.dp.time_harness(&probe, plan.repeat, true, f.ingress)
                    .expect("harness")
                    - base;
            for (k, c) in cases.iter().enumerate() {
                let v =
                    f.dp.time_harness(&c.frame, plan.repeat, false, f.ingress)
                        .expect("time")
                        - overhead;
                ns[k].push(v);
                ratio[k].push(v / base);
            }
            let direct = f.dp.time_repeat(&cases[0].frame, plan.repeat, f.ingress).expect("time");
            ns[n - 1].push(direct);
            ratio[n - 1].push(direct / base);
            bases.push(base);
            overheads.push(overhead);
        }
        println!(
            "With {label} loaded: bare XDP_DROP {:.1} ns/packet, harness overhead {:.1} ns (subtracted).",
            median(bases),
            median(overheads)
        );
        table.push(ns.into_iter().zip(ratio).map(|(a, b)| (median(a), median(b))).collect());
    }
    println!();
    println!("| path | ns/packet, 1 customer | x bare drop | ns/packet, 10k customers / 100k prefixes | x bare drop | growth |");
    println!("|---|---:|---:|---:|---:|---:|");
    let names: Vec<&str> = cases
        .iter()
        .map(|c| c.name)
        .chain(["miss, timed directly (check of the correction)"])
        .collect();
    for (k, name) in names.iter().enumerate() {
        let ((a, ra), (b, rb)) = (table[0][k], table[1][k]);
        println!(
            "| {name} | {a:.1} | {ra:.2} | {b:.1} | {rb:.2} | {:+.1}% |",
            (rb / ra - 1.0) * 100.0
        );
    }
    println!();
    println!("Targets: miss <= 1.5x, encap <= 3x bare drop; growth from 1 to 10,000 customers <= 10% (growth is of the ratio).");
    println!();
    drop(_in);
    rules(&bare, &plan);
    println!();
    live(&plan);
}

/// Mpps through a veth: the flood generator (live frames, on this CPU)
/// sends UDP to port 9999 into a veth pair whose far end runs moat,
/// dropping the flood by the last of 1 / 100 / 1,024 operator rules (and
/// the other rows), and the same flood into a second pair whose far end
/// runs the bare XDP_DROP. Every round sends to both, one after the
/// other, so each row's ratio is to the bare drop measured beside it. The
/// sending CPU also runs the receiving side's XDP, so the rate reflects
/// both; the bare drop is the ceiling.
fn live(plan: &Plan) {
    use moat_dataplane::{compile, flood::Flood, Dataplane, XdpMode};
    use moat_lab::{flood, netns::NetNs};
    let frames: u64 = if plan.rounds > 3 { 4_000_000 } else { 200_000 };
    let rounds = plan.rounds.min(7);
    let gen = NetNs::new("bench-gen").expect("namespace");
    let sink = NetNs::new("bench-sink").expect("namespace");
    moat_lab::netns::veth(&gen, "g0", &sink, "s0");
    moat_lab::netns::veth(&gen, "g1", &sink, "s1");
    // From 192.0.2.0/24, as the last rule of `rule_set` asks.
    let template = |from: &str, to: &str| {
        flood::udp(
            &flood::Target {
                src: Ipv4Addr::new(192, 0, 2, 0),
                random_bits: 8,
                ..flood::Target::acme(&gen, from, &sink, to)
            },
            9999,
            22,
        )
    };
    let (to_moat, to_bare) = (template("g0", "s0"), template("g1", "s1"));
    let (g0, g1) = (gen.ifindex("g0"), gen.ifindex("g1"));
    let mut generator = Flood::load().expect("load the generator");
    // The bare XDP_DROP on the second pair's receiving end, for the run's length.
    let bare = moat_lab::baseline::PinnedBareDrop::new().expect("pin the bare drop");
    bare.attach(&sink, "s1");
    // A rate is the frames the receiving end's XDP program ran on (veth's
    // own count), over the time the generator's send loop ran as the
    // kernel timed it (the receiver runs inside it, on the same CPU; each
    // system call's setup outside it sends nothing, see `Flood::run`):
    // frames the receiver had no room for are not counted as its work.
    let taken = |dev: &str| xdp_frames(&sink, dev);
    // Per round: (bare Mpps, moat Mpps); and the frames moat took and was
    // sent in all.
    let mut run = || -> (Vec<(f64, f64)>, u64, u64) {
        let _in = gen.enter().expect("enter generator");
        let (mut total, mut sent) = (0, 0);
        let mut send = |t: &moat_dataplane::flood::Template, ifindex: u32, dev: &str| {
            let before = taken(dev);
            let report = generator
                .run(t, ifindex, frames, std::time::Duration::from_secs(10))
                .expect("flood");
            let n = taken(dev) - before;
            assert!(
                n >= report.sent / 2,
                "{dev} took {n} of {} frames sent: the generator outruns it by far",
                report.sent
            );
            (n, report.sent, n as f64 / report.busy.as_secs_f64() / 1e6)
        };
        let rates = (0..rounds)
            .map(|_| {
                let (_, _, bare) = send(&to_bare, g1, "s1");
                let (n, of, moat) = send(&to_moat, g0, "s0");
                total += n;
                sent += of;
                (bare, moat)
            })
            .collect();
        (rates, total, sent)
    };
    println!("## Live frames through a veth ({frames} frames per run, {rounds} rounds)");
    println!();
    println!(
        "Each round floods the bare XDP_DROP's veth, then moat's. A rate is the frames the receiving XDP \
         program ran on over the time the generator's send loop ran (as the kernel timed it; the receiver \
         runs inside it, on the same CPU). Mpps are medians over the rounds; time per packet \
         is the median of the per-round ratios bare Mpps / moat Mpps."
    );
    println!();
    println!(
        "| receiving XDP program | Mpps | bare XDP_DROP, same rounds, Mpps | time per packet, x bare drop | \
         frames moat took, of those sent |"
    );
    println!("|---|---:|---:|---:|---:|");
    let mut dp = Dataplane::load().expect("load moat");
    {
        let _in = sink.enter().expect("enter sink");
        dp.attach("s0", XdpMode::Driver).expect("attach moat");
    }
    // acme's tunnels leave by the receiving link itself (XDP_TX back to
    // the generator's side, where nothing takes them: they end there).
    let hop = moat_dataplane::NextHop {
        ifindex: sink.ifindex("s0"),
        smac: sink.mac("s0"),
        dmac: gen.mac("g0"),
        link_mtu: 1500,
    };
    let rate_limited = vec![spec_rule(
        "limited",
        "udp.dstport == 9999",
        RuleAction::RateLimit(RateLimit {
            pps: 1,
            per: RatePer::Rule,
        }),
    )];
    use moat_common::Reason;
    // (label, mitigation rules, acme's firewall, the reason every frame ends under)
    let mut rows: Vec<(
        String,
        Vec<moat_dataplane::RuleSpec>,
        Vec<moat_dataplane::RuleSpec>,
        Reason,
    )> = Vec::new();
    for n in [1usize, 100, 1024] {
        rows.push((
            format!("moat, drop by operator rule {n} of {n}"),
            rule_set(n, RuleAction::Drop),
            Vec::new(),
            Reason::DropMitigationRule,
        ));
    }
    for n in [1usize, 100, 1024] {
        rows.push((
            format!("moat, firewall allow by rule {n} of {n}, then encap (XDP_TX)"),
            Vec::new(),
            rule_set(n, RuleAction::Pass),
            Reason::ForwardEncap,
        ));
    }
    rows.push((
        "moat, drop by an exhausted rate limit".into(),
        rate_limited,
        Vec::new(),
        Reason::DropRateLimit,
    ));
    let mut prev = None;
    for (label, mitigation, firewall, reason) in rows {
        let mut spec = fixture::standard_spec();
        spec.mitigation = mitigation;
        spec.customers[0].firewall = firewall;
        let compiled = compile(&spec, &|_| Some(hop), prev.as_ref()).expect("compile");
        dp.apply(&compiled).expect("apply");
        prev = Some(compiled);
        let before = dp.counters([], []).expect("counters");
        let (rates, taken, sent) = run();
        let after = dp.counters([], []).expect("counters");
        let counted = after.packets(reason) - before.packets(reason);
        let moved: Vec<(Reason, u64)> = Reason::ALL
            .iter()
            .map(|r| (*r, after.packets(*r) - before.packets(*r)))
            .filter(|(_, n)| *n > 0)
            .collect();
        // Every frame moat took ends under the row's reason (a rate limit
        // lets its first packets through).
        assert!(
            counted >= taken * 9 / 10,
            "{label}: {counted} of the {taken} frames taken ended as {reason:?} (counted: {moved:?})"
        );
        let bare_mpps = median(rates.iter().map(|r| r.0).collect());
        let mpps = median(rates.iter().map(|r| r.1).collect());
        let time = median(rates.iter().map(|r| r.0 / r.1).collect());
        let share = 100.0 * taken as f64 / sent.max(1) as f64;
        println!("| {label} | {mpps:.2} | {bare_mpps:.2} | {time:.2} | {share:.1}% |");
    }
}

/// Frames the XDP program on `dev` in `ns` has run on (the sum of veth's
/// per-queue `xdp_packets` counters).
fn xdp_frames(ns: &moat_lab::netns::NetNs, dev: &str) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns.name(), "ethtool", "-S", dev])
        .output()
        .expect("run ethtool");
    assert!(
        out.status.success(),
        "ethtool -S {dev}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats = String::from_utf8_lossy(&out.stdout);
    let counts: Vec<u64> = stats
        .lines()
        .filter_map(|l| {
            let (k, v) = l.trim().split_once(':')?;
            (k.starts_with("rx_queue_") && k.ends_with("_xdp_packets")).then(|| v.trim().parse().ok())?
        })
        .collect();
    assert!(
        !counts.is_empty(),
        "ethtool -S {dev}: no xdp_packets counter in\n{stats}"
    );
    counts.iter().sum()
}

/// `n` rules of one shape (a source /24 and a destination port), of which
/// only the last matches the benchmark's probe (from 192.0.2.99 to UDP
/// port 9999): every rule adds intervals to the same two fields, so the
/// sizes differ only in the number of rules.
fn rule_set(n: usize, last: RuleAction) -> Vec<moat_dataplane::RuleSpec> {
    (0..n)
        .map(|i| {
            if i + 1 == n {
                spec_rule(
                    &format!("r{i}"),
                    "ip.src in {192.0.2.0/24} and udp.dstport == 9999",
                    last,
                )
            } else {
                let text = format!(
                    "ip.src in {{10.{}.{}.0/24}} and udp.dstport == {}",
                    i / 256,
                    i % 256,
                    10_000 + i
                );
                spec_rule(&format!("r{i}"), &text, RuleAction::Drop)
            }
        })
        .collect()
}

/// The rule paths: drop by the last of 1 / 100 / 1,024 operator rules;
/// pass by the last of 1 / 100 / 1,024 firewall rules, then encapsulation;
/// drop by an exhausted rate limit. Each as ns/packet, x bare drop, and x
/// its own cost at 1 rule.
fn rules(bare: &BareDrop, plan: &Plan) {
    let probe = packet::eth(
        Frame::default(),
        &packet::ip(
            "192.0.2.99".parse().expect("address"),
            "203.0.113.5".parse().expect("address"),
            64,
            L4::Udp {
                sport: 4000,
                dport: 9999,
            },
            &[0u8; 22],
        ),
    );
    use moat_common::Reason;
    // (label, spec, action, may rewrite the packet (timed through the
    // harness), the reason the probe ends under)
    let mut rows: Vec<(String, Spec, u32, bool, Reason)> = Vec::new();
    for n in [1usize, 100, 1024] {
        let mut spec = fixture::standard_spec();
        spec.mitigation = rule_set(n, RuleAction::Drop);
        rows.push((
            format!("drop by operator rule {n} of {n}"),
            spec,
            1,
            false,
            Reason::DropMitigationRule,
        ));
    }
    for n in [1usize, 100, 1024] {
        let mut spec = fixture::standard_spec();
        spec.customers[0].firewall = rule_set(n, RuleAction::Pass);
        rows.push((
            format!("firewall allow by rule {n} of {n}, then encap"),
            spec,
            4,
            true,
            Reason::ForwardEncap,
        ));
    }
    let mut spec = fixture::standard_spec();
    spec.mitigation = vec![spec_rule(
        "limited",
        "udp.dstport == 9999",
        RuleAction::RateLimit(RateLimit {
            pps: 1,
            per: RatePer::Rule,
        }),
    )];
    // Timed through the harness, which restores the probe after every
    // run: the bucket refills at 1 pps, and a probe it lets through is
    // encapsulated in place; timed directly, every later repeat would time
    // that GRE packet (not protected: the miss path) instead.
    rows.push((
        "drop by an exhausted rate limit (1 rule)".into(),
        spec,
        1,
        true,
        Reason::DropRateLimit,
    ));
    let mut spec = fixture::standard_spec();
    spec.protections = 0;
    rows.push((
        "encap, no rules, no protections (for reference)".into(),
        spec,
        4,
        true,
        Reason::ForwardEncap,
    ));

    // One data plane per row, all timed in turn round after round: the
    // machine's slow swings in speed fall on every row alike.
    struct Row {
        label: String,
        f: Fixture,
        rewrites: bool,
        ns: Vec<f64>,
        ratio: Vec<f64>,
    }
    let mut timed = Vec::new();
    for (label, spec, action, rewrites, reason) in rows {
        let mut f = Fixture::new("bench-rules");
        f.dp.load_bench_programs().expect("loading the benchmark harness");
        f.apply(spec);
        {
            let _in = f.ns.enter().expect("enter namespace");
            // After a rate limit's initial credit and burst are taken.
            for _ in 0..2 {
                f.dp.run(&probe, f.ingress).expect("run");
            }
            let before = f.dp.counters([], []).expect("counters").packets(reason);
            let once = f.dp.run(&probe, f.ingress).expect("run");
            assert_eq!(once.action, action, "{label}: unexpected action");
            let after = f.dp.counters([], []).expect("counters").packets(reason);
            assert_eq!(after, before + 1, "{label}: the probe does not end as {reason:?}");
        }
        timed.push(Row {
            label,
            f,
            rewrites,
            ns: Vec::new(),
            ratio: Vec::new(),
        });
    }
    for _ in 0..plan.rounds {
        for row in timed.iter_mut() {
            let f = &row.f;
            let _in = f.ns.enter().expect("enter namespace");
            let base = bare.time_repeat(&probe, plan.repeat).expect("bare");
            let v = if row.rewrites {
                let overhead =
                    f.dp.time_harness(&probe, plan.repeat, true, f.ingress)
                        .expect("harness")
                        - base;
                f.dp.time_harness(&probe, plan.repeat, false, f.ingress).expect("time") - overhead
            } else {
                f.dp.time_repeat(&probe, plan.repeat, f.ingress).expect("time")
            };
            row.ns.push(v);
            row.ratio.push(v / base);
        }
    }
    println!("## Rules");
    println!();
    println!(
        "One data plane per row, all timed in turn in each of {} rounds; \"x at 1 rule\" is the median of the \
         per-round ratios.",
        plan.rounds
    );
    println!();
    println!("| path | ns/packet | x bare drop | x the same path at 1 rule |");
    println!("|---|---:|---:|---:|");
    let mut one = 0;
    for (i, row) in timed.iter().enumerate() {
        if row.label.contains(" 1 of 1") {
            one = i;
        }
        let growth = if row.label.contains(" of ") {
            let per_round = row.ns.iter().zip(&timed[one].ns).map(|(a, b)| a / b).collect();
            format!("{:.2}", median(per_round))
        } else {
            "".into()
        };
        let (ns, ratio) = (median(row.ns.clone()), median(row.ratio.clone()));
        println!("| {} | {ns:.1} | {ratio:.2} | {growth} |", row.label);
    }
    println!();
    println!("Targets: drop by a rule <= 1.5x bare drop; cost at 1,024 rules <= 1.3x the cost at 1 rule.");
}
