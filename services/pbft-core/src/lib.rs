//! PBFT (Castro & Liskov) as a deterministic, sans-I/O state machine.
//!
//! The crate holds the whole protocol and nothing else: no sockets, files, clocks, threads or
//! randomness. Adapters (the replica service, the simulator) feed it [`Input`]s and carry out
//! the [`Output`] it returns, in order: persist, then send and reply. Time arrives as ticks,
//! keys are handed in, and storage is a trait with an in-memory implementation.
//!
//! ```text
//!            Input::{Receive, Request, Tick}
//!                        |
//!                        v
//!   +---------------- Replica ----------------+
//!   | normal case | checkpoints | view change |--> Output { persist, messages,
//!   | execution on KvStore      | state sync  |              replies, events }
//!   +-----------------------------------------+
//! ```
//!
//! The client side of the protocol (timestamps, retransmission, the f+1 matching replies
//! rule) is [`client::ClientCore`], equally free of I/O.

pub mod block;
pub mod client;
pub mod config;
pub mod crypto;
pub mod encode;
pub mod kv;
pub mod message;
pub mod output;
pub mod reject;
pub mod replica;
pub mod request;
pub mod storage;
pub mod types;

pub use block::{Block, BlockError, CheckpointCert, checkpoint_digest};
pub use client::{ClientCore, ClientError, Completed};
#[cfg(feature = "mutations")]
pub use config::Mutation;
pub use config::{Config, ConfigError, max_faulty};
pub use crypto::{ClientSig, Ed25519Signer, KeyRing, PublicKey, ReplicaSig, Signer, Verifier};
pub use kv::{ClientRecord, KvStore, Snapshot, StateDigest};
pub use message::{
    Checkpoint, Commit, Message, NewView, PrePrepare, Prepare, PreparedProof, Signed,
    StatusAnnouncement, SyncRequest, SyncResponse, ViewChange, primary,
};
pub use output::{Envelope, Event, Input, Output, Source, Target};
pub use reject::{RejectCounts, RejectReason};
pub use replica::{Replica, Status};
pub use request::{Batch, OpResult, Operation, Reply, Request, ShapeError};
pub use storage::{
    MemStore, PersistOp, Recovered, StableCheckpoint, StateProvider, Storage, StorageError,
};
pub use types::{ClientId, Digest, ReplicaId, Seq, Signature, Tick, View};

/// Errors of the core's constructors and recovery. Protocol inputs never fail: bad ones are
/// rejected and counted (see [`RejectReason`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("replica id {0} is not below n")]
    UnknownReplica(ReplicaId),
    #[error("recovered state is inconsistent: {0}")]
    Recovery(#[from] BlockError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(
        "the stored checkpoint at {seq} was certified with the `{found}` state digest, but this replica is configured for `{configured}`: a cluster keeps the digest it was created with, on every replica (set `protocol.state_digest: {found}` in the replica config; on Kubernetes, `spec.protocol.stateDigest: {found}`)"
    )]
    StateDigestScheme {
        seq: Seq,
        configured: StateDigest,
        found: StateDigest,
    },
    #[error("the stored checkpoint's state at {0} does not match its certificate")]
    StateMismatch(Seq),
}

/// Result with the core's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
