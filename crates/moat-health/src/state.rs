//! The health state machine of one tunnel.
//!
//! A [`TunnelHealth`] is fed the result of every probe (a success with its
//! round-trip time, or a loss) and moves between three states, each with a
//! route penalty added to the priority of every route over the tunnel:
//!
//! | state    | penalty   |
//! |----------|-----------|
//! | healthy  | 0         |
//! | degraded | 500,000   |
//! | down     | 1,000,000 |
//!
//! A tunnel starts healthy. A tunnel whose health checks are disabled is
//! always healthy and ignores results.
//!
//! ## Transitions
//!
//! Rules are applied to each result after it has been recorded (in the
//! consecutive counters and in the 5-minute window). At most one transition
//! happens per result; the first matching row wins.
//!
//! | from               | on result | condition                                                  | to       | reason                                        |
//! |--------------------|-----------|------------------------------------------------------------|----------|-----------------------------------------------|
//! | healthy, degraded  | lost      | the last 3 results were all losses                         | down     | `3 probes failed in a row`                    |
//! | healthy            | lost      | window holds >= 2 counted failures and they are >= 0.1%    | degraded | `2 of 1000 probes failed in the last 5 minutes (0.200%)` |
//! | down               | success   | the last 3 results were all successes                      | degraded | `3 probes succeeded in a row`                 |
//! | degraded           | success   | the last 30 results were all successes                     | healthy  | `30 probes succeeded in a row`                |
//! | any other          | any       | -                                                          | same     | -                                             |
//!
//! Consequences worth stating:
//! - A success never makes a state worse, and a loss never makes it better.
//! - A loss resets the run of successes: a degraded tunnel needs 30 fresh
//!   successes in a row, a down one 3.
//! - A down tunnel only comes back through degraded: 3 successes in a row
//!   make it degraded, and the same run reaching 30 makes it healthy (27
//!   more).
//! - Flapping (a loss after every success) degrades the tunnel at the second
//!   loss and keeps it degraded for as long as it lasts: it never collects
//!   30 successes in a row, nor 3 losses in a row.
//!
//! ## The 5-minute window
//!
//! Results are counted per second, over the last 300 seconds. Seconds with
//! equal counts in a row are kept as one run, so a tunnel with steady
//! results holds one run whatever the probe rate. A result falls out of the
//! window once 300 whole seconds have passed since the start of its second,
//! i.e. between 299 and 300 seconds after it was recorded.
//!
//! **Recovery forgives the window.** When a tunnel becomes healthy again
//! (30 successes in a row), the failures still in its window stop counting
//! towards the degraded rule: they are kept as *forgiven* and leave the window
//! when they age out. So a recovered tunnel is judged on failures after its
//! recovery alone: one new loss does not send it straight back to degraded,
//! two (at >= 0.1%) do. The degraded rule's ratio is counted failures over
//! counted results (successes plus counted failures). The loss ratio reported
//! in [`HealthSnapshot`] is the plain statistic: every failure in the window,
//! forgiven or not, over every result in it.
//!
//! ## Extra probes
//!
//! A loss of a [`Trigger::Scheduled`] probe asks for [`EXTRA_PROBES`] extra
//! probes at once ([`Effect::extra_probes`]). Losses of extra probes ask for
//! none, so a dead tunnel is not probed without pause. The extras are sent
//! together, so 3 losses in a row (the scheduled probe and its 2 extras) take
//! the tunnel down about one probe timeout after the first loss is noticed.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use crate::Trigger;

/// Route penalty of a degraded tunnel.
pub const PENALTY_DEGRADED: u32 = 500_000;
/// Route penalty of a down tunnel.
pub const PENALTY_DOWN: u32 = 1_000_000;
/// Losses in a row that take a tunnel down.
pub const DOWN_AFTER_LOSSES: u32 = 3;
/// Successes in a row that bring a down tunnel to degraded.
pub const DOWN_RECOVERY: u32 = 3;
/// Successes in a row that bring a degraded tunnel to healthy.
pub const DEGRADED_RECOVERY: u32 = 30;
/// Failures in the window needed (with the ratio) to degrade a tunnel.
pub const DEGRADED_MIN_FAILURES: u32 = 2;
/// Failed share of the window, in parts per million, that degrades a tunnel (0.1%).
pub const DEGRADED_LOSS_PPM: u64 = 1_000;
/// Extra probes asked for after a scheduled probe is lost.
pub const EXTRA_PROBES: u8 = 2;
/// Length of the loss window.
pub const WINDOW: Duration = Duration::from_secs(WINDOW_SECS as u64);

