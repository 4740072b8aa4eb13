//! The shipped image under faults: four replica containers on a user-defined Docker network
//! find each other by the names a StatefulSet gives its pods (`pbft-0.pbft-headless.default.
//! svc.cluster.local`, as network aliases resolved by Docker's DNS), through the same discovery
//! code pods use. Then the client library drives load from the host while containers are
//! killed, disconnected, partitioned and restarted one at a time.
//!
//! These tests need the image (`make image`), so they are ignored by a plain `cargo test`;
//! `make e2e-docker` builds the image and runs them. Each one is bounded in time, and removes
//! its containers, volumes and network when it ends, passed or failed.
//!
//! Recovery times are printed (`make e2e-docker` shows them); they are observations, not
//! assertions.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pbft_client::cli::cluster::{random_secret, to_hex};
use pbft_client::cli::http;
use pbft_client::{Client, ClientError, ClientOptions};
use pbft_core::Ed25519Signer;
use serde_json::Value;

const N: usize = 4;
const CLIENTS: u64 = 8;

fn image() -> String {
    std::env::var("PBFT_E2E_IMAGE").unwrap_or_else(|_| "pbft:0.1.0".into())
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("the docker CLI must be installed")
}

/// Runs a docker command that must succeed.
fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Four replica containers, their network and volumes; all removed on drop.
struct DockerCluster {
    name: String,
    subnet: String,
    dir: tempfile::TempDir,
    clients: Vec<(u64, [u8; 32])>,
    rt: tokio::runtime::Runtime,
}

impl DockerCluster {
    fn start(tag: &str) -> DockerCluster {
        let name = format!("pbft-e2e-{}-{tag}", std::process::id());
        let subnet = Self::create_network(&name);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cluster = DockerCluster {
            name,
            subnet,
            dir,
            clients: Vec::new(),
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime"),
        };
        cluster.write_config();
        for i in 0..N {
            docker_ok(&[
                "volume",
                "create",
                "--label",
                "pbft-e2e=1",
                &cluster.volume(i),
            ]);
            cluster.run(i);
        }
        cluster.wait_ready_all(Duration::from_secs(60));
        cluster
    }

    /// A user-defined network on a free /24, so containers keep fixed addresses across
    /// disconnects and restarts (the host's client reaches them there).
    fn create_network(name: &str) -> String {
        let seed = std::process::id() as usize + name.len();
        for k in 0..64 {
            let subnet = format!("10.213.{}", (seed + k * 37) % 250 + 1);
            let out = docker(&[
                "network",
                "create",
                "--label",
                "pbft-e2e=1",
                "--subnet",
                &format!("{subnet}.0/24"),
                name,
            ]);
            if out.status.success() {
                return subnet;
            }
        }
        panic!("no free subnet for a docker network");
    }

    fn container(&self, i: usize) -> String {
        format!("{}-{i}", self.name)
    }

    fn volume(&self, i: usize) -> String {
        format!("{}-data-{i}", self.name)
    }

