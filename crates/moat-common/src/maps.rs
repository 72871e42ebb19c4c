//! Keys and values of the data plane's maps.

use crate::limits::ECMP_SLOTS;

/// Value of the destination LPM tables: which customer owns the address and
/// which route set (the longest customer route covering it) serves it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DestValue {
    pub customer: u32,
    /// Index into `ROUTE_SETS`, or [`crate::limits::NO_ROUTE_SET`].
    pub route_set: u32,
}
const _: () = assert!(core::mem::size_of::<DestValue>() == 8);

/// Multibit destination table entry: empty (0), a child node, or a leaf.
pub const DIR_CHILD: u64 = 1 << 63;
pub const DIR_LEAF: u64 = 1 << 62;

/// A leaf entry for `v`: customer in bits 32..62, route set in bits 0..32.
pub const fn dir_leaf(v: DestValue) -> u64 {
    DIR_LEAF | ((v.customer as u64) << 32) | v.route_set as u64
}

/// The value of a leaf entry.
pub const fn dir_value(e: u64) -> DestValue {
    DestValue {
        customer: ((e >> 32) as u32) & 0x3fff_ffff,
        route_set: e as u32,
    }
}

/// Anti-spoofing LPM key data for IPv4: customer id (big endian) then address.
pub type SourceKey4 = [u8; 8];
/// Anti-spoofing LPM key data for IPv6: customer id (big endian) then address.
pub type SourceKey6 = [u8; 20];

/// `ROUTE_SETS` value bit: the low 31 bits index `ECMP_TABLES` (several
/// members); without it they are the single member's tunnel id. One `u32`,
/// so a route set changes with one atomic store.
pub const ROUTE_SET_TABLE: u32 = 1 << 31;

/// Weighted, consistent slot table of a multi-member route set:
/// `slots[flow_hash % ECMP_SLOTS]` is the tunnel id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EcmpTable {
    pub slots: [u16; ECMP_SLOTS],
}
const _: () = assert!(core::mem::size_of::<EcmpTable>() == 2 * ECMP_SLOTS);

/// `Tunnel::flags`: the GRE header carries `key`.
pub const TUNNEL_HAS_KEY: u8 = 1;
/// `Tunnel::flags`: `ifindex`, `smac`, `dmac` and `link_mtu` are current.
pub const TUNNEL_NEXTHOP_VALID: u8 = 2;
/// `Tunnel::flags`: the slot holds a configured tunnel.
pub const TUNNEL_PRESENT: u8 = 4;

/// Everything the data plane needs to encapsulate into and transmit on a
/// tunnel. `TUNNELS` holds two slots per tunnel id and `TUNNEL_SLOT` says
/// which is live: userspace writes the idle slot, then flips the live one
/// with a single store, so a packet never sees half an update.
///
/// `header` is the outer Ethernet + IPv4 + GRE header as sent (built by
/// userspace from the tunnel and its next hop), with the IP total length,
/// IP checksum and GRE protocol left zero: the data plane copies
/// `header_len` bytes in word-sized stores and patches those three fields.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tunnel {
    pub header: [u8; TUNNEL_HEADER_MAX],
    pub customer: u32,
    /// Next hop's interface.
    pub ifindex: u32,
    /// Largest inner packet (IP total length) the tunnel carries.
    pub mtu: u16,
    /// Largest outer IP packet the next hop's link carries.
    pub link_mtu: u16,
    /// One's-complement sum of the outer IPv4 header with total length and
    /// checksum zero, folded to 16 bits; the data plane adds the length,
    /// folds again and complements.
    pub outer_csum_partial: u16,
    pub flags: u8,
    /// 38 without a key, 42 with one.
    pub header_len: u8,
}
const _: () = assert!(core::mem::size_of::<Tunnel>() == 64);

/// Room for the outer header template: 14 + 20 + 8 = 42, padded to words.
pub const TUNNEL_HEADER_MAX: usize = 48;
/// Offsets inside the outer header template.
pub mod header {
    pub const ETH_DST: usize = 0;
    pub const ETH_SRC: usize = 6;
    pub const IP: usize = 14;
    pub const IP_TOT_LEN: usize = 16;
    pub const IP_TTL: usize = 22;
    pub const IP_CHECK: usize = 24;
    pub const IP_SRC: usize = 26;
    pub const IP_DST: usize = 30;
    pub const GRE: usize = 34;
    pub const GRE_PROTO: usize = 36;
    pub const GRE_KEY: usize = 38;
}

impl Tunnel {
    fn bytes<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut b = [0u8; N];
        b.copy_from_slice(&self.header[at..at + N]);
        b
    }
    /// Outer source address.
    pub fn local(&self) -> [u8; 4] {
        self.bytes(header::IP_SRC)
    }
    /// Outer destination address.
    pub fn remote(&self) -> [u8; 4] {
        self.bytes(header::IP_DST)
    }
    /// GRE key, when the tunnel has one.
    pub fn key(&self) -> Option<u32> {
        (self.flags & TUNNEL_HAS_KEY != 0).then(|| u32::from_be_bytes(self.bytes(header::GRE_KEY)))
    }
    pub fn ttl(&self) -> u8 {
        self.header[header::IP_TTL]
    }
    /// Next hop MAC (destination).
    pub fn dmac(&self) -> [u8; 6] {
        self.bytes(header::ETH_DST)
    }
    /// Egress interface MAC (source).
    pub fn smac(&self) -> [u8; 6] {
        self.bytes(header::ETH_SRC)
    }
}

