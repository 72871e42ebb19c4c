//! Rule sets (operator mitigation rules, customer firewalls):
//! classification by per-field interval tables and term bitmaps
//! (moat_common::rules). Per packet and set: for every slot the set's
//! rules constrain, the interval holding the packet's value (from the
//! slot descriptor itself when it has at most 4 intervals; else one
//! lookup in its direct table, one to three in its trie (IPv4 addresses),
//! a walk down its search tree, or a binary search; or the "field
//! absent" bitmap), whose
//! bitmap's 32-bit summary is ANDed in; then (in a set of more than 32
//! terms, whose summaries mark 32-term spans, not terms) the bitmaps
//! themselves are ANDed one 32-term span at a time, over the spans the
//! summaries leave, lowest first; the lowest bit left is the first
//! matching term. The cost follows the fields the rules use, not how
//! many rules there are. Rate-limit rules keep token buckets (as
//! "theoretical arrival times") per rule or per address.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
    programs::XdpContext,
};
use moat_common::{limits::MAX_CUSTOMERS, rules::*, Reason};

use crate::{
    maps::{
        CLS_BITMAP, CLS_DIRECT, CLS_KEY, CLS_NODE, CLS_SCRATCH, CLS_SET, CLS_SLOT, CLS_TERM, CLS_TRIE, CUSTOMER_FW,
        FRAG_DROPS, RL_ADDR, RL_RULE,
    },
    parse::{self, Family, Packet},
};

/// Bitmaps one classification may select: one per slot (or the set's own).
const IDS: usize = 32;
const _: () = assert!(
    (CLS_SLOTS as usize) < IDS
        && CLS_BITMAP_POOL.is_power_of_two()
        && CLS_SLOT_KEYS.is_power_of_two()
        && CLS_NEAR.is_power_of_two()
);

/// [`find`]: the slot does not narrow the set for this packet.
const UNCONSTRAINED: u64 = u64::MAX;

/// The bitmap for the packet's value in the slot described by pool entry
/// `d` of copy `c`, as `summary << 32 | bitmap id`; [`UNCONSTRAINED`]
/// when the slot is not for this packet; 0 when no term can match (an
/// empty summary) or a table is out of bounds.
#[inline(always)]
fn find(f: &Fields, c: u32, d: u32, zero: u32) -> u64 {
    let Some(slot) = CLS_SLOT.get(c * CLS_SLOT_POOL + d) else {
        return 0;
    };
    let s = slot.slot & 31;
    // Read from memory, not carried over from where they were written:
    // the verifier would follow each kind of packet through on its own.
    // SAFETY: fields of this CPU's scratch, written for this packet.
    let (skip, absent, vl) = unsafe {
        (
            core::ptr::read_volatile(&f.skip),
            core::ptr::read_volatile(&f.absent),
            core::ptr::read_volatile(&f.lo[s as usize]),
        )
    };
    if (skip >> s) & 1 != 0 {
        return UNCONSTRAINED;
    }
    let absent = (absent >> s) & 1 != 0;
    let vh = if s >= slot::IP_SRC6 {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&f.hi[(s & 1) as usize]) }
    } else {
        0
    };
    let len = slot.len.min(CLS_SLOT_KEYS);
    if len == 0 {
        return UNCONSTRAINED;
    }
    let (id, summary) = if absent {
        (slot.absent, slot.absent_summary)
    } else {
        let base = c * CLS_KEY_POOL + slot.key_base;
        if slot.near != 0 && s < slot::IP_SRC6 {
            // The intervals in the descriptor: the number of starts after
            // the first at or before the value, counted without a branch
            // (`start - (v + 1)` wraps below zero exactly when start <= v,
            // both being below 2^63) is the index of the one holding it.
            let mut i = 0;
            for k in 1..CLS_NEAR {
                i += slot.near_start[k].wrapping_sub(vl + 1) >> 63;
            }
            let i = i as usize & (CLS_NEAR - 1);
            (slot.near_bitmap[i], slot.near_summary[i])
        } else if slot.direct != 0 && slot.direct <= CLS_DIRECT_TABLES && vh == 0 && vl < u64::from(CLS_DIRECT_VALUES) {
            // The interval straight from the slot's direct table.
            let v = vl as u32;
            let at = (c * CLS_DIRECT_TABLES + slot.direct - 1) * CLS_DIRECT_WORDS + v / 4;
            let Some(w) = CLS_DIRECT.get(at) else {
                return 0;
            };
            let lo = ((*w >> ((v % 4) * 16)) & 0xffff) as u32;
            if lo >= len {
                return 0;
            }
            match CLS_KEY.get(base + lo) {
                Some(k) => (k.bitmap, k.summary),
                None => return 0,
            }
        } else if slot.trie != 0 && slot.trie <= CLS_TRIE_ROOTS && s < slot::IP_SRC6 {
            match trie(c, slot.trie - 1, vl as u32) {
                Some(found) => found,
                None => return 0,
            }
        } else if slot.tree != 0 && s < slot::IP_SRC6 {
            match walk(c * CLS_NODE_POOL + slot.tree - 1, slot.levels, vl, zero) {
                Some(found) => found,
                None => return 0,
            }
        } else {
            // Few intervals (most rule sets): a search of 4 steps instead
            // of 12. The first interval's bitmap is in the descriptor.
            let first = (slot.first, slot.first_summary);
            let found = if len <= SHORT_SEARCH {
                search::<{ SHORT_SEARCH / 2 }>(base, len, vh, vl, zero, first)
            } else {
                search::<{ CLS_SLOT_KEYS / 2 }>(base, len, vh, vl, zero, first)
            };
            match found {
                Some(found) => found,
                None => return 0,
            }
        }
    };
    if id >= CLS_BITMAP_POOL || summary == 0 {
        return 0;
    }
    u64::from(summary) << 32 | u64::from(id)
}

