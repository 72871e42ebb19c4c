//! Header parsing with bounds checks the verifier can follow: every offset
//! is capped before it is added to the packet pointer, and fields are read
//! through `#[repr(C)]` header structs so that loads are word-sized (byte
//! arrays would make the compiler copy byte by byte).

use aya_ebpf::programs::XdpContext;
use moat_common::Reason;

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_GRE: u8 = 47;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;
/// Extension headers followed before the packet counts as malformed.
const MAX_EXT_HEADERS: usize = 6;
/// Largest header offset we parse at (L2 + outer IP + GRE + inner IP + ext headers).
pub const MAX_OFFSET: usize = 1024;

/// IPv4 header without options. Multi-byte fields in network order.
#[repr(C)]
pub struct Ipv4Hdr {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub src: u32,
    pub dst: u32,
}

/// IPv6 fixed header.
#[repr(C)]
pub struct Ipv6Hdr {
    pub vtc_flow: u32,
    pub payload_len: u16,
    pub next: u8,
    pub hop_limit: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// What the data plane needs to know about one IP packet.
pub struct Packet {
    pub family: Family,
    /// Offset of the IP header.
    pub l3: usize,
    /// IP total length (IPv4 total length; IPv6 40 + payload length).
    pub ip_len: usize,
    /// IPv4 protocol; IPv6 upper-layer protocol, or for a fragment the
    /// fragment header's next header. This is the flow hash's protocol word.
    pub proto: u8,
    /// Any fragment (first, middle or last).
    pub frag: bool,
    /// A fragment after the first: it carries no L4 header.
    pub later_frag: bool,
    /// The fragment's datagram id (IPv4 identification, IPv6 fragment
    /// header identification); 0 when not a fragment.
    pub frag_id: u32,
    /// Offset of the L4 header (only meaningful when not a later fragment).
    pub l4: usize,
    /// Source and destination port bytes as on the wire, for TCP/UDP that
    /// is not a later fragment.
    pub ports: Option<u32>,
    /// TCP flags byte of TCP that is not a later fragment (else 0).
    pub tcp_flags: u8,
    /// Offset of the IPv4 TTL / IPv6 hop limit byte.
    pub ttl_off: usize,
    pub frame_len: usize,
    /// Addresses as network-order words (IPv4: word 0 only).
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

/// A pointer to a `T` (at least two bytes) at `off`, or `None` if the
/// frame is shorter.
#[inline(always)]
pub fn ptr<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    // A one-byte window compiles to `ptr >= end`, from which the verifier
    // learns no range; every one-byte field we touch has a neighbour.
    const { assert!(core::mem::size_of::<T>() >= 2) };
    if off > MAX_OFFSET {
        return None;
    }
    // Volatile loads: the compiler must not fold this pointer check into an
    // earlier check on lengths, which the verifier cannot relate to the packet.
    // SAFETY: ctx.ctx is the context the kernel passed us; reading its fields is valid.
    let (start, end) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx.ctx).data) as usize,
            core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize,
        )
    };
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// A copy of the `T` at `off`. Packet data may be unaligned; the targets
/// moat runs on load unaligned words natively and the verifier allows it.
#[inline(always)]
pub fn load<T: Copy>(ctx: &XdpContext, off: usize) -> Option<T> {
    // SAFETY: `ptr` checked that the bytes lie inside the packet.
    ptr::<T>(ctx, off).map(|p| unsafe { p.read() })
}

/// Parses Ethernet (optionally one 802.1Q tag) and the IP packet behind it.
/// `Ok(None)` means "not IP".
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Option<Packet>, Reason> {
    let frame_len = ctx.data_end() - ctx.data();
    let mut ethertype = u16::from_be(load::<u16>(ctx, 12).ok_or(Reason::DropTruncatedEthernet)?);
    let mut l3 = 14;
    if ethertype == ETH_P_8021Q {
        ethertype = u16::from_be(load::<u16>(ctx, 16).ok_or(Reason::DropTruncatedEthernet)?);
        l3 = 18;
    }
    let family = match ethertype {
        ETH_P_IPV4 => Family::V4,
        ETH_P_IPV6 => Family::V6,
        _ => return Ok(None),
    };
    parse_ip(ctx, family, l3, frame_len).map(Some)
}

