//! The `PbftCluster` custom resource (`pbft.dev/v1alpha1`): what a user asks for (`spec`) and
//! what the controller observed (`status`).
//!
//! The field names are agreed with the Helm chart; renaming one breaks every stored object.
//! Validation happens twice on purpose: CEL rules in the schema reject bad objects at the API
//! server, and [`PbftClusterSpec::problems`] re-checks in the controller (older API servers,
//! objects stored before a rule existed, and defaults the schema cannot see).

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// API group of the custom resource.
pub const GROUP: &str = "pbft.dev";
/// API version of the custom resource.
pub const VERSION: &str = "v1alpha1";

/// Client id reserved for the operator's own client (its key lives in the keys Secret).
pub const OPERATOR_CLIENT_ID: u64 = 1;

/// Protocol defaults of the replica that the controller needs to validate a partial
/// `protocol` section (a test proves they match `pbft-replica`'s defaults).
pub const DEFAULT_CHECKPOINT_INTERVAL: u64 = 128;
/// See [`DEFAULT_CHECKPOINT_INTERVAL`].
pub const DEFAULT_LOG_WINDOW: u64 = 256;

/// A Byzantine-fault-tolerant cluster of `replicas = 3f + 1` PBFT replicas.
// Each `printcolumn(...)` repeats `type_ = "integer"`; clippy reads that as a duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "pbft.dev",
    version = "v1alpha1",
    kind = "PbftCluster",
    plural = "pbftclusters",
    shortname = "pbft",
    namespaced,
    status = "PbftClusterStatus",
    derive = "PartialEq",
    doc = "A PBFT cluster of 3f+1 replicas run as a StatefulSet",
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".status.replicas",
        description = "Deployed membership size"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Replicas passing their readiness probe"
    ),
    printcolumn(
        name = "View",
        type_ = "integer",
        json_path = ".status.view",
        description = "View held by at least f+1 replicas"
    ),
    printcolumn(
        name = "Primary",
        type_ = "integer",
        json_path = ".status.primary",
        description = "Primary of that view"
    ),
    printcolumn(
        name = "Height",
        type_ = "integer",
        json_path = ".status.height",
        description = "Highest block height reached by at least f+1 replicas"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self.replicas >= 4 && (self.replicas - 1) % 3 == 0").message("replicas must be 3f+1 and at least 4 (4, 7, 10, ...)"))]
// `transport` carries a schema default (grpc), which the API server fills in before the
// rules run; `!has(self.transport)` still reads an absent field as that default rather than
// failing the evaluation.
#[x_kube(validation = Rule::new("!has(self.tls) || !has(self.transport) || self.transport != 'tcp'").message("tls needs transport: grpc (the tcp transport cannot use TLS); remove tls or set transport to grpc"))]
#[serde(rename_all = "camelCase")]
pub struct PbftClusterSpec {
    /// Number of replicas, `3f + 1` with `f >= 1`. Fixed once the cluster runs.
    #[serde(default = "default_replicas")]
    pub replicas: i32,
    /// Replica container image.
    #[serde(default = "default_image")]
    pub image: String,
    /// Image pull policy (`Always`, `IfNotPresent`, `Never`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    /// CPU and memory of each replica container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Persistent volume of each replica. Immutable: volume claim templates cannot change.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("storage cannot change once set: StatefulSet volume claim templates are immutable"))]
    pub storage: StorageSpec,
    /// Wire between replicas.
    #[serde(default)]
    pub transport: Transport,
    /// Protocol parameters; only the ones set are written into the replica configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<ProtocolSpec>,
    /// Where the replica and operator keys live.
    #[serde(default)]
    pub keys: KeysSpec,
    /// Extra clients allowed to submit requests (id 1 is the operator's own client).
    #[serde(default)]
    pub clients: Vec<ClientSpec>,
    /// `/readyz` fails while a replica syncs more than this many blocks behind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_max_lag: Option<u64>,
    /// Replica log format.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Prometheus integration.
    #[serde(default)]
    pub metrics: MetricsSpec,
    /// Pod affinity; when unset, replicas prefer distinct nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// TLS on the replicas' gRPC port (7000: replica-to-replica traffic and the client API);
    /// only with `transport: grpc`. Unset: plain gRPC. The HTTP port (8000: probes, metrics,
    /// `/status`) stays plain HTTP either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
}

fn default_replicas() -> i32 {
    4
}

fn default_image() -> String {
    "pbft:0.1.0".into()
}

impl Default for PbftClusterSpec {
    fn default() -> Self {
        PbftClusterSpec {
            replicas: default_replicas(),
            image: default_image(),
            image_pull_policy: None,
            resources: None,
            storage: StorageSpec::default(),
            transport: Transport::default(),
            protocol: None,
            keys: KeysSpec::default(),
            clients: Vec::new(),
            ready_max_lag: None,
            log_format: LogFormat::default(),
            metrics: MetricsSpec::default(),
            affinity: None,
            tls: None,
        }
    }
}

/// Persistent volume of each replica (its block store).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Volume size as a Kubernetes quantity.
    #[serde(default = "default_storage_size")]
    pub size: String,
    /// Storage class; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

fn default_storage_size() -> String {
    "1Gi".into()
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec {
            size: default_storage_size(),
            storage_class_name: None,
        }
    }
}

