//! The replica configuration (`<name>-config`, key `config.yaml`): one file shared by every
//! pod. Each replica takes its id from its pod ordinal and its key file from `{id}`, and
//! derives its peers' addresses from StatefulSet DNS names.
//!
//! The replica refuses unknown keys, so this module writes only the fields the replica
//! knows; a test parses every generated file with `pbft_replica::config::Config` to catch
//! drift between the two crates.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::secret::PublicKeys;
use super::statefulset::TLS_DIR;
use super::{CONFIG_KEY, Cluster, DATA_DIR, HTTP_PORT, KEYS_DIR, REPLICA_PORT, hex};
use crate::crd::{OPERATOR_CLIENT_ID, TLS_CA_KEY, TLS_CERT_KEY, TLS_KEY_KEY, Transport};
use crate::{Error, Result};

#[derive(Serialize)]
struct ReplicaConfigFile<'a> {
    listen: String,
    http_listen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_listen: Option<String>,
    data_dir: &'a str,
    key_file: String,
    transport: &'a str,
    log_format: &'a str,
    statefulset: StatefulSetSection<'a>,
    replicas: Vec<ReplicaEntry<'a>>,
    clients: Vec<ClientEntry<'a>>,
    #[serde(skip_serializing_if = "ProtocolSection::is_empty")]
    protocol: ProtocolSection,
    #[serde(skip_serializing_if = "Option::is_none")]
    ready_max_lag: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<TlsSection<'a>>,
}

/// The replica's `tls` section: files of the TLS Secret as the StatefulSet mounts them.
#[derive(Serialize)]
struct TlsSection<'a> {
    cert_file: String,
    key_file: String,
    ca_file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_name: Option<&'a str>,
}

#[derive(Serialize)]
struct StatefulSetSection<'a> {
    name: &'a str,
    headless_service: String,
    namespace: &'a str,
    cluster_domain: &'a str,
    port: i32,
}

#[derive(Serialize)]
struct ReplicaEntry<'a> {
    public_key: &'a str,
}

#[derive(Serialize)]
struct ClientEntry<'a> {
    id: u64,
    public_key: &'a str,
}

#[derive(Serialize, Default)]
struct ProtocolSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint_interval: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_window: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_batch: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_delay_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_in_flight: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    view_change_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_view_change_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state_digest: Option<crate::crd::StateDigest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    check_every_batch: Option<bool>,
}

impl ProtocolSection {
    fn is_empty(&self) -> bool {
        [
            self.checkpoint_interval,
            self.log_window,
            self.max_batch,
            self.batch_delay_ms,
            self.max_in_flight,
            self.view_change_timeout_ms,
            self.max_view_change_timeout_ms,
        ]
        .iter()
        .all(Option::is_none)
            && self.state_digest.is_none()
            && self.check_every_batch.is_none()
    }
}

/// The replica configuration file for this cluster, as YAML. Deterministic: the same
/// inputs give the same bytes (and so the same [`config_hash`]).
pub fn config_yaml(c: &Cluster, keys: &PublicKeys) -> Result<String> {
    let spec = c.spec;
    let protocol = spec
        .protocol
        .as_ref()
        .map(|p| ProtocolSection {
            checkpoint_interval: p.checkpoint_interval,
            log_window: p.log_window,
            max_batch: p.max_batch,
            batch_delay_ms: p.batch_delay_ms,
            max_in_flight: p.max_in_flight,
            view_change_timeout_ms: p.view_change_timeout_ms,
            max_view_change_timeout_ms: p.max_view_change_timeout_ms,
            state_digest: p.state_digest,
            check_every_batch: p.check_every_batch,
        })
        .unwrap_or_default();
    let n = usize::try_from(c.replicas).unwrap_or(0);
    let mut clients = vec![ClientEntry {
        id: OPERATOR_CLIENT_ID,
        public_key: &keys.operator_client,
    }];
    clients.extend(spec.clients.iter().map(|cl| ClientEntry {
        id: cl.id,
        public_key: &cl.public_key,
    }));
    let file = ReplicaConfigFile {
        listen: format!("0.0.0.0:{REPLICA_PORT}"),
        http_listen: format!("0.0.0.0:{HTTP_PORT}"),
        client_listen: (spec.transport == Transport::Tcp)
            .then(|| format!("0.0.0.0:{}", super::CLIENT_TCP_PORT)),
        data_dir: DATA_DIR,
        key_file: format!("{KEYS_DIR}/replica-{{id}}.key"),
        transport: spec.transport.as_str(),
        log_format: spec.log_format.as_str(),
        statefulset: StatefulSetSection {
            name: &c.name,
            headless_service: c.headless_name(),
            namespace: &c.namespace,
            cluster_domain: &c.cluster_domain,
            port: REPLICA_PORT,
        },
        replicas: keys
            .replicas
            .iter()
            .take(n)
            .map(|k| ReplicaEntry { public_key: k })
            .collect(),
        clients,
        protocol,
        ready_max_lag: spec.ready_max_lag,
        tls: spec.tls.as_ref().map(|t| TlsSection {
            cert_file: format!("{TLS_DIR}/{TLS_CERT_KEY}"),
            key_file: format!("{TLS_DIR}/{TLS_KEY_KEY}"),
            ca_file: format!("{TLS_DIR}/{TLS_CA_KEY}"),
            server_name: t.server_name.as_deref(),
        }),
    };
    serde_saphyr::to_string(&file).map_err(|e| Error::Yaml(e.to_string()))
}

