//! The expression language: tables of valid expressions (with the
//! canonical text each prints as) and invalid ones (with the offset and
//! message of the error), and a round trip over random expressions.

use moat_expr::{parse, Expr, Field, Kind, Member, Op, Value};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn lists(name: &str) -> bool {
    matches!(name, "admins" | "bad_actors")
}

#[test]
fn valid_expressions_and_their_canonical_text() {
    let table = [
        ("tcp.dstport == 22", "tcp.dstport == 22"),
        ("  udp.srcport==11211  ", "udp.srcport == 11211"),
        ("ip.proto == 0x11", "ip.proto == 17"),
        ("ip.src == 192.0.2.1", "ip.src == 192.0.2.1"),
        ("ip.src == 192.0.2.1/32", "ip.src == 192.0.2.1"),
        ("ip.dst == 203.0.113.0/24", "ip.dst == 203.0.113.0/24"),
        ("ip.src != 2001:db8::/32", "ip.src != 2001:db8::/32"),
        ("ip.ttl < 5 or ip.ttl >= 250", "ip.ttl < 5 or ip.ttl >= 250"),
        ("ip.len <= 64 && ip.len > 20", "ip.len <= 64 and ip.len > 20"),
        ("ip.frag", "ip.frag"),
        ("not ip.frag", "not ip.frag"),
        ("!tcp.flags.syn", "not tcp.flags.syn"),
        (
            "tcp.flags.syn and not tcp.flags.ack",
            "tcp.flags.syn and not tcp.flags.ack",
        ),
        (
            "udp.srcport in {19 53 123 161 389 1900 3702 11211}",
            "udp.srcport in { 19 53 123 161 389 1900 3702 11211 }",
        ),
        ("tcp.dstport in {1000..2000 22}", "tcp.dstport in { 1000..2000 22 }"),
        (
            "ip.src in {10.0.0.0/8 192.0.2.7 2001:db8::1}",
            "ip.src in { 10.0.0.0/8 192.0.2.7 2001:db8::1 }",
        ),
        ("ip.src in $admins", "ip.src in $admins"),
        (
            "tcp.dstport == 3389 and not ip.src in $admins",
            "tcp.dstport == 3389 and not ip.src in $admins",
        ),
        (
            "(tcp.dstport == 80 or tcp.dstport == 443) and ip.dst == 203.0.113.5",
            "(tcp.dstport == 80 or tcp.dstport == 443) and ip.dst == 203.0.113.5",
        ),
        (
            "tcp.dstport == 80 or tcp.dstport == 443 and ip.ttl == 1",
            "tcp.dstport == 80 or tcp.dstport == 443 and ip.ttl == 1",
        ),
        ("not (ip.ttl == 1 or ip.frag)", "not (ip.ttl == 1 or ip.frag)"),
        ("((ip.version == 6))", "ip.version == 6"),
        ("icmp.type == 8 and icmp.code == 0", "icmp.type == 8 and icmp.code == 0"),
        (
            "tcp.flags == 0x3f or tcp.flags == 0",
            "tcp.flags == 63 or tcp.flags == 0",
        ),
        ("ip.ttl==1||ip.ttl==2", "ip.ttl == 1 or ip.ttl == 2"),
        ("tcp.srcport == 65535", "tcp.srcport == 65535"),
    ];
    for (text, canonical) in table {
        let e = parse(text, &lists).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert_eq!(e.to_string(), canonical, "{text:?}");
        let again = parse(&e.to_string(), &lists).unwrap_or_else(|e| panic!("{canonical:?}: {e}"));
        assert_eq!(again, e, "round trip of {text:?}");
    }
    // The structure, for a few.
    assert_eq!(
        parse("tcp.dstport == 22 and not ip.src in $admins", &lists).unwrap(),
        Expr::And(vec![
            Expr::Compare(Field::TcpDstPort, Op::Eq, Value::Int(22)),
            Expr::Not(Box::new(Expr::InList(Field::IpSrc, "admins".into()))),
        ])
    );
    assert_eq!(
        parse("a.b == 1 or ip.frag", &|_| true).unwrap_err().message,
        "unknown field 'a.b'"
    );
    assert_eq!(
        parse("udp.dstport in {53 100..200}", &lists).unwrap(),
        Expr::In(Field::UdpDstPort, vec![Member::Ints(53..=53), Member::Ints(100..=200)])
    );
}

