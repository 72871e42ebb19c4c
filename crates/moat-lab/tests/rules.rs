//! Rule sets of 1 to 1,024 rules in the data plane: the operator's
//! mitigation rules and a customer's firewall, both of the same size, drawn
//! at random from the shared rule generator. For every packet the XDP
//! program's verdict and output bytes must equal the reference model's
//! (which evaluates each rule's expression directly), and after each set
//! every rule's match counter must equal the number of packets the model
//! saw that rule decide: the data plane picked the same rule every time.
//! Large sets hold fields looked up in direct tables, IPv4 addresses
//! looked up in tries, and fields searched.

use std::net::IpAddr;

use moat_dataplane::classify::MAX_TERMS;
use moat_dataplane::{RuleAction, RuleSpec};
use moat_expr::{normal::terms, Packet, Transport};
use moat_lab::{
    fixture::{standard_spec, Fixture},
    packet::{self, Frame, L4},
    random,
    rules::expr,
};
use rand::{rngs::StdRng, seq::SliceRandom, Rng};

/// Rule counts per set, and packets per size (100,000 in all).
const SIZES: [usize; 5] = [1, 17, 100, 333, 1024];
const PACKETS: usize = 20_000;

/// `n` random rules (no lists) whose terms fit one set, drop or pass.
/// Each matches some but at most 2% of the `sample` packets: with rules that
/// match nearly everything, only the first few rules would ever decide.
fn rules(rng: &mut StdRng, n: usize, prefix: &str, sample: &[Packet]) -> Vec<RuleSpec> {
    let mut out = Vec::new();
    let mut used = 0;
    while out.len() < n {
        let e = expr(rng, 2);
        if format!("{e}").contains('$') {
            continue;
        }
        // Rules of one or a few terms, as operators write them.
        let Ok(t) = terms(&e, &|_| Vec::new(), 8) else {
            continue;
        };
        // Leave at least one term for each rule still to come.
        if t.is_empty() || used + t.len() + (n - out.len() - 1) > MAX_TERMS {
            continue;
        }
        let hits = sample.iter().filter(|p| e.matches(p, &|_| Vec::new())).count();
        if hits == 0 || hits * 50 > sample.len() {
            continue;
        }
        used += t.len();
        out.push(RuleSpec {
            name: format!("{prefix}{}", out.len()),
            condition: e,
            terms: t,
            action: if rng.gen_bool(0.5) {
                RuleAction::Drop
            } else {
                RuleAction::Pass
            },
        });
    }
    out
}

/// A packet to acme's prefixes with values from the generator's pools, as
/// the language sees it.
fn packet(rng: &mut StdRng) -> Packet {
    const V4: [&str; 5] = ["10.1.2.3", "10.200.0.1", "192.0.2.7", "192.0.2.8", "203.0.113.1"];
    const V6: [&str; 2] = ["2001:db8::1", "2001:db9::1"];
    const PORTS: [u16; 9] = [1, 22, 53, 80, 443, 1024, 11211, 65535, 4000];
    let v6 = rng.gen_ratio(1, 4);
    let (src, dst): (IpAddr, IpAddr) = if v6 {
        (
            V6.choose(rng).unwrap().parse().unwrap(),
            "2001:db8:100::9".parse().unwrap(),
        )
    } else {
        (V4.choose(rng).unwrap().parse().unwrap(), "203.0.113.9".parse().unwrap())
    };
    let port = |rng: &mut StdRng| *PORTS.choose(rng).unwrap();
    let (proto, transport) = match rng.gen_range(0..3) {
        0 => (
            6,
            Transport::Tcp {
                src: port(rng),
                dst: port(rng),
                flags: *[0x02u8, 0x10, 0x12, 0x18, 0x11, 0x04].choose(rng).unwrap(),
            },
        ),
        1 => (
            17,
            Transport::Udp {
                src: port(rng),
                dst: port(rng),
            },
        ),
        _ => (
            if v6 { 58 } else { 1 },
            Transport::Icmp {
                kind: if v6 { 128 } else { 8 },
                code: 0,
            },
        ),
    };
    let headers = headers(v6, proto);
    Packet {
        src,
        dst,
        proto,
        ttl: *[2u8, 6, 17, 64, 128, 255].choose(rng).unwrap(),
        len: headers + rng.gen_range(0..200),
        frag: false,
        transport,
    }
}

/// The IP and L4 header bytes of the frames [`frame`] builds.
fn headers(v6: bool, proto: u8) -> u16 {
    let ip = if v6 { 40 } else { 20 };
    ip + if proto == 6 { 20 } else { 8 }
}

