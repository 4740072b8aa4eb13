//! One PBFT replica as a deterministic state machine.
//!
//! Drive it with [`Replica::handle`] (messages, client requests, ticks) and drain what it
//! decided with [`Replica::take_output`]: state to persist, messages to send, replies to
//! deliver. It performs no I/O, reads no clock and draws no randomness, so the same inputs
//! always give the same outputs; that is what makes simulator failures replayable.
//!
//! The protocol is split by concern: [`normal`] (requests, batching, the three phases and
//! execution), [`vouch`] (which replicas check a batch's client signatures), [`checkpoint`]
//! (stable checkpoints and garbage collection), [`view_change`] and [`sync`] (fetching
//! certified blocks when behind).

mod checkpoint;
mod log;
mod normal;
mod retransmit;
mod sync;
mod view_change;
mod vouch;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use crate::block::{CheckpointCert, checkpoint_digest};
use crate::config::Config;
use crate::crypto::{ReplicaSig, Signer, Verifier};
use crate::kv::{KvStore, Snapshot};
use crate::message::{Message, NewView, PreparedProof, Signable, Signed, ViewChange, primary};
use crate::output::{Envelope, Event, Input, Output, Source, Target};
use crate::reject::{RejectCounts, RejectReason};
use crate::request::Request;
use crate::storage::{PersistOp, Recovered};
use crate::types::{ClientId, Digest, ReplicaId, Seq, Signature, Tick, View};
use crate::{Error, Result};

use self::log::Slot;
use self::sync::SyncState;

/// A request a replica knows about but has not executed yet; while one waits longer than the
/// view-change timeout, the replica suspects the primary.
#[derive(Clone, Debug)]
struct Waiting {
    request: Request,
    since: Tick,
    /// Whether this replica has forwarded it to the primary yet.
    forwarded: bool,
}

/// A read-only summary for status pages and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub id: ReplicaId,
    pub view: View,
    pub primary: ReplicaId,
    pub view_change_in_progress: bool,
    pub last_executed: Seq,
    pub head_hash: Digest,
    pub stable_checkpoint: Seq,
    pub sync_target: Option<Seq>,
    pub pending_requests: usize,
}

/// A PBFT replica.
pub struct Replica {
    cfg: Config,
    id: ReplicaId,
    signer: Box<dyn Signer>,
    verifier: Arc<dyn Verifier>,
    now: Tick,

    /// Current view, or the view being changed to while `changing`.
    view: View,
    changing: bool,
    /// When 2f+1 view changes for `view` were first seen: the new view's timer starts then.
    view_change_quorum_at: Option<Tick>,
    /// Current view-change timeout; doubles with each view change that makes no progress.
    vc_timeout: Tick,

    /// Agreement state of the current view, by sequence number, above the stable checkpoint.
    slots: BTreeMap<Seq, Slot>,
    /// Highest-view prepared certificate per sequence number above the stable checkpoint;
    /// these survive view changes and go into view-change messages.
    prepared: BTreeMap<Seq, PreparedProof>,
    /// Primary only: the next sequence number to assign.
    next_seq: Seq,
    /// Primary only: how many requests the last batch it proposed carried (0: none yet).
    last_batch: usize,

    kv: KvStore,
    last_executed: Seq,
    head_hash: Digest,

    stable: CheckpointCert,
    /// Own checkpoints not yet stable: digest and the state to save when it becomes stable.
    own_checkpoints: BTreeMap<Seq, (Digest, Arc<Snapshot>, Digest)>,
    /// Checkpoint votes within reach of stability.
    checkpoint_votes: BTreeMap<Seq, BTreeMap<ReplicaId, Signed<crate::message::Checkpoint>>>,
    /// Highest checkpoint each replica claims to have reached; f+1 above us mean we lag.
    claimed: BTreeMap<ReplicaId, Seq>,

