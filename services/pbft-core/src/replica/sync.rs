//! State sync: a replica that is behind fetches committed blocks from one peer at a time,
//! in bounded chunks, and trusts nothing it is sent: each block must extend its own chain
//! and carry a valid commit certificate. A peer that sends bad or no data is replaced.

use std::collections::BTreeSet;

use super::Replica;
use crate::block::{Block, checkpoint_digest};
use crate::message::{Message, SyncRequest, SyncResponse};
use crate::output::Event;
use crate::reject::RejectReason;
use crate::types::{Digest, ReplicaId, Seq, Tick};

/// An ongoing sync.
#[derive(Clone, Debug)]
pub(crate) struct SyncState {
    /// Height to reach.
    pub target: Seq,
    /// Peer asked last, and when.
    pub peer: ReplicaId,
    pub asked_at: Tick,
    /// Peers that failed us during this sync; skipped until all have.
    pub failed: BTreeSet<ReplicaId>,
    /// When it began: the request timers do not count the time since (see `on_tick`).
    pub since: Tick,
}

impl Replica {
    /// Begins (or extends) a sync towards `target`.
    pub(super) fn start_sync(&mut self, target: Seq) {
        if target <= self.last_executed {
            return;
        }
        if let Some(s) = self.sync.as_mut() {
            s.target = s.target.max(target);
            return;
        }
        let Some(peer) = self.pick_sync_peer(&BTreeSet::new(), None) else {
            return;
        };
        self.sync = Some(SyncState {
            target,
            peer,
            asked_at: self.now,
            failed: BTreeSet::new(),
            since: self.now,
        });
        self.event(Event::SyncStarted {
            from: self.last_executed + 1,
            target,
        });
        self.request_blocks(peer);
    }

    /// Prefers peers that claim to be furthest ahead and have not failed us, rotating past
    /// `after` so a silent peer is not asked twice in a row.
    fn pick_sync_peer(
        &self,
        failed: &BTreeSet<ReplicaId>,
        after: Option<ReplicaId>,
    ) -> Option<ReplicaId> {
        let n = self.n() as u32;
        let start = after.map_or(self.id.0 + 1, |a| a.0 + 1);
        let candidates: Vec<ReplicaId> = (0..n)
            .map(|i| ReplicaId((start + i) % n))
            .filter(|r| *r != self.id)
            .collect();
        let ahead = |r: &ReplicaId| self.claimed.get(r).copied().unwrap_or(0) > self.last_executed;
        candidates
            .iter()
            .find(|r| !failed.contains(r) && ahead(r))
            .or_else(|| candidates.iter().find(|r| !failed.contains(r)))
            .or_else(|| candidates.first())
            .copied()
    }

    fn request_blocks(&mut self, peer: ReplicaId) {
        let req = SyncRequest {
            from_height: self.last_executed + 1,
            max_blocks: self.cfg.sync_chunk,
        };
        self.send(peer, Message::SyncRequest(req));
    }

    /// Gives up on the current peer and asks the next one.
    fn switch_sync_peer(&mut self) {
        let Some(mut s) = self.sync.take() else {
            return;
        };
        s.failed.insert(s.peer);
        if s.failed.len() + 1 >= self.n() {
            s.failed.clear();
        }
        let Some(peer) = self.pick_sync_peer(&s.failed, Some(s.peer)) else {
            return;
        };
        s.peer = peer;
        s.asked_at = self.now;
        self.sync = Some(s);
        self.request_blocks(peer);
    }

    pub(super) fn sync_tick(&mut self) {
        let timed_out = self
            .sync
            .as_ref()
            .is_some_and(|s| self.now.saturating_sub(s.asked_at) >= self.cfg.sync_timeout);
        if timed_out {
            self.switch_sync_peer();
        }
    }

