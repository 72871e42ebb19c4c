//! Operator mitigation rules in the maps: a rule set compiled by
//! [`crate::classify`] written into the idle copy of the `CLS_*` maps, made
//! live with one store to `CLS_ACTIVE` (a packet sees the old set or the
//! new one, never a mix).

use std::sync::Arc;

use moat_common::rules::*;
use moat_expr::Field;

use crate::{
    classify::{self, Space, Tables},
    error::Error,
    loader::Dataplane,
    spec::{RuleAction, RuleSpec},
};

/// A compiled rule set and each rule's action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleTables {
    pub tables: Tables,
    pub actions: Vec<RuleAction>,
}

/// The lookup slot of a field's table.
fn slot_of(field: Field, space: Space) -> u32 {
    match (field, space) {
        (Field::IpSrc, Space::V6) => slot::IP_SRC6,
        (Field::IpDst, Space::V6) => slot::IP_DST6,
        (Field::IpSrc, _) => slot::IP_SRC,
        (Field::IpDst, _) => slot::IP_DST,
        (Field::IpProto, _) => slot::IP_PROTO,
        (Field::IpTtl, _) => slot::IP_TTL,
        (Field::IpLen, _) => slot::IP_LEN,
        (Field::IpFrag, _) => slot::IP_FRAG,
        (Field::IpVersion, _) => slot::IP_VERSION,
        (Field::TcpSrcPort, _) => slot::TCP_SRCPORT,
        (Field::TcpDstPort, _) => slot::TCP_DSTPORT,
        (Field::TcpFlags, _) => slot::TCP_FLAGS,
        (Field::TcpFlagSyn, _) => slot::TCP_FLAG_SYN,
        (Field::TcpFlagAck, _) => slot::TCP_FLAG_ACK,
        (Field::TcpFlagRst, _) => slot::TCP_FLAG_RST,
        (Field::TcpFlagFin, _) => slot::TCP_FLAG_FIN,
        (Field::TcpFlagPsh, _) => slot::TCP_FLAG_PSH,
        (Field::TcpFlagUrg, _) => slot::TCP_FLAG_URG,
        (Field::UdpSrcPort, _) => slot::UDP_SRCPORT,
        (Field::UdpDstPort, _) => slot::UDP_DSTPORT,
        (Field::IcmpType, _) => slot::ICMP_TYPE,
        (Field::IcmpCode, _) => slot::ICMP_CODE,
    }
}

/// Compiles the rules, checking what the maps can hold. `None` for no rules.
pub(crate) fn compile(rules: &[RuleSpec]) -> Result<Option<Arc<RuleTables>>, Error> {
    if rules.is_empty() {
        return Ok(None);
    }
    let terms: Vec<Vec<_>> = rules.iter().map(|r| r.terms.clone()).collect();
    let tables = classify::compile(&terms).map_err(|e| Error::Spec(format!("mitigation rules: {e}")))?;
    let capacity = |what, have: usize, limit: u32| {
        if have > limit as usize {
            Err(Error::Capacity {
                what,
                have,
                limit: limit as usize,
            })
        } else {
            Ok(())
        }
    };
    capacity("mitigation rule term bitmaps", tables.bitmaps.len(), CLS_BITMAPS)?;
    for t in &tables.tables {
        capacity(
            "intervals of one field in the mitigation rules",
            t.starts.len(),
            CLS_SLOT_KEYS,
        )?;
    }
    Ok(Some(Arc::new(RuleTables {
        tables,
        actions: rules.iter().map(|r| r.action).collect(),
    })))
}

impl Dataplane {
    /// Writes `rules` into the idle copy and makes it live (or turns rule
    /// matching off for `None`); rule counters start from zero. Returns the
    /// number of map entries written.
    pub(crate) fn write_rules(&mut self, rules: Option<&RuleTables>) -> Result<usize, Error> {
        let m = &mut self.maps;
        let active = m.cls_active.get(&0, 0).map_err(Error::map("CLS_ACTIVE"))?;
        let Some(r) = rules else {
            m.cls_active.set(0, CLS_NONE, 0).map_err(Error::map("CLS_ACTIVE"))?;
            return Ok(1);
        };
        let idle = if active == 0 { 1 } else { 0 };
        let mut written = 0;
        let mut slots = [ClsSlot::default(); CLS_SLOTS as usize];
        for (field, absent) in &r.tables.absent {
            for space in [Space::Main, Space::V6] {
                slots[slot_of(*field, space) as usize].absent = *absent;
            }
        }
        for t in &r.tables.tables {
            let s = slot_of(t.field, t.space);
            slots[s as usize].len = t.starts.len() as u32;
            let base = (idle * CLS_SLOTS + s) * CLS_SLOT_KEYS;
            for (i, (start, bitmap)) in t.starts.iter().zip(&t.bitmaps).enumerate() {
                let key = ClsKey {
                    hi: (start >> 64) as u64,
                    lo: *start as u64,
                    bitmap: *bitmap,
                    _pad: 0,
                };
                m.cls_key.set(base + i as u32, key, 0).map_err(Error::map("CLS_KEY"))?;
                written += 1;
            }
        }
        for (s, v) in slots.iter().enumerate() {
            m.cls_slot
                .set(idle * CLS_SLOTS + s as u32, *v, 0)
                .map_err(Error::map("CLS_SLOT"))?;
        }
        for (id, b) in r.tables.bitmaps.iter().enumerate() {
            m.cls_bitmap
                .set(idle * CLS_BITMAPS + id as u32, *b, 0)
                .map_err(Error::map("CLS_BITMAP"))?;
        }
        for (term, rule) in r.tables.term_rule.iter().enumerate() {
            let action = match r.actions[usize::from(*rule)] {
                RuleAction::Drop => CLS_DROP,
                RuleAction::Pass => CLS_PASS,
                RuleAction::RateLimit => CLS_RATE_LIMIT,
            };
            m.cls_term
                .set(
                    idle * CLS_TERMS as u32 + term as u32,
                    u32::from(*rule) | action << 16,
                    0,
                )
                .map_err(Error::map("CLS_TERM"))?;
        }
        for rule in 0..r.actions.len() as u32 {
            crate::apply::zero_per_cpu(&mut m.rule_stats, "RULE_STATS", rule)?;
        }
        written += slots.len() + r.tables.bitmaps.len() + r.tables.term_rule.len();
        m.cls_active.set(0, idle, 0).map_err(Error::map("CLS_ACTIVE"))?;
        Ok(written + 1)
    }
}
