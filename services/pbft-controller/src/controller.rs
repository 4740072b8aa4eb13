//! The reconcile loop: for each `PbftCluster`, make sure its key Secret exists, apply the
//! objects the builders describe (server-side apply), read the replicas' own status, and
//! write the result back into the resource.
//!
//! # Membership never changes under a running cluster
//!
//! Once a cluster has been deployed (`status.replicas` is set, or, should the status have
//! been lost, its StatefulSet exists), a different `spec.replicas` is refused: the cluster keeps its deployed size, `Degraded` turns true with reason
//! `ReconfigurationRefused`, and a Warning event is recorded. Membership is fixed by the keys
//! and the replica configuration every replica loaded at start; resizing the StatefulSet
//! would change `n` and thus the quorum sizes (`2f + 1`) under live replicas, so old and new
//! replicas would count different quorums and could commit conflicting batches. PBFT needs
//! a reconfiguration protocol for that, which the replicas do not implement.
//!
//! # RBAC
//!
//! The controller's ServiceAccount needs (the Helm chart's ClusterRole mirrors this list):
//!
//! | API group | resources | verbs |
//! |---|---|---|
//! | `pbft.dev` | `pbftclusters` | get, list, watch, patch |
//! | `pbft.dev` | `pbftclusters/status` | get, patch, update |
//! | `apps` | `statefulsets` | get, list, watch, create, patch, update |
//! | `""` (core) | `services`, `configmaps` | get, list, watch, create, patch, update |
//! | `policy` | `poddisruptionbudgets` | get, list, watch, create, patch, update |
//! | `""` (core) | `secrets` | get, list, watch, create (no update, patch or delete: keys are never rewritten) |
//! | `events.k8s.io` | `events` | create, patch |
//! | `coordination.k8s.io` | `leases` | get, create, update (the Lease's own namespace suffices) |

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{info, instrument, warn};

use crate::crd::{PbftCluster, PbftClusterStatus, replicas_problem};
use crate::metrics::Metrics;
use crate::resources::secret::{self, PublicKeys};
use crate::resources::{Cluster, MANAGER, configmap, pdb, service, statefulset};
use crate::status::{self, Inputs, Observed, Problem, StatusFetcher};
use crate::{Error, Result};

/// Knobs of the reconcile loop.
#[derive(Clone, Debug)]
pub struct Settings {
    /// DNS domain of the Kubernetes cluster, for the replicas' peer names.
    pub cluster_domain: String,
    /// How often a healthy cluster is reconciled again, to refresh its status.
    pub requeue: Duration,
    /// First retry delay after a failed reconcile; doubled per consecutive failure.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            cluster_domain: "cluster.local".into(),
            requeue: Duration::from_secs(15),
            backoff_base: Duration::from_secs(2),
            backoff_max: Duration::from_secs(300),
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    /// Kubernetes API client.
    pub client: Client,
    /// Publishes events on condition changes.
    pub recorder: Recorder,
    /// Reconcile counters and timings.
    pub metrics: Metrics,
    /// Reads the replicas' `/status`.
    pub fetcher: Arc<dyn StatusFetcher>,
    /// Timing and naming knobs.
    pub settings: Settings,
    /// Consecutive failures per object (`namespace/name`), for the retry backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context whose events name `instance` as the reporting controller instance.
    pub fn new(
        client: Client,
        metrics: Metrics,
        fetcher: Arc<dyn StatusFetcher>,
        settings: Settings,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance,
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            fetcher,
            settings,
            failures: Mutex::default(),
        }
    }

    /// Counts one more failure of `key` and returns the delay before its retry:
    /// `base * 2^(failures - 1)`, at most `backoff_max`.
    pub fn next_backoff(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let count = failures.entry(key.to_owned()).or_insert(0);
        *count = count.saturating_add(1);
        let factor = 2u32.saturating_pow(count.saturating_sub(1).min(20));
        self.settings
            .backoff_base
            .saturating_mul(factor)
            .min(self.settings.backoff_max)
    }

    fn reset_backoff(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }
}

fn object_key(cluster: &PbftCluster) -> String {
    format!(
        "{}/{}",
        cluster.namespace().unwrap_or_default(),
        cluster.name_any()
    )
}

