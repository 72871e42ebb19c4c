//! Weighted, consistent assignment of flow-hash slots to the members of a
//! route set (weighted rendezvous hashing, computed once per slot).
//!
//! Each slot goes to the member with the lowest score
//! `-ln(u(slot, member)) / weight`, where `u` is a uniform number in (0, 1)
//! derived from the slot and the member's identity. A member's score for a
//! slot does not depend on the other members, so when a member leaves the
//! set only the slots it held change hands, and a member joining takes
//! slots only for itself: no other flow moves. Identities come from the
//! tunnel's (local, remote, key), not from table ids, so renumbering
//! tunnels moves nothing either.

use moat_common::limits::ECMP_SLOTS;

/// One candidate of a route set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Tunnel id written into the slots.
    pub tunnel: u16,
    pub weight: u32,
    /// Stable identity (see [`tunnel_identity`]).
    pub identity: u64,
}

/// splitmix64 finaliser: a bijective, well-mixed 64-bit hash.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Stable identity of a tunnel from what identifies it on the wire.
pub fn tunnel_identity(local: [u8; 4], remote: [u8; 4], key: Option<u32>) -> u64 {
    let addrs = (u64::from(u32::from_be_bytes(local)) << 32) | u64::from(u32::from_be_bytes(remote));
    let key = match key {
        Some(k) => (1u64 << 32) | u64::from(k),
        None => 0,
    };
    splitmix64(splitmix64(addrs) ^ key)
}

/// Score of `member` for `slot`; the lowest score wins the slot.
fn score(slot: usize, member: &Member) -> f64 {
    let x = splitmix64(member.identity ^ splitmix64(slot as u64));
    // 53 random bits, shifted off zero so ln() is finite.
    let u = ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -u.ln() / f64::from(member.weight.max(1))
}

/// The slot table of a route set with the given members (at least one).
pub fn build_table(members: &[Member]) -> Box<[u16; ECMP_SLOTS]> {
    let mut table = Box::new([0u16; ECMP_SLOTS]);
    for (slot, out) in table.iter_mut().enumerate() {
        let mut best: Option<(f64, &Member)> = None;
        for m in members {
            let s = score(slot, m);
            let better = match best {
                None => true,
                Some((bs, bm)) => s < bs || (s == bs && m.identity < bm.identity),
            };
            if better {
                best = Some((s, m));
            }
        }
        if let Some((_, m)) = best {
            *out = m.tunnel;
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(weights: &[u32]) -> Vec<Member> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Member {
                tunnel: i as u16,
                weight: w,
                identity: tunnel_identity([198, 51, 100, 1], [192, 0, 2, i as u8 + 10], None),
            })
            .collect()
    }

    fn share(table: &[u16; ECMP_SLOTS], tunnel: u16) -> f64 {
        table.iter().filter(|&&t| t == tunnel).count() as f64 / ECMP_SLOTS as f64
    }

    #[test]
    fn weights_set_the_shares() {
        for weights in [
            vec![1, 3],
            vec![1, 1],
            vec![1, 1, 2],
            vec![10, 20, 30, 40],
            vec![1, 256],
        ] {
            let table = build_table(&members(&weights));
            let total: u32 = weights.iter().sum();
            for (i, &w) in weights.iter().enumerate() {
                let want = f64::from(w) / f64::from(total);
                let got = share(&table, i as u16);
                // 4096 slots: binomial standard deviation is at most 0.8
                // points; allow four of them.
                assert!(
                    (got - want).abs() < 0.032,
                    "weights {weights:?}: member {i} has {got:.3}, want {want:.3}"
                );
            }
        }
    }

    #[test]
    fn a_leaving_member_moves_only_its_own_slots() {
        for n in 2..8 {
            let all = members(&(1..=n).map(|i| i * 7 % 5 + 1).collect::<Vec<_>>());
            let full = build_table(&all);
            for gone in 0..all.len() {
                let rest: Vec<Member> = all.iter().copied().filter(|m| m.tunnel != gone as u16).collect();
                let reduced = build_table(&rest);
                for slot in 0..ECMP_SLOTS {
                    if full[slot] != gone as u16 {
                        assert_eq!(
                            full[slot], reduced[slot],
                            "slot {slot} moved when member {gone} of {n} left"
                        );
                    } else {
                        assert_ne!(reduced[slot], gone as u16);
                    }
                }
            }
        }
    }

    #[test]
    fn a_joining_member_takes_slots_only_for_itself() {
        let all = members(&[2, 3, 5]);
        let before = build_table(&all[..2]);
        let after = build_table(&all);
        for slot in 0..ECMP_SLOTS {
            assert!(
                after[slot] == before[slot] || after[slot] == 2,
                "slot {slot} moved between old members"
            );
        }
    }

    #[test]
    fn table_ids_do_not_matter_only_identities() {
        let mut a = members(&[1, 3]);
        let t1 = build_table(&a);
        a.reverse();
        let t2 = build_table(&a);
        assert_eq!(t1, t2);
    }

    #[test]
    fn single_member_owns_every_slot() {
        let t = build_table(&members(&[5]));
        assert!(t.iter().all(|&s| s == 0));
    }
}
