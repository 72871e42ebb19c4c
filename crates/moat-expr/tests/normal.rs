//! The normal form agrees with the reference evaluation: random rules
//! (and, or, not, every kind of condition, lists) over random packets drawn
//! from the same small pools of values, so that conditions hit, miss and
//! meet their boundaries.

use ipnet::IpNet;
use moat_expr::{
    normal::{term_matches, terms, Ranges},
    Expr, Field, Kind, Member, Op, Packet, Transport, Value,
};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

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

fn list(name: &str) -> Vec<IpNet> {
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

fn expr(rng: &mut StdRng, depth: u32) -> Expr {
    if depth == 0 || rng.gen_bool(0.35) {
        return condition(rng);
    }
    match rng.gen_range(0..3) {
        0 => Expr::Or((0..rng.gen_range(2..4)).map(|_| expr(rng, depth - 1)).collect()),
        1 => Expr::And((0..rng.gen_range(2..4)).map(|_| expr(rng, depth - 1)).collect()),
        _ => Expr::Not(Box::new(expr(rng, depth - 1))),
    }
}

fn packet(rng: &mut StdRng) -> Packet {
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

#[test]
fn normal_form_and_reference_agree() {
    let mut rng = StdRng::seed_from_u64(11);
    let (mut compared, mut matched, mut too_complex) = (0u64, 0u64, 0u32);
    for _ in 0..3_000 {
        let e = expr(&mut rng, 4);
        let ts = match terms(&e, &list, 512) {
            Ok(ts) => ts,
            Err(_) => {
                too_complex += 1;
                continue;
            }
        };
        for _ in 0..100 {
            let p = packet(&mut rng);
            let want = e.matches(&p, &list);
            let got = ts.iter().any(|t| term_matches(t, &p));
            assert_eq!(got, want, "{e}\n{p:?}\n{ts:?}");
            compared += 1;
            matched += u64::from(want);
        }
    }
    println!("{compared} packet/rule pairs agree ({matched} matches); {too_complex} rules over the term limit");
    // Both outcomes occur often enough to mean something.
    assert!(
        matched > compared / 10 && matched < compared * 9 / 10,
        "{matched} of {compared}"
    );
    assert!(too_complex < 300, "{too_complex} rules too complex");
}

#[test]
fn negation_includes_packets_lacking_the_field_and_limits_hold() {
    let e = moat_expr::parse("not tcp.dstport == 22", &|_| true).unwrap();
    let ts = terms(&e, &list, 16).unwrap();
    assert_eq!(ts.len(), 1);
    let d = &ts[0][&Field::TcpDstPort];
    assert!(d.absent);
    assert_eq!(d.values, Ranges(vec![(0, 21), (23, 65_535)]));
    // Contradictions vanish; 2^10 combinations exceed a limit of 512.
    let none = moat_expr::parse("ip.ttl == 1 and ip.ttl == 2", &|_| true).unwrap();
    assert!(terms(&none, &list, 16).unwrap().is_empty());
    let wide = (0..10)
        .map(|i| format!("(ip.src == 10.0.0.0/{} or ip.dst == 10.0.0.0/{})", 8 + i, 8 + i))
        .collect::<Vec<_>>()
        .join(" and ");
    let wide = moat_expr::parse(&wide, &|_| true).unwrap();
    let err = terms(&wide, &list, 512).unwrap_err();
    assert_eq!(err.limit, 512);
}

#[test]
fn ranges_complement_and_intersect() {
    let r = Ranges(vec![(0, 0), (5, 9), (u128::MAX, u128::MAX)]);
    assert_eq!(r.complement((0, 20)), Ranges(vec![(1, 4), (10, 20)]));
    assert_eq!(r.complement((0, u128::MAX)), Ranges(vec![(1, 4), (10, u128::MAX - 1)]));
    assert_eq!(Ranges::default().complement((3, 7)), Ranges(vec![(3, 7)]));
    assert_eq!(
        r.intersect(&Ranges(vec![(0, 6), (8, 100)])),
        Ranges(vec![(0, 0), (5, 6), (8, 9)])
    );
    assert_eq!(
        r.union(&Ranges(vec![(1, 4)])),
        Ranges(vec![(0, 9), (u128::MAX, u128::MAX)])
    );
}
