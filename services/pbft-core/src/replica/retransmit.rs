//! Recovering lost messages. The network may drop anything, so a replica that stops making
//! progress re-sends its own votes for the slots still open, and a replica that receives a
//! repeated vote for a slot it has already committed answers with its own votes: the sender
//! evidently missed them.

use super::Replica;
use crate::message::{Message, Signed, StatusAnnouncement};
use crate::reject::RejectReason;
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
        let open: Vec<Seq> = self.slots.keys().copied().collect();
        for seq in open {
            self.upgrade_own_prepare(seq);
        }
        let mut msgs: Vec<Message> = self
            .slots
            .values()
            .flat_map(|slot| slot.own_votes(is_primary))
            .collect();
        if let Some((_, votes)) = self.checkpoint_votes.iter().next_back()
            && let Some(own) = votes.get(&self.id)
        {
            msgs.push(Message::Checkpoint(own.clone()));
        }
        for m in msgs {
            self.broadcast(m);
        }
    }

    /// Every `status_interval`, announces this replica's view and height, and re-sends its
    /// newest checkpoint vote, so that peers which fell behind while the cluster was idle
    /// (or sat alone in a view change while the others carried on) learn it and sync.
    pub(super) fn status_tick(&mut self) {
        if self.now.saturating_sub(self.last_status) < self.cfg.status_interval {
            return;
        }
        self.last_status = self.now;
        let announcement = self.sign(StatusAnnouncement {
            view: self.view,
            height: self.last_executed,
            replica: self.id,
        });
        self.broadcast(Message::StatusAnnouncement(announcement));
        if let Some(vote) = self.latest_checkpoint_vote.clone() {
            self.broadcast(Message::Checkpoint(vote));
        }
    }

    /// A peer's view and height: a claim that counts towards syncing once f+1 peers make it
    /// (see `check_lag`), and a sign of a view we may have missed.
    pub(super) fn on_status_announcement(&mut self, m: Signed<StatusAnnouncement>) {
        if let Err(reason) = self.authenticate(&m) {
            self.reject(reason);
            return;
        }
        let who = m.body.replica;
        if who == self.id {
            self.reject(RejectReason::Duplicate);
            return;
        }
        self.note_claim(who, m.body.height);
        self.saw_view(who, m.body.view);
        self.maybe_follow_views();
        self.check_lag();
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
        self.upgrade_own_prepare(seq);
        let Some(slot) = self.slots.get(&seq) else {
            return;
        };
        let msgs = slot.own_votes(self.is_primary());
        self.helped.insert(to, self.now);
        for m in msgs {
            self.send(to, m);
        }
    }
}
