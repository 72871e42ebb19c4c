//! Where a tunnel's packets go next, from the kernel's own tables over
//! rtnetlink: the route to the tunnel remote gives the interface and the
//! gateway (or the remote itself when it is on the link), the neighbour
//! table the gateway's MAC, the link table the interface's MAC and MTU.
//! The data plane then transmits encapsulated packets without asking the
//! kernel per packet.

use std::{collections::HashMap, net::Ipv4Addr};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_packet_utils::nla::DefaultNla;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::{error::Error, spec::NextHop};

/// The answer for one tunnel remote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Everything needed to transmit.
    Ready(NextHop),
    /// Routed out of `ifindex` via `neighbour`, whose MAC the kernel does not know (yet).
    Unresolved { ifindex: u32, neighbour: Ipv4Addr },
    /// No unicast route.
    NoRoute,
}

impl std::fmt::Display for Resolution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mac = |m: &[u8; 6]| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        match self {
            Resolution::Ready(h) => write!(
                f,
                "ifindex {} via {} (from {}, link mtu {})",
                h.ifindex,
                mac(&h.dmac),
                mac(&h.smac),
                h.link_mtu
            ),
            Resolution::Unresolved { ifindex, neighbour } => {
                write!(
                    f,
                    "unresolved (gateway {neighbour} on ifindex {ifindex} has no MAC yet)"
                )
            }
            Resolution::NoRoute => f.write_str("no route"),
        }
    }
}

impl Resolution {
    pub fn next_hop(self) -> Option<NextHop> {
        match self {
            Resolution::Ready(h) => Some(h),
            _ => None,
        }
    }
}

/// An rtnetlink socket in the network namespace of the thread that opened it.
pub struct Resolver {
    socket: Socket,
    seq: u32,
    /// The errno of the last single (non-dump) request the kernel refused.
    last_errno: Option<i32>,
}

fn nl_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Interface {
        interface: "rtnetlink".into(),
        message: format!("{what}: {e}"),
    }
}

