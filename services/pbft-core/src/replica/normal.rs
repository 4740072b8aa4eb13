//! The normal case: client requests, batching, pre-prepare / prepare / commit, and in-order
//! execution into blocks.

use super::{Replica, Waiting};
use crate::Result;
use crate::block::{Block, BlockError};
use crate::kv::{reply_for, results_digest};
use crate::message::{Commit, Message, PrePrepare, Prepare, PreparedProof, Signed};
use crate::output::{Event, Source};
use crate::reject::RejectReason;
use crate::request::{Batch, Request};
use crate::storage::PersistOp;
use crate::types::{ClientId, Digest, Seq, Tick, View};

impl Replica {
    /// A client request, straight from the client or forwarded by a backup.
    pub(super) fn on_request(&mut self, req: Request, from: Source) {
        self.on_requests(vec![req], from);
    }

    /// Requests that arrived together: every check but the signature on each, then one
    /// batch signature check for those that need it, then each in order as if alone.
    pub(super) fn on_requests(&mut self, reqs: Vec<Request>, from: Source) {
        let mut verdicts: Vec<Result<(), RejectReason>> =
            reqs.iter().map(|r| self.check_request_shape(r)).collect();
        // A byte-for-byte copy of a request already waiting (say its pre-prepare came
        // first) was verified then; only the others need their signature checked.
        let unchecked: Vec<usize> = (0..reqs.len())
            .filter(|&i| verdicts[i].is_ok() && !self.is_waiting(&reqs[i]))
            .collect();
        let refs: Vec<&Request> = unchecked.iter().map(|&i| &reqs[i]).collect();
        for (i, ok) in unchecked
            .iter()
            .zip(Request::verify_all(&refs, self.verifier.as_ref()))
        {
            if !ok {
                verdicts[*i] = Err(RejectReason::BadSignature);
            }
        }
        for (req, verdict) in reqs.into_iter().zip(verdicts) {
            match verdict {
                Ok(()) => self.admit_request(req, from),
                Err(reason) => self.reject(reason),
            }
        }
    }

    /// Whether this exact request (signature included) is the one waiting for its client.
    fn is_waiting(&self, req: &Request) -> bool {
        self.waiting
            .get(&req.client)
            .is_some_and(|w| w.request == *req)
    }

    /// A request that passed every check: answer a retry from the reply cache, refuse a
    /// stale one, or order it.
    fn admit_request(&mut self, req: Request, from: Source) {
        if let Some(rec) = self.kv.client(req.client) {
            if rec.timestamp == req.timestamp {
                // A retry of the last executed request: answer from the reply cache.
                let reply = crate::request::Reply {
                    view: self.view,
                    timestamp: rec.timestamp,
                    client: req.client,
                    replica: self.id,
                    result: rec.result.clone(),
                };
                self.out.replies.push(reply);
                return;
            }
            if rec.timestamp > req.timestamp {
                self.reject(RejectReason::StaleRequest);
                return;
            }
        }
        if self.is_primary() && !self.changing {
            self.enqueue(req);
            self.try_propose();
        } else {
            // A client sends a request to every replica until each knows its stream, and on
            // a retry; the primary normally has it already: a backup forwards it only once
            // it has waited a while (see `forward_overdue`); if the primary still ignores
            // it, the view-change timer runs out.
            self.wait_for(req, from == Source::Client);
        }
    }

    /// Checks what can be checked of a request on its own but its signature: size, client.
    fn check_request_shape(&self, req: &Request) -> Result<(), RejectReason> {
        if req.check_shape(self.cfg.max_request_bytes).is_err() {
            return Err(RejectReason::Malformed);
        }
        if !self.verifier.knows_client(req.client) {
            return Err(RejectReason::UnknownSender);
        }
        Ok(())
    }

    /// Starts (or keeps) the timer for a request this replica expects to see executed.
    /// Returns true when the request is new to it.
    /// `from_client`: it came from the client itself (so it is worth forwarding to the
    /// primary if nothing happens); a copy forwarded by another replica is not forwarded on.
    pub(super) fn wait_for(&mut self, req: Request, from_client: bool) -> bool {
        if let Some(w) = self.waiting.get(&req.client) {
            if w.request.timestamp >= req.timestamp {
                return false;
            }
            self.timers.remove(&(w.since, req.client));
        }
        self.timers.insert((self.now, req.client));
        self.waiting.insert(
            req.client,
            Waiting {
                request: req,
                since: self.now,
                forwarded: !from_client,
            },
        );
        true
    }