    /// A synced checkpoint block whose results match ours but whose state digest does not
    /// may have been certified under the other digest scheme: every peer then looks faulty
    /// to us, and only the configuration can fix it, so say so (`Event::StateDigestScheme`).
    /// Only on proof: f+1 replicas' checkpoint votes for this height (one of them correct)
    /// must certify our state digested the other way, since a lying peer alone could
    /// compute that digest and make us blame the configuration.
    fn diagnose_state_digest(&mut self, mine: &Block, results: Digest, block_hash: Digest) {
        if mine.results_digest != results || mine.state_digest == Digest::ZERO {
            return;
        }
        let other = self.cfg.state_digest.other();
        let certified = checkpoint_digest(&self.kv.digest(other), &block_hash);
        let vouching = self.checkpoint_votes.get(&mine.height).map_or(0, |votes| {
            votes
                .values()
                .filter(|v| v.body.state_digest == certified)
                .count()
        });
        if vouching > crate::config::max_faulty(self.n()) {
            self.event(Event::StateDigestScheme {
                height: mine.height,
                configured: self.cfg.state_digest,
                certified: other,
            });
        }
    }

    pub(super) fn on_sync_response(&mut self, from: ReplicaId, resp: SyncResponse) {
        let Some(peer) = self.sync.as_ref().map(|s| s.peer) else {
            self.reject(RejectReason::WrongPhase);
            return;
        };
        if from != peer {
            self.reject(RejectReason::WrongPhase);
            return;
        }
        if resp.blocks.len() > self.cfg.sync_chunk as usize {
            self.reject(RejectReason::BadSyncData);
            self.switch_sync_peer();
            return;
        }
        let before = self.last_executed;
        let mut bad = false;
        for block in resp.blocks {
            if block.height <= self.last_executed {
                continue;
            }
            let checked = block.verify(
                self.last_executed + 1,
                &self.head_hash,
                self.n(),
                self.cfg.quorum(),
                self.verifier.as_ref(),
            );
            if checked.is_err() {
                bad = true;
                break;
            }
            // The certificate proves the batch committed at this height, so executing it is
            // right whatever else the peer claims; our own block records our own results.
            let (claimed_results, claimed_state) = (block.results_digest, block.state_digest);
            // Only a checkpoint block carries a state digest; its hash is what the
            // checkpoint votes certify, should ours turn out to differ.
            let claimed_hash = (claimed_state != Digest::ZERO).then(|| block.hash());
            let mine = self.execute_block(block.batch, block.view, block.certificate, true);
            if mine.results_digest != claimed_results || mine.state_digest != claimed_state {
                if let Some(hash) = claimed_hash {
                    self.diagnose_state_digest(&mine, claimed_results, hash);
                }
                bad = true;
                break;
            }
        }
        // The executed prefix of the log is settled; drop its slots.
        self.slots = self.slots.split_off(&(self.last_executed + 1));
        if let Some(cert) = resp.checkpoint
            && cert.seq > self.stable.seq
            && cert.verify(self.n(), self.cfg.quorum(), self.verifier.as_ref())
        {
            if cert.seq <= self.last_executed {
                self.adopt_stable(cert);
            } else if let Some(s) = self.sync.as_mut() {
                s.target = s.target.max(cert.seq);
            }
        }
        if bad {
            self.reject(RejectReason::BadSyncData);
            self.switch_sync_peer();
            return;
        }
        let target = self.sync.as_ref().map_or(0, |s| s.target);
        if self.last_executed >= target && self.last_executed == before {
            // Reached the target and the peer has nothing more: caught up with it. The
            // request timers resume, less the time the sync took (see `on_tick`).
            if let Some(s) = self.sync.take() {
                self.pause_timers(s.since);
            }
            self.try_execute();
        } else if self.last_executed > before {
            // Progress: keep asking the same peer, past the target up to its head, so an
            // idle cluster's last few blocks (after its last checkpoint) arrive too.
            if let Some(s) = self.sync.as_mut() {
                s.asked_at = self.now;
            }
            self.request_blocks(peer);
        } else {
            // Nothing usable: a truncated or empty answer from a peer that claimed more.
            self.reject(RejectReason::BadSyncData);
            self.switch_sync_peer();
        }
    }
}
