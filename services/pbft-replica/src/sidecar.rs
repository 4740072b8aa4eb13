//! The HTTP sidecar on its own port: `/healthz` (the node loop is alive), `/readyz`
//! (connected to a quorum's worth of peers and caught up), `/metrics` (Prometheus) and
//! `/status` (JSON).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::metrics::Metrics;
use crate::status::SharedStatus;

/// The node loop goes round at least every millisecond; this much silence means it is stuck.
const HEALTH_STALL_MS: u64 = 2_000;

#[derive(Clone)]
pub struct Sidecar {
    pub status: Arc<SharedStatus>,
    pub metrics: Metrics,
    pub ready_max_lag: u64,
}

pub fn router(s: Sidecar) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(s)
}

async fn healthz(State(s): State<Sidecar>) -> Response {
    let silent = s.status.since_heartbeat_ms();
    if silent > HEALTH_STALL_MS {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("node loop stalled for {silent} ms\n"),
        )
            .into_response();
    }
    (StatusCode::OK, "ok\n").into_response()
}

/// Why the replica is not ready, or `None` when it is.
pub fn not_ready_reason(s: &Sidecar) -> Option<String> {
    let v = s.status.snapshot();
    let connected = v.peers.iter().filter(|p| p.connected).count();
    let needed = 2 * v.f;
    if v.n == 0 {
        return Some("starting".into());
    }
    if connected < needed {
        return Some(format!(
            "connected to {connected} peers, need at least {needed} (2f)"
        ));
    }
    if let Some(target) = v.sync_target {
        let lag = target.saturating_sub(v.height);
        if lag > s.ready_max_lag {
            return Some(format!(
                "catching up: height {} of {target} (lag {lag} > {})",
                v.height, s.ready_max_lag
            ));
        }
    }
    None
}

async fn readyz(State(s): State<Sidecar>) -> Response {
    match not_ready_reason(&s) {
        None => (StatusCode::OK, "ready\n").into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

async fn metrics(State(s): State<Sidecar>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

async fn status(State(s): State<Sidecar>) -> Response {
    s.status.request_digest();
    axum::Json(s.status.snapshot()).into_response()
}