    /// A batch's requests not yet executed are owed an execution: time them, and mark them
    /// proposed so a later primary role does not order them twice. For a pre-prepare
    /// accepted now or restored after a restart.
    pub(super) fn expect_batch(&mut self, requests: &[Request]) {
        for r in requests {
            if self
                .kv
                .client(r.client)
                .is_none_or(|c| c.timestamp < r.timestamp)
            {
                self.wait_for(r.clone(), false);
                self.proposed.insert((r.client, r.timestamp));
            }
        }
    }

    /// Forwards to the primary the requests a client gave this backup that have waited half
    /// a view-change timeout (or a retransmission interval, if shorter) without executing:
    /// early enough that the primary gets them before anyone suspects it.
    pub(super) fn forward_overdue(&mut self) {
        if self.changing || self.is_primary() {
            return;
        }
        let after = (self.vc_timeout / 2).min(self.cfg.retransmit_interval);
        let now = self.now;
        let overdue: Vec<ClientId> = self
            .timers
            .iter()
            .take_while(|(since, _)| since + after <= now)
            .map(|(_, c)| *c)
            .collect();
        let primary = self.primary();
        for client in overdue {
            if let Some(w) = self.waiting.get_mut(&client)
                && !w.forwarded
            {
                w.forwarded = true;
                let req = w.request.clone();
                self.send(primary, Message::Request(req));
            }
        }
    }

    /// Stops the timer of an executed request.
    fn executed_for_client(&mut self, req: &Request) {
        if let Some(w) = self.waiting.get(&req.client)
            && w.request.timestamp <= req.timestamp
        {
            self.timers.remove(&(w.since, req.client));
            self.waiting.remove(&req.client);
        }
    }

    /// Takes the time since `from` off every waiting request's timer: a timer started
    /// before `from` resumes where it stood then, one started since gets a full timeout
    /// from now. For a sync that just ended: while it ran, the timers measured this
    /// replica's lag, not the primary. Pausing rather than restarting them keeps a primary
    /// that makes a backup sync briefly at every checkpoint from resetting its timers
    /// for ever.
    pub(super) fn pause_timers(&mut self, from: Tick) {
        self.timers.clear();
        let now = self.now;
        for (c, w) in self.waiting.iter_mut() {
            w.since += now.saturating_sub(w.since.max(from));
            self.timers.insert((w.since, *c));
        }
    }

    /// Restarts every waiting request's timer, giving a new view's primary a full timeout.
    pub(super) fn restart_timers(&mut self) {
        self.timers.clear();
        for (c, w) in self.waiting.iter_mut() {
            w.since = self.now;
            self.timers.insert((self.now, *c));
        }
    }

    pub(super) fn enqueue(&mut self, req: Request) {
        let key = (req.client, req.timestamp);
        if self.queued.contains(&key) || self.proposed.contains(&key) {
            return;
        }
        if self.queue.len() >= self.cfg.max_pending_requests {
            self.reject(RejectReason::Overloaded);
            return;
        }
        self.queued.insert(key);
        self.queue.push_back((req, self.now));
    }

    /// Primary: turns queued requests into pre-prepares while the window and pipeline allow.
    pub(super) fn try_propose(&mut self) {
        while !self.queue.is_empty() && self.is_primary() && !self.changing {
            let in_flight = self.next_seq.saturating_sub(self.last_executed + 1);
            if self.next_seq > self.high_watermark() || in_flight >= self.cfg.max_in_flight {
                return;
            }
            // Let the batch fill for up to `batch_delay` ticks (throughput), unless it is full
            // already. With nothing in flight it is full once it holds as many requests as
            // the last batch: a lone client's requests go at once (latency; after a larger
            // batch the first waits `batch_delay` once), but under load the first request
            // back after the pipeline drained waits for the rest of its burst instead of
            // paying a whole batch's messages, signatures and fdatasyncs alone (at 1,024 in
            // flight one batch in six held a single request, a third of those proposed this
            // way).
            let waited = self.queue.front().map_or(0, |(_, t)| self.now - t);
            let full = if in_flight == 0 {
                self.last_batch.min(self.cfg.max_batch)
            } else {
                self.cfg.max_batch
            };
            if self.queue.len() < full && waited < self.cfg.batch_delay {
                return;
            }
            // More than one batch's worth waiting: split it evenly rather than into full
            // batches and a small remainder, which would pay a whole batch's messages,
            // signatures and fdatasyncs for a few requests.
            let batches = self.queue.len().div_ceil(self.cfg.max_batch);
            let size = self.queue.len().div_ceil(batches.max(1));
            let mut requests = Vec::new();
            while requests.len() < size {
                let Some((req, _)) = self.queue.pop_front() else {
                    break;
                };
                self.queued.remove(&(req.client, req.timestamp));
                let done = self
                    .kv
                    .client(req.client)
                    .is_some_and(|c| c.timestamp >= req.timestamp);
                if !done {
                    requests.push(req);
                }
            }
            if requests.is_empty() {
                continue;
            }
            for r in &requests {
                self.proposed.insert((r.client, r.timestamp));
                // The primary times its own proposals too. A primary whose batches cannot
                // commit (restarted with its votes lost, while its backups moved on to a view
                // change it never heard enough of) must ask for a new view itself; waiting
                // for backups that have nothing left to time out on deadlocks the cluster
                // (simulator seed 510767).
                self.wait_for(r.clone(), false);
            }
            self.last_batch = requests.len();
            let batch = Batch::new(requests);
            let seq = self.next_seq;
            self.next_seq += 1;
            let pp = self.sign(PrePrepare {
                view: self.view,
                seq,
                digest: batch.digest(),
                batch,
            });
            self.persist(PersistOp::Accepted(pp.clone()));
            let slot = self.slot(seq);
            slot.pre_prepare = Some(pp.clone());
            // Every request was checked when it arrived.
            slot.valid = true;
            self.broadcast(Message::PrePrepare(pp));
            self.check_prepared(seq);
        }
    }

