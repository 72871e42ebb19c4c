//! Internet -> customer: route set -> tunnel -> TTL -> MTU -> GRE -> transmit.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use moat_common::{
    flowhash::{mix, SEED},
    limits::ECMP_SLOTS,
    Reason, Tunnel, TUNNEL_HAS_KEY, TUNNEL_NEXTHOP_VALID,
};

use crate::{
    csum,
    maps::{ECMP_TABLES, ROUTE_SETS, TUNNELS},
    parse::{at, read, Family, Packet, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_GRE},
    program::Outcome,
    stats,
};

const ETH_LEN: usize = 14;
const OUTER_IP_LEN: usize = 20;

/// The flow hash of moat_common::flowhash's specification.
#[inline(always)]
pub fn flow_hash(ctx: &XdpContext, pkt: &Packet) -> u32 {
    let mut h = SEED;
    match pkt.family {
        Family::V4 => {
            h = mix(h, u32::from_le_bytes(pkt.src4(ctx)));
            h = mix(h, u32::from_le_bytes(pkt.dst4(ctx)));
        }
        Family::V6 => {
            let (s, d) = (pkt.src6(ctx), pkt.dst6(ctx));
            for i in 0..4 {
                h = mix(
                    h,
                    u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]),
                );
            }
            for i in 0..4 {
                h = mix(
                    h,
                    u32::from_le_bytes([d[4 * i], d[4 * i + 1], d[4 * i + 2], d[4 * i + 3]]),
                );
            }
        }
    }
    h = mix(h, pkt.proto as u32);
    if let Some(ports) = pkt.ports {
        h = mix(h, ports);
    }
    h
}

/// Picks the tunnel of a route set for this packet's flow.
#[inline(always)]
fn choose_tunnel(ctx: &XdpContext, pkt: &Packet, route_set: u32) -> Result<u32, Reason> {
    // SAFETY: read-only use of a plain-integer map value.
    let rs = unsafe { ROUTE_SETS.get(&route_set) }.ok_or(Reason::DropInternal)?;
    if rs.members <= 1 {
        return Ok(rs.tunnel);
    }
    let table = ECMP_TABLES.get(rs.table).ok_or(Reason::DropInternal)?;
    let slot = (flow_hash(ctx, pkt) as usize) & (ECMP_SLOTS - 1);
    // SAFETY: slot < ECMP_SLOTS by the mask above.
    Ok(unsafe { *table.slots.as_ptr().add(slot) } as u32)
}

#[inline(always)]
pub fn encapsulate(ctx: &XdpContext, pkt: &Packet, route_set: u32) -> Outcome {
    let tunnel_id = choose_tunnel(ctx, pkt, route_set)?;
    // SAFETY: read-only; the value is copied out at once.
    let t: Tunnel = *unsafe { TUNNELS.get(&tunnel_id) }.ok_or(Reason::DropInternal)?;

    let ttl = read::<2>(ctx, pkt.ttl_off).ok_or(Reason::DropInternal)?[0];
    if ttl <= 1 {
        return Err(Reason::DropTtlExpired);
    }
    if pkt.ip_len > t.mtu as usize {
        return Err(Reason::DropMtuExceeded);
    }
    if t.flags & TUNNEL_NEXTHOP_VALID == 0 {
        return Err(Reason::DropNoNextHop);
    }
    let has_key = t.flags & TUNNEL_HAS_KEY != 0;
    let gre_len: usize = if has_key { 8 } else { 4 };
    let outer_len = OUTER_IP_LEN + gre_len + pkt.ip_len;
    if outer_len > t.link_mtu as usize {
        return Err(Reason::DropNextHopMtu);
    }

    decrement_ttl(ctx, pkt)?;
    trim(ctx, pkt.frame_len, pkt.l3 + pkt.ip_len)?;
    let grow = (ETH_LEN + OUTER_IP_LEN + gre_len) as i32 - pkt.l3 as i32;
    // SAFETY: the helper only moves the packet's start pointer; every pointer
    // used afterwards is derived again from the context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return Err(Reason::DropInternal);
    }

    let h = at::<42>(ctx, 0).ok_or(Reason::DropInternal)?;
    // SAFETY: `at` checked that 42 bytes lie inside the packet.
    let h = unsafe { &mut *h };
    h[0..6].copy_from_slice(&t.dmac);
    h[6..12].copy_from_slice(&t.smac);
    h[12..14].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
    let ip = &mut h[14..34];
    ip[0] = 0x45;
    ip[1] = 0;
    ip[2..4].copy_from_slice(&(outer_len as u16).to_be_bytes());
    ip[4] = 0;
    ip[5] = 0;
    ip[6] = 0x40; // DF: the outer packet is never fragmented by us
    ip[7] = 0;
    ip[8] = t.ttl;
    ip[9] = IPPROTO_GRE;
    let check = !csum::fold(t.outer_csum_partial as u32 + outer_len as u32);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    ip[12..16].copy_from_slice(&t.local);
    ip[16..20].copy_from_slice(&t.remote);
    let gre = &mut h[34..42];
    gre[0] = if has_key { 0x20 } else { 0 };
    gre[1] = 0;
    let proto = match pkt.family {
        Family::V4 => ETH_P_IPV4,
        Family::V6 => ETH_P_IPV6,
    };
    gre[2..4].copy_from_slice(&proto.to_be_bytes());
    if has_key {
        gre[4..8].copy_from_slice(&t.key);
    }

    if let Some(s) = stats::tunnel(tunnel_id) {
        stats::bump(&mut s.tx, (ETH_LEN + outer_len) as u64);
    }
    Ok((transmit(ctx, t.ifindex), Reason::ForwardEncap))
}

/// Decrements the TTL / hop limit in place, fixing the IPv4 checksum.
#[inline(always)]
pub fn decrement_ttl(ctx: &XdpContext, pkt: &Packet) -> Result<(), Reason> {
    let p = at::<2>(ctx, pkt.ttl_off).ok_or(Reason::DropInternal)?;
    // SAFETY: `at` checked the bytes lie inside the packet.
    unsafe { (*p)[0] -= 1 };
    if pkt.family == Family::V4 {
        let c = at::<2>(ctx, pkt.l3 + 10).ok_or(Reason::DropInternal)?;
        // SAFETY: `at` checked the two bytes lie inside the packet.
        unsafe { *c = csum::ttl_decrement(u16::from_be_bytes(*c)).to_be_bytes() };
    }
    Ok(())
}

/// Cuts bytes after `end` (Ethernet padding, trailing garbage).
#[inline(always)]
pub fn trim(ctx: &XdpContext, frame_len: usize, end: usize) -> Result<(), Reason> {
    if frame_len > end {
        let cut = (frame_len - end) as i32;
        // SAFETY: shrinks the packet; no pointer is kept across the call.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -cut) } != 0 {
            return Err(Reason::DropInternal);
        }
    }
    Ok(())
}

/// XDP_TX when the next hop is behind the receiving interface, else redirect.
#[inline(always)]
pub fn transmit(ctx: &XdpContext, ifindex: u32) -> u32 {
    // SAFETY: reading a field of the context the kernel handed us.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    if ifindex == ingress {
        xdp_action::XDP_TX
    } else {
        // SAFETY: plain helper call; returns XDP_REDIRECT or XDP_ABORTED.
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }
}
