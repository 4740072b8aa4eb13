//! A scenario is everything about one simulated run, derived from its seed: cluster size,
//! protocol parameters, workload, network conditions, and which faults strike when.

use std::fmt;

use pbft_core::{Config, StateDigest};

use crate::rng::SimRng;

/// The kind of trouble a scenario is built around.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultClass {
    /// A calm network, no faulty replica: the baseline.
    Calm,
    /// Drops, duplicates, long and uneven delays (so reordering).
    LossyNetwork,
    /// The network splits into groups and heals, repeatedly.
    Partitions,
    /// Honest replicas crash and restart from durable state, the primary included.
    CrashRestart,
    /// One replica loses its disk and rejoins by state transfer.
    WipedDisk,
    /// Byzantine primary sends different batches to different backups.
    Equivocation,
    /// Byzantine replica sends messages with forged or garbage signatures.
    ForgedSignatures,
    /// Byzantine replica sends digests that do not match content.
    WrongDigests,
    /// Byzantine replica re-signs its messages for stale and future views.
    StaleAndFutureViews,
    /// Byzantine replica replays old messages it has seen.
    Replay,
    /// Byzantine replica says nothing while it is primary.
    SilentPrimary,
    /// Byzantine primary never proposes one client's requests.
    CensorClient,
    /// Byzantine replica sends different view changes to different replicas, and a forged
    /// new view when it becomes primary.
    ConflictingViewChanges,
    /// A replica goes silent (in and out) for a while, then returns.
    SilentThenReturns,
    /// Byzantine replica serves forged and truncated blocks to syncing peers.
    ForgedSync,
    /// A Byzantine behaviour together with a lossy network and crashes.
    Mixed,
    /// Byzantine primary adds requests no client signed to its batches; Byzantine backups
    /// vouch for batches without checking them, and withhold their prepares from one
    /// replica.
    ForgedRequests,
}

impl FaultClass {
    pub const ALL: [FaultClass; 17] = [
        FaultClass::Calm,
        FaultClass::LossyNetwork,
        FaultClass::Partitions,
        FaultClass::CrashRestart,
        FaultClass::WipedDisk,
        FaultClass::Equivocation,
        FaultClass::ForgedSignatures,
        FaultClass::WrongDigests,
        FaultClass::StaleAndFutureViews,
        FaultClass::Replay,
        FaultClass::SilentPrimary,
        FaultClass::CensorClient,
        FaultClass::ConflictingViewChanges,
        FaultClass::SilentThenReturns,
        FaultClass::ForgedSync,
        FaultClass::Mixed,
        FaultClass::ForgedRequests,
    ];

    /// The class a seed belongs to: seeds cycle through all classes.
    pub fn for_seed(seed: u64) -> FaultClass {
        FaultClass::ALL[(seed % FaultClass::ALL.len() as u64) as usize]
    }

    /// Byzantine behaviour the class puts on replicas, if any.
    pub fn behavior(self) -> Option<crate::byzantine::Behavior> {
        use crate::byzantine::Behavior as B;
        Some(match self {
            FaultClass::Equivocation => B::Equivocate,
            FaultClass::ForgedSignatures => B::ForgeSignatures,
            FaultClass::WrongDigests => B::WrongDigests,
            FaultClass::StaleAndFutureViews => B::StaleAndFutureViews,
            FaultClass::Replay => B::Replay,
            FaultClass::SilentPrimary => B::SilentPrimary,
            FaultClass::CensorClient => B::CensorClient,
            FaultClass::ConflictingViewChanges => B::ConflictingViewChanges,
            FaultClass::ForgedSync => B::ForgeSync,
            FaultClass::ForgedRequests => B::ForgeRequests,
            _ => return None,
        })
    }
}

impl fmt::Display for FaultClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Network conditions during the chaos phase.
#[derive(Clone, Debug)]
pub struct NetworkSpec {
    pub min_delay: u64,
    pub max_delay: u64,
    pub drop_percent: u64,
    pub duplicate_percent: u64,
    /// (start, end, groups): while active, messages between groups are lost.
    pub partitions: Vec<(u64, u64, Vec<Vec<usize>>)>,
}

/// A crash (and optional wipe) of one replica at `at`, back at `restart`.
#[derive(Clone, Debug)]
pub struct CrashSpec {
    pub replica: usize,
    pub at: u64,
    pub restart: u64,
    pub wipe: bool,
}

