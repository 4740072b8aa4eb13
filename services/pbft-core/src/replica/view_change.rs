//! View change: when the primary seems faulty, replicas move to the next view, carrying
//! their prepared certificates so the new primary re-proposes everything that may have
//! committed. Backups recompute the new primary's proposals and refuse any deviation.

use std::collections::BTreeMap;

use super::Replica;
use crate::block::CheckpointCert;
use crate::message::{Message, NewView, PrePrepare, PreparedProof, Signed, ViewChange, primary};
use crate::output::Event;
use crate::reject::RejectReason;
use crate::request::Batch;
use crate::storage::PersistOp;
use crate::types::{Digest, ReplicaId, Seq, View};

/// What a new view starts from, derived deterministically from 2f+1 view changes.
struct NewViewPlan {
    /// The highest stable checkpoint among the view changes, with its certificate.
    checkpoint: CheckpointCert,
    pre_prepares: Vec<PrePrepare>,
}

impl Replica {
    /// Stops normal operation and asks to move to `new_view`.
    pub(super) fn start_view_change(&mut self, new_view: View) {
        if new_view <= self.view && (self.changing || new_view < self.view) {
            return;
        }
        self.view = new_view;
        self.changing = true;
        self.view_change_quorum_at = None;
        self.slots.clear();
        self.proposed.clear();
        self.new_view = None;
        // Requests queued as primary of the old view must survive for the next primary.
        for (req, _) in std::mem::take(&mut self.queue) {
            self.wait_for(req, false);
        }
        self.queued.clear();
        self.persist(PersistOp::View {
            view: new_view,
            changing: true,
        });
        let vc = self.own_view_change(new_view);
        self.view_changes.insert(self.id, vc.clone());
        self.broadcast(Message::ViewChange(vc));
        self.event(Event::ViewChangeStarted { view: new_view });
        self.note_view_change_quorum();
        self.try_new_view();
    }

    /// This replica's request for `new_view`, carrying its stable checkpoint and prepared
    /// certificates.
    pub(super) fn own_view_change(&self, new_view: View) -> Signed<ViewChange> {
        self.sign(ViewChange {
            new_view,
            replica: self.id,
            stable_seq: self.stable.seq,
            checkpoint_proof: self.stable.signatures.clone(),
            prepared: self.prepared.values().cloned().collect(),
        })
    }

    /// Starts the new view's timer once 2f+1 replicas (this one included) ask for it. A
    /// replica asking for a later view counts too: it gave up on this one on the way, and
    /// its newer view change replaced the older one here. Counting only exact matches left
    /// two correct replicas asking for view v forever once the third had timed out and
    /// moved to v+1 (the new primary being faulty): neither quorum was ever complete.
    fn note_view_change_quorum(&mut self) {
        if !self.changing || self.view_change_quorum_at.is_some() {
            return;
        }
        let asking = self
            .view_changes
            .values()
            .filter(|vc| vc.body.new_view >= self.view)
            .count();
        if asking >= self.cfg.quorum() {
            self.view_change_quorum_at = Some(self.now);
        }
    }

    pub(super) fn on_view_change(&mut self, m: Signed<ViewChange>) {
        if let Err(reason) = self.authenticate(&m) {
            self.reject(reason);
            return;
        }
        let who = m.body.replica;
        if who == self.id {
            self.reject(RejectReason::Duplicate);
            return;
        }
        if m.body.new_view < self.view || (m.body.new_view == self.view && !self.changing) {
            // The sender is behind: if it missed the new view we are in, hand it over.
            self.resend_new_view(who);
            self.reject(RejectReason::StaleView);
            return;
        }
        if let Some(old) = self.view_changes.get(&who)
            && old.body.new_view >= m.body.new_view
        {
            // Same view, other content: equivocation. An older view arriving late is
            // just reordering.
            self.reject(if *old == m {
                RejectReason::Duplicate
            } else if old.body.new_view == m.body.new_view {
                RejectReason::Conflicting
            } else {
                RejectReason::StaleView
            });
            return;
        }
        if !self.valid_view_change(&m.body) {
            self.reject(RejectReason::InvalidCertificate);
            return;
        }
        self.saw_view(who, m.body.new_view);
        self.view_changes.insert(who, m);
        self.join_view_changes();
        self.note_view_change_quorum();
        self.try_new_view();
    }

    /// f+1 replicas asking for higher views include an honest one: join the lowest view
    /// that at least f+1 of them want, rather than waiting for a timeout.
    fn join_view_changes(&mut self) {
        let mut wanted: Vec<View> = self
            .view_changes
            .values()
            .map(|vc| vc.body.new_view)
            .filter(|v| *v > self.view)
            .collect();
        let need = self.cfg.weak_quorum();
        if wanted.len() >= need {
            wanted.sort_unstable_by(|a, b| b.cmp(a));
            self.start_view_change(wanted[need - 1]);
        }
    }

