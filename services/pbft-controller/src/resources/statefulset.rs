//! The StatefulSet running the replicas: stable pod names (`<name>-<i>`, the replica id is
//! the ordinal), one volume per replica, and rollouts gated by readiness.
//!
//! With `spec.tls`, the TLS Secret is mounted read-only at [`TLS_DIR`]. The config-hash
//! annotation covers the configuration (the `tls` section included), not the certificate
//! files: the replicas load them once at start-up, so after the Secret changes (a renewal)
//! restart them with `kubectl rollout restart statefulset/<name>`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
    StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, HTTPGetAction,
    KeyToPath, Lifecycle, LifecycleHandler, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    SeccompProfile, SecretVolumeSource, SecurityContext, SleepAction, Volume, VolumeMount,
    VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    CLIENT_TCP_PORT, CONFIG_HASH_ANNOTATION, CONFIG_KEY, CONFIG_PATH, Cluster, DATA_DIR, HTTP_PORT,
    KEYS_DIR, REPLICA_PORT,
};
use crate::crd::{TLS_CA_KEY, TLS_CERT_KEY, TLS_KEY_KEY, Transport};

/// The non-root user (and group) the replica runs as (distroless `nonroot`).
pub const RUN_AS: i64 = 65532;
/// Name of the replica container.
pub const CONTAINER: &str = "replica";
/// Seconds the pod waits in `preStop` so endpoints drop it before the replica stops.
pub const PRE_STOP_SLEEP_SECONDS: i64 = 5;
/// Where the TLS Secret (`spec.tls.secretName`) is mounted; the replica configuration's
/// `tls` section names the files below it.
pub const TLS_DIR: &str = "/etc/pbft/tls";
/// Name of the TLS Secret's volume.
const TLS_VOLUME: &str = "tls";

fn http_probe(path: &str, period: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}

/// Replicas prefer distinct nodes, so one node failure costs at most one replica where the
/// cluster has room; "preferred" keeps small clusters (kind, minikube) schedulable.
pub fn default_affinity(c: &Cluster) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        topology_key: "kubernetes.io/hostname".into(),
                        label_selector: Some(LabelSelector {
                            match_labels: Some(c.selector_labels()),
                            ..LabelSelector::default()
                        }),
                        ..PodAffinityTerm::default()
                    },
                },
            ]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    }
}

fn pod_annotations(c: &Cluster, config_hash: &str) -> BTreeMap<String, String> {
    let mut a = BTreeMap::from([(CONFIG_HASH_ANNOTATION.to_owned(), config_hash.to_owned())]);
    if c.spec.metrics.pod_annotations {
        a.insert("prometheus.io/scrape".into(), "true".into());
        a.insert("prometheus.io/port".into(), HTTP_PORT.to_string());
        a.insert("prometheus.io/path".into(), "/metrics".into());
    }
    a
}