/// Everything about one run.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub seed: u64,
    pub class: FaultClass,
    pub config: Config,
    pub clients: usize,
    pub requests_per_client: usize,
    pub keys: u64,
    /// Faults happen before this virtual millisecond; after it the network is reliable and
    /// every crashed replica is back (Byzantine replicas stay Byzantine).
    pub heal_at: u64,
    /// After healing, every correct client's requests must complete within this long.
    pub liveness_bound: u64,
    pub network: NetworkSpec,
    pub crashes: Vec<CrashSpec>,
    /// Byzantine replicas and their behaviour.
    pub byzantine: Vec<(usize, crate::byzantine::Behavior)>,
    /// Replicas silent from `.1` to `.2` (honest state kept).
    pub silences: Vec<(usize, u64, u64)>,
    pub client_retransmit: u64,
    /// Most virtual ms a client waits between a result and its next request.
    pub think_time: u64,
}

impl Scenario {
    /// Derives the scenario for `seed`, in the class the seed maps to.
    pub fn from_seed(seed: u64) -> Scenario {
        Self::with_class(seed, FaultClass::for_seed(seed))
    }

    /// Derives a scenario of the given class from `seed`.
    pub fn with_class(seed: u64, class: FaultClass) -> Scenario {
        let mut rng = SimRng::new(seed ^ 0x005e_ed0f_9bf7);
        let n = match rng.range(0, 99) {
            0..=69 => 4,
            70..=93 => 7,
            _ => 10,
        };
        let f = pbft_core::max_faulty(n);
        let k = rng.range(2, 8);
        let config = Config {
            n,
            checkpoint_interval: k,
            log_window: k * rng.range(2, 4),
            max_batch: rng.range(1, 8) as usize,
            batch_delay: rng.range(0, 5),
            max_in_flight: rng.range(1, 8),
            view_change_timeout: rng.range(150, 400),
            max_view_change_timeout: 5_000,
            // From a stream of its own, like `state_digest`; often shorter than the lossy
            // network's delays, so backups check batches themselves and suspect vouchers.
            vouch_timeout: SimRng::new(seed ^ 0x0000_0b0c).range(5, 80),
            // One seed in eight runs the rolling-upgrade mode, every backup checking.
            check_every_batch: SimRng::new(seed ^ 0x00ec_0a11).range(0, 7) == 0,
            retransmit_interval: rng.range(80, 200),
            status_interval: rng.range(200, 600),
            sync_chunk: rng.range(1, 6) as u32,
            sync_timeout: 200,
            max_request_bytes: 4096,
            max_pending_requests: 10_000,
            // From a stream of its own, so adding it kept every older seed's scenario.
            state_digest: match SimRng::new(seed ^ 0x0d16_e570).range(0, 3) {
                0 => StateDigest::Linear,
                _ => StateDigest::Buckets,
            },
            #[cfg(feature = "mutations")]
            mutation: None,
        };
        let heal_at = rng.range(800, 2_500);
        let calm = NetworkSpec {
            min_delay: 1,
            max_delay: rng.range(1, 5),
            drop_percent: 0,
            duplicate_percent: 0,
            partitions: Vec::new(),
        };
        let lossy = |rng: &mut SimRng| NetworkSpec {
            min_delay: 1,
            max_delay: rng.range(5, 60),
            drop_percent: rng.range(1, 25),
            duplicate_percent: rng.range(0, 15),
            partitions: Vec::new(),
        };
        let mut s = Scenario {
            seed,
            class,
            config,
            clients: rng.range(1, 4) as usize,
            requests_per_client: rng.range(2, 8) as usize,
            keys: rng.range(2, 6),
            heal_at,
            liveness_bound: 120_000,
            network: calm,
            crashes: Vec::new(),
            byzantine: Vec::new(),
            silences: Vec::new(),
            client_retransmit: rng.range(150, 400),
            think_time: rng.range(10, 120),
        };
        let pick_replica = |rng: &mut SimRng, taken: &[usize]| loop {
            let r = rng.range(0, n as u64 - 1) as usize;
            if !taken.contains(&r) {
                return r;
            }
        };
        match class {
            FaultClass::Calm => {}
            FaultClass::LossyNetwork => s.network = lossy(&mut rng),
            FaultClass::Partitions => {
                s.network.max_delay = rng.range(2, 20);
                let mut t = rng.range(0, 300);
                while t < heal_at {
                    let end = (t + rng.range(100, 800)).min(heal_at);
                    let mut groups = vec![Vec::new(), Vec::new()];
                    for r in 0..n {
                        groups[rng.range(0, 1) as usize].push(r);
                    }
                    s.network.partitions.push((t, end, groups));
                    t = end + rng.range(0, 400);
                }
            }
            FaultClass::CrashRestart => {
                for _ in 0..rng.range(1, 4) {
                    let replica = if rng.chance(40) {
                        0
                    } else {
                        rng.range(0, n as u64 - 1) as usize
                    };
                    let at = rng.range(0, heal_at.saturating_sub(100));
                    let restart = (at + rng.range(50, 1_500)).min(heal_at);
                    s.crashes.push(CrashSpec {
                        replica,
                        at,
                        restart,
                        wipe: false,
                    });
                }
            }
            FaultClass::WipedDisk => {
                // Losing the disk is amnesia, which counts against f: no other fault here.
                let replica = rng.range(0, n as u64 - 1) as usize;
                let at = rng.range(200, heal_at / 2);
                s.crashes.push(CrashSpec {
                    replica,
                    at,
                    restart: (at + rng.range(50, 400)).min(heal_at),
                    wipe: true,
                });
            }
            FaultClass::SilentThenReturns => {
                let r = rng.range(0, n as u64 - 1) as usize;
                let from = rng.range(0, heal_at / 2);
                s.silences.push((r, from, rng.range(from + 100, heal_at)));
                s.network.max_delay = rng.range(1, 20);
            }
            FaultClass::Mixed => {
                let behaviours: Vec<_> = FaultClass::ALL
                    .iter()
                    .filter_map(|c| c.behavior())
                    .collect();
                let mut taken = Vec::new();
                for _ in 0..f {
                    let r = pick_replica(&mut rng, &taken);
                    taken.push(r);
                    s.byzantine.push((r, *rng.pick(&behaviours)));
                }
                s.network = lossy(&mut rng);
                // Crash honest replicas too: crashes never break safety, only pause them.
                for _ in 0..rng.range(0, 2) {
                    let replica = pick_replica(&mut rng, &taken);
                    let at = rng.range(0, heal_at.saturating_sub(100));
                    s.crashes.push(CrashSpec {
                        replica,
                        at,
                        restart: (at + rng.range(50, 1_000)).min(heal_at),
                        wipe: false,
                    });
                }
            }
            byz => {
                let behavior = byz.behavior().expect("remaining classes are Byzantine");
                let mut taken = Vec::new();
                // Usually the primary of view 0 (the most damaging place), up to f replicas.
                for i in 0..rng.range(1, f as u64) {
                    let r = if i == 0 && rng.chance(70) {
                        0
                    } else {
                        pick_replica(&mut rng, &taken)
                    };
                    if taken.contains(&r) {
                        continue;
                    }
                    taken.push(r);
                    s.byzantine.push((r, behavior));
                }
                if rng.chance(50) {
                    s.network = lossy(&mut rng);
                    s.network.drop_percent /= 2;
                }
                if matches!(byz, FaultClass::ForgedSync) {
                    // Make honest replicas need sync: crash one for a while.
                    let replica = pick_replica(&mut rng, &taken);
                    s.crashes.push(CrashSpec {
                        replica,
                        at: rng.range(0, heal_at / 3),
                        restart: rng.range(heal_at / 2, heal_at * 3 / 4),
                        wipe: false,
                    });
                }
            }
        }
        s
    }

