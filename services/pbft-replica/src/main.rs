//! `pbft-replica`: parse configuration, start telemetry, run until SIGTERM or Ctrl-C, then
//! flush the spans still queued for the OTLP collector.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use pbft_replica::config::{Config, TransportKind};

/// mimalloc instead of glibc's malloc: allocation and freeing were 7-9 % of a loaded
/// replica's CPU (every message, batch and reply allocates), and glibc's arenas grow under
/// many threads.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Flags override environment variables, which override the YAML file.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "PBFT replica: one member of a Byzantine-fault-tolerant KV cluster"
)]
struct Cli {
    /// YAML configuration file.
    #[arg(long, short, env = "PBFT_CONFIG")]
    config: Option<PathBuf>,
    /// This replica's id (default: from the config, or the StatefulSet pod ordinal).
    #[arg(long, env = "PBFT_ID")]
    id: Option<u32>,
    /// Replica listener address.
    #[arg(long, env = "PBFT_LISTEN")]
    listen: Option<SocketAddr>,
    /// HTTP sidecar address.
    #[arg(long, env = "PBFT_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// Data directory.
    #[arg(long, env = "PBFT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Secret key file (64 hex characters).
    #[arg(long, env = "PBFT_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Transport between replicas.
    #[arg(long, env = "PBFT_TRANSPORT", value_enum)]
    transport: Option<TransportKind>,
    /// Log format: text or json.
    #[arg(long, env = "PBFT_LOG_FORMAT")]
    log_format: Option<String>,
    /// Print the effective configuration as YAML and exit.
    #[arg(long)]
    print_config: bool,
}

fn effective_config(cli: &Cli) -> Result<Config> {
    let mut cfg = Config::load(cli.config.as_deref())?;
    if cli.id.is_some() {
        cfg.id = cli.id;
    }
    if let Some(v) = cli.listen {
        cfg.listen = v;
    }
    if let Some(v) = cli.http_listen {
        cfg.http_listen = v;
    }
    if let Some(v) = &cli.data_dir {
        cfg.data_dir = v.clone();
    }
    if let Some(v) = &cli.key_file {
        cfg.key_file = v.clone();
    }
    if let Some(v) = cli.transport {
        cfg.transport = v;
    }
    if let Some(v) = &cli.log_format {
        cfg.log_format = v.clone();
    }
    Ok(cfg)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn main() {
    // Errors are printed as a readable chain, never as a backtrace.
    if let Err(e) = real_main() {
        eprintln!("error: {}", readable_chain(&e));
        std::process::exit(1);
    }
}

/// `e` and its causes, joined by ": ", leaving out a cause whose text the message already
/// carries: the library errors name their cause in their own message too (for logs that
/// print only the outermost one), and `{:#}` then said it twice.
fn readable_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[tokio::main]
async fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let cfg = effective_config(&cli)?;
    if cli.print_config {
        print!("{}", cfg.to_yaml());
        return Ok(());
    }
    let hostname = std::env::var("HOSTNAME").ok();
    let id = cfg.replica_id(hostname.as_deref())?;
    let telemetry = pbft_replica::telemetry::init(cfg.log_format == "json", Some(id))?;
    let result = pbft_replica::run(cfg, id, shutdown_signal())
        .await
        .context("replica failed");
    // Still inside the runtime: the exporter needs it to send its last batch.
    telemetry.shutdown();
    result
}

#[cfg(test)]
mod tests {
    use super::readable_chain;

    #[test]
    fn causes_already_in_the_message_are_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(pbft_replica::config::ConfigError::Read {
            path: "/nope.yaml".into(),
            source: io,
        })
        .context("starting");
        assert_eq!(
            readable_chain(&e),
            "starting: cannot read config file /nope.yaml: no such file"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(readable_chain(&plain), "outer: inner");
    }
}
