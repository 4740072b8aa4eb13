//! Reconcile scenarios against a scripted mock API server: each test lists, in order, every
//! request the controller must make and checks its key fields.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use serde_json::{Value, json};

use super::*;
use crate::fixtures::{ApiServer, FakeFetcher, scenario};
use crate::resources::test_support;

const SECRET: &str = "/api/v1/namespaces/ns/secrets/c1-keys";
const SECRETS: &str = "/api/v1/namespaces/ns/secrets";
const CONFIGMAP: &str = "/api/v1/namespaces/ns/configmaps/c1-config";
const HEADLESS: &str = "/api/v1/namespaces/ns/services/c1-headless";
const CLIENT_SVC: &str = "/api/v1/namespaces/ns/services/c1";
const PDB: &str = "/apis/policy/v1/namespaces/ns/poddisruptionbudgets/c1";
const STS: &str = "/apis/apps/v1/namespaces/ns/statefulsets/c1";
const STATUS: &str = "/apis/pbft.dev/v1alpha1/namespaces/ns/pbftclusters/c1/status";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ns/events";

/// A Secret as stored, with keys for `n` replicas, minus the entries in `drop`.
fn stored_secret(n: i32, drop: &[&str]) -> (Value, BTreeMap<String, String>) {
    let pc = test_support::cluster("c1", crate::crd::PbftClusterSpec::default());
    let c = Cluster::new(&pc, n, "cluster.local").unwrap();
    let mut entries = secret::generate(n).unwrap();
    for d in drop {
        entries.remove(*d);
    }
    let body = serde_json::to_value(secret::build(&c, &entries)).unwrap();
    (body, entries)
}

/// A StatefulSet status with every one of `n` pods updated and ready.
fn healthy_sts_status(n: i32) -> Value {
    json!({
        "observedGeneration": 1,
        "replicas": n,
        "readyReplicas": n,
        "updatedReplicas": n,
        "currentReplicas": n,
        "currentRevision": "c1-1",
        "updateRevision": "c1-1"
    })
}

/// Every replica of `n` in view 2 with primary 2 at `height`.
fn all_agree(n: i32, height: u64) -> FakeFetcher {
    (0..n).fold(FakeFetcher::default(), |f, i| {
        f.reply("c1", i, 2, 2, height)
    })
}

/// Expects the five applies in order; answers the StatefulSet with `sts_status` (none:
/// just created). Returns the replica configuration that was applied.
async fn expect_children(api: &mut ApiServer, n: i32, sts_status: Option<Value>) -> String {
    expect_children_and_sts(api, n, sts_status).await.0
}

