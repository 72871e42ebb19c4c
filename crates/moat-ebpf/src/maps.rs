//! The data plane's maps. Layouts come from moat-common; names are the
//! ones userspace opens.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray},
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

/// Destination prefilters (one bit per top-24-bit block; memory-mapped by
/// userspace, which updates whole words atomically).
#[map]
pub static FILTER4: Array<u64> = Array::with_max_entries(FILTER_WORDS, BPF_F_MMAPABLE);
#[map]
pub static FILTER6: Array<u64> = Array::with_max_entries(FILTER_WORDS, BPF_F_MMAPABLE);

/// Blocks (IPv4 /24, IPv6 /48 as network-order bytes) that the destination
/// tables map uniformly, with their value: one exact-match lookup instead
/// of the LPM walk. Blocks absent here are looked up in DEST4 / DEST6.
#[map]
pub static BLOCK4: HashMap<u32, DestValue> = HashMap::with_max_entries(MAX_BLOCKS, BPF_F_NO_PREALLOC);
#[map]
pub static BLOCK6: HashMap<u64, DestValue> = HashMap::with_max_entries(MAX_BLOCKS, BPF_F_NO_PREALLOC);

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
