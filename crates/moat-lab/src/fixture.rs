//! A standard test setup for running the data plane with
//! BPF_PROG_TEST_RUN: a node namespace whose FIB is known (an upstream
//! link with default routes via permanently resolved gateways), the data
//! plane loaded, and a two-customer specification applied.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use moat_dataplane::{compile, CustomerSpec, Dataplane, NextHop, RouteSpec, Spec, TunnelSpec};

use crate::{
    model::{Fib, Model},
    netns::{veth, NetNs},
};

pub const NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
pub const LINK_MTU: u16 = 1500;

pub fn net(s: &str) -> IpNet {
    s.parse().expect("prefix")
}

pub fn tunnel(name: &str, remote: [u8; 4], key: Option<u32>) -> TunnelSpec {
    TunnelSpec {
        name: name.into(),
        local: NODE,
        remote: remote.into(),
        key,
        mtu: 1476,
        ttl: 64,
        penalty: 0,
    }
}

pub fn route(prefix: &str, tunnel: &str, priority: u32, weight: u16) -> RouteSpec {
    RouteSpec {
        prefix: net(prefix),
        tunnel: tunnel.into(),
        priority,
        weight,
    }
}

/// A customer that only fills tables (benchmarks at scale): its prefixes,
/// tunnels and routes, no firewall.
pub fn filler(c: usize, prefixes: Vec<IpNet>, tunnels: Vec<TunnelSpec>, routes: Vec<RouteSpec>) -> CustomerSpec {
    CustomerSpec {
        name: format!("filler-{c}"),
        prefixes,
        egress_prefixes: vec![],
        tunnels,
        routes,
        firewall: vec![],
    }
}

/// acme: two /25-ish v4 areas and a v6 /48, tunnels a (no key), b (key
/// 42), c (next hop unresolved); an ECMP route over a and b weighted 1:3.
/// globex: the other v4 /25 over a tunnel behind the ingress interface
/// (XDP_TX), and a v6 /48 without any route.
pub fn standard_spec() -> Spec {
    Spec {
        protections: moat_common::protect::ALL,
        mitigation: vec![],
        node_addresses: vec![Ipv4Addr::new(169, 254, 10, 0)],
        customers: vec![
            CustomerSpec {
                name: "acme".into(),
                prefixes: vec![net("203.0.113.0/25"), net("2001:db8:100::/48")],
                egress_prefixes: vec![net("192.0.2.128/26")],
                tunnels: vec![
                    tunnel("acme-a", [192, 0, 2, 10], None),
                    tunnel("acme-b", [192, 0, 2, 11], Some(42)),
                    tunnel("acme-c", [192, 0, 2, 12], None),
                ],
                routes: vec![
                    route("203.0.113.0/25", "acme-a", 100, 100),
                    route("203.0.113.64/26", "acme-b", 100, 100),
                    route("203.0.113.96/27", "acme-a", 50, 1),
                    route("203.0.113.96/27", "acme-b", 50, 3),
                    route("203.0.113.32/27", "acme-c", 100, 100),
                    route("2001:db8:100::/48", "acme-b", 100, 100),
                ],
                firewall: Vec::new(),
            },
            CustomerSpec {
                name: "globex".into(),
                prefixes: vec![net("203.0.113.128/25"), net("2001:db8:200::/48")],
                egress_prefixes: vec![],
                tunnels: vec![tunnel("globex-a", [192, 0, 2, 20], None)],
                routes: vec![route("203.0.113.128/25", "globex-a", 100, 100)],
                firewall: Vec::new(),
            },
        ],
    }
}

/// The node namespace, its interfaces, and a loaded data plane.
pub struct Fixture {
    pub ns: NetNs,
    pub dp: Dataplane,
    /// Where test packets "arrive" (ctx ingress_ifindex).
    pub ingress: u32,
    /// Customer-facing interface (redirect target).
    pub cust_if: u32,
    pub up_if: u32,
    pub up_mac: [u8; 6],
    pub spec: Spec,
    /// Rule matches the model saw (see [`Model::rule_hits`]).
    pub rule_hits: std::cell::RefCell<std::collections::BTreeMap<(Option<String>, String), u64>>,
    /// Datagrams the model saw lose their first fragment (see
    /// [`Model::frag_drops`]).
    pub frag_drops: std::cell::RefCell<crate::model::FragDrops>,
    _peer: NetNs,
}

