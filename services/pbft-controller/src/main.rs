//! `pbft-controller`: parse flags, start logging, run the operator until SIGTERM or Ctrl-C.
//! Losing the leader Lease ends the process with an error so that it restarts as a standby.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Flags override their environment variables.
#[derive(Parser, Debug)]
#[command(version, about = "Kubernetes operator for PbftCluster resources")]
struct Cli {
    /// Watch PbftClusters in this namespace only (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Address of /healthz and /metrics.
    #[arg(long, env = "HTTP_LISTEN", default_value = "0.0.0.0:8080")]
    http_listen: SocketAddr,
    /// Name of the leader-election Lease.
    #[arg(long, env = "LEASE_NAME", default_value = "pbft-controller")]
    lease_name: String,
    /// Namespace of the leader-election Lease (the controller's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Identity in the Lease and in events (the pod name).
    #[arg(long, env = "HOSTNAME")]
    identity: Option<String>,
    /// DNS domain of the Kubernetes cluster.
    #[arg(long, env = "CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// Seconds between status refreshes of a healthy cluster.
    #[arg(long, env = "REQUEUE_SECONDS", default_value_t = 15)]
    requeue_seconds: u64,
    /// Log format: text or json (level from RUST_LOG, default info).
    #[arg(long, env = "LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn init_tracing(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// A name unique enough when no pod name is given (out-of-cluster runs).
fn fallback_identity() -> String {
    let mut b = [0u8; 4];
    let suffix = match getrandom::fill(&mut b) {
        Ok(()) => u32::from_le_bytes(b),
        Err(_) => std::process::id(),
    };
    format!("pbft-controller-{suffix:08x}")
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

#[tokio::main]
async fn real_main() -> Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_format == "json");
    let config = pbft_controller::Config {
        namespace: cli.namespace.filter(|n| !n.is_empty()),
        http_listen: cli.http_listen,
        lease_name: cli.lease_name,
        lease_namespace: cli.lease_namespace,
        identity: cli
            .identity
            .filter(|i| !i.is_empty())
            .unwrap_or_else(fallback_identity),
        cluster_domain: cli.cluster_domain,
        requeue: Duration::from_secs(cli.requeue_seconds.max(1)),
    };
    tracing::info!(?config, "starting");
    pbft_controller::run(config, shutdown_signal()).await?;
    Ok(())
}