impl Resolver {
    pub fn new() -> Result<Resolver, Error> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| nl_err("socket", e))?;
        socket.bind_auto().map_err(|e| nl_err("bind", e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| nl_err("connect", e))?;
        Ok(Resolver {
            socket,
            seq: 0,
            last_errno: None,
        })
    }

    /// Sends one request with the next sequence number and `flags`.
    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<(), Error> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(|e| nl_err("send", e))?;
        Ok(())
    }

    /// Sends one request and collects the replies (all parts of a dump).
    fn request(&mut self, msg: RouteNetlinkMessage, dump: bool) -> Result<Vec<RouteNetlinkMessage>, Error> {
        self.last_errno = None;
        self.send(msg, if dump { NLM_F_DUMP } else { 0 })?;
        let mut out = Vec::new();
        loop {
            let mut rx: Vec<u8> = Vec::with_capacity(1 << 16);
            self.socket.recv(&mut rx, 0).map_err(|e| nl_err("recv", e))?;
            let mut at = 0;
            while at < rx.len() {
                let m =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[at..]).map_err(|e| nl_err("decode", e))?;
                let len = m.header.length as usize;
                if m.header.sequence_number == self.seq {
                    match m.payload {
                        NetlinkPayload::InnerMessage(inner) => {
                            out.push(inner);
                            if !dump {
                                return Ok(out);
                            }
                        }
                        NetlinkPayload::Done(_) => return Ok(out),
                        NetlinkPayload::Error(e) => {
                            return match e.code {
                                // Routing errors (e.g. ENETUNREACH) mean "no route";
                                // callers that care look at `last_errno`.
                                Some(c) if !dump => {
                                    self.last_errno = Some(-c.get());
                                    Ok(out)
                                }
                                Some(c) => Err(nl_err("kernel", c)),
                                None => Ok(out),
                            };
                        }
                        _ => {}
                    }
                }
                if len == 0 {
                    break;
                }
                at += len;
            }
        }
    }

    /// Resolves the next hop toward `remote`.
    pub fn resolve(&mut self, remote: Ipv4Addr) -> Result<Resolution, Error> {
        Ok(self.resolve_many(&[remote])?.remove(0))
    }

    /// Resolves the next hops toward every remote, with one route query
    /// per remote and one dump of the neighbour table in all.
    pub fn resolve_many(&mut self, remotes: &[Ipv4Addr]) -> Result<Vec<Resolution>, Error> {
        let mut routes = Vec::with_capacity(remotes.len());
        for &remote in remotes {
            routes.push(self.route(remote)?);
        }
        if routes.iter().all(Option::is_none) {
            return Ok(vec![Resolution::NoRoute; remotes.len()]);
        }
        let neighbours = self.neighbours()?;
        let mut links: HashMap<u32, Option<([u8; 6], u16)>> = HashMap::new();
        let mut out = Vec::with_capacity(remotes.len());
        for route in routes {
            let Some((ifindex, neighbour)) = route else {
                out.push(Resolution::NoRoute);
                continue;
            };
            let Some(&dmac) = neighbours.get(&(ifindex, neighbour)) else {
                out.push(Resolution::Unresolved { ifindex, neighbour });
                continue;
            };
            let link = match links.get(&ifindex) {
                Some(l) => *l,
                None => {
                    let l = self.link(ifindex)?;
                    links.insert(ifindex, l);
                    l
                }
            };
            out.push(match link {
                Some((smac, link_mtu)) => Resolution::Ready(NextHop {
                    ifindex,
                    smac,
                    dmac,
                    link_mtu,
                }),
                None => Resolution::Unresolved { ifindex, neighbour },
            });
        }
        Ok(out)
    }

    /// The route toward `remote`: (interface, gateway or the remote itself).
    fn route(&mut self, remote: Ipv4Addr) -> Result<Option<(u32, Ipv4Addr)>, Error> {
        let mut q = RouteMessage::default();
        q.header.address_family = AddressFamily::Inet;
        q.header.destination_prefix_length = 32;
        q.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(remote)));
        let Some(RouteNetlinkMessage::NewRoute(route)) = self.request(RouteNetlinkMessage::GetRoute(q), false)?.pop()
        else {
            return Ok(None);
        };
        if route.header.kind != RouteType::Unicast {
            return Ok(None);
        }
        let mut ifindex = 0;
        let mut neighbour = remote;
        for a in &route.attributes {
            match a {
                RouteAttribute::Oif(i) => ifindex = *i,
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => neighbour = *g,
                _ => {}
            }
        }
        Ok((ifindex != 0).then_some((ifindex, neighbour)))
    }

    /// Usable IPv4 neighbour entries: (interface, address) -> MAC.
    fn neighbours(&mut self) -> Result<HashMap<(u32, Ipv4Addr), [u8; 6]>, Error> {
        let mut n = NeighbourMessage::default();
        n.header.family = AddressFamily::Inet;
        let mut out = HashMap::new();
        for m in self.request(RouteNetlinkMessage::GetNeighbour(n), true)? {
            let RouteNetlinkMessage::NewNeighbour(m) = m else {
                continue;
            };
            let usable = matches!(
                m.header.state,
                NeighbourState::Reachable
                    | NeighbourState::Stale
                    | NeighbourState::Delay
                    | NeighbourState::Probe
                    | NeighbourState::Permanent
                    | NeighbourState::Noarp
            );
            if !usable {
                continue;
            }
            let mut dst = None;
            let mut mac = None;
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => dst = Some(*d),
                    NeighbourAttribute::LinkLocalAddress(l) => mac = mac_array(l),
                    _ => {}
                }
            }
            if let (Some(d), Some(mac)) = (dst, mac) {
                out.insert((m.header.ifindex, d), mac);
            }
        }
        Ok(out)
    }

    /// An interface's MAC and MTU.
    fn link(&mut self, ifindex: u32) -> Result<Option<([u8; 6], u16)>, Error> {
        let mut l = LinkMessage::default();
        l.header.index = ifindex;
        let Some(RouteNetlinkMessage::NewLink(link)) = self.request(RouteNetlinkMessage::GetLink(l), false)?.pop()
        else {
            return Ok(None);
        };
        let mut smac = None;
        let mut mtu = 0;
        for a in &link.attributes {
            match a {
                LinkAttribute::Address(m) => smac = mac_array(m),
                LinkAttribute::Mtu(m) => mtu = *m,
                _ => {}
            }
        }
        Ok(smac.map(|m| (m, mtu.min(u32::from(u16::MAX)) as u16)))
    }
}

/// NDA_FLAGS_EXT and its NTF_EXT_MANAGED bit (linux/neighbour.h).
const NDA_FLAGS_EXT: u16 = 15;
const NTF_EXT_MANAGED: u32 = 1;

/// What the kernel reports about XDP on one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceXdp {
    pub ifindex: u32,
    /// Id of the attached program when only one is attached.
    pub program: Option<u32>,
    /// "native", "generic", "offload", "multiple" or "none".
    pub mode: &'static str,
    /// Programs per mode (set when several modes are in use at once).
    pub native: Option<u32>,
    pub generic: Option<u32>,
}

impl InterfaceXdp {
    /// Whether `program` runs in `mode` ("native" or "generic") here.
    pub fn runs(&self, program: u32, mode: &str) -> bool {
        let per_mode = match mode {
            "native" => self.native,
            "generic" => self.generic,
            _ => None,
        };
        per_mode == Some(program) || (self.mode == mode && self.program == Some(program))
    }
}

