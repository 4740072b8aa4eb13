//! What the cluster is doing, from the replicas themselves: each replica's `/status` JSON is
//! fetched over HTTP and folded into the PbftCluster status and its conditions.
//!
//! Up to `f` replicas may lie, so nothing a single replica says is taken at its word: the
//! view is one that at least `f + 1` replicas hold (so at least one correct replica holds
//! it), and the height is one that at least `f + 1` replicas have reached.
//!
//! Fetching sits behind [`StatusFetcher`] so tests inject replies without a network.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde::Deserialize;

use crate::crd::PbftClusterStatus;
use crate::resources::HTTP_PORT;
use crate::{Error, Result};

/// The part of a replica's `/status` the controller uses (other fields are ignored).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct ReplicaStatus {
    /// The replica's id.
    pub id: u32,
    /// Cluster size the replica runs with.
    #[serde(default)]
    pub n: usize,
    /// The replica's current view.
    pub view: u64,
    /// Primary of that view.
    pub primary: u32,
    /// Whether the replica is between views (it then has no primary it follows).
    #[serde(default)]
    pub view_change_in_progress: bool,
    /// Height of the replica's ledger.
    pub height: u64,
}

/// A boxed fetch, so the fetcher can be a trait object in the controller's context.
pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<ReplicaStatus>> + Send + 'a>>;

/// Reads one replica's `/status`.
pub trait StatusFetcher: Send + Sync {
    /// Fetches and parses the status document at `url`.
    fn fetch<'a>(&'a self, url: &'a str) -> FetchFuture<'a>;
}

/// `/status` of replica `i`, through its stable per-pod DNS name.
pub fn replica_url(name: &str, i: i32, namespace: &str, cluster_domain: &str) -> String {
    format!("http://{name}-{i}.{name}-headless.{namespace}.svc.{cluster_domain}:{HTTP_PORT}/status")
}

/// Fetches `/status` with plain HTTP/1.1 (hyper) and a deadline on the whole exchange.
#[derive(Clone, Debug)]
pub struct HttpFetcher {
    /// Deadline for connect, request and body together.
    pub timeout: Duration,
    /// Largest body accepted (a replica's status is a few kilobytes).
    pub max_body: usize,
}

impl Default for HttpFetcher {
    fn default() -> Self {
        HttpFetcher {
            timeout: Duration::from_secs(2),
            max_body: 1 << 20,
        }
    }
}

fn fetch_error(url: &str, message: impl std::fmt::Display) -> Error {
    Error::ReplicaStatus {
        url: url.to_owned(),
        message: message.to_string(),
    }
}

impl HttpFetcher {
    async fn get(&self, url: &str) -> Result<Bytes> {
        let uri: http::Uri = url.parse().map_err(|e| fetch_error(url, e))?;
        let host = uri
            .host()
            .ok_or_else(|| fetch_error(url, "no host"))?
            .to_owned();
        let port = uri.port_u16().unwrap_or(80);
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        let stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| fetch_error(url, e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| fetch_error(url, e))?;
        let driver = tokio::spawn(conn);
        let request = http::Request::get(path)
            .header(http::header::HOST, format!("{host}:{port}"))
            .body(Empty::<Bytes>::new())
            .map_err(|e| fetch_error(url, e))?;
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| fetch_error(url, e))?;
            if !response.status().is_success() {
                return Err(fetch_error(url, format!("HTTP {}", response.status())));
            }
            let body = Limited::new(response.into_body(), self.max_body)
                .collect()
                .await
                .map_err(|e| fetch_error(url, e))?;
            Ok(body.to_bytes())
        }
        .await;
        driver.abort();
        result
    }
}

impl StatusFetcher for HttpFetcher {
    fn fetch<'a>(&'a self, url: &'a str) -> FetchFuture<'a> {
        Box::pin(async move {
            let body = tokio::time::timeout(self.timeout, self.get(url))
                .await
                .map_err(|_| fetch_error(url, format!("no answer within {:?}", self.timeout)))??;
            serde_json::from_slice(&body).map_err(|e| fetch_error(url, e))
        })
    }
}

/// Fetches every replica's status concurrently; `None` for those that did not answer.
pub async fn poll(fetcher: &dyn StatusFetcher, urls: &[String]) -> Vec<Option<ReplicaStatus>> {
    let replies = futures_util::future::join_all(urls.iter().map(|u| fetcher.fetch(u))).await;
    replies
        .into_iter()
        .zip(urls)
        .map(|(r, url)| match r {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!(%url, error = %e, "replica status unavailable");
                None
            }
        })
        .collect()
}

