//! `pbft bench`: closed loop (N requests in flight) or open loop (a target rate), with
//! warm-up, a progress line, and latency percentiles from an HDR histogram. With
//! `--unreplicated` the same workload then runs against one replica executing without
//! consensus, and the ratio is reported from the same run.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::Mutex;
// tokio's clock, not std's: the open loop's schedule and the latencies it records are then
// one clock, and the tests can pause it.
use tokio::time::Instant;

use super::cluster::ClusterFile;
use super::lease::{self, ClientLease};
use super::{OutputFormat, Unavailable};
use crate::{Client, ClientOptions, Connections};

/// Keys each closed-loop worker cycles through, and keys the open loop cycles through: the
/// replicated state a benchmark builds is about (keys x payload), held in memory by every
/// replica (and copied at each checkpoint), so it is fixed and stated in docs/BENCHMARKS.md.
/// Workers past 256 share the 25,600 keys of 256 (1,024 workers: 25 each), so that more
/// requests in flight measure the replicas, not a larger data set (with 100 keys each,
/// 1,024 workers built four times the state, and the `make bench` cluster that ran them
/// peaked at 363 MiB per replica, against 251 MiB with the keys shared).
const KEYS_PER_WORKER: u64 = 100;
const CLOSED_LOOP_KEYS: u64 = 256 * KEYS_PER_WORKER;
const OPEN_LOOP_KEYS: u64 = 1_000;

/// The histogram's highest latency, in microseconds: two days, past the longest
/// `--timeout` (a day), so every closed-loop latency is recorded as it was (an open-loop
/// request's wait for a free worker is not bounded by the timeout: a longer one is
/// recorded as two days).
const LATENCY_MAX_US: u64 = 2 * 24 * 3600 * 1_000_000;

/// The keys each of `workers` closed-loop workers cycles through.
fn keys_per_worker(workers: usize) -> u64 {
    (CLOSED_LOOP_KEYS / workers.max(1) as u64).clamp(1, KEYS_PER_WORKER)
}

/// Options of `pbft bench`.
#[derive(Clone, Debug)]
pub struct BenchArgs {
    /// Closed loop: requests in flight (one per client).
    pub concurrency: usize,
    /// Open loop: requests per second offered (overrides concurrency).
    pub rate: Option<u64>,
    pub payload: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub json: Option<PathBuf>,
    /// How long one request may take.
    pub timeout: Duration,
    /// How the results are printed; JSON goes without the progress line.
    pub output: OutputFormat,
}

/// What one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub target: String,
    pub mode: String,
    pub payload_bytes: usize,
    pub seconds: f64,
    pub committed: u64,
    pub errors: u64,
    /// Open loop: requests due while every load client was still busy, sent once one was
    /// free. Their wait counts in their latency (measured from when they were due); many
    /// mean the load generator, not only the cluster, queued them.
    pub late: u64,
    pub throughput_per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The first failed request's error, if any failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// Outcomes of the requests that finish inside the measured window.
struct Tally {
    hist: Mutex<Histogram<u64>>,
    ok: AtomicU64,
    errors: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
    /// The measured window: after the warm-up, up to the end of the run.
    from: Instant,
    until: Instant,
}

