//! Capacities of the data plane's tables. Userspace validation rejects
//! configurations beyond them before anything is written to the kernel.

/// Customers (index into the per-customer counters).
pub const MAX_CUSTOMERS: u32 = 16_384;
/// Tunnels across all customers. Tunnel ids are `u16` in ECMP tables.
pub const MAX_TUNNELS: u32 = 32_768;
/// Entries of each destination LPM table (protected prefixes plus routes).
pub const MAX_DEST_ENTRIES: u32 = 2_097_152;
/// Entries of each source (anti-spoofing) LPM table.
pub const MAX_SOURCE_ENTRIES: u32 = 1_048_576;
/// Route sets (one per distinct customer route prefix).
pub const MAX_ROUTE_SETS: u32 = 262_144;
/// ECMP slot tables, used only by route sets with more than one member.
/// Twice the number a configuration may use, so that a new table can be
/// written beside the one in use before the route set is switched to it.
pub const MAX_ECMP_TABLES: u32 = 4_096;
/// ECMP tables a configuration may use at once.
pub const MAX_ECMP_SETS: u32 = MAX_ECMP_TABLES / 2;
/// Slots of one ECMP table (a power of two).
pub const ECMP_SLOTS: usize = 4_096;
/// Local addresses (tunnel endpoints and node addresses).
pub const MAX_LOCAL_ADDRS: u32 = 4_096;
/// Distinct (local, remote, key) tunnel identities accepted on decapsulation.
pub const MAX_DECAP_ENTRIES: u32 = MAX_TUNNELS;

/// Destination prefilter: one bit per block of the top `FILTER_BITS`
/// address bits (an IPv4 /24); a clear bit means "not protected".
pub const FILTER_BITS: u32 = 24;
/// 64-bit words of each prefilter array.
pub const FILTER_WORDS: u32 = 1 << (FILTER_BITS - 6);
/// Block lengths of the exact-match block tables (IPv4 /24, IPv6 /48).
pub const BLOCK4_LEN: u32 = 24;
pub const BLOCK6_LEN: u32 = 48;
/// Entries of each block table.
pub const MAX_BLOCKS: u32 = 1 << 20;
/// A prefix shorter than a block is expanded into the block table only if
/// it covers at most this many blocks (longer ones are served by the LPM table).
pub const BLOCK_EXPAND_MAX: u32 = 256;

/// Route set value meaning "no route covers this address".
pub const NO_ROUTE_SET: u32 = u32::MAX;