    /// Primary only: requests waiting for a batch, with when they were queued.
    queue: VecDeque<(Request, Tick)>,
    queued: BTreeSet<(ClientId, u64)>,
    /// Requests in a pre-prepare of the current view that have not executed yet, so the
    /// primary never proposes one twice.
    proposed: BTreeSet<(ClientId, u64)>,
    /// Requests this replica waits to see executed (the view-change timers).
    waiting: BTreeMap<ClientId, Waiting>,
    timers: BTreeSet<(Tick, ClientId)>,

    /// Latest valid view-change message from each replica.
    view_changes: BTreeMap<ReplicaId, Signed<ViewChange>>,
    /// Highest view each replica was seen working in (from validly signed messages).
    seen_views: BTreeMap<ReplicaId, View>,
    /// The new-view message that started the current view, to hand to replicas that missed it.
    new_view: Option<Signed<NewView>>,
    new_view_sent_to: BTreeMap<ReplicaId, Tick>,
    /// When each peer was last sent votes it evidently missed.
    helped: BTreeMap<ReplicaId, Tick>,

    sync: Option<SyncState>,

    /// Designated vouchers that failed to vouch in time, until when they stay suspected.
    suspected: BTreeMap<ReplicaId, Tick>,
    /// Slots accepted here without checking their batch (an unvouched prepare sent): when
    /// to check it here if the vouchers have not vouched by then, in which view.
    vouch_deadlines: BTreeSet<(Tick, View, Seq)>,

    last_progress: Tick,
    last_retransmit: Tick,
    /// This replica's newest checkpoint vote, announced every `status_interval`.
    latest_checkpoint_vote: Option<Signed<crate::message::Checkpoint>>,
    last_status: Tick,

    rejected: RejectCounts,
    /// Verdicts on the signatures of the messages of one `ReceiveMany` input, checked in
    /// one batch before they are handled: (author, signature) -> (signed bytes, verdict).
    /// Empty between inputs.
    batch_verdicts: HashMap<(ReplicaId, Signature), (Vec<u8>, bool)>,
    out: Output,
}

impl Replica {
    /// A fresh replica at genesis.
    pub fn new(
        cfg: Config,
        id: ReplicaId,
        signer: Box<dyn Signer>,
        verifier: Arc<dyn Verifier>,
    ) -> Result<Self> {
        Self::recover(cfg, id, signer, verifier, Recovered::default())
    }

    /// A replica restarted from durable state: the stable checkpoint's state, then every
    /// later block replayed and checked against its recorded hash link and results.
    pub fn recover(
        cfg: Config,
        id: ReplicaId,
        signer: Box<dyn Signer>,
        verifier: Arc<dyn Verifier>,
        state: Recovered,
    ) -> Result<Self> {
        cfg.validate()?;
        if id.0 as usize >= cfg.n {
            return Err(Error::UnknownReplica(id));
        }
        let (stable, kv, head_hash) = match state.checkpoint {
            Some(cp) => {
                let kv = KvStore::from_snapshot(Arc::unwrap_or_clone(cp.snapshot));
                check_recovered_state(&cfg, &cp.cert, &kv, &cp.block_hash)?;
                (cp.cert, kv, cp.block_hash)
            }
            None => (CheckpointCert::genesis(), KvStore::default(), Digest::ZERO),
        };
        let vc_timeout = cfg.view_change_timeout;
        let mut r = Replica {
            id,
            signer,
            verifier,
            now: 0,
            view: state.view,
            changing: state.changing,
            view_change_quorum_at: None,
            vc_timeout,
            slots: BTreeMap::new(),
            prepared: BTreeMap::new(),
            next_seq: stable.seq + 1,
            last_batch: 0,
            kv,
            last_executed: stable.seq,
            head_hash,
            stable,
            own_checkpoints: BTreeMap::new(),
            checkpoint_votes: BTreeMap::new(),
            claimed: BTreeMap::new(),
            queue: VecDeque::new(),
            queued: BTreeSet::new(),
            proposed: BTreeSet::new(),
            waiting: BTreeMap::new(),
            timers: BTreeSet::new(),
            view_changes: BTreeMap::new(),
            seen_views: BTreeMap::new(),
            new_view: None,
            new_view_sent_to: BTreeMap::new(),
            helped: BTreeMap::new(),
            sync: None,
            suspected: BTreeMap::new(),
            vouch_deadlines: BTreeSet::new(),
            last_progress: 0,
            last_retransmit: 0,
            latest_checkpoint_vote: None,
            last_status: 0,
            rejected: RejectCounts::default(),
            batch_verdicts: HashMap::new(),
            out: Output::default(),
            cfg,
        };
        for block in state.blocks {
            r.replay_block(block)?;
        }
        for proof in state.prepared {
            if proof.seq() > r.stable.seq {
                r.prepared.insert(proof.seq(), proof);
            }
        }
        if !r.changing {
            for pp in state.accepted {
                if pp.body.view == r.view && pp.body.seq > r.stable.seq {
                    r.restore_accepted(pp);
                }
            }
        }
        r.next_seq = r.next_seq.max(r.last_executed + 1);
        // Replay only rebuilds state; what it emitted was already persisted and sent. The
        // newest checkpoint vote is kept: announcing it tells peers where we are.
        r.out = Output::default();
        if r.changing {
            // A replica that crashed in a view change may never have sent its request for
            // the view. Holding it again, the replica re-sends it at the next retransmission
            // and counts itself towards the 2f+1; without it the view change could wait
            // forever for a quorum that included this replica.
            let vc = r.own_view_change(r.view);
            r.view_changes.insert(r.id, vc);
        }
        Ok(r)
    }

