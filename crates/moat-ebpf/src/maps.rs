//! The data plane's maps. Layouts come from moat-common; names are the
//! ones userspace opens.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray},
};
use moat_common::{
    limits::*, Counter, CustomerStats, DecapKey, DecapValue, DestValue, EcmpTable, Reason,
    RouteSet, SourceKey4, SourceKey6, Tunnel, TunnelStats,
};

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

#[map]
pub static ROUTE_SETS: HashMap<u32, RouteSet> = HashMap::with_max_entries(MAX_ROUTE_SETS, 0);
#[map]
pub static ECMP_TABLES: Array<EcmpTable> = Array::with_max_entries(MAX_ECMP_TABLES, 0);
#[map]
pub static TUNNELS: HashMap<u32, Tunnel> = HashMap::with_max_entries(MAX_TUNNELS, 0);
#[map]
pub static DECAP: HashMap<DecapKey, DecapValue> = HashMap::with_max_entries(MAX_DECAP_ENTRIES, 0);
/// Local IPv4 addresses: tunnel endpoints and node addresses (value: flag bits).
#[map]
pub static LOCAL_ADDRS: HashMap<[u8; 4], u32> = HashMap::with_max_entries(MAX_LOCAL_ADDRS, 0);

#[map]
pub static REASON_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Reason::COUNT, 0);
#[map]
pub static CUSTOMER_STATS: PerCpuArray<CustomerStats> =
    PerCpuArray::with_max_entries(MAX_CUSTOMERS, 0);
#[map]
pub static TUNNEL_STATS: PerCpuArray<TunnelStats> = PerCpuArray::with_max_entries(MAX_TUNNELS, 0);
