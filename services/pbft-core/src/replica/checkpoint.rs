//! Checkpoints: every K blocks each replica signs its state; 2f+1 matching signatures make
//! the checkpoint stable, which moves the window forward and discards the log below it.
//! Checkpoint claims are also how a replica notices it has fallen behind.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::Replica;
use crate::block::{CheckpointCert, checkpoint_digest};
use crate::message::{Checkpoint, Message, Signed};
use crate::output::Event;
use crate::reject::RejectReason;
use crate::storage::{PersistOp, StableCheckpoint};
use crate::types::{Digest, ReplicaId, Seq};

impl Replica {
    /// Called right after executing a checkpoint height.
    pub(super) fn take_checkpoint(&mut self, state_digest: Digest) {
        let seq = self.last_executed;
        let digest = checkpoint_digest(&state_digest, &self.head_hash);
        self.own_checkpoints
            .insert(seq, (digest, Arc::new(self.kv.snapshot()), self.head_hash));
        let m = self.sign(Checkpoint {
            seq,
            state_digest: digest,
            replica: self.id,
        });
        self.record_checkpoint_vote(m.clone());
        self.latest_checkpoint_vote = Some(m.clone());
        self.broadcast(Message::Checkpoint(m));
        self.check_stable(seq);
    }

    pub(super) fn on_checkpoint(&mut self, m: Signed<Checkpoint>) {
        if let Err(reason) = self.authenticate(&m) {
            self.reject(reason);
            return;
        }
        let seq = m.body.seq;
        if seq == 0 || !seq.is_multiple_of(self.cfg.checkpoint_interval) {
            self.reject(RejectReason::Malformed);
            return;
        }
        let who = m.body.replica;
        self.note_claim(who, seq);
        if seq <= self.stable.seq {
            // Already stable here: an announcement of where the sender is, nothing to count.
            return;
        }
        if !self.record_checkpoint_vote(m) {
            return;
        }
        self.check_stable(seq);
        self.check_lag();
    }

    /// Keeps a vote if it is near enough to matter; far-ahead votes only count as claims.
    /// Returns false (and counts a rejection) for duplicates and equivocations.
    fn record_checkpoint_vote(&mut self, m: Signed<Checkpoint>) -> bool {
        let seq = m.body.seq;
        if seq > self.last_executed.max(self.stable.seq) + self.cfg.log_window {
            return true;
        }
        let votes = self.checkpoint_votes.entry(seq).or_default();
        if let Some(old) = votes.get(&m.body.replica) {
            let reason = if old.body.state_digest == m.body.state_digest {
                RejectReason::Duplicate
            } else {
                RejectReason::Conflicting
            };
            self.reject(reason);
            return false;
        }
        votes.insert(m.body.replica, m);
        true
    }

    /// Makes `seq` stable if 2f+1 votes agree with this replica's own checkpoint; asks for
    /// sync if they agree on a checkpoint this replica has not reached.
    pub(super) fn check_stable(&mut self, seq: Seq) {
        let quorum = self.cfg.quorum();
        let Some(votes) = self.checkpoint_votes.get(&seq) else {
            return;
        };
        let mut by_digest: BTreeMap<Digest, Vec<Signed<Checkpoint>>> = BTreeMap::new();
        for v in votes.values() {
            by_digest
                .entry(v.body.state_digest)
                .or_default()
                .push(v.clone());
        }
        let Some((digest, sigs)) = by_digest.into_iter().find(|(_, v)| v.len() >= quorum) else {
            return;
        };
        let cert = CheckpointCert {
            seq,
            digest,
            signatures: sigs.into_iter().take(quorum).collect(),
        };
        if self.last_executed >= seq {
            self.adopt_stable(cert);
        } else {
            self.start_sync(seq);
        }
    }

    /// Installs a verified stable checkpoint this replica has executed up to. A certificate
    /// for a state this replica does not have is ignored: with at most f faulty replicas it
    /// cannot exist, and trusting it would be wrong anyway.
    pub(super) fn adopt_stable(&mut self, cert: CheckpointCert) {
        if cert.seq <= self.stable.seq {
            return;
        }
        let Some((digest, snapshot, block_hash)) = self.own_checkpoints.get(&cert.seq) else {
            return;
        };
        if *digest != cert.digest {
            return;
        }
        let stable = StableCheckpoint {
            cert: cert.clone(),
            snapshot: snapshot.clone(),
            block_hash: *block_hash,
        };
        let seq = cert.seq;
        self.persist(PersistOp::Checkpoint(stable));
        self.persist(PersistOp::Prune { upto: seq });
        self.stable = cert;
        self.slots = self.slots.split_off(&(seq + 1));
        self.prepared = self.prepared.split_off(&(seq + 1));
        self.own_checkpoints = self.own_checkpoints.split_off(&(seq + 1));
        self.checkpoint_votes = self.checkpoint_votes.split_off(&(seq + 1));
        self.event(Event::CheckpointStable { seq });
        if self.is_primary() && !self.changing {
            self.try_propose();
        }
    }

    /// Remembers the highest sequence `who` claims to have executed (from its checkpoint votes
    /// and status announcements); `check_lag` acts on f+1 such claims.
    pub(super) fn note_claim(&mut self, who: ReplicaId, seq: Seq) {
        let claimed = self.claimed.entry(who).or_insert(0);
        *claimed = (*claimed).max(seq);
    }

    /// If f+1 replicas (so at least one honest) claim checkpoints above what this replica
    /// executed, it is behind: fetch blocks up to the highest such claim.
    pub(super) fn check_lag(&mut self) {
        let mut claims: Vec<Seq> = self
            .claimed
            .iter()
            .filter(|(r, _)| **r != self.id)
            .map(|(_, s)| *s)
            .filter(|s| *s > self.last_executed)
            .collect();
        let need = self.cfg.weak_quorum();
        if claims.len() < need {
            return;
        }
        claims.sort_unstable_by(|a, b| b.cmp(a));
        let target = claims[need - 1];
        // Ordinary pipelining also puts us a little behind; sync when ordering alone will not
        // catch up: far behind, or behind with nothing moving.
        let stalled = self.now.saturating_sub(self.last_progress) >= self.cfg.retransmit_interval;
        if target > self.last_executed + self.cfg.checkpoint_interval
            || stalled
            || self.sync.is_some()
        {
            self.start_sync(target);
        }
    }
}
