//! Logging and tracing: structured `tracing` output on stderr (text or JSON, filtered by
//! `RUST_LOG`), plus OTLP span export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! The two outputs are filtered apart: `RUST_LOG` decides what is logged, while the exporter
//! always gets this crate's spans at INFO and above (`submit`, `execute`, `persist`), so turning
//! logs down does not silently empty the traces, and turning them up does not feed the
//! exporter's own gRPC client back into itself. Spans are batched by the SDK and sent by a tonic
//! client driven by the Tokio runtime `init` was called on; the returned [`Telemetry`] must be
//! shut down (or dropped) inside that runtime so the last batch is flushed before exit.

use std::time::Duration;

use anyhow::{Context, Result};
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The OTel `service.name` unless `OTEL_SERVICE_NAME` says otherwise.
pub const SERVICE_NAME: &str = "pbft-replica";

/// Resource attribute carrying the replica id, so one collector can tell the replicas apart.
pub const REPLICA_ID_ATTRIBUTE: &str = "pbft.replica_id";

/// How long shutdown may spend flushing spans to an unresponsive collector.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps the span exporter alive; shutting it down flushes the spans still queued.
#[must_use = "dropping the guard shuts the span exporter down"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are being exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes queued spans and stops the exporter (at most a few seconds).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        // The flush waits for the tonic client, which runs on this runtime: on a worker
        // thread, hand the worker's other tasks off before blocking.
        let flush = move || provider.shutdown_with_timeout(FLUSH_TIMEOUT);
        let result = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(flush)
            }
            _ => flush(),
        };
        if let Err(e) = result {
            eprintln!("warning: flushing spans to the OTLP collector failed: {e}");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether the standard OTel variables ask for trace export.
fn otlp_endpoint_set() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
}

/// Builds the OTLP/gRPC tracer provider; the endpoint, timeout and headers come from the
/// standard `OTEL_EXPORTER_OTLP_*` variables, batching from `OTEL_BSP_*`.
fn tracer_provider(replica_id: Option<u32>) -> Result<SdkTracerProvider> {
    tokio::runtime::Handle::try_current()
        .context("OTLP export needs a Tokio runtime: call telemetry::init inside one")?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .context("cannot build the OTLP span exporter (check OTEL_EXPORTER_OTLP_ENDPOINT)")?;
    let service_name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| SERVICE_NAME.to_string());
    let mut resource = Resource::builder().with_service_name(service_name);
    if let Some(id) = replica_id {
        resource = resource.with_attributes([
            KeyValue::new(REPLICA_ID_ATTRIBUTE, i64::from(id)),
            KeyValue::new("service.instance.id", id.to_string()),
        ]);
    }
    Ok(SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter)
        .build())
}

/// Installs the global subscriber: logs on stderr (`json` selects JSON lines) and, when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set, OTLP span export tagged with `replica_id`.
///
/// Call it inside the Tokio runtime that will outlive the replica, and keep the returned guard
/// until the end: its shutdown flushes the spans not yet sent.
pub fn init(json: bool, replica_id: Option<u32>) -> Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_target(false)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        // Colours only for a terminal: log files and collectors get plain text.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .boxed()
    };
    let provider = otlp_endpoint_set()
        .then(|| tracer_provider(replica_id))
        .transpose()?;
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(SERVICE_NAME))
            .with_filter(Targets::new().with_target(env!("CARGO_CRATE_NAME"), Level::INFO))
    });
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
    Ok(Telemetry { provider })
}
