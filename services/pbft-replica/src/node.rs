//! The node loop: the one thread that owns the protocol state. It feeds the core with
//! messages, client requests and 1 ms ticks, and hands the core's outputs to the
//! persistence thread ([`crate::persister`]), which carries them out in the order that
//! keeps a crash harmless: persist (fsync), then send, then reply.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use pbft_core::{Event, Input, Message, Output, Replica, Reply, Request, Source, Storage};
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use crate::metrics::Metrics;
use crate::persister::{PENDING_OUTPUTS, Persister, SharedReplies, Waiter};
use crate::status::{SharedStatus, StatusView};
use crate::transport::Outbound;

/// Something for the node loop to process.
pub enum Inbound {
    /// A protocol message from a peer (or a request forwarded by one).
    Message { from: Source, msg: Message },
    /// A client request submitted to this replica; `reply` gets this replica's answer.
    /// `route`, when the request came over a client's stream, is where this replica pushes
    /// that client's later replies for requests it did not receive itself (see `ReplyRoute`).
    /// Without `reply` (a `SubmitBatches` stream), the answer to this request goes there too.
    Submit {
        request: Request,
        reply: Option<oneshot::Sender<Reply>>,
        route: Option<ReplyRoute>,
    },
}

/// A client's stream back from this replica. A client sends a request to the primary only
/// (to every replica on a retry, as in the PBFT paper), so a backup learns of it from the
/// pre-prepare; once the client has sent one request over its stream, the backup pushes
/// the client's replies down that stream, which gives the client its f+1 matching replies
/// without every backup receiving, decoding and checking every request from the client too.
pub type ReplyRoute = tokio::sync::mpsc::Sender<Reply>;

/// How the servers reach the node loop.
#[derive(Clone)]
pub struct NodeHandle {
    tx: SyncSender<Inbound>,
    metrics: Metrics,
}

/// The node loop's queue is full: the replica is overloaded.
#[derive(Debug, thiserror::Error)]
#[error("replica overloaded: inbound queue full")]
pub struct Overloaded;

impl NodeHandle {
    /// A bounded inbound queue and its handle.
    pub fn channel(metrics: Metrics) -> (NodeHandle, Receiver<Inbound>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(INBOUND_CAPACITY);
        (NodeHandle { tx, metrics }, rx)
    }

    /// Hands an input to the node loop without blocking; a full queue drops it (counted).
    pub fn deliver(&self, input: Inbound) -> Result<(), Overloaded> {
        match self.tx.try_send(input) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.metrics
                    .dropped_messages
                    .with_label_values(&["inbound", "queue_full"])
                    .inc();
                Err(Overloaded)
            }
        }
    }
}

/// A fatal node error: the replica stops rather than continue unsafely.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("storage failed, stopping to stay safe: {0}")]
    Storage(#[from] pbft_core::StorageError),
    #[error("the persistence thread stopped unexpectedly")]
    PersisterGone,
}

/// The node loop's state.
pub struct Node {
    replica: Replica,
    outbound: Arc<dyn Outbound>,
    rx: Receiver<Inbound>,
    status: Arc<SharedStatus>,
    metrics: Metrics,
    replies: SharedReplies,
    submit_timeout: Duration,
    transport: String,
    last_digest_height: u64,
    /// Requests executed since this process started, for `/status`.
    executed_requests: u64,
    last_digest_at: Instant,
    /// How long the last state digest took to compute.
    digest_cost: Duration,
    state_digest: String,
}

const INBOUND_CAPACITY: usize = 65_536;

/// The status view's state digest waits at least this many times as long as the last one
/// took (see `refresh_status`).
const DIGEST_DUTY_INVERSE: u32 = 100;

/// Inputs collected in one turn of the node loop; at most one of the two holds anything.
#[derive(Default)]
struct Pending {
    submitted: Vec<Request>,
    received: Vec<(Source, Message)>,
}

