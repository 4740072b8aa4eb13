//! The normal case, one handler at a time: the primary's proposals and batching, a backup's
//! forwarding, pre-prepare -> prepare -> commit -> execute with the exact persist ops,
//! messages, replies and events at each step, in-order execution, the reply cache, and a
//! four-replica cluster agreeing on the same block.

mod common;

use common::*;
use pbft_core::kv::{Executed, results_digest};
use pbft_core::{
    Block, ClientId, Digest, Event, Message, OpResult, Output, PersistOp, PreparedProof, Replica,
    Reply, Request,
};

fn written(replica: u32, req: &Request) -> Reply {
    Reply {
        view: 0,
        timestamp: req.timestamp,
        client: req.client,
        replica: r(replica),
        result: OpResult::Written,
    }
}

fn executed(height: u64, requests: usize) -> Event {
    Event::Executed {
        height,
        view: 0,
        requests,
        synced: false,
    }
}

/// The block a replica records for a batch of fresh puts executed at `height`.
fn put_block(height: u64, prev_hash: Digest, reqs: &[Request], certifiers: [u32; 3]) -> Block {
    let b = batch(reqs);
    let results: Vec<_> = reqs
        .iter()
        .map(|q| Executed::Done(q.client, q.timestamp, OpResult::Written))
        .collect();
    Block {
        height,
        prev_hash,
        results_digest: results_digest(&results),
        state_digest: Digest::ZERO,
        view: 0,
        certificate: certifiers
            .iter()
            .map(|i| commit(0, height, b.digest(), *i))
            .collect(),
        batch: b,
    }
}

/// Backup 1 with `reqs` pre-prepared at seq 1 and a prepare from backup 2: it is prepared.
fn prepared_backup(reqs: &[Request]) -> (Replica, Digest) {
    let mut rep = replica(1);
    let pp = pre_prepare(0, 1, batch(reqs));
    let d = pp.body.digest;
    deliver(&mut rep, 0, Message::PrePrepare(pp));
    deliver(&mut rep, 2, Message::Prepare(prepare(0, 1, d, 2)));
    (rep, d)
}

#[test]
fn idle_primary_proposes_a_request_at_once() {
    let mut p = replica(0);
    let req = put_req(1, 1);
    let out = submit(&mut p, req.clone());
    let pp = pre_prepare(0, 1, batch(&[req]));
    assert_eq!(
        out,
        Output {
            persist: vec![PersistOp::Accepted(pp.clone())],
            messages: vec![to_all(Message::PrePrepare(pp))],
            ..Output::default()
        }
    );
    // Proposed is not executed: the primary times it like a backup would.
    assert_eq!(p.status().pending_requests, 1);
}

#[test]
fn busy_primary_holds_a_partial_batch_for_batch_delay() {
    let mut p = replica(0);
    submit(&mut p, put_req(1, 1));
    // Seq 1 is in flight: the next request waits for company.
    let second = put_req(2, 1);
    assert_eq!(submit(&mut p, second.clone()), Output::default());
    // One proposed, one queued.
    assert_eq!(p.status().pending_requests, 2);
    // batch_delay = 1 tick later it goes out alone.
    let pp = pre_prepare(0, 2, batch(std::slice::from_ref(&second)));
    assert_eq!(
        tick(&mut p, 1),
        Output {
            persist: vec![PersistOp::Accepted(pp.clone())],
            messages: vec![to_all(Message::PrePrepare(pp))],
            ..Output::default()
        }
    );
    assert_eq!(
        p.status().pending_requests,
        2,
        "both proposed, neither executed"
    );
}

#[test]
fn busy_primary_proposes_a_full_batch_without_waiting() {
    let mut p = replica(0);
    submit(&mut p, put_req(1, 1));
    let reqs: Vec<_> = (2..=5).map(|c| put_req(c, 1)).collect();
    for q in &reqs[..3] {
        assert_eq!(submit(&mut p, q.clone()), Output::default());
    }
    // The fourth fills max_batch = 4.
    let pp = pre_prepare(0, 2, batch(&reqs));
    assert_eq!(
        submit(&mut p, reqs[3].clone()),
        Output {
            persist: vec![PersistOp::Accepted(pp.clone())],
            messages: vec![to_all(Message::PrePrepare(pp))],
            ..Output::default()
        }
    );
}

