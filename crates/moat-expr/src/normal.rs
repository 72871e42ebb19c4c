//! Expressions in disjunctive normal form over per-field value sets: what
//! a data-plane classifier compiles. A rule becomes a list of terms; a term
//! holds, for each field it constrains, the set of values (and whether
//! "the packet lacks the field" is in it) that satisfy it. A packet
//! matches a term when each of its constrained fields has a value in the
//! term's set, and a rule when it matches any of its terms. With the terms
//! of many rules numbered in rule order, a classifier can look each field's
//! value up once, AND the per-field sets of matching terms and take the
//! first: the per-packet cost does not grow with the number of rules.
//!
//! Negation is pushed down to the conditions, where it is a complement
//! within the field's domain, "absent" included: `not tcp.dstport == 22`
//! is {absent} ∪ [0, 21] ∪ [23, 65535].

use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::{Expr, Field, FieldValue, Kind, Member, Op, Packet, Value};

/// Sorted, disjoint, non-adjacent inclusive ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ranges(pub Vec<(u128, u128)>);

impl Ranges {
    pub fn single(lo: u128, hi: u128) -> Ranges {
        Ranges(vec![(lo, hi)])
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, v: u128) -> bool {
        let i = self.0.partition_point(|r| r.1 < v);
        self.0.get(i).is_some_and(|r| r.0 <= v)
    }

    fn normalized(mut v: Vec<(u128, u128)>) -> Ranges {
        v.sort_unstable();
        let mut out: Vec<(u128, u128)> = Vec::with_capacity(v.len());
        for (lo, hi) in v {
            match out.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => out.push((lo, hi)),
            }
        }
        Ranges(out)
    }

    pub fn union(&self, other: &Ranges) -> Ranges {
        Ranges::normalized(self.0.iter().chain(&other.0).copied().collect())
    }

    pub fn intersect(&self, other: &Ranges) -> Ranges {
        let (mut i, mut j, mut out) = (0, 0, Vec::new());
        while i < self.0.len() && j < other.0.len() {
            let (a, b) = (self.0[i], other.0[j]);
            let (lo, hi) = (a.0.max(b.0), a.1.min(b.1));
            if lo <= hi {
                out.push((lo, hi));
            }
            if a.1 < b.1 {
                i += 1;
            } else {
                j += 1;
            }
        }
        Ranges(out)
    }

    /// The values of `universe` (one range) not in `self`.
    pub fn complement(&self, universe: (u128, u128)) -> Ranges {
        let mut out = Vec::new();
        let mut next = Some(universe.0);
        for &(lo, hi) in &self.0 {
            let (lo, hi) = (lo.max(universe.0), hi.min(universe.1));
            if lo > hi {
                continue;
            }
            if let Some(n) = next {
                if lo > n {
                    out.push((n, lo - 1));
                }
            }
            next = hi.checked_add(1);
        }
        if let Some(n) = next {
            if n <= universe.1 {
                out.push((n, universe.1));
            }
        }
        Ranges(out)
    }
}

/// The IPv4 part of an address domain lives in [0, 2^32); the IPv6 part in
/// a separate `Ranges` of the full u128 space.
const V4: (u128, u128) = (0, u32::MAX as u128);
const V6: (u128, u128) = (0, u128::MAX);

/// A set of values of one field, "absent" included as a value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Domain {
    /// Packets lacking the field are in the set.
    pub absent: bool,
    /// Integer fields and flags: the values. Address fields: IPv4 addresses.
    pub values: Ranges,
    /// Address fields: IPv6 addresses (empty for other fields).
    pub v6: Ranges,
}

impl Domain {
    fn everything(field: Field) -> Domain {
        let (values, v6) = match field.kind() {
            Kind::Int { max } => (Ranges::single(0, u128::from(max)), Ranges::default()),
            Kind::Flag => (Ranges::single(0, 1), Ranges::default()),
            Kind::Address => (Ranges::single(V4.0, V4.1), Ranges::single(V6.0, V6.1)),
        };
        Domain {
            absent: true,
            values,
            v6,
        }
    }

    fn present(values: Ranges, v6: Ranges) -> Domain {
        Domain {
            absent: false,
            values,
            v6,
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.absent && self.values.is_empty() && self.v6.is_empty()
    }

    fn intersect(&self, o: &Domain) -> Domain {
        Domain {
            absent: self.absent && o.absent,
            values: self.values.intersect(&o.values),
            v6: self.v6.intersect(&o.v6),
        }
    }

    fn union(&self, o: &Domain) -> Domain {
        Domain {
            absent: self.absent || o.absent,
            values: self.values.union(&o.values),
            v6: self.v6.union(&o.v6),
        }
    }

    fn complement(&self, field: Field) -> Domain {
        let all = Domain::everything(field);
        let (u, u6) = (all.values.0[0], all.v6.0.first().copied());
        Domain {
            absent: !self.absent,
            values: self.values.complement(u),
            v6: u6.map_or_else(Ranges::default, |u6| self.v6.complement(u6)),
        }
    }

    /// Whether a packet whose field is `v` (`None`: lacking it) is in the set.
    pub fn contains(&self, v: Option<FieldValue>) -> bool {
        match v {
            None => self.absent,
            Some(FieldValue::Int(x)) => self.values.contains(u128::from(x)),
            Some(FieldValue::Addr(std::net::IpAddr::V4(a))) => self.values.contains(u128::from(u32::from(a))),
            Some(FieldValue::Addr(std::net::IpAddr::V6(a))) => self.v6.contains(u128::from(a)),
        }
    }
}

fn net_domain(n: &IpNet) -> Domain {
    match n {
        IpNet::V4(n) => Domain::present(
            Ranges::single(u128::from(u32::from(n.network())), u128::from(u32::from(n.broadcast()))),
            Ranges::default(),
        ),
        IpNet::V6(n) => Domain::present(
            Ranges::default(),
            Ranges::single(u128::from(n.network()), u128::from(n.broadcast())),
        ),
    }
}

fn nets_domain<'a>(nets: impl IntoIterator<Item = &'a IpNet>) -> Domain {
    nets.into_iter()
        .map(net_domain)
        .fold(Domain::present(Ranges::default(), Ranges::default()), |a, b| {
            a.union(&b)
        })
}