/// [`expect_children`], also returning the StatefulSet as applied.
async fn expect_children_and_sts(
    api: &mut ApiServer,
    n: i32,
    sts_status: Option<Value>,
) -> (String, Value) {
    let (cm, reply) = api.expect_apply(CONFIGMAP).await.json();
    assert_eq!(cm["kind"], "ConfigMap");
    assert_eq!(cm["metadata"]["ownerReferences"][0]["kind"], "PbftCluster");
    assert_eq!(
        cm["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "pbft-controller"
    );
    let config = cm["data"]["config.yaml"].as_str().unwrap().to_owned();
    reply.ok(cm);

    let (svc, reply) = api.expect_apply(HEADLESS).await.json();
    assert_eq!(svc["spec"]["clusterIP"], "None");
    assert_eq!(svc["spec"]["publishNotReadyAddresses"], true);
    reply.ok(svc);
    let (svc, reply) = api.expect_apply(CLIENT_SVC).await.json();
    assert_eq!(svc["spec"]["type"], "ClusterIP");
    reply.ok(svc);

    let (pdb, reply) = api.expect_apply(PDB).await.json();
    assert_eq!(pdb["spec"]["maxUnavailable"], (n - 1) / 3);
    reply.ok(pdb);

    let (mut sts, reply) = api.expect_apply(STS).await.json();
    assert_eq!(sts["kind"], "StatefulSet");
    assert_eq!(sts["spec"]["replicas"], n);
    assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel");
    let hash = &sts["spec"]["template"]["metadata"]["annotations"]["pbft.dev/config-hash"];
    assert_eq!(
        hash.as_str(),
        Some(configmap::config_hash(&config).as_str())
    );
    let applied = sts.clone();
    sts["metadata"]["generation"] = json!(1);
    if let Some(s) = sts_status {
        sts["status"] = s;
    }
    reply.ok(sts);
    (config, applied)
}

/// Expects the status apply and returns the status written.
async fn expect_status(api: &mut ApiServer) -> PbftClusterStatus {
    let e = api.expect_apply(STATUS).await;
    let (body, reply) = e.json();
    assert_eq!(body["apiVersion"], "pbft.dev/v1alpha1");
    assert_eq!(body["kind"], "PbftCluster");
    let status: PbftClusterStatus = serde_json::from_value(body["status"].clone()).unwrap();
    let mut stored = serde_json::to_value(PbftCluster::test("c1")).unwrap();
    stored["status"] = body["status"].clone();
    reply.ok(stored);
    status
}

/// Expects one event with `type_` and `reason` about c1.
async fn expect_event(api: &mut ApiServer, type_: &str, reason: &str) {
    let (body, reply) = api.expect("POST", EVENTS).await.json();
    assert_eq!(body["type"], type_, "{body}");
    assert_eq!(body["reason"], reason, "{body}");
    assert_eq!(body["regarding"]["name"], "c1");
    assert_eq!(body["regarding"]["kind"], "PbftCluster");
    assert_eq!(body["reportingController"], "pbft-controller");
    reply.created(body);
}

fn cond<'a>(s: &'a PbftClusterStatus, t: &str) -> (&'a str, &'a str) {
    let c = s.condition(t).unwrap_or_else(|| panic!("no {t} condition"));
    (c.status.as_str(), c.reason.as_str())
}

fn replica_config(yaml: &str, n: u32) -> pbft_replica::config::Config {
    let cfg = pbft_replica::config::Config::from_yaml(yaml).unwrap();
    for id in 0..n {
        cfg.validate(id).unwrap();
    }
    cfg
}

#[tokio::test]
async fn first_reconcile_of_a_fresh_cluster() {
    let (ctx, mut api) = Context::test(FakeFetcher::default());
    let cluster = Arc::new(PbftCluster::test("c1"));
    let script = tokio::spawn(async move {
        // Status empty: is a StatefulSet running already?
        api.expect("GET", STS).await.not_found();
        api.expect("GET", SECRET).await.not_found();
        let created = api.expect("POST", SECRETS).await;
        assert!(
            created.query.contains("fieldManager=pbft-controller"),
            "{}",
            created.query
        );
        let (secret, reply) = created.json();
        assert_eq!(secret["metadata"]["name"], "c1-keys");
        assert_eq!(secret["metadata"]["ownerReferences"][0]["name"], "c1");
        assert_eq!(secret["type"], "Opaque");
        let data = secret["data"].as_object().unwrap();
        let mut names: Vec<&str> = data.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "client-1.key",
                "client-1.pub",
                "replica-0.key",
                "replica-0.pub",
                "replica-1.key",
                "replica-1.pub",
                "replica-2.key",
                "replica-2.pub",
                "replica-3.key",
                "replica-3.pub"
            ]
        );
        let stored: k8s_openapi::api::core::v1::Secret =
            serde_json::from_value(secret.clone()).unwrap();
        reply.created(secret);

        let config = expect_children(&mut api, 4, None).await;
        // The configuration lists exactly the keys that went into the Secret.
        let cfg = replica_config(&config, 4);
        let keys = secret::public_keys(&stored, 4).unwrap();
        let listed: Vec<String> = cfg.replicas.iter().map(|r| r.public_key.clone()).collect();
        assert_eq!(listed, keys.replicas);
        assert_eq!(cfg.clients[0].public_key, keys.operator_client);

        let status = expect_status(&mut api).await;
        assert_eq!(status.replicas, Some(4));
        assert_eq!(status.observed_generation, Some(1));
        assert_eq!(cond(&status, "Ready"), ("False", "QuorumNotReady"));
        assert_eq!(cond(&status, "Progressing"), ("True", "RollingOut"));
        // No pod answers yet: more than f unreachable.
        assert_eq!(cond(&status, "Degraded"), ("True", "ReplicasUnreachable"));
        expect_event(&mut api, "Warning", "ReplicasUnreachable").await;
        api
    });
    let action = scenario(script, reconcile(cluster, ctx.clone()))
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(15)));
    assert_eq!(ctx.metrics.reconciliations.get(), 1);
    assert_eq!(ctx.metrics.duration.get_sample_count(), 1);
}

