//! Rule sets in the maps: the operator's mitigation rules (set 0) and each
//! customer's firewall, compiled by [`crate::classify`], laid out in the
//! shared pools of the idle copy of the `CLS_*` maps and made live with
//! one store to the rules word of `ACTIVE` (a packet sees the old sets or the new ones,
//! never a mix).

use std::sync::Arc;

use moat_common::{active, limits::MAX_CUSTOMERS, rules::*};
use moat_expr::Field;

use crate::{
    classify::{self, Space, Tables},
    error::Error,
    loader::Dataplane,
    spec::{RateLimit, RatePer, RuleAction, RuleSpec},
};

/// One compiled rule set and where it lies in a copy's pools.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetTables {
    /// The customer whose firewall it is (`None`: the mitigation rules).
    pub customer: Option<(u32, String)>,
    pub tables: Tables,
    /// Each rule's name and action.
    pub rules: Vec<(String, RuleAction)>,
    /// Pool positions (per copy).
    pub slot_base: u32,
    pub key_bases: Vec<u32>,
    /// Per table: its direct table in `CLS_DIRECT`, if it has one.
    pub directs: Vec<Option<u32>>,
    /// Per table: its trie, if it has one, as the number of its root and
    /// of its first node in the copy's tries.
    pub tries: Vec<Option<(u32, u32)>>,
    /// Per table: the root of its search tree in `CLS_NODE`, if it has one.
    pub trees: Vec<Option<u32>>,
    pub bitmap_base: u32,
    pub term_base: u32,
    /// The first rule's counter (and rate-limit bucket).
    pub stat_base: u32,
}

impl SetTables {
    /// The summary kept beside every reference to the set's bitmap `b`
    /// (exact terms or 32-term spans by the set's size: `set_summary`).
    fn summary(&self, b: u32) -> u32 {
        set_summary(self.tables.term_rule.len() as u32, &self.tables.bitmaps[b as usize])
    }
}

/// Every rule set, laid out. Set 0 is the mitigation rules (possibly empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleTables {
    pub sets: Vec<SetTables>,
    /// A digest of everything above, kept in the maps with the copy that
    /// holds it: a restarted daemon (same build) recognises its rules
    /// there instead of rewriting them, and `moat status` checks it.
    pub digest: u64,
}

/// One rule's match counter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleCounter {
    /// `None`: an operator mitigation rule; else the customer's firewall.
    pub customer: Option<String>,
    pub rule: String,
    pub packets: u64,
    pub bytes: u64,
}

/// The value slot of a field's table.
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

/// A slot descriptor before layout: (slot, table index, absent bitmap).
type SlotDesc = (u32, Option<usize>, u32);

/// The descriptors of one set's constrained slots: (slot, table index or
/// `None` for a field only ever absent, absent bitmap), in the order
/// [`ClsSet`] describes: IPv4 address slots, other fields, IPv6 address
/// slots. Also the end of the IPv4 part and the start of the IPv6 part.
fn slots(t: &Tables) -> (Vec<SlotDesc>, u32, u32) {
    let table = |field: Field, space| t.tables.iter().position(|x| x.field == field && x.space == space);
    let is_addr = |f: Field| matches!(f, Field::IpSrc | Field::IpDst);
    let mut out = Vec::new();
    for (field, absent) in t.absent.iter().filter(|(f, _)| is_addr(*f)) {
        if let Some(i) = table(*field, Space::Main) {
            out.push((slot_of(*field, Space::Main), Some(i), *absent));
        }
    }
    let v6_start = out.len() as u32;
    for (field, absent) in t.absent.iter().filter(|(f, _)| !is_addr(*f)) {
        out.push((slot_of(*field, Space::Main), table(*field, Space::Main), *absent));
    }
    let v4_end = out.len() as u32;
    for (field, absent) in t.absent.iter().filter(|(f, _)| is_addr(*f)) {
        if let Some(i) = table(*field, Space::V6) {
            out.push((slot_of(*field, Space::V6), Some(i), *absent));
        }
    }
    (out, v4_end, v6_start)
}

