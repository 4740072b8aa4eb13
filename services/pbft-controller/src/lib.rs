//! `pbft-controller`: a Kubernetes operator that turns a `PbftCluster` resource into a running
//! PBFT cluster (StatefulSet, Services, PodDisruptionBudget, ConfigMap, key Secret) and writes
//! what the replicas report back into the resource's status.
//!
//! [`run`] wires the parts: the HTTP server (`/healthz`, `/metrics`) runs on every instance,
//! the reconcile loop ([`controller`]) only on the instance holding the leader Lease
//! ([`leader`]). Objects are described by pure builders ([`resources`]); replica state is
//! read and folded by [`status`]. The RBAC the controller needs is listed in [`controller`].

pub mod controller;
pub mod crd;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod resources;
pub mod status;

#[cfg(test)]
pub(crate) mod fixtures;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::info;

/// Everything that can fail in the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed a request.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// No usable Kubernetes client configuration (kubeconfig or in-cluster).
    #[error("Kubernetes client configuration: {0}")]
    Config(String),
    /// The PbftCluster CRD cannot be listed.
    #[error("cannot list PbftCluster objects (is the CRD installed and the RBAC granted?): {0}")]
    CrdMissing(String),
    /// An object could not be turned into YAML.
    #[error("YAML: {0}")]
    Yaml(String),
    /// A stored object lacks a field the API server always sets.
    #[error("object has no {0}")]
    MissingField(&'static str),
    /// The operating system gave no randomness for a key.
    #[error("random source: {0}")]
    Random(String),
    /// A replica's `/status` could not be read.
    #[error("replica status at {url}: {message}")]
    ReplicaStatus {
        /// The URL asked.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// This instance lost (or could not keep) the leader Lease.
    #[error("leadership lost: {0}")]
    LeadershipLost(String),
    /// The metrics registry refused a metric.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Socket trouble (the HTTP listener).
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// A short label for the failure metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.is_conflict() => "conflict",
            Error::Kube(_) => "kube",
            Error::Config(_) => "config",
            Error::CrdMissing(_) => "crd_missing",
            Error::Yaml(_) => "yaml",
            Error::MissingField(_) => "missing_field",
            Error::Random(_) => "random",
            Error::ReplicaStatus { .. } => "replica_status",
            Error::LeadershipLost(_) => "leadership",
            Error::Metrics(_) => "metrics",
            Error::Io(_) => "io",
        }
    }
}

/// Result with the controller's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How the controller process runs (from flags and environment, see `main.rs`).
#[derive(Clone, Debug)]
pub struct Config {
    /// Watch only this namespace; all namespaces when `None`.
    pub namespace: Option<String>,
    /// Address of `/healthz` and `/metrics`.
    pub http_listen: SocketAddr,
    /// Name of the leader-election Lease.
    pub lease_name: String,
    /// Namespace of the Lease (the controller's own).
    pub lease_namespace: String,
    /// This instance's identity in the Lease and in events (its pod name).
    pub identity: String,
    /// DNS domain of the Kubernetes cluster.
    pub cluster_domain: String,
    /// Status refresh interval of a healthy cluster.
    pub requeue: Duration,
}

/// Runs the controller until `shutdown` fires (then releases the Lease and returns `Ok`) or
/// leadership is lost (an error: the process should exit and restart as a candidate).
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let metrics = metrics::Metrics::new()?;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| Error::Config(e.to_string()))?;
    controller::check_crd(&client, config.namespace.as_deref()).await?;

    let stop = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind(config.http_listen).await?;
    info!(addr = %config.http_listen, "http listening");
    let server = tokio::spawn(http::serve(
        listener,
        metrics.clone(),
        stop.clone().cancelled_owned(),
    ));

    let settings = controller::Settings {
        cluster_domain: config.cluster_domain.clone(),
        requeue: config.requeue,
        ..controller::Settings::default()
    };
    let ctx = Arc::new(controller::Context::new(
        client.clone(),
        metrics.clone(),
        Arc::new(status::HttpFetcher::default()),
        settings,
        Some(config.identity.clone()),
    ));
    let elector = leader::LeaderElector::new(
        client,
        leader::LeaseSettings::new(
            &config.lease_name,
            &config.lease_namespace,
            &config.identity,
        ),
    );
    let work = controller::run(
        ctx,
        config.namespace.clone(),
        stop.clone().cancelled_owned(),
    );
    let outcome = {
        let stop = stop.clone();
        elector
            .run(
                &metrics,
                async move {
                    shutdown.await;
                    stop.cancel();
                },
                work,
            )
            .await
    };
    stop.cancel();
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "http server failed"),
        Err(e) => tracing::warn!(error = %e, "http server task failed"),
    }
    outcome
}