/// Key of the decapsulation table: which GRE packets are ours.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DecapKey {
    /// Outer destination (our endpoint), network order.
    pub local: [u8; 4],
    /// Outer source (customer router), network order.
    pub remote: [u8; 4],
    /// GRE key, network order; zero when `has_key` is zero.
    pub key: [u8; 4],
    pub has_key: u32,
}
const _: () = assert!(core::mem::size_of::<DecapKey>() == 16);

/// Value of the decapsulation table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecapValue {
    pub tunnel: u32,
    pub customer: u32,
}
const _: () = assert!(core::mem::size_of::<DecapValue>() == 8);

/// `LOCAL_ADDRS` value bit: GRE to this address is decapsulated.
pub const LOCAL_TUNNEL_ENDPOINT: u32 = 1;
/// `LOCAL_ADDRS` value bit: inner ICMP to this address is for the node.
pub const LOCAL_NODE_ADDRESS: u32 = 2;

/// A packet and byte counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

impl Counter {
    pub fn add(&mut self, other: &Counter) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
    }
}

/// Per-customer counters. `in_*`: internet -> customer. `out_*`: customer
/// -> internet (decapsulated return traffic). Bytes are frame bytes as received.
/// The data plane leaves `in_received` at zero: every such packet is
/// forwarded or dropped, and userspace reports the sum of the two.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CustomerStats {
    pub in_received: Counter,
    pub in_forwarded: Counter,
    pub in_dropped: Counter,
    pub out_received: Counter,
    pub out_forwarded: Counter,
    pub out_dropped: Counter,
}
const _: () = assert!(core::mem::size_of::<CustomerStats>() == 96);

/// Per-tunnel counters: packets encapsulated into it (`tx`, bytes after
/// encapsulation) and accepted from it (`rx`, bytes as received).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelStats {
    pub tx: Counter,
    pub rx: Counter,
}
const _: () = assert!(core::mem::size_of::<TunnelStats>() == 32);

/// TCP flag bits as in the header's flags byte.
pub mod tcp_flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    /// FIN, SYN, RST, PSH, ACK, URG.
    pub const SIX: u8 = 0x3f;
}

/// The words of the one value of the `ACTIVE` array: what the data plane
/// uses now, read with one lookup per packet. Userspace maps the array
/// into its memory and changes each word with one store.
pub mod active {
    /// The live multibit destination buffer of IPv4 and of IPv6 (0 or 1),
    /// or `DIR_NONE`: use the LPM tables.
    pub const DIR4: u32 = 0;
    pub const DIR6: u32 = 1;
    /// The built-in protections in force (`protect` bits).
    pub const PROTECTIONS: u32 = 2;
    /// The live copy of the rule sets (0 or 1), or `CLS_NONE`.
    pub const RULES: u32 = 3;
    pub const WORDS: u32 = 4;
}

/// Built-in protections, bits of the `ACTIVE` array's protections word
/// (applied to traffic for protected prefixes, before routing).
pub mod protect {
    /// Drop TCP with SYN+FIN, SYN+RST, no flags, or all six flags set.
    pub const INVALID_TCP_FLAGS: u32 = 1;
    /// Drop packets whose source address equals their destination.
    pub const LAND: u32 = 2;
    /// Drop TCP and UDP with source or destination port 0.
    pub const ZERO_PORTS: u32 = 4;
    /// Drop UDP from a reflector source port (`REFLECT_PORTS`) unless an
    /// operator pass rule or the customer's firewall allowed it.
    pub const REFLECTION: u32 = 8;
    pub const ALL: u32 = INVALID_TCP_FLAGS | LAND | ZERO_PORTS | REFLECTION;

    /// Source ports of the well-known UDP reflection and amplification
    /// vectors: chargen, DNS, NTP, NetBIOS, SNMP, CLDAP, SSDP, WS-Discovery,
    /// memcached, and others commonly abused.
    pub const REFLECTOR_PORTS: [u16; 17] = [
        17, 19, 53, 69, 111, 123, 137, 161, 389, 1900, 3283, 3702, 5353, 5683, 10001, 11211, 37810,
    ];
    /// 64-bit words of the `REFLECT_PORTS` bitmap (one bit per port).
    pub const PORT_WORDS: u32 = 65_536 / 64;

    use crate::tcp_flag::*;

    /// Whether a TCP flags byte is an impossible combination.
    pub const fn invalid_tcp_flags(flags: u8) -> bool {
        let f = flags & SIX;
        f == 0 || f == SIX || f & (SYN | FIN) == (SYN | FIN) || f & (SYN | RST) == (SYN | RST)
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type below is #[repr(C)], made only of integers and byte
    // arrays, with no implicit padding (sizes are pinned above), so any bit
    // pattern is a valid value.
    unsafe impl aya::Pod for super::DestValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EcmpTable {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Tunnel {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DecapKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DecapValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Counter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CustomerStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TunnelStats {}
}
