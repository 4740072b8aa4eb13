//! Fixtures shared by the handler-level tests: fixed keys, a small configuration, builders
//! that sign protocol messages as any replica, and an in-memory four-replica cluster that
//! routes outputs, used to reach states (prepared, executed, checkpoint stable, view changed)
//! without hand-building every message.
//!
//! Everything is deterministic: keys come from fixed secrets, ed25519 signing is
//! deterministic, and the cluster delivers messages in FIFO order.

// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::Arc;

use pbft_core::message::Signable;
use pbft_core::{
    Batch, Checkpoint, ClientId, Commit, Config, Digest, Ed25519Signer, Envelope, Event, Input,
    KeyRing, MemStore, Message, Operation, Output, PrePrepare, Prepare, PreparedProof, Recovered,
    RejectReason, Replica, ReplicaId, Reply, Request, Seq, Signed, Source, StateProvider, Storage,
    SyncResponse, Target, View, ViewChange, primary,
};

/// Cluster size used everywhere: f = 1, quorum 3.
pub const N: usize = 4;

/// Clients registered in the key ring.
pub const CLIENTS: std::ops::RangeInclusive<u64> = 1..=8;

/// A client id that is not in the key ring.
pub const UNKNOWN_CLIENT: ClientId = ClientId(99);

/// Small numbers so that checkpoints, window limits and timeouts are reached in a few steps.
/// Retransmission is far away so that it never adds messages to a test that is not about it.
// The struct update fills `mutation`, which exists only with the `mutations` feature.
#[allow(clippy::needless_update)]
pub fn config() -> Config {
    Config {
        n: N,
        checkpoint_interval: 4,
        log_window: 8,
        max_batch: 4,
        batch_delay: 1,
        max_in_flight: 4,
        view_change_timeout: 20,
        max_view_change_timeout: 80,
        vouch_timeout: 5,
        retransmit_interval: 1_000,
        status_interval: 100_000,
        sync_chunk: 4,
        sync_timeout: 10,
        max_request_bytes: 64,
        max_pending_requests: 16,
        ..Config::default()
    }
}

pub fn r(i: u32) -> ReplicaId {
    ReplicaId(i)
}

/// The transport source of a message from replica `i`.
pub fn from(i: u32) -> Source {
    Source::Replica(ReplicaId(i))
}

pub fn replica_key(i: u32) -> Ed25519Signer {
    Ed25519Signer::from_secret([i as u8; 32])
}

pub fn client_key(c: u64) -> Ed25519Signer {
    Ed25519Signer::from_secret([0x40 + c as u8; 32])
}

/// Replica keys `0..N` and the keys of [`CLIENTS`].
pub fn keyring() -> Arc<KeyRing> {
    let replicas: Vec<_> = (0..N as u32).map(|i| replica_key(i).public()).collect();
    let mut ring = KeyRing::new(&replicas).expect("valid replica keys");
    for c in CLIENTS {
        ring.add_client(ClientId(c), client_key(c).public())
            .expect("valid client key");
    }
    Arc::new(ring)
}

/// A fresh replica at genesis with [`config`].
pub fn replica(id: u32) -> Replica {
    replica_with(config(), id)
}

pub fn replica_with(cfg: Config, id: u32) -> Replica {
    Replica::new(cfg, r(id), Box::new(replica_key(id)), keyring()).expect("valid replica")
}

/// A replica restarted from `state` with [`config`].
pub fn recovered(id: u32, state: Recovered) -> Replica {
    try_recover(id, state).expect("recoverable state")
}

pub fn try_recover(id: u32, state: Recovered) -> pbft_core::Result<Replica> {
    Replica::recover(config(), r(id), Box::new(replica_key(id)), keyring(), state)
}

/// A replica that is in `view`, in normal operation (`changing == false`) or changing to it.
pub fn replica_in_view(id: u32, view: View, changing: bool) -> Replica {
    recovered(
        id,
        Recovered {
            view,
            changing,
            ..Recovered::default()
        },
    )
}

/// Signs `body` with replica `by`'s key (whoever the body names as author).
pub fn sign<T: Signable>(by: u32, body: T) -> Signed<T> {
    Signed::sign(body, &replica_key(by))
}

// ----- requests -----

pub fn put(key: &str, value: &str) -> Operation {
    Operation::Put {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
    }
}

pub fn get(key: &str) -> Operation {
    Operation::Get {
        key: key.as_bytes().to_vec(),
    }
}

/// A request signed by the registered client `c`.
pub fn request(c: u64, ts: u64, op: Operation) -> Request {
    Request::new_signed(ClientId(c), ts, op, &client_key(c))
}

/// `put k{c}-{ts} = v{ts}` from client `c`: distinct keys, so batches never collide.
pub fn put_req(c: u64, ts: u64) -> Request {
    request(c, ts, put(&format!("k{c}-{ts}"), &format!("v{ts}")))
}

pub fn batch(requests: &[Request]) -> Batch {
    Batch::new(requests.to_vec())
}

