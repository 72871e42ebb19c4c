//! The flood generator's settings: the `moat_flood` XDP program rewrites a
//! template frame (Ethernet + IPv4 without options + TCP/UDP/ICMP) on each
//! run of a live-frames BPF_PROG_TEST_RUN and transmits it, so one system
//! call sends millions of varied packets. For tests and benchmarks only.

/// Offset of the IPv4 header in a template (no VLAN tag).
pub const FLOOD_L3: usize = 14;
/// Offset of the transport header (IPv4 without options).
pub const FLOOD_L4: usize = 34;

/// Randomize the transport source port (above 1023).
pub const FLOOD_RANDOM_SPORT: u32 = 1;
/// Randomize the transport destination port (above 1023).
pub const FLOOD_RANDOM_DPORT: u32 = 2;
/// The template is TCP: keep its checksum right (else UDP or ICMP, whose
/// checksum the template leaves 0 for UDP or does not depend on the
/// rewritten fields for ICMP).
pub const FLOOD_TCP: u32 = 4;
/// Bits 24-31 of `flags`: the IPv4 TTL every frame leaves with (0: as the
/// frame holds it). Frames come back from the receiver's page pool as the
/// receiver left them, TTL decremented by a forwarding program; the
/// generator restores it (and the checksum) every time.
pub const FLOOD_TTL_SHIFT: u32 = 24;

/// Write `macs` (destination, then source) over the frame's Ethernet
/// addresses every time: a forwarding receiver rewrites them in the
/// recycled page, and the next frame would be for another host.
pub const FLOOD_MACS: u32 = 8;

/// The one value of the `FLOOD` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodConfig {
    /// Bits of the IPv4 source (network order) replaced by random ones.
    pub src_mask: [u8; 4],
    /// `FLOOD_*` bits.
    pub flags: u32,
    /// Destination and source MAC addresses (with `FLOOD_MACS`).
    pub macs: [u8; 12],
    pub _pad: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<FloodConfig>() == 24);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], integers and byte arrays only, no implicit padding
    // (size pinned above): any bit pattern is a valid value.
    unsafe impl aya::Pod for super::FloodConfig {}
}
