//! Rule sets in the data plane: the operator's mitigation rules (set 0)
//! and each customer's firewall (sets 1..), each compiled to per-field
//! interval tables and term bitmaps (see moat-dataplane's classify.rs).
//! Every set lives in shared pools (slot descriptors, intervals, bitmaps,
//! terms), all held twice: userspace fills the idle copy and flips
//! the rules word of `ACTIVE` with one store, so a packet sees the old
//! sets or the new.

/// Terms (bits) one rule set may hold.
pub const CLS_TERMS: usize = 1024;
/// 64-bit words of a term bitmap.
pub const CLS_WORDS: usize = CLS_TERMS / 64;
/// Value slots: one per field, plus the IPv6 halves of the two address fields.
pub const CLS_SLOTS: u32 = 24;
/// Intervals one slot of one set may hold.
pub const CLS_SLOT_KEYS: u32 = 4096;
/// Rule sets per copy: the operator's, then one per customer firewall.
pub const CLS_SETS: u32 = 4096;
/// Pool sizes per copy.
pub const CLS_SLOT_POOL: u32 = 16_384;
pub const CLS_KEY_POOL: u32 = 65_536;
pub const CLS_BITMAP_POOL: u32 = 16_384;
pub const CLS_TERM_POOL: u32 = 65_536;
/// Direct tables per copy: a field of at most 16 bits whose slot holds
/// more than [`CLS_DIRECT_MIN_KEYS`] intervals gets one while they last,
/// mapping every value straight to its interval (no search).
pub const CLS_DIRECT_TABLES: u32 = 16;
pub const CLS_DIRECT_MIN_KEYS: u32 = 8;
/// Values a direct table covers, and its u64 words (four u16 interval
/// indexes each, the lowest value in the low bits).
pub const CLS_DIRECT_VALUES: u32 = 65_536;
pub const CLS_DIRECT_WORDS: u32 = CLS_DIRECT_VALUES / 4;
/// Search-tree nodes per copy (see [`ClsNode`]): a slot of a field of at
/// most 32 bits without a direct table or a trie gets a tree while they
/// last; the others are searched step by step, so running out costs time
/// only.
pub const CLS_NODE_POOL: u32 = 16_384;
/// Keys of a search-tree node.
pub const CLS_NODE_KEYS: u32 = 16;
/// Levels of a search tree: enough for a slot's most intervals.
pub const CLS_NODE_LEVELS: u32 = 3;
const _: () = assert!(CLS_NODE_KEYS.pow(CLS_NODE_LEVELS) >= CLS_SLOT_KEYS);
/// The start of a node's unused keys: above every value a tree slot holds
/// (fields of at most 32 bits), so that no search moves onto one.
pub const CLS_NODE_END: u64 = i64::MAX as u64;
/// Tries per copy (see [`CLS_TRIE_CHILD`]): an IPv4 address slot of more
/// than [`CLS_NEAR`] intervals gets one while roots and nodes last; the
/// others get a search tree. A trie finds a value's interval in one to
/// three dependent loads, where a tree of three levels takes twelve
/// search steps.
pub const CLS_TRIE_ROOTS: u32 = 8;
/// Entries of a trie's root (one per value of an address's first 16
/// bits) and of one of its nodes (one per value of the next byte).
pub const CLS_TRIE_ROOT: u32 = 65_536;
pub const CLS_TRIE_NODE: u32 = 256;
/// Nodes per copy, shared by its tries.
pub const CLS_TRIE_NODES: u32 = 2048;
/// Words of one copy of the trie map: its roots, then its nodes.
pub const CLS_TRIE_WORDS: u32 = CLS_TRIE_ROOTS * CLS_TRIE_ROOT + CLS_TRIE_NODES * CLS_TRIE_NODE;
/// A trie entry with this bit set leads to the node whose number (in the
/// copy's nodes) is in the bits below it; without it, the entry is the
/// bitmap of the interval holding every value under the entry, as
/// `summary << 32 | bitmap id`. The root's entry for a value is read by
/// its first 16 bits, a node's by the next byte: an IPv4 address takes at
/// most three reads.
pub const CLS_TRIE_CHILD: u64 = 1 << 31;
const _: () = assert!(CLS_TRIE_NODES.is_power_of_two() && (CLS_BITMAP_POOL as u64) < CLS_TRIE_CHILD);
/// Rules (each with its counter and rate-limit bucket) per copy.
pub const CLS_RULE_POOL: u32 = 16_384;
/// Per-address rate-limit buckets (LRU: a flood of spoofed sources evicts
/// old buckets instead of exhausting memory).
pub const RL_ADDR_ENTRIES: u32 = 131_072;
/// The rules word of `ACTIVE` when no rule set is in force.
pub const CLS_NONE: u32 = 2;
/// The operator's mitigation rules.
pub const SET_MITIGATION: u32 = 0;
/// `CUSTOMER_FW` for a customer without firewall rules.
pub const SET_NONE: u32 = 0;