/// Wire between replicas; with `tcp` the client API gets its own port (7001).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// gRPC streams; the client API shares the replica port.
    #[default]
    Grpc,
    /// Raw TCP frames; the gRPC client API listens on port 7001.
    Tcp,
}

impl Transport {
    /// The name the replica configuration uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Grpc => "grpc",
            Transport::Tcp => "tcp",
        }
    }
}

/// Replica log format.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    #[default]
    Json,
}

impl LogFormat {
    /// The name the replica configuration uses.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Protocol parameters (milliseconds where named so). Unset fields keep the replica default.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, KubeSchema)]
#[x_kube(validation = Rule::new("!has(self.checkpointInterval) || !has(self.logWindow) || self.logWindow >= self.checkpointInterval").message("logWindow must be at least checkpointInterval"))]
#[serde(rename_all = "camelCase")]
pub struct ProtocolSpec {
    /// Checkpoint every K blocks (cluster-wide).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub checkpoint_interval: Option<u64>,
    /// Sequence numbers in flight above the stable checkpoint (at least checkpointInterval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub log_window: Option<u64>,
    /// Requests per batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_batch: Option<u64>,
    /// How long the primary lets a partial batch fill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_delay_ms: Option<u64>,
    /// Batches proposed but not yet executed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_in_flight: Option<u64>,
    /// How long a known request may wait before the primary is suspected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub view_change_timeout_ms: Option<u64>,
    /// Cap of the view-change timeout's doubling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_view_change_timeout_ms: Option<u64>,
    /// How checkpoints digest the state (cluster-wide): `buckets` (the default) or `linear`,
    /// which clusters created before `buckets` must keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("stateDigest cannot change once set: every stored checkpoint and checkpoint block records the digest the cluster was created with"))]
    pub state_digest: Option<StateDigest>,
    /// Every backup checks every batch's client signatures before preparing it (default
    /// false: only the f vouchers designated for each batch do). Set it for a rolling
    /// upgrade from a version without vouching, and unset it once every replica runs the
    /// new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_every_batch: Option<bool>,
}

/// How checkpoints digest the replicated state (docs/CONFIG.md).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StateDigest {
    /// Cached digests of key buckets: a checkpoint costs what was written since the last.
    Buckets,
    /// One hash over the whole state, as clusters created before `buckets` certified.
    Linear,
}

/// Key material location.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeysSpec {
    /// Secret holding `replica-<i>.key`/`.pub` and `client-1.key`/`.pub`; default `<name>-keys`.
    /// Generated once when absent, never replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
}

