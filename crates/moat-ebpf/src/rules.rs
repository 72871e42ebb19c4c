//! Rule sets (operator mitigation rules, customer firewalls):
//! classification by per-field interval tables and term bitmaps
//! (moat_common::rules). Per packet and set: for every slot the set's
//! rules constrain, one binary search for the interval holding the
//! packet's value (one lookup in the slot's direct table for a field of
//! 16 bits with many intervals; or the "field absent" bitmap) and one
//! 1,024-bit AND;
//! the lowest bit left is the first matching term. The cost follows the
//! fields the rules use, not how many rules there are. Rate-limit rules
//! keep token buckets (as "theoretical arrival times") per rule or per
//! address.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns, programs::XdpContext};
use moat_common::{limits::MAX_CUSTOMERS, rules::*};

use crate::{
    maps::{
        CLS_ACTIVE, CLS_BITMAP, CLS_DIRECT, CLS_KEY, CLS_SCRATCH, CLS_SET, CLS_SLOT, CLS_TERM, CUSTOMER_FW, RL_ADDR,
        RL_RULE,
    },
    parse::{self, Family, Packet},
};

type Bits = [u64; CLS_WORDS];

/// ANDs the bitmap for the packet's value in the slot described by pool
/// entry `d` of copy `c` into `acc`; 0 when nothing is left (no rule can
/// match) or a table is out of bounds.
#[inline(always)]
fn narrow(acc: &mut Bits, f: &Fields, c: u32, d: u32, zero: u32) -> u32 {
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
        return 1;
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
        return 1;
    }
    let id = if absent {
        slot.absent
    } else {
        let base = c * CLS_KEY_POOL + slot.key_base;
        let lo = if slot.direct != 0 && slot.direct <= CLS_DIRECT_TABLES && vh == 0 && vl < u64::from(CLS_DIRECT_VALUES)
        {
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
            lo
        } else {
            // The last interval starting at or before the value (the first
            // starts at 0): the index built bit by bit from the highest,
            // each bit kept if the interval there starts at or before the
            // value. The index starts as a value the verifier does not
            // know: as a known number it would be decided against what
            // the verifier learnt of the length, and every index tracked
            // apart.
            let mut lo = zero;
            let mut step = CLS_SLOT_KEYS / 2;
            while step != 0 {
                let m = lo + step;
                if m < len {
                    let Some(k) = CLS_KEY.get(base + m) else {
                        return 0;
                    };
                    if (k.hi, k.lo) <= (vh, vl) {
                        lo = m;
                    }
                }
                step /= 2;
            }
            lo
        };
        match CLS_KEY.get(base + lo) {
            Some(k) => k.bitmap,
            None => return 0,
        }
    };
    if id >= CLS_BITMAP_POOL {
        return 0;
    }
    let Some(b) = CLS_BITMAP.get(c * CLS_BITMAP_POOL + id) else {
        return 0;
    };
    let mut any = 0;
    for (a, w) in acc.iter_mut().zip(b) {
        *a &= w;
        any |= *a;
    }
    u32::from(any != 0)
}

/// Index of the lowest set bit of a non-zero word.
#[inline(always)]
fn lowest(x: u64) -> u32 {
    let mut v = x & x.wrapping_neg();
    let mut n = 0;
    for (shift, mask) in [
        (32, 0xffff_ffff_0000_0000u64),
        (16, 0xffff_0000_ffff_0000),
        (8, 0xff00_ff00_ff00_ff00),
        (4, 0xf0f0_f0f0_f0f0_f0f0),
        (2, 0xcccc_cccc_cccc_cccc),
        (1, 0xaaaa_aaaa_aaaa_aaaa),
    ] {
        if v & mask != 0 {
            n += shift;
            v &= mask;
        }
    }
    n
}

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

