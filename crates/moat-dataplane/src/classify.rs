//! Rule sets compiled for classification at a cost that does not grow with
//! the number of rules. The input is each rule's terms in normal form
//! (`moat_expr::normal`); terms are numbered in rule order, up to
//! [`MAX_TERMS`] per set.
//!
//! For every field some term constrains, the field's value space is cut
//! into elementary intervals at every boundary of every term's set; each
//! interval (and "the packet lacks the field") gets the bitmap of the terms
//! that hold there, terms not constraining the field included. Bitmaps are
//! stored once. Classifying a packet is, per constrained field, one search
//! for the interval holding its value and one bitmap AND; the lowest bit
//! left is the first matching term, hence the first matching rule.
//! [`Tables::classify`] is that procedure in plain Rust, the one the data
//! plane's program follows.

use std::collections::HashMap;

use moat_expr::{
    normal::{Domain, Ranges, Term},
    Field, FieldValue, Kind, Packet,
};

/// Terms one rule set may hold (bits in a bitmap).
pub const MAX_TERMS: usize = 1024;
/// 64-bit words in a bitmap.
pub const BITMAP_WORDS: usize = MAX_TERMS / 64;

pub type Bitmap = [u64; BITMAP_WORDS];

/// Which part of a field's value space a table covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Space {
    /// Integers, flags, or IPv4 addresses.
    Main,
    /// IPv6 addresses.
    V6,
}

/// One field's lookup: the sorted starts of its elementary intervals (the
/// first is 0) and the bitmap of each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldTable {
    pub field: Field,
    pub space: Space,
    pub starts: Vec<u128>,
    pub bitmaps: Vec<u32>,
}

/// A compiled rule set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tables {
    /// Term -> rule.
    pub term_rule: Vec<u16>,
    /// Distinct bitmaps; index 0 holds every term.
    pub bitmaps: Vec<Bitmap>,
    /// Per constrained field: the bitmap for packets lacking it.
    pub absent: Vec<(Field, u32)>,
    pub tables: Vec<FieldTable>,
}

/// Why a rule set does not fit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{terms} terms in one rule set (more than {MAX_TERMS})")]
    TooManyTerms { terms: usize },
    #[error("{rules} rules in one rule set (more than {})", u16::MAX)]
    TooManyRules { rules: usize },
}

fn universe(field: Field, space: Space) -> (u128, u128) {
    match (field.kind(), space) {
        (Kind::Int { max }, _) => (0, u128::from(max)),
        (Kind::Flag, _) => (0, 1),
        (Kind::Address, Space::Main) => (0, u128::from(u32::MAX)),
        (Kind::Address, Space::V6) => (0, u128::MAX),
    }
}

fn part(d: &Domain, space: Space) -> &Ranges {
    match space {
        Space::Main => &d.values,
        Space::V6 => &d.v6,
    }
}

struct Store {
    bitmaps: Vec<Bitmap>,
    ids: HashMap<Bitmap, u32>,
}

impl Store {
    fn id(&mut self, b: Bitmap) -> u32 {
        *self.ids.entry(b).or_insert_with(|| {
            self.bitmaps.push(b);
            (self.bitmaps.len() - 1) as u32
        })
    }
}

fn set(b: &mut Bitmap, term: usize) {
    b[term / 64] |= 1 << (term % 64);
}

/// Compiles rules (each as its terms, in rule order).
pub fn compile(rules: &[Vec<Term>]) -> Result<Tables, Error> {
    if rules.len() > usize::from(u16::MAX) {
        return Err(Error::TooManyRules { rules: rules.len() });
    }
    let terms: Vec<(u16, &Term)> = rules
        .iter()
        .enumerate()
        .flat_map(|(r, ts)| ts.iter().map(move |t| (r as u16, t)))
        .collect();
    if terms.len() > MAX_TERMS {
        return Err(Error::TooManyTerms { terms: terms.len() });
    }
    let mut all: Bitmap = [0; BITMAP_WORDS];
    for i in 0..terms.len() {
        set(&mut all, i);
    }
    let mut store = Store {
        bitmaps: Vec::new(),
        ids: HashMap::new(),
    };
    store.id(all);
    let mut fields: Vec<Field> = terms.iter().flat_map(|(_, t)| t.keys().copied()).collect();
    fields.sort();
    fields.dedup();
    let mut absent = Vec::new();
    let mut tables = Vec::new();
    for field in fields {
        let mut b = [0; BITMAP_WORDS];
        for (i, (_, t)) in terms.iter().enumerate() {
            if t.get(&field).is_none_or(|d| d.absent) {
                set(&mut b, i);
            }
        }
        absent.push((field, store.id(b)));
        let spaces: &[Space] = if field.kind() == Kind::Address {
            &[Space::Main, Space::V6]
        } else {
            &[Space::Main]
        };
        for &space in spaces {
            let (lo, hi) = universe(field, space);
            let mut starts = vec![lo];
            for (_, t) in &terms {
                if let Some(d) = t.get(&field) {
                    for &(a, z) in &part(d, space).0 {
                        starts.push(a.max(lo));
                        if z < hi {
                            starts.push(z + 1);
                        }
                    }
                }
            }
            starts.sort_unstable();
            starts.dedup();
            let bitmaps = starts
                .iter()
                .map(|&s| {
                    let mut b = [0; BITMAP_WORDS];
                    for (i, (_, t)) in terms.iter().enumerate() {
                        if t.get(&field).is_none_or(|d| part(d, space).contains(s)) {
                            set(&mut b, i);
                        }
                    }
                    store.id(b)
                })
                .collect();
            tables.push(FieldTable {
                field,
                space,
                starts,
                bitmaps,
            });
        }
    }
    Ok(Tables {
        term_rule: terms.iter().map(|(r, _)| *r).collect(),
        bitmaps: store.bitmaps,
        absent,
        tables,
    })
}

impl Tables {
    /// The first rule `packet` matches, by the tables alone.
    pub fn classify(&self, packet: &Packet) -> Option<usize> {
        let mut acc = self.bitmaps[0];
        for (field, absent) in &self.absent {
            let id = match packet.get(*field) {
                None => *absent,
                Some(v) => {
                    let (space, key) = match v {
                        FieldValue::Int(x) => (Space::Main, u128::from(x)),
                        FieldValue::Addr(std::net::IpAddr::V4(a)) => (Space::Main, u128::from(u32::from(a))),
                        FieldValue::Addr(std::net::IpAddr::V6(a)) => (Space::V6, u128::from(a)),
                    };
                    let t = self.tables.iter().find(|t| t.field == *field && t.space == space)?;
                    // The last interval starting at or before the value.
                    let i = t.starts.partition_point(|&s| s <= key) - 1;
                    t.bitmaps[i]
                }
            };
            let b = &self.bitmaps[id as usize];
            let mut any = 0;
            for (a, w) in acc.iter_mut().zip(b) {
                *a &= w;
                any |= *a;
            }
            if any == 0 {
                return None;
            }
        }
        let (word, bits) = acc.iter().enumerate().find(|(_, w)| **w != 0)?;
        let term = word * 64 + bits.trailing_zeros() as usize;
        self.term_rule.get(term).map(|r| usize::from(*r))
    }
}