#[tokio::test]
async fn existing_secret_is_read_not_created() {
    let (ctx, mut api) = Context::test(all_agree(4, 10));
    let cluster = Arc::new(PbftCluster::test("c1"));
    let (secret_body, entries) = stored_secret(4, &[]);
    let script = tokio::spawn(async move {
        api.expect("GET", STS).await.not_found();
        api.expect("GET", SECRET).await.ok(secret_body);
        let config = expect_children(&mut api, 4, Some(healthy_sts_status(4))).await;
        let cfg = replica_config(&config, 4);
        assert_eq!(cfg.replicas[3].public_key, entries["replica-3.pub"]);
        let status = expect_status(&mut api).await;
        assert_eq!(status.ready_replicas, 4);
        assert_eq!(
            (status.view, status.primary, status.height),
            (Some(2), Some(2), Some(10))
        );
        assert_eq!(cond(&status, "Ready"), ("True", "QuorumReady"));
        assert_eq!(cond(&status, "Degraded"), ("False", "AsExpected"));
        assert_eq!(cond(&status, "Progressing"), ("True", "Committing"));
        expect_event(&mut api, "Normal", "QuorumReady").await;
        api
    });
    scenario(script, reconcile(cluster, ctx)).await.unwrap();
}

#[tokio::test]
async fn unchanged_conditions_make_no_events() {
    let (ctx, mut api) = Context::test(all_agree(4, 10));
    // First pass records the status; the second starts from it.
    let (secret_body, _) = stored_secret(4, &[]);
    let body = secret_body.clone();
    let script = tokio::spawn(async move {
        api.expect("GET", STS).await.not_found();
        api.expect("GET", SECRET).await.ok(body);
        expect_children(&mut api, 4, Some(healthy_sts_status(4))).await;
        let status = expect_status(&mut api).await;
        expect_event(&mut api, "Normal", "QuorumReady").await;
        (api, status)
    });
    let (first, status) = {
        let out =
            crate::fixtures::bounded(reconcile(Arc::new(PbftCluster::test("c1")), ctx.clone()))
                .await;
        let (api, status) = crate::fixtures::bounded(script).await.unwrap();
        (out.map(|_| api), status)
    };
    let mut api = first.unwrap();
    let mut cluster = PbftCluster::test("c1");
    cluster.status = Some(status);
    let script = tokio::spawn(async move {
        api.expect("GET", SECRET).await.ok(secret_body);
        expect_children(&mut api, 4, Some(healthy_sts_status(4))).await;
        let status = expect_status(&mut api).await;
        assert_eq!(cond(&status, "Ready"), ("True", "QuorumReady"));
        // Height did not move: stable.
        assert_eq!(cond(&status, "Progressing"), ("False", "Stable"));
        api
    });
    scenario(script, reconcile(Arc::new(cluster), ctx))
        .await
        .unwrap();
}