impl Node {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        replica: Replica,
        outbound: Arc<dyn Outbound>,
        status: Arc<SharedStatus>,
        metrics: Metrics,
        submit_timeout: Duration,
        transport: String,
    ) -> (Node, NodeHandle) {
        let (handle, rx) = NodeHandle::channel(metrics.clone());
        let node = Node {
            replica,
            outbound,
            rx,
            status,
            metrics,
            replies: SharedReplies::default(),
            submit_timeout,
            transport,
            last_digest_height: u64::MAX,
            executed_requests: 0,
            last_digest_at: Instant::now() - Duration::from_secs(10),
            digest_cost: Duration::ZERO,
            state_digest: String::new(),
        };
        (node, handle)
    }

    /// Runs until `shutdown` is set and every sender is gone or the flag is seen; every
    /// output, the last included, is persisted in `store` (and sent) before returning.
    pub fn run(
        mut self,
        store: Box<dyn Storage + Send>,
        shutdown: Arc<AtomicBool>,
    ) -> Result<(), NodeError> {
        let (out_tx, out_rx) = std::sync::mpsc::sync_channel(PENDING_OUTPUTS);
        let persister = Persister {
            store,
            outbound: self.outbound.clone(),
            replies: self.replies.clone(),
            metrics: self.metrics.clone(),
        };
        let persister = std::thread::Builder::new()
            .name("pbft-persist".into())
            .spawn(move || persister.run(out_rx))
            .map_err(|e| {
                pbft_core::StorageError::Io(format!("cannot start persistence thread: {e}"))
            })?;
        let looped = self.node_loop(&shutdown, &out_tx);
        // Whatever the loop left, the persistence thread finishes before the node returns.
        drop(out_tx);
        // A storage error first: it is why the loop, if it failed, found the thread gone.
        match persister.join() {
            Ok(r) => r?,
            Err(_) => return Err(NodeError::PersisterGone),
        }
        looped?;
        info!("node loop stopped; storage flushed");
        Ok(())
    }

    fn node_loop(
        &mut self,
        shutdown: &AtomicBool,
        out_tx: &SyncSender<Output>,
    ) -> Result<(), NodeError> {
        let started = Instant::now();
        let mut ticks: u64 = 0;
        let mut last_status = Instant::now() - Duration::from_secs(1);
        let mut last_purge = Instant::now();
        self.refresh_status();
        loop {
            if shutdown.load(Ordering::Relaxed) {
                break;
            }
            let next_tick = started + Duration::from_millis(ticks + 1);
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(input) => {
                    // Drain what is already queued so one fsync covers many inputs, and
                    // requests or messages that arrived together share one signature batch.
                    let mut pending = Pending::default();
                    self.accept(input, &mut pending);
                    for _ in 0..4096 {
                        match self.rx.try_recv() {
                            Ok(input) => self.accept(input, &mut pending),
                            Err(_) => break,
                        }
                    }
                    self.hand_over(&mut pending);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let due = started.elapsed().as_millis() as u64;
            if due > ticks + 1_000 {
                // We were starved (e.g. a long fsync); do not replay a second of ticks at once.
                warn!(
                    behind_ms = due - ticks,
                    "node loop fell behind; skipping ticks"
                );
                ticks = due - 1;
            }
            while ticks < due {
                self.replica.handle(Input::Tick);
                ticks += 1;
            }
            let out = self.replica.take_output();
            if !out.is_empty() {
                self.hand_off(out, out_tx)?;
            }
            self.status.beat();
            if last_status.elapsed() >= Duration::from_millis(20) {
                self.refresh_status();
                last_status = Instant::now();
            }
            if last_purge.elapsed() >= Duration::from_secs(1) {
                self.purge_waiters();
                last_purge = Instant::now();
            }
        }
        let out = self.replica.take_output();
        if !out.is_empty() {
            self.hand_off(out, out_tx)?;
        }
        Ok(())
    }

    /// Takes one input. Client requests and peer messages are collected in `pending` and
    /// handed over in runs of one kind (see `hand_over`), so the core sees inputs in
    /// arrival order.
    fn accept(&mut self, input: Inbound, pending: &mut Pending) {
        match input {
            Inbound::Message { from, msg } => {
                if !pending.submitted.is_empty() {
                    self.hand_over(pending);
                }
                pending.received.push((from, msg));
            }
            Inbound::Submit {
                request,
                reply,
                route,
            } => {
                if !pending.received.is_empty() {
                    self.hand_over(pending);
                }
                self.metrics
                    .requests
                    .with_label_values(&["submitted"])
                    .inc();
                let mut replies = self.replies.lock();
                if let Some(route) = route {
                    replies.routes.insert(request.client, route);
                }
                replies
                    .waiters
                    .entry((request.client, request.timestamp))
                    .or_default()
                    .push(Waiter {
                        tx: reply,
                        since: Instant::now(),
                    });
                drop(replies);
                pending.submitted.push(request);
            }
        }
    }

    /// Gives what `pending` collected to the core, one input per kind, so the signatures
    /// of the requests, or of the messages, are checked in one batch equation.
    fn hand_over(&mut self, pending: &mut Pending) {
        if !pending.submitted.is_empty() {
            self.replica
                .handle(Input::Requests(std::mem::take(&mut pending.submitted)));
        }
        match pending.received.len() {
            0 => {}
            1 => {
                if let Some((from, msg)) = pending.received.pop() {
                    self.replica.handle(Input::Receive { from, msg });
                }
            }
            _ => self
                .replica
                .handle(Input::ReceiveMany(std::mem::take(&mut pending.received))),
        }
    }

    /// Counts the output's events, then hands it to the persistence thread. Blocks while
    /// that thread is [`PENDING_OUTPUTS`] behind; fails if it has stopped (a storage error,
    /// which `run` then reports).
    fn hand_off(&mut self, out: Output, out_tx: &SyncSender<Output>) -> Result<(), NodeError> {
        for e in &out.events {
            self.observe(e);
        }
        out_tx.send(out).map_err(|_| NodeError::PersisterGone)
    }

    fn observe(&mut self, e: &Event) {
        let m = &self.metrics;
        match *e {
            Event::Executed {
                height,
                requests,
                synced,
                view,
            } => {
                m.committed_height.set(height as i64);
                m.batch_size.observe(requests as f64);
                self.executed_requests += requests as u64;
                if synced {
                    m.synced_blocks.inc();
                }
                debug!(height, requests, synced, view, "executed");
            }
            Event::ViewChangeStarted { view } => {
                m.view_changes.inc();
                info!(view, "view change started");
            }
            Event::ViewEntered { view } => {
                m.view.set(view as i64);
                info!(view, "entered view");
            }
            Event::CheckpointStable { seq } => {
                m.stable_checkpoint.set(seq as i64);
                debug!(seq, "checkpoint stable");
            }
            Event::SyncStarted { from, target } => {
                m.sync_target.set(target as i64);
                info!(from, target, "state sync started");
            }
            Event::Rejected { reason } => {
                m.rejected.with_label_values(&[reason.as_str()]).inc();
                debug!(%reason, "input rejected");
            }
            Event::VouchTimeout { seq, valid } => {
                let verdict = if valid { "valid" } else { "forged" };
                m.vouch_timeouts.with_label_values(&[verdict]).inc();
                debug!(seq, verdict, "vouchers late: checked the batch here");
            }
            Event::StateDigestScheme {
                height,
                configured,
                certified,
            } => {
                error!(
                    height,
                    configured = configured.name(),
                    certified = certified.name(),
                    "cannot sync: the cluster certifies its state with the {} digest and this \
                     replica is configured with {}; set protocol.state_digest: {} (docs/CONFIG.md)",
                    certified.name(),
                    configured.name(),
                    certified.name()
                );
            }
        }
    }

    fn refresh_status(&mut self) {
        let s = self.replica.status();
        // Hashing the whole state is linear in its size: only when someone reads /status,
        // the height moved, and at most once a second; for a large state less often, so
        // that it takes at most 1 % of this thread (a status view polling every replica
        // cost a loaded backup 4 % of its CPU with 13 MB of state).
        let stale = s.last_executed != self.last_digest_height;
        let interval = Duration::from_secs(1).max(self.digest_cost * DIGEST_DUTY_INVERSE);
        if stale && self.last_digest_at.elapsed() >= interval && self.status.take_digest_request() {
            let started = Instant::now();
            let scheme = self.replica.config().state_digest;
            self.state_digest = self.replica.state().digest(scheme).to_hex();
            self.digest_cost = started.elapsed();
            self.last_digest_height = s.last_executed;
            self.last_digest_at = Instant::now();
        }
        if s.sync_target.is_none() {
            self.metrics.sync_target.set(0);
        }
        self.metrics.view.set(s.view as i64);
        let cfg = self.replica.config();
        self.status.set(StatusView {
            id: s.id.0,
            n: cfg.n,
            f: cfg.f(),
            view: s.view,
            primary: s.primary.0,
            view_change_in_progress: s.view_change_in_progress,
            height: s.last_executed,
            head_hash: s.head_hash.to_hex(),
            state_digest: self.state_digest.clone(),
            state_digest_height: self.last_digest_height.min(s.last_executed),
            stable_checkpoint: s.stable_checkpoint,
            sync_target: s.sync_target,
            pending_requests: s.pending_requests,
            executed_requests: self.executed_requests,
            transport: self.transport.clone(),
            peers: Vec::new(),
        });
    }

    /// Forgets waiters whose Submit call has long given up, and routes whose stream ended.
    fn purge_waiters(&mut self) {
        let limit = self.submit_timeout * 2;
        let mut replies = self.replies.lock();
        replies.routes.retain(|_, r| !r.is_closed());
        replies.waiters.retain(|_, ws| {
            ws.retain(|w| {
                w.since.elapsed() < limit && !w.tx.as_ref().is_some_and(|tx| tx.is_closed())
            });
            !ws.is_empty()
        });
    }
}
