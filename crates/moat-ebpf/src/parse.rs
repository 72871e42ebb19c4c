//! Header parsing with bounds checks the verifier can follow: every offset
//! is capped before it is added to the packet pointer.

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
    /// Offset of the L4 header (only meaningful when not a later fragment).
    pub l4: usize,
    /// Source and destination port bytes as on the wire, for unfragmented TCP/UDP.
    pub ports: Option<u32>,
    /// Offset of the IPv4 TTL / IPv6 hop limit byte.
    pub ttl_off: usize,
    pub frame_len: usize,
}

impl Packet {
    #[inline(always)]
    pub fn dst4(&self, ctx: &XdpContext) -> [u8; 4] {
        read::<4>(ctx, self.l3 + 16).unwrap_or([0; 4])
    }
    #[inline(always)]
    pub fn src4(&self, ctx: &XdpContext) -> [u8; 4] {
        read::<4>(ctx, self.l3 + 12).unwrap_or([0; 4])
    }
    #[inline(always)]
    pub fn dst6(&self, ctx: &XdpContext) -> [u8; 16] {
        read::<16>(ctx, self.l3 + 24).unwrap_or([0; 16])
    }
    #[inline(always)]
    pub fn src6(&self, ctx: &XdpContext) -> [u8; 16] {
        read::<16>(ctx, self.l3 + 8).unwrap_or([0; 16])
    }
}

/// A pointer to `N` (>= 2) bytes at `off`, or `None` if the frame is shorter.
#[inline(always)]
pub fn at<const N: usize>(ctx: &XdpContext, off: usize) -> Option<*mut [u8; N]> {
    // A one-byte window compiles to `ptr >= end`, from which the verifier
    // learns no range; every one-byte field we touch has a neighbour, so
    // windows are at least two bytes.
    const { assert!(N >= 2) };
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
    if start + off + N > end {
        return None;
    }
    Some((start + off) as *mut [u8; N])
}

/// A copy of `N` bytes at `off`.
#[inline(always)]
pub fn read<const N: usize>(ctx: &XdpContext, off: usize) -> Option<[u8; N]> {
    // SAFETY: `at` checked that N bytes at `off` lie inside the packet.
    at::<N>(ctx, off).map(|p| unsafe { *p })
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Parses Ethernet (optionally one 802.1Q tag) and the IP packet behind it.
/// `Ok(None)` means "not IP".
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Option<Packet>, Reason> {
    let frame_len = ctx.data_end() - ctx.data();
    let eth = read::<14>(ctx, 0).ok_or(Reason::DropTruncatedEthernet)?;
    let mut ethertype = be16([eth[12], eth[13]]);
    let mut l3 = 14;
    if ethertype == ETH_P_8021Q {
        let tag = read::<4>(ctx, 14).ok_or(Reason::DropTruncatedEthernet)?;
        ethertype = be16([tag[2], tag[3]]);
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
pub fn parse_ip(
    ctx: &XdpContext,
    family: Family,
    l3: usize,
    limit: usize,
) -> Result<Packet, Reason> {
    let frame_len = ctx.data_end() - ctx.data();
    let (ip_len, proto, frag, l4, ttl_off) = match family {
        Family::V4 => {
            let h = read::<20>(ctx, l3).ok_or(Reason::DropTruncatedIp)?;
            if h[0] >> 4 != 4 {
                return Err(Reason::DropMalformedIp);
            }
            let hl = ((h[0] & 0x0f) as usize) * 4;
            let tot = be16([h[2], h[3]]) as usize;
            if hl < 20 || tot < hl {
                return Err(Reason::DropMalformedIp);
            }
            if l3 + tot > limit {
                return Err(Reason::DropTruncatedIp);
            }
            let frag = be16([h[6], h[7]]) & 0x3fff != 0;
            (tot, h[9], frag, l3 + hl, l3 + 8)
        }
        Family::V6 => {
            let h = read::<8>(ctx, l3).ok_or(Reason::DropTruncatedIp)?;
            if read::<40>(ctx, l3).is_none() {
                return Err(Reason::DropTruncatedIp);
            }
            if h[0] >> 4 != 6 {
                return Err(Reason::DropMalformedIp);
            }
            let tot = 40 + be16([h[4], h[5]]) as usize;
            if l3 + tot > limit {
                return Err(Reason::DropTruncatedIp);
            }
            let end = l3 + tot;
            let mut next = h[6];
            let mut off = l3 + 40;
            let mut frag = false;
            for _ in 0..MAX_EXT_HEADERS {
                match next {
                    IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                        if off + 8 > end {
                            return Err(Reason::DropMalformedIp);
                        }
                        let e = read::<2>(ctx, off).ok_or(Reason::DropMalformedIp)?;
                        next = e[0];
                        off += (e[1] as usize + 1) * 8;
                    }
                    IPV6_FRAGMENT => {
                        if off + 8 > end {
                            return Err(Reason::DropMalformedIp);
                        }
                        let e = read::<4>(ctx, off).ok_or(Reason::DropMalformedIp)?;
                        let fo = be16([e[2], e[3]]);
                        next = e[0];
                        off += 8;
                        frag = fo & 0xfff9 != 0;
                        if frag {
                            // The hash uses the fragment header's next header,
                            // the same in every fragment of a datagram.
                            break;
                        }
                    }
                    _ => break,
                }
                if off > MAX_OFFSET {
                    return Err(Reason::DropMalformedIp);
                }
            }
            if !frag
                && matches!(
                    next,
                    IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_FRAGMENT
                )
            {
                return Err(Reason::DropMalformedIp);
            }
            if off > end {
                return Err(Reason::DropMalformedIp);
            }
            (tot, next, frag, off, l3 + 7)
        }
    };
    let ip_end = l3 + ip_len;
    let mut ports = None;
    if !frag {
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
            let p = read::<4>(ctx, l4).ok_or(Reason::DropTruncatedL4)?;
            ports = Some(u32::from_le_bytes(p));
        }
    }
    Ok(Packet {
        family,
        l3,
        ip_len,
        proto,
        frag,
        l4,
        ports,
        ttl_off,
        frame_len,
    })
}
