//! Capacities of the data plane's tables. Userspace validation rejects
//! configurations beyond them before anything is written to the kernel.

/// Customer ids (index into the per-customer counters). A configuration
/// may use half: new customers take ids the running one does not use.
pub const MAX_CUSTOMERS: u32 = 32_768;
/// Tunnel ids across all customers (`u16` in ECMP tables); a configuration
/// may use half.
pub const MAX_TUNNELS: u32 = 65_536;
/// Entries of each destination LPM table (protected prefixes plus routes).
pub const MAX_DEST_ENTRIES: u32 = 2_097_152;
/// Entries of each source (anti-spoofing) LPM table.
pub const MAX_SOURCE_ENTRIES: u32 = 1_048_576;
/// Route set ids (one per distinct customer route prefix); a configuration
/// may use half.
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

/// Multibit destination table: a root of 2^16 entries (top 16 address
/// bits) and nodes of 256 entries (one per following address byte).
pub const DIR_ROOT: u32 = 1 << 16;
pub const DIR_NODE: u32 = 256;
/// Nodes per buffer and family (each buffer holds one complete table).
pub const DIR_NODES: u32 = 4096;
/// Deepest node level: IPv4 needs 2 (bytes 3 and 4), IPv6 14.
pub const DIR_LEVELS4: usize = 2;
pub const DIR_LEVELS6: usize = 14;
/// The `ACTIVE` destination-buffer word meaning "no table: use the LPM tables".
pub const DIR_NONE: u32 = 2;

/// Route set value meaning "no route covers this address".
pub const NO_ROUTE_SET: u32 = u32::MAX;