    /// The `make run` demo: 4 replicas, steady load from 8 clients, the primary crashing at
    /// 10 s and coming back at 20 s.
    pub fn demo(seconds: u64) -> Scenario {
        let mut s = Scenario::with_class(1, FaultClass::Calm);
        s.config = Config {
            n: 4,
            checkpoint_interval: 64,
            log_window: 256,
            max_batch: 64,
            batch_delay: 2,
            max_in_flight: 4,
            view_change_timeout: 1_000,
            ..Config::default()
        };
        s.clients = 8;
        s.think_time = 5;
        s.network = NetworkSpec {
            min_delay: 1,
            max_delay: 3,
            drop_percent: 0,
            duplicate_percent: 0,
            partitions: Vec::new(),
        };
        s.heal_at = seconds * 1_000 + 1;
        s.crashes = vec![CrashSpec {
            replica: 0,
            at: 10_000,
            restart: 20_000,
            wipe: false,
        }];
        s
    }

    pub fn is_byzantine(&self, replica: usize) -> bool {
        self.byzantine.iter().any(|(r, _)| *r == replica)
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed={} class={} n={} K={} L={} digest={} batch={} clients={}x{} heal_at={} net=[{}..{}ms drop={}% dup={}% partitions={}] crashes={} byzantine={:?} silences={:?}",
            self.seed,
            self.class,
            self.config.n,
            self.config.checkpoint_interval,
            self.config.log_window,
            self.config.state_digest,
            self.config.max_batch,
            self.clients,
            self.requests_per_client,
            self.heal_at,
            self.network.min_delay,
            self.network.max_delay,
            self.network.drop_percent,
            self.network.duplicate_percent,
            self.network.partitions.len(),
            self.crashes.len(),
            self.byzantine,
            self.silences,
        )
    }
}
