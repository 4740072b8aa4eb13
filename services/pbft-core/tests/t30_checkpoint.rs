//! Checkpoints: the vote a replica signs at every K-th block, stability at 2f+1 matching
//! votes (what is persisted, the log pruned, the window moved, the primary unblocked),
//! votes that must not count, and a replica noticing from checkpoint votes that it is behind
//! and starting a sync.

mod common;

use common::*;
use pbft_core::{
    CheckpointCert, Digest, Event, Message, Output, PersistOp, Replica, ReplicaId,
    StableCheckpoint, Storage, SyncRequest, checkpoint_digest,
};

/// A cluster that executed requests 1..=`count` (one block each), with checkpoint votes to
/// replica `starved` held back. Returns the cluster and the votes meant for `starved`, by
/// sender.
fn cluster_without_checkpoints_to(starved: u32, count: u64) -> (Cluster, Vec<(u32, Message)>) {
    let mut c = Cluster::new();
    c.set_drop(move |_, to, m| to == r(starved) && matches!(m, Message::Checkpoint(_)));
    for client in 1..=count {
        c.execute(client, 1);
    }
    let mut held: Vec<(u32, Message)> = c
        .take_dropped_to(starved)
        .into_iter()
        .map(|(a, m)| (a.0, m))
        .collect();
    held.sort_by_key(|(a, m)| (checkpoint_seq(m), *a));
    (c, held)
}

fn checkpoint_seq(m: &Message) -> u64 {
    match m {
        Message::Checkpoint(cp) => cp.body.seq,
        other => panic!("expected a checkpoint, got {}", other.kind()),
    }
}

/// The vote `by` sent for `seq`, from the held-back messages.
fn vote(held: &[(u32, Message)], seq: u64, by: u32) -> Message {
    held.iter()
        .find(|(a, m)| *a == by && checkpoint_seq(m) == seq)
        .map(|(_, m)| m.clone())
        .expect("held vote")
}

/// The checkpoint digest `rep` signs for its current state and head.
fn own_digest(rep: &Replica) -> Digest {
    checkpoint_digest(
        &rep.state().digest(rep.config().state_digest),
        &rep.status().head_hash,
    )
}

#[test]
fn executing_a_checkpoint_height_records_the_state_and_broadcasts_a_vote() {
    let mut c = Cluster::new();
    // Replica 1 misses the commits for seq 4, and the checkpoint votes that would otherwise
    // make it fetch block 4 by sync.
    c.set_drop(|_, to, m| {
        to == r(1)
            && match m {
                Message::Commit(x) => x.body.seq == 4,
                Message::Checkpoint(_) => true,
                _ => false,
            }
    });
    for client in 1..=4 {
        c.execute(client, 1);
    }
    let commits: Vec<_> = c
        .take_dropped_to(1)
        .into_iter()
        .filter(|(a, _)| *a == r(0) || *a == r(2))
        .map(|(a, m)| (a.0, m))
        .collect();
    let b = c.replica_mut(1);
    assert_eq!(b.status().last_executed, 3);
    assert_eq!(
        deliver(b, commits[0].0, commits[0].1.clone()),
        Output::default()
    );
    let out = deliver(b, commits[1].0, commits[1].1.clone());

    let reference = c.store(0).block(4).expect("block 4").clone();
    let d = reference.batch.digest();
    let block = pbft_core::Block {
        certificate: [0, 1, 2].map(|i| commit(0, 4, d, i)).to_vec(),
        ..reference
    };
    let b = c.replica(1);
    assert_ne!(block.state_digest, Digest::ZERO);
    assert_eq!(
        block.state_digest,
        b.state().digest(b.config().state_digest)
    );
    let q = put_req(4, 1);
    assert_eq!(
        out,
        Output {
            persist: vec![PersistOp::Block(block.clone())],
            messages: vec![to_all(Message::Checkpoint(checkpoint(
                4,
                checkpoint_digest(&block.state_digest, &block.hash()),
                1
            )))],
            replies: vec![pbft_core::Reply {
                view: 0,
                timestamp: 1,
                client: q.client,
                replica: r(1),
                result: pbft_core::OpResult::Written,
            }],
            events: vec![Event::Executed {
                height: 4,
                view: 0,
                requests: 1,
                synced: false,
            }],
        }
    );
    // Not stable until others agree.
    assert_eq!(b.status().stable_checkpoint, 0);
}

