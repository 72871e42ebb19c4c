//! From a validated configuration to what other parts of moat consume: the
//! data plane's [`Spec`] and the one-line summary of `moat validate`.

use std::collections::HashSet;

use moat_dataplane::{CustomerSpec, RateLimit, RatePer, RouteSpec, RuleAction, RuleSpec, Spec, TunnelSpec};

use crate::model::{Config, FirewallAction, MitigationAction, Per};

impl Config {
    /// `ok: 2 customers, 3 prefixes, 4 tunnels, 5 routes` (prefixes are the
    /// protected prefixes; nouns are always plural).
    pub fn summary(&self) -> String {
        let prefixes: usize = self.customers.iter().map(|c| c.prefixes.len()).sum();
        let tunnels: usize = self.customers.iter().map(|c| c.tunnels.len()).sum();
        let routes: usize = self.customers.iter().map(|c| c.routes.len()).sum();
        format!(
            "ok: {} customers, {prefixes} prefixes, {tunnels} tunnels, {routes} routes",
            self.customers.len()
        )
    }

    /// The data plane's input with no health penalty on any tunnel.
    pub fn to_spec(&self) -> Spec {
        self.to_spec_with_penalties(|_, _| 0)
    }

    /// The data plane's input; `penalty(customer, tunnel)` is added to the
    /// priority of every route through that tunnel. Node addresses are our
    /// side of every tunnel's `interface_address`, each once, in file order.
    pub fn to_spec_with_penalties(&self, penalty: impl Fn(&str, &str) -> u32) -> Spec {
        let list = |name: &str| self.lists.get(name).cloned().unwrap_or_default();
        // Validation refused rules over the term limit.
        let rule = |name: &str, condition: &crate::expr::Expr, action| RuleSpec {
            name: name.to_string(),
            condition: condition.clone(),
            terms: crate::expr::normal::terms(condition, &list, crate::expr::normal::MAX_TERMS).unwrap_or_default(),
            action,
        };
        let mut seen = HashSet::new();
        let node_addresses = self
            .customers
            .iter()
            .flat_map(|c| &c.tunnels)
            .filter_map(|t| t.our_address())
            .filter(|a| seen.insert(*a))
            .collect();
        let customers = self
            .customers
            .iter()
            .map(|c| CustomerSpec {
                name: c.name.clone(),
                prefixes: c.prefixes.clone(),
                egress_prefixes: c.egress_prefixes.clone(),
                tunnels: c
                    .tunnels
                    .iter()
                    .map(|t| TunnelSpec {
                        name: t.name.clone(),
                        local: t.local,
                        remote: t.remote,
                        key: t.key,
                        mtu: t.mtu,
                        ttl: t.ttl,
                        penalty: penalty(&c.name, &t.name),
                    })
                    .collect(),
                routes: c
                    .routes
                    .iter()
                    .map(|r| RouteSpec {
                        prefix: r.prefix,
                        tunnel: r.tunnel.clone(),
                        priority: r.priority,
                        weight: r.weight,
                    })
                    .collect(),
                firewall: c
                    .firewall
                    .iter()
                    .map(|r| {
                        let action = match r.action {
                            FirewallAction::Allow => RuleAction::Pass,
                            FirewallAction::Block => RuleAction::Drop,
                        };
                        rule(&r.name, &r.condition, action)
                    })
                    .collect(),
            })
            .collect();
        let mitigation = self
            .mitigation
            .iter()
            .map(|r| {
                let action = match r.action {
                    MitigationAction::Drop => RuleAction::Drop,
                    MitigationAction::Pass => RuleAction::Pass,
                    MitigationAction::RateLimit { pps, per } => RuleAction::RateLimit(RateLimit {
                        pps: u64::from(pps),
                        per: match per {
                            Per::Rule => RatePer::Rule,
                            Per::DstIp => RatePer::DstIp,
                            Per::SrcIp => RatePer::SrcIp,
                        },
                    }),
                };
                rule(&r.name, &r.condition, action)
            })
            .collect();
        Spec {
            node_addresses,
            customers,
            protections: self.protections.bits(),
            mitigation,
        }
    }
}
