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

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_ns, bpf_loop},
    programs::XdpContext,
};
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
/// entry `d` of copy `c` into the scratch bitmap; 0 when nothing is left
/// (no rule can match) or a table is out of bounds.
#[inline(always)]
fn narrow(sc: &mut Scratch, c: u32, d: u32) -> u32 {
    let Some(slot) = CLS_SLOT.get(c * CLS_SLOT_POOL + d) else {
        return 0;
    };
    let s = slot.slot & 31;
    // A power-of-two table and a mask: in bounds as the verifier sees it.
    let present = sc.vals[s as usize][0];
    if present == 2 {
        // The slot is not for this packet (the other address family's).
        return 1;
    }
    let len = slot.len.min(CLS_SLOT_KEYS);
    if len == 0 {
        return 1;
    }
    let id = if present == 0 {
        slot.absent
    } else {
        let base = c * CLS_KEY_POOL + slot.key_base;
        let [_, vh, vl] = sc.vals[s as usize];
        let mut lo = 0u32;
        if slot.direct != 0 && slot.direct <= CLS_DIRECT_TABLES && vh == 0 && vl < u64::from(CLS_DIRECT_VALUES) {
            // The interval straight from the slot's direct table.
            let v = vl as u32;
            let at = (c * CLS_DIRECT_TABLES + slot.direct - 1) * CLS_DIRECT_WORDS + v / 4;
            let Some(w) = CLS_DIRECT.get(at) else {
                return 0;
            };
            lo = ((*w >> ((v % 4) * 16)) & 0xffff) as u32;
            if lo >= len {
                return 0;
            }
        } else {
            // The last interval starting at or before the value: a fixed
            // number of halvings, each one lookup and one comparison.
            let mut hi = len;
            for _ in 0..CLS_SEARCH_STEPS {
                if hi - lo <= 1 {
                    break;
                }
                let mid = (lo + hi) / 2;
                let Some(k) = CLS_KEY.get(base + mid) else {
                    return 0;
                };
                if (k.hi, k.lo) <= (vh, vl) {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
        }
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
    for (a, w) in sc.acc.iter_mut().zip(b) {
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

/// The values the rules can test, gathered from the parsed packet (plain
/// numbers only: the classifier runs as a function of its own and must not
/// be handed packet pointers).
#[repr(C)]
pub struct Fields {
    /// 0-1: IPv4 source and destination (`lo` halves); IPv6: all 128 bits.
    pub src: (u64, u64),
    pub dst: (u64, u64),
    pub proto: u64,
    pub ttl: u64,
    pub len: u64,
    pub sport: u64,
    pub dport: u64,
    pub flags: u64,
    pub itype: u64,
    pub icode: u64,
    pub v4: bool,
    pub frag: bool,
    pub tcp: bool,
    pub udp: bool,
    pub icmp: bool,
}

/// Gathers the packet's values for classification into this CPU's
/// scratch; returns the copy in force, or `None` when no rule set is.
#[inline(always)]
pub fn prepare(ctx: &XdpContext, pkt: &Packet) -> Option<u32> {
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
    let addr = |a: &[u32; 4]| {
        let w = |i: usize| u64::from(u32::from_be(a[i]));
        if v4 {
            (0, w(0))
        } else {
            ((w(0) << 32) | w(1), (w(2) << 32) | w(3))
        }
    };
    let f = Fields {
        src: addr(&pkt.src),
        dst: addr(&pkt.dst),
        proto: u64::from(pkt.proto),
        ttl: u64::from(parse::load::<[u8; 2]>(ctx, pkt.ttl_off)?[0]),
        len: pkt.ip_len as u64,
        sport: u64::from(u16::from_be_bytes([ports[0], ports[1]])),
        dport: u64::from(u16::from_be_bytes([ports[2], ports[3]])),
        flags: u64::from(pkt.tcp_flags),
        itype,
        icode,
        v4,
        frag: pkt.frag,
        tcp,
        udp,
        icmp,
    };
    if fill(&f) == 0 {
        return None;
    }
    Some(c)
}

/// The classifier's per-CPU working memory.
#[repr(C)]
pub struct Scratch {
    acc: Bits,
    /// Per slot: (1 present / 0 absent / 2 not for this packet, high, low).
    vals: [[u64; 3]; 32],
    /// The copy and set in use, and whether the search goes on (the
    /// loops' state: kept here, not on the stack, which the callbacks'
    /// frames share).
    c: u32,
    slot_base: u32,
    ok: u32,
}

/// Writes the packet's value per slot into the scratch; 0 on failure.
#[inline(always)]
fn fill(f: &Fields) -> u32 {
    let Some(sc) = CLS_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's scratch slot, used only while this program runs on it.
    let sc = unsafe { &mut *sc };
    let int = |v: u64| [1, 0, v];
    let none = [0, 0, 0];
    let skip = [2, 0, 0];
    let opt = |on: bool, v: u64| if on { int(v) } else { none };
    let flag = |bit: u64| opt(f.tcp, u64::from(f.flags & bit != 0));
    let v = &mut sc.vals;
    let (a4, a6) = (
        |x: (u64, u64)| if f.v4 { [1, x.0, x.1] } else { skip },
        |x: (u64, u64)| {
            if f.v4 {
                skip
            } else {
                [1, x.0, x.1]
            }
        },
    );
    crate::mem::copy(&mut v[slot::IP_SRC as usize], &a4(f.src));
    crate::mem::copy(&mut v[slot::IP_DST as usize], &a4(f.dst));
    crate::mem::copy(&mut v[slot::IP_SRC6 as usize], &a6(f.src));
    crate::mem::copy(&mut v[slot::IP_DST6 as usize], &a6(f.dst));
    crate::mem::copy(&mut v[slot::IP_PROTO as usize], &int(f.proto));
    crate::mem::copy(&mut v[slot::IP_TTL as usize], &int(f.ttl));
    crate::mem::copy(&mut v[slot::IP_LEN as usize], &int(f.len));
    crate::mem::copy(&mut v[slot::IP_FRAG as usize], &int(u64::from(f.frag)));
    crate::mem::copy(&mut v[slot::IP_VERSION as usize], &int(if f.v4 { 4 } else { 6 }));
    crate::mem::copy(&mut v[slot::TCP_SRCPORT as usize], &opt(f.tcp, f.sport));
    crate::mem::copy(&mut v[slot::TCP_DSTPORT as usize], &opt(f.tcp, f.dport));
    crate::mem::copy(&mut v[slot::TCP_FLAGS as usize], &opt(f.tcp, f.flags));
    crate::mem::copy(&mut v[slot::TCP_FLAG_SYN as usize], &flag(0x02));
    crate::mem::copy(&mut v[slot::TCP_FLAG_ACK as usize], &flag(0x10));
    crate::mem::copy(&mut v[slot::TCP_FLAG_RST as usize], &flag(0x04));
    crate::mem::copy(&mut v[slot::TCP_FLAG_FIN as usize], &flag(0x01));
    crate::mem::copy(&mut v[slot::TCP_FLAG_PSH as usize], &flag(0x08));
    crate::mem::copy(&mut v[slot::TCP_FLAG_URG as usize], &flag(0x20));
    crate::mem::copy(&mut v[slot::UDP_SRCPORT as usize], &opt(f.udp, f.sport));
    crate::mem::copy(&mut v[slot::UDP_DSTPORT as usize], &opt(f.udp, f.dport));
    crate::mem::copy(&mut v[slot::ICMP_TYPE as usize], &opt(f.icmp, f.itype));
    crate::mem::copy(&mut v[slot::ICMP_CODE as usize], &opt(f.icmp, f.icode));
    for unused in v.iter_mut().skip(22) {
        crate::mem::copy(unused, &skip);
    }
    1
}

/// One constrained slot of the set in use; 1 ends the loop (nothing can match).
extern "C" fn slot_step(i: u32, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(sc) = CLS_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's scratch slot, used only while this program runs on it.
    let sc = unsafe { &mut *sc };
    let (c, d) = (sc.c, sc.slot_base + i);
    if narrow(sc, c, d) == 0 {
        sc.ok = 0;
        return 1;
    }
    0
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

/// The first term of set `set` (copy `c`) the prepared packet matches.
#[inline(always)]
pub fn classify(c: u32, set: u32, v4: bool) -> Option<&'static ClsTerm> {
    match classify_set(c, set, v4) {
        0 => None,
        t => CLS_TERM.get(t - 1),
    }
}

/// The classification proper: `1 +` the matching term's index in
/// `CLS_TERM`, or 0 for no match. Inlined (a frame of its own would add
/// to the stack under the callback), its per-slot work one bpf_loop
/// callback, verified once per call site.
#[inline(always)]
fn classify_set(c: u32, set: u32, v4: bool) -> u32 {
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
    let Some(sc) = CLS_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's scratch slot, used only while this program runs on it.
    let sc = unsafe { &mut *sc };
    crate::mem::copy(&mut sc.acc, all);
    sc.c = c;
    // Only the slots for the packet's address family.
    let (first, end) = if v4 { (0, d.v4_end) } else { (d.v6_start, d.nslots) };
    sc.slot_base = d.slot_base + first;
    sc.ok = 1;
    // SAFETY: bpf_loop with a callback of the helper's signature and no
    // context (the state is in the scratch map).
    unsafe {
        bpf_loop(
            end.saturating_sub(first).min(CLS_SLOTS),
            slot_step as *mut core::ffi::c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    // The callbacks changed the scratch through the map: read it anew.
    if unsafe { core::ptr::read_volatile(&sc.ok) } == 0 {
        return 0;
    }
    let mut term = None;
    for (w, word) in sc.acc.iter().enumerate() {
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
pub fn rate_allows(t: &ClsTerm, pkt: &Packet) -> bool {
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
            addr: if t.per == RL_PER_DST { pkt.dst } else { pkt.src },
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