#[tokio::test]
async fn invalid_spec_applies_nothing() {
    let (ctx, mut api) = Context::test(FakeFetcher::default());
    let cluster = Arc::new(PbftCluster::test("c1").replicas(5));
    let script = tokio::spawn(async move {
        api.expect("GET", STS).await.not_found();
        let status = expect_status(&mut api).await;
        assert_eq!(cond(&status, "Degraded"), ("True", "InvalidSpec"));
        let msg = &status.condition("Degraded").unwrap().message;
        assert!(msg.contains("replicas is 5"), "{msg}");
        assert_eq!(status.replicas, None);
        assert_eq!(cond(&status, "Ready"), ("False", "NotDeployed"));
        expect_event(&mut api, "Warning", "InvalidSpec").await;
        api
    });
    let action = scenario(script, reconcile(cluster, ctx)).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(15)));
}

#[tokio::test]
async fn replica_change_on_a_running_cluster_is_refused() {
    let (ctx, mut api) = Context::test(all_agree(4, 10));
    let cluster = Arc::new(PbftCluster::test("c1").deployed(4).replicas(7));
    let (secret_body, _) = stored_secret(4, &[]);
    let script = tokio::spawn(async move {
        api.expect("GET", SECRET).await.ok(secret_body);
        // Still the deployed four: StatefulSet, PDB (f=1) and config.
        let config = expect_children(&mut api, 4, Some(healthy_sts_status(4))).await;
        assert_eq!(replica_config(&config, 4).replicas.len(), 4);
        let status = expect_status(&mut api).await;
        assert_eq!(status.replicas, Some(4));
        assert_eq!(
            cond(&status, "Degraded"),
            ("True", "ReconfigurationRefused")
        );
        let msg = &status.condition("Degraded").unwrap().message;
        assert!(
            msg.contains("spec.replicas is 7") && msg.contains("keeps 4"),
            "{msg}"
        );
        assert_eq!(cond(&status, "Ready"), ("True", "QuorumReady"));
        expect_event(&mut api, "Normal", "QuorumReady").await;
        expect_event(&mut api, "Warning", "ReconfigurationRefused").await;
        api
    });
    scenario(script, reconcile(cluster, ctx)).await.unwrap();
}

#[tokio::test]
async fn invalid_replicas_on_a_running_cluster_is_a_refused_reconfiguration() {
    // 5 is not 3f+1, but what matters is that the running 4 stay.
    let (ctx, mut api) = Context::test(all_agree(4, 10));
    let cluster = Arc::new(PbftCluster::test("c1").deployed(4).replicas(5));
    let (secret_body, _) = stored_secret(4, &[]);
    let script = tokio::spawn(async move {
        api.expect("GET", SECRET).await.ok(secret_body);
        expect_children(&mut api, 4, Some(healthy_sts_status(4))).await;
        let status = expect_status(&mut api).await;
        assert_eq!(
            cond(&status, "Degraded"),
            ("True", "ReconfigurationRefused")
        );
        expect_event(&mut api, "Normal", "QuorumReady").await;
        expect_event(&mut api, "Warning", "ReconfigurationRefused").await;
        api
    });
    scenario(script, reconcile(cluster, ctx)).await.unwrap();
}

#[tokio::test]
async fn secret_missing_keys_is_reported_not_repaired() {
    let (ctx, mut api) = Context::test(FakeFetcher::default());
    let cluster = Arc::new(PbftCluster::test("c1"));
    let (secret_body, _) = stored_secret(4, &["replica-3.pub", "client-1.pub"]);
    let script = tokio::spawn(async move {
        api.expect("GET", STS).await.not_found();
        api.expect("GET", SECRET).await.ok(secret_body);
        // No create, no apply: straight to the status.
        let status = expect_status(&mut api).await;
        assert_eq!(cond(&status, "Degraded"), ("True", "KeysMissing"));
        let msg = &status.condition("Degraded").unwrap().message;
        assert!(
            msg.contains("replica-3.pub") && msg.contains("client-1.pub"),
            "{msg}"
        );
        assert_eq!(status.replicas, None);
        expect_event(&mut api, "Warning", "KeysMissing").await;
        api
    });
    scenario(script, reconcile(cluster, ctx)).await.unwrap();
}

