//! The client library against four in-process stand-ins for replicas that answer the
//! client API as scripted, so that what faulty replicas say can be chosen exactly: a
//! result is accepted only when f+1 = 2 replicas agree, and a refusal fails a request only
//! when f+1 different replicas send one. Replies carry no signatures (the channel
//! authenticates them), so a stand-in answers like a replica would.

use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use pbft_api::convert::Wire;
use pbft_api::pb;
use pbft_api::pb::client_service_server::{ClientService, ClientServiceServer};
use pbft_client::{Client, ClientError, ClientOptions};
use pbft_core::{ClientId, OpResult, ReplicaId, Reply};
use tonic::{Request, Response, Status, Streaming};

/// What a stand-in says to every request.
#[derive(Clone, Copy)]
enum Script {
    /// Executes it: `Written`.
    Honest,
    /// Claims another outcome.
    Lies,
    /// Refuses it for good, `times` times over in one reply batch.
    RefusesRepeatedly { times: usize },
    /// Never answers.
    Silent,
}

#[derive(Clone)]
struct StandIn {
    id: u32,
    script: Script,
    /// Honest stand-ins answer this late, so that the faulty ones are heard first.
    delay: Duration,
}

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl StandIn {
    fn answer(&self, req: &pb::Request) -> pb::ReplyBatch {
        let reply = |result| {
            Reply {
                view: 0,
                timestamp: req.timestamp,
                client: ClientId(req.client_id),
                replica: ReplicaId(self.id),
                result,
            }
            .to_pb()
        };
        match self.script {
            Script::Honest => pb::ReplyBatch {
                replies: vec![reply(OpResult::Written)],
                rejections: vec![],
            },
            Script::Lies => pb::ReplyBatch {
                replies: vec![reply(OpResult::Deleted(true))],
                rejections: vec![],
            },
            Script::RefusesRepeatedly { times } => pb::ReplyBatch {
                replies: vec![],
                rejections: vec![
                    pb::Rejection {
                        client_id: req.client_id,
                        timestamp: req.timestamp,
                        reason: format!("malformed request (a lie of replica {})", self.id),
                        retryable: false,
                    };
                    times
                ],
            },
            Script::Silent => pb::ReplyBatch::default(),
        }
    }
}

#[tonic::async_trait]
impl ClientService for StandIn {
    async fn submit(&self, _: Request<pb::Request>) -> Result<Response<pb::Reply>, Status> {
        Err(Status::unimplemented("stand-ins answer SubmitBatches only"))
    }

    type SubmitStreamStream = Out<pb::Reply>;

    async fn submit_stream(
        &self,
        _: Request<Streaming<pb::Request>>,
    ) -> Result<Response<Self::SubmitStreamStream>, Status> {
        Err(Status::unimplemented("stand-ins answer SubmitBatches only"))
    }

    type SubmitBatchesStream = Out<pb::ReplyBatch>;

    async fn submit_batches(
        &self,
        request: Request<Streaming<pb::RequestBatch>>,
    ) -> Result<Response<Self::SubmitBatchesStream>, Status> {
        let me = self.clone();
        let answers = request
            .into_inner()
            .filter_map(|batch| async { batch.ok() })
            .flat_map(|batch| futures_util::stream::iter(batch.requests))
            .then(move |req| {
                let me = me.clone();
                async move {
                    tokio::time::sleep(me.delay).await;
                    Ok(me.answer(&req))
                }
            });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn get_status(
        &self,
        _: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        Err(Status::unimplemented("not needed here"))
    }
}

/// Starts one stand-in per script (ids 0..4, id 0 the primary of view 0) on loopback and
/// returns a client of them.
async fn cluster(scripts: [Script; 4]) -> Client {
    let mut addrs = Vec::new();
    for (id, script) in scripts.into_iter().enumerate() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        addrs.push(listener.local_addr().expect("addr").to_string());
        let delay = match script {
            Script::Honest => Duration::from_millis(100),
            _ => Duration::ZERO,
        };
        let service = StandIn {
            id: id as u32,
            script,
            delay,
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ClientServiceServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
    }
    Client::connect(ClientOptions {
        replicas: addrs,
        client_id: 7,
        secret: [7; 32],
        timeout: Duration::from_secs(2),
        retry_after: Duration::from_millis(300),
        ..ClientOptions::default()
    })
    .await
    .expect("client")
}

#[tokio::test]
async fn one_replica_repeating_a_refusal_cannot_fail_a_request() {
    // The primary refuses every request three times in one batch, ahead of the others.
    let client = cluster([
        Script::RefusesRepeatedly { times: 3 },
        Script::Honest,
        Script::Honest,
        Script::Honest,
    ])
    .await;
    for i in 0..3 {
        let key = format!("k{i}");
        client
            .put(key.as_bytes(), b"v")
            .await
            .expect("f+1 honest replies win over one replica's repeated refusals");
    }
}

#[tokio::test]
async fn refusals_from_f_plus_one_replicas_fail_the_request_with_their_reason() {
    let client = cluster([
        Script::RefusesRepeatedly { times: 1 },
        Script::RefusesRepeatedly { times: 1 },
        Script::Silent,
        Script::Silent,
    ])
    .await;
    match client.put(b"k", b"v").await {
        Err(ClientError::Rejected(reason)) => assert!(reason.contains("malformed"), "{reason}"),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn one_lying_replica_cannot_choose_the_result() {
    let client = cluster([Script::Lies, Script::Honest, Script::Honest, Script::Honest]).await;
    client
        .put(b"k", b"v")
        .await
        .expect("the honest result, agreed by f+1, not the lie");
}

#[tokio::test]
async fn without_f_plus_one_matching_replies_there_is_no_result() {
    // Two honest replicas are silent: the one honest reply never gets a second.
    let client = cluster([Script::Lies, Script::Honest, Script::Silent, Script::Silent]).await;
    match client.put(b"k", b"v").await {
        Err(ClientError::NoQuorum { .. }) => {}
        other => panic!("expected no quorum, got {other:?}"),
    }
}

#[tokio::test]
async fn fewer_than_f_plus_one_answers_is_a_timeout() {
    // One honest reply, three silent replicas: not a disagreement, too few answers.
    let client = cluster([
        Script::Honest,
        Script::Silent,
        Script::Silent,
        Script::Silent,
    ])
    .await;
    match client.put(b"k", b"v").await {
        Err(ClientError::Timeout {
            answered: 1,
            needed: 2,
            ..
        }) => {}
        other => panic!("expected a timeout with one answer, got {other:?}"),
    }
}
