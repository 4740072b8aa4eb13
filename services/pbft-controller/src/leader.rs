//! Leader election on a `coordination.k8s.io/v1` Lease, so that several controller pods can
//! run for availability while only one reconciles: two writers would fight over the same
//! objects and double the events.
//!
//! The leader renews the Lease every `renew_every`; a candidate takes over once the holder
//! has not renewed for `lease_duration`. A leader that cannot renew for `renew_deadline`
//! (shorter than `lease_duration`) stops its work before anyone else may take over, and the
//! process exits so that it restarts as a plain candidate. On shutdown the leader releases
//! the Lease so a standby takes over at once.

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::resources::MANAGER;
use crate::{Error, Result};

/// Where the Lease lives, who we are, and the timing.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Name of the Lease object.
    pub name: String,
    /// Namespace of the Lease (the controller's own namespace).
    pub namespace: String,
    /// This instance's identity (its pod name).
    pub identity: String,
    /// How long a holder's claim lasts after its last renewal.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long stops working.
    pub renew_deadline: Duration,
    /// Renewal interval of the leader, and retry interval of a candidate.
    pub renew_every: Duration,
}

impl LeaseSettings {
    /// The usual timing (15 s lease, 10 s renew deadline, 2 s retry), as client-go uses.
    pub fn new(name: &str, namespace: &str, identity: &str) -> Self {
        LeaseSettings {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            identity: identity.to_owned(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            renew_every: Duration::from_secs(2),
        }
    }
}

/// What to do with the Lease as it stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No Lease exists: create it, holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Nobody holds it, or the holder's claim expired: take it over.
    TakeOver,
    /// Someone else holds a live claim.
    Wait {
        /// The current holder.
        holder: String,
    },
}