/// Primary 0 with `reqs` proposed at seq `seq` committed and executed: prepares and
/// commits from backups 1 and 2. Returns the output of the last commit.
fn commit_at_primary(p: &mut Replica, seq: u64, reqs: &[Request]) -> Output {
    let d = batch(reqs).digest();
    for b in [1, 2] {
        deliver(p, b, Message::Prepare(prepare(0, seq, d, b)));
    }
    deliver(p, 1, Message::Commit(commit(0, seq, d, 1)));
    deliver(p, 2, Message::Commit(commit(0, seq, d, 2)))
}

/// The requests of the pre-prepare in `out`, if it proposes one.
fn proposed(out: &Output) -> Option<Vec<Request>> {
    out.messages.iter().find_map(|e| match &e.msg {
        Message::PrePrepare(pp) => Some(pp.body.batch.requests().to_vec()),
        _ => None,
    })
}

#[test]
fn a_drained_primary_waits_for_as_many_requests_as_its_last_batch() {
    let mut p = replica(0);
    let first = put_req(1, 1);
    assert!(proposed(&submit(&mut p, first.clone())).is_some());
    let three: Vec<_> = (2..=4).map(|c| put_req(c, 1)).collect();
    for q in &three {
        submit(&mut p, q.clone());
    }
    assert_eq!(proposed(&tick(&mut p, 1)), Some(three.clone()));
    commit_at_primary(&mut p, 1, std::slice::from_ref(&first));
    let out = commit_at_primary(&mut p, 2, &three);
    assert_eq!(
        out.replies.len(),
        3,
        "both batches executed: nothing in flight"
    );
    // The last batch held three: the first request back waits for two more, and they
    // go together without waiting out `batch_delay`.
    let next: Vec<_> = (1..=3).map(|c| put_req(c, 2)).collect();
    assert_eq!(proposed(&submit(&mut p, next[0].clone())), None);
    assert_eq!(proposed(&submit(&mut p, next[1].clone())), None);
    assert_eq!(
        proposed(&submit(&mut p, next[2].clone())),
        Some(next.clone())
    );
    // A lone request on a drained primary waits no longer than `batch_delay` for company.
    commit_at_primary(&mut p, 3, &next);
    let lone = put_req(4, 2);
    assert_eq!(proposed(&submit(&mut p, lone.clone())), None);
    assert_eq!(proposed(&tick(&mut p, 1)), Some(vec![lone.clone()]));
    // A lone client's next request then goes at once.
    commit_at_primary(&mut p, 4, std::slice::from_ref(&lone));
    let again = put_req(4, 3);
    assert_eq!(proposed(&submit(&mut p, again.clone())), Some(vec![again]));
}

#[test]
fn more_than_a_batch_waiting_is_split_evenly() {
    let mut p = replica_with(
        pbft_core::Config {
            max_batch: 3,
            ..config()
        },
        0,
    );
    // Seqs 1-4 in flight, one request each: max_in_flight = 4.
    let singles: Vec<_> = (1..=4).map(|c| put_req(c, 1)).collect();
    for q in &singles {
        submit(&mut p, q.clone());
        tick(&mut p, 1);
    }
    // Four wait, more than max_batch = 3.
    let waiting: Vec<_> = (5..=8).map(|c| put_req(c, 1)).collect();
    for q in &waiting {
        assert_eq!(proposed(&submit(&mut p, q.clone())), None);
    }
    assert_eq!(p.status().pending_requests, 8);
    // Seq 1 executes: one slot frees, and it carries two of the four, not three and then
    // one alone.
    let out = commit_at_primary(&mut p, 1, &singles[..1]);
    assert_eq!(proposed(&out), Some(waiting[..2].to_vec()));
}

#[test]
fn primary_stops_proposing_at_max_in_flight() {
    let mut p = replica(0);
    for c in 1..=4 {
        submit(&mut p, put_req(c, 1));
        tick(&mut p, 1);
    }
    // Seqs 1..=4 are in flight (max_in_flight = 4): the fifth waits however long it waits.
    assert_eq!(submit(&mut p, put_req(5, 1)), Output::default());
    assert_eq!(tick(&mut p, 5), Output::default());
    assert_eq!(p.status().pending_requests, 5, "four proposed, one queued");
}

