//! The daemon's per-probe bookkeeping alone, without sockets: N tunnels
//! probed every second, each probe answered 1 ms later, driven by a fake
//! clock in 5 ms ticks as the daemon's probe thread runs. Prints the CPU
//! time per probe (schedule, issue, classify, state machine, expiry).
//!
//! Usage: cargo run --release -p moat-health --example probe-cost [-- TUNNELS [SECONDS]]

use std::{
    collections::VecDeque,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use moat_health::{
    probe::PROBE_LEN, schedule::INTERVAL_MID, Outcome, Outstanding, ProbeSpec, ProbeStyle, Received, Schedule,
    TunnelHealth,
};
use rustc_hash::FxHashMap;

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let tunnels = args.first().copied().unwrap_or(10_000) as u32;
    let seconds = args.get(1).copied().unwrap_or(20);
    let t0 = Instant::now();
    let mut schedule = Schedule::new(t0);
    let mut outstanding = Outstanding::new(Duration::from_secs(1), 8);
    let mut health: FxHashMap<u32, TunnelHealth> = FxHashMap::default();
    for id in 1..=tunnels {
        outstanding.set_tunnel(
            id,
            ProbeSpec {
                style: ProbeStyle::Reply,
                ident: id as u16,
                node: Ipv4Addr::new(198, 51, 100, 1),
                target: Ipv4Addr::new(192, 0, 2, 1),
            },
        );
        health.insert(id, TunnelHealth::new(t0, true));
        schedule.start(id, INTERVAL_MID, t0);
    }
    let tick = Duration::from_millis(5);
    let mut wire: VecDeque<(Instant, [u8; PROBE_LEN])> = VecDeque::new();
    let (mut probes, mut matched, mut lost) = (0u64, 0u64, 0u64);
    let started = std::time::Instant::now();
    let cpu0 = cpu_time();
    let mut now = t0;
    for _ in 0..(seconds * 200) {
        now += tick;
        while wire.front().is_some_and(|(at, _)| *at <= now) {
            let (at, p) = wire.pop_front().expect("front");
            if let Received::Match(m) = outstanding.classify(at, &p, None) {
                matched += 1;
                if let Some(h) = health.get_mut(&m.tunnel) {
                    h.on_result(at, m.trigger, Outcome::Success { rtt: m.rtt });
                }
            }
        }
        for l in outstanding.expire(now) {
            lost += 1;
            if let Some(h) = health.get_mut(&l.tunnel) {
                h.on_result(now, l.trigger, Outcome::Lost);
            }
        }
        for (id, trigger) in schedule.due(now) {
            if let Some(p) = outstanding.issue(id, now, trigger) {
                probes += 1;
                if let Some(h) = health.get_mut(&id) {
                    h.on_probe_sent(now);
                }
                wire.push_back((now + Duration::from_millis(1), p));
            }
        }
    }
    let cpu = cpu_time() - cpu0;
    println!(
        "{tunnels} tunnels, {seconds} s simulated in {:.2} s: {probes} probes, {matched} answered, {lost} lost; \
         {:.0} ns of CPU per probe ({:.2}% of a core at {tunnels} probes/s)",
        started.elapsed().as_secs_f64(),
        cpu.as_nanos() as f64 / probes as f64,
        cpu.as_secs_f64() / probes as f64 * f64::from(tunnels) * 100.0
    );
}

/// CPU time of this process.
fn cpu_time() -> Duration {
    let mut ts = libc_timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime(2) into a timespec we own.
    unsafe { clock_gettime(2, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[repr(C)]
struct libc_timespec {
    tv_sec: i64,
    tv_nsec: i64,
}

extern "C" {
    fn clock_gettime(clock: i32, ts: *mut libc_timespec) -> i32;
}
