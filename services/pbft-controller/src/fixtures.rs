//! Test helpers: PbftCluster objects built fluently, a scripted mock API server that asserts
//! each request the controller makes (method, path, query, body) and answers it, and a fake
//! `/status` fetcher. Every wait is bounded, so a request that never comes fails the test
//! instead of hanging it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use kube::client::Body;
use kube::{Client, Resource};
use serde_json::Value;
use tower_test::mock::{self, Handle, SendResponse};

use crate::Error;
use crate::controller::{Context, Settings};
use crate::crd::{PbftCluster, PbftClusterSpec, PbftClusterStatus};
use crate::metrics::Metrics;
use crate::status::{FetchFuture, ReplicaStatus, StatusFetcher};

/// Longest wait for anything in a test.
pub const BOUND: Duration = Duration::from_secs(10);

/// Awaits `fut`, failing the test if it takes longer than [`BOUND`].
pub async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, fut)
        .await
        .expect("timed out: a request was never made or never answered")
}

impl PbftCluster {
    /// A stored-looking cluster `name` in namespace `ns` (uid and generation set).
    pub fn test(name: &str) -> Self {
        let mut c = PbftCluster::new(name, PbftClusterSpec::default());
        let meta = c.meta_mut();
        meta.namespace = Some("ns".into());
        meta.uid = Some(format!("uid-{name}"));
        meta.generation = Some(1);
        meta.resource_version = Some("100".into());
        c
    }

    /// With `spec.replicas = n`.
    pub fn replicas(mut self, n: i32) -> Self {
        self.spec.replicas = n;
        self
    }

    /// As if the controller had deployed it with `n` replicas before.
    pub fn deployed(mut self, n: i32) -> Self {
        self.status = Some(PbftClusterStatus {
            replicas: Some(n),
            ..PbftClusterStatus::default()
        });
        self
    }
}

/// The server side of a mock Kubernetes API.
pub struct ApiServer {
    handle: Handle<Request<Body>, Response<Body>>,
}

/// One request the controller made, with its body parsed as JSON (`Null` when empty).
pub struct Exchange {
    /// The query string (`fieldManager=...&force=true`).
    pub query: String,
    /// The content type the client sent.
    pub content_type: String,
    /// The request body.
    pub body: Value,
    send: SendResponse<Response<Body>>,
}

/// Answers one request.
pub struct Reply(SendResponse<Response<Body>>);

fn respond(send: SendResponse<Response<Body>>, code: u16, body: &Value) {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let response = Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Body::from(bytes))
        .unwrap_or_else(|_| Response::new(Body::empty()));
    send.send_response(response);
}

fn status_body(code: u16, reason: &str) -> Value {
    serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": format!("mock: {reason}"),
        "reason": reason,
        "code": code,
    })
}

impl Reply {
    /// 200 with `body`.
    pub fn ok(self, body: Value) {
        respond(self.0, 200, &body);
    }

    /// 201 with `body`.
    pub fn created(self, body: Value) {
        respond(self.0, 201, &body);
    }

    /// An API error (`Status` object) with `code` and `reason`.
    pub fn status(self, code: u16, reason: &str) {
        respond(self.0, code, &status_body(code, reason));
    }
}

impl Exchange {
    /// The body, and the means to answer.
    pub fn json(self) -> (Value, Reply) {
        (self.body, Reply(self.send))
    }

    /// 200 with `body`.
    pub fn ok(self, body: Value) {
        respond(self.send, 200, &body);
    }

    /// 200 echoing the request body (what an apply answers, near enough).
    pub fn echo(self) {
        let body = self.body.clone();
        respond(self.send, 200, &body);
    }

    /// 404 NotFound.
    pub fn not_found(self) {
        respond(self.send, 404, &status_body(404, "NotFound"));
    }

    /// An API error with `code` and `reason`.
    pub fn status(self, code: u16, reason: &str) {
        respond(self.send, code, &status_body(code, reason));
    }
}

impl ApiServer {
    /// A client talking to a new mock server.
    pub fn new() -> (Client, ApiServer) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        (Client::new(service, "default"), ApiServer { handle })
    }

    /// The next request, which must be `method path` (query aside).
    pub async fn expect(&mut self, method: &str, path: &str) -> Exchange {
        let (request, send) = tokio::time::timeout(BOUND, self.handle.next_request())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {method} {path}"))
            .unwrap_or_else(|| panic!("client gone before {method} {path}"));
        let got = format!("{} {}", request.method(), request.uri().path());
        assert_eq!(got, format!("{method} {path}"), "unexpected request");
        let query = request.uri().query().unwrap_or_default().to_owned();
        let content_type = request
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .expect("readable request body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON request body")
        };
        Exchange {
            query,
            content_type,
            body,
            send,
        }
    }

    /// The next request must be a server-side apply by `pbft-controller` to `path`.
    pub async fn expect_apply(&mut self, path: &str) -> Exchange {
        let e = self.expect("PATCH", path).await;
        assert_eq!(e.content_type, "application/apply-patch+yaml", "{path}");
        assert!(
            e.query.contains("fieldManager=pbft-controller") && e.query.contains("force=true"),
            "{path}?{}",
            e.query
        );
        e
    }

    /// No further request arrives (checked for a short while).
    pub async fn done(mut self) {
        if let Ok(Some((request, _))) =
            tokio::time::timeout(Duration::from_millis(100), self.handle.next_request()).await
        {
            panic!(
                "unexpected extra request: {} {}",
                request.method(),
                request.uri()
            );
        }
    }
}

/// `/status` replies by URL; URLs not listed fail like an unreachable replica.
#[derive(Default)]
pub struct FakeFetcher {
    replies: HashMap<String, ReplicaStatus>,
}

impl FakeFetcher {
    /// Replica `i` of cluster `name` in `ns` answers with view, primary and height.
    pub fn reply(mut self, name: &str, i: i32, view: u64, primary: u32, height: u64) -> Self {
        let url = crate::status::replica_url(name, i, "ns", "cluster.local");
        self.replies.insert(
            url,
            ReplicaStatus {
                id: u32::try_from(i).unwrap_or_default(),
                view,
                primary,
                height,
                ..ReplicaStatus::default()
            },
        );
        self
    }
}

impl StatusFetcher for FakeFetcher {
    fn fetch<'a>(&'a self, url: &'a str) -> FetchFuture<'a> {
        let reply = self.replies.get(url).cloned();
        Box::pin(async move {
            reply.ok_or_else(|| Error::ReplicaStatus {
                url: url.to_owned(),
                message: "connection refused".into(),
            })
        })
    }
}

impl Context {
    /// A context over a mock API server, with `fetcher` for replica status.
    pub fn test(fetcher: FakeFetcher) -> (Arc<Context>, ApiServer) {
        let (client, server) = ApiServer::new();
        let ctx = Context::new(
            client,
            Metrics::new().expect("metrics register"),
            Arc::new(fetcher),
            Settings::default(),
            Some("test".into()),
        );
        (Arc::new(ctx), server)
    }
}

/// Runs `work` against a scripted server task, then checks the script finished and no
/// request was left over. A failed assertion inside the script is re-raised here.
pub async fn scenario<T>(
    script: tokio::task::JoinHandle<ApiServer>,
    work: impl Future<Output = T>,
) -> T {
    let out = bounded(work).await;
    let server = match bounded(script).await {
        Ok(server) => server,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("script task failed: {e}"),
    };
    server.done().await;
    out
}
