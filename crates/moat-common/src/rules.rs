//! Operator mitigation rules in the data plane: a rule set compiled to
//! per-field interval tables and term bitmaps (see moat-dataplane's
//! classify.rs), held twice: userspace fills the idle copy and flips
//! `CLS_ACTIVE` with one store, so a packet sees the old set or the new.

/// Terms (bits) a rule set may hold.
pub const CLS_TERMS: usize = 1024;
/// 64-bit words of a term bitmap.
pub const CLS_WORDS: usize = CLS_TERMS / 64;
/// Lookup slots: one per field, plus the IPv6 halves of the two address fields.
pub const CLS_SLOTS: u32 = 24;
/// Intervals one slot may hold.
pub const CLS_SLOT_KEYS: u32 = 2048;
/// Distinct bitmaps per copy.
pub const CLS_BITMAPS: u32 = 4096;
/// `CLS_ACTIVE` when no rule is in force.
pub const CLS_NONE: u32 = 2;

/// Slot numbers: the fields of the expression language, then IPv6.
pub mod slot {
    pub const IP_SRC: u32 = 0;
    pub const IP_DST: u32 = 1;
    pub const IP_PROTO: u32 = 2;
    pub const IP_TTL: u32 = 3;
    pub const IP_LEN: u32 = 4;
    pub const IP_FRAG: u32 = 5;
    pub const IP_VERSION: u32 = 6;
    pub const TCP_SRCPORT: u32 = 7;
    pub const TCP_DSTPORT: u32 = 8;
    pub const TCP_FLAGS: u32 = 9;
    pub const TCP_FLAG_SYN: u32 = 10;
    pub const TCP_FLAG_ACK: u32 = 11;
    pub const TCP_FLAG_RST: u32 = 12;
    pub const TCP_FLAG_FIN: u32 = 13;
    pub const TCP_FLAG_PSH: u32 = 14;
    pub const TCP_FLAG_URG: u32 = 15;
    pub const UDP_SRCPORT: u32 = 16;
    pub const UDP_DSTPORT: u32 = 17;
    pub const ICMP_TYPE: u32 = 18;
    pub const ICMP_CODE: u32 = 19;
    /// IPv6 sources and destinations.
    pub const IP_SRC6: u32 = 20;
    pub const IP_DST6: u32 = 21;
}

/// A slot of one copy: how many intervals it holds (0: no term constrains
/// the field) and the bitmap for packets lacking the field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClsSlot {
    pub len: u32,
    pub absent: u32,
}
const _: () = assert!(core::mem::size_of::<ClsSlot>() == 8);

/// An interval's start (a 128-bit value as two halves; integers and IPv4
/// addresses in `lo`) and its bitmap. Slot `s` of copy `c` holds its
/// intervals, sorted, from index `(c * CLS_SLOTS + s) * CLS_SLOT_KEYS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClsKey {
    pub hi: u64,
    pub lo: u64,
    pub bitmap: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ClsKey>() == 24);

/// A term's rule and the rule's action: `rule | action << 16`.
pub const CLS_DROP: u32 = 1;
/// Matched: no later rule applies; the packet goes on.
pub const CLS_PASS: u32 = 2;
/// Matched a rate-limited rule (counted; not enforced yet).
pub const CLS_RATE_LIMIT: u32 = 3;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], integers only, no implicit padding (sizes pinned
    // above): any bit pattern is a valid value.
    unsafe impl aya::Pod for super::ClsSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ClsKey {}
}