    /// Validates the parts of a phase message shared by pre-prepare, prepare and commit.
    fn check_phase(&mut self, view: View, seq: Seq, auth: Result<(), RejectReason>) -> bool {
        if let Err(reason) = auth {
            self.reject(reason);
            return false;
        }
        if view < self.view {
            self.reject(RejectReason::StaleView);
            return false;
        }
        if view > self.view || self.changing {
            self.reject(if view > self.view {
                RejectReason::FutureView
            } else {
                RejectReason::WrongPhase
            });
            self.maybe_follow_views();
            return false;
        }
        if !self.in_window(seq) {
            self.reject(RejectReason::OutOfWindow);
            return false;
        }
        true
    }

    pub(super) fn on_pre_prepare(&mut self, m: Signed<PrePrepare>) {
        let auth = self.authenticate(&m);
        if auth.is_ok() {
            self.saw_view(m.author(self.n()), m.body.view);
        }
        if !self.check_phase(m.body.view, m.body.seq, auth) {
            return;
        }
        if self.is_primary() {
            self.reject(RejectReason::WrongPhase);
            return;
        }
        let valid = match self.check_batch(&m.body) {
            Ok(valid) => valid,
            Err(reason) => {
                self.reject(reason);
                return;
            }
        };
        let seq = m.body.seq;
        match self.slots.get(&seq).and_then(|s| s.digest()) {
            Some(d) if d == m.body.digest => {
                self.reject(RejectReason::Duplicate);
                return;
            }
            Some(_) => {
                self.reject(RejectReason::Conflicting);
                return;
            }
            None => {}
        }
        self.accept_pre_prepare(m, valid);
    }

    /// Checks a proposed batch: digest, size, every request's shape and, where this replica
    /// checks the batch before preparing (see [`super::vouch`]), every request's signature.
    /// `Ok(true)`: the batch is known valid here, so this replica's prepare vouches for it.
    fn check_batch(&self, pp: &PrePrepare) -> Result<bool, RejectReason> {
        #[cfg(feature = "mutations")]
        let skip_digest = self.cfg.mutation == Some(crate::config::Mutation::SkipDigestCheck);
        #[cfg(not(feature = "mutations"))]
        let skip_digest = false;
        if !skip_digest && pp.batch.digest() != pp.digest {
            return Err(RejectReason::DigestMismatch);
        }
        if pp.batch.len() > self.cfg.max_batch {
            return Err(RejectReason::Malformed);
        }
        // A request this replica already verified when the client sent it needs no second
        // signature check: the waiting copy is byte-for-byte the same request. The rest
        // are checked in one batch.
        let unchecked: Vec<&Request> = pp
            .batch
            .requests()
            .iter()
            .filter(|r| !self.is_waiting(r))
            .collect();
        unchecked
            .iter()
            .try_for_each(|r| self.check_request_shape(r))?;
        if unchecked.is_empty() {
            return Ok(true);
        }
        if !self.checks_eagerly(pp.view, pp.seq) {
            return Ok(false);
        }
        if self.all_signed(&unchecked) {
            Ok(true)
        } else {
            Err(RejectReason::BadSignature)
        }
    }

