//! moat's data plane from userspace: load and attach the XDP program,
//! compile a [`Spec`] into the exact contents of its maps, apply that as a
//! diff in an order that never exposes a hole, and read the counters back.

pub mod adopt;
pub mod apply;
pub mod classify;
pub mod compile;
pub mod counters;
pub mod dir;
pub mod ecmp;
pub mod error;
pub mod flood;
pub mod loader;
mod mmap;
pub mod nexthop;
pub mod rules;
pub mod spec;
pub mod testrun;
mod verify;

pub use adopt::AdoptReport;
pub use apply::ApplyReport;
pub use compile::{compile, Compiled, Contents, Names, RouteSetEntry};
pub use counters::Counters;
pub use error::Error;
pub use loader::{build_id, Dataplane, Opened, PinDir, XdpMode};
pub use rules::RuleCounter;
pub use spec::{CustomerSpec, NextHop, RateLimit, RatePer, RouteSpec, RuleAction, RuleSpec, Spec, TunnelSpec};