    fn ip(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, 10 + i)
    }

    /// The DNS name a StatefulSet pod `pbft-i` has behind headless Service `pbft-headless`.
    fn alias(i: usize) -> String {
        format!("pbft-{i}.pbft-headless.default.svc.cluster.local")
    }

    fn http_addr(&self, i: usize) -> SocketAddr {
        format!("{}:8000", self.ip(i)).parse().expect("address")
    }

    /// One config for every replica, as the controller's ConfigMap: peers by StatefulSet DNS
    /// names, the id from the hostname's ordinal, the key file by `{id}`.
    fn write_config(&mut self) {
        let etc = self.dir.path().join("etc");
        let keys = etc.join("keys");
        std::fs::create_dir_all(&keys).expect("mkdir");
        let mut yaml = String::from(
            "listen: 0.0.0.0:7000\nhttp_listen: 0.0.0.0:8000\ndata_dir: /var/lib/pbft\n\
             key_file: /etc/pbft/keys/replica-{id}.key\ntransport: grpc\nlog_format: json\n\
             ready_max_lag: 8\n\
             statefulset:\n  name: pbft\n  headless_service: pbft-headless\n  namespace: default\n  \
             cluster_domain: cluster.local\n  port: 7000\n\
             protocol:\n  view_change_timeout_ms: 1000\n  status_interval_ms: 250\n\
             replicas:\n",
        );
        for i in 0..N {
            let secret = random_secret().expect("random");
            write_world_readable(&keys.join(format!("replica-{i}.key")), &to_hex(&secret));
            let public = to_hex(&Ed25519Signer::from_secret(secret).public().0);
            yaml.push_str(&format!("  - public_key: {public}\n"));
        }
        yaml.push_str("clients:\n");
        for id in 1..=CLIENTS {
            let secret = random_secret().expect("random");
            let public = to_hex(&Ed25519Signer::from_secret(secret).public().0);
            yaml.push_str(&format!("  - id: {id}\n    public_key: {public}\n"));
            self.clients.push((id, secret));
        }
        write_world_readable(&etc.join("config.yaml"), &yaml);
        // The container runs as uid 65532: the test's files must be readable by it.
        for d in [self.dir.path(), &etc, &keys] {
            set_mode(d, 0o755);
        }
    }

    fn run(&self, i: usize) {
        let etc = format!("{}:/etc/pbft:ro", self.dir.path().join("etc").display());
        let data = format!("{}:/var/lib/pbft", self.volume(i));
        docker_ok(&[
            "run",
            "-d",
            "--name",
            &self.container(i),
            "--label",
            "pbft-e2e=1",
            "--hostname",
            &format!("pbft-{i}"),
            "--network",
            &self.name,
            "--ip",
            &self.ip(i),
            "--network-alias",
            &Self::alias(i),
            "--read-only",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "-v",
            &etc,
            "-v",
            &data,
            "-e",
            "PBFT_CONFIG=/etc/pbft/config.yaml",
            &image(),
        ]);
    }

    fn kill(&self, i: usize) {
        docker_ok(&["kill", &self.container(i)]);
    }

    /// `docker stop`: SIGTERM, then the replica's graceful shutdown (as a pod's termination).
    fn stop(&self, i: usize) {
        docker_ok(&["stop", "-t", "30", &self.container(i)]);
    }

    fn start_again(&self, i: usize) {
        docker_ok(&["start", &self.container(i)]);
    }

    fn disconnect(&self, i: usize) {
        docker_ok(&["network", "disconnect", &self.name, &self.container(i)]);
    }

    fn reconnect(&self, i: usize) {
        docker_ok(&[
            "network",
            "connect",
            "--ip",
            &self.ip(i),
            "--alias",
            &Self::alias(i),
            &self.name,
            &self.container(i),
        ]);
    }

    fn status(&self, i: usize) -> Option<Value> {
        http::status(self.http_addr(i))
    }

    fn ready(&self, i: usize) -> bool {
        matches!(http::get(self.http_addr(i), "/readyz"), Some((200, _)))
    }

    fn height(&self, i: usize) -> Option<u64> {
        self.status(i)?.get("height")?.as_u64()
    }

    /// The highest height any replica reports now: what all must reach to agree.
    fn max_height(&self) -> u64 {
        (0..N).filter_map(|i| self.height(i)).max().unwrap_or(0)
    }

    /// The (view, primary) most replicas report.
    fn view_and_primary(&self) -> (u64, usize) {
        let mut votes: BTreeMap<(u64, u64), usize> = BTreeMap::new();
        for i in 0..N {
            if let Some(s) = self.status(i) {
                let view = s["view"].as_u64().unwrap_or(0);
                let primary = s["primary"].as_u64().unwrap_or(0);
                *votes.entry((view, primary)).or_default() += 1;
            }
        }
        let ((view, primary), _) = votes
            .into_iter()
            .max_by_key(|(_, c)| *c)
            .unwrap_or_else(|| self.fail("no replica answers /status"));
        (view, primary as usize)
    }

    fn wait_ready(&self, i: usize, timeout: Duration) -> Duration {
        let t0 = Instant::now();
        while !self.ready(i) {
            if t0.elapsed() > timeout {
                self.fail(&format!("replica {i} not ready within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        t0.elapsed()
    }

    fn wait_ready_all(&self, timeout: Duration) {
        for i in 0..N {
            self.wait_ready(i, timeout);
        }
    }

    /// Waits until `replicas` report the same height (at least `min`: status snapshots trail
    /// execution by a few milliseconds), head hash, and state digest at that height; returns
    /// the height. The state digest is computed on request, at most once a second, hence the
    /// polling.
    fn wait_agree(&self, replicas: &[usize], min: u64, timeout: Duration) -> u64 {
        let t0 = Instant::now();
        let mut last = String::new();
        while t0.elapsed() < timeout {
            let statuses: Vec<Option<Value>> = replicas.iter().map(|&i| self.status(i)).collect();
            if statuses.iter().all(Option::is_some) {
                let s: Vec<&Value> = statuses.iter().flatten().collect();
                let key = |v: &Value| {
                    (
                        v["height"].as_u64(),
                        v["head_hash"].as_str().map(str::to_owned),
                        v["state_digest_height"].as_u64(),
                        v["state_digest"].as_str().map(str::to_owned),
                    )
                };
                let first = key(s[0]);
                let settled = first.0.is_some_and(|h| h >= min) && first.0 == first.2;
                if settled && s.iter().all(|v| key(v) == first) {
                    return first.0.unwrap_or(0);
                }
                last = format!("{:?}", s.iter().map(|v| key(v)).collect::<Vec<_>>());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.fail(&format!(
            "replicas {replicas:?} did not agree within {timeout:?}; last seen {last}"
        ))
    }

    fn client(&self, k: usize, timeout: Duration) -> Client {
        let (id, secret) = self.clients[k];
        let opts = ClientOptions {
            replicas: (0..N).map(|i| format!("{}:7000", self.ip(i))).collect(),
            client_id: id,
            secret,
            timeout,
            ..ClientOptions::default()
        };
        self.rt
            .block_on(Client::connect(opts))
            .expect("client options")
    }

    fn put(&self, c: &Client, key: &str, value: &str) -> Result<(), ClientError> {
        self.rt.block_on(c.put(key.as_bytes(), value.as_bytes()))
    }

    /// Prints the replicas' recent logs, then fails the test.
    fn fail(&self, msg: &str) -> ! {
        for i in 0..N {
            eprintln!("--- replica {i} /status: {:?}", self.status(i));
        }
        for i in 0..N {
            let out = docker(&["logs", "--tail", "40", &self.container(i)]);
            eprintln!(
                "--- replica {i} ---\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        panic!("{msg}");
    }
}

impl Drop for DockerCluster {
    fn drop(&mut self) {
        for i in 0..N {
            let _ = docker(&["rm", "-f", "-v", &self.container(i)]);
            let _ = docker(&["volume", "rm", "-f", &self.volume(i)]);
        }
        let _ = docker(&["network", "rm", &self.name]);
    }
}

fn write_world_readable(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
    set_mode(path, 0o644);
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Continuous load from several clients: each puts fresh keys one after another and records
/// what was acknowledged, so the test can read every one of them back afterwards.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<std::sync::Mutex<Vec<(String, String)>>>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    done: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(cluster: &DockerCluster, clients: usize, timeout: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let done = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for k in 0..clients {
            let client = cluster.client(k, timeout);
            let (stop, acked, errors, done) =
                (stop.clone(), acked.clone(), errors.clone(), done.clone());
            tasks.push(cluster.rt.spawn(async move {
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("load-{k}-{seq}");
                    let value = format!("v{seq}");
                    match client.put(key.as_bytes(), value.as_bytes()).await {
                        Ok(()) => {
                            acked.lock().expect("lock").push((key, value));
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => errors.lock().expect("lock").push(format!("{key}: {e}")),
                    }
                    seq += 1;
                }
            }));
        }
        Load {
            stop,
            acked,
            errors,
            done,
            tasks,
        }
    }

    fn committed(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until `more` further requests were acknowledged.
    fn wait_for(&self, cluster: &DockerCluster, more: u64, timeout: Duration) -> Duration {
        let target = self.committed() + more;
        let t0 = Instant::now();
        while self.committed() < target {
            if t0.elapsed() > timeout {
                cluster.fail(&format!(
                    "load stalled: {} of {target} acknowledged after {timeout:?}; errors {:?}",
                    self.committed(),
                    self.errors.lock().expect("lock")
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        t0.elapsed()
    }

    fn finish(self, cluster: &DockerCluster) -> (Vec<(String, String)>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = cluster.rt.block_on(t);
        }
        let acked = std::mem::take(&mut *self.acked.lock().expect("lock"));
        let errors = std::mem::take(&mut *self.errors.lock().expect("lock"));
        (acked, errors)
    }
}

/// Reads every acknowledged key back through the cluster.
fn assert_all_readable(cluster: &DockerCluster, acked: &[(String, String)]) {
    let client = cluster.client(CLIENTS as usize - 1, Duration::from_secs(20));
    for (key, value) in acked {
        let got = cluster
            .rt
            .block_on(client.get(key.as_bytes()))
            .unwrap_or_else(|e| cluster.fail(&format!("get {key}: {e}")));
        if got.as_deref() != Some(value.as_bytes()) {
            cluster.fail(&format!(
                "acknowledged {key}={value} but read {:?}",
                got.map(|v| String::from_utf8_lossy(&v).into_owned())
            ));
        }
    }
}

#[test]
#[ignore = "needs the container image: make e2e-docker"]
fn containers_find_each_other_commit_and_agree() {
    let c = DockerCluster::start("agree");
    let load = Load::start(&c, 4, Duration::from_secs(20));
    load.wait_for(&c, 200, Duration::from_secs(60));
    let (acked, errors) = load.finish(&c);
    assert!(errors.is_empty(), "client errors: {errors:?}");
    let height = c.wait_agree(
        &[0, 1, 2, 3],
        c.max_height().max(1),
        Duration::from_secs(30),
    );
    assert_all_readable(&c, &acked);
    for i in 0..N {
        let s = c.status(i).expect("status");
        let connected = s["peers"]
            .as_array()
            .map(|p| p.iter().filter(|p| p["connected"] == true).count())
            .unwrap_or(0);
        assert_eq!(connected, N - 1, "replica {i} peers: {}", s["peers"]);
    }
    println!(
        "agree: {} requests acknowledged; all 4 replicas at height {height} with one state digest",
        acked.len()
    );
}

#[test]
#[ignore = "needs the container image: make e2e-docker"]
fn container_primary_killed_view_change_and_commits_resume() {
    let c = DockerCluster::start("primary");
    let load = Load::start(&c, 2, Duration::from_secs(30));
    load.wait_for(&c, 50, Duration::from_secs(60));
    let (view, primary) = c.view_and_primary();
    c.kill(primary);
    let killed = Instant::now();
    let resumed = load.wait_for(&c, 1, Duration::from_secs(60));
    let committed_after = load.wait_for(&c, 50, Duration::from_secs(60));
    let others: Vec<usize> = (0..N).filter(|&i| i != primary).collect();
    let (new_view, new_primary) = c.view_and_primary();
    assert!(
        new_view > view && new_primary != primary,
        "view {view}->{new_view}, primary {primary}->{new_primary}"
    );
    // The killed replica comes back and catches up.
    c.start_again(primary);
    let back = Instant::now();
    c.wait_ready(primary, Duration::from_secs(60));
    let (acked, errors) = load.finish(&c);
    let height = c.wait_agree(
        &[0, 1, 2, 3],
        c.max_height().max(1),
        Duration::from_secs(60),
    );
    let caught_up = back.elapsed();
    assert!(
        errors.is_empty(),
        "client errors beyond retries: {errors:?}"
    );
    assert_all_readable(&c, &acked);
    println!(
        "primary kill: replica {primary} killed in view {view}; first commit {:.2}s later, view {new_view} \
         (primary {new_primary}); 50 more commits in {:.2}s by {others:?}; restarted replica \
         ready and agreeing at height {height} {:.2}s after start; {} acknowledged, 0 errors",
        resumed.as_secs_f64(),
        committed_after.as_secs_f64(),
        caught_up.as_secs_f64(),
        acked.len()
    );
    let _ = killed;
}

#[test]
#[ignore = "needs the container image: make e2e-docker"]
fn container_disconnected_replica_catches_up_after_reconnect() {
    let c = DockerCluster::start("disconnect");
    let (_, primary) = c.view_and_primary();
    let lagger = (primary + 1) % N;
    let load = Load::start(&c, 2, Duration::from_secs(30));
    load.wait_for(&c, 20, Duration::from_secs(60));
    c.disconnect(lagger);
    let before = c.height(primary).unwrap_or(0);
    load.wait_for(&c, 300, Duration::from_secs(90));
    let (acked, errors) = load.finish(&c);
    let others: Vec<usize> = (0..N).filter(|&i| i != lagger).collect();
    let target = c.wait_agree(&others, before + 1, Duration::from_secs(30));
    assert!(target > before, "the other three kept committing");
    c.reconnect(lagger);
    let t0 = Instant::now();
    let height = c.wait_agree(&[0, 1, 2, 3], target, Duration::from_secs(60));
    let catch_up = t0.elapsed();
    assert!(errors.is_empty(), "client errors: {errors:?}");
    let synced = c
        .status(lagger)
        .and_then(|s| s["height"].as_u64())
        .unwrap_or(0);
    assert_eq!(synced, height);
    assert_all_readable(&c, &acked);
    println!(
        "disconnect: replica {lagger} off the network while the others went from height {before} to {target}; \
         after reconnecting it agreed at height {height} in {:.2}s",
        catch_up.as_secs_f64()
    );
}

#[test]
#[ignore = "needs the container image: make e2e-docker"]
fn container_partition_without_quorum_stops_commits_and_heals() {
    let c = DockerCluster::start("partition");
    let client = c.client(0, Duration::from_secs(3));
    for k in 0..20 {
        c.put(&client, &format!("before-{k}"), "x")
            .unwrap_or_else(|e| c.fail(&format!("put before the partition: {e}")));
    }
    let before = c.wait_agree(&[0, 1, 2, 3], 20, Duration::from_secs(30));
    // Two of four cut off: each side has 2 < 2f+1 = 3 replicas.
    c.disconnect(2);
    c.disconnect(3);
    let err = c.put(&client, "during", "x");
    assert!(
        matches!(err, Err(ClientError::Timeout { .. })),
        "a request must not commit without a quorum: {err:?}"
    );
    for i in [0, 1] {
        let h = c.height(i).unwrap_or(0);
        assert_eq!(h, before, "replica {i} committed without a quorum");
    }
    c.reconnect(2);
    c.reconnect(3);
    let healed = Instant::now();
    let client = c.client(1, Duration::from_secs(30));
    c.put(&client, "after", "y")
        .unwrap_or_else(|e| c.fail(&format!("put after healing: {e}")));
    let resumed = healed.elapsed();
    let height = c.wait_agree(&[0, 1, 2, 3], before + 1, Duration::from_secs(60));
    let got = c.rt.block_on(client.get(b"before-7")).expect("get");
    assert_eq!(got.as_deref(), Some(&b"x"[..]));
    println!(
        "partition 2|2: no commit at height {before} while split (client timed out); after healing the \
         first commit took {:.2}s; all 4 agree at height {height}",
        resumed.as_secs_f64()
    );
}

#[test]
#[ignore = "needs the container image: make e2e-docker"]
fn containers_rolling_restart_under_load_loses_nothing() {
    let c = DockerCluster::start("rolling");
    let load = Load::start(&c, 4, Duration::from_secs(30));
    load.wait_for(&c, 50, Duration::from_secs(60));
    let mut steps = Vec::new();
    // A StatefulSet rolls from the highest ordinal down, one pod at a time, each gated by
    // readiness.
    for i in (0..N).rev() {
        let t0 = Instant::now();
        c.stop(i);
        let stopped = t0.elapsed().as_secs_f64();
        c.start_again(i);
        c.wait_ready(i, Duration::from_secs(90));
        steps.push(format!(
            "{i}: {:.2}s (stop {stopped:.2}s)",
            t0.elapsed().as_secs_f64()
        ));
        load.wait_for(&c, 20, Duration::from_secs(60));
    }
    let (acked, errors) = load.finish(&c);
    assert!(
        errors.is_empty(),
        "client errors beyond retries: {errors:?}"
    );
    let height = c.wait_agree(
        &[0, 1, 2, 3],
        c.max_height().max(1),
        Duration::from_secs(60),
    );
    assert_all_readable(&c, &acked);
    println!(
        "rolling restart: stop/start/ready per replica, ordinal 3 down to 0 [{}]; {} requests acknowledged under load, \
         0 client errors, all read back; all 4 agree at height {height}",
        steps.join(", "),
        acked.len()
    );
}