/// The frame of `p`, whose IP length is `p.len` (checked).
fn frame(p: &Packet) -> Vec<u8> {
    let l4 = match p.transport {
        Transport::Tcp { src, dst, flags } => L4::TcpFlags {
            sport: src,
            dport: dst,
            flags,
        },
        Transport::Udp { src, dst } => L4::Udp { sport: src, dport: dst },
        _ => L4::Echo { id: p.len, seq: 1 },
    };
    let payload = vec![0u8; usize::from(p.len - headers(p.src.is_ipv6(), p.proto))];
    let f = packet::eth(Frame::default(), &packet::ip(p.src, p.dst, p.ttl, l4, &payload));
    // The rules were drawn against `p`: the frame must carry what it says.
    assert_eq!(f.len() - 14, usize::from(p.len), "frame of {p:?}");
    f
}

#[test]
fn data_plane_picks_the_models_rule_in_sets_of_1_to_1024_rules() {
    let (seed, mut rng) = random::seeded();
    let mut f = Fixture::new("rules");
    let mut total = 0;
    for n in SIZES {
        let mut spec = standard_spec();
        let sample: Vec<Packet> = (0..300).map(|_| packet(&mut rng)).collect();
        spec.mitigation = rules(&mut rng, n, "m", &sample);
        spec.customers[0].firewall = rules(&mut rng, n, "f", &sample);
        f.apply(spec.clone());
        f.rule_hits.borrow_mut().clear();
        // Fields with many intervals look their value up in a direct table
        // (while tables last), IPv4 addresses in a trie (while tries last),
        // the rest search: every way is compared.
        let (direct, trie, searched) =
            f.dp.applied()
                .and_then(|a| a.rules())
                .map(|r| {
                    r.sets
                        .iter()
                        .flat_map(|s| s.directs.iter().zip(&s.tries))
                        .fold((0, 0, 0), |(d, t, n), x| match x {
                            (Some(_), _) => (d + 1, t, n),
                            (None, Some(_)) => (d, t + 1, n),
                            (None, None) => (d, t, n + 1),
                        })
                })
                .unwrap_or((0, 0, 0));
        if n >= 100 {
            assert!(
                direct > 0 && trie > 0 && searched > 0,
                "{n} rules: {direct} direct, {trie} tries, {searched} searched"
            );
        }
        let mut dropped_by_rules = 0;
        for i in 0..PACKETS {
            // The sample first: every rule was drawn to match some of it,
            // however rare its packets are in the rest of the stream.
            let b = frame(&sample.get(i).cloned().unwrap_or_else(|| packet(&mut rng)));
            let got = f.run(&b);
            let want = f
                .with_model(|m| m.process(&b))
                .expect("the model predicts the forward path");
            assert_eq!(
                (got.action, &got.data),
                (want.action.code(), &want.output),
                "seed {seed}, {n} rules: packet {i} ({:?}) differs\ninput {b:02x?}",
                want.reason
            );
            if matches!(
                want.reason,
                moat_common::Reason::DropMitigationRule | moat_common::Reason::DropFirewall
            ) {
                dropped_by_rules += 1;
            }
        }
        let hits = f.rule_hits.borrow().clone();
        let counters = f.dp.rule_counters().unwrap();
        assert_eq!(counters.len(), 2 * n, "a counter per rule");
        let mut matched = 0;
        for c in &counters {
            let want = hits.get(&(c.customer.clone(), c.rule.clone())).copied().unwrap_or(0);
            assert_eq!(
                c.packets, want,
                "seed {seed}, {n} rules: rule {:?}/{}",
                c.customer, c.rule
            );
            matched += c.packets;
        }
        // Rules of every position matched, not just the first few.
        let last_matching = counters
            .iter()
            .filter(|c| c.customer.is_none() && c.packets > 0)
            .filter_map(|c| c.rule[1..].parse::<usize>().ok())
            .max()
            .unwrap_or(0);
        println!(
            "{n} rules per set: {PACKETS} packets agree; {matched} rule matches, {dropped_by_rules} dropped by rules, \
             highest mitigation rule matched: m{last_matching}; fields with a direct table {direct}, a trie {trie}, \
             searched {searched}"
        );
        assert!(matched > 0, "seed {seed}, {n} rules: no rule ever matched");
        if n >= 100 {
            assert!(last_matching >= n / 4, "seed {seed}: only early rules matched");
        }
        total += PACKETS;
    }
    println!("{total} packets compared");
}

