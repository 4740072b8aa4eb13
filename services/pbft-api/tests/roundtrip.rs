//! Proves the generated wire types and services work: every envelope payload
//! survives an encode/decode round trip, malformed bytes are rejected with an
//! error instead of a panic, and a generated client can call a generated server.

use std::pin::Pin;

use pbft_api::pb::{self, op_result, operation};
use pbft_api::{
    ClientService, ClientServiceClient, ClientServiceServer, Error, MessageType, Payload,
    PbftMessage, PbftService, PbftServiceClient, PbftServiceServer,
};
use prost::Message;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

fn digest(byte: u8) -> Vec<u8> {
    vec![byte; 32]
}

fn signature(byte: u8) -> Vec<u8> {
    vec![byte; 64]
}

fn request(client_id: u64, timestamp: u64, kind: operation::Kind) -> pb::Request {
    pb::Request {
        client_id,
        timestamp,
        operation: Some(pb::Operation { kind: Some(kind) }),
        signature: signature(0xC1),
    }
}

/// One request of every operation kind, with both presence states of `Cas.expected`.
fn every_operation() -> Vec<pb::Request> {
    let kinds = [
        operation::Kind::Put(operation::Put {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
        }),
        operation::Kind::Get(operation::Get { key: b"k".to_vec() }),
        operation::Kind::Delete(operation::Delete { key: b"k".to_vec() }),
        operation::Kind::Cas(operation::Cas {
            key: b"k".to_vec(),
            expected: None,
            new_value: b"new".to_vec(),
        }),
        operation::Kind::Cas(operation::Cas {
            key: b"k".to_vec(),
            expected: Some(Vec::new()),
            new_value: b"new".to_vec(),
        }),
    ];
    kinds
        .into_iter()
        .enumerate()
        .map(|(i, kind)| request(7, i as u64 + 1, kind))
        .collect()
}

fn batch() -> pb::Batch {
    pb::Batch {
        requests: every_operation(),
    }
}

fn signed_pre_prepare(view: u64, sequence: u64) -> pb::SignedPrePrepare {
    pb::SignedPrePrepare {
        body: Some(pb::PrePrepare {
            view,
            sequence,
            digest: digest(0xAA),
            batch: Some(batch()),
        }),
        signature: signature(0x01),
    }
}

fn signed_prepare(replica_id: u32) -> pb::SignedPrepare {
    pb::SignedPrepare {
        body: Some(pb::Prepare {
            view: 3,
            sequence: 42,
            digest: digest(0xAA),
            replica_id,
            unvouched: false,
        }),
        signature: signature(0x02),
    }
}

fn signed_commit(replica_id: u32) -> pb::SignedCommit {
    pb::SignedCommit {
        body: Some(pb::Commit {
            view: 3,
            sequence: 42,
            digest: digest(0xAA),
            replica_id,
        }),
        signature: signature(0x03),
    }
}

fn signed_checkpoint(replica_id: u32) -> pb::SignedCheckpoint {
    pb::SignedCheckpoint {
        body: Some(pb::Checkpoint {
            sequence: 40,
            state_digest: digest(0xBB),
            replica_id,
        }),
        signature: signature(0x04),
    }
}

fn signed_view_change(replica_id: u32) -> pb::SignedViewChange {
    pb::SignedViewChange {
        body: Some(pb::ViewChange {
            new_view: 4,
            replica_id,
            stable_sequence: 40,
            checkpoint_proof: (0..3).map(signed_checkpoint).collect(),
            prepared: vec![pb::PreparedProof {
                pre_prepare: Some(signed_pre_prepare(3, 42)),
                prepares: (1..3).map(signed_prepare).collect(),
            }],
        }),
        signature: signature(0x05),
    }
}

fn block(height: u64) -> pb::Block {
    pb::Block {
        height,
        prev_hash: digest(0xCC),
        batch: Some(batch()),
        results_digest: digest(0xDD),
        state_digest: digest(0xEE),
        view: 3,
        commit_certificate: (0..3).map(signed_commit).collect(),
    }
}