/// Reconciles one PbftCluster. See the module documentation for the rules.
#[instrument(skip(cluster, ctx), fields(namespace = ?cluster.namespace(), name = %cluster.name_any()))]
pub async fn reconcile(cluster: Arc<PbftCluster>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.count_and_measure();
    let result = reconcile_cluster(&cluster, &ctx).await;
    if result.is_ok() {
        ctx.reset_backoff(&object_key(&cluster));
    }
    result
}

/// Retries a failed reconcile with a per-object exponential backoff, and counts the failure
/// by error kind.
pub fn error_policy(cluster: Arc<PbftCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failure(error.kind());
    let key = object_key(&cluster);
    let delay = ctx.next_backoff(&key);
    warn!(object = %key, error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

fn refused(deployed: i32, wanted: i32) -> Problem {
    Problem {
        reason: "ReconfigurationRefused",
        message: format!(
            "spec.replicas is {wanted} but the cluster runs {deployed} replicas; the controller keeps {deployed}: \
             membership is fixed by the keys and configuration the replicas started with, and changing n would \
             change quorum sizes under live replicas. Set spec.replicas back to {deployed}, or create a new PbftCluster"
        ),
    }
}

/// Keys ready for the configuration, or why not.
enum Keys {
    Ready(PublicKeys),
    Unusable(Problem),
}

fn keys_from(secret: &Secret, c: &Cluster) -> Keys {
    match secret::public_keys(secret, c.replicas) {
        Ok(keys) => Keys::Ready(keys),
        Err(p) => Keys::Unusable(Problem {
            reason: p.reason(),
            message: p.message(&c.keys_secret_name()),
        }),
    }
}

/// Reads the key Secret, or creates it (once) with fresh keys. Never overwrites.
async fn ensure_keys(c: &Cluster<'_>, client: &Client) -> Result<Keys> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &c.namespace);
    let name = c.keys_secret_name();
    if let Some(existing) = api.get_opt(&name).await? {
        return Ok(keys_from(&existing, c));
    }
    let entries = secret::generate(c.replicas)?;
    let pp = PostParams {
        field_manager: Some(MANAGER.into()),
        ..PostParams::default()
    };
    match api.create(&pp, &secret::build(c, &entries)).await {
        Ok(_) => {
            info!(secret = %name, replicas = c.replicas, "generated keys");
            Ok(Keys::Ready(secret::public_keys_of(&entries, c.replicas)))
        }
        // Someone else created it since we looked: theirs wins, ours is dropped unused.
        Err(kube::Error::Api(s)) if s.is_already_exists() => {
            Ok(keys_from(&api.get(&name).await?, c))
        }
        Err(e) => Err(e.into()),
    }
}

/// Server-side applies `obj` (forcing ownership of the fields we set) and returns the
/// object as stored.
async fn apply<K>(client: &Client, namespace: &str, obj: &K) -> Result<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let name = obj
        .meta()
        .name
        .clone()
        .ok_or(Error::MissingField("metadata.name"))?;
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let pp = PatchParams::apply(MANAGER).force();
    Ok(api.patch(&name, &pp, &Patch::Apply(obj)).await?)
}

/// Applies the ConfigMap, Services, PodDisruptionBudget and StatefulSet, in that order (the
/// pods need the first ones to start). Returns the StatefulSet as stored.
async fn apply_children(
    c: &Cluster<'_>,
    keys: &PublicKeys,
    client: &Client,
) -> Result<StatefulSet> {
    let yaml = configmap::config_yaml(c, keys)?;
    let hash = configmap::config_hash(&yaml);
    apply(client, &c.namespace, &configmap::build(c, &yaml)).await?;
    apply(client, &c.namespace, &service::headless(c)).await?;
    apply(client, &c.namespace, &service::client(c)).await?;
    apply(client, &c.namespace, &pdb::build(c)).await?;
    apply(client, &c.namespace, &statefulset::build(c, &hash)).await
}

async fn reconcile_cluster(cluster: &PbftCluster, ctx: &Context) -> Result<Action> {
    let namespace = cluster
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = cluster.name_any();
    let previous = cluster.status.clone().unwrap_or_default();
    let spec = &cluster.spec;
    let sts_api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &namespace);
    // The deployed size: from our status, or, when the status is empty (first reconcile, or
    // a restore that dropped it), from a StatefulSet already running.
    let mut existing = None;
    let deployed = match previous.replicas.filter(|n| *n > 0) {
        Some(n) => Some(n),
        None => {
            existing = sts_api.get_opt(&name).await?;
            existing
                .as_ref()
                .and_then(|s| s.spec.replicas)
                .filter(|n| *n > 0)
        }
    };

    // Problems, highest priority first: invalid spec, keys, refused reconfiguration.
    let mut invalid = spec.problems();
    let mut problems = Vec::new();
    let replicas = match deployed {
        Some(d) => {
            if spec.replicas != d {
                problems.push(refused(d, spec.replicas));
            }
            d
        }
        None => {
            if let Some(p) = replicas_problem(spec.replicas) {
                invalid.insert(0, p);
            }
            spec.replicas
        }
    };
    let c = Cluster::new(cluster, replicas, &ctx.settings.cluster_domain)?;

    let mut sts = None;
    if invalid.is_empty() {
        match ensure_keys(&c, &ctx.client).await? {
            Keys::Ready(keys) => sts = Some(apply_children(&c, &keys, &ctx.client).await?),
            Keys::Unusable(p) => problems.insert(0, p),
        }
    } else {
        problems.insert(
            0,
            Problem {
                reason: "InvalidSpec",
                message: invalid.join("; "),
            },
        );
    }
    // Nothing applied, but a cluster runs: still report on it.
    if sts.is_none() && deployed.is_some() {
        sts = match existing {
            Some(s) => Some(s),
            None => sts_api.get_opt(&name).await?,
        };
    }

    let observed = match sts {
        Some(_) => {
            let urls: Vec<String> = (0..replicas)
                .map(|i| status::replica_url(&name, i, &namespace, &ctx.settings.cluster_domain))
                .collect();
            status::fold(replicas, &status::poll(ctx.fetcher.as_ref(), &urls).await)
        }
        None => Observed::default(),
    };
    let new_status = status::compute(Inputs {
        generation: cluster.metadata.generation,
        replicas,
        statefulset: sts.as_ref(),
        observed: &observed,
        previous: &previous,
        problems,
        now: Time(Timestamp::now()),
    });

    let api: Api<PbftCluster> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = serde_json::json!({
        "apiVersion": PbftCluster::api_version(&()),
        "kind": PbftCluster::kind(&()),
        "status": new_status,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;

    publish_changes(cluster, &previous, &new_status, ctx).await;
    Ok(Action::requeue(ctx.settings.requeue))
}

/// One event per changed `Ready`/`Degraded` condition. Failing to publish an event is
/// logged, never a reconcile failure.
async fn publish_changes(
    cluster: &PbftCluster,
    before: &PbftClusterStatus,
    after: &PbftClusterStatus,
    ctx: &Context,
) {
    let reference = cluster.object_ref(&());
    for c in status::changed(before, after) {
        let bad = (c.type_ == status::DEGRADED) == (c.status == "True");
        let event = Event {
            type_: if bad {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: c.reason.clone(),
            note: Some(format!("{} is {}: {}", c.type_, c.status, c.message)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            warn!(error = %e, reason = %c.reason, "could not publish event");
        }
    }
}

/// Checks that the CRD is installed (a clear error beats an endless watch failure).
pub async fn check_crd(client: &Client, namespace: Option<&str>) -> Result<()> {
    let api: Api<PbftCluster> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    api.list(&ListParams::default().limit(1))
        .await
        .map(|_| ())
        .map_err(|e| Error::CrdMissing(e.to_string()))
}

fn api_for<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the controller until `shutdown` fires: watches PbftClusters (in `namespace`, or all)
/// and the objects they own, and reconciles on every change and every `requeue`.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGER}"));
    Controller::new(
        api_for::<PbftCluster>(&client, ns),
        watcher::Config::default(),
    )
    .owns(api_for::<StatefulSet>(&client, ns), owned.clone())
    .owns(api_for::<Service>(&client, ns), owned.clone())
    .owns(api_for::<ConfigMap>(&client, ns), owned.clone())
    .owns(api_for::<PodDisruptionBudget>(&client, ns), owned.clone())
    .owns(api_for::<Secret>(&client, ns), owned)
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx)
    .for_each(|result| async move {
        match result {
            Ok((obj, _)) => tracing::debug!(object = %obj.name, "reconciled"),
            Err(e) => warn!(error = %e, "controller error"),
        }
    })
    .await;
}

#[cfg(test)]
mod tests;