/// Slots of at most this many intervals are searched in fewer steps.
const SHORT_SEARCH: u32 = 16;

/// The bitmap (id, summary) of the last of the `len` intervals from
/// `base` in the key pool starting at or before the value `(vh, vl)`, for
/// `len` up to `2 * FIRST`; `first`: the first interval's (it starts at
/// 0). The interval's index is built bit by bit from `FIRST` down, each bit
/// kept if the interval there starts at or before the value. The index
/// starts as `zero`, a value the verifier does not know: as a known number
/// it would be decided against what the verifier learnt of the length,
/// and every index tracked apart. `None`: out of the pool.
#[inline(always)]
fn search<const FIRST: u32>(base: u32, len: u32, vh: u64, vl: u64, zero: u32, first: (u32, u32)) -> Option<(u32, u32)> {
    let mut lo = zero;
    let mut found = first;
    let mut step = FIRST;
    while step != 0 {
        let m = lo + step;
        if m < len {
            let k = CLS_KEY.get(base + m)?;
            if (k.hi, k.lo) <= (vh, vl) {
                lo = m;
                found = (k.bitmap, k.summary);
            }
        }
        step /= 2;
    }
    Some(found)
}

/// The bitmap (id, summary) of the interval holding `v` in the search
/// tree of `levels` levels whose root is `root` in `CLS_NODE` (see
/// `ClsNode`): per level one node, in which the last key starting at or
/// before `v` is found in 4 steps, as in [`search`] (from `zero`, for
/// the same reason). `None`: out of the pool.
#[inline(always)]
fn walk(root: u32, levels: u32, v: u64, zero: u32) -> Option<(u32, u32)> {
    const KEYS: u32 = CLS_NODE_KEYS;
    // Bounded for the verifier, which then ends the walk by itself.
    let levels = levels.min(CLS_NODE_LEVELS);
    let mut j = 0;
    let mut level = 1;
    loop {
        let node = CLS_NODE.get(root + j)?;
        // The first key starts at or before `v` (the root's at 0, another
        // node's where its parent's key does).
        let mut i = zero;
        let mut step = KEYS / 2;
        while step != 0 {
            let m = (i + step) & (KEYS - 1);
            if node.start[m as usize] <= v {
                i = m;
            }
            step /= 2;
        }
        let i = i & (KEYS - 1);
        if level >= levels {
            return Some((node.bitmap[i as usize], node.summary[i as usize]));
        }
        j = j * KEYS + 1 + i;
        level += 1;
    }
}

