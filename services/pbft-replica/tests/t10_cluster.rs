//! Multi-process tests: four real `pbft-replica` processes on 127.0.0.1-4, driven by the
//! client library, killed, restarted and wiped. Each runs on both transports. Recovery times
//! are printed (run with `--nocapture` to see them).

mod common;

use std::time::{Duration, Instant};

use common::Cluster;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("runtime")
}

/// Puts `count` keys through `client`, each must succeed.
fn put_many(
    rt: &tokio::runtime::Runtime,
    client: &pbft_client::Client,
    prefix: &str,
    count: usize,
) {
    rt.block_on(async {
        for i in 0..count {
            let key = format!("{prefix}-{i}");
            client
                .put(key.as_bytes(), b"value")
                .await
                .unwrap_or_else(|e| panic!("put {key}: {e}"));
        }
    });
}

fn commits_and_agrees(transport: &'static str) {
    let c = Cluster::start(transport);
    c.wait_all_ready();
    let rt = rt();
    let client = rt.block_on(c.client(0));
    put_many(&rt, &client, "k", 30);
    let got = rt.block_on(client.get(b"k-7")).expect("get");
    assert_eq!(got, Some(b"value".to_vec()));
    let ok = rt
        .block_on(client.cas(b"k-7", Some(b"value"), b"new"))
        .expect("cas");
    assert_eq!(ok, Ok(()));
    let stale = rt
        .block_on(client.cas(b"k-7", Some(b"value"), b"newer"))
        .expect("cas");
    assert_eq!(stale, Err(Some(b"new".to_vec())));
    assert!(rt.block_on(client.delete(b"k-7")).expect("delete"));
    c.wait_agree(&[0, 1, 2, 3], 33, Duration::from_secs(20));
    // After its first request the client sent to the primary alone; the backups learnt of
    // the rest from pre-prepares and pushed their replies down the client's streams.
    sent_to_the_primary_alone(&c, 34.0, 1..4, 24.0);
}

/// The primary got at least `requests` requests, and each of `backups` got few of them
/// and pushed at least `pushed` replies for the ones it learnt from pre-prepares.
fn sent_to_the_primary_alone(
    c: &Cluster,
    requests: f64,
    backups: std::ops::Range<usize>,
    pushed: f64,
) {
    let submitted = |i| c.metric(i, "pbft_client_requests_total", "outcome=\"submitted\"");
    let pushed_by = |i| c.metric(i, "pbft_client_requests_total", "outcome=\"pushed\"");
    assert!(submitted(0) >= requests, "the primary got every request");
    for backup in backups {
        assert!(
            submitted(backup) < 10.0 && pushed_by(backup) >= pushed,
            "backup {backup}: {} submitted, {} pushed",
            submitted(backup),
            pushed_by(backup)
        );
    }
}

/// With a backup down from the start, the client still sends to the primary alone once
/// the other three know its stream: the live backups learn of the requests from
/// pre-prepares and push their replies.
fn a_dead_backup_does_not_make_the_client_broadcast(transport: &'static str) {
    let mut c = Cluster::start(transport);
    c.wait_all_ready();
    c.kill(3);
    let rt = rt();
    let client = rt.block_on(c.client(0));
    put_many(&rt, &client, "k", 30);
    c.wait_agree(&[0, 1, 2], 30, Duration::from_secs(20));
    sent_to_the_primary_alone(&c, 30.0, 1..3, 20.0);
}

fn backup_restart_catches_up(transport: &'static str) {
    let mut c = Cluster::start(transport);
    c.wait_all_ready();
    let rt = rt();
    let client = rt.block_on(c.client(1));
    put_many(&rt, &client, "a", 5);
    c.kill(3);
    put_many(&rt, &client, "b", 40);
    let before = c.height(0).expect("height");
    c.start_replica(3);
    let took = c.wait_agree(&[0, 1, 2, 3], before, Duration::from_secs(30));
    println!("[{transport}] backup restart: caught up {before} blocks in {took:?}");
    // While it was down, its peers' bounded queues filled and the rest was dropped (counted).
    assert!(c.metric(0, "pbft_dropped_messages_total", "peer=\"3\"") > 0.0);
    assert!(
        c.metric(3, "pbft_synced_blocks_total", "") > 0.0,
        "caught up through SyncState"
    );
}

