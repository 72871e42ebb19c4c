//! The data plane's maps. Layouts come from moat-common; names are the
//! ones userspace opens.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use moat_common::rules::{
    ClsKey, ClsNode, ClsSet, ClsSlot, ClsTerm, FragKey, RlKey, CLS_BITMAP_POOL, CLS_DIRECT_TABLES, CLS_DIRECT_WORDS,
    CLS_KEY_POOL, CLS_NODE_POOL, CLS_RULE_POOL, CLS_SETS, CLS_SLOT_POOL, CLS_TERM_POOL, CLS_TRIE_WORDS, CLS_WORDS,
    FRAG_DROPS_ENTRIES, RL_ADDR_ENTRIES,
};
use moat_common::{
    limits::*, Counter, CustomerStats, DecapKey, DecapValue, DestValue, EcmpTable, Reason, SourceKey4, SourceKey6,
    Tunnel, TunnelStats,
};

/// LPM keys built with word alignment (aya's `Key` is packed, which makes
/// the compiler build it byte by byte); the layouts equal `Key<[u8; N]>`.
#[repr(C)]
pub struct Key4 {
    pub prefix_len: u32,
    pub addr: u32,
}
#[repr(C)]
pub struct Key6 {
    pub prefix_len: u32,
    pub addr: [u32; 4],
}
#[repr(C)]
pub struct SourceKey4W {
    pub prefix_len: u32,
    pub customer: u32,
    pub addr: u32,
}
#[repr(C)]
pub struct SourceKey6W {
    pub prefix_len: u32,
    pub customer: u32,
    pub addr: [u32; 4],
}

/// Reinterprets an aligned key as aya's packed key of the same layout.
#[inline(always)]
pub fn as_key<W, K>(w: &W) -> &aya_ebpf::maps::lpm_trie::Key<K> {
    const { assert!(core::mem::size_of::<W>() == core::mem::size_of::<aya_ebpf::maps::lpm_trie::Key<K>>()) };
    // SAFETY: same size (checked above), both plain bytes, and the packed
    // target has alignment 1.
    unsafe { &*(w as *const W as *const aya_ebpf::maps::lpm_trie::Key<K>) }
}

/// Multibit destination tables, two buffers each (root: buffer * DIR_ROOT +
/// top 16 bits; nodes: (buffer * DIR_NODES + node) * DIR_NODE + byte).
/// Memory-mapped by userspace, which fills the idle buffer and flips
/// the family's word of ACTIVE with one store.
#[map]
pub static DIR4_ROOT: Array<u64> = Array::with_max_entries(2 * DIR_ROOT, BPF_F_MMAPABLE);
#[map]
pub static DIR4_NODES: Array<u64> = Array::with_max_entries(2 * DIR_NODES * DIR_NODE, BPF_F_MMAPABLE);
#[map]
pub static DIR6_ROOT: Array<u64> = Array::with_max_entries(2 * DIR_ROOT, BPF_F_MMAPABLE);
#[map]
pub static DIR6_NODES: Array<u64> = Array::with_max_entries(2 * DIR_NODES * DIR_NODE, BPF_F_MMAPABLE);
/// What is in force (`moat_common::active` words): the live destination
/// buffer per family, the built-in protections, the live copy of the rule
/// sets. Memory-mapped by userspace, which changes each word with one store.
#[map]
pub static ACTIVE: Array<[u64; moat_common::active::WORDS as usize]> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Protected prefixes and customer routes, flattened: longest match gives
/// the customer and the route set.
#[map]
pub static DEST4: LpmTrie<[u8; 4], DestValue> = LpmTrie::with_max_entries(MAX_DEST_ENTRIES, 0);
#[map]
pub static DEST6: LpmTrie<[u8; 16], DestValue> = LpmTrie::with_max_entries(MAX_DEST_ENTRIES, 0);

/// Sources a customer may send from (prefixes + egress prefixes), keyed by customer.
#[map]
pub static SOURCE4: LpmTrie<SourceKey4, u32> = LpmTrie::with_max_entries(MAX_SOURCE_ENTRIES, 0);
#[map]
pub static SOURCE6: LpmTrie<SourceKey6, u32> = LpmTrie::with_max_entries(MAX_SOURCE_ENTRIES, 0);