impl Resolver {
    /// Asks the kernel to keep `neighbour` on `ifindex` resolved by itself
    /// (a managed neighbour entry, Linux 5.16+): it probes the entry and
    /// refreshes it without traffic, so encapsulated packets always find
    /// a MAC. Replaces nothing but an entry of the same address.
    pub fn ensure_managed(&mut self, ifindex: u32, neighbour: Ipv4Addr) -> Result<(), Error> {
        let mut n = NeighbourMessage::default();
        n.header.family = AddressFamily::Inet;
        n.header.ifindex = ifindex;
        n.header.state = NeighbourState::None;
        n.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(neighbour)));
        n.attributes.push(NeighbourAttribute::Other(DefaultNla::new(
            NDA_FLAGS_EXT,
            NTF_EXT_MANAGED.to_ne_bytes().to_vec(),
        )));
        self.request_ack(RouteNetlinkMessage::NewNeighbour(n), NLM_F_CREATE | NLM_F_REPLACE)
    }

    /// Sends one request that the kernel acknowledges; its error is ours.
    fn request_ack(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<(), Error> {
        self.send(msg, NLM_F_ACK | flags)?;
        loop {
            let mut rx: Vec<u8> = Vec::with_capacity(1 << 16);
            self.socket.recv(&mut rx, 0).map_err(|e| nl_err("recv", e))?;
            let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx).map_err(|e| nl_err("decode", e))?;
            if m.header.sequence_number != self.seq {
                continue;
            }
            if let NetlinkPayload::Error(e) = m.payload {
                return match e.code {
                    None => Ok(()),
                    Some(c) => Err(nl_err("kernel", std::io::Error::from_raw_os_error(-c.get()))),
                };
            }
        }
    }

    /// Every IPv4 address assigned to an interface of this namespace.
    pub fn local_ipv4(&mut self) -> Result<Vec<Ipv4Addr>, Error> {
        let mut a = AddressMessage::default();
        a.header.family = AddressFamily::Inet;
        let mut out = Vec::new();
        for m in self.request(RouteNetlinkMessage::GetAddress(a), true)? {
            if let RouteNetlinkMessage::NewAddress(m) = m {
                for attr in &m.attributes {
                    if let AddressAttribute::Local(std::net::IpAddr::V4(v4))
                    | AddressAttribute::Address(std::net::IpAddr::V4(v4)) = attr
                    {
                        out.push(*v4);
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// XDP facts of interface `name`, from the kernel (None: no such interface).
    pub fn interface_xdp(&mut self, name: &str) -> Result<Option<InterfaceXdp>, Error> {
        let mut l = LinkMessage::default();
        l.attributes.push(LinkAttribute::IfName(name.to_string()));
        let Some(RouteNetlinkMessage::NewLink(link)) = self.request(RouteNetlinkMessage::GetLink(l), false)?.pop()
        else {
            return match self.last_errno {
                Some(libc::ENODEV) | None => Ok(None),
                Some(e) => Err(nl_err(
                    &format!("interface {name}"),
                    std::io::Error::from_raw_os_error(e),
                )),
            };
        };
        let mut out = InterfaceXdp {
            ifindex: link.header.index,
            program: None,
            mode: "none",
            native: None,
            generic: None,
        };
        for a in &link.attributes {
            if let LinkAttribute::Xdp(xdp) = a {
                for x in xdp {
                    match x {
                        LinkXdp::ProgId(id) if *id != 0 => out.program = Some(*id),
                        LinkXdp::DrvProgId(id) if *id != 0 => out.native = Some(*id),
                        LinkXdp::SkbProgId(id) if *id != 0 => out.generic = Some(*id),
                        LinkXdp::Attached(XdpAttached::Driver) => out.mode = "native",
                        LinkXdp::Attached(XdpAttached::SocketBuffer) => out.mode = "generic",
                        LinkXdp::Attached(XdpAttached::Hardware) => out.mode = "offload",
                        LinkXdp::Attached(XdpAttached::Multiple) => out.mode = "multiple",
                        _ => {}
                    }
                }
            }
        }
        Ok(Some(out))
    }
}

/// Wakes up when the kernel's links, addresses, neighbours or IPv4 routes
/// change (rtnetlink multicast), so next hops are resolved again at once.
pub struct Monitor {
    socket: Socket,
}

impl Monitor {
    /// Subscribes in the network namespace of the calling thread.
    pub fn new() -> Result<Monitor, Error> {
        // RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE
        const GROUPS: u32 = 0x1 | 0x4 | 0x10 | 0x40;
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| nl_err("socket", e))?;
        socket
            .bind(&SocketAddr::new(0, GROUPS))
            .map_err(|e| nl_err("bind", e))?;
        Ok(Monitor { socket })
    }

    /// Blocks until at least one change is announced (its content does not
    /// matter: the caller resolves every next hop again).
    pub fn wait(&mut self) -> Result<(), Error> {
        let mut rx: Vec<u8> = Vec::with_capacity(1 << 16);
        match self.socket.recv(&mut rx, 0) {
            Ok(_) => Ok(()),
            // The kernel dropped announcements (ENOBUFS): something changed.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(()),
            Err(e) => Err(nl_err("recv", e)),
        }
    }
}

fn mac_array(m: &[u8]) -> Option<[u8; 6]> {
    m.try_into().ok()
}
