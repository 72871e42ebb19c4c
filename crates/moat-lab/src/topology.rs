//! The transit topology used by the namespace tests and the demo:
//!
//! ```text
//!  inet ns                     node ns (moat attached)                  site ns
//!  i0 198.51.100.100/25 <-> n-inet 198.51.100.1/25   n-site 192.0.2.1/24 <-> s0 192.0.2.10/24
//!  route 203.0.113.0/24        tunnel endpoint 198.51.100.1            raw GRE endpoint
//!        via 198.51.100.1                                              default via 192.0.2.1
//! ```
//!
//! Only test ranges, only inside namespaces created here; everything is
//! removed when the value drops.

use std::net::Ipv4Addr;

use moat_dataplane::{CustomerSpec, NextHop, RouteSpec, Spec, TunnelSpec, XdpMode};

use crate::netns::{veth, NetNs};

pub const INET_HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
pub const ENDPOINT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const SITE_ROUTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);

pub struct Transit {
    pub inet: NetNs,
    pub node: NetNs,
    pub site: NetNs,
    pub site_nexthop: NextHop,
}

impl Transit {
    pub fn new(tag: &str) -> Transit {
        let inet = NetNs::new(&format!("{tag}-inet")).expect("namespace");
        let node = NetNs::new(&format!("{tag}-node")).expect("namespace");
        let site = NetNs::new(&format!("{tag}-site")).expect("namespace");
        veth(&inet, "i0", &node, "n-inet");
        veth(&node, "n-site", &site, "s0");
        inet.ip(&["addr", "add", "198.51.100.100/25", "dev", "i0"]);
        inet.ip(&["route", "add", "203.0.113.0/24", "via", "198.51.100.1"]);
        node.ip(&["addr", "add", "198.51.100.1/25", "dev", "n-inet"]);
        node.ip(&["addr", "add", "192.0.2.1/24", "dev", "n-site"]);
        site.ip(&["addr", "add", "192.0.2.10/24", "dev", "s0"]);
        site.ip(&["route", "add", "default", "via", "192.0.2.1"]);
        node.sysctl("net.ipv4.conf.all.forwarding", "1");
        // Neighbours known up front: the data plane never waits on ARP here.
        let (i0, s0, n_inet, n_site) = (inet.mac("i0"), site.mac("s0"), node.mac("n-inet"), node.mac("n-site"));
        let hex = |m: [u8; 6]| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        node.ip(&[
            "neigh",
            "replace",
            "198.51.100.100",
            "lladdr",
            &hex(i0),
            "dev",
            "n-inet",
            "nud",
            "permanent",
        ]);
        node.ip(&[
            "neigh",
            "replace",
            "192.0.2.10",
            "lladdr",
            &hex(s0),
            "dev",
            "n-site",
            "nud",
            "permanent",
        ]);
        inet.ip(&[
            "neigh",
            "replace",
            "198.51.100.1",
            "lladdr",
            &hex(n_inet),
            "dev",
            "i0",
            "nud",
            "permanent",
        ]);
        site.ip(&[
            "neigh",
            "replace",
            "192.0.2.1",
            "lladdr",
            &hex(n_site),
            "dev",
            "s0",
            "nud",
            "permanent",
        ]);
        // Redirected frames are dropped by a veth peer without XDP unless GRO
        // is on; locally sent packets must carry full checksums.
        for (ns, dev) in [(&inet, "i0"), (&site, "s0")] {
            ns.exec("ethtool", &["-K", dev, "gro", "on", "tx", "off"])
                .expect("ethtool");
        }
        let site_nexthop = NextHop {
            ifindex: node.ifindex("n-site"),
            smac: n_site,
            dmac: s0,
            link_mtu: 1500,
        };
        Transit {
            inet,
            node,
            site,
            site_nexthop,
        }
    }

    /// One customer, 203.0.113.0/24 behind one tunnel to the site router.
    pub fn spec(key: Option<u32>) -> Spec {
        Spec {
            node_addresses: vec![],
            protections: moat_common::protect::ALL,
            mitigation: vec![],
            customers: vec![CustomerSpec {
                name: "acme".into(),
                prefixes: vec!["203.0.113.0/24".parse().expect("prefix")],
                egress_prefixes: vec![],
                tunnels: vec![TunnelSpec {
                    name: "acme-site".into(),
                    local: ENDPOINT,
                    remote: SITE_ROUTER,
                    key,
                    mtu: 1476,
                    ttl: 64,
                    penalty: 0,
                }],
                routes: vec![RouteSpec {
                    prefix: "203.0.113.0/24".parse().expect("prefix"),
                    tunnel: "acme-site".into(),
                    priority: 100,
                    weight: 100,
                }],
                firewall: Vec::new(),
            }],
        }
    }

    /// Starts the site's userspace GRE endpoint (TUN `tun0` holding the
    /// server address) for a tunnel with `key`. Its inner MTU leaves room
    /// for the outer IPv4 and GRE headers on the 1500-byte underlay, so the
    /// site never sends fragmented GRE.
    pub fn start_site(&self, key: Option<u32>) -> std::io::Result<crate::site::GreTunEndpoint> {
        let overhead = 20 + 4 + if key.is_some() { 4 } else { 0 };
        crate::site::GreTunEndpoint::start(
            &self.site,
            "tun0",
            SERVER,
            1500 - overhead,
            ENDPOINT,
            Ipv4Addr::new(192, 0, 2, 1),
            key,
        )
    }

    /// Attaches the data plane to both node interfaces (native mode).
    pub fn attach(&self, dp: &mut moat_dataplane::Dataplane) -> Result<(), moat_dataplane::Error> {
        let _in = self.node.enter().expect("enter node namespace");
        dp.attach("n-inet", XdpMode::Driver)?;
        dp.attach("n-site", XdpMode::Driver)
    }
}