const WINDOW_SECS: usize = 300;

/// Health of a tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HealthState {
    Healthy,
    Degraded,
    Down,
}

impl HealthState {
    /// Added to the priority of every route over the tunnel.
    pub fn penalty(self) -> u32 {
        match self {
            HealthState::Healthy => 0,
            HealthState::Degraded => PENALTY_DEGRADED,
            HealthState::Down => PENALTY_DOWN,
        }
    }

    /// `healthy`, `degraded` or `down`.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Healthy => "healthy",
            HealthState::Degraded => "degraded",
            HealthState::Down => "down",
        }
    }
}

impl fmt::Display for HealthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of one probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The answer came back, after `rtt`.
    Success { rtt: Duration },
    /// No answer before the probe timed out.
    Lost,
}

/// Why the state last changed. `Display` gives the operator's wording.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeReason {
    /// The tunnel was added (it starts healthy).
    Added,
    /// Health checks were switched on (the tunnel starts healthy).
    Enabled,
    /// Health checks were switched off (the tunnel is healthy from now on).
    Disabled,
    /// The state was kept across a restart of the daemon.
    Resumed,
    /// This many probes in a row were lost.
    LostInARow(u32),
    /// `failed` of `total` counted probes in the window failed.
    WindowLoss { failed: u32, total: u32 },
    /// This many probes in a row succeeded.
    SucceededInARow(u32),
}

impl fmt::Display for ChangeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ChangeReason::Added => f.write_str("tunnel added"),
            ChangeReason::Enabled => f.write_str("health checks enabled"),
            ChangeReason::Disabled => f.write_str("health checks disabled"),
            ChangeReason::Resumed => f.write_str("kept across a daemon restart"),
            ChangeReason::LostInARow(n) => write!(f, "{n} probes failed in a row"),
            ChangeReason::WindowLoss { failed, total } => {
                let pct = f64::from(failed) * 100.0 / f64::from(total.max(1));
                write!(f, "{failed} of {total} probes failed in the last 5 minutes ({pct:.3}%)")
            }
            ChangeReason::SucceededInARow(n) => write!(f, "{n} probes succeeded in a row"),
        }
    }
}

/// A change of state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    pub from: HealthState,
    pub to: HealthState,
    pub at: Instant,
    pub reason: ChangeReason,
}

/// What a result asks of the daemon.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effect {
    /// The state changed: re-apply the tunnel's route penalty.
    pub change: Option<Change>,
    /// Send this many extra probes now (with [`Trigger::Extra`]).
    pub extra_probes: u8,
}

/// Everything `moat status` shows about a tunnel's health.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HealthSnapshot {
    pub enabled: bool,
    pub state: HealthState,
    pub penalty: u32,
    /// When the state last changed, and why.
    pub since: Instant,
    pub reason: ChangeReason,
    /// Totals since the tunnel was added.
    pub sent: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub consecutive_successes: u32,
    pub consecutive_losses: u32,
    /// Results in the last 5 minutes, and how many of them were losses
    /// (forgiven ones included).
    pub window_results: u32,
    pub window_failed: u32,
    /// `window_failed / window_results`, 0 when the window is empty.
    pub loss_ratio: f64,
    pub last_rtt: Option<Duration>,
    /// Exponentially smoothed RTT (gain 1/8, as TCP's SRTT).
    pub smoothed_rtt: Option<Duration>,
}

/// The health of one tunnel. See the module docs for the rules.
#[derive(Clone, Debug)]
pub struct TunnelHealth {
    enabled: bool,
    state: HealthState,
    since: Instant,
    reason: ChangeReason,
    consecutive_successes: u32,
    consecutive_losses: u32,
    sent: u64,
    succeeded: u64,
    failed: u64,
    last_rtt: Option<Duration>,
    smoothed_rtt: Option<Duration>,
    window: Window,
}

impl TunnelHealth {
    /// A tunnel added at `now`: healthy, with an empty window.
    pub fn new(now: Instant, enabled: bool) -> Self {
        TunnelHealth {
            enabled,
            state: HealthState::Healthy,
            since: now,
            reason: ChangeReason::Added,
            consecutive_successes: 0,
            consecutive_losses: 0,
            sent: 0,
            succeeded: 0,
            failed: 0,
            last_rtt: None,
            smoothed_rtt: None,
            window: Window::new(now),
        }
    }

