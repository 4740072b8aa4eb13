//! The persistence thread: carries out the core's outputs, in order, in the order that keeps
//! a crash harmless: persist (fsync), then send, then reply.
//!
//! Why a thread of its own: an fsync takes a millisecond or more, and while the node loop
//! waited for it, it could not check the next pre-prepare's signatures or count votes. Now
//! the node loop hands each output over and goes on; this thread takes every output that
//! is waiting, makes all their writes durable as one journal entry (group commit: one
//! fdatasync for many outputs), and only then sends their messages and replies. No message
//! of an output leaves before the writes of that output and of every output before it are
//! durable, which is exactly the ordering the core's [`Output`] asks for.
//!
//! Outputs that only execute blocks and answer clients
//! ([`Output::replies_may_precede_persist`]) are answered at once, and their blocks wait for
//! the next output that needs a sync, or [`LAZY_BLOCKS_WAIT`] if none comes: under load the
//! executed block shares the next pre-prepare's or certificate's fdatasync instead of paying
//! its own, and no client waits for it. The blocks are written before that output's writes,
//! in one entry, so the journal never holds a later write without the earlier ones.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pbft_core::{ClientId, Event, Output, PersistOp, Reply, Storage, StorageError, Target};
use tokio::sync::mpsc::error::TrySendError as RouteSendError;
use tokio::sync::oneshot;
use tracing::{Span, debug, error, info_span};

use crate::metrics::Metrics;
use crate::node::ReplyRoute;
use crate::transport::Outbound;

/// Outputs waiting for the persistence thread. When it falls this far behind, the node loop
/// waits for it (back-pressure) instead of piling up unsent protocol state.
pub const PENDING_OUTPUTS: usize = 1024;

/// Most outputs folded into one transaction, so one group commit stays bounded in size.
const MAX_GROUP: usize = 256;

/// How long executed blocks whose replies already went out may wait for a write to share
/// before they are made durable on their own. Under load the next output comes within a
/// fraction of this; an idle replica syncs its last blocks this late.
pub const LAZY_BLOCKS_WAIT: Duration = Duration::from_millis(2);

/// A request waiting for this replica's reply: on its `Submit` call (`tx`), or, for one that
/// came in a `SubmitBatches` stream (`tx` empty), on its client's route. Kept for both so
/// that the commit latency is measured for every request.
pub struct Waiter {
    pub tx: Option<oneshot::Sender<Reply>>,
    pub since: Instant,
}

/// Where this replica's replies go: calls waiting for them, and clients' streams. The node
/// loop registers them when a request arrives, before the core can have answered it; the
/// persistence thread takes them when the answer is durable.
#[derive(Default)]
pub struct ClientReplies {
    pub waiters: HashMap<(ClientId, u64), Vec<Waiter>>,
    pub routes: HashMap<ClientId, ReplyRoute>,
}

/// [`ClientReplies`] shared between the node loop and the persistence thread.
#[derive(Clone, Default)]
pub struct SharedReplies(Arc<Mutex<ClientReplies>>);

impl SharedReplies {
    /// The lock; a panic elsewhere while holding it leaves plain maps behind, still usable.
    pub fn lock(&self) -> MutexGuard<'_, ClientReplies> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Executed blocks whose replies went out, waiting to share the next sync.
#[derive(Default)]
struct Lazy {
    ops: Vec<PersistOp>,
    /// When the first of them came: they wait [`LAZY_BLOCKS_WAIT`] from then, however
    /// many more come meanwhile (a replica applying synced blocks produces nothing else).
    since: Option<Instant>,
}

impl Lazy {
    fn add(&mut self, ops: Vec<PersistOp>, now: Instant) {
        if ops.is_empty() {
            return;
        }
        self.since.get_or_insert(now);
        self.ops.extend(ops);
    }

    /// Whether they must be synced now rather than wait for company.
    fn due(&self, now: Instant) -> bool {
        !self.ops.is_empty() && (self.ops.len() >= MAX_GROUP || self.wait(now).is_zero())
    }