/// Compiles the mitigation rules and the firewalls (customer id, name,
/// rules), checking what the maps can hold. `None` when there is no rule.
pub(crate) fn compile(
    mitigation: &[RuleSpec],
    firewalls: &[(u32, &str, &[RuleSpec])],
) -> Result<Option<Arc<RuleTables>>, Error> {
    let firewalls: Vec<_> = firewalls.iter().filter(|f| !f.2.is_empty()).collect();
    if mitigation.is_empty() && firewalls.is_empty() {
        return Ok(None);
    }
    crate::compile::check_capacity("customers with firewall rules", firewalls.len(), CLS_SETS - 1)?;
    let mut sets = Vec::with_capacity(1 + firewalls.len());
    let (mut slot_next, mut key_next, mut bitmap_next, mut term_next, mut stat_next) = (0u32, 0u32, 0u32, 0u32, 0u32);
    let (mut direct_next, mut node_next, mut trie_next, mut trie_node_next) = (0u32, 0u32, 0u32, 0u32);
    let owners = std::iter::once(None).chain(firewalls.iter().map(|f| Some((f.0, f.1, f.2))));
    let owners: Vec<_> = owners.collect();
    for owner in owners {
        let (customer, rules) = match owner {
            None => (None, mitigation),
            Some((id, name, rules)) => (Some((id, name.to_string())), rules),
        };
        let whose = match &customer {
            None => "mitigation rules".to_string(),
            Some((_, n)) => format!("customer {n}: firewall"),
        };
        if let Some((id, _)) = &customer {
            if *id >= MAX_CUSTOMERS {
                return Err(Error::Spec(format!("{whose}: customer id {id} out of range")));
            }
        }
        let terms: Vec<Vec<_>> = rules.iter().map(|r| r.terms.clone()).collect();
        let tables = classify::compile(&terms).map_err(|e| Error::Spec(format!("{whose}: {e}")))?;
        for t in &tables.tables {
            crate::compile::check_capacity("intervals of one field in one rule set", t.starts.len(), CLS_SLOT_KEYS)?;
        }
        let mut key_bases = Vec::with_capacity(tables.tables.len());
        for t in &tables.tables {
            key_bases.push(key_next);
            key_next += t.starts.len() as u32;
        }
        // Direct tables, first come first served: the fields of at most
        // 16 bits (all but the addresses) with many intervals. The others
        // are searched, so running out of direct tables costs time only.
        let directs = tables
            .tables
            .iter()
            .map(|t| {
                let small = !matches!(t.field, Field::IpSrc | Field::IpDst);
                let fits = t.starts.iter().all(|s| *s < u128::from(CLS_DIRECT_VALUES));
                if small && fits && t.starts.len() > CLS_DIRECT_MIN_KEYS as usize && direct_next < CLS_DIRECT_TABLES {
                    direct_next += 1;
                    Some(direct_next - 1)
                } else {
                    None
                }
            })
            .collect::<Vec<_>>();
        // Tries, first come first served: IPv4 address tables too large
        // for a descriptor, while roots and nodes last.
        let tries = tables
            .tables
            .iter()
            .map(|t| {
                let v4 = matches!(t.field, Field::IpSrc | Field::IpDst) && narrow(t);
                if !v4 || t.starts.len() <= CLS_NEAR || trie_next >= CLS_TRIE_ROOTS {
                    return None;
                }
                let nodes = trie_layout(&t.starts).1.len() as u32;
                if trie_node_next + nodes > CLS_TRIE_NODES {
                    return None;
                }
                trie_next += 1;
                trie_node_next += nodes;
                Some((trie_next - 1, trie_node_next - nodes))
            })
            .collect::<Vec<_>>();
        let elsewhere: Vec<bool> = directs
            .iter()
            .zip(&tries)
            .map(|(d, t)| d.is_some() || t.is_some())
            .collect();
        let trees = trees_for(&tables, &elsewhere, &mut node_next, CLS_NODE_POOL);
        let set = SetTables {
            customer,
            rules: rules.iter().map(|r| (r.name.clone(), r.action)).collect(),
            slot_base: slot_next,
            key_bases,
            directs,
            tries,
            trees,
            bitmap_base: bitmap_next,
            term_base: term_next,
            stat_base: stat_next,
            tables,
        };
        slot_next += slots(&set.tables).0.len() as u32;
        bitmap_next += set.tables.bitmaps.len() as u32;
        term_next += set.tables.term_rule.len() as u32;
        stat_next += set.rules.len() as u32;
        crate::compile::check_capacity(
            "rule slot descriptors over all rule sets",
            slot_next as usize,
            CLS_SLOT_POOL,
        )?;
        crate::compile::check_capacity("rule intervals over all rule sets", key_next as usize, CLS_KEY_POOL)?;
        crate::compile::check_capacity("rule bitmaps over all rule sets", bitmap_next as usize, CLS_BITMAP_POOL)?;
        crate::compile::check_capacity("rule terms over all rule sets", term_next as usize, CLS_TERM_POOL)?;
        crate::compile::check_capacity("rules over all rule sets", stat_next as usize, CLS_RULE_POOL)?;
        sets.push(set);
    }
    // Debug output spells out every field; the hasher's keys are fixed, so
    // one build always gives one digest.
    let digest = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        format!("{sets:?}").hash(&mut h);
        h.finish() | 1
    };
    Ok(Some(Arc::new(RuleTables { sets, digest })))
}

/// Direct table `d` of copy `copy`: the first of its words in
/// `CLS_DIRECT`, and every word, each value's interval (the last one
/// starting at or before it; the first for values below all starts, as
/// the search finds it), four to a word.
fn direct_words(copy: u32, d: u32, starts: &[u128]) -> (u32, impl Iterator<Item = u64> + '_) {
    let base = (copy * CLS_DIRECT_TABLES + d) * CLS_DIRECT_WORDS;
    let mut i = 0usize;
    let words = (0..CLS_DIRECT_WORDS).map(move |w| {
        let mut word = 0u64;
        for k in 0..4u32 {
            let v = u128::from(w * 4 + k);
            while i + 1 < starts.len() && starts[i + 1] <= v {
                i += 1;
            }
            word |= (i as u64) << (k * 16);
        }
        word
    });
    (base, words)
}

/// A trie entry as [`trie_layout`] gives it: the interval holding every
/// value under the entry (its index in the table), or a node (its number
/// among the trie's nodes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TrieEntry {
    Interval(u32),
    Node(u32),
}

/// The trie over a narrow table's interval starts (see `CLS_TRIE_CHILD`):
/// its root's entries and its nodes, numbered from 0. A block of values
/// (a root entry's 2^16, a node entry's 2^8, a single value) inside one
/// interval is that interval; one that holds the start of another gets a
/// node.
fn trie_layout(starts: &[u128]) -> (Vec<TrieEntry>, Vec<Vec<TrieEntry>>) {
    // The interval holding `v`: the last one starting at or before it
    // (the first starts at 0).
    let at = |v: u128| (starts.partition_point(|s| *s <= v).max(1) - 1) as u32;
    let mut nodes: Vec<Vec<TrieEntry>> = Vec::new();
    // The entry for the block of 2^bits values from `lo`.
    fn entry(lo: u128, bits: u32, at: &dyn Fn(u128) -> u32, nodes: &mut Vec<Vec<TrieEntry>>) -> TrieEntry {
        let first = at(lo);
        if bits == 0 || at(lo + (1 << bits) - 1) == first {
            return TrieEntry::Interval(first);
        }
        let n = nodes.len();
        nodes.push(Vec::new());
        let below = (0..CLS_TRIE_NODE)
            .map(|b| entry(lo + (u128::from(b) << (bits - 8)), bits - 8, at, nodes))
            .collect();
        nodes[n] = below;
        TrieEntry::Node(n as u32)
    }
    let root = (0..CLS_TRIE_ROOT)
        .map(|h| entry(u128::from(h) << 16, 16, &at, &mut nodes))
        .collect();
    (root, nodes)
}

