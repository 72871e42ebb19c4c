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

/// Anti-spoofing LPM key data for IPv4: customer id (big endian) then address.
pub type SourceKey4 = [u8; 8];
/// Anti-spoofing LPM key data for IPv6: customer id (big endian) then address.
pub type SourceKey6 = [u8; 20];

/// A route set: the members of the best effective priority for one route prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RouteSet {
    /// 1: `tunnel` serves every flow. >1: `table` maps flow-hash slots to tunnels.
    pub members: u32,
    pub tunnel: u32,
    pub table: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<RouteSet>() == 16);

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

/// Everything the data plane needs to encapsulate into and transmit on a
/// tunnel, replaced as a whole so a packet never sees half an update.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tunnel {
    /// Outer source (network order).
    pub local: [u8; 4],
    /// Outer destination (network order).
    pub remote: [u8; 4],
    /// GRE key (network order), valid with [`TUNNEL_HAS_KEY`].
    pub key: [u8; 4],
    pub customer: u32,
    pub flags: u8,
    /// Outer TTL.
    pub ttl: u8,
    /// Largest inner packet (IP total length) the tunnel carries.
    pub mtu: u16,
    /// Largest outer IP packet the next hop's link carries.
    pub link_mtu: u16,
    /// One's-complement sum of the outer IPv4 header with total length and
    /// checksum zero, folded to 16 bits; the data plane adds the length,
    /// folds again and complements.
    pub outer_csum_partial: u16,
    pub ifindex: u32,
    /// Next hop's link (source) MAC.
    pub smac: [u8; 6],
    /// Next hop's MAC (destination).
    pub dmac: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<Tunnel>() == 40);

/// Key of the decapsulation table: which GRE packets are ours.
#[repr(C)]
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

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type below is #[repr(C)], made only of integers and byte
    // arrays, with no implicit padding (sizes are pinned above), so any bit
    // pattern is a valid value.
    unsafe impl aya::Pod for super::DestValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RouteSet {}
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