    /// Whether every request's client signature holds, checked in one batch.
    pub(super) fn signatures_hold(&self, requests: &[Request]) -> bool {
        self.all_signed(&requests.iter().collect::<Vec<_>>())
    }

    fn all_signed(&self, requests: &[&Request]) -> bool {
        Request::verify_all(requests, self.verifier.as_ref())
            .into_iter()
            .all(|ok| ok)
    }

    /// Takes a pre-prepare into the log and votes for it. Used for normal pre-prepares and
    /// for those a new-view message carries. `valid`: the batch's client signatures are
    /// known to hold here; only then are its requests timed and does the prepare vouch.
    /// Otherwise the replica waits for the designated vouchers (see [`super::vouch`]).
    pub(super) fn accept_pre_prepare(&mut self, m: Signed<PrePrepare>, valid: bool) {
        let (view, seq, digest) = (m.body.view, m.body.seq, m.body.digest);
        if valid {
            // Unchecked requests are not timed: a request a faulty primary forged would
            // otherwise wait here for ever, and a forged timestamp could displace the
            // client's real request.
            self.expect_batch(m.body.batch.requests());
        }
        self.persist(PersistOp::Accepted(m.clone()));
        let slot = self.slot(seq);
        slot.pre_prepare = Some(m);
        slot.valid = valid;
        if !self.is_primary() {
            let prepare = self.sign(Prepare {
                view,
                seq,
                digest,
                replica: self.id,
                vouches: valid,
            });
            let slot = self.slot(seq);
            slot.prepares.insert(prepare.body.replica, prepare.clone());
            slot.own_prepare = Some(prepare.clone());
            self.broadcast(Message::Prepare(prepare));
            if !valid {
                self.await_vouchers(seq);
            }
        }
        self.check_prepared(seq);
    }

    pub(super) fn on_prepare(&mut self, m: Signed<Prepare>) {
        let auth = self.authenticate(&m);
        if auth.is_ok() {
            self.saw_view(m.body.replica, m.body.view);
        }
        if !self.check_phase(m.body.view, m.body.seq, auth) {
            return;
        }
        if m.body.replica == self.primary() {
            self.reject(RejectReason::WrongPhase);
            return;
        }
        let seq = m.body.seq;
        let slot = self.slot(seq);
        if let Some(old) = slot.prepares.get(&m.body.replica) {
            if old.body.digest == m.body.digest && m.body.vouches && !old.body.vouches {
                // The sender checked the batch after all (its vouchers were late): the same
                // vote, now vouching. It is evidently stuck on this slot: if we committed
                // it, send it our votes.
                let sender = m.body.replica;
                slot.prepares.insert(sender, m);
                self.check_prepared(seq);
                self.help_peer(sender, seq);
                return;
            }
            let reason = if old.body.digest == m.body.digest {
                RejectReason::Duplicate
            } else {
                RejectReason::Conflicting
            };
            self.reject(reason);
            if reason == RejectReason::Duplicate {
                self.help_peer(m.body.replica, seq);
            }
            return;
        }
        slot.prepares.insert(m.body.replica, m);
        self.check_prepared(seq);
    }

    /// A slot is prepared with its pre-prepare plus 2f matching prepares from backups, f of
    /// them vouching (see [`super::vouch`]). Then the certificate is saved (view changes
    /// must carry it) and the replica commits.
    pub(super) fn check_prepared(&mut self, seq: Seq) {
        let primary = self.primary();
        let needed = self.cfg.quorum() - 1;
        let vouches = self.vouches_needed();
        let Some(slot) = self.slots.get(&seq) else {
            return;
        };
        // A batch this replica found forged never prepares here, whatever others vouch.
        if slot.prepared || slot.invalid {
            return;
        }
        let Some(pp) = slot.pre_prepare.clone() else {
            return;
        };
        let Some(prepares) = slot.certificate_prepares(primary, needed, vouches) else {
            return;
        };
        if !slot.valid {
            // f+1 vouchers, one of them correct: the batch is valid, and owed an execution.
            self.slot(seq).valid = true;
            self.expect_batch(pp.body.batch.requests());
        }
        let proof = PreparedProof {
            pre_prepare: pp,
            prepares,
        };
        let digest = proof.digest();
        self.persist(PersistOp::Prepared(proof.clone()));
        self.prepared.insert(seq, proof);
        let commit = self.sign(Commit {
            view: self.view,
            seq,
            digest,
            replica: self.id,
        });
        let slot = self.slot(seq);
        slot.prepared = true;
        slot.commits.insert(commit.body.replica, commit.clone());
        slot.own_commit = Some(commit.clone());
        self.broadcast(Message::Commit(commit));
        self.check_committed(seq);
    }