/// Trie `root` (its first node `first`) of copy `copy` over the table
/// `t` of a set whose bitmaps start at `bitmap_base`, with summaries by
/// `sum`: every word, as (index in `CLS_TRIE`, word).
fn trie_words(
    copy: u32,
    (root, first): (u32, u32),
    t: &classify::FieldTable,
    bitmap_base: u32,
    sum: impl Fn(u32) -> u32,
) -> Vec<(u32, u64)> {
    let base = copy * CLS_TRIE_WORDS;
    let node_base = base + CLS_TRIE_ROOTS * CLS_TRIE_ROOT;
    let word = |e: &TrieEntry| match *e {
        TrieEntry::Interval(k) => {
            let b = t.bitmaps[k as usize];
            u64::from(sum(b)) << 32 | u64::from(bitmap_base + b)
        }
        TrieEntry::Node(n) => CLS_TRIE_CHILD | u64::from(first + n),
    };
    let (top, nodes) = trie_layout(&t.starts);
    let mut out: Vec<(u32, u64)> = top
        .iter()
        .enumerate()
        .map(|(i, e)| (base + root * CLS_TRIE_ROOT + i as u32, word(e)))
        .collect();
    for (n, node) in nodes.iter().enumerate() {
        let at = node_base + (first + n as u32) * CLS_TRIE_NODE;
        out.extend(node.iter().enumerate().map(|(i, e)| (at + i as u32, word(e))));
    }
    out
}

/// Search trees for the tables of one set, first come first served from
/// `*next` in a pool of `pool` nodes: the fields of at most 32 bits (all
/// but the IPv6 address halves, whose values reach 2^64 - 1) not looked up
/// `elsewhere` (a direct table or a trie). The others are searched step
/// by step.
fn trees_for(tables: &Tables, elsewhere: &[bool], next: &mut u32, pool: u32) -> Vec<Option<u32>> {
    tables
        .tables
        .iter()
        .zip(elsewhere)
        .map(|(t, elsewhere)| {
            let span = tree_span(t.starts.len() as u32);
            if !elsewhere && narrow(t) && t.starts.len() > CLS_NEAR && *next + span <= pool {
                *next += span;
                Some(*next - span)
            } else {
                None
            }
        })
        .collect()
}

/// Whether every value of the table's field, and so every start, is below
/// 2^32 (all fields but the IPv6 address halves).
fn narrow(t: &classify::FieldTable) -> bool {
    t.space == Space::Main && t.starts.iter().all(|s| *s <= u128::from(u32::MAX))
}

/// The intervals a slot descriptor holds itself (see `ClsSlot::near`):
/// those of a narrow field's table of at most `CLS_NEAR` intervals, as
/// (starts, bitmap ids, summaries by `sum`); `None` for any other table.
fn near(t: &classify::FieldTable, bitmap_base: u32, sum: impl Fn(u32) -> u32) -> Option<NearIntervals> {
    if !narrow(t) || t.starts.is_empty() || t.starts.len() > CLS_NEAR {
        return None;
    }
    let mut n = ([CLS_NODE_END; CLS_NEAR], [0; CLS_NEAR], [0; CLS_NEAR]);
    for (i, (start, b)) in t.starts.iter().zip(&t.bitmaps).enumerate() {
        n.0[i] = *start as u64;
        n.1[i] = bitmap_base + b;
        n.2[i] = sum(*b);
    }
    Some(n)
}

type NearIntervals = ([u64; CLS_NEAR], [u32; CLS_NEAR], [u32; CLS_NEAR]);

/// The nodes a search tree over `len` intervals spans (the number of its
/// last node, plus one: see [`ClsNode`]).
fn tree_span(len: u32) -> u32 {
    tree_level_first(tree_levels(len) - 1) + len.div_ceil(CLS_NODE_KEYS)
}

/// The search tree over a slot's intervals (their starts, and their
/// bitmaps as (pool id, summary)): its nodes, numbered as [`ClsNode`]
/// says. Numbers left out are never reached.
fn tree_nodes(starts: &[u64], bitmaps: &[(u32, u32)]) -> Vec<(u32, ClsNode)> {
    let len = starts.len() as u32;
    let levels = tree_levels(len);
    let mut out = Vec::new();
    for level in 0..levels {
        // Intervals under one key of this level's nodes.
        let per_key = CLS_NODE_KEYS.pow(levels - 1 - level);
        let per_node = per_key * CLS_NODE_KEYS;
        for p in 0..len.div_ceil(per_node) {
            let mut node = ClsNode::default();
            for i in 0..CLS_NODE_KEYS {
                let first = (p * per_node + i * per_key) as usize;
                if first >= starts.len() {
                    break;
                }
                let i = i as usize;
                node.start[i] = starts[first];
                if level + 1 == levels {
                    (node.bitmap[i], node.summary[i]) = bitmaps[first];
                }
            }
            out.push((tree_level_first(level) + p, node));
        }
    }
    out
}

/// One entry the rule tables put into a copy of the maps: its map, its
/// index in the map and its value.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Entry {
    Slot(u32, ClsSlot),
    Key(u32, ClsKey),
    Node(u32, ClsNode),
    Bitmap(u32, [u64; CLS_WORDS]),
    Term(u32, ClsTerm),
    Set(u32, ClsSet),
    Firewall(u32, u32),
}

/// An entry's map and index.
fn place(e: &Entry) -> (&'static str, u32) {
    match *e {
        Entry::Slot(i, _) => ("CLS_SLOT", i),
        Entry::Key(i, _) => ("CLS_KEY", i),
        Entry::Node(i, _) => ("CLS_NODE", i),
        Entry::Bitmap(i, _) => ("CLS_BITMAP", i),
        Entry::Term(i, _) => ("CLS_TERM", i),
        Entry::Set(i, _) => ("CLS_SET", i),
        Entry::Firewall(i, _) => ("CUSTOMER_FW", i),
    }
}

