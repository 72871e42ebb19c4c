//! The rule expression language (contract: "Expression language"): a
//! wirefilter-style subset used by `mitigation.rules` and
//! `customers[].firewall`.
//!
//! ```text
//! expr       = or
//! or         = and ( ("or" | "||") and )*
//! and        = unary ( ("and" | "&&") unary )*
//! unary      = ("not" | "!") unary | "(" expr ")" | condition
//! condition  = field [ op value | "in" set | "in" "$"name ]
//! op         = "==" | "!=" | "<" | "<=" | ">" | ">="
//! set        = "{" item+ "}"      item = value | int ".." int
//! value      = integer (decimal or 0x hex) | IPv4/IPv6 address | CIDR
//! ```
//!
//! Parsing has two stages. [winnow] reads the text into a syntax tree that
//! keeps the byte offset of every token; then each condition is checked
//! against its field's type (ranges of integers, addresses and prefixes of
//! the right family, flags used alone, lists only for addresses and only
//! when defined). Every error carries the byte offset inside the
//! expression where it was found.
//!
//! Semantics the data plane and the reference evaluator share: a field of a
//! protocol the packet lacks makes its condition false (so `not tcp.dstport
//! == 22` holds for UDP); `==` with a prefix means "inside it"; `!=` is the
//! negation of `==` for packets that have the field.

use std::{fmt, net::IpAddr, ops::RangeInclusive};

use ipnet::IpNet;
use winnow::{
    ascii::multispace0,
    combinator::{alt, cut_err, delimited, not, opt, preceded, repeat, terminated},
    error::{ContextError, ErrMode, StrContext, StrContextValue},
    prelude::*,
    stream::LocatingSlice,
    token::{one_of, take_while},
};

/// A field of the packet an expression can test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    IpSrc,
    IpDst,
    IpProto,
    IpTtl,
    IpLen,
    IpFrag,
    IpVersion,
    TcpSrcPort,
    TcpDstPort,
    TcpFlags,
    TcpFlagSyn,
    TcpFlagAck,
    TcpFlagRst,
    TcpFlagFin,
    TcpFlagPsh,
    TcpFlagUrg,
    UdpSrcPort,
    UdpDstPort,
    IcmpType,
    IcmpCode,
}

/// What kind of values a field holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An IPv4 or IPv6 address.
    Address,
    /// An unsigned integer up to `max`.
    Int { max: u64 },
    /// True or false: tested alone.
    Flag,
}

impl Field {
    pub const ALL: [Field; 20] = [
        Field::IpSrc,
        Field::IpDst,
        Field::IpProto,
        Field::IpTtl,
        Field::IpLen,
        Field::IpFrag,
        Field::IpVersion,
        Field::TcpSrcPort,
        Field::TcpDstPort,
        Field::TcpFlags,
        Field::TcpFlagSyn,
        Field::TcpFlagAck,
        Field::TcpFlagRst,
        Field::TcpFlagFin,
        Field::TcpFlagPsh,
        Field::TcpFlagUrg,
        Field::UdpSrcPort,
        Field::UdpDstPort,
        Field::IcmpType,
        Field::IcmpCode,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Field::IpSrc => "ip.src",
            Field::IpDst => "ip.dst",
            Field::IpProto => "ip.proto",
            Field::IpTtl => "ip.ttl",
            Field::IpLen => "ip.len",
            Field::IpFrag => "ip.frag",
            Field::IpVersion => "ip.version",
            Field::TcpSrcPort => "tcp.srcport",
            Field::TcpDstPort => "tcp.dstport",
            Field::TcpFlags => "tcp.flags",
            Field::TcpFlagSyn => "tcp.flags.syn",
            Field::TcpFlagAck => "tcp.flags.ack",
            Field::TcpFlagRst => "tcp.flags.rst",
            Field::TcpFlagFin => "tcp.flags.fin",
            Field::TcpFlagPsh => "tcp.flags.psh",
            Field::TcpFlagUrg => "tcp.flags.urg",
            Field::UdpSrcPort => "udp.srcport",
            Field::UdpDstPort => "udp.dstport",
            Field::IcmpType => "icmp.type",
            Field::IcmpCode => "icmp.code",
        }
    }

    pub fn from_name(name: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.name() == name)
    }

    pub fn kind(self) -> Kind {
        match self {
            Field::IpSrc | Field::IpDst => Kind::Address,
            Field::IpFrag
            | Field::TcpFlagSyn
            | Field::TcpFlagAck
            | Field::TcpFlagRst
            | Field::TcpFlagFin
            | Field::TcpFlagPsh
            | Field::TcpFlagUrg => Kind::Flag,
            Field::IpLen | Field::TcpSrcPort | Field::TcpDstPort | Field::UdpSrcPort | Field::UdpDstPort => {
                Kind::Int { max: 65_535 }
            }
            Field::IpProto | Field::IpTtl | Field::IpVersion | Field::TcpFlags | Field::IcmpType | Field::IcmpCode => {
                Kind::Int { max: 255 }
            }
        }
    }
}

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    pub fn symbol(self) -> &'static str {
        match self {
            Op::Eq => "==",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        }
    }
}

