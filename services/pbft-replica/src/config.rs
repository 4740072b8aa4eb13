//! Replica configuration: one YAML file, then `PBFT_*` environment variables, then flags.
//! Every option has a default, so an empty file plus a key is a valid single-replica config
//! only in shape: a cluster also needs its replicas' public keys.
//!
//! See `docs/CONFIG.md` for every option, its default, and its variable and flag names.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which wire the replicas speak among themselves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// gRPC `MessageStream` per peer (tonic).
    #[default]
    Grpc,
    /// Raw TCP: identity handshake, then length-delimited protobuf frames.
    Tcp,
}

/// How checkpoints digest the state (`pbft_core::StateDigest`). Every replica of a cluster
/// must use the same one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateDigestKind {
    /// Cached digests of key buckets: a checkpoint costs what was written since the last.
    #[default]
    Buckets,
    /// One hash over the whole state: what clusters created before `buckets` certified
    /// their checkpoints with.
    Linear,
}

impl From<StateDigestKind> for pbft_core::StateDigest {
    fn from(k: StateDigestKind) -> Self {
        match k {
            StateDigestKind::Buckets => pbft_core::StateDigest::Buckets,
            StateDigestKind::Linear => pbft_core::StateDigest::Linear,
        }
    }
}

/// One replica of the cluster as every member sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaEntry {
    /// ed25519 public key, 64 hex characters.
    pub public_key: String,
    /// `host:port` of its replica listener. Leave out when peers come from `statefulset`.
    #[serde(default)]
    pub address: Option<String>,
}

/// A client allowed to submit requests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientEntry {
    pub id: u64,
    /// ed25519 public key, 64 hex characters.
    pub public_key: String,
}

/// Peer addresses derived from StatefulSet naming: pod `name-i` reaches
/// `name-j.headless.namespace.svc.cluster_domain:port`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatefulSetPeers {
    pub name: String,
    pub headless_service: String,
    pub namespace: String,
    pub cluster_domain: String,
    pub port: u16,
    /// DNS server to ask instead of the system resolver (tests use a local dnsmasq).
    pub dns_server: Option<SocketAddr>,
}

impl Default for StatefulSetPeers {
    fn default() -> Self {
        StatefulSetPeers {
            name: "pbft".into(),
            headless_service: "pbft-headless".into(),
            namespace: "default".into(),
            cluster_domain: "cluster.local".into(),
            port: 7000,
            dns_server: None,
        }
    }
}

/// TLS on the gRPC transport: the listener (replicas and clients) presents `cert_file`, and
/// dialled peers must present a certificate signed by `ca_file` for the name they are
/// dialled at (or `server_name`). Messages are signed either way; TLS adds confidentiality
/// and keeps a man in the middle from reading or replaying traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain this replica presents. It must name the host peers and clients
    /// dial (in Kubernetes: `*.<headless service>.<namespace>.svc.<cluster domain>` and the
    /// client Service), unless they verify against `server_name`.
    pub cert_file: PathBuf,
    /// PEM private key of `cert_file`.
    pub key_file: PathBuf,
    /// PEM certificate(s) of the CA that signed the peers' certificates.
    pub ca_file: PathBuf,
    /// Verify peers' certificates against this name instead of the host they are dialled at
    /// (for addresses that are IPs, or one certificate shared by every replica).
    #[serde(default)]
    pub server_name: Option<String>,
}

/// Protocol parameters (see `pbft_core::Config`); times in milliseconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProtocolConfig {
    pub checkpoint_interval: u64,
    pub log_window: u64,
    pub max_batch: usize,
    pub batch_delay_ms: u64,
    pub max_in_flight: u64,
    pub view_change_timeout_ms: u64,
    pub max_view_change_timeout_ms: u64,
    pub vouch_timeout_ms: u64,
    pub check_every_batch: bool,
    pub retransmit_interval_ms: u64,
    pub status_interval_ms: u64,
    pub sync_chunk: u32,
    pub sync_timeout_ms: u64,
    pub max_request_bytes: usize,
    pub max_pending_requests: usize,
    pub state_digest: StateDigestKind,
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        let c = pbft_core::Config::default();
        ProtocolConfig {
            checkpoint_interval: c.checkpoint_interval,
            log_window: c.log_window,
            max_batch: c.max_batch,
            batch_delay_ms: c.batch_delay,
            max_in_flight: c.max_in_flight,
            view_change_timeout_ms: c.view_change_timeout,
            max_view_change_timeout_ms: c.max_view_change_timeout,
            vouch_timeout_ms: c.vouch_timeout,
            check_every_batch: c.check_every_batch,
            retransmit_interval_ms: c.retransmit_interval,
            status_interval_ms: c.status_interval,
            sync_chunk: c.sync_chunk,
            sync_timeout_ms: c.sync_timeout,
            max_request_bytes: c.max_request_bytes,
            max_pending_requests: c.max_pending_requests,
            state_digest: StateDigestKind::default(),
        }
    }
}