/// The copy of the rule sets in force, or `None` when no rule set is in
/// force; the packet's values for classification go into `sc`.
#[inline(always)]
pub fn prepare(ctx: &XdpContext, pkt: &Packet, sc: &mut Scratch) -> Option<u32> {
    use slot::*;
    let c = *CLS_ACTIVE.get(0)?;
    if c > 1 {
        return None;
    }
    let v4 = pkt.family == Family::V4;
    let whole_l4 = !pkt.frag;
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
    let f = &mut sc.f;
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
    v[TCP_SRCPORT as usize] = sport;
    v[TCP_DSTPORT as usize] = dport;
    v[TCP_FLAGS as usize] = flags;
    v[TCP_FLAG_FIN as usize] = flags & 1;
    v[TCP_FLAG_SYN as usize] = (flags >> 1) & 1;
    v[TCP_FLAG_RST as usize] = (flags >> 2) & 1;
    v[TCP_FLAG_PSH as usize] = (flags >> 3) & 1;
    v[TCP_FLAG_ACK as usize] = (flags >> 4) & 1;
    v[TCP_FLAG_URG as usize] = (flags >> 5) & 1;
    v[UDP_SRCPORT as usize] = sport;
    v[UDP_DSTPORT as usize] = dport;
    v[ICMP_TYPE as usize] = itype;
    v[ICMP_CODE as usize] = icode;
    f.absent = if tcp { 0 } else { TCP_SLOTS } | if udp { 0 } else { UDP_SLOTS } | if icmp { 0 } else { ICMP_SLOTS };
    f.skip = NO_SLOTS | if v4 { V6_SLOTS } else { V4_SLOTS };
    Some(c)
}

/// The packet's source (or destination) address as network-order words
/// (IPv4: the first).
#[inline(always)]
fn address(f: &Fields, dst: bool) -> [u32; 4] {
    let i = usize::from(dst);
    let w = |v: u64| [((v >> 32) as u32).to_be(), (v as u32).to_be()];
    if f.skip & V6_SLOTS != 0 {
        [(f.lo[slot::IP_SRC as usize + i] as u32).to_be(), 0, 0, 0]
    } else {
        let (h, l) = (
            w(f.hi[(slot::IP_SRC6 as usize + i) & 1]),
            w(f.lo[slot::IP_SRC6 as usize + i]),
        );
        [h[0], h[1], l[0], l[1]]
    }
}

/// The classifier's per-CPU working memory: the running bitmap and the
/// packet's values (too large for the stack).
#[repr(C)]
pub struct Scratch {
    acc: Bits,
    f: Fields,
    /// What crosses [`opaque`].
    carry: u64,
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

/// [`opaque`] for the destination and whether the packet is a reflection
/// (in the customer id's top bit, which ids never use).
#[inline(always)]
pub fn barrier(sc: &mut Scratch, dest: moat_common::DestValue, reflect: bool) -> (moat_common::DestValue, bool) {
    const REFLECT: u32 = 1 << 31;
    let customer = dest.customer & !REFLECT | if reflect { REFLECT } else { 0 };
    let d = opaque(sc, u64::from(customer) | u64::from(dest.route_set) << 32);
    (
        moat_common::DestValue {
            customer: d as u32 & !REFLECT,
            route_set: (d >> 32) as u32,
        },
        d as u32 & REFLECT != 0,
    )
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
#[inline(always)]
fn classify_set(sc: &mut Scratch, c: u32, set: u32) -> u32 {
    if c > 1 || set >= CLS_SETS {
        return 0;
    }
    let Some(d) = CLS_SET.get(c * CLS_SETS + set) else {
        return 0;
    };
    if d.nterms == 0 || d.all >= CLS_BITMAP_POOL {
        return 0;
    }
    let Some(all) = CLS_BITMAP.get(c * CLS_BITMAP_POOL + d.all) else {
        return 0;
    };
    let zero = opaque(sc, 0) as u32;
    let (acc, f) = (&mut sc.acc, &sc.f);
    crate::mem::copy(acc, all);
    // Only the slots for the packet's address family.
    // SAFETY: as in `narrow`.
    let v4 = unsafe { core::ptr::read_volatile(&f.skip) } & V6_SLOTS != 0;
    let (first, end) = if v4 { (0, d.v4_end) } else { (d.v6_start, d.nslots) };
    let n = end.saturating_sub(first).min(CLS_SLOTS);
    let base = d.slot_base + first;
    let mut i = 0;
    while i < n {
        if narrow(acc, f, c, base + i, zero) == 0 {
            return 0;
        }
        i += 1;
    }
    let mut term = None;
    for (w, word) in acc.iter().enumerate() {
        if *word != 0 {
            term = Some(w as u32 * 64 + lowest(*word));
            break;
        }
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
pub fn rate_allows(t: &ClsTerm, sc: &Scratch) -> bool {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let bucket = if t.per == RL_PER_RULE {
        match RL_RULE.get_ptr_mut(t.stat) {
            Some(b) => b,
            None => return true,
        }
    } else {
        let key = RlKey {
            stat: t.stat,
            addr: address(&sc.f, t.per == RL_PER_DST),
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
