//! Per-CPU counters.

use moat_common::{Counter, CustomerStats, Reason, TunnelStats};

use crate::maps::{CUSTOMER_STATS, REASON_STATS, RULE_STATS, TUNNEL_STATS};

#[inline(always)]
pub fn bump(c: &mut Counter, bytes: u64) {
    c.packets += 1;
    c.bytes += bytes;
}

/// Counts a match of mitigation rule `rule`.
#[inline(always)]
pub fn count_rule(rule: u32, bytes: u64) {
    if let Some(c) = RULE_STATS.get_ptr_mut(rule) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        bump(unsafe { &mut *c }, bytes);
    }
}

#[inline(always)]
pub fn count_reason(reason: Reason, bytes: u64) {
    if let Some(c) = REASON_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        bump(unsafe { &mut *c }, bytes);
    }
}

#[inline(always)]
pub fn customer(id: u32) -> Option<&'static mut CustomerStats> {
    // SAFETY: per-CPU slot, only this CPU writes it while we run.
    CUSTOMER_STATS.get_ptr_mut(id).map(|p| unsafe { &mut *p })
}

#[inline(always)]
pub fn tunnel(id: u32) -> Option<&'static mut TunnelStats> {
    // SAFETY: per-CPU slot, only this CPU writes it while we run.
    TUNNEL_STATS.get_ptr_mut(id).map(|p| unsafe { &mut *p })
}