/// The cluster's state as at least `f + 1` replicas agree on it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The highest view held by at least f+1 replicas not in a view change.
    pub view: Option<u64>,
    /// The primary those replicas follow in that view.
    pub primary: Option<u32>,
    /// The highest height at least f+1 replicas have reached.
    pub height: Option<u64>,
    /// Ids (ordinals) of the replicas that did not answer.
    pub unreachable: Vec<i32>,
}

/// Folds the replies of an `n`-replica cluster (`replies[i]` from replica `i`).
pub fn fold(n: i32, replies: &[Option<ReplicaStatus>]) -> Observed {
    let f = usize::try_from((n - 1) / 3).unwrap_or(0);
    let answered: Vec<&ReplicaStatus> = replies.iter().flatten().collect();
    let unreachable = (0..n)
        .filter(|i| {
            replies
                .get(usize::try_from(*i).unwrap_or(usize::MAX))
                .is_none_or(Option::is_none)
        })
        .collect();

    // (view, primary) pairs held by replicas that are not between views.
    let mut votes: std::collections::BTreeMap<(u64, u32), usize> = Default::default();
    for s in answered.iter().filter(|s| !s.view_change_in_progress) {
        *votes.entry((s.view, s.primary)).or_default() += 1;
    }
    let agreed = votes
        .iter()
        .rev()
        .find(|(_, count)| **count > f)
        .map(|(key, _)| *key);

    let mut heights: Vec<u64> = answered.iter().map(|s| s.height).collect();
    heights.sort_unstable_by(|a, b| b.cmp(a));
    Observed {
        view: agreed.map(|(v, _)| v),
        primary: agreed.map(|(_, p)| p),
        height: heights.get(f).copied(),
        unreachable,
    }
}

/// A reason the cluster is degraded, as found by the controller (highest priority first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The `Degraded` condition's reason, e.g. `InvalidSpec`.
    pub reason: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

/// Everything the conditions are computed from.
#[derive(Clone)]
pub struct Inputs<'a> {
    /// `metadata.generation` of the PbftCluster.
    pub generation: Option<i64>,
    /// Membership size built for.
    pub replicas: i32,
    /// The StatefulSet as last applied or read; `None` when none exists.
    pub statefulset: Option<&'a StatefulSet>,
    /// What the replicas agree on.
    pub observed: &'a Observed,
    /// The status before this reconcile (for transition times and height progress).
    pub previous: &'a PbftClusterStatus,
    /// Problems found before looking at the replicas, highest priority first.
    pub problems: Vec<Problem>,
    /// The time a changed condition gets as its transition time.
    pub now: Time,
}

/// Condition types the controller maintains.
pub const READY: &str = "Ready";
/// See [`READY`].
pub const PROGRESSING: &str = "Progressing";
/// See [`READY`].
pub const DEGRADED: &str = "Degraded";

fn condition(i: &Inputs, type_: &str, status: bool, reason: &str, message: String) -> Condition {
    let status = if status { "True" } else { "False" };
    let last_transition_time = i
        .previous
        .condition(type_)
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| i.now.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time,
        observed_generation: i.generation,
    }
}

/// Whether the StatefulSet is still rolling out `n` pods at its latest revision.
fn rolling_out(sts: &StatefulSet, n: i32) -> bool {
    let Some(st) = sts.status.as_ref() else {
        return true;
    };
    let revision_pending =
        st.update_revision.is_some() && st.current_revision != st.update_revision;
    st.observed_generation < sts.metadata.generation
        || st.replicas != n
        || st.updated_replicas.unwrap_or(0) < n
        || st.ready_replicas.unwrap_or(0) < n
        || revision_pending
}

/// Ready replicas as the StatefulSet counts them.
pub fn ready_replicas(sts: Option<&StatefulSet>) -> i32 {
    sts.and_then(|s| s.status.as_ref())
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0)
}

