//! Raw structs -> [`Config`], checking every rule and collecting every
//! violation as a positioned error.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net};
use moat_common::limits::{
    MAX_CUSTOMERS, MAX_DECAP_ENTRIES, MAX_DEST_ENTRIES, MAX_ECMP_SETS, MAX_LOCAL_ADDRS, MAX_ROUTE_SETS,
    MAX_SOURCE_ENTRIES, MAX_TUNNELS,
};
use serde_saphyr::{Location, Spanned};

use crate::expr::{self, Expr};
use crate::model::*;
use crate::raw::*;
use crate::{Diagnostic, Loaded, Pos, Severity};

type S<T> = Spanned<T>;

const DEFAULT_METRICS: &str = "127.0.0.1:9477";
const DEFAULT_MTU: u16 = 1476;
const DEFAULT_TTL: u8 = 64;
const DEFAULT_PRIORITY: u32 = 100;
const DEFAULT_WEIGHT: u16 = 100;
const MAX_PRIORITY: i64 = 1_000_000_000;

pub(crate) fn parse(text: &str, file: &str) -> Result<Loaded, Vec<Diagnostic>> {
    // The parser's default budget (250,000 nodes) is below what a
    // configuration within the data plane's limits may need (millions of
    // prefixes); keep a bound, sized to those limits.
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_nodes: 32_000_000,
            max_events: 80_000_000,
            max_total_scalar_bytes: 1 << 30,
        },
    };
    let raw: RawConfig = match serde_saphyr::from_str_with_options(text, options) {
        Ok(raw) => raw,
        Err(e) => return Err(vec![parse_error(&e, text, file)]),
    };
    let mut cx = Ctx {
        text,
        errors: Vec::new(),
    };
    let config = cx.config(&raw);
    let diagnostic = |(pos, message): (Pos, String), severity| Diagnostic {
        file: file.to_string(),
        pos,
        severity,
        message,
    };
    if !cx.errors.is_empty() {
        // Stable: errors at one position keep the order they were found in.
        cx.errors.sort_by_key(|e| e.0);
        return Err(cx.errors.into_iter().map(|e| diagnostic(e, Severity::Error)).collect());
    }
    // Every accepted setting is enforced: nothing to warn about today.
    Ok(Loaded {
        config,
        warnings: Vec::new(),
    })
}

/// A parse error as one diagnostic, its message cleaned of the position
/// (the diagnostic carries it) and worded like moat's own messages.
fn parse_error(e: &serde_saphyr::Error, text: &str, file: &str) -> Diagnostic {
    let loc = e.location();
    let pos = loc.map_or(Pos { line: 1, col: 1 }, |l| Pos {
        line: (l.line() as usize).max(1),
        col: (l.column() as usize).max(1),
    });
    let mut message = e.without_snippet().to_string();
    if let Some(l) = loc {
        let suffix = format!(" at line {}, column {}", l.line(), l.column());
        if let Some(m) = message.strip_suffix(&suffix) {
            message = m.to_string();
        }
    }
    let empty = text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
    let pos = if empty { Pos { line: 1, col: 1 } } else { pos };
    let message = if empty {
        "the file is empty (expected version: 1, node and customers)".to_string()
    } else if let Some(rest) = message.strip_prefix("duplicate mapping key: ") {
        let key = rest.split(", set DuplicateKeyPolicy").next().unwrap_or(rest);
        format!("duplicate key '{key}'")
    } else if let Some(rest) = message.strip_prefix("unknown field ") {
        format!("unknown key {}", rest.replace('`', "'"))
    } else if let Some(rest) = message.strip_prefix("missing field ") {
        format!("missing required key {}", rest.replace('`', "'"))
    } else if message.starts_with("invalid i64") {
        "expected an integer".to_string()
    } else if message == "expected string scalar" {
        "expected a string".to_string()
    } else if message == "expected sequence start" {
        "expected a list".to_string()
    } else if message == "expected mapping start" {
        "expected a mapping (key: value)".to_string()
    } else if message.starts_with("budget breached") {
        format!("the file is too large for the parser's limits ({message})")
    } else if message.starts_with("invalid bool") {
        "expected true or false".to_string()
    } else {
        message.replace('`', "'")
    };
    Diagnostic {
        file: file.to_string(),
        pos,
        severity: Severity::Error,
        message,
    }
}

fn pos(loc: &Location) -> Pos {
    Pos {
        line: (loc.line() as usize).max(1),
        col: (loc.column() as usize).max(1),
    }
}