fn container(c: &Cluster) -> Container {
    let spec = c.spec;
    let mut ports = vec![container_port("replica", REPLICA_PORT)];
    if spec.transport == Transport::Tcp {
        ports.push(container_port("client", CLIENT_TCP_PORT));
    }
    ports.push(container_port("http", HTTP_PORT));
    let mut mounts = vec![
        VolumeMount {
            name: "data".into(),
            mount_path: DATA_DIR.into(),
            ..VolumeMount::default()
        },
        // A file mount (subPath), not a directory: the key Secret is mounted below
        // /etc/pbft, and a volume cannot be mounted inside a ConfigMap volume (those are
        // read-only, so the mount point cannot be created). The config hash annotation
        // rolls the pods on change, so subPath's missing live updates cost nothing.
        VolumeMount {
            name: "config".into(),
            mount_path: CONFIG_PATH.into(),
            sub_path: Some(CONFIG_KEY.into()),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "keys".into(),
            mount_path: KEYS_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    ];
    if spec.tls.is_some() {
        mounts.push(VolumeMount {
            name: TLS_VOLUME.into(),
            mount_path: TLS_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    Container {
        name: CONTAINER.into(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.clone(),
        env: Some(vec![EnvVar {
            name: "PBFT_CONFIG".into(),
            value: Some(CONFIG_PATH.into()),
            ..EnvVar::default()
        }]),
        ports: Some(ports),
        resources: spec.resources.clone(),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        // Opening the store and first DNS answers can take a while on a cold node: allow
        // five minutes before liveness takes over.
        startup_probe: Some(http_probe("/healthz", 5, 60)),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: PRE_STOP_SLEEP_SECONDS,
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    }
}

fn volume_claim(c: &Cluster) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".into()),
            labels: Some(c.selector_labels()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: c.spec.storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(c.spec.storage.size.clone()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

/// The TLS Secret's volume: exactly `tls.crt`, `tls.key` and `ca.crt` (a Secret lacking one
/// keeps the pod from starting, with an event naming the key), owner-read-only like the keys.
fn tls_volume(secret_name: &str) -> Volume {
    let item = |key: &str| KeyToPath {
        key: key.into(),
        path: key.into(),
        ..KeyToPath::default()
    };
    Volume {
        name: TLS_VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret_name.into()),
            items: Some(vec![
                item(TLS_CERT_KEY),
                item(TLS_KEY_KEY),
                item(TLS_CA_KEY),
            ]),
            default_mode: Some(0o400),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// The StatefulSet `<name>` with `c.replicas` pods.
///
/// Pods start in parallel (a replica waits for its peers anyway, and ordered start would
/// deadlock on readiness, which needs 2f peers); updates still roll one pod at a time, each
/// gated by readiness. Volumes go with the StatefulSet when the PbftCluster is deleted: the
/// key Secret is owned by the cluster too, and a ledger without its keys is useless.
///
/// With `spec.tls` the pods also mount the TLS Secret (which the user or cert-manager owns;
/// the controller never reads it) at [`TLS_DIR`]. Only its name is part of the pod
/// template: renewing the certificate changes nothing here, so it takes a
/// `kubectl rollout restart statefulset/<name>` for the replicas to load the new files.
pub fn build(c: &Cluster, config_hash: &str) -> StatefulSet {
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: c.config_name(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "keys".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(c.keys_secret_name()),
                default_mode: Some(0o400),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    if let Some(tls) = &c.spec.tls {
        volumes.push(tls_volume(&tls.secret_name));
    }
    let pod_spec = PodSpec {
        containers: vec![container(c)],
        affinity: Some(
            c.spec
                .affinity
                .clone()
                .unwrap_or_else(|| default_affinity(c)),
        ),
        termination_grace_period_seconds: Some(30),
        // Replicas never talk to the Kubernetes API, and service env vars are noise.
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            fs_group: Some(RUN_AS),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        volumes: Some(volumes),
        ..PodSpec::default()
    };
    StatefulSet {
        metadata: c.meta(c.name.clone()),
        spec: StatefulSetSpec {
            replicas: Some(c.replicas),
            selector: LabelSelector {
                match_labels: Some(c.selector_labels()),
                ..LabelSelector::default()
            },
            service_name: Some(c.headless_name()),
            pod_management_policy: Some("Parallel".into()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                ..StatefulSetUpdateStrategy::default()
            }),
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some("Delete".into()),
                    when_scaled: Some("Retain".into()),
                },
            ),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(c.labels()),
                    annotations: Some(pod_annotations(c, config_hash)),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec),
            },
            volume_claim_templates: Some(vec![volume_claim(c)]),
            ..StatefulSetSpec::default()
        },
        ..StatefulSet::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{MetricsSpec, PbftClusterSpec, StorageSpec, TlsSpec};
    use crate::resources::test_support::cluster;
    use k8s_openapi::api::core::v1::{NodeAffinity, ResourceRequirements};

    fn sts(spec: PbftClusterSpec, n: i32) -> StatefulSet {
        let pc = cluster("c1", spec);
        let c = Cluster::new(&pc, n, "cluster.local").unwrap();
        build(&c, "hash-1")
    }

    fn pod(s: &StatefulSet) -> &PodSpec {
        s.spec.template.spec.as_ref().unwrap()
    }

    fn annotations(s: &StatefulSet) -> &BTreeMap<String, String> {
        s.spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()
    }

    #[test]
    fn shape_of_the_statefulset() {
        let s = sts(PbftClusterSpec::default(), 7);
        assert_eq!(s.metadata.name.as_deref(), Some("c1"));
        assert_eq!(s.metadata.namespace.as_deref(), Some("ns"));
        assert_eq!(s.metadata.owner_references.as_ref().unwrap()[0].name, "c1");
        let spec = &s.spec;
        assert_eq!(spec.replicas, Some(7));
        assert_eq!(spec.service_name.as_deref(), Some("c1-headless"));
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        assert_eq!(
            spec.update_strategy.as_ref().unwrap().type_.as_deref(),
            Some("RollingUpdate")
        );
        let selector = spec.selector.match_labels.as_ref().unwrap();
        let labels = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
        assert!(!selector.contains_key("app.kubernetes.io/managed-by"));
        assert_eq!(annotations(&s)[CONFIG_HASH_ANNOTATION], "hash-1");

        let p = pod(&s);
        assert_eq!(p.termination_grace_period_seconds, Some(30));
        let ctr = &p.containers[0];
        assert_eq!(ctr.image.as_deref(), Some("pbft:0.1.0"));
        assert_eq!(
            ctr.env.as_ref().unwrap()[0],
            EnvVar {
                name: "PBFT_CONFIG".into(),
                value: Some("/etc/pbft/config.yaml".into()),
                ..EnvVar::default()
            }
        );
        let ports: Vec<(&str, i32)> = ctr
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.as_deref().unwrap(), p.container_port))
            .collect();
        assert_eq!(ports, [("replica", 7000), ("http", 8000)]);
        assert_eq!(
            ctr.lifecycle
                .as_ref()
                .unwrap()
                .pre_stop
                .as_ref()
                .unwrap()
                .sleep,
            Some(SleepAction { seconds: 5 })
        );
    }

    #[test]
    fn probes_hit_the_sidecar() {
        let s = sts(PbftClusterSpec::default(), 4);
        let ctr = &pod(&s).containers[0];
        let path = |p: &Option<Probe>| {
            let g = p.as_ref().unwrap().http_get.as_ref().unwrap();
            (g.path.clone().unwrap(), g.port.clone())
        };
        let http = IntOrString::String("http".into());
        assert_eq!(path(&ctr.liveness_probe), ("/healthz".into(), http.clone()));
        assert_eq!(path(&ctr.readiness_probe), ("/readyz".into(), http.clone()));
        assert_eq!(path(&ctr.startup_probe), ("/healthz".into(), http));
        let startup = ctr.startup_probe.as_ref().unwrap();
        let budget = startup.failure_threshold.unwrap() * startup.period_seconds.unwrap();
        assert!(budget >= 120, "startup budget {budget}s is not generous");
        // The named port exists.
        assert!(
            ctr.ports
                .as_ref()
                .unwrap()
                .iter()
                .any(|p| p.name.as_deref() == Some("http") && p.container_port == 8000)
        );
    }

    #[test]
    fn locked_down_security_context() {
        let s = sts(PbftClusterSpec::default(), 4);
        let p = pod(&s);
        let psc = p.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.run_as_user, Some(65532));
        assert_eq!(psc.run_as_group, Some(65532));
        assert_eq!(psc.fs_group, Some(65532));
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        let sc = p.containers[0].security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_owned()][..])
        );
        assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    }

    #[test]
    fn volumes_config_keys_and_data() {
        let spec = PbftClusterSpec {
            storage: StorageSpec {
                size: "5Gi".into(),
                storage_class_name: Some("fast".into()),
            },
            ..PbftClusterSpec::default()
        };
        let s = sts(spec, 4);
        let p = pod(&s);
        let vols = p.volumes.as_ref().unwrap();
        let cfg = vols.iter().find(|v| v.name == "config").unwrap();
        assert_eq!(cfg.config_map.as_ref().unwrap().name, "c1-config");
        let keys = vols.iter().find(|v| v.name == "keys").unwrap();
        let secret = keys.secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("c1-keys"));
        assert_eq!(secret.default_mode, Some(0o400));

        let mounts = p.containers[0].volume_mounts.as_ref().unwrap();
        let m = |name: &str| mounts.iter().find(|m| m.name == name).unwrap();
        assert_eq!(m("data").mount_path, "/var/lib/pbft");
        assert_eq!(m("config").mount_path, "/etc/pbft/config.yaml");
        assert_eq!(m("config").sub_path.as_deref(), Some("config.yaml"));
        assert_eq!(m("keys").mount_path, "/etc/pbft/keys");
        assert_eq!(m("keys").read_only, Some(true));
        assert_eq!(m("config").read_only, Some(true));
        // No TLS asked for: no TLS volume.
        assert_eq!(vols.len(), 2);
        assert_eq!(mounts.len(), 3);
        assert!(!vols.iter().any(|v| v.name == "tls"));
        assert!(
            !mounts
                .iter()
                .any(|m| m.mount_path.starts_with("/etc/pbft/tls"))
        );

        let claims = s.spec.volume_claim_templates.as_ref().unwrap();
        assert_eq!(claims.len(), 1);
        assert_eq!(claims[0].metadata.name.as_deref(), Some("data"));
        let cs = claims[0].spec.as_ref().unwrap();
        assert_eq!(cs.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(
            cs.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"],
            Quantity("5Gi".into())
        );
        assert_eq!(
            cs.access_modes.as_deref(),
            Some(&["ReadWriteOnce".to_owned()][..])
        );
    }

    #[test]
    fn tls_secret_is_mounted_read_only() {
        let spec = PbftClusterSpec {
            tls: Some(TlsSpec {
                secret_name: "c1-tls".into(),
                server_name: None,
            }),
            ..PbftClusterSpec::default()
        };
        let s = sts(spec, 4);
        let p = pod(&s);
        let vols = p.volumes.as_ref().unwrap();
        assert_eq!(vols.len(), 3);
        let tls = vols.iter().find(|v| v.name == "tls").unwrap();
        let secret = tls.secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("c1-tls"));
        assert_eq!(secret.default_mode, Some(0o400));
        assert_eq!(secret.optional, None, "a missing Secret must stop the pod");
        let items: Vec<(&str, &str, Option<i32>)> = secret
            .items
            .as_ref()
            .unwrap()
            .iter()
            .map(|i| (i.key.as_str(), i.path.as_str(), i.mode))
            .collect();
        assert_eq!(
            items,
            [
                ("tls.crt", "tls.crt", None),
                ("tls.key", "tls.key", None),
                ("ca.crt", "ca.crt", None)
            ]
        );
        // The keys Secret is still there, untouched.
        let keys = vols.iter().find(|v| v.name == "keys").unwrap();
        assert_eq!(
            keys.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("c1-keys")
        );

        let mounts = p.containers[0].volume_mounts.as_ref().unwrap();
        let m = mounts.iter().find(|m| m.name == "tls").unwrap();
        assert_eq!(m.mount_path, TLS_DIR);
        assert_eq!(m.mount_path, "/etc/pbft/tls");
        assert_eq!(m.read_only, Some(true));
        assert_eq!(m.sub_path, None, "a directory mount");
        // Ports and probes do not change: TLS is on 7000, the sidecar stays plain HTTP.
        let ctr = &p.containers[0];
        let ports: Vec<i32> = ctr
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| p.container_port)
            .collect();
        assert_eq!(ports, [7000, 8000]);
        let probe = ctr
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(probe.scheme, None, "probes stay on plain HTTP");
        // Only the Secret's name is in the pod template: the hash annotation is the config's.
        assert_eq!(annotations(&s)[CONFIG_HASH_ANNOTATION], "hash-1");
    }

    #[test]
    fn spreads_across_nodes_unless_told_otherwise() {
        let s = sts(PbftClusterSpec::default(), 4);
        let anti = pod(&s)
            .affinity
            .as_ref()
            .unwrap()
            .pod_anti_affinity
            .as_ref()
            .unwrap();
        let term = &anti
            .preferred_during_scheduling_ignored_during_execution
            .as_ref()
            .unwrap()[0];
        assert_eq!(
            term.pod_affinity_term.topology_key,
            "kubernetes.io/hostname"
        );
        assert_eq!(
            term.pod_affinity_term
                .label_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()["app.kubernetes.io/instance"],
            "c1"
        );
        assert!(
            anti.required_during_scheduling_ignored_during_execution
                .is_none()
        );

        let own = Affinity {
            node_affinity: Some(NodeAffinity::default()),
            ..Affinity::default()
        };
        let s = sts(
            PbftClusterSpec {
                affinity: Some(own.clone()),
                ..PbftClusterSpec::default()
            },
            4,
        );
        assert_eq!(pod(&s).affinity.as_ref(), Some(&own));
    }

    #[test]
    fn tcp_adds_the_client_port() {
        let s = sts(
            PbftClusterSpec {
                transport: Transport::Tcp,
                ..PbftClusterSpec::default()
            },
            4,
        );
        let names: Vec<(String, i32)> = pod(&s).containers[0]
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.clone().unwrap(), p.container_port))
            .collect();
        assert_eq!(
            names,
            [
                ("replica".to_owned(), 7000),
                ("client".to_owned(), 7001),
                ("http".to_owned(), 8000)
            ]
        );
    }

    #[test]
    fn prometheus_annotations_are_optional() {
        let s = sts(PbftClusterSpec::default(), 4);
        let a = annotations(&s);
        assert_eq!(a["prometheus.io/scrape"], "true");
        assert_eq!(a["prometheus.io/port"], "8000");
        assert_eq!(a["prometheus.io/path"], "/metrics");
        let s = sts(
            PbftClusterSpec {
                metrics: MetricsSpec {
                    pod_annotations: false,
                },
                ..PbftClusterSpec::default()
            },
            4,
        );
        let a = annotations(&s);
        assert!(!a.contains_key("prometheus.io/scrape"));
        assert!(a.contains_key(CONFIG_HASH_ANNOTATION));
    }

    #[test]
    fn image_policy_and_resources_pass_through() {
        let res = ResourceRequirements {
            limits: Some(BTreeMap::from([("cpu".to_owned(), Quantity("2".into()))])),
            ..ResourceRequirements::default()
        };
        let s = sts(
            PbftClusterSpec {
                image: "registry/pbft:1".into(),
                image_pull_policy: Some("Always".into()),
                resources: Some(res.clone()),
                ..PbftClusterSpec::default()
            },
            4,
        );
        let ctr = &pod(&s).containers[0];
        assert_eq!(ctr.image.as_deref(), Some("registry/pbft:1"));
        assert_eq!(ctr.image_pull_policy.as_deref(), Some("Always"));
        assert_eq!(ctr.resources.as_ref(), Some(&res));
    }
}
