//! The `pbft` CLI end to end: `pbft up` starts a real local cluster, the commands talk to it
//! with script-friendly exit codes, a killed replica does not stop the others, the ledger
//! verifies, and stopping `pbft up` stops every replica; running it again resumes the data.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use futures_util::Stream;
use pbft_api::pb;
use pbft_api::pb::pbft_service_client::PbftServiceClient;
use pbft_api::pb::pbft_service_server::{PbftService, PbftServiceServer};
use pbft_client::cli::cluster::ClusterFile;
use tonic::{Request, Response, Status, Streaming};

fn pbft() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pbft"))
}

fn replica_bin() -> PathBuf {
    let p = pbft().with_file_name("pbft-replica");
    assert!(
        p.is_file(),
        "{} missing: build it first (cargo build -p pbft-replica; `make test` does)",
        p.display()
    );
    p
}

#[path = "../../pbft-replica/tests/common/ports.rs"]
mod ports;

/// A base port P with P, P+1, P+2 reserved on 127.0.0.1-4 for this test process (see
/// `ports`), so no other test takes them, not even while `pbft up` is stopped and restarted.
fn free_base_port() -> u16 {
    ports::pick(0, 3, |p| {
        (1..=4).all(|i| (0..3).all(|d| ports::reserve(&format!("127.0.0.{i}"), p + d)))
    })
    .expect("no free port range")
}

