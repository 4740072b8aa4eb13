//! A real cluster of `pbft-replica` processes on 127.0.0.x addresses, for integration tests.
//! Every wait is bounded; processes are killed when the cluster is dropped.
#![allow(dead_code)]

pub mod ports;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pbft_client::{Client, ClientOptions};
use pbft_core::Ed25519Signer;
use pbft_replica::keys::to_hex;
use serde_json::Value;

pub const N: usize = 4;

/// What a test cluster's configuration changes from the default (listed peer addresses,
/// one port per replica, no extra environment).
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Extra environment for every replica process (after `RUST_LOG`, so it may override it).
    pub env: Vec<(String, String)>,
    /// Peers derived from StatefulSet naming instead of listed addresses.
    pub statefulset: Option<StatefulSetOptions>,
    /// TLS on the gRPC listeners, with a fresh test CA (see [`TestCa`]).
    pub tls: bool,
}

/// The name every test replica's certificate carries (replicas are dialled by IP, so they
/// verify against this name: `tls.server_name`).
pub const TLS_NAME: &str = "replicas.pbft.test";

/// A throwaway CA and one certificate for all replicas, written as PEM files.
pub struct TestCa {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new() -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "pbft test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().expect("replica key");
        let params = CertificateParams::new(vec![TLS_NAME.to_string()]).expect("params");
        let cert = params.signed_by(&key, &issuer).expect("replica cert");
        TestCa {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// StatefulSet mode: the replicas' configs name no peer addresses; every replica listens on
/// one shared port on its own 127.0.0.x, and peers are found as [`statefulset_host`] through
/// `dns_server`.
#[derive(Clone, Debug)]
pub struct StatefulSetOptions {
    pub dns_server: SocketAddr,
}

/// The DNS name StatefulSet naming gives replica `i` in test clusters.
pub fn statefulset_host(i: usize) -> String {
    format!("pbft-{i}.pbft-headless.default.svc.cluster.local")
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub transport: &'static str,
    pub listen: Vec<SocketAddr>,
    pub http: Vec<SocketAddr>,
    pub client_addrs: Vec<SocketAddr>,
    procs: Vec<Option<Child>>,
    /// Extra environment for every replica process (after `RUST_LOG`, so it may override it).
    env: Vec<(String, String)>,
    /// How clients verify the replicas, when TLS is on.
    pub client_tls: Option<pbft_client::ClientTls>,
}

/// A port on `ip` reserved for this test process (see [`ports`]): no other test picks it,
/// not even while its replica is down for a restart.
pub fn free_addr(ip: &str) -> SocketAddr {
    let port = ports::pick(0, 0, |p| ports::reserve(ip, p))
        .unwrap_or_else(|| panic!("no free port on {ip}"));
    SocketAddr::new(ip.parse().expect("ip"), port)
}

/// A port reserved on every one of `ips`: StatefulSet naming gives all peers the same port.
/// (A candidate that fails on a later ip stays reserved on the earlier ones, unused.)
pub fn shared_port(ips: &[String]) -> u16 {
    ports::pick(1, 0, |p| ips.iter().all(|ip| ports::reserve(ip, p)))
        .unwrap_or_else(|| panic!("no port free on all of {ips:?}"))
}

pub fn replica_secret(i: usize) -> [u8; 32] {
    [0x10 + i as u8; 32]
}

pub fn client_secret(c: u64) -> [u8; 32] {
    [0x80 + c as u8; 32]
}

impl Cluster {
    /// Writes keys and configs for a 4-replica cluster and starts every replica.
    pub fn start(transport: &'static str) -> Cluster {
        Cluster::start_with_env(transport, &[])
    }

    /// As [`Cluster::start`], with extra environment variables for every replica process.
    pub fn start_with_env(transport: &'static str, env: &[(&str, &str)]) -> Cluster {
        Cluster::start_with(
            transport,
            Options {
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Options::default()
            },
        )
    }

    /// As [`Cluster::start`], with the configuration changes in `opts`.
    pub fn start_with(transport: &'static str, opts: Options) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let ips: Vec<String> = (0..N).map(|i| format!("127.0.0.{}", i + 1)).collect();
        let listen: Vec<SocketAddr> = match &opts.statefulset {
            None => ips.iter().map(|ip| free_addr(ip)).collect(),
            Some(_) => {
                let port = shared_port(&ips);
                ips.iter()
                    .map(|ip| format!("{ip}:{port}").parse().expect("addr"))
                    .collect()
            }
        };
        let http: Vec<SocketAddr> = ips.iter().map(|ip| free_addr(ip)).collect();
        let client_listen: Vec<SocketAddr> = if transport == "tcp" {
            ips.iter().map(|ip| free_addr(ip)).collect()
        } else {
            listen.clone()
        };
        let mut replicas = String::new();
        for (i, addr) in listen.iter().enumerate() {
            let pk = to_hex(&Ed25519Signer::from_secret(replica_secret(i)).public().0);
            if opts.statefulset.is_some() {
                replicas.push_str(&format!("  - public_key: {pk}\n"));
            } else {
                replicas.push_str(&format!("  - public_key: {pk}\n    address: {addr}\n"));
            }
        }
        let statefulset = match &opts.statefulset {
            None => String::new(),
            Some(s) => format!(
                "statefulset:\n  name: pbft\n  headless_service: pbft-headless\n  namespace: default\n  cluster_domain: cluster.local\n  port: {}\n  dns_server: {}\n",
                listen[0].port(),
                s.dns_server
            ),
        };
        let (tls, client_tls) = if opts.tls {
            let ca = TestCa::new();
            let write = |name: &str, pem: &str| {
                let path = dir.path().join(name);
                std::fs::write(&path, pem).expect("write pem");
                path.display().to_string()
            };
            let section = format!(
                "tls:\n  cert_file: {}\n  key_file: {}\n  ca_file: {}\n  server_name: {TLS_NAME}\n",
                write("replica.crt", &ca.cert_pem),
                write("replica.key.pem", &ca.key_pem),
                write("ca.crt", &ca.ca_pem),
            );
            let client = pbft_client::ClientTls {
                ca_pem: ca.ca_pem.into_bytes(),
                server_name: Some(TLS_NAME.to_string()),
            };
            (section, Some(client))
        } else {
            (String::new(), None)
        };
        let mut clients = String::new();
        for c in 0..4u64 {
            let pk = to_hex(&Ed25519Signer::from_secret(client_secret(c)).public().0);
            clients.push_str(&format!("  - id: {c}\n    public_key: {pk}\n"));
        }
        for i in 0..N {
            let key = dir.path().join(format!("replica-{i}.key"));
            std::fs::write(&key, to_hex(&replica_secret(i))).expect("write key");
            let client_line = if transport == "tcp" {
                format!("client_listen: {}\n", client_listen[i])
            } else {
                String::new()
            };
            let cfg = format!(
                "id: {i}\nlisten: {}\n{client_line}http_listen: {}\ndata_dir: {}\nkey_file: {}\ntransport: {transport}\nready_max_lag: 4\nsubmit_timeout_ms: 5000\nprotocol:\n  checkpoint_interval: 8\n  log_window: 32\n  view_change_timeout_ms: 1000\n  retransmit_interval_ms: 200\n  status_interval_ms: 250\n  sync_timeout_ms: 1000\n  sync_chunk: 16\n  max_request_bytes: 65536\nnet:\n  max_message_bytes: 1048576\n  queue_capacity: 64\n  backoff_min_ms: 50\n  backoff_max_ms: 500\nreplicas:\n{replicas}clients:\n{clients}{statefulset}{tls}",
                listen[i],
                http[i],
                dir.path().join(format!("data-{i}")).display(),
                key.display(),
            );
            std::fs::write(dir.path().join(format!("replica-{i}.yaml")), cfg).expect("write cfg");
        }
        let mut c = Cluster {
            dir,
            transport,
            listen,
            http,
            client_addrs: client_listen,
            procs: (0..N).map(|_| None).collect(),
            env: opts.env,
            client_tls,
        };
        for i in 0..N {
            c.start_replica(i);
        }
        c
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("data-{i}"))
    }

    pub fn start_replica(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("replica-{i}.log")))
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_pbft-replica"))
            .arg("--config")
            .arg(self.dir.path().join(format!("replica-{i}.yaml")))
            // PBFT_TEST_LOG: a filter for hunting a flaky failure (say `info,pbft_replica=debug`).
            .env(
                "RUST_LOG",
                std::env::var("PBFT_TEST_LOG").unwrap_or_else(|_| "info".to_string()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn pbft-replica");
        self.procs[i] = Some(child);
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let mut p = self.procs[i].take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(p.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = p.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = p.kill();
        p.wait().ok()
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("replica-{i}.log")))
            .unwrap_or_default()
    }

