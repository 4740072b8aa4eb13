//! Recovering lost messages. The network may drop anything, so a replica that stops making
//! progress re-sends its own votes for the slots still open, and a replica that receives a
//! repeated vote for a slot it has already committed answers with its own votes: the sender
//! evidently missed them.

use super::Replica;
use crate::message::Message;
use crate::types::{ReplicaId, Seq};

impl Replica {
    pub(super) fn retransmit_tick(&mut self) {
        let interval = self.cfg.retransmit_interval;
        if self.now.saturating_sub(self.last_retransmit) < interval
            || self.now.saturating_sub(self.last_progress) < interval
        {
            return;
        }
        let open_slots = self
            .slots
            .keys()
            .next_back()
            .is_some_and(|s| *s > self.last_executed);
        let unstable_checkpoint = self.own_checkpoints.keys().next_back().is_some();
        if !(self.changing || open_slots || unstable_checkpoint || !self.waiting.is_empty()) {
            return;
        }
        self.last_retransmit = self.now;
        if self.changing {
            if let Some(vc) = self.view_changes.get(&self.id).cloned() {
                self.broadcast(Message::ViewChange(vc));
            }
            return;
        }
        let is_primary = self.is_primary();
        let mut msgs: Vec<Message> = self
            .slots
            .values()
            .flat_map(|slot| slot.own_votes(is_primary))
            .collect();
        if let Some((_, votes)) = self.checkpoint_votes.iter().next_back() {
            if let Some(own) = votes.get(&self.id) {
                msgs.push(Message::Checkpoint(own.clone()));
            }
        }
        for m in msgs {
            self.broadcast(m);
        }
    }

    /// Announces this replica's newest checkpoint vote every `status_interval`, so peers
    /// that fell behind while the cluster was idle learn it and sync.
    pub(super) fn status_tick(&mut self) {
        if self.now.saturating_sub(self.last_status) < self.cfg.status_interval {
            return;
        }
        self.last_status = self.now;
        if let Some(vote) = self.latest_checkpoint_vote.clone() {
            self.broadcast(Message::Checkpoint(vote));
        }
    }

    /// `to` repeated a vote for `seq`, which this replica has committed: send it what it
    /// needs to commit too.
    pub(super) fn help_peer(&mut self, to: ReplicaId, seq: Seq) {
        // At most once per interval per peer: repeated votes also arrive through network
        // duplication and through our own help, and must not turn into a ping-pong.
        let last = self.helped.get(&to).copied();
        if last.is_some_and(|t| self.now < t + self.cfg.retransmit_interval) {
            return;
        }
        let Some(slot) = self.slots.get(&seq) else {
            return;
        };
        if !slot.committed {
            return;
        }
        let msgs = slot.own_votes(self.is_primary());
        self.helped.insert(to, self.now);
        for m in msgs {
            self.send(to, m);
        }
    }
}
