//! Customer -> internet: GRE from a known tunnel -> anti-spoofing -> route
//! the inner packet with the kernel's FIB -> transmit.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, xdp_action, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use moat_common::{DecapKey, DecapValue, Reason, LOCAL_NODE_ADDRESS};

use crate::{
    encap::{decrement_ttl, transmit, trim},
    maps::{as_key, SourceKey4W, SourceKey6W, DECAP, LOCAL_ADDRS, SOURCE4, SOURCE6},
    parse::{load, parse_ip, ptr, Family, Packet, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_ICMP},
    program::Outcome,
    stats,
};

const GRE_C: u16 = 0x8000;
const GRE_K: u16 = 0x2000;
const GRE_S: u16 = 0x1000;
/// Routing present, strict source route, recursion control, version: must be zero.
const GRE_MUST_BE_ZERO: u16 = 0x4000 | 0x0800 | 0x0700 | 0x0007;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

#[inline(always)]
pub fn decapsulate(ctx: &XdpContext, outer: &Packet) -> Outcome {
    if outer.frag {
        return Err(Reason::DropGreMalformed);
    }
    let gre = outer.l4;
    let ip_end = outer.l3 + outer.ip_len;
    if gre + 4 > ip_end {
        return Err(Reason::DropGreMalformed);
    }
    let g = load::<[u16; 2]>(ctx, gre).ok_or(Reason::DropGreMalformed)?;
    let flags = u16::from_be(g[0]);
    if flags & GRE_MUST_BE_ZERO != 0 {
        return Err(Reason::DropGreMalformed);
    }
    let csum_len = if flags & GRE_C != 0 { 4 } else { 0 };
    let key_len = if flags & GRE_K != 0 { 4 } else { 0 };
    let seq_len = if flags & GRE_S != 0 { 4 } else { 0 };
    let inner = gre + 4 + csum_len + key_len + seq_len;
    if inner > ip_end {
        return Err(Reason::DropGreMalformed);
    }
    let key = if key_len != 0 {
        load::<u32>(ctx, gre + 4 + csum_len).ok_or(Reason::DropGreMalformed)?
    } else {
        0
    };
    let dk = DecapKey {
        local: outer.dst[0].to_ne_bytes(),
        remote: outer.src[0].to_ne_bytes(),
        key: key.to_ne_bytes(),
        has_key: (key_len != 0) as u32,
    };
    // SAFETY: read-only; copied out at once.
    let tunnel: DecapValue = *unsafe { DECAP.get(dk) }.ok_or(Reason::DropGreUnknownTunnel)?;

    let frame_len = outer.frame_len as u64;
    if let Some(s) = stats::tunnel(tunnel.tunnel) {
        stats::bump(&mut s.rx, frame_len);
    }
    let out = forward_inner(ctx, outer, &tunnel, u16::from_be(g[1]), inner, ip_end);
    if let Some(s) = stats::customer(tunnel.customer) {
        stats::bump(&mut s.out_received, frame_len);
        match out {
            Ok((_, Reason::PassTunnelToNode)) => {}
            Ok(_) => stats::bump(&mut s.out_forwarded, frame_len),
            Err(_) => stats::bump(&mut s.out_dropped, frame_len),
        }
    }
    out
}