#[tokio::test]
async fn missing_keys_on_a_running_cluster_still_reports_the_replicas() {
    let (ctx, mut api) = Context::test(all_agree(4, 10));
    let cluster = Arc::new(PbftCluster::test("c1").deployed(4));
    let (secret_body, _) = stored_secret(4, &["replica-0.key"]);
    let mut sts = serde_json::to_value(k8s_openapi::api::apps::v1::StatefulSet::default()).unwrap();
    sts["metadata"] = json!({"name": "c1", "namespace": "ns", "generation": 1});
    sts["status"] = healthy_sts_status(4);
    let script = tokio::spawn(async move {
        api.expect("GET", SECRET).await.ok(secret_body);
        api.expect("GET", STS).await.ok(sts);
        let status = expect_status(&mut api).await;
        assert_eq!(status.replicas, Some(4));
        assert_eq!(cond(&status, "Degraded"), ("True", "KeysMissing"));
        assert_eq!(cond(&status, "Ready"), ("True", "QuorumReady"));
        expect_event(&mut api, "Normal", "QuorumReady").await;
        expect_event(&mut api, "Warning", "KeysMissing").await;
        api
    });
    scenario(script, reconcile(cluster, ctx)).await.unwrap();
}

#[tokio::test]
async fn lost_secret_race_uses_the_winners_keys() {
    let (ctx, mut api) = Context::test(FakeFetcher::default());
    let cluster = Arc::new(PbftCluster::test("c1"));
    let (winner, entries) = stored_secret(4, &[]);
    let script = tokio::spawn(async move {
        api.expect("GET", STS).await.not_found();
        api.expect("GET", SECRET).await.not_found();
        api.expect("POST", SECRETS)
            .await
            .status(409, "AlreadyExists");
        api.expect("GET", SECRET).await.ok(winner);
        let config = expect_children(&mut api, 4, None).await;
        let cfg = replica_config(&config, 4);
        assert_eq!(cfg.replicas[0].public_key, entries["replica-0.pub"]);
        expect_status(&mut api).await;
        expect_event(&mut api, "Warning", "ReplicasUnreachable").await;
        api
    });
    scenario(script, reconcile(cluster, ctx)).await.unwrap();
}

#[tokio::test]
async fn api_errors_fail_the_reconcile_and_back_off() {
    let (ctx, mut api) = Context::test(FakeFetcher::default());
    let cluster = Arc::new(PbftCluster::test("c1"));
    let (secret_body, _) = stored_secret(4, &[]);
    let script = tokio::spawn(async move {
        api.expect("GET", STS).await.not_found();
        api.expect("GET", SECRET).await.ok(secret_body);
        api.expect_apply(CONFIGMAP).await.status(409, "Conflict");
        api.expect("GET", STS).await.status(500, "InternalError");
        api
    });
    let (first, second) = scenario(script, async {
        let first = reconcile(cluster.clone(), ctx.clone()).await;
        let second = reconcile(cluster.clone(), ctx.clone()).await;
        (first, second)
    })
    .await;
    let first = first.unwrap_err();
    assert_eq!(first.kind(), "conflict");
    let second = second.unwrap_err();
    assert_eq!(second.kind(), "kube");

    let delays: Vec<Action> = [&first, &second, &second, &second]
        .into_iter()
        .map(|e| error_policy(cluster.clone(), e, ctx.clone()))
        .collect();
    let secs = |d: u64| Action::requeue(Duration::from_secs(d));
    assert_eq!(delays, [secs(2), secs(4), secs(8), secs(16)]);
    assert_eq!(
        ctx.metrics.failures.with_label_values(&["conflict"]).get(),
        1
    );
    assert_eq!(ctx.metrics.failures.with_label_values(&["kube"]).get(), 3);
    // The timer recorded both failed reconciles too.
    assert_eq!(ctx.metrics.duration.get_sample_count(), 2);

    // Capped, and per object.
    for _ in 0..20 {
        error_policy(cluster.clone(), &second, ctx.clone());
    }
    assert_eq!(
        error_policy(cluster.clone(), &second, ctx.clone()),
        Action::requeue(Duration::from_secs(300))
    );
    let other = Arc::new(PbftCluster::test("c2"));
    assert_eq!(error_policy(other, &second, ctx.clone()), secs(2));

    // A successful reconcile starts the backoff over.
    let (ctx2, mut api) = Context::test(FakeFetcher::default());
    error_policy(cluster.clone(), &second, ctx2.clone());
    error_policy(cluster.clone(), &second, ctx2.clone());
    let invalid = Arc::new(PbftCluster::test("c1").replicas(2));
    let script = tokio::spawn(async move {
        api.expect("GET", STS).await.not_found();
        expect_status(&mut api).await;
        expect_event(&mut api, "Warning", "InvalidSpec").await;
        api
    });
    scenario(script, reconcile(invalid, ctx2.clone()))
        .await
        .unwrap();
    assert_eq!(error_policy(cluster, &second, ctx2), secs(2));
}