/// The bitmap (id, summary) of the interval holding the IPv4 address
/// `v` in trie `root` of copy `c` (see `CLS_TRIE_CHILD`): the root's
/// entry for its first 16 bits, then while an entry leads to a node, that
/// node's entry for the next byte. `None`: out of the map, or a third
/// level that still leads on (a malformed trie).
#[inline(always)]
fn trie(c: u32, root: u32, v: u32) -> Option<(u32, u32)> {
    let base = c * CLS_TRIE_WORDS;
    let nodes = base + CLS_TRIE_ROOTS * CLS_TRIE_ROOT;
    let mut e = *CLS_TRIE.get(base + root * CLS_TRIE_ROOT + (v >> 16))?;
    for shift in [8, 0] {
        if e & CLS_TRIE_CHILD == 0 {
            break;
        }
        let node = e as u32 & (CLS_TRIE_NODES - 1);
        e = *CLS_TRIE.get(nodes + node * CLS_TRIE_NODE + ((v >> shift) & 0xff))?;
    }
    if e & CLS_TRIE_CHILD != 0 {
        return None;
    }
    Some((e as u32, (e >> 32) as u32))
}

/// Index of the lowest set bit of a non-zero word (see
/// `moat_common::rules::lowest_bit`); 0 for 0, which callers rule out.
#[inline(always)]
fn lowest(x: u64) -> u32 {
    // SAFETY: a read inside the table, which nothing writes.
    u32::from(unsafe { core::ptr::read_volatile(&raw const LOWEST[lowest_bit_key(x) & 63]) })
}

/// `moat_common::rules::LOWEST_BIT`, in the program's data. Mutable
/// though never written: the compiler would otherwise assume the values
/// it holds, and drop a bound the verifier needs on a bitmap word's index
/// computed from one.
static mut LOWEST: [u8; 64] = LOWEST_BIT;

/// The packet's value for every slot (see `moat_common::rules::slot`),
/// gathered once per packet: the low halves by slot, the high halves of
/// the IPv6 addresses by slot parity, and which slots the packet lacks
/// (a port of a non-TCP packet) or that are not for it (the other address
/// family's).
#[repr(C)]
pub struct Fields {
    lo: [u64; 32],
    hi: [u64; 2],
    absent: u32,
    skip: u32,
}

/// Slots of each protocol's fields, as bits.
const TCP_SLOTS: u32 = 0xff << slot::TCP_SRCPORT | 1 << slot::TCP_FLAG_URG;
const UDP_SLOTS: u32 = 1 << slot::UDP_SRCPORT | 1 << slot::UDP_DSTPORT;
const ICMP_SLOTS: u32 = 1 << slot::ICMP_TYPE | 1 << slot::ICMP_CODE;
const V4_SLOTS: u32 = 1 << slot::IP_SRC | 1 << slot::IP_DST;
const V6_SLOTS: u32 = 1 << slot::IP_SRC6 | 1 << slot::IP_DST6;
/// Slot numbers past the last field.
const NO_SLOTS: u32 = !((1 << (slot::IP_DST6 + 1)) - 1);

/// This CPU's scratch for the classifier.
#[inline(always)]
pub fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: this CPU's slot, used only while this program runs on it.
    CLS_SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// The packet's values go into `sc` (for classification and the flow
