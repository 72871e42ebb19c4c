//! The benchmark suite: moat side by side with what an operator would
//! otherwise use (xdp-filter, nftables, iptables, the kernel's forwarding
//! path), all measured in one run on this machine, every throughput also
//! as a ratio to a bare XDP_DROP measured in the same run. Writes a
//! markdown report and SVG plots, and prints the report.
//!
//! Traffic: the project's live-frames generator (BPF_PROG_TEST_RUN with
//! live frames) in namespaces of the suite's own, from the documentation
//! ranges; every flood is bounded in frames and time.
//!
//! Method for throughput rows: the generator runs on one CPU, the receiving
//! veth polls in its own NAPI thread pinned to the other CPU, and the rate is
//! the frames the receiving side took from its queue (veth's
//! `rx_queue_N_xdp_packets`) over the time the generator's send loop ran, as
//! the kernel timed it (each system call's setup sends nothing): what one core of
//! the receiver gets through. Every row checks that the frames met the fate
//! it claims (dropped by the filter's rule, or delivered through the path).
//!
//! Usage: moat-suite [--smoke] [--out DIR] [--only ROW-ID]
//!   --smoke: tiny counts, every row once, no speed targets judged (CI)
//!   --out:   where BENCHMARKS.md and bench/*.svg go (default target/bench)
//!   --only:  only this row, or this group of rows ("filter", "filter.moat"); every row prints its id

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use moat_common::Reason;
use moat_dataplane::{
    compile, flood::Flood, flood::Template, CustomerSpec, Dataplane, NextHop, RouteSpec, RuleAction, RuleSpec, Spec,
    XdpMode,
};
use moat_lab::{
    baseline::{BareDrop, PinnedBareDrop},
    fixture::{self, Fixture},
    flood::{self, Target},
    netns::{self, veth, NetNs},
    packet::{self, Frame, L4},
    peers::{self, rule, XdpFilter, FLOOD_PORT},
    plot::{self, Series},
    rules::spec_rule,
    sock,
};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Plan {
    smoke: bool,
    runs: usize,
    frames: u64,
    repeat: u32,
    only: Option<String>,
    out: PathBuf,
    /// CPUs of the machine (counted before the suite pins itself).
    cpus: usize,
    gen_cpu: usize,
    rx_cpu: usize,
}

impl Plan {
    fn wants(&self, id: &str) -> bool {
        // The id itself, or a group of ids: "filter", "filter.moat", ...
        self.only
            .as_ref()
            .is_none_or(|o| id == o || id.strip_prefix(o.as_str()).is_some_and(|rest| rest.starts_with('.')))
    }
    /// Whether any row of `group` runs.
    fn touches(&self, group: &str) -> bool {
        self.only.as_ref().is_none_or(|o| {
            o == group
                || o.strip_prefix(group).is_some_and(|rest| rest.starts_with('.'))
                || group.strip_prefix(o.as_str()).is_some_and(|rest| rest.starts_with('.'))
        })
    }
    fn command(&self, id: &str) -> String {
        format!("`moat-suite --only {id}`")
    }
}

/// Median and range of one figure's runs.
#[derive(Clone, Copy, Debug)]
struct Fig {
    median: f64,
    min: f64,
    max: f64,
}

fn fig(mut v: Vec<f64>) -> Fig {
    assert!(!v.is_empty(), "a figure without runs");
    v.sort_by(|a, b| a.total_cmp(b));
    Fig {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    }
}

impl Fig {
    fn range(&self, digits: usize) -> String {
        format!("{:.*}-{:.*}", digits, self.min, digits, self.max)
    }
}

/// The report: printed line by line as it grows, written at the end.
#[derive(Default)]
struct Report {
    text: String,
}

impl Report {
    fn line(&mut self, s: impl AsRef<str>) {
        println!("{}", s.as_ref());
        self.text.push_str(s.as_ref());
        self.text.push('\n');
    }
}

/// What the suite measured, for the targets and plots.
#[derive(Default)]
struct Results {
    ceiling: Option<Fig>,
    /// (filter, rules) -> Mpps
    filters: BTreeMap<(&'static str, usize), Fig>,
    /// (path, frame size) -> Mpps
    transit: BTreeMap<(&'static str, usize), Fig>,
    /// (customers, prefixes) -> IPv4 forward-path ns/packet
    scale: BTreeMap<(usize, usize), Fig>,
}

// ---------------------------------------------------------------------
// Live frames

/// Sum of a veth's per-queue counter `rx_queue_N_<name>`.
fn veth_stat(ns: &NetNs, dev: &str, name: &str) -> Res<u64> {
    let out = ns.exec("ethtool", &["-S", dev])?;
    let suffix = format!("_{name}:");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("rx_queue_") && l.contains(&suffix))
        .filter_map(|l| l.rsplit(':').next()?.trim().parse::<u64>().ok())
        .sum())
}

/// Frames the receiving veth took from its queues.
fn taken(ns: &NetNs, dev: &str) -> Res<u64> {
    veth_stat(ns, dev, "xdp_packets")
}

/// Makes `dev` poll in NAPI threads of its own, pinned to `cpu`.
fn threaded_napi(ns: &NetNs, dev: &str, cpu: usize) -> Res<()> {
    let before = sock::napi_threads("napi/");
    ns.exec("sh", &["-c", &format!("echo 1 > /sys/class/net/{dev}/threaded")])?;
    let mine: Vec<u32> = sock::napi_threads("napi/")
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    if mine.is_empty() {
        return Err(format!("{dev}: no NAPI thread appeared").into());
    }
    for pid in mine {
        sock::pin_pid(pid, cpu)?;
    }
    Ok(())
}

/// One flood of `frames` from `gen`'s g0; returns Mpps through the
/// receiver (frames `count` moved by, over the generator's send-loop time) and
/// the frames counted.
fn flood_rate(
    plan: &Plan,
    gen: &NetNs,
    g0: u32,
    generator: &mut Flood,
    template: &Template,
    count: &dyn Fn() -> Res<u64>,
) -> Res<(f64, u64)> {
    let before = count()?;
    let r = {
        let _in = gen.enter()?;
        generator.run(template, g0, plan.frames, Duration::from_secs(20))?
    };
    // The receiver finishes what is queued.
    std::thread::sleep(Duration::from_millis(50));
    let n = count()? - before;
    Ok((n as f64 / r.busy.as_secs_f64() / 1e6, n))
}