#[inline(always)]
fn forward_inner(
    ctx: &XdpContext,
    outer: &Packet,
    tunnel: &DecapValue,
    payload: u16,
    inner_off: usize,
    ip_end: usize,
) -> Outcome {
    let family = match payload {
        ETH_P_IPV4 => Family::V4,
        ETH_P_IPV6 => Family::V6,
        _ => return Err(Reason::DropGreUnsupportedPayload),
    };
    let inner = parse_ip(ctx, family, inner_off, ip_end)?;

    if family == Family::V4 && inner.proto == IPPROTO_ICMP {
        // SAFETY: read-only use of a plain-integer map value.
        if let Some(f) = unsafe { LOCAL_ADDRS.get(inner.dst[0]) } {
            if *f & LOCAL_NODE_ADDRESS != 0 {
                return Ok((xdp_action::XDP_PASS, Reason::PassTunnelToNode));
            }
        }
    }

    let customer = tunnel.customer.to_be();
    let allowed = match family {
        Family::V4 => {
            let k = SourceKey4W {
                prefix_len: 64,
                customer,
                addr: inner.src[0],
            };
            SOURCE4.get(as_key::<_, [u8; 8]>(&k)).is_some()
        }
        Family::V6 => {
            let k = SourceKey6W {
                prefix_len: 160,
                customer,
                addr: inner.src,
            };
            SOURCE6.get(as_key::<_, [u8; 20]>(&k)).is_some()
        }
    };
    if !allowed {
        return Err(Reason::DropSpoofedSource);
    }
    let ttl = ptr::<u16>(ctx, inner.ttl_off).ok_or(Reason::DropInternal)?;
    // SAFETY: `ptr` checked the bytes lie inside the packet.
    if unsafe { *(ttl as *const u8) } <= 1 {
        return Err(Reason::DropTtlExpired);
    }

    let mut fib = core::mem::MaybeUninit::<bpf_fib_lookup>::uninit();
    // SAFETY: zeroes the whole structure, a plain C struct (sized and
    // aligned for `zero`) for which all-zero is a valid starting value.
    let fib = unsafe {
        crate::mem::zero(fib.as_mut_ptr());
        fib.assume_init_mut()
    };
    fib.l4_protocol = inner.proto;
    fib.__bindgen_anon_1.tot_len = inner.ip_len as u16;
    // SAFETY: reading a field of the context the kernel handed us.
    fib.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    match family {
        Family::V4 => {
            fib.family = AF_INET;
            let tos = load::<u16>(ctx, inner.l3).ok_or(Reason::DropInternal)?.to_le_bytes()[1];
            fib.__bindgen_anon_2.tos = tos;
            fib.__bindgen_anon_3.ipv4_src = inner.src[0];
            fib.__bindgen_anon_4.ipv4_dst = inner.dst[0];
        }
        Family::V6 => {
            fib.family = AF_INET6;
            fib.__bindgen_anon_3.ipv6_src = inner.src;
            fib.__bindgen_anon_4.ipv6_dst = inner.dst;
        }
    }
    let orig_macs = load::<[u16; 6]>(ctx, 0).ok_or(Reason::DropInternal)?;
    // SAFETY: `fib` is a valid, exclusively borrowed lookup structure of the size passed.
    let rc = unsafe { fib_lookup(ctx.ctx as *mut _, fib, core::mem::size_of::<bpf_fib_lookup>() as i32, 0) } as u32;
    let ethertype = match family {
        Family::V4 => ETH_P_IPV4,
        Family::V6 => ETH_P_IPV6,
    };
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {
            decrement_ttl(ctx, &inner)?;
            strip(ctx, outer.frame_len, &inner, ethertype)?;
            let h = ptr::<[u8; 14]>(ctx, 0).ok_or(Reason::DropInternal)?;
            // SAFETY: `ptr` checked that 14 bytes lie inside the packet.
            let h = unsafe { &mut *h };
            h[0..6].copy_from_slice(&fib.dmac);
            h[6..12].copy_from_slice(&fib.smac);
            Ok((transmit(ctx, fib.ifindex), Reason::ForwardDecap))
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            strip(ctx, outer.frame_len, &inner, ethertype)?;
            let h = ptr::<[u16; 6]>(ctx, 0).ok_or(Reason::DropInternal)?;
            // SAFETY: `ptr` checked that 12 bytes lie inside the packet.
            unsafe { *h = orig_macs };
            Ok((xdp_action::XDP_PASS, Reason::PassDecapToKernel))
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(Reason::DropDecapMtu),
        _ => Err(Reason::DropDecapUnroutable),
    }
}

/// Removes everything before the inner IP header except room for a new
/// Ethernet header, and anything after the inner packet.
#[inline(always)]
fn strip(ctx: &XdpContext, frame_len: usize, inner: &Packet, ethertype: u16) -> Result<(), Reason> {
    trim(ctx, frame_len, inner.l3 + inner.ip_len)?;
    let cut = inner.l3 as i32 - 14;
    // SAFETY: moves the packet start forward; pointers are derived again below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, cut) } != 0 {
        return Err(Reason::DropInternal);
    }
    let h = ptr::<[u16; 7]>(ctx, 0).ok_or(Reason::DropInternal)?;
    // SAFETY: `ptr` checked that 14 bytes lie inside the packet.
    unsafe { (*h)[6] = ethertype.to_be() };
    Ok(())
}