/// hash); returns the copy of the rule sets in force (`copy`, the rules
/// word of `ACTIVE`), or `None` when no rule set is in force.
#[inline(always)]
pub fn prepare(ctx: &XdpContext, pkt: &Packet, sc: &mut Scratch, copy: u64) -> Option<u32> {
    fill(ctx, pkt, &mut sc.f)?;
    sc.frag_kind = match (pkt.frag, pkt.later_frag) {
        (false, _) => FRAG_NONE,
        (true, false) => FRAG_FIRST,
        (true, true) => FRAG_LATER,
    };
    if pkt.frag {
        sc.frag = FragKey {
            src: pkt.src,
            dst: pkt.dst,
            id: pkt.frag_id,
            proto: u32::from(pkt.proto),
        };
    }
    (copy <= 1).then_some(copy as u32)
}

/// [`Scratch::frag_kind`]: not a fragment, a first fragment, a later one.
const FRAG_NONE: u32 = 0;
const FRAG_FIRST: u32 = 1;
const FRAG_LATER: u32 = 2;

/// The packet's values for every slot; `None` when the packet is too
/// short for one of them.
#[inline(always)]
fn fill(ctx: &XdpContext, pkt: &Packet, f: &mut Fields) -> Option<()> {
    use slot::*;
    let v4 = pkt.family == Family::V4;
    // A first fragment carries its L4 header whole (the parser checks).
    let whole_l4 = !pkt.later_frag;
    let tcp = whole_l4 && pkt.proto == parse::IPPROTO_TCP;
    let udp = whole_l4 && pkt.proto == parse::IPPROTO_UDP;
    let icmp = whole_l4 && ((v4 && pkt.proto == parse::IPPROTO_ICMP) || (!v4 && pkt.proto == parse::IPPROTO_ICMPV6));
    // Port bytes as on the wire: source in the first two, destination in the last two.
    let ports = pkt.ports.unwrap_or(0).to_ne_bytes();
    let (itype, icode) = if icmp {
        let t = parse::load::<[u8; 2]>(ctx, pkt.l4)?;
        (u64::from(t[0]), u64::from(t[1]))
    } else {
        (0, 0)
    };
    let ttl = u64::from(parse::load::<[u8; 2]>(ctx, pkt.ttl_off)?[0]);
    let w = |a: &[u32; 4], i: usize| u64::from(u32::from_be(a[i]));
    let flags = u64::from(pkt.tcp_flags);
    let sport = u64::from(u16::from_be_bytes([ports[0], ports[1]]));
    let dport = u64::from(u16::from_be_bytes([ports[2], ports[3]]));
    let v = &mut f.lo;
    if v4 {
        v[IP_SRC as usize] = w(&pkt.src, 0);
        v[IP_DST as usize] = w(&pkt.dst, 0);
    } else {
        v[IP_SRC6 as usize] = (w(&pkt.src, 2) << 32) | w(&pkt.src, 3);
        v[IP_DST6 as usize] = (w(&pkt.dst, 2) << 32) | w(&pkt.dst, 3);
        f.hi[(IP_SRC6 & 1) as usize] = (w(&pkt.src, 0) << 32) | w(&pkt.src, 1);
        f.hi[(IP_DST6 & 1) as usize] = (w(&pkt.dst, 0) << 32) | w(&pkt.dst, 1);
    }
    v[IP_PROTO as usize] = u64::from(pkt.proto);
    v[IP_TTL as usize] = ttl;
    v[IP_LEN as usize] = pkt.ip_len as u64;
    v[IP_FRAG as usize] = u64::from(pkt.frag);
    v[IP_VERSION as usize] = if v4 { 4 } else { 6 };
    // The ports in the TCP slots for every packet: the flow hash reads
    // them there. The values of a slot the packet lacks (see `absent`)
    // are never read, so the flags and ICMP values are written only for
    // packets that have them.
    v[TCP_SRCPORT as usize] = sport;
    v[TCP_DSTPORT as usize] = dport;
    if tcp {
        v[TCP_FLAGS as usize] = flags;
        v[TCP_FLAG_FIN as usize] = flags & 1;
        v[TCP_FLAG_SYN as usize] = (flags >> 1) & 1;
        v[TCP_FLAG_RST as usize] = (flags >> 2) & 1;
        v[TCP_FLAG_PSH as usize] = (flags >> 3) & 1;
        v[TCP_FLAG_ACK as usize] = (flags >> 4) & 1;
        v[TCP_FLAG_URG as usize] = (flags >> 5) & 1;
    }
    v[UDP_SRCPORT as usize] = sport;
    v[UDP_DSTPORT as usize] = dport;
    if icmp {
        v[ICMP_TYPE as usize] = itype;
        v[ICMP_CODE as usize] = icode;
    }
    f.absent = if tcp { 0 } else { TCP_SLOTS } | if udp { 0 } else { UDP_SLOTS } | if icmp { 0 } else { ICMP_SLOTS };
    f.skip = NO_SLOTS | if v4 { V6_SLOTS } else { V4_SLOTS };
    Some(())
}