/// The UDP flood of the filtering rows: 64-byte frames from 192.0.2.0/24
/// (the last rule's source) to acme's 203.0.113.5, port 9999.
fn udp_flood(gen: &NetNs, sink: &NetNs, dst: Ipv4Addr, size: usize) -> Template {
    let t = Target {
        src: Ipv4Addr::new(192, 0, 2, 0),
        random_bits: 8,
        dst,
        ..Target::acme(gen, "g0", sink, "s0")
    };
    flood::udp(&t, FLOOD_PORT, size.saturating_sub(42))
}

/// moat's rule set of the benchmark's shape; the last rule `last`, the rest drop.
fn moat_rules(n: usize, last: RuleAction) -> Vec<RuleSpec> {
    (0..n)
        .map(|i| {
            let (src, port) = rule(i, n);
            let action = if i + 1 == n { last } else { RuleAction::Drop };
            spec_rule(
                &format!("r{i}"),
                &format!("ip.src in {{{src}}} and udp.dstport == {port}"),
                action,
            )
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Receiver {
    Bare,
    Moat,
    XdpFilter,
    NftLinear,
    NftSet,
    Iptables,
}

impl Receiver {
    fn id(self) -> &'static str {
        match self {
            Receiver::Bare => "bare-drop",
            Receiver::Moat => "moat",
            Receiver::XdpFilter => "xdp-filter",
            Receiver::NftLinear => "nft-linear",
            Receiver::NftSet => "nft-set",
            Receiver::Iptables => "iptables",
        }
    }
    fn setup(self, n: usize) -> String {
        match self {
            Receiver::Bare => "XDP program `r0 = XDP_DROP; exit` (`ip link set dev s0 xdpdrv pinned ...`)".into(),
            Receiver::Moat => format!(
                "`mitigation.rules`: {n} x `ip.src in {{S}} and udp.dstport == P` (drop), XDP native"
            ),
            Receiver::XdpFilter => format!(
                "`xdp-filter load s0 --mode native --policy allow --features udp,ipv4`, then {n} x `xdp-filter port P --mode dst --proto udp` (ports only: its rule model has no prefix-and-port rules)"
            ),
            Receiver::NftLinear => format!(
                "`nft -f`: netdev ingress chain on s0, {n} x `ip saddr S udp dport P drop` (GRO on, so veth builds skbs)"
            ),
            Receiver::NftSet => format!(
                "`nft -f`: netdev ingress chain on s0, `ip saddr . udp dport @blocked drop`, interval set of {n} elements"
            ),
            Receiver::Iptables => format!(
                "`iptables-legacy-restore`: raw PREROUTING, {n} x `-s S -p udp --dport P -j DROP` (GRO on)"
            ),
        }
    }
}

/// One filtering row: a fresh generator/sink pair, `filter` with `n` rules
/// on the sink's s0, Mpps over the plan's runs. Checks that what the
/// receiver took was dropped by the filter (its own count).
fn filter_row(plan: &Plan, drop_prog: &PinnedBareDrop, filter: Receiver, n: usize) -> Res<Fig> {
    let gen = NetNs::new("sg")?;
    let sink = NetNs::new("ss")?;
    veth(&gen, "g0", &sink, "s0");
    let g0 = gen.ifindex("g0");
    let mut dp = None;
    let mut xf = None;
    match filter {
        Receiver::Bare => drop_prog.attach(&sink, "s0"),
        Receiver::Moat => {
            let mut d = Dataplane::load()?;
            {
                let _in = sink.enter()?;
                d.attach("s0", XdpMode::Driver)?;
            }
            let mut spec = fixture::standard_spec();
            spec.mitigation = moat_rules(n, RuleAction::Drop);
            let hop = NextHop {
                ifindex: sink.ifindex("s0"),
                smac: sink.mac("s0"),
                dmac: gen.mac("g0"),
                link_mtu: 1500,
            };
            d.apply(&compile(&spec, &|_| Some(hop), None)?)?;
            dp = Some(d);
        }
        Receiver::XdpFilter => xf = Some(XdpFilter::load(&sink, "s0", n)?),
        Receiver::NftLinear | Receiver::NftSet => {
            sink.exec("ethtool", &["-K", "s0", "gro", "on"])?;
            peers::nft_load(&sink, &peers::nft_ingress("s0", n, filter == Receiver::NftSet))?;
        }
        Receiver::Iptables => {
            sink.exec("ethtool", &["-K", "s0", "gro", "on"])?;
            peers::iptables_load(&sink, &peers::iptables_raw(n))?;
        }
    }
    threaded_napi(&sink, "s0", plan.rx_cpu)?;
    let template = udp_flood(&gen, &sink, Ipv4Addr::new(203, 0, 113, 5), 64);
    let mut generator = Flood::load()?;
    // What the filter itself says it dropped.
    let dropped = || -> Res<u64> {
        Ok(match filter {
            Receiver::Bare | Receiver::XdpFilter => veth_stat(&sink, "s0", "xdp_drops")?,
            Receiver::Moat => dp
                .as_ref()
                .expect("moat loaded")
                .counters([], [])?
                .packets(Reason::DropMitigationRule),
            Receiver::NftLinear | Receiver::NftSet => peers::nft_counted(&sink)?,
            Receiver::Iptables => peers::iptables_counted(&sink)?,
        })
    };
    let mut rates = Vec::new();
    for _ in 0..plan.runs {
        let d0 = dropped()?;
        let (mpps, took) = flood_rate(plan, &gen, g0, &mut generator, &template, &|| taken(&sink, "s0"))?;
        let d = dropped()? - d0;
        // The filter dropped what the receiver took (a few frames of the
        // kernel's own may come and go on the link).
        if took == 0 || d < took * 99 / 100 {
            return Err(format!(
                "{} with {n} rules: the receiver took {took} frames, the filter dropped {d}",
                filter.id()
            )
            .into());
        }
        rates.push(mpps);
    }
    drop(xf);
    drop(dp);
    Ok(fig(rates))
}

#[derive(Clone, Copy, PartialEq)]
enum TransitPath {
    Moat,
    Kernel,
}

/// Customers of the kernel path: one policy rule each; the flood's
/// customer (acme, 203.0.113.0/24) comes last.
const KERNEL_CUSTOMERS: usize = 16;
const FIREWALL_RULES: usize = 100;

/// One clean-transit row: generator -> node (s0 .. c0) -> site (c1, a
/// bare XDP_DROP counting what arrives). Mpps delivered at the site.
fn transit_row(plan: &Plan, drop_prog: &PinnedBareDrop, path: TransitPath, size: usize) -> Res<Fig> {
    let gen = NetNs::new("tg")?;
    let node = NetNs::new("tn")?;
    let site = NetNs::new("ts")?;
    veth(&gen, "g0", &node, "s0");
    veth(&node, "c0", &site, "c1");
    drop_prog.attach(&site, "c1");
    let g0 = gen.ifindex("g0");
    let mut dp = None;
    match path {
        TransitPath::Moat => {
            let mut d = Dataplane::load()?;
            {
                let _in = node.enter()?;
                d.attach("s0", XdpMode::Driver)?;
            }
            let mut spec = fixture::standard_spec();
            spec.customers[0].firewall = moat_rules(FIREWALL_RULES, RuleAction::Pass);
            let hop = NextHop {
                ifindex: node.ifindex("c0"),
                smac: node.mac("c0"),
                dmac: site.mac("c1"),
                link_mtu: 1500,
            };
            d.apply(&compile(&spec, &|_| Some(hop), None)?)?;
            dp = Some(d);
        }
        TransitPath::Kernel => {
            node.sysctl("net.ipv4.ip_forward", "1");
            node.ip(&["addr", "add", "169.254.1.1/24", "dev", "s0"]);
            node.ip(&["addr", "add", "169.254.2.1/24", "dev", "c0"]);
            let c1 = site.mac("c1");
            let mac = c1.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
            node.ip(&[
                "neigh",
                "add",
                "169.254.2.2",
                "lladdr",
                &mac,
                "dev",
                "c0",
                "nud",
                "permanent",
            ]);
            for k in 0..KERNEL_CUSTOMERS {
                let prefix = if k + 1 == KERNEL_CUSTOMERS {
                    "203.0.113.0/24".to_string()
                } else {
                    format!("198.51.100.{}/28", k * 16)
                };
                let table = (100 + k).to_string();
                let pref = (1000 + k).to_string();
                node.ip(&["rule", "add", "to", &prefix, "table", &table, "pref", &pref]);
                node.ip(&[
                    "route",
                    "add",
                    &prefix,
                    "via",
                    "169.254.2.2",
                    "dev",
                    "c0",
                    "table",
                    &table,
                ]);
            }
            peers::nft_load(&node, &peers::nft_forward(FIREWALL_RULES))?;
            node.exec("ethtool", &["-K", "s0", "gro", "on"])?;
        }
    }
    threaded_napi(&node, "s0", plan.rx_cpu)?;
    let t = Target {
        frame: Frame {
            src: gen.mac("g0"),
            dst: node.mac("s0"),
            vlan: None,
        },
        src: Ipv4Addr::new(192, 0, 2, 0),
        random_bits: 8,
        dst: Ipv4Addr::new(203, 0, 113, 5),
    };
    let template = flood::udp(&t, FLOOD_PORT, size - 42);
    let mut generator = Flood::load()?;
    let mut rates = Vec::new();
    for _ in 0..plan.runs {
        let f0 = match &dp {
            Some(d) => d.counters([], [])?.packets(Reason::ForwardEncap),
            None => 0,
        };
        let before = dp.as_ref().map(|d| d.counters([], [])).transpose()?;
        let (mpps, got) = flood_rate(plan, &gen, g0, &mut generator, &template, &|| taken(&site, "c1"))?;
        if got < plan.frames / 100 {
            let moved: Vec<(Reason, u64)> = match (&dp, before) {
                (Some(d), Some(b)) => {
                    let a = d.counters([], [])?;
                    Reason::ALL
                        .iter()
                        .map(|r| (*r, a.packets(*r) - b.packets(*r)))
                        .filter(|(_, n)| *n > 0)
                        .collect()
                }
                _ => Vec::new(),
            };
            let stats = |ns: &NetNs, dev: &str| {
                ns.exec("ethtool", &["-S", dev])
                    .map(|o| {
                        String::from_utf8_lossy(&o.stdout)
                            .split_whitespace()
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default()
            };
            return Err(format!(
                "transit {size} B: only {got} of {} frames arrived (moat's counts: {moved:?}); s0: {}; c0: {}; c1: {}",
                plan.frames,
                stats(&node, "s0"),
                stats(&node, "c0"),
                stats(&site, "c1")
            )
            .into());
        }
        if let Some(d) = &dp {
            let encapsulated = d.counters([], [])?.packets(Reason::ForwardEncap) - f0;
            if encapsulated < got * 99 / 100 {
                return Err(format!("moat transit: {got} frames arrived, {encapsulated} encapsulated").into());
            }
        }
        rates.push(mpps);
    }
    Ok(fig(rates))
}

/// moat dropping the flood by rule 1,024 of 1,024 on `cpus` CPUs: a
/// veth with a queue per CPU, one generator pinned to each CPU (each
/// CPU's frames land on its own queue, polled on that CPU).
fn cpus_row(plan: &Plan, cpus: usize) -> Res<Fig> {
    let all = plan.cpus;
    let gen = NetNs::new("cg")?;
    let sink = NetNs::new("cs")?;
    netns::veth_queues(&gen, "g0", &sink, "s0", all);
    let mut dp = Dataplane::load()?;
    {
        let _in = sink.enter()?;
        dp.attach("s0", XdpMode::Driver)?;
    }
    let mut spec = fixture::standard_spec();
    spec.mitigation = moat_rules(1024, RuleAction::Drop);
    dp.apply(&compile(&spec, &|_| None, None)?)?;
    let template = udp_flood(&gen, &sink, Ipv4Addr::new(203, 0, 113, 5), 64);
    let g0 = gen.ifindex("g0");
    let frames = plan.frames;
    let mut rates = Vec::new();
    for _ in 0..plan.runs {
        // Each CPU's frames are dropped on that CPU: the rate is the sum
        // of each CPU's drops over its generator's send-loop time.
        let before = dp.reason_per_cpu(Reason::DropMitigationRule)?;
        let ready = std::sync::Barrier::new(cpus);
        let busy = std::thread::scope(|s| -> Res<Vec<f64>> {
            let threads: Vec<_> = (0..cpus)
                .map(|cpu| {
                    let (gen, template, ready) = (&gen, &template, &ready);
                    s.spawn(move || -> Result<f64, String> {
                        sock::pin_thread(cpu);
                        let mut flood = Flood::load().map_err(|e| e.to_string())?;
                        let _in = gen.enter().map_err(|e| e.to_string())?;
                        ready.wait();
                        let r = flood
                            .run(template, g0, frames, Duration::from_secs(20))
                            .map_err(|e| e.to_string())?;
                        Ok(r.busy.as_secs_f64())
                    })
                })
                .collect();
            let mut busy = Vec::new();
            for t in threads {
                busy.push(t.join().map_err(|_| "generator thread panicked")??);
            }
            Ok(busy)
        })?;
        std::thread::sleep(Duration::from_millis(50));
        let after = dp.reason_per_cpu(Reason::DropMitigationRule)?;
        let dropped: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let took = taken(&sink, "s0")?;
        if dropped.iter().take(cpus).any(|n| *n == 0) {
            return Err(format!("{cpus} CPUs: a CPU dropped nothing: {dropped:?} ({took} taken)").into());
        }
        rates.push(dropped.iter().zip(&busy).map(|(n, t)| *n as f64 / t).sum::<f64>() / 1e6);
    }
    // Back to the suite's CPU.
    sock::pin_thread(plan.gen_cpu);
    Ok(fig(rates))
}

// ---------------------------------------------------------------------
// Scale (BPF_PROG_TEST_RUN)

/// The filler prefix number `k`: IPv4 /24s in 10.0.0.0/8 for the first
/// 65,536, then IPv6 /56s in 2001:db8::/32. No packet is ever sent to them.
fn filler_prefix(k: usize) -> IpNet {
    if k < 65_536 {
        let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + ((k as u32) << 8));
        IpNet::V4(Ipv4Net::new(a, 24).expect("prefix"))
    } else {
        let j = (k - 65_536) as u128;
        IpNet::V6(Ipv6Net::new(Ipv6Addr::from((0x2001_0db8u128 << 96) | (j << 72)), 56).expect("prefix"))
    }
}

/// `customers` customers protecting `prefixes` prefixes in all: acme (the
/// probe's customer, 203.0.113.0/24 routed over one tunnel) and fillers
/// with two tunnels and a route for their first prefix each (route sets
/// are limited; protected prefixes without a route are allowed).
fn scale_spec(customers: usize, prefixes: usize) -> Spec {
    let mut spec = Spec {
        node_addresses: vec![Ipv4Addr::new(169, 254, 10, 0)],
        protections: moat_common::protect::ALL,
        mitigation: vec![],
        customers: vec![CustomerSpec {
            name: "acme".into(),
            prefixes: vec![fixture::net("203.0.113.0/24")],
            egress_prefixes: vec![],
            tunnels: vec![fixture::tunnel("acme-a", [192, 0, 2, 10], None)],
            routes: vec![fixture::route("203.0.113.0/24", "acme-a", 100, 100)],
            firewall: vec![],
        }],
    };
    let fillers = customers - 1;
    let rest = prefixes - 1;
    if fillers == 0 {
        // One customer: acme holds them all.
        spec.customers[0].prefixes.extend((0..rest).map(filler_prefix));
        return spec;
    }
    let mut k = 0;
    for c in 0..fillers {
        let share = rest / fillers + usize::from(c < rest % fillers);
        let prefs: Vec<IpNet> = (0..share).map(|i| filler_prefix(k + i)).collect();
        k += share;
        let tunnels = (0..2)
            .map(|t| moat_dataplane::TunnelSpec {
                remote: Ipv4Addr::from(u32::from(Ipv4Addr::new(169, 254, 128, 0)) + (c * 2 + t) as u32),
                ..fixture::tunnel(&format!("t{t}"), [0; 4], None)
            })
            .collect();
        let routes = prefs
            .first()
            .map(|p| RouteSpec {
                prefix: *p,
                tunnel: "t0".into(),
                priority: 100,
                weight: 100,
            })
            .into_iter()
            .collect();
        spec.customers.push(fixture::filler(c, prefs, tunnels, routes));
    }
    spec
}

/// IPv4 64-byte UDP to acme: encapsulated and sent (XDP_REDIRECT).
fn forward_probe() -> Vec<u8> {
    packet::eth(
        Frame::default(),
        &packet::ip(
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99)),
            IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5)),
            64,
            L4::Udp { sport: 4000, dport: 53 },
            &[0u8; 22],
        ),
    )
}