/// Every entry of `r` in copy `copy` (direct tables apart: see
/// [`direct_words`]), in the order they are written.
fn entries(r: &RuleTables, copy: u32) -> Vec<Entry> {
    let mut out = Vec::new();
    for (n, set) in r.sets.iter().enumerate() {
        let n = n as u32;
        let (descs, v4_end, v6_start) = slots(&set.tables);
        let nterms = set.tables.term_rule.len() as u32;
        let sum = |b: u32| set.summary(b);
        for (i, (slot, table, absent)) in descs.iter().enumerate() {
            let (len, key_base, direct, first, tree, near, trie) = match table {
                Some(t) => (
                    set.tables.tables[*t].starts.len() as u32,
                    set.key_bases[*t],
                    set.directs[*t].map_or(0, |d| d + 1),
                    set.tables.tables[*t].bitmaps.first().copied(),
                    set.trees[*t],
                    near(&set.tables.tables[*t], set.bitmap_base, sum),
                    set.tries[*t].map_or(0, |(root, _)| root + 1),
                ),
                None => (0, 0, 0, None, None, None, 0),
            };
            let d = ClsSlot {
                slot: *slot,
                len,
                absent: set.bitmap_base + absent,
                key_base,
                direct,
                absent_summary: sum(*absent),
                first: first.map_or(0, |b| set.bitmap_base + b),
                first_summary: first.map_or(0, sum),
                tree: tree.map_or(0, |root| root + 1),
                levels: tree.map_or(0, |_| tree_levels(len)),
                near: u32::from(near.is_some()),
                trie,
                near_start: near.map_or([0; CLS_NEAR], |n| n.0),
                near_bitmap: near.map_or([0; CLS_NEAR], |n| n.1),
                near_summary: near.map_or([0; CLS_NEAR], |n| n.2),
            };
            out.push(Entry::Slot(copy * CLS_SLOT_POOL + set.slot_base + i as u32, d));
        }
        for (t, key_base) in set.tables.tables.iter().zip(&set.key_bases) {
            for (i, (start, bitmap)) in t.starts.iter().zip(&t.bitmaps).enumerate() {
                let key = ClsKey {
                    hi: (start >> 64) as u64,
                    lo: *start as u64,
                    bitmap: set.bitmap_base + bitmap,
                    summary: sum(*bitmap),
                };
                out.push(Entry::Key(copy * CLS_KEY_POOL + key_base + i as u32, key));
            }
        }
        for (t, tree) in set.tables.tables.iter().zip(&set.trees) {
            let Some(root) = tree else { continue };
            let starts: Vec<u64> = t.starts.iter().map(|s| *s as u64).collect();
            let bitmaps: Vec<(u32, u32)> = t.bitmaps.iter().map(|b| (set.bitmap_base + b, sum(*b))).collect();
            for (j, node) in tree_nodes(&starts, &bitmaps) {
                out.push(Entry::Node(copy * CLS_NODE_POOL + root + j, node));
            }
        }
        for (id, b) in set.tables.bitmaps.iter().enumerate() {
            out.push(Entry::Bitmap(copy * CLS_BITMAP_POOL + set.bitmap_base + id as u32, *b));
        }
        for (term, rule) in set.tables.term_rule.iter().enumerate() {
            let rule = u32::from(*rule);
            let entry = term_entry(copy * CLS_RULE_POOL + set.stat_base + rule, set.rules[rule as usize].1);
            out.push(Entry::Term(copy * CLS_TERM_POOL + set.term_base + term as u32, entry));
        }
        let d = ClsSet {
            slot_base: set.slot_base,
            nslots: descs.len() as u32,
            v4_end,
            v6_start,
            all: set.bitmap_base,
            term_base: set.term_base,
            nterms,
            all_summary: sum(0),
        };
        out.push(Entry::Set(copy * CLS_SETS + n, d));
        if let Some((id, _)) = &set.customer {
            out.push(Entry::Firewall(copy * MAX_CUSTOMERS + id, n));
        }
    }
    out
}

/// A matching term's entry: counter, action, bucket.
fn term_entry(stat: u32, action: RuleAction) -> ClsTerm {
    let mut t = ClsTerm {
        stat,
        ..ClsTerm::default()
    };
    match action {
        RuleAction::Drop => t.action = CLS_DROP,
        RuleAction::Pass => t.action = CLS_PASS,
        RuleAction::RateLimit(RateLimit { pps, per }) => {
            t.action = CLS_RATE_LIMIT;
            let pps = pps.max(1);
            t.interval_ns = (1_000_000_000 / pps).max(1);
            // A burst of 10 ms of the rate (at least one packet).
            t.burst_ns = (t.interval_ns * (pps / 100).max(1)).max(t.interval_ns);
            t.per = match per {
                RatePer::Rule => RL_PER_RULE,
                RatePer::DstIp => RL_PER_DST,
                RatePer::SrcIp => RL_PER_SRC,
            };
        }
    }
    t
}

