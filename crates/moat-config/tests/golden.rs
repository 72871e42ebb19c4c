//! Golden files: `tests/golden/invalid/NAME.yaml` with `NAME.expected`
//! holding the exact error output of `moat validate`, and
//! `tests/golden/valid/NAME.yaml` with `NAME.expected` holding the summary
//! line, the warnings and a dump of the compiled data-plane state.
//!
//! `MOAT_BLESS=1 cargo test -p moat-config --test golden` rewrites the
//! expected files; review every change by eye, they are the specification.

use std::fmt::Write as _;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use moat_common::limits::NO_ROUTE_SET;
use moat_common::{LOCAL_NODE_ADDRESS, LOCAL_TUNNEL_ENDPOINT, TUNNEL_HAS_KEY, TUNNEL_NEXTHOP_VALID, TUNNEL_PRESENT};
use moat_dataplane::compile::Contents;
use moat_dataplane::{compile, NextHop, RouteSetEntry};

fn cases(dir: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {dir}: {e}"))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    v.sort();
    v
}

/// Compares `actual` with the expected file, or rewrites it under MOAT_BLESS.
/// Returns a failure description.
fn check(yaml: &Path, actual: &str) -> Option<String> {
    let expected_path = yaml.with_extension("expected");
    if std::env::var_os("MOAT_BLESS").is_some() {
        fs::write(&expected_path, actual).expect("writing the expected file");
        return None;
    }
    let expected = fs::read_to_string(&expected_path).unwrap_or_default();
    (expected != actual).then(|| {
        format!(
            "{}:\n--- expected\n{expected}--- actual\n{actual}",
            expected_path.display()
        )
    })
}

