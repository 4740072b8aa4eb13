//! A deterministic simulator for whole PBFT clusters.
//!
//! One thread runs n replicas (some Byzantine), several clients and a network that drops,
//! duplicates, delays, reorders and partitions, all in virtual time and all driven by one
//! seed. Safety is checked after every step; liveness once the faults stop. A failing seed
//! replays exactly: `PBFT_SEED=<seed> cargo test -p pbft-sim --test replay -- --nocapture`.

pub mod byzantine;
pub mod invariants;
pub mod memo;
pub mod rng;
pub mod scenario;
pub mod sim;

pub use invariants::Violation;
pub use scenario::{FaultClass, Scenario};
pub use sim::{Failure, Outcome, Sim};

/// Runs the scenario derived from `seed`.
pub fn run_seed(seed: u64) -> Result<Outcome, Box<Failure>> {
    run(Scenario::from_seed(seed), false)
}

/// Runs a scenario; `verbose` prints every event as it happens.
pub fn run(scenario: Scenario, verbose: bool) -> Result<Outcome, Box<Failure>> {
    Sim::new(scenario, verbose).run()
}

/// Runs `count` seeds of one class starting at `first` (seeds `first + i * classes` so each
/// class gets its own seeds); returns the outcomes or the first failure.
pub fn run_class(class: FaultClass, first: u64, count: u64) -> Result<Vec<Outcome>, Box<Failure>> {
    let classes = FaultClass::ALL.len() as u64;
    let offset = FaultClass::ALL
        .iter()
        .position(|c| *c == class)
        .unwrap_or(0) as u64;
    (0..count)
        .map(|i| {
            let seed = first + i * classes + offset;
            run(Scenario::with_class(seed, class), false)
        })
        .collect()
}
