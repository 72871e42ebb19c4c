//! When each tunnel is probed.
//!
//! Every tunnel is probed on a fixed grid: at `epoch + phase + k * interval`
//! (k = 0, 1, 2, ...), where the phase is a fraction of the interval derived
//! from the tunnel id by Fibonacci hashing (`id * 2^64 / golden ratio`, the
//! top bits as a fraction). Dense ids, as the data plane's tunnel ids are,
//! then fall into the interval like the golden-ratio sequence, the most even
//! spread there is: 10,000 tunnels probed every second come due about one
//! every 100 µs, never in bursts. Sparse ids spread like a random hash.
//!
//! The grid is kept whatever happens: a tunnel added, or whose interval
//! changes, gets its next probe at its next grid point; a late call to
//! [`Schedule::due`] returns each late tunnel once and puts it back on its
//! next grid point after `now` (missed probes are skipped, not sent in a
//! burst). Extra probes ([`Schedule::probe_now`]) come before scheduled ones
//! and do not move the grid.
//!
//! A timing wheel of 1 ms slots spanning 16.4 s holds one live entry per
//! tunnel: scheduling and taking a due probe cost the same however many
//! tunnels there are (a heap costs a logarithm of cache misses each).
//! Entries made obsolete by removal or an interval change stay until their
//! slot comes round, and the wheel is rebuilt when they outnumber the live
//! ones.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use crate::{Trigger, TunnelId};

/// Probe interval of rate `low`.
pub const INTERVAL_LOW: Duration = Duration::from_secs(10);
/// Probe interval of rate `mid`.
pub const INTERVAL_MID: Duration = Duration::from_secs(1);
/// Probe interval of rate `high`.
pub const INTERVAL_HIGH: Duration = Duration::from_millis(100);

/// A tunnel started with [`Schedule::start`] gets its first probe within
/// this (or its interval, if shorter), at its phase of this span: a new
/// daemon probes every tunnel at once without sending all first probes
/// together.
pub const START_SPREAD: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug)]
struct Entry {
    interval: u64,
    phase: u64,
    due: u64,
    generation: u64,
}

/// Which tunnels are due for a probe. Times are kept as nanoseconds since the
/// schedule's epoch.
#[derive(Debug)]
pub struct Schedule {
    epoch: Instant,
    tunnels: FxHashMap<TunnelId, Entry>,
    wheel: Wheel,
    extra: VecDeque<TunnelId>,
    /// Entries taken from the wheel in one call (kept for its capacity).
    taken: Vec<(u64, u64, TunnelId)>,
    next_generation: u64,
}

impl Schedule {
    /// An empty schedule whose grid starts at `epoch`.
    pub fn new(epoch: Instant) -> Self {
        Schedule {
            epoch,
            tunnels: FxHashMap::default(),
            wheel: Wheel::new(),
            extra: VecDeque::new(),
            taken: Vec::new(),
            next_generation: 0,
        }
    }

    /// Tunnels scheduled.
    pub fn len(&self) -> usize {
        self.tunnels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tunnels.is_empty()
    }

    pub fn contains(&self, id: TunnelId) -> bool {
        self.tunnels.contains_key(&id)
    }

    /// Schedules a tunnel (or reschedules it, as [`Schedule::set_interval`]):
    /// its first probe is at its next grid point at or after `now`. An
    /// interval of zero is taken as 1 ms.
    pub fn add(&mut self, id: TunnelId, interval: Duration, now: Instant) {
        let interval = (interval.as_nanos().min(u128::from(u64::MAX)) as u64).max(1_000_000);
        if self.tunnels.get(&id).is_some_and(|e| e.interval == interval) {
            return;
        }
        let phase = phase_of(id, interval);
        let due = next_grid_point(phase, interval, self.nanos(now));
        let generation = self.next_generation;
        self.next_generation += 1;
        self.tunnels.insert(
            id,
            Entry {
                interval,
                phase,
                due,
                generation,
            },
        );
        self.wheel.push(due, generation, id);
        self.compact();
    }

    /// Schedules a new tunnel whose first probe should come soon: at its
    /// phase of `min(interval, START_SPREAD)` after `now` (spread like the
    /// grid), then on its grid, the next grid point being at least half an
    /// interval after the first probe. A tunnel already scheduled is only
    /// rescheduled as by [`Schedule::add`].
    pub fn start(&mut self, id: TunnelId, interval: Duration, now: Instant) {
        if self.contains(id) {
            return self.add(id, interval, now);
        }
        self.add(id, interval, now);
        let now = self.nanos(now);
        let Some(e) = self.tunnels.get_mut(&id) else {
            return;
        };
        let spread = e.interval.min(START_SPREAD.as_nanos() as u64);
        let first = now + phase_of(id, spread);
        e.due = first;
        self.wheel.push(first, e.generation, id);
    }

