//! Flood templates for the generator (`moat_dataplane::flood`): the attacks
//! the scrubbing tests and benchmarks throw at moat, built with etherparse.
//! Each varies its source address in the low `random_bits` bits of `src`
//! (spoofed sources), and its source port where the attack has one to vary.

use std::net::{IpAddr, Ipv4Addr};

use moat_common::flood::{FloodConfig, FLOOD_MACS, FLOOD_RANDOM_DPORT, FLOOD_RANDOM_SPORT, FLOOD_TCP, FLOOD_TTL_SHIFT};
use moat_dataplane::flood::{Template, MIN_FRAME};

use crate::packet::{self, Frame, L4};

/// Where a flood goes and where it claims to come from.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub frame: Frame,
    /// Source base address; its low `random_bits` bits vary.
    pub src: Ipv4Addr,
    pub random_bits: u8,
    pub dst: Ipv4Addr,
}

impl Target {
    /// From interface `from` of `gen` to `to` of `sink` (its MAC), at acme's
    /// server address in the standard spec (203.0.113.5), from 65,536
    /// sources in the benchmarking range 198.18.0.0/16.
    pub fn acme(gen: &crate::netns::NetNs, from: &str, sink: &crate::netns::NetNs, to: &str) -> Target {
        Target {
            frame: Frame {
                src: gen.mac(from),
                dst: sink.mac(to),
                vlan: None,
            },
            src: Ipv4Addr::new(198, 18, 0, 0),
            random_bits: 16,
            dst: Ipv4Addr::new(203, 0, 113, 5),
        }
    }
}

fn mask(bits: u8) -> [u8; 4] {
    let m: u32 = if bits == 0 {
        0
    } else {
        u32::MAX >> (32 - u32::from(bits.min(32)))
    };
    m.to_be_bytes()
}

/// The frame's destination and source MAC addresses, in wire order.
fn macs(f: &Frame) -> [u8; 12] {
    let mut m = [0u8; 12];
    m[..6].copy_from_slice(&f.dst);
    m[6..].copy_from_slice(&f.src);
    m
}

fn template(t: &Target, l4: L4, flags: u32, payload: usize) -> Template {
    let mut ip = packet::ip(IpAddr::V4(t.src), IpAddr::V4(t.dst), 64, l4, &vec![0x5a; payload]);
    if matches!(l4, L4::Udp { .. }) {
        // No UDP checksum (allowed over IPv4): the ports vary per frame.
        ip[26..28].copy_from_slice(&[0, 0]);
    }
    Template {
        frame: packet::eth(t.frame, &ip),
        config: FloodConfig {
            src_mask: mask(t.random_bits),
            // Every frame leaves with TTL 64 and its own Ethernet
            // addresses, whatever a receiver did to it.
            flags: flags | FLOOD_MACS | (64 << FLOOD_TTL_SHIFT),
            macs: macs(&t.frame),
            ..FloodConfig::default()
        },
    }
}

/// UDP to `dport` from random sources and source ports.
pub fn udp(t: &Target, dport: u16, payload: usize) -> Template {
    let payload = payload.max(MIN_FRAME - 42);
    template(t, L4::Udp { sport: 1024, dport }, FLOOD_RANDOM_SPORT, payload)
}

/// Reflection/amplification: UDP from a reflector's service port (53, 123,
/// 11211, ...) to random destination ports.
pub fn reflection(t: &Target, sport: u16, payload: usize) -> Template {
    let payload = payload.max(MIN_FRAME - 42);
    template(t, L4::Udp { sport, dport: 1024 }, FLOOD_RANDOM_DPORT, payload)
}

/// TCP with the given flags byte (SYN flood: 0x02; ACK flood: 0x10;
/// invalid combinations such as SYN+FIN: 0x03) to `dport`, from random
/// sources and source ports.
pub fn tcp(t: &Target, dport: u16, flags: u8) -> Template {
    template(
        t,
        L4::TcpFlags {
            sport: 1024,
            dport,
            flags,
        },
        FLOOD_RANDOM_SPORT | FLOOD_TCP,
        0,
    )
}

/// Non-first IPv4 fragments (offset 1480, more fragments) of a UDP
/// datagram, from random sources: no transport header to match on.
pub fn fragments(t: &Target, payload: usize) -> Template {
    let whole = packet::ip(
        IpAddr::V4(t.src),
        IpAddr::V4(t.dst),
        64,
        L4::Udp { sport: 53, dport: 53 },
        &vec![0x5a; 1480 + payload.max(64)],
    );
    let frags = packet::ipv4_fragments(&whole, 1480, 0x4242);
    Template {
        frame: packet::eth(t.frame, &frags[1]),
        config: FloodConfig {
            src_mask: mask(t.random_bits),
            flags: FLOOD_MACS,
            macs: macs(&t.frame),
            ..FloodConfig::default()
        },
    }
}
