//! Internet -> customer: route set -> tunnel -> TTL -> MTU -> GRE -> transmit.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use moat_common::{header, limits::ECMP_SLOTS, Reason, Tunnel, ROUTE_SET_TABLE, TUNNEL_NEXTHOP_VALID, TUNNEL_PRESENT};

use crate::{
    csum,
    maps::{ECMP_TABLES, ROUTE_SETS, TUNNELS, TUNNEL_SLOT},
    parse::{ptr, Family, Ipv4Hdr, Packet, ETH_P_IPV4, ETH_P_IPV6},
    program::Outcome,
    stats,
};

/// What encapsulation needs of a parsed packet, in one word (so that it
/// can pass the verifier's state barrier before the rules, see main.rs):
/// the IP length (bits 0-16), the IP header's offset (17-24) and IPv6
/// (25). The flow hash is not in it: only a route set of several tunnels
/// needs it, and then it is computed from the classifier's copy of the
/// packet's values (`rules::flow_hash`).
#[derive(Clone, Copy)]
pub struct Deliver(pub u64);

impl Deliver {
    #[inline(always)]
    pub fn of(pkt: &Packet) -> Deliver {
        let v6 = u64::from(pkt.family == Family::V6);
        Deliver((pkt.ip_len as u64 & 0x1_ffff) | (pkt.l3 as u64 & 0xff) << 17 | v6 << 25)
    }

    #[inline(always)]
    fn ip_len(self) -> usize {
        (self.0 & 0x1_ffff) as usize
    }

    #[inline(always)]
    fn l3(self) -> usize {
        ((self.0 >> 17) & 0xff) as usize
    }

    #[inline(always)]
    fn family(self) -> Family {
        if self.0 >> 25 & 1 != 0 {
            Family::V6
        } else {
            Family::V4
        }
    }

    /// The TTL / hop limit byte's offset (as the parser has it).
    #[inline(always)]
    fn ttl_off(self) -> usize {
        match self.family() {
            Family::V4 => self.l3() + 8,
            Family::V6 => self.l3() + 7,
        }
    }
}

/// Picks the tunnel of a route set for this packet's flow (`hash`: its
/// flow hash, computed only for a route set of several tunnels).
#[inline(always)]
fn choose_tunnel(hash: impl FnOnce() -> u32, route_set: u32) -> Result<u32, Reason> {
    let v = *ROUTE_SETS.get(route_set).ok_or(Reason::DropInternal)?;
    if v & ROUTE_SET_TABLE == 0 {
        return Ok(v);
    }
    let table = ECMP_TABLES.get(v & !ROUTE_SET_TABLE).ok_or(Reason::DropInternal)?;
    let slot = (hash() as usize) & (ECMP_SLOTS - 1);
    // SAFETY: slot < ECMP_SLOTS by the mask above.
    Ok(unsafe { *table.slots.as_ptr().add(slot) } as u32)
}

/// The live slot of a tunnel.
#[inline(always)]
fn tunnel(id: u32) -> Result<&'static Tunnel, Reason> {
    let live = *TUNNEL_SLOT.get(id).ok_or(Reason::DropInternal)? & 1;
    let t = TUNNELS.get(id.wrapping_mul(2) | live).ok_or(Reason::DropInternal)?;
    if t.flags & TUNNEL_PRESENT == 0 {
        return Err(Reason::DropInternal);
    }
    Ok(t)
}