/// The flow hash of moat_common::flowhash's specification, from the
/// packet's values in `sc` (see [`prepare`]): its words are the address
/// words as on the wire, read little-endian.
#[inline(always)]
pub fn flow_hash(sc: &Scratch) -> u32 {
    use moat_common::flowhash::{mix, SEED};
    let f = &sc.f;
    // SAFETY: fields of this CPU's scratch, written for this packet; read
    // from memory for the reason given in `find`.
    let (skip, absent, frag, proto, sport, dport) = unsafe {
        (
            core::ptr::read_volatile(&f.skip),
            core::ptr::read_volatile(&f.absent),
            core::ptr::read_volatile(&f.lo[slot::IP_FRAG as usize]),
            core::ptr::read_volatile(&f.lo[slot::IP_PROTO as usize]),
            core::ptr::read_volatile(&f.lo[slot::TCP_SRCPORT as usize]),
            core::ptr::read_volatile(&f.lo[slot::TCP_DSTPORT as usize]),
        )
    };
    let mut h = SEED;
    let v4 = skip & V6_SLOTS != 0;
    for dst in [false, true] {
        let a = address(f, dst, v4);
        h = mix(h, a[0]);
        if !v4 {
            h = mix(h, a[1]);
            h = mix(h, a[2]);
            h = mix(h, a[3]);
        }
    }
    h = mix(h, proto as u32);
    // Ports for unfragmented TCP and UDP (a first fragment has them, but
    // its datagram's other fragments do not).
    let ports = 1 << slot::TCP_SRCPORT | 1 << slot::UDP_SRCPORT;
    if frag == 0 && absent & ports != ports {
        h = mix(
            h,
            u32::from((sport as u16).to_be()) | u32::from((dport as u16).to_be()) << 16,
        );
    }
    h
}

/// The packet's source (or destination) address as network-order words
/// (IPv4, `v4`: the first).
#[inline(always)]
fn address(f: &Fields, dst: bool, v4: bool) -> [u32; 4] {
    let i = usize::from(dst);
    let w = |v: u64| [((v >> 32) as u32).to_be(), (v as u32).to_be()];
    // SAFETY: fields of this CPU's scratch, written for this packet.
    let get = |v: &u64| unsafe { core::ptr::read_volatile(v) };
    if v4 {
        [(get(&f.lo[slot::IP_SRC as usize + i]) as u32).to_be(), 0, 0, 0]
    } else {
        let (h, l) = (
            w(get(&f.hi[(slot::IP_SRC6 as usize + i) & 1])),
            w(get(&f.lo[slot::IP_SRC6 as usize + i])),
        );
        [h[0], h[1], l[0], l[1]]
    }
}

