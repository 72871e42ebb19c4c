//! The file as written: serde structs that mirror the YAML one to one.
//!
//! Every key is checked here (unknown keys, wrong types, missing required
//! keys are parse errors with a position). Values that need a rule
//! (addresses, prefixes, ranges, enumerations) are kept as written, wrapped
//! in [`Spanned`] so that validation can report every problem at once, each
//! at its value.

use std::collections::HashMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

type S<T> = Spanned<T>;
type SList<T> = Option<S<Vec<S<T>>>>;
/// Named prefix lists: name -> prefixes.
pub(crate) type RawLists = HashMap<S<String>, S<Vec<S<String>>>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub version: S<i64>,
    pub node: S<RawNode>,
    #[serde(default)]
    pub lists: Option<S<RawLists>>,
    #[serde(default)]
    pub mitigation: Option<S<RawMitigation>>,
    #[serde(default)]
    pub customers: SList<RawCustomer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNode {
    pub name: S<String>,
    pub interfaces: S<Vec<S<RawInterface>>>,
    pub tunnel_endpoint: S<String>,
    #[serde(default)]
    pub metrics: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawInterface {
    pub name: S<String>,
    #[serde(default)]
    pub xdp_mode: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMitigation {
    #[serde(default)]
    pub rules: SList<RawMitigationRule>,
    #[serde(default)]
    pub protections: Option<S<RawProtections>>,
}

/// Built-in protections, each on unless set to false.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProtections {
    #[serde(default)]
    pub invalid_tcp_flags: Option<bool>,
    #[serde(default)]
    pub land: Option<bool>,
    #[serde(default)]
    pub zero_ports: Option<bool>,
    #[serde(default)]
    pub reflection: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMitigationRule {
    pub name: S<String>,
    pub expression: S<String>,
    pub action: S<String>,
    #[serde(default)]
    pub rate_limit: Option<S<RawRateLimit>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimit {
    pub pps: S<i64>,
    #[serde(default)]
    pub per: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCustomer {
    pub name: S<String>,
    #[serde(default)]
    pub prefixes: SList<String>,
    #[serde(default)]
    pub egress_prefixes: SList<String>,
    #[serde(default)]
    pub tunnels: SList<RawTunnel>,
    #[serde(default)]
    pub routes: SList<RawRoute>,
    #[serde(default)]
    pub firewall: SList<RawFirewallRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTunnel {
    pub name: S<String>,
    pub remote: S<String>,
    #[serde(default)]
    pub local: Option<S<String>>,
    #[serde(default)]
    pub key: Option<S<i64>>,
    #[serde(default)]
    pub mtu: Option<S<i64>>,
    #[serde(default)]
    pub ttl: Option<S<i64>>,
    #[serde(default)]
    pub interface_address: Option<S<String>>,
    #[serde(default)]
    pub health_check: Option<S<RawHealthCheck>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealthCheck {
    #[serde(default)]
    pub enabled: Option<S<bool>>,
    #[serde(default, rename = "type")]
    pub kind: Option<S<String>>,
    #[serde(default)]
    pub direction: Option<S<String>>,
    #[serde(default)]
    pub rate: Option<S<String>>,
    #[serde(default)]
    pub target: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub prefix: S<String>,
    pub tunnel: S<String>,
    #[serde(default)]
    pub priority: Option<S<i64>>,
    #[serde(default)]
    pub weight: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFirewallRule {
    pub name: S<String>,
    pub expression: S<String>,
    pub action: S<String>,
}