    /// How much longer they may wait.
    fn wait(&self, now: Instant) -> Duration {
        self.since.map_or(LAZY_BLOCKS_WAIT, |since| {
            LAZY_BLOCKS_WAIT.saturating_sub(now.saturating_duration_since(since))
        })
    }

    fn take(&mut self) -> Vec<PersistOp> {
        self.since = None;
        std::mem::take(&mut self.ops)
    }
}

/// The persistence thread's state.
pub struct Persister {
    pub store: Box<dyn Storage + Send>,
    pub outbound: Arc<dyn Outbound>,
    pub replies: SharedReplies,
    pub metrics: Metrics,
}

impl Persister {
    /// Runs until the node loop drops its end of `rx` and everything handed over is done.
    /// A storage error stops it at once, before anything of the failed group is sent.
    pub fn run(mut self, rx: Receiver<Output>) -> Result<(), StorageError> {
        let mut group = Vec::with_capacity(MAX_GROUP);
        let mut lazy = Lazy::default();
        loop {
            let first = if lazy.ops.is_empty() {
                match rx.recv() {
                    Ok(out) => out,
                    Err(_) => break,
                }
            } else {
                match rx.recv_timeout(lazy.wait(Instant::now())) {
                    Ok(out) => out,
                    Err(RecvTimeoutError::Timeout) => {
                        self.persist(&lazy.take())?;
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            };
            group.push(first);
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(out) => group.push(out),
                    Err(_) => break,
                }
            }
            self.carry_out(&mut group, &mut lazy)?;
        }
        self.persist(&lazy.take())
    }

    /// Answers the leading outputs that may answer before their blocks are durable, keeping
    /// their blocks in `lazy`; then, unless that is all there is and `lazy` may wait on,
    /// persists `lazy` and the writes of every other output in `group` in one transaction,
    /// and sends each output's messages and replies in order.
    fn carry_out(&mut self, group: &mut Vec<Output>, lazy: &mut Lazy) -> Result<(), StorageError> {
        let _execute = execute_span(group).entered();
        let early = group
            .iter()
            .take_while(|out| out.replies_may_precede_persist())
            .count();
        let now = Instant::now();
        for out in group.drain(..early) {
            lazy.add(out.persist, now);
            if !out.replies.is_empty() {
                self.deliver(out.replies);
            }
        }
        if group.is_empty() && !lazy.due(now) {
            return Ok(());
        }
        let mut ops = lazy.take();
        ops.extend(
            group
                .iter_mut()
                .flat_map(|out| std::mem::take(&mut out.persist)),
        );
        self.persist(&ops)?;
        for out in group.drain(..) {
            for env in out.messages {
                match env.to {
                    Target::All => {
                        for (peer, err) in self.outbound.broadcast(&env.msg) {
                            debug!(peer = peer.0, error = %err, kind = env.msg.kind(), "broadcast to peer failed");
                        }
                    }
                    Target::Replica(to) => self.outbound.send(to, &env.msg),
                }
            }
            if !out.replies.is_empty() {
                self.deliver(out.replies);
            }
        }
        Ok(())
    }

    /// Makes `ops` durable in one transaction (nothing to do for none).
    fn persist(&mut self, ops: &[PersistOp]) -> Result<(), StorageError> {
        if ops.is_empty() {
            return Ok(());
        }
        let _persist = info_span!("persist", ops = ops.len()).entered();
        let t = Instant::now();
        if let Err(e) = self.store.persist(ops) {
            error!(error = %e, "persist failed");
            return Err(e);
        }
        self.metrics
            .storage_latency
            .observe(t.elapsed().as_secs_f64());
        Ok(())
    }

