//! `pbft up`: a local cluster of replica processes on 127.0.0.1..n, optional demo load, and
//! a live status view. Ctrl-C stops every replica cleanly; running it again resumes from the
//! same data directory.

use std::fs;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::cluster::ClusterFile;
use super::{OutputFormat, http, table};
use crate::{Client, ClientOptions};
use serde::Serialize;

/// Options of `pbft up`.
pub struct UpArgs {
    /// Replicas, transport and first port of a new cluster (defaults: 4, grpc, 7000); a
    /// resumed cluster keeps its own, and says so if these differ.
    pub replicas: Option<usize>,
    pub data: PathBuf,
    pub transport: Option<String>,
    pub base_port: Option<u16>,
    /// Requests per second of demo load (0: none).
    pub load: u64,
    /// Stop by itself after this long (default: until Ctrl-C).
    pub duration: Option<Duration>,
    pub replica_bin: Option<PathBuf>,
    /// The live view as a table, or as one JSON object per line (for scripts).
    pub output: OutputFormat,
}

struct Proc {
    id: u32,
    child: Option<Child>,
    exit: Option<String>,
}

/// The replica processes `up` started. Dropped, on any return (an error during start-up
/// included), it stops every one still running: none is left holding its ports.
struct Procs(Vec<Proc>);