    /// Puts a pre-prepare accepted before a crash back into the log, with the prepare this
    /// replica sent for it. A backup cannot tell whether it checked the batch before the
    /// crash, so it checks it now (a restart is rare, and the log short): its requests are
    /// timed again, as on acceptance, only if it holds. (ed25519 signing is deterministic:
    /// the prepare is the same message as before, or a vouching upgrade of it.)
    fn restore_accepted(&mut self, pp: Signed<crate::message::PrePrepare>) {
        let (view, seq, digest) = (pp.body.view, pp.body.seq, pp.body.digest);
        self.next_seq = self.next_seq.max(seq + 1);
        let is_primary = self.is_primary();
        let valid = is_primary || self.signatures_hold(pp.body.batch.requests());
        if valid {
            self.expect_batch(pp.body.batch.requests());
        }
        let prepare = (!is_primary).then(|| {
            self.sign(crate::message::Prepare {
                view,
                seq,
                digest,
                replica: self.id,
                vouches: valid,
            })
        });
        let slot = self.slot(seq);
        slot.pre_prepare = Some(pp);
        slot.valid = valid;
        slot.invalid = !valid;
        if let Some(p) = prepare {
            slot.prepares.insert(p.body.replica, p.clone());
            slot.own_prepare = Some(p);
        }
    }

    /// Feeds one input. Call [`Replica::take_output`] afterwards (after one or many inputs).
    pub fn handle(&mut self, input: Input) {
        match input {
            Input::Tick => self.on_tick(),
            Input::Request(req) => self.on_request(req, Source::Client),
            Input::Requests(reqs) => self.on_requests(reqs, Source::Client),
            Input::Receive { from, msg } => self.on_message(from, msg),
            Input::ReceiveMany(msgs) => self.on_messages(msgs),
        }
    }

    /// Messages that arrived together: their authors' signatures in one batch check, then
    /// each message in order as if alone. The verdicts are only a cache: a message not in
    /// it, or whose signed bytes differ, is checked on its own as usual.
    fn on_messages(&mut self, msgs: Vec<(Source, Message)>) {
        let signed: Vec<(ReplicaId, Vec<u8>, Signature)> = msgs
            .iter()
            .filter_map(|(_, m)| m.signed_by(self.cfg.n))
            .filter(|(author, _, _)| self.is_replica(*author))
            .collect();
        let items: Vec<ReplicaSig<'_>> = signed.iter().map(ReplicaSig::of).collect();
        let verdicts = self.verifier.verify_replicas(&items);
        for ((author, bytes, sig), ok) in signed.into_iter().zip(verdicts) {
            self.batch_verdicts.insert((author, sig), (bytes, ok));
        }
        for (from, msg) in msgs {
            self.on_message(from, msg);
        }
        self.batch_verdicts.clear();
    }