/// Route set id -> tunnel id, or ECMP table index with ROUTE_SET_TABLE.
#[map]
pub static ROUTE_SETS: Array<u32> = Array::with_max_entries(MAX_ROUTE_SETS, 0);
#[map]
pub static ECMP_TABLES: Array<EcmpTable> = Array::with_max_entries(MAX_ECMP_TABLES, 0);
/// Two slots per tunnel id (2 * id + live slot).
#[map]
pub static TUNNELS: Array<Tunnel> = Array::with_max_entries(2 * MAX_TUNNELS, 0);
/// Live slot (0 or 1) of each tunnel id.
#[map]
pub static TUNNEL_SLOT: Array<u32> = Array::with_max_entries(MAX_TUNNELS, 0);
#[map]
pub static DECAP: HashMap<DecapKey, DecapValue> = HashMap::with_max_entries(MAX_DECAP_ENTRIES, 0);
/// Local IPv4 addresses (network-order word): tunnel endpoints and node
/// addresses (value: flag bits).
#[map]
pub static LOCAL_ADDRS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_LOCAL_ADDRS, 0);

#[map]
pub static REASON_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Reason::COUNT, 0);
#[map]
pub static CUSTOMER_STATS: PerCpuArray<CustomerStats> = PerCpuArray::with_max_entries(MAX_CUSTOMERS, 0);
#[map]
pub static TUNNEL_STATS: PerCpuArray<TunnelStats> = PerCpuArray::with_max_entries(MAX_TUNNELS, 0);

// Rule sets (moat_common::rules): two copies of every pool, one live.
#[map]
pub static CLS_SET: Array<ClsSet> = Array::with_max_entries(2 * CLS_SETS, 0);
#[map]
pub static CLS_SLOT: Array<ClsSlot> = Array::with_max_entries(2 * CLS_SLOT_POOL, 0);
#[map]
pub static CLS_KEY: Array<ClsKey> = Array::with_max_entries(2 * CLS_KEY_POOL, 0);
/// Search trees over the intervals of the slots of at most 32 bits.
#[map]
pub static CLS_NODE: Array<ClsNode> = Array::with_max_entries(2 * CLS_NODE_POOL, 0);
/// Direct tables (value -> interval index, four per word), per copy;
/// mapped by userspace, which fills the idle copy's tables in place.
#[map]
pub static CLS_DIRECT: Array<u64> = Array::with_max_entries(2 * CLS_DIRECT_TABLES * CLS_DIRECT_WORDS, BPF_F_MMAPABLE);
/// Tries of IPv4 address slots (see moat_common::rules::CLS_TRIE_CHILD),
/// per copy; mapped by userspace, which fills the idle copy in place.
#[map]
pub static CLS_TRIE: Array<u64> = Array::with_max_entries(2 * CLS_TRIE_WORDS, BPF_F_MMAPABLE);
#[map]
pub static CLS_BITMAP: Array<[u64; CLS_WORDS]> = Array::with_max_entries(2 * CLS_BITMAP_POOL, 0);
#[map]
pub static CLS_TERM: Array<ClsTerm> = Array::with_max_entries(2 * CLS_TERM_POOL, 0);
/// A digest of the rule sets each copy holds (written by userspace, which
/// compares it on adoption and verification; the program never reads it).
#[map]
pub static CLS_DIGEST: Array<u64> = Array::with_max_entries(2, 0);
/// Customer id -> its firewall's set, per copy (`SET_NONE`: no firewall).
#[map]
pub static CUSTOMER_FW: Array<u32> = Array::with_max_entries(2 * MAX_CUSTOMERS, 0);
/// Matches per rule (packets and bytes), per copy.
#[map]
pub static RULE_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(2 * CLS_RULE_POOL, 0);
/// Token buckets of rules limited as a whole: the time the bucket's credit
/// runs to (ns, `bpf_ktime_get_ns`), per rule counter index.
#[map]
pub static RL_RULE: Array<u64> = Array::with_max_entries(2 * CLS_RULE_POOL, 0);
/// Token buckets per destination or source address.
#[map]
pub static RL_ADDR: LruHashMap<RlKey, u64> = LruHashMap::with_max_entries(RL_ADDR_ENTRIES, 0);
/// Fragmented datagrams whose first fragment the rules or the reflection
/// protection dropped -> that reason (see `rules::FragDrop`).
#[map]
pub static FRAG_DROPS: LruHashMap<FragKey, u32> = LruHashMap::with_max_entries(FRAG_DROPS_ENTRIES, 0);
/// Reflector source ports (one bit per port) for the reflection protection.
#[map]
pub static REFLECT_PORTS: Array<u64> = Array::with_max_entries(moat_common::protect::PORT_WORDS, 0);
/// Per-CPU room for the classifier: its running bitmap and the packet's
/// value per slot (too large for the stack).
#[map]
pub static CLS_SCRATCH: PerCpuArray<crate::rules::Scratch> = PerCpuArray::with_max_entries(1, 0);