impl Dataplane {
    /// Writes `rules` into the idle copy and makes it live (or turns rule
    /// matching off for `None`); rule counters and rate-limit buckets of
    /// the new copy start from zero. Returns the number of map entries written.
    pub(crate) fn write_rules(&mut self, rules: Option<&RuleTables>) -> Result<usize, Error> {
        let m = &mut self.maps;
        let active = m.active.get(active::RULES) as u32;
        let Some(r) = rules else {
            if active == CLS_NONE {
                return Ok(0);
            }
            m.active.set(active::RULES, u64::from(CLS_NONE));
            return Ok(1);
        };
        let idle = if active == 0 { 1 } else { 0 };
        let mut written = 0;
        let mut fw_after = Vec::new();
        for e in entries(r, idle) {
            match e {
                Entry::Slot(i, v) => m.cls_slot.set(i, v, 0).map_err(Error::map("CLS_SLOT"))?,
                Entry::Key(i, v) => m.cls_key.set(i, v, 0).map_err(Error::map("CLS_KEY"))?,
                Entry::Node(i, v) => m.cls_node.set(i, v, 0).map_err(Error::map("CLS_NODE"))?,
                Entry::Bitmap(i, v) => m.cls_bitmap.set(i, v, 0).map_err(Error::map("CLS_BITMAP"))?,
                Entry::Term(i, v) => m.cls_term.set(i, v, 0).map_err(Error::map("CLS_TERM"))?,
                Entry::Set(i, v) => m.cls_set.set(i, v, 0).map_err(Error::map("CLS_SET"))?,
                Entry::Firewall(i, v) => {
                    m.customer_fw.set(i, v, 0).map_err(Error::map("CUSTOMER_FW"))?;
                    fw_after.push(i - idle * MAX_CUSTOMERS);
                }
            }
            written += 1;
        }
        for set in &r.sets {
            for (t, direct) in set.tables.tables.iter().zip(&set.directs) {
                if let Some(d) = direct {
                    let (base, words) = direct_words(idle, *d, &t.starts);
                    for (i, w) in words.enumerate() {
                        m.cls_direct.set(base + i as u32, w);
                    }
                    written += CLS_DIRECT_WORDS as usize;
                }
            }
            for (t, trie) in set.tables.tables.iter().zip(&set.tries) {
                if let Some(trie) = trie {
                    let sum = |b: u32| set.summary(b);
                    for (i, w) in trie_words(idle, *trie, t, set.bitmap_base, sum) {
                        m.cls_trie.set(i, w);
                        written += 1;
                    }
                }
            }
            for rule in 0..set.rules.len() as u32 {
                let stat = idle * CLS_RULE_POOL + set.stat_base + rule;
                crate::apply::zero_per_cpu(&mut m.rule_stats, "RULE_STATS", stat)?;
                m.rl_rule.set(stat, 0, 0).map_err(Error::map("RL_RULE"))?;
                written += 2;
            }
        }
        m.cls_digest.set(idle, r.digest, 0).map_err(Error::map("CLS_DIGEST"))?;
        fw_after.sort_unstable();
        // The idle copy's firewall assignments: only the new ones stand
        // (it may still hold those of two generations ago).
        for id in 0..MAX_CUSTOMERS {
            let idx = idle * MAX_CUSTOMERS + id;
            if fw_after.binary_search(&id).is_err()
                && m.customer_fw.get(&idx, 0).map_err(Error::map("CUSTOMER_FW"))? != SET_NONE
            {
                m.customer_fw.set(idx, SET_NONE, 0).map_err(Error::map("CUSTOMER_FW"))?;
                written += 1;
            }
        }
        m.active.set(active::RULES, u64::from(idle));
        Ok(written + 1)
    }

    /// The digest of the rule sets in force in the maps (`None`: no rule
    /// set is in force).
    pub(crate) fn live_rules_digest(&self) -> Result<Option<u64>, Error> {
        let active = self.maps.active.get(active::RULES) as u32;
        if active > 1 {
            return Ok(None);
        }
        Ok(Some(
            self.maps.cls_digest.get(&active, 0).map_err(Error::map("CLS_DIGEST"))?,
        ))
    }

    /// The differences between the rule sets in force and those of
    /// `want`: the digest kept with the live copy, then, when it is
    /// `want`'s, every entry of the live copy (so that a table changed
    /// behind moat's back is found even when its digest was left alone).
    pub fn verify_rules(&self, want: &crate::Compiled) -> Result<Vec<String>, Error> {
        self.rules_differences(want.rules.as_deref())
    }

    pub(crate) fn rules_differences(&self, want: Option<&RuleTables>) -> Result<Vec<String>, Error> {
        /// Differences spelt out; the rest are counted.
        const SHOWN: usize = 5;
        let live = self.live_rules_digest()?;
        let wanted = want.map(|r| r.digest);
        if live != wanted {
            return Ok(vec![match (live, wanted) {
                (None, _) => "rule sets: none in force, this generation has some".to_string(),
                (_, None) => "rule sets: some in force, this generation has none".to_string(),
                _ => "rule sets: those in force are not this generation's".to_string(),
            }]);
        }
        let Some(r) = want else {
            return Ok(Vec::new());
        };
        let m = &self.maps;
        let active = m.active.get(active::RULES) as u32;
        let mut out = Vec::new();
        let mut more = 0usize;
        let mut differ = |what: String| {
            if out.len() < SHOWN {
                out.push(format!("rule sets: {what} differs from this generation's"));
            } else {
                more += 1;
            }
        };
        let mut fw = std::collections::BTreeMap::new();
        for e in entries(r, active) {
            let same = match e {
                Entry::Slot(i, v) => m.cls_slot.get(&i, 0).map_err(Error::map("CLS_SLOT"))? == v,
                Entry::Key(i, v) => m.cls_key.get(&i, 0).map_err(Error::map("CLS_KEY"))? == v,
                Entry::Node(i, v) => m.cls_node.get(&i, 0).map_err(Error::map("CLS_NODE"))? == v,
                Entry::Bitmap(i, v) => m.cls_bitmap.get(&i, 0).map_err(Error::map("CLS_BITMAP"))? == v,
                Entry::Term(i, v) => m.cls_term.get(&i, 0).map_err(Error::map("CLS_TERM"))? == v,
                Entry::Set(i, v) => m.cls_set.get(&i, 0).map_err(Error::map("CLS_SET"))? == v,
                Entry::Firewall(i, v) => {
                    fw.insert(i, v);
                    true
                }
            };
            if !same {
                let (map, i) = place(&e);
                differ(format!("{map}[{i}]"));
            }
        }
        // Every customer's firewall assignment: its set, or none.
        for id in 0..MAX_CUSTOMERS {
            let i = active * MAX_CUSTOMERS + id;
            let want = fw.get(&i).copied().unwrap_or(SET_NONE);
            if m.customer_fw.get(&i, 0).map_err(Error::map("CUSTOMER_FW"))? != want {
                differ(format!("the firewall set of customer id {id}"));
            }
        }
        for set in &r.sets {
            for (t, direct) in set.tables.tables.iter().zip(&set.directs) {
                if let Some(d) = direct {
                    let (base, words) = direct_words(active, *d, &t.starts);
                    if words.enumerate().any(|(i, w)| m.cls_direct.get(base + i as u32) != w) {
                        differ(format!("direct table {d}"));
                    }
                }
            }
            for (t, trie) in set.tables.tables.iter().zip(&set.tries) {
                if let Some(trie) = trie {
                    let sum = |b: u32| set.summary(b);
                    let words = trie_words(active, *trie, t, set.bitmap_base, sum);
                    if words.iter().any(|(i, w)| m.cls_trie.get(*i) != *w) {
                        differ(format!("trie {}", trie.0));
                    }
                }
            }
        }
        if more > 0 {
            out.push(format!("rule sets: {more} more entries differ"));
        }
        Ok(out)
    }