/// The classifier's per-CPU working memory: the bitmaps a packet's
/// values select in the set being classified, and the packet's values
/// (too large for the stack).
#[repr(C)]
pub struct Scratch {
    ids: [u32; IDS],
    f: Fields,
    /// The packet's datagram, when it is a fragment, and which fragment
    /// it is (`FRAG_*`).
    frag: FragKey,
    frag_kind: u32,
    /// What crosses [`opaque`].
    carry: u64,
    /// The rate limiter's clock on this CPU (see [`now`]): what it last
    /// read, the kernel's tick count then, and how many packets have
    /// used the reading since.
    clock_ns: u64,
    clock_tick: u64,
    clock_uses: u64,
}

/// Packets that may share one reading of the clock on a CPU.
const CLOCK_USES: u64 = 32;

/// Now, for the rate limiter: the monotonic clock as this CPU last read
/// it, read again when the kernel's tick count has moved since (every
/// 1-10 ms by the kernel's tick rate) or [`CLOCK_USES`] packets have used
/// the reading. A read of the clock is a kernel call, tens of nanoseconds
/// here; the tick count is one inlined load. The time so kept is never
/// ahead of the clock, and behind it by at most a tick, or by the time 32
/// packets take to arrive on this CPU if that is less (microseconds in a
/// flood): a bucket's credit comes in such steps instead of packet by
/// packet, and the rate over any longer time is unchanged.
#[inline(always)]
fn now(sc: &mut Scratch) -> u64 {
    // SAFETY: plain helper calls (the first inlined by the kernel); the
    // fields are this CPU's scratch.
    unsafe {
        let tick = bpf_jiffies64();
        let uses = core::ptr::read_volatile(&sc.clock_uses);
        if core::ptr::read_volatile(&sc.clock_tick) != tick || uses >= CLOCK_USES {
            let ns = bpf_ktime_get_ns();
            core::ptr::write_volatile(&mut sc.clock_tick, tick);
            core::ptr::write_volatile(&mut sc.clock_ns, ns);
            core::ptr::write_volatile(&mut sc.clock_uses, 0);
            return ns;
        }
        core::ptr::write_volatile(&mut sc.clock_uses, uses + 1);
        core::ptr::read_volatile(&sc.clock_ns)
    }
}

/// `x`, passed through memory the compiler cannot see into: the verifier
/// then meets one state where several ways of computing it join, and
/// checks what follows once instead of once per way.
#[inline(always)]
pub fn opaque(sc: &mut Scratch, x: u64) -> u64 {
    // SAFETY: a field of this CPU's scratch.
    unsafe {
        core::ptr::write_volatile(&mut sc.carry, x);
        core::ptr::read_volatile(&sc.carry)
    }
}

/// [`opaque`] for the destination.
#[inline(always)]
pub fn barrier(sc: &mut Scratch, dest: moat_common::DestValue) -> moat_common::DestValue {
    let d = opaque(sc, u64::from(dest.customer) | u64::from(dest.route_set) << 32);
    moat_common::DestValue {
        customer: d as u32,
        route_set: (d >> 32) as u32,
    }
}

/// Fragments of datagrams whose first fragment was dropped: a first
/// fragment carries the L4 header that rules and the reflection protection
/// judge; the later ones carry none, but are worth nothing without it.
pub struct FragDrop;

impl FragDrop {
    /// The reason the packet's datagram lost its first fragment, when the
    /// packet is a later fragment of such a datagram.
    #[inline(always)]
    pub fn earlier(sc: &Scratch) -> Option<Reason> {
        // SAFETY: a field of this CPU's scratch, written for this packet.
        if unsafe { core::ptr::read_volatile(&sc.frag_kind) } != FRAG_LATER {
            return None;
        }
        // SAFETY: the value is only read; it is a plain integer.
        match unsafe { FRAG_DROPS.get(sc.frag) }.copied()? {
            1 => Some(Reason::DropMitigationRule),
            2 => Some(Reason::DropRateLimit),
            3 => Some(Reason::DropFirewall),
            4 => Some(Reason::DropReflection),
            _ => None,
        }
    }