/// Key of the certificate chain in the TLS Secret (`kubernetes.io/tls` convention).
pub const TLS_CERT_KEY: &str = "tls.crt";
/// Key of the private key in the TLS Secret.
pub const TLS_KEY_KEY: &str = "tls.key";
/// Key of the CA certificate(s) in the TLS Secret (cert-manager writes it).
pub const TLS_CA_KEY: &str = "ca.crt";

/// TLS for the gRPC transport, from a Secret in the cluster's namespace.
///
/// The Secret follows the `kubernetes.io/tls` / cert-manager convention and must hold
/// `tls.crt` (PEM certificate chain), `tls.key` (its private key) and `ca.crt` (the CA that
/// signed it); a missing key keeps the pods from starting (the volume cannot be mounted).
/// Every replica presents `tls.crt` on port 7000 and verifies its peers against `ca.crt`,
/// so one certificate shared by all replicas must name, as DNS SANs:
///
/// - `*.<name>-headless.<namespace>.svc.<clusterDomain>` (e.g. `cluster.local`): the names
///   replicas dial each other at (unless `serverName` is set, see below);
/// - `<name>.<namespace>.svc` and `<name>.<namespace>.svc.<clusterDomain>` (and `<name>`,
///   `<name>.<namespace>` as needed): the client Service, for clients inside the cluster.
///
/// The replicas read the files once at start-up: after the Secret changes (a renewal),
/// restart them with `kubectl rollout restart statefulset/<name>`. The controller neither
/// reads the Secret nor hashes its contents, so nothing rolls by itself.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Secret (type `kubernetes.io/tls`, e.g. issued by cert-manager) with `tls.crt`,
    /// `tls.key` and `ca.crt`, mounted read-only at `/etc/pbft/tls`. Its certificate must
    /// name `*.<name>-headless.<namespace>.svc.<clusterDomain>` for the peers, plus
    /// `<name>.<namespace>.svc` (and the other names clients dial) for the client Service.
    #[schemars(length(min = 1))]
    pub secret_name: String,
    /// Verify peers' certificates against this DNS name instead of the host they are
    /// dialled at (`<name>-<i>.<name>-headless.<namespace>.svc.<clusterDomain>`); the
    /// certificate must then name it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub server_name: Option<String>,
}

/// A client allowed to submit requests.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientSpec {
    /// Client id (1 is reserved for the operator's client).
    pub id: u64,
    /// ed25519 public key, 64 hex characters.
    #[schemars(regex(pattern = r"^[0-9a-fA-F]{64}$"))]
    pub public_key: String,
}

/// Prometheus integration.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricsSpec {
    /// Add `prometheus.io/scrape`, `/port` and `/path` annotations to the pods.
    #[serde(default = "default_true")]
    pub pod_annotations: bool,
}

fn default_true() -> bool {
    true
}

impl Default for MetricsSpec {
    fn default() -> Self {
        MetricsSpec {
            pod_annotations: true,
        }
    }
}

/// What the controller observed.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PbftClusterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The deployed membership size (fixed once the cluster runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Replicas passing their readiness probe.
    #[serde(default)]
    pub ready_replicas: i32,
    /// The highest view held by at least f+1 replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view: Option<u64>,
    /// The primary of that view.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<u32>,
    /// The highest block height reached by at least f+1 replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u64>,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

impl PbftClusterStatus {
    /// The condition of type `type_`, if present.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// Why the spec's replica count is unusable, if it is.
pub fn replicas_problem(replicas: i32) -> Option<String> {
    if replicas < 4 || (replicas - 1) % 3 != 0 {
        Some(format!(
            "replicas is {replicas}: must be 3f+1 and at least 4 (4, 7, 10, ...)"
        ))
    } else {
        None
    }
}

/// Whether `s` is 64 hex characters encoding a valid ed25519 public key (the replica
/// refuses to start with any other).
pub fn is_public_key(s: &str) -> bool {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return false;
    }
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        match u8::from_str_radix(&s[2 * i..2 * i + 2], 16) {
            Ok(v) => *b = v,
            Err(_) => return false,
        }
    }
    ed25519_dalek::VerifyingKey::from_bytes(&bytes).is_ok()
}