    /// Everything decided since the last call. Persist `persist` before sending anything.
    pub fn take_output(&mut self) -> Output {
        std::mem::take(&mut self.out)
    }

    fn on_message(&mut self, from: Source, msg: Message) {
        match msg {
            Message::Request(req) => self.on_request(req, from),
            Message::PrePrepare(m) => self.on_pre_prepare(m),
            Message::Prepare(m) => self.on_prepare(m),
            Message::Commit(m) => self.on_commit(m),
            Message::Checkpoint(m) => self.on_checkpoint(m),
            Message::StatusAnnouncement(m) => self.on_status_announcement(m),
            Message::ViewChange(m) => self.on_view_change(m),
            Message::NewView(m) => self.on_new_view(m),
            Message::SyncRequest(_) => {
                // Served by the adapter's StateProvider, which has the blocks; the core keeps
                // none in memory. Reaching here means the adapter routed it wrongly.
                self.reject(RejectReason::WrongPhase);
            }
            Message::SyncResponse(m) => match from {
                Source::Replica(peer) => self.on_sync_response(peer, m),
                Source::Client => self.reject(RejectReason::UnknownSender),
            },
        }
    }

    fn on_tick(&mut self) {
        self.now += 1;
        if self.changing {
            // The new view's timer runs only once 2f+1 replicas asked for it (Castro & Liskov
            // section 4.5.2): a replica alone in a view change, e.g. cut off with a request
            // while the others carried on, keeps asking for the same view instead of climbing
            // views on its own, so it is still there when the others next change views.
            if let Some(since) = self.view_change_quorum_at
                && self.now.saturating_sub(since) >= self.vc_timeout
            {
                // The new primary did not deliver a valid new view in time: try the next
                // one, waiting longer, so that eventually some correct primary gets
                // enough time.
                self.vc_timeout = (self.vc_timeout * 2).min(self.cfg.max_view_change_timeout);
                self.start_view_change(self.view + 1);
            }
        } else if let Some(&(since, _)) = self.timers.first() {
            // While syncing, the timers stand still. f+1 replicas claim blocks we have not
            // executed, and the requests we wait for may be among them: the timers would
            // measure our own lag, not the primary. One that ran out here put a restarted
            // replica alone into a view change the others never joined, and so out of the
            // protocol until their next one. They resume when the sync ends, less its
            // time (`pause_timers`); a faulty primary is still voted out meanwhile, as we
            // join once f+1 others ask.
            if self.sync.is_none() && self.now.saturating_sub(since) >= self.vc_timeout {
                self.start_view_change(self.view + 1);
            } else {
                self.forward_overdue();
            }
        }
        if self.is_primary() && !self.changing {
            self.try_propose();
        }
        self.vouch_tick();
        self.sync_tick();
        self.retransmit_tick();
        self.status_tick();
    }

    // ----- small shared helpers -----

    pub(crate) fn n(&self) -> usize {
        self.cfg.n
    }

    fn is_primary(&self) -> bool {
        primary(self.view, self.cfg.n) == self.id
    }

    fn primary(&self) -> ReplicaId {
        primary(self.view, self.cfg.n)
    }

    fn is_replica(&self, r: ReplicaId) -> bool {
        (r.0 as usize) < self.cfg.n
    }

    /// High watermark: sequence numbers above it are not accepted yet.
    fn high_watermark(&self) -> Seq {
        self.stable.seq + self.cfg.log_window
    }

    fn in_window(&self, seq: Seq) -> bool {
        seq > self.stable.seq && seq <= self.high_watermark()
    }

    fn slot(&mut self, seq: Seq) -> &mut Slot {
        self.slots.entry(seq).or_default()
    }