fn run(data: &Path, args: &[&str]) -> Output {
    Command::new(pbft())
        .arg("--data")
        .arg(data)
        .args(args)
        .output()
        .expect("run pbft")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

struct Up(Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_up(data: &Path, port: u16) -> Up {
    Up(Command::new(pbft())
        .arg("--data")
        .arg(data)
        .args(["up", "--port", &port.to_string(), "--replica-bin"])
        .arg(replica_bin())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pbft up"))
}

fn wait_status_ok(data: &Path) {
    let start = Instant::now();
    loop {
        let o = run(data, &["status", "--output", "json"]);
        if o.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
            let up = v["replicas"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|r| r["down"] != true).count());
            if up == 4 {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "cluster not up: {}",
            text(&o)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every row of `pbft status`'s table has a cell starting exactly where each header word
/// starts (a number printed through `serde_json::Value` once ignored the widths and shifted
/// the view and primary columns), and live rows hold a view number and a primary `rN`.
fn assert_columns_line_up(table: &str) {
    let mut lines = table.lines();
    let header = lines.next().expect("header line");
    let starts: Vec<usize> = header
        .char_indices()
        .filter(|&(i, c)| c != ' ' && (i == 0 || header.as_bytes()[i - 1] == b' '))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(starts.len(), 8, "{table}");
    let mut rows = 0;
    for line in lines {
        rows += 1;
        let b = line.as_bytes();
        for &at in &starts {
            let starts_here = at < b.len() && b[at] != b' ' && (at == 0 || b[at - 1] == b' ');
            assert!(starts_here, "no cell starts at column {at}:\n{table}");
        }
        let cells: Vec<&str> = line.split_whitespace().collect();
        if cells.last() == Some(&"up") {
            assert!(cells[1].parse::<u64>().is_ok(), "view: {line}");
            assert!(cells[2].starts_with('r'), "primary: {line}");
        }
    }
    assert_eq!(rows, 4, "{table}");
}

fn stop(up: &mut Up) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(up.0.id().to_string())
        .status();
    let start = Instant::now();
    loop {
        if let Ok(Some(st)) = up.0.try_wait() {
            assert!(st.success(), "pbft up exit {st}");
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "pbft up did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A stand-in for replica 0's peer API that answers `SyncState` with the real replica's
/// blocks, the `prev_hash` of block `bad` altered, and refuses everything else.
#[derive(Clone)]
struct TamperingReplica {
    upstream: String,
    bad: u64,
}

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl PbftService for TamperingReplica {
    type MessageStreamStream = Out<pb::PbftMessage>;

    async fn message_stream(
        &self,
        _: Request<Streaming<pb::PbftMessage>>,
    ) -> Result<Response<Self::MessageStreamStream>, Status> {
        Err(Status::unimplemented("stand-in"))
    }

    async fn broadcast_message(
        &self,
        _: Request<pb::BroadcastRequest>,
    ) -> Result<Response<pb::BroadcastResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }

    async fn send_message(
        &self,
        _: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }

    async fn sync_state(
        &self,
        request: Request<pb::SyncStateRequest>,
    ) -> Result<Response<pb::SyncStateResponse>, Status> {
        let mut upstream = PbftServiceClient::connect(format!("http://{}", self.upstream))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .max_decoding_message_size(64 << 20);
        let mut resp = upstream
            .sync_state(request.into_inner())
            .await?
            .into_inner();
        for b in &mut resp.blocks {
            if b.height == self.bad {
                b.prev_hash[0] ^= 1;
            }
        }
        Ok(Response::new(resp))
    }

    async fn get_checkpoint(
        &self,
        _: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<pb::GetCheckpointResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }

    async fn get_status(
        &self,
        _: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
}

/// Starts a `TamperingReplica` in front of `data`'s replica 0 and writes a copy of the
/// cluster's layout (under `scratch`) that points replica 0 at it; returns the runtime
/// serving it (keep it alive) and the copy's directory.
fn tampering_stand_in(data: &Path, scratch: &Path, bad: u64) -> (tokio::runtime::Runtime, PathBuf) {
    let mut cluster = ClusterFile::load(data).expect("cluster.yaml");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stand_in = TamperingReplica {
        upstream: cluster.replicas[0].listen.to_string(),
        bad,
    };
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(PbftServiceServer::new(stand_in))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    cluster.replicas[0].listen = addr;
    let dir = scratch.join("tampered");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let yaml = serde_saphyr::to_string(&cluster).expect("yaml");
    std::fs::write(dir.join("cluster.yaml"), yaml).expect("write cluster.yaml");
    (rt, dir)
}

#[test]
fn up_commands_exit_codes_and_resume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("cluster");
    let port = free_base_port();
    let mut up = start_up(&data, port);
    wait_status_ok(&data);

    let o = run(&data, &["put", "greeting", "hello"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&data, &["get", "greeting"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hello\n");
    let o = run(&data, &["get", "nope"]);
    assert_eq!(o.status.code(), Some(4), "missing key: {}", text(&o));
    let o = run(&data, &["cas", "greeting", "bye", "--expected", "wrong"]);
    assert_eq!(o.status.code(), Some(5), "cas mismatch: {}", text(&o));
    let o = run(
        &data,
        &[
            "--output",
            "json",
            "cas",
            "greeting",
            "bye",
            "--expected",
            "hello",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["swapped"], true);
    let o = run(&data, &["del", "greeting"]);
    assert!(o.status.success());
    let o = run(&data, &["del", "greeting"]);
    assert_eq!(o.status.code(), Some(4));

    // Commands run in parallel each get a client id of their own: sharing one, all but
    // the latest request of that id would be stale, dropped, and time out.
    let parallel: Vec<Child> = (0..6)
        .map(|i| {
            Command::new(pbft())
                .arg("--data")
                .arg(&data)
                .args(["--timeout", "5", "put", &format!("parallel-{i}"), "v"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("pbft put")
        })
        .collect();
    for (i, child) in parallel.into_iter().enumerate() {
        let o = child.wait_with_output().expect("wait");
        assert!(o.status.success(), "parallel put {i}: {}", text(&o));
    }

    // A second `pbft up` on the same directory, or a new cluster on the same ports, is
    // refused before it starts anything (it used to start replicas that could not bind
    // and then show the running cluster's replicas as its own).
    let up_refused = |data: &Path, port: &str, why: &str| {
        let bin = replica_bin().display().to_string();
        let o = run(
            data,
            &[
                "up",
                "--port",
                port,
                "--seconds",
                "1",
                "--replica-bin",
                &bin,
            ],
        );
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains(why), "{}", text(&o));
    };
    up_refused(&data, &port.to_string(), "another `pbft up`");
    let other = dir.path().join("other");
    up_refused(&other, &port.to_string(), "cannot listen on");
    assert!(
        !other.join("cluster.yaml").exists(),
        "a refused new cluster writes no configuration"
    );

    // Kill one replica: the rest keep committing, status shows it down but exits 0 (f = 1).
    let pid = Command::new("pgrep")
        .args(["-f", &format!("{}/replica-3.yaml", data.display())])
        .output()
        .expect("pgrep");
    let pid = String::from_utf8_lossy(&pid.stdout).trim().to_string();
    assert!(!pid.is_empty(), "replica 3 process");
    let _ = Command::new("kill").args(["-KILL", &pid]).status();
    let o = run(&data, &["put", "after-kill", "ok"]);
    assert!(
        o.status.success(),
        "put with one replica down: {}",
        text(&o)
    );
    let o = run(&data, &["status"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("down"), "{}", text(&o));
    assert_columns_line_up(&String::from_utf8_lossy(&o.stdout));

    // A short benchmark, replicated and unreplicated, with its JSON report (in the file,
    // and on stdout for `--output json`, with no progress line there).
    let report = dir.path().join("bench.json");
    let o = Command::new(pbft())
        .arg("--data")
        .arg(&data)
        .args([
            "bench",
            "--concurrency",
            "2",
            "--duration",
            "1",
            "--warmup",
            "1",
            "--payload",
            "64",
            "--unreplicated",
            "--replica-bin",
        ])
        .arg(replica_bin())
        .arg("--json")
        .arg(&report)
        .args(["--output", "json"])
        .output()
        .expect("bench");
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("json");
    let stdout: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!("stdout is the report alone ({e}): {}", text(&o));
    });
    assert_eq!(stdout, v, "stdout and --json hold the same report");
    assert!(
        v["replicated"]["committed"].as_u64().unwrap_or(0) > 0,
        "{v}"
    );
    assert!(
        v["unreplicated"]["committed"].as_u64().unwrap_or(0) > 0,
        "{v}"
    );
    assert!(
        v["replicated"]["p99_ms"].as_f64().unwrap_or(0.0) > 0.0,
        "{v}"
    );
    assert!(v["ratio"].as_f64().unwrap_or(0.0) > 0.0, "{v}");

    let o = run(&data, &["verify-ledger", "--replica", "0"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("every link and certificate valid"),
        "{}",
        text(&o)
    );

    // The same chain with block 3's link to block 2 altered in transit: verify-ledger
    // names block 3 as the first bad one and exits 6.
    let (_rt, tampered) = tampering_stand_in(&data, dir.path(), 3);
    let o = run(
        &tampered,
        &["--output", "json", "verify-ledger", "--replica", "0"],
    );
    assert_eq!(o.status.code(), Some(6), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["valid"], false, "{v}");
    assert_eq!(v["first_bad_block"], 3, "{v}");
    assert!(v["reason"].as_str().unwrap_or("").contains("link"), "{v}");

    stop(&mut up);
    let o = run(&data, &["get", "after-kill", "--timeout", "2"]);
    assert_eq!(o.status.code(), Some(3), "cluster stopped: {}", text(&o));
    let o = run(&data, &["verify-ledger", "--timeout", "2"]);
    assert_eq!(o.status.code(), Some(3), "cluster stopped: {}", text(&o));
    assert!(text(&o).contains("cannot reach replica 0"), "{}", text(&o));

    // Again: same keys, same data.
    let mut up = start_up(&data, port);
    wait_status_ok(&data);
    let o = run(&data, &["get", "after-kill"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "ok\n", "{}", text(&o));
    stop(&mut up);
}

/// `pbft up --output json`: the live view as one JSON object per line on stdout (the
/// words go to stderr), and it stops by itself after `--seconds`.
#[test]
fn up_prints_its_view_as_json_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_base_port();
    let o = Command::new(pbft())
        .arg("--data")
        .arg(dir.path().join("c"))
        .args(["--output", "json", "up", "--seconds", "3", "--port"])
        .arg(port.to_string())
        .arg("--replica-bin")
        .arg(replica_bin())
        .output()
        .expect("pbft up");
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let frames: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert!(!frames.is_empty(), "{}", text(&o));
    let last = frames.last().expect("a frame");
    let replicas = last["replicas"].as_array().expect("replicas");
    assert_eq!(replicas.len(), 4, "{last}");
    for r in replicas {
        assert_eq!(r["state"], "up", "{last}");
        assert_eq!(r["primary"], 0, "{last}");
        assert_eq!(r["peers_connected"], 3, "{last}");
    }
    assert!(text(&o).contains("stopped"), "{}", text(&o));
}

#[test]
fn helpful_errors_without_a_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = run(&dir.path().join("none"), &["get", "k"]);
    assert_eq!(o.status.code(), Some(1));
    let t = text(&o);
    assert!(t.contains("no cluster at") && t.contains("pbft up"), "{t}");
    assert!(!t.contains("panicked") && !t.contains("backtrace"), "{t}");
    let o = run(dir.path(), &["keygen"]);
    assert!(o.status.success());
    assert!(text(&o).contains("public key"));
    // keygen --out: the secret in a file only its owner can read, never overwritten.
    let key = dir.path().join("my.key");
    let key_arg = key.display().to_string();
    let o = run(
        dir.path(),
        &["--output", "json", "keygen", "--out", &key_arg],
    );
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["public_key"].as_str().map(str::len), Some(64), "{v}");
    let secret = std::fs::read_to_string(&key).expect("key file");
    assert_eq!(secret.len(), 64, "hex of 32 bytes");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    }
    let o = run(dir.path(), &["keygen", "--out", &key_arg]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("refusing to overwrite"), "{}", text(&o));
    assert_eq!(
        std::fs::read_to_string(&key).expect("key"),
        secret,
        "untouched"
    );
    // Bad arguments exit 2 and say what is wrong, before anything else happens.
    for (args, says) in [
        (&["cas", "k", "v"][..], "--absent"),
        (&["bench", "--concurrency", "0"][..], "at least 1"),
        (&["bench", "--duration", "99999999999"][..], "a week"),
        (&["bench", "--payload", "99999999999"][..], "16 MiB"),
        (&["bench", "--rate", "0"][..], "at least 1"),
        (
            &["bench", "--rate", "9", "--concurrency", "9"][..],
            "cannot be used",
        ),
        (&["get", "k", "--timeout", "0"][..], "at least 1"),
        (
            &["get", "k", "--timeout", "18446744073709551615"][..],
            "a day",
        ),
        (&["up", "--replicas", "5"][..], "3f+1"),
        (&["up", "--port", "0"][..], "from 1 to"),
        (&["up", "--port", "65535"][..], "from 1 to"),
    ] {
        let o = run(dir.path(), args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(text(&o).contains(says), "{args:?}: {}", text(&o));
    }
}