/// One payload of every kind that travels in an envelope.
fn every_payload() -> Vec<Payload> {
    vec![
        Payload::PrePrepare(signed_pre_prepare(3, 42)),
        Payload::Prepare(signed_prepare(1)),
        Payload::Commit(signed_commit(2)),
        Payload::Checkpoint(signed_checkpoint(0)),
        Payload::ViewChange(signed_view_change(1)),
        Payload::NewView(pb::NewView {
            view: 4,
            view_changes: (0..3).map(signed_view_change).collect(),
            pre_prepares: vec![signed_pre_prepare(4, 41), signed_pre_prepare(4, 42)],
        }),
        Payload::Request(every_operation().remove(3)),
        Payload::SyncRequest(pb::SyncRequest {
            from_height: 10,
            max_blocks: 256,
            replica_id: 3,
        }),
        Payload::SyncResponse(pb::SyncResponse {
            blocks: vec![block(10), block(11)],
            checkpoints: (0..3).map(signed_checkpoint).collect(),
            peer_height: 11,
        }),
    ]
}

#[test]
fn every_payload_kind_round_trips_through_an_envelope() {
    let payloads = every_payload();
    let mut seen: Vec<MessageType> = payloads.iter().map(Payload::message_type).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 9, "one payload per non-zero MessageType");

    for payload in payloads {
        let message_type = payload.message_type();
        let (view, sequence, digest) = payload.header();
        let (view, sequence, digest) = (view, sequence, digest.to_vec());

        let envelope = payload.clone().into_envelope("replica-1");
        let bytes = envelope.encode_to_vec();
        let decoded = PbftMessage::decode(bytes.as_slice()).expect("envelope decodes");

        assert_eq!(decoded, envelope, "{message_type}");
        assert_eq!(decoded.message_type().unwrap(), message_type);
        assert_eq!(decoded.r#type(), message_type);
        assert_eq!((decoded.view, decoded.sequence), (view, sequence));
        assert_eq!(decoded.digest, digest);
        assert_eq!(decoded.node_id, "replica-1");
        assert_eq!(decoded.decode_payload().unwrap(), payload, "{message_type}");
    }
}

#[test]
fn envelope_header_is_taken_from_the_payload() {
    let envelope = Payload::PrePrepare(signed_pre_prepare(3, 42)).into_envelope("r0");
    assert_eq!((envelope.view, envelope.sequence), (3, 42));
    assert_eq!(envelope.digest, digest(0xAA));

    let envelope = Payload::Checkpoint(signed_checkpoint(0)).into_envelope("r0");
    assert_eq!((envelope.view, envelope.sequence), (0, 40));
    assert_eq!(envelope.digest, digest(0xBB));

    let envelope = Payload::ViewChange(signed_view_change(1)).into_envelope("r0");
    assert_eq!((envelope.view, envelope.sequence), (4, 0));
    assert!(envelope.digest.is_empty());
}

#[test]
fn optional_bytes_keep_absent_apart_from_empty() {
    let results = [
        op_result::Kind::Value(op_result::Value { value: None }),
        op_result::Kind::Value(op_result::Value {
            value: Some(Vec::new()),
        }),
        op_result::Kind::Written(op_result::Written {}),
        op_result::Kind::Deleted(op_result::Deleted { existed: true }),
        op_result::Kind::CasOk(op_result::CasOk {}),
        op_result::Kind::CasMismatch(op_result::CasMismatch { current: None }),
        op_result::Kind::CasMismatch(op_result::CasMismatch {
            current: Some(Vec::new()),
        }),
    ];
    for kind in results {
        let reply = pb::Reply {
            view: 2,
            timestamp: 9,
            client_id: 7,
            replica_id: 1,
            result: Some(pb::OpResult { kind: Some(kind) }),
        };
        let decoded = pb::Reply::decode(reply.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, reply);
    }

    let cas = |expected| {
        request(
            1,
            1,
            operation::Kind::Cas(operation::Cas {
                key: b"k".to_vec(),
                expected,
                new_value: b"v".to_vec(),
            }),
        )
    };
    let absent = cas(None).encode_to_vec();
    let empty = cas(Some(Vec::new())).encode_to_vec();
    assert_ne!(
        absent, empty,
        "absent and empty `expected` must differ on the wire"
    );
    assert_eq!(pb::Request::decode(absent.as_slice()).unwrap(), cas(None));
    assert_eq!(
        pb::Request::decode(empty.as_slice()).unwrap(),
        cas(Some(Vec::new()))
    );
}