    /// Vouching prepares a prepared certificate needs besides the pre-prepare: f.
    pub(super) fn vouches_needed(&self) -> usize {
        #[cfg(feature = "mutations")]
        if self.cfg.mutation == Some(crate::config::Mutation::SkipVouchCheck) {
            return 0;
        }
        self.cfg.f()
    }

    pub(super) fn on_commit(&mut self, m: Signed<Commit>) {
        let auth = self.authenticate(&m);
        if auth.is_ok() {
            self.saw_view(m.body.replica, m.body.view);
        }
        if !self.check_phase(m.body.view, m.body.seq, auth) {
            return;
        }
        let seq = m.body.seq;
        let slot = self.slot(seq);
        if let Some(old) = slot.commits.get(&m.body.replica) {
            let reason = if old.body.digest == m.body.digest {
                RejectReason::Duplicate
            } else {
                RejectReason::Conflicting
            };
            self.reject(reason);
            if reason == RejectReason::Duplicate {
                self.help_peer(m.body.replica, seq);
            }
            return;
        }
        slot.commits.insert(m.body.replica, m);
        self.check_committed(seq);
    }

    /// Committed locally: prepared here and 2f+1 matching commits.
    fn check_committed(&mut self, seq: Seq) {
        let quorum = self.cfg.quorum();
        let Some(slot) = self.slots.get_mut(&seq) else {
            return;
        };
        if slot.committed || !slot.prepared || slot.matching_commits().len() < quorum {
            return;
        }
        slot.committed = true;
        self.try_execute();
    }

    /// Executes committed slots in sequence order.
    pub(super) fn try_execute(&mut self) {
        loop {
            let seq = self.last_executed + 1;
            let Some(slot) = self.slots.get(&seq) else {
                break;
            };
            if !slot.committed {
                break;
            }
            let Some(pp) = slot.pre_prepare.clone() else {
                break;
            };
            let certificate: Vec<_> = slot
                .matching_commits()
                .into_iter()
                .take(self.cfg.quorum())
                .collect();
            let view = pp.body.view;
            self.execute_block(pp.body.batch, view, certificate, false);
        }
        if self.is_primary() {
            self.try_propose();
        }
    }

    /// Executes the next block and records it. Replies go out for normally committed blocks;
    /// synced ones were answered by the replicas that committed them.
    pub(super) fn execute_block(
        &mut self,
        batch: Batch,
        view: View,
        certificate: Vec<Signed<Commit>>,
        synced: bool,
    ) -> Block {
        let height = self.last_executed + 1;
        let results = self.kv.execute(&batch);
        for r in batch.requests() {
            self.executed_for_client(r);
            self.proposed.remove(&(r.client, r.timestamp));
        }
        if !synced {
            for exec in &results {
                if let Some(reply) = reply_for(self.view, self.id, exec) {
                    self.out.replies.push(reply);
                }
            }
        }
        let checkpoint_here = height.is_multiple_of(self.cfg.checkpoint_interval);
        let state_digest = if checkpoint_here {
            self.kv.digest(self.cfg.state_digest)
        } else {
            Digest::ZERO
        };
        let requests = batch.len();
        let block = Block {
            height,
            prev_hash: self.head_hash,
            batch,
            results_digest: results_digest(&results),
            state_digest,
            view,
            certificate,
        };
        self.head_hash = block.hash();
        self.last_executed = height;
        self.last_progress = self.now;
        if !self.changing {
            self.vc_timeout = self.cfg.view_change_timeout;
        }
        self.persist(PersistOp::Block(block.clone()));
        self.event(Event::Executed {
            height,
            view,
            requests,
            synced,
        });
        if checkpoint_here {
            self.take_checkpoint(state_digest);
        }
        block
    }

    /// Re-executes a stored block during recovery, checking it against what was recorded.
    pub(super) fn replay_block(&mut self, block: Block) -> Result<(), BlockError> {
        if block.height != self.last_executed + 1 {
            return Err(BlockError::Height {
                expected: self.last_executed + 1,
                got: block.height,
            });
        }
        if block.prev_hash != self.head_hash {
            return Err(BlockError::BrokenLink {
                height: block.height,
            });
        }
        let executed = self.execute_block(block.batch.clone(), block.view, Vec::new(), true);
        if executed.results_digest != block.results_digest {
            return Err(BlockError::Results {
                height: block.height,
            });
        }
        if executed.state_digest != block.state_digest {
            return Err(BlockError::State {
                height: block.height,
            });
        }
        Ok(())
    }
}
