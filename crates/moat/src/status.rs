//! What `moat status` shows. Everything about the data plane is read back
//! from the maps and the kernel, never echoed from the configuration;
//! names come from the daemon (the maps hold ids), and any difference
//! between the maps and the desired state of the current generation is
//! listed under `data_plane.differences`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::Ipv4Addr,
};

use ipnet::{Ipv4Net, Ipv6Net};
use moat_common::{Counter, Reason, Tunnel, TUNNEL_HAS_KEY, TUNNEL_NEXTHOP_VALID};
use moat_dataplane::{compile::Lpm, Contents, Counters, RouteSetEntry};
use serde::{Deserialize, Serialize};

/// Differences listed in one status answer (all are counted).
pub const MAX_DIFFERENCES: usize = 100;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub version: String,
    pub build: String,
    pub pid: u32,
    pub config_file: String,
    pub generation: u64,
    pub last_reload: Reload,
    pub data_plane: DataPlane,
    pub interfaces: Vec<Interface>,
    pub customers: Vec<Customer>,
    pub tunnels: Vec<TunnelStatus>,
    pub reasons: BTreeMap<String, Count>,
    /// Matches per rule since the rule sets last changed.
    #[serde(default)]
    pub rules: Vec<RuleStatus>,
}

/// One rule's matches: an operator mitigation rule (`customer` empty) or
/// a rule of a customer's firewall.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RuleStatus {
    /// "mitigation" or "firewall".
    pub set: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub customer: String,
    pub rule: String,
    pub matched: Count,
}

