//! Random rules and packets for testing classification: conditions of
//! every kind combined with and/or/not, and packets, both drawn from the
//! same small pools of values so that conditions hit, miss and meet their
//! boundaries.

use ipnet::IpNet;
use moat_expr::{Expr, Field, Kind, Member, Op, Packet, Transport, Value};
use rand::{rngs::StdRng, seq::SliceRandom, Rng};

const PORTS: [u64; 9] = [0, 1, 22, 53, 80, 443, 1024, 11211, 65535];
const SMALL: [u64; 8] = [0, 1, 2, 6, 17, 64, 128, 255];
const NETS: [&str; 8] = [
    "10.0.0.0/8",
    "10.1.0.0/16",
    "192.0.2.0/24",
    "192.0.2.7/32",
    "0.0.0.0/0",
    "2001:db8::/32",
    "2001:db8::1/128",
    "::/0",
];
const ADDRS: [&str; 7] = [
    "10.1.2.3",
    "10.200.0.1",
    "192.0.2.7",
    "192.0.2.8",
    "203.0.113.1",
    "2001:db8::1",
    "2001:db9::1",
];

pub fn list(name: &str) -> Vec<IpNet> {
    match name {
        "admins" => vec!["192.0.2.0/28".parse().unwrap(), "2001:db8::/64".parse().unwrap()],
        _ => vec!["10.1.0.0/16".parse().unwrap()],
    }
}

fn int(rng: &mut StdRng, field: Field) -> u64 {
    match field.kind() {
        Kind::Int { max: 65_535 } => *PORTS.choose(rng).unwrap(),
        _ => *SMALL.choose(rng).unwrap(),
    }
}

fn net(rng: &mut StdRng) -> IpNet {
    NETS.choose(rng).unwrap().parse().unwrap()
}

fn condition(rng: &mut StdRng) -> Expr {
    let field = Field::ALL[rng.gen_range(0..Field::ALL.len())];
    match field.kind() {
        Kind::Flag => Expr::Flag(field),
        Kind::Address => match rng.gen_range(0..4) {
            0 => Expr::InList(field, ["admins", "other"].choose(rng).unwrap().to_string()),
            1 => Expr::In(field, (0..rng.gen_range(1..4)).map(|_| Member::Net(net(rng))).collect()),
            _ => Expr::Compare(field, *[Op::Eq, Op::Ne].choose(rng).unwrap(), Value::Net(net(rng))),
        },
        Kind::Int { .. } => {
            if rng.gen_bool(0.3) {
                let members = (0..rng.gen_range(1..4))
                    .map(|_| {
                        let (a, b) = (int(rng, field), int(rng, field));
                        Member::Ints(a.min(b)..=a.max(b))
                    })
                    .collect();
                Expr::In(field, members)
            } else {
                let ops = [Op::Eq, Op::Ne, Op::Lt, Op::Le, Op::Gt, Op::Ge];
                Expr::Compare(field, *ops.choose(rng).unwrap(), Value::Int(int(rng, field)))
            }
        }
    }
}

pub fn expr(rng: &mut StdRng, depth: u32) -> Expr {
    if depth == 0 || rng.gen_bool(0.35) {
        return condition(rng);
    }
    match rng.gen_range(0..3) {
        0 => Expr::Or((0..rng.gen_range(2..4)).map(|_| expr(rng, depth - 1)).collect()),
        1 => Expr::And((0..rng.gen_range(2..4)).map(|_| expr(rng, depth - 1)).collect()),
        _ => Expr::Not(Box::new(expr(rng, depth - 1))),
    }
}

pub fn packet(rng: &mut StdRng) -> Packet {
    let src = ADDRS.choose(rng).unwrap().parse().unwrap();
    let dst = ADDRS.choose(rng).unwrap().parse().unwrap();
    let port = |rng: &mut StdRng| *PORTS.choose(rng).unwrap() as u16;
    let small = |rng: &mut StdRng| *SMALL.choose(rng).unwrap() as u8;
    let transport = match rng.gen_range(0..4) {
        0 => Transport::None,
        1 => Transport::Tcp {
            src: port(rng),
            dst: port(rng),
            flags: rng.gen::<u8>() & 0x3f,
        },
        2 => Transport::Udp {
            src: port(rng),
            dst: port(rng),
        },
        _ => Transport::Icmp {
            kind: small(rng),
            code: small(rng),
        },
    };
    Packet {
        src,
        dst,
        proto: small(rng),
        ttl: small(rng),
        len: port(rng),
        frag: rng.gen(),
        transport,
    }
}

/// A rule for a data-plane specification from its expression's text (no
/// lists); panics on an expression the language refuses.
pub fn spec_rule(name: &str, text: &str, action: moat_dataplane::RuleAction) -> moat_dataplane::RuleSpec {
    let condition = moat_expr::parse(text, &|_| false).unwrap_or_else(|e| panic!("{text}: {e}"));
    let terms = moat_expr::normal::terms(&condition, &|_| Vec::new(), moat_expr::normal::MAX_TERMS)
        .unwrap_or_else(|_| panic!("{text}: too complex"));
    moat_dataplane::RuleSpec {
        name: name.into(),
        condition,
        terms,
        action,
    }
}