/// A value compared with a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Value {
    Int(u64),
    /// An address is a prefix of full length.
    Net(IpNet),
}

/// The members of an `in { ... }` set, as written (order kept).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Member {
    Ints(RangeInclusive<u64>),
    Net(IpNet),
}

/// A checked expression.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Expr {
    Or(Vec<Expr>),
    And(Vec<Expr>),
    Not(Box<Expr>),
    /// A flag field tested alone.
    Flag(Field),
    Compare(Field, Op, Value),
    In(Field, Vec<Member>),
    /// `field in $name`: a named prefix list.
    InList(Field, String),
}

/// A problem in an expression, at a byte offset inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub offset: usize,
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at offset {}: {}", self.offset, self.message)
    }
}

/// Parses and checks `text`; `list_defined(name)` says whether `$name`
/// names a defined prefix list.
pub fn parse(text: &str, list_defined: &dyn Fn(&str) -> bool) -> Result<Expr, Error> {
    let syntax = syntax(text)?;
    check(&syntax, list_defined)
}

// ---- stage 1: syntax --------------------------------------------------

type Input<'a> = LocatingSlice<&'a str>;

/// A token's text and where it starts.
#[derive(Clone, Debug)]
struct Tok {
    text: String,
    at: usize,
}

#[derive(Clone, Debug)]
enum Rhs {
    None,
    Op(Op, Tok),
    Set(Vec<Tok>, usize),
    List(Tok),
}

#[derive(Clone, Debug)]
enum Syn {
    Or(Vec<Syn>),
    And(Vec<Syn>),
    Not(Box<Syn>),
    Cond(Tok, Rhs),
}

fn syntax(text: &str) -> Result<Syn, Error> {
    let mut input = LocatingSlice::new(text);
    let result = delimited(multispace0, expr, multispace0).parse_next(&mut input);
    let rest = text.len() - input.len();
    match result {
        Ok(s) if input.is_empty() => Ok(s),
        Ok(_) => Err(Error {
            offset: rest,
            message: format!(
                "unexpected '{}': expected 'and', 'or' or the end",
                first_word(&text[rest..])
            ),
        }),
        Err(ErrMode::Backtrack(e) | ErrMode::Cut(e)) => Err(Error {
            offset: rest,
            message: describe(&e, &text[rest..]),
        }),
        Err(ErrMode::Incomplete(_)) => Err(Error {
            offset: text.len(),
            message: "unexpected end".into(),
        }),
    }
}

fn first_word(s: &str) -> String {
    let w: String = s.chars().take_while(|c| !c.is_whitespace()).take(24).collect();
    if w.is_empty() {
        s.chars().next().map(String::from).unwrap_or_default()
    } else {
        w
    }
}

