//! moat's XDP data plane: one program, `moat_ingress`, attached to every
//! interface moat serves. It classifies each packet as ours or not, delivers
//! protected traffic into the chosen customer GRE tunnel, and takes the
//! customer's return traffic out of its tunnel. Every verdict leaves through
//! [`verdict`], which counts it under its reason.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The atomic add of the rate limiter's buckets (see rules.rs).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
// `#[inline(always)]` on the flow-hash closure handed to `encap`.
#![cfg_attr(target_arch = "bpf", feature(stmt_expr_attributes))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod csum;
#[cfg(target_arch = "bpf")]
mod decap;
#[cfg(target_arch = "bpf")]
mod encap;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod mem;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod rules;
#[cfg(target_arch = "bpf")]
mod stats;

#[cfg(target_arch = "bpf")]
mod runtime;

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{
        bindings::xdp_action,
        macros::{map, xdp},
        maps::PerCpuArray,
        programs::XdpContext,
    };
    use moat_common::{limits::NO_ROUTE_SET, Reason, LOCAL_TUNNEL_ENDPOINT};

    use crate::{
        decap, encap, maps, mem,
        parse::{self, Family, Packet},
        rules, stats,
    };

    /// The result of processing: an XDP action and the reason it is counted under.
    pub type Outcome = Result<(u32, Reason), Reason>;

    // `#[xdp]` calls this function from the program's entry point: it is
    // inlined there, or every packet pays a BPF-to-BPF call (see
    // loader.rs's test that the object has none).
    #[xdp]
    #[inline(always)]
    pub fn moat_ingress(ctx: XdpContext) -> u32 {
        ingress(&ctx)
    }

    #[inline(always)]
    fn ingress(ctx: &XdpContext) -> u32 {
        let frame_len = (ctx.data_end() - ctx.data()) as u64;
        match process(ctx) {
            Ok((action, reason)) => verdict(action, reason, frame_len),
            Err(reason) => verdict(xdp_action::XDP_DROP, reason, frame_len),
        }
    }

    /// The single exit: counts the reason and returns the action.
    #[inline(always)]
    fn verdict(action: u32, reason: Reason, frame_len: u64) -> u32 {
        stats::count_reason(reason, frame_len);
        action
    }

    /// Benchmark harness, never attached: runs the pipeline, then puts the
    /// packet back as it was (head position and first 64 bytes, all that the
    /// pipeline rewrites in an unpadded frame) so that BPF_PROG_TEST_RUN's
    /// repeat loop feeds it the same input every time.
    #[xdp]
    #[inline(always)]
    pub fn moat_bench(ctx: XdpContext) -> u32 {
        bench_around(&ctx, true)
    }

    /// The harness around no pipeline at all: its cost is the restore overhead.
    #[xdp]
    #[inline(always)]
    pub fn moat_bench_nop(ctx: XdpContext) -> u32 {
        bench_around(&ctx, false)
    }

    /// The harness's copy of the packet's first 64 bytes and its length
    /// before the pipeline, kept in a map rather than on the stack, which
    /// the pipeline needs all of.
    #[repr(C)]
    pub struct BenchSaved {
        head: [u64; 8],
        len: u64,
    }

    #[map]
    static BENCH_SAVED: PerCpuArray<BenchSaved> = PerCpuArray::with_max_entries(1, 0);

    #[inline(always)]
    fn bench_around(ctx: &XdpContext, pipeline: bool) -> u32 {
        let Some(slot) = BENCH_SAVED.get_ptr_mut(0) else {
            return xdp_action::XDP_ABORTED;
        };
        let Some(head) = parse::ptr::<[u64; 8]>(ctx, 0) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: `ptr` checked that 64 bytes lie inside the packet.
        let head = unsafe { &*head };
        // SAFETY: the per-CPU slot is this program run's own.
        unsafe {
            mem::copy(&mut (*slot).head, head);
            (*slot).len = (ctx.data_end() - ctx.data()) as u64;
        }
        let action = if pipeline { ingress(ctx) } else { xdp_action::XDP_DROP };
        // The lengths as plain numbers, through the map (computed in
        // place, the compiler would fold them into packet pointer math).
        // SAFETY: as above; the slot was filled on this CPU.
        let (before, after) = unsafe {
            let before = core::ptr::read_volatile(&(*slot).len);
            core::ptr::write_volatile(&mut (*slot).len, (ctx.data_end() - ctx.data()) as u64);
            (before, core::ptr::read_volatile(&(*slot).len))
        };
        // SAFETY: moves the packet start back to where it was; pointers are
        // derived again afterwards.
        if unsafe { aya_ebpf::helpers::bpf_xdp_adjust_head(ctx.ctx, after as i32 - before as i32) } != 0 {
            return xdp_action::XDP_ABORTED;
        }
        match parse::ptr::<[u64; 8]>(ctx, 0) {
            // SAFETY: `ptr` checked that 64 bytes lie inside the packet;
            // the slot was filled above on this CPU.
            Some(p) => unsafe { mem::copy(&mut *p, &(*slot).head) },
            None => return xdp_action::XDP_ABORTED,
        }
        action
    }

    #[inline(always)]
    fn process(ctx: &XdpContext) -> Outcome {
        let pkt = match parse::parse(ctx)? {
            Some(p) => p,
            None => return Ok((xdp_action::XDP_PASS, Reason::PassNotIp)),
        };
        if pkt.family == Family::V4 && pkt.proto == parse::IPPROTO_GRE {
            // SAFETY: the value is only read; the map holds plain integers.
            if let Some(flags) = unsafe { maps::LOCAL_ADDRS.get(pkt.dst[0]) } {
                if *flags & LOCAL_TUNNEL_ENDPOINT != 0 {
                    return decap::decapsulate(ctx, &pkt);
                }
            }
        }
        let Some(active) = maps::ACTIVE.get(0) else {
            return Err(Reason::DropInternal);
        };
        let dest = match lookup_dest(&pkt, active) {
            Some(d) => d,
            None => return Ok((xdp_action::XDP_PASS, Reason::PassNotProtected)),
        };
        let frame_len = pkt.frame_len as u64;
        let on = active[moat_common::active::PROTECTIONS as usize] as u32;
        let scratch = protect(&pkt, on).and_then(|()| rules::scratch().ok_or(Reason::DropInternal));
        let (dest, out) = match scratch {
            Err(reason) => (dest, Err(reason)),
            Ok(sc) => {
                let copy = rules::prepare(ctx, &pkt, sc, active[moat_common::active::RULES as usize]);
                let deliver = encap::Deliver::of(&pkt);
                // From here on nothing of the parse is used but what
                // crosses this barrier, so every way through the parser
                // reaches the rules in one state and the verifier checks
                // them once.
                let dest = rules::barrier(sc, dest);
                let deliver = encap::Deliver(rules::opaque(sc, deliver.0));
                let reflect = rules::opaque(sc, reflect_port(&pkt, on));
                // A later fragment the rules let through is still dropped
                // when its datagram's first fragment was.
                let ruled = apply_rules(sc, copy, reflect, dest.customer, frame_len)
                    .and_then(|()| rules::FragDrop::earlier(sc).map_or(Ok(()), Err));
                let out = match ruled {
                    Err(reason) => {
                        rules::FragDrop::record(sc, reason);
                        Err(reason)
                    }
                    Ok(()) if dest.route_set == NO_ROUTE_SET => Err(Reason::DropNoRoute),
                    Ok(()) => encap::encapsulate(
                        ctx,
                        deliver,
                        dest.route_set,
                        #[inline(always)]
                        || rules::flow_hash(sc),
                    ),
                };
                (dest, out)
            }
        };
        // Every packet is forwarded or dropped: userspace adds the two up
        // as received (see `CustomerStats`), one counter less per packet.
        if let Some(s) = stats::customer(dest.customer) {
            match out {
                Ok(_) => stats::bump(&mut s.in_forwarded, frame_len),
                Err(_) => stats::bump(&mut s.in_dropped, frame_len),
            }
        }
        out
    }

    /// The operator's mitigation rules (the first that matches decides:
    /// drop, pass, or pass while its token bucket has credit), then the
    /// customer's firewall (the first that matches decides: block or
    /// allow; no match allows), then the reflection protection (`reflect`:
    /// see [`reflect_port`]), which an operator pass or a firewall allow
    /// overrides. Every match is counted under its rule.
    #[inline(always)]
    fn apply_rules(
        sc: &mut rules::Scratch,
        copy: Option<u32>,
        reflect: u64,
        customer: u32,
        frame_len: u64,
    ) -> Result<(), Reason> {
        use moat_common::rules::*;
        let mut allowed = false;
        if let Some(c) = copy {
            if let Some(t) = rules::classify(sc, c, SET_MITIGATION) {
                stats::count_rule(t.stat, frame_len);
                match t.action {
                    CLS_DROP => return Err(Reason::DropMitigationRule),
                    CLS_RATE_LIMIT => {
                        if !rules::rate_allows(t, sc) {
                            return Err(Reason::DropRateLimit);
                        }
                    }
                    _ => allowed = true,
                }
            }
            // Every outcome of the operator's rules reaches the firewall
            // in one state (see `rules::opaque`).
            let set = rules::opaque(
                sc,
                u64::from(rules::firewall_set(c, customer)) | u64::from(allowed) << 32,
            );
            allowed = set >> 32 != 0;
            let set = set as u32;
            if set != SET_NONE {
                if let Some(t) = rules::classify(sc, c, set) {
                    stats::count_rule(t.stat, frame_len);
                    if t.action == CLS_DROP {
                        return Err(Reason::DropFirewall);
                    }
                    allowed = true;
                }
            }
        }
        if !allowed && reflect != 0 && reflector(reflect - 1) {
            return Err(Reason::DropReflection);
        }
        Ok(())
    }

    /// For UDP with the reflection protection on: `1 +` its source port,
    /// which [`reflector`] checks once the rules have not decided (most
    /// often they have, and the port is never looked up); else 0.
    #[inline(always)]
    fn reflect_port(pkt: &Packet, on: u32) -> u64 {
        if pkt.proto != parse::IPPROTO_UDP || on & moat_common::protect::REFLECTION == 0 {
            return 0;
        }
        let Some(ports) = pkt.ports else {
            return 0;
        };
        let b = ports.to_ne_bytes();
        1 + u64::from(u16::from_be_bytes([b[0], b[1]]))
    }

    /// Whether `port` is a reflector's source port.
    #[inline(always)]
    fn reflector(port: u64) -> bool {
        let port = port as u32 & 0xffff;
        match maps::REFLECT_PORTS.get(port / 64) {
            Some(w) => w & (1 << (port % 64)) != 0,
            None => false,
        }
    }

    /// The built-in protections in force, for traffic to a protected prefix.
    #[inline(always)]
    fn protect(pkt: &Packet, on: u32) -> Result<(), Reason> {
        use moat_common::protect::*;
        if on == 0 {
            return Ok(());
        }
        if on & LAND != 0 && pkt.src == pkt.dst {
            return Err(Reason::DropLand);
        }
        if on & INVALID_TCP_FLAGS != 0
            && pkt.proto == parse::IPPROTO_TCP
            && !pkt.later_frag
            && invalid_tcp_flags(pkt.tcp_flags)
        {
            return Err(Reason::DropInvalidTcpFlags);
        }
        if on & ZERO_PORTS != 0 {
            if let Some(p) = pkt.ports {
                // Network-order port bytes: source in the first two, destination
                // in the last two, so each port is one half of the word.
                let b = p.to_ne_bytes();
                let (sport, dport) = (u16::from_ne_bytes([b[0], b[1]]), u16::from_ne_bytes([b[2], b[3]]));
                if sport == 0 || dport == 0 {
                    return Err(Reason::DropZeroPort);
                }
            }
        }
        Ok(())
    }

    /// Destination lookup in the multibit table (inlined array loads, no
    /// kernel call), or in the LPM table when no multibit table is live
    /// (the family's word of `active`).
    /// Each lookup names its map directly: a call site shared by two maps is
    /// not inlined by the verifier and costs an indirect call.
    #[inline(always)]
    fn lookup_dest(
        pkt: &Packet,
        active: &[u64; moat_common::active::WORDS as usize],
    ) -> Option<moat_common::DestValue> {
        use moat_common::{active::*, dir_value, limits::*, DIR_CHILD, DIR_LEAF};
        let top = u32::from_be(pkt.dst[0]);
        match pkt.family {
            Family::V4 => {
                let buf = active[DIR4 as usize] as u32;
                if buf >= DIR_NONE {
                    let k = maps::Key4 {
                        prefix_len: 32,
                        addr: pkt.dst[0],
                    };
                    return maps::DEST4.get(maps::as_key::<_, [u8; 4]>(&k)).copied();
                }
                let mut e = *maps::DIR4_ROOT.get(buf * DIR_ROOT + (top >> 16))?;
                for level in 0..DIR_LEVELS4 {
                    if e & DIR_CHILD == 0 {
                        break;
                    }
                    let byte = (top >> (8 - 8 * level as u32)) & 0xff;
                    let node = (e as u32) & (DIR_NODES - 1);
                    e = *maps::DIR4_NODES.get((buf * DIR_NODES + node) * DIR_NODE + byte)?;
                }
                (e & DIR_LEAF != 0).then(|| dir_value(e))
            }
            Family::V6 => {
                let buf = active[DIR6 as usize] as u32;
                if buf >= DIR_NONE {
                    let k = maps::Key6 {
                        prefix_len: 128,
                        addr: pkt.dst,
                    };
                    return maps::DEST6.get(maps::as_key::<_, [u8; 16]>(&k)).copied();
                }
                // SAFETY: [u32; 4] and [u8; 16] have the same size; the words
                // hold the address bytes in wire order.
                let bytes: [u8; 16] = unsafe { core::mem::transmute(pkt.dst) };
                let mut e = *maps::DIR6_ROOT.get(buf * DIR_ROOT + (top >> 16))?;
                for level in 0..DIR_LEVELS6 {
                    if e & DIR_CHILD == 0 {
                        break;
                    }
                    let byte = bytes[2 + level] as u32;
                    let node = (e as u32) & (DIR_NODES - 1);
                    e = *maps::DIR6_NODES.get((buf * DIR_NODES + node) * DIR_NODE + byte)?;
                }
                (e & DIR_LEAF != 0).then(|| dir_value(e))
            }
        }
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