impl Fixture {
    pub fn new(tag: &str) -> Fixture {
        let ns = NetNs::new(tag).expect("namespace");
        let peer = NetNs::new(&format!("{tag}p")).expect("peer namespace");
        veth(&ns, "ext0", &peer, "ext1");
        veth(&ns, "cust0", &peer, "cust1");
        veth(&ns, "up0", &peer, "up1");
        ns.ip(&["addr", "add", "169.254.100.1/24", "dev", "up0"]);
        ns.ip(&["-6", "addr", "add", "2001:db8:ff::1/64", "dev", "up0", "nodad"]);
        ns.ip(&[
            "neigh",
            "add",
            "169.254.100.254",
            "lladdr",
            "02:00:00:00:00:fe",
            "dev",
            "up0",
            "nud",
            "permanent",
        ]);
        ns.ip(&[
            "-6",
            "neigh",
            "add",
            "2001:db8:ff::fe",
            "lladdr",
            "02:00:00:00:00:fe",
            "dev",
            "up0",
            "nud",
            "permanent",
        ]);
        ns.ip(&["route", "add", "default", "via", "169.254.100.254", "dev", "up0"]);
        ns.ip(&["-6", "route", "add", "default", "via", "2001:db8:ff::fe", "dev", "up0"]);
        ns.ip(&["route", "add", "blackhole", "198.51.100.240/28"]);
        ns.sysctl("net.ipv4.conf.all.forwarding", "1");
        ns.sysctl("net.ipv6.conf.all.forwarding", "1");
        let ingress = ns.ifindex("ext0");
        let cust_if = ns.ifindex("cust0");
        let up_if = ns.ifindex("up0");
        let up_mac = ns.mac("up0");
        let dp = Dataplane::load().expect("loading the data plane");
        let mut f = Fixture {
            ns,
            dp,
            ingress,
            cust_if,
            up_if,
            up_mac,
            spec: standard_spec(),
            rule_hits: Default::default(),
            frag_drops: Default::default(),
            _peer: peer,
        };
        f.apply(standard_spec());
        f
    }

    /// Next hop of tunnel (customer index, tunnel index) in the standard layout.
    pub fn next_hop(&self, ci: usize, ti: usize) -> Option<NextHop> {
        let name = &self.spec.customers.get(ci)?.tunnels.get(ti)?.name;
        let hop = |ifindex| {
            Some(NextHop {
                ifindex,
                smac: [0x02, 0, 0, 0, 0xc0, 0x01],
                dmac: [0x02, 0, 0, 0, 0xc0, ti as u8],
                link_mtu: LINK_MTU,
            })
        };
        match name.as_str() {
            "acme-c" => None,
            "globex-a" => hop(self.ingress),
            "acme-a" | "acme-b" => hop(self.cust_if),
            // Other specifications (random ones): a mix of unresolved next
            // hops, next hops behind the ingress interface, and smaller links.
            // The first tunnel of the first customer always resolves, so
            // that even a one-tunnel specification can forward.
            _ => match (ci * 7 + ti + 1) % 5 {
                0 => None,
                1 => hop(self.ingress),
                2 => hop(self.cust_if).map(|h| NextHop { link_mtu: 1400, ..h }),
                _ => hop(self.cust_if),
            },
        }
    }

    pub fn apply(&mut self, spec: Spec) -> moat_dataplane::ApplyReport {
        self.spec = spec;
        let hops = |t: &TunnelSpec| {
            let (ci, ti) = self
                .spec
                .customers
                .iter()
                .enumerate()
                .find_map(|(ci, c)| c.tunnels.iter().position(|x| x == t).map(|ti| (ci, ti)))?;
            self.next_hop(ci, ti)
        };
        let compiled = compile(&self.spec, &hops, self.dp.applied()).expect("compile");
        self.dp.apply(&compiled).expect("apply")
    }

    /// Runs one frame as if received on ext0, inside the node namespace.
    pub fn run(&self, frame: &[u8]) -> moat_dataplane::testrun::RunResult {
        let _in = self.ns.enter().expect("enter node namespace");
        self.dp.run(frame, self.ingress).expect("test run")
    }

    /// The FIB of the node namespace as far as the model can predict it.
    pub fn fib(&self, dst: IpAddr, len: usize) -> Fib {
        let forward = if len > 1500 {
            Fib::TooBig
        } else {
            Fib::Forward {
                ifindex: self.up_if,
                smac: self.up_mac,
                dmac: GW_MAC,
            }
        };
        match dst {
            IpAddr::V4(a) => {
                let o = a.octets();
                if o[0] == 0 || o[0] == 127 || o[0] >= 224 {
                    Fib::Unknown
                } else if o[..3] == [198, 51, 100] && o[3] >= 240 {
                    Fib::Unroutable
                } else if o[..3] == [169, 254, 100] {
                    match o[3] {
                        0 | 1 | 255 => Fib::Unknown,
                        254 => forward,
                        // Connected, but no neighbour entry.
                        _ if len > 1500 => Fib::TooBig,
                        _ => Fib::NoNeighbour,
                    }
                } else {
                    forward
                }
            }
            IpAddr::V6(a) => {
                let s = a.segments();
                if a.is_loopback()
                    || a.is_unspecified()
                    || s[0] >= 0xfe00
                    || (s[0] == 0x2001 && s[1] == 0xdb8 && s[2] == 0xff)
                    || s[0] == 0
                {
                    Fib::Unknown
                } else {
                    forward
                }
            }
        }
    }

    /// Runs `f` with a reference model of this fixture.
    pub fn with_model<R>(&self, f: impl FnOnce(&Model) -> R) -> R {
        let nh = |ci, ti| self.next_hop(ci, ti);
        let fib = |d, len| self.fib(d, len);
        let model = Model {
            spec: &self.spec,
            next_hop: &nh,
            fib: &fib,
            ingress_ifindex: self.ingress,
            rule_hits: &self.rule_hits,
            frag_drops: &self.frag_drops,
        };
        f(&model)
    }
}