/// One data plane holding a scale configuration, ready to be timed.
struct Scaled {
    customers: usize,
    prefixes: usize,
    f: Fixture,
    /// Seconds the cold compile and apply took.
    applied: f64,
    ns: Vec<f64>,
    ratio: Vec<f64>,
}

fn scale_setup(customers: usize, prefixes: usize) -> Res<Scaled> {
    let mut f = Fixture::new("suite");
    f.dp.load_bench_programs()?;
    let spec = scale_spec(customers, prefixes);
    let t = Instant::now();
    let compiled = compile(&spec, &|_| f.next_hop(0, 0), f.dp.applied())?;
    f.dp.apply(&compiled)?;
    let applied = t.elapsed().as_secs_f64();
    let once = {
        let _in = f.ns.enter()?;
        f.dp.run(&forward_probe(), f.ingress)?
    };
    if once.action != 4 {
        return Err(format!(
            "scale {customers}/{prefixes}: the probe got action {}, not redirect",
            once.action
        )
        .into());
    }
    Ok(Scaled {
        customers,
        prefixes,
        f,
        applied,
        ns: Vec::new(),
        ratio: Vec::new(),
    })
}

/// Times every configuration in turn, round after round, so that the
/// machine's slow swings in speed fall on all of them alike: per round,
/// the bare drop, the harness alone and the harness around moat.
fn scale_time(plan: &Plan, bare: &BareDrop, all: &mut [Scaled]) -> Res<()> {
    let probe = forward_probe();
    // Cheap runs, noisy machine: more of them than elsewhere.
    for _ in 0..plan.runs * 2 + 1 {
        for s in all.iter_mut() {
            let _in = s.f.ns.enter()?;
            let base = bare.time_repeat(&probe, plan.repeat)?;
            let overhead = s.f.dp.time_harness(&probe, plan.repeat, true, s.f.ingress)? - base;
            let v = s.f.dp.time_harness(&probe, plan.repeat, false, s.f.ingress)? - overhead;
            s.ns.push(v);
            s.ratio.push(v / base);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------
// Control plane (the project's own benchmarks, run as programs)

fn sibling(name: &str) -> Res<PathBuf> {
    let p = std::env::current_exe()?.with_file_name(name);
    if !p.exists() {
        return Err(format!(
            "{} is missing: build it first (cargo build --release -p moat -p moat-lab --bins)",
            p.display()
        )
        .into());
    }
    Ok(p)
}

fn run_sibling(name: &str, args: &[&str]) -> Res<String> {
    let out = netns::run(Command::new(sibling(name)?).args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The number after `key` in `line` ("... key 12.5 ms ...").
fn number_after(line: &str, key: &str) -> Option<f64> {
    let rest = &line[line.find(key)? + key.len()..];
    rest.split_whitespace()
        .next()?
        .trim_end_matches([',', ';'])
        .parse()
        .ok()
}

struct ApplyRun {
    prefixes: usize,
    cold_ms: f64,
    change_ms: f64,
    change_max_ms: f64,
}

fn apply_run(customers: usize) -> Res<ApplyRun> {
    let out = run_sibling("moat-apply-bench", &["--customers", &customers.to_string()])?;
    let find = |start: &str| out.lines().find(|l| l.trim_start().starts_with(start)).unwrap_or("");
    let config = find("configuration:");
    let cold = find("cold:");
    let change = find("one-customer change");
    let parse = || -> Option<ApplyRun> {
        Some(ApplyRun {
            prefixes: number_after(config, "customers,")? as usize,
            cold_ms: number_after(cold, "compile")? + number_after(cold, "apply")?,
            change_ms: number_after(change, "compile+apply median")?,
            change_max_ms: number_after(change, "max")?,
        })
    };
    parse().ok_or_else(|| format!("moat-apply-bench printed nothing to read:\n{out}").into())
}

// ---------------------------------------------------------------------

fn machine(cpus: usize) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let srso =
        std::fs::read_to_string("/sys/devices/system/cpu/vulnerabilities/spec_rstack_overflow").unwrap_or_default();
    format!(
        "{cpu}, {cpus} CPUs, kernel {}, SRSO mitigation: {}",
        kernel.trim(),
        srso.trim()
    )
}

fn moat_version() -> String {
    let rev = Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown commit".into());
    format!("moat {} ({rev})", env!("CARGO_PKG_VERSION"))
}

fn today() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("moat-suite: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let (mut smoke, mut out, mut only) = (false, PathBuf::from("target/bench"), None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--smoke" => smoke = true,
            "--out" => out = PathBuf::from(args.next().ok_or("--out needs a directory")?),
            "--only" => only = Some(args.next().ok_or("--only needs a row id or group")?),
            "-h" | "--help" => {
                println!("usage: moat-suite [--smoke] [--out DIR] [--only ROW-ID]");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?} (see --help)").into()),
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("must run as root (XDP programs, network namespaces)".into());
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let plan = Plan {
        smoke,
        runs: if smoke { 1 } else { 5 },
        frames: if smoke { 20_000 } else { 3_000_000 },
        repeat: if smoke { 2_000 } else { 1_000_000 },
        only,
        out,
        cpus,
        gen_cpu: 0,
        rx_cpu: cpus.min(2) - 1,
    };
    sock::pin_thread(plan.gen_cpu);
    let started = Instant::now();
    let mut r = Report::default();
    let mut res = Results::default();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    r.line("# moat benchmarks");
    r.line("");
    r.line(format!(
        "Date: {}. Produced by `{command}` (`make bench` runs it with `--out target/bench`){}.",
        today(),
        if plan.smoke {
            " in smoke mode: tiny counts, single runs; the figures mean nothing"
        } else {
            ""
        }
    ));
    r.line("");
    r.line(format!("- Machine: {}", machine(plan.cpus)));
    r.line(format!("- {}", moat_version()));
    r.line(format!(
        "- Peers: {}; {}; {}",
        peers::version("xdp-filter"),
        peers::version("nft"),
        peers::version("iptables-legacy")
    ));
    r.line(format!(
        "- Method: the live-frames generator on CPU {} floods a veth whose other end polls in its own NAPI thread \
         pinned to CPU {}; a rate is the frames that end took from its queue over the time the generator's \
         send loop ran, as the kernel timed it (each system call's setup around it sends nothing; {} frames \
         per run). Every figure is the median of {} run(s) with min-max; every throughput also as a \
         ratio to the bare XDP_DROP ceiling of this run. Every row checks the frames' fate (dropped by the \
         filter's own count, or delivered through the path) and fails otherwise.",
        plan.gen_cpu, plan.rx_cpu, plan.frames, plan.runs
    ));
    r.line("");
    r.line(
        "Caveats: a veth is not a NIC (no DMA, no interrupts; the generator's frames are recycled pages); \
            2 vCPUs of a VM, where the host's neighbours and the SRSO \"Safe RET\" mitigation (every BPF \
            helper call and return costs tens of ns) weigh on every figure; the kernel forwarding path has no \
            GRE (this kernel has no GRE device), which flatters it against moat, which encapsulates. The \
            ceiling is set by veth's own receive work per frame (queue, frame and page handling), not by XDP: \
            the generator alone sends several times faster.",
    );
    r.line("");

    let drop_prog = PinnedBareDrop::new()?;

    // 1. Ceiling.
    r.line("## 1. Drop ceiling");
    r.line("");
    r.line("| row | Mpps (median) | min-max | x ceiling | setup | command |");
    r.line("|---|---:|---|---:|---|---|");
    let id = "ceiling.bare-drop";
    let ceiling = filter_row(&plan, &drop_prog, Receiver::Bare, 0)?;
    res.ceiling = Some(ceiling);
    r.line(format!(
        "| bare XDP_DROP on the receiving veth | {:.2} | {} | 1.00 | {} | {} |",
        ceiling.median,
        ceiling.range(2),
        Receiver::Bare.setup(0),
        plan.command(id)
    ));
    r.line("");

    // 2. Filtering.
    r.line("## 2. Filtering a UDP flood, the last rule matching");
    r.line("");
    r.line(
        "64-byte UDP frames from 192.0.2.0/24 (random low byte and source port) to 203.0.113.5 port 9999; \
         rules `source /24 and destination port`, of which only the last matches.",
    );
    r.line("");
    r.line("| filter | rules | Mpps (median) | min-max | x ceiling | setup | command |");
    r.line("|---|---:|---:|---|---:|---|---|");
    let filters = [
        Receiver::Moat,
        Receiver::XdpFilter,
        Receiver::NftLinear,
        Receiver::NftSet,
        Receiver::Iptables,
    ];
    for filter in filters {
        for n in [1usize, 100, 1024] {
            let id = format!("filter.{}.{n}", filter.id());
            if !plan.wants(&id) {
                continue;
            }
            let f = filter_row(&plan, &drop_prog, filter, n)?;
            res.filters.insert((filter.id(), n), f);
            r.line(format!(
                "| {} | {n} | {:.3} | {} | {:.3} | {} | {} |",
                filter.id(),
                f.median,
                f.range(3),
                f.median / ceiling.median,
                filter.setup(n),
                plan.command(&id)
            ));
        }
    }
    r.line("");
    if !res.filters.is_empty() {
        let series: Vec<Series> = filters
            .iter()
            .map(|f| Series {
                label: f.id().into(),
                points: res
                    .filters
                    .iter()
                    .filter(|((name, _), _)| *name == f.id())
                    .map(|((_, n), v)| (*n as f64, v.median.max(1e-4)))
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .chain([Series {
                label: "bare XDP_DROP (ceiling)".into(),
                points: vec![(1.0, ceiling.median), (1024.0, ceiling.median)],
            }])
            .collect();
        plot_to(&plan.out, "filtering.svg", |p| {
            plot::line_chart(
                p,
                "UDP flood filtered, last rule matching",
                "rules",
                "Mpps (one receiving core)",
                true,
                true,
                &series,
            )
        })?;
        r.line("![Mpps vs rules](bench/filtering.svg)");
        r.line("");
    }

    // 3. Clean transit.
    r.line("## 3. Clean transit");
    r.line("");
    r.line(format!(
        "UDP from 192.0.2.0/24 to a protected customer, delivered to the customer's link (a counting XDP_DROP \
         at the far end). moat: classification, the customer's firewall of {FIREWALL_RULES} rules (the last \
         allows), route, GRE encapsulation and XDP_REDIRECT. Kernel: ip_forward, {KERNEL_CUSTOMERS} policy-routing \
         rules (one per customer, the flood's customer last), an nftables forward chain of {FIREWALL_RULES} \
         rules that do not match, no GRE."
    ));
    r.line("");
    r.line("| path | frame | Mpps (median) | min-max | x ceiling | moat / kernel | command |");
    r.line("|---|---:|---:|---|---:|---:|---|");
    for size in [64usize, 512, 1400] {
        let mut pair = [None, None];
        for (i, (path, name)) in [(TransitPath::Moat, "moat"), (TransitPath::Kernel, "kernel")]
            .into_iter()
            .enumerate()
        {
            let id = format!("transit.{name}.{size}");
            if !plan.wants(&id) {
                continue;
            }
            let f = transit_row(&plan, &drop_prog, path, size)?;
            res.transit.insert((name, size), f);
            pair[i] = Some((f, id));
        }
        for (i, name) in ["moat", "kernel"].iter().enumerate() {
            if let Some((f, id)) = &pair[i] {
                let vs = match (&pair[0], &pair[1], i) {
                    (Some((m, _)), Some((k, _)), 0) => format!("{:.2}", m.median / k.median),
                    _ => String::new(),
                };
                r.line(format!(
                    "| {name} | {size} B | {:.3} | {} | {:.3} | {vs} | {} |",
                    f.median,
                    f.range(3),
                    f.median / ceiling.median,
                    plan.command(id)
                ));
            }
        }
    }
    r.line("");

    // 4. Scale.
    r.line("## 4. Scale");
    r.line("");
    r.line(
        "moat's forward path (IPv4 64 B, encapsulated and redirected) in ns/packet, kernel-timed with \
         BPF_PROG_TEST_RUN, against customers and protected prefixes: one data plane per configuration, all \
         timed in turn round after round. Fillers: IPv4 /24s in 10.0.0.0/8 (at \
         most 65,536), then IPv6 /56s in 2001:db8::/32; the probe's customer holds 203.0.113.0/24.",
    );
    r.line("");
    r.line("| customers | prefixes | ns/packet (median) | min-max | x bare drop (median of rounds) | compile + apply | command |");
    r.line("|---:|---:|---:|---|---:|---:|---|");
    {
        let bare = BareDrop::load()?;
        let mut all = Vec::new();
        for (customers, prefixes) in [
            (1usize, 1usize),
            (1_000, 1_000),
            (1_000, 100_000),
            (1_000, 1_000_000),
            (1, 100_000),
            (10_000, 100_000),
        ] {
            if plan.wants(&format!("scale.prefixes.{customers}.{prefixes}")) {
                all.push(scale_setup(customers, prefixes)?);
            }
        }
        scale_time(&plan, &bare, &mut all)?;
        for s in all {
            let (ns, ratio) = (fig(s.ns), fig(s.ratio));
            res.scale.insert((s.customers, s.prefixes), ns);
            r.line(format!(
                "| {} | {} | {:.1} | {} | {:.2} | {:.1} s | {} |",
                s.customers,
                s.prefixes,
                ns.median,
                ns.range(1),
                ratio.median,
                s.applied,
                plan.command(&format!("scale.prefixes.{}.{}", s.customers, s.prefixes))
            ));
        }
    }
    r.line("");
    let prefix_series: Vec<(f64, f64)> = res
        .scale
        .iter()
        .filter(|((c, p), _)| *c == 1_000 || (*c == 1 && *p == 1))
        .map(|((_, p), v)| (*p as f64, v.median))
        .collect();
    if prefix_series.len() > 1 {
        plot_to(&plan.out, "scale.svg", |p| {
            plot::line_chart(
                p,
                "moat forward path vs protected prefixes",
                "protected prefixes",
                "ns per packet",
                true,
                false,
                &[Series {
                    label: "IPv4 encap + redirect (1,000 customers)".into(),
                    points: prefix_series.clone(),
                }],
            )
        })?;
        r.line("![ns per packet vs prefixes](bench/scale.svg)");
        r.line("");
    }
    if plan.touches("scale.cpus") {
        r.line("| moat dropping by rule 1,024 of 1,024 | Mpps (median) | min-max | x ceiling | command |");
        r.line("|---|---:|---|---:|---|");
    }
    let mut per_cpu = Vec::new();
    for n in 1..=cpus.min(2) {
        let id = format!("scale.cpus.{n}");
        if !plan.wants(&id) {
            continue;
        }
        let f = cpus_row(&plan, n)?;
        per_cpu.push(f.median);
        r.line(format!(
            "| {n} CPU(s), one generator each (generator and receiver share each CPU) | {:.3} | {} | {:.3} | {} |",
            f.median,
            f.range(3),
            f.median / ceiling.median,
            plan.command(&id)
        ));
    }
    r.line("");
    if let [one, two] = per_cpu[..] {
        r.line(format!("2 CPUs / 1 CPU: {:.2}x.", two / one));
        r.line("");
    }

    // 5. Control plane.
    r.line("## 5. Control plane");
    r.line("");
    r.line("| configuration | cold compile + apply (ms) | min-max | one-customer change (ms, median) | min-max of run medians | worst change (ms) | command |");
    r.line("|---|---:|---|---:|---|---:|---|");
    for customers in [100usize, 1_000, 10_000] {
        let id = format!("control.apply.{customers}");
        if !plan.wants(&id) {
            continue;
        }
        let runs: Vec<ApplyRun> = (0..plan.runs).map(|_| apply_run(customers)).collect::<Res<_>>()?;
        let cold = fig(runs.iter().map(|a| a.cold_ms).collect());
        let change = fig(runs.iter().map(|a| a.change_ms).collect());
        let worst = runs.iter().map(|a| a.change_max_ms).fold(0.0, f64::max);
        r.line(format!(
            "| {customers} customers, {} prefixes | {:.1} | {} | {:.2} | {} | {worst:.2} | `moat-apply-bench --customers {customers}` |",
            runs[0].prefixes,
            cold.median,
            cold.range(1),
            change.median,
            change.range(2)
        ));
    }
    r.line("");
    if plan.touches("control.failover") {
        let trials = if plan.smoke { 1 } else { 5 };
        let rates = if plan.smoke { "high" } else { "high,mid,low" };
        let args = ["--trials", &trials.to_string(), "--rates", rates, "--no-load"];
        let out = run_sibling("moat-failover-bench", &args)?;
        r.line("| probe rate | failover (ms, median) | min-max | trials | command |");
        r.line("|---|---:|---|---:|---|");
        let mut rows = 0;
        for l in out.lines().map(str::trim) {
            let (Some(rate), Some(m), Some(lo), Some(hi)) = (
                l.split_whitespace().next(),
                number_after(l, "median"),
                number_after(l, "min"),
                number_after(l, "max"),
            ) else {
                continue;
            };
            let n = number_after(l, "(").unwrap_or(0.0);
            r.line(format!(
                "| {rate} | {m:.0} | {lo:.0}-{hi:.0} | {n:.0} | `moat-failover-bench {}` |",
                args.join(" ")
            ));
            rows += 1;
        }
        if rows == 0 {
            return Err(format!("moat-failover-bench printed no failover figures:\n{out}").into());
        }
        r.line("");
    }

    targets(&mut r, &plan, &res);
    r.line(format!("Suite run time: {:.0} s.", started.elapsed().as_secs_f64()));
    std::fs::create_dir_all(&plan.out)?;
    let path = plan.out.join("BENCHMARKS.md");
    std::fs::write(&path, &r.text)?;
    eprintln!("report written to {}", path.display());
    let beaten = ceiling_beaten(&res);
    if !plan.smoke && !beaten.is_empty() {
        return Err(format!(
            "the bare XDP_DROP ceiling read below {}: the host was busy while it ran, and every ratio of \
             this run is off (the report at {} says so); run the suite again",
            beaten.join(", "),
            path.display()
        )
        .into());
    }
    Ok(())
}

/// The filtering rows faster than the bare XDP_DROP ceiling, which does
/// less work per frame than any of them: a ceiling measured while the
/// host was busy, which makes every ratio of the run wrong.
fn ceiling_beaten(res: &Results) -> Vec<String> {
    let Some(ceiling) = res.ceiling else {
        return Vec::new();
    };
    res.filters
        .iter()
        .filter(|(_, f)| f.median > ceiling.median)
        .map(|((name, n), f)| {
            format!(
                "{name} with {n} rules ({:.2} Mpps against {:.2})",
                f.median, ceiling.median
            )
        })
        .collect()
}

fn plot_to(out: &Path, name: &str, draw: impl FnOnce(&Path) -> std::io::Result<()>) -> Res<()> {
    let dir = out.join("bench");
    std::fs::create_dir_all(&dir)?;
    draw(&dir.join(name))?;
    Ok(())
}

/// The targets, each judged met or missed from this run's figures.
fn targets(r: &mut Report, plan: &Plan, res: &Results) {
    r.line("## Targets");
    r.line("");
    if plan.smoke {
        r.line("Not judged in smoke mode.");
        r.line("");
        return;
    }
    let beaten = ceiling_beaten(res);
    if !beaten.is_empty() {
        r.line(format!(
            "**This run is not valid:** the bare XDP_DROP ceiling read below {}, rows that do more work per \
             frame than a bare drop. The host was busy while the ceiling ran; every ratio above is off.",
            beaten.join(", ")
        ));
        r.line("");
    }
    r.line("| target | measured | met | why not |");
    r.line("|---|---|---|---|");
    let mut row = |name: &str, measured: Option<(f64, String)>, ok: &dyn Fn(f64) -> bool, why: &str| {
        let (text, met, why) = match measured {
            Some((v, text)) if ok(v) => (text, "yes", ""),
            Some((_, text)) => (text, "**no**", why),
            // A run of some rows only (--only) leaves the others out.
            None if plan.only.is_some() => return,
            None => ("not measured in this run".into(), "-", ""),
        };
        r.line(format!("| {name} | {text} | {met} | {why} |"));
    };
    let f = |k: (&'static str, usize)| res.filters.get(&k).map(|v| v.median);
    row(
        "moat with 1,024 rules >= xdp-filter with 1 rule (Mpps)",
        f(("moat", 1024))
            .zip(f(("xdp-filter", 1)))
            .map(|(m, x)| (m / x, format!("{m:.2} vs {x:.2} ({:.2}x)", m / x))),
        &|v| v >= 1.0,
        "xdp-filter matches one field per rule with one array lookup (no prefix-and-port rules); moat \
         finds the packet's interval per field the rules use (the port in a direct table, the source in a \
         16-8-8 trie) and ANDs 1,024-bit candidate sets, inline (no BPF call, each of which costs tens \
         of ns under this CPU's SRSO \"Safe RET\" mitigation), then counts the packet per rule, customer \
         and reason. Needs a measurement on a machine without Safe RET.",
    );
    row(
        "moat with 1,024 rules >= 10x nftables with 1,024 linear rules",
        f(("moat", 1024))
            .zip(f(("nft-linear", 1024)))
            .map(|(m, x)| (m / x, format!("{m:.2} vs {x:.3} Mpps ({:.1}x)", m / x))),
        &|v| v >= 10.0,
        "see the filtering table: moat's rate at 1,024 rules is below ten times nftables'",
    );
    for size in [64usize, 512, 1400] {
        let m = res.transit.get(&("moat", size)).map(|v| v.median);
        let k = res.transit.get(&("kernel", size)).map(|v| v.median);
        row(
            &format!("moat clean transit >= 5x the kernel path, {size} B"),
            m.zip(k)
                .map(|(m, k)| (m / k, format!("{m:.2} vs {k:.2} Mpps ({:.2}x)", m / k))),
            &|v| v >= 5.0,
            "moat's forward path (classification, firewall, GRE, redirect) costs more than five times \
             the kernel's per-packet work here",
        );
    }
    let one = res.scale.get(&(1, 1)).map(|v| v.median);
    let million = res.scale.get(&(1_000, 1_000_000)).map(|v| v.median);
    row(
        "moat ns/packet at 1,000,000 prefixes <= 1.3x at 1 prefix",
        one.zip(million)
            .map(|(a, b)| (b / a, format!("{b:.1} vs {a:.1} ns ({:.2}x)", b / a))),
        &|v| v <= 1.3,
        "the destination lookup slows with the table's size (cache misses in a larger table)",
    );
    r.line("");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_row_above_the_ceiling_marks_the_run_not_valid() {
        let at = |m: f64| Fig {
            median: m,
            min: m,
            max: m,
        };
        let mut res = Results {
            ceiling: Some(at(4.0)),
            ..Results::default()
        };
        res.filters.insert(("moat", 1), at(3.9));
        res.filters.insert(("xdp-filter", 1), at(4.0));
        assert!(ceiling_beaten(&res).is_empty(), "equal or below: valid");
        res.filters.insert(("moat", 1024), at(4.2));
        assert_eq!(ceiling_beaten(&res), ["moat with 1024 rules (4.20 Mpps against 4.00)"]);
        res.ceiling = None;
        assert!(ceiling_beaten(&res).is_empty(), "no ceiling measured: nothing to judge");
    }

    #[test]
    fn figures_of_the_programs_run_are_read() {
        let cold = "cold: compile 12.5 ms, apply 40.25 ms, 1234 entries written, LPM fallback None";
        assert_eq!(number_after(cold, "compile"), Some(12.5));
        assert_eq!(number_after(cold, "apply"), Some(40.25));
        let change = "one-customer change (24 changes): compile+apply median 0.31 ms, min 0.10 ms, max 1.27 ms \
                      (compile median 0.20 ms, apply median 0.11 ms)";
        assert_eq!(number_after(change, "compile+apply median"), Some(0.31));
        assert_eq!(number_after(change, "max"), Some(1.27));
        let failover = "high (5 trials): median 386 ms, min 358 ms, max 460 ms";
        assert_eq!(number_after(failover, "("), Some(5.0));
        assert_eq!(number_after(failover, "min"), Some(358.0));
        assert_eq!(number_after("no figure here", "median"), None);
        assert_eq!(number_after("median soon", "median"), None);
    }

    #[test]
    fn rows_are_chosen_by_id_or_group() {
        let plan = |only: Option<&str>| Plan {
            smoke: true,
            runs: 1,
            frames: 1,
            repeat: 1,
            only: only.map(String::from),
            out: PathBuf::new(),
            cpus: 2,
            gen_cpu: 0,
            rx_cpu: 1,
        };
        assert!(plan(None).wants("filter.moat.1"));
        let p = plan(Some("filter.moat.1"));
        assert!(p.wants("filter.moat.1"));
        assert!(!p.wants("filter.moat.100"));
        assert!(p.touches("filter"));
        assert!(!p.touches("scale"));
        let p = plan(Some("filter"));
        assert!(p.wants("filter.nft-set.1024"));
        assert!(!p.wants("filters.x"));
        assert!(!p.wants("transit.moat.64"));
    }

    #[test]
    fn figures_are_median_and_range() {
        let f = fig(vec![3.0, 1.0, 2.0, 5.0, 4.0]);
        assert_eq!((f.median, f.min, f.max), (3.0, 1.0, 5.0));
        assert_eq!(f.range(1), "1.0-5.0");
    }

    #[test]
    fn scale_specs_hold_what_they_say() {
        for (customers, prefixes) in [(1usize, 1usize), (1, 1_000), (10, 1_000), (1_000, 100_000)] {
            let spec = scale_spec(customers, prefixes);
            assert_eq!(spec.customers.len(), customers);
            let all: Vec<IpNet> = spec.customers.iter().flat_map(|c| c.prefixes.clone()).collect();
            assert_eq!(all.len(), prefixes);
            let distinct: std::collections::BTreeSet<IpNet> = all.iter().copied().collect();
            assert_eq!(distinct.len(), prefixes, "prefixes overlap");
        }
        assert!(matches!(filler_prefix(65_535), IpNet::V4(_)));
        assert!(matches!(filler_prefix(65_536), IpNet::V6(_)));
    }
}
