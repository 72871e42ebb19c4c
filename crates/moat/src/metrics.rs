//! The Prometheus endpoint: GET /metrics, text format. Values are read
//! from the data plane's per-CPU counters at scrape time; reason labels
//! come from the common crate's reason enum.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::status::Count;

type Labels = Vec<(String, String)>;

/// Everything one scrape reports.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub node: String,
    pub build: String,
    pub generation: u64,
    pub last_reload_ok: bool,
    pub last_reload_at: u64,
    /// Differences between the maps and the generation found by the last verification.
    pub differences: usize,
    pub reasons: Vec<(String, Count)>,
    /// Matches per rule since the rule sets last changed.
    pub rules: Vec<crate::status::RuleStatus>,
    /// (customer, "in"/"out", "received"/"forwarded"/"dropped", count)
    pub customers: Vec<(String, &'static str, &'static str, Count)>,
    /// (customer, tunnel, "tx"/"rx", count, next hop resolved)
    pub tunnels: Vec<(String, String, &'static str, Count)>,
    pub next_hops: Vec<(String, String, bool)>,
    /// (customer, tunnel, state: 0 healthy / 1 degraded / 2 down, probes sent, probes failed)
    pub health: Vec<(String, String, i64, u64, u64)>,
    /// Probe answers by how they were classified (matched, stale, ...).
    pub replies: Vec<(&'static str, u64)>,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Renders a snapshot in the Prometheus text format.
pub fn encode_snapshot(s: &Snapshot) -> String {
    let mut r = Registry::with_prefix("moat");
    r.register(
        "build",
        "moat version and data-plane build",
        Info::new(labels(&[
            ("version", env!("CARGO_PKG_VERSION")),
            ("build", &s.build),
            ("node", &s.node),
        ])),
    );
    let generation: Gauge = Gauge::default();
    generation.set(s.generation as i64);
    r.register("config_generation", "Configuration generation in force", generation);
    let ok: Gauge = Gauge::default();
    ok.set(i64::from(s.last_reload_ok));
    r.register(
        "last_reload_success",
        "1 if the last reload (or the start) applied its configuration, 0 if it was rejected or failed",
        ok,
    );
    let at: Gauge = Gauge::default();
    at.set(s.last_reload_at as i64);
    r.register(
        "last_reload_timestamp_seconds",
        "When the last reload (or the start) happened",
        at,
    );

    let diff: Gauge = Gauge::default();
    diff.set(s.differences as i64);
    r.register(
        "data_plane_differences",
        "Entries in which the maps differed from the generation in force at the last verification (then repaired)",
        diff,
    );

    let reason_packets = Family::<Labels, Counter>::default();
    let reason_bytes = Family::<Labels, Counter>::default();
    for (name, c) in &s.reasons {
        let l = labels(&[("reason", name)]);
        reason_packets.get_or_create(&l).inc_by(c.packets);
        reason_bytes.get_or_create(&l).inc_by(c.bytes);
    }
    r.register(
        "reason_packets",
        "Packets by the data plane's verdict reason",
        reason_packets,
    );
    r.register("reason_bytes", "Bytes by the data plane's verdict reason", reason_bytes);

    let rule_packets = Family::<Labels, Counter>::default();
    let rule_bytes = Family::<Labels, Counter>::default();
    for rule in &s.rules {
        let l = labels(&[("set", &rule.set), ("customer", &rule.customer), ("rule", &rule.rule)]);
        rule_packets.get_or_create(&l).inc_by(rule.matched.packets);
        rule_bytes.get_or_create(&l).inc_by(rule.matched.bytes);
    }
    r.register(
        "rule_matched_packets",
        "Packets matched per rule (set mitigation, or firewall with its customer) since the rule sets last changed",
        rule_packets,
    );
    r.register(
        "rule_matched_bytes",
        "Bytes matched per rule since the rule sets last changed",
        rule_bytes,
    );

    let cust_packets = Family::<Labels, Counter>::default();
    let cust_bytes = Family::<Labels, Counter>::default();
    for (customer, direction, result, c) in &s.customers {
        let l = labels(&[("customer", customer), ("direction", direction), ("result", result)]);
        cust_packets.get_or_create(&l).inc_by(c.packets);
        cust_bytes.get_or_create(&l).inc_by(c.bytes);
    }
    r.register(
        "customer_packets",
        "Customer packets: direction in (toward the customer) or out (from it), result received/forwarded/dropped",
        cust_packets,
    );
    r.register("customer_bytes", "Customer bytes, as customer_packets", cust_bytes);

    let tun_packets = Family::<Labels, Counter>::default();
    let tun_bytes = Family::<Labels, Counter>::default();
    for (customer, tunnel, direction, c) in &s.tunnels {
        let l = labels(&[("customer", customer), ("tunnel", tunnel), ("direction", direction)]);
        tun_packets.get_or_create(&l).inc_by(c.packets);
        tun_bytes.get_or_create(&l).inc_by(c.bytes);
    }
    r.register(
        "tunnel_packets",
        "Tunnel packets: tx encapsulated into it, rx accepted from it",
        tun_packets,
    );
    r.register("tunnel_bytes", "Tunnel bytes, as tunnel_packets", tun_bytes);

    let resolved = Family::<Labels, Gauge>::default();
    for (customer, tunnel, ok) in &s.next_hops {
        resolved
            .get_or_create(&labels(&[("customer", customer), ("tunnel", tunnel)]))
            .set(i64::from(*ok));
    }
    r.register(
        "tunnel_next_hop_resolved",
        "1 if the tunnel's next hop (interface and MAC) is resolved",
        resolved,
    );

    let state = Family::<Labels, Gauge>::default();
    let sent = Family::<Labels, Counter>::default();
    let failed = Family::<Labels, Counter>::default();
    for (customer, tunnel, st, n_sent, n_failed) in &s.health {
        let l = labels(&[("customer", customer), ("tunnel", tunnel)]);
        state.get_or_create(&l).set(*st);
        sent.get_or_create(&l).inc_by(*n_sent);
        failed.get_or_create(&l).inc_by(*n_failed);
    }
    r.register(
        "tunnel_health_state",
        "Tunnel health: 0 healthy, 1 degraded (+500000 priority), 2 down (+1000000)",
        state,
    );
    r.register("tunnel_probes_sent", "Health probes sent through the tunnel", sent);
    r.register("tunnel_probes_failed", "Health probes not answered in time", failed);
    let replies = Family::<Labels, Counter>::default();
    for (kind, n) in &s.replies {
        replies.get_or_create(&labels(&[("kind", kind)])).inc_by(*n);
    }
    r.register(
        "probe_replies",
        "Answers seen by the probe sockets: matched, or ignored as malformed, not_probe, unknown, wrong_tunnel, stale, duplicate",
        replies,
    );

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

/// Serves GET /metrics on `addr` until the process exits; `snapshot` is
/// called once per scrape.
pub async fn serve(listener: TcpListener, snapshot: Arc<dyn Fn() -> String + Send + Sync>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let snapshot = snapshot.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let snapshot = snapshot.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics" && req.method() == hyper::Method::GET {
                        let body = tokio::task::spawn_blocking(move || snapshot())
                            .await
                            .unwrap_or_else(|_| String::new());
                        Response::builder()
                            .header(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(body)))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"not found; try /metrics\n")))
                    };
                    Ok::<_, Infallible>(resp.unwrap_or_default())
                }
            });
            let _ = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Binds the metrics listener (an error names the address).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics listener {addr}: {e}"))
}
