//! What a replica must remember across a crash, and the traits adapters implement to keep it.
//!
//! The core never writes anything itself: it emits [`PersistOp`]s in its [`crate::Output`], and
//! the adapter must make them durable before it sends any message of the same output. That
//! ordering is what lets a restarted replica never contradict what it said before the crash:
//! it cannot have sent a prepare, commit or view change whose basis it later forgets.

use std::collections::BTreeMap;

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
    pub snapshot: Snapshot,
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
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage I/O failed: {0}")]
    Io(String),
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
}

/// Durable protocol state.
///
/// A call made only of [`PersistOp::Block`]s may return before it is synced, provided a
/// crash can lose only a suffix of such calls (the next call with any other op, or a sync,
/// makes them durable, as redb's non-durable commits are). Why that is safe: a block is
/// executed only once it committed, that is once 2f + 1 replicas had durably stored a
/// prepared certificate for its batch (every `Prepared` op is synced before the commit that
/// depends on it is sent), so at least f + 1 correct replicas carry the batch into any view
/// change and the block comes back, at the same height, by re-execution or by sync. Replies,
/// checkpoint votes and status announcements sent about a lost block all hold again once
/// it is back, because execution is deterministic. What this buys: the reply to a client
/// no longer waits for an fsync of its block.
pub trait Storage {
    /// Applies `ops` in order and atomically; durably (synced) before returning, except as
    /// the trait allows for calls made only of blocks.
    fn persist(&mut self, ops: &[PersistOp]) -> Result<(), StorageError>;
    /// Makes everything persisted so far durable (on a clean stop).
    fn sync(&mut self) -> Result<(), StorageError> {
        Ok(())
    }
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
/// simulator keeps it while it drops the replica, except for what [`MemStore::crash`] loses.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    /// Heights stored by block-only calls since the last call with any other op: what a
    /// crash may lose under the [`Storage`] contract, and does lose here.
    unsynced: Vec<Seq>,
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

    /// A crash: the blocks that were never synced are gone, as with a real store that
    /// acknowledged them lazily.
    pub fn crash(&mut self) {
        for h in self.unsynced.drain(..) {
            self.blocks.remove(&h);
        }
    }

    /// Forgets everything, as a wiped disk would.
    pub fn wipe(&mut self) {
        *self = MemStore::default();
    }
}

impl Storage for MemStore {
    fn persist(&mut self, ops: &[PersistOp]) -> Result<(), StorageError> {
        if ops.iter().all(|op| matches!(op, PersistOp::Block(_))) {
            self.unsynced.extend(ops.iter().filter_map(|op| match op {
                PersistOp::Block(b) => Some(b.height),
                _ => None,
            }));
        } else {
            self.unsynced.clear();
        }
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

    fn sync(&mut self) -> Result<(), StorageError> {
        self.unsynced.clear();
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
