//! Protocol parameters. Time is counted in ticks; the adapter decides what a tick is
//! (the replica uses 1 ms, the simulator 1 ms of virtual time).

use crate::kv::StateDigest;
use crate::types::Tick;

/// Everything that shapes the protocol's behaviour. All replicas of a cluster must agree on
/// `n`, `checkpoint_interval` and `state_digest`; the rest may differ per replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Number of replicas, `3f + 1` with `f >= 1`.
    pub n: usize,
    /// K: a checkpoint is taken after every K-th sequence number.
    pub checkpoint_interval: u64,
    /// L: sequence numbers above the stable checkpoint that may be in flight (the high
    /// watermark is `stable + L`). At least K, so progress never waits on its own checkpoint.
    pub log_window: u64,
    /// Most requests one batch may carry.
    pub max_batch: usize,
    /// Ticks the primary lets a request wait for company before proposing a partial batch
    /// while earlier batches are still in flight.
    pub batch_delay: Tick,
    /// Batches the primary may have proposed but not yet executed; beyond this it waits and
    /// batches fill up, which is what keeps throughput high under load.
    pub max_in_flight: u64,
    /// Ticks a backup waits for a known request to execute before suspecting the primary.
    pub view_change_timeout: Tick,
    /// Cap for the doubling view-change timeout.
    pub max_view_change_timeout: Tick,
    /// Ticks a backup that did not check a batch's client signatures waits for the batch's
    /// designated vouchers before it checks them itself (and, for a while, checks every
    /// batch those vouchers were due to vouch for). See `replica::vouch`.
    pub vouch_timeout: Tick,
    /// Check every batch's client signatures before preparing it, as every backup did
    /// before vouching existed, so every prepare vouches. For rolling upgrades from such
    /// versions, whose replicas refuse unvouched prepares; it costs the CPU vouching saves.
    pub check_every_batch: bool,
    /// Ticks without progress after which a replica re-sends its own votes for open slots.
    pub retransmit_interval: Tick,
    /// Ticks between status announcements: each replica re-broadcasts its latest checkpoint
    /// vote, so a replica that missed everything (restarted, partitioned) while the cluster
    /// sits idle still learns it is behind and syncs. Keep it well under
    /// `view_change_timeout`: a backup that missed the last few blocks before the cluster
    /// went idle learns of them only from an announcement, and its timers for the requests
    /// in them must not run out first (it would go alone into a view change).
    pub status_interval: Tick,
    /// Most blocks asked for in one sync request; bounds the memory sync uses.
    pub sync_chunk: u32,
    /// Ticks to wait for a sync response before asking another peer.
    pub sync_timeout: Tick,
    /// Largest key plus values of one request, in bytes.
    pub max_request_bytes: usize,
    /// Requests the primary queues for proposal before it starts refusing new ones.
    pub max_pending_requests: usize,
    /// How checkpoints digest the state (see [`StateDigest`]).
    pub state_digest: StateDigest,
    /// Deliberate protocol bugs for the simulator's teeth check (`make teeth`).
    #[cfg(feature = "mutations")]
    pub mutation: Option<Mutation>,
}

/// A deliberate protocol bug, compiled in only with the `mutations` feature.
#[cfg(feature = "mutations")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// Treat 2f matching votes as a quorum instead of 2f+1.
    WeakQuorum,
    /// Accept a pre-prepare without checking that its digest matches its batch.
    SkipDigestCheck,
    /// Prepare with 2f matching prepares whether or not f of them vouch for the batch's
    /// client signatures.
    SkipVouchCheck,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            n: 4,
            checkpoint_interval: 128,
            log_window: 256,
            max_batch: 512,
            // 4 rather than 2: at 10,000 requests/s offered to n = 4 on two cores, batches
            // of about 40 instead of 28 took enough CPU per request off the machine that
            // p50 fell from 9-12 ms to 8 ms and p99 from 33-67 ms to 32-36 ms (round 14,
            // docs/BENCHMARKS.md); closed loops and a lone client did not change.
            batch_delay: 4,
            max_in_flight: 8,
            view_change_timeout: 2_000,
            max_view_change_timeout: 60_000,
            vouch_timeout: 50,
            check_every_batch: false,
            retransmit_interval: 500,
            // A quarter of the view-change timeout (see the field).
            status_interval: 500,
            sync_chunk: 256,
            sync_timeout: 2_000,
            max_request_bytes: 1 << 20,
            max_pending_requests: 100_000,
            state_digest: StateDigest::Buckets,
            #[cfg(feature = "mutations")]
            mutation: None,
        }
    }
}