impl Procs {
    /// SIGTERM to every live replica at once, then up to 10 s for all of them to finish
    /// (they flush their journal), then SIGKILL to any still running.
    fn stop_all(&mut self) {
        let mut live: Vec<Child> = self.0.iter_mut().filter_map(|p| p.child.take()).collect();
        // One that exited is reaped here, not signalled: its pid may already be reused.
        live.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
        for c in &live {
            super::sigterm(c);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !live.is_empty() && Instant::now() < deadline {
            live.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
            std::thread::sleep(Duration::from_millis(50));
        }
        for mut c in live {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn replica_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().context("cannot locate the pbft executable")?;
    let sibling = exe.with_file_name("pbft-replica");
    if sibling.is_file() {
        return Ok(sibling);
    }
    bail!(
        "cannot find pbft-replica next to {} (build it: cargo build -p pbft-replica, or pass --replica-bin)",
        exe.display()
    )
}

/// The async runtime threads each replica gets: its share of this machine's cores. Every
/// replica here shares the machine, and a runtime per replica as wide as the machine only
/// adds cross-thread wake-ups (open loop at 10,000/s on two cores: p50 12 against 14 ms,
/// docs/BENCHMARKS.md round 10). `TOKIO_WORKER_THREADS` set by the caller wins.
fn runtime_threads(replicas: usize) -> String {
    if let Ok(set) = std::env::var("TOKIO_WORKER_THREADS") {
        return set;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / replicas.max(1)).max(1).to_string()
}

fn spawn(bin: &Path, dir: &Path, id: u32, threads: &str) -> Result<Child> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("replica-{id}.log")))
        .context("cannot open replica log")?;
    Command::new(bin)
        .arg("--config")
        .arg(dir.join(format!("replica-{id}.yaml")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .env("TOKIO_WORKER_THREADS", threads)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Holds `dir` for this `pbft up` alone: a second one on the same directory would start a
/// second set of replicas on the same ports and data, which fail, while its status view
/// showed the first cluster's replicas as its own. The lock goes with the process.
fn lock_data_dir(dir: &Path) -> Result<fs::File> {
    let path = dir.join("up.lock");
    let mut file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let holder = fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            bail!(
                "another `pbft up` is running the cluster in {}{}; stop it first (Ctrl-C), or use another --data directory",
                dir.display(),
                if holder.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {holder})")
                }
            );
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    file.set_len(0)?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

/// Every address the cluster's replicas will listen on (`(replica, [listen, http,
/// client])`), checked free before any starts: otherwise a replica fails to bind while
/// whatever holds the port (another cluster, say) answers the readiness and status probes
/// in its name.
fn check_ports_free(
    dir: &Path,
    replicas: impl IntoIterator<Item = (u32, [SocketAddr; 3])>,
    fresh: bool,
) -> Result<()> {
    for (id, addrs) in replicas {
        // Over gRPC the client API shares the peer listener.
        let mut checked = Vec::with_capacity(3);
        for addr in addrs {
            if checked.contains(&addr) {
                continue;
            }
            checked.push(addr);
            if let Err(e) = std::net::TcpListener::bind(addr) {
                let advice = if fresh {
                    "pick other ports with --port, or stop it".to_string()
                } else {
                    // Replicas outlive a `pbft up` killed with SIGKILL (Ctrl-C stops them).
                    format!(
                        "stop it (this cluster's ports are fixed in its cluster.yaml; replicas left \
                         running by an earlier `pbft up` that was killed: pkill -f {}/replica-)",
                        dir.display()
                    )
                };
                bail!(
                    "replica {id} cannot listen on {addr}: {e}. Something else holds that port (another cluster?); {advice}"
                );
            }
        }
    }
    Ok(())
}

/// One replica's line of the status view (a table row, or an element of a JSON line).
#[derive(Serialize)]
struct ViewRow {
    replica: u32,
    /// The process, while it runs.
    pid: Option<u32>,
    /// `up`, `view change`, `down` (its process exited) or `unreachable` (running, but its
    /// sidecar does not answer).
    state: &'static str,
    view: Option<u64>,
    primary: Option<u64>,
    height: Option<u64>,
    commits_per_sec: Option<u64>,
    /// Blocks behind the highest live replica.
    lag: Option<u64>,
    peers_connected: Option<usize>,
    /// How its process ended, once it has.
    #[serde(skip_serializing_if = "Option::is_none")]
    exit: Option<String>,
}

/// The demo load's counters, for the view.
#[derive(Serialize)]
struct DemoLoad {
    ok_per_sec: u64,
    ok: u64,
    failed: u64,
}

/// The view's rows as a table.
fn render_rows(rows: &[ViewRow], n: usize) -> String {
    let cell = |v: Option<u64>| v.map_or_else(|| "-".into(), |v| v.to_string());
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut row = vec![
                format!("r{}", r.replica),
                r.pid.map_or_else(|| "-".into(), |p| p.to_string()),
                r.state.replace("view change", "vchange"),
                cell(r.view),
                r.primary.map_or_else(|| "-".into(), |p| format!("r{p}")),
                cell(r.height),
                cell(r.commits_per_sec),
                cell(r.lag),
                r.peers_connected
                    .map_or_else(|| "-".into(), |c| format!("{c}/{}", n - 1)),
            ];
            if let Some(e) = &r.exit {
                row.push(format!("({e})"));
            }
            row
        })
        .collect();
    table::render(
        &[
            "replica",
            "pid",
            "state",
            "view",
            "primary",
            "height",
            "commits/s",
            "lag",
            "peers",
        ],
        &cells,
    )
}

/// Requests committed per second between two readings of a replica's executed-request
/// count (`/status`), 0 without two readings or when the count went back (a restart).
fn commits_per_second(before: Option<(u64, Instant)>, now: Option<(u64, Instant)>) -> u64 {
    let (Some((c0, t0)), Some((c1, t1))) = (before, now) else {
        return 0;
    };
    let seconds = t1.duration_since(t0).as_secs_f64();
    if seconds <= 0.0 {
        return 0;
    }
    (c1.saturating_sub(c0) as f64 / seconds).round() as u64
}

