//! Classification by compiled tables (moat_dataplane::classify) and the
//! normal form it is built from agree with the reference evaluation of the
//! expressions (moat_expr), over random rules and packets
//! (moat_lab::rules).

use moat_dataplane::classify::{compile, MAX_TERMS};
use moat_expr::normal::{term_matches, terms, MAX_TERMS as RULE_TERMS};
use moat_lab::rules::{expr, list, packet};
use rand::{rngs::StdRng, SeedableRng};

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

/// Random rule sets of 1 to 1,024 rules; for each, random packets: the
/// first matching rule by the tables is the first whose expression matches.
#[test]
fn tables_find_the_first_matching_rule() {
    let mut rng = StdRng::seed_from_u64(12);
    let sizes = [1usize, 2, 5, 17, 100, 333, 1024];
    let (mut compared, mut unmatched) = (0u64, 0u64);
    for &size in &sizes {
        for _ in 0..3 {
            // Rules of one or a few terms, as operators write them; the set
            // stays within its term capacity.
            let mut rules = Vec::new();
            let mut exprs = Vec::new();
            let mut used = 0;
            while rules.len() < size {
                let e = expr(&mut rng, if size > 100 { 2 } else { 3 });
                let Ok(ts) = terms(&e, &list, RULE_TERMS) else {
                    continue;
                };
                if used + ts.len() > MAX_TERMS - (size - rules.len() - 1) {
                    continue;
                }
                used += ts.len();
                rules.push(ts);
                exprs.push(e);
            }
            let tables = compile(&rules).expect("fits");
            let packets = if size >= 333 { 5_000 } else { 15_000 };
            for _ in 0..packets {
                let p = packet(&mut rng);
                let want = exprs.iter().position(|e| e.matches(&p, &list));
                assert_eq!(tables.classify(&p), want, "{size} rules, packet {p:?}");
                compared += 1;
                unmatched += u64::from(want.is_none());
            }
        }
    }
    println!("{compared} packets classified as the reference does ({unmatched} matched no rule)");
    assert!(compared >= 100_000);
    assert!(
        unmatched > 0 && unmatched < compared / 2,
        "{unmatched} of {compared} unmatched"
    );
}

#[test]
fn capacity_is_enforced() {
    let mut rng = StdRng::seed_from_u64(13);
    let rule = || vec![moat_expr::normal::Term::new()];
    assert!(compile(&vec![rule(); MAX_TERMS]).is_ok());
    assert!(compile(&vec![rule(); MAX_TERMS + 1]).is_err());
    assert_eq!(compile(&[]).expect("empty").classify(&packet(&mut rng)), None);
}