fn primary_kill_view_change(transport: &'static str) {
    let mut c = Cluster::start(transport);
    c.wait_all_ready();
    let rt = rt();
    let client = rt.block_on(c.client(2));
    put_many(&rt, &client, "a", 5);
    c.kill(0);
    let start = Instant::now();
    put_many(&rt, &client, "b", 1);
    let first_commit = start.elapsed();
    put_many(&rt, &client, "c", 10);
    println!("[{transport}] primary killed: first commit after {first_commit:?}");
    let view = c.status(1).and_then(|s| s["view"].as_u64()).unwrap_or(0);
    assert!(view >= 1, "view changed (view {view})");
    c.wait_agree(&[1, 2, 3], 16, Duration::from_secs(20));
}

fn wiped_replica_state_transfer(transport: &'static str) {
    let mut c = Cluster::start(transport);
    c.wait_all_ready();
    let rt = rt();
    let client = rt.block_on(c.client(3));
    put_many(&rt, &client, "a", 40);
    c.kill(2);
    std::fs::remove_dir_all(c.data_dir(2)).expect("wipe");
    let before = c.height(0).expect("height");
    c.start_replica(2);
    let took = c.wait_agree(&[0, 1, 2, 3], before, Duration::from_secs(30));
    println!("[{transport}] wiped replica: state transfer of {before} blocks in {took:?}");
    // It votes again: with another backup down, progress needs it.
    c.kill(3);
    put_many(&rt, &client, "b", 5);
    c.wait_agree(&[0, 1, 2], before + 5, Duration::from_secs(20));
}

fn sigterm_exits_cleanly(transport: &'static str) {
    let mut c = Cluster::start(transport);
    c.wait_all_ready();
    let rt = rt();
    let client = rt.block_on(c.client(0));
    put_many(&rt, &client, "a", 3);
    let status = c.terminate(1).expect("exit status");
    assert!(
        status.success(),
        "SIGTERM exit status {status:?}\n{}",
        c.log(1)
    );
    let log = c.log(1);
    assert!(
        log.contains("stopped cleanly"),
        "{}",
        common::tail(&log, 15)
    );
    // The client's streams ended with the server instead of holding its drain open.
    assert!(!log.contains("did not drain"), "{}", common::tail(&log, 15));
    c.start_replica(1);
    c.wait_agree(&[0, 1, 2, 3], 3, Duration::from_secs(20));
}