#[test]
fn checkpoint_becomes_stable_at_2f_plus_1_matching_votes() {
    let (mut c, held) = cluster_without_checkpoints_to(1, 4);
    let b = c.replica_mut(1);
    let d = own_digest(b);
    let snapshot = b.state().snapshot();
    let head = b.status().head_hash;

    // Own vote plus replica 0's: two of three.
    assert_eq!(deliver(b, 0, vote(&held, 4, 0)), Output::default());
    assert_eq!(b.status().stable_checkpoint, 0);

    let out = deliver(b, 2, vote(&held, 4, 2));
    let cert = CheckpointCert {
        seq: 4,
        digest: d,
        signatures: vec![
            checkpoint(4, d, 0),
            checkpoint(4, d, 1),
            checkpoint(4, d, 2),
        ],
    };
    assert_eq!(
        out,
        Output {
            persist: vec![
                PersistOp::Checkpoint(StableCheckpoint {
                    cert: cert.clone(),
                    snapshot: std::sync::Arc::new(snapshot),
                    block_hash: head,
                }),
                PersistOp::Prune { upto: 4 },
            ],
            events: vec![Event::CheckpointStable { seq: 4 }],
            ..Output::default()
        }
    );
    assert_eq!(b.status().stable_checkpoint, 4);
    assert_eq!(*b.stable_checkpoint(), cert);

    // The fourth vote arrives at the stable checkpoint: it only tells where r3 is (as status
    // announcements do), so it is taken silently and changes nothing.
    let out = deliver(b, 3, vote(&held, 4, 3));
    assert_eq!(out, Output::default());
    assert_eq!(b.rejected().total(), 0);
}

#[test]
fn stability_discards_the_log_and_moves_the_window() {
    let (mut c, held) = cluster_without_checkpoints_to(1, 4);
    let d2 = c.store(1).block(2).expect("block 2").batch.digest();
    let b = c.replica_mut(1);
    // Before: a repeated commit for committed seq 2 is a duplicate, and the replica helps the
    // sender with its own votes for the slot.
    let out = deliver(b, 2, Message::Commit(commit(0, 2, d2, 2)));
    assert_eq!(
        out,
        Output {
            messages: vec![
                // Replica 3 vouched for seq 2; replica 1 prepared without checking, and
                // vouches once the certificate showed the batch valid.
                to(2, Message::Prepare(prepare(0, 2, d2, 1))),
                to(2, Message::Commit(commit(0, 2, d2, 1))),
            ],
            events: vec![Event::Rejected {
                reason: pbft_core::RejectReason::Duplicate
            }],
            ..Output::default()
        }
    );
    // Seq 12 is beyond the window [1, 8].
    let d = batch(&[put_req(8, 1)]).digest();
    let out = deliver(b, 3, Message::Prepare(prepare(0, 12, d, 3)));
    assert_rejected(b, &out, pbft_core::RejectReason::OutOfWindow, 1, 2);

    deliver(b, 0, vote(&held, 4, 0));
    deliver(b, 2, vote(&held, 4, 2));
    assert_eq!(b.status().stable_checkpoint, 4);

    // After: seq 2 and 4 are below the window, their slots are gone.
    let out = deliver(b, 3, Message::Commit(commit(0, 2, d2, 3)));
    assert_rejected(b, &out, pbft_core::RejectReason::OutOfWindow, 2, 3);
    let out = deliver(
        b,
        0,
        Message::PrePrepare(pre_prepare(0, 4, batch(&[put_req(8, 1)]))),
    );
    assert_rejected(b, &out, pbft_core::RejectReason::OutOfWindow, 3, 4);
    // ... and seq 12 = 4 + log_window is now inside it.
    assert_eq!(
        deliver(b, 3, Message::Prepare(prepare(0, 12, d, 3))),
        Output::default()
    );
    assert_eq!(b.rejected().total(), 4);
}

#[test]
fn stable_checkpoint_prunes_the_stored_log_everywhere() {
    let mut c = Cluster::new();
    for client in 1..=5 {
        c.execute(client, 1);
    }
    for i in 0..4 {
        assert_eq!(c.replica(i).status().stable_checkpoint, 4, "replica {i}");
        let rec = c.store(i).recover().expect("memory store");
        let cp = rec.checkpoint.expect("stable checkpoint stored");
        assert_eq!(cp.cert.seq, 4);
        assert_eq!(cp.block_hash, c.store(i).block(4).expect("block 4").hash());
        // Only seq 5 is left in the log; blocks above the checkpoint are kept for replay.
        let accepted: Vec<_> = rec.accepted.iter().map(|pp| pp.body.seq).collect();
        let prepared: Vec<_> = rec.prepared.iter().map(|p| p.seq()).collect();
        assert_eq!(accepted, vec![5], "replica {i}");
        assert_eq!(prepared, vec![5], "replica {i}");
        assert_eq!(
            rec.blocks.iter().map(|b| b.height).collect::<Vec<_>>(),
            vec![5]
        );
    }
    let stable: Vec<_> = c
        .events
        .iter()
        .filter(|(_, e)| *e == Event::CheckpointStable { seq: 4 })
        .map(|(who, _)| *who)
        .collect();
    let mut sorted = stable.clone();
    sorted.sort();
    assert_eq!(sorted, (0..4).map(ReplicaId).collect::<Vec<_>>());
}