/// A term bitmap's summary, kept beside every reference to the bitmap
/// in a set of more than [`CLS_EXACT_TERMS`] terms (see [`set_summary`]):
/// bit `k` is set when any of terms `[32k, 32k + 32)` is. The data plane
/// ANDs the summaries of a packet's bitmaps first and reads only the
/// bitmap words whose summary bit survives, lowest first.
pub const fn summary(b: &[u64; CLS_WORDS]) -> u32 {
    let mut s = 0u32;
    let mut k = 0;
    while k < 32 {
        let half = (b[k / 2] >> (32 * (k % 2))) as u32;
        if half != 0 {
            s |= 1 << k;
        }
        k += 1;
    }
    s
}
const _: () = assert!(CLS_WORDS * 2 == 32);

/// The lowest set bit of a non-zero word `x`, as the data plane finds it
/// without a branch (the verifier would follow each outcome of a branch
/// apart) or a bit-counting instruction (BPF has none): `x`'s lowest bit
/// alone, times [`DE_BRUIJN`], leaves in its top 6 bits a number unique to
/// that bit, which [`LOWEST_BIT`] maps back to the bit.
pub const fn lowest_bit(x: u64) -> u32 {
    LOWEST_BIT[lowest_bit_key(x)] as u32
}

/// [`lowest_bit`]'s index into [`LOWEST_BIT`].
pub const fn lowest_bit_key(x: u64) -> usize {
    ((x & x.wrapping_neg()).wrapping_mul(DE_BRUIJN) >> 58) as usize
}

/// A de Bruijn sequence of order 6: its 64 windows of 6 bits, read from
/// the top with zeros shifted in below, are 64 different numbers.
pub const DE_BRUIJN: u64 = 0x03f7_9d71_b4cb_0a89;

/// [`lowest_bit`]'s table: for each number, the bit whose product with
/// [`DE_BRUIJN`] has it in its top 6 bits.
pub const LOWEST_BIT: [u8; 64] = {
    let mut t = [0u8; 64];
    let mut bit = 0;
    while bit < 64 {
        t[lowest_bit_key(1 << bit)] = bit as u8;
        bit += 1;
    }
    t
};

/// Sets of at most this many terms keep exact summaries (see
/// [`set_summary`]): ANDed, the summaries alone name the terms a packet
/// matches, and the data plane reads no bitmap at all.
pub const CLS_EXACT_TERMS: u32 = 32;

/// The summary kept beside every reference to bitmap `b` of a set of
/// `nterms` terms: for a set of at most [`CLS_EXACT_TERMS`] terms, the
/// bitmap's first 32 bits themselves (bit `k` set when term `k` is);
/// for a larger set, its [`summary`].
pub const fn set_summary(nterms: u32, b: &[u64; CLS_WORDS]) -> u32 {
    if nterms <= CLS_EXACT_TERMS {
        b[0] as u32
    } else {
        summary(b)
    }
}

/// One rule set of one copy: its slot descriptors, the bitmap of all its
/// terms and its terms, as indexes into the copy's pools.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClsSet {
    /// Its slot descriptors, from `slot_base`: the IPv4 address slots,
    /// then the other fields' slots, then the IPv6 address slots. An IPv4
    /// packet visits `[0, v4_end)`, an IPv6 packet `[v6_start, nslots)`.
    pub slot_base: u32,
    pub nslots: u32,
    pub v4_end: u32,
    pub v6_start: u32,
    pub all: u32,
    pub term_base: u32,
    /// 0: the set is empty (nothing to classify). It also says which
    /// summaries the set keeps (see [`set_summary`]).
    pub nterms: u32,
    /// [`set_summary`] of the bitmap `all`.
    pub all_summary: u32,
}
const _: () = assert!(core::mem::size_of::<ClsSet>() == 32);

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