/// Clients sharing one `Connections` (one `SubmitBatches` stream per replica, the way
/// `pbft bench` runs): concurrent requests all complete, a backup killed under them only
/// breaks its own stream, and once restarted it is reached again through a new one.
fn shared_connections_serve_many_clients(transport: &'static str) {
    use std::sync::Arc;

    use pbft_client::{Client, ClientOptions, Connections};

    let mut c = Cluster::start(transport);
    c.wait_all_ready();
    let rt = rt();
    let opts = |id: u64| ClientOptions {
        replicas: c.client_addrs.iter().map(|a| a.to_string()).collect(),
        client_id: id,
        secret: common::client_secret(id),
        timeout: Duration::from_secs(20),
        retry_after: Duration::from_millis(300),
        ..ClientOptions::default()
    };
    // Connections dial lazily, from a runtime.
    let _runtime = rt.enter();
    let connections = Connections::new(&opts(0)).expect("connections");
    let clients: Vec<Arc<Client>> = (0..4)
        .map(|id| Arc::new(Client::with_connections(&connections, &opts(id))))
        .collect();
    let round = |rt: &tokio::runtime::Runtime, tag: &str| {
        rt.block_on(async {
            let tasks: Vec<_> = clients
                .iter()
                .enumerate()
                .map(|(id, client)| {
                    let (client, tag) = (client.clone(), tag.to_string());
                    tokio::spawn(async move {
                        for i in 0..10 {
                            let key = format!("{tag}-{id}-{i}");
                            client
                                .put(key.as_bytes(), tag.as_bytes())
                                .await
                                .unwrap_or_else(|e| panic!("put {key}: {e}"));
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.expect("client task");
            }
        })
    };
    round(&rt, "a");
    let pushed = |c: &Cluster, i| c.metric(i, "pbft_client_requests_total", "outcome=\"pushed\"");
    assert!(
        (1..4).all(|b| pushed(&c, b) > 0.0),
        "backups pushed replies down the shared streams"
    );
    c.kill(2);
    round(&rt, "b");
    c.start_replica(2);
    c.wait_ready(2, Duration::from_secs(20));
    let before = pushed(&c, 2);
    round(&rt, "c");
    let got = rt.block_on(clients[3].get(b"b-1-9")).expect("get");
    assert_eq!(got, Some(b"b".to_vec()));
    c.wait_agree(&[0, 1, 2, 3], 1, Duration::from_secs(30));
    // Blocks the restarted backup caught up on by sync were answered by the others, so it
    // may not have replied to round c at all; now that it is level, it takes part. A client
    // reopens a stream that failed at most once a second, and a round can take less, so
    // the rounds go on until it has (bounded).
    let deadline = Instant::now() + Duration::from_secs(20);
    for r in 0.. {
        round(&rt, &format!("d{r}"));
        if pushed(&c, 2) > before
            || c.metric(2, "pbft_client_requests_total", "outcome=\"replied\"") > 0.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted backup answers over a reopened stream"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

macro_rules! on_transports {
    ($($name:ident),* $(,)?) => {
        mod grpc {
            $(#[test] fn $name() { super::$name("grpc"); })*
        }
        mod tcp {
            $(#[test] fn $name() { super::$name("tcp"); })*
        }
    };
}

on_transports!(
    commits_and_agrees,
    a_dead_backup_does_not_make_the_client_broadcast,
    backup_restart_catches_up,
    primary_kill_view_change,
    wiped_replica_state_transfer,
    sigterm_exits_cleanly,
    shared_connections_serve_many_clients,
);

/// A damaged database stops start-up with a clear error instead of serving wrong data.
/// A replica whose store holds a checkpoint certified under the cluster's state digest,
/// restarted with the other one configured, refuses to start and names the setting and the
/// value to set (running on would split the cluster's checkpoints); with the setting put
/// back it rejoins.
#[test]
fn a_replica_configured_for_another_state_digest_refuses_to_start() {
    let mut c = Cluster::start("grpc");
    c.wait_all_ready();
    let rt = rt();
    let client = rt.block_on(c.client(0));
    // Checkpoint interval 8: twelve sequential puts make checkpoint 8 stable everywhere.
    put_many(&rt, &client, "a", 12);
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.metric(1, "pbft_stable_checkpoint", "") < 8.0 {
        assert!(
            Instant::now() < deadline,
            "checkpoint 8 never became stable at replica 1"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    c.kill(1);
    let config = c.dir.path().join("replica-1.yaml");
    let original = std::fs::read_to_string(&config).expect("config");
    let linear = original.replacen("protocol:\n", "protocol:\n  state_digest: linear\n", 1);
    assert_ne!(linear, original, "the test config has a protocol section");
    std::fs::write(&config, &linear).expect("write config");
    let stderr = refused_start(&config, "replica started under the other state digest");
    assert!(
        stderr.contains("certified with the `buckets` state digest")
            && stderr.contains("protocol.state_digest: buckets"),
        "the error names the setting and the value:\n{stderr}"
    );
    std::fs::write(&config, &original).expect("restore config");
    c.start_replica(1);
    c.wait_ready(1, Duration::from_secs(20));
    put_many(&rt, &client, "b", 3);
    c.wait_agree(&[0, 1, 2, 3], 15, Duration::from_secs(30));
}

#[test]
fn damaged_database_refuses_to_start() {
    let mut c = Cluster::start("grpc");
    c.wait_all_ready();
    let rt = rt();
    let client = rt.block_on(c.client(0));
    put_many(&rt, &client, "a", 12);
    c.kill(1);
    let db = c.data_dir(1).join("pbft.redb");
    // Truncation always hits live data (byte flips inside values are covered by the storage
    // unit tests, which know where values lie).
    let len = std::fs::metadata(&db).expect("db").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .and_then(|f| f.set_len(len / 2))
        .expect("truncate");
    let stderr = refused_start(
        &c.dir.path().join("replica-1.yaml"),
        "replica started on a damaged database",
    );
    assert!(
        stderr.contains("error:") && (stderr.contains("damaged") || stderr.contains("corrupt")),
        "clear error expected:\n{stderr}"
    );
}

/// Runs a replica on `config` and expects it to exit with an error within 20 s, never a
/// panic (`started` is the failure message if it keeps running); returns its stderr.
fn refused_start(config: &std::path::Path, started: &str) -> String {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pbft-replica"))
        .arg("--config")
        .arg(config)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{started}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "must not start:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}