/// A resumed cluster keeps the size, transport and ports it was made with: flags that ask
/// for others are ignored, and said to be.
fn warn_ignored_flags(args: &UpArgs, c: &ClusterFile) {
    let mut differ = Vec::new();
    if args.replicas.is_some_and(|n| n != c.replicas.len()) {
        differ.push(format!("--replicas (it has {})", c.replicas.len()));
    }
    if args.transport.as_ref().is_some_and(|t| *t != c.transport) {
        differ.push(format!("--transport (it uses {})", c.transport));
    }
    let first = c.replicas.first().map(|r| r.listen.port());
    if args.base_port.is_some_and(|p| Some(p) != first) {
        let at = first.map_or_else(|| "-".into(), |p| p.to_string());
        differ.push(format!("--port (it starts at {at})"));
    }
    if !differ.is_empty() {
        eprintln!(
            "warning: ignoring {}: an existing cluster keeps its layout (use another --data for a new one)",
            differ.join(", ")
        );
    }
}

/// Runs the local cluster until Ctrl-C (or `duration`).
pub async fn up(args: UpArgs) -> Result<()> {
    let output = args.output;
    let say = move |line: String| match output {
        // With JSON lines on stdout, the words go to stderr.
        // (`writeln!`, not `eprintln!`: a closed stderr must not panic either.)
        OutputFormat::Json => {
            let _ = writeln!(std::io::stderr(), "{line}");
        }
        OutputFormat::Table => {
            let _ = super::stdout(&format!("{line}\n"));
        }
    };
    let dir = args.data.clone();
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let _lock = lock_data_dir(&dir)?;
    let fresh = !ClusterFile::path(&dir).is_file();
    let replicas = args.replicas.unwrap_or(4);
    let transport = args.transport.clone().unwrap_or_else(|| "grpc".into());
    let base_port = args.base_port.unwrap_or(7000);
    // Checked before a new cluster's files are written: they fix its ports for good.
    if fresh {
        ClusterFile::check_size(replicas)?;
        let planned = (0..replicas)
            .map(|i| {
                let addrs = ClusterFile::loopback_addrs(i, &transport, base_port)?;
                Ok((i as u32, addrs))
            })
            .collect::<Result<Vec<_>>>()?;
        check_ports_free(&dir, planned, true)?;
    }
    let cluster = if !fresh {
        let c = ClusterFile::load(&dir)?;
        say(format!(
            "resuming the {}-replica {} cluster in {}",
            c.replicas.len(),
            c.transport,
            dir.display()
        ));
        warn_ignored_flags(&args, &c);
        c
    } else {
        let c = ClusterFile::generate(&dir, replicas, &transport, base_port)?;
        say(format!(
            "created a {}-replica {} cluster in {} (keys in {}/keys)",
            c.replicas.len(),
            c.transport,
            dir.display(),
            dir.display()
        ));
        c
    };
    if !fresh {
        let replicas = cluster.replicas.iter();
        check_ports_free(
            &dir,
            replicas.map(|r| (r.id, [r.listen, r.http, r.client])),
            false,
        )?;
    }
    let bin = replica_binary(args.replica_bin.as_deref())?;
    // The demo load's client ids (see `lease`), held while the cluster runs; taken before
    // any replica starts, so that a clash stops nothing.
    let load_lease = match args.load {
        0 => None,
        rate => {
            let workers = demo_workers(&cluster, rate);
            Some(super::lease::for_load(
                &dir,
                &cluster,
                workers,
                workers,
                "the demo load",
            )?)
        }
    };
    let threads = runtime_threads(cluster.replicas.len());
    let mut procs = Procs(Vec::new());
    for r in &cluster.replicas {
        procs.0.push(Proc {
            id: r.id,
            child: Some(spawn(&bin, &dir, r.id, &threads)?),
            exit: None,
        });
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            // Ctrl-C, or SIGTERM from a supervisor: stop the replicas cleanly either way.
            #[cfg(unix)]
            {
                use tokio::signal::unix::{SignalKind, signal};
                match signal(SignalKind::terminate()) {
                    Ok(mut term) => {
                        tokio::select! {
                            _ = tokio::signal::ctrl_c() => {}
                            _ = term.recv() => {}
                        }
                    }
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            }
            #[cfg(not(unix))]
            let _ = tokio::signal::ctrl_c().await;
            stop.store(true, Ordering::Relaxed);
        });
    }

    // Wait (bounded) until every replica is ready; a replica that dies shows its log.
    let started = Instant::now();
    loop {
        let died = procs.0.iter_mut().find_map(|p| {
            let st = p.child.as_mut()?.try_wait().ok()??;
            // Reaped: its pid may be reused, so it is never signalled again.
            p.child = None;
            Some((p.id, st))
        });
        if let Some((id, st)) = died {
            procs.stop_all();
            let log = dir.join(format!("replica-{id}.log"));
            bail!(
                "replica {id} exited during start-up ({st}); its log ({}):\n{}",
                log.display(),
                tail(&log, 15)
            );
        }
        let ready = cluster
            .replicas
            .iter()
            .filter(|r| http::get(r.http, "/readyz").is_some_and(|(c, _)| c == 200))
            .count();
        if ready == cluster.replicas.len() {
            say(format!(
                "all {ready} replicas ready after {:.1?}",
                started.elapsed()
            ));
            break;
        }
        if stop.load(Ordering::Relaxed) {
            say("interrupted before every replica was ready; stopping them ...".into());
            procs.stop_all();
            say("stopped".into());
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            procs.stop_all();
            bail!(
                "replicas not ready after 60 s; logs are in {}",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    if let Some(lease) = &load_lease {
        start_load(
            &dir,
            &cluster,
            lease,
            args.load,
            ok.clone(),
            failed.clone(),
            stop.clone(),
        )
        .await?;
    }

    let tty = std::io::stdout().is_terminal();
    // Each replica's executed-request count when last shown, and when: its commits/s.
    let mut last_counts: Vec<Option<(u64, Instant)>> = vec![None; cluster.replicas.len()];
    let mut last_ok = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let began = Instant::now();
    while !stop.load(Ordering::Relaxed) && args.duration.is_none_or(|d| began.elapsed() < d) {
        tick.tick().await;
        // Ctrl-C reaches the replicas too (one process group): no last frame of them
        // stopping, just the stop below.
        if stop.load(Ordering::Relaxed) {
            break;
        }
        for p in &mut procs.0 {
            if let Some(c) = p.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                p.exit = Some(st.to_string());
                p.child = None;
            }
        }
        let statuses: Vec<Option<serde_json::Value>> = cluster
            .replicas
            .iter()
            .map(|r| http::status(r.http))
            .collect();
        // Lag is measured against live replicas only (see the rows below).
        let top = statuses
            .iter()
            .zip(&procs.0)
            .filter(|(_, p)| p.child.is_some())
            .filter_map(|(s, _)| s.as_ref()?["height"].as_u64())
            .max()
            .unwrap_or(0);
        let done = ok.load(Ordering::Relaxed);
        let mut rows = Vec::with_capacity(cluster.replicas.len());
        for (i, (r, s)) in cluster.replicas.iter().zip(&statuses).enumerate() {
            let p = &procs.0[i];
            let mut row = ViewRow {
                replica: r.id,
                pid: p.child.as_ref().map(Child::id),
                state: if p.exit.is_some() {
                    "down"
                } else {
                    "unreachable"
                },
                view: None,
                primary: None,
                height: None,
                commits_per_sec: None,
                lag: None,
                peers_connected: None,
                exit: p.exit.clone(),
            };
            // A replica whose process is gone is down, whatever answers on its port.
            match s.as_ref().filter(|_| p.child.is_some()) {
                Some(s) => {
                    let count = s["executed_requests"].as_u64().map(|c| (c, Instant::now()));
                    row.commits_per_sec = Some(commits_per_second(last_counts[i], count));
                    last_counts[i] = count;
                    row.state = if s["view_change_in_progress"] == true {
                        "view change"
                    } else {
                        "up"
                    };
                    row.view = s["view"].as_u64();
                    row.primary = s["primary"].as_u64();
                    row.height = s["height"].as_u64();
                    row.lag = row.height.map(|h| top.saturating_sub(h));
                    row.peers_connected = Some(table::connected_peers(s));
                }
                None => last_counts[i] = None,
            }
            rows.push(row);
        }
        let load = (args.load > 0).then(|| DemoLoad {
            ok_per_sec: done - last_ok,
            ok: done,
            failed: failed.load(Ordering::Relaxed),
        });
        last_ok = done;
        let frame = match args.output {
            OutputFormat::Json => {
                let line = serde_json::json!({
                    "uptime_secs": began.elapsed().as_secs(),
                    "demo_load": load,
                    "replicas": rows,
                });
                format!("{line}\n")
            }
            OutputFormat::Table => {
                let head = format!(
                    "pbft up: {} replicas ({}), data {}   uptime {:.0?}   Ctrl-C stops\n",
                    cluster.replicas.len(),
                    cluster.transport,
                    dir.display(),
                    began.elapsed()
                );
                let clear = if tty { "\x1b[2J\x1b[H" } else { "" };
                format!(
                    "{clear}{head}{}{}",
                    load.map_or_else(String::new, |l| format!(
                        "demo load: {} ok/s, {} ok total, {} failed\n",
                        l.ok_per_sec, l.ok, l.failed
                    )),
                    render_rows(&rows, cluster.replicas.len())
                )
            }
        };
        // Whoever read the view has gone (`pbft up | head`): stop as on Ctrl-C, rather
        // than leave the replicas running with no one to stop them.
        if super::stdout(&frame).is_err() {
            let _ = writeln!(std::io::stderr(), "stdout closed; stopping the cluster");
            break;
        }
    }
    say("stopping replicas ...".into());
    stop.store(true, Ordering::Relaxed);
    procs.stop_all();
    say(format!(
        "stopped; `pbft up --data {}` resumes this cluster",
        dir.display()
    ));
    Ok(())
}

/// How many demo-load workers `rate` requests per second take (each sends one request
/// at a time, 50 a second at most).
fn demo_workers(cluster: &ClusterFile, rate: u64) -> usize {
    cluster
        .load_clients
        .len()
        .min(rate.div_ceil(50) as usize)
        .max(1)
}

async fn start_load(
    dir: &Path,
    cluster: &ClusterFile,
    lease: &super::lease::ClientLease,
    rate: u64,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let workers = lease.ids().len().max(1);
    let per_worker = Duration::from_secs_f64(workers as f64 / rate as f64);
    for (w, &id) in lease.ids().iter().enumerate() {
        let client = Client::connect(ClientOptions {
            replicas: cluster.client_addrs(),
            client_id: id,
            secret: cluster.client_secret(dir, id)?,
            timeout: Duration::from_secs(5),
            tls: cluster.client_tls(dir)?,
            ..ClientOptions::default()
        })
        .await?;
        let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            let mut next = tokio::time::Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let key = format!("demo-{w}-{}", i % 1000);
                match client
                    .put(key.as_bytes(), format!("value-{i}").as_bytes())
                    .await
                {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                i += 1;
                next += per_worker;
                tokio::time::sleep_until(next.max(tokio::time::Instant::now())).await;
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_per_second_from_two_readings() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(commits_per_second(Some((100, t0)), Some((600, t1))), 1000);
        assert_eq!(commits_per_second(None, Some((600, t1))), 0);
        assert_eq!(commits_per_second(Some((100, t0)), None), 0);
        // A restarted replica counts from zero again.
        assert_eq!(commits_per_second(Some((600, t0)), Some((5, t1))), 0);
        assert_eq!(commits_per_second(Some((1, t1)), Some((2, t1))), 0);
    }
}
