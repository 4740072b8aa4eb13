//! The PBFT replica service: drives `pbft-core` over a real network.
//!
//! `run(config, shutdown)` wires the parts: the redb store, the node loop thread that owns the
//! protocol state, the transport (gRPC or TCP) with one bounded queue per peer, the sync
//! server (`StateProvider`), and the HTTP sidecar. Shutdown stops the listeners, lets the
//! node loop persist its last output, closes the streams and returns.

pub mod config;
pub mod discovery;
pub mod keys;
pub mod metrics;
pub mod node;
pub mod persister;
pub mod sidecar;
pub mod status;
pub mod storage;
pub mod telemetry;
pub mod transport;
pub mod unreplicated;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::serve::ListenerExt as _;
use pbft_core::{Replica, ReplicaId, Storage};
use tracing::{debug, info, warn};

/// How long shutdown waits for the servers to drain before exiting anyway.
const DRAIN: Duration = Duration::from_secs(5);

use crate::config::{Config, TransportKind};
use crate::discovery::PeerResolver;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::status::{PeerTable, SharedStatus};
use crate::storage::RedbStore;
use crate::transport::Outbound;
use crate::transport::grpc::{GrpcOutbound, GrpcServer, GrpcSettings};

/// Peer addresses: listed in the config, or derived from StatefulSet naming.
pub fn peer_addresses(cfg: &Config) -> Vec<(ReplicaId, String)> {
    cfg.replicas
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let addr = match (&cfg.statefulset, &r.address) {
                (Some(s), _) => format!(
                    "{}-{i}.{}.{}.svc.{}:{}",
                    s.name, s.headless_service, s.namespace, s.cluster_domain, s.port
                ),
                (None, Some(a)) => a.clone(),
                (None, None) => String::new(),
            };
            (ReplicaId(i as u32), addr)
        })
        .collect()
}

/// Transport and client-API settings from the configuration.
fn grpc_settings(cfg: &Config) -> Result<GrpcSettings> {
    let tls = cfg
        .tls
        .as_ref()
        .map(transport::tls::TlsMaterial::load)
        .transpose()?;
    Ok(GrpcSettings {
        max_message_bytes: cfg.net.max_message_bytes,
        dial_timeout: cfg.dial_timeout(),
        queue_capacity: cfg.net.queue_capacity,
        backoff_min: Duration::from_millis(cfg.net.backoff_min_ms),
        backoff_max: Duration::from_millis(cfg.net.backoff_max_ms),
        submit_timeout: Duration::from_millis(cfg.submit_timeout_ms),
        max_request_bytes: cfg.protocol.max_request_bytes,
        tls,
    })
}

type Task<E> = tokio::task::JoinHandle<Result<(), E>>;

/// Binds `addr` and serves the gRPC services until `stop` turns true.
async fn spawn_grpc(
    addr: std::net::SocketAddr,
    server: GrpcServer,
    what: &str,
) -> Result<Task<tonic::transport::Error>> {
    let listener = transport::grpc::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    info!(%addr, "{what} listening");
    let mut stop = server.stop.clone();
    Ok(tokio::spawn(server.serve(listener, async move {
        let _ = stop.wait_for(|s| *s).await;
    })))
}

/// Binds the HTTP sidecar and serves it until `stop` turns true.
async fn spawn_sidecar(
    cfg: &Config,
    sidecar: sidecar::Sidecar,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Task<std::io::Error>> {
    let http = tokio::net::TcpListener::bind(cfg.http_listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.http_listen))?;
    info!(addr = %cfg.http_listen, "HTTP sidecar listening");
    // Responses go out without waiting for the peer's acknowledgement of the last segment
    // (Nagle's algorithm), as on the gRPC listeners.
    let http = http.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(error = %e, "cannot set TCP_NODELAY on an HTTP connection");
        }
    });
    let app = sidecar::router(sidecar);
    Ok(tokio::spawn(async move {
        axum::serve(http, app)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
    }))
}