impl PbftClusterSpec {
    /// Tolerated faults `f` for `n` replicas.
    pub fn faults(n: i32) -> i32 {
        (n - 1) / 3
    }

    /// Everything wrong with the spec apart from the replica count (which the controller
    /// weighs against the deployed size, see [`replicas_problem`]). Empty when usable.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.image.trim().is_empty() {
            out.push("image must not be empty".into());
        }
        if self.storage.size.trim().is_empty() {
            out.push("storage.size must not be empty".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, c) in self.clients.iter().enumerate() {
            if c.id == OPERATOR_CLIENT_ID {
                out.push(format!(
                    "clients[{i}].id {OPERATOR_CLIENT_ID} is reserved for the operator client"
                ));
            }
            if !seen.insert(c.id) {
                out.push(format!("clients[{i}].id {} appears twice", c.id));
            }
            if !is_public_key(&c.public_key) {
                out.push(format!(
                    "clients[{i}].publicKey must be 64 hex characters encoding an ed25519 public key"
                ));
            }
        }
        if let Some(tls) = &self.tls {
            if self.transport == Transport::Tcp {
                out.push(
                    "tls needs transport: grpc (the tcp transport cannot use TLS); remove tls or set transport to grpc"
                        .into(),
                );
            }
            if tls.secret_name.trim().is_empty() {
                out.push("tls.secretName must not be empty".into());
            }
            if tls
                .server_name
                .as_deref()
                .is_some_and(|s| s.trim().is_empty())
            {
                out.push("tls.serverName must not be empty when set".into());
            }
        }
        if let Some(p) = &self.protocol {
            for (name, v) in [
                ("checkpointInterval", p.checkpoint_interval),
                ("logWindow", p.log_window),
                ("maxBatch", p.max_batch),
                ("maxInFlight", p.max_in_flight),
                ("viewChangeTimeoutMs", p.view_change_timeout_ms),
                ("maxViewChangeTimeoutMs", p.max_view_change_timeout_ms),
            ] {
                if v == Some(0) {
                    out.push(format!("protocol.{name} must be at least 1"));
                }
            }
            let k = p.checkpoint_interval.unwrap_or(DEFAULT_CHECKPOINT_INTERVAL);
            let l = p.log_window.unwrap_or(DEFAULT_LOG_WINDOW);
            if l < k {
                out.push(format!(
                    "protocol.logWindow ({l}) must be at least protocol.checkpointInterval ({k}); unset fields take the replica defaults ({DEFAULT_LOG_WINDOW}, {DEFAULT_CHECKPOINT_INTERVAL})"
                ));
            }
        }
        out
    }
}

