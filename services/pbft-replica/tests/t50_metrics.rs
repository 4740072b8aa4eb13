//! `/metrics` exposes the seed's transport metrics and the consensus metrics, and passes
//! `promtool check metrics` (Debian package `prometheus`; `.ci/run` installs it). `/status`
//! and `/readyz` say what an operator needs.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Cluster;

const EXPECTED: &[&str] = &[
    // the seed's TransportMetrics (section 6)
    "pbft_messages_sent_total",
    "pbft_messages_received_total",
    "pbft_bytes_sent_total",
    "pbft_bytes_received_total",
    "pbft_peers_connected",
    "pbft_connection_errors_total",
    "pbft_send_latency_seconds_bucket",
    // consensus
    "pbft_committed_height",
    "pbft_view",
    "pbft_view_changes_total",
    "pbft_commit_latency_seconds_bucket",
    "pbft_batch_size_bucket",
    "pbft_stable_checkpoint",
    "pbft_sync_target_height",
    "pbft_synced_blocks_total",
    "pbft_rejected_messages_total",
    "pbft_vouch_timeouts_total",
    "pbft_storage_persist_seconds_bucket",
];

#[test]
fn metrics_pass_promtool_and_status_is_complete() {
    let c = Cluster::start("grpc");
    c.wait_all_ready();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = rt.block_on(c.client(0));
    rt.block_on(async {
        for i in 0..12 {
            client
                .put(format!("m-{i}").as_bytes(), b"v")
                .await
                .expect("put");
        }
    });
    c.wait_agree(&[0, 1, 2, 3], 12, Duration::from_secs(20));

    let (code, body) = c.http_get(0, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    for name in EXPECTED {
        assert!(body.contains(name), "/metrics lacks {name}");
    }
    // Every reject reason is exported from the start, at zero if nothing happened.
    assert!(body.contains("pbft_rejected_messages_total{reason=\"bad_signature\"}"));

    let promtool = which("promtool")
        .expect("promtool not found: install the Debian package `prometheus` (make deps does)");
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let s = c.status(2).expect("status");
    for field in [
        "id",
        "view",
        "primary",
        "height",
        "stable_checkpoint",
        "peers",
        "head_hash",
        "state_digest",
        "executed_requests",
    ] {
        assert!(s.get(field).is_some(), "/status lacks {field}: {s}");
    }
    // Twelve puts, each executed by every replica (replica 2 may have caught some up by
    // sync, which executes them too).
    assert!(
        s["executed_requests"].as_u64().unwrap_or(0) >= 12,
        "executed_requests: {s}"
    );
    assert_eq!(s["id"], 2);
    assert_eq!(s["peers"].as_array().map(Vec::len), Some(3));
    assert!(s["stable_checkpoint"].as_u64().unwrap_or(0) >= 8);

    // With two of four replicas gone, the others are alive but not ready: no quorum of peers.
    let mut c = c;
    c.kill(2);
    c.kill(3);
    c.wait_for(
        "replica 0 not ready without 2f peers",
        Duration::from_secs(20),
        |c| {
            c.http_get(0, "/readyz")
                .is_some_and(|(code, body)| code == 503 && body.contains("2f"))
        },
    );
    assert_eq!(c.http_get(0, "/healthz").map(|r| r.0), Some(200));
}

fn which(bin: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(bin))
            .find(|p| p.is_file())
    })
}