/// The elements of an optional list (empty when absent).
fn items<T>(list: &Option<S<Vec<S<T>>>>) -> &[S<T>] {
    list.as_ref().map_or(&[], |l| &l.value)
}

/// Node and customer names: `[a-z0-9-]{1,63}`.
fn valid_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// List names: `[a-z0-9_]+`.
fn valid_list_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Why `a` is not a unicast address, if it is not.
fn not_unicast(a: Ipv4Addr) -> Option<&'static str> {
    let first = a.octets()[0];
    if a.is_broadcast() {
        Some("the broadcast address")
    } else if first == 0 {
        Some("in 0.0.0.0/8 (this network)")
    } else if a.is_loopback() {
        Some("a loopback address")
    } else if a.is_multicast() {
        Some("a multicast address")
    } else if first >= 240 {
        Some("a reserved address (240.0.0.0/4)")
    } else {
        None
    }
}

fn family(p: &IpNet) -> &'static str {
    match p {
        IpNet::V4(_) => "IPv4",
        IpNet::V6(_) => "IPv6",
    }
}

/// A mitigation action word, before its rate limit is read.
#[derive(Clone, Copy)]
enum Act {
    Drop,
    Pass,
    RateLimit,
}

/// What identifies a tunnel on the wire: (local, remote, key).
type Identity = (Ipv4Addr, Ipv4Addr, Option<u32>);

/// A prefix with where it was written and whose it is.
struct Claim {
    net: IpNet,
    customer: usize,
    loc: Location,
}

struct Ctx<'a> {
    text: &'a str,
    errors: Vec<(Pos, String)>,
}