// ----- protocol messages, signed as their author -----

/// A pre-prepare signed by the primary of `view`.
pub fn pre_prepare(view: View, seq: Seq, batch: Batch) -> Signed<PrePrepare> {
    let leader = primary(view, N).0;
    sign(
        leader,
        PrePrepare {
            view,
            seq,
            digest: batch.digest(),
            batch,
        },
    )
}

/// A prepare that vouches for the batch's client signatures.
pub fn prepare(view: View, seq: Seq, digest: Digest, by: u32) -> Signed<Prepare> {
    prepare_vouching(view, seq, digest, by, true)
}

/// A prepare that does not vouch for the batch's client signatures.
pub fn unvouched_prepare(view: View, seq: Seq, digest: Digest, by: u32) -> Signed<Prepare> {
    prepare_vouching(view, seq, digest, by, false)
}

fn prepare_vouching(
    view: View,
    seq: Seq,
    digest: Digest,
    by: u32,
    vouches: bool,
) -> Signed<Prepare> {
    let replica = r(by);
    let body = Prepare {
        view,
        seq,
        digest,
        replica,
        vouches,
    };
    sign(by, body)
}

pub fn commit(view: View, seq: Seq, digest: Digest, by: u32) -> Signed<Commit> {
    sign(
        by,
        Commit {
            view,
            seq,
            digest,
            replica: r(by),
        },
    )
}

pub fn checkpoint(seq: Seq, state_digest: Digest, by: u32) -> Signed<Checkpoint> {
    sign(
        by,
        Checkpoint {
            seq,
            state_digest,
            replica: r(by),
        },
    )
}

/// A valid prepared certificate for `batch` at (`view`, `seq`): the primary's pre-prepare and
/// prepares from the first two backups.
pub fn prepared_proof(view: View, seq: Seq, batch: Batch) -> PreparedProof {
    let pp = pre_prepare(view, seq, batch);
    let leader = primary(view, N).0;
    let prepares = (0..N as u32)
        .filter(|i| *i != leader)
        .take(2)
        .map(|i| prepare(view, seq, pp.body.digest, i))
        .collect();
    PreparedProof {
        pre_prepare: pp,
        prepares,
    }
}

/// A view change from genesis (no stable checkpoint) carrying `prepared`.
pub fn view_change(by: u32, new_view: View, prepared: Vec<PreparedProof>) -> Signed<ViewChange> {
    sign(
        by,
        ViewChange {
            new_view,
            replica: r(by),
            stable_seq: 0,
            checkpoint_proof: Vec::new(),
            prepared,
        },
    )
}

// ----- driving one replica -----

/// Delivers `msg` from replica `by` and returns what the replica decided.
pub fn deliver(rep: &mut Replica, by: u32, msg: Message) -> Output {
    rep.handle(Input::Receive {
        from: from(by),
        msg,
    });
    rep.take_output()
}

/// A client submits `req` directly to the replica.
pub fn submit(rep: &mut Replica, req: Request) -> Output {
    rep.handle(Input::Request(req));
    rep.take_output()
}

/// Advances the replica's clock by `k` ticks and returns everything decided meanwhile.
pub fn tick(rep: &mut Replica, k: u64) -> Output {
    for _ in 0..k {
        rep.handle(Input::Tick);
    }
    rep.take_output()
}

pub fn to_all(msg: Message) -> Envelope {
    Envelope {
        to: Target::All,
        msg,
    }
}

pub fn to(i: u32, msg: Message) -> Envelope {
    Envelope {
        to: Target::Replica(r(i)),
        msg,
    }
}

/// The whole output of a refused input: one `Rejected` event and nothing else.
pub fn rejected(reason: RejectReason) -> Output {
    Output {
        events: vec![Event::Rejected { reason }],
        ..Output::default()
    }
}

/// Asserts that `out` is exactly one refusal for `reason`, and that the replica's counters
/// hold `count` of that reason and `total` refusals in all.
pub fn assert_rejected(rep: &Replica, out: &Output, reason: RejectReason, count: u64, total: u64) {
    assert_eq!(*out, rejected(reason), "output of a refused input");
    assert_eq!(rep.rejected().get(reason), count, "count of {reason}");
    assert_eq!(rep.rejected().total(), total, "total refusals");
}

// ----- a whole cluster in memory -----

type DropRule = Box<dyn Fn(ReplicaId, ReplicaId, &Message) -> bool>;

/// Four replicas, their durable stores, and a FIFO network between them. The cluster also
/// plays the adapters' part for state sync: a `SyncRequest` is answered from the target's
/// store, as the replica service's `StateProvider` would.
pub struct Cluster {
    pub replicas: Vec<Replica>,
    pub stores: Vec<MemStore>,
    /// Replies to clients, in the order they were produced.
    pub replies: Vec<Reply>,
    /// Every event, with the replica that emitted it.
    pub events: Vec<(ReplicaId, Event)>,
    /// Messages the drop rule discarded, as (from, to, message), to replay by hand.
    pub dropped: Vec<(ReplicaId, ReplicaId, Message)>,
    network: VecDeque<(ReplicaId, ReplicaId, Message)>,
    drop_rule: DropRule,
}