#[test]
fn invalid_expressions_point_at_the_problem() {
    // (expression, byte offset of the error, message)
    let table: &[(&str, usize, &str)] = &[
        ("", 0, "expected a field name, found the end"),
        ("   ", 3, "expected a field name, found the end"),
        ("tcp.port == 22", 0, "unknown field 'tcp.port'"),
        ("ip.src in $nobody", 10, "unknown list $nobody"),
        ("tcp.dstport == ", 15, "expected a value, found the end"),
        (
            "tcp.dstport == 70000",
            15,
            "70000 is out of range for tcp.dstport (0..=65535)",
        ),
        ("ip.ttl == 256", 10, "256 is out of range for ip.ttl (0..=255)"),
        ("ip.ttl == abc", 10, "'abc' is not a number (ip.ttl takes 0..=255)"),
        (
            "tcp.dstport == 10.0.0.1",
            15,
            "'10.0.0.1' is not a number (tcp.dstport takes 0..=65535)",
        ),
        (
            "ip.src == 22",
            10,
            "'22' is not an address or prefix (ip.src takes IPv4 or IPv6)",
        ),
        (
            "ip.dst == 10.0.0.1/8",
            10,
            "10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?",
        ),
        ("ip.src < 10.0.0.1", 0, "ip.src takes ==, != or in, not <"),
        (
            "ip.frag == 1",
            0,
            "ip.frag is a flag: test it alone ('ip.frag' or 'not ip.frag')",
        ),
        (
            "tcp.dstport",
            0,
            "tcp.dstport needs a comparison (e.g. 'tcp.dstport == ...')",
        ),
        ("tcp.dstport in {}", 15, "empty set"),
        ("tcp.dstport in {2000..1000}", 16, "range 2000..1000 is empty"),
        (
            "tcp.dstport in {1..70000}",
            19,
            "70000 is out of range for tcp.dstport (0..=65535)",
        ),
        (
            "ip.src in {10.0.0.1..10.0.0.9}",
            11,
            "ranges are for numbers; ip.src takes prefixes",
        ),
        ("tcp.dstport in {22", 18, "expected a value or '}', found the end"),
        (
            "tcp.dstport in $admins",
            15,
            "$admins is a prefix list; tcp.dstport is not an address",
        ),
        ("tcp.dstport in 22", 15, "expected '{' or a $list, found '22'"),
        ("(ip.ttl == 1", 12, "expected ')', found the end"),
        ("ip.ttl == 1 and", 15, "expected a field name, found the end"),
        ("ip.ttl == 1 or or", 15, "expected a field name, found 'or'"),
        ("not", 3, "expected a field name, found the end"),
        (
            "ip.ttl == 1 ip.ttl == 2",
            12,
            "unexpected 'ip.ttl': expected 'and', 'or' or the end",
        ),
        ("ip.ttl = 1", 7, "unexpected '=': expected 'and', 'or' or the end"),
        ("22 == tcp.dstport", 0, "expected a field name, found '22'"),
        ("ip.ttl == 1)", 11, "unexpected ')': expected 'and', 'or' or the end"),
    ];
    let mut failures = Vec::new();
    for &(text, offset, message) in table {
        match parse(text, &lists) {
            Ok(e) => failures.push(format!("{text:?}: accepted as {e}")),
            Err(e) if e.offset != offset || e.message != message => failures.push(format!(
                "{text:?}: got ({}, {:?}), expected ({offset}, {message:?})",
                e.offset, e.message
            )),
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn random_value(rng: &mut StdRng, field: Field) -> Value {
    match field.kind() {
        Kind::Int { max } => Value::Int(rng.gen_range(0..=max)),
        _ => Value::Net(random_net(rng)),
    }
}

fn random_net(rng: &mut StdRng) -> ipnet::IpNet {
    if rng.gen_bool(0.7) {
        let len = rng.gen_range(0..=32);
        ipnet::IpNet::V4(ipnet::Ipv4Net::new(rng.gen::<u32>().into(), len).unwrap().trunc())
    } else {
        let len = rng.gen_range(0..=128);
        ipnet::IpNet::V6(ipnet::Ipv6Net::new(rng.gen::<u128>().into(), len).unwrap().trunc())
    }
}

fn random_expr(rng: &mut StdRng, depth: u32) -> Expr {
    let leaf = depth == 0 || rng.gen_bool(0.4);
    if !leaf {
        return match rng.gen_range(0..3) {
            0 => Expr::Or((0..rng.gen_range(2..4)).map(|_| random_expr(rng, depth - 1)).collect()),
            1 => Expr::And((0..rng.gen_range(2..4)).map(|_| random_expr(rng, depth - 1)).collect()),
            _ => Expr::Not(Box::new(random_expr(rng, depth - 1))),
        };
    }
    let field = Field::ALL[rng.gen_range(0..Field::ALL.len())];
    match field.kind() {
        Kind::Flag => Expr::Flag(field),
        Kind::Address if rng.gen_bool(0.2) => Expr::InList(field, "bad_actors".into()),
        kind if rng.gen_bool(0.3) => {
            let members = (0..rng.gen_range(1..5))
                .map(|_| match kind {
                    Kind::Int { max } => {
                        let a = rng.gen_range(0..=max);
                        let b = rng.gen_range(a..=max);
                        Member::Ints(a..=b)
                    }
                    _ => Member::Net(random_net(rng)),
                })
                .collect();
            Expr::In(field, members)
        }
        kind => {
            let ops: &[Op] = if kind == Kind::Address {
                &[Op::Eq, Op::Ne]
            } else {
                &[Op::Eq, Op::Ne, Op::Lt, Op::Le, Op::Gt, Op::Ge]
            };
            Expr::Compare(field, ops[rng.gen_range(0..ops.len())], random_value(rng, field))
        }
    }
}

/// Nested same-kind operators print with parentheses, so they parse back
/// to the same tree: printing then parsing is the identity.
#[test]
fn printing_then_parsing_gives_the_expression_back() {
    let mut rng = StdRng::seed_from_u64(5);
    for _ in 0..5_000 {
        let e = random_expr(&mut rng, 4);
        let text = e.to_string();
        let back = parse(&text, &lists).unwrap_or_else(|err| panic!("{text}: {err}"));
        assert_eq!(back, e, "{text}");
    }
}

mod evaluation {
    use super::*;
    use moat_expr::{tcp_flag, Packet, Transport};

    fn tcp(src: &str, dport: u16, flags: u8) -> Packet {
        Packet {
            src: src.parse().unwrap(),
            dst: "203.0.113.5".parse().unwrap(),
            proto: 6,
            ttl: 64,
            len: 60,
            frag: false,
            transport: Transport::Tcp {
                src: 40000,
                dst: dport,
                flags,
            },
        }
    }

    fn udp(sport: u16, dport: u16) -> Packet {
        Packet {
            proto: 17,
            transport: Transport::Udp { src: sport, dst: dport },
            ..tcp("198.51.100.7", 0, 0)
        }
    }

    fn list(name: &str) -> Vec<ipnet::IpNet> {
        match name {
            "admins" => vec!["192.0.2.0/28".parse().unwrap(), "2001:db8::/64".parse().unwrap()],
            _ => vec![],
        }
    }

    fn check(text: &str, p: &Packet) -> bool {
        parse(text, &lists)
            .unwrap_or_else(|e| panic!("{text}: {e}"))
            .matches(p, &list)
    }

    #[test]
    fn conditions_on_present_and_missing_fields() {
        let rdp = tcp("198.51.100.7", 3389, tcp_flag::SYN);
        let admin_rdp = tcp("192.0.2.3", 3389, tcp_flag::SYN);
        let dns = udp(53, 33000);
        let rule = "tcp.dstport == 3389 and not ip.src in $admins";
        assert!(check(rule, &rdp));
        assert!(!check(rule, &admin_rdp));
        assert!(!check(rule, &dns));
        // A field the packet lacks makes its condition false, `!=` included;
        // `not` of such a condition is true.
        assert!(!check("tcp.dstport != 22", &dns));
        assert!(check("not tcp.dstport == 22", &dns));
        assert!(!check("tcp.flags.syn", &dns));
        assert!(check("not tcp.flags.syn", &dns));
        assert!(check("tcp.flags.syn and not tcp.flags.ack", &rdp));
        assert!(check("tcp.flags == 0x02", &rdp));
        assert!(check("udp.srcport in {19 53 123}", &dns));
        assert!(!check("udp.srcport in {19 123 1000..2000}", &dns));
        assert!(check("udp.dstport in {1000..40000}", &dns));
        assert!(check("ip.dst == 203.0.113.0/24 and ip.proto == 17", &dns));
        assert!(check("ip.src != 10.0.0.0/8", &dns));
        assert!(!check("ip.src == 2001:db8::/32", &dns));
        assert!(check(
            "ip.version == 4 and ip.ttl >= 64 and ip.ttl <= 64 and ip.len < 61",
            &dns
        ));
        assert!(!check("ip.frag", &dns));
        let v6 = Packet {
            src: "2001:db8::5".parse().unwrap(),
            dst: "2001:db8:1::1".parse().unwrap(),
            ..tcp("198.51.100.7", 22, tcp_flag::ACK)
        };
        assert!(check("ip.src in $admins and ip.version == 6", &v6));
        assert!(check("ip.src != 10.0.0.0/8", &v6));
        // A later fragment carries no transport header.
        let later = Packet {
            frag: true,
            transport: Transport::None,
            ..udp(53, 53)
        };
        assert!(check("ip.frag and not udp.srcport == 53", &later));
        let ping = Packet {
            proto: 1,
            transport: Transport::Icmp { kind: 8, code: 0 },
            ..udp(0, 0)
        };
        assert!(check(
            "icmp.type == 8 and icmp.code == 0 and not udp.srcport == 0",
            &ping
        ));
    }
}