#[test]
fn unknown_message_type_is_an_error_not_unspecified() {
    // Field 1 (type, varint) = 99: a type from some future version.
    let bytes = [0x08, 99];
    // Proto3 enums are open: the envelope itself decodes, keeping the raw value...
    let envelope = PbftMessage::decode(&bytes[..]).expect("open enum decodes");
    assert_eq!(envelope.r#type, 99);
    // ...and the generated accessor silently maps it to the zero value,
    assert_eq!(envelope.r#type(), MessageType::Unspecified);
    // which is why the checked accessor exists.
    assert!(matches!(
        envelope.message_type(),
        Err(Error::UnknownMessageType(99))
    ));
    assert!(matches!(
        envelope.decode_payload(),
        Err(Error::UnknownMessageType(99))
    ));

    let unspecified = PbftMessage::default();
    assert!(matches!(
        unspecified.decode_payload(),
        Err(Error::UnspecifiedMessageType)
    ));
}

#[test]
fn truncated_envelope_never_decodes_to_the_original() {
    let envelope = Payload::ViewChange(signed_view_change(2)).into_envelope("replica-2");
    let bytes = envelope.encode_to_vec();
    let mut errors = 0;
    for len in 0..bytes.len() {
        // Cutting at a field boundary yields a valid, shorter message; cutting
        // inside a field must be an error. Neither may panic or reproduce the
        // original.
        match PbftMessage::decode(&bytes[..len]) {
            Ok(decoded) => assert_ne!(decoded, envelope, "prefix of {len} bytes"),
            Err(_) => errors += 1,
        }
    }
    assert!(errors > bytes.len() / 2, "most cuts land inside a field");

    // Cut inside the payload field (the last one written): a decode error.
    let cut = &bytes[..bytes.len() - 1];
    assert!(PbftMessage::decode(cut).is_err());
}

#[test]
fn truncated_or_garbage_payload_is_a_decode_error() {
    let mut envelope = Payload::PrePrepare(signed_pre_prepare(3, 42)).into_envelope("r0");
    envelope.payload.truncate(envelope.payload.len() / 2);
    let err = envelope.decode_payload().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Decode {
                message_type: MessageType::PrePrepare,
                ..
            }
        ),
        "{err:?}"
    );

    envelope.payload = vec![0xFF; 16];
    assert!(matches!(
        envelope.decode_payload(),
        Err(Error::Decode { .. })
    ));
}

#[test]
fn header_that_disagrees_with_payload_is_rejected() {
    let mut envelope = Payload::Commit(signed_commit(1)).into_envelope("r1");
    envelope.sequence += 1;
    assert!(matches!(
        envelope.decode_payload(),
        Err(Error::HeaderMismatch {
            message_type: MessageType::Commit
        })
    ));
}

#[test]
fn message_type_displays_without_prefix() {
    assert_eq!(MessageType::PrePrepare.to_string(), "PRE_PREPARE");
    assert_eq!(MessageType::SyncResponse.to_string(), "SYNC_RESPONSE");
    assert_eq!(
        MessageType::from_str_name("MESSAGE_TYPE_VIEW_CHANGE"),
        Some(MessageType::ViewChange)
    );
}

/// A PBFTService whose GetStatus answers a fixed status and whose MessageStream
/// echoes every message back; the rest is unimplemented.
struct FixedReplica;

