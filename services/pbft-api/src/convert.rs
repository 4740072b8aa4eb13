//! The one place where generated protobuf types (`pbft_api::pb`) meet the core's own types.
//!
//! Everything on the far side of this module speaks `pbft_core` types only, so the rules for
//! turning untrusted wire data into protocol values live here and nowhere else:
//!
//! - Every `pb -> core` conversion returns [`ConvertError`] instead of panicking, whatever the
//!   input: digests must be exactly 32 bytes, signatures exactly 64, required message fields
//!   present, `oneof`s set, enum values known.
//! - Lists are capped (see the `MAX_*` constants). Prost's own allocation is already bounded
//!   by the transport's message size limit; the caps bound what a hostile peer can make us
//!   convert, hold and later verify signatures for.
//! - Authenticity is *not* checked here: that needs the key ring and is the core's job.
//!   Signatures are over the core's canonical encoding, never over protobuf bytes, so a
//!   signature made before a value crossed the wire still verifies after it came back.
//!
//! Conversions are the [`Wire`] trait, implemented on core types, plus [`to_envelope`] and
//! [`from_envelope`] for the `PBFTMessage` envelope that carries a core [`Message`].

use crate::pb::{self, op_result, operation};
use crate::{MessageType, Payload};
use pbft_core::kv::ClientRecord;
use pbft_core::{
    Batch, Block, Checkpoint, CheckpointCert, ClientId, Commit, Digest, Message, NewView, OpResult,
    Operation, PrePrepare, Prepare, PreparedProof, ReplicaId, Reply, Request, Signature, Signed,
    Snapshot, StableCheckpoint, StatusAnnouncement, SyncRequest, SyncResponse, ViewChange,
};
use prost::Message as _;

/// Most requests one batch may hold (a pre-prepare's or a block's).
pub const MAX_BATCH_REQUESTS: usize = 100_000;
/// Most prepared certificates one view change may carry.
pub const MAX_PREPARED_PROOFS: usize = 100_000;
/// Most signed votes one certificate may hold: prepares in a prepared proof, commits in a
/// block, checkpoints in a checkpoint proof, view changes in a new view. Honest certificates
/// hold at most `n`, and PBFT's quadratic traffic keeps `n` far below this.
pub const MAX_CERTIFICATE_SIGNATURES: usize = 1_024;
/// Most re-proposals one new view may carry (bounded in practice by the log window).
pub const MAX_NEW_VIEW_PRE_PREPARES: usize = 100_000;
/// Most blocks one sync response may carry.
pub const MAX_SYNC_BLOCKS: usize = 100_000;

/// Why wire data could not become a core value. Every variant means malformed input: the
/// receiver drops it and counts [`ConvertError::reason`].
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// A required message field or `oneof` was not set.
    #[error("{0} is missing")]
    MissingField(&'static str),
    /// A fixed-size byte field (digest, signature) has the wrong length.
    #[error("{field} is {got} bytes long, expected {expected}")]
    BadLength {
        field: &'static str,
        expected: usize,
        got: usize,
    },
    /// The envelope's type is unspecified (0) or a number this version does not know.
    #[error("unknown message type {0}")]
    UnknownType(i32),
    /// A list is longer than its cap.
    #[error("{field} has {got} entries, at most {max} are allowed")]
    TooMany {
        field: &'static str,
        got: usize,
        max: usize,
    },
    /// The bytes are not a valid protobuf encoding of the expected message.
    #[error("cannot decode {what}: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: prost::DecodeError,
    },
    /// The envelope's view, sequence or digest differs from what its payload says.
    #[error("{0} envelope header disagrees with its payload")]
    HeaderMismatch(MessageType),
    /// A field that must be empty for this message is not.
    #[error("{0} must be empty here")]
    UnexpectedField(&'static str),
    /// Entries that must agree with each other do not.
    #[error("{0} disagree with each other")]
    Inconsistent(&'static str),
    /// A key that must appear once appears twice.
    #[error("{0} holds the same key twice")]
    Duplicate(&'static str),
    /// A malformed envelope that `pbft_api` rejected for a reason this version does not know.
    #[error("malformed envelope: {0}")]
    Malformed(String),
}

impl ConvertError {
    /// A short, fixed label for metrics (`rejected_total{reason=...}`).
    pub fn reason(&self) -> &'static str {
        match self {
            ConvertError::MissingField(_) => "missing_field",
            ConvertError::BadLength { .. } => "bad_length",
            ConvertError::UnknownType(_) => "unknown_type",
            ConvertError::TooMany { .. } => "too_many",
            ConvertError::Decode { .. } => "decode",
            ConvertError::HeaderMismatch(_) => "header_mismatch",
            ConvertError::UnexpectedField(_) => "unexpected_field",
            ConvertError::Inconsistent(_) => "inconsistent",
            ConvertError::Duplicate(_) => "duplicate",
            ConvertError::Malformed(_) => "malformed",
        }
    }
}

impl From<crate::Error> for ConvertError {
    fn from(e: crate::Error) -> Self {
        match e {
            crate::Error::UnknownMessageType(t) => ConvertError::UnknownType(t),
            crate::Error::UnspecifiedMessageType => {
                ConvertError::UnknownType(MessageType::Unspecified as i32)
            }
            crate::Error::Decode {
                message_type,
                source,
            } => ConvertError::Decode {
                what: message_type.as_str_name(),
                source,
            },
            crate::Error::HeaderMismatch { message_type } => {
                ConvertError::HeaderMismatch(message_type)
            }
        }
    }
}

/// Result with [`ConvertError`].
pub type Result<T, E = ConvertError> = std::result::Result<T, E>;

/// A core type with a protobuf counterpart.
///
/// Implemented on the core types (the orphan rule forbids `From` between two foreign types).
/// `to_pb` cannot fail; `from_pb` checks everything it can without keys.
pub trait Wire: Sized {
    /// The generated protobuf message.
    type Pb: prost::Message + Default;
    /// The protobuf message's name, for errors.
    const PB_NAME: &'static str;

    /// The protobuf form of `self`.
    fn to_pb(&self) -> Self::Pb;

    /// Checks and converts a protobuf message from an untrusted source.
    fn from_pb(pb: Self::Pb) -> Result<Self>;

    /// `self` encoded as protobuf bytes.
    fn to_bytes(&self) -> Vec<u8> {
        self.to_pb().encode_to_vec()
    }

    /// Decodes protobuf bytes from an untrusted source and converts them.
    fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let pb = Self::Pb::decode(bytes).map_err(|source| ConvertError::Decode {
            what: Self::PB_NAME,
            source,
        })?;
        Self::from_pb(pb)
    }
}