/// Decides from the Lease as read at `now`.
pub fn decide(lease: Option<&Lease>, identity: &str, now: Timestamp) -> Decision {
    let Some(lease) = lease else {
        return Decision::Create;
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.unwrap_or_default();
    if holder == identity {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::TakeOver;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    let last = spec
        .renew_time
        .or(spec.acquire_time)
        .map(|t| t.0)
        .unwrap_or(Timestamp::UNIX_EPOCH);
    match last.checked_add(duration) {
        Ok(expiry) if expiry > now => Decision::Wait { holder },
        _ => Decision::TakeOver,
    }
}

/// Acquires, renews and releases the Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    settings: LeaseSettings,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_conflict() || s.is_already_exists())
}

impl LeaderElector {
    /// An elector for the Lease named in `settings`.
    pub fn new(client: kube::Client, settings: LeaseSettings) -> Self {
        LeaderElector {
            api: Api::namespaced(client, &settings.namespace),
            settings,
        }
    }

    fn claim(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.settings.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.settings.lease_duration.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One election round: `true` when we hold the Lease afterwards. Losing a write race
    /// (409) is an ordinary `false`.
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
        let now = Timestamp::now();
        let pp = PostParams {
            field_manager: Some(MANAGER.into()),
            ..PostParams::default()
        };
        let current = self.api.get_opt(&self.settings.name).await?;
        let write = match decide(current.as_ref(), &self.settings.identity, now) {
            Decision::Wait { .. } => return Ok(false),
            Decision::Create => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.settings.name.clone()),
                        namespace: Some(self.settings.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.claim(now, None, 0)),
                };
                self.api.create(&pp, &lease).await.map(|_| ())
            }
            decision => {
                // `current` is Some here: Renew and TakeOver come from an existing Lease.
                let mut lease = current.ok_or(Error::MissingField("lease"))?;
                let old = lease.spec.clone().unwrap_or_default();
                let transitions = old.lease_transitions.unwrap_or(0);
                lease.spec = Some(if decision == Decision::Renew {
                    self.claim(now, old.acquire_time, transitions)
                } else {
                    self.claim(now, None, transitions.saturating_add(1))
                });
                // The resourceVersion read above makes this a compare-and-swap.
                self.api
                    .replace(&self.settings.name, &pp, &lease)
                    .await
                    .map(|_| ())
            }
        };
        match write {
            Ok(()) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the Lease up if we hold it, so a standby need not wait for it to expire.
    pub async fn step_down(&self) -> Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        lease.spec = Some(spec);
        let pp = PostParams {
            field_manager: Some(MANAGER.into()),
            ..PostParams::default()
        };
        match self.api.replace(&self.settings.name, &pp, &lease).await {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits for leadership, then runs `work` while renewing. Returns `Ok` when `shutdown`
    /// fires or `work` ends (the Lease is released either way), and
    /// [`Error::LeadershipLost`] when the Lease could not be kept.
    pub async fn run<W>(
        &self,
        metrics: &Metrics,
        shutdown: impl Future<Output = ()>,
        work: W,
    ) -> Result<()>
    where
        W: Future<Output = ()> + Send + 'static,
    {
        tokio::pin!(shutdown);
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election round failed"),
            }
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(self.settings.renew_every) => {}
            }
        }
        info!(identity = %self.settings.identity, lease = %self.settings.name, "became leader");
        metrics.leader.set(1);
        let mut task = tokio::spawn(work);
        let mut last_renewal = Instant::now();
        let outcome = loop {
            tokio::select! {
                _ = &mut shutdown => {
                    // `shutdown` also tells the work to stop: let it drain for a moment.
                    let _ = tokio::time::timeout(Duration::from_secs(10), &mut task).await;
                    break Ok(());
                }
                _ = &mut task => break Ok(()),
                _ = tokio::time::sleep(self.settings.renew_every) => {
                    match self.try_acquire_or_renew().await {
                        Ok(true) => last_renewal = Instant::now(),
                        Ok(false) => break Err(Error::LeadershipLost(
                            "another instance holds the lease".into(),
                        )),
                        Err(e) if last_renewal.elapsed() >= self.settings.renew_deadline => {
                            break Err(Error::LeadershipLost(format!(
                                "could not renew for {:?}: {e}",
                                self.settings.renew_deadline
                            )));
                        }
                        Err(e) => warn!(error = %e, "lease renewal failed; retrying"),
                    }
                }
            }
        };
        task.abort();
        metrics.leader.set(0);
        if outcome.is_ok()
            && let Err(e) = self.step_down().await
        {
            warn!(error = %e, "could not release the lease");
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed: i64, duration: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("l".into()),
                resource_version: Some("7".into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
                lease_duration_seconds: Some(duration),
                lease_transitions: Some(3),
                ..LeaseSpec::default()
            }),
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(None, "me", at(100)), Decision::Create);
        assert_eq!(
            decide(Some(&lease(Some("me"), 0, 15)), "me", at(100)),
            Decision::Renew,
            "our own lease is renewed even when it looks expired"
        );
        assert_eq!(
            decide(Some(&lease(Some("other"), 90, 15)), "me", at(100)),
            Decision::Wait {
                holder: "other".into()
            }
        );
        assert_eq!(
            decide(Some(&lease(Some("other"), 85, 15)), "me", at(100)),
            Decision::TakeOver,
            "expired exactly at renew + duration"
        );
        assert_eq!(
            decide(Some(&lease(None, 99, 15)), "me", at(100)),
            Decision::TakeOver,
            "released"
        );
        assert_eq!(
            decide(Some(&lease(Some(""), 99, 15)), "me", at(100)),
            Decision::TakeOver
        );
    }

    mod api {
        use super::*;
        use crate::fixtures::{ApiServer, bounded};

        fn elector(client: kube::Client) -> LeaderElector {
            LeaderElector::new(client, LeaseSettings::new("pbft-controller", "ops", "me"))
        }

        #[tokio::test]
        async fn creates_a_missing_lease() {
            let (client, mut api) = ApiServer::new();
            let server = tokio::spawn(async move {
                let path = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/pbft-controller";
                api.expect("GET", path).await.not_found();
                let (body, reply) = api
                    .expect("POST", "/apis/coordination.k8s.io/v1/namespaces/ops/leases")
                    .await
                    .json();
                assert_eq!(body["spec"]["holderIdentity"], "me");
                assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
                assert_eq!(body["spec"]["leaseTransitions"], 0);
                reply.ok(body);
                api
            });
            let held = bounded(elector(client).try_acquire_or_renew())
                .await
                .unwrap();
            assert!(held);
            bounded(server).await.unwrap().done().await;
        }

        #[tokio::test]
        async fn waits_for_a_live_holder_and_takes_over_an_expired_one() {
            let (client, mut api) = ApiServer::new();
            let path = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/pbft-controller";
            let now = Timestamp::now().as_second();
            let live = lease(Some("other"), now, 15);
            let expired = lease(Some("other"), now - 60, 15);
            let server = tokio::spawn(async move {
                api.expect("GET", path)
                    .await
                    .ok(serde_json::to_value(&live).unwrap());
                api.expect("GET", path)
                    .await
                    .ok(serde_json::to_value(&expired).unwrap());
                let (body, reply) = api.expect("PUT", path).await.json();
                assert_eq!(body["spec"]["holderIdentity"], "me");
                assert_eq!(body["spec"]["leaseTransitions"], 4);
                assert_eq!(body["metadata"]["resourceVersion"], "7");
                reply.ok(body);
                // A lost race on the next renewal is a plain "not leader".
                api.expect("GET", path)
                    .await
                    .ok(serde_json::to_value(&expired).unwrap());
                api.expect("PUT", path).await.status(409, "Conflict");
                api
            });
            let e = elector(client);
            assert!(!bounded(e.try_acquire_or_renew()).await.unwrap());
            assert!(bounded(e.try_acquire_or_renew()).await.unwrap());
            assert!(!bounded(e.try_acquire_or_renew()).await.unwrap());
            drop(e);
            bounded(server).await.unwrap().done().await;
        }

        #[tokio::test]
        async fn steps_down_only_from_its_own_lease() {
            let (client, mut api) = ApiServer::new();
            let path = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/pbft-controller";
            let now = Timestamp::now().as_second();
            let mine = lease(Some("me"), now, 15);
            let theirs = lease(Some("other"), now, 15);
            let server = tokio::spawn(async move {
                api.expect("GET", path)
                    .await
                    .ok(serde_json::to_value(&mine).unwrap());
                let (body, reply) = api.expect("PUT", path).await.json();
                assert!(body["spec"]["holderIdentity"].is_null(), "{body}");
                reply.ok(body);
                api.expect("GET", path)
                    .await
                    .ok(serde_json::to_value(&theirs).unwrap());
                api
            });
            let e = elector(client);
            bounded(e.step_down()).await.unwrap();
            bounded(e.step_down()).await.unwrap();
            drop(e);
            bounded(server).await.unwrap().done().await;
        }
    }
}