/// Transport tuning (the seed's section 7 defaults).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetConfig {
    /// Largest message accepted or sent, in bytes (default 64 MiB).
    pub max_message_bytes: usize,
    /// How long one dial attempt may take (default 10 s).
    pub dial_timeout_ms: u64,
    /// Messages queued per peer before new ones are dropped (and counted).
    pub queue_capacity: usize,
    /// Redial backoff: first delay and cap, doubled per failure, with jitter.
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            max_message_bytes: 64 * 1024 * 1024,
            dial_timeout_ms: 10_000,
            queue_capacity: 8192,
            backoff_min_ms: 100,
            backoff_max_ms: 5_000,
        }
    }
}

/// The whole replica configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This replica's index. In StatefulSet mode it may be left out: it is then taken from
    /// the pod name's ordinal (`HOSTNAME=name-3` gives 3).
    pub id: Option<u32>,
    /// Replica-to-replica listener (gRPC or TCP), also serving the client API under gRPC.
    pub listen: SocketAddr,
    /// Client API listener when the transport is TCP (gRPC `ClientService`).
    pub client_listen: Option<SocketAddr>,
    /// HTTP sidecar: /healthz, /readyz, /metrics, /status.
    pub http_listen: SocketAddr,
    pub data_dir: PathBuf,
    /// File holding this replica's ed25519 secret key as 64 hex characters. `{id}` in the
    /// path is replaced by the replica id, so every pod of a StatefulSet can share one
    /// configuration (`/etc/pbft/keys/replica-{id}.key`).
    pub key_file: PathBuf,
    pub transport: TransportKind,
    /// Every replica in id order.
    pub replicas: Vec<ReplicaEntry>,
    /// When set, peer addresses come from StatefulSet DNS names instead of `replicas[].address`.
    pub statefulset: Option<StatefulSetPeers>,
    pub clients: Vec<ClientEntry>,
    pub protocol: ProtocolConfig,
    pub net: NetConfig,
    /// TLS for the gRPC transport and client API (none by default).
    pub tls: Option<TlsConfig>,
    /// /readyz fails while the replica is more than this many blocks behind.
    pub ready_max_lag: u64,
    /// How long a client's `Submit` call waits for this replica's reply.
    pub submit_timeout_ms: u64,
    /// Log format: "text" or "json".
    pub log_format: String,
    /// Benchmark baseline only: run as one server that executes requests directly, with no
    /// consensus and no fault tolerance (`pbft bench --unreplicated`).
    pub unreplicated: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            id: None,
            listen: "127.0.0.1:7000".parse().expect("valid literal"),
            client_listen: None,
            http_listen: "127.0.0.1:8000".parse().expect("valid literal"),
            data_dir: PathBuf::from("data"),
            key_file: PathBuf::from("replica.key"),
            transport: TransportKind::Grpc,
            replicas: Vec::new(),
            statefulset: None,
            clients: Vec::new(),
            protocol: ProtocolConfig::default(),
            net: NetConfig::default(),
            tls: None,
            ready_max_lag: 256,
            submit_timeout_ms: 30_000,
            log_format: "text".into(),
            unreplicated: false,
        }
    }
}

/// A configuration problem, reported before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid YAML in {path}: {message}")]
    Yaml { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("protocol parameters: {0}")]
    Protocol(#[from] pbft_core::ConfigError),
}

