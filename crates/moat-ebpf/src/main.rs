//! moat's XDP data plane: one program, `moat_ingress`, attached to every
//! interface moat serves. It classifies each packet as ours or not, delivers
//! protected traffic into the chosen customer GRE tunnel, and takes the
//! customer's return traffic out of its tunnel. Every verdict leaves through
//! [`verdict`], which counts it under its reason.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod csum;
#[cfg(target_arch = "bpf")]
mod decap;
#[cfg(target_arch = "bpf")]
mod encap;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod stats;

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
    use moat_common::{limits::NO_ROUTE_SET, Reason, LOCAL_TUNNEL_ENDPOINT};

    use crate::{
        decap, encap, maps,
        parse::{self, Family, Packet},
        stats,
    };

    /// The result of processing: an XDP action and the reason it is counted under.
    pub type Outcome = Result<(u32, Reason), Reason>;

    #[xdp]
    pub fn moat_ingress(ctx: XdpContext) -> u32 {
        let frame_len = (ctx.data_end() - ctx.data()) as u64;
        match process(&ctx) {
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

    #[inline(always)]
    fn process(ctx: &XdpContext) -> Outcome {
        let pkt = match parse::parse(ctx)? {
            Some(p) => p,
            None => return Ok((xdp_action::XDP_PASS, Reason::PassNotIp)),
        };
        if pkt.family == Family::V4 && pkt.proto == parse::IPPROTO_GRE {
            // SAFETY: the value is only read; the map holds plain integers.
            if let Some(flags) = unsafe { maps::LOCAL_ADDRS.get(&pkt.dst4(ctx)) } {
                if *flags & LOCAL_TUNNEL_ENDPOINT != 0 {
                    return decap::decapsulate(ctx, &pkt);
                }
            }
        }
        let dest = match lookup_dest(ctx, &pkt) {
            Some(d) => d,
            None => return Ok((xdp_action::XDP_PASS, Reason::PassNotProtected)),
        };
        let frame_len = pkt.frame_len as u64;
        if let Some(s) = stats::customer(dest.customer) {
            stats::bump(&mut s.in_received, frame_len);
        }
        let out = if dest.route_set == NO_ROUTE_SET {
            Err(Reason::DropNoRoute)
        } else {
            encap::encapsulate(ctx, &pkt, dest.route_set)
        };
        if let Some(s) = stats::customer(dest.customer) {
            match out {
                Ok(_) => stats::bump(&mut s.in_forwarded, frame_len),
                Err(_) => stats::bump(&mut s.in_dropped, frame_len),
            }
        }
        out
    }

    #[inline(always)]
    fn lookup_dest(ctx: &XdpContext, pkt: &Packet) -> Option<moat_common::DestValue> {
        use aya_ebpf::maps::lpm_trie::Key;
        match pkt.family {
            Family::V4 => maps::DEST4.get(Key::new(32, pkt.dst4(ctx))).copied(),
            Family::V6 => maps::DEST6.get(Key::new(128, pkt.dst6(ctx))).copied(),
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        // The verifier rejects any path that could reach here; this exists
        // only to satisfy no_std.
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
