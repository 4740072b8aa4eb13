//! A hostile peer against a live cluster: malformed protobuf, oversized frames, messages
//! with bad signatures and replayed ones. Each must be dropped and counted, the replica must
//! stay up, and the cluster must keep committing. Both transports.

mod common;

use std::time::Duration;

use common::{Cluster, replica_secret};
use pbft_api::convert::to_envelope;
use pbft_api::pb;
use pbft_core::{Digest, Ed25519Signer, Message, Prepare, ReplicaId, Signed};
use prost::Message as _;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("runtime")
}

/// A prepare signed by `signer` but claiming to come from replica `claims`.
fn prepare(signer: usize, claims: u32, seq: u64) -> Message {
    let body = Prepare {
        view: 0,
        seq,
        digest: Digest([seq as u8; 32]),
        replica: ReplicaId(claims),
        vouches: true,
    };
    Message::Prepare(Signed::sign(
        body,
        &Ed25519Signer::from_secret(replica_secret(signer)),
    ))
}

fn rejected(c: &Cluster, i: usize, reason: &str) -> f64 {
    c.metric(
        i,
        "pbft_rejected_messages_total",
        &format!("reason=\"{reason}\""),
    )
}

/// Frames the hostile peer sends, as raw envelope bytes.
fn hostile_envelopes() -> Vec<pb::PbftMessage> {
    let me = ReplicaId(1);
    let name = "replica-1";
    let mut garbage = to_envelope(&prepare(1, 1, 3), me, name);
    garbage.payload = vec![0xff, 0x13, 0x37, 0x00, 0x42];
    let forged = to_envelope(&prepare(2, 1, 4), me, name); // replica 2's key, claims replica 1
    let replayed = to_envelope(&prepare(1, 1, 1), me, name); // a valid vote, sent again below
    vec![garbage, forged, replayed.clone(), replayed]
}

fn check_survives(c: &Cluster, rt: &tokio::runtime::Runtime, transport: &str) {
    let client = rt.block_on(c.client(1));
    rt.block_on(async {
        for i in 0..10 {
            client
                .put(format!("after-{i}").as_bytes(), b"v")
                .await
                .unwrap_or_else(|e| panic!("[{transport}] put after attack: {e}"));
        }
    });
    assert_eq!(c.http_get(0, "/healthz").map(|r| r.0), Some(200));
    c.wait_agree(&[0, 1, 2, 3], 20, Duration::from_secs(20));
}

fn prime(c: &Cluster, rt: &tokio::runtime::Runtime) {
    c.wait_all_ready();
    let client = rt.block_on(c.client(0));
    rt.block_on(async {
        for i in 0..10 {
            client
                .put(format!("before-{i}").as_bytes(), b"v")
                .await
                .expect("put");
        }
    });
}

#[test]
fn grpc_hostile_peer_is_dropped_and_counted() {
    let c = Cluster::start("grpc");
    let rt = rt();
    prime(&c, &rt);
    let addr = format!("http://{}", c.listen[0]);
    rt.block_on(async {
        let mut client = pb::pbft_service_client::PbftServiceClient::connect(addr.clone())
            .await
            .expect("connect")
            .max_encoding_message_size(8 << 20);
        // Malformed, forged and replayed messages on a MessageStream.
        let stream = tokio_stream::iter(hostile_envelopes());
        let mut resp = client
            .message_stream(stream)
            .await
            .expect("stream")
            .into_inner();
        while let Ok(Some(_)) = resp.message().await {}
        // The same through the unary entry point.
        for m in hostile_envelopes() {
            let _ = client
                .broadcast_message(pb::BroadcastRequest { message: Some(m) })
                .await;
        }
        // A frame over the 1 MiB limit: refused before it is decoded.
        let mut big = to_envelope(&prepare(1, 1, 5), ReplicaId(1), "replica-1");
        big.payload = vec![7; 2 << 20];
        let stream = tokio_stream::iter(vec![big]);
        if let Ok(r) = client.message_stream(stream).await {
            let mut r = r.into_inner();
            while let Ok(Some(_)) = r.message().await {}
        }
    });
    c.wait_for("rejections counted", Duration::from_secs(10), |c| {
        rejected(c, 0, "malformed") >= 2.0
            && rejected(c, 0, "bad_signature") >= 2.0
            && rejected(c, 0, "oversized") >= 1.0
            && rejected(c, 0, "duplicate")
                + rejected(c, 0, "out_of_window")
                + rejected(c, 0, "stale_view")
                >= 1.0
    });
    check_survives(&c, &rt, "grpc");
}