    fn sign<T: Signable>(&self, body: T) -> Signed<T> {
        Signed::sign(body, self.signer.as_ref())
    }

    fn verify<T: Signable>(&self, m: &Signed<T>) -> bool {
        self.is_replica(m.author(self.cfg.n)) && self.signature_holds(m)
    }

    /// Whether `m`'s author signed it: from this input's batch verdicts if it was among
    /// them, else checked now.
    fn signature_holds<T: Signable>(&self, m: &Signed<T>) -> bool {
        let author = m.author(self.cfg.n);
        let bytes = m.body.signing_bytes();
        if let Some((checked, ok)) = self.batch_verdicts.get(&(author, m.signature))
            && *checked == bytes
        {
            return *ok;
        }
        self.verifier.verify_replica(author, &bytes, &m.signature)
    }

    /// Like `verify`, but says why a message fails: an author outside the cluster, or a
    /// signature that does not verify.
    fn authenticate<T: Signable>(&self, m: &Signed<T>) -> Result<(), RejectReason> {
        if !self.is_replica(m.author(self.cfg.n)) {
            return Err(RejectReason::UnknownSender);
        }
        if !self.signature_holds(m) {
            return Err(RejectReason::BadSignature);
        }
        Ok(())
    }

    fn broadcast(&mut self, msg: Message) {
        self.out.messages.push(Envelope {
            to: Target::All,
            msg,
        });
    }

    fn send(&mut self, to: ReplicaId, msg: Message) {
        if to != self.id {
            self.out.messages.push(Envelope {
                to: Target::Replica(to),
                msg,
            });
        }
    }

    fn persist(&mut self, op: PersistOp) {
        self.out.persist.push(op);
    }

    fn event(&mut self, e: Event) {
        self.out.events.push(e);
    }

    fn reject(&mut self, reason: RejectReason) {
        self.rejected.add(reason);
        self.event(Event::Rejected { reason });
    }

    /// Notes that `who` demonstrably works in `view` (it signed a message for it).
    fn saw_view(&mut self, who: ReplicaId, view: View) {
        let e = self.seen_views.entry(who).or_insert(view);
        *e = (*e).max(view);
    }

    // ----- read-only accessors -----

    pub fn id(&self) -> ReplicaId {
        self.id
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn status(&self) -> Status {
        Status {
            id: self.id,
            view: self.view,
            primary: self.primary(),
            view_change_in_progress: self.changing,
            last_executed: self.last_executed,
            head_hash: self.head_hash,
            stable_checkpoint: self.stable.seq,
            sync_target: self.sync.as_ref().map(|s| s.target),
            pending_requests: self.queue.len() + self.waiting.len(),
        }
    }

    /// The replicated state (read-only), e.g. to compare replicas in tests.
    pub fn state(&self) -> &KvStore {
        &self.kv
    }

    /// The latest stable checkpoint certificate.
    pub fn stable_checkpoint(&self) -> &CheckpointCert {
        &self.stable
    }

    /// Refusals so far, by reason.
    pub fn rejected(&self) -> &RejectCounts {
        &self.rejected
    }

    /// Current virtual time in ticks.
    pub fn now(&self) -> Tick {
        self.now
    }
}

/// Checks a recovered checkpoint's state against its certificate under the configured state
/// digest. A store certified under the other scheme gets an error naming the setting, since
/// running on would split the cluster's checkpoints; any other mismatch is corruption.
fn check_recovered_state(
    cfg: &Config,
    cert: &CheckpointCert,
    kv: &KvStore,
    head: &Digest,
) -> Result<()> {
    if cert.seq == 0 {
        return Ok(());
    }
    let matches = |scheme| checkpoint_digest(&kv.digest(scheme), head) == cert.digest;
    if matches(cfg.state_digest) {
        return Ok(());
    }
    let other = cfg.state_digest.other();
    if matches(other) {
        return Err(Error::StateDigestScheme {
            seq: cert.seq,
            configured: cfg.state_digest,
            found: other,
        });
    }
    Err(Error::StateMismatch(cert.seq))
}