#[test]
fn a_vote_for_another_digest_does_not_count() {
    let (mut c, held) = cluster_without_checkpoints_to(1, 4);
    let b = c.replica_mut(1);
    let d = own_digest(b);
    deliver(b, 0, vote(&held, 4, 0));
    let wrong = Message::Checkpoint(checkpoint(4, Digest([9; 32]), 2));
    assert_eq!(deliver(b, 2, wrong), Output::default());
    assert_eq!(b.status().stable_checkpoint, 0);
    let out = deliver(b, 3, vote(&held, 4, 3));
    assert_eq!(out.events, vec![Event::CheckpointStable { seq: 4 }]);
    assert_eq!(
        b.stable_checkpoint().signatures,
        vec![
            checkpoint(4, d, 0),
            checkpoint(4, d, 1),
            checkpoint(4, d, 3)
        ]
    );
}

#[test]
fn a_quorum_for_a_state_this_replica_does_not_have_is_not_adopted() {
    let (mut c, _) = cluster_without_checkpoints_to(1, 4);
    let b = c.replica_mut(1);
    let other = Digest([9; 32]);
    for i in [0, 2, 3] {
        let out = deliver(b, i, Message::Checkpoint(checkpoint(4, other, i)));
        assert_eq!(out, Output::default(), "vote from {i}");
    }
    assert_eq!(b.status().stable_checkpoint, 0);
    assert_eq!(b.status().sync_target, None);
}

#[test]
fn the_primary_at_the_high_watermark_resumes_when_a_checkpoint_is_stable() {
    let (mut c, held) = cluster_without_checkpoints_to(0, 8);
    // Seq 9 is beyond the primary's window [1, 8]: the request waits.
    let q = put_req(1, 2);
    c.replica_mut(0)
        .handle(pbft_core::Input::Request(q.clone()));
    assert_eq!(c.replica_mut(0).take_output(), Output::default());
    assert_eq!(c.replica(0).status().pending_requests, 1);

    let p = c.replica_mut(0);
    deliver(p, 1, vote(&held, 4, 1));
    let out = deliver(p, 2, vote(&held, 4, 2));
    let pp = pre_prepare(0, 9, batch(&[q]));
    assert_eq!(out.events, vec![Event::CheckpointStable { seq: 4 }]);
    assert!(matches!(&out.persist[0], PersistOp::Checkpoint(s) if s.cert.seq == 4));
    assert_eq!(
        out.persist[1..],
        [
            PersistOp::Prune { upto: 4 },
            PersistOp::Accepted(pp.clone())
        ]
    );
    assert_eq!(out.messages, vec![to_all(Message::PrePrepare(pp))]);
}

#[test]
fn a_quorum_of_votes_above_the_last_executed_starts_a_sync() {
    let mut b = replica(3);
    let d = Digest([5; 32]);
    assert_eq!(
        deliver(&mut b, 0, Message::Checkpoint(checkpoint(4, d, 0))),
        Output::default()
    );
    // f+1 claims of seq 4 are within reach of ordering (4 <= 0 + K): not yet a sync.
    assert_eq!(
        deliver(&mut b, 1, Message::Checkpoint(checkpoint(4, d, 1))),
        Output::default()
    );
    // 2f+1 agree on a state this replica has not reached: fetch it, first from replica 0,
    // the first peer after replica 3 that claims to be ahead.
    let out = deliver(&mut b, 2, Message::Checkpoint(checkpoint(4, d, 2)));
    assert_eq!(
        out,
        Output {
            messages: vec![to(
                0,
                Message::SyncRequest(SyncRequest {
                    from_height: 1,
                    max_blocks: 4,
                })
            )],
            events: vec![Event::SyncStarted { from: 1, target: 4 }],
            ..Output::default()
        }
    );
    assert_eq!(b.status().sync_target, Some(4));
    assert_eq!(b.status().stable_checkpoint, 0);
}

#[test]
fn f_plus_1_claims_far_ahead_start_a_sync() {
    let mut b = replica(1);
    let d = Digest([5; 32]);
    // Seq 12 is beyond the window: it counts only as a claim of progress.
    assert_eq!(
        deliver(&mut b, 0, Message::Checkpoint(checkpoint(12, d, 0))),
        Output::default()
    );
    let out = deliver(&mut b, 3, Message::Checkpoint(checkpoint(12, d, 3)));
    assert_eq!(
        out,
        Output {
            messages: vec![to(
                3,
                Message::SyncRequest(SyncRequest {
                    from_height: 1,
                    max_blocks: 4,
                })
            )],
            events: vec![Event::SyncStarted {
                from: 1,
                target: 12
            }],
            ..Output::default()
        }
    );
    // A later, higher claim only raises the target.
    deliver(&mut b, 0, Message::Checkpoint(checkpoint(16, d, 0)));
    let out = deliver(&mut b, 3, Message::Checkpoint(checkpoint(16, d, 3)));
    assert_eq!(out, Output::default());
    assert_eq!(b.status().sync_target, Some(16));
}