#[test]
fn invalid_configs_give_exactly_the_expected_errors() {
    let cases = cases("tests/golden/invalid");
    assert!(cases.len() >= 25, "only {} invalid cases", cases.len());
    let mut failures = Vec::new();
    for yaml in &cases {
        let actual = match moat_config::load(yaml) {
            Ok(_) => format!("unexpectedly valid: {}\n", yaml.display()),
            Err(errors) => errors.iter().map(|e| format!("{e}\n")).collect(),
        };
        failures.extend(check(yaml, &actual));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn valid_configs_compile_to_the_expected_state() {
    let cases = cases("tests/golden/valid");
    assert!(cases.len() >= 3);
    let mut failures = Vec::new();
    for yaml in &cases {
        let actual = match moat_config::load(yaml) {
            Ok(loaded) => {
                let mut out = loaded.config.summary() + "\n";
                for w in &loaded.warnings {
                    writeln!(out, "{w}").unwrap();
                }
                let spec = loaded.config.to_spec();
                let next_hop = |_: &moat_dataplane::TunnelSpec| {
                    Some(NextHop {
                        ifindex: 2,
                        smac: [0x02, 0, 0, 0, 0, 0x01],
                        dmac: [0x02, 0, 0, 0, 0, 0x02],
                        link_mtu: 1500,
                    })
                };
                let compiled = compile(&spec, &next_hop, None).expect("a valid config compiles");
                out + &dump(&compiled.contents()) + &dump_rules(compiled.rules())
            }
            Err(errors) => errors.iter().map(|e| format!("{e}\n")).collect(),
        };
        failures.extend(check(yaml, &actual));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The rule sets as compiled: per set its rules and the size of its tables.
fn dump_rules(r: Option<&moat_dataplane::rules::RuleTables>) -> String {
    let Some(r) = r else {
        return "rules: none\n".into();
    };
    let mut out = String::from("rules:\n");
    for set in &r.sets {
        let whose = match &set.customer {
            None => "mitigation".to_string(),
            Some((id, name)) => format!("firewall of {name} (customer {id})"),
        };
        let intervals: usize = set.tables.tables.iter().map(|t| t.starts.len()).sum();
        writeln!(
            out,
            "  {whose}: {} rules, {} terms, {} fields, {intervals} intervals, {} bitmaps",
            set.rules.len(),
            set.tables.term_rule.len(),
            set.tables.absent.len(),
            set.tables.bitmaps.len()
        )
        .unwrap();
        for (name, action) in &set.rules {
            writeln!(out, "    {name}: {action:?}").unwrap();
        }
    }
    out
}

fn tunnel_name(c: &Contents, id: u32) -> String {
    c.tunnel_names
        .get(&id)
        .map_or(format!("?{id}"), |(cu, t)| format!("{cu}/{t}"))
}

fn route_set(c: &Contents, id: u32) -> String {
    if id == NO_ROUTE_SET {
        return "no route".into();
    }
    let key = c.route_set_keys.get(&id).map_or("?".into(), |(_, p)| p.to_string());
    format!("route set {id} ({key})")
}

/// A readable, deterministic text of everything the data plane would hold.
fn dump(c: &Contents) -> String {
    let mut out = String::new();
    let customer = |id: u32| c.customers.get(&id).cloned().unwrap_or(format!("?{id}"));
    out += "customers:\n";
    for (id, name) in &c.customers {
        writeln!(out, "  {id} {name}").unwrap();
    }
    out += "tunnels:\n";
    for (id, t) in &c.tunnels {
        let h = &t.header;
        let local = Ipv4Addr::new(h[26], h[27], h[28], h[29]);
        let remote = Ipv4Addr::new(h[30], h[31], h[32], h[33]);
        let key = if t.flags & TUNNEL_HAS_KEY != 0 {
            format!(" key {}", u32::from_be_bytes([h[38], h[39], h[40], h[41]]))
        } else {
            String::new()
        };
        let mut flags = Vec::new();
        for (bit, name) in [
            (TUNNEL_PRESENT, "present"),
            (TUNNEL_HAS_KEY, "key"),
            (TUNNEL_NEXTHOP_VALID, "nexthop"),
        ] {
            if t.flags & bit != 0 {
                flags.push(name);
            }
        }
        writeln!(
            out,
            "  {id} {} customer {}: local {local} remote {remote}{key} ttl {} mtu {} link_mtu {} ifindex {} header_len {} flags {}",
            tunnel_name(c, *id),
            customer(t.customer),
            h[22],
            t.mtu,
            t.link_mtu,
            t.ifindex,
            t.header_len,
            flags.join(",")
        )
        .unwrap();
    }
    out += "route sets:\n";
    for (id, entry) in &c.route_sets {
        let (cu, prefix) = c
            .route_set_keys
            .get(id)
            .cloned()
            .unwrap_or(("?".into(), IpNet::default()));
        let members = match entry {
            RouteSetEntry::Single(t) => tunnel_name(c, *t),
            RouteSetEntry::Table(slots) => {
                let mut counts: std::collections::BTreeMap<u16, usize> = Default::default();
                for s in slots.iter() {
                    *counts.entry(*s).or_default() += 1;
                }
                let shares: Vec<String> = counts
                    .iter()
                    .map(|(t, n)| format!("{} {n}", tunnel_name(c, u32::from(*t))))
                    .collect();
                format!("ecmp slots: {}", shares.join(", "))
            }
        };
        writeln!(out, "  {id} {cu} {prefix} -> {members}").unwrap();
    }
    out += "destinations:\n";
    for ((len, a), v) in &c.dest4 {
        let p = Ipv4Net::new((*a).into(), *len as u8).expect("prefix");
        writeln!(out, "  {p} -> {}, {}", customer(v.customer), route_set(c, v.route_set)).unwrap();
    }
    for ((len, a), v) in &c.dest6 {
        let p = Ipv6Net::new((*a).into(), *len as u8).expect("prefix");
        writeln!(out, "  {p} -> {}, {}", customer(v.customer), route_set(c, v.route_set)).unwrap();
    }
    out += "sources:\n";
    for (len, k) in &c.source4 {
        let id = u32::from_be_bytes([k[0], k[1], k[2], k[3]]);
        let p = Ipv4Net::new(Ipv4Addr::new(k[4], k[5], k[6], k[7]), (*len - 32) as u8).expect("prefix");
        writeln!(out, "  {} {p}", customer(id)).unwrap();
    }
    for (len, k) in &c.source6 {
        let id = u32::from_be_bytes([k[0], k[1], k[2], k[3]]);
        let mut a = [0u8; 16];
        a.copy_from_slice(&k[4..]);
        let p = Ipv6Net::new(a.into(), (*len - 32) as u8).expect("prefix");
        writeln!(out, "  {} {p}", customer(id)).unwrap();
    }
    out += "decap:\n";
    for (k, v) in &c.decap {
        let key = if k.has_key != 0 {
            format!(" key {}", u32::from_be_bytes(k.key))
        } else {
            String::new()
        };
        writeln!(
            out,
            "  local {} remote {}{key} -> {} (customer {})",
            Ipv4Addr::from(k.local),
            Ipv4Addr::from(k.remote),
            tunnel_name(c, v.tunnel),
            customer(v.customer)
        )
        .unwrap();
    }
    out += "local addresses:\n";
    for (a, flags) in &c.local_addrs {
        let mut names = Vec::new();
        if flags & LOCAL_TUNNEL_ENDPOINT != 0 {
            names.push("tunnel-endpoint");
        }
        if flags & LOCAL_NODE_ADDRESS != 0 {
            names.push("node-address");
        }
        writeln!(out, "  {} {}", Ipv4Addr::from(*a), names.join(",")).unwrap();
    }
    let p = c.protections;
    let on: Vec<&str> = [
        (moat_common::protect::INVALID_TCP_FLAGS, "invalid-tcp-flags"),
        (moat_common::protect::LAND, "land"),
        (moat_common::protect::ZERO_PORTS, "zero-ports"),
        (moat_common::protect::REFLECTION, "reflection"),
    ]
    .iter()
    .filter(|(bit, _)| p & bit != 0)
    .map(|(_, n)| *n)
    .collect();
    writeln!(
        out,
        "protections: {}",
        if on.is_empty() {
            "none".to_string()
        } else {
            on.join(",")
        }
    )
    .unwrap();
    out
}
