//! Test packets, built with etherparse (an implementation independent of
//! moat's): IPv4/IPv6, TCP/UDP/ICMP, VLAN tags, fragments, IPv6 extension
//! headers, and GRE (which etherparse lacks: see crate::gre, written per
//! RFC 2784/2890).

use std::net::IpAddr;

use etherparse::{IpFragOffset, IpNumber, Ipv4Header, PacketBuilder};

pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86dd;
pub const ETH_VLAN: u16 = 0x8100;

/// The L2 framing of a test packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub src: [u8; 6],
    pub dst: [u8; 6],
    pub vlan: Option<u16>,
}

impl Default for Frame {
    fn default() -> Self {
        Frame {
            src: [0x02, 0, 0, 0, 0, 0x01],
            dst: [0x02, 0, 0, 0, 0, 0x02],
            vlan: None,
        }
    }
}

/// Ethernet (+ optional 802.1Q tag) around an IP packet.
pub fn eth(frame: Frame, ip: &[u8]) -> Vec<u8> {
    let ethertype = if ip.first().map(|b| b >> 4) == Some(6) {
        ETH_IPV6
    } else {
        ETH_IPV4
    };
    eth_typed(frame, ethertype, ip)
}

/// Ethernet with an explicit ethertype.
pub fn eth_typed(frame: Frame, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(18 + payload.len());
    v.extend_from_slice(&frame.dst);
    v.extend_from_slice(&frame.src);
    if let Some(id) = frame.vlan {
        v.extend_from_slice(&ETH_VLAN.to_be_bytes());
        v.extend_from_slice(&(id & 0x0fff).to_be_bytes());
    }
    v.extend_from_slice(&ethertype.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// Transport of a test packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Udp {
        sport: u16,
        dport: u16,
    },
    Tcp {
        sport: u16,
        dport: u16,
        syn: bool,
    },
    /// TCP with any flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08,
    /// ACK 0x10, URG 0x20).
    TcpFlags {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    /// ICMP / ICMPv6 echo request.
    Echo {
        id: u16,
        seq: u16,
    },
}

fn v4(a: IpAddr) -> [u8; 4] {
    match a {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(_) => panic!("IPv4 address expected, got {a}"),
    }
}

fn v6(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(_) => panic!("IPv6 address expected, got {a}"),
    }
}

enum TcpSet {
    Fin,
    Syn,
    Rst,
    Psh,
    Ack,
    Urg,
}

/// An IP packet (no L2) with correct checksums.
pub fn ip(src: IpAddr, dst: IpAddr, ttl: u8, l4: L4, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    macro_rules! finish {
        ($b:expr) => {
            match l4 {
                L4::Udp { sport, dport } => $b.udp(sport, dport).write(&mut out, payload),
                L4::Tcp { sport, dport, syn } => {
                    let t = $b.tcp(sport, dport, 1000, 65000);
                    if syn {
                        t.syn().write(&mut out, payload)
                    } else {
                        t.ack(1).write(&mut out, payload)
                    }
                }
                L4::TcpFlags { sport, dport, flags } => {
                    let mut t = $b.tcp(sport, dport, 1000, 65000);
                    for (bit, set) in [
                        (0x01, TcpSet::Fin),
                        (0x02, TcpSet::Syn),
                        (0x04, TcpSet::Rst),
                        (0x08, TcpSet::Psh),
                        (0x10, TcpSet::Ack),
                        (0x20, TcpSet::Urg),
                    ] {
                        if flags & bit != 0 {
                            t = match set {
                                TcpSet::Fin => t.fin(),
                                TcpSet::Syn => t.syn(),
                                TcpSet::Rst => t.rst(),
                                TcpSet::Psh => t.psh(),
                                TcpSet::Ack => t.ack(1),
                                TcpSet::Urg => t.urg(1),
                            };
                        }
                    }
                    t.write(&mut out, payload)
                }
                L4::Echo { id, seq } => match src {
                    IpAddr::V4(_) => $b.icmpv4_echo_request(id, seq).write(&mut out, payload),
                    IpAddr::V6(_) => $b.icmpv6_echo_request(id, seq).write(&mut out, payload),
                },
            }
        };
    }
    let r = match src {
        IpAddr::V4(_) => finish!(PacketBuilder::ipv4(v4(src), v4(dst), ttl)),
        IpAddr::V6(_) => finish!(PacketBuilder::ipv6(v6(src), v6(dst), ttl)),
    };
    r.expect("building a test packet");
    out
}

