//! The client rule beyond `src/client.rs`'s unit tests: requests replicas accept, timestamps,
//! the view hint learned from replies, f+1 matching replies at larger n, which replies never
//! count, the retransmission schedule, and a whole round trip through a cluster.

mod common;

use common::*;
use pbft_core::client::ClientSend;
use pbft_core::{
    ClientCore, ClientId, Completed, Input, OpResult, Output, PersistOp, ReplicaId, Reply, Target,
};

fn client(n: usize, retransmit_after: u64, first_timestamp: u64) -> ClientCore {
    ClientCore::new(
        ClientId(1),
        Box::new(client_key(1)),
        n,
        retransmit_after,
        first_timestamp,
    )
}

fn reply(from: u32, view: u64, ts: u64, result: OpResult) -> Reply {
    Reply {
        view,
        timestamp: ts,
        client: ClientId(1),
        replica: ReplicaId(from),
        result,
    }
}

#[test]
fn a_submitted_request_is_signed_so_the_primary_proposes_it() {
    let mut c = client(4, 10, 100);
    let ClientSend { to, request } = c.submit(put("k", "v")).expect("idle client");
    assert_eq!(to, Target::Replica(r(0)));
    assert_eq!((request.client, request.timestamp), (ClientId(1), 100));
    assert!(request.verify(keyring().as_ref()));
    let mut p = replica(0);
    let out = submit(&mut p, request.clone());
    assert_eq!(
        out.persist,
        vec![PersistOp::Accepted(pre_prepare(0, 1, batch(&[request])))]
    );
}

#[test]
fn timestamps_start_at_one_at_least_and_increase() {
    let mut c = client(4, 10, 0);
    let first = c.submit(get("k")).expect("idle").request.timestamp;
    c.abandon();
    let second = c.submit(get("k")).expect("idle").request.timestamp;
    assert_eq!((first, second), (1, 2));
}

#[test]
fn the_client_follows_the_view_its_matching_replies_report() {
    let mut c = client(4, 10, 1);
    let ts = c.submit(get("k")).expect("idle").request.timestamp;
    let v = OpResult::Value(None);
    assert_eq!(c.on_reply(r(2), reply(2, 1, ts, v.clone())), None);
    let done = c.on_reply(r(3), reply(3, 1, ts, v.clone())).expect("f+1");
    assert_eq!(
        done,
        Completed {
            timestamp: ts,
            result: v.clone(),
            voters: vec![r(2), r(3)],
        }
    );
    // View 1's primary is replica 1.
    let next = c.submit(get("k")).expect("idle");
    assert_eq!(next.to, Target::Replica(r(1)));
    // Replies from an older view never move the hint back.
    let ts = next.request.timestamp;
    c.on_reply(r(0), reply(0, 0, ts, v.clone()));
    c.on_reply(r(2), reply(2, 0, ts, v));
    assert_eq!(c.submit(get("k")).expect("idle").to, Target::Replica(r(1)));
}

#[test]
fn with_seven_replicas_three_matching_replies_are_needed() {
    let mut c = client(7, 10, 1);
    let ts = c.submit(get("k")).expect("idle").request.timestamp;
    let good = OpResult::Value(Some(b"v".to_vec()));
    let bad = OpResult::Value(None);
    // f = 2 faulty replicas agree on a wrong result: not enough.
    assert_eq!(c.on_reply(r(5), reply(5, 0, ts, bad.clone())), None);
    assert_eq!(c.on_reply(r(6), reply(6, 0, ts, bad)), None);
    assert_eq!(c.on_reply(r(0), reply(0, 0, ts, good.clone())), None);
    assert_eq!(c.on_reply(r(1), reply(1, 0, ts, good.clone())), None);
    let done = c
        .on_reply(r(2), reply(2, 0, ts, good.clone()))
        .expect("f+1");
    assert_eq!(done.result, good);
    assert_eq!(done.voters, vec![r(0), r(1), r(2)]);
}

#[test]
fn replies_that_never_count() {
    let mut c = client(4, 10, 1);
    let v = OpResult::Written;
    // Nothing outstanding.
    assert_eq!(c.on_reply(r(0), reply(0, 0, 1, v.clone())), None);
    let ts = c.submit(put("k", "v")).expect("idle").request.timestamp;
    // For another client.
    let mut other = reply(0, 0, ts, v.clone());
    other.client = ClientId(2);
    assert_eq!(c.on_reply(r(0), other), None);
    // From a replica outside the cluster.
    assert_eq!(c.on_reply(r(4), reply(4, 0, ts, v.clone())), None);
    assert_eq!(c.on_reply(r(1), reply(1, 0, ts, v.clone())), None);
    // None of those counted: one valid reply so far, a second completes.
    assert!(c.pending().is_some());
    assert!(c.on_reply(r(2), reply(2, 0, ts, v)).is_some());
}

#[test]
fn a_replica_that_changes_its_reply_still_has_one_vote() {
    let mut c = client(4, 10, 1);
    let ts = c.submit(get("k")).expect("idle").request.timestamp;
    let (a, b) = (OpResult::Value(None), OpResult::Value(Some(b"x".to_vec())));
    assert_eq!(c.on_reply(r(0), reply(0, 0, ts, a.clone())), None);
    assert_eq!(c.on_reply(r(0), reply(0, 0, ts, b.clone())), None);
    // Replica 0's vote is now `b`: `a` from replica 1 is alone.
    assert_eq!(c.on_reply(r(1), reply(1, 0, ts, a)), None);
    let done = c.on_reply(r(2), reply(2, 0, ts, b.clone())).expect("f+1");
    assert_eq!((done.result, done.voters), (b, vec![r(0), r(2)]));
}

#[test]
fn the_outstanding_request_is_retransmitted_to_all_every_interval() {
    let mut c = client(4, 3, 1);
    assert_eq!(c.tick(), None); // nothing outstanding
    let sent = c.submit(get("k")).expect("idle").request;
    let again = Some(ClientSend {
        to: Target::All,
        request: sent,
    });
    let schedule: Vec<_> = (0..7).map(|_| c.tick()).collect();
    assert_eq!(
        schedule,
        vec![None, None, again.clone(), None, None, again.clone(), None]
    );
    // A zero interval is taken as one tick.
    let mut eager = client(4, 0, 1);
    eager.submit(get("k")).expect("idle");
    assert!(eager.tick().is_some());
    assert!(eager.tick().is_some());
}

#[test]
fn a_round_trip_through_a_cluster_completes_with_the_first_f_plus_1_replies() {
    let mut cluster = Cluster::new();
    let mut c = client(4, 10, 1);
    let ClientSend { to, request } = c.submit(put("k", "v")).expect("idle");
    let Target::Replica(p) = to else {
        panic!("first send goes to the primary")
    };
    cluster.submit(p.0, request.clone());
    let mut done = None;
    for rep in cluster.replies.clone() {
        if let Some(d) = c.on_reply(rep.replica, rep) {
            done = Some(d);
        }
    }
    let done = done.expect("completed");
    assert_eq!(done.result, OpResult::Written);
    assert_eq!(done.voters.len(), 2);
    assert!(c.pending().is_none());
    // A late retransmission of the completed request is answered from the reply cache.
    let r3 = cluster.replica_mut(3);
    r3.handle(Input::Request(request));
    assert_eq!(
        r3.take_output(),
        Output {
            replies: vec![reply(3, 0, done.timestamp, OpResult::Written)],
            ..Output::default()
        }
    );
}
