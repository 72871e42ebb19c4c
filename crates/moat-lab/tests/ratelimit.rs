//! Rate-limit rules under live floods: the flood generator sends UDP to a
//! rate-limited port faster than the limit, from one thread per CPU into a
//! veth with one receive queue per CPU (so moat's XDP program runs on
//! every CPU at once, sharing the buckets); the packets moat lets through
//! per second must be within 10% of the configured rate. Bounded: each run
//! lasts about 2 s; the namespaces go at the end.

use std::time::{Duration, Instant};

use moat_common::Reason;
use moat_dataplane::{compile, flood::Flood, Compiled, Dataplane, RateLimit, RatePer, RuleAction, XdpMode};
use moat_lab::{
    flood::{self, Target},
    netns::NetNs,
    rules::spec_rule,
};

const RUN: Duration = Duration::from_secs(2);

/// Waits until the counters stop moving (the last frames are processed).
fn settled(dp: &Dataplane) -> moat_dataplane::Counters {
    let mut last = dp.counters([], []).expect("counters");
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = dp.counters([], []).expect("counters");
        if now == last {
            return now;
        }
        last = now;
    }
}

/// How long the flood kept reaching the rule: from the first move of the
/// count of packets it passed or dropped to the last move, each placed
/// halfway between the samples (a millisecond apart) that saw it,
/// sampled while `running` and until the count has stood still for
/// 100 ms after. `from` is that count before.
fn flowing(dp: &Dataplane, from: u64, running: impl Fn() -> bool) -> Duration {
    let count = || reached(dp) - from;
    let (mut last_at, mut last) = (Instant::now(), 0);
    let (mut first, mut end, mut still_since) = (None, None, Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(1));
        let (at, n) = (Instant::now(), count());
        if n != last {
            let when = last_at + (at - last_at) / 2;
            first.get_or_insert(when);
            end = Some(when);
            still_since = at;
        } else if !running() && at - still_since > Duration::from_millis(100) {
            break;
        }
        (last_at, last) = (at, n);
    }
    match (first, end) {
        (Some(first), Some(end)) => end - first,
        _ => panic!("no packet reached the rate-limited rule"),
    }
}

/// Packets that reached the rate-limited rule: what it dropped, and what
/// it passed on to routing (the tunnel's next hop is unresolved here, so
/// they end there, counted).
fn reached(dp: &Dataplane) -> u64 {
    [Reason::DropRateLimit, Reason::DropNoNextHop]
        .into_iter()
        .map(|r| dp.reason_per_cpu(r).expect("per CPU").iter().sum::<u64>())
        .sum()
}

#[test]
fn rate_limits_hold_within_ten_percent_under_floods_on_every_cpu() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let gen = NetNs::new("rl-gen").expect("namespace");
    let sink = NetNs::new("rl-sink").expect("namespace");
    moat_lab::netns::veth_queues(&gen, "g0", &sink, "s0", cpus);
    let mut dp = Dataplane::load().expect("load");
    {
        let _in = sink.enter().expect("enter sink");
        dp.attach("s0", XdpMode::Driver).expect("attach natively");
    }
    let target = Target::acme(&gen, "g0", &sink, "s0");
    let g0 = gen.ifindex("g0");
    let mut applied: Option<Compiled> = None;
    let mut results = Vec::new();
    for (pps, per) in [
        (1_000u64, RatePer::Rule),
        (1_000, RatePer::DstIp),
        (50_000, RatePer::DstIp),
        (250_000, RatePer::Rule),
        (1_000_000, RatePer::Rule),
        // Half what the generators reach here (4-5 Mpps on 2 CPUs): the
        // flood must stay over the limit throughout.
        (2_000_000, RatePer::Rule),
    ] {
        let mut spec = moat_lab::fixture::standard_spec();
        spec.mitigation = vec![spec_rule(
            "limit",
            "udp.dstport == 5000",
            RuleAction::RateLimit(RateLimit { pps, per }),
        )];
        let compiled = compile(&spec, &|_| None, applied.as_ref()).expect("compile");
        dp.apply(&compiled).expect("apply");
        applied = Some(compiled);
        // One generator per CPU. Each first sends a short warm-up (it
        // learns its pace, so the measured run is one long system call:
        // see `Flood::run`), then all start together once the counters
        // have settled. A rate is over the time the flood reached moat
        // (see `flowing`): the system calls' setup around the generators'
        // send loops sends nothing, and the loops do not start together.
        let (warm, go) = (std::sync::Barrier::new(cpus + 1), std::sync::Barrier::new(cpus + 1));
        let (before, before_cpu, sent, span) = std::thread::scope(|s| {
            let threads: Vec<_> = (0..cpus)
                .map(|cpu| {
                    let (gen, target, warm, go) = (&gen, &target, &warm, &go);
                    s.spawn(move || {
                        moat_lab::sock::pin_thread(cpu);
                        let template = flood::udp(target, 5000, 64);
                        // Every thread reaches both barriers, failed or not.
                        let ready = (|| -> Result<_, String> {
                            let mut flood = Flood::load().map_err(|e| e.to_string())?;
                            let inside = gen.enter().map_err(|e| e.to_string())?;
                            flood.run(&template, g0, 1 << 16, RUN).map_err(|e| e.to_string())?;
                            Ok((flood, inside))
                        })();
                        warm.wait();
                        go.wait();
                        let (mut flood, _inside) = ready.expect("generator ready");
                        flood.run(&template, g0, 1 << 40, RUN).expect("flood")
                    })
                })
                .collect();
            warm.wait();
            let before = settled(&dp);
            let before_cpu = dp.reason_per_cpu(Reason::DropRateLimit).expect("per CPU");
            let from = reached(&dp);
            go.wait();
            let span = flowing(&dp, from, || threads.iter().any(|h| !h.is_finished()));
            let sent = threads
                .into_iter()
                .map(|h| h.join().expect("generator").sent)
                .sum::<u64>();
            (before, before_cpu, sent, span.as_secs_f64())
        });
        let after = settled(&dp);
        let moved = |r| after.packets(r) - before.packets(r);
        // What passes the limit goes on to routing; the tunnel's next hop
        // is unresolved here, so it ends there, counted.
        let passed = moved(Reason::DropNoNextHop);
        let limited = moved(Reason::DropRateLimit);
        let per_cpu: Vec<u64> = dp
            .reason_per_cpu(Reason::DropRateLimit)
            .expect("per CPU")
            .iter()
            .zip(&before_cpu)
            .map(|(a, b)| a - b)
            .collect();
        let rate = passed as f64 / span;
        let offered = sent as f64 / span;
        println!(
            "limit {pps} pps per {per:?}: offered {offered:.0} pps ({sent} frames), passed {passed} in {span:.2} s \
             = {rate:.0} pps ({:+.1}%), {limited} dropped by the limit (per CPU {per_cpu:?})",
            (rate / pps as f64 - 1.0) * 100.0
        );
        assert!(
            offered > 1.2 * pps as f64,
            "the flood must exceed the limit: {offered:.0} pps"
        );
        assert!(
            (rate / pps as f64 - 1.0).abs() <= 0.10,
            "limit {pps} pps per {per:?}: {rate:.0} pps passed"
        );
        assert!(
            passed + limited >= sent * 9 / 10,
            "{} of {sent} frames arrived",
            passed + limited
        );
        if cpus > 1 {
            assert!(
                per_cpu.iter().filter(|n| **n > 0).count() > 1,
                "the limit ran on one CPU only: {per_cpu:?}"
            );
        }
        results.push((pps, rate));
    }
    println!("rate limits (configured, measured pps): {results:?}");
}