#[inline(always)]
pub fn encapsulate(ctx: &XdpContext, d: Deliver, route_set: u32, hash: impl FnOnce() -> u32) -> Outcome {
    let tunnel_id = choose_tunnel(hash, route_set)?;
    let t = tunnel(tunnel_id)?;

    let (l3, ip_len) = (d.l3(), d.ip_len());
    let ttl = ptr::<u16>(ctx, d.ttl_off()).ok_or(Reason::DropInternal)?;
    // SAFETY: `ptr` checked the bytes lie inside the packet.
    if unsafe { *(ttl as *const u8) } <= 1 {
        return Err(Reason::DropTtlExpired);
    }
    if ip_len > t.mtu as usize {
        return Err(Reason::DropMtuExceeded);
    }
    if t.flags & TUNNEL_NEXTHOP_VALID == 0 {
        return Err(Reason::DropNoNextHop);
    }
    let header_len = t.header_len as usize;
    let outer_len = header_len - 14 + ip_len;
    if outer_len > t.link_mtu as usize {
        return Err(Reason::DropNextHopMtu);
    }

    decrement_ttl_at(ctx, d.family(), l3, d.ttl_off())?;
    trim(ctx, ctx.data_end() - ctx.data(), l3 + ip_len)?;
    let grow = header_len as i32 - l3 as i32;
    // SAFETY: the helper only moves the packet's start pointer; every pointer
    // used afterwards is derived again from the context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return Err(Reason::DropInternal);
    }

    // Copy the template in words: bytes 0..36 always, the key only when
    // present; then patch length, checksum and protocol. Packet words may be
    // unaligned, which the targets moat runs on handle natively (and the
    // verifier allows for packet pointers).
    let h = ptr::<[u16; 21]>(ctx, 0).ok_or(Reason::DropInternal)? as *mut u8;
    let src = t.header.as_ptr();
    let proto: u16 = match d.family() {
        Family::V4 => ETH_P_IPV4,
        Family::V6 => ETH_P_IPV6,
    };
    let check = !csum::fold(t.outer_csum_partial as u32 + outer_len as u32);
    // SAFETY: `ptr` checked 42 bytes at the new start lie inside the packet
    // (the frame is at least header_len + 20 bytes), and `header_len` is 38
    // or 42, so no store reaches past the template's end into the inner packet.
    unsafe {
        let (d64, s64) = (h as *mut u64, src as *const u64);
        for i in 0..4 {
            *d64.add(i) = *s64.add(i);
        }
        *(h.add(32) as *mut u16) = *(src.add(32) as *const u16);
        *(h.add(header::GRE) as *mut u16) = *(src.add(header::GRE) as *const u16);
        *(h.add(header::GRE_PROTO) as *mut u16) = proto.to_be();
        if header_len > 38 {
            *(h.add(header::GRE_KEY) as *mut u32) = *(src.add(header::GRE_KEY) as *const u32);
        }
        *(h.add(header::IP_TOT_LEN) as *mut u16) = (outer_len as u16).to_be();
        *(h.add(header::IP_CHECK) as *mut u16) = check.to_be();
    }

    if let Some(s) = stats::tunnel(tunnel_id) {
        stats::bump(&mut s.tx, (14 + outer_len) as u64);
    }
    Ok((transmit(ctx, t.ifindex), Reason::ForwardEncap))
}

/// Decrements the TTL / hop limit in place, fixing the IPv4 checksum.
#[inline(always)]
pub fn decrement_ttl(ctx: &XdpContext, pkt: &Packet) -> Result<(), Reason> {
    decrement_ttl_at(ctx, pkt.family, pkt.l3, pkt.ttl_off)
}

/// [`decrement_ttl`] for an IP header at `l3` whose TTL / hop limit is at `ttl_off`.
#[inline(always)]
fn decrement_ttl_at(ctx: &XdpContext, family: Family, l3: usize, ttl_off: usize) -> Result<(), Reason> {
    match family {
        Family::V4 => {
            let h = ptr::<Ipv4Hdr>(ctx, l3).ok_or(Reason::DropInternal)?;
            // SAFETY: `ptr` checked the header lies inside the packet.
            unsafe {
                (*h).ttl -= 1;
                (*h).check = csum::ttl_decrement(u16::from_be((*h).check)).to_be();
            }
        }
        Family::V6 => {
            let p = ptr::<u16>(ctx, ttl_off).ok_or(Reason::DropInternal)? as *mut u8;
            // SAFETY: `ptr` checked the bytes lie inside the packet.
            unsafe { *p -= 1 };
        }
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
