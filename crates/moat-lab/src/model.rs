//! A reference model of the data plane's pipeline, written from the
//! specification (docs/ARCHITECTURE.md, moat_common::flowhash, the ECMP
//! scoring rule) without sharing code with the BPF program or the compiler
//! in moat-dataplane: it works on the [`Spec`] directly, with linear scans
//! where the data plane uses flattened tables. The differential test runs
//! both on the same packets and compares verdict, reason and bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{IpNumber, Ipv4Header};
use ipnet::IpNet;
use moat_common::Reason;
use moat_dataplane::{NextHop, Spec};

/// What the kernel's FIB says about a decapsulated packet's destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fib {
    Forward {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
    NoNeighbour,
    /// The route's link MTU is smaller than the packet.
    TooBig,
    Unroutable,
    /// The test cannot predict the kernel's answer: skip the packet.
    Unknown,
}

/// The XDP action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Pass,
    Drop,
    Tx,
    Redirect(u32),
}

impl Action {
    /// The program's return value for this action.
    pub fn code(self) -> u32 {
        match self {
            Action::Drop => 1,
            Action::Pass => 2,
            Action::Tx => 3,
            Action::Redirect(_) => 4,
        }
    }
}

/// The model's verdict on one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    pub action: Action,
    pub reason: Reason,
    /// The frame as the program must leave it.
    pub output: Vec<u8>,
}

/// The pipeline's inputs besides the packet.
pub struct Model<'a> {
    pub spec: &'a Spec,
    /// Next hop of tunnel `(customer index, tunnel index)`.
    pub next_hop: &'a dyn Fn(usize, usize) -> Option<NextHop>,
    /// FIB answer for (destination, IP packet length).
    pub fib: &'a dyn Fn(IpAddr, usize) -> Fib,
    pub ingress_ifindex: u32,
    /// Matches per rule, as the data plane counts them: (customer whose
    /// firewall, or `None` for the mitigation rules; rule name) -> packets.
    pub rule_hits: &'a std::cell::RefCell<std::collections::BTreeMap<(Option<String>, String), u64>>,
    /// Datagrams whose first fragment the rules or the reflection
    /// protection dropped, and why: their later fragments are dropped for
    /// the same reason.
    pub frag_drops: &'a std::cell::RefCell<FragDrops>,
}

/// A fragmented datagram: (source, destination, id, protocol) -> the
/// reason its first fragment was dropped.
pub type FragDrops = std::collections::HashMap<(IpAddr, IpAddr, u32, u8), Reason>;

struct Ip {
    v6: bool,
    l3: usize,
    ip_len: usize,
    proto: u8,
    frag: bool,
    /// A fragment after the first (no L4 header).
    later_frag: bool,
    /// The datagram's id (fragments only).
    frag_id: u32,
    l4: usize,
    ports: Option<[u8; 4]>,
    /// Flags byte of TCP that is not a later fragment (else 0).
    tcp_flags: u8,
    ttl_pos: usize,
    src: IpAddr,
    dst: IpAddr,
}

fn be16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

/// The offset bound the data plane parses within (its `MAX_OFFSET`).
const MAX_OFFSET: usize = 1024;

