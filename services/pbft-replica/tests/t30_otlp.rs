//! OTLP export: a real cluster whose replicas have `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at an
//! in-process OTLP/gRPC trace receiver. After a few requests and a SIGTERM the receiver must
//! hold the spans of a request's life (`submit`, `execute`, `persist`), under
//! `service.name = pbft-replica` and tagged with the replica id. The exporter's batch delay is
//! set to a minute, so nothing is sent while the replicas run: the spans arriving at all proves
//! that shutdown flushes them.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Cluster, N};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use tokio_stream::wrappers::TcpListenerStream;

/// A span as received: its resource's attributes and its own.
#[derive(Debug, Clone)]
struct Received {
    name: String,
    service: Option<String>,
    replica: Option<i64>,
    attrs: Vec<(String, Value)>,
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Str(String),
    Int(i64),
    Other,
}

fn value(v: &Option<AnyValue>) -> Value {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => Value::Str(s.clone()),
        Some(any_value::Value::IntValue(i)) => Value::Int(*i),
        _ => Value::Other,
    }
}

fn find<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a KeyValue> {
    attrs.iter().find(|kv| kv.key == key)
}

/// Collects every exported span.
#[derive(Default, Clone)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.spans.lock().expect("lock");
        for rs in request.into_inner().resource_spans {
            let res = rs.resource.map(|r| r.attributes).unwrap_or_default();
            let service = match find(&res, "service.name").map(|kv| value(&kv.value)) {
                Some(Value::Str(s)) => Some(s),
                _ => None,
            };
            let replica = match find(&res, "pbft.replica_id").map(|kv| value(&kv.value)) {
                Some(Value::Int(i)) => Some(i),
                _ => None,
            };
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                out.push(Received {
                    name: span.name,
                    service: service.clone(),
                    replica,
                    attrs: span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), value(&kv.value)))
                        .collect(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Received {
    /// An integer attribute; tracing-opentelemetry sends `u64` fields as decimal strings.
    fn int(&self, key: &str) -> Option<i128> {
        match self.attrs.iter().find(|(k, _)| k == key).map(|(_, v)| v)? {
            Value::Int(i) => Some(i128::from(*i)),
            Value::Str(s) => s.parse().ok(),
            Value::Other => None,
        }
    }
}

#[test]
fn spans_reach_the_otlp_receiver() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let receiver = Receiver::default();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr, server) = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(receiver.clone()))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stop_rx.await;
                }),
        );
        (addr, server)
    });

    let endpoint = format!("http://{addr}");
    let mut c = Cluster::start_with_env(
        "grpc",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", ""),
            ("OTEL_BSP_SCHEDULE_DELAY", "60000"),
        ],
    );
    c.wait_all_ready();
    let client = rt.block_on(c.client(0));
    rt.block_on(async {
        for i in 0..5 {
            let key = format!("otlp-{i}");
            client
                .put(key.as_bytes(), b"v")
                .await
                .unwrap_or_else(|e| panic!("put {key}: {e}"));
        }
    });
    c.wait_agree(&[0, 1, 2, 3], 5, Duration::from_secs(20));

    // SIGTERM: each replica flushes its queued spans before it exits.
    assert!(
        receiver.spans.lock().expect("lock").is_empty(),
        "spans were exported before shutdown; the flush is not what is being tested"
    );
    for i in 0..N {
        let t = Instant::now();
        let st = c.terminate(i).expect("replica was running");
        println!("replica {i} stopped in {:?}", t.elapsed());
        assert!(
            st.success(),
            "replica {i} exited with {st:?}\n{}",
            common::tail(&c.log(i), 30)
        );
    }

    let wanted = ["submit", "execute", "persist"];
    let deadline = Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans = receiver.spans.lock().expect("lock").clone();
        let names: BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        if wanted.iter().all(|w| names.contains(w)) || Instant::now() > deadline {
            break spans;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = stop_tx.send(());
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    });

    let names: BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    for w in wanted {
        assert!(names.contains(w), "no `{w}` span received; got {names:?}");
    }
    for s in &spans {
        assert_eq!(
            s.service.as_deref(),
            Some("pbft-replica"),
            "service.name of {s:?}"
        );
        let id = s
            .replica
            .unwrap_or_else(|| panic!("no pbft.replica_id on {s:?}"));
        assert!((0..N as i64).contains(&id), "replica id of {s:?}");
    }

    // Every put went through a `submit` span carrying the client and its timestamp.
    let submits: Vec<&Received> = spans.iter().filter(|s| s.name == "submit").collect();
    assert!(
        submits.len() >= 5
            && submits
                .iter()
                .all(|s| s.int("client") == Some(0) && s.int("timestamp").is_some_and(|t| t > 0)),
        "submit spans without client/timestamp: {submits:?}"
    );
    // Each replica executed the blocks: every one reports `execute` spans, with the height,
    // request count and view of what it executed, up to the last put.
    for i in 0..N as i64 {
        let top = spans
            .iter()
            .filter(|s| s.name == "execute" && s.replica == Some(i))
            .filter_map(|s| s.int("height"))
            .max();
        assert!(
            top.is_some_and(|h| h >= 5),
            "replica {i}: highest executed height in spans {top:?}"
        );
    }
    let executes: Vec<&Received> = spans.iter().filter(|s| s.name == "execute").collect();
    assert!(
        executes
            .iter()
            .all(|s| s.int("requests").is_some() && s.int("view").is_some()),
        "execute spans without requests/view: {executes:?}"
    );
    assert!(
        executes
            .iter()
            .map(|s| s.int("requests").unwrap_or(0))
            .sum::<i128>()
            >= 5 * N as i128,
        "every replica executed the five puts: {executes:?}"
    );
    let persists: Vec<&Received> = spans.iter().filter(|s| s.name == "persist").collect();
    assert!(
        persists
            .iter()
            .all(|s| s.int("ops").is_some_and(|n| n >= 1)),
        "persist spans without an op count: {persists:?}"
    );
}