    /// Answers the calls waiting for these replies, or pushes each down its client's stream.
    /// A reply to a request received here counts as `replied` whichever way it goes; one
    /// to a request learnt from a pre-prepare, as `pushed`.
    fn deliver(&self, replies: Vec<Reply>) {
        let mut shared = self.replies.lock();
        for reply in replies {
            let (mut received, mut routed) = (false, true);
            if let Some(waiters) = shared.waiters.remove(&(reply.client, reply.timestamp)) {
                (received, routed) = (true, false);
                for w in waiters {
                    self.metrics
                        .commit_latency
                        .observe(w.since.elapsed().as_secs_f64());
                    match w.tx {
                        Some(tx) => {
                            let _ = tx.send(reply.clone());
                        }
                        // It came on a `SubmitBatches` stream: answered down the route.
                        None => routed = true,
                    }
                }
            }
            let outcome = if received { "replied" } else { "pushed" };
            if !routed {
                self.metrics.requests.with_label_values(&[outcome]).inc();
                continue;
            }
            let Some(route) = shared.routes.get(&reply.client) else {
                continue;
            };
            // Never block on a slow client: a full stream loses this reply, and the
            // client's retry to every replica gets it answered.
            match route.try_send(reply) {
                Ok(()) => self.metrics.requests.with_label_values(&[outcome]).inc(),
                Err(RouteSendError::Full(_)) => self
                    .metrics
                    .dropped_messages
                    .with_label_values(&["client", "queue_full"])
                    .inc(),
                Err(RouteSendError::Closed(reply)) => {
                    shared.routes.remove(&reply.client);
                }
            }
        }
    }
}

/// The span over carrying out outputs that executed blocks: making them durable and
/// answering their clients. `height` and `view` are the last block's.
fn execute_span(group: &[Output]) -> Span {
    let mut blocks = 0usize;
    let (mut height, mut requests, mut view) = (0u64, 0usize, 0u64);
    for e in group.iter().flat_map(|o| &o.events) {
        if let Event::Executed {
            height: h,
            requests: r,
            view: v,
            ..
        } = e
        {
            blocks += 1;
            height = *h;
            requests += *r;
            view = *v;
        }
    }
    if blocks == 0 {
        return Span::none();
    }
    info_span!("execute", height, requests, view, blocks)
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::sync_channel;

    use pbft_core::{
        Batch, Block, Digest, Envelope, Message, OpResult, Recovered, ReplicaId, SyncRequest, View,
    };

    use super::*;
    use crate::transport::SendError;

    /// What happened, in order, across the store, the transport and the clients.
    #[derive(Debug, PartialEq, Eq)]
    enum Step {
        /// Views persisted, and blocks as 1000 + height.
        Persist(Vec<View>),
        Send(u64),
        /// A reply with this timestamp had reached its client's stream.
        Replied(u64),
    }

    type Log = Arc<Mutex<Vec<Step>>>;

    struct RecordingStore {
        log: Log,
        fail: bool,
        /// A client's stream, read at each persist to log which replies came before it.
        stream: Option<tokio::sync::mpsc::Receiver<Reply>>,
    }

    impl RecordingStore {
        fn note_replies(&mut self) {
            if let Some(stream) = self.stream.as_mut() {
                while let Ok(r) = stream.try_recv() {
                    self.log.lock().unwrap().push(Step::Replied(r.timestamp));
                }
            }
        }
    }

    impl Storage for RecordingStore {
        fn persist(&mut self, ops: &[PersistOp]) -> Result<(), StorageError> {
            if self.fail {
                return Err(StorageError::Io("disk gone".into()));
            }
            self.note_replies();
            let views = ops
                .iter()
                .map(|op| match op {
                    PersistOp::View { view, .. } => *view,
                    PersistOp::Block(b) => 1000 + b.height,
                    other => panic!("unexpected op {other:?}"),
                })
                .collect();
            self.log.lock().unwrap().push(Step::Persist(views));
            Ok(())
        }

        fn recover(&self) -> Result<Recovered, StorageError> {
            Ok(Recovered::default())
        }
    }

    struct RecordingOutbound(Log);

    impl Outbound for RecordingOutbound {
        fn send(&self, _to: ReplicaId, msg: &Message) {
            if let Message::SyncRequest(r) = msg {
                self.0.lock().unwrap().push(Step::Send(r.from_height));
            }
        }
        fn broadcast(&self, msg: &Message) -> Vec<(ReplicaId, SendError)> {
            self.send(ReplicaId(0), msg);
            Vec::new()
        }
    }

    /// An output that persists view `v` and sends a message tagged `v`.
    fn output(v: u64, to_all: bool) -> Output {
        Output {
            persist: vec![PersistOp::View {
                view: v,
                changing: false,
            }],
            messages: vec![Envelope {
                to: if to_all {
                    Target::All
                } else {
                    Target::Replica(ReplicaId(1))
                },
                msg: Message::SyncRequest(SyncRequest {
                    from_height: v,
                    max_blocks: 1,
                }),
            }],
            ..Output::default()
        }
    }

    /// An output that executes the block at `height` and answers client 5's request
    /// `height`: nothing to send, so its reply may precede the block's sync.
    fn executed(height: u64) -> Output {
        Output {
            persist: vec![PersistOp::Block(Block {
                height,
                prev_hash: Digest::ZERO,
                batch: Batch::default(),
                results_digest: Digest::ZERO,
                state_digest: Digest::ZERO,
                view: 0,
                certificate: Vec::new(),
            })],
            replies: vec![Reply {
                view: 0,
                timestamp: height,
                client: ClientId(5),
                replica: ReplicaId(0),
                result: OpResult::Written,
            }],
            ..Output::default()
        }
    }

    /// A persister whose store logs the replies client 5's stream got before each persist.
    fn persister_with_stream(log: &Log) -> Persister {
        let (route, stream) = tokio::sync::mpsc::channel(16);
        let mut p = persister(log, false);
        p.store = Box::new(RecordingStore {
            log: log.clone(),
            fail: false,
            stream: Some(stream),
        });
        p.replies.lock().routes.insert(ClientId(5), route);
        p
    }

    fn persister(log: &Log, fail: bool) -> Persister {
        Persister {
            store: Box::new(RecordingStore {
                log: log.clone(),
                fail,
                stream: None,
            }),
            outbound: Arc::new(RecordingOutbound(log.clone())),
            replies: SharedReplies::default(),
            metrics: Metrics::new(),
        }
    }

    #[test]
    fn waiting_outputs_share_one_commit_and_nothing_is_sent_before_it() {
        let log = Log::default();
        let (tx, rx) = sync_channel(16);
        for v in 1..=3 {
            tx.send(output(v, v % 2 == 0)).unwrap();
        }
        drop(tx);
        persister(&log, false).run(rx).unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            vec![
                Step::Persist(vec![1, 2, 3]),
                Step::Send(1),
                Step::Send(2),
                Step::Send(3)
            ]
        );
    }

