//! The flow hash that spreads flows over the members of a route set.
//!
//! Specification (the data plane and any independent model must agree):
//! the input is a sequence of 32-bit words, each the little-endian reading
//! of four packet bytes: the source address (1 or 4 words), the destination
//! address (1 or 4 words), the IP protocol number as a word, and, for
//! unfragmented TCP and UDP only, one word made of the source port's and
//! destination port's bytes as they are on the wire. Each word is mixed in
//! with [`mix`] starting from [`SEED`]. The slot is `hash % ECMP_SLOTS`.

/// Starting value of the flow hash.
pub const SEED: u32 = 0x9e37_79b9;

/// Mixes one word into the hash (a multiply-xorshift finaliser step).
#[inline(always)]
pub const fn mix(h: u32, word: u32) -> u32 {
    let mut h = (h ^ word).wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_depends_on_every_bit_of_the_word() {
        let base = mix(SEED, 0);
        for bit in 0..32 {
            assert_ne!(mix(SEED, 1 << bit), base, "bit {bit} is lost");
        }
    }

    #[test]
    fn order_of_words_matters() {
        assert_ne!(mix(mix(SEED, 1), 2), mix(mix(SEED, 2), 1));
    }
}