/// The set of values satisfying one condition.
fn condition(e: &Expr, lists: &dyn Fn(&str) -> Vec<IpNet>) -> Option<(Field, Domain)> {
    Some(match e {
        Expr::Flag(f) => (*f, Domain::present(Ranges::single(1, 1), Ranges::default())),
        Expr::Compare(f, op, Value::Int(v)) => {
            let (v, max) = (
                u128::from(*v),
                match f.kind() {
                    Kind::Int { max } => u128::from(max),
                    _ => return None,
                },
            );
            let r = match op {
                Op::Eq => Ranges::single(v, v),
                Op::Ne => Ranges::single(v, v).complement((0, max)),
                Op::Lt if v == 0 => Ranges::default(),
                Op::Lt => Ranges::single(0, v - 1),
                Op::Le => Ranges::single(0, v),
                Op::Gt if v >= max => Ranges::default(),
                Op::Gt => Ranges::single(v + 1, max),
                Op::Ge => Ranges::single(v, max),
            };
            (*f, Domain::present(r, Ranges::default()))
        }
        Expr::Compare(f, op, Value::Net(n)) => {
            let d = net_domain(n);
            match op {
                Op::Ne => {
                    let c = d.complement(*f);
                    (*f, Domain { absent: false, ..c })
                }
                _ => (*f, d),
            }
        }
        Expr::In(f, members) => {
            let mut d = Domain::present(Ranges::default(), Ranges::default());
            for m in members {
                d = d.union(&match m {
                    Member::Ints(r) => Domain::present(
                        Ranges::single(u128::from(*r.start()), u128::from(*r.end())),
                        Ranges::default(),
                    ),
                    Member::Net(n) => net_domain(n),
                });
            }
            (*f, d)
        }
        Expr::InList(f, name) => (*f, nets_domain(&lists(name))),
        _ => return None,
    })
}

/// The most terms one rule may expand to (the data plane numbers terms,
/// not rules, in its per-field sets).
pub const MAX_TERMS: usize = 64;

/// A conjunction: each constrained field's set (unconstrained fields match
/// anything, absent included).
pub type Term = BTreeMap<Field, Domain>;

/// Why an expression has no normal form within the limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TooComplex {
    pub terms: usize,
    pub limit: usize,
}

impl std::fmt::Display for TooComplex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "expands to more than {} alternatives (and/or combinations) for the data plane",
            self.limit
        )
    }
}

/// The normal form of `e`: terms whose union is the set of matching
/// packets (empty: matches nothing), at most `limit` of them.
pub fn terms(e: &Expr, lists: &dyn Fn(&str) -> Vec<IpNet>, limit: usize) -> Result<Vec<Term>, TooComplex> {
    dnf(e, false, lists, limit)
}

fn too_complex(terms: usize, limit: usize) -> Result<Vec<Term>, TooComplex> {
    Err(TooComplex { terms, limit })
}

fn dnf(e: &Expr, negated: bool, lists: &dyn Fn(&str) -> Vec<IpNet>, limit: usize) -> Result<Vec<Term>, TooComplex> {
    match (e, negated) {
        (Expr::Not(x), _) => dnf(x, !negated, lists, limit),
        // An Or, or a negated And: the union of the parts.
        (Expr::Or(v), false) | (Expr::And(v), true) => {
            let mut out = Vec::new();
            for x in v {
                out.extend(dnf(x, negated, lists, limit)?);
                if out.len() > limit {
                    return too_complex(out.len(), limit);
                }
            }
            Ok(out)
        }
        // An And, or a negated Or: every combination of the parts' terms.
        (Expr::And(v), false) | (Expr::Or(v), true) => {
            let mut acc: Vec<Term> = vec![Term::new()];
            for x in v {
                let part = dnf(x, negated, lists, limit)?;
                let mut next = Vec::new();
                for a in &acc {
                    for b in &part {
                        if let Some(t) = conjoin(a, b) {
                            next.push(t);
                            if next.len() > limit {
                                return too_complex(next.len(), limit);
                            }
                        }
                    }
                }
                acc = next;
            }
            Ok(acc)
        }
        (leaf, _) => {
            let Some((field, d)) = condition(leaf, lists) else {
                return Ok(Vec::new());
            };
            let d = if negated { d.complement(field) } else { d };
            Ok(if d.is_empty() {
                Vec::new()
            } else {
                vec![Term::from([(field, d)])]
            })
        }
    }
}

/// The intersection of two terms, `None` when empty.
fn conjoin(a: &Term, b: &Term) -> Option<Term> {
    let mut out = a.clone();
    for (f, d) in b {
        let merged = match out.get(f) {
            Some(x) => x.intersect(d),
            None => d.clone(),
        };
        if merged.is_empty() {
            return None;
        }
        out.insert(*f, merged);
    }
    Some(out)
}

/// Whether `packet` matches a term.
pub fn term_matches(t: &Term, packet: &Packet) -> bool {
    t.iter().all(|(f, d)| d.contains(packet.get(*f)))
}