/// Runs the unreplicated benchmark baseline until `shutdown` resolves.
async fn run_unreplicated(
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let ring = Arc::new(keys::key_ring(&cfg)?);
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
    let store = RedbStore::open(&cfg.data_dir.join("pbft.redb"))?;
    let provider: Arc<dyn pbft_core::StateProvider + Send + Sync> = Arc::new(store.reader());
    let metrics = Metrics::new();
    let status = Arc::new(SharedStatus::new(PeerTable::new(Vec::new())));
    status.set(status::StatusView {
        n: 1,
        transport: "unreplicated".into(),
        ..status::StatusView::default()
    });
    let (handle, rx) = node::NodeHandle::channel(metrics.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = GrpcServer {
        stop: stop_rx.clone(),
        n: 1,
        node: handle,
        provider,
        status: status.clone(),
        metrics: metrics.clone(),
        settings: grpc_settings(&cfg)?,
    };
    let server_task = spawn_grpc(
        cfg.listen,
        server,
        "unreplicated baseline (benchmarks only: no fault tolerance)",
    )
    .await?;
    let (loop_status, loop_metrics, loop_stop) = (status.clone(), metrics.clone(), stop.clone());
    let worker = std::thread::Builder::new()
        .name("pbft-unreplicated".into())
        .spawn(move || {
            unreplicated::run_loop(store, ring, rx, loop_status, loop_metrics, loop_stop)
        })
        .context("cannot start worker")?;
    let http_task = spawn_sidecar(
        &cfg,
        sidecar::Sidecar {
            status,
            metrics,
            ready_max_lag: cfg.ready_max_lag,
        },
        stop_rx,
    )
    .await?;
    shutdown.await;
    let _ = stop_tx.send(true);
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(DRAIN, server_task).await;
    let _ = tokio::time::timeout(DRAIN, http_task).await;
    match tokio::task::spawn_blocking(move || worker.join()).await {
        Ok(Ok(r)) => r?,
        _ => anyhow::bail!("unreplicated worker failed"),
    }
    info!("stopped cleanly");
    Ok(())
}

/// Runs a replica until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    id: u32,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    if cfg.unreplicated {
        return run_unreplicated(cfg, shutdown).await;
    }
    cfg.validate(id)?;
    for warning in cfg.warnings() {
        warn!("{warning}");
    }
    let core_cfg = cfg.core_config()?;
    let me = ReplicaId(id);
    // One key, read once: the protocol signs with it, and so does the TCP handshake.
    let key_file = cfg.key_file_for(id);
    let signer = Arc::new(keys::load_signer(&key_file)?);
    let tcp_signer: Arc<dyn pbft_core::Signer> = signer.clone();
    let ring = Arc::new(keys::key_ring(&cfg)?);
    let expected = cfg.replicas[id as usize].public_key.trim().to_lowercase();
    if keys::to_hex(&signer.public().0) != expected {
        anyhow::bail!(
            "key file {} does not match replicas[{id}].public_key",
            key_file.display()
        );
    }

    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
    let db_path = cfg.data_dir.join("pbft.redb");
    let store = RedbStore::open(&db_path)
        .with_context(|| format!("cannot open storage {}", db_path.display()))?;
    let recovered = store
        .recover()
        .with_context(|| format!("cannot recover from {}", db_path.display()))?;
    let replica = Replica::recover(
        core_cfg,
        me,
        Box::new(signer.clone()),
        ring.clone(),
        recovered,
    )
    .context("cannot resume from the stored state; refusing to start")?;
    let st = replica.status();
    info!(id, view = st.view, height = st.last_executed, "recovered");

    let peers = peer_addresses(&cfg);
    let resolver = Arc::new(PeerResolver::new(cfg.statefulset.as_ref())?);
    let metrics = Metrics::new();
    for (p, _) in peers.iter().filter(|(p, _)| *p != me) {
        metrics.init_peer(&p.0.to_string());
    }
    let status = Arc::new(SharedStatus::new(PeerTable::new(
        peers
            .iter()
            .filter(|(p, _)| *p != me)
            .map(|(p, a)| (p.0, a.clone())),
    )));
    let stop = Arc::new(AtomicBool::new(false));
    let provider: Arc<dyn pbft_core::StateProvider + Send + Sync> = Arc::new(store.reader());

    let settings = grpc_settings(&cfg)?;

    // The outbound side needs the node handle and the node needs the outbound side: build
    // the outbound through a slot the node reads after start.
    let slot = Arc::new(transport::LateOutbound::default());
    let (node, handle) = Node::new(
        replica,
        slot.clone(),
        status.clone(),
        metrics.clone(),
        settings.submit_timeout,
        format!("{:?}", cfg.transport).to_lowercase(),
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let grpc_server = || GrpcServer {
        stop: stop_rx.clone(),
        n: cfg.replicas.len(),
        node: handle.clone(),
        provider: provider.clone(),
        status: status.clone(),
        metrics: metrics.clone(),
        settings: settings.clone(),
    };
    let server_task = match cfg.transport {
        TransportKind::Grpc => {
            let outbound = GrpcOutbound::start(
                me,
                peers.clone(),
                resolver.clone(),
                handle.clone(),
                status.clone(),
                metrics.clone(),
                settings.clone(),
                stop.clone(),
            );
            slot.set(outbound as Arc<dyn Outbound>);
            spawn_grpc(cfg.listen, grpc_server(), "gRPC").await?
        }
        TransportKind::Tcp => {
            let identity = transport::tcp::Identity {
                me,
                signer: tcp_signer.clone(),
                verifier: ring.clone(),
                n: cfg.replicas.len(),
            };
            let tcp_settings = transport::tcp::TcpSettings {
                max_message_bytes: settings.max_message_bytes,
                dial_timeout: settings.dial_timeout,
                queue_capacity: settings.queue_capacity,
                backoff_min: settings.backoff_min,
                backoff_max: settings.backoff_max,
            };
            let outbound = transport::tcp::TcpOutbound::start(
                identity.clone(),
                peers.clone(),
                resolver.clone(),
                handle.clone(),
                status.clone(),
                metrics.clone(),
                tcp_settings.clone(),
                stop.clone(),
            );
            slot.set(outbound as Arc<dyn Outbound>);
            let listener = tokio::net::TcpListener::bind(cfg.listen)
                .await
                .with_context(|| format!("cannot listen on {}", cfg.listen))?;
            info!(addr = %cfg.listen, "TCP replica transport listening");
            tokio::spawn(transport::tcp::serve(
                listener,
                identity,
                handle.clone(),
                provider.clone(),
                metrics.clone(),
                tcp_settings,
                stop_rx.clone(),
            ));
            // Clients still speak gRPC, on their own port.
            let client_addr = cfg
                .client_listen
                .context("transport tcp needs `client_listen` (the gRPC client API address)")?;
            spawn_grpc(client_addr, grpc_server(), "gRPC client API").await?
        }
    };

    let http_task = spawn_sidecar(
        &cfg,
        sidecar::Sidecar {
            status: status.clone(),
            metrics: metrics.clone(),
            ready_max_lag: cfg.ready_max_lag,
        },
        stop_rx.clone(),
    )
    .await?;

    let node_stop = stop.clone();
    let node_thread = std::thread::Builder::new()
        .name("pbft-node".into())
        .spawn(move || node.run(Box::new(store), node_stop))
        .context("cannot start node thread")?;

    shutdown.await;
    info!("shutting down: stop accepting, flush storage, close streams");
    let _ = stop_tx.send(true);
    stop.store(true, Ordering::Relaxed);
    if tokio::time::timeout(DRAIN, server_task).await.is_err() {
        // Every stream is meant to end on `stop`; one that did not held the exit back.
        warn!("server did not drain within {DRAIN:?}; exiting with streams still open");
    }
    let _ = tokio::time::timeout(DRAIN, http_task).await;
    let result = tokio::task::spawn_blocking(move || node_thread.join())
        .await
        .context("node thread join")?;
    match result {
        Ok(r) => r.context("node loop failed")?,
        Err(_) => anyhow::bail!("node loop panicked"),
    }
    info!("stopped cleanly");
    Ok(())
}
