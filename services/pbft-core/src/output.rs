//! The core's inputs and outputs: everything crossing the boundary between the protocol and
//! the adapters that do I/O.

use crate::kv::StateDigest;
use crate::message::Message;
use crate::reject::RejectReason;
use crate::request::{Reply, Request};
use crate::storage::PersistOp;
use crate::types::{ReplicaId, Seq, View};

/// Who sent an input, as the transport claims it. Protocol messages carry their own
/// signatures, so this is only used to route answers (sync responses, replies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Replica(ReplicaId),
    Client,
}

/// Something that happened to the replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// A message arrived.
    Receive { from: Source, msg: Message },
    /// Several messages that arrived together, in order; their authors' signatures are
    /// checked in one batch. Same effect as one `Receive` input for each.
    ReceiveMany(Vec<(Source, Message)>),
    /// A client submitted a request directly to this replica.
    Request(Request),
    /// Several client requests that arrived together, in order; their signatures are
    /// checked in one batch. Same effect as one `Request` input for each.
    Requests(Vec<Request>),
    /// One tick of time passed.
    Tick,
}

/// Where a message goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Every other replica.
    All,
    Replica(ReplicaId),
}

/// A message to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub to: Target,
    pub msg: Message,
}

/// Notable things for logs and metrics; none needs to be acted on for correctness.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A block was executed (committed normally or applied from sync).
    Executed {
        height: Seq,
        view: View,
        requests: usize,
        synced: bool,
    },
    /// The replica started a view change towards `view`.
    ViewChangeStarted { view: View },
    /// The replica entered `view` in normal operation.
    ViewEntered { view: View },
    /// A checkpoint became stable and the log below it was discarded.
    CheckpointStable { seq: Seq },
    /// The replica is behind and is fetching blocks up to `target`.
    SyncStarted { from: Seq, target: Seq },
    /// An input was refused.
    Rejected { reason: RejectReason },
    /// The designated vouchers of the batch at `seq` did not vouch within the vouch
    /// timeout, so this replica checked it itself: `valid` says whether it held (if not,
    /// the primary proposed a forged request).
    VouchTimeout { seq: Seq, valid: bool },
    /// A synced checkpoint block at `height` disagrees with this replica's state digest,
    /// and f+1 replicas' checkpoint votes certify this replica's state digested under the
    /// other scheme: the cluster certifies with `certified`, this replica is configured with
    /// `configured`, and it cannot join until that is set alike. The block is refused as
    /// `BadSyncData` as well.
    StateDigestScheme {
        height: Seq,
        configured: StateDigest,
        certified: StateDigest,
    },
}

/// What the adapter must do after feeding inputs, in this order: make `persist` durable, then
/// send `messages` and deliver `replies`. Sending before persisting could let a crash make the
/// replica contradict itself. Replies alone may go first where
/// [`Output::replies_may_precede_persist`] allows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    pub persist: Vec<PersistOp>,
    pub messages: Vec<Envelope>,
    pub replies: Vec<Reply>,
    pub events: Vec<Event>,
}

impl Output {
    /// Whether the adapter may deliver this output's replies before its writes are durable:
    /// it sends no message and persists only executed blocks, and every output before it
    /// has been made durable (or is of this kind too). The adapter must still make the
    /// blocks durable, in order, before any later output's messages.
    ///
    /// Why that is safe: a block is executed only when committed locally, so 2f+1 replicas
    /// made their prepared certificates for it durable before sending their commits, and this
    /// replica's own accepted pre-prepare and prepared certificate came in earlier outputs,
    /// which are durable by then. A crash before the block is durable leaves the replica below
    /// it with its prepared certificate: it gets the block again (retransmitted commits, or
    /// state sync) and, execution being deterministic, computes the replies it already sent.
    /// A reply is therefore never contradicted, and the fsync of an executed block leaves the
    /// path of every client's request.
    pub fn replies_may_precede_persist(&self) -> bool {
        self.messages.is_empty()
            && self
                .persist
                .iter()
                .all(|op| matches!(op, PersistOp::Block(_)))
    }

    pub fn is_empty(&self) -> bool {
        self.persist.is_empty()
            && self.messages.is_empty()
            && self.replies.is_empty()
            && self.events.is_empty()
    }
}