    /// Changes a tunnel's interval; its next probe moves to its next grid
    /// point (of the new interval) at or after `now`. False when the tunnel
    /// is not scheduled.
    pub fn set_interval(&mut self, id: TunnelId, interval: Duration, now: Instant) -> bool {
        if !self.contains(id) {
            return false;
        }
        self.add(id, interval, now);
        true
    }

    /// Stops probing a tunnel, extra probes included.
    pub fn remove(&mut self, id: TunnelId) -> bool {
        let removed = self.tunnels.remove(&id).is_some();
        if removed {
            self.extra.retain(|&t| t != id);
            self.compact();
        }
        removed
    }

    /// Asks for `count` extra probes of a tunnel, due at once.
    pub fn probe_now(&mut self, id: TunnelId, count: u8) {
        if self.contains(id) {
            self.extra.extend(std::iter::repeat_n(id, usize::from(count)));
        }
    }

    /// The probes due at `now`, extra ones first, each scheduled tunnel at
    /// most once; due tunnels move to their next grid point after `now`.
    pub fn due(&mut self, now: Instant) -> Vec<(TunnelId, Trigger)> {
        let mut out = Vec::new();
        self.due_into(now, &mut out);
        out
    }

    /// [`Schedule::due`], appended to `out` (a caller's buffer, reused from
    /// tick to tick).
    pub fn due_into(&mut self, now: Instant, out: &mut Vec<(TunnelId, Trigger)>) {
        out.extend(self.extra.drain(..).map(|id| (id, Trigger::Extra)));
        let now = self.nanos(now);
        let mut taken = std::mem::take(&mut self.taken);
        self.wheel.take_due(now, &mut taken);
        for &(due, generation, id) in &taken {
            let Some(e) = self.tunnels.get_mut(&id).filter(|e| e.generation == generation) else {
                continue;
            };
            if e.due != due {
                // Superseded by an earlier entry (a started tunnel's first probe).
                continue;
            }
            out.push((id, Trigger::Scheduled));
            // The next grid point at least half an interval on and after
            // `now`: `due + interval` when on the grid and on time.
            let next = next_grid_point(e.phase, e.interval, (due + e.interval / 2).max(now + 1));
            e.due = next;
            self.wheel.push(next, generation, id);
        }
        taken.clear();
        self.taken = taken;
    }

    /// When the next probe is due (in the past when extra probes wait), for
    /// a caller's sleep. Walks every entry: not for a per-tick loop.
    pub fn next_due(&self) -> Option<Instant> {
        if !self.extra.is_empty() {
            return Some(self.epoch);
        }
        self.tunnels
            .values()
            .map(|e| e.due)
            .min()
            .map(|due| self.epoch + Duration::from_nanos(due))
    }

    fn nanos(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch)
            .as_nanos()
            .min(u128::from(u64::MAX)) as u64
    }

    /// Rebuilds the wheel from the live entries when obsolete ones dominate.
    fn compact(&mut self) {
        if self.wheel.len > 2 * self.tunnels.len() + 1024 {
            self.wheel.clear();
            for (&id, e) in &self.tunnels {
                self.wheel.push(e.due, e.generation, id);
            }
        }
    }
}

/// Width of a wheel slot, nanoseconds.
const SLOT_NS: u64 = 1_000_000;
/// Slots in the wheel (a power of two): 16.4 s, more than the longest
/// interval. Entries further out wait in their slot for a later turn.
const SLOTS: u64 = 1 << 14;

/// A timing wheel of (due, generation, tunnel) entries.
#[derive(Debug)]
struct Wheel {
    slots: Vec<Vec<(u64, u64, TunnelId)>>,
    /// Every entry due before this time has been taken.
    done: u64,
    len: usize,
}

impl Wheel {
    fn new() -> Wheel {
        Wheel {
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            done: 0,
            len: 0,
        }
    }

    fn clear(&mut self) {
        self.slots.iter_mut().for_each(Vec::clear);
        self.len = 0;
    }

    fn push(&mut self, due: u64, generation: u64, id: TunnelId) {
        // Overdue entries go where the next take looks first.
        let at = due.max(self.done);
        self.slots[((at / SLOT_NS) % SLOTS) as usize].push((due, generation, id));
        self.len += 1;
    }