impl Default for Cluster {
    fn default() -> Self {
        Self::new()
    }
}

impl Cluster {
    pub fn new() -> Self {
        Self::with_config(config())
    }

    pub fn with_config(cfg: Config) -> Self {
        Cluster {
            replicas: (0..N as u32)
                .map(|i| replica_with(cfg.clone(), i))
                .collect(),
            stores: (0..N).map(|_| MemStore::new()).collect(),
            replies: Vec::new(),
            events: Vec::new(),
            dropped: Vec::new(),
            network: VecDeque::new(),
            drop_rule: Box::new(|_, _, _| false),
        }
    }

    /// Discards (and records in `dropped`) every message for which `rule(from, to, msg)` holds.
    pub fn set_drop(&mut self, rule: impl Fn(ReplicaId, ReplicaId, &Message) -> bool + 'static) {
        self.drop_rule = Box::new(rule);
    }

    /// Cuts replica `i` off: nothing it sends or is sent arrives.
    pub fn isolate(&mut self, i: u32) {
        self.set_drop(move |a, b, _| a == r(i) || b == r(i));
    }

    /// Restores every link.
    pub fn heal(&mut self) {
        self.set_drop(|_, _, _| false);
    }

    /// A client hands `req` to replica `i`; the cluster runs until quiet.
    pub fn submit(&mut self, i: u32, req: Request) {
        self.replicas[i as usize].handle(Input::Request(req));
        self.collect(i);
        self.run();
    }

    /// Every replica ticks `k` times; messages are delivered after each round of ticks.
    pub fn tick(&mut self, k: u64) {
        for _ in 0..k {
            for i in 0..N as u32 {
                self.replicas[i as usize].handle(Input::Tick);
                self.collect(i);
            }
            self.run();
        }
    }

    /// Delivers messages until none is in flight.
    pub fn run(&mut self) {
        let mut steps = 0;
        while let Some((a, b, msg)) = self.network.pop_front() {
            steps += 1;
            assert!(steps < 100_000, "the cluster does not quiesce");
            if let Message::SyncRequest(req) = &msg {
                let store = &self.stores[b.0 as usize];
                let resp = SyncResponse {
                    blocks: store
                        .blocks_from(req.from_height, req.max_blocks as usize)
                        .expect("memory store"),
                    checkpoint: store.checkpoints().expect("memory store").pop(),
                };
                self.send(b, a, Message::SyncResponse(resp));
                continue;
            }
            self.replicas[b.0 as usize].handle(Input::Receive {
                from: Source::Replica(a),
                msg,
            });
            self.collect(b.0);
        }
    }

    fn send(&mut self, a: ReplicaId, b: ReplicaId, msg: Message) {
        if (self.drop_rule)(a, b, &msg) {
            self.dropped.push((a, b, msg));
        } else {
            self.network.push_back((a, b, msg));
        }
    }

    /// Carries out replica `i`'s output as an adapter would: persist, then send and reply.
    fn collect(&mut self, i: u32) {
        let out = self.replicas[i as usize].take_output();
        self.stores[i as usize]
            .persist(&out.persist)
            .expect("memory store");
        for env in out.messages {
            match env.to {
                Target::All => {
                    for j in (0..N as u32).filter(|j| *j != i) {
                        self.send(r(i), r(j), env.msg.clone());
                    }
                }
                Target::Replica(j) => self.send(r(i), j, env.msg),
            }
        }
        self.replies.extend(out.replies);
        self.events
            .extend(out.events.into_iter().map(|e| (r(i), e)));
    }

    /// Submits `put_req(c, ts)` to the current primary of replica 1's view and runs. If
    /// no replica executed it (its designated voucher is cut off), the replicas tick
    /// through one vouch timeout, after which they check the batch themselves.
    pub fn execute(&mut self, c: u64, ts: u64) {
        let p = self.replicas[1].status().primary.0;
        let height = |c: &Self| c.replicas.iter().map(|r| r.status().last_executed).max();
        let before = height(self);
        self.submit(p, put_req(c, ts));
        if height(self) == before {
            let timeout = self.replicas[0].config().vouch_timeout;
            self.tick(timeout);
        }
    }

    pub fn replica(&self, i: u32) -> &Replica {
        &self.replicas[i as usize]
    }

    pub fn replica_mut(&mut self, i: u32) -> &mut Replica {
        &mut self.replicas[i as usize]
    }

    pub fn store(&self, i: u32) -> &MemStore {
        &self.stores[i as usize]
    }

    /// Takes the messages the drop rule discarded on their way to replica `to`.
    pub fn take_dropped_to(&mut self, to: u32) -> Vec<(ReplicaId, Message)> {
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.dropped)
            .into_iter()
            .partition(|(_, b, _)| *b == r(to));
        self.dropped = rest;
        mine.into_iter().map(|(a, _, m)| (a, m)).collect()
    }
}