/// Parses an IP packet at `l3` that must end by `limit` (exclusive).
fn parse_ip(b: &[u8], v6: bool, l3: usize, limit: usize) -> Result<Ip, Reason> {
    let (ip_len, proto, frag, l4, ttl_pos, src, dst);
    let (mut later_frag, mut frag_id) = (false, 0);
    if !v6 {
        if b.len() < l3 + 20 {
            return Err(Reason::DropTruncatedIp);
        }
        let hl = usize::from(b[l3] & 0x0f) * 4;
        let total = be16(b, l3 + 2);
        if b[l3] >> 4 != 4 || hl < 20 || total < hl {
            return Err(Reason::DropMalformedIp);
        }
        if l3 + total > limit {
            return Err(Reason::DropTruncatedIp);
        }
        ip_len = total;
        proto = b[l3 + 9];
        let fo = be16(b, l3 + 6);
        frag = fo & 0x3fff != 0;
        if frag {
            later_frag = fo & 0x1fff != 0;
            frag_id = be16(b, l3 + 4) as u32;
        }
        l4 = l3 + hl;
        ttl_pos = l3 + 8;
        src = IpAddr::V4(Ipv4Addr::new(b[l3 + 12], b[l3 + 13], b[l3 + 14], b[l3 + 15]));
        dst = IpAddr::V4(Ipv4Addr::new(b[l3 + 16], b[l3 + 17], b[l3 + 18], b[l3 + 19]));
    } else {
        if b.len() < l3 + 40 {
            return Err(Reason::DropTruncatedIp);
        }
        if b[l3] >> 4 != 6 {
            return Err(Reason::DropMalformedIp);
        }
        ip_len = 40 + be16(b, l3 + 4);
        if l3 + ip_len > limit {
            return Err(Reason::DropTruncatedIp);
        }
        let end = l3 + ip_len;
        let mut next = b[l3 + 6];
        let mut at = l3 + 40;
        let mut is_frag = false;
        let mut seen = 0;
        loop {
            let is_ext = matches!(next, 0 | 43 | 44 | 60);
            if !is_ext {
                break;
            }
            if seen == 6 {
                return Err(Reason::DropMalformedIp);
            }
            seen += 1;
            if at + 8 > end {
                return Err(Reason::DropMalformedIp);
            }
            if next == 44 {
                let fo = be16(b, at + 2);
                let id = u32::from_be_bytes([b[at + 4], b[at + 5], b[at + 6], b[at + 7]]);
                next = b[at];
                at += 8;
                if fo & 0xfff9 != 0 {
                    is_frag = true;
                    later_frag = fo & 0xfff8 != 0;
                    frag_id = id;
                    break;
                }
            } else {
                let len = (usize::from(b[at + 1]) + 1) * 8;
                next = b[at];
                at += len;
            }
            if at > MAX_OFFSET {
                return Err(Reason::DropMalformedIp);
            }
        }
        if at > end {
            return Err(Reason::DropMalformedIp);
        }
        proto = next;
        frag = is_frag;
        l4 = at;
        ttl_pos = l3 + 7;
        let mut s = [0u8; 16];
        s.copy_from_slice(&b[l3 + 8..l3 + 24]);
        let mut d = [0u8; 16];
        d.copy_from_slice(&b[l3 + 24..l3 + 40]);
        src = IpAddr::V6(Ipv6Addr::from(s));
        dst = IpAddr::V6(Ipv6Addr::from(d));
    }
    let mut ports = None;
    let mut tcp_flags = 0;
    // A first fragment must hold its whole L4 header, as a whole packet.
    if !later_frag {
        let need = match proto {
            6 => 20,
            17 => 8,
            1 => 8,
            58 => 4,
            _ => 0,
        };
        if l4 + need > l3 + ip_len {
            return Err(Reason::DropTruncatedL4);
        }
        if proto == 6 || proto == 17 {
            ports = Some([b[l4], b[l4 + 1], b[l4 + 2], b[l4 + 3]]);
        }
        if proto == 6 {
            tcp_flags = b[l4 + 13];
        }
    }
    Ok(Ip {
        v6,
        l3,
        ip_len,
        proto,
        frag,
        later_frag,
        frag_id,
        l4,
        ports,
        tcp_flags,
        ttl_pos,
        src,
        dst,
    })
}

