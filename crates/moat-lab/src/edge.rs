//! The topology the daemon tests and `moat demo` run moat on:
//!
//! ```text
//!  inet ns      i0 198.51.100.100/25 <-> n-inet  198.51.100.1/25   (tunnel endpoint)
//!  attacker ns  a0 198.51.100.130/25 <-> n-atk   198.51.100.129/25
//!                                        node ns (moat on all four)
//!  site1 ns     s0 192.0.2.10/28     <-> n-site1 192.0.2.1/28      acme:   203.0.113.0/25,   server 203.0.113.5
//!  site2 ns     s0 192.0.2.26/28     <-> n-site2 192.0.2.17/28     globex: 203.0.113.128/25, server 203.0.113.133
//! ```
//!
//! The node resolves its neighbours itself (the daemon keeps them
//! resolved); the hosts know the node's MAC up front. Only test ranges,
//! only inside namespaces created here; everything goes when the value drops.

use std::net::Ipv4Addr;

use crate::{
    netns::{veth, NetNs},
    site::GreTunEndpoint,
};

pub const ENDPOINT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const INET_HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
pub const ATTACKER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 130);

/// One customer site: its namespace, router address, node-side gateway and server.
pub struct Site {
    pub ns: NetNs,
    pub router: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub server: Ipv4Addr,
}

pub struct Edge {
    pub inet: NetNs,
    pub attacker: NetNs,
    pub node: NetNs,
    pub sites: [Site; 2],
}

fn hex(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

impl Edge {
    pub fn new(tag: &str) -> std::io::Result<Edge> {
        let inet = NetNs::new(&format!("{tag}-inet"))?;
        let attacker = NetNs::new(&format!("{tag}-atk"))?;
        let node = NetNs::new(&format!("{tag}-node"))?;
        let s1 = NetNs::new(&format!("{tag}-s1"))?;
        let s2 = NetNs::new(&format!("{tag}-s2"))?;
        veth(&inet, "i0", &node, "n-inet");
        veth(&attacker, "a0", &node, "n-atk");
        veth(&s1, "s0", &node, "n-site1");
        veth(&s2, "s0", &node, "n-site2");
        node.ip(&["addr", "add", "198.51.100.1/25", "dev", "n-inet"]);
        node.ip(&["addr", "add", "198.51.100.129/25", "dev", "n-atk"]);
        node.ip(&["addr", "add", "192.0.2.1/28", "dev", "n-site1"]);
        node.ip(&["addr", "add", "192.0.2.17/28", "dev", "n-site2"]);
        node.sysctl("net.ipv4.conf.all.forwarding", "1");
        let hosts = [
            (&inet, "i0", "198.51.100.100/25", "198.51.100.1", "n-inet"),
            (&attacker, "a0", "198.51.100.130/25", "198.51.100.129", "n-atk"),
            (&s1, "s0", "192.0.2.10/28", "192.0.2.1", "n-site1"),
            (&s2, "s0", "192.0.2.26/28", "192.0.2.17", "n-site2"),
        ];
        for (ns, dev, addr, gw, node_dev) in hosts {
            ns.ip(&["addr", "add", addr, "dev", dev]);
            ns.ip(&["route", "add", "default", "via", gw]);
            let mac = hex(node.mac(node_dev));
            ns.ip(&["neigh", "replace", gw, "lladdr", &mac, "dev", dev, "nud", "permanent"]);
            // Redirected frames are dropped by a veth peer without XDP unless
            // GRO is on; locally sent packets must carry full checksums.
            ns.exec("ethtool", &["-K", dev, "gro", "on", "tx", "off"])?;
        }
        Ok(Edge {
            inet,
            attacker,
            node,
            sites: [
                Site {
                    ns: s1,
                    router: Ipv4Addr::new(192, 0, 2, 10),
                    gateway: Ipv4Addr::new(192, 0, 2, 1),
                    server: Ipv4Addr::new(203, 0, 113, 5),
                },
                Site {
                    ns: s2,
                    router: Ipv4Addr::new(192, 0, 2, 26),
                    gateway: Ipv4Addr::new(192, 0, 2, 17),
                    server: Ipv4Addr::new(203, 0, 113, 133),
                },
            ],
        })
    }

    /// Starts site `i`'s userspace GRE endpoint (TUN `tun0` holding its
    /// server address) for a tunnel with `key`; the inner MTU leaves room for
    /// the outer headers on the 1500-byte underlay.
    pub fn start_site(&self, i: usize, key: Option<u32>) -> std::io::Result<GreTunEndpoint> {
        let s = &self.sites[i];
        let overhead = 20 + 4 + if key.is_some() { 4 } else { 0 };
        GreTunEndpoint::start(&s.ns, "tun0", s.server, 1500 - overhead, ENDPOINT, s.gateway, key)
    }

    /// Starts site `i`'s endpoint for several tunnels told apart by `keys`,
    /// answering through `return_key` (see [`GreTunEndpoint::start_multi`]).
    pub fn start_site_multi(
        &self,
        i: usize,
        keys: &[Option<u32>],
        return_key: Option<u32>,
    ) -> std::io::Result<GreTunEndpoint> {
        let s = &self.sites[i];
        GreTunEndpoint::start_multi(&s.ns, "tun0", s.server, 1472, ENDPOINT, s.gateway, keys, return_key)
    }

    /// The node section of a config for this topology.
    pub fn node_yaml(name: &str) -> String {
        format!(
            "version: 1\nnode:\n  name: {name}\n  interfaces:\n    - name: n-inet\n    - name: n-atk\n    - name: n-site1\n    - name: n-site2\n  tunnel_endpoint: 198.51.100.1\n  metrics: 127.0.0.1:9477\n"
        )
    }

    /// A customer of site `i` (acme: 0, globex: 1) with one keyed tunnel.
    pub fn customer_yaml(i: usize, key: u32) -> String {
        let (name, prefix, router) = [
            ("acme", "203.0.113.0/25", "192.0.2.10"),
            ("globex", "203.0.113.128/25", "192.0.2.26"),
        ][i];
        format!(
            "  - name: {name}\n    prefixes: [{prefix}]\n    tunnels:\n      - name: {name}-site\n        remote: {router}\n        key: {key}\n        mtu: 1472\n    routes:\n      - prefix: {prefix}\n        tunnel: {name}-site\n"
        )
    }

    /// A whole config: the node and the given customers.
    pub fn config_yaml(customers: &[(usize, u32)]) -> String {
        let mut s = Self::node_yaml("edge-test");
        s.push_str("customers:\n");
        for (i, key) in customers {
            s.push_str(&Self::customer_yaml(*i, *key));
        }
        s
    }
}
