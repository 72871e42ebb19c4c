//! The data plane's program verifies with room to spare: the kernel's
//! verifier gives up at 1,000,000 processed instructions, and a change
//! that brings the program near that limit should be seen when it is
//! made, not when the next rule feature fails to load.

use moat_dataplane::Dataplane;

/// The share of the verifier's limit the program may use.
const BUDGET: u32 = 700_000;

#[test]
fn the_program_verifies_well_within_the_kernels_limit() {
    let dp = Dataplane::load().expect("load (as root)");
    let processed = dp
        .verified_instructions()
        .expect("program info")
        .expect("this kernel reports verified instructions (5.16 and later)");
    println!("the verifier processed {processed} instructions (budget {BUDGET}, limit 1,000,000)");
    assert!(
        processed <= BUDGET,
        "the verifier processed {processed} instructions to load the data plane, over the budget of {BUDGET} \
         (its limit is 1,000,000): see docs/ARCHITECTURE.md, \"Verifier\""
    );
    // A count this low means the program was not the full data plane.
    assert!(processed > 10_000, "only {processed} instructions verified");
}