/// The flow hash as specified in moat_common::flowhash.
pub fn flow_hash(src: IpAddr, dst: IpAddr, proto: u8, ports: Option<[u8; 4]>) -> u32 {
    fn step(h: u32, w: u32) -> u32 {
        let mut x = (h ^ w).wrapping_mul(0x85eb_ca6b);
        x ^= x >> 13;
        x = x.wrapping_mul(0xc2b2_ae35);
        x ^ (x >> 16)
    }
    let mut words = Vec::new();
    for a in [src, dst] {
        let bytes: Vec<u8> = match a {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        for c in bytes.chunks(4) {
            words.push(u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        }
    }
    words.push(u32::from(proto));
    if let Some(p) = ports {
        words.push(u32::from_le_bytes(p));
    }
    words.into_iter().fold(0x9e37_79b9, step)
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Which of `members` ((identity, weight), weights > 0) owns `slot`:
/// lowest `-ln(u)/weight`, ties to the lowest identity.
pub fn slot_owner(slot: usize, members: &[(u64, u32)]) -> usize {
    let mut best = 0;
    let mut best_score = f64::INFINITY;
    for (i, &(identity, weight)) in members.iter().enumerate() {
        let x = splitmix(identity ^ splitmix(slot as u64));
        let u = ((x >> 11) as f64 + 0.5) / 9_007_199_254_740_992.0;
        let score = -u.ln() / f64::from(weight);
        if score < best_score || (score == best_score && identity < members[best].0) {
            best = i;
            best_score = score;
        }
    }
    best
}

/// A tunnel's identity for slot scoring: from (local, remote, key).
pub fn identity(local: Ipv4Addr, remote: Ipv4Addr, key: Option<u32>) -> u64 {
    let addrs = (u64::from(u32::from(local)) << 32) | u64::from(u32::from(remote));
    let k = key.map_or(0, |k| (1u64 << 32) | u64::from(k));
    splitmix(splitmix(addrs) ^ k)
}

/// RFC 1624 eqn. 3 for the TTL/protocol word.
fn ttl_checksum(check: u16, ttl: u8, proto: u8) -> u16 {
    let old = u32::from(u16::from_be_bytes([ttl, proto]));
    let new = u32::from(u16::from_be_bytes([ttl - 1, proto]));
    let mut sum = u32::from(!check) + (!old & 0xffff) + new;
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The inner IP packet with its TTL / hop limit lowered by one.
fn lowered(b: &[u8], ip: &Ip) -> Vec<u8> {
    let mut p = b[ip.l3..ip.l3 + ip.ip_len].to_vec();
    let t = ip.ttl_pos - ip.l3;
    if !ip.v6 {
        let c = ttl_checksum(u16::from_be_bytes([p[10], p[11]]), p[t], p[9]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }
    p[t] -= 1;
    p
}

fn contains(net: &IpNet, a: IpAddr) -> bool {
    net.contains(&a)
}

impl Model<'_> {
    fn pass(&self, b: &[u8], reason: Reason) -> Option<Expect> {
        Some(Expect {
            action: Action::Pass,
            reason,
            output: b.to_vec(),
        })
    }

    fn hit(&self, customer: Option<&str>, rule: &str) {
        *self
            .rule_hits
            .borrow_mut()
            .entry((customer.map(str::to_string), rule.to_string()))
            .or_default() += 1;
    }

    fn drop(&self, b: &[u8], reason: Reason) -> Option<Expect> {
        Some(Expect {
            action: Action::Drop,
            reason,
            output: b.to_vec(),
        })
    }

    fn send(&self, ifindex: u32) -> Action {
        if ifindex == self.ingress_ifindex {
            Action::Tx
        } else {
            Action::Redirect(ifindex)
        }
    }

    fn local_flags(&self, a: IpAddr) -> (bool, bool) {
        let IpAddr::V4(a) = a else {
            return (false, false);
        };
        let endpoint = self
            .spec
            .customers
            .iter()
            .flat_map(|c| &c.tunnels)
            .any(|t| t.local == a);
        let node = endpoint || self.spec.node_addresses.contains(&a);
        (endpoint, node)
    }

    /// The packet as the expression language sees it.
    fn fields(&self, b: &[u8], ip: &Ip) -> moat_expr::Packet {
        use moat_expr::Transport;
        let l4 = ip.l4;
        let transport = match (ip.later_frag, ip.proto, ip.v6) {
            (true, _, _) => Transport::None,
            (_, 6, _) => Transport::Tcp {
                src: u16::from_be_bytes([b[l4], b[l4 + 1]]),
                dst: u16::from_be_bytes([b[l4 + 2], b[l4 + 3]]),
                flags: ip.tcp_flags,
            },
            (_, 17, _) => Transport::Udp {
                src: u16::from_be_bytes([b[l4], b[l4 + 1]]),
                dst: u16::from_be_bytes([b[l4 + 2], b[l4 + 3]]),
            },
            (_, 1, false) | (_, 58, true) => Transport::Icmp {
                kind: b[l4],
                code: b[l4 + 1],
            },
            _ => Transport::None,
        };
        moat_expr::Packet {
            src: ip.src,
            dst: ip.dst,
            proto: ip.proto,
            ttl: b[ip.ttl_pos],
            len: ip.ip_len as u16,
            frag: ip.frag,
            transport,
        }
    }

    /// The expected result for frame `b`; `None` if it depends on a FIB
    /// answer the test cannot predict.
    pub fn process(&self, b: &[u8]) -> Option<Expect> {
        if b.len() < 14 {
            return self.drop(b, Reason::DropTruncatedEthernet);
        }
        let (mut ethertype, mut l3) = (be16(b, 12), 14);
        if ethertype == 0x8100 {
            if b.len() < 18 {
                return self.drop(b, Reason::DropTruncatedEthernet);
            }
            ethertype = be16(b, 16);
            l3 = 18;
        }
        let v6 = match ethertype {
            0x0800 => false,
            0x86dd => true,
            _ => return self.pass(b, Reason::PassNotIp),
        };
        let ip = match parse_ip(b, v6, l3, b.len()) {
            Ok(ip) => ip,
            Err(r) => return self.drop(b, r),
        };
        if !v6 && ip.proto == 47 && self.local_flags(ip.dst).0 {
            return self.decap(b, &ip);
        }
        let Some(ci) = self
            .spec
            .customers
            .iter()
            .position(|c| c.prefixes.iter().any(|p| contains(p, ip.dst)))
        else {
            return self.pass(b, Reason::PassNotProtected);
        };
        // Built-in protections, as configured; written from their
        // definitions in the contract, not from the data plane's code.
        let on = self.spec.protections;
        if on & moat_common::protect::LAND != 0 && ip.src == ip.dst {
            return self.drop(b, Reason::DropLand);
        }
        if on & moat_common::protect::INVALID_TCP_FLAGS != 0 && ip.proto == 6 && !ip.later_frag {
            let f = ip.tcp_flags & 0x3f;
            let (fin, syn, rst) = (f & 1 != 0, f & 2 != 0, f & 4 != 0);
            if f == 0 || f == 0x3f || (syn && fin) || (syn && rst) {
                return self.drop(b, Reason::DropInvalidTcpFlags);
            }
        }
        if on & moat_common::protect::ZERO_PORTS != 0 {
            if let Some(p) = ip.ports {
                if p[..2] == [0, 0] || p[2..] == [0, 0] {
                    return self.drop(b, Reason::DropZeroPort);
                }
            }
        }
        // A first fragment dropped by the rules or the reflection
        // protection takes its datagram's later fragments with it.
        let datagram = (ip.src, ip.dst, ip.frag_id, ip.proto);
        let ruled = |r: Reason| {
            if ip.frag && !ip.later_frag {
                self.frag_drops.borrow_mut().insert(datagram, r);
            }
            self.drop(b, r)
        };
        // Operator mitigation rules: the first whose expression matches
        // (by the language's reference evaluation) decides.
        let fields = self.fields(b, &ip);
        let no_lists = |_: &str| Vec::new();
        // An operator pass or a customer allow exempts the packet from the
        // reflection protection.
        let mut allowed = false;
        if let Some(r) = self
            .spec
            .mitigation
            .iter()
            .find(|r| r.condition.matches(&fields, &no_lists))
        {
            self.hit(None, &r.name);
            match r.action {
                moat_dataplane::RuleAction::Drop => return ruled(Reason::DropMitigationRule),
                moat_dataplane::RuleAction::Pass => allowed = true,
                // Token buckets depend on time: the tests that use them
                // check rates, not single packets.
                moat_dataplane::RuleAction::RateLimit(_) => {}
            }
        }
        // The customer's firewall: the first matching rule decides.
        let c = &self.spec.customers[ci];
        if let Some(r) = c.firewall.iter().find(|r| r.condition.matches(&fields, &no_lists)) {
            self.hit(Some(&c.name), &r.name);
            match r.action {
                moat_dataplane::RuleAction::Drop => return ruled(Reason::DropFirewall),
                _ => allowed = true,
            }
        }
        if !allowed && on & moat_common::protect::REFLECTION != 0 && ip.proto == 17 {
            if let Some(p) = ip.ports {
                let sport = u16::from_be_bytes([p[0], p[1]]);
                if moat_common::protect::REFLECTOR_PORTS.contains(&sport) {
                    return ruled(Reason::DropReflection);
                }
            }
        }
        // A later fragment the rules let through, of a datagram whose first
        // fragment they or the reflection protection dropped.
        if ip.later_frag {
            if let Some(r) = self.frag_drops.borrow().get(&datagram).copied() {
                return self.drop(b, r);
            }
        }
        let Some(longest) = c
            .routes
            .iter()
            .filter(|r| contains(&r.prefix, ip.dst))
            .map(|r| r.prefix.prefix_len())
            .max()
        else {
            return self.drop(b, Reason::DropNoRoute);
        };
        // Members of the best effective priority among routes of that length.
        let routes: Vec<_> = c
            .routes
            .iter()
            .filter(|r| r.prefix.prefix_len() == longest && contains(&r.prefix, ip.dst))
            .collect();
        let eff = |r: &&moat_dataplane::RouteSpec| {
            let t = c
                .tunnels
                .iter()
                .find(|t| t.name == r.tunnel)
                .expect("route names a tunnel");
            u64::from(r.priority) + u64::from(t.penalty)
        };
        let best = routes.iter().map(eff).min().expect("at least one route");
        let mut members: Vec<(usize, u32)> = Vec::new();
        for r in routes.iter().filter(|r| eff(r) == best) {
            let ti = c.tunnels.iter().position(|t| t.name == r.tunnel).expect("tunnel");
            match members.iter_mut().find(|m| m.0 == ti) {
                Some(m) => m.1 += u32::from(r.weight),
                None => members.push((ti, u32::from(r.weight))),
            }
        }
        let ti = if members.len() == 1 {
            members[0].0
        } else {
            // Ports only for unfragmented TCP/UDP: every fragment of a
            // datagram takes one tunnel.
            let ports = if ip.frag { None } else { ip.ports };
            let slot = flow_hash(ip.src, ip.dst, ip.proto, ports) as usize % moat_common::limits::ECMP_SLOTS;
            let scored: Vec<(u64, u32)> = members
                .iter()
                .map(|&(ti, w)| {
                    let t = &c.tunnels[ti];
                    (identity(t.local, t.remote, t.key), w)
                })
                .collect();
            members[slot_owner(slot, &scored)].0
        };
        let t = &c.tunnels[ti];
        if b[ip.ttl_pos] <= 1 {
            return self.drop(b, Reason::DropTtlExpired);
        }
        if ip.ip_len > usize::from(t.mtu) {
            return self.drop(b, Reason::DropMtuExceeded);
        }
        let Some(nh) = (self.next_hop)(ci, ti) else {
            return self.drop(b, Reason::DropNoNextHop);
        };
        let gre_len = if t.key.is_some() { 8 } else { 4 };
        if 20 + gre_len + ip.ip_len > usize::from(nh.link_mtu) {
            return self.drop(b, Reason::DropNextHopMtu);
        }
        let inner = lowered(b, &ip);
        let mut outer = Ipv4Header::new(
            (gre_len + inner.len()) as u16,
            t.ttl,
            IpNumber(47),
            t.local.octets(),
            t.remote.octets(),
        )
        .expect("outer header");
        outer.dont_fragment = true;
        let mut out = Vec::new();
        out.extend_from_slice(&nh.dmac);
        out.extend_from_slice(&nh.smac);
        out.extend_from_slice(&0x0800u16.to_be_bytes());
        outer.write(&mut out).expect("write");
        out.extend_from_slice(&(if t.key.is_some() { 0x2000u16 } else { 0 }).to_be_bytes());
        out.extend_from_slice(&(if ip.v6 { 0x86ddu16 } else { 0x0800 }).to_be_bytes());
        if let Some(k) = t.key {
            out.extend_from_slice(&k.to_be_bytes());
        }
        out.extend_from_slice(&inner);
        Some(Expect {
            action: self.send(nh.ifindex),
            reason: Reason::ForwardEncap,
            output: out,
        })
    }

    fn decap(&self, b: &[u8], outer: &Ip) -> Option<Expect> {
        let end = outer.l3 + outer.ip_len;
        if outer.frag || outer.l4 + 4 > end {
            return self.drop(b, Reason::DropGreMalformed);
        }
        let flags = be16(b, outer.l4);
        if flags & 0x4f07 != 0 {
            return self.drop(b, Reason::DropGreMalformed);
        }
        let has_c = flags & 0x8000 != 0;
        let has_k = flags & 0x2000 != 0;
        let has_s = flags & 0x1000 != 0;
        let inner_at = outer.l4 + 4 + 4 * (usize::from(has_c) + usize::from(has_k) + usize::from(has_s));
        if inner_at > end {
            return self.drop(b, Reason::DropGreMalformed);
        }
        let key = has_k.then(|| {
            let k = outer.l4 + 4 + if has_c { 4 } else { 0 };
            u32::from_be_bytes([b[k], b[k + 1], b[k + 2], b[k + 3]])
        });
        let (IpAddr::V4(local), IpAddr::V4(remote)) = (outer.dst, outer.src) else {
            unreachable!()
        };
        let found = self.spec.customers.iter().enumerate().find_map(|(ci, c)| {
            c.tunnels
                .iter()
                .find(|t| t.local == local && t.remote == remote && t.key == key)
                .map(|_| ci)
        });
        let Some(ci) = found else {
            return self.drop(b, Reason::DropGreUnknownTunnel);
        };
        let v6 = match be16(b, outer.l4 + 2) {
            0x0800 => false,
            0x86dd => true,
            _ => return self.drop(b, Reason::DropGreUnsupportedPayload),
        };
        let ip = match parse_ip(b, v6, inner_at, end) {
            Ok(ip) => ip,
            Err(r) => return self.drop(b, r),
        };
        if !v6 && ip.proto == 1 && self.local_flags(ip.dst).1 {
            return self.pass(b, Reason::PassTunnelToNode);
        }
        let c = &self.spec.customers[ci];
        if !c.prefixes.iter().chain(&c.egress_prefixes).any(|p| contains(p, ip.src)) {
            return self.drop(b, Reason::DropSpoofedSource);
        }
        if b[ip.ttl_pos] <= 1 {
            return self.drop(b, Reason::DropTtlExpired);
        }
        let ethertype: u16 = if v6 { 0x86dd } else { 0x0800 };
        match (self.fib)(ip.dst, ip.ip_len) {
            Fib::Forward { ifindex, smac, dmac } => {
                let mut out = Vec::new();
                out.extend_from_slice(&dmac);
                out.extend_from_slice(&smac);
                out.extend_from_slice(&ethertype.to_be_bytes());
                out.extend_from_slice(&lowered(b, &ip));
                Some(Expect {
                    action: self.send(ifindex),
                    reason: Reason::ForwardDecap,
                    output: out,
                })
            }
            Fib::NoNeighbour => {
                let mut out = b[..12].to_vec();
                out.extend_from_slice(&ethertype.to_be_bytes());
                out.extend_from_slice(&b[ip.l3..ip.l3 + ip.ip_len]);
                Some(Expect {
                    action: Action::Pass,
                    reason: Reason::PassDecapToKernel,
                    output: out,
                })
            }
            Fib::TooBig => self.drop(b, Reason::DropDecapMtu),
            Fib::Unroutable => self.drop(b, Reason::DropDecapUnroutable),
            Fib::Unknown => None,
        }
    }
}