/// "expected X, found Y" from the innermost label or expectation the
/// parser recorded (outer ones describe the same spot less precisely).
fn describe(e: &ContextError, rest: &str) -> String {
    let expected = e.context().find_map(|c| match c {
        StrContext::Label(l) => Some((*l).to_string()),
        StrContext::Expected(StrContextValue::Description(d)) => Some((*d).to_string()),
        StrContext::Expected(StrContextValue::StringLiteral(s)) => Some(format!("'{s}'")),
        StrContext::Expected(StrContextValue::CharLiteral(c)) => Some(format!("'{c}'")),
        _ => None,
    });
    let found = if rest.is_empty() {
        "the end".to_string()
    } else {
        format!("'{}'", first_word(rest))
    };
    match expected {
        Some(x) => format!("expected {x}, found {found}"),
        None => format!("unexpected {found}"),
    }
}

fn ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '.'
}

/// A keyword not followed by a name character.
fn keyword<'a>(word: &'static str) -> impl Parser<Input<'a>, &'a str, ErrMode<ContextError>> {
    terminated(word, not(one_of(ident_char)))
}

fn ws(i: &mut Input<'_>) -> ModalResult<()> {
    multispace0.void().parse_next(i)
}

fn expr(i: &mut Input<'_>) -> ModalResult<Syn> {
    let first = and_expr.parse_next(i)?;
    let rest: Vec<Syn> =
        repeat(0.., preceded((ws, alt((keyword("or"), "||")), ws), cut_err(and_expr))).parse_next(i)?;
    Ok(join(first, rest, Syn::Or))
}

fn and_expr(i: &mut Input<'_>) -> ModalResult<Syn> {
    let first = unary.parse_next(i)?;
    let rest: Vec<Syn> = repeat(0.., preceded((ws, alt((keyword("and"), "&&")), ws), cut_err(unary))).parse_next(i)?;
    Ok(join(first, rest, Syn::And))
}

fn join(first: Syn, rest: Vec<Syn>, make: fn(Vec<Syn>) -> Syn) -> Syn {
    if rest.is_empty() {
        first
    } else {
        let mut all = vec![first];
        all.extend(rest);
        make(all)
    }
}

fn unary(i: &mut Input<'_>) -> ModalResult<Syn> {
    alt((
        preceded((alt((keyword("not"), terminated("!", not('=')))), ws), cut_err(unary)).map(|s| Syn::Not(Box::new(s))),
        delimited(
            ("(", ws),
            cut_err(expr),
            cut_err((ws, ")")).context(StrContext::Expected(StrContextValue::CharLiteral(')'))),
        ),
        condition.context(StrContext::Label("a field name")),
    ))
    .parse_next(i)
}

fn token<'a>(pred: impl Fn(char) -> bool + Copy) -> impl Parser<Input<'a>, Tok, ErrMode<ContextError>> {
    take_while(1.., pred).with_span().map(|(text, span): (&str, _)| Tok {
        text: text.to_string(),
        at: span.start,
    })
}

fn value_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '/')
}

fn condition(i: &mut Input<'_>) -> ModalResult<Syn> {
    let field = token(ident_char)
        .verify(|t: &Tok| {
            t.text.starts_with(|c: char| c.is_ascii_alphabetic())
                && !matches!(t.text.as_str(), "and" | "or" | "not" | "in")
        })
        .parse_next(i)?;
    let rhs = opt(preceded(
        ws,
        alt((
            (op, ws, cut_err(token(value_char)).context(StrContext::Label("a value"))).map(|(op, _, v)| Rhs::Op(op, v)),
            preceded(
                (keyword("in"), ws),
                cut_err(alt((
                    preceded("$", token(|c: char| c.is_ascii_alphanumeric() || c == '_')).map(Rhs::List),
                    set,
                )))
                .context(StrContext::Label("'{' or a $list")),
            ),
        )),
    ))
    .parse_next(i)?;
    Ok(Syn::Cond(field, rhs.unwrap_or(Rhs::None)))
}

fn op(i: &mut Input<'_>) -> ModalResult<Op> {
    alt((
        "==".value(Op::Eq),
        "!=".value(Op::Ne),
        "<=".value(Op::Le),
        ">=".value(Op::Ge),
        "<".value(Op::Lt),
        ">".value(Op::Gt),
    ))
    .parse_next(i)
}

