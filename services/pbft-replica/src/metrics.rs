//! All replica metrics, in one typed struct on one registry. Transport names follow the
//! seed's TransportMetrics (section 6); consensus metrics come from the core's events.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The replica's metrics.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    // transport (seed section 6)
    pub messages_sent: IntCounterVec,
    pub messages_received: IntCounterVec,
    pub bytes_sent: IntCounterVec,
    pub bytes_received: IntCounterVec,
    pub peer_count: IntGauge,
    pub peer_connected: IntGaugeVec,
    pub connection_errors: IntCounterVec,
    pub send_latency: HistogramVec,
    pub dropped_messages: IntCounterVec,
    // consensus
    pub committed_height: IntGauge,
    pub view: IntGauge,
    pub view_changes: IntCounter,
    pub commit_latency: Histogram,
    pub batch_size: Histogram,
    pub stable_checkpoint: IntGauge,
    pub sync_target: IntGauge,
    pub synced_blocks: IntCounter,
    pub rejected: IntCounterVec,
    pub vouch_timeouts: IntCounterVec,
    pub requests: IntCounterVec,
    pub storage_latency: Histogram,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let m = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let m = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let m = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let m = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let send_latency = HistogramVec::new(
            HistogramOpts::new(
                "pbft_send_latency_seconds",
                "Time to hand one message to a peer's connection",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["peer"],
        )
        .expect("valid metric");
        r.register(Box::new(send_latency.clone()))
            .expect("unique metric");
        let peer_connected = IntGaugeVec::new(
            Opts::new("pbft_peer_connected", "1 while the peer's connection is up"),
            &["peer"],
        )
        .expect("valid metric");
        r.register(Box::new(peer_connected.clone()))
            .expect("unique metric");
        let m = Metrics {
            messages_sent: counter_vec(
                &r,
                "pbft_messages_sent_total",
                "Messages sent to peers",
                &["peer", "type"],
            ),
            messages_received: counter_vec(
                &r,
                "pbft_messages_received_total",
                "Messages received from peers",
                &["peer", "type"],
            ),
            bytes_sent: counter_vec(
                &r,
                "pbft_bytes_sent_total",
                "Bytes sent to peers",
                &["peer"],
            ),
            bytes_received: counter_vec(
                &r,
                "pbft_bytes_received_total",
                "Bytes received from peers",
                &["peer"],
            ),
            peer_count: gauge(
                &r,
                "pbft_peers_connected",
                "Peers with an open connection (the seed's PeerCount; promtool forbids a _count suffix on gauges)",
            ),
            peer_connected,
            connection_errors: counter_vec(
                &r,
                "pbft_connection_errors_total",
                "Failed dials and broken connections",
                &["peer"],
            ),
            send_latency,
            dropped_messages: counter_vec(
                &r,
                "pbft_dropped_messages_total",
                "Outbound messages dropped before sending",
                &["peer", "reason"],
            ),
            committed_height: gauge(
                &r,
                "pbft_committed_height",
                "Height of the last executed block",
            ),
            view: gauge(&r, "pbft_view", "Current view"),
            view_changes: counter(
                &r,
                "pbft_view_changes_total",
                "View changes this replica started",
            ),
            commit_latency: histogram(
                &r,
                "pbft_commit_latency_seconds",
                "From a client request's arrival to its execution here",
                LATENCY_BUCKETS.to_vec(),
            ),
            batch_size: histogram(
                &r,
                "pbft_batch_size",
                "Requests per executed block",
                vec![
                    0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
                ],
            ),
            stable_checkpoint: gauge(
                &r,
                "pbft_stable_checkpoint",
                "Sequence number of the last stable checkpoint",
            ),
            sync_target: gauge(
                &r,
                "pbft_sync_target_height",
                "Height a running state sync is heading for (0 when idle)",
            ),
            synced_blocks: counter(
                &r,
                "pbft_synced_blocks_total",
                "Blocks applied from state sync",
            ),
            rejected: counter_vec(
                &r,
                "pbft_rejected_messages_total",
                "Inputs refused, by reason",
                &["reason"],
            ),
            vouch_timeouts: counter_vec(
                &r,
                "pbft_vouch_timeouts_total",
                "Batches checked here because their designated vouchers were late, by verdict",
                &["verdict"],
            ),
            requests: counter_vec(
                &r,
                "pbft_client_requests_total",
                "Client requests by outcome",
                &["outcome"],
            ),
            storage_latency: histogram(
                &r,
                "pbft_storage_persist_seconds",
                "Time to make one output durable (fsync included)",
                LATENCY_BUCKETS.to_vec(),
            ),
            registry: r,
        };
        // Export every reason from the start, so dashboards and alerts see zeros, not gaps.
        for reason in pbft_core::RejectReason::ALL {
            m.rejected.with_label_values(&[reason.as_str()]);
        }
        for extra in ["malformed", "oversized", "handshake_failed"] {
            m.rejected.with_label_values(&[extra]);
        }
        for verdict in ["valid", "forged"] {
            m.vouch_timeouts.with_label_values(&[verdict]);
        }
        m
    }

    /// Exports a peer's series at zero before anything happens to it, so a peer that was
    /// never reachable shows up in dashboards and alerts instead of being absent.
    pub fn init_peer(&self, peer: &str) {
        self.connection_errors.with_label_values(&[peer]);
        self.bytes_sent.with_label_values(&[peer]);
        self.bytes_received.with_label_values(&[peer]);
        self.peer_connected.with_label_values(&[peer]);
        self.send_latency.with_label_values(&[peer]);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let families = self.registry.gather();
        if TextEncoder::new().encode(&families, &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
