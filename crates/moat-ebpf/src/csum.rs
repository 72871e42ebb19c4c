//! Checksum arithmetic (RFC 1071 / RFC 1624).

/// Folds a 32-bit one's-complement sum to 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// New IPv4 header checksum after the TTL byte drops by one. The TTL is the
/// high byte of its 16-bit word, so the checksum gains 0x0100 with an
/// end-around carry; a result of 0xffff is written as 0x0000, which is what
/// a full recomputation (RFC 1624, eqn. 3) yields.
#[inline(always)]
pub fn ttl_decrement(check: u16) -> u16 {
    let c = check as u32 + 0x0100;
    (c + (c >= 0xffff) as u32) as u16
}
