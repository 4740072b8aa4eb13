//! Who checks a batch's client signatures.
//!
//! Checking client signatures was most of a loaded replica's CPU, and every replica checked
//! every request. Now a batch is checked by its primary (which proposes only requests it
//! checked) and, before they prepare, by f backups designated for its sequence number
//! (rotating, so each backup checks its share); their prepares vouch for the batch. The other
//! backups prepare without checking, with an unvouched prepare. A replica is prepared, and so
//! commits, only with 2f matching prepares of which f vouch: with the primary's pre-prepare
//! that is f+1 vouchers, at least one of them correct, so no batch carrying a request its
//! client did not sign can commit, and a prepared certificate proves its batch valid to
//! whoever checks it (the view change relies on that).
//!
//! A designated voucher that is slow, crashed or lying holds its slots up. A backup that has
//! neither checked a batch nor prepared it `vouch_timeout` ticks after accepting it checks it
//! itself and sends a vouching prepare, which replaces its unvouched one at its peers; if the
//! batch was valid, it suspects the designated vouchers that did not vouch, and for
//! `SUSPICION` vouch timeouts checks at once every batch they were due to vouch for. With a
//! replica down, its share of slots waits one vouch timeout per suspicion period.

use std::collections::BTreeSet;

use super::Replica;
use crate::message::{Message, Prepare, primary};
use crate::reject::RejectReason;
use crate::types::{ReplicaId, Seq, View};

/// How many vouch timeouts a designated voucher that failed to vouch stays suspected.
const SUSPICION: u64 = 20;

/// The f backups that check the batch at `seq` in `view` before preparing it: consecutive
/// backups after the primary, starting at an offset that rotates with `seq`.
pub(crate) fn designated(view: View, seq: Seq, n: usize) -> impl Iterator<Item = ReplicaId> {
    let f = crate::config::max_faulty(n) as u64;
    let backups = n as u64 - 1;
    let first = u64::from(primary(view, n).0);
    let start = seq % backups;
    (0..f).map(move |j| ReplicaId(((first + 1 + (start + j) % backups) % n as u64) as u32))
}

impl Replica {
    /// Whether to check a proposed batch's client signatures before preparing it: this
    /// replica is designated to vouch for it, or suspects one that is, or is configured to
    /// check every batch.
    pub(super) fn checks_eagerly(&self, view: View, seq: Seq) -> bool {
        self.cfg.check_every_batch
            || designated(view, seq, self.n()).any(|r| r == self.id || self.suspects(r))
    }

    fn suspects(&self, r: ReplicaId) -> bool {
        self.suspected
            .get(&r)
            .is_some_and(|until| *until > self.now)
    }

    /// Starts the vouch timeout of a slot this replica accepted without checking (it sent
    /// an unvouched prepare).
    pub(super) fn await_vouchers(&mut self, seq: Seq) {
        self.vouch_deadlines
            .insert((self.now + self.cfg.vouch_timeout, self.view, seq));
    }

    /// Checks the batches whose vouchers are overdue.
    pub(super) fn vouch_tick(&mut self) {
        while let Some(&(due, view, seq)) = self.vouch_deadlines.first() {
            if due > self.now {
                break;
            }
            self.vouch_deadlines.pop_first();
            // A view change moves to a higher view, so this drops deadlines of slots it
            // cleared; the batches a new view re-proposes arrive known valid.
            if view == self.view {
                self.vouch_overdue(seq);
            }
        }
    }