    /// A tunnel whose state is carried over from a previous run (a daemon
    /// restart): the data plane keeps the steering it had until probes
    /// give new verdicts, which then follow the usual rules from `state`.
    pub fn resumed(now: Instant, enabled: bool, state: HealthState) -> Self {
        let mut t = TunnelHealth::new(now, enabled);
        if enabled {
            t.state = state;
            t.reason = ChangeReason::Resumed;
        }
        t
    }

    pub fn state(&self) -> HealthState {
        self.state
    }

    /// Route penalty of the current state.
    pub fn penalty(&self) -> u32 {
        self.state.penalty()
    }

    /// When the state last changed.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// Why the state last changed.
    pub fn reason(&self) -> ChangeReason {
        self.reason
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Switches health checks on or off. Either way the tunnel becomes healthy
    /// with a fresh window and fresh runs (totals are kept); returns the change
    /// when the state was not healthy.
    pub fn set_enabled(&mut self, now: Instant, enabled: bool) -> Option<Change> {
        if enabled == self.enabled {
            return None;
        }
        self.enabled = enabled;
        self.consecutive_successes = 0;
        self.consecutive_losses = 0;
        self.window = Window::new(now);
        let reason = if enabled {
            ChangeReason::Enabled
        } else {
            ChangeReason::Disabled
        };
        let from = self.state;
        self.state = HealthState::Healthy;
        self.since = now;
        self.reason = reason;
        (from != HealthState::Healthy).then_some(Change {
            from,
            to: HealthState::Healthy,
            at: now,
            reason,
        })
    }

    /// Counts a probe sent.
    pub fn on_probe_sent(&mut self, _now: Instant) {
        if self.enabled {
            self.sent += 1;
        }
    }

    /// Feeds the result of one probe (received or timed out at `now`).
    pub fn on_result(&mut self, now: Instant, trigger: Trigger, outcome: Outcome) -> Effect {
        if !self.enabled {
            return Effect::default();
        }
        match outcome {
            Outcome::Success { rtt } => {
                self.succeeded += 1;
                self.last_rtt = Some(rtt);
                self.smoothed_rtt = Some(match self.smoothed_rtt {
                    None => rtt,
                    Some(s) => (s * 7 + rtt) / 8,
                });
                self.consecutive_successes = self.consecutive_successes.saturating_add(1);
                self.consecutive_losses = 0;
                self.window.record(now, true);
                let n = self.consecutive_successes;
                let next = match self.state {
                    HealthState::Down if n >= DOWN_RECOVERY => Some(HealthState::Degraded),
                    HealthState::Degraded if n >= DEGRADED_RECOVERY => Some(HealthState::Healthy),
                    _ => None,
                };
                let change = next.map(|to| self.change(now, to, ChangeReason::SucceededInARow(n)));
                if change.is_some_and(|c| c.to == HealthState::Healthy) {
                    self.window.forgive();
                }
                Effect {
                    change,
                    extra_probes: 0,
                }
            }
            Outcome::Lost => {
                self.failed += 1;
                self.consecutive_losses = self.consecutive_losses.saturating_add(1);
                self.consecutive_successes = 0;
                self.window.record(now, false);
                let n = self.consecutive_losses;
                let (counted_failed, counted_total) = self.window.counted();
                let window_degraded = counted_failed >= DEGRADED_MIN_FAILURES
                    && u64::from(counted_failed) * 1_000_000 >= u64::from(counted_total) * DEGRADED_LOSS_PPM;
                let change = match self.state {
                    HealthState::Healthy | HealthState::Degraded if n >= DOWN_AFTER_LOSSES => {
                        Some(self.change(now, HealthState::Down, ChangeReason::LostInARow(n)))
                    }
                    HealthState::Healthy if window_degraded => Some(self.change(
                        now,
                        HealthState::Degraded,
                        ChangeReason::WindowLoss {
                            failed: counted_failed,
                            total: counted_total,
                        },
                    )),
                    _ => None,
                };
                Effect {
                    change,
                    extra_probes: if trigger == Trigger::Scheduled { EXTRA_PROBES } else { 0 },
                }
            }
        }
    }

    /// The tunnel's health as of `now` (the window is aged to `now`).
    pub fn snapshot(&self, now: Instant) -> HealthSnapshot {
        let (ok, failed, forgiven) = self.window.counts_at(now);
        let window_failed = failed + forgiven;
        let window_results = ok + window_failed;
        HealthSnapshot {
            enabled: self.enabled,
            state: self.state,
            penalty: self.penalty(),
            since: self.since,
            reason: self.reason,
            sent: self.sent,
            succeeded: self.succeeded,
            failed: self.failed,
            consecutive_successes: self.consecutive_successes,
            consecutive_losses: self.consecutive_losses,
            window_results,
            window_failed,
            loss_ratio: if window_results == 0 {
                0.0
            } else {
                f64::from(window_failed) / f64::from(window_results)
            },
            last_rtt: self.last_rtt,
            smoothed_rtt: self.smoothed_rtt,
        }
    }

    fn change(&mut self, now: Instant, to: HealthState, reason: ChangeReason) -> Change {
        let from = self.state;
        self.state = to;
        self.since = now;
        self.reason = reason;
        Change {
            from,
            to,
            at: now,
            reason,
        }
    }
}

/// Results of one second (or of each second of a run).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Bucket {
    ok: u16,
    failed: u16,
    forgiven: u16,
}