    /// Messages show f+1 replicas working in views above ours: we missed a view change.
    /// Asking for the next view makes them hand us their new-view message. This holds for a
    /// replica still changing views too: one that restarted asking for view v, after the
    /// others had moved past it, would otherwise wait for a v quorum that never comes
    /// (simulator seed 522351).
    pub(super) fn maybe_follow_views(&mut self) {
        let need = self.cfg.weak_quorum();
        let ahead = self
            .seen_views
            .iter()
            .filter(|(r, v)| **r != self.id && **v > self.view)
            .count();
        if ahead >= need {
            self.start_view_change(self.view + 1);
        }
    }

    /// Checks a view change's proofs: the stable checkpoint certificate and every prepared
    /// certificate, each bounded by the window above that checkpoint.
    fn valid_view_change(&self, vc: &ViewChange) -> bool {
        let n = self.n();
        let verifier = self.verifier.as_ref();
        if vc.stable_seq > 0 {
            let Some(first) = vc.checkpoint_proof.first() else {
                return false;
            };
            let cert = CheckpointCert {
                seq: vc.stable_seq,
                digest: first.body.state_digest,
                signatures: vc.checkpoint_proof.clone(),
            };
            if !cert.verify(n, self.cfg.quorum(), verifier) {
                return false;
            }
        }
        if vc.prepared.len() as u64 > self.cfg.log_window {
            return false;
        }
        let mut seqs = std::collections::BTreeSet::new();
        vc.prepared.iter().all(|p| {
            let seq = p.seq();
            seqs.insert(seq)
                && seq > vc.stable_seq
                && seq <= vc.stable_seq + self.cfg.log_window
                && p.view() < vc.new_view
                && self.valid_prepared_proof(p)
        })
    }

    /// A pre-prepare signed by its view's primary, whose digest matches its batch, and 2f
    /// matching prepares from distinct backups, f of them vouching for the batch: so a
    /// faulty replica cannot carry a batch with a forged request into a new view, where it
    /// would have to be re-proposed and could never prepare.
    fn valid_prepared_proof(&self, p: &PreparedProof) -> bool {
        let n = self.n();
        let pp = &p.pre_prepare;
        let leader = primary(pp.body.view, n);
        if !self.verify(pp) || pp.body.batch.digest() != pp.body.digest {
            return false;
        }
        // One pass, one signature check per prepare that could still count: for each
        // backup, whether it validly prepared this batch and whether it vouched.
        let mut signers: std::collections::BTreeMap<ReplicaId, bool> = Default::default();
        for m in &p.prepares {
            let b = &m.body;
            let author = b.replica;
            let counted = signers.get(&author).copied();
            if author == leader
                || (author.0 as usize) >= n
                || counted == Some(true)
                || (counted == Some(false) && !b.vouches)
                || (b.view, b.seq, b.digest) != (pp.body.view, pp.body.seq, pp.body.digest)
                || !m.verify(n, self.verifier.as_ref())
            {
                continue;
            }
            signers.insert(author, b.vouches);
        }
        let vouching = signers.values().filter(|v| **v).count();
        signers.len() >= self.cfg.quorum() - 1 && vouching >= self.vouches_needed()
    }

    /// The new primary derives the new view's pre-prepares from the view changes: every
    /// sequence number above the highest stable checkpoint up to the highest prepared one
    /// gets the batch of its highest-view prepared certificate, or a null batch.
    fn plan_new_view(&self, vcs: &[Signed<ViewChange>], view: View) -> NewViewPlan {
        let best = vcs
            .iter()
            .max_by_key(|vc| (vc.body.stable_seq, vc.body.replica))
            .map(|vc| &vc.body);
        let checkpoint = match best {
            Some(vc) if vc.stable_seq > 0 => CheckpointCert {
                seq: vc.stable_seq,
                digest: vc
                    .checkpoint_proof
                    .first()
                    .map_or(Digest::ZERO, |c| c.body.state_digest),
                signatures: vc.checkpoint_proof.clone(),
            },
            _ => CheckpointCert::genesis(),
        };
        let min_s = checkpoint.seq;
        let mut chosen: BTreeMap<Seq, &PreparedProof> = BTreeMap::new();
        for vc in vcs {
            for p in &vc.body.prepared {
                if p.seq() <= min_s {
                    continue;
                }
                let better = chosen
                    .get(&p.seq())
                    .is_none_or(|c| (p.view(), p.digest()) > (c.view(), c.digest()));
                if better {
                    chosen.insert(p.seq(), p);
                }
            }
        }
        let max_s = chosen.keys().next_back().copied().unwrap_or(min_s);
        let pre_prepares = (min_s + 1..=max_s)
            .map(|seq| {
                let batch = chosen
                    .get(&seq)
                    .map_or_else(Batch::default, |p| p.pre_prepare.body.batch.clone());
                PrePrepare {
                    view,
                    seq,
                    digest: batch.digest(),
                    batch,
                }
            })
            .collect();
        NewViewPlan {
            checkpoint,
            pre_prepares,
        }
    }

