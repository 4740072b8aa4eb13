//! Safety and liveness over many seeded scenarios of every fault class. Each test runs its
//! class's seeds; a failure names the seed and how to replay it.

use pbft_sim::{FaultClass, run_class};

/// Seeds per class: 17 classes x 64 = 1,088 scenarios per `cargo test`.
const SEEDS_PER_CLASS: u64 = 64;

fn check(class: FaultClass) {
    match run_class(class, 0, SEEDS_PER_CLASS) {
        Ok(outcomes) => {
            let requests: usize = outcomes.iter().map(|o| o.completed_requests).sum();
            assert!(requests > 0, "{class}: scenarios ran but committed nothing");
        }
        Err(f) => {
            panic!(
                "{class} FAILED: {f}\nreplay: PBFT_SEED=<seed from the scenario line> cargo test -p pbft-sim --test replay -- --nocapture"
            );
        }
    }
}

macro_rules! class_tests {
    ($($name:ident => $class:ident),* $(,)?) => {
        $(#[test] fn $name() { check(FaultClass::$class); })*
    };
}

class_tests! {
    calm => Calm,
    lossy_network => LossyNetwork,
    partitions => Partitions,
    crash_restart => CrashRestart,
    wiped_disk => WipedDisk,
    equivocating_primary => Equivocation,
    forged_signatures => ForgedSignatures,
    wrong_digests => WrongDigests,
    stale_and_future_views => StaleAndFutureViews,
    replayed_messages => Replay,
    silent_primary => SilentPrimary,
    censoring_primary => CensorClient,
    conflicting_view_changes => ConflictingViewChanges,
    silent_then_returns => SilentThenReturns,
    forged_sync => ForgedSync,
    mixed => Mixed,
    forged_requests => ForgedRequests,
}