/// sha256 of the configuration, hex: the pod template carries it so that any change to the
/// file rolls the pods (a mounted file alone would change under running replicas, unseen).
pub fn config_hash(yaml: &str) -> String {
    hex(&Sha256::digest(yaml.as_bytes()))
}

/// The ConfigMap holding `config.yaml`.
pub fn build(c: &Cluster, yaml: &str) -> ConfigMap {
    ConfigMap {
        metadata: c.meta(c.config_name()),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_owned(), yaml.to_owned())])),
        ..ConfigMap::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::tests::public_key;
    use crate::crd::{ClientSpec, LogFormat, PbftClusterSpec, ProtocolSpec, TlsSpec};
    use crate::resources::test_support::cluster;
    use pbft_replica::config::{Config, TransportKind};

    fn keys(n: usize) -> PublicKeys {
        PublicKeys {
            replicas: (0..n).map(|i| public_key(i as u8 + 10)).collect(),
            operator_client: public_key(1),
        }
    }

    fn yaml_for(spec: PbftClusterSpec, n: i32) -> String {
        let pc = cluster("c1", spec);
        let c = Cluster::new(&pc, n, "cluster.local").unwrap();
        config_yaml(&c, &keys(n as usize)).unwrap()
    }

    /// Parses with the replica's own loader and validates it for every replica id.
    fn replica_accepts(yaml: &str, n: u32) -> Config {
        let cfg = Config::from_yaml(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        for id in 0..n {
            let host = format!("c1-{id}");
            let got = cfg.replica_id(Some(&host)).unwrap();
            assert_eq!(got, id);
            cfg.validate(id)
                .unwrap_or_else(|e| panic!("id {id}: {e}\n{yaml}"));
        }
        cfg
    }

    #[test]
    fn default_config_is_what_the_replica_expects() {
        let yaml = yaml_for(PbftClusterSpec::default(), 4);
        let cfg = replica_accepts(&yaml, 4);
        assert_eq!(cfg.id, None, "the id comes from the pod ordinal");
        assert_eq!(cfg.listen.to_string(), "0.0.0.0:7000");
        assert_eq!(cfg.http_listen.to_string(), "0.0.0.0:8000");
        assert_eq!(cfg.client_listen, None);
        assert_eq!(cfg.data_dir.to_str(), Some("/var/lib/pbft"));
        assert_eq!(
            cfg.key_file_for(3).to_str(),
            Some("/etc/pbft/keys/replica-3.key")
        );
        assert_eq!(cfg.transport, TransportKind::Grpc);
        assert_eq!(cfg.log_format, "json");
        let s = cfg.statefulset.as_ref().unwrap();
        assert_eq!(
            (
                s.name.as_str(),
                s.headless_service.as_str(),
                s.namespace.as_str(),
                s.cluster_domain.as_str(),
                s.port
            ),
            ("c1", "c1-headless", "ns", "cluster.local", 7000)
        );
        assert_eq!(cfg.replicas.len(), 4);
        assert_eq!(cfg.replicas[2].public_key, public_key(12));
        assert!(cfg.replicas.iter().all(|r| r.address.is_none()));
        assert_eq!(cfg.clients.len(), 1);
        assert_eq!(cfg.clients[0].id, 1);
        assert_eq!(
            cfg.protocol,
            pbft_replica::config::ProtocolConfig::default(),
            "no protocol section: the replica defaults"
        );
        assert!(!yaml.contains("protocol"), "{yaml}");
        assert!(!yaml.contains("ready_max_lag"), "{yaml}");
        assert!(!yaml.contains("tls"), "no tls section: plain gRPC\n{yaml}");
        assert_eq!(cfg.tls, None);
        // Peer addresses as the replica derives them.
        let peers = pbft_replica::peer_addresses(&cfg);
        assert_eq!(peers[1].1, "c1-1.c1-headless.ns.svc.cluster.local:7000");
        // Every key parses into the replica's key ring.
        pbft_replica::keys::key_ring(&cfg).unwrap();
    }

    #[test]
    fn every_option_reaches_the_replica() {
        let spec = PbftClusterSpec {
            transport: Transport::Tcp,
            log_format: LogFormat::Text,
            ready_max_lag: Some(17),
            clients: vec![
                ClientSpec {
                    id: 5,
                    public_key: public_key(5),
                },
                ClientSpec {
                    id: 9,
                    public_key: public_key(9).to_uppercase(),
                },
            ],
            protocol: Some(ProtocolSpec {
                checkpoint_interval: Some(16),
                log_window: Some(64),
                max_batch: Some(100),
                batch_delay_ms: Some(0),
                max_in_flight: Some(4),
                view_change_timeout_ms: Some(900),
                max_view_change_timeout_ms: Some(9000),
                state_digest: Some(crate::crd::StateDigest::Linear),
                check_every_batch: Some(true),
            }),
            ..PbftClusterSpec::default()
        };
        let yaml = yaml_for(spec, 7);
        let cfg = replica_accepts(&yaml, 7);
        assert_eq!(cfg.transport, TransportKind::Tcp);
        assert_eq!(
            cfg.client_listen.map(|a| a.to_string()).as_deref(),
            Some("0.0.0.0:7001")
        );
        assert_eq!(cfg.log_format, "text");
        assert_eq!(cfg.ready_max_lag, 17);
        assert_eq!(
            cfg.clients.iter().map(|c| c.id).collect::<Vec<_>>(),
            [1, 5, 9]
        );
        let p = &cfg.protocol;
        assert_eq!(
            (
                p.checkpoint_interval,
                p.log_window,
                p.max_batch,
                p.batch_delay_ms,
                p.max_in_flight,
                p.view_change_timeout_ms,
                p.max_view_change_timeout_ms
            ),
            (16, 64, 100, 0, 4, 900, 9000)
        );
        assert_eq!(
            p.state_digest,
            pbft_replica::config::StateDigestKind::Linear
        );
        assert!(p.check_every_batch);
        pbft_replica::keys::key_ring(&cfg).unwrap();
    }

    fn tls(server_name: Option<&str>) -> Option<TlsSpec> {
        Some(TlsSpec {
            secret_name: "c1-tls".into(),
            server_name: server_name.map(Into::into),
        })
    }

    #[test]
    fn tls_section_points_at_the_mounted_secret() {
        let spec = PbftClusterSpec {
            tls: tls(None),
            log_format: LogFormat::Text,
            ready_max_lag: Some(5),
            clients: vec![ClientSpec {
                id: 5,
                public_key: public_key(5),
            }],
            protocol: Some(ProtocolSpec {
                checkpoint_interval: Some(16),
                log_window: Some(64),
                ..ProtocolSpec::default()
            }),
            ..PbftClusterSpec::default()
        };
        let yaml = yaml_for(spec, 7);
        let cfg = replica_accepts(&yaml, 7);
        assert_eq!(cfg.transport, TransportKind::Grpc);
        assert_eq!(
            cfg.client_listen, None,
            "the client API shares the TLS port"
        );
        let t = cfg.tls.as_ref().unwrap();
        assert_eq!(t.cert_file.to_str(), Some("/etc/pbft/tls/tls.crt"));
        assert_eq!(t.key_file.to_str(), Some("/etc/pbft/tls/tls.key"));
        assert_eq!(t.ca_file.to_str(), Some("/etc/pbft/tls/ca.crt"));
        assert_eq!(t.server_name, None);
        assert!(!yaml.contains("server_name"), "{yaml}");
        // The secret's name is the StatefulSet's business, not the replica's.
        assert!(!yaml.contains("c1-tls"), "{yaml}");
        // Peers are still dialled by their headless names (what the certificate must name).
        let peers = pbft_replica::peer_addresses(&cfg);
        assert_eq!(peers[6].1, "c1-6.c1-headless.ns.svc.cluster.local:7000");
        pbft_replica::keys::key_ring(&cfg).unwrap();

        let yaml = yaml_for(
            PbftClusterSpec {
                tls: tls(Some("pbft.internal")),
                ..PbftClusterSpec::default()
            },
            4,
        );
        let cfg = replica_accepts(&yaml, 4);
        assert_eq!(
            cfg.tls.unwrap().server_name.as_deref(),
            Some("pbft.internal")
        );
    }

    #[test]
    fn only_set_protocol_fields_are_written() {
        let spec = PbftClusterSpec {
            protocol: Some(ProtocolSpec {
                view_change_timeout_ms: Some(700),
                ..ProtocolSpec::default()
            }),
            ..PbftClusterSpec::default()
        };
        let yaml = yaml_for(spec, 4);
        assert!(yaml.contains("view_change_timeout_ms: 700"), "{yaml}");
        assert!(!yaml.contains("checkpoint_interval"), "{yaml}");
        let cfg = replica_accepts(&yaml, 4);
        let defaults = pbft_replica::config::ProtocolConfig::default();
        assert_eq!(cfg.protocol.view_change_timeout_ms, 700);
        assert_eq!(cfg.protocol.log_window, defaults.log_window);
    }

    #[test]
    fn controller_validation_agrees_with_the_replica() {
        // The defaults the controller assumes for a partial protocol section.
        let d = pbft_replica::config::ProtocolConfig::default();
        assert_eq!(
            d.checkpoint_interval,
            crate::crd::DEFAULT_CHECKPOINT_INTERVAL
        );
        assert_eq!(d.log_window, crate::crd::DEFAULT_LOG_WINDOW);
        // Whatever the controller accepts, the replica accepts, and the other way round.
        let values = [None, Some(0), Some(1), Some(64), Some(128), Some(512)];
        for k in values {
            for l in values {
                for b in [None, Some(0), Some(3)] {
                    let spec = PbftClusterSpec {
                        protocol: Some(ProtocolSpec {
                            checkpoint_interval: k,
                            log_window: l,
                            max_batch: b,
                            max_in_flight: b,
                            view_change_timeout_ms: b,
                            ..ProtocolSpec::default()
                        }),
                        ..PbftClusterSpec::default()
                    };
                    let ours = spec.problems().is_empty();
                    let yaml = yaml_for(spec, 4);
                    let cfg = Config::from_yaml(&yaml).unwrap();
                    let theirs = cfg.validate(0).is_ok();
                    assert_eq!(ours, theirs, "k={k:?} l={l:?} b={b:?}\n{yaml}");
                }
            }
        }
        // TLS only with gRPC, on both sides.
        for transport in [Transport::Grpc, Transport::Tcp] {
            for t in [None, tls(None), tls(Some("pbft.internal"))] {
                let spec = PbftClusterSpec {
                    transport,
                    tls: t.clone(),
                    ..PbftClusterSpec::default()
                };
                let ours = spec.problems().is_empty();
                let yaml = yaml_for(spec, 4);
                let cfg = Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
                let theirs = cfg.validate(0);
                assert_eq!(
                    ours,
                    theirs.is_ok(),
                    "{transport:?} {t:?}: {theirs:?}\n{yaml}"
                );
                assert_eq!(ours, transport == Transport::Grpc || t.is_none());
            }
        }
    }

    #[test]
    fn hash_follows_the_content() {
        let base = yaml_for(PbftClusterSpec::default(), 4);
        assert_eq!(
            config_hash(&base),
            config_hash(&yaml_for(PbftClusterSpec::default(), 4))
        );
        assert_eq!(config_hash(&base).len(), 64);
        let changed = yaml_for(
            PbftClusterSpec {
                protocol: Some(ProtocolSpec {
                    max_batch: Some(64),
                    ..ProtocolSpec::default()
                }),
                ..PbftClusterSpec::default()
            },
            4,
        );
        assert_ne!(config_hash(&base), config_hash(&changed));
        // Turning TLS on, or changing the name peers are verified against, rolls the pods.
        let with_tls = yaml_for(
            PbftClusterSpec {
                tls: tls(None),
                ..PbftClusterSpec::default()
            },
            4,
        );
        let with_name = yaml_for(
            PbftClusterSpec {
                tls: tls(Some("pbft.internal")),
                ..PbftClusterSpec::default()
            },
            4,
        );
        let hashes = [&base, &with_tls, &with_name].map(|y| config_hash(y));
        assert!(hashes[0] != hashes[1] && hashes[1] != hashes[2] && hashes[0] != hashes[2]);
    }

    #[test]
    fn configmap_holds_the_file() {
        let pc = cluster("c1", PbftClusterSpec::default());
        let c = Cluster::new(&pc, 4, "cluster.local").unwrap();
        let yaml = config_yaml(&c, &keys(4)).unwrap();
        let cm = build(&c, &yaml);
        assert_eq!(cm.metadata.name.as_deref(), Some("c1-config"));
        assert_eq!(cm.metadata.namespace.as_deref(), Some("ns"));
        assert_eq!(cm.metadata.owner_references.unwrap()[0].name, "c1");
        assert_eq!(cm.data.unwrap()["config.yaml"], yaml);
    }
}