impl Tally {
    /// Counts a request that finished now, if now is inside the measured window: a success
    /// with its latency since `since` (when it was sent, or due in the open loop). Requests
    /// still in flight when the window closes are not counted (at 1,024 in flight they
    /// added about half a percent to a 10-second run's throughput).
    ///
    /// The first failure's error is kept whenever it happens (in the warm-up, or after the
    /// window for a request that timed out later), so that a run in which nothing
    /// committed can still say why.
    async fn record<T>(&self, result: &Result<T, crate::ClientError>, since: Instant) {
        let now = Instant::now();
        if let Err(e) = result {
            let mut first = self
                .first_error
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            first.get_or_insert_with(|| e.to_string());
        }
        if !self.in_window(now) {
            return;
        }
        match result {
            Ok(_) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                let micros = now.duration_since(since).as_micros().max(1) as u64;
                self.hist.lock().await.saturating_record(micros);
            }
            Err(_) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn in_window(&self, t: Instant) -> bool {
        self.from <= t && t <= self.until
    }
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Open loop: a request is due every `1 / rate` seconds whatever the latency, and its
/// latency counts from when it was due, not from when it went out. A request due while
/// every worker is busy waits for the next free one and is counted `late`; its wait is
/// part of its latency, so a cluster that falls behind shows it in the percentiles instead
/// of slowing the load down to what it can take (coordinated omission). The timer wakes
/// late too (about a millisecond), so several due requests may go out together, each
/// still measured from its own due time.
async fn open_loop<W, F, Fut>(
    workers: Vec<W>,
    rate: u64,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    late: Arc<AtomicU64>,
    send: F,
) where
    W: Send + 'static,
    F: Fn(W, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = (W, Result<(), crate::ClientError>)> + Send + 'static,
{
    let (idle_tx, mut idle_rx) = tokio::sync::mpsc::unbounded_channel();
    for w in workers {
        let _ = idle_tx.send(w);
    }
    let send = Arc::new(send);
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut due = Instant::now();
    let mut i = 0u64;
    // When the dispatcher last got a worker only by waiting for one: every request due
    // before then was due while all were busy, even one that finds a worker idle now
    // (after a stall the workers come back together and the backlog goes out at once).
    let mut waited_until: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep_until(due).await;
        let scheduled = due;
        due += interval;
        let worker = match idle_rx.try_recv() {
            Ok(w) => {
                if waited_until.is_some_and(|t| scheduled < t) && tally.in_window(scheduled) {
                    late.fetch_add(1, Ordering::Relaxed);
                }
                w
            }
            Err(_) => {
                if tally.in_window(scheduled) {
                    late.fetch_add(1, Ordering::Relaxed);
                }
                // Every worker is busy: wait for one (in slices, so that the end of the
                // run is noticed even while every worker waits on a slow cluster).
                let w = loop {
                    match tokio::time::timeout(Duration::from_millis(100), idle_rx.recv()).await {
                        Ok(Some(w)) => break w,
                        Ok(None) => return,
                        Err(_) if stop.load(Ordering::Relaxed) => return,
                        Err(_) => {}
                    }
                };
                waited_until = Some(Instant::now());
                w
            }
        };
        if stop.load(Ordering::Relaxed) {
            return;
        }
        i += 1;
        let (tally, idle_tx, send) = (tally.clone(), idle_tx.clone(), send.clone());
        tokio::spawn(async move {
            let (worker, r) = send(worker, i).await;
            tally.record(&r, scheduled).await;
            let _ = idle_tx.send(worker);
        });
    }
}

/// The load clients a run needs, leased for the whole of `pbft bench` (both runs with
/// `--unreplicated`), so no other pbft process sends under them meanwhile. A closed loop
/// needs one per request in flight. An open loop wants rate / 10 (each holds one request
/// at a time, so they keep up while latency stays under 100 ms; past that, requests are
/// `late`: they wait for a free client, and the wait counts in their latency), and makes
/// do with fewer, saying so.
fn lease_load_clients(dir: &Path, cluster: &ClusterFile, args: &BenchArgs) -> Result<ClientLease> {
    if cluster.load_clients.is_empty() {
        bail!("this cluster registers no load clients (load_clients in its cluster.yaml)");
    }
    let registered = cluster.load_clients.len();
    match args.rate {
        None => {
            if args.concurrency > registered {
                bail!(
                    "--concurrency {} exceeds the {registered} load clients registered in this cluster",
                    args.concurrency
                );
            }
            lease::for_load(
                dir,
                cluster,
                args.concurrency,
                args.concurrency,
                "pbft bench",
            )
        }
        Some(rate) => {
            let want = ((rate as usize) / 10).clamp(1, registered);
            let lease = lease::for_load(dir, cluster, want, 1, "pbft bench")?;
            if lease.ids().len() < want {
                eprintln!(
                    "warning: {} of the {want} load clients this rate wants are free; requests \
                     that find none idle wait and count as late",
                    lease.ids().len()
                );
            }
            Ok(lease)
        }
    }
}

/// Runs the workload against `replicas` (client API addresses) with the cluster's load
/// clients.
pub async fn run_bench(
    dir: &Path,
    cluster: &ClusterFile,
    replicas: Vec<String>,
    target: &str,
    args: &BenchArgs,
    client_ids: &[u64],
) -> Result<BenchResult> {
    // One set of connections for every load client: their streams share a few HTTP/2
    // connections, as many application clients behind one process would.
    let base = ClientOptions {
        replicas: replicas.clone(),
        timeout: args.timeout,
        tls: cluster.client_tls(dir)?,
        ..ClientOptions::default()
    };
    let connections = Connections::new(&base)?;
    let mut clients = Vec::new();
    for &id in client_ids {
        let opts = ClientOptions {
            client_id: id,
            secret: cluster.client_secret(dir, id)?,
            ..base.clone()
        };
        clients.push(Arc::new(Client::with_connections(&connections, &opts)));
    }
    let late = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let measure_from = started + args.warmup;
    let total = args.warmup + args.duration;
    let tally = Arc::new(Tally {
        hist: Mutex::new(
            Histogram::<u64>::new_with_bounds(1, LATENCY_MAX_US, 3).context("histogram")?,
        ),
        ok: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: std::sync::Mutex::new(None),
        from: measure_from,
        until: started + total,
    });
    let value = vec![b'x'; args.payload];

    let mut tasks = Vec::new();
    match args.rate {
        None => {
            let keys = keys_per_worker(clients.len());
            for (w, client) in clients.into_iter().enumerate() {
                let (tally, stop, value) = (tally.clone(), stop.clone(), value.clone());
                tasks.push(tokio::spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        let r = client
                            .put(format!("bench-{w}-{}", i % keys).as_bytes(), &value)
                            .await;
                        i += 1;
                        tally.record(&r, t).await;
                    }
                }));
            }
        }
        Some(rate) => {
            let value = value.clone();
            let send = move |client: Arc<Client>, i: u64| {
                let value = value.clone();
                async move {
                    let r = client
                        .put(format!("bench-o-{}", i % OPEN_LOOP_KEYS).as_bytes(), &value)
                        .await
                        .map(|_| ());
                    (client, r)
                }
            };
            tasks.push(tokio::spawn(open_loop(
                clients,
                rate,
                stop.clone(),
                tally.clone(),
                late.clone(),
                send,
            )));
        }
    }

    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let elapsed = started.elapsed();
        if args.output == OutputFormat::Table {
            let frac = (elapsed.as_secs_f64() / total.as_secs_f64()).min(1.0);
            let bar = "=".repeat((frac * 30.0) as usize);
            let phase = if elapsed < args.warmup {
                "warm-up"
            } else {
                "measuring"
            };
            let _ = super::stdout(&format!(
                "\r{target:<14} [{bar:<30}] {:>5.1}/{:.0}s {phase:<9} {} ok {} err   ",
                elapsed.as_secs_f64(),
                total.as_secs_f64(),
                tally.ok.load(Ordering::Relaxed),
                tally.errors.load(Ordering::Relaxed)
            ));
        }
        if elapsed >= total {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    // Only what finished inside the window was counted (see `Tally::record`).
    let measured = args.duration.as_secs_f64();
    if args.output == OutputFormat::Table {
        let _ = super::stdout("\n");
    }
    // Closed-loop workers finish the request they hold (or time out), the open loop's
    // dispatcher returns at once; what they finish now is past the window and not counted.
    for t in tasks {
        let _ = tokio::time::timeout(args.timeout + Duration::from_secs(2), t).await;
    }
    let h = tally.hist.lock().await;
    let committed = tally.ok.load(Ordering::Relaxed);
    Ok(BenchResult {
        target: target.to_string(),
        mode: match args.rate {
            Some(r) => format!("open loop {r}/s"),
            None => format!("closed loop, {} in flight", args.concurrency),
        },
        payload_bytes: args.payload,
        seconds: measured,
        committed,
        errors: tally.errors.load(Ordering::Relaxed),
        late: late.load(Ordering::Relaxed),
        throughput_per_sec: committed as f64 / measured.max(0.001),
        p50_ms: ms(&h, 0.50),
        p90_ms: ms(&h, 0.90),
        p99_ms: ms(&h, 0.99),
        max_ms: h.max() as f64 / 1000.0,
        first_error: tally
            .first_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone(),
    })
}

