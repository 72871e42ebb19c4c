//! The normal form on chosen cases (its agreement with the reference
//! evaluation over random rules is tested in moat-lab's classify tests).

use ipnet::IpNet;
use moat_expr::{
    normal::{terms, Ranges},
    Field,
};

fn list(name: &str) -> Vec<IpNet> {
    match name {
        "admins" => vec!["192.0.2.0/28".parse().unwrap()],
        _ => vec![],
    }
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
