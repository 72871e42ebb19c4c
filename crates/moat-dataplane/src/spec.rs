//! The input of compilation: customers, their prefixes, tunnels and routes,
//! already validated by the caller (the config crate), plus next hops.

use std::net::Ipv4Addr;

use ipnet::IpNet;

/// Everything the data plane is to hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Spec {
    /// Node addresses (besides tunnel endpoints) whose inner ICMP is passed up
    /// still encapsulated, e.g. our side of tunnel interface addresses.
    pub node_addresses: Vec<Ipv4Addr>,
    pub customers: Vec<CustomerSpec>,
    /// Built-in protections in force (`moat_common::protect` bits; 0: none).
    pub protections: u32,
    /// Operator mitigation rules, in order: the first that matches decides.
    pub mitigation: Vec<RuleSpec>,
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleAction {
    /// Drop (mitigation) or block (firewall).
    Drop,
    /// Pass (mitigation) or allow (firewall): no later rule of the set
    /// applies; the packet goes on.
    Pass,
    /// Mitigation only: pass while the token bucket has credit, else drop.
    RateLimit(RateLimit),
}

/// A token bucket's rate and what it is kept per.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Packets per second, >= 1.
    pub pps: u64,
    pub per: RatePer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RatePer {
    /// One bucket for all the rule's packets.
    Rule,
    /// One bucket per destination address.
    DstIp,
    /// One bucket per source address.
    SrcIp,
}

/// One rule (mitigation or firewall): its condition as checked, the
/// condition's normal form (what the data plane compiles), and its action.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleSpec {
    pub name: String,
    pub condition: moat_expr::Expr,
    pub terms: Vec<moat_expr::normal::Term>,
    pub action: RuleAction,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct CustomerSpec {
    pub name: String,
    /// Protected prefixes (no overlap with other customers).
    pub prefixes: Vec<IpNet>,
    /// Extra inner sources accepted on return traffic.
    pub egress_prefixes: Vec<IpNet>,
    pub tunnels: Vec<TunnelSpec>,
    pub routes: Vec<RouteSpec>,
    /// The customer's firewall, in order: the first that matches decides
    /// (`Drop`: block, `Pass`: allow); no match allows.
    pub firewall: Vec<RuleSpec>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TunnelSpec {
    pub name: String,
    pub local: Ipv4Addr,
    pub remote: Ipv4Addr,
    pub key: Option<u32>,
    /// Largest inner packet carried.
    pub mtu: u16,
    /// Outer TTL.
    pub ttl: u8,
    /// Added to the priority of every route through this tunnel (health).
    pub penalty: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RouteSpec {
    pub prefix: IpNet,
    /// Name of a tunnel of the same customer.
    pub tunnel: String,
    /// Lower wins.
    pub priority: u32,
    /// Share among routes of equal effective priority, 1..=256.
    pub weight: u16,
}

/// Where to send a tunnel's encapsulated packets: resolved by userspace from
/// the kernel's routing and neighbour tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NextHop {
    pub ifindex: u32,
    /// The egress interface's MAC.
    pub smac: [u8; 6],
    /// The next hop's MAC.
    pub dmac: [u8; 6],
    /// The egress interface's MTU (largest outer IP packet).
    pub link_mtu: u16,
}