#[test]
fn tcp_hostile_peer_is_dropped_and_counted() {
    use futures_util::SinkExt;
    use pbft_replica::transport::tcp::{Identity, handshake_dial};
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::{Framed, LengthDelimitedCodec};

    let c = Cluster::start("tcp");
    let rt = rt();
    prime(&c, &rt);
    let addr = c.listen[0];
    rt.block_on(async {
        // 1. Garbage instead of a handshake: refused.
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _ = s.write_all(b"\x00\x00\x00\x05hello-not-a-handshake").await;
        drop(s);
        // 2. A handshake claiming replica 1 without its key: refused.
        let keys: Vec<_> = (0..4)
            .map(|i| Ed25519Signer::from_secret(replica_secret(i)).public())
            .collect();
        let ring = std::sync::Arc::new(pbft_core::KeyRing::new(&keys).expect("ring"));
        let impostor = Identity {
            me: ReplicaId(1),
            signer: std::sync::Arc::new(Ed25519Signer::from_secret([0x55; 32])),
            verifier: ring.clone(),
            n: 4,
        };
        let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut conn = Framed::new(s, LengthDelimitedCodec::new());
        // Our side of the handshake completes (replica 0 proved itself); replica 0 then
        // checks our proof, refuses it and closes: counted below as handshake_failed.
        let _ = handshake_dial(&mut conn, &impostor, ReplicaId(0)).await;
        // 3. A real peer identity (replica 1's key) sending bad frames.
        let peer = Identity {
            signer: std::sync::Arc::new(Ed25519Signer::from_secret(replica_secret(1))),
            ..impostor
        };
        let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut conn = Framed::new(
            s,
            LengthDelimitedCodec::builder()
                .max_frame_length(8 << 20)
                .new_codec(),
        );
        handshake_dial(&mut conn, &peer, ReplicaId(0))
            .await
            .expect("handshake");
        for m in hostile_envelopes() {
            conn.send(bytes::Bytes::from(m.encode_to_vec()))
                .await
                .expect("send");
        }
        conn.send(bytes::Bytes::from(vec![1u8; 4096]))
            .await
            .expect("send");
        // Oversized: 2 MiB frame against a 1 MiB limit ends the connection.
        let _ = conn.send(bytes::Bytes::from(vec![0u8; 2 << 20])).await;
        let _ = SinkExt::<bytes::Bytes>::flush(&mut conn).await;
    });
    c.wait_for("rejections counted", Duration::from_secs(10), |c| {
        rejected(c, 0, "handshake_failed") >= 2.0
            && rejected(c, 0, "malformed") >= 2.0
            && rejected(c, 0, "bad_signature") >= 1.0
            && rejected(c, 0, "oversized") >= 1.0
            && rejected(c, 0, "duplicate")
                + rejected(c, 0, "out_of_window")
                + rejected(c, 0, "stale_view")
                >= 1.0
    });
    check_survives(&c, &rt, "tcp");
}

/// A signed put from test client `client`.
fn signed_put(client: u64, timestamp: u64, key: &[u8]) -> pb::Request {
    use pbft_api::convert::Wire;
    let signer = Ed25519Signer::from_secret(common::client_secret(client));
    pbft_core::Request::new_signed(
        pbft_core::ClientId(client),
        timestamp,
        pbft_core::Operation::Put {
            key: key.to_vec(),
            value: b"v".to_vec(),
        },
        &signer,
    )
    .to_pb()
}