fn fixed_status() -> pb::GetStatusResponse {
    pb::GetStatusResponse {
        node_id: "replica-2".into(),
        replica_id: 2,
        view: 5,
        primary: 1,
        height: 1234,
        stable_checkpoint: 1200,
        state_digest: digest(0x5D),
        peers: vec![pb::PeerStatus {
            node_id: "replica-0".into(),
            replica_id: 0,
            address: "10.0.0.1:7000".into(),
            connected: true,
        }],
        view_change_in_progress: false,
    }
}

type EchoStream = Pin<Box<dyn Stream<Item = Result<PbftMessage, Status>> + Send>>;

#[tonic::async_trait]
impl PbftService for FixedReplica {
    type MessageStreamStream = EchoStream;

    async fn message_stream(
        &self,
        request: Request<Streaming<PbftMessage>>,
    ) -> Result<Response<EchoStream>, Status> {
        Ok(Response::new(Box::pin(request.into_inner())))
    }

    async fn broadcast_message(
        &self,
        _: Request<pb::BroadcastRequest>,
    ) -> Result<Response<pb::BroadcastResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn send_message(
        &self,
        _: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn sync_state(
        &self,
        _: Request<pb::SyncStateRequest>,
    ) -> Result<Response<pb::SyncStateResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn get_checkpoint(
        &self,
        _: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<pb::GetCheckpointResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn get_status(
        &self,
        _: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        Ok(Response::new(fixed_status()))
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<pb::Reply, Status>> + Send>>;
type ReplyBatchStream = Pin<Box<dyn Stream<Item = Result<pb::ReplyBatch, Status>> + Send>>;

/// A ClientService that "executes" every request as a successful put.
#[tonic::async_trait]
impl ClientService for FixedReplica {
    type SubmitStreamStream = ReplyStream;
    type SubmitBatchesStream = ReplyBatchStream;

    async fn submit(&self, request: Request<pb::Request>) -> Result<Response<pb::Reply>, Status> {
        Ok(Response::new(written_reply(&request.into_inner())))
    }

    async fn submit_stream(
        &self,
        _: Request<Streaming<pb::Request>>,
    ) -> Result<Response<ReplyStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn submit_batches(
        &self,
        _: Request<Streaming<pb::RequestBatch>>,
    ) -> Result<Response<ReplyBatchStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn get_status(
        &self,
        _: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        Ok(Response::new(fixed_status()))
    }
}

fn written_reply(request: &pb::Request) -> pb::Reply {
    pb::Reply {
        view: 5,
        timestamp: request.timestamp,
        client_id: request.client_id,
        replica_id: 2,
        result: Some(pb::OpResult {
            kind: Some(op_result::Kind::Written(op_result::Written {})),
        }),
    }
}

#[tokio::test]
async fn generated_client_talks_to_generated_server() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PbftServiceServer::new(FixedReplica))
            .add_service(ClientServiceServer::new(FixedReplica))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );

    let endpoint = format!("http://{addr}");
    let mut replica = PbftServiceClient::connect(endpoint.clone()).await.unwrap();

    let status = replica.get_status(pb::GetStatusRequest {}).await.unwrap();
    assert_eq!(status.into_inner(), fixed_status());

    let err = replica
        .sync_state(pb::SyncStateRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);

    let sent: Vec<PbftMessage> = every_payload()
        .into_iter()
        .map(|p| p.into_envelope("replica-0"))
        .collect();
    let echoed: Vec<PbftMessage> = replica
        .message_stream(tokio_stream::iter(sent.clone()))
        .await
        .unwrap()
        .into_inner()
        .map(|m| m.expect("echoed message"))
        .collect()
        .await;
    assert_eq!(echoed, sent, "bidirectional stream keeps order and content");

    let mut client = ClientServiceClient::connect(endpoint).await.unwrap();
    let submitted = every_operation().remove(0);
    let reply = client.submit(submitted.clone()).await.unwrap().into_inner();
    assert_eq!(reply, written_reply(&submitted));
    let status = client.get_status(pb::GetStatusRequest {}).await.unwrap();
    assert_eq!(status.into_inner(), fixed_status());

    stop.send(()).unwrap();
    server.await.unwrap().expect("server shuts down cleanly");
}
