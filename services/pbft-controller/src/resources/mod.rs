//! Pure builders: one `PbftCluster` in, the Kubernetes objects that run it out. No I/O here,
//! so every field the cluster depends on is asserted by plain unit tests; the reconciler only
//! sends what these functions return.

pub mod configmap;
pub mod pdb;
pub mod secret;
pub mod service;
pub mod statefulset;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::crd::{PbftCluster, PbftClusterSpec};
use crate::{Error, Result};

/// Replica-to-replica port; with gRPC it also serves the client API.
pub const REPLICA_PORT: i32 = 7000;
/// Client API port when the transport is TCP.
pub const CLIENT_TCP_PORT: i32 = 7001;
/// The replica's HTTP sidecar: `/healthz`, `/readyz`, `/metrics`, `/status`.
pub const HTTP_PORT: i32 = 8000;
/// Where the replica keeps its block store.
pub const DATA_DIR: &str = "/var/lib/pbft";
/// Where the replica configuration file is mounted.
pub const CONFIG_PATH: &str = "/etc/pbft/config.yaml";
/// Where the key Secret is mounted.
pub const KEYS_DIR: &str = "/etc/pbft/keys";
/// Key of the replica configuration in the ConfigMap.
pub const CONFIG_KEY: &str = "config.yaml";
/// Field manager of every server-side apply, and the `managed-by` label value.
pub const MANAGER: &str = "pbft-controller";
/// Pod annotation carrying the configuration's sha256, so a config change rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "pbft.dev/config-hash";

/// One cluster as the builders see it: names, owner and the membership size to deploy.
///
/// `replicas` is the size to build for, which is the deployed size once the cluster runs
/// (see the controller: membership never changes under live replicas), not necessarily
/// `spec.replicas`.
#[derive(Clone, Debug)]
pub struct Cluster<'a> {
    /// `metadata.name` of the PbftCluster; also the StatefulSet's name.
    pub name: String,
    /// Namespace of the PbftCluster and all its objects.
    pub namespace: String,
    /// Controller owner reference to the PbftCluster, set on every object.
    pub owner: OwnerReference,
    /// The user's spec.
    pub spec: &'a PbftClusterSpec,
    /// Membership size to build for.
    pub replicas: i32,
    /// DNS domain of the Kubernetes cluster (`cluster.local`).
    pub cluster_domain: String,
}

impl<'a> Cluster<'a> {
    /// Reads names and owner from a stored PbftCluster (it must have a namespace and uid).
    pub fn new(cluster: &'a PbftCluster, replicas: i32, cluster_domain: &str) -> Result<Self> {
        let namespace = cluster
            .namespace()
            .ok_or(Error::MissingField("metadata.namespace"))?;
        let owner = cluster
            .controller_owner_ref(&())
            .ok_or(Error::MissingField("metadata.uid"))?;
        Ok(Cluster {
            name: cluster.name_any(),
            namespace,
            owner,
            spec: &cluster.spec,
            replicas,
            cluster_domain: cluster_domain.to_owned(),
        })
    }

    /// Tolerated faults: `f = (n - 1) / 3`.
    pub fn faults(&self) -> i32 {
        PbftClusterSpec::faults(self.replicas)
    }

    /// The headless Service giving each pod its DNS name.
    pub fn headless_name(&self) -> String {
        format!("{}-headless", self.name)
    }

    /// The ConfigMap holding `config.yaml`.
    pub fn config_name(&self) -> String {
        format!("{}-config", self.name)
    }

    /// The Secret holding the keys: `spec.keys.secretName`, default `<name>-keys`.
    pub fn keys_secret_name(&self) -> String {
        self.spec
            .keys
            .secret_name
            .clone()
            .unwrap_or_else(|| format!("{}-keys", self.name))
    }

    /// Labels selecting this cluster's pods (stable: a StatefulSet selector never changes).
    pub fn selector_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), "pbft".to_owned()),
            ("app.kubernetes.io/instance".to_owned(), self.name.clone()),
        ])
    }

    /// Labels on every object the controller makes.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut l = self.selector_labels();
        l.insert(
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGER.to_owned(),
        );
        l
    }

    /// Metadata of an owned object called `name`.
    pub fn meta(&self, name: impl Into<String>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels()),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
pub(crate) mod test_support {
    //! A stored-looking PbftCluster for the builder tests.

    use super::*;

    /// A PbftCluster as the API server would hand it over (namespace and uid set).
    pub fn cluster(name: &str, spec: PbftClusterSpec) -> PbftCluster {
        let mut c = PbftCluster::new(name, spec);
        c.metadata.namespace = Some("ns".into());
        c.metadata.uid = Some(format!("uid-{name}"));
        c.metadata.generation = Some(1);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::cluster;
    use super::*;
    use crate::crd::KeysSpec;

    #[test]
    fn names_labels_and_owner() {
        let pc = cluster("c1", PbftClusterSpec::default());
        let c = Cluster::new(&pc, 4, "cluster.local").unwrap();
        assert_eq!(c.headless_name(), "c1-headless");
        assert_eq!(c.config_name(), "c1-config");
        assert_eq!(c.keys_secret_name(), "c1-keys");
        assert_eq!(
            c.labels()["app.kubernetes.io/managed-by"],
            "pbft-controller"
        );
        assert_eq!(c.labels()["app.kubernetes.io/instance"], "c1");
        assert_eq!(c.labels()["app.kubernetes.io/name"], "pbft");
        let m = c.meta("x");
        let owner = &m.owner_references.unwrap()[0];
        assert_eq!(owner.kind, "PbftCluster");
        assert_eq!(owner.api_version, "pbft.dev/v1alpha1");
        assert_eq!(owner.name, "c1");
        assert_eq!(owner.uid, "uid-c1");
        assert_eq!(owner.controller, Some(true));

        let spec = PbftClusterSpec {
            keys: KeysSpec {
                secret_name: Some("mine".into()),
            },
            ..PbftClusterSpec::default()
        };
        let pc = cluster("c1", spec);
        assert_eq!(
            Cluster::new(&pc, 4, "cluster.local")
                .unwrap()
                .keys_secret_name(),
            "mine"
        );
    }

    #[test]
    fn needs_namespace_and_uid() {
        let mut pc = cluster("c1", PbftClusterSpec::default());
        pc.metadata.uid = None;
        assert!(matches!(
            Cluster::new(&pc, 4, "cluster.local"),
            Err(Error::MissingField("metadata.uid"))
        ));
        pc.metadata.namespace = None;
        assert!(Cluster::new(&pc, 4, "cluster.local").is_err());
    }

    #[test]
    fn hex_is_lower_case_and_padded() {
        assert_eq!(hex(&[0, 0xab, 0x0f]), "00ab0f");
    }
}