/// A `SubmitBatches` stream carrying a malformed request next to good ones: the malformed
/// one is answered with a rejection (and counted), a forged one is dropped, the good ones
/// are executed and answered, and the stream keeps serving afterwards.
#[test]
fn grpc_malformed_request_in_a_batch_is_rejected_and_the_stream_goes_on() {
    let c = Cluster::start("grpc");
    let rt = rt();
    prime(&c, &rt);
    rt.block_on(async {
        let addr = format!("http://{}", c.client_addrs[0]);
        let mut client = pb::client_service_client::ClientServiceClient::connect(addr)
            .await
            .expect("connect");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut answers = client
            .submit_batches(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("stream")
            .into_inner();
        let malformed = pb::Request {
            client_id: 3,
            timestamp: 9,
            operation: None,
            signature: vec![1; 64],
        };
        let mut forged = signed_put(1, 1, b"forged");
        forged.client_id = 3; // client 1's signature, claimed by client 3
        // Well-formed protobuf that no replica would order: answered with the reason.
        let shaped = |timestamp: u64, key: &[u8], value: Vec<u8>| {
            use pbft_api::convert::Wire;
            pbft_core::Request {
                client: pbft_core::ClientId(3),
                timestamp,
                op: pbft_core::Operation::Put {
                    key: key.to_vec(),
                    value,
                },
                signature: pbft_core::Signature([0; 64]),
            }
            .to_pb()
        };
        // The test clusters allow 64 KiB (tests/common).
        let too_large = shaped(10, b"k", vec![b'x'; 1 << 16]);
        let empty_key = shaped(11, b"", b"v".to_vec());
        let batch = vec![
            malformed,
            forged,
            too_large,
            empty_key,
            signed_put(2, 1, b"good"),
        ];
        tx.send(pb::RequestBatch { requests: batch })
            .await
            .expect("send");
        let (mut rejections, mut replies) = (Vec::new(), Vec::new());
        let mut next = async |rejections: &mut Vec<pb::Rejection>,
                              replies: &mut Vec<(u64, u64)>| {
            let batch = tokio::time::timeout(Duration::from_secs(20), answers.message())
                .await
                .expect("an answer in time")
                .expect("stream healthy")
                .expect("stream open");
            rejections.extend(batch.rejections);
            replies.extend(batch.replies.iter().map(|r| (r.client_id, r.timestamp)));
        };
        while rejections.len() < 3 || replies.is_empty() {
            next(&mut rejections, &mut replies).await;
        }
        rejections.sort_by_key(|r| r.timestamp);
        let seen: Vec<(u64, u64, bool)> = rejections
            .iter()
            .map(|r| (r.client_id, r.timestamp, r.retryable))
            .collect();
        assert_eq!(seen, vec![(3, 9, false), (3, 10, false), (3, 11, false)]);
        assert!(rejections[0].reason.contains("malformed"), "{rejections:?}");
        assert!(
            rejections[1].reason.contains("too large") && rejections[1].reason.contains("65536"),
            "{rejections:?}"
        );
        assert!(rejections[2].reason.contains("empty key"), "{rejections:?}");
        assert_eq!(replies, vec![(2, 1)], "only the good request is answered");
        // The same stream goes on serving.
        tx.send(pb::RequestBatch {
            requests: vec![signed_put(2, 2, b"good-2")],
        })
        .await
        .expect("send");
        while !replies.contains(&(2, 2)) {
            next(&mut rejections, &mut replies).await;
        }
        assert!(
            !replies.iter().any(|&(client, _)| client == 3),
            "the forged request was never executed"
        );
    });
    assert!(rejected(&c, 0, "malformed") >= 3.0);
    assert!(rejected(&c, 0, "bad_signature") >= 1.0);
    check_survives(&c, &rt, "grpc");
}
