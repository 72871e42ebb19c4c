//! Tunnel health for moat: pure logic the daemon drives, with no sockets and
//! no clock of its own (every call takes the time as an [`std::time::Instant`]).
//!
//! Three parts, one job each:
//! - [`state`]: the per-tunnel state machine (healthy / degraded / down) fed
//!   with probe results, and the route penalty of each state.
//! - [`probe`]: the probe packets (inner IPv4 ICMP echo in reply or request
//!   style, GRE encapsulation) and [`Outstanding`], which keeps the probes in
//!   flight and classifies what comes back.
//! - [`schedule`]: [`Schedule`], which says which tunnels are due for a probe,
//!   spreading them evenly over their interval.
//!
//! One round of the daemon's loop, in order:
//! 1. `schedule.due(now)` gives `(tunnel, trigger)` pairs; for each,
//!    `outstanding.issue(tunnel, now, trigger)` gives the inner packet,
//!    [`probe::gre_encap`] wraps it, the daemon sends it and calls
//!    `health.on_probe_sent(now)`.
//! 2. Every received ICMP packet goes to `outstanding.classify(..)`; a
//!    [`Received::Match`] becomes `health.on_result(now, trigger, Outcome::Success { rtt })`.
//! 3. `outstanding.expire(now)` gives the probes that timed out; each becomes
//!    `health.on_result(now, trigger, Outcome::Lost)`.
//! 4. When `on_result` asks for extra probes, `schedule.probe_now(tunnel, n)`;
//!    when it reports a change, the daemon re-applies the route penalties
//!    ([`TunnelHealth::penalty`]).

pub mod probe;
pub mod schedule;
pub mod state;

pub use probe::{Outstanding, ProbeSpec, ProbeStyle, ReceiveCounts, Received, Rejection};
pub use schedule::Schedule;
pub use state::{Change, ChangeReason, Effect, HealthSnapshot, HealthState, Outcome, TunnelHealth};

/// A tunnel, named by the id the data plane uses for it.
pub type TunnelId = u32;

/// Why a probe is sent: on the tunnel's regular schedule, or as one of the
/// extra probes a failed scheduled probe asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Trigger {
    Scheduled,
    Extra,
}
