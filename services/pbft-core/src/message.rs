//! Messages replicas exchange, and the signed envelope around them.
//!
//! Every replica-to-replica protocol message is signed by its author, because prepares,
//! commits, checkpoints and view changes all end up inside certificates that must convince a
//! third party (a replica in a later view, a syncing replica, an auditor of the ledger).

use crate::block::{Block, CheckpointCert};
use crate::crypto::{Signer, Verifier};
use crate::encode::{Encoder, tag};
use crate::request::{Batch, Request};
use crate::types::{Digest, ReplicaId, Seq, Signature, View};

/// Something a replica signs. `author` says whose key must verify it; for messages only the
/// primary may send, it is derived from the view.
pub trait Signable {
    fn signing_bytes(&self) -> Vec<u8>;
    fn author(&self, n: usize) -> ReplicaId;
}

/// A message with its author's signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signed<T> {
    pub body: T,
    pub signature: Signature,
}

impl<T: Signable> Signed<T> {
    pub fn sign(body: T, key: &dyn Signer) -> Self {
        let signature = key.sign(&body.signing_bytes());
        Signed { body, signature }
    }

    /// True when the author's key signed exactly this body.
    pub fn verify(&self, n: usize, verifier: &dyn Verifier) -> bool {
        verifier.verify_replica(
            self.body.author(n),
            &self.body.signing_bytes(),
            &self.signature,
        )
    }

    pub fn author(&self, n: usize) -> ReplicaId {
        self.body.author(n)
    }

    pub(crate) fn encode(&self, e: &mut Encoder) {
        e.bytes(&self.body.signing_bytes()).bytes(&self.signature.0);
    }
}

/// The primary of a view.
pub fn primary(view: View, n: usize) -> ReplicaId {
    ReplicaId((view % n as u64) as u32)
}

/// The primary assigns `seq` to the batch with `digest` in `view`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrePrepare {
    pub view: View,
    pub seq: Seq,
    pub digest: Digest,
    pub batch: Batch,
}

impl Signable for PrePrepare {
    /// The batch is bound through `digest`, so the signature is cheap whatever the batch size.
    fn signing_bytes(&self) -> Vec<u8> {
        let mut e = Encoder::new(tag::PRE_PREPARE);
        e.u64(self.view).u64(self.seq).digest(&self.digest);
        e.finish()
    }
    fn author(&self, n: usize) -> ReplicaId {
        primary(self.view, n)
    }
}

/// A backup accepted the primary's assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepare {
    pub view: View,
    pub seq: Seq,
    pub digest: Digest,
    pub replica: ReplicaId,
    /// The sender vouches that every request in the batch carries its client's valid
    /// signature: it checked them, or learnt it from f+1 vouchers. A prepared certificate
    /// needs f vouching prepares besides the primary's pre-prepare (see
    /// `replica::vouch`), so at least one correct replica checked every batch that commits,
    /// while most replicas need not check any given batch.
    pub vouches: bool,
}

impl Signable for Prepare {
    /// A vouching prepare is signed exactly as prepares were before vouching existed (every
    /// replica then checked every batch before preparing, so those prepares did vouch); an
    /// unvouched one under its own tag, so one can never pass for the other.
    fn signing_bytes(&self) -> Vec<u8> {
        let kind = if self.vouches {
            tag::PREPARE
        } else {
            tag::PREPARE_UNVOUCHED
        };
        let mut e = Encoder::new(kind);
        e.u64(self.view)
            .u64(self.seq)
            .digest(&self.digest)
            .u32(self.replica.0);
        e.finish()
    }
    fn author(&self, _: usize) -> ReplicaId {
        self.replica
    }
}

/// A replica has a prepared certificate for (view, seq, digest). 2f+1 of them commit it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    pub view: View,
    pub seq: Seq,
    pub digest: Digest,
    pub replica: ReplicaId,
}

impl Signable for Commit {
    fn signing_bytes(&self) -> Vec<u8> {
        let mut e = Encoder::new(tag::COMMIT);
        e.u64(self.view)
            .u64(self.seq)
            .digest(&self.digest)
            .u32(self.replica.0);
        e.finish()
    }
    fn author(&self, _: usize) -> ReplicaId {
        self.replica
    }
}

/// After executing `seq`, the replica's state has `state_digest` (see
/// [`crate::block::checkpoint_digest`]). 2f+1 matching make the checkpoint stable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: Seq,
    pub state_digest: Digest,
    pub replica: ReplicaId,
}

impl Signable for Checkpoint {
    fn signing_bytes(&self) -> Vec<u8> {
        let mut e = Encoder::new(tag::CHECKPOINT);
        e.u64(self.seq)
            .digest(&self.state_digest)
            .u32(self.replica.0);
        e.finish()
    }
    fn author(&self, _: usize) -> ReplicaId {
        self.replica
    }
}

/// Where a replica stands, announced every status interval: a claim, which f+1 matching
/// peers must make before anyone acts on it (by fetching blocks it verifies itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusAnnouncement {
    /// The sender's view (its target view while changing views).
    pub view: View,
    /// The height of the last block the sender executed.
    pub height: Seq,
    pub replica: ReplicaId,
}

impl Signable for StatusAnnouncement {
    fn signing_bytes(&self) -> Vec<u8> {
        let mut e = Encoder::new(tag::STATUS);
        e.u64(self.view).u64(self.height).u32(self.replica.0);
        e.finish()
    }
    fn author(&self, _: usize) -> ReplicaId {
        self.replica
    }
}