/// A value slot some term of a set constrains: which one, its intervals
/// (`len` from `key_base` in the key pool, sorted), the bitmap for
/// packets lacking the field and its direct table (`1 +` its index in the
/// copy's `CLS_DIRECT` tables; 0: none, the intervals are searched).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClsSlot {
    pub slot: u32,
    pub len: u32,
    pub absent: u32,
    pub key_base: u32,
    pub direct: u32,
    /// [`set_summary`] of the bitmap `absent`.
    pub absent_summary: u32,
    /// The first interval's bitmap and its summary (what a search that
    /// moves past no interval finds).
    pub first: u32,
    pub first_summary: u32,
    /// Its search tree: `1 +` the index of its root in the copy's node
    /// pool (0: none), and its number of levels.
    pub tree: u32,
    pub levels: u32,
    /// A slot of at most [`CLS_NEAR`] intervals of a field of at most 32
    /// bits holds them here (`near`: 1, else 0), so that finding the
    /// packet's takes no further map read: their starts (the first is 0;
    /// unused ones [`CLS_NODE_END`]), bitmaps and summaries. The data plane
    /// counts the starts at or before the value without a branch.
    pub near: u32,
    /// Its trie: `1 +` the number of its root in the copy's tries (0:
    /// none; see [`CLS_TRIE_CHILD`]).
    pub trie: u32,
    pub near_start: [u64; CLS_NEAR],
    pub near_bitmap: [u32; CLS_NEAR],
    pub near_summary: [u32; CLS_NEAR],
}
const _: () = assert!(core::mem::size_of::<ClsSlot>() == 112);

/// The most intervals a slot descriptor holds itself (see [`ClsSlot`]).
pub const CLS_NEAR: usize = 4;

/// A node of a slot's search tree, a static 16-ary tree over the slot's
/// intervals (a field of at most 32 bits, never an IPv6 address half:
/// every start and value is below [`CLS_NODE_END`]). Its nodes are numbered level by level from the
/// root (0); key `i` of node `j` leads to node `16 * j + 1 + i` of the
/// next level. A leaf (the last level) holds 16 intervals: their starts,
/// bitmaps and summaries, in order. An inner node holds the start of the
/// first interval under each child. Unused keys start at
/// [`CLS_NODE_END`]. Per level, the data plane reads one node and finds
/// in 4 steps the last key starting at or before the value: the key to
/// follow, or in a leaf the interval holding the value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClsNode {
    pub start: [u64; CLS_NODE_KEYS as usize],
    pub bitmap: [u32; CLS_NODE_KEYS as usize],
    pub summary: [u32; CLS_NODE_KEYS as usize],
}
const _: () = assert!(core::mem::size_of::<ClsNode>() == 256);

impl Default for ClsNode {
    fn default() -> ClsNode {
        ClsNode {
            start: [CLS_NODE_END; CLS_NODE_KEYS as usize],
            bitmap: [0; CLS_NODE_KEYS as usize],
            summary: [0; CLS_NODE_KEYS as usize],
        }
    }
}

/// The levels of the search tree over `len` intervals (at least one).
pub const fn tree_levels(len: u32) -> u32 {
    let mut levels = 1;
    let mut reach = CLS_NODE_KEYS;
    while reach < len {
        reach *= CLS_NODE_KEYS;
        levels += 1;
    }
    levels
}

/// The number of the first node of `level` (0: the root's).
pub const fn tree_level_first(level: u32) -> u32 {
    let mut first = 0;
    let mut width = 1;
    let mut l = 0;
    while l < level {
        first += width;
        width *= CLS_NODE_KEYS;
        l += 1;
    }
    first
}

/// An interval's start (a 128-bit value as two halves; integers and IPv4
/// addresses in `lo`) and its bitmap (an index into the bitmap pool, and
/// the bitmap's [`set_summary`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClsKey {
    pub hi: u64,
    pub lo: u64,
    pub bitmap: u32,
    pub summary: u32,
}
const _: () = assert!(core::mem::size_of::<ClsKey>() == 24);