/// Splits an IPv4 packet's payload into fragments of at most `chunk`
/// bytes (a multiple of 8), all with identification `id`.
pub fn ipv4_fragments(packet: &[u8], chunk: usize, id: u16) -> Vec<Vec<u8>> {
    assert!(chunk.is_multiple_of(8) && chunk > 0);
    let (h, payload) = Ipv4Header::from_slice(packet).expect("an IPv4 packet");
    let data = &payload[..usize::from(h.total_len) - h.header_len()];
    let mut frags = Vec::new();
    let mut off = 0;
    while off < data.len() {
        let end = (off + chunk).min(data.len());
        let mut fh = h.clone();
        fh.identification = id;
        fh.more_fragments = end < data.len();
        fh.dont_fragment = false;
        fh.fragment_offset = IpFragOffset::try_new((off / 8) as u16).expect("offset");
        fh.set_payload_len(end - off).expect("length");
        let mut v = Vec::new();
        fh.write(&mut v).expect("write");
        v.extend_from_slice(&data[off..end]);
        frags.push(v);
        off = end;
    }
    frags
}

/// Splits an IPv6 packet (no extension headers) into fragments with a
/// fragment header.
pub fn ipv6_fragments(packet: &[u8], chunk: usize, id: u32) -> Vec<Vec<u8>> {
    assert!(chunk.is_multiple_of(8) && chunk > 0);
    let next = packet[6];
    let data = &packet[40..];
    let mut frags = Vec::new();
    let mut off = 0;
    while off < data.len() {
        let end = (off + chunk).min(data.len());
        let mut v = packet[..40].to_vec();
        v[6] = 44;
        v[4..6].copy_from_slice(&((8 + end - off) as u16).to_be_bytes());
        let more = u16::from(end < data.len());
        v.push(next);
        v.push(0);
        v.extend_from_slice(&(((off / 8) as u16) << 3 | more).to_be_bytes());
        v.extend_from_slice(&id.to_be_bytes());
        v.extend_from_slice(&data[off..end]);
        frags.push(v);
        off = end;
    }
    frags
}

/// Inserts IPv6 extension headers (kind, total length in bytes, a multiple
/// of 8) between the fixed header and the payload.
pub fn ipv6_with_ext(packet: &[u8], exts: &[(u8, usize)]) -> Vec<u8> {
    let mut v = packet[..40].to_vec();
    let upper = packet[6];
    let mut body = Vec::new();
    for (i, &(kind, len)) in exts.iter().enumerate() {
        assert!(len >= 8 && len.is_multiple_of(8));
        let next = exts.get(i + 1).map_or(upper, |e| e.0);
        let mut e = vec![0u8; len];
        e[0] = next;
        e[1] = (len / 8 - 1) as u8;
        if kind == 0 || kind == 60 {
            // PadN option filling the rest of the header.
            e[2] = 1;
            e[3] = (len - 4) as u8;
        }
        body.extend_from_slice(&e);
    }
    if let Some(first) = exts.first() {
        v[6] = first.0;
    }
    body.extend_from_slice(&packet[40..]);
    v[4..6].copy_from_slice(&(body.len() as u16).to_be_bytes());
    v.extend_from_slice(&body);
    v
}

/// A GRE packet (outer IPv4 with DF, the GRE header of [`crate::gre::encapsulate`])
/// carrying `inner` (an IP packet).
pub fn gre(outer_src: [u8; 4], outer_dst: [u8; 4], ttl: u8, key: Option<u32>, inner: &[u8]) -> Vec<u8> {
    let g = crate::gre::encapsulate(key, inner);
    let mut h = Ipv4Header::new(g.len() as u16, ttl, IpNumber(47), outer_src, outer_dst).expect("header");
    h.dont_fragment = true;
    let mut v = Vec::new();
    h.write(&mut v).expect("write");
    v.extend_from_slice(&g);
    v
}
