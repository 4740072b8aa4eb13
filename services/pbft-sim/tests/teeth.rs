//! The simulator's checks have teeth: with a protocol rule broken on purpose, it finds a
//! safety violation. Runs only with `--features mutations` (`make teeth`).
#![cfg(feature = "mutations")]

use pbft_core::Mutation;
use pbft_sim::{FaultClass, Scenario, Violation, run};

fn first_violation(mutation: Mutation, class: FaultClass) -> Option<(u64, Violation)> {
    (0..400u64).find_map(|seed| {
        let mut sc = Scenario::with_class(seed, class);
        sc.config.mutation = Some(mutation);
        run(sc, false).err().map(|f| (seed, f.violation))
    })
}

#[test]
fn weak_quorum_is_caught() {
    let (seed, v) = first_violation(Mutation::WeakQuorum, FaultClass::Equivocation)
        .expect("a 2f quorum must let an equivocating primary split the honest replicas");
    println!("weak quorum caught at seed {seed}: {v}");
    assert!(
        matches!(
            v,
            Violation::Agreement { .. } | Violation::Checkpoint { .. } | Violation::Replies { .. }
        ),
        "expected a safety violation, got {v}"
    );
}

#[test]
fn skipped_digest_check_is_caught() {
    let (seed, v) = first_violation(Mutation::SkipDigestCheck, FaultClass::WrongDigests)
        .expect("without the digest check, one signed digest can carry two batches");
    println!("skipped digest check caught at seed {seed}: {v}");
    assert!(
        matches!(
            v,
            Violation::Agreement { .. } | Violation::Checkpoint { .. } | Violation::Replies { .. }
        ),
        "expected a safety violation, got {v}"
    );
}

#[test]
fn skipped_vouch_check_is_caught() {
    let (seed, v) = first_violation(Mutation::SkipVouchCheck, FaultClass::ForgedRequests)
        .expect("without counting vouches, backups that did not check commit a forged request");
    println!("skipped vouch check caught at seed {seed}: {v}");
    assert!(
        matches!(v, Violation::Forged { .. }),
        "expected a forged request committed, got {v}"
    );
}