/// Parses an IP packet at `l3` that must end at or before `limit`.
#[inline(always)]
pub fn parse_ip(ctx: &XdpContext, family: Family, l3: usize, limit: usize) -> Result<Packet, Reason> {
    let frame_len = ctx.data_end() - ctx.data();
    // Set whole in each branch: zeroing first would be a memset call.
    let src: [u32; 4];
    let dst: [u32; 4];
    let (ip_len, proto, frag, later_frag, frag_id, l4, ttl_off) = match family {
        Family::V4 => {
            let h = ptr::<Ipv4Hdr>(ctx, l3).ok_or(Reason::DropTruncatedIp)?;
            // SAFETY: `ptr` checked that the header lies inside the packet.
            let h = unsafe { &*h };
            if h.vihl >> 4 != 4 {
                return Err(Reason::DropMalformedIp);
            }
            let hl = ((h.vihl & 0x0f) as usize) * 4;
            let tot = u16::from_be(h.tot_len) as usize;
            if hl < 20 || tot < hl {
                return Err(Reason::DropMalformedIp);
            }
            if l3 + tot > limit {
                return Err(Reason::DropTruncatedIp);
            }
            src = [h.src, 0, 0, 0];
            dst = [h.dst, 0, 0, 0];
            let fo = u16::from_be(h.frag_off);
            let (frag, later) = (fo & 0x3fff != 0, fo & 0x1fff != 0);
            let id = if frag { u32::from(u16::from_be(h.id)) } else { 0 };
            (tot, h.proto, frag, later, id, l3 + hl, l3 + 8)
        }
        Family::V6 => {
            let h = ptr::<Ipv6Hdr>(ctx, l3).ok_or(Reason::DropTruncatedIp)?;
            // SAFETY: `ptr` checked that the header lies inside the packet.
            let h = unsafe { &*h };
            if (h.vtc_flow & 0xf0) >> 4 != 6 {
                return Err(Reason::DropMalformedIp);
            }
            let tot = 40 + u16::from_be(h.payload_len) as usize;
            if l3 + tot > limit {
                return Err(Reason::DropTruncatedIp);
            }
            src = h.src;
            dst = h.dst;
            let end = l3 + tot;
            let mut next = h.next;
            let mut off = l3 + 40;
            let mut frag = false;
            let mut later = false;
            let mut id = 0;
            for _ in 0..MAX_EXT_HEADERS {
                match next {
                    IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                        if off + 8 > end {
                            return Err(Reason::DropMalformedIp);
                        }
                        let e = load::<u16>(ctx, off).ok_or(Reason::DropMalformedIp)?.to_le_bytes();
                        next = e[0];
                        off += (e[1] as usize + 1) * 8;
                    }
                    IPV6_FRAGMENT => {
                        if off + 8 > end {
                            return Err(Reason::DropMalformedIp);
                        }
                        let [w, ident] = load::<[u32; 2]>(ctx, off).ok_or(Reason::DropMalformedIp)?;
                        let e = w.to_le_bytes();
                        let fo = u16::from_be_bytes([e[2], e[3]]);
                        next = e[0];
                        off += 8;
                        frag = fo & 0xfff9 != 0;
                        if frag {
                            later = fo & 0xfff8 != 0;
                            id = u32::from_be(ident);
                            // The hash uses the fragment header's next header,
                            // the same in every fragment of a datagram; a
                            // first fragment's L4 header follows it here.
                            break;
                        }
                    }
                    _ => break,
                }
                if off > MAX_OFFSET {
                    return Err(Reason::DropMalformedIp);
                }
            }
            if !frag && matches!(next, IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_FRAGMENT) {
                return Err(Reason::DropMalformedIp);
            }
            if off > end {
                return Err(Reason::DropMalformedIp);
            }
            (tot, next, frag, later, id, off, l3 + 7)
        }
    };
    let ip_end = l3 + ip_len;
    let mut ports = None;
    let mut tcp_flags = 0;
    // A first fragment must carry its whole L4 header (a port rule could
    // otherwise be dodged by splitting the header across fragments).
    if !later_frag {
        let need = match proto {
            IPPROTO_TCP => 20,
            IPPROTO_UDP => 8,
            IPPROTO_ICMP => 8,
            IPPROTO_ICMPV6 => 4,
            _ => 0,
        };
        if l4 + need > ip_end {
            return Err(Reason::DropTruncatedL4);
        }
        if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
            ports = Some(load::<u32>(ctx, l4).ok_or(Reason::DropTruncatedL4)?);
        }
        if proto == IPPROTO_TCP {
            // Data offset and flags: the flags are the second byte.
            let word = load::<u16>(ctx, l4 + 12).ok_or(Reason::DropTruncatedL4)?;
            tcp_flags = word.to_ne_bytes()[1];
        }
    }
    Ok(Packet {
        family,
        l3,
        ip_len,
        proto,
        frag,
        later_frag,
        frag_id,
        l4,
        ports,
        tcp_flags,
        ttl_off,
        frame_len,
        src,
        dst,
    })
}