/// A UDP frame from port 4000 to `dport`, with 22 bytes of payload.
fn udp(src: &str, dst: &str, dport: u16) -> Vec<u8> {
    packet::eth(
        Frame::default(),
        &packet::ip(
            src.parse().unwrap(),
            dst.parse().unwrap(),
            64,
            L4::Udp { sport: 4000, dport },
            &[0u8; 22],
        ),
    )
}

/// Runs `frame` through the data plane, checks its verdict and output
/// bytes against the model's, and returns the action, the model's outcome
/// and the rules whose match counters moved.
fn run_as_model(f: &Fixture, frame: &[u8], what: &str) -> (u32, moat_lab::model::Expect, Vec<String>) {
    let before = f.dp.rule_counters().unwrap();
    let got = f.run(frame);
    let want = f.with_model(|m| m.process(frame)).expect("the model predicts it");
    assert_eq!((got.action, &got.data), (want.action.code(), &want.output), "{what}");
    let moved =
        f.dp.rule_counters()
            .unwrap()
            .into_iter()
            .zip(before)
            .filter(|(a, b)| a.packets > b.packets)
            .map(|(a, _)| a.rule)
            .collect();
    (got.action, want, moved)
}

/// In a set of more than 32 terms the data plane first ANDs 32-bit
/// summaries of the packet's bitmaps (one bit per 32 terms), then reads
/// the bitmaps span by span. Here (41 terms) the source's and the port's
/// bitmaps both have terms in the first span but none in common, so that
/// span is a false lead: the match in the second span must still be
/// found, and a packet whose only common span is a false lead must match
/// nothing.
/// `n` drop rules "m0", "m1", ...: rule i on the source 192.0.2.(i + 1)
/// and the UDP port 1000 + i.
fn source_port_rules(n: usize) -> Vec<RuleSpec> {
    (0..n)
        .map(|i| {
            moat_lab::rules::spec_rule(
                &format!("m{i}"),
                &format!("ip.src == 192.0.2.{} and udp.dstport == {}", i + 1, 1000 + i),
                RuleAction::Drop,
            )
        })
        .collect()
}

/// Checks that a UDP frame from `src` to port `dport` fares as the model
/// says and is dropped by the mitigation rule `rule` (`None`: no rule
/// matches it); returns the model's outcome.
fn decided_by(f: &Fixture, src: &str, dport: u16, rule: Option<&str>, what: &str) -> moat_lab::model::Expect {
    let (action, want, moved) = run_as_model(f, &udp(src, "203.0.113.5", dport), what);
    assert_eq!(moved, rule.into_iter().map(String::from).collect::<Vec<_>>(), "{what}");
    assert_eq!(action, if rule.is_some() { 1 } else { want.action.code() }, "{what}");
    want
}

#[test]
fn a_span_that_only_the_summaries_share_is_passed_over() {
    let mut f = Fixture::new("rulespan");
    let mut spec = standard_spec();
    let mut rules = source_port_rules(40);
    rules.push(moat_lab::rules::spec_rule(
        "late",
        "ip.src == 192.0.2.1 and udp.dstport == 1001",
        RuleAction::Drop,
    ));
    spec.mitigation = rules;
    f.apply(spec);
    // Terms 0 (the source) and 1 (the port) share the first span only in
    // the summaries; term 40 ("late") matches both, in the second span.
    for (src, dport, rule) in [
        ("192.0.2.1", 1001, Some("late")),
        ("192.0.2.1", 1002, None),
        ("192.0.2.2", 1001, Some("m1")),
    ] {
        let want = decided_by(&f, src, dport, rule, &format!("{src} -> {dport}"));
        assert_eq!(
            want.reason == moat_common::Reason::DropMitigationRule,
            rule.is_some(),
            "{src} -> {dport}: {:?}",
            want.reason
        );
    }
}

/// A set of at most 32 terms keeps the terms themselves in its
/// summaries and reads no bitmap; a larger one keeps spans. Across that
/// line (31, 32 and 33 one-term rules), a packet matching two rules is
/// decided by the first, and the last rule (term 30, 31 or 32) is found
/// as any other.
#[test]
fn sets_either_side_of_32_terms_find_the_first_matching_rule() {
    let mut f = Fixture::new("rule32");
    for n in [31usize, 32, 33] {
        let mut spec = standard_spec();
        // Rule i: one source and one port; the last: the first port from
        // any source.
        let mut rules = source_port_rules(n - 1);
        rules.push(moat_lab::rules::spec_rule(
            "last",
            "udp.dstport == 1000",
            RuleAction::Drop,
        ));
        spec.mitigation = rules;
        f.apply(spec);
        for (src, dport, rule) in [
            ("192.0.2.1", 1000, Some("m0")),
            ("192.0.2.9", 1000, Some("last")),
            ("192.0.2.2", 1000, Some("last")),
            ("192.0.2.2", 1001, Some("m1")),
            ("192.0.2.1", 1001, None),
        ] {
            decided_by(&f, src, dport, rule, &format!("{n} rules: {src} -> {dport}"));
        }
    }
}

