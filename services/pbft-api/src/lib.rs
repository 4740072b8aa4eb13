//! The PBFT wire API: protobuf messages and gRPC services of package `pbft.v1`.
//!
//! This is the only crate that generates code from `proto/pbft/v1`, so every
//! other crate agrees on one set of wire types. The generated types live in
//! [`pb`]; the consensus core has its own Rust types, and [`convert`] is the one
//! module that maps between the two (the replica and the client both use it).
//!
//! Besides the generated code this crate holds the one rule the generated code
//! cannot express: which payload message each [`MessageType`] carries and which
//! envelope header fields it determines ([`Payload`]). Keeping it here means the
//! gRPC and TCP transports cannot disagree about it.

#![warn(missing_docs)]

use std::fmt;

use prost::Message as _;

// Error-variant fields and trait methods there are self-describing; the types carry docs.
#[allow(missing_docs)]
pub mod convert;

pub mod pb {
    //! Code generated from `proto/pbft/v1` by `tonic-prost-build` (see `build.rs`).
    //!
    //! Documentation comes from the `.proto` comments, and the crate-level
    //! `missing_docs` lint (an error under `clippy -D warnings`) makes an
    //! undocumented message or field fail the build. Service traits are
    //! `#[tonic::async_trait]` traits; the MESSAGE_TYPE_ prefix is stripped
    //! from enum variants (`MessageType::PrePrepare`).

    tonic::include_proto!("pbft.v1");
}

pub use pb::client_service_client::ClientServiceClient;
pub use pb::client_service_server::{ClientService, ClientServiceServer};
pub use pb::pbft_service_client::PbftServiceClient;
pub use pb::pbft_service_server::{PbftService, PbftServiceServer};
pub use pb::{MessageType, PbftMessage};

/// Why an envelope's payload could not be turned into a [`Payload`].
///
/// Every variant means a malformed message from the network: the receiver
/// drops it and counts the reason, it never trusts or panics on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The type is a number this version does not know. Proto3 enums are open,
    /// so such values decode without error and must be rejected here.
    #[error("unknown message type {0}")]
    UnknownMessageType(i32),
    /// The type was left at its zero value, which no sender uses.
    #[error("message type is unspecified")]
    UnspecifiedMessageType,
    /// The payload bytes are not a valid encoding of the type's message.
    #[error("cannot decode {message_type} payload")]
    Decode {
        /// The type the payload was decoded as.
        message_type: MessageType,
        /// What prost found wrong.
        #[source]
        source: prost::DecodeError,
    },
    /// The envelope's view, sequence or digest differs from what its payload
    /// says; the header is only a hint, so a lying one makes the message invalid.
    #[error("{message_type} envelope header disagrees with its payload")]
    HeaderMismatch {
        /// The envelope's type.
        message_type: MessageType,
    },
}

/// The result type of this crate's fallible functions.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Display for MessageType {
    /// Writes the proto name without the `MESSAGE_TYPE_` prefix (`PRE_PREPARE`),
    /// short enough for logs and metric labels.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.as_str_name();
        f.write_str(name.strip_prefix("MESSAGE_TYPE_").unwrap_or(name))
    }
}

/// The decoded payload of a [`PbftMessage`]: one variant per [`MessageType`]
/// that carries one, holding the message that type is defined to carry.
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    /// `MESSAGE_TYPE_PRE_PREPARE`.
    PrePrepare(pb::SignedPrePrepare),
    /// `MESSAGE_TYPE_PREPARE`.
    Prepare(pb::SignedPrepare),
    /// `MESSAGE_TYPE_COMMIT`.
    Commit(pb::SignedCommit),
    /// `MESSAGE_TYPE_CHECKPOINT`.
    Checkpoint(pb::SignedCheckpoint),
    /// `MESSAGE_TYPE_VIEW_CHANGE`.
    ViewChange(pb::SignedViewChange),
    /// `MESSAGE_TYPE_NEW_VIEW`; its signature travels in [`PbftMessage::signature`].
    NewView(pb::NewView),
    /// `MESSAGE_TYPE_REQUEST`: a client request forwarded to the primary.
    Request(pb::Request),
    /// `MESSAGE_TYPE_SYNC_REQUEST`.
    SyncRequest(pb::SyncRequest),
    /// `MESSAGE_TYPE_SYNC_RESPONSE`.
    SyncResponse(pb::SyncResponse),
    /// `MESSAGE_TYPE_STATUS_ANNOUNCEMENT`.
    StatusAnnouncement(pb::SignedStatusAnnouncement),
}

impl Payload {
    /// The envelope type this payload travels under.
    pub fn message_type(&self) -> MessageType {
        match self {
            Self::PrePrepare(_) => MessageType::PrePrepare,
            Self::Prepare(_) => MessageType::Prepare,
            Self::Commit(_) => MessageType::Commit,
            Self::Checkpoint(_) => MessageType::Checkpoint,
            Self::ViewChange(_) => MessageType::ViewChange,
            Self::NewView(_) => MessageType::NewView,
            Self::Request(_) => MessageType::Request,
            Self::SyncRequest(_) => MessageType::SyncRequest,
            Self::SyncResponse(_) => MessageType::SyncResponse,
            Self::StatusAnnouncement(_) => MessageType::StatusAnnouncement,
        }
    }