impl Config {
    /// Reads a YAML file (a missing `path` gives the defaults).
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text).map_err(|message| ConfigError::Yaml {
            path: path.to_owned(),
            message,
        })
    }

    pub fn from_yaml(text: &str) -> Result<Config, String> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_saphyr::from_str(text).map_err(|e| e.to_string())
    }

    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).unwrap_or_default()
    }

    /// The protocol parameters as the core wants them (1 tick = 1 ms).
    pub fn core_config(&self) -> Result<pbft_core::Config, ConfigError> {
        let p = &self.protocol;
        let c = pbft_core::Config {
            n: self.replicas.len(),
            checkpoint_interval: p.checkpoint_interval,
            log_window: p.log_window,
            max_batch: p.max_batch,
            batch_delay: p.batch_delay_ms,
            max_in_flight: p.max_in_flight,
            view_change_timeout: p.view_change_timeout_ms,
            max_view_change_timeout: p.max_view_change_timeout_ms,
            vouch_timeout: p.vouch_timeout_ms,
            check_every_batch: p.check_every_batch,
            retransmit_interval: p.retransmit_interval_ms,
            status_interval: p.status_interval_ms,
            sync_chunk: p.sync_chunk,
            sync_timeout: p.sync_timeout_ms,
            max_request_bytes: p.max_request_bytes,
            max_pending_requests: p.max_pending_requests,
            state_digest: p.state_digest.into(),
        };
        c.validate()?;
        Ok(c)
    }

    /// This replica's id: configured, or the StatefulSet pod ordinal from `hostname`.
    pub fn replica_id(&self, hostname: Option<&str>) -> Result<u32, ConfigError> {
        if let Some(id) = self.id {
            return Ok(id);
        }
        let ordinal = hostname
            .and_then(|h| h.rsplit_once('-'))
            .and_then(|(_, n)| n.parse::<u32>().ok());
        ordinal.ok_or_else(|| {
            ConfigError::Invalid(
                "no replica id: set `id` (or PBFT_ID / --id), or run as a StatefulSet pod named NAME-<ordinal>"
                    .into(),
            )
        })
    }

    /// Checks what can be checked without touching the network or disk.
    pub fn validate(&self, id: u32) -> Result<(), ConfigError> {
        self.core_config()?;
        let n = self.replicas.len();
        if id as usize >= n {
            return Err(ConfigError::Invalid(format!(
                "id {id} is not below the number of replicas ({n})"
            )));
        }
        if self.statefulset.is_none() {
            for (i, r) in self.replicas.iter().enumerate() {
                if r.address.is_none() {
                    return Err(ConfigError::Invalid(format!(
                        "replicas[{i}] has no address and no `statefulset` section derives one"
                    )));
                }
            }
        }
        if self.tls.is_some() && self.transport == TransportKind::Tcp {
            return Err(ConfigError::Invalid(
                "tls needs transport: grpc (the TCP transport authenticates peers with its own signed handshake but does not encrypt)".into(),
            ));
        }
        if self.net.max_message_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "net.max_message_bytes must be at least 1024".into(),
            ));
        }
        Ok(())
    }

    /// Settings that work but are unwise, for the replica to warn about when it starts.
    pub fn warnings(&self) -> Vec<String> {
        let p = &self.protocol;
        let mut warnings = Vec::new();
        if p.status_interval_ms.saturating_mul(2) > p.view_change_timeout_ms {
            warnings.push(format!(
                "protocol.status_interval_ms ({}) is more than half of view_change_timeout_ms \
                 ({}): a backup that missed the last blocks before the cluster went idle may \
                 suspect the primary, alone, before an announcement tells it it is only behind",
                p.status_interval_ms, p.view_change_timeout_ms
            ));
        }
        warnings
    }

    /// The key file of replica `id`, with `{id}` expanded.
    pub fn key_file_for(&self, id: u32) -> PathBuf {
        let path = self.key_file.to_string_lossy();
        if path.contains("{id}") {
            PathBuf::from(path.replace("{id}", &id.to_string()))
        } else {
            self.key_file.clone()
        }
    }

    pub fn dial_timeout(&self) -> Duration {
        Duration::from_millis(self.net.dial_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_yaml_gives_defaults_and_unknown_keys_are_errors() {
        assert_eq!(Config::from_yaml("").unwrap(), Config::default());
        let err = Config::from_yaml("listne: 1.2.3.4:5\n").unwrap_err();
        assert!(err.contains("listne"), "{err}");
    }

    #[test]
    fn state_digest_defaults_to_buckets_and_reaches_the_core() {
        let mut c = Config::from_yaml("replicas: [{public_key: aa, address: 127.0.0.1:1}, {public_key: aa, address: 127.0.0.1:2}, {public_key: aa, address: 127.0.0.1:3}, {public_key: aa, address: 127.0.0.1:4}]\n").unwrap();
        assert_eq!(
            c.core_config().unwrap().state_digest,
            pbft_core::Config::default().state_digest
        );
        c.protocol = Config::from_yaml("protocol: {state_digest: linear}\n")
            .unwrap()
            .protocol;
        assert_eq!(
            c.core_config().unwrap().state_digest,
            pbft_core::StateDigest::Linear
        );
        let err = Config::from_yaml("protocol: {state_digest: sha3}\n").unwrap_err();
        assert!(
            err.contains("state_digest") || err.contains("sha3"),
            "{err}"
        );
    }

    #[test]
    fn yaml_round_trip_and_partial_sections() {
        let c = Config::from_yaml(
            "id: 2\ntransport: tcp\nprotocol:\n  checkpoint_interval: 16\n  log_window: 32\nreplicas:\n  - public_key: aa\n    address: 127.0.0.2:7000\n",
        )
        .unwrap();
        assert_eq!(c.id, Some(2));
        assert_eq!(c.transport, TransportKind::Tcp);
        assert_eq!(c.protocol.checkpoint_interval, 16);
        assert_eq!(c.protocol.max_batch, ProtocolConfig::default().max_batch);
        assert_eq!(c.net, NetConfig::default());
        assert_eq!(Config::from_yaml(&c.to_yaml()).unwrap(), c);
    }

    #[test]
    fn id_from_pod_name() {
        let c = Config::default();
        assert_eq!(c.replica_id(Some("pbft-3")).unwrap(), 3);
        assert_eq!(c.replica_id(Some("my-cluster-pbft-12")).unwrap(), 12);
        assert!(c.replica_id(Some("pbft")).is_err());
        assert!(c.replica_id(None).is_err());
    }

    #[test]
    fn key_file_expands_the_id() {
        let c = Config {
            key_file: PathBuf::from("/etc/pbft/keys/replica-{id}.key"),
            ..Config::default()
        };
        assert_eq!(
            c.key_file_for(3),
            PathBuf::from("/etc/pbft/keys/replica-3.key")
        );
        assert_eq!(
            Config::default().key_file_for(3),
            PathBuf::from("replica.key")
        );
    }

    #[test]
    fn tls_needs_the_grpc_transport() {
        let mut c = Config::from_yaml(
            "id: 0\ntransport: tcp\ntls:\n  cert_file: a.crt\n  key_file: a.key\n  ca_file: ca.crt\nreplicas:\n  - public_key: aa\n    address: 127.0.0.1:7000\n  - public_key: bb\n    address: 127.0.0.2:7000\n  - public_key: cc\n    address: 127.0.0.3:7000\n  - public_key: dd\n    address: 127.0.0.4:7000\n",
        )
        .unwrap();
        let err = c.validate(0).unwrap_err().to_string();
        assert!(err.contains("tls needs transport: grpc"), "{err}");
        c.transport = TransportKind::Grpc;
        c.validate(0).unwrap();
    }

    #[test]
    fn a_slow_status_interval_is_warned_about() {
        let mut c = Config::default();
        assert_eq!(c.warnings(), Vec::<String>::new(), "the defaults are sound");
        c.protocol.status_interval_ms = 2_000;
        let warnings = c.warnings();
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("status_interval_ms (2000)"),
            "{warnings:?}"
        );
    }

    #[test]
    fn validation_names_the_problem() {
        let mut c = Config {
            id: Some(0),
            ..Config::default()
        };
        assert!(matches!(c.validate(0), Err(ConfigError::Protocol(_))));
        c.replicas = vec![ReplicaEntry::default(); 4];
        let err = c.validate(0).unwrap_err().to_string();
        assert!(err.contains("replicas[0] has no address"), "{err}");
        assert!(c.validate(4).is_err());
    }
}