    /// The entries due at or before `now`, earliest first, into `out`.
    fn take_due(&mut self, now: u64, out: &mut Vec<(u64, u64, TunnelId)>) {
        if now < self.done {
            return;
        }
        let (first, last) = (self.done / SLOT_NS, now / SLOT_NS);
        for slot in first..=last.min(first + SLOTS - 1) {
            let entries = &mut self.slots[(slot % SLOTS) as usize];
            let before = out.len();
            entries.retain(|&e| {
                if e.0 <= now {
                    out.push(e);
                    false
                } else {
                    true
                }
            });
            self.len -= out.len() - before;
        }
        self.done = now + 1;
        out.sort_unstable();
    }
}

/// The tunnel's offset in its interval: its id by Fibonacci hashing, as a
/// fraction of the interval.
fn phase_of(id: TunnelId, interval: u64) -> u64 {
    let fraction = u64::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    ((u128::from(interval) * u128::from(fraction)) >> 64) as u64
}

/// The first `phase + k * interval` at or after `t`.
fn next_grid_point(phase: u64, interval: u64, t: u64) -> u64 {
    if t <= phase {
        return phase;
    }
    let k = (t - phase).div_ceil(interval);
    phase + k * interval
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// Steps the clock by `tick` from `start` for `span`, collecting
    /// (time in µs since `start`, tunnel, trigger) of every probe due.
    fn run(s: &mut Schedule, start: Instant, span: Duration, tick: Duration) -> Vec<(u64, TunnelId, Trigger)> {
        let mut out = Vec::new();
        let mut t = Duration::ZERO;
        while t <= span {
            for (id, trig) in s.due(start + t) {
                out.push((t.as_micros() as u64, id, trig));
            }
            t += tick;
        }
        out
    }

    fn max_per_slice(probes: &[(u64, TunnelId, Trigger)], slice_us: u64, slices: u64) -> (usize, usize) {
        let mut counts = vec![0usize; slices as usize];
        for &(t, _, _) in probes {
            if t / slice_us < slices {
                counts[(t / slice_us) as usize] += 1;
            }
        }
        (*counts.iter().min().unwrap(), *counts.iter().max().unwrap())
    }

    #[test]
    fn ten_thousand_tunnels_at_one_second_are_spread_evenly() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        for id in 0..10_000 {
            s.add(id, INTERVAL_MID, t0);
        }
        let probes = run(&mut s, t0, Duration::from_millis(3_000), us(100));
        // Each 10 ms slice holds close to 100 probes.
        let (min, max) = max_per_slice(&probes, 10_000, 299);
        assert!(
            (95..=105).contains(&min) && (95..=105).contains(&max),
            "min {min} max {max}"
        );
        // And each 1 ms slice close to 10.
        let (min, max) = max_per_slice(&probes, 1_000, 2_999);
        assert!(min >= 8 && max <= 12, "min {min} max {max}");
        // Every tunnel three times (four for the one whose phase is 0), exactly
        // 1 s apart: the tick, 100 µs, divides the interval.
        let mut seen: HashMap<TunnelId, Vec<u64>> = HashMap::new();
        for &(t, id, trig) in &probes {
            assert_eq!(trig, Trigger::Scheduled);
            seen.entry(id).or_default().push(t);
        }
        assert_eq!(seen.len(), 10_000);
        for (id, times) in seen {
            assert!((3..=4).contains(&times.len()), "tunnel {id}: {times:?}");
            assert!(
                times.windows(2).all(|w| w[1] - w[0] == 1_000_000),
                "tunnel {id}: {times:?}"
            );
        }
    }

    #[test]
    fn sparse_ids_spread_like_a_random_hash() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..10_000 {
            s.add(rng.gen(), INTERVAL_MID, t0);
        }
        let probes = run(&mut s, t0, Duration::from_millis(999), us(100));
        let (min, max) = max_per_slice(&probes, 10_000, 100);
        assert!(min >= 60 && max <= 140, "min {min} max {max}");
    }

    #[test]
    fn mixed_rates_with_a_late_clock_do_not_starve() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        for id in 0..3_000 {
            let interval = [INTERVAL_LOW, INTERVAL_MID, INTERVAL_HIGH][id as usize % 3];
            s.add(id, interval, t0);
        }
        // A coarse, irregular tick: 1..=37 ms.
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut counts: HashMap<TunnelId, u32> = HashMap::new();
        let mut t = Duration::ZERO;
        while t < Duration::from_secs(30) {
            for (id, _) in s.due(t0 + t) {
                *counts.entry(id).or_default() += 1;
            }
            t += Duration::from_millis(rng.gen_range(1..=37));
        }
        for id in 0..3_000 {
            let n = counts.get(&id).copied().unwrap_or(0);
            let expected = [3, 30, 300][id as usize % 3];
            // Late ticks can merge probes of the fast tunnels, never starve them.
            let low = if id % 3 == 2 { expected * 7 / 10 } else { expected - 1 };
            assert!(
                (low..=expected + 1).contains(&n),
                "tunnel {id}: {n} probes, expected ~{expected}"
            );
        }
    }

    #[test]
    fn add_remove_change_interval_and_probe_now() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        s.add(1, INTERVAL_MID, t0);
        s.add(2, INTERVAL_MID, t0);
        let first = s.next_due().expect("scheduled");
        assert!(first < t0 + INTERVAL_MID);

        // Extra probes come first and at once, without moving the grid.
        s.probe_now(2, 2);
        s.probe_now(99, 2); // not scheduled: ignored
        assert_eq!(s.next_due(), Some(t0));
        assert_eq!(s.due(t0), vec![(2, Trigger::Extra), (2, Trigger::Extra)]);
        assert_eq!(s.next_due(), Some(first));

        // Remove: never due again, pending extras dropped.
        s.probe_now(1, 1);
        assert!(s.remove(1));
        assert!(!s.remove(1));
        let probes = run(&mut s, t0, Duration::from_secs(5), Duration::from_millis(1));
        assert!(probes.iter().all(|&(_, id, _)| id == 2));
        assert_eq!(probes.len(), 5, "tunnel 2 once a second: {probes:?}");

        // Interval change: the new rate from the next grid point on.
        let t1 = t0 + Duration::from_secs(6);
        assert!(s.set_interval(2, INTERVAL_HIGH, t1));
        assert!(!s.set_interval(3, INTERVAL_HIGH, t1));
        let probes = run(&mut s, t1, Duration::from_millis(999), Duration::from_millis(1));
        assert_eq!(probes.len(), 10);
        assert!(probes.windows(2).all(|w| w[1].0 - w[0].0 == 100_000), "{probes:?}");
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn started_tunnels_are_probed_within_a_second_spread_out_then_on_their_grid() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        let t1 = t0 + Duration::from_millis(1234);
        for id in 0..10_000 {
            s.start(id, INTERVAL_LOW, t1);
        }
        let probes = run(&mut s, t1, Duration::from_secs(25), us(500));
        // All first probes within the first second, about 100 per 10 ms.
        let (min, max) = max_per_slice(&probes, 10_000, 100);
        assert!(
            (90..=110).contains(&min) && (90..=110).contains(&max),
            "min {min} max {max}"
        );
        let mut seen: HashMap<TunnelId, Vec<u64>> = HashMap::new();
        for &(t, id, trig) in &probes {
            assert_eq!(trig, Trigger::Scheduled);
            seen.entry(id).or_default().push(t);
        }
        assert_eq!(seen.len(), 10_000);
        for (id, times) in seen {
            assert!(times[0] <= 1_000_000, "tunnel {id}: {times:?}");
            // The second probe 5..15 s after the first, the rest 10 s apart.
            assert!(
                (5_000_000..=15_000_000).contains(&(times[1] - times[0])),
                "tunnel {id}: {times:?}"
            );
            assert!(
                times[1..].windows(2).all(|w| w[1] - w[0] == 10_000_000),
                "tunnel {id}: {times:?}"
            );
            assert!((2..=4).contains(&times.len()), "tunnel {id}: {times:?}");
        }
        // At the high rate: the first probe within the interval.
        let mut s = Schedule::new(t0);
        s.start(1, INTERVAL_HIGH, t1);
        s.start(1, INTERVAL_HIGH, t1); // again: no change
        let probes = run(&mut s, t1, Duration::from_millis(999), us(100));
        assert!(probes[0].0 < 100_000, "{probes:?}");
        assert!((50_000..=150_000).contains(&(probes[1].0 - probes[0].0)), "{probes:?}");
        assert!(probes[1..].windows(2).all(|w| w[1].0 - w[0].0 == 100_000), "{probes:?}");
        assert!((9..=11).contains(&probes.len()), "{probes:?}");
    }

    #[test]
    fn churn_keeps_the_wheel_bounded() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        for round in 0..100u32 {
            for id in 0..100 {
                let interval = if (id + round) % 2 == 0 {
                    INTERVAL_LOW
                } else {
                    INTERVAL_MID
                };
                s.add(id, interval, t0);
            }
        }
        assert!(s.wheel.len <= 2 * s.len() + 1024, "wheel {}", s.wheel.len);
        let probes = run(&mut s, t0, Duration::from_secs(10), Duration::from_millis(1));
        for id in 0..100 {
            let n = probes.iter().filter(|p| p.1 == id).count();
            let expected = if (id + 99) % 2 == 0 { 1..=2 } else { 10..=11 };
            assert!(expected.contains(&n), "tunnel {id}: {n}");
        }
    }
}