#[test]
fn backup_forwards_a_client_request_to_the_primary_once() {
    let mut b = replica(1);
    let req = put_req(1, 1);
    // Clients send to every replica, so the primary normally has it: no forward at once.
    assert_eq!(submit(&mut b, req.clone()), Output::default());
    // A retransmission of the same request is already being waited for.
    assert_eq!(submit(&mut b, req.clone()), Output::default());
    assert_eq!(b.status().pending_requests, 1);
    // After half a view-change timeout (20 ticks here) without execution it is forwarded,
    // once, before the timer would suspect the primary.
    assert_eq!(tick(&mut b, 9), Output::default());
    assert_eq!(
        tick(&mut b, 1),
        Output {
            messages: vec![to(0, Message::Request(req.clone()))],
            ..Output::default()
        }
    );
    assert_eq!(tick(&mut b, 5), Output::default());
    // A request another replica forwarded is not forwarded again.
    let mut b2 = replica(2);
    assert_eq!(
        deliver(&mut b2, 1, Message::Request(req)),
        Output::default()
    );
    assert_eq!(b2.status().pending_requests, 1);
}

/// Replica `id` accepts the pre-prepare of sequence 1 in view 0 and broadcasts its prepare,
/// vouching or not; returns how many requests it now times.
fn accepts_and_prepares(id: u32, vouches: bool) -> usize {
    let mut b = replica(id);
    let pp = pre_prepare(0, 1, batch(&[put_req(1, 1)]));
    let d = pp.body.digest;
    let prepare = if vouches {
        prepare(0, 1, d, id)
    } else {
        unvouched_prepare(0, 1, d, id)
    };
    let out = deliver(&mut b, 0, Message::PrePrepare(pp.clone()));
    assert_eq!(
        out,
        Output {
            persist: vec![PersistOp::Accepted(pp)],
            messages: vec![to_all(Message::Prepare(prepare))],
            ..Output::default()
        }
    );
    b.status().pending_requests
}

#[test]
fn a_designated_backup_checks_the_batch_and_its_prepare_vouches() {
    // In view 0 the batch at sequence 1 is replica 2's to vouch for (n = 4, f = 1). The
    // request in the batch now runs its view-change timer.
    assert_eq!(accepts_and_prepares(2, true), 1);
}

#[test]
fn another_backup_prepares_without_checking_and_without_timing_the_requests() {
    // Unchecked requests run no timer: a forged one would wait here for ever.
    assert_eq!(accepts_and_prepares(1, false), 0);
}

#[test]
fn backup_is_prepared_with_its_own_and_one_more_prepare_and_commits() {
    let mut b = replica(1);
    let pp = pre_prepare(0, 1, batch(&[put_req(1, 1)]));
    let d = pp.body.digest;
    deliver(&mut b, 0, Message::PrePrepare(pp.clone()));
    // Replica 2's prepare vouches (it is the designated voucher): with the primary's that
    // makes f + 1 vouchers.
    let out = deliver(&mut b, 2, Message::Prepare(prepare(0, 1, d, 2)));
    let proof = PreparedProof {
        pre_prepare: pp,
        prepares: vec![prepare(0, 1, d, 2), unvouched_prepare(0, 1, d, 1)],
    };
    assert_eq!(
        out,
        Output {
            persist: vec![PersistOp::Prepared(proof)],
            messages: vec![to_all(Message::Commit(commit(0, 1, d, 1)))],
            ..Output::default()
        }
    );
    // Prepared, the batch is known valid: its request is timed now.
    assert_eq!(b.status().pending_requests, 1);
    // A third prepare changes nothing: the slot is prepared once.
    assert_eq!(
        deliver(&mut b, 3, Message::Prepare(prepare(0, 1, d, 3))),
        Output::default()
    );
}

#[test]
fn a_prepare_with_another_digest_does_not_count() {
    let mut b = replica(1);
    let pp = pre_prepare(0, 1, batch(&[put_req(1, 1)]));
    deliver(&mut b, 0, Message::PrePrepare(pp));
    let other = batch(&[put_req(2, 1)]).digest();
    assert_eq!(
        deliver(&mut b, 2, Message::Prepare(prepare(0, 1, other, 2))),
        Output::default()
    );
    assert_eq!(b.rejected().total(), 0);
}