/// IPv6 addresses whose high 64 bits are zero and whose low 64 bits are
/// 2^63 or more (`::8000:0:0:0` and up) are classified like any other,
/// whatever the set holds for the IPv6 addresses: nothing (rules on IPv4
/// addresses only), or hundreds of small addresses.
#[test]
fn ipv6_addresses_with_a_zero_high_half_are_classified() {
    let small: Vec<String> = (1..=300).map(|i| format!("::{i:x}")).collect();
    let sets = [
        vec![
            ("v4", "ip.src in {10.0.0.0/8}".to_string()),
            ("port", "udp.dstport == 53".to_string()),
        ],
        vec![
            ("small", format!("ip.src in {{{}}}", small.join(" "))),
            ("port", "udp.dstport == 53".to_string()),
        ],
    ];
    for (n, set) in sets.iter().enumerate() {
        let mut f = Fixture::new(&format!("rulev6{n}"));
        let mut spec = standard_spec();
        spec.mitigation = set
            .iter()
            .map(|(name, text)| moat_lab::rules::spec_rule(name, text, RuleAction::Drop))
            .collect();
        f.apply(spec);
        for (src, dport, rule) in [
            ("::ffff:ffff:ffff:ffff", 53, Some("port")),
            ("::8000:0:0:1", 53, Some("port")),
            ("::8000:0:0:1", 54, None),
            ("::7fff:ffff:ffff:ffff", 53, Some("port")),
            ("::5", 53, Some(if n == 0 { "port" } else { "small" })),
            ("::5", 54, if n == 0 { None } else { Some("small") }),
        ] {
            let what = format!("set {n}: {src} -> {dport}");
            let (_, _, moved) = run_as_model(&f, &udp(src, "2001:db8:100::5", dport), &what);
            assert_eq!(
                moved,
                rule.into_iter().map(String::from).collect::<Vec<_>>(),
                "set {n}: {src} -> {dport}"
            );
        }
    }
}

/// An IPv4 address table of many intervals gets a trie: packets from its
/// /24s are decided by the right rule, and a word of the trie changed
/// behind moat's back is found by the comparison of the live copy that
/// `moat status` makes, and the next apply writes it back.
#[test]
fn a_changed_trie_word_is_found_and_rewritten() {
    let mut f = Fixture::new("ruletrie");
    let mut spec = standard_spec();
    spec.mitigation = (0..64)
        .map(|i| {
            moat_lab::rules::spec_rule(
                &format!("m{i}"),
                &format!("ip.src in {{10.9.{}.0/24}}", 2 * i),
                RuleAction::Drop,
            )
        })
        .collect();
    f.apply(spec.clone());
    let rules = f.dp.applied().and_then(|a| a.rules()).expect("rule sets").clone();
    let set = &rules.sets[0];
    let table = set
        .tables
        .tables
        .iter()
        .position(|t| t.field == moat_expr::Field::IpSrc && t.space == moat_dataplane::classify::Space::Main)
        .expect("an IPv4 source table");
    let (root, _) = set.tries[table].expect("the sources have a trie");
    for (src, rule) in [
        ("10.9.6.1", Some("m3")),
        ("10.9.7.1", None),
        ("10.9.126.255", Some("m63")),
    ] {
        decided_by(&f, src, 53, rule, src);
    }
    let verify = |f: &Fixture| f.dp.verify_rules(f.dp.applied().unwrap()).unwrap();
    assert_eq!(verify(&f), Vec::<String>::new());
    // The root's entry for 10.9/16, in the live copy.
    use moat_common::rules::*;
    let copy = f.dp.maps.active.get(moat_common::active::RULES) as u32;
    let at = copy * CLS_TRIE_WORDS + root * CLS_TRIE_ROOT + 0x0a09;
    let good = f.dp.maps.cls_trie.get(at);
    assert_ne!(good & CLS_TRIE_CHILD, 0, "10.9/16 leads to a node");
    f.dp.maps.cls_trie.set(at, 0);
    assert_eq!(
        verify(&f),
        vec![format!("rule sets: trie {root} differs from this generation's")]
    );
    // Applying the same rules again writes the idle copy whole and makes it live.
    f.dp.resync();
    f.apply(spec);
    assert_eq!(verify(&f), Vec::<String>::new());
    decided_by(&f, "10.9.6.1", 53, Some("m3"), "after the rewrite");
}