    /// The designated vouchers did not vouch in time: check the batch here.
    fn vouch_overdue(&mut self, seq: Seq) {
        let Some(slot) = self.slots.get(&seq) else {
            return;
        };
        if slot.prepared || slot.valid || slot.invalid {
            return;
        }
        let Some(pp) = slot.pre_prepare.clone() else {
            return;
        };
        let vouched: BTreeSet<ReplicaId> = slot
            .prepares
            .values()
            .filter(|p| p.body.vouches && p.body.digest == pp.body.digest)
            .map(|p| p.body.replica)
            .collect();
        let valid = self.signatures_hold(pp.body.batch.requests());
        self.event(crate::output::Event::VouchTimeout { seq, valid });
        if !valid {
            // The primary proposed a request its client did not sign: it is faulty. The
            // slot never prepares here (`check_prepared` refuses an invalid slot); the
            // forged request runs no timer, and the real ones in the batch bring the view
            // change through their clients, who retry to every replica.
            if let Some(slot) = self.slots.get_mut(&seq) {
                slot.invalid = true;
            }
            // Refused as a designated voucher refuses it on arrival, only later.
            self.reject(RejectReason::BadSignature);
            return;
        }
        let until = self
            .now
            .saturating_add(self.cfg.vouch_timeout.saturating_mul(SUSPICION));
        for r in designated(self.view, seq, self.n()) {
            if !vouched.contains(&r) {
                self.suspected.insert(r, until);
            }
        }
        self.batch_checked(seq);
    }

    /// The batch at `seq` is now known to be valid here: its requests are owed an execution
    /// (their timers start), and this replica's prepare vouches from now on.
    pub(super) fn batch_checked(&mut self, seq: Seq) {
        let Some(slot) = self.slots.get_mut(&seq) else {
            return;
        };
        if slot.valid {
            return;
        }
        let Some(pp) = slot.pre_prepare.clone() else {
            return;
        };
        slot.valid = true;
        self.expect_batch(pp.body.batch.requests());
        if self.upgrade_own_prepare(seq)
            && let Some(prepare) = self.slots.get(&seq).and_then(|s| s.own_prepare.clone())
        {
            self.broadcast(Message::Prepare(prepare));
        }
        self.check_prepared(seq);
    }

    /// Replaces this backup's unvouched prepare for a slot now known valid with a vouching
    /// one (sent by the caller). Besides a batch checked here, this covers one made valid by
    /// a certificate's f+1 vouchers: such a replica does not re-send at once (it would cost
    /// a signature and a broadcast per batch), but when it re-sends or helps a stuck peer,
    /// its vouch may be the one that peer lacks (say faulty vouchers withheld theirs from
    /// it). Returns whether it upgraded.
    pub(super) fn upgrade_own_prepare(&mut self, seq: Seq) -> bool {
        let Some(slot) = self.slots.get(&seq) else {
            return false;
        };
        let Some(body) = slot
            .own_prepare
            .as_ref()
            .filter(|p| slot.valid && !p.body.vouches)
            .map(|p| Prepare {
                vouches: true,
                ..p.body.clone()
            })
        else {
            return false;
        };
        let prepare = self.sign(body);
        let slot = self.slot(seq);
        slot.prepares.insert(prepare.body.replica, prepare.clone());
        slot.own_prepare = Some(prepare);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn designated_vouchers_are_backups_and_rotate() {
        for n in [4usize, 7, 10] {
            let f = (n - 1) / 3;
            for view in 0..n as u64 {
                let p = primary(view, n);
                let mut load = vec![0usize; n];
                for seq in 1..=(3 * (n as u64 - 1)) {
                    let d: BTreeSet<ReplicaId> = designated(view, seq, n).collect();
                    assert_eq!(d.len(), f, "n={n} view={view} seq={seq}");
                    assert!(!d.contains(&p), "the primary is never designated");
                    for r in d {
                        load[r.0 as usize] += 1;
                    }
                }
                // Over whole rotations every backup vouches equally often.
                let backup_loads: Vec<usize> = (0..n)
                    .filter(|r| *r as u32 != p.0)
                    .map(|r| load[r])
                    .collect();
                assert!(
                    backup_loads.iter().all(|l| *l == backup_loads[0]),
                    "n={n} view={view}: {backup_loads:?}"
                );
            }
        }
    }
}
