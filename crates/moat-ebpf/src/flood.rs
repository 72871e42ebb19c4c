//! `moat_flood`: the flood generator's program (see `moat_common::flood`).
//! Run with BPF_PROG_TEST_RUN in live-frames mode on a template frame: each
//! run gives the frame a random IPv4 source within the configured bits and,
//! if asked, random ports, keeps the IPv4 (and TCP) checksum right with
//! incremental updates (RFC 1624), restores what a receiver may have
//! rewritten in the recycled page (TTL, Ethernet addresses), and transmits
//! it (XDP_TX: out of the
//! interface the run is given as its ingress). Never attached.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod runtime;

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{
        bindings::xdp_action,
        helpers::bpf_get_prandom_u32,
        macros::{map, xdp},
        maps::Array,
        programs::XdpContext,
    };
    use moat_common::flood::*;

    #[map]
    static FLOOD: Array<FloodConfig> = Array::with_max_entries(1, 0);

    /// Offset of the IPv4 TTL (and protocol), checksum and source address.
    const IP_TTL: usize = FLOOD_L3 + 8;
    const IP_CHECK: usize = FLOOD_L3 + 10;
    const IP_SRC: usize = FLOOD_L3 + 12;
    /// Offset of the TCP checksum.
    const TCP_CHECK: usize = FLOOD_L4 + 16;
    /// Bytes a template must have: through the TCP checksum.
    const NEED: usize = TCP_CHECK + 2;

    /// One's-complement update of `check` for a 16-bit word changing from
    /// `old` to `new` (all in the same byte order).
    #[inline(always)]
    fn update(check: u16, old: u16, new: u16) -> u16 {
        let mut sum = (!check as u32) + (!old as u32) + new as u32;
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        !(sum as u16)
    }

    #[inline(always)]
    fn at<T>(start: usize, off: usize) -> *mut T {
        (start + off) as *mut T
    }

    #[xdp]
    pub fn moat_flood(ctx: XdpContext) -> u32 {
        let Some(cfg) = FLOOD.get(0) else {
            return xdp_action::XDP_ABORTED;
        };
        let (start, end) = (ctx.data(), ctx.data_end());
        if start + NEED > end {
            return xdp_action::XDP_ABORTED;
        }
        // SAFETY: every access below lies within the first NEED bytes,
        // checked above; unaligned reads and writes are used throughout.
        unsafe {
            let mask = u32::from_ne_bytes(cfg.src_mask);
            let tcp = cfg.flags & FLOOD_TCP != 0;
            let mut ip_check = core::ptr::read_unaligned(at::<u16>(start, IP_CHECK));
            let mut l4_check = core::ptr::read_unaligned(at::<u16>(start, TCP_CHECK));
            if mask != 0 {
                let old = core::ptr::read_unaligned(at::<u32>(start, IP_SRC));
                let new = (old & !mask) | (bpf_get_prandom_u32() & mask);
                core::ptr::write_unaligned(at::<u32>(start, IP_SRC), new);
                for (o, n) in [(old as u16, new as u16), ((old >> 16) as u16, (new >> 16) as u16)] {
                    ip_check = update(ip_check, o, n);
                    l4_check = update(l4_check, o, n);
                }
            }
            for (bit, off) in [(FLOOD_RANDOM_SPORT, FLOOD_L4), (FLOOD_RANDOM_DPORT, FLOOD_L4 + 2)] {
                if cfg.flags & bit != 0 {
                    let old = core::ptr::read_unaligned(at::<u16>(start, off));
                    let port = 1024 + (bpf_get_prandom_u32() % (65536 - 1024)) as u16;
                    let new = port.to_be();
                    core::ptr::write_unaligned(at::<u16>(start, off), new);
                    l4_check = update(l4_check, old, new);
                }
            }
            let ttl = (cfg.flags >> FLOOD_TTL_SHIFT) as u8;
            if ttl != 0 {
                let old = core::ptr::read_unaligned(at::<u16>(start, IP_TTL));
                let mut b = old.to_ne_bytes();
                b[0] = ttl;
                let new = u16::from_ne_bytes(b);
                core::ptr::write_unaligned(at::<u16>(start, IP_TTL), new);
                ip_check = update(ip_check, old, new);
            }
            if cfg.flags & FLOOD_MACS != 0 {
                for i in 0..3 {
                    let w = u32::from_ne_bytes([
                        cfg.macs[i * 4],
                        cfg.macs[i * 4 + 1],
                        cfg.macs[i * 4 + 2],
                        cfg.macs[i * 4 + 3],
                    ]);
                    core::ptr::write_unaligned(at::<u32>(start, i * 4), w);
                }
            }
            core::ptr::write_unaligned(at::<u16>(start, IP_CHECK), ip_check);
            if tcp {
                core::ptr::write_unaligned(at::<u16>(start, TCP_CHECK), l4_check);
            }
        }
        xdp_action::XDP_TX
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