#[tokio::test]
async fn status_folds_split_views_by_f_plus_1() {
    // n=4, f=1. Replica 2 claims a higher view and a far greater height; 3 is unreachable.
    let fetcher = FakeFetcher::default()
        .reply("c1", 0, 3, 3, 10)
        .reply("c1", 1, 3, 3, 12)
        .reply("c1", 2, 5, 1, 99);
    let (ctx, mut api) = Context::test(fetcher);
    let cluster = Arc::new(PbftCluster::test("c1"));
    let (secret_body, _) = stored_secret(4, &[]);
    let script = tokio::spawn(async move {
        api.expect("GET", STS).await.not_found();
        api.expect("GET", SECRET).await.ok(secret_body);
        expect_children(&mut api, 4, Some(healthy_sts_status(4))).await;
        let status = expect_status(&mut api).await;
        assert_eq!((status.view, status.primary), (Some(3), Some(3)));
        assert_eq!(status.height, Some(12), "the height f+1 replicas reached");
        assert_eq!(
            cond(&status, "Degraded"),
            ("False", "AsExpected"),
            "one down is within f"
        );
        assert_eq!(cond(&status, "Ready"), ("True", "QuorumReady"));
        expect_event(&mut api, "Normal", "QuorumReady").await;
        api
    });
    scenario(script, reconcile(cluster, ctx)).await.unwrap();
}

#[tokio::test]
async fn more_than_f_unreachable_is_degraded_and_no_view_is_agreed() {
    // Only replicas 0 and 1 answer, in different views.
    let fetcher = FakeFetcher::default()
        .reply("c1", 0, 3, 3, 10)
        .reply("c1", 1, 4, 0, 10);
    let (ctx, mut api) = Context::test(fetcher);
    let cluster = Arc::new(PbftCluster::test("c1"));
    let (secret_body, _) = stored_secret(4, &[]);
    let script = tokio::spawn(async move {
        api.expect("GET", STS).await.not_found();
        api.expect("GET", SECRET).await.ok(secret_body);
        expect_children(&mut api, 4, Some(healthy_sts_status(4))).await;
        let status = expect_status(&mut api).await;
        assert_eq!((status.view, status.primary), (None, None));
        assert_eq!(status.height, Some(10));
        assert_eq!(cond(&status, "Ready"), ("False", "NoAgreedView"));
        assert_eq!(cond(&status, "Degraded"), ("True", "ReplicasUnreachable"));
        let msg = &status.condition("Degraded").unwrap().message;
        assert!(msg.contains("ids 2, 3"), "{msg}");
        expect_event(&mut api, "Warning", "ReplicasUnreachable").await;
        api
    });
    scenario(script, reconcile(cluster, ctx)).await.unwrap();
}