fn set(i: &mut Input<'_>) -> ModalResult<Rhs> {
    let open = "{".span().parse_next(i)?;
    let items: Vec<Tok> = repeat(0.., preceded(ws, token(value_char))).parse_next(i)?;
    cut_err((ws, "}"))
        .context(StrContext::Expected(StrContextValue::Description("a value or '}'")))
        .parse_next(i)?;
    Ok(Rhs::Set(items, open.start))
}

// ---- stage 2: types -----------------------------------------------------

fn err(at: usize, message: impl Into<String>) -> Error {
    Error {
        offset: at,
        message: message.into(),
    }
}

fn check(s: &Syn, list_defined: &dyn Fn(&str) -> bool) -> Result<Expr, Error> {
    Ok(match s {
        Syn::Or(v) => Expr::Or(v.iter().map(|x| check(x, list_defined)).collect::<Result<_, _>>()?),
        Syn::And(v) => Expr::And(v.iter().map(|x| check(x, list_defined)).collect::<Result<_, _>>()?),
        Syn::Not(x) => Expr::Not(Box::new(check(x, list_defined)?)),
        Syn::Cond(f, rhs) => condition_of(f, rhs, list_defined)?,
    })
}

fn condition_of(f: &Tok, rhs: &Rhs, list_defined: &dyn Fn(&str) -> bool) -> Result<Expr, Error> {
    let Some(field) = Field::from_name(&f.text) else {
        return Err(err(f.at, format!("unknown field '{}'", f.text)));
    };
    let name = field.name();
    match (field.kind(), rhs) {
        (Kind::Flag, Rhs::None) => Ok(Expr::Flag(field)),
        (Kind::Flag, _) => Err(err(
            f.at,
            format!("{name} is a flag: test it alone ('{name}' or 'not {name}')"),
        )),
        (_, Rhs::None) => Err(err(f.at, format!("{name} needs a comparison (e.g. '{name} == ...')"))),
        (kind, Rhs::Op(op, v)) => {
            let value = value_of(field, kind, v)?;
            if kind == Kind::Address && !matches!(op, Op::Eq | Op::Ne) {
                return Err(err(f.at, format!("{name} takes ==, != or in, not {}", op.symbol())));
            }
            Ok(Expr::Compare(field, *op, value))
        }
        (kind, Rhs::Set(items, at)) => {
            if items.is_empty() {
                return Err(err(*at, "empty set"));
            }
            let members = items
                .iter()
                .map(|t| member_of(field, kind, t))
                .collect::<Result<_, _>>()?;
            Ok(Expr::In(field, members))
        }
        (kind, Rhs::List(l)) => {
            if kind != Kind::Address {
                return Err(err(
                    l.at - 1,
                    format!("${} is a prefix list; {name} is not an address", l.text),
                ));
            }
            if !list_defined(&l.text) {
                return Err(err(l.at - 1, format!("unknown list ${}", l.text)));
            }
            Ok(Expr::InList(field, l.text.clone()))
        }
    }
}

fn int_of(field: Field, max: u64, t: &str, at: usize) -> Result<u64, Error> {
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse::<u64>(),
    };
    match parsed {
        Ok(v) if v <= max => Ok(v),
        Ok(v) => Err(err(at, format!("{v} is out of range for {} (0..={max})", field.name()))),
        Err(_) => Err(err(
            at,
            format!("'{t}' is not a number ({} takes 0..={max})", field.name()),
        )),
    }
}

fn net_of(field: Field, t: &str, at: usize) -> Result<IpNet, Error> {
    if let Ok(a) = t.parse::<IpAddr>() {
        return Ok(IpNet::from(a));
    }
    match t.parse::<IpNet>() {
        Ok(n) if n.trunc() == n => Ok(n),
        Ok(n) => Err(err(at, format!("{t} has host bits set; did you mean {}?", n.trunc()))),
        Err(_) => Err(err(
            at,
            format!(
                "'{t}' is not an address or prefix ({} takes IPv4 or IPv6)",
                field.name()
            ),
        )),
    }
}