fn digest(field: &'static str, bytes: &[u8]) -> Result<Digest> {
    Digest::from_slice(bytes).ok_or(ConvertError::BadLength {
        field,
        expected: 32,
        got: bytes.len(),
    })
}

fn signature(field: &'static str, bytes: &[u8]) -> Result<Signature> {
    Signature::from_slice(bytes).ok_or(ConvertError::BadLength {
        field,
        expected: 64,
        got: bytes.len(),
    })
}

fn required<T>(field: &'static str, value: Option<T>) -> Result<T> {
    value.ok_or(ConvertError::MissingField(field))
}

/// Converts a list after checking its length against `max`, so nothing is converted (or
/// allocated for the result) when the list is too long.
fn list<P, C>(field: &'static str, max: usize, items: Vec<P>) -> Result<Vec<C>>
where
    C: Wire<Pb = P>,
{
    if items.len() > max {
        return Err(ConvertError::TooMany {
            field,
            got: items.len(),
            max,
        });
    }
    items.into_iter().map(C::from_pb).collect()
}

fn to_pb_list<C: Wire>(items: &[C]) -> Vec<C::Pb> {
    items.iter().map(Wire::to_pb).collect()
}

impl Wire for Operation {
    type Pb = pb::Operation;
    const PB_NAME: &'static str = "Operation";

    fn to_pb(&self) -> pb::Operation {
        let kind = match self.clone() {
            Operation::Put { key, value } => operation::Kind::Put(operation::Put { key, value }),
            Operation::Get { key } => operation::Kind::Get(operation::Get { key }),
            Operation::Delete { key } => operation::Kind::Delete(operation::Delete { key }),
            Operation::Cas { key, expected, new } => operation::Kind::Cas(operation::Cas {
                key,
                expected,
                new_value: new,
            }),
        };
        pb::Operation { kind: Some(kind) }
    }

    fn from_pb(pb: pb::Operation) -> Result<Self> {
        Ok(match required("Operation.kind", pb.kind)? {
            operation::Kind::Put(p) => Operation::Put {
                key: p.key,
                value: p.value,
            },
            operation::Kind::Get(g) => Operation::Get { key: g.key },
            operation::Kind::Delete(d) => Operation::Delete { key: d.key },
            operation::Kind::Cas(c) => Operation::Cas {
                key: c.key,
                expected: c.expected,
                new: c.new_value,
            },
        })
    }
}

impl Wire for Request {
    type Pb = pb::Request;
    const PB_NAME: &'static str = "Request";

    fn to_pb(&self) -> pb::Request {
        pb::Request {
            client_id: self.client.0,
            timestamp: self.timestamp,
            operation: Some(self.op.to_pb()),
            signature: self.signature.0.to_vec(),
        }
    }

    fn from_pb(pb: pb::Request) -> Result<Self> {
        Ok(Request {
            client: ClientId(pb.client_id),
            timestamp: pb.timestamp,
            op: Operation::from_pb(required("Request.operation", pb.operation)?)?,
            signature: signature("Request.signature", &pb.signature)?,
        })
    }
}

impl Wire for OpResult {
    type Pb = pb::OpResult;
    const PB_NAME: &'static str = "OpResult";

    fn to_pb(&self) -> pb::OpResult {
        let kind = match self.clone() {
            OpResult::Value(value) => op_result::Kind::Value(op_result::Value { value }),
            OpResult::Written => op_result::Kind::Written(op_result::Written {}),
            OpResult::Deleted(existed) => op_result::Kind::Deleted(op_result::Deleted { existed }),
            OpResult::CasOk => op_result::Kind::CasOk(op_result::CasOk {}),
            OpResult::CasMismatch(current) => {
                op_result::Kind::CasMismatch(op_result::CasMismatch { current })
            }
        };
        pb::OpResult { kind: Some(kind) }
    }

    fn from_pb(pb: pb::OpResult) -> Result<Self> {
        Ok(match required("OpResult.kind", pb.kind)? {
            op_result::Kind::Value(v) => OpResult::Value(v.value),
            op_result::Kind::Written(_) => OpResult::Written,
            op_result::Kind::Deleted(d) => OpResult::Deleted(d.existed),
            op_result::Kind::CasOk(_) => OpResult::CasOk,
            op_result::Kind::CasMismatch(m) => OpResult::CasMismatch(m.current),
        })
    }
}

impl Wire for Reply {
    type Pb = pb::Reply;
    const PB_NAME: &'static str = "Reply";

    fn to_pb(&self) -> pb::Reply {
        pb::Reply {
            view: self.view,
            timestamp: self.timestamp,
            client_id: self.client.0,
            replica_id: self.replica.0,
            result: Some(self.result.to_pb()),
        }
    }

    fn from_pb(pb: pb::Reply) -> Result<Self> {
        Ok(Reply {
            view: pb.view,
            timestamp: pb.timestamp,
            client: ClientId(pb.client_id),
            replica: ReplicaId(pb.replica_id),
            result: OpResult::from_pb(required("Reply.result", pb.result)?)?,
        })
    }
}

impl Wire for Batch {
    type Pb = pb::Batch;
    const PB_NAME: &'static str = "Batch";

    fn to_pb(&self) -> pb::Batch {
        pb::Batch {
            requests: to_pb_list(self.requests()),
        }
    }

    fn from_pb(pb: pb::Batch) -> Result<Self> {
        Ok(Batch::new(list(
            "Batch.requests",
            MAX_BATCH_REQUESTS,
            pb.requests,
        )?))
    }
}

impl Wire for PrePrepare {
    type Pb = pb::PrePrepare;
    const PB_NAME: &'static str = "PrePrepare";

    fn to_pb(&self) -> pb::PrePrepare {
        pb::PrePrepare {
            view: self.view,
            sequence: self.seq,
            digest: self.digest.0.to_vec(),
            batch: Some(self.batch.to_pb()),
        }
    }

    fn from_pb(pb: pb::PrePrepare) -> Result<Self> {
        Ok(PrePrepare {
            view: pb.view,
            seq: pb.sequence,
            digest: digest("PrePrepare.digest", &pb.digest)?,
            batch: Batch::from_pb(required("PrePrepare.batch", pb.batch)?)?,
        })
    }
}

impl Wire for Prepare {
    type Pb = pb::Prepare;
    const PB_NAME: &'static str = "Prepare";

    fn to_pb(&self) -> pb::Prepare {
        pb::Prepare {
            view: self.view,
            sequence: self.seq,
            digest: self.digest.0.to_vec(),
            replica_id: self.replica.0,
            unvouched: !self.vouches,
        }
    }

    fn from_pb(pb: pb::Prepare) -> Result<Self> {
        Ok(Prepare {
            view: pb.view,
            seq: pb.sequence,
            digest: digest("Prepare.digest", &pb.digest)?,
            replica: ReplicaId(pb.replica_id),
            vouches: !pb.unvouched,
        })
    }
}

impl Wire for Commit {
    type Pb = pb::Commit;
    const PB_NAME: &'static str = "Commit";

    fn to_pb(&self) -> pb::Commit {
        pb::Commit {
            view: self.view,
            sequence: self.seq,
            digest: self.digest.0.to_vec(),
            replica_id: self.replica.0,
        }
    }

    fn from_pb(pb: pb::Commit) -> Result<Self> {
        Ok(Commit {
            view: pb.view,
            seq: pb.sequence,
            digest: digest("Commit.digest", &pb.digest)?,
            replica: ReplicaId(pb.replica_id),
        })
    }
}

impl Wire for Checkpoint {
    type Pb = pb::Checkpoint;
    const PB_NAME: &'static str = "Checkpoint";

    fn to_pb(&self) -> pb::Checkpoint {
        pb::Checkpoint {
            sequence: self.seq,
            state_digest: self.state_digest.0.to_vec(),
            replica_id: self.replica.0,
        }
    }

    fn from_pb(pb: pb::Checkpoint) -> Result<Self> {
        Ok(Checkpoint {
            seq: pb.sequence,
            state_digest: digest("Checkpoint.state_digest", &pb.state_digest)?,
            replica: ReplicaId(pb.replica_id),
        })
    }
}

impl Wire for StatusAnnouncement {
    type Pb = pb::StatusAnnouncement;
    const PB_NAME: &'static str = "StatusAnnouncement";

    fn to_pb(&self) -> pb::StatusAnnouncement {
        pb::StatusAnnouncement {
            view: self.view,
            height: self.height,
            replica_id: self.replica.0,
        }
    }

    fn from_pb(pb: pb::StatusAnnouncement) -> Result<Self> {
        Ok(StatusAnnouncement {
            view: pb.view,
            height: pb.height,
            replica: ReplicaId(pb.replica_id),
        })
    }
}

/// `Signed<T>` for each signed body that has a `Signed*` protobuf message. (`Signed<NewView>`
/// has none: its signature travels in the envelope, see [`to_envelope`].)
macro_rules! signed_wire {
    ($body:ty, $pb:ty, $name:literal) => {
        impl Wire for Signed<$body> {
            type Pb = $pb;
            const PB_NAME: &'static str = $name;

            fn to_pb(&self) -> $pb {
                <$pb>::from_parts(self.body.to_pb(), self.signature.0.to_vec())
            }

            fn from_pb(pb: $pb) -> Result<Self> {
                let (body, sig) = pb.into_parts();
                Ok(Signed {
                    body: <$body>::from_pb(required(concat!($name, ".body"), body)?)?,
                    signature: signature(concat!($name, ".signature"), &sig)?,
                })
            }
        }

        impl SignedPb for $pb {
            type Body = <$body as Wire>::Pb;
            fn from_parts(body: Self::Body, signature: Vec<u8>) -> Self {
                Self {
                    body: Some(body),
                    signature,
                }
            }
            fn into_parts(self) -> (Option<Self::Body>, Vec<u8>) {
                (self.body, self.signature)
            }
        }
    };
}

/// The shape every generated `Signed*` message shares.
trait SignedPb {
    type Body;
    fn from_parts(body: Self::Body, signature: Vec<u8>) -> Self;
    fn into_parts(self) -> (Option<Self::Body>, Vec<u8>);
}

signed_wire!(PrePrepare, pb::SignedPrePrepare, "SignedPrePrepare");
signed_wire!(Prepare, pb::SignedPrepare, "SignedPrepare");
signed_wire!(Commit, pb::SignedCommit, "SignedCommit");
signed_wire!(Checkpoint, pb::SignedCheckpoint, "SignedCheckpoint");
signed_wire!(
    StatusAnnouncement,
    pb::SignedStatusAnnouncement,
    "SignedStatusAnnouncement"
);
signed_wire!(ViewChange, pb::SignedViewChange, "SignedViewChange");

impl Wire for PreparedProof {
    type Pb = pb::PreparedProof;
    const PB_NAME: &'static str = "PreparedProof";

    fn to_pb(&self) -> pb::PreparedProof {
        pb::PreparedProof {
            pre_prepare: Some(self.pre_prepare.to_pb()),
            prepares: to_pb_list(&self.prepares),
        }
    }

    fn from_pb(pb: pb::PreparedProof) -> Result<Self> {
        Ok(PreparedProof {
            pre_prepare: Signed::<PrePrepare>::from_pb(required(
                "PreparedProof.pre_prepare",
                pb.pre_prepare,
            )?)?,
            prepares: list(
                "PreparedProof.prepares",
                MAX_CERTIFICATE_SIGNATURES,
                pb.prepares,
            )?,
        })
    }
}

impl Wire for ViewChange {
    type Pb = pb::ViewChange;
    const PB_NAME: &'static str = "ViewChange";

    fn to_pb(&self) -> pb::ViewChange {
        pb::ViewChange {
            new_view: self.new_view,
            replica_id: self.replica.0,
            stable_sequence: self.stable_seq,
            checkpoint_proof: to_pb_list(&self.checkpoint_proof),
            prepared: to_pb_list(&self.prepared),
        }
    }

    fn from_pb(pb: pb::ViewChange) -> Result<Self> {
        Ok(ViewChange {
            new_view: pb.new_view,
            replica: ReplicaId(pb.replica_id),
            stable_seq: pb.stable_sequence,
            checkpoint_proof: list(
                "ViewChange.checkpoint_proof",
                MAX_CERTIFICATE_SIGNATURES,
                pb.checkpoint_proof,
            )?,
            prepared: list("ViewChange.prepared", MAX_PREPARED_PROOFS, pb.prepared)?,
        })
    }
}

/// The body only: the new primary's signature over it travels in the envelope.
impl Wire for NewView {
    type Pb = pb::NewView;
    const PB_NAME: &'static str = "NewView";

    fn to_pb(&self) -> pb::NewView {
        pb::NewView {
            view: self.view,
            view_changes: to_pb_list(&self.view_changes),
            pre_prepares: to_pb_list(&self.pre_prepares),
        }
    }

    fn from_pb(pb: pb::NewView) -> Result<Self> {
        Ok(NewView {
            view: pb.view,
            view_changes: list(
                "NewView.view_changes",
                MAX_CERTIFICATE_SIGNATURES,
                pb.view_changes,
            )?,
            pre_prepares: list(
                "NewView.pre_prepares",
                MAX_NEW_VIEW_PRE_PREPARES,
                pb.pre_prepares,
            )?,
        })
    }
}

impl Wire for Block {
    type Pb = pb::Block;
    const PB_NAME: &'static str = "Block";

    /// The first block's `prev_hash` ([`Digest::ZERO`]) goes out empty, as `types.proto` says.
    fn to_pb(&self) -> pb::Block {
        pb::Block {
            height: self.height,
            prev_hash: if self.prev_hash == Digest::ZERO {
                Vec::new()
            } else {
                self.prev_hash.0.to_vec()
            },
            batch: Some(self.batch.to_pb()),
            results_digest: self.results_digest.0.to_vec(),
            state_digest: self.state_digest.0.to_vec(),
            view: self.view,
            commit_certificate: to_pb_list(&self.certificate),
        }
    }

    fn from_pb(pb: pb::Block) -> Result<Self> {
        let prev_hash = if pb.prev_hash.is_empty() {
            Digest::ZERO
        } else {
            digest("Block.prev_hash", &pb.prev_hash)?
        };
        Ok(Block {
            height: pb.height,
            prev_hash,
            batch: Batch::from_pb(required("Block.batch", pb.batch)?)?,
            results_digest: digest("Block.results_digest", &pb.results_digest)?,
            state_digest: digest("Block.state_digest", &pb.state_digest)?,
            view: pb.view,
            certificate: list(
                "Block.commit_certificate",
                MAX_CERTIFICATE_SIGNATURES,
                pb.commit_certificate,
            )?,
        })
    }
}

impl Wire for CheckpointCert {
    type Pb = pb::CheckpointCertificate;
    const PB_NAME: &'static str = "CheckpointCertificate";

    fn to_pb(&self) -> pb::CheckpointCertificate {
        pb::CheckpointCertificate {
            sequence: self.seq,
            state_digest: self.digest.0.to_vec(),
            signatures: to_pb_list(&self.signatures),
        }
    }

    fn from_pb(pb: pb::CheckpointCertificate) -> Result<Self> {
        Ok(CheckpointCert {
            seq: pb.sequence,
            digest: digest("CheckpointCertificate.state_digest", &pb.state_digest)?,
            signatures: list(
                "CheckpointCertificate.signatures",
                MAX_CERTIFICATE_SIGNATURES,
                pb.signatures,
            )?,
        })
    }
}

/// The wire form carries the certificate as its bare signatures; `peer_height` is the highest
/// height the response itself shows (its last block or its checkpoint), since the core's
/// response does not carry the sender's height separately.
impl Wire for SyncResponse {
    type Pb = pb::SyncResponse;
    const PB_NAME: &'static str = "SyncResponse";

    fn to_pb(&self) -> pb::SyncResponse {
        let last_block = self.blocks.last().map_or(0, |b| b.height);
        let checkpoint_seq = self.checkpoint.as_ref().map_or(0, |c| c.seq);
        pb::SyncResponse {
            blocks: to_pb_list(&self.blocks),
            checkpoints: self
                .checkpoint
                .as_ref()
                .map_or_else(Vec::new, |c| to_pb_list(&c.signatures)),
            peer_height: last_block.max(checkpoint_seq),
        }
    }

    /// A certificate's sequence and digest are taken from its signatures, which must all name
    /// the same ones; no signatures means no certificate.
    fn from_pb(pb: pb::SyncResponse) -> Result<Self> {
        let blocks = list("SyncResponse.blocks", MAX_SYNC_BLOCKS, pb.blocks)?;
        let signatures: Vec<Signed<Checkpoint>> = list(
            "SyncResponse.checkpoints",
            MAX_CERTIFICATE_SIGNATURES,
            pb.checkpoints,
        )?;
        let checkpoint = match signatures.first() {
            None => None,
            Some(first) => {
                let (seq, digest) = (first.body.seq, first.body.state_digest);
                if signatures
                    .iter()
                    .any(|s| s.body.seq != seq || s.body.state_digest != digest)
                {
                    return Err(ConvertError::Inconsistent("SyncResponse.checkpoints"));
                }
                Some(CheckpointCert {
                    seq,
                    digest,
                    signatures,
                })
            }
        };
        Ok(SyncResponse { blocks, checkpoint })
    }
}

/// The replicated state. Not capped: it comes from our own disk or from a state transfer
/// whose size the transport already bounds, and a legitimate state may be large.
impl Wire for Snapshot {
    type Pb = pb::StateSnapshot;
    const PB_NAME: &'static str = "StateSnapshot";

    fn to_pb(&self) -> pb::StateSnapshot {
        pb::StateSnapshot {
            entries: self
                .entries()
                .map(|(key, value)| pb::KvEntry {
                    key: key.to_vec(),
                    value: value.to_vec(),
                })
                .collect(),
            clients: self
                .clients()
                .map(|(client, record)| client_record_pb(client, record))
                .collect(),
        }
    }

    fn from_pb(pb: pb::StateSnapshot) -> Result<Self> {
        let mut snapshot = Snapshot::default();
        for e in pb.entries {
            if snapshot.insert(&e.key, &e.value) {
                return Err(ConvertError::Duplicate("StateSnapshot.entries"));
            }
        }
        for c in pb.clients {
            let record = ClientRecord {
                timestamp: c.timestamp,
                result: OpResult::from_pb(required("ClientRecord.result", c.result)?)?,
            };
            if snapshot.insert_client(ClientId(c.client_id), record) {
                return Err(ConvertError::Duplicate("StateSnapshot.clients"));
            }
        }
        Ok(snapshot)
    }
}

impl Wire for StableCheckpoint {
    type Pb = pb::StableCheckpoint;
    const PB_NAME: &'static str = "StableCheckpoint";

    fn to_pb(&self) -> pb::StableCheckpoint {
        pb::StableCheckpoint {
            certificate: Some(self.cert.to_pb()),
            snapshot: Some(self.snapshot.to_pb()),
            block_hash: self.block_hash.0.to_vec(),
        }
    }

    fn from_pb(pb: pb::StableCheckpoint) -> Result<Self> {
        Ok(StableCheckpoint {
            cert: CheckpointCert::from_pb(required(
                "StableCheckpoint.certificate",
                pb.certificate,
            )?)?,
            snapshot: std::sync::Arc::new(Snapshot::from_pb(required(
                "StableCheckpoint.snapshot",
                pb.snapshot,
            )?)?),
            block_hash: digest("StableCheckpoint.block_hash", &pb.block_hash)?,
        })
    }
}

fn client_record_pb(client: ClientId, record: &ClientRecord) -> pb::ClientRecord {
    pb::ClientRecord {
        client_id: client.0,
        timestamp: record.timestamp,
        result: Some(record.result.to_pb()),
    }
}

/// Writes `stable` to `out` as exactly the bytes [`Wire::to_bytes`] gives, without holding
/// them: the state goes out entry by entry through a small buffer. A stable checkpoint
/// carries the whole replicated state (13 MB in the benchmark), and `to_bytes` held a
/// protobuf copy of it and then its encoding, so each snapshot written under load put a
/// transient of about twice the state on top of a replica's memory: the peak it reported.
pub fn write_stable_checkpoint(
    stable: &StableCheckpoint,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
    /// Bytes gathered before each write to `out`.
    const CHUNK: usize = 64 << 10;
    // A proto3 bytes field is left out when empty, as prost does.
    fn bytes_len(tag: u32, b: &[u8]) -> usize {
        if b.is_empty() {
            0
        } else {
            key_len(tag) + encoded_len_varint(b.len() as u64) + b.len()
        }
    }
    fn put_bytes(tag: u32, b: &[u8], buf: &mut Vec<u8>) {
        if !b.is_empty() {
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(b.len() as u64, buf);
            buf.extend_from_slice(b);
        }
    }
    fn nested_len(tag: u32, len: usize) -> usize {
        key_len(tag) + encoded_len_varint(len as u64) + len
    }
    let entry_len = |k: &[u8], v: &[u8]| bytes_len(1, k) + bytes_len(2, v);

    let mut buf = Vec::with_capacity(CHUNK + 4096);
    // StableCheckpoint.certificate = 1
    prost::encoding::message::encode(1, &stable.cert.to_pb(), &mut buf);
    // StableCheckpoint.snapshot = 2: its length first, from a pass over the sizes alone.
    let snapshot = &stable.snapshot;
    let clients: Vec<pb::ClientRecord> = snapshot
        .clients()
        .map(|(client, record)| client_record_pb(client, record))
        .collect();
    let len: usize = snapshot
        .entries()
        .map(|(k, v)| nested_len(1, entry_len(k, v)))
        .sum::<usize>()
        + clients
            .iter()
            .map(|c| nested_len(2, c.encoded_len()))
            .sum::<usize>();
    encode_key(2, WireType::LengthDelimited, &mut buf);
    encode_varint(len as u64, &mut buf);
    for (k, v) in snapshot.entries() {
        // StateSnapshot.entries = 1, each a KvEntry { key = 1, value = 2 }
        encode_key(1, WireType::LengthDelimited, &mut buf);
        encode_varint(entry_len(k, v) as u64, &mut buf);
        put_bytes(1, k, &mut buf);
        put_bytes(2, v, &mut buf);
        if buf.len() >= CHUNK {
            out.write_all(&buf)?;
            buf.clear();
        }
    }
    for c in &clients {
        // StateSnapshot.clients = 2
        prost::encoding::message::encode(2, c, &mut buf);
        if buf.len() >= CHUNK {
            out.write_all(&buf)?;
            buf.clear();
        }
    }
    // StableCheckpoint.block_hash = 3
    put_bytes(3, &stable.block_hash.0, &mut buf);
    out.write_all(&buf)
}

/// The answer to the `SyncState` RPC, built from the same core value a TCP peer receives as
/// a `SyncResponse` frame.
pub fn to_sync_state_response(resp: &SyncResponse) -> pb::SyncStateResponse {
    pb::SyncStateResponse {
        height: resp.blocks.last().map_or(0, |b| b.height),
        blocks: to_pb_list(&resp.blocks),
        checkpoints: resp.checkpoint.iter().map(Wire::to_pb).collect(),
    }
}

/// Converts a `SyncState` answer from an untrusted peer; only its latest checkpoint counts.
pub fn from_sync_state_response(resp: pb::SyncStateResponse) -> Result<SyncResponse> {
    let blocks = list("SyncStateResponse.blocks", MAX_SYNC_BLOCKS, resp.blocks)?;
    if resp.checkpoints.len() > MAX_CERTIFICATE_SIGNATURES {
        return Err(ConvertError::TooMany {
            field: "SyncStateResponse.checkpoints",
            got: resp.checkpoints.len(),
            max: MAX_CERTIFICATE_SIGNATURES,
        });
    }
    let checkpoint = match resp.checkpoints.into_iter().next_back() {
        Some(c) => Some(CheckpointCert::from_pb(c)?),
        None => None,
    };
    Ok(SyncResponse { blocks, checkpoint })
}

/// Wraps a core message in the `PBFTMessage` envelope, header filled in by `pbft_api`'s rules.
///
/// `sender` and `node_id` name this replica: the id goes into a sync request (whose core form
/// does not carry it), the name into the envelope header. A new view's signature goes into the
/// envelope's `signature` field, as `types.proto` specifies; every other type leaves it empty.
pub fn to_envelope(msg: &Message, sender: ReplicaId, node_id: &str) -> pb::PbftMessage {
    let mut envelope_signature = Vec::new();
    let payload = match msg {
        Message::Request(r) => Payload::Request(r.to_pb()),
        Message::PrePrepare(m) => Payload::PrePrepare(m.to_pb()),
        Message::Prepare(m) => Payload::Prepare(m.to_pb()),
        Message::Commit(m) => Payload::Commit(m.to_pb()),
        Message::Checkpoint(m) => Payload::Checkpoint(m.to_pb()),
        Message::ViewChange(m) => Payload::ViewChange(m.to_pb()),
        Message::NewView(m) => {
            envelope_signature = m.signature.0.to_vec();
            Payload::NewView(m.body.to_pb())
        }
        Message::SyncRequest(r) => Payload::SyncRequest(pb::SyncRequest {
            from_height: r.from_height,
            max_blocks: r.max_blocks,
            replica_id: sender.0,
        }),
        Message::SyncResponse(r) => Payload::SyncResponse(r.to_pb()),
        Message::StatusAnnouncement(m) => Payload::StatusAnnouncement(m.to_pb()),
    };
    let mut envelope = payload.into_envelope(node_id);
    envelope.signature = envelope_signature;
    envelope
}

/// Checks and converts an envelope from the network into a core message.
///
/// The header must agree with the payload, and the envelope signature must be 64 bytes for a
/// new view and empty otherwise. The sender named in the header (`node_id`, and a sync
/// request's `replica_id`) is left to the transport, which knows whom it is talking to.
pub fn from_envelope(envelope: &pb::PbftMessage) -> Result<Message> {
    let payload = envelope.decode_payload()?;
    if !matches!(payload, Payload::NewView(_)) && !envelope.signature.is_empty() {
        return Err(ConvertError::UnexpectedField("PBFTMessage.signature"));
    }
    Ok(match payload {
        Payload::Request(r) => Message::Request(Request::from_pb(r)?),
        Payload::PrePrepare(m) => Message::PrePrepare(Signed::from_pb(m)?),
        Payload::Prepare(m) => Message::Prepare(Signed::from_pb(m)?),
        Payload::Commit(m) => Message::Commit(Signed::from_pb(m)?),
        Payload::Checkpoint(m) => Message::Checkpoint(Signed::from_pb(m)?),
        Payload::ViewChange(m) => Message::ViewChange(Signed::from_pb(m)?),
        Payload::NewView(m) => Message::NewView(Signed {
            body: NewView::from_pb(m)?,
            signature: signature("PBFTMessage.signature", &envelope.signature)?,
        }),
        Payload::SyncRequest(r) => Message::SyncRequest(SyncRequest {
            from_height: r.from_height,
            max_blocks: r.max_blocks,
        }),
        Payload::SyncResponse(r) => Message::SyncResponse(SyncResponse::from_pb(r)?),
        Payload::StatusAnnouncement(m) => Message::StatusAnnouncement(Signed::from_pb(m)?),
    })
}

/// Decodes envelope bytes (a TCP frame) and converts them: [`from_envelope`] after prost.
/// Returns the envelope too, for its `node_id`.
pub fn decode_envelope(bytes: &[u8]) -> Result<(pb::PbftMessage, Message)> {
    let envelope = pb::PbftMessage::decode(bytes).map_err(|source| ConvertError::Decode {
        what: "PBFTMessage",
        source,
    })?;
    let message = from_envelope(&envelope)?;
    Ok((envelope, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pbft_core::{Ed25519Signer, KeyRing, Signer, primary};
    use proptest::prelude::*;

    const N: usize = 4;

    struct Cluster {
        keys: Vec<Ed25519Signer>,
        client: Ed25519Signer,
        ring: KeyRing,
    }

    fn cluster() -> Cluster {
        let keys: Vec<_> = (0..N as u8)
            .map(|i| Ed25519Signer::from_secret([i; 32]))
            .collect();
        let client = Ed25519Signer::from_secret([42; 32]);
        let mut ring = KeyRing::new(&keys.iter().map(|k| k.public()).collect::<Vec<_>>()).unwrap();
        ring.add_client(ClientId(7), client.public()).unwrap();
        Cluster { keys, client, ring }
    }

    impl Cluster {
        fn key(&self, id: ReplicaId) -> &dyn Signer {
            &self.keys[id.0 as usize]
        }

        fn requests(&self) -> Vec<Request> {
            let ops = [
                Operation::Put {
                    key: b"k".to_vec(),
                    value: b"v".to_vec(),
                },
                Operation::Get { key: b"k".to_vec() },
                Operation::Delete { key: Vec::new() },
                Operation::Cas {
                    key: b"k".to_vec(),
                    expected: None,
                    new: b"n".to_vec(),
                },
                Operation::Cas {
                    key: b"k".to_vec(),
                    expected: Some(Vec::new()),
                    new: Vec::new(),
                },
            ];
            ops.into_iter()
                .enumerate()
                .map(|(i, op)| Request::new_signed(ClientId(7), i as u64 + 1, op, &self.client))
                .collect()
        }

        fn pre_prepare(&self, view: u64, seq: u64) -> Signed<PrePrepare> {
            let batch = Batch::new(self.requests());
            let body = PrePrepare {
                view,
                seq,
                digest: batch.digest(),
                batch,
            };
            Signed::sign(body, self.key(primary(view, N)))
        }

        fn prepared(&self, view: u64, seq: u64) -> PreparedProof {
            let pre_prepare = self.pre_prepare(view, seq);
            let prepares = (1..3)
                .map(|r| {
                    let body = Prepare {
                        view,
                        seq,
                        digest: pre_prepare.body.digest,
                        replica: ReplicaId(r),
                        vouches: true,
                    };
                    Signed::sign(body, self.key(ReplicaId(r)))
                })
                .collect();
            PreparedProof {
                pre_prepare,
                prepares,
            }
        }

        fn checkpoint(&self, seq: u64, r: u32) -> Signed<Checkpoint> {
            let body = Checkpoint {
                seq,
                state_digest: Digest([9; 32]),
                replica: ReplicaId(r),
            };
            Signed::sign(body, self.key(ReplicaId(r)))
        }

        fn cert(&self, seq: u64) -> CheckpointCert {
            CheckpointCert {
                seq,
                digest: Digest([9; 32]),
                signatures: (0..3).map(|r| self.checkpoint(seq, r)).collect(),
            }
        }

        fn view_change(&self, r: u32) -> Signed<ViewChange> {
            let body = ViewChange {
                new_view: 1,
                replica: ReplicaId(r),
                stable_seq: 10,
                checkpoint_proof: self.cert(10).signatures,
                prepared: vec![self.prepared(0, 11), self.prepared(0, 12)],
            };
            Signed::sign(body, self.key(ReplicaId(r)))
        }

        fn block(&self, height: u64, prev_hash: Digest) -> Block {
            let batch = Batch::new(self.requests());
            let certificate = (0..3)
                .map(|r| {
                    let body = Commit {
                        view: 0,
                        seq: height,
                        digest: batch.digest(),
                        replica: ReplicaId(r),
                    };
                    Signed::sign(body, self.key(ReplicaId(r)))
                })
                .collect();
            Block {
                height,
                prev_hash,
                batch,
                results_digest: Digest([3; 32]),
                state_digest: Digest::ZERO,
                view: 0,
                certificate,
            }
        }

        /// One message of every kind, all validly signed.
        fn every_message(&self) -> Vec<Message> {
            let new_view = NewView {
                view: 1,
                view_changes: (0..3).map(|r| self.view_change(r)).collect(),
                pre_prepares: vec![self.pre_prepare(1, 11), self.pre_prepare(1, 12)],
            };
            let b1 = self.block(1, Digest::ZERO);
            let b2 = self.block(2, b1.hash());
            vec![
                Message::Request(self.requests().remove(3)),
                Message::PrePrepare(self.pre_prepare(0, 1)),
                Message::Prepare(self.prepared(0, 1).prepares.remove(0)),
                Message::Commit(b1.certificate[1].clone()),
                Message::Checkpoint(self.checkpoint(10, 2)),
                Message::ViewChange(self.view_change(3)),
                Message::NewView(Signed::sign(new_view, self.key(primary(1, N)))),
                Message::SyncRequest(SyncRequest {
                    from_height: 5,
                    max_blocks: 64,
                }),
                Message::SyncResponse(SyncResponse {
                    blocks: vec![b1, b2],
                    checkpoint: Some(self.cert(10)),
                }),
                Message::SyncResponse(SyncResponse {
                    blocks: Vec::new(),
                    checkpoint: None,
                }),
                Message::StatusAnnouncement(Signed::sign(
                    StatusAnnouncement {
                        view: 3,
                        height: 41,
                        replica: ReplicaId(1),
                    },
                    self.key(ReplicaId(1)),
                )),
            ]
        }
    }

    /// Every signature inside a message verifies, so a conversion that altered any signed byte
    /// would be caught.
    fn assert_verifies(msg: &Message, ring: &KeyRing) {
        let ok = match msg {
            Message::Request(r) => r.verify(ring),
            Message::PrePrepare(m) => m.verify(N, ring) && m.body.digest == m.body.batch.digest(),
            Message::Prepare(m) => m.verify(N, ring),
            Message::Commit(m) => m.verify(N, ring),
            Message::Checkpoint(m) => m.verify(N, ring),
            Message::ViewChange(m) => m.verify(N, ring),
            Message::NewView(m) => {
                m.verify(N, ring) && m.body.view_changes.iter().all(|vc| vc.verify(N, ring))
            }
            Message::SyncRequest(_) => true,
            Message::StatusAnnouncement(m) => m.verify(N, ring),
            Message::SyncResponse(r) => {
                let mut prev = Digest::ZERO;
                let blocks_ok = r.blocks.iter().all(|b| {
                    let ok = b.verify(b.height, &prev, N, 3, ring).is_ok();
                    prev = b.hash();
                    ok
                });
                blocks_ok && r.checkpoint.as_ref().is_none_or(|c| c.verify(N, 3, ring))
            }
        };
        assert!(ok, "{} does not verify", msg.kind());
    }

    fn roundtrip(msg: &Message) -> Message {
        let bytes = to_envelope(msg, ReplicaId(2), "replica-2").encode_to_vec();
        let (envelope, back) = decode_envelope(&bytes).expect("decodes");
        assert_eq!(envelope.node_id, "replica-2");
        back
    }

    #[test]
    fn every_message_roundtrips_and_still_verifies() {
        let c = cluster();
        for msg in c.every_message() {
            assert_verifies(&msg, &c.ring);
            let back = roundtrip(&msg);
            assert_eq!(back, msg, "{} changed on the wire", msg.kind());
            assert_verifies(&back, &c.ring);
        }
    }

    #[test]
    fn envelope_header_and_new_view_signature_follow_the_proto_rules() {
        let c = cluster();
        for msg in c.every_message() {
            let env = to_envelope(&msg, ReplicaId(2), "r2");
            match &msg {
                Message::PrePrepare(m) => {
                    assert_eq!((env.view, env.sequence), (m.body.view, m.body.seq));
                    assert_eq!(env.digest, m.body.digest.0);
                }
                Message::Checkpoint(m) => {
                    assert_eq!(env.sequence, m.body.seq);
                    assert_eq!(env.digest, m.body.state_digest.0);
                }
                Message::NewView(m) => {
                    assert_eq!(env.view, m.body.view);
                    assert_eq!(env.signature, m.signature.0);
                }
                Message::StatusAnnouncement(m) => {
                    assert_eq!((env.view, env.sequence), (m.body.view, m.body.height));
                    assert!(env.digest.is_empty());
                }
                Message::SyncRequest(_) => {
                    let Ok(Payload::SyncRequest(r)) = env.decode_payload() else {
                        panic!("not a sync request");
                    };
                    assert_eq!(r.replica_id, 2);
                }
                _ => {}
            }
            if !matches!(msg, Message::NewView(_)) {
                assert!(env.signature.is_empty());
            }
        }
    }

    #[test]
    fn every_core_type_roundtrips_through_bytes() {
        fn check<T: Wire + PartialEq + std::fmt::Debug>(value: T) {
            assert_eq!(T::from_bytes(&value.to_bytes()).unwrap(), value);
        }
        let c = cluster();
        for op in c.requests().into_iter().map(|r| r.op) {
            check(op);
        }
        for result in [
            OpResult::Value(None),
            OpResult::Value(Some(Vec::new())),
            OpResult::Written,
            OpResult::Deleted(true),
            OpResult::Deleted(false),
            OpResult::CasOk,
            OpResult::CasMismatch(None),
            OpResult::CasMismatch(Some(b"x".to_vec())),
        ] {
            check(Reply {
                view: 3,
                timestamp: 9,
                client: ClientId(7),
                replica: ReplicaId(u32::MAX),
                result: result.clone(),
            });
            check(result);
        }
        check(Batch::default());
        check(Batch::new(c.requests()));
        check(c.prepared(2, 5));
        check(c.cert(10));
        check(CheckpointCert::genesis());
        check(c.block(1, Digest::ZERO));
        check(c.block(7, Digest([1; 32])));
        let mut snapshot = Snapshot::default();
        check(snapshot.clone());
        snapshot.insert(b"a", b"1");
        snapshot.insert(b"", b"");
        snapshot.insert_client(
            ClientId(7),
            ClientRecord {
                timestamp: 4,
                result: OpResult::CasMismatch(None),
            },
        );
        check(snapshot.clone());
        check(StableCheckpoint {
            cert: c.cert(10),
            snapshot: std::sync::Arc::new(snapshot),
            block_hash: Digest([5; 32]),
        });
    }

    #[test]
    fn streamed_stable_checkpoints_are_the_same_bytes() {
        let c = cluster();
        let streamed = |stable: &StableCheckpoint| {
            let mut out = Vec::new();
            write_stable_checkpoint(stable, &mut out).unwrap();
            out
        };
        let mut snapshot = Snapshot::default();
        let mut states = vec![snapshot.clone()];
        // Empty keys and values (left out of the encoding), then a state of several
        // chunks, with values long enough for two-byte lengths and every kind of result.
        snapshot.insert(b"", b"");
        snapshot.insert(b"k", b"");
        states.push(snapshot.clone());
        for i in 0..3_000u32 {
            let value = vec![i as u8; (i as usize * 7) % 700];
            snapshot.insert(format!("key-{i}").as_bytes(), &value);
        }
        for (i, result) in [
            OpResult::Value(None),
            OpResult::Value(Some(b"v".to_vec())),
            OpResult::Written,
            OpResult::Deleted(true),
            OpResult::CasOk,
            OpResult::CasMismatch(Some(vec![9; 300])),
        ]
        .into_iter()
        .enumerate()
        {
            snapshot.insert_client(
                ClientId(i as u64 * 1_000),
                ClientRecord {
                    timestamp: u64::MAX - i as u64,
                    result,
                },
            );
        }
        states.push(snapshot);
        for state in states {
            for (cert, hash) in [
                (CheckpointCert::genesis(), Digest::ZERO),
                (c.cert(10), Digest([5; 32])),
            ] {
                let stable = StableCheckpoint {
                    cert,
                    snapshot: std::sync::Arc::new(state.clone()),
                    block_hash: hash,
                };
                let bytes = streamed(&stable);
                assert_eq!(bytes, stable.to_bytes());
                assert_eq!(StableCheckpoint::from_bytes(&bytes).unwrap(), stable);
            }
        }
    }

    fn envelope(t: MessageType, payload: Payload) -> pb::PbftMessage {
        let mut env = payload.into_envelope("r0");
        env.set_type(t);
        env
    }

    fn reason(env: &pb::PbftMessage) -> &'static str {
        from_envelope(env).expect_err("must be rejected").reason()
    }

    #[test]
    fn malformed_envelopes_are_rejected_with_the_right_reason() {
        let c = cluster();
        let good = to_envelope(
            &Message::Prepare(c.prepared(0, 1).prepares[0].clone()),
            ReplicaId(0),
            "r0",
        );
        assert!(from_envelope(&good).is_ok());

        // Short digest, consistent header: passes pbft-api, fails here.
        let Ok(Payload::Prepare(mut p)) = good.decode_payload() else {
            panic!()
        };
        p.body.as_mut().unwrap().digest.truncate(31);
        let env = envelope(MessageType::Prepare, Payload::Prepare(p.clone()));
        let err = from_envelope(&env).unwrap_err();
        assert_eq!(err.reason(), "bad_length");
        assert!(err.to_string().contains("Prepare.digest"), "{err}");

        // Short signature.
        let mut q = good.decode_payload().unwrap();
        if let Payload::Prepare(q) = &mut q {
            q.signature.pop();
        }
        assert_eq!(reason(&envelope(MessageType::Prepare, q)), "bad_length");

        // Missing body.
        p.body = None;
        assert_eq!(
            reason(&envelope(MessageType::Prepare, Payload::Prepare(p))),
            "missing_field"
        );

        // Unknown and unspecified types.
        let mut env = good.clone();
        env.r#type = 99;
        assert_eq!(reason(&env), "unknown_type");
        env.r#type = 0;
        assert_eq!(reason(&env), "unknown_type");

        // Garbage payload bytes.
        let mut env = good.clone();
        env.payload = vec![0xff; 7];
        assert_eq!(reason(&env), "decode");

        // Header that lies about the payload.
        let mut env = good.clone();
        env.sequence += 1;
        assert_eq!(reason(&env), "header_mismatch");

        // A signature where none belongs, and none where one must be.
        let mut env = good.clone();
        env.signature = vec![1; 64];
        assert_eq!(reason(&env), "unexpected_field");
        let nv = c.every_message().remove(6);
        let mut env = to_envelope(&nv, ReplicaId(1), "r1");
        env.signature.clear();
        assert_eq!(reason(&env), "bad_length");

        // Request without an operation, operation without a kind.
        let mut r = c.requests()[0].to_pb();
        r.operation = Some(pb::Operation { kind: None });
        assert_eq!(
            reason(&envelope(MessageType::Request, Payload::Request(r.clone()))),
            "missing_field"
        );
        r.operation = None;
        assert_eq!(
            reason(&envelope(MessageType::Request, Payload::Request(r))),
            "missing_field"
        );

        // Garbage envelope bytes.
        assert_eq!(
            decode_envelope(&[0x0a, 0xff]).unwrap_err().reason(),
            "decode"
        );
    }

    #[test]
    fn oversized_lists_are_rejected_before_conversion() {
        let c = cluster();
        let request = c.requests()[0].to_pb();
        let batch = pb::Batch {
            requests: vec![request; MAX_BATCH_REQUESTS + 1],
        };
        let err = Batch::from_pb(batch).unwrap_err();
        assert_eq!(err.reason(), "too_many");

        let proof = c.prepared(0, 1).to_pb();
        let mut vc = c.view_change(0).body.to_pb();
        vc.prepared = vec![proof; MAX_PREPARED_PROOFS + 1];
        assert_eq!(ViewChange::from_pb(vc).unwrap_err().reason(), "too_many");

        let mut block = c.block(1, Digest::ZERO).to_pb();
        let commit = block.commit_certificate[0].clone();
        block.commit_certificate = vec![commit; MAX_CERTIFICATE_SIGNATURES + 1];
        assert_eq!(Block::from_pb(block).unwrap_err().reason(), "too_many");
    }

    #[test]
    fn sync_response_certificates_and_snapshots_must_be_consistent() {
        let c = cluster();
        let mut resp = SyncResponse {
            blocks: Vec::new(),
            checkpoint: Some(c.cert(10)),
        }
        .to_pb();
        resp.checkpoints.push(c.checkpoint(20, 3).to_pb());
        assert_eq!(
            SyncResponse::from_pb(resp).unwrap_err().reason(),
            "inconsistent"
        );

        let entry = pb::KvEntry {
            key: b"k".to_vec(),
            value: Vec::new(),
        };
        let snapshot = pb::StateSnapshot {
            entries: vec![entry.clone(), entry],
            clients: Vec::new(),
        };
        assert_eq!(
            Snapshot::from_pb(snapshot).unwrap_err().reason(),
            "duplicate"
        );
    }

    proptest! {
        #[test]
        fn random_envelope_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_envelope(&bytes);
        }

        #[test]
        fn random_payloads_never_panic(
            t in 0i32..12,
            payload in proptest::collection::vec(any::<u8>(), 0..512),
            signature in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            let env = pb::PbftMessage { r#type: t, payload, signature, ..Default::default() };
            let _ = from_envelope(&env);
        }

        /// Mutating one byte of a valid encoding either fails cleanly or gives a message; it
        /// never panics.
        #[test]
        fn mutated_valid_messages_never_panic(which in 0usize..10, pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let c = cluster();
            let msg = c.every_message().remove(which);
            let mut bytes = to_envelope(&msg, ReplicaId(0), "r0").encode_to_vec();
            let i = pos.index(bytes.len());
            bytes[i] = byte;
            let _ = decode_envelope(&bytes);
        }
    }
}