/// A matching term's rule: its counter (an index into `RULE_STATS`, whose
/// copy-sized halves follow the live copy), its action and, for rate
/// limits, the bucket's parameters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClsTerm {
    pub stat: u32,
    pub action: u32,
    /// Nanoseconds of credit one packet takes (1e9 / pps).
    pub interval_ns: u64,
    /// How far ahead of now the bucket may run (the burst, in nanoseconds).
    pub burst_ns: u64,
    /// `RL_PER_*`.
    pub per: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ClsTerm>() == 32);

/// Block (firewall) or drop (mitigation).
pub const CLS_DROP: u32 = 1;
/// Allow (firewall) or pass (mitigation): no later rule of the set applies.
pub const CLS_PASS: u32 = 2;
/// Mitigation: pass while the rule's token bucket has credit.
pub const CLS_RATE_LIMIT: u32 = 3;

/// One bucket for all the rule's packets.
pub const RL_PER_RULE: u32 = 0;
/// One bucket per destination address.
pub const RL_PER_DST: u32 = 1;
/// One bucket per source address.
pub const RL_PER_SRC: u32 = 2;

/// A per-address bucket: the rule's counter index (hence copy) and the
/// address (IPv4 in the first word).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RlKey {
    pub stat: u32,
    pub addr: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<RlKey>() == 20);

/// A fragmented datagram: source, destination (IPv4 in the first word,
/// network order), IPv4 identification or IPv6 fragment identification,
/// and protocol (the fragment header's next header for IPv6).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub id: u32,
    pub proto: u32,
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);

/// Datagrams whose first fragment a rule set or the reflection protection
/// dropped (LRU: a flood of them evicts the oldest). Their later fragments
/// are dropped under the same reason.
pub const FRAG_DROPS_ENTRIES: u32 = 65_536;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], integers only, no implicit padding (sizes pinned
    // above): any bit pattern is a valid value.
    unsafe impl aya::Pod for super::ClsSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ClsKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ClsNode {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ClsSet {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ClsTerm {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RlKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FragKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_bit_is_the_index_of_the_lowest_set_bit() {
        // Every key is taken once, so the table names every bit.
        let mut keys: Vec<usize> = (0..64).map(|b| lowest_bit_key(1 << b)).collect();
        keys.sort_unstable();
        assert_eq!(keys, (0..64).collect::<Vec<_>>());
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for bit in 0..64 {
            assert_eq!(lowest_bit(1 << bit), bit);
            assert_eq!(lowest_bit(u64::MAX << bit), bit);
            // Words with the same lowest bit and anything above it.
            for _ in 0..1000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let w = (x | 1) << bit;
                assert_eq!(lowest_bit(w), w.trailing_zeros(), "{w:#x}");
            }
        }
    }

    #[test]
    fn summary_marks_each_32_term_span_holding_a_term() {
        let mut b = [0u64; CLS_WORDS];
        assert_eq!(summary(&b), 0);
        for term in [0usize, 31, 32, 63, 64, 500, 1023] {
            let mut one = [0u64; CLS_WORDS];
            one[term / 64] |= 1 << (term % 64);
            assert_eq!(summary(&one), 1 << (term / 32), "term {term}");
            b[term / 64] |= 1 << (term % 64);
        }
        assert_eq!(summary(&b), 1 | 1 << 1 | 1 << 2 | 1 << 15 | 1 << 31);
        assert_eq!(summary(&[u64::MAX; CLS_WORDS]), u32::MAX);
    }

    #[test]
    fn small_sets_keep_their_terms_in_the_summary_and_larger_ones_spans() {
        let mut b = [0u64; CLS_WORDS];
        for term in [0usize, 5, 31, 40, 700] {
            b[term / 64] |= 1 << (term % 64);
        }
        // Terms past the set's size never appear in its bitmaps: only the
        // first 32 bits count.
        assert_eq!(set_summary(1, &b), 1 | 1 << 5 | 1 << 31);
        assert_eq!(set_summary(CLS_EXACT_TERMS, &b), 1 | 1 << 5 | 1 << 31);
        assert_eq!(set_summary(CLS_EXACT_TERMS + 1, &b), summary(&b));
        assert_eq!(summary(&b), 1 | 1 << 1 | 1 << 21);
        assert_eq!(set_summary(7, &[0; CLS_WORDS]), 0);
    }
}
