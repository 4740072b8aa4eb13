//! The ledger: one block per committed sequence number, hash-linked, each carrying the commit
//! certificate that lets anyone check it was agreed without trusting whoever served it.

use std::collections::BTreeSet;

use crate::crypto::Verifier;
use crate::encode::{Encoder, tag};
use crate::message::{Checkpoint, Commit, Signable, Signed};
use crate::request::Batch;
use crate::types::{Digest, ReplicaId, Seq, View};

/// A committed, executed batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// Equal to the sequence number the batch committed at; the first block is height 1.
    pub height: Seq,
    /// Hash of block `height - 1` ([`Digest::ZERO`] for height 1).
    pub prev_hash: Digest,
    pub batch: Batch,
    /// Digest of the results of executing `batch` (see [`crate::kv::results_digest`]).
    pub results_digest: Digest,
    /// Digest of the replicated state after this block at checkpoint heights (multiples of the
    /// checkpoint interval), [`Digest::ZERO`] elsewhere: hashing the whole state per block
    /// would cost too much.
    pub state_digest: Digest,
    /// View of the commits in `certificate`.
    pub view: View,
    /// 2f+1 signed commits for (`view`, `height`, batch digest) from distinct replicas.
    pub certificate: Vec<Signed<Commit>>,
}

impl Block {
    /// The chain hash. It leaves out the view and certificate: honest replicas may hold
    /// different (equally valid) certificates for the same block.
    pub fn hash(&self) -> Digest {
        let mut e = Encoder::new(tag::BLOCK);
        e.u64(self.height)
            .digest(&self.prev_hash)
            .digest(&self.batch.digest())
            .digest(&self.results_digest)
            .digest(&self.state_digest);
        e.hash()
    }

    /// Checks everything a block says about itself: that it follows `prev_hash` at the next
    /// height and that `quorum` distinct replicas signed commits for its batch. Execution
    /// results are checked by re-executing, not here.
    pub fn verify(
        &self,
        expected_height: Seq,
        prev_hash: &Digest,
        n: usize,
        quorum: usize,
        verifier: &dyn Verifier,
    ) -> Result<(), BlockError> {
        if self.height != expected_height {
            return Err(BlockError::Height {
                expected: expected_height,
                got: self.height,
            });
        }
        if self.prev_hash != *prev_hash {
            return Err(BlockError::BrokenLink {
                height: self.height,
            });
        }
        let digest = self.batch.digest();
        let signers = distinct_valid_signers(&self.certificate, n, verifier, |c| {
            c.view == self.view && c.seq == self.height && c.digest == digest
        });
        if signers < quorum {
            return Err(BlockError::Certificate {
                height: self.height,
                valid: signers,
                needed: quorum,
            });
        }
        Ok(())
    }
}

/// Why a block was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("expected block at height {expected}, got {got}")]
    Height { expected: Seq, got: Seq },
    #[error("block {height} does not link to the previous block's hash")]
    BrokenLink { height: Seq },
    #[error("block {height} has {valid} valid commit signatures, needs {needed}")]
    Certificate {
        height: Seq,
        valid: usize,
        needed: usize,
    },
    #[error("block {height} executes to different results than it records")]
    Results { height: Seq },
    #[error("block {height} records a state digest that differs from the executed state")]
    State { height: Seq },
}

/// The value replicas sign in checkpoint messages: the state digest and the chain head at
/// `seq`, so a stable checkpoint certifies both the state and the ledger up to it.
pub fn checkpoint_digest(state: &Digest, block_hash: &Digest) -> Digest {
    let mut e = Encoder::new(tag::CHECKPOINT_STATE);
    e.digest(state).digest(block_hash);
    e.hash()
}

/// A stable checkpoint: 2f+1 replicas signed the same digest at `seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointCert {
    pub seq: Seq,
    pub digest: Digest,
    pub signatures: Vec<Signed<Checkpoint>>,
}

impl CheckpointCert {
    /// The certificate of the genesis state, which needs no signatures.
    pub fn genesis() -> Self {
        CheckpointCert {
            seq: 0,
            digest: Digest::ZERO,
            signatures: Vec::new(),
        }
    }

    /// True when `quorum` distinct replicas validly signed this checkpoint (or it is genesis).
    pub fn verify(&self, n: usize, quorum: usize, verifier: &dyn Verifier) -> bool {
        if self.seq == 0 {
            return self.digest == Digest::ZERO;
        }
        distinct_valid_signers(&self.signatures, n, verifier, |c| {
            c.seq == self.seq && c.state_digest == self.digest
        }) >= quorum
    }
}

/// Counts distinct authors among `msgs` whose body satisfies `matches` and whose signature
/// verifies. Duplicates from one author count once, so a Byzantine replica cannot pad a
/// certificate with copies of its own vote.
pub fn distinct_valid_signers<T: Signable>(
    msgs: &[Signed<T>],
    n: usize,
    verifier: &dyn Verifier,
    matches: impl Fn(&T) -> bool,
) -> usize {
    let mut seen = BTreeSet::<ReplicaId>::new();
    for m in msgs {
        let author = m.author(n);
        if (author.0 as usize) < n
            && !seen.contains(&author)
            && matches(&m.body)
            && m.verify(n, verifier)
        {
            seen.insert(author);
        }
    }
    seen.len()
}