    /// Records that the packet, when it is a first fragment, was dropped
    /// for `reason` (the reasons of the rules and the reflection
    /// protection only).
    #[inline(always)]
    pub fn record(sc: &Scratch, reason: Reason) {
        let code: u32 = match reason {
            Reason::DropMitigationRule => 1,
            Reason::DropRateLimit => 2,
            Reason::DropFirewall => 3,
            Reason::DropReflection => 4,
            _ => return,
        };
        // SAFETY: as above.
        if unsafe { core::ptr::read_volatile(&sc.frag_kind) } == FRAG_FIRST {
            // A full table evicts its oldest entry; nothing else can fail
            // that the packet could do anything about.
            let _ = FRAG_DROPS.insert(sc.frag, code, 0);
        }
    }
}

/// The firewall set of `customer` in copy `c` (`SET_NONE`: none).
#[inline(always)]
pub fn firewall_set(c: u32, customer: u32) -> u32 {
    if customer >= MAX_CUSTOMERS {
        return SET_NONE;
    }
    CUSTOMER_FW
        .get(c * MAX_CUSTOMERS + customer)
        .copied()
        .unwrap_or(SET_NONE)
}

/// The first term of set `set` (copy `c`) the packet matches.
#[inline(always)]
pub fn classify(sc: &mut Scratch, c: u32, set: u32) -> Option<&'static ClsTerm> {
    match classify_set(sc, c, set) {
        0 => None,
        t => CLS_TERM.get(t - 1),
    }
}

/// The classification proper: `1 +` the matching term's index in
/// `CLS_TERM`, or 0 for no match. Inline, with no call on the way: on
/// this machine every call costs tens of nanoseconds.
///
/// First every slot's bitmap is found and only the summaries are ANDed
/// (a packet no term can match stops there). In a set of at most 32
/// terms the summaries are the terms themselves, and the lowest bit left
/// is the match. In a larger one, lowest first, each bitmap word holding
/// a 32-term span the summaries leave is ANDed over the bitmaps (masked
/// to those spans) until one leaves a term. A span the summaries keep but
/// the bitmaps empty costs one more round; a set's cost follows the
/// fields its rules use and how many spans the packet's bitmaps share,
/// not how many rules there are.
#[inline(always)]
fn classify_set(sc: &mut Scratch, c: u32, set: u32) -> u32 {
    if c > 1 || set >= CLS_SETS {
        return 0;
    }
    // Copied out of the map once. Read from the map at each use instead,
    // every read is a new value to the verifier, which then follows both
    // ways of checks already decided for the first: it processed about
    // 490,000 instructions that way, against 350,000.
    let Some(&d) = CLS_SET.get(c * CLS_SETS + set) else {
        return 0;
    };
    if d.nterms == 0 || d.all >= CLS_BITMAP_POOL {
        return 0;
    }
    let zero = opaque(sc, 0) as u32;
    let mut spans = d.all_summary;
    // Only the slots for the packet's address family.
    // SAFETY: as in `find`.
    let v4 = unsafe { core::ptr::read_volatile(&sc.f.skip) } & V6_SLOTS != 0;
    let (first, end) = if v4 { (0, d.v4_end) } else { (d.v6_start, d.nslots) };
    let n = end.saturating_sub(first).min(CLS_SLOTS);
    let base = d.slot_base + first;
    // The set's own bitmap: ANDed alone when no slot is for this packet,
    // else replaced by the first slot's.
    // SAFETY: this CPU's scratch; every `ids` entry read below is written
    // first, for this classification.
    unsafe { core::ptr::write_volatile(&mut sc.ids[0], d.all) };
    let mut i = 0;
    while i < n {
        // A slot that does not narrow the set selects the set's own
        // bitmap (ANDing it changes nothing), so that slot `i`'s bitmap
        // is always `ids[i]`.
        let found = match find(&sc.f, c, base + i, zero) {
            UNCONSTRAINED => u64::from(d.all_summary) << 32 | u64::from(d.all),
            found => found,
        };
        spans &= (found >> 32) as u32;
        if spans == 0 {
            return 0;
        }
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(&mut sc.ids[i as usize & (IDS - 1)], found as u32) };
        i += 1;
    }
    // A small set's summaries are its terms: the lowest left is the match
    // (none left: a set with no slot for this packet whose own summary is
    // empty, which a well-formed set never has).
    if d.nterms <= CLS_EXACT_TERMS {
        let term = lowest(u64::from(spans));
        return if spans != 0 && term < d.nterms {
            c * CLS_TERM_POOL + d.term_base + term + 1
        } else {
            0
        };
    }
    let mut term = None;
    let mut round = 0;
    while round < CLS_WORDS && spans != 0 {
        // The number of bitmaps, from memory each round: carried over,
        // the verifier would know it exactly after the first round's
        // loop and follow every count apart.
        let m = (opaque(sc, u64::from(n)) as usize).clamp(1, CLS_SLOTS as usize);
        // The word of the lowest span left, and both its spans at once
        // when the summaries left both.
        let w = (lowest(u64::from(spans)) / 2) as usize & (CLS_WORDS - 1);
        let pair = u64::from(spans >> (2 * w)) & 3;
        let mut acc = ((pair & 1) * 0xffff_ffff) | ((pair >> 1) * 0xffff_ffff_0000_0000);
        let mut j = 0;
        // Few branches here: the verifier keeps one pending state per
        // branch it has yet to follow, and this loop runs inside another.
        // The ids were checked against the pool in `find`; the mask only
        // shows the verifier that the lookup stays inside the map.
        while j < m {
            // SAFETY: as above.
            let id = unsafe { core::ptr::read_volatile(&sc.ids[j & (IDS - 1)]) } & (CLS_BITMAP_POOL - 1);
            let Some(b) = CLS_BITMAP.get(c * CLS_BITMAP_POOL + id) else {
                return 0;
            };
            acc &= b[w];
            j += 1;
        }
        if acc != 0 {
            term = Some(w as u32 * 64 + lowest(acc));
            break;
        }
        spans &= !(3 << (2 * w));
        round += 1;
    }
    let Some(term) = term else {
        return 0;
    };
    if term >= d.nterms {
        return 0;
    }
    c * CLS_TERM_POOL + d.term_base + term + 1
}