#[tokio::test]
async fn lost_status_is_recovered_from_the_running_statefulset() {
    // The status was dropped (say, by a backup restore) and spec.replicas changed meanwhile:
    // the running StatefulSet still fixes the membership.
    let (ctx, mut api) = Context::test(all_agree(4, 10));
    let cluster = Arc::new(PbftCluster::test("c1").replicas(7));
    let (secret_body, _) = stored_secret(7, &[]);
    let mut running =
        serde_json::to_value(k8s_openapi::api::apps::v1::StatefulSet::default()).unwrap();
    running["metadata"] = json!({"name": "c1", "namespace": "ns", "generation": 1});
    running["spec"]["replicas"] = json!(4);
    running["status"] = healthy_sts_status(4);
    let script = tokio::spawn(async move {
        api.expect("GET", STS).await.ok(running);
        api.expect("GET", SECRET).await.ok(secret_body);
        expect_children(&mut api, 4, Some(healthy_sts_status(4))).await;
        let status = expect_status(&mut api).await;
        assert_eq!(status.replicas, Some(4));
        assert_eq!(
            cond(&status, "Degraded"),
            ("True", "ReconfigurationRefused")
        );
        expect_event(&mut api, "Normal", "QuorumReady").await;
        expect_event(&mut api, "Warning", "ReconfigurationRefused").await;
        api
    });
    scenario(script, reconcile(cluster, ctx)).await.unwrap();
}

fn with_tls(mut cluster: PbftCluster, transport: crate::crd::Transport) -> PbftCluster {
    cluster.spec.transport = transport;
    cluster.spec.tls = Some(crate::crd::TlsSpec {
        secret_name: "c1-tls".into(),
        server_name: None,
    });
    cluster
}

#[tokio::test]
async fn tls_cluster_mounts_its_secret_without_reading_it() {
    let (ctx, mut api) = Context::test(all_agree(4, 10));
    let cluster = Arc::new(with_tls(
        PbftCluster::test("c1"),
        crate::crd::Transport::Grpc,
    ));
    let (secret_body, _) = stored_secret(4, &[]);
    let script = tokio::spawn(async move {
        api.expect("GET", STS).await.not_found();
        // The keys Secret only: the TLS Secret is the kubelet's to mount, never fetched.
        api.expect("GET", SECRET).await.ok(secret_body);
        let (config, sts) = expect_children_and_sts(&mut api, 4, Some(healthy_sts_status(4))).await;
        let cfg = replica_config(&config, 4);
        let tls = cfg.tls.expect("a tls section");
        assert_eq!(tls.cert_file.to_str(), Some("/etc/pbft/tls/tls.crt"));
        assert_eq!(tls.ca_file.to_str(), Some("/etc/pbft/tls/ca.crt"));
        let pod = &sts["spec"]["template"]["spec"];
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "tls")
            .expect("a tls volume");
        assert_eq!(volume["secret"]["secretName"], "c1-tls");
        assert_eq!(volume["secret"]["defaultMode"], 0o400);
        let mount = pod["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "tls")
            .expect("a tls mount");
        assert_eq!(mount["mountPath"], "/etc/pbft/tls");
        assert_eq!(mount["readOnly"], true);
        let status = expect_status(&mut api).await;
        // /status is still read over plain HTTP on 8000.
        assert_eq!(cond(&status, "Ready"), ("True", "QuorumReady"));
        expect_event(&mut api, "Normal", "QuorumReady").await;
        api
    });
    scenario(script, reconcile(cluster, ctx)).await.unwrap();
}

#[tokio::test]
async fn tls_with_tcp_is_an_invalid_spec() {
    let (ctx, mut api) = Context::test(FakeFetcher::default());
    let cluster = Arc::new(with_tls(
        PbftCluster::test("c1"),
        crate::crd::Transport::Tcp,
    ));
    let script = tokio::spawn(async move {
        api.expect("GET", STS).await.not_found();
        // No keys, no applies: straight to the status.
        let status = expect_status(&mut api).await;
        assert_eq!(cond(&status, "Degraded"), ("True", "InvalidSpec"));
        let msg = &status.condition("Degraded").unwrap().message;
        assert!(msg.contains("tls needs transport: grpc"), "{msg}");
        assert_eq!(status.replicas, None);
        expect_event(&mut api, "Warning", "InvalidSpec").await;
        api
    });
    scenario(script, reconcile(cluster, ctx)).await.unwrap();
}