impl Bucket {
    fn is_empty(&self) -> bool {
        *self == Bucket::default()
    }

    /// (ok, failed, forgiven) of `seconds` such seconds.
    fn times(&self, seconds: u64) -> (u32, u32, u32) {
        let m = |c: u16| (u64::from(c) * seconds) as u32;
        (m(self.ok), m(self.failed), m(self.forgiven))
    }

    fn forgive(&mut self) {
        self.forgiven = self.forgiven.saturating_add(self.failed);
        self.failed = 0;
    }
}

/// `len` consecutive seconds from second `start`, each with the results `each`.
#[derive(Clone, Copy, Debug)]
struct Run {
    start: u64,
    len: u64,
    each: Bucket,
}

impl Run {
    /// How many of its seconds come before `cutoff`.
    fn before(&self, cutoff: u64) -> u64 {
        cutoff.saturating_sub(self.start).min(self.len)
    }
}

/// Results of the last 300 seconds, per second, with running totals.
///
/// The current second's results are kept apart; finished seconds that had
/// results are kept as runs of consecutive seconds with equal results. A
/// tunnel probed at a steady rate with steady results has a single run for
/// its whole window, held inline: recording a result then touches no memory
/// outside the tunnel's own state (with thousands of tunnels, a separate
/// table of 300 buckets each was a cache miss per probe).
#[derive(Clone, Debug)]
struct Window {
    origin: Instant,
    /// Second (since `origin`) of `current`.
    head: u64,
    current: Bucket,
    /// The newest run of finished seconds.
    newest: Option<Run>,
    /// Older runs, oldest first.
    older: VecDeque<Run>,
    ok: u32,
    failed: u32,
    forgiven: u32,
}