    pub fn http_get(&self, i: usize, path: &str) -> Option<(u16, String)> {
        http_get(self.http[i], path)
    }

    pub fn status(&self, i: usize) -> Option<Value> {
        let (code, body) = self.http_get(i, "/status")?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }

    pub fn height(&self, i: usize) -> Option<u64> {
        self.status(i)?.get("height")?.as_u64()
    }

    /// Waits (bounded) until `cond` holds; panics with `what` otherwise (and the cluster's
    /// drop then prints the logs).
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Cluster) -> bool,
    ) -> Duration {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if cond(self) {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The cluster's drop prints every replica's status and log tail.
        panic!("timed out after {timeout:?} waiting for {what}");
    }

    pub fn wait_ready(&self, i: usize, timeout: Duration) -> Duration {
        self.wait_for(&format!("replica {i} ready"), timeout, |c| {
            c.http_get(i, "/readyz")
                .is_some_and(|(code, _)| code == 200)
        })
    }

    pub fn wait_all_ready(&self) {
        for i in 0..N {
            self.wait_ready(i, Duration::from_secs(30));
        }
    }

    /// Waits until the given replicas have the same height and head hash, at least `min`.
    pub fn wait_agree(&self, replicas: &[usize], min: u64, timeout: Duration) -> Duration {
        self.wait_for(
            &format!("replicas {replicas:?} to agree at height >= {min}"),
            timeout,
            |c| {
                let s: Vec<Option<Value>> = replicas.iter().map(|i| c.status(*i)).collect();
                let Some(first) = s[0].as_ref() else {
                    return false;
                };
                let h = first["height"].as_u64().unwrap_or(0);
                h >= min
                    && s.iter().all(|x| {
                        x.as_ref().is_some_and(|x| {
                            x["height"] == first["height"]
                                && x["head_hash"] == first["head_hash"]
                                && x["state_digest_height"] == x["height"]
                                && x["state_digest"] == first["state_digest"]
                        })
                    })
            },
        )
    }

    pub async fn client(&self, id: u64) -> Client {
        Client::connect(ClientOptions {
            replicas: self.client_addrs.iter().map(|a| a.to_string()).collect(),
            client_id: id,
            secret: client_secret(id),
            timeout: Duration::from_secs(20),
            tls: self.client_tls.clone(),
            ..ClientOptions::default()
        })
        .await
        .expect("client")
    }

    /// A metric's value summed over all label sets matching `filter` (e.g. `reason="bad_signature"`).
    pub fn metric(&self, i: usize, name: &str, filter: &str) -> f64 {
        let Some((_, body)) = self.http_get(i, "/metrics") else {
            return 0.0;
        };
        body.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#') && l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Cluster {
    /// The counters that tell why a replica is not making progress, one line each.
    fn protocol_metrics(&self, i: usize) -> String {
        const SHOWN: [&str; 6] = [
            "pbft_view ",
            "pbft_stable_checkpoint ",
            "pbft_synced_blocks_total ",
            "pbft_rejected_messages_total{",
            "pbft_dropped_messages_total{",
            "pbft_client_requests_total{",
        ];
        let Some((_, body)) = self.http_get(i, "/metrics") else {
            return "(no metrics)".to_string();
        };
        body.lines()
            .filter(|l| SHOWN.iter().any(|p| l.starts_with(p)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A test that failed anywhere shows each replica's status and last log lines,
        // taken before the kill: a failure seen once in CI must explain itself.
        if std::thread::panicking() {
            for i in 0..N {
                eprintln!(
                    "--- replica {i} status {:?}\n{}\n{}",
                    self.status(i),
                    self.protocol_metrics(i),
                    log_summary(&self.log(i), 60)
                );
            }
        }
        for i in 0..N {
            self.kill(i);
        }
    }
}

/// The last `lines` lines of a replica's log, leaving out the routine line a catching-up
/// replica writes for every sync (counted instead), which would hide why it had to.
fn log_summary(log: &str, lines: usize) -> String {
    const ROUTINE: &str = "state sync started";
    let routine = log.lines().filter(|l| l.contains(ROUTINE)).count();
    let rest: Vec<&str> = log.lines().filter(|l| !l.contains(ROUTINE)).collect();
    format!(
        "({routine} '{ROUTINE}' lines left out)\n{}",
        rest[rest.len().saturating_sub(lines)..].join("\n")
    )
}

pub fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// The sidecar GET the `pbft` CLI uses.
pub use pbft_client::cli::http::get as http_get;