/// Prints a result as one table row.
pub fn print_row(r: &BenchResult) {
    let _ = super::stdout(&format!(
        "{:<14} {:<26} {:>6}B  {:>9.0}/s  p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  max {:>8.2} ms  ({} ok, {} err, {} late)\n",
        r.target,
        r.mode,
        r.payload_bytes,
        r.throughput_per_sec,
        r.p50_ms,
        r.p90_ms,
        r.p99_ms,
        r.max_ms,
        r.committed,
        r.errors,
        r.late
    ));
    // On stderr: scripts (and `make bench`) read the row as stdout's last line.
    if let Some(e) = r.first_error.as_ref().filter(|_| r.committed > 0) {
        eprintln!("{}: {} failed; the first: {e}", r.target, r.errors);
    }
}

/// Starts the unreplicated baseline server next to the cluster's data, runs the same
/// workload against it, and stops it.
pub async fn run_unreplicated(
    dir: &Path,
    cluster: &ClusterFile,
    replica_bin: &Path,
    args: &BenchArgs,
    client_ids: &[u64],
) -> Result<BenchResult> {
    let base = dir.join("unreplicated");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base)?;
    let r0 = cluster.replicas.first().context("empty cluster")?;
    let ip = r0.listen.ip();
    // The two ports after the cluster's own (base, base + 1, and base + 2 for TCP).
    let port = |offset: u16| {
        r0.listen.port().checked_add(offset).with_context(|| {
            format!(
                "the unreplicated baseline listens {offset} ports above {}, past the last port",
                r0.listen
            )
        })
    };
    let listen = std::net::SocketAddr::new(ip, port(3)?);
    let http = std::net::SocketAddr::new(ip, port(4)?);
    // Free before it starts: otherwise its readiness check could be answered by whatever
    // holds the port, and the baseline measured would be someone else's.
    for addr in [listen, http] {
        if let Err(e) = std::net::TcpListener::bind(addr) {
            bail!(
                "the unreplicated baseline needs {addr} (3 and 4 ports above the cluster's first), which is taken: {e}"
            );
        }
    }
    let mut clients = String::new();
    for id in std::iter::once(cluster.client_id).chain(cluster.load_clients.iter().copied()) {
        let secret = cluster.client_secret(dir, id)?;
        let pk = super::cluster::to_hex(&pbft_core::Ed25519Signer::from_secret(secret).public().0);
        clients.push_str(&format!("  - id: {id}\n    public_key: {pk}\n"));
    }
    let cfg = format!(
        "# Benchmark baseline: one server, no consensus. Written by `pbft bench --unreplicated`.\nunreplicated: true\nid: 0\nlisten: {listen}\nhttp_listen: {http}\ndata_dir: {}\nkey_file: {}\nreplicas:\n  - public_key: {}\n    address: {listen}\nclients:\n{clients}",
        base.join("data").display(),
        dir.join("keys").join("replica-0.key").display(),
        r0.public_key,
    );
    let cfg_path = base.join("config.yaml");
    std::fs::write(&cfg_path, cfg)?;
    let log = std::fs::File::create(base.join("server.log"))?;
    let mut child = std::process::Command::new(replica_bin)
        .arg("--config")
        .arg(&cfg_path)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", replica_bin.display()))?;
    let start = Instant::now();
    while super::http::get(http, "/healthz").is_none_or(|(c, _)| c != 200) {
        let exited = child.try_wait().ok().flatten();
        if exited.is_some() || start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the unreplicated baseline did not start ({}); see {}",
                exited.map_or_else(|| "not ready in 20 s".into(), |st| st.to_string()),
                base.join("server.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let result = run_bench(
        dir,
        cluster,
        vec![listen.to_string()],
        "unreplicated",
        args,
        client_ids,
    )
    .await;
    super::sigterm(&child);
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    result
}

