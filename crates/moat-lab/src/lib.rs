//! Tooling around moat's data plane for tests, benchmarks and the demo:
//! network namespaces, test packets, a reference model of the pipeline, a
//! bare XDP_DROP baseline program and a userspace GRE endpoint.

pub mod baseline;
pub mod daemon;
pub mod edge;
pub mod fixture;
pub mod flood;
pub mod gre;
pub mod http;
pub mod model;
pub mod netns;
pub mod packet;
pub mod peers;
pub mod plot;
pub mod random;
pub mod rules;
pub mod site;
pub mod sock;
pub mod topology;