/// Whether a rate-limited rule's bucket lets the packet through: each
/// packet moves the bucket's time `interval_ns` ahead, from now at the
/// earliest; a packet that would put it more than `burst_ns` ahead of now
/// is over the limit. Buckets are shared by all CPUs: concurrent packets
/// may each pass on the same credit (at most one per CPU), never lose any.
#[inline(always)]
pub fn rate_allows(t: &ClsTerm, sc: &mut Scratch) -> bool {
    let now = now(sc);
    let bucket = if t.per == RL_PER_RULE {
        match RL_RULE.get_ptr_mut(t.stat) {
            Some(b) => b,
            None => return true,
        }
    } else {
        let key = RlKey {
            stat: t.stat,
            addr: address(&sc.f, t.per == RL_PER_DST, sc.f.skip & V6_SLOTS != 0),
        };
        match RL_ADDR.get_ptr_mut(key) {
            Some(b) => b,
            None => {
                // A new address: its first packet passes. Another CPU may
                // have just made the bucket; then that one counts.
                let _ = RL_ADDR.insert(key, now + t.interval_ns, u64::from(BPF_NOEXIST));
                return true;
            }
        }
    };
    // SAFETY: a map value of this program's maps; reads and writes are
    // whole aligned words, the update an atomic add.
    unsafe {
        let at = core::ptr::read_volatile(bucket);
        if at <= now {
            core::ptr::write_volatile(bucket, now + t.interval_ns);
            return true;
        }
        if at - now > t.burst_ns {
            return false;
        }
        // The BPF target has no AtomicU64::fetch_add; the intrinsic, its
        // result unused, is the kernel's atomic add.
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(bucket, t.interval_ns);
    }
    true
}