#[test]
fn prepares_that_arrive_before_the_pre_prepare_count_once_it_does() {
    let mut b = replica(1);
    let pp = pre_prepare(0, 1, batch(&[put_req(1, 1)]));
    let d = pp.body.digest;
    assert_eq!(
        deliver(&mut b, 2, Message::Prepare(prepare(0, 1, d, 2))),
        Output::default()
    );
    let out = deliver(&mut b, 0, Message::PrePrepare(pp.clone()));
    let proof = PreparedProof {
        pre_prepare: pp.clone(),
        prepares: vec![prepare(0, 1, d, 2), unvouched_prepare(0, 1, d, 1)],
    };
    assert_eq!(
        out,
        Output {
            persist: vec![PersistOp::Accepted(pp), PersistOp::Prepared(proof)],
            messages: vec![
                to_all(Message::Prepare(unvouched_prepare(0, 1, d, 1))),
                to_all(Message::Commit(commit(0, 1, d, 1))),
            ],
            ..Output::default()
        }
    );
}

#[test]
fn backup_executes_after_a_quorum_of_commits_and_replies() {
    let req = put_req(1, 1);
    let (mut b, d) = prepared_backup(std::slice::from_ref(&req));
    // Own commit plus replica 2's: two of three.
    assert_eq!(
        deliver(&mut b, 2, Message::Commit(commit(0, 1, d, 2))),
        Output::default()
    );
    let out = deliver(&mut b, 3, Message::Commit(commit(0, 1, d, 3)));
    let block = put_block(1, Digest::ZERO, std::slice::from_ref(&req), [1, 2, 3]);
    assert_eq!(
        out,
        Output {
            persist: vec![PersistOp::Block(block.clone())],
            replies: vec![written(1, &req)],
            events: vec![executed(1, 1)],
            ..Output::default()
        }
    );
    let s = b.status();
    assert_eq!((s.last_executed, s.head_hash), (1, block.hash()));
    assert_eq!(s.pending_requests, 0);
    assert_eq!(b.state().get(b"k1-1"), Some(&b"v1"[..]));
}

#[test]
fn the_primary_commit_counts_towards_the_quorum() {
    let req = put_req(1, 1);
    let (mut b, d) = prepared_backup(std::slice::from_ref(&req));
    deliver(&mut b, 0, Message::Commit(commit(0, 1, d, 0)));
    let out = deliver(&mut b, 3, Message::Commit(commit(0, 1, d, 3)));
    assert_eq!(
        out.persist,
        vec![PersistOp::Block(put_block(
            1,
            Digest::ZERO,
            std::slice::from_ref(&req),
            [0, 1, 3]
        ))]
    );
}

#[test]
fn commits_without_a_prepared_certificate_do_not_execute() {
    let mut b = replica(1);
    let pp = pre_prepare(0, 1, batch(&[put_req(1, 1)]));
    let d = pp.body.digest;
    deliver(&mut b, 0, Message::PrePrepare(pp));
    for i in [0, 2, 3] {
        assert_eq!(
            deliver(&mut b, i, Message::Commit(commit(0, 1, d, i))),
            Output::default()
        );
    }
    assert_eq!(b.status().last_executed, 0);
    // Once prepared, its own commit is the fourth and it executes at once.
    let out = deliver(&mut b, 2, Message::Prepare(prepare(0, 1, d, 2)));
    assert_eq!(out.events, vec![executed(1, 1)]);
    assert_eq!(
        out.messages,
        vec![to_all(Message::Commit(commit(0, 1, d, 1)))]
    );
}

#[test]
fn execution_follows_sequence_order_not_commit_order() {
    let mut b = replica(1);
    let (q1, q2) = (put_req(1, 1), put_req(2, 1));
    let pp1 = pre_prepare(0, 1, batch(std::slice::from_ref(&q1)));
    let pp2 = pre_prepare(0, 2, batch(std::slice::from_ref(&q2)));
    let (d1, d2) = (pp1.body.digest, pp2.body.digest);
    deliver(&mut b, 0, Message::PrePrepare(pp1));
    deliver(&mut b, 0, Message::PrePrepare(pp2));
    // Seq 2 commits first: nothing executes.
    deliver(&mut b, 2, Message::Prepare(prepare(0, 2, d2, 2)));
    deliver(&mut b, 2, Message::Commit(commit(0, 2, d2, 2)));
    assert_eq!(
        deliver(&mut b, 3, Message::Commit(commit(0, 2, d2, 3))),
        Output::default()
    );
    assert_eq!(b.status().last_executed, 0);
    // Seq 1 commits: both execute, 1 then 2.
    deliver(&mut b, 2, Message::Prepare(prepare(0, 1, d1, 2)));
    deliver(&mut b, 2, Message::Commit(commit(0, 1, d1, 2)));
    let out = deliver(&mut b, 3, Message::Commit(commit(0, 1, d1, 3)));
    let b1 = put_block(1, Digest::ZERO, std::slice::from_ref(&q1), [1, 2, 3]);
    let b2 = put_block(2, b1.hash(), std::slice::from_ref(&q2), [1, 2, 3]);
    assert_eq!(
        out,
        Output {
            persist: vec![PersistOp::Block(b1), PersistOp::Block(b2.clone())],
            replies: vec![written(1, &q1), written(1, &q2)],
            events: vec![executed(1, 1), executed(2, 1)],
            ..Output::default()
        }
    );
    assert_eq!(b.status().head_hash, b2.hash());
}