/// Proof that a batch was prepared at some replica: the primary's pre-prepare plus 2f
/// matching prepares from distinct backups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreparedProof {
    pub pre_prepare: Signed<PrePrepare>,
    pub prepares: Vec<Signed<Prepare>>,
}

impl PreparedProof {
    pub fn view(&self) -> View {
        self.pre_prepare.body.view
    }
    pub fn seq(&self) -> Seq {
        self.pre_prepare.body.seq
    }
    pub fn digest(&self) -> Digest {
        self.pre_prepare.body.digest
    }
}

/// A replica asks to move to `new_view`, carrying what the new primary needs to keep every
/// request that may have committed: its stable checkpoint (with proof) and its prepared
/// certificates above it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViewChange {
    pub new_view: View,
    pub replica: ReplicaId,
    pub stable_seq: Seq,
    /// 2f+1 signed checkpoints for `stable_seq`; empty when `stable_seq` is 0 (genesis).
    pub checkpoint_proof: Vec<Signed<Checkpoint>>,
    pub prepared: Vec<PreparedProof>,
}

impl Signable for ViewChange {
    fn signing_bytes(&self) -> Vec<u8> {
        let mut e = Encoder::new(tag::VIEW_CHANGE);
        e.u64(self.new_view)
            .u32(self.replica.0)
            .u64(self.stable_seq)
            .u64(self.checkpoint_proof.len() as u64);
        for c in &self.checkpoint_proof {
            c.encode(&mut e);
        }
        e.u64(self.prepared.len() as u64);
        for p in &self.prepared {
            p.pre_prepare.encode(&mut e);
            e.u64(p.prepares.len() as u64);
            for pr in &p.prepares {
                pr.encode(&mut e);
            }
        }
        // Sign a hash: view changes can be large, and the signature input should not be.
        let mut h = Encoder::new(tag::VIEW_CHANGE);
        h.digest(&e.hash());
        h.finish()
    }
    fn author(&self, _: usize) -> ReplicaId {
        self.replica
    }
}

/// The new primary's proof that `view` starts correctly: 2f+1 view changes, and the
/// pre-prepares it derived from them (which every backup recomputes and checks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewView {
    pub view: View,
    pub view_changes: Vec<Signed<ViewChange>>,
    pub pre_prepares: Vec<Signed<PrePrepare>>,
}

impl Signable for NewView {
    fn signing_bytes(&self) -> Vec<u8> {
        let mut e = Encoder::new(tag::NEW_VIEW);
        e.u64(self.view).u64(self.view_changes.len() as u64);
        for vc in &self.view_changes {
            e.bytes(&vc.body.signing_bytes()).bytes(&vc.signature.0);
        }
        e.u64(self.pre_prepares.len() as u64);
        for pp in &self.pre_prepares {
            pp.encode(&mut e);
        }
        let mut h = Encoder::new(tag::NEW_VIEW);
        h.digest(&e.hash());
        h.finish()
    }
    fn author(&self, n: usize) -> ReplicaId {
        primary(self.view, n)
    }
}

/// A lagging replica asks a peer for committed blocks from `from_height` on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncRequest {
    pub from_height: Seq,
    pub max_blocks: u32,
}

/// A peer's answer to a [`SyncRequest`]. Unsigned: every block carries its own commit
/// certificate and the checkpoint its own 2f+1 signatures, so the receiver trusts neither the
/// sender nor the channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncResponse {
    pub blocks: Vec<Block>,
    /// The sender's latest stable checkpoint, telling the receiver how far there is to go.
    pub checkpoint: Option<CheckpointCert>,
}

/// Everything a replica can receive from the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// A client request, sent by the client or forwarded by a backup to the primary.
    Request(Request),
    PrePrepare(Signed<PrePrepare>),
    Prepare(Signed<Prepare>),
    Commit(Signed<Commit>),
    Checkpoint(Signed<Checkpoint>),
    ViewChange(Signed<ViewChange>),
    NewView(Signed<NewView>),
    SyncRequest(SyncRequest),
    SyncResponse(SyncResponse),
    StatusAnnouncement(Signed<StatusAnnouncement>),
}

impl Message {
    /// The author, signed bytes and signature of a message a replica signed (not a
    /// request or a sync message).
    pub(crate) fn signed_by(&self, n: usize) -> Option<(ReplicaId, Vec<u8>, Signature)> {
        fn parts<T: Signable>(m: &Signed<T>, n: usize) -> Option<(ReplicaId, Vec<u8>, Signature)> {
            Some((m.author(n), m.body.signing_bytes(), m.signature))
        }
        match self {
            Message::PrePrepare(m) => parts(m, n),
            Message::Prepare(m) => parts(m, n),
            Message::Commit(m) => parts(m, n),
            Message::Checkpoint(m) => parts(m, n),
            Message::ViewChange(m) => parts(m, n),
            Message::NewView(m) => parts(m, n),
            Message::StatusAnnouncement(m) => parts(m, n),
            Message::Request(_) | Message::SyncRequest(_) | Message::SyncResponse(_) => None,
        }
    }

    /// Short name for logs and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Request(_) => "request",
            Message::PrePrepare(_) => "pre_prepare",
            Message::Prepare(_) => "prepare",
            Message::Commit(_) => "commit",
            Message::Checkpoint(_) => "checkpoint",
            Message::ViewChange(_) => "view_change",
            Message::NewView(_) => "new_view",
            Message::SyncRequest(_) => "sync_request",
            Message::SyncResponse(_) => "sync_response",
            Message::StatusAnnouncement(_) => "status",
        }
    }
}
