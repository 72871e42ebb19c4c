//! The validated configuration: every value parsed, defaulted and checked.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};

use crate::expr::Expr;

/// A validated configuration (config file version 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub node: Node,
    /// Named prefix lists, usable in expressions as `$name`.
    pub lists: BTreeMap<String, Vec<IpNet>>,
    /// Operator-wide rules, in file order.
    pub mitigation: Vec<MitigationRule>,
    /// Built-in protections (`mitigation.protections`), each on by default.
    pub protections: Protections,
    pub customers: Vec<Customer>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub interfaces: Vec<Interface>,
    /// This node's GRE endpoint (outer source of tunnels without `local`).
    pub tunnel_endpoint: Ipv4Addr,
    /// Where metrics are served; `None` when set to `off`.
    pub metrics: Option<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub xdp_mode: XdpMode,
}

/// How the XDP program is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum XdpMode {
    /// In the driver (the default).
    Native,
    /// The kernel's generic (skb) hook: works everywhere, slower.
    Generic,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Customer {
    pub name: String,
    /// Protected prefixes (no overlap with other customers).
    pub prefixes: Vec<IpNet>,
    /// Extra inner sources accepted on return traffic.
    pub egress_prefixes: Vec<IpNet>,
    pub tunnels: Vec<Tunnel>,
    pub routes: Vec<Route>,
    /// Ordered; first match wins; default action allow.
    pub firewall: Vec<FirewallRule>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tunnel {
    pub name: String,
    /// The customer router's GRE endpoint.
    pub remote: Ipv4Addr,
    /// Our GRE endpoint (defaults to the node's tunnel endpoint).
    pub local: Ipv4Addr,
    /// GRE key (RFC 2890).
    pub key: Option<u32>,
    /// Largest inner packet carried.
    pub mtu: u16,
    /// Outer TTL.
    pub ttl: u8,
    /// A /31 or /30 inside the tunnel; see [`Tunnel::our_address`].
    pub interface_address: Option<Ipv4Net>,
    pub health_check: HealthCheck,
}

impl Tunnel {
    /// Our side of `interface_address`: the lower address of a /31, the
    /// first host (network + 1) of a /30.
    pub fn our_address(&self) -> Option<Ipv4Addr> {
        self.interface_address.map(|n| interface_sides(n).0)
    }

    /// The customer's side of `interface_address`: the upper address of a
    /// /31, the second host (network + 2) of a /30.
    pub fn customer_address(&self) -> Option<Ipv4Addr> {
        self.interface_address.map(|n| interface_sides(n).1)
    }
}

/// (ours, customer's) addresses of a tunnel interface network.
pub(crate) fn interface_sides(net: Ipv4Net) -> (Ipv4Addr, Ipv4Addr) {
    let base = u32::from(net.network());
    if net.prefix_len() == 31 {
        (Ipv4Addr::from(base), Ipv4Addr::from(base + 1))
    } else {
        (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub enabled: bool,
    pub kind: ProbeKind,
    pub direction: Direction,
    pub rate: Rate,
    /// Address probed (defaults to the tunnel's remote).
    pub target: Ipv4Addr,
}

/// Which ICMP echo the node sends inside the tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    /// An echo reply the customer router routes back into the tunnel (default).
    Reply,
    /// An echo request the customer router answers.
    Request,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The answer may come back over the internet (default).
    Unidirectional,
    /// The answer comes back inside the tunnel (needs `interface_address`).
    Bidirectional,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rate {
    Low,
    Mid,
    High,
}

impl Rate {
    /// Time between probes: low 10 s, mid 1 s, high 100 ms.
    pub fn interval(self) -> Duration {
        match self {
            Rate::Low => Duration::from_secs(10),
            Rate::Mid => Duration::from_secs(1),
            Rate::High => Duration::from_millis(100),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub prefix: IpNet,
    /// Name of a tunnel of the same customer.
    pub tunnel: String,
    /// Lower wins.
    pub priority: u32,
    /// ECMP share, 1..=256.
    pub weight: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MitigationRule {
    pub name: String,
    /// As written.
    pub expression: String,
    /// As parsed and checked.
    pub condition: Expr,
    pub action: MitigationAction,
}

/// The data plane's built-in protections for traffic to protected
/// prefixes, checked before routing; every drop is counted by reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Protections {
    /// TCP with SYN+FIN, SYN+RST, no flags, or all six flags set.
    pub invalid_tcp_flags: bool,
    /// Source address equal to the destination.
    pub land: bool,
    /// TCP or UDP with source or destination port 0.
    pub zero_ports: bool,
    /// UDP from a well-known reflector source port (DNS, NTP, memcached,
    /// ...) that no operator pass rule or customer allow rule matched.
    pub reflection: bool,
}

impl Default for Protections {
    fn default() -> Self {
        Protections {
            invalid_tcp_flags: true,
            land: true,
            zero_ports: true,
            reflection: true,
        }
    }
}

impl Protections {
    /// As the data plane's protection bits (`moat_common::protect`).
    pub fn bits(&self) -> u32 {
        use moat_common::protect::*;
        let mut b = 0;
        if self.invalid_tcp_flags {
            b |= INVALID_TCP_FLAGS;
        }
        if self.land {
            b |= LAND;
        }
        if self.zero_ports {
            b |= ZERO_PORTS;
        }
        if self.reflection {
            b |= REFLECTION;
        }
        b
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MitigationAction {
    Drop,
    Pass,
    RateLimit { pps: u32, per: Per },
}

/// What a rate limit counts separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Per {
    /// One bucket for the whole rule (default).
    Rule,
    DstIp,
    SrcIp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirewallRule {
    pub name: String,
    /// As written.
    pub expression: String,
    /// As parsed and checked.
    pub condition: Expr,
    pub action: FirewallAction,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FirewallAction {
    Allow,
    Block,
}
