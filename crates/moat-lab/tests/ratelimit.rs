//! Rate-limit rules under live floods: the flood generator sends UDP to a
//! rate-limited port faster than the limit, from one thread per CPU into a
//! veth with one receive queue per CPU (so moat's XDP program runs on
//! every CPU at once, sharing the buckets); the packets moat lets through
//! per second must be within 10% of the configured rate. Bounded: each run
//! lasts 2 s; the namespaces go at the end.

use std::time::Duration;

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
        // Near what the generators reach here (about 1.5 Mpps on 2 CPUs).
        (1_000_000, RatePer::Rule),
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
        let before = settled(&dp);
        let before_cpu = dp.reason_per_cpu(Reason::DropRateLimit).expect("per CPU");
        // One generator per CPU, loaded first, then started together; the
        // run lasts as long as the longest generator ran.
        let ready = std::sync::Barrier::new(cpus);
        let (sent, elapsed) = std::thread::scope(|s| {
            let threads: Vec<_> = (0..cpus)
                .map(|cpu| {
                    let (gen, target, ready) = (&gen, &target, &ready);
                    s.spawn(move || {
                        moat_lab::sock::pin_thread(cpu);
                        let mut flood = Flood::load().expect("load the generator");
                        let _in = gen.enter().expect("enter generator namespace");
                        let template = flood::udp(target, 5000, 64);
                        ready.wait();
                        flood.run(&template, g0, 1 << 40, RUN).expect("flood")
                    })
                })
                .collect();
            threads.into_iter().fold((0, 0.0f64), |(n, t), h| {
                let r = h.join().expect("generator");
                (n + r.sent, t.max(r.elapsed.as_secs_f64()))
            })
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
        let rate = passed as f64 / elapsed;
        let offered = sent as f64 / elapsed;
        println!(
            "limit {pps} pps per {per:?}: offered {offered:.0} pps ({sent} frames), passed {passed} in {elapsed:.2} s \
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
