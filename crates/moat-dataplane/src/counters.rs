//! Reading the per-CPU counters, summed over CPUs.

use std::collections::BTreeMap;

use aya::{
    maps::{MapData, PerCpuArray},
    Pod,
};
use moat_common::{Counter, CustomerStats, Reason, TunnelStats};

use crate::{error::Error, loader::Dataplane};

/// A snapshot of the counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    pub reasons: BTreeMap<Reason, Counter>,
    pub customers: BTreeMap<u32, CustomerStats>,
    pub tunnels: BTreeMap<u32, TunnelStats>,
}

impl Counters {
    /// Packets counted under `reason`.
    pub fn packets(&self, reason: Reason) -> u64 {
        self.reasons.get(&reason).map_or(0, |c| c.packets)
    }
}

pub(crate) fn sum<V: Pod>(
    map: &PerCpuArray<MapData, V>,
    name: &'static str,
    index: u32,
    add: impl Fn(&mut V, &V),
    zero: V,
) -> Result<V, Error> {
    let values = map.get(&index, 0).map_err(Error::map(name))?;
    let mut total = zero;
    for v in values.iter() {
        add(&mut total, v);
    }
    Ok(total)
}

/// Adds one CPU's counters; `in_received` is what that CPU forwarded
/// and dropped (the data plane does not count it apart).
fn add_customer(a: &mut CustomerStats, b: &CustomerStats) {
    a.in_received.add(&b.in_forwarded);
    a.in_received.add(&b.in_dropped);
    a.in_forwarded.add(&b.in_forwarded);
    a.in_dropped.add(&b.in_dropped);
    a.out_received.add(&b.out_received);
    a.out_forwarded.add(&b.out_forwarded);
    a.out_dropped.add(&b.out_dropped);
}

fn add_tunnel(a: &mut TunnelStats, b: &TunnelStats) {
    a.tx.add(&b.tx);
    a.rx.add(&b.rx);
}

impl Dataplane {
    /// Packets counted under `reason` on each CPU (index: CPU number).
    pub fn reason_per_cpu(&self, reason: Reason) -> Result<Vec<u64>, Error> {
        let values = self
            .maps
            .reason_stats
            .get(&(reason as u32), 0)
            .map_err(Error::map("REASON_STATS"))?;
        Ok(values.iter().map(|c| c.packets).collect())
    }

    /// Reason counters plus the given customers' and tunnels' counters.
    pub fn counters(
        &self,
        customers: impl IntoIterator<Item = u32>,
        tunnels: impl IntoIterator<Item = u32>,
    ) -> Result<Counters, Error> {
        let mut out = Counters::default();
        for &r in Reason::ALL {
            let c = sum(
                &self.maps.reason_stats,
                "REASON_STATS",
                r as u32,
                Counter::add,
                Counter::default(),
            )?;
            out.reasons.insert(r, c);
        }
        for c in customers {
            let s = sum(
                &self.maps.customer_stats,
                "CUSTOMER_STATS",
                c,
                add_customer,
                CustomerStats::default(),
            )?;
            out.customers.insert(c, s);
        }
        for t in tunnels {
            let s = sum(
                &self.maps.tunnel_stats,
                "TUNNEL_STATS",
                t,
                add_tunnel,
                TunnelStats::default(),
            )?;
            out.tunnels.insert(t, s);
        }
        Ok(out)
    }
}