    #[test]
    fn executed_blocks_are_answered_first_and_synced_with_the_next_write() {
        let log = Log::default();
        let (tx, rx) = sync_channel(16);
        tx.send(executed(1)).unwrap();
        tx.send(executed(2)).unwrap();
        tx.send(output(7, true)).unwrap();
        // Behind an output that needs a sync, an executed block waits for that sync.
        tx.send(executed(3)).unwrap();
        drop(tx);
        persister_with_stream(&log).run(rx).unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            vec![
                Step::Replied(1),
                Step::Replied(2),
                Step::Persist(vec![1001, 1002, 7, 1003]),
                Step::Send(7),
            ]
        );
    }

    #[test]
    fn an_executed_block_with_nothing_after_it_is_synced_on_its_own() {
        let log = Log::default();
        let (tx, rx) = sync_channel(16);
        let p = persister_with_stream(&log);
        let thread = std::thread::spawn(move || p.run(rx));
        tx.send(executed(1)).unwrap();
        // The node loop stays connected and quiet: the block must not wait for it.
        // The reply is logged at once and the sync 2 ms later: wait for the sync.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !log
            .lock()
            .unwrap()
            .iter()
            .any(|s| matches!(s, Step::Persist(_)))
        {
            assert!(Instant::now() < deadline, "block 1 never synced");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            *log.lock().unwrap(),
            vec![Step::Replied(1), Step::Persist(vec![1001])]
        );
        // And one still waiting when the node loop stops is synced before the thread ends.
        tx.send(executed(2)).unwrap();
        drop(tx);
        thread.join().unwrap().unwrap();
        assert_eq!(log.lock().unwrap().last(), Some(&Step::Persist(vec![1002])));
    }

    #[test]
    fn waiting_blocks_are_due_from_the_first_however_many_follow() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let block = || executed(1).persist;
        let mut lazy = Lazy::default();
        assert!(!lazy.due(ms(100)), "nothing waits");
        lazy.add(Vec::new(), t0);
        assert_eq!(
            lazy.since, None,
            "an answer from the reply cache starts no wait"
        );
        lazy.add(block(), ms(1));
        assert!(!lazy.due(ms(2)));
        // A trickle of blocks does not put the sync off.
        lazy.add(block(), ms(2));
        assert_eq!(lazy.wait(ms(2)), Duration::from_millis(1));
        assert!(lazy.due(ms(3)));
        assert_eq!(lazy.take().len(), 2);
        assert!(!lazy.due(ms(100)));
        // Nor does a pile of them wait at all.
        for _ in 0..MAX_GROUP {
            lazy.add(block(), ms(200));
        }
        assert!(lazy.due(ms(200)));
    }

    #[test]
    fn a_storage_error_stops_it_before_anything_of_that_group_is_sent() {
        let log = Log::default();
        let (tx, rx) = sync_channel(16);
        tx.send(output(1, true)).unwrap();
        drop(tx);
        let err = persister(&log, true).run(rx).unwrap_err();
        assert!(err.to_string().contains("disk gone"), "{err}");
        assert!(log.lock().unwrap().is_empty());
    }

    #[test]
    fn replies_go_to_waiting_calls_then_to_client_streams() {
        let log = Log::default();
        let p = persister(&log, false);
        let (call_tx, mut call_rx) = oneshot::channel();
        let (route_tx, mut route_rx) = tokio::sync::mpsc::channel(4);
        let (batch_route_tx, mut batch_route_rx) = tokio::sync::mpsc::channel(4);
        {
            let mut shared = p.replies.lock();
            shared.waiters.insert(
                (ClientId(7), 1),
                vec![Waiter {
                    tx: Some(call_tx),
                    since: Instant::now(),
                }],
            );
            shared.routes.insert(ClientId(8), route_tx);
            // A request that came on a `SubmitBatches` stream: no call waits for it.
            shared.waiters.insert(
                (ClientId(10), 2),
                vec![Waiter {
                    tx: None,
                    since: Instant::now(),
                }],
            );
            shared.routes.insert(ClientId(10), batch_route_tx);
        }
        let metrics = p.metrics.clone();
        let reply = |client, timestamp| Reply {
            view: 0,
            timestamp,
            client: ClientId(client),
            replica: ReplicaId(0),
            result: OpResult::Written,
        };
        let (tx, rx) = sync_channel(4);
        tx.send(Output {
            replies: vec![reply(7, 1), reply(8, 5), reply(9, 1), reply(10, 2)],
            ..Output::default()
        })
        .unwrap();
        drop(tx);
        let shared = p.replies.clone();
        p.run(rx).unwrap();
        assert_eq!(call_rx.try_recv().unwrap(), reply(7, 1));
        assert_eq!(route_rx.try_recv().unwrap(), reply(8, 5));
        assert!(
            route_rx.try_recv().is_err(),
            "client 8 got only its own reply"
        );
        assert_eq!(batch_route_rx.try_recv().unwrap(), reply(10, 2));
        assert!(shared.lock().waiters.is_empty());
        let count = |outcome: &str| metrics.requests.with_label_values(&[outcome]).get();
        assert_eq!((count("replied"), count("pushed")), (2, 1));
        assert!(
            log.lock().unwrap().is_empty(),
            "no persist for an output without ops"
        );
    }
}