/// The new status: the replicas' agreement plus the `Ready`, `Progressing` and `Degraded`
/// conditions.
///
/// - `Ready`: at least `2f + 1` replicas ready and at least `f + 1` agree on a view.
/// - `Progressing`: the StatefulSet is rolling out, or the agreed height moved.
/// - `Degraded`: the controller's own problems (invalid spec, keys, refused
///   reconfiguration), or more than `f` replicas unreachable (no quorum without them).
pub fn compute(i: Inputs) -> PbftClusterStatus {
    let n = i.replicas;
    let f = (n - 1) / 3;
    let ready = ready_replicas(i.statefulset);
    let o = i.observed;

    let ready_cond = match (i.statefulset, o.view, o.primary) {
        (None, _, _) => condition(&i, READY, false, "NotDeployed", "no StatefulSet yet".into()),
        (Some(_), _, _) if ready < 2 * f + 1 => condition(
            &i,
            READY,
            false,
            "QuorumNotReady",
            format!(
                "{ready} of {n} replicas ready, a quorum needs {}",
                2 * f + 1
            ),
        ),
        (Some(_), Some(view), Some(primary)) => condition(
            &i,
            READY,
            true,
            "QuorumReady",
            format!("{ready} of {n} replicas ready; view {view}, primary {primary}"),
        ),
        (Some(_), _, _) => condition(
            &i,
            READY,
            false,
            "NoAgreedView",
            format!("no view is held by {} or more replicas", f + 1),
        ),
    };

    let moved = match (o.height, i.previous.height) {
        (Some(now), Some(before)) => now > before,
        (Some(now), None) => now > 0,
        _ => false,
    };
    let progressing = match i.statefulset {
        None => condition(
            &i,
            PROGRESSING,
            false,
            "NotDeployed",
            "no StatefulSet yet".into(),
        ),
        Some(sts) if rolling_out(sts, n) => condition(
            &i,
            PROGRESSING,
            true,
            "RollingOut",
            format!("StatefulSet rolling out: {ready} of {n} replicas ready"),
        ),
        Some(_) if moved => condition(
            &i,
            PROGRESSING,
            true,
            "Committing",
            format!("height reached {}", o.height.unwrap_or_default()),
        ),
        Some(_) => condition(
            &i,
            PROGRESSING,
            false,
            "Stable",
            "no rollout, no new blocks".into(),
        ),
    };

    let mut problems = i.problems.clone();
    if i.statefulset.is_some() && o.unreachable.len() > usize::try_from(f).unwrap_or(0) {
        let ids: Vec<String> = o.unreachable.iter().map(i32::to_string).collect();
        problems.push(Problem {
            reason: "ReplicasUnreachable",
            message: format!(
                "{} of {n} replicas did not answer /status (ids {}); more than f={f} means no quorum",
                o.unreachable.len(),
                ids.join(", ")
            ),
        });
    }
    let degraded = match problems.first() {
        Some(first) => {
            let all: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
            condition(&i, DEGRADED, true, first.reason, all.join("; "))
        }
        None => condition(
            &i,
            DEGRADED,
            false,
            "AsExpected",
            "no problems found".into(),
        ),
    };

    PbftClusterStatus {
        observed_generation: i.generation,
        replicas: i.statefulset.map(|_| n),
        ready_replicas: ready,
        view: o.view,
        primary: o.primary,
        height: o.height,
        conditions: vec![ready_cond, progressing, degraded],
    }
}