    /// Every rule's match counter, as the live copy counts them (counters
    /// start from zero whenever the rule sets change).
    pub fn rule_counters(&self) -> Result<Vec<RuleCounter>, Error> {
        let Some(r) = self.applied.as_ref().and_then(|a| a.rules.clone()) else {
            return Ok(Vec::new());
        };
        let active = self.maps.active.get(active::RULES) as u32;
        if active > 1 {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for set in &r.sets {
            for (i, (name, _)) in set.rules.iter().enumerate() {
                let c = crate::counters::sum(
                    &self.maps.rule_stats,
                    "RULE_STATS",
                    active * CLS_RULE_POOL + set.stat_base + i as u32,
                    moat_common::Counter::add,
                    moat_common::Counter::default(),
                )?;
                out.push(RuleCounter {
                    customer: set.customer.as_ref().map(|(_, n)| n.clone()),
                    rule: name.clone(),
                    packets: c.packets,
                    bytes: c.bytes,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, text: &str) -> RuleSpec {
        let condition = moat_expr::parse(text, &|_| false).expect("expression");
        let terms = moat_expr::normal::terms(&condition, &|_| Vec::new(), moat_expr::normal::MAX_TERMS).expect("terms");
        RuleSpec {
            name: name.into(),
            condition,
            terms,
            action: RuleAction::Drop,
        }
    }

    /// `n` rules, each on one port of `field` and one source /24.
    fn port_rules(field: &str, n: usize) -> Vec<RuleSpec> {
        (0..n)
            .map(|i| {
                rule(
                    &format!("r{i}"),
                    &format!("ip.src in {{10.0.{i}.0/24}} and {field} == {}", 1000 + i),
                )
            })
            .collect()
    }

    #[test]
    fn direct_tables_go_to_small_fields_with_many_intervals_while_they_last() {
        // A few intervals: searched; many: a direct table; addresses never.
        let few = port_rules("udp.dstport", 2);
        let many = port_rules("tcp.dstport", 40);
        let firewalls: Vec<(u32, String, Vec<RuleSpec>)> = (0..20)
            .map(|c| (c + 1, format!("c{c}"), port_rules("udp.srcport", 10)))
            .collect();
        let fw: Vec<(u32, &str, &[RuleSpec])> = firewalls
            .iter()
            .map(|(id, n, r)| (*id, n.as_str(), r.as_slice()))
            .collect();
        let r = compile(&[few, many].concat(), &fw).unwrap().unwrap();
        let direct_fields = |set: &SetTables| -> Vec<(Field, bool)> {
            set.tables
                .tables
                .iter()
                .zip(&set.directs)
                .map(|(t, d)| (t.field, d.is_some()))
                .collect()
        };
        let mitigation = direct_fields(&r.sets[0]);
        assert!(mitigation.contains(&(Field::TcpDstPort, true)), "{mitigation:?}");
        assert!(mitigation.contains(&(Field::UdpDstPort, false)), "{mitigation:?}");
        assert!(mitigation.contains(&(Field::IpSrc, false)), "{mitigation:?}");
        // 15 tables remain for 20 firewalls: the first 15 get one, in order.
        let with: Vec<bool> = r.sets[1..]
            .iter()
            .map(|s| direct_fields(s).contains(&(Field::UdpSrcPort, true)))
            .collect();
        assert_eq!(with, [vec![true; 15], vec![false; 5]].concat());
        let all: Vec<u32> = r
            .sets
            .iter()
            .flat_map(|s| s.directs.iter().flatten().copied())
            .collect();
        assert_eq!(all, (0..CLS_DIRECT_TABLES).collect::<Vec<_>>(), "each table once");
    }

    /// The data plane's walk (moat-ebpf's `walk`), over `nodes` by number.
    fn walk(nodes: &std::collections::HashMap<u32, ClsNode>, levels: u32, v: u64) -> (u32, u32) {
        let mut j = 0;
        for level in 1..=levels {
            let node = &nodes[&j];
            let mut i = 0;
            let mut step = CLS_NODE_KEYS / 2;
            while step != 0 {
                let m = (i + step) & (CLS_NODE_KEYS - 1);
                if node.start[m as usize] <= v {
                    i = m;
                }
                step /= 2;
            }
            if level == levels {
                return (node.bitmap[i as usize], node.summary[i as usize]);
            }
            j = j * CLS_NODE_KEYS + 1 + i;
        }
        unreachable!("a tree has at least one level")
    }

    #[test]
    fn search_trees_find_the_interval_holding_each_value() {
        for len in [1u32, 2, 3, 15, 16, 17, 100, 255, 256, 257, 1000, 1025, 4095, 4096] {
            // Starts 0, 7, 14, ...; interval k's bitmap is (k, k + 1).
            let starts: Vec<u64> = (0..u64::from(len)).map(|k| 7 * k).collect();
            let bitmaps: Vec<(u32, u32)> = (0..len).map(|k| (k, k + 1)).collect();
            let levels = tree_levels(len);
            let nodes: std::collections::HashMap<u32, ClsNode> = tree_nodes(&starts, &bitmaps).into_iter().collect();
            let span = tree_span(len);
            assert!(nodes.keys().all(|j| *j < span), "len {len}: a node past the span");
            assert!(levels <= CLS_NODE_LEVELS && CLS_NODE_KEYS.pow(levels) >= len);
            for v in (0..7 * u64::from(len) + 20).step_by(3).chain([u64::from(u32::MAX)]) {
                let k = (v / 7).min(u64::from(len) - 1) as u32;
                assert_eq!(walk(&nodes, levels, v), (k, k + 1), "len {len}, value {v}");
            }
        }
    }

    #[test]
    fn search_trees_go_to_fields_of_at_most_32_bits_while_nodes_last() {
        // IPv6 tables never get one, not even those whose starts are all
        // small (here the one of a set of IPv4 address rules only: [0]).
        let v4_only = compile(&port_rules("udp.dstport", 3), &[]).unwrap().unwrap();
        let v6: Vec<Option<u32>> = v4_only.sets[0]
            .tables
            .tables
            .iter()
            .zip(&v4_only.sets[0].trees)
            .filter(|(t, _)| t.space == Space::V6)
            .map(|(_, tree)| *tree)
            .collect();
        assert!(!v6.is_empty() && v6.iter().all(Option::is_none), "{v6:?}");
        let mut rules = port_rules("udp.dstport", 3);
        rules.extend(port_rules("udp.srcport", 3));
        rules.extend(port_rules("tcp.dstport", 40));
        rules.push(rule("v6", "ip.src in {::1 ::2 2001:db8::/32}"));
        let r = compile(&rules, &[]).unwrap().unwrap();
        let set = &r.sets[0];
        let kinds: Vec<(Field, Space, bool)> = set
            .tables
            .tables
            .iter()
            .zip(&set.trees)
            .map(|(t, tree)| (t.field, t.space, tree.is_some()))
            .collect();
        // The UDP ports: trees; the IPv4 sources have a trie, the TCP port
        // a direct table, the IPv6 sources are searched.
        for want in [
            (Field::IpSrc, Space::Main, false),
            (Field::UdpDstPort, Space::Main, true),
            (Field::UdpSrcPort, Space::Main, true),
            (Field::TcpDstPort, Space::Main, false),
            (Field::IpSrc, Space::V6, false),
        ] {
            assert!(kinds.contains(&want), "{want:?} in {kinds:?}");
        }
        // Trees are laid out one after the other from the start of the pool.
        let spans: Vec<(u32, u32)> = set
            .tables
            .tables
            .iter()
            .zip(&set.trees)
            .filter_map(|(t, tree)| tree.map(|root| (root, tree_span(t.starts.len() as u32))))
            .collect();
        assert_eq!(spans[0].0, 0);
        assert!(spans.windows(2).all(|w| w[1].0 == w[0].0 + w[0].1), "{spans:?}");
        // With room for only the first, the second is searched.
        let room = spans[0].1 + spans[1].1 - 1;
        let mut next = 0;
        let elsewhere: Vec<bool> = set
            .directs
            .iter()
            .zip(&set.tries)
            .map(|(d, t)| d.is_some() || t.is_some())
            .collect();
        let trees = trees_for(&set.tables, &elsewhere, &mut next, room);
        assert_eq!(trees.iter().filter(|t| t.is_some()).count(), 1, "{trees:?}");
        assert_eq!(next, spans[0].1);
    }

    /// The data plane's trie lookup (moat-ebpf's `trie`), over the words
    /// of copy 0 by index.
    fn trie_find(words: &std::collections::HashMap<u32, u64>, root: u32, v: u32) -> (u32, u32) {
        let nodes = CLS_TRIE_ROOTS * CLS_TRIE_ROOT;
        let mut e = words[&(root * CLS_TRIE_ROOT + (v >> 16))];
        for shift in [8, 0] {
            if e & CLS_TRIE_CHILD == 0 {
                break;
            }
            let node = e as u32 & (CLS_TRIE_NODES - 1);
            e = words[&(nodes + node * CLS_TRIE_NODE + ((v >> shift) & 0xff))];
        }
        assert_eq!(e & CLS_TRIE_CHILD, 0, "a third level leads on");
        (e as u32, (e >> 32) as u32)
    }

    #[test]
    fn tries_find_the_interval_holding_each_ipv4_address() {
        // Whole /16s, /24s, single addresses and ranges that end
        // anywhere, in both address fields; both kinds of summary.
        let mut rules = vec![
            rule(
                "a",
                "ip.src in {10.1.0.0/16 10.2.3.0/24 10.2.3.4 192.0.2.128/25 0.0.0.0}",
            ),
            rule(
                "b",
                "ip.dst in {198.51.100.7 198.51.100.9 203.0.113.0/24} and ip.src in {255.255.255.255}",
            ),
            rule("c", "ip.src in {172.16.5.64/26 172.16.200.0/22 172.18.0.0/15}"),
        ];
        for extra in [0, 40] {
            rules.extend((0..extra).map(|i| rule(&format!("x{i}"), &format!("ip.dst == 100.64.{i}.1"))));
            let r = compile(&rules, &[]).unwrap().unwrap();
            let set = &r.sets[0];
            let sum = |b: u32| set.summary(b);
            let mut tried = 0;
            for (t, trie) in set.tables.tables.iter().zip(&set.tries) {
                let Some(trie) = trie else { continue };
                tried += 1;
                let words: std::collections::HashMap<u32, u64> =
                    trie_words(0, *trie, t, set.bitmap_base, sum).into_iter().collect();
                let (_, nodes) = trie_layout(&t.starts);
                assert_eq!(words.len() as u32, CLS_TRIE_ROOT + nodes.len() as u32 * CLS_TRIE_NODE);
                let mut values: Vec<u32> = t
                    .starts
                    .iter()
                    .flat_map(|s| {
                        let s = *s as u32;
                        [s.saturating_sub(1), s, s.saturating_add(1), s | 0xff, s | 0xffff]
                    })
                    .collect();
                values.extend([0, u32::MAX, 0x0a01_8000]);
                for v in values {
                    let k = t.starts.iter().rposition(|s| *s <= u128::from(v)).unwrap();
                    let b = t.bitmaps[k];
                    let want = (set.bitmap_base + b, sum(b));
                    assert_eq!(trie_find(&words, trie.0, v), want, "{:?} {v:#x}", t.field);
                }
            }
            assert_eq!(tried, 2, "both address fields have a trie");
        }
    }

    #[test]
    fn tries_go_to_ipv4_address_tables_while_roots_and_nodes_last() {
        // One node per /16 holding a boundary, and one more per /24
        // holding a boundary off its edges.
        let starts: Vec<u128> = vec![0, 0x0a00_0100, 0x0a00_0200, 0x0a00_0205, 0x0a00_0206, 0x0b00_0000];
        let (root, nodes) = trie_layout(&starts);
        assert_eq!(nodes.len(), 2, "{nodes:?}");
        assert_eq!(root[0x0a00], TrieEntry::Node(0));
        assert_eq!(root[0x0b00], TrieEntry::Interval(5));
        assert_eq!(root[0x0a01], TrieEntry::Interval(4));
        assert_eq!(nodes[0][2], TrieEntry::Node(1));
        assert_eq!(nodes[1][5..7], [TrieEntry::Interval(3), TrieEntry::Interval(4)]);
        // Nine sets of IPv4 sources: the first eight get the roots, the
        // ninth a search tree; nodes follow one another.
        let firewalls: Vec<Vec<RuleSpec>> = (0..9)
            .map(|k| {
                vec![rule(
                    "f",
                    &format!("ip.src in {{10.{k}.1.0/24 10.{k}.3.0/24 10.{k}.5.0/24}}"),
                )]
            })
            .collect();
        let named: Vec<(u32, String)> = (0..9).map(|k| (k, format!("c{k}"))).collect();
        let fw: Vec<(u32, &str, &[RuleSpec])> = named
            .iter()
            .zip(&firewalls)
            .map(|((id, n), r)| (*id, n.as_str(), r.as_slice()))
            .collect();
        let r = compile(&[], &fw).unwrap().unwrap();
        let got: Vec<(Option<(u32, u32)>, bool)> = r.sets[1..]
            .iter()
            .map(|s| {
                let i = s
                    .tables
                    .tables
                    .iter()
                    .position(|t| t.field == Field::IpSrc && t.space == Space::Main)
                    .unwrap();
                (s.tries[i], s.trees[i].is_some())
            })
            .collect();
        let want: Vec<(Option<(u32, u32)>, bool)> =
            (0..8).map(|k| (Some((k, k)), false)).chain([(None, true)]).collect();
        assert_eq!(got, want);
    }

    /// The data plane's count over a descriptor's own intervals (moat-ebpf's
    /// `find`, the `near` case).
    fn near_find(d: &ClsSlot, v: u64) -> (u32, u32) {
        let mut i = 0;
        for k in 1..CLS_NEAR {
            i += d.near_start[k].wrapping_sub(v + 1) >> 63;
        }
        let i = i as usize & (CLS_NEAR - 1);
        (d.near_bitmap[i], d.near_summary[i])
    }

    #[test]
    fn small_narrow_tables_live_in_their_descriptors_and_find_each_value() {
        let mut rules = vec![
            rule("dns", "udp.dstport == 53"),
            rule("nets", "ip.src in {10.0.0.0/8 192.0.2.0/24} and ip.ttl < 3"),
            rule("v6", "ip.src in {2001:db8::/32}"),
        ];
        // Five intervals: one too many for a descriptor.
        rules.push(rule("two", "tcp.dstport in {80 443}"));
        let r = compile(&rules, &[]).unwrap().unwrap();
        let set = &r.sets[0];
        let written: Vec<ClsSlot> = entries(&r, 0)
            .into_iter()
            .filter_map(|e| match e {
                Entry::Slot(_, d) => Some(d),
                _ => None,
            })
            .collect();
        let (descs, _, _) = slots(&set.tables);
        let mut seen = Vec::new();
        for ((_, table, _), d) in descs.iter().zip(&written) {
            let Some(table) = table else { continue };
            let tree = set.trees[*table].is_some();
            let t = &set.tables.tables[*table];
            seen.push((t.field, t.space, d.near != 0, tree));
            if d.near == 0 {
                continue;
            }
            assert!(t.starts.len() <= CLS_NEAR && t.starts[0] == 0, "{t:?}");
            // Every value around every start finds the last interval
            // starting at or before it.
            let mut values: Vec<u64> = t
                .starts
                .iter()
                .flat_map(|s| {
                    let s = *s as u64;
                    [s.saturating_sub(1), s, s + 1]
                })
                .collect();
            values.push(u64::from(u32::MAX));
            for v in values {
                let k = t.starts.iter().rposition(|s| *s as u64 <= v).unwrap();
                let want = (
                    set.bitmap_base + t.bitmaps[k],
                    set_summary(
                        set.tables.term_rule.len() as u32,
                        &set.tables.bitmaps[t.bitmaps[k] as usize],
                    ),
                );
                assert_eq!(near_find(d, v), want, "{:?} value {v}", t.field);
            }
        }
        // In the descriptor: the UDP port (3 intervals), the IPv4 sources
        // (5) are not, nor the TCP port (5), nor IPv6 addresses ever; the
        // TTL (2). Those not held there get a search tree, IPv6 apart, and
        // IPv4 addresses, which get a trie.
        for want in [
            (Field::UdpDstPort, Space::Main, true, false),
            (Field::IpTtl, Space::Main, true, false),
            (Field::IpSrc, Space::Main, false, false),
            (Field::TcpDstPort, Space::Main, false, true),
            (Field::IpSrc, Space::V6, false, false),
        ] {
            assert!(seen.contains(&want), "{want:?} in {seen:?}");
        }
    }
}