pub fn rules(counters: &[moat_dataplane::RuleCounter]) -> Vec<RuleStatus> {
    counters
        .iter()
        .map(|c| RuleStatus {
            set: if c.customer.is_some() { "firewall" } else { "mitigation" }.into(),
            customer: c.customer.clone().unwrap_or_default(),
            rule: c.rule.clone(),
            matched: Count {
                packets: c.packets,
                bytes: c.bytes,
            },
        })
        .collect()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reload {
    /// "ok", "rejected" (invalid file, nothing changed) or "failed" (the kernel refused part of an apply).
    pub result: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DataPlane {
    /// "loaded" (this daemon loaded it) or "adopted" (it was already running).
    pub opened: String,
    pub program_id: u32,
    pub pin_dir: String,
    /// True when the maps hold exactly the desired state of this generation
    /// and the program runs on every configured interface.
    pub consistent: bool,
    pub difference_count: usize,
    /// The first [`MAX_DIFFERENCES`] differences.
    pub differences: Vec<String>,
    pub entries: BTreeMap<String, usize>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    pub configured_mode: String,
    /// The mode the kernel reports ("native", "generic", "none", ...).
    pub mode: String,
    /// Our program is the one attached.
    pub attached: bool,
    pub program_id: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

impl From<Counter> for Count {
    fn from(c: Counter) -> Count {
        Count {
            packets: c.packets,
            bytes: c.bytes,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Customer {
    pub name: String,
    pub id: u32,
    /// Destination entries in the maps that lead to this customer.
    pub prefixes: Vec<String>,
    /// Route prefix -> tunnel name -> share of flows (slots of 4096).
    pub routes: BTreeMap<String, BTreeMap<String, u32>>,
    /// in/out x received/forwarded/dropped.
    pub counters: BTreeMap<String, Count>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Probes {
    /// Seconds in the current state, and why it was entered.
    pub since_seconds: u64,
    pub reason: String,
    /// Added to the priority of every route through the tunnel.
    pub penalty: u32,
    pub sent: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Over the last 5 minutes.
    pub loss_ratio: f64,
    pub rtt_ms: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TunnelStatus {
    pub customer: String,
    pub name: String,
    pub id: u32,
    pub local: String,
    pub remote: String,
    pub key: Option<u32>,
    pub mtu: u16,
    /// "healthy", "degraded", "down", or "unchecked (disabled)".
    pub health: String,
    /// Probe statistics (absent for a tunnel the daemon does not know).
    #[serde(default)]
    pub probes: Option<Probes>,
    /// "ifindex N via MAC" or "unresolved".
    pub next_hop: String,
    pub tx: Count,
    pub rx: Count,
}

fn lpm4(k: &Lpm<4>) -> String {
    Ipv4Net::new(k.1.into(), k.0 as u8).map_or("?".into(), |n| n.to_string())
}

fn lpm6(k: &Lpm<16>) -> String {
    Ipv6Net::new(k.1.into(), k.0 as u8).map_or("?".into(), |n| n.to_string())
}

fn mac(m: &[u8]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Lists what differs between the maps (`have`) and the desired state.
pub fn differences(have: &Contents, want: &Contents) -> Vec<String> {
    let mut out = Vec::new();
    fn cmp<K: Ord + Clone, V: PartialEq>(
        out: &mut Vec<String>,
        what: &str,
        have: &BTreeMap<K, V>,
        want: &BTreeMap<K, V>,
        show: impl Fn(&K) -> String,
    ) {
        for (k, v) in want {
            match have.get(k) {
                None => out.push(format!("{what} {}: missing from the maps", show(k))),
                Some(h) if h != v => out.push(format!("{what} {}: the maps hold other content", show(k))),
                _ => {}
            }
        }
        for k in have.keys() {
            if !want.contains_key(k) {
                out.push(format!("{what} {}: in the maps but not desired", show(k)));
            }
        }
    }
    fn set<K: Ord + Clone>(have: &BTreeSet<K>) -> BTreeMap<K, ()> {
        have.iter().map(|k| (k.clone(), ())).collect()
    }
    cmp(&mut out, "destination", &have.dest4, &want.dest4, lpm4);
    cmp(&mut out, "destination", &have.dest6, &want.dest6, lpm6);
    cmp(&mut out, "source", &set(&have.source4), &set(&want.source4), |k| {
        format!("{:?}", k)
    });
    cmp(&mut out, "source", &set(&have.source6), &set(&want.source6), |k| {
        format!("{:?}", k)
    });
    cmp(&mut out, "route set", &have.route_sets, &want.route_sets, |k| {
        k.to_string()
    });
    cmp(&mut out, "tunnel", &have.tunnels, &want.tunnels, |k| {
        want.tunnel_names
            .get(k)
            .map_or(format!("id {k}"), |(c, t)| format!("{c}/{t}"))
    });
    cmp(&mut out, "decapsulation entry", &have.decap, &want.decap, |k| {
        format!("{k:?}")
    });
    cmp(&mut out, "local address", &have.local_addrs, &want.local_addrs, |k| {
        Ipv4Addr::from(*k).to_string()
    });
    if have.protections != want.protections {
        out.push(format!(
            "built-in protections: the maps hold {:#x}, desired {:#x}",
            have.protections, want.protections
        ));
    }
    out
}

/// Per-customer and per-tunnel views of what the maps hold.
pub fn from_maps(
    maps: &Contents,
    names: &Contents,
    counters: &Counters,
) -> (Vec<Customer>, Vec<TunnelStatus>, BTreeMap<String, usize>) {
    let customer_name = |id: u32| {
        names
            .customers
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("(unknown customer id {id})"))
    };
    let tunnel_name = |id: u32| {
        names
            .tunnel_names
            .get(&id)
            .map_or(format!("(unknown tunnel id {id})"), |(_, t)| t.clone())
    };
    let mut customers: BTreeMap<u32, Customer> = BTreeMap::new();
    let dests = maps
        .dest4
        .iter()
        .map(|(k, v)| (lpm4(k), *v))
        .chain(maps.dest6.iter().map(|(k, v)| (lpm6(k), *v)));
    for (prefix, v) in dests {
        let c = customers.entry(v.customer).or_insert_with(|| Customer {
            name: customer_name(v.customer),
            id: v.customer,
            ..Customer::default()
        });
        c.prefixes.push(prefix.to_string());
        let shares: BTreeMap<String, u32> = match maps.route_sets.get(&v.route_set) {
            Some(RouteSetEntry::Single(t)) => [(tunnel_name(*t), moat_common::limits::ECMP_SLOTS as u32)].into(),
            Some(RouteSetEntry::Table(slots)) => {
                let mut m = BTreeMap::new();
                for s in slots.iter() {
                    *m.entry(tunnel_name(u32::from(*s))).or_insert(0) += 1;
                }
                m
            }
            None => BTreeMap::new(),
        };
        if !shares.is_empty() {
            c.routes.insert(prefix.to_string(), shares);
        }
    }
    for c in customers.values_mut() {
        if let Some(s) = counters.customers.get(&c.id) {
            for (k, v) in [
                ("in_received", s.in_received),
                ("in_forwarded", s.in_forwarded),
                ("in_dropped", s.in_dropped),
                ("out_received", s.out_received),
                ("out_forwarded", s.out_forwarded),
                ("out_dropped", s.out_dropped),
            ] {
                c.counters.insert(k.into(), v.into());
            }
        }
    }
    let tunnels = maps
        .tunnels
        .iter()
        .map(|(id, t)| tunnel_status(*id, t, names, counters))
        .collect();
    let entries = [
        ("destination_v4", maps.dest4.len()),
        ("destination_v6", maps.dest6.len()),
        ("source_v4", maps.source4.len()),
        ("source_v6", maps.source6.len()),
        ("route_sets", maps.route_sets.len()),
        ("tunnels", maps.tunnels.len()),
        ("decapsulation", maps.decap.len()),
        ("local_addresses", maps.local_addrs.len()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    (customers.into_values().collect(), tunnels, entries)
}

fn tunnel_status(id: u32, t: &Tunnel, names: &Contents, counters: &Counters) -> TunnelStatus {
    use moat_common::header;
    let (customer, name) = names.tunnel_names.get(&id).cloned().unwrap_or_else(|| {
        (
            format!("(customer id {})", t.customer),
            format!("(unknown tunnel id {id})"),
        )
    });
    let ip = |at: usize| Ipv4Addr::new(t.header[at], t.header[at + 1], t.header[at + 2], t.header[at + 3]);
    let key = (t.flags & TUNNEL_HAS_KEY != 0).then(|| {
        u32::from_be_bytes([
            t.header[header::GRE_KEY],
            t.header[header::GRE_KEY + 1],
            t.header[header::GRE_KEY + 2],
            t.header[header::GRE_KEY + 3],
        ])
    });
    let next_hop = if t.flags & TUNNEL_NEXTHOP_VALID != 0 {
        format!(
            "ifindex {} via {}",
            t.ifindex,
            mac(&t.header[header::ETH_DST..header::ETH_DST + 6])
        )
    } else {
        "unresolved".into()
    };
    let s = counters.tunnels.get(&id).copied().unwrap_or_default();
    TunnelStatus {
        customer,
        name,
        id,
        local: ip(header::IP_SRC).to_string(),
        remote: ip(header::IP_DST).to_string(),
        key,
        mtu: t.mtu,
        health: "unchecked".into(),
        probes: None,
        next_hop,
        tx: s.tx.into(),
        rx: s.rx.into(),
    }
}

pub fn reasons(counters: &Counters) -> BTreeMap<String, Count> {
    Reason::ALL
        .iter()
        .map(|r| {
            (
                r.name().to_string(),
                counters.reasons.get(r).copied().unwrap_or_default().into(),
            )
        })
        .collect()
}

fn count(c: &Count) -> String {
    format!("{} pkts {} B", c.packets, c.bytes)
}

/// The human form of `moat status`.
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "node {}  moat {} (build {})  pid {}",
        s.node, s.version, s.build, s.pid
    );
    let _ = writeln!(o, "config {}  generation {}", s.config_file, s.generation);
    let _ = writeln!(o, "last reload: {}", s.last_reload.result);
    for e in &s.last_reload.errors {
        let _ = writeln!(o, "  {e}");
    }
    let d = &s.data_plane;
    let _ = writeln!(
        o,
        "data plane: {} program id {}, pinned at {}, {}",
        d.opened,
        d.program_id,
        d.pin_dir,
        if d.consistent {
            "maps match generation ".to_string() + &s.generation.to_string()
        } else {
            format!(
                "MAPS DIFFER FROM GENERATION {} ({} differences)",
                s.generation,
                d.differences.len()
            )
        }
    );
    for diff in d.differences.iter().take(20) {
        let _ = writeln!(o, "  ! {diff}");
    }
    let _ = writeln!(o, "interfaces:");
    for i in &s.interfaces {
        let _ = writeln!(
            o,
            "  {:<16} {:<8} {} (configured {})",
            i.name,
            i.mode,
            if i.attached { "attached" } else { "NOT ATTACHED" },
            i.configured_mode
        );
    }
    let _ = writeln!(o, "customers ({}):", s.customers.len());
    for c in &s.customers {
        let _ = writeln!(o, "  {} (id {}): {}", c.name, c.id, c.prefixes.join(" "));
        for (p, shares) in &c.routes {
            let members: Vec<String> = shares
                .iter()
                .map(|(t, n)| format!("{t} {:.1}%", f64::from(*n) * 100.0 / 4096.0))
                .collect();
            let _ = writeln!(o, "    route {p} -> {}", members.join(", "));
        }
        let get = |k: &str| c.counters.get(k).copied().unwrap_or_default();
        let _ = writeln!(
            o,
            "    in: {} received, {} forwarded, {} dropped; out: {} received, {} forwarded, {} dropped",
            get("in_received").packets,
            get("in_forwarded").packets,
            get("in_dropped").packets,
            get("out_received").packets,
            get("out_forwarded").packets,
            get("out_dropped").packets
        );
    }
    let _ = writeln!(o, "tunnels ({}):", s.tunnels.len());
    for t in &s.tunnels {
        let key = t.key.map_or(String::new(), |k| format!(" key {k}"));
        let probes = t.probes.as_ref().map_or(String::new(), |p| {
            format!(
                " ({} s, {}; {} probes, {:.2}% lost{})",
                p.since_seconds,
                p.reason,
                p.sent,
                p.loss_ratio * 100.0,
                p.rtt_ms.map_or(String::new(), |r| format!(", rtt {r:.2} ms"))
            )
        });
        let _ = writeln!(
            o,
            "  {}/{}: {} -> {}{} mtu {}  {}{}  next hop {}  tx {}  rx {}",
            t.customer,
            t.name,
            t.local,
            t.remote,
            key,
            t.mtu,
            t.health,
            probes,
            t.next_hop,
            count(&t.tx),
            count(&t.rx)
        );
    }
    if !s.rules.is_empty() {
        let _ = writeln!(o, "rules ({}), matches since the rules last changed:", s.rules.len());
        for r in &s.rules {
            let whose = if r.customer.is_empty() {
                "mitigation".to_string()
            } else {
                format!("firewall {}", r.customer)
            };
            let _ = writeln!(o, "  {whose}/{}: {}", r.rule, count(&r.matched));
        }
    }
    let _ = writeln!(o, "reasons:");
    for (r, c) in &s.reasons {
        if c.packets > 0 {
            let _ = writeln!(o, "  {r:<28} {}", count(c));
        }
    }
    o
}