#[test]
fn a_batch_repeating_an_executed_request_skips_it_without_a_reply() {
    let mut c = Cluster::new();
    let q = put_req(1, 1);
    c.submit(0, q.clone());
    // A faulty primary proposes the same request again; backups execute it as a no-op.
    let mut b = c.replicas.remove(1);
    let pp = pre_prepare(0, 2, batch(std::slice::from_ref(&q)));
    let d = pp.body.digest;
    deliver(&mut b, 0, Message::PrePrepare(pp));
    deliver(&mut b, 2, Message::Prepare(prepare(0, 2, d, 2)));
    deliver(&mut b, 2, Message::Commit(commit(0, 2, d, 2)));
    let out = deliver(&mut b, 3, Message::Commit(commit(0, 2, d, 3)));
    let head = b.status().head_hash;
    let expected = Block {
        height: 2,
        prev_hash: c.store(1).block(1).expect("block 1").hash(),
        batch: batch(std::slice::from_ref(&q)),
        results_digest: results_digest(&[Executed::Duplicate(ClientId(1), 1)]),
        state_digest: Digest::ZERO,
        view: 0,
        certificate: [1, 2, 3].map(|i| commit(0, 2, d, i)).to_vec(),
    };
    assert_eq!(
        out,
        Output {
            persist: vec![PersistOp::Block(expected.clone())],
            events: vec![executed(2, 1)],
            ..Output::default()
        }
    );
    assert_eq!(head, expected.hash());
}

#[test]
fn a_retry_of_the_last_executed_request_is_answered_from_the_cache() {
    let mut c = Cluster::new();
    let q = request(1, 7, get("absent"));
    c.submit(0, q.clone());
    let b = c.replica_mut(2);
    let out = submit(b, q);
    assert_eq!(
        out,
        Output {
            replies: vec![Reply {
                view: 0,
                timestamp: 7,
                client: ClientId(1),
                replica: r(2),
                result: OpResult::Value(None),
            }],
            ..Output::default()
        }
    );
    assert_eq!(b.status().last_executed, 1);
}

#[test]
fn a_cluster_of_four_executes_a_request_everywhere_with_matching_replies() {
    let mut c = Cluster::new();
    let q = put_req(1, 1);
    c.submit(0, q.clone());
    let replies: Vec<_> = (0..4).map(|i| written(i, &q)).collect();
    let mut got = c.replies.clone();
    got.sort_by_key(|rep| rep.replica);
    assert_eq!(got, replies);
    let head = c.replica(0).status().head_hash;
    for i in 0..4 {
        let s = c.replica(i).status();
        assert_eq!((s.last_executed, s.head_hash), (1, head), "replica {i}");
        assert_eq!(c.store(i).height(), 1);
        assert_eq!(c.replica(i).rejected().total(), 0, "replica {i}");
    }
    // Every replica recorded the same block; certificates may differ, hashes do not.
    let b0 = c.store(0).block(1).expect("block").clone();
    assert_eq!(b0.hash(), head);
    assert_eq!(b0.certificate.len(), 3);
}

/// Same root cause as `t40_view_change::the_new_primary_does_not_propose_again_what_its_new_view_carries`:
/// the primary forgets a request once proposed, so a copy forwarded by a backup (a client
/// retransmitting to every replica) is queued and proposed a second time while the first
/// proposal is still in flight.
#[test]
fn primary_does_not_propose_an_in_flight_request_again() {
    let mut p = replica(0);
    let q = put_req(1, 1);
    submit(&mut p, q.clone());
    assert_eq!(deliver(&mut p, 1, Message::Request(q)), Output::default());
    assert_eq!(tick(&mut p, 1), Output::default());
}
