//! `pbft`: run a local cluster, talk to it, check it. Exit codes: 0 ok, 1 error, 2 usage,
//! 3 cluster unavailable, 4 key not found, 5 CAS mismatch, 6 invalid ledger.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pbft_client::cli::cluster::ClusterFile;
use pbft_client::cli::{OutputFormat, bench, commands, exit, up};

/// mimalloc instead of glibc's malloc: allocation and freeing were 7-9 % of a loaded
/// replica's CPU (every message, batch and reply allocates), and glibc's arenas grow under
/// many threads.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "pbft",
    version,
    about = "PBFT: a Byzantine-fault-tolerant key-value store",
    after_help = "Exit codes: 0 ok, 1 error, 2 bad arguments, 3 no quorum (cluster down or \
                  partitioned), 4 key not found, 5 CAS mismatch, 6 ledger invalid."
)]
struct Cli {
    /// Cluster directory (written by `pbft up`).
    #[arg(long, global = true, env = "PBFT_DATA", default_value = ".pbft")]
    data: PathBuf,
    /// How results are printed.
    #[arg(long, global = true, value_enum, default_value = "table")]
    output: OutputFormat,
    /// How long one request may take, in seconds (put/get/del/cas, each `bench` request,
    /// each step of `verify-ledger`).
    #[arg(long, global = true, default_value_t = 10, value_parser = timeout_seconds)]
    timeout: u64,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a local cluster (keys and config generated on first run) with a live status view
    /// (with --output json: one JSON object per second, one line each).
    Up {
        /// Replicas of a new cluster, 3f+1 [default: 4].
        #[arg(long, value_parser = cluster_size)]
        replicas: Option<usize>,
        /// Transport between a new cluster's replicas [default: grpc].
        #[arg(long, value_parser = ["grpc", "tcp"])]
        transport: Option<String>,
        /// First port of a new cluster [default: 7000]: replica i listens on
        /// 127.0.0.(i+1):PORT, its sidecar on PORT+1, its TCP client API (tcp) on PORT+2.
        #[arg(long, value_parser = first_port)]
        port: Option<u16>,
        /// Demo load in requests per second (0 for none).
        #[arg(long, default_value_t = 0)]
        load: u64,
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
        /// The pbft-replica binary (default: next to this one).
        #[arg(long)]
        replica_bin: Option<PathBuf>,
    },
    /// Write a key.
    Put { key: String, value: String },
    /// Read a key (exit 4 if absent).
    Get { key: String },
    /// Delete a key (exit 4 if it did not exist).
    Del { key: String },
    /// Compare-and-swap: write NEW only if the key holds EXPECTED (or is absent with --absent).
    #[command(group(clap::ArgGroup::new("precondition").required(true).args(["expected", "absent"])))]
    Cas {
        key: String,
        new: String,
        /// Write only if the key holds this value.
        #[arg(long)]
        expected: Option<String>,
        /// Write only if the key does not exist.
        #[arg(long)]
        absent: bool,
    },
    /// One row per replica: view, primary, height, stable checkpoint, lag, peers.
    Status,
    /// Measure committed throughput and latency against the running cluster.
    Bench {
        /// Closed loop: requests in flight (one per load client).
        #[arg(long, default_value_t = 16, value_parser = at_least_one::<usize>)]
        concurrency: usize,
        /// Open loop: offered requests per second (instead of closed loop).
        #[arg(long, value_parser = offered_rate, conflicts_with = "concurrency")]
        rate: Option<u64>,
        /// Value size in bytes.
        #[arg(long, default_value_t = 512, value_parser = payload_bytes)]
        payload: usize,
        /// Measured seconds.
        #[arg(long, default_value_t = 10, value_parser = measured_seconds)]
        duration: u64,
        /// Warm-up seconds before measuring.
        #[arg(long, default_value_t = 2, value_parser = warmup_seconds)]
        warmup: u64,
        /// Also write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Then run the same workload against one replica without consensus, and report the ratio.
        #[arg(long)]
        unreplicated: bool,
        /// The pbft-replica binary for --unreplicated (default: next to this one).
        #[arg(long)]
        replica_bin: Option<PathBuf>,
    },
    /// Generate an ed25519 key pair.
    Keygen {
        /// Write the secret here (never overwrites) instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Walk a replica's ledger from genesis, checking every hash link and commit certificate.
    VerifyLedger {
        #[arg(long, default_value_t = 0)]
        replica: u32,
    },
}

/// A count that must be at least 1 (a benchmark with no clients, no rate or no measured
/// time measures nothing).
fn at_least_one<T: std::str::FromStr + PartialOrd + From<u8>>(s: &str) -> Result<T, String> {
    match s.parse::<T>() {
        Ok(v) if v >= T::from(1) => Ok(v),
        Ok(_) => Err("must be at least 1".into()),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

/// The longest `--duration` or `--warmup`: a week (far larger values would overflow the
/// clock arithmetic).
const BENCH_SECONDS_MAX: u64 = 7 * 24 * 3600;

fn measured_seconds(s: &str) -> Result<u64, String> {
    let v = at_least_one::<u64>(s)?;
    at_most_a_week(v)
}

fn warmup_seconds(s: &str) -> Result<u64, String> {
    let v = s
        .parse::<u64>()
        .map_err(|_| format!("{s:?} is not a whole number"))?;
    at_most_a_week(v)
}

fn at_most_a_week(v: u64) -> Result<u64, String> {
    if v > BENCH_SECONDS_MAX {
        return Err(format!("at most {BENCH_SECONDS_MAX} seconds (a week)"));
    }
    Ok(v)
}

fn cluster_size(s: &str) -> Result<usize, String> {
    let n = s
        .parse::<usize>()
        .map_err(|_| format!("{s:?} is not a whole number"))?;
    ClusterFile::check_size(n).map_err(|e| e.to_string())?;
    Ok(n)
}

/// A first port with room for the two above it (sidecar, TCP client API).
fn first_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if (1..=u16::MAX - 2).contains(&p) => Ok(p),
        _ => Err(format!("must be a port from 1 to {}", u16::MAX - 2)),
    }
}

/// The longest `--timeout`: a day.
const TIMEOUT_SECONDS_MAX: u64 = 24 * 3600;

fn timeout_seconds(s: &str) -> Result<u64, String> {
    let v = at_least_one::<u64>(s)?;
    if v > TIMEOUT_SECONDS_MAX {
        return Err(format!("at most {TIMEOUT_SECONDS_MAX} seconds (a day)"));
    }
    Ok(v)
}

/// The largest `bench --payload`: a request must fit in one message (the replicas' own
/// `max_request_bytes`, 1 MiB by default, refuses most below this anyway).
const PAYLOAD_BYTES_MAX: usize = 16 << 20;

fn payload_bytes(s: &str) -> Result<usize, String> {
    let v = s
        .parse::<usize>()
        .map_err(|_| format!("{s:?} is not a whole number"))?;
    if v > PAYLOAD_BYTES_MAX {
        return Err(format!("at most {PAYLOAD_BYTES_MAX} bytes (16 MiB)"));
    }
    Ok(v)
}

/// The highest `bench --rate`: one request per microsecond, far past what one load
/// generator sends (a higher rate would round the interval between requests to zero).
const RATE_MAX: u64 = 1_000_000;

fn offered_rate(s: &str) -> Result<u64, String> {
    let v = at_least_one::<u64>(s)?;
    if v > RATE_MAX {
        return Err(format!("at most {RATE_MAX} requests per second"));
    }
    Ok(v)
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(exit::ERROR);
        }
    };
    let timeout = Duration::from_secs(cli.timeout);
    let (data, out) = (&cli.data, cli.output);
    let result = rt.block_on(async {
        match &cli.command {
            Cmd::Up {
                replicas,
                transport,
                port,
                load,
                seconds,
                replica_bin,
            } => up::up(up::UpArgs {
                replicas: *replicas,
                data: data.clone(),
                transport: transport.clone(),
                base_port: *port,
                load: *load,
                duration: seconds.map(Duration::from_secs),
                replica_bin: replica_bin.clone(),
                output: out,
            })
            .await
            .map(|()| commands::Outcome { code: exit::OK }),
            Cmd::Put { key, value } => commands::put(data, key, value, out, timeout).await,
            Cmd::Get { key } => commands::get(data, key, out, timeout).await,
            Cmd::Del { key } => commands::del(data, key, out, timeout).await,
            Cmd::Cas {
                key,
                new,
                expected,
                absent: _,
            } => commands::cas(data, key, expected.as_deref(), new, out, timeout).await,
            Cmd::Status => commands::status(data, out),
            Cmd::Bench {
                concurrency,
                rate,
                payload,
                duration,
                warmup,
                json,
                unreplicated,
                replica_bin,
            } => {
                let args = bench::BenchArgs {
                    concurrency: *concurrency,
                    rate: *rate,
                    payload: *payload,
                    duration: Duration::from_secs(*duration),
                    warmup: Duration::from_secs(*warmup),
                    json: json.clone(),
                    timeout,
                    output: out,
                };
                bench::bench(data, args, *unreplicated, replica_bin.as_deref())
                    .await
                    .map(|()| commands::Outcome { code: exit::OK })
            }
            Cmd::Keygen { out: file } => commands::keygen(file.as_deref(), out),
            Cmd::VerifyLedger { replica } => {
                commands::verify_ledger(data, *replica, out, timeout).await
            }
        }
    });
    match result {
        Ok(o) => std::process::exit(o.code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(commands::error_code(&e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// The arguments hold together (clap's own checks), and `--help` states the exit codes
    /// the CLI actually uses.
    #[test]
    fn help_lists_the_exit_codes_in_use() {
        Cli::command().debug_assert();
        let help = Cli::command().render_long_help().to_string();
        for (code, what) in [
            (exit::OK, "ok"),
            (exit::ERROR, "error"),
            (exit::UNAVAILABLE, "no quorum"),
            (exit::NOT_FOUND, "key not found"),
            (exit::CAS_MISMATCH, "CAS mismatch"),
            (exit::LEDGER_INVALID, "ledger invalid"),
        ] {
            assert!(
                help.contains(&format!("{code} {what}")),
                "{code} {what}: {help}"
            );
        }
    }

    #[test]
    fn bench_counts_must_be_at_least_one() {
        assert_eq!(at_least_one::<u64>("3"), Ok(3));
        assert!(at_least_one::<u64>("0").is_err());
        assert!(at_least_one::<usize>("x").is_err());
    }

    #[test]
    fn bench_seconds_are_bounded() {
        assert_eq!(measured_seconds("600"), Ok(600));
        assert!(measured_seconds("0").is_err());
        assert!(measured_seconds("18446744073709551615").is_err());
        assert_eq!(warmup_seconds("0"), Ok(0));
        assert!(warmup_seconds("604801").is_err());
    }
}