impl Ctx<'_> {
    fn err(&mut self, loc: &Location, message: String) {
        self.errors.push((pos(loc), message));
    }

    /// A CIDR prefix with its host bits clear.
    fn prefix(&mut self, s: &S<String>, context: &dyn Fn() -> String) -> Option<IpNet> {
        self.prefix_or_meant(s, context).ok()
    }

    /// A CIDR prefix with its host bits clear; on error, what was probably
    /// meant (the prefix with host bits cleared) if that can be told.
    fn prefix_or_meant(&mut self, s: &S<String>, context: &dyn Fn() -> String) -> Result<IpNet, Option<IpNet>> {
        let text = s.value.trim();
        match text.parse::<IpNet>() {
            Ok(net) if net.trunc() == net => Ok(net),
            Ok(net) => {
                self.err(
                    &s.referenced,
                    format!("{}{} has host bits set; did you mean {}?", context(), text, net.trunc()),
                );
                Err(Some(net.trunc()))
            }
            Err(_) => {
                self.err(
                    &s.referenced,
                    format!(
                        "{}'{}' is not a valid prefix (expected ADDRESS/LENGTH, e.g. 203.0.113.0/24)",
                        context(),
                        s.value
                    ),
                );
                Err(None)
            }
        }
    }

    /// A unicast IPv4 address.
    fn unicast(&mut self, s: &S<String>, context: &dyn Fn() -> String) -> Option<Ipv4Addr> {
        match s.value.trim().parse::<Ipv4Addr>() {
            Ok(a) => match not_unicast(a) {
                None => Some(a),
                Some(why) => {
                    self.err(
                        &s.referenced,
                        format!("{}{} is {}, not a unicast IPv4 address", context(), a, why),
                    );
                    None
                }
            },
            Err(_) => {
                self.err(
                    &s.referenced,
                    format!("{}'{}' is not an IPv4 address", context(), s.value),
                );
                None
            }
        }
    }

    /// An integer within `lo..=hi`.
    fn range(&mut self, v: &S<i64>, lo: i64, hi: i64, context: &dyn Fn() -> String) -> Option<i64> {
        if (lo..=hi).contains(&v.value) {
            Some(v.value)
        } else {
            self.err(
                &v.referenced,
                format!("{}{} is outside {}..={}", context(), v.value, lo, hi),
            );
            None
        }
    }

    /// One of a fixed set of words.
    fn choice<T: Copy>(&mut self, v: &S<String>, options: &[(&str, T)], context: &dyn Fn() -> String) -> Option<T> {
        if let Some((_, t)) = options.iter().find(|(name, _)| *name == v.value) {
            return Some(*t);
        }
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        self.err(
            &v.referenced,
            format!("{}'{}' is not one of: {}", context(), v.value, names.join(", ")),
        );
        None
    }

    fn config(&mut self, raw: &RawConfig) -> Config {
        if raw.version.value != 1 {
            self.err(
                &raw.version.referenced,
                format!(
                    "unsupported config version {} (this moat reads version 1)",
                    raw.version.value
                ),
            );
        }
        let node = self.node(&raw.node.value);
        let lists = self.lists(raw);
        let mitigation = self.mitigation(raw, &lists);
        let customers = self.customers(raw, &node, &lists);
        let defaults = Protections::default();
        let protections = match raw.mitigation.as_ref().and_then(|m| m.value.protections.as_ref()) {
            Some(p) => Protections {
                invalid_tcp_flags: p.value.invalid_tcp_flags.unwrap_or(defaults.invalid_tcp_flags),
                land: p.value.land.unwrap_or(defaults.land),
                zero_ports: p.value.zero_ports.unwrap_or(defaults.zero_ports),
                reflection: p.value.reflection.unwrap_or(defaults.reflection),
            },
            None => defaults,
        };
        Config {
            node,
            lists,
            mitigation,
            protections,
            customers,
        }
    }

    fn node(&mut self, raw: &RawNode) -> Node {
        if !valid_name(&raw.name.value) {
            self.err(
                &raw.name.referenced,
                format!(
                    "node name '{}' is invalid: use 1 to 63 characters of a-z, 0-9 and '-'",
                    raw.name.value
                ),
            );
        }
        if raw.interfaces.value.is_empty() {
            self.err(
                &raw.interfaces.referenced,
                "node.interfaces needs at least one interface".to_string(),
            );
        }
        let mut interfaces = Vec::new();
        let mut seen: HashMap<&str, Location> = HashMap::new();
        for i in &raw.interfaces.value {
            let name = &i.value.name;
            if name.value.is_empty() {
                self.err(&name.referenced, "interface name is empty".to_string());
            } else if name.value.len() > 15 {
                self.err(
                    &name.referenced,
                    format!(
                        "interface name '{}' is longer than 15 characters (the kernel's limit)",
                        name.value
                    ),
                );
            } else if let Some(first) = seen.get(name.value.as_str()) {
                self.err(
                    &name.referenced,
                    format!(
                        "interface '{}' is listed twice (first at line {})",
                        name.value,
                        first.line()
                    ),
                );
            } else {
                seen.insert(&name.value, name.referenced);
            }
            let xdp_mode = i.value.xdp_mode.as_ref().map_or(Some(XdpMode::Native), |m| {
                self.choice(
                    m,
                    &[("native", XdpMode::Native), ("generic", XdpMode::Generic)],
                    &|| format!("interface '{}': xdp_mode ", name.value),
                )
            });
            interfaces.push(Interface {
                name: name.value.clone(),
                xdp_mode: xdp_mode.unwrap_or(XdpMode::Native),
            });
        }
        let tunnel_endpoint = self
            .unicast(&raw.tunnel_endpoint, &|| "node tunnel_endpoint ".to_string())
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        let metrics = match &raw.metrics {
            Some(m) if m.value == "off" => None,
            Some(m) => match m.value.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    self.err(
                        &m.referenced,
                        format!(
                            "node metrics '{}' is neither ADDRESS:PORT (e.g. {DEFAULT_METRICS}) nor off",
                            m.value
                        ),
                    );
                    None
                }
            },
            None => DEFAULT_METRICS.parse().ok(),
        };
        Node {
            name: raw.name.value.clone(),
            interfaces,
            tunnel_endpoint,
            metrics,
        }
    }

    fn lists(&mut self, raw: &RawConfig) -> BTreeMap<String, Vec<IpNet>> {
        let mut lists = BTreeMap::new();
        let Some(raw_lists) = &raw.lists else {
            return lists;
        };
        // The map is unordered: visit it in file order.
        let mut entries: Vec<_> = raw_lists.value.iter().collect();
        entries.sort_by_key(|(k, _)| pos(&k.referenced));
        for (name, values) in entries {
            if !valid_list_name(&name.value) {
                self.err(
                    &name.referenced,
                    format!("list name '{}' is invalid: use a-z, 0-9 and '_'", name.value),
                );
            }
            let mut prefixes = Vec::new();
            for v in &values.value {
                if let Some(p) = self.prefix(v, &|| format!("list '{}': ", name.value)) {
                    prefixes.push(p);
                }
            }
            lists.insert(name.value.clone(), prefixes);
        }
        lists
    }

    /// Parses and checks a rule's expression (see [`crate::expr`]). An
    /// error points at the column inside the expression when it is written
    /// on one line without escapes, else at the expression.
    fn expression(
        &mut self,
        e: &S<String>,
        lists: &BTreeMap<String, Vec<IpNet>>,
        rule: &dyn Fn() -> String,
    ) -> Option<Expr> {
        if e.value.trim().is_empty() {
            self.err(&e.referenced, format!("{}: expression is empty", rule()));
            return None;
        }
        match expr::parse(&e.value, &|name| lists.contains_key(name)) {
            Ok(x) => {
                let list = |name: &str| lists.get(name).cloned().unwrap_or_default();
                if let Err(too) = expr::normal::terms(&x, &list, expr::normal::MAX_TERMS) {
                    self.err(&e.referenced, format!("{}: {too}", rule()));
                    return None;
                }
                Some(x)
            }
            Err(problem) => {
                let mut at = pos(&e.referenced);
                if let Some(offset) = self.offset_in_source(e) {
                    let chars = e.value.get(..problem.offset).map_or(0, |s| s.chars().count());
                    at.col += offset + chars;
                }
                self.errors.push((at, format!("{}: {}", rule(), problem.message)));
                None
            }
        }
    }

    /// Where the characters of a one-line scalar start relative to its
    /// position (1 past an opening quote), if the source shows them verbatim.
    fn offset_in_source(&self, e: &S<String>) -> Option<usize> {
        let line = self.text.lines().nth((e.referenced.line() as usize).checked_sub(1)?)?;
        let rest: String = line
            .chars()
            .skip((e.referenced.column() as usize).checked_sub(1)?)
            .collect();
        if rest.starts_with(e.value.as_str()) {
            Some(0)
        } else if (rest.starts_with('\'') || rest.starts_with('"')) && rest[1..].starts_with(e.value.as_str()) {
            Some(1)
        } else {
            None
        }
    }

    fn mitigation(&mut self, raw: &RawConfig, lists: &BTreeMap<String, Vec<IpNet>>) -> Vec<MitigationRule> {
        let Some(rules) = raw.mitigation.as_ref().map(|m| items(&m.value.rules)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut seen: HashMap<&str, Location> = HashMap::new();
        for r in rules {
            let r = &r.value;
            let name = &r.name.value;
            self.rule_name(&r.name, &mut seen, &|| "mitigation rule".to_string());
            let ctx = || format!("mitigation rule '{name}'");
            let condition = self.expression(&r.expression, lists, &ctx);
            let action = self.choice(
                &r.action,
                &[("drop", Act::Drop), ("pass", Act::Pass), ("rate_limit", Act::RateLimit)],
                &|| format!("{}: action ", ctx()),
            );
            let action = match (action, &r.rate_limit) {
                (Some(Act::Drop), None) => Some(MitigationAction::Drop),
                (Some(Act::Pass), None) => Some(MitigationAction::Pass),
                (Some(Act::RateLimit), Some(rl)) => {
                    let pps = self.range(&rl.value.pps, 1, i64::from(u32::MAX), &|| {
                        format!("{}: rate_limit pps ", ctx())
                    });
                    let per = rl.value.per.as_ref().map_or(Some(Per::Rule), |p| {
                        self.choice(
                            p,
                            &[("rule", Per::Rule), ("dst_ip", Per::DstIp), ("src_ip", Per::SrcIp)],
                            &|| format!("{}: rate_limit per ", ctx()),
                        )
                    });
                    match (pps, per) {
                        (Some(pps), Some(per)) => Some(MitigationAction::RateLimit { pps: pps as u32, per }),
                        _ => None,
                    }
                }
                (Some(Act::RateLimit), None) => {
                    self.err(
                        &r.action.referenced,
                        format!(
                            "{}: action rate_limit needs rate_limit: {{ pps: N, per: rule | dst_ip | src_ip }}",
                            ctx()
                        ),
                    );
                    None
                }
                (Some(_), Some(rl)) => {
                    self.err(
                        &rl.referenced,
                        format!(
                            "{}: rate_limit is given but the action is {} (only action rate_limit takes it)",
                            ctx(),
                            r.action.value
                        ),
                    );
                    None
                }
                (None, _) => None,
            };
            out.push(MitigationRule {
                name: name.clone(),
                expression: r.expression.value.clone(),
                // As for firewall rules: never used when in error.
                condition: condition.unwrap_or(Expr::And(Vec::new())),
                action: action.unwrap_or(MitigationAction::Pass),
            });
        }
        out
    }

    /// Rule names: not empty, unique within their list.
    fn rule_name<'r>(&mut self, name: &'r S<String>, seen: &mut HashMap<&'r str, Location>, what: &dyn Fn() -> String) {
        if name.value.trim().is_empty() {
            self.err(&name.referenced, format!("{} name is empty", what()));
        } else if let Some(first) = seen.get(name.value.as_str()) {
            self.err(
                &name.referenced,
                format!(
                    "{} '{}' is defined twice (first at line {})",
                    what(),
                    name.value,
                    first.line()
                ),
            );
        } else {
            seen.insert(&name.value, name.referenced);
        }
    }

    fn customers(&mut self, raw: &RawConfig, node: &Node, lists: &BTreeMap<String, Vec<IpNet>>) -> Vec<Customer> {
        let raw_customers = items(&raw.customers);
        let mut out = Vec::with_capacity(raw_customers.len());
        let mut names: HashMap<&str, Location> = HashMap::new();
        let mut claims: Vec<Claim> = Vec::new();
        // (local, remote, key) -> (customer, tunnel).
        let mut identities: HashMap<Identity, (&str, &str)> = HashMap::new();
        let mut usage = Usage::default();

        for (ci, c) in raw_customers.iter().enumerate() {
            let c = &c.value;
            let cname = c.name.value.as_str();
            if !valid_name(cname) {
                self.err(
                    &c.name.referenced,
                    format!("customer name '{cname}' is invalid: use 1 to 63 characters of a-z, 0-9 and '-'"),
                );
            } else if let Some(first) = names.get(cname) {
                self.err(
                    &c.name.referenced,
                    format!("customer '{cname}' is defined twice (first at line {})", first.line()),
                );
            } else {
                names.insert(cname, c.name.referenced);
            }
            let cx = || format!("customer '{cname}': ");

            // Protected prefixes (overlaps are checked over all customers below).
            let mut prefixes = Vec::new();
            // For checking routes: prefixes with host bits count as meant.
            let mut prefix_set: HashSet<IpNet> = HashSet::new();
            let mut prefixes_ok = true;
            for p in items(&c.prefixes) {
                match self.prefix_or_meant(p, &|| format!("{}prefix ", cx())) {
                    Ok(net) => {
                        prefixes.push(net);
                        prefix_set.insert(net);
                        claims.push(Claim {
                            net,
                            customer: ci,
                            loc: p.referenced,
                        });
                    }
                    Err(Some(meant)) => {
                        prefix_set.insert(meant);
                    }
                    Err(None) => prefixes_ok = false,
                }
            }
            let mut egress_prefixes = Vec::new();
            for p in items(&c.egress_prefixes) {
                if let Some(net) = self.prefix(p, &|| format!("{}egress prefix ", cx())) {
                    egress_prefixes.push(net);
                }
            }

            // Tunnels.
            let mut tunnels = Vec::new();
            let mut tunnel_names: HashMap<&str, Location> = HashMap::new();
            for t in items(&c.tunnels) {
                let t = &t.value;
                let tname = t.name.value.as_str();
                if tname.trim().is_empty() {
                    self.err(&t.name.referenced, format!("{}tunnel name is empty", cx()));
                } else if let Some(first) = tunnel_names.get(tname) {
                    self.err(
                        &t.name.referenced,
                        format!(
                            "{}tunnel '{tname}' is defined twice (first at line {})",
                            cx(),
                            first.line()
                        ),
                    );
                } else {
                    tunnel_names.insert(tname, t.name.referenced);
                }
                let (identity, tunnel) = self.tunnel(t, node, &|| format!("customer '{cname}', tunnel '{tname}': "));
                if let Some(identity @ (local, remote, key)) = identity {
                    if let Some((oc, ot)) = identities.get(&identity) {
                        let key = key.map_or("no key".to_string(), |k| format!("key {k}"));
                        self.err(
                            &t.remote.referenced,
                            format!(
                                "tunnel '{tname}' of customer '{cname}' has the same (local {local}, remote {remote}, \
                                 {key}) as tunnel '{ot}' of customer '{oc}'"
                            ),
                        );
                    } else {
                        identities.insert(identity, (cname, tname));
                    }
                }
                if let Some(tunnel) = tunnel {
                    usage.local_addrs.insert(tunnel.local);
                    if let Some(ours) = tunnel.our_address() {
                        usage.local_addrs.insert(ours);
                    }
                    tunnels.push(tunnel);
                }
            }

            // Routes.
            let mut routes = Vec::new();
            let mut seen_routes: HashMap<(IpNet, &str), Location> = HashMap::new();
            let mut route_prefixes: BTreeMap<IpNet, usize> = BTreeMap::new();
            for r in items(&c.routes) {
                let r = &r.value;
                let tname = r.tunnel.value.as_str();
                let prefix = self.prefix(&r.prefix, &|| format!("{}route prefix ", cx()));
                let rcx = || format!("customer '{cname}', route {} via '{tname}': ", r.prefix.value.trim());
                if !tunnel_names.contains_key(tname) {
                    self.err(
                        &r.tunnel.referenced,
                        format!("{}route {} names unknown tunnel '{tname}'", cx(), r.prefix.value.trim()),
                    );
                }
                let priority = r.priority.as_ref().map_or(Some(DEFAULT_PRIORITY), |p| {
                    self.range(p, 0, MAX_PRIORITY, &|| format!("{}priority ", rcx()))
                        .map(|v| v as u32)
                });
                let weight = r.weight.as_ref().map_or(Some(DEFAULT_WEIGHT), |w| {
                    self.range(w, 1, 256, &|| format!("{}weight ", rcx())).map(|v| v as u16)
                });
                let Some(prefix) = prefix else { continue };
                if prefixes_ok && !covered(&prefix_set, prefix) {
                    self.err(
                        &r.prefix.referenced,
                        format!("{}route {prefix} lies outside the customer's prefixes", cx()),
                    );
                }
                if let Some(first) = seen_routes.get(&(prefix, tname)) {
                    self.err(
                        &r.prefix.referenced,
                        format!(
                            "{}route {prefix} via '{tname}' is listed twice (first at line {})",
                            cx(),
                            first.line()
                        ),
                    );
                    continue;
                }
                seen_routes.insert((prefix, tname), r.prefix.referenced);
                *route_prefixes.entry(prefix).or_default() += 1;
                routes.push(Route {
                    prefix,
                    tunnel: tname.to_string(),
                    priority: priority.unwrap_or(DEFAULT_PRIORITY),
                    weight: weight.unwrap_or(DEFAULT_WEIGHT),
                });
            }

            // Firewall.
            let mut firewall = Vec::new();
            let mut seen_rules: HashMap<&str, Location> = HashMap::new();
            for r in items(&c.firewall) {
                let r = &r.value;
                self.rule_name(&r.name, &mut seen_rules, &|| {
                    format!("customer '{cname}': firewall rule")
                });
                let rule = || format!("firewall rule '{}' of customer '{cname}'", r.name.value);
                let condition = self.expression(&r.expression, lists, &rule);
                let action = self.choice(
                    &r.action,
                    &[("allow", FirewallAction::Allow), ("block", FirewallAction::Block)],
                    &|| format!("{}: action ", rule()),
                );
                firewall.push(FirewallRule {
                    name: r.name.value.clone(),
                    expression: r.expression.value.clone(),
                    // An expression in error has been reported: this
                    // configuration is refused and the value never used.
                    condition: condition.unwrap_or(Expr::And(Vec::new())),
                    action: action.unwrap_or(FirewallAction::Allow),
                });
            }

            usage.count_customer(&prefixes, &egress_prefixes, &route_prefixes);
            usage.tunnels += items(&c.tunnels).len();
            out.push(Customer {
                name: cname.to_string(),
                prefixes,
                egress_prefixes,
                tunnels,
                routes,
                firewall,
            });
        }
        usage.identities = identities.len();

        self.overlaps(&mut claims, raw_customers);
        if let Some(list) = &raw.customers {
            self.capacity(&usage, raw_customers.len(), &list.referenced);
        }
        out
    }

    /// The tunnel's identity (local, remote, key) when those are valid, and
    /// the tunnel when all of it is.
    fn tunnel(&mut self, t: &RawTunnel, node: &Node, cx: &dyn Fn() -> String) -> (Option<Identity>, Option<Tunnel>) {
        let remote = self.unicast(&t.remote, &|| format!("{}remote ", cx()));
        let local = match &t.local {
            Some(l) => self.unicast(l, &|| format!("{}local ", cx())),
            None => Some(node.tunnel_endpoint),
        };
        let key = t
            .key
            .as_ref()
            .map(|k| self.range(k, 0, i64::from(u32::MAX), &|| format!("{}key ", cx())));
        let mtu = t.mtu.as_ref().map_or(Some(DEFAULT_MTU), |m| {
            self.range(m, 576, 9000, &|| format!("{}mtu ", cx())).map(|v| v as u16)
        });
        let ttl = t.ttl.as_ref().map_or(Some(DEFAULT_TTL), |v| {
            self.range(v, 1, 255, &|| format!("{}ttl ", cx())).map(|v| v as u8)
        });
        let interface_address = match &t.interface_address {
            None => Some(None),
            Some(a) => match a.value.trim().parse::<Ipv4Net>() {
                Ok(net) if net.prefix_len() != 31 && net.prefix_len() != 30 => {
                    self.err(
                        &a.referenced,
                        format!("{}interface_address {net} must be a /31 or a /30", cx()),
                    );
                    None
                }
                Ok(net) if net.trunc() != net => {
                    self.err(
                        &a.referenced,
                        format!(
                            "{}interface_address {net} has host bits set; did you mean {}?",
                            cx(),
                            net.trunc()
                        ),
                    );
                    None
                }
                Ok(net) => Some(Some(net)),
                Err(_) => {
                    self.err(
                        &a.referenced,
                        format!(
                            "{}interface_address '{}' is not an IPv4 /31 or /30 (e.g. 169.254.10.0/31)",
                            cx(),
                            a.value
                        ),
                    );
                    None
                }
            },
        };
        let health_check = self.health_check(t, remote, cx);
        let key = match key {
            None => Some(None),
            Some(k) => k.map(|k| Some(k as u32)),
        };
        let identity = match (local, remote, key) {
            (Some(l), Some(r), Some(k)) => Some((l, r, k)),
            _ => None,
        };
        let tunnel = (|| {
            Some(Tunnel {
                name: t.name.value.clone(),
                remote: remote?,
                local: local?,
                key: key?,
                mtu: mtu?,
                ttl: ttl?,
                interface_address: interface_address?,
                health_check: health_check?,
            })
        })();
        (identity, tunnel)
    }

    fn health_check(
        &mut self,
        t: &RawTunnel,
        remote: Option<Ipv4Addr>,
        cx: &dyn Fn() -> String,
    ) -> Option<HealthCheck> {
        let default = HealthCheck {
            enabled: true,
            kind: ProbeKind::Reply,
            direction: Direction::Unidirectional,
            rate: Rate::Mid,
            target: remote.unwrap_or(Ipv4Addr::UNSPECIFIED),
        };
        let Some(h) = &t.health_check else {
            return Some(default);
        };
        let h = &h.value;
        let kind = h.kind.as_ref().map_or(Some(ProbeKind::Reply), |k| {
            self.choice(
                k,
                &[("reply", ProbeKind::Reply), ("request", ProbeKind::Request)],
                &|| format!("{}health_check type ", cx()),
            )
        });
        let direction = h.direction.as_ref().map_or(Some(Direction::Unidirectional), |d| {
            self.choice(
                d,
                &[
                    ("unidirectional", Direction::Unidirectional),
                    ("bidirectional", Direction::Bidirectional),
                ],
                &|| format!("{}health_check direction ", cx()),
            )
        });
        let enabled = h.enabled.as_ref().is_none_or(|e| e.value);
        if let (Some(Direction::Bidirectional), Some(d)) = (direction, &h.direction) {
            if t.interface_address.is_none() {
                self.err(
                    &d.referenced,
                    format!("{}bidirectional health checks need interface_address", cx()),
                );
            }
        }
        let rate = h.rate.as_ref().map_or(Some(Rate::Mid), |r| {
            self.choice(
                r,
                &[("low", Rate::Low), ("mid", Rate::Mid), ("high", Rate::High)],
                &|| format!("{}health_check rate ", cx()),
            )
        });
        let target = match &h.target {
            Some(a) => self.unicast(a, &|| format!("{}health_check target ", cx())),
            None => Some(default.target),
        };
        Some(HealthCheck {
            enabled,
            kind: kind?,
            direction: direction?,
            rate: rate?,
            target: target?,
        })
    }

    /// Prefixes of different customers must neither be equal nor overlap;
    /// one customer must not list a prefix twice. Sorted by (address,
    /// length), a prefix comes right after every prefix containing it, so a
    /// stack of the prefixes enclosing the current one finds every overlap
    /// in O(n log n).
    fn overlaps(&mut self, claims: &mut [Claim], customers: &[S<RawCustomer>]) {
        claims.sort_by(|a, b| {
            (a.net.network(), a.net.prefix_len(), pos(&a.loc)).cmp(&(b.net.network(), b.net.prefix_len(), pos(&b.loc)))
        });
        let name = |i: usize| customers[i].value.name.value.as_str();
        let mut stack: Vec<usize> = Vec::new();
        let mut reported: Vec<(Pos, String)> = Vec::new();
        for (i, claim) in claims.iter().enumerate() {
            while let Some(&top) = stack.last() {
                if claims[top].net.contains(&claim.net) && family(&claims[top].net) == family(&claim.net) {
                    break;
                }
                stack.pop();
            }
            let mut duplicate = false;
            for &j in stack.iter().rev() {
                let other = &claims[j];
                if other.customer == claim.customer {
                    if other.net == claim.net {
                        reported.push((
                            pos(&claim.loc),
                            format!(
                                "customer '{}': prefix {} is listed twice (first at line {})",
                                name(claim.customer),
                                claim.net,
                                other.loc.line()
                            ),
                        ));
                        duplicate = true;
                        break;
                    }
                    continue;
                }
                // The later one in the file carries the error.
                let (first, second) = if pos(&other.loc) < pos(&claim.loc) {
                    (other, claim)
                } else {
                    (claim, other)
                };
                let message = if other.net == claim.net {
                    format!(
                        "prefix {} is claimed by customers '{}' and '{}'",
                        claim.net,
                        name(first.customer),
                        name(second.customer)
                    )
                } else {
                    format!(
                        "prefix {} of customer '{}' overlaps prefix {} of customer '{}'",
                        second.net,
                        name(second.customer),
                        first.net,
                        name(first.customer)
                    )
                };
                reported.push((pos(&second.loc), message));
                break;
            }
            if !duplicate {
                stack.push(i);
            }
        }
        self.errors.extend(reported);
    }

    fn capacity(&mut self, usage: &Usage, customers: usize, at: &Location) {
        let checks: [(usize, u32, &str, &str); 10] = [
            (
                customers,
                MAX_CUSTOMERS / 2,
                "customers",
                "half of the data plane's 32768 customer ids",
            ),
            (
                usage.tunnels,
                MAX_TUNNELS / 2,
                "tunnels",
                "half of the data plane's 65536 tunnel ids",
            ),
            (
                usage.route_sets,
                MAX_ROUTE_SETS / 2,
                "route sets (distinct route prefixes per customer)",
                "half of the data plane's 262144 route set ids",
            ),
            (
                usage.ecmp_sets,
                MAX_ECMP_SETS,
                "route prefixes with several routes",
                "half of the data plane's 4096 ECMP tables",
            ),
            (
                usage.dest[0],
                MAX_DEST_ENTRIES,
                "IPv4 destination entries (prefixes plus distinct route prefixes)",
                "the data plane's IPv4 destination table",
            ),
            (
                usage.dest[1],
                MAX_DEST_ENTRIES,
                "IPv6 destination entries (prefixes plus distinct route prefixes)",
                "the data plane's IPv6 destination table",
            ),
            (
                usage.source[0],
                MAX_SOURCE_ENTRIES,
                "IPv4 source entries (prefixes plus egress_prefixes)",
                "the data plane's IPv4 source table",
            ),
            (
                usage.source[1],
                MAX_SOURCE_ENTRIES,
                "IPv6 source entries (prefixes plus egress_prefixes)",
                "the data plane's IPv6 source table",
            ),
            (
                usage.local_addrs.len(),
                MAX_LOCAL_ADDRS,
                "local addresses (tunnel endpoints and our interface addresses)",
                "the data plane's local address table",
            ),
            (
                usage.identities,
                MAX_DECAP_ENTRIES,
                "tunnel identities (local, remote, key)",
                "the data plane's decapsulation table",
            ),
        ];
        for (have, limit, what, why) in checks {
            if have > limit as usize {
                self.err(at, format!("{have} {what} exceed the limit of {limit} ({why})"));
            }
        }
    }
}