/// A configuration that cannot run PBFT.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("n = {0}: PBFT needs n = 3f + 1 replicas with f >= 1 (4, 7, 10, ...)")]
    ReplicaCount(usize),
    #[error("checkpoint_interval must be at least 1")]
    CheckpointInterval,
    #[error("log_window ({window}) must be at least checkpoint_interval ({interval})")]
    Window { window: u64, interval: u64 },
    #[error("{0} must be at least 1")]
    Zero(&'static str),
}

/// Largest number of faulty replicas `n` replicas tolerate: f with n >= 3f + 1 (0 for n = 0).
pub fn max_faulty(n: usize) -> usize {
    n.saturating_sub(1) / 3
}

impl Config {
    /// Largest number of faulty replicas tolerated.
    pub fn f(&self) -> usize {
        max_faulty(self.n)
    }

    /// Matching votes that make a certificate: 2f + 1.
    pub fn quorum(&self) -> usize {
        #[cfg(feature = "mutations")]
        if self.mutation == Some(Mutation::WeakQuorum) {
            return 2 * self.f();
        }
        2 * self.f() + 1
    }

    /// Votes that include at least one honest replica: f + 1.
    pub fn weak_quorum(&self) -> usize {
        self.f() + 1
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.n < 4 || !(self.n - 1).is_multiple_of(3) {
            return Err(ConfigError::ReplicaCount(self.n));
        }
        if self.checkpoint_interval == 0 {
            return Err(ConfigError::CheckpointInterval);
        }
        if self.log_window < self.checkpoint_interval {
            return Err(ConfigError::Window {
                window: self.log_window,
                interval: self.checkpoint_interval,
            });
        }
        for (name, v) in [
            ("max_batch", self.max_batch as u64),
            ("max_in_flight", self.max_in_flight),
            ("view_change_timeout", self.view_change_timeout),
            ("vouch_timeout", self.vouch_timeout),
            ("retransmit_interval", self.retransmit_interval),
            ("status_interval", self.status_interval),
            ("sync_chunk", u64::from(self.sync_chunk)),
            ("sync_timeout", self.sync_timeout),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_faulty_is_the_largest_f_with_n_at_least_3f_plus_1() {
        for n in 0..40usize {
            let f = max_faulty(n);
            assert!(n == 0 || n > 3 * f, "n = {n}, f = {f}");
            assert!(n < 3 * (f + 1) + 1, "n = {n} tolerates f + 1");
        }
    }

    #[test]
    fn quorums_follow_n() {
        for (n, f, q) in [(4, 1, 3), (7, 2, 5), (10, 3, 7)] {
            let c = Config {
                n,
                ..Config::default()
            };
            c.validate().unwrap();
            assert_eq!((c.f(), c.quorum(), c.weak_quorum()), (f, q, f + 1));
        }
    }

    #[test]
    fn rejects_bad_sizes() {
        for n in [0, 1, 3, 5, 6, 8] {
            let c = Config {
                n,
                ..Config::default()
            };
            assert_eq!(c.validate(), Err(ConfigError::ReplicaCount(n)));
        }
        let c = Config {
            log_window: 4,
            checkpoint_interval: 8,
            ..Config::default()
        };
        assert!(matches!(c.validate(), Err(ConfigError::Window { .. })));
    }
}
