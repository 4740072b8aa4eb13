//! What a replica must remember across a crash, and the traits adapters implement to keep it.
//!
//! The core never writes anything itself: it emits [`PersistOp`]s in its [`crate::Output`], and
//! the adapter must make them durable before it sends any message of the same output. That
//! ordering is what lets a restarted replica never contradict what it said before the crash:
//! it cannot have sent a prepare, commit or view change whose basis it later forgets.
//! One exception: an output that only executes blocks and answers clients may answer first
//! ([`crate::Output::replies_may_precede_persist`] says why that is safe).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::block::{Block, CheckpointCert};
use crate::kv::Snapshot;
use crate::message::{PrePrepare, PreparedProof, Signed};
use crate::types::{Digest, Seq, View};

/// One durable change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PersistOp {
    /// The replica's view; `changing` while it is trying to move to it. Never decreases.
    View { view: View, changing: bool },
    /// The pre-prepare the replica accepted (and is about to prepare) for its sequence number:
    /// after a restart it must not prepare a different batch there in the same view.
    Accepted(Signed<PrePrepare>),
    /// A prepared certificate, which later view changes must carry.
    Prepared(PreparedProof),
    /// A committed and executed block.
    Block(Block),
    /// A new stable checkpoint and the state at it; recovery starts here and replays blocks.
    Checkpoint(StableCheckpoint),
    /// Accepted pre-prepares and prepared certificates at or below `seq` are no longer needed.
    Prune { upto: Seq },
}

/// A stable checkpoint with the state and chain head it certifies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StableCheckpoint {
    pub cert: CheckpointCert,
    /// Shared, not copied: the whole replicated state, held by the replica until the
    /// checkpoint is stable and by the storage that writes it.
    pub snapshot: Arc<Snapshot>,
    /// Hash of the block at `cert.seq`, so replay can check the next block's link.
    pub block_hash: Digest,
}

/// The durable state a replica restarts from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    pub view: View,
    pub changing: bool,
    /// Latest stable checkpoint with its state (genesis when none).
    pub checkpoint: Option<StableCheckpoint>,
    /// Blocks above the checkpoint, in height order.
    pub blocks: Vec<Block>,
    pub accepted: Vec<Signed<PrePrepare>>,
    pub prepared: Vec<PreparedProof>,
}

/// A storage failure. The replica cannot continue safely after one: adapters stop it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage I/O failed: {0}")]
    Io(String),
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
}

/// Durable protocol state.
pub trait Storage {
    /// Applies `ops` in order, atomically, and durably (synced) before returning.
    fn persist(&mut self, ops: &[PersistOp]) -> Result<(), StorageError>;
    /// Reads back everything needed to restart.
    fn recover(&self) -> Result<Recovered, StorageError>;
}

/// Serves committed history to lagging peers (the seed's StateProvider, section 4.3).
pub trait StateProvider {
    /// Up to `max` consecutive blocks starting at `from_height`.
    fn blocks_from(&self, from_height: Seq, max: usize) -> Result<Vec<Block>, StorageError>;
    /// Stable checkpoints held, oldest first.
    fn checkpoints(&self) -> Result<Vec<CheckpointCert>, StorageError>;
    /// The stable checkpoint at `seq`, if held.
    fn checkpoint(&self, seq: Seq) -> Result<Option<CheckpointCert>, StorageError>;
}

/// In-memory [`Storage`] and [`StateProvider`]: survives a simulated crash because the
/// simulator keeps it while it drops the replica.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    view: View,
    changing: bool,
    accepted: BTreeMap<Seq, Signed<PrePrepare>>,
    prepared: BTreeMap<Seq, PreparedProof>,
    blocks: BTreeMap<Seq, Block>,
    checkpoints: BTreeMap<Seq, CheckpointCert>,
    snapshot: Option<StableCheckpoint>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Height of the last stored block (0 when none).
    pub fn height(&self) -> Seq {
        self.blocks.keys().next_back().copied().unwrap_or(0)
    }

    pub fn block(&self, height: Seq) -> Option<&Block> {
        self.blocks.get(&height)
    }

    /// Forgets everything, as a wiped disk would.
    pub fn wipe(&mut self) {
        *self = MemStore::default();
    }

    /// Forgets the blocks from `height` up, as a crash does the executed blocks whose
    /// replies went out before they were synced
    /// ([`crate::Output::replies_may_precede_persist`]).
    pub fn forget_blocks_from(&mut self, height: Seq) {
        self.blocks.split_off(&height);
    }
}

impl Storage for MemStore {
    fn persist(&mut self, ops: &[PersistOp]) -> Result<(), StorageError> {
        for op in ops {
            match op {
                PersistOp::View { view, changing } => {
                    self.view = *view;
                    self.changing = *changing;
                }
                PersistOp::Accepted(pp) => {
                    self.accepted.insert(pp.body.seq, pp.clone());
                }
                PersistOp::Prepared(p) => {
                    let keep = self
                        .prepared
                        .get(&p.seq())
                        .is_none_or(|old| old.view() <= p.view());
                    if keep {
                        self.prepared.insert(p.seq(), p.clone());
                    }
                }
                PersistOp::Block(b) => {
                    self.blocks.insert(b.height, b.clone());
                }
                PersistOp::Checkpoint(stable) => {
                    self.checkpoints
                        .insert(stable.cert.seq, stable.cert.clone());
                    self.snapshot = Some(stable.clone());
                }
                PersistOp::Prune { upto } => {
                    self.accepted = self.accepted.split_off(&(upto + 1));
                    self.prepared = self.prepared.split_off(&(upto + 1));
                }
            }
        }
        Ok(())
    }

    fn recover(&self) -> Result<Recovered, StorageError> {
        let base = self.snapshot.as_ref().map_or(0, |s| s.cert.seq);
        Ok(Recovered {
            view: self.view,
            changing: self.changing,
            checkpoint: self.snapshot.clone(),
            blocks: self
                .blocks
                .range(base + 1..)
                .map(|(_, b)| b.clone())
                .collect(),
            accepted: self.accepted.values().cloned().collect(),
            prepared: self.prepared.values().cloned().collect(),
        })
    }
}

impl StateProvider for MemStore {
    fn blocks_from(&self, from_height: Seq, max: usize) -> Result<Vec<Block>, StorageError> {
        Ok(self
            .blocks
            .range(from_height..)
            .take(max)
            .map(|(_, b)| b.clone())
            .collect())
    }

    fn checkpoints(&self) -> Result<Vec<CheckpointCert>, StorageError> {
        Ok(self.checkpoints.values().cloned().collect())
    }

    fn checkpoint(&self, seq: Seq) -> Result<Option<CheckpointCert>, StorageError> {
        Ok(self.checkpoints.get(&seq).cloned())
    }
}