fn value_of(field: Field, kind: Kind, t: &Tok) -> Result<Value, Error> {
    match kind {
        Kind::Int { max } => Ok(Value::Int(int_of(field, max, &t.text, t.at)?)),
        _ => Ok(Value::Net(net_of(field, &t.text, t.at)?)),
    }
}

fn member_of(field: Field, kind: Kind, t: &Tok) -> Result<Member, Error> {
    match kind {
        Kind::Int { max } => match t.text.split_once("..") {
            Some((a, b)) => {
                let lo = int_of(field, max, a, t.at)?;
                let hi = int_of(field, max, b, t.at + a.len() + 2)?;
                if lo > hi {
                    return Err(err(t.at, format!("range {lo}..{hi} is empty")));
                }
                Ok(Member::Ints(lo..=hi))
            }
            None => {
                let v = int_of(field, max, &t.text, t.at)?;
                Ok(Member::Ints(v..=v))
            }
        },
        _ => {
            if t.text.contains("..") {
                return Err(err(
                    t.at,
                    format!("ranges are for numbers; {} takes prefixes", field.name()),
                ));
            }
            Ok(Member::Net(net_of(field, &t.text, t.at)?))
        }
    }
}

// ---- printing -----------------------------------------------------------

fn net_text(n: &IpNet) -> String {
    if n.prefix_len() == n.max_prefix_len() {
        n.addr().to_string()
    } else {
        n.to_string()
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Net(n) => f.write_str(&net_text(n)),
        }
    }
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Member::Ints(r) if r.start() == r.end() => write!(f, "{}", r.start()),
            Member::Ints(r) => write!(f, "{}..{}", r.start(), r.end()),
            Member::Net(n) => f.write_str(&net_text(n)),
        }
    }
}

/// The canonical text: parsing it gives the same expression back.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Parenthesised when inside a tighter operator.
        fn part(e: &Expr, f: &mut fmt::Formatter<'_>, tight: bool) -> fmt::Result {
            if tight && matches!(e, Expr::Or(_) | Expr::And(_)) {
                write!(f, "({e})")
            } else {
                write!(f, "{e}")
            }
        }
        match self {
            Expr::Or(v) => {
                for (i, e) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" or ")?;
                    }
                    part(e, f, matches!(e, Expr::Or(_)))?;
                }
                Ok(())
            }
            Expr::And(v) => {
                for (i, e) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" and ")?;
                    }
                    part(e, f, true)?;
                }
                Ok(())
            }
            Expr::Not(e) => {
                f.write_str("not ")?;
                part(e, f, true)
            }
            Expr::Flag(field) => f.write_str(field.name()),
            Expr::Compare(field, op, v) => write!(f, "{} {} {v}", field.name(), op.symbol()),
            Expr::In(field, members) => {
                write!(f, "{} in {{", field.name())?;
                for m in members {
                    write!(f, " {m}")?;
                }
                f.write_str(" }")
            }
            Expr::InList(field, name) => write!(f, "{} in ${name}", field.name()),
        }
    }
}

// ---- reference evaluation -------------------------------------------------

/// The fields of one packet as the expression language sees them: the
/// reference the data plane's classifier is tested against. A transport
/// header is present only when the packet carries it whole (a fragment
/// after the first carries none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPv4 protocol or IPv6 next header.
    pub proto: u8,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// IPv4 total length or IPv6 payload length + 40.
    pub len: u16,
    /// Any fragment (first or later).
    pub frag: bool,
    pub transport: Transport,
}

/// The transport header the expression language reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    None,
    Tcp { src: u16, dst: u16, flags: u8 },
    Udp { src: u16, dst: u16 },
    Icmp { kind: u8, code: u8 },
}

/// TCP flag bits as in the header's flags byte.
pub use moat_common::tcp_flag;