/// Whether some prefix in `set` contains `net` (at most 129 lookups).
fn covered(set: &HashSet<IpNet>, net: IpNet) -> bool {
    set.contains(&net)
        || (0..net.prefix_len()).any(|len| IpNet::new(net.addr(), len).is_ok_and(|n| set.contains(&n.trunc())))
}

/// What a configuration takes of the data plane's tables.
#[derive(Default)]
struct Usage {
    tunnels: usize,
    route_sets: usize,
    ecmp_sets: usize,
    /// [IPv4, IPv6].
    dest: [usize; 2],
    source: [usize; 2],
    local_addrs: HashSet<Ipv4Addr>,
    identities: usize,
}

impl Usage {
    fn count_customer(&mut self, prefixes: &[IpNet], egress: &[IpNet], routes: &BTreeMap<IpNet, usize>) {
        let index = |p: &IpNet| usize::from(matches!(p.addr(), IpAddr::V6(_)));
        self.route_sets += routes.len();
        self.ecmp_sets += routes.values().filter(|&&n| n > 1).count();
        let dest: HashSet<IpNet> = prefixes.iter().chain(routes.keys()).copied().collect();
        for p in &dest {
            self.dest[index(p)] += 1;
        }
        let source: HashSet<IpNet> = prefixes.iter().chain(egress).copied().collect();
        for p in &source {
            self.source[index(p)] += 1;
        }
    }
}