/// The CRD as YAML, exactly as committed under `deploy/`.
pub fn crd_yaml() -> Result<String> {
    let crd = PbftCluster::crd();
    let body = serde_saphyr::to_string(&crd).map_err(|e| Error::Yaml(e.to_string()))?;
    Ok(format!(
        "# Generated by `cargo run -p pbft-controller --bin crdgen -- --write`; do not edit.\n{body}"
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid ed25519 public key in hex, distinct per `seed`.
    pub(crate) fn public_key(seed: u8) -> String {
        let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        crate::resources::hex(&key.verifying_key().to_bytes())
    }

    #[test]
    fn public_keys_must_be_curve_points() {
        assert!(is_public_key(&public_key(1)));
        assert!(is_public_key(&public_key(1).to_uppercase()));
        assert!(!is_public_key(&public_key(1)[..62]));
        assert!(!is_public_key(&"zz".repeat(32)));
        // 64 hex characters, but not a point on the curve.
        assert!((0u8..=255).any(|b| !is_public_key(&format!("{b:02x}").repeat(32))));
    }

    #[test]
    fn replica_counts_must_be_3f_plus_1() {
        for n in [4, 7, 10, 100] {
            assert_eq!(replicas_problem(n), None, "{n}");
        }
        for n in [-1, 0, 1, 3, 5, 6, 8] {
            assert!(replicas_problem(n).is_some(), "{n}");
        }
        assert_eq!(PbftClusterSpec::faults(4), 1);
        assert_eq!(PbftClusterSpec::faults(7), 2);
    }

    #[test]
    fn defaults_fill_an_empty_spec() {
        let spec: PbftClusterSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(spec, PbftClusterSpec::default());
        assert_eq!(spec.replicas, 4);
        assert_eq!(spec.image, "pbft:0.1.0");
        assert_eq!(spec.storage.size, "1Gi");
        assert_eq!(spec.transport, Transport::Grpc);
        assert_eq!(spec.log_format, LogFormat::Json);
        assert!(spec.metrics.pod_annotations);
        assert!(spec.problems().is_empty());
    }

    #[test]
    fn camel_case_fields_and_enums() {
        let spec: PbftClusterSpec = serde_json::from_value(serde_json::json!({
            "replicas": 7,
            "imagePullPolicy": "Always",
            "storage": {"size": "5Gi", "storageClassName": "fast"},
            "transport": "tcp",
            "protocol": {"checkpointInterval": 16, "logWindow": 32, "viewChangeTimeoutMs": 500},
            "keys": {"secretName": "mine"},
            "clients": [{"id": 7, "publicKey": public_key(7)}],
            "readyMaxLag": 10,
            "logFormat": "text",
            "metrics": {"podAnnotations": false}
        }))
        .unwrap();
        assert_eq!(spec.transport, Transport::Tcp);
        assert_eq!(spec.storage.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(spec.keys.secret_name.as_deref(), Some("mine"));
        assert_eq!(
            spec.protocol.as_ref().unwrap().view_change_timeout_ms,
            Some(500)
        );
        assert_eq!(spec.log_format, LogFormat::Text);
        assert!(!spec.metrics.pod_annotations);
        assert!(spec.problems().is_empty(), "{:?}", spec.problems());
    }

    #[test]
    fn problems_name_the_field() {
        let spec = PbftClusterSpec {
            clients: vec![
                ClientSpec {
                    id: 1,
                    public_key: public_key(1),
                },
                ClientSpec {
                    id: 2,
                    public_key: "xyz".into(),
                },
                ClientSpec {
                    id: 2,
                    public_key: public_key(2),
                },
            ],
            protocol: Some(ProtocolSpec {
                checkpoint_interval: Some(512),
                max_batch: Some(0),
                ..ProtocolSpec::default()
            }),
            ..PbftClusterSpec::default()
        };
        let all = spec.problems().join("\n");
        assert!(all.contains("clients[0].id 1 is reserved"), "{all}");
        assert!(all.contains("clients[1].publicKey"), "{all}");
        assert!(all.contains("clients[2].id 2 appears twice"), "{all}");
        assert!(all.contains("protocol.maxBatch"), "{all}");
        // 512 > the default log window of 256: the replica would refuse to start.
        assert!(all.contains("protocol.logWindow (256)"), "{all}");
    }

    #[test]
    fn tls_spec_in_camel_case() {
        let spec: PbftClusterSpec = serde_json::from_value(serde_json::json!({
            "tls": {"secretName": "c1-tls", "serverName": "pbft.internal"}
        }))
        .unwrap();
        let tls = spec.tls.as_ref().unwrap();
        assert_eq!(tls.secret_name, "c1-tls");
        assert_eq!(tls.server_name.as_deref(), Some("pbft.internal"));
        assert_eq!(
            spec.transport,
            Transport::Grpc,
            "the default transport takes TLS"
        );
        assert!(spec.problems().is_empty(), "{:?}", spec.problems());
        // secretName is required inside tls; serverName is not.
        assert!(serde_json::from_value::<PbftClusterSpec>(serde_json::json!({"tls": {}})).is_err());
        let spec: PbftClusterSpec =
            serde_json::from_value(serde_json::json!({"tls": {"secretName": "s"}})).unwrap();
        assert_eq!(spec.tls.unwrap().server_name, None);
        // Round trip leaves unset fields out.
        let json = serde_json::to_value(PbftClusterSpec::default()).unwrap();
        assert!(json.get("tls").is_none(), "{json}");
    }

    #[test]
    fn tls_needs_grpc_and_names() {
        let tls = |secret: &str, server: Option<&str>| {
            Some(TlsSpec {
                secret_name: secret.into(),
                server_name: server.map(Into::into),
            })
        };
        let tcp = PbftClusterSpec {
            transport: Transport::Tcp,
            tls: tls("c1-tls", None),
            ..PbftClusterSpec::default()
        };
        let all = tcp.problems().join("\n");
        assert!(
            all.contains("tls needs transport: grpc")
                && all.contains("tcp transport cannot use TLS"),
            "{all}"
        );
        let blank = PbftClusterSpec {
            tls: tls(" ", Some("")),
            ..PbftClusterSpec::default()
        };
        let all = blank.problems().join("\n");
        assert!(all.contains("tls.secretName must not be empty"), "{all}");
        assert!(all.contains("tls.serverName must not be empty"), "{all}");
        assert!(!all.contains("transport"), "{all}");
        // tcp without tls and grpc with tls are fine.
        for spec in [
            PbftClusterSpec {
                transport: Transport::Tcp,
                ..PbftClusterSpec::default()
            },
            PbftClusterSpec {
                tls: tls("c1-tls", Some("pbft.internal")),
                ..PbftClusterSpec::default()
            },
        ] {
            assert!(spec.problems().is_empty(), "{:?}", spec.problems());
        }
    }

    #[test]
    fn crd_refuses_tls_with_tcp() {
        let crd = serde_json::to_value(PbftCluster::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let rule = spec["x-kubernetes-validations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["rule"].as_str().unwrap().contains("self.tls"))
            .expect("a CEL rule on tls");
        assert_eq!(
            rule["rule"],
            "!has(self.tls) || !has(self.transport) || self.transport != 'tcp'"
        );
        assert!(
            rule["message"]
                .as_str()
                .unwrap()
                .contains("tls needs transport: grpc"),
            "{rule}"
        );
        // The rule reads transport's default, which the schema must carry.
        assert_eq!(spec["properties"]["transport"]["default"], "grpc");
        let tls = &spec["properties"]["tls"];
        assert_eq!(tls["type"], "object");
        assert_eq!(tls["required"], serde_json::json!(["secretName"]));
        assert_eq!(tls["properties"]["secretName"]["type"], "string");
        assert_eq!(tls["properties"]["secretName"]["minLength"], 1);
        assert_eq!(tls["properties"]["serverName"]["type"], "string");
        assert!(
            spec["required"]
                .as_array()
                .is_none_or(|r| !r.contains(&serde_json::json!("tls"))),
            "tls is optional"
        );
    }

    #[test]
    fn crd_carries_the_agreed_names_and_rules() {
        let crd = serde_json::to_value(PbftCluster::crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], "pbftclusters.pbft.dev");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "pbft");
        let v = &crd["spec"]["versions"][0];
        assert_eq!(v["name"], "v1alpha1");
        assert!(v["subresources"]["status"].is_object());
        let cols: Vec<&str> = v["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            cols,
            ["Replicas", "Ready", "View", "Primary", "Height", "Age"]
        );
        let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let rules = spec["x-kubernetes-validations"].as_array().unwrap();
        assert!(rules.iter().any(|r| {
            r["rule"]
                .as_str()
                .unwrap()
                .contains("(self.replicas - 1) % 3 == 0")
        }));
        assert_eq!(spec["properties"]["replicas"]["default"], 4);
        assert_eq!(
            spec["properties"]["transport"]["enum"],
            serde_json::json!(["grpc", "tcp"])
        );
        assert_eq!(
            spec["properties"]["clients"]["items"]["properties"]["publicKey"]["pattern"],
            "^[0-9a-fA-F]{64}$"
        );
        let yaml = crd_yaml().unwrap();
        assert!(yaml.starts_with("# Generated by"));
    }
}