/// Conditions whose status or reason changed: these get a Kubernetes event. `Progressing`
/// is left out on purpose: it flips with every batch of blocks.
pub fn changed<'a>(before: &PbftClusterStatus, after: &'a PbftClusterStatus) -> Vec<&'a Condition> {
    after
        .conditions
        .iter()
        .filter(|c| c.type_ == READY || c.type_ == DEGRADED)
        .filter(|c| match before.condition(&c.type_) {
            Some(old) => old.status != c.status || old.reason != c.reason,
            // A first condition is news only when it says something is true.
            None => c.status == "True",
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::StatefulSetStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::jiff::Timestamp;

    fn st(view: u64, primary: u32, height: u64) -> Option<ReplicaStatus> {
        Some(ReplicaStatus {
            view,
            primary,
            height,
            ..ReplicaStatus::default()
        })
    }

    #[test]
    fn all_agree() {
        let o = fold(4, &[st(2, 2, 10), st(2, 2, 10), st(2, 2, 9), st(2, 2, 10)]);
        assert_eq!((o.view, o.primary, o.height), (Some(2), Some(2), Some(10)));
        assert!(o.unreachable.is_empty());
    }

    #[test]
    fn split_views_take_the_highest_with_f_plus_1() {
        // n=4, f=1: view 3 is held by two replicas (f+1), view 5 by one (a liar, or ahead).
        let o = fold(4, &[st(3, 3, 10), st(5, 1, 10), st(3, 3, 10), st(1, 1, 10)]);
        assert_eq!((o.view, o.primary), (Some(3), Some(3)));
        // Two views with f+1 each: the higher wins.
        let o = fold(4, &[st(3, 3, 1), st(4, 0, 1), st(3, 3, 1), st(4, 0, 1)]);
        assert_eq!((o.view, o.primary), (Some(4), Some(0)));
        // n=7, f=2: two replicas are not enough.
        let o = fold(
            7,
            &[
                st(9, 2, 1),
                st(9, 2, 1),
                st(1, 1, 1),
                st(2, 2, 1),
                st(3, 3, 1),
                None,
                None,
            ],
        );
        assert_eq!(o.view, None);
        assert_eq!(o.primary, None);
        let o = fold(
            7,
            &[
                st(9, 2, 1),
                st(9, 2, 1),
                st(9, 2, 1),
                st(2, 2, 1),
                None,
                None,
                None,
            ],
        );
        assert_eq!(o.view, Some(9));
    }

    #[test]
    fn replicas_changing_views_do_not_vote() {
        let mut r = st(7, 3, 1);
        if let Some(s) = r.as_mut() {
            s.view_change_in_progress = true;
        }
        let o = fold(4, &[r.clone(), r, st(6, 2, 1), st(5, 1, 1)]);
        assert_eq!(o.view, None);
    }

    #[test]
    fn height_is_reached_by_f_plus_1() {
        // One replica claims a height nobody else has: it does not count.
        let o = fold(
            4,
            &[st(0, 0, 1000), st(0, 0, 12), st(0, 0, 11), st(0, 0, 10)],
        );
        assert_eq!(o.height, Some(12));
        let o = fold(
            7,
            &[
                st(0, 0, 50),
                st(0, 0, 40),
                st(0, 0, 30),
                st(0, 0, 20),
                None,
                None,
                None,
            ],
        );
        assert_eq!(o.height, Some(30));
        // Fewer than f+1 answers: nothing is known.
        let o = fold(4, &[st(0, 0, 50), None, None, None]);
        assert_eq!(o.height, None);
        assert_eq!(o.unreachable, [1, 2, 3]);
    }

    #[test]
    fn short_reply_lists_count_as_unreachable() {
        let o = fold(4, &[st(0, 0, 1)]);
        assert_eq!(o.unreachable, [1, 2, 3]);
    }

    fn now() -> Time {
        Time(Timestamp::from_second(1_000_000).unwrap())
    }

    fn sts(ready: i32, updated: i32, n: i32) -> StatefulSet {
        StatefulSet {
            metadata: ObjectMeta {
                generation: Some(3),
                ..ObjectMeta::default()
            },
            status: Some(StatefulSetStatus {
                observed_generation: Some(3),
                replicas: n,
                ready_replicas: Some(ready),
                updated_replicas: Some(updated),
                current_revision: Some("r1".into()),
                update_revision: Some("r1".into()),
                ..StatefulSetStatus::default()
            }),
            ..StatefulSet::default()
        }
    }

    fn cond<'a>(s: &'a PbftClusterStatus, t: &str) -> (&'a str, &'a str) {
        let c = s.condition(t).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn healthy_cluster_is_ready_and_stable() {
        let set = sts(4, 4, 4);
        let observed = fold(4, &[st(1, 1, 5), st(1, 1, 5), st(1, 1, 5), st(1, 1, 5)]);
        let previous = PbftClusterStatus {
            height: Some(5),
            ..PbftClusterStatus::default()
        };
        let s = compute(Inputs {
            generation: Some(2),
            replicas: 4,
            statefulset: Some(&set),
            observed: &observed,
            previous: &previous,
            problems: vec![],
            now: now(),
        });
        assert_eq!(cond(&s, READY), ("True", "QuorumReady"));
        assert_eq!(cond(&s, PROGRESSING), ("False", "Stable"));
        assert_eq!(cond(&s, DEGRADED), ("False", "AsExpected"));
        assert_eq!(s.replicas, Some(4));
        assert_eq!(s.ready_replicas, 4);
        assert_eq!((s.view, s.primary, s.height), (Some(1), Some(1), Some(5)));
        assert_eq!(s.observed_generation, Some(2));
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(2))
        );
    }

    #[test]
    fn height_progress_and_rollouts_are_progressing() {
        let observed = fold(4, &[st(1, 1, 9), st(1, 1, 9), st(1, 1, 9), st(1, 1, 9)]);
        let previous = PbftClusterStatus {
            height: Some(5),
            ..PbftClusterStatus::default()
        };
        let set = sts(4, 4, 4);
        let mut i = Inputs {
            generation: Some(2),
            replicas: 4,
            statefulset: Some(&set),
            observed: &observed,
            previous: &previous,
            problems: vec![],
            now: now(),
        };
        assert_eq!(
            cond(&compute(i.clone()), PROGRESSING),
            ("True", "Committing")
        );
        let rolling = sts(3, 2, 4);
        i = Inputs {
            statefulset: Some(&rolling),
            ..i
        };
        let s = compute(i);
        assert_eq!(cond(&s, PROGRESSING), ("True", "RollingOut"));
        // 3 of 4 ready is still a quorum.
        assert_eq!(cond(&s, READY), ("True", "QuorumReady"));
    }

    #[test]
    fn not_enough_ready_or_no_view_is_not_ready() {
        let set = sts(2, 4, 4);
        let observed = fold(4, &[st(1, 1, 5), st(1, 1, 5), st(1, 1, 5), st(1, 1, 5)]);
        let previous = PbftClusterStatus::default();
        let s = compute(Inputs {
            generation: Some(1),
            replicas: 4,
            statefulset: Some(&set),
            observed: &observed,
            previous: &previous,
            problems: vec![],
            now: now(),
        });
        assert_eq!(cond(&s, READY), ("False", "QuorumNotReady"));

        let set = sts(4, 4, 4);
        let split = fold(4, &[st(1, 1, 5), st(2, 2, 5), st(3, 3, 5), st(4, 0, 5)]);
        let s = compute(Inputs {
            generation: Some(1),
            replicas: 4,
            statefulset: Some(&set),
            observed: &split,
            previous: &previous,
            problems: vec![],
            now: now(),
        });
        assert_eq!(cond(&s, READY), ("False", "NoAgreedView"));
    }

    #[test]
    fn unreachable_beyond_f_is_degraded() {
        let set = sts(4, 4, 4);
        let previous = PbftClusterStatus::default();
        let one_down = fold(4, &[st(1, 1, 5), None, st(1, 1, 5), st(1, 1, 5)]);
        let s = compute(Inputs {
            generation: Some(1),
            replicas: 4,
            statefulset: Some(&set),
            observed: &one_down,
            previous: &previous,
            problems: vec![],
            now: now(),
        });
        assert_eq!(cond(&s, DEGRADED), ("False", "AsExpected"));
        let two_down = fold(4, &[st(1, 1, 5), None, None, st(1, 1, 5)]);
        let s = compute(Inputs {
            generation: Some(1),
            replicas: 4,
            statefulset: Some(&set),
            observed: &two_down,
            previous: &previous,
            problems: vec![],
            now: now(),
        });
        assert_eq!(cond(&s, DEGRADED), ("True", "ReplicasUnreachable"));
        let msg = &s.condition(DEGRADED).unwrap().message;
        assert!(msg.contains("ids 1, 2"), "{msg}");
    }

    #[test]
    fn controller_problems_come_first_and_all_are_listed() {
        let set = sts(4, 4, 4);
        let previous = PbftClusterStatus::default();
        let all_down = fold(4, &[None, None, None, None]);
        let s = compute(Inputs {
            generation: Some(1),
            replicas: 4,
            statefulset: Some(&set),
            observed: &all_down,
            previous: &previous,
            problems: vec![Problem {
                reason: "ReconfigurationRefused",
                message: "no".into(),
            }],
            now: now(),
        });
        assert_eq!(cond(&s, DEGRADED), ("True", "ReconfigurationRefused"));
        assert!(
            s.condition(DEGRADED)
                .unwrap()
                .message
                .contains("did not answer")
        );
    }

    #[test]
    fn transition_time_moves_only_on_change() {
        let set = sts(4, 4, 4);
        let observed = fold(4, &[st(1, 1, 5), st(1, 1, 5), st(1, 1, 5), st(1, 1, 5)]);
        let t0 = Time(Timestamp::from_second(10).unwrap());
        let previous = PbftClusterStatus {
            height: Some(5),
            conditions: vec![
                Condition {
                    type_: READY.into(),
                    status: "True".into(),
                    reason: "QuorumReady".into(),
                    message: String::new(),
                    last_transition_time: t0.clone(),
                    observed_generation: Some(1),
                },
                Condition {
                    type_: DEGRADED.into(),
                    status: "True".into(),
                    reason: "InvalidSpec".into(),
                    message: String::new(),
                    last_transition_time: t0.clone(),
                    observed_generation: Some(1),
                },
            ],
            ..PbftClusterStatus::default()
        };
        let s = compute(Inputs {
            generation: Some(1),
            replicas: 4,
            statefulset: Some(&set),
            observed: &observed,
            previous: &previous,
            problems: vec![],
            now: now(),
        });
        assert_eq!(s.condition(READY).unwrap().last_transition_time, t0);
        assert_eq!(s.condition(DEGRADED).unwrap().last_transition_time, now());
        assert_eq!(
            s.condition(PROGRESSING).unwrap().last_transition_time,
            now()
        );
        // Events: Degraded changed; Ready did not; Progressing never makes one.
        let types: Vec<&str> = changed(&previous, &s)
            .iter()
            .map(|c| c.type_.as_str())
            .collect();
        assert_eq!(types, [DEGRADED]);
    }

    #[test]
    fn nothing_deployed() {
        let observed = Observed::default();
        let previous = PbftClusterStatus::default();
        let s = compute(Inputs {
            generation: Some(1),
            replicas: 4,
            statefulset: None,
            observed: &observed,
            previous: &previous,
            problems: vec![Problem {
                reason: "InvalidSpec",
                message: "replicas is 5".into(),
            }],
            now: now(),
        });
        assert_eq!(s.replicas, None);
        assert_eq!(cond(&s, READY), ("False", "NotDeployed"));
        assert_eq!(cond(&s, DEGRADED), ("True", "InvalidSpec"));
        let types: Vec<&str> = changed(&previous, &s)
            .iter()
            .map(|c| c.type_.as_str())
            .collect();
        assert_eq!(types, [DEGRADED], "a first False condition is no news");
    }

    #[tokio::test]
    async fn http_fetcher_reads_a_status_document() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            // 1: a real answer (with fields the controller ignores), 2: a 503, 3: silence.
            for answer in [
                Some((
                    "200 OK",
                    r#"{"id":2,"n":4,"f":1,"view":7,"primary":3,"view_change_in_progress":false,"height":42,"head_hash":"ab","state_digest":"cd","state_digest_height":40,"stable_checkpoint":32,"sync_target":null,"pending_requests":0,"transport":"grpc","peers":[]}"#,
                )),
                Some(("503 Service Unavailable", "starting")),
                None,
            ] {
                let (mut sock, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let n = sock.read(&mut buf).await.unwrap();
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                assert!(head.starts_with("GET /status HTTP/1.1\r\n"), "{head}");
                match answer {
                    Some((code, body)) => {
                        let reply = format!(
                            "HTTP/1.1 {code}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        sock.write_all(reply.as_bytes()).await.unwrap();
                    }
                    None => {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
        });
        let fetcher = HttpFetcher {
            timeout: Duration::from_millis(300),
            ..HttpFetcher::default()
        };
        let url = format!("http://{addr}/status");
        let s = fetcher.fetch(&url).await.unwrap();
        assert_eq!((s.id, s.view, s.primary, s.height), (2, 7, 3, 42));
        let err = fetcher.fetch(&url).await.unwrap_err().to_string();
        assert!(err.contains("503"), "{err}");
        let err = fetcher.fetch(&url).await.unwrap_err().to_string();
        assert!(err.contains("no answer within"), "{err}");
        server.abort();
        // Nobody listening at all.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = format!("http://{}/status", closed.local_addr().unwrap());
        drop(closed);
        assert!(fetcher.fetch(&dead).await.is_err());
    }

    #[test]
    fn urls_use_the_headless_names() {
        assert_eq!(
            replica_url("c1", 3, "ns", "cluster.local"),
            "http://c1-3.c1-headless.ns.svc.cluster.local:8000/status"
        );
    }
}
