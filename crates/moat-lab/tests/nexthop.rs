//! Next-hop resolution from the kernel's routing, neighbour and link
//! tables (rtnetlink), in a namespace whose tables the fixture sets up.

use std::net::Ipv4Addr;

use moat_dataplane::{
    nexthop::{Resolution, Resolver},
    NextHop,
};
use moat_lab::fixture::{Fixture, GW_MAC};

#[test]
fn next_hops_come_from_the_kernel_tables() {
    let f = Fixture::new("nexthop");
    let _in = f.ns.enter().unwrap();
    let mut r = Resolver::new().expect("rtnetlink socket");
    // Default route via a gateway with a permanent neighbour entry.
    let via_gw = NextHop {
        ifindex: f.up_if,
        smac: f.up_mac,
        dmac: GW_MAC,
        link_mtu: 1500,
    };
    assert_eq!(
        r.resolve(Ipv4Addr::new(198, 51, 100, 77)).unwrap(),
        Resolution::Ready(via_gw)
    );
    assert_eq!(
        r.resolve(Ipv4Addr::new(192, 0, 2, 10)).unwrap().next_hop(),
        Some(via_gw)
    );
    // On the link, but the kernel has no neighbour entry for it.
    assert_eq!(
        r.resolve(Ipv4Addr::new(169, 254, 100, 5)).unwrap(),
        Resolution::Unresolved {
            ifindex: f.up_if,
            neighbour: Ipv4Addr::new(169, 254, 100, 5)
        }
    );
    // A blackhole route is no route.
    assert_eq!(
        r.resolve(Ipv4Addr::new(198, 51, 100, 241)).unwrap(),
        Resolution::NoRoute
    );
    // The link MTU follows the interface.
    f.ns.ip(&["link", "set", "up0", "mtu", "1400"]);
    assert_eq!(
        r.resolve(Ipv4Addr::new(198, 51, 100, 77))
            .unwrap()
            .next_hop()
            .map(|h| h.link_mtu),
        Some(1400)
    );
}