    /// Decodes `bytes` as the message `message_type` carries.
    pub fn decode(message_type: MessageType, bytes: &[u8]) -> Result<Self> {
        let decode_error = |source| Error::Decode {
            message_type,
            source,
        };
        Ok(match message_type {
            MessageType::Unspecified => return Err(Error::UnspecifiedMessageType),
            MessageType::PrePrepare => {
                Self::PrePrepare(pb::SignedPrePrepare::decode(bytes).map_err(decode_error)?)
            }
            MessageType::Prepare => {
                Self::Prepare(pb::SignedPrepare::decode(bytes).map_err(decode_error)?)
            }
            MessageType::Commit => {
                Self::Commit(pb::SignedCommit::decode(bytes).map_err(decode_error)?)
            }
            MessageType::Checkpoint => {
                Self::Checkpoint(pb::SignedCheckpoint::decode(bytes).map_err(decode_error)?)
            }
            MessageType::ViewChange => {
                Self::ViewChange(pb::SignedViewChange::decode(bytes).map_err(decode_error)?)
            }
            MessageType::NewView => {
                Self::NewView(pb::NewView::decode(bytes).map_err(decode_error)?)
            }
            MessageType::Request => {
                Self::Request(pb::Request::decode(bytes).map_err(decode_error)?)
            }
            MessageType::SyncRequest => {
                Self::SyncRequest(pb::SyncRequest::decode(bytes).map_err(decode_error)?)
            }
            MessageType::SyncResponse => {
                Self::SyncResponse(pb::SyncResponse::decode(bytes).map_err(decode_error)?)
            }
            MessageType::StatusAnnouncement => Self::StatusAnnouncement(
                pb::SignedStatusAnnouncement::decode(bytes).map_err(decode_error)?,
            ),
        })
    }

    /// Encodes the payload alone, as it goes into [`PbftMessage::payload`].
    pub fn encode_to_vec(&self) -> Vec<u8> {
        match self {
            Self::PrePrepare(m) => m.encode_to_vec(),
            Self::Prepare(m) => m.encode_to_vec(),
            Self::Commit(m) => m.encode_to_vec(),
            Self::Checkpoint(m) => m.encode_to_vec(),
            Self::ViewChange(m) => m.encode_to_vec(),
            Self::NewView(m) => m.encode_to_vec(),
            Self::Request(m) => m.encode_to_vec(),
            Self::SyncRequest(m) => m.encode_to_vec(),
            Self::SyncResponse(m) => m.encode_to_vec(),
            Self::StatusAnnouncement(m) => m.encode_to_vec(),
        }
    }

    /// The envelope header `(view, sequence, digest)` this payload determines,
    /// as documented on `PBFTMessage` in `types.proto`: zero or empty where the
    /// payload has no such field (or its body is missing).
    pub fn header(&self) -> (u64, u64, &[u8]) {
        const NONE: (u64, u64, &[u8]) = (0, 0, &[]);
        match self {
            Self::PrePrepare(m) => m
                .body
                .as_ref()
                .map_or(NONE, |b| (b.view, b.sequence, &b.digest)),
            Self::Prepare(m) => m
                .body
                .as_ref()
                .map_or(NONE, |b| (b.view, b.sequence, &b.digest)),
            Self::Commit(m) => m
                .body
                .as_ref()
                .map_or(NONE, |b| (b.view, b.sequence, &b.digest)),
            Self::Checkpoint(m) => m
                .body
                .as_ref()
                .map_or(NONE, |b| (0, b.sequence, &b.state_digest)),
            Self::ViewChange(m) => m.body.as_ref().map_or(NONE, |b| (b.new_view, 0, &[])),
            Self::NewView(m) => (m.view, 0, &[]),
            Self::StatusAnnouncement(m) => {
                m.body.as_ref().map_or(NONE, |b| (b.view, b.height, &[]))
            }
            Self::Request(_) | Self::SyncRequest(_) | Self::SyncResponse(_) => NONE,
        }
    }

    /// Wraps the payload in an envelope from `node_id`, with the type and the
    /// header it determines filled in. The envelope signature is left empty;
    /// for `NewView` the caller sets it (see `PBFTMessage.signature`).
    pub fn into_envelope(self, node_id: impl Into<String>) -> PbftMessage {
        let (view, sequence, digest) = self.header();
        let mut message = PbftMessage {
            r#type: 0,
            view,
            sequence,
            digest: digest.to_vec(),
            node_id: node_id.into(),
            signature: Vec::new(),
            payload: self.encode_to_vec(),
        };
        message.set_type(self.message_type());
        message
    }
}

impl PbftMessage {
    /// The envelope's type, rejecting values this version does not know.
    ///
    /// Prefer this to the generated `r#type()` accessor, which silently maps an
    /// unknown value to `MessageType::Unspecified`.
    pub fn message_type(&self) -> Result<MessageType> {
        MessageType::try_from(self.r#type).map_err(|_| Error::UnknownMessageType(self.r#type))
    }

    /// Decodes the payload as the message the envelope's type names, and checks
    /// that the header agrees with it. Authenticity is not checked here: that
    /// needs keys and is the consensus core's job.
    pub fn decode_payload(&self) -> Result<Payload> {
        let message_type = self.message_type()?;
        let payload = Payload::decode(message_type, &self.payload)?;
        if payload.header() != (self.view, self.sequence, self.digest.as_slice()) {
            return Err(Error::HeaderMismatch { message_type });
        }
        Ok(payload)
    }
}