    /// New primary: with 2f+1 view changes for its view, announce the new view.
    fn try_new_view(&mut self) {
        if !self.changing || !self.is_primary() {
            return;
        }
        let view = self.view;
        let vcs: Vec<Signed<ViewChange>> = self
            .view_changes
            .values()
            .filter(|vc| vc.body.new_view == view)
            .take(self.cfg.quorum())
            .cloned()
            .collect();
        if vcs.len() < self.cfg.quorum() {
            return;
        }
        let plan = self.plan_new_view(&vcs, view);
        let pre_prepares = plan
            .pre_prepares
            .into_iter()
            .map(|pp| self.sign(pp))
            .collect();
        let nv = self.sign(NewView {
            view,
            view_changes: vcs,
            pre_prepares,
        });
        self.broadcast(Message::NewView(nv.clone()));
        self.enter_view(nv, plan.checkpoint);
    }

    pub(super) fn on_new_view(&mut self, m: Signed<NewView>) {
        if let Err(reason) = self.authenticate(&m) {
            self.reject(reason);
            return;
        }
        let view = m.body.view;
        if view < self.view || (view == self.view && !self.changing) {
            self.reject(if self.new_view.as_ref() == Some(&m) {
                RejectReason::Duplicate
            } else {
                RejectReason::StaleView
            });
            return;
        }
        let Some(checkpoint) = self.check_new_view(&m.body) else {
            self.reject(RejectReason::InvalidCertificate);
            return;
        };
        self.enter_view(m, checkpoint);
    }

    /// Verifies a new-view message by recomputing it: 2f+1 valid view changes for this view
    /// from distinct replicas, and exactly the pre-prepares they imply, each signed.
    fn check_new_view(&self, nv: &NewView) -> Option<CheckpointCert> {
        let mut authors = std::collections::BTreeSet::<ReplicaId>::new();
        for vc in &nv.view_changes {
            let ok = vc.body.new_view == nv.view
                && authors.insert(vc.body.replica)
                && self.verify(vc)
                && self.valid_view_change(&vc.body);
            if !ok {
                return None;
            }
        }
        if authors.len() < self.cfg.quorum() {
            return None;
        }
        let plan = self.plan_new_view(&nv.view_changes, nv.view);
        let matches = plan.pre_prepares.len() == nv.pre_prepares.len()
            && plan
                .pre_prepares
                .iter()
                .zip(&nv.pre_prepares)
                .all(|(want, got)| *want == got.body && self.verify(got));
        matches.then_some(plan.checkpoint)
    }

    /// Starts normal operation in the new view.
    fn enter_view(&mut self, nv: Signed<NewView>, checkpoint: CheckpointCert) {
        let view = nv.body.view;
        self.view = view;
        self.changing = false;
        self.slots.clear();
        self.proposed.clear();
        self.persist(PersistOp::View {
            view,
            changing: false,
        });
        self.view_changes.retain(|_, vc| vc.body.new_view > view);
        self.event(Event::ViewEntered { view });

        if checkpoint.seq > self.stable.seq {
            if self.last_executed >= checkpoint.seq {
                self.adopt_stable(checkpoint.clone());
            } else {
                self.start_sync(checkpoint.seq);
            }
        }
        let mut max_seq = checkpoint.seq.max(self.last_executed);
        for pp in nv.body.pre_prepares.clone() {
            max_seq = max_seq.max(pp.body.seq);
            if self.in_window(pp.body.seq) {
                // Its batch came from a prepared certificate, whose f+1 vouchers make it
                // valid (or it is a null batch).
                self.accept_pre_prepare(pp, true);
            }
        }
        self.new_view = Some(nv);
        self.restart_timers();
        if self.is_primary() {
            self.next_seq = max_seq + 1;
            let waiting: Vec<_> = self.waiting.values().map(|w| w.request.clone()).collect();
            for req in waiting {
                self.enqueue(req);
            }
            self.try_propose();
        } else {
            // Make sure the new primary knows what we are waiting for.
            let p = self.primary();
            let waiting: Vec<_> = self.waiting.values().map(|w| w.request.clone()).collect();
            for req in waiting {
                self.send(p, Message::Request(req));
            }
        }
        self.try_execute();
    }

    /// Hands the current view's new-view message to a replica that is still asking for it,
    /// at most once per retransmission interval.
    fn resend_new_view(&mut self, to: ReplicaId) {
        let Some(nv) = self.new_view.clone() else {
            return;
        };
        let last = self.new_view_sent_to.get(&to).copied();
        if last.is_some_and(|t| self.now < t + self.cfg.retransmit_interval) {
            return;
        }
        self.new_view_sent_to.insert(to, self.now);
        self.send(to, Message::NewView(nv));
    }
}