impl Window {
    fn new(origin: Instant) -> Self {
        Window {
            origin,
            head: 0,
            current: Bucket::default(),
            newest: None,
            older: VecDeque::new(),
            ok: 0,
            failed: 0,
            forgiven: 0,
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs()
    }

    /// The first second still in the window when the head is at `sec`.
    fn cutoff(sec: u64) -> u64 {
        (sec + 1).saturating_sub(WINDOW_SECS as u64)
    }

    fn runs(&self) -> impl Iterator<Item = &Run> {
        self.older.iter().chain(self.newest.as_ref())
    }

    fn advance(&mut self, now: Instant) {
        let sec = self.second(now);
        if sec <= self.head {
            return;
        }
        let done = std::mem::take(&mut self.current);
        if !done.is_empty() {
            match &mut self.newest {
                Some(r) if r.each == done && r.start + r.len == self.head => r.len += 1,
                newest => {
                    if let Some(r) = newest.replace(Run {
                        start: self.head,
                        len: 1,
                        each: done,
                    }) {
                        self.older.push_back(r);
                    }
                }
            }
        }
        self.head = sec;
        // Seconds that left the window leave the totals.
        let cutoff = Window::cutoff(sec);
        let Window {
            older,
            newest,
            ok,
            failed,
            forgiven,
            ..
        } = self;
        let mut trim = |r: &mut Run| {
            let gone = r.before(cutoff);
            let (o, f, g) = r.each.times(gone);
            (*ok, *failed, *forgiven) = (*ok - o, *failed - f, *forgiven - g);
            r.start += gone;
            r.len -= gone;
            r.len == 0
        };
        while let Some(r) = older.front_mut() {
            if !trim(r) {
                return;
            }
            older.pop_front();
        }
        if newest.as_mut().is_some_and(trim) {
            *newest = None;
        }
    }

    fn record(&mut self, now: Instant, ok: bool) {
        self.advance(now);
        let (count, total) = if ok {
            (&mut self.current.ok, &mut self.ok)
        } else {
            (&mut self.current.failed, &mut self.failed)
        };
        if let Some(c) = count.checked_add(1) {
            *count = c;
            *total += 1;
        }
    }

    /// Moves every failure in the window to forgiven.
    fn forgive(&mut self) {
        self.current.forgive();
        self.older
            .iter_mut()
            .chain(self.newest.as_mut())
            .for_each(|r| r.each.forgive());
        self.forgiven = self.runs().map(|r| r.each.times(r.len).2).sum::<u32>() + u32::from(self.current.forgiven);
        self.failed = 0;
    }

    /// (counted failures, counted results) as of the last record.
    fn counted(&self) -> (u32, u32) {
        (self.failed, self.ok + self.failed)
    }

    /// (ok, failed, forgiven) as of `now`, without moving the window.
    fn counts_at(&self, now: Instant) -> (u32, u32, u32) {
        let (mut ok, mut failed, mut forgiven) = (self.ok, self.failed, self.forgiven);
        let sec = self.second(now);
        if sec > self.head {
            let cutoff = Window::cutoff(sec);
            let current = Run {
                start: self.head,
                len: 1,
                each: self.current,
            };
            for r in self.runs().chain([&current]) {
                let (o, f, g) = r.each.times(r.before(cutoff));
                ok -= o;
                failed -= f;
                forgiven -= g;
            }
        }
        (ok, failed, forgiven)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: Outcome = Outcome::Success {
        rtt: Duration::from_millis(10),
    };
    const LOST: Outcome = Outcome::Lost;

    /// A tunnel and a fake clock that moves by `step` before every result.
    struct Driver {
        t0: Instant,
        now: Instant,
        step: Duration,
        health: TunnelHealth,
        changes: Vec<Change>,
    }

    impl Driver {
        fn new(step: Duration) -> Self {
            let t0 = Instant::now();
            Driver {
                t0,
                now: t0,
                step,
                health: TunnelHealth::new(t0, true),
                changes: Vec::new(),
            }
        }

        fn feed(&mut self, outcome: Outcome) -> Effect {
            self.feed_as(Trigger::Scheduled, outcome)
        }

        fn feed_as(&mut self, trigger: Trigger, outcome: Outcome) -> Effect {
            self.now += self.step;
            self.health.on_probe_sent(self.now);
            let e = self.health.on_result(self.now, trigger, outcome);
            self.changes.extend(e.change);
            e
        }

        fn feed_n(&mut self, n: usize, outcome: Outcome) {
            for _ in 0..n {
                self.feed(outcome);
            }
        }

        fn state(&self) -> HealthState {
            self.health.state()
        }

        fn secs(&self) -> f64 {
            (self.now - self.t0).as_secs_f64()
        }
    }

    fn second() -> Duration {
        Duration::from_secs(1)
    }

    #[test]
    fn starts_healthy() {
        let d = Driver::new(second());
        assert_eq!(d.state(), HealthState::Healthy);
        assert_eq!(d.health.penalty(), 0);
        assert_eq!(d.health.reason().to_string(), "tunnel added");
    }

    #[test]
    fn healthy_to_degraded_at_the_second_failure() {
        let mut d = Driver::new(second());
        d.feed_n(50, OK);
        d.feed(LOST);
        assert_eq!(d.state(), HealthState::Healthy, "one failure is not enough");
        d.feed_n(10, OK);
        let e = d.feed(LOST);
        let c = e.change.expect("degraded");
        assert_eq!((c.from, c.to), (HealthState::Healthy, HealthState::Degraded));
        assert_eq!(c.reason, ChangeReason::WindowLoss { failed: 2, total: 62 });
        assert_eq!(
            c.reason.to_string(),
            "2 of 62 probes failed in the last 5 minutes (3.226%)"
        );
        assert_eq!(d.health.penalty(), 500_000);
        assert_eq!(d.health.since(), d.now);
    }

    #[test]
    fn healthy_to_down_directly_when_the_window_is_large() {
        // High rate: 2,500 successes in 250 s, so two failures are < 0.1%.
        let mut d = Driver::new(Duration::from_millis(100));
        d.feed_n(2500, OK);
        d.feed(LOST);
        d.feed(LOST);
        assert_eq!(d.state(), HealthState::Healthy, "2 of 2502 is below 0.1%");
        let c = d.feed(LOST).change.expect("down");
        assert_eq!((c.from, c.to), (HealthState::Healthy, HealthState::Down));
        assert_eq!(c.reason.to_string(), "3 probes failed in a row");
        assert_eq!(d.health.penalty(), 1_000_000);
        assert_eq!(d.changes.len(), 1);
    }

    #[test]
    fn healthy_to_down_through_degraded_when_the_window_is_small() {
        let mut d = Driver::new(second());
        d.feed_n(10, OK);
        d.feed_n(3, LOST);
        let path: Vec<_> = d.changes.iter().map(|c| (c.from, c.to)).collect();
        assert_eq!(
            path,
            [
                (HealthState::Healthy, HealthState::Degraded),
                (HealthState::Degraded, HealthState::Down)
            ]
        );
    }

    #[test]
    fn down_to_degraded_after_3_successes_then_healthy_after_30() {
        let mut d = Driver::new(second());
        d.feed_n(3, LOST);
        assert_eq!(d.state(), HealthState::Down);
        d.feed_n(2, OK);
        assert_eq!(d.state(), HealthState::Down);
        let c = d.feed(OK).change.expect("degraded");
        assert_eq!((c.from, c.to), (HealthState::Down, HealthState::Degraded));
        assert_eq!(c.reason.to_string(), "3 probes succeeded in a row");
        // The run goes on: 27 more successes make 30 in a row.
        d.feed_n(26, OK);
        assert_eq!(d.state(), HealthState::Degraded);
        let c = d.feed(OK).change.expect("healthy");
        assert_eq!((c.from, c.to), (HealthState::Degraded, HealthState::Healthy));
        assert_eq!(c.reason.to_string(), "30 probes succeeded in a row");
    }

    #[test]
    fn degraded_needs_30_fresh_successes_after_a_loss() {
        let mut d = Driver::new(second());
        d.feed(LOST);
        d.feed(OK);
        d.feed(LOST);
        assert_eq!(d.state(), HealthState::Degraded);
        d.feed_n(29, OK);
        d.feed(LOST);
        d.feed_n(29, OK);
        assert_eq!(d.state(), HealthState::Degraded);
        d.feed(OK);
        assert_eq!(d.state(), HealthState::Healthy);
    }

    #[test]
    fn degraded_to_down() {
        let mut d = Driver::new(second());
        d.feed(LOST);
        d.feed(OK);
        d.feed(LOST);
        d.feed(OK);
        assert_eq!(d.state(), HealthState::Degraded);
        d.feed_n(2, LOST);
        assert_eq!(d.state(), HealthState::Degraded);
        let c = d.feed(LOST).change.expect("down");
        assert_eq!((c.from, c.to), (HealthState::Degraded, HealthState::Down));
        assert_eq!(c.reason, ChangeReason::LostInARow(3));
    }

    #[test]
    fn recovered_tunnel_is_judged_on_new_failures_only() {
        let mut d = Driver::new(second());
        d.feed_n(3, LOST);
        d.feed_n(33, OK);
        assert_eq!(d.state(), HealthState::Healthy);
        // The window still holds the 3 failures (39 s old at most).
        let s = d.health.snapshot(d.now);
        assert_eq!((s.window_results, s.window_failed), (36, 3));
        // The next success does not bounce it; neither does one new failure.
        d.feed(OK);
        d.feed(LOST);
        assert_eq!(d.state(), HealthState::Healthy);
        d.feed(OK);
        // A second new failure within the window does.
        d.feed(LOST);
        let last = d.changes.last().expect("changes");
        assert_eq!(last.to, HealthState::Degraded);
        assert_eq!(last.reason, ChangeReason::WindowLoss { failed: 2, total: 37 });
    }

    #[test]
    fn flapping_settles_in_degraded() {
        let mut d = Driver::new(second());
        for _ in 0..5_000 {
            d.feed(OK);
            d.feed(LOST);
        }
        assert_eq!(d.state(), HealthState::Degraded);
        assert_eq!(
            d.changes.len(),
            1,
            "degraded once, never down, never healthy: {:?}",
            d.changes
        );
        let s = d.health.snapshot(d.now);
        assert!((s.loss_ratio - 0.5).abs() < 0.01, "{}", s.loss_ratio);
    }

    #[test]
    fn flapping_in_threes_alternates_down_and_degraded() {
        let mut d = Driver::new(second());
        for _ in 0..100 {
            d.feed_n(3, LOST);
            assert_eq!(d.state(), HealthState::Down);
            d.feed_n(3, OK);
            assert_eq!(d.state(), HealthState::Degraded);
        }
        assert!(d.changes.iter().all(|c| c.to != HealthState::Healthy));
    }

    #[test]
    fn threshold_two_failures_in_3000_probes_stays_healthy() {
        // 3,000 results within the window, 2 of them failures (0.067%). The
        // window is 300 one-second buckets, so it spans 299 to 300 s: 99 ms
        // steps keep all 3,000 (297 s) inside.
        let mut d = Driver::new(Duration::from_millis(99));
        for i in 0..2_999 {
            d.feed(if i == 1_000 { LOST } else { OK });
        }
        d.feed(LOST);
        assert!(d.secs() < 300.0);
        let s = d.health.snapshot(d.now);
        assert_eq!((s.window_results, s.window_failed), (3_000, 2));
        assert_eq!(d.state(), HealthState::Healthy);
    }

    #[test]
    fn threshold_two_failures_in_1000_probes_degrades() {
        // 1,000 results in 299 s, 2 failures (0.2%).
        let mut d = Driver::new(Duration::from_millis(299));
        for i in 0..999 {
            d.feed(if i == 10 { LOST } else { OK });
        }
        let c = d.feed(LOST).change.expect("degraded");
        assert_eq!(
            c.reason,
            ChangeReason::WindowLoss {
                failed: 2,
                total: 1_000
            }
        );
    }

    #[test]
    fn threshold_is_inclusive_at_exactly_0_1_percent() {
        // 2,000 results in 298 s, 2 failures (0.1%).
        let mut d = Driver::new(Duration::from_millis(149));
        for i in 0..1_999 {
            d.feed(if i == 0 { LOST } else { OK });
        }
        let c = d.feed(LOST).change.expect("degraded");
        assert_eq!(
            c.reason,
            ChangeReason::WindowLoss {
                failed: 2,
                total: 2_000
            }
        );
    }

    /// The window against a plain list of every result, on random steps:
    /// results at random times (sometimes in bursts, sometimes after long
    /// gaps), forgiveness now and then.
    #[test]
    fn window_agrees_with_a_list_of_results() {
        use rand::{Rng, SeedableRng};
        let seed: u64 = rand::random();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..50 {
            let t0 = Instant::now();
            let mut w = Window::new(t0);
            // (second, ok, forgiven) of every result recorded.
            let mut all: Vec<(u64, bool, bool)> = Vec::new();
            let mut now = t0;
            for _ in 0..3000 {
                let step = match rng.gen_range(0..100) {
                    0 => Duration::from_secs(rng.gen_range(1..400)),
                    1..=10 => Duration::ZERO,
                    _ => Duration::from_millis(rng.gen_range(1..2500)),
                };
                now += step;
                if rng.gen_range(0..50) == 0 {
                    w.forgive();
                    all.iter_mut().filter(|r| !r.1).for_each(|r| r.2 = true);
                } else {
                    let ok = rng.gen_range(0..10) > 0;
                    w.record(now, ok);
                    all.push((w.second(now), ok, false));
                }
                // The window moves with results only.
                let head = w.head;
                let count = |sec: u64| {
                    // In the window: fewer than 300 whole seconds before `sec`.
                    let live = all.iter().filter(|r| sec - r.0 < 300);
                    live.fold((0, 0, 0), |(o, f, g), r| match (r.1, r.2) {
                        (true, _) => (o + 1, f, g),
                        (false, false) => (o, f + 1, g),
                        (false, true) => (o, f, g + 1),
                    })
                };
                let (ok, failed, _) = count(head);
                assert_eq!(w.counted(), (failed, ok + failed), "seed {seed}");
                let later = now + Duration::from_millis(rng.gen_range(0..400_000));
                assert_eq!(w.counts_at(later), count(w.second(later).max(head)), "seed {seed}");
            }
        }
    }

    #[test]
    fn old_failures_age_out_of_the_window() {
        let mut d = Driver::new(second());
        d.feed(LOST); // at 1 s
        d.feed_n(298, OK); // up to 299 s
        let s = d.health.snapshot(d.now);
        assert_eq!(s.window_failed, 1, "still inside at {} s", d.secs());
        d.feed(OK); // 300 s: the failure at 1 s is 299 s old, still inside
        d.feed(OK); // 301 s: out
        let s = d.health.snapshot(d.now);
        assert_eq!((s.window_results, s.window_failed), (300, 0));
        d.feed(LOST);
        assert_eq!(d.state(), HealthState::Healthy, "the first failure aged out");

        // The same pattern with the second failure 250 s after the first degrades.
        let mut d = Driver::new(second());
        d.feed(LOST);
        d.feed_n(249, OK);
        d.feed(LOST);
        assert_eq!(d.state(), HealthState::Degraded);
    }

    #[test]
    fn snapshot_ages_the_window_without_results() {
        let mut d = Driver::new(second());
        d.feed(LOST);
        d.feed(OK);
        let s = d.health.snapshot(d.now);
        assert_eq!((s.window_results, s.window_failed, s.loss_ratio), (2, 1, 0.5));
        let s = d.health.snapshot(d.now + Duration::from_secs(299));
        assert_eq!(
            s.window_results, 1,
            "the failure at 1 s is gone, the success at 2 s is not"
        );
        let s = d.health.snapshot(d.now + Duration::from_secs(3_600));
        assert_eq!((s.window_results, s.loss_ratio), (0, 0.0));
        assert_eq!((s.sent, s.succeeded, s.failed), (2, 1, 1));
        // The running totals and the read-only view agree after a long gap.
        d.now += Duration::from_secs(1_000);
        d.feed(OK);
        let s = d.health.snapshot(d.now);
        assert_eq!((s.window_results, s.window_failed), (1, 0));
    }

    #[test]
    fn a_lost_scheduled_probe_asks_for_2_extra_probes() {
        let mut d = Driver::new(second());
        assert_eq!(d.feed(OK).extra_probes, 0);
        assert_eq!(d.feed(LOST).extra_probes, 2);
        assert_eq!(d.feed_as(Trigger::Extra, LOST).extra_probes, 0, "extras ask for none");
        let e = d.feed_as(Trigger::Extra, LOST);
        assert_eq!(e.extra_probes, 0);
        assert_eq!(
            e.change.map(|c| c.to),
            Some(HealthState::Down),
            "scheduled + 2 extras lost"
        );
        assert_eq!(d.feed(LOST).extra_probes, 2, "a down tunnel still gets them");
        assert_eq!(d.feed_as(Trigger::Extra, OK).extra_probes, 0);
    }

    #[test]
    fn disabled_is_always_healthy() {
        let t0 = Instant::now();
        let mut h = TunnelHealth::new(t0, false);
        for i in 0..10 {
            let e = h.on_result(t0 + Duration::from_secs(i), Trigger::Scheduled, Outcome::Lost);
            assert_eq!(e, Effect::default());
        }
        assert_eq!(h.state(), HealthState::Healthy);
        assert_eq!(h.penalty(), 0);

        let mut h = TunnelHealth::new(t0, true);
        for i in 0..3 {
            h.on_result(t0 + Duration::from_secs(i), Trigger::Scheduled, Outcome::Lost);
        }
        assert_eq!(h.state(), HealthState::Down);
        let at = t0 + Duration::from_secs(5);
        let c = h.set_enabled(at, false).expect("change");
        assert_eq!(
            (c.from, c.to, c.reason),
            (HealthState::Down, HealthState::Healthy, ChangeReason::Disabled)
        );
        assert_eq!(h.reason().to_string(), "health checks disabled");
        assert_eq!(h.set_enabled(at, true), None, "already healthy");
        assert_eq!(h.reason(), ChangeReason::Enabled);
        assert_eq!(h.snapshot(at).window_results, 0, "enabling starts a fresh window");
    }

    #[test]
    fn counters_and_rtt() {
        let t0 = Instant::now();
        let mut h = TunnelHealth::new(t0, true);
        let ms = Duration::from_millis;
        for (i, rtt) in [80, 0, 160].into_iter().enumerate() {
            let now = t0 + Duration::from_secs(i as u64);
            h.on_probe_sent(now);
            let outcome = if rtt == 0 {
                Outcome::Lost
            } else {
                Outcome::Success { rtt: ms(rtt) }
            };
            h.on_result(now, Trigger::Scheduled, outcome);
        }
        let s = h.snapshot(t0 + Duration::from_secs(3));
        assert_eq!((s.sent, s.succeeded, s.failed), (3, 2, 1));
        assert_eq!(s.last_rtt, Some(ms(160)));
        assert_eq!(s.smoothed_rtt, Some(ms(90)), "80 * 7/8 + 160 / 8");
        assert!((s.loss_ratio - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!((s.consecutive_successes, s.consecutive_losses), (1, 0));
    }
}