impl Packet {
    /// The field's value, `None` when the packet lacks it. Flags are 0 or 1.
    pub fn get(&self, field: Field) -> Option<FieldValue> {
        use Transport::{Icmp, Tcp, Udp};
        let int = |v: u64| Some(FieldValue::Int(v));
        let flag = |bit: u8| match self.transport {
            Tcp { flags, .. } => int(u64::from(flags & bit != 0)),
            _ => None,
        };
        match field {
            Field::IpSrc => Some(FieldValue::Addr(self.src)),
            Field::IpDst => Some(FieldValue::Addr(self.dst)),
            Field::IpProto => int(self.proto.into()),
            Field::IpTtl => int(self.ttl.into()),
            Field::IpLen => int(self.len.into()),
            Field::IpFrag => int(self.frag.into()),
            Field::IpVersion => int(if self.src.is_ipv4() { 4 } else { 6 }),
            Field::TcpSrcPort => match self.transport {
                Tcp { src, .. } => int(src.into()),
                _ => None,
            },
            Field::TcpDstPort => match self.transport {
                Tcp { dst, .. } => int(dst.into()),
                _ => None,
            },
            Field::TcpFlags => match self.transport {
                Tcp { flags, .. } => int(flags.into()),
                _ => None,
            },
            Field::TcpFlagSyn => flag(tcp_flag::SYN),
            Field::TcpFlagAck => flag(tcp_flag::ACK),
            Field::TcpFlagRst => flag(tcp_flag::RST),
            Field::TcpFlagFin => flag(tcp_flag::FIN),
            Field::TcpFlagPsh => flag(tcp_flag::PSH),
            Field::TcpFlagUrg => flag(tcp_flag::URG),
            Field::UdpSrcPort => match self.transport {
                Udp { src, .. } => int(src.into()),
                _ => None,
            },
            Field::UdpDstPort => match self.transport {
                Udp { dst, .. } => int(dst.into()),
                _ => None,
            },
            Field::IcmpType => match self.transport {
                Icmp { kind, .. } => int(kind.into()),
                _ => None,
            },
            Field::IcmpCode => match self.transport {
                Icmp { code, .. } => int(code.into()),
                _ => None,
            },
        }
    }
}

/// A field's value in one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldValue {
    Int(u64),
    Addr(IpAddr),
}

fn contains(net: &IpNet, v: FieldValue) -> bool {
    matches!(v, FieldValue::Addr(a) if net.contains(&a))
}

impl Expr {
    /// Whether `packet` matches, by the language's definition: a condition
    /// on a field the packet lacks is false. `list(name)` gives the
    /// prefixes of a list (the parser accepted only defined ones).
    pub fn matches(&self, packet: &Packet, list: &dyn Fn(&str) -> Vec<IpNet>) -> bool {
        match self {
            Expr::Or(v) => v.iter().any(|e| e.matches(packet, list)),
            Expr::And(v) => v.iter().all(|e| e.matches(packet, list)),
            Expr::Not(e) => !e.matches(packet, list),
            Expr::Flag(f) => packet.get(*f) == Some(FieldValue::Int(1)),
            Expr::Compare(f, op, value) => {
                let Some(v) = packet.get(*f) else {
                    return false;
                };
                match (value, v) {
                    (Value::Int(want), FieldValue::Int(have)) => match op {
                        Op::Eq => have == *want,
                        Op::Ne => have != *want,
                        Op::Lt => have < *want,
                        Op::Le => have <= *want,
                        Op::Gt => have > *want,
                        Op::Ge => have >= *want,
                    },
                    (Value::Net(net), v) => match op {
                        Op::Ne => !contains(net, v),
                        _ => contains(net, v),
                    },
                    (Value::Int(_), FieldValue::Addr(_)) => false,
                }
            }
            Expr::In(f, members) => packet.get(*f).is_some_and(|v| {
                members.iter().any(|m| match (m, v) {
                    (Member::Ints(r), FieldValue::Int(x)) => r.contains(&x),
                    (Member::Net(n), v) => contains(n, v),
                    _ => false,
                })
            }),
            Expr::InList(f, name) => packet
                .get(*f)
                .is_some_and(|v| list(name).iter().any(|n| contains(n, v))),
        }
    }
}

pub mod normal;