/// How long `pbft bench` waits for a quorum of replicas that are still starting (run right
/// after `pbft up`), and then for the rest: a replica that is down on purpose (measuring a
/// degraded cluster) costs the second wait only.
const QUORUM_WAIT: Duration = Duration::from_secs(30);
const REST_WAIT: Duration = Duration::from_secs(5);

/// How many replicas answer `/readyz` with 200, once all do or the waits above ran out.
async fn wait_until_ready(cluster: &ClusterFile, quorum: usize) -> usize {
    let started = Instant::now();
    let mut quorum_at = None;
    loop {
        let up = cluster
            .replicas
            .iter()
            .filter(|r| super::http::get(r.http, "/readyz").is_some_and(|(c, _)| c == 200))
            .count();
        if up >= quorum && quorum_at.is_none() {
            quorum_at = Some(Instant::now());
        }
        let done = match quorum_at {
            _ if up == cluster.replicas.len() => true,
            Some(at) => at.elapsed() >= REST_WAIT,
            None => started.elapsed() >= QUORUM_WAIT,
        };
        if done {
            return up;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `pbft bench`: the replicated run, optionally the unreplicated one, and the ratio. With
/// `--output json` the report (the `--json` file's content) goes to stdout instead of the
/// rows, without the progress line.
pub async fn bench(
    dir: &Path,
    args: BenchArgs,
    unreplicated: bool,
    replica_bin: Option<&Path>,
) -> Result<()> {
    let cluster = ClusterFile::load(dir)?;
    if unreplicated && cluster.tls.is_some() {
        // The baseline server has no certificate: a ratio against it would count TLS as
        // the cost of replication.
        bail!(
            "--unreplicated compares clusters without TLS only (this one has `tls:` in its cluster.yaml)"
        );
    }
    // Before anything is measured: a run without its clients fails at once.
    let lease = lease_load_clients(dir, &cluster, &args)?;
    let n = cluster.replicas.len();
    let quorum = n - pbft_core::max_faulty(n);
    let up = wait_until_ready(&cluster, quorum).await;
    if up < quorum {
        return Err(Unavailable(format!(
            "only {up} of {n} replicas are ready, {quorum} needed: start the cluster with `pbft up --data {}` first",
            dir.display()
        ))
        .into());
    }
    if up < n {
        eprintln!(
            "warning: {} of {n} replicas are not ready; measuring the degraded cluster",
            n - up
        );
    }
    let show = |r: &BenchResult| {
        if args.output == OutputFormat::Table {
            print_row(r);
        }
    };
    let target = format!("pbft n={} {}", cluster.replicas.len(), cluster.transport);
    let replicated = run_bench(
        dir,
        &cluster,
        cluster.client_addrs(),
        &target,
        &args,
        lease.ids(),
    )
    .await?;
    show(&replicated);
    let mut report = serde_json::json!({ "replicated": replicated });
    // A run that committed nothing is still reported (with its first error) before the
    // command fails, and the baseline is not measured against it. A baseline that fails
    // to start is reported as such, after the replicated run's figures are written.
    let mut outcome = nothing_committed(&replicated);
    if unreplicated && outcome.is_ok() {
        let bin = match replica_bin {
            Some(b) => b.to_path_buf(),
            None => std::env::current_exe()?.with_file_name("pbft-replica"),
        };
        match run_unreplicated(dir, &cluster, &bin, &args, lease.ids()).await {
            Ok(base) => {
                show(&base);
                outcome = nothing_committed(&base);
                if outcome.is_ok() {
                    let ratio = replicated.throughput_per_sec / base.throughput_per_sec.max(0.001);
                    if args.output == OutputFormat::Table {
                        let _ = super::stdout(&format!(
                            "replicated / unreplicated throughput: {ratio:.2}\n"
                        ));
                    }
                    report["ratio"] = serde_json::json!(ratio);
                }
                report["unreplicated"] = serde_json::to_value(&base)?;
            }
            Err(e) => {
                report["unreplicated_error"] = serde_json::json!(format!("{e:#}"));
                outcome = Err(e.context("the unreplicated baseline"));
            }
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if args.output == OutputFormat::Json {
        let _ = super::stdout(&format!("{report}\n"));
    }
    outcome
}

/// A run that committed nothing measured nothing: an error, with the reason, for scripts.
fn nothing_committed(r: &BenchResult) -> Result<()> {
    if r.committed == 0 {
        bail!(
            "{}: nothing committed in the {:.0} s measured ({} failed in them{})",
            r.target,
            r.seconds,
            r.errors,
            r.first_error
                .as_deref()
                .map_or_else(String::new, |e| format!("; the first failure: {e}"))
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(from: Instant, until: Instant) -> Tally {
        Tally {
            hist: Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("hist")),
            ok: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_error: std::sync::Mutex::new(None),
            from,
            until,
        }
    }

    fn failure() -> Result<(), crate::ClientError> {
        Err(crate::ClientError::Rejected("too large".into()))
    }

    #[tokio::test]
    async fn only_what_finishes_inside_the_window_counts_but_any_failure_is_named() {
        let now = Instant::now();
        // A window that closed a second ago: nothing counts, the failure is still kept.
        let past = tally(now - Duration::from_secs(2), now - Duration::from_secs(1));
        past.record(&Ok::<(), crate::ClientError>(()), now).await;
        past.record(&failure(), now).await;
        assert_eq!(past.ok.load(Ordering::Relaxed), 0);
        assert_eq!(past.errors.load(Ordering::Relaxed), 0);
        let first = past.first_error.lock().expect("lock").clone();
        assert!(first.is_some_and(|e| e.contains("too large")));
        // An open window counts both, with the success's latency.
        let open = tally(now - Duration::from_secs(1), now + Duration::from_secs(60));
        open.record(
            &Ok::<(), crate::ClientError>(()),
            now - Duration::from_millis(5),
        )
        .await;
        open.record(&failure(), now).await;
        assert_eq!(open.ok.load(Ordering::Relaxed), 1);
        assert_eq!(open.errors.load(Ordering::Relaxed), 1);
        assert!(
            open.hist.lock().await.max() >= 5_000,
            "latency in microseconds"
        );
        assert!(open.in_window(now) && !open.in_window(now + Duration::from_secs(61)));
    }

    #[test]
    fn a_run_that_committed_nothing_is_an_error_with_its_reason() {
        let mut r = BenchResult {
            target: "pbft n=4 grpc".into(),
            mode: "closed loop, 1 in flight".into(),
            payload_bytes: 2_000_000,
            seconds: 2.0,
            committed: 0,
            errors: 4,
            late: 0,
            throughput_per_sec: 0.0,
            p50_ms: 0.0,
            p90_ms: 0.0,
            p99_ms: 0.0,
            max_ms: 0.0,
            first_error: Some("request too large".into()),
        };
        let e = nothing_committed(&r)
            .expect_err("nothing committed")
            .to_string();
        assert!(
            e.contains("nothing committed") && e.contains("request too large"),
            "{e}"
        );
        r.committed = 1;
        assert!(nothing_committed(&r).is_ok());
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["first_error"], "request too large");
        r.first_error = None;
        let json = serde_json::to_value(&r).expect("json");
        assert!(
            json.get("first_error").is_none(),
            "left out when nothing failed"
        );
    }

    /// Runs `open_loop` on tokio's paused clock for `seconds` with `workers` workers that
    /// each take `service` per request; returns (tally, late).
    async fn open_loop_run(
        rate: u64,
        workers: usize,
        service: Duration,
        seconds: u64,
    ) -> (Arc<Tally>, u64) {
        let now = Instant::now();
        let tally = Arc::new(tally(now, now + Duration::from_secs(seconds)));
        let (stop, late) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let send = move |w: usize, _i: u64| async move {
            tokio::time::sleep(service).await;
            (w, Ok(()))
        };
        let task = tokio::spawn(open_loop(
            (0..workers).collect(),
            rate,
            stop.clone(),
            tally.clone(),
            late.clone(),
            send,
        ));
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        stop.store(true, Ordering::Relaxed);
        task.await.expect("open loop");
        let late = late.load(Ordering::Relaxed);
        (tally, late)
    }

    /// Enough workers: every request goes out when due and takes the service time.
    #[tokio::test(start_paused = true)]
    async fn open_loop_keeps_its_schedule_with_enough_workers() {
        let (tally, late) = open_loop_run(100, 10, Duration::from_millis(50), 2).await;
        assert_eq!(late, 0);
        let ok = tally.ok.load(Ordering::Relaxed);
        assert!(
            (190..=200).contains(&ok),
            "about 2 s x 100/s committed: {ok}"
        );
        let h = tally.hist.lock().await;
        assert!(
            (50_000..=52_000).contains(&h.value_at_quantile(0.99)),
            "latency is the service time: {} us",
            h.value_at_quantile(0.99)
        );
    }

    /// Too few workers: the requests that wait for one are `late`, and their wait counts
    /// in their latency. Counted from when each went out instead (coordinated omission),
    /// every latency would read 50 ms, though the cluster served only a fifth of the rate.
    #[tokio::test(start_paused = true)]
    async fn open_loop_latency_counts_from_when_a_request_was_due() {
        let (tally, late) = open_loop_run(100, 1, Duration::from_millis(50), 2).await;
        let ok = tally.ok.load(Ordering::Relaxed);
        assert!((38..=40).contains(&ok), "one worker, 20/s: {ok}");
        // Each went out only when the one before it finished; the rest never did, and
        // show as throughput short of the rate.
        assert!(
            late >= 38,
            "every request sent waited for the worker: {late}"
        );
        let h = tally.hist.lock().await;
        // The k-th request is due at 10k ms and finishes at 50(k+1) ms: the median of the
        // 40 that finish in 2 s waited about 0.8 s, the last about 1.6 s.
        assert!(
            h.value_at_quantile(0.5) > 700_000,
            "p50 {} us",
            h.value_at_quantile(0.5)
        );
        assert!(h.max() > 1_500_000, "max {} us", h.max());
    }

    /// After a stall every worker comes back at once and the backlog goes out together:
    /// each request that fell due during the stall is `late`, not only the one the
    /// dispatcher was waiting to send.
    #[tokio::test(start_paused = true)]
    async fn every_request_due_during_a_stall_is_late() {
        let t0 = Instant::now();
        let tally = Arc::new(tally(t0, t0 + Duration::from_secs(2)));
        let (stop, late) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        // The first 10 requests (one per worker) all finish at 500 ms; the rest take 1 ms.
        let send = move |w: usize, i: u64| async move {
            if i <= 10 {
                tokio::time::sleep_until(t0 + Duration::from_millis(500)).await;
            } else {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (w, Ok(()))
        };
        let task = tokio::spawn(open_loop(
            (0..10).collect(),
            100,
            stop.clone(),
            tally.clone(),
            late.clone(),
            send,
        ));
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::Relaxed);
        task.await.expect("open loop");
        // 40 fell due between 100 and 500 ms (and the one due at 500 ms with them).
        let late = late.load(Ordering::Relaxed);
        assert!((40..=41).contains(&late), "late {late}");
        let ok = tally.ok.load(Ordering::Relaxed);
        assert!(
            (195..=200).contains(&ok),
            "the backlog went out and committed: {ok}"
        );
    }

    #[test]
    fn more_workers_share_a_fixed_key_space() {
        assert_eq!(keys_per_worker(64), 100);
        assert_eq!(keys_per_worker(256), 100);
        assert_eq!(keys_per_worker(1024), 25);
        assert_eq!(keys_per_worker(1024) * 1024, 256 * 100);
        // Never zero keys, whatever the count.
        assert_eq!(keys_per_worker(0), 100);
        assert_eq!(keys_per_worker(1_000_000), 1);
    }
}
