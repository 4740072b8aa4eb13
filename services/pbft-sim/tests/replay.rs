//! Replays one seed with a full event trace: `PBFT_SEED=<n> cargo test -p pbft-sim --test
//! replay -- --nocapture`. Without PBFT_SEED it replays seed 0, and checks that running a
//! seed twice gives the same outcome (the simulator's determinism, which replay relies on).

use pbft_sim::{Scenario, run};

#[test]
fn replay_seed() {
    let seed = std::env::var("PBFT_SEED")
        .ok()
        .map(|s| s.parse::<u64>().expect("PBFT_SEED must be a number"))
        .unwrap_or(0);
    let verbose = std::env::var("PBFT_SEED").is_ok();
    match run(Scenario::from_seed(seed), verbose) {
        Ok(o) => println!("seed {seed} passed: {o:?}"),
        Err(f) => panic!("seed {seed} FAILED: {f}"),
    }
}

#[test]
fn same_seed_same_run() {
    for seed in [3, 17, 29, 46] {
        let a = run(Scenario::from_seed(seed), false).expect("passes");
        let b = run(Scenario::from_seed(seed), false).expect("passes");
        assert_eq!(a, b, "seed {seed} is not deterministic");
    }
}
