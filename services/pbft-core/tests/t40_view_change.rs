//! View change: the timer that suspects the primary (and its doubling), the view-change
//! message with its prepared proofs, joining on f+1 view changes or f+1 replicas seen ahead,
//! the new primary's new view (recomputed pre-prepares, null batches for gaps), a backup
//! accepting it, handing it to stragglers, and whole-cluster view changes that keep a
//! prepared batch.

mod common;

use common::*;
use pbft_core::{
    Batch, Config, Event, Message, NewView, OpResult, Output, PersistOp, RejectReason, SyncRequest,
    ViewChange,
};

fn one_put() -> Batch {
    batch(&[put_req(1, 1)])
}

fn vc_message(by: u32, view: u64, prepared: Vec<pbft_core::PreparedProof>) -> Message {
    Message::ViewChange(view_change(by, view, prepared))
}

fn started(view: u64, by: u32, prepared: Vec<pbft_core::PreparedProof>) -> Output {
    Output {
        persist: vec![PersistOp::View {
            view,
            changing: true,
        }],
        messages: vec![to_all(vc_message(by, view, prepared))],
        events: vec![Event::ViewChangeStarted { view }],
        ..Output::default()
    }
}

/// The new view 1 that replica 1 builds from view changes of replicas 1, 2 and 3 when
/// replica 2 prepared `one_put()` at seq 2 in view 0: a null batch at 1, the batch at 2.
fn expected_new_view() -> pbft_core::Signed<NewView> {
    sign(
        1,
        NewView {
            view: 1,
            view_changes: vec![
                view_change(1, 1, vec![]),
                view_change(2, 1, vec![prepared_proof(0, 2, one_put())]),
                view_change(3, 1, vec![]),
            ],
            pre_prepares: vec![
                pre_prepare(1, 1, Batch::default()),
                pre_prepare(1, 2, one_put()),
            ],
        },
    )
}

#[test]
fn timer_expiry_starts_a_view_change_with_the_prepared_proofs() {
    // Replica 2, the designated voucher of seq 1: its prepare vouches, as replica 1's does.
    let mut b = replica(2);
    let pp = pre_prepare(0, 1, one_put());
    let d = pp.body.digest;
    deliver(&mut b, 0, Message::PrePrepare(pp));
    deliver(&mut b, 1, Message::Prepare(prepare(0, 1, d, 1)));
    // The request in the pre-prepare has waited since tick 0; view_change_timeout = 20.
    assert_eq!(tick(&mut b, 19), Output::default());
    assert_eq!(
        tick(&mut b, 1),
        started(1, 2, vec![prepared_proof(0, 1, one_put())])
    );
    let s = b.status();
    assert_eq!(
        (s.view, s.view_change_in_progress, s.primary),
        (1, true, r(1))
    );
}

#[test]
fn a_backup_with_nothing_pending_never_suspects_the_primary() {
    let mut b = replica(1);
    assert_eq!(tick(&mut b, 100), Output::default());
    assert_eq!(b.status().view, 0);
}

#[test]
fn executing_the_request_stops_its_timer() {
    let mut c = Cluster::new();
    let q = put_req(1, 1);
    // Every backup hears of the request from the client, then it executes.
    for i in 1..4 {
        c.replica_mut(i)
            .handle(pbft_core::Input::Request(q.clone()));
        c.replica_mut(i).take_output();
    }
    c.submit(0, q);
    for i in 1..4 {
        assert_eq!(c.replica(i).status().pending_requests, 0);
        assert_eq!(
            tick(c.replica_mut(i), 100),
            Output::default(),
            "replica {i}"
        );
    }
}

#[test]
fn the_view_change_timer_starts_at_a_quorum_and_doubles_up_to_its_cap() {
    // Replica 3 is changing to view 1 (primary 1), and nobody else has asked for it yet.
    let mut b = replica_in_view(3, 1, true);
    // Alone, it keeps asking for view 1 however long it waits: a replica cut off with a
    // request while the others carried on must not climb views by itself.
    assert_eq!(tick(&mut b, 500), Output::default());
    // 2f+1 replicas want view 1: the timer for the new view starts now.
    for by in [0, 1, 2] {
        deliver(&mut b, by, vc_message(by, 1, vec![]));
    }
    assert_eq!(tick(&mut b, 19), Output::default());
    assert_eq!(tick(&mut b, 1), started(2, 3, vec![]));
    // Alone again in view 2 (for less than the retransmit interval).
    assert_eq!(tick(&mut b, 400), Output::default());
    for by in [0, 1, 2] {
        deliver(&mut b, by, vc_message(by, 2, vec![]));
    }
    // The timeout doubled to 40.
    assert_eq!(tick(&mut b, 39), Output::default());
    assert_eq!(tick(&mut b, 1), started(3, 3, vec![]));
    let sent: Vec<Message> = [0, 1, 2]
        .into_iter()
        .flat_map(|by| deliver(&mut b, by, vc_message(by, 3, vec![])).messages)
        .map(|e| e.msg)
        .collect();
    assert!(
        sent.iter().any(|m| matches!(m, Message::NewView(_))),
        "replica 3 is the primary of view 3 and has 2f+1 view changes: {sent:?}"
    );
}

#[test]
fn replicas_asking_for_a_later_view_count_towards_the_timer_quorum() {
    // Found by simulator seed 500111: the new primary of view 1 is faulty and silent;
    // replica 2 already timed out and asks for view 2, replicas 0 and 1 (and 3) still ask for
    // view 1. Only one replica wants view 2, too few to join it; if replica 3 counted only
    // requests for exactly view 1 it would wait for a third one forever.
    let mut b = replica_in_view(3, 1, true);
    deliver(&mut b, 1, vc_message(1, 1, vec![]));
    deliver(&mut b, 2, vc_message(2, 2, vec![]));
    deliver(&mut b, 0, vc_message(0, 1, vec![]));
    assert_eq!(tick(&mut b, 19), Output::default());
    assert_eq!(tick(&mut b, 1), started(2, 3, vec![]));
}

#[test]
fn a_replica_restarted_in_a_view_change_still_asks_for_its_view() {
    // Recovered from storage while changing to view 1: its own request counts, so two more
    // make 2f+1 and start the timer...
    let mut b = replica_in_view(3, 1, true);
    deliver(&mut b, 1, vc_message(1, 1, vec![]));
    deliver(&mut b, 2, vc_message(2, 1, vec![]));
    assert_eq!(tick(&mut b, 19), Output::default());
    assert_eq!(tick(&mut b, 1), started(2, 3, vec![]));
    // ...and it re-sends the request it may never have sent before the crash.
    let mut quiet = replica_in_view(3, 1, true);
    let out = tick(&mut quiet, config().retransmit_interval);
    assert_eq!(out.messages, vec![to_all(vc_message(3, 1, vec![]))]);
}

#[test]
fn a_primary_whose_proposal_does_not_commit_asks_for_a_new_view() {
    // Simulator seed 510767: the primary restarted having lost the commits it was owed,
    // and the backups that could have sent them had moved on to a view change; the one
    // backup left had executed everything it knew of, so no backup timer was running.
    // The primary's own timer is what moves the cluster on.
    let mut p = replica(0);
    submit(&mut p, put_req(1, 1));
    assert_eq!(tick(&mut p, 19), Output::default());
    assert_eq!(
        tick(&mut p, 1).events,
        vec![Event::ViewChangeStarted { view: 1 }]
    );
}

#[test]
fn a_replica_restarted_with_an_accepted_batch_times_its_requests_again() {
    let accepted = pre_prepare(0, 1, batch(&[put_req(1, 1)]));
    for id in [0, 2] {
        let mut r = recovered(
            id,
            pbft_core::Recovered {
                accepted: vec![accepted.clone()],
                ..pbft_core::Recovered::default()
            },
        );
        tick(&mut r, 19);
        assert_eq!(
            tick(&mut r, 1).events,
            vec![Event::ViewChangeStarted { view: 1 }],
            "replica {id}"
        );
    }
}

#[test]
fn the_view_change_timeout_doubles_up_to_its_cap() {
    let cfg = Config {
        max_view_change_timeout: 60,
        ..config()
    };
    let mut b = replica_with(cfg, 0);
    // Each view gets 2f+1 view changes (replica 0 joins view 1 on f+1), never a new view.
    let mut view = 0;
    for wait in [20, 40, 60] {
        view += 1;
        for by in [1, 2, 3] {
            deliver(&mut b, by, vc_message(by, view, vec![]));
        }
        assert_eq!(tick(&mut b, wait - 1), Output::default(), "view {view}");
        assert_eq!(tick(&mut b, 1), started(view + 1, 0, vec![]), "view {view}");
    }
}

#[test]
fn f_plus_1_view_changes_make_a_replica_join() {
    let mut b = replica(2);
    assert_eq!(
        deliver(&mut b, 1, vc_message(1, 1, vec![])),
        Output::default()
    );
    assert!(!b.status().view_change_in_progress);
    assert_eq!(
        deliver(&mut b, 3, vc_message(3, 1, vec![])),
        started(1, 2, vec![])
    );
}

#[test]
fn a_replica_joins_the_lowest_view_f_plus_1_ask_for() {
    let mut b = replica(2);
    deliver(&mut b, 1, vc_message(1, 3, vec![]));
    assert_eq!(
        deliver(&mut b, 3, vc_message(3, 2, vec![])),
        started(2, 2, vec![])
    );
}

#[test]
fn f_plus_1_replicas_seen_in_a_later_view_make_a_replica_follow() {
    let mut b = replica(1);
    let d = one_put().digest();
    let out = deliver(&mut b, 2, Message::Prepare(prepare(1, 1, d, 2)));
    assert_eq!(out, rejected(RejectReason::FutureView));
    let out = deliver(&mut b, 3, Message::Prepare(prepare(1, 1, d, 3)));
    let mut want = started(1, 1, vec![]);
    want.events.insert(
        0,
        Event::Rejected {
            reason: RejectReason::FutureView,
        },
    );
    assert_eq!(out, want);
}

#[test]
fn a_replica_still_changing_views_follows_f_plus_1_replicas_seen_past_its_view() {
    // Simulator seed 522351: restarted asking for view 1 while the others had moved on
    // (one working in view 2, one asking for view 3), it waited for a view-1 quorum that
    // nobody would complete.
    let mut b = replica_in_view(1, 1, true);
    let d = one_put().digest();
    let out = deliver(&mut b, 2, Message::Prepare(prepare(2, 1, d, 2)));
    assert_eq!(out, rejected(RejectReason::FutureView));
    let out = deliver(&mut b, 3, Message::Prepare(prepare(3, 1, d, 3)));
    let mut want = started(2, 1, vec![]);
    want.events.insert(
        0,
        Event::Rejected {
            reason: RejectReason::FutureView,
        },
    );
    assert_eq!(out, want);
}

#[test]
fn the_new_primary_announces_the_recomputed_pre_prepares_with_null_batches_for_gaps() {
    let mut p = replica(1);
    assert_eq!(
        deliver(
            &mut p,
            2,
            vc_message(2, 1, vec![prepared_proof(0, 2, one_put())])
        ),
        Output::default()
    );
    // The second view change makes it join; with its own that is 2f+1, so it starts view 1.
    let out = deliver(&mut p, 3, vc_message(3, 1, vec![]));
    let nv = expected_new_view();
    assert_eq!(
        out,
        Output {
            persist: vec![
                PersistOp::View {
                    view: 1,
                    changing: true
                },
                PersistOp::View {
                    view: 1,
                    changing: false
                },
                PersistOp::Accepted(pre_prepare(1, 1, Batch::default())),
                PersistOp::Accepted(pre_prepare(1, 2, one_put())),
            ],
            messages: vec![
                to_all(vc_message(1, 1, vec![])),
                to_all(Message::NewView(nv)),
            ],
            events: vec![
                Event::ViewChangeStarted { view: 1 },
                Event::ViewEntered { view: 1 },
            ],
            ..Output::default()
        }
    );
    let s = p.status();
    assert_eq!(
        (s.view, s.view_change_in_progress, s.primary),
        (1, false, r(1))
    );
}

#[test]
fn the_new_primary_numbers_new_requests_after_the_re_proposed_ones() {
    let mut p = replica(1);
    deliver(
        &mut p,
        2,
        vc_message(2, 1, vec![prepared_proof(0, 2, one_put())]),
    );
    deliver(&mut p, 3, vc_message(3, 1, vec![]));
    // Complete seqs 1 and 2 so nothing is in flight, then a new request gets seq 3 at once.
    for (seq, b) in [(1, Batch::default()), (2, one_put())] {
        let d = b.digest();
        for i in [2, 3] {
            deliver(&mut p, i, Message::Prepare(prepare(1, seq, d, i)));
        }
        for i in [2, 3] {
            deliver(&mut p, i, Message::Commit(commit(1, seq, d, i)));
        }
    }
    assert_eq!(p.status().last_executed, 2);
    let q = put_req(2, 1);
    let out = submit(&mut p, q.clone());
    let pp = pre_prepare(1, 3, batch(&[q]));
    assert_eq!(out.messages, vec![to_all(Message::PrePrepare(pp))]);
}

/// Found while writing the test above: entering the view, the new primary queues the
/// requests of the batches its new view re-proposes (they are "waiting" because it accepted
/// their pre-prepares), and proposes them again at the next free seq.
#[test]
fn the_new_primary_does_not_propose_again_what_its_new_view_carries() {
    let mut p = replica(1);
    deliver(
        &mut p,
        2,
        vc_message(2, 1, vec![prepared_proof(0, 2, one_put())]),
    );
    deliver(&mut p, 3, vc_message(3, 1, vec![]));
    assert_eq!(p.status().view, 1);
    // batch_delay = 1: anything queued would be proposed now.
    assert_eq!(tick(&mut p, 1), Output::default());
}

#[test]
fn a_backup_accepts_a_valid_new_view_and_prepares_its_pre_prepares() {
    let mut b = replica_in_view(2, 1, true);
    let nv = expected_new_view();
    let out = deliver(&mut b, 1, Message::NewView(nv));
    let (null, put) = (Batch::default(), one_put());
    let q = put_req(1, 1);
    assert_eq!(
        out,
        Output {
            persist: vec![
                PersistOp::View {
                    view: 1,
                    changing: false
                },
                PersistOp::Accepted(pre_prepare(1, 1, null.clone())),
                PersistOp::Accepted(pre_prepare(1, 2, put.clone())),
            ],
            messages: vec![
                to_all(Message::Prepare(prepare(1, 1, null.digest(), 2))),
                to_all(Message::Prepare(prepare(1, 2, put.digest(), 2))),
                // The backup makes sure the new primary knows what it is waiting for.
                to(1, Message::Request(q)),
            ],
            events: vec![Event::ViewEntered { view: 1 }],
            ..Output::default()
        }
    );
    let s = b.status();
    assert_eq!((s.view, s.view_change_in_progress), (1, false));
}

#[test]
fn a_new_view_jumps_a_replica_that_is_not_yet_changing() {
    let mut b = replica(2);
    let out = deliver(&mut b, 1, Message::NewView(expected_new_view()));
    assert_eq!(out.events, vec![Event::ViewEntered { view: 1 }]);
    assert_eq!(b.status().view, 1);
    // A repeat of the same new view is a duplicate.
    let out = deliver(&mut b, 1, Message::NewView(expected_new_view()));
    assert_rejected(&b, &out, RejectReason::Duplicate, 1, 1);
}

#[test]
fn the_new_view_is_handed_to_a_replica_still_asking_for_it() {
    let mut b = replica_in_view(2, 1, true);
    let nv = expected_new_view();
    deliver(&mut b, 1, Message::NewView(nv.clone()));
    let out = deliver(&mut b, 3, vc_message(3, 1, vec![]));
    assert_eq!(
        out,
        Output {
            messages: vec![to(3, Message::NewView(nv))],
            events: vec![Event::Rejected {
                reason: RejectReason::StaleView
            }],
            ..Output::default()
        }
    );
    // At most once per retransmission interval.
    let out = deliver(&mut b, 3, vc_message(3, 1, vec![]));
    assert_eq!(out, rejected(RejectReason::StaleView));
}

#[test]
fn a_new_view_above_the_backups_checkpoint_starts_a_sync() {
    let mut b = replica_in_view(2, 1, true);
    let d = pbft_core::Digest([3; 32]);
    let ahead = sign(
        3,
        ViewChange {
            new_view: 1,
            replica: r(3),
            stable_seq: 4,
            checkpoint_proof: [0, 1, 3].map(|i| checkpoint(4, d, i)).to_vec(),
            prepared: vec![],
        },
    );
    let nv = sign(
        1,
        NewView {
            view: 1,
            view_changes: vec![view_change(0, 1, vec![]), view_change(1, 1, vec![]), ahead],
            pre_prepares: vec![],
        },
    );
    let out = deliver(&mut b, 1, Message::NewView(nv));
    assert_eq!(
        out,
        Output {
            persist: vec![PersistOp::View {
                view: 1,
                changing: false
            }],
            messages: vec![to(
                3,
                Message::SyncRequest(SyncRequest {
                    from_height: 1,
                    max_blocks: 4
                })
            )],
            events: vec![
                Event::ViewEntered { view: 1 },
                Event::SyncStarted { from: 1, target: 4 },
            ],
            ..Output::default()
        }
    );
}

/// Cluster in which every backup got `q` from the client while replica 0 is cut off.
fn cluster_with_silent_primary(q: &pbft_core::Request) -> Cluster {
    let mut c = Cluster::new();
    c.isolate(0);
    for i in 1..4 {
        c.submit(i, q.clone());
    }
    c
}

#[test]
fn backups_replace_a_silent_primary_and_execute_in_the_new_view() {
    let q = put_req(1, 1);
    let mut c = cluster_with_silent_primary(&q);
    c.tick(19);
    assert!(c.replies.is_empty());
    assert_eq!(c.replica(1).status().view, 0);
    c.tick(1);
    for i in 1..4 {
        let s = c.replica(i).status();
        assert_eq!(
            (s.view, s.view_change_in_progress, s.last_executed),
            (1, false, 1),
            "replica {i}"
        );
    }
    let mut replies: Vec<_> = c
        .replies
        .iter()
        .map(|rep| (rep.replica, rep.view, rep.result.clone()))
        .collect();
    replies.sort_by_key(|x| x.0);
    assert_eq!(
        replies,
        (1..4)
            .map(|i| (r(i), 1, OpResult::Written))
            .collect::<Vec<_>>()
    );
    assert_eq!(c.store(2).block(1).expect("block 1").view, 1);
}

#[test]
fn a_batch_prepared_in_the_old_view_commits_in_the_new_one() {
    let q = put_req(1, 1);
    let mut c = Cluster::new();
    // Every commit of view 0 is lost: the batch prepares everywhere but commits nowhere.
    c.set_drop(|_, _, m| matches!(m, Message::Commit(x) if x.body.view == 0));
    c.submit(0, q.clone());
    assert!(c.replies.is_empty());
    c.tick(20);
    for i in 0..4 {
        let s = c.replica(i).status();
        assert_eq!((s.view, s.last_executed), (1, 1), "replica {i}");
        let block = c.store(i).block(1).expect("block 1");
        assert_eq!(
            (block.view, block.batch.clone()),
            (1, batch(std::slice::from_ref(&q)))
        );
    }
}

#[test]
fn a_replica_that_missed_a_view_change_follows_and_catches_up_at_the_next_checkpoint() {
    let q = put_req(1, 1);
    let mut c = cluster_with_silent_primary(&q);
    c.tick(20);
    // Replica 0 rejoins in view 0. The next request's traffic shows it f+1 replicas working
    // in view 1: it asks for view 1 and is handed the new view.
    c.heal();
    c.submit(1, put_req(2, 1));
    let s = c.replica(0).status();
    assert_eq!(
        (s.view, s.view_change_in_progress, s.last_executed),
        (1, false, 0)
    );
    // Replica 0 was the designated voucher of sequence 2 but missed its pre-prepare: the
    // others check that batch themselves after the vouch timeout.
    c.tick(config().vouch_timeout);
    // Blocks 1 and 2 committed without it; the checkpoint at 4 tells it to fetch them.
    c.submit(1, put_req(3, 1));
    c.submit(1, put_req(4, 1));
    let head = c.replica(1).status().head_hash;
    let s = c.replica(0).status();
    assert_eq!(
        (s.last_executed, s.head_hash, s.stable_checkpoint),
        (4, head, 4)
    );
    assert_eq!(
        c.replica(0).state().snapshot(),
        c.replica(1).state().snapshot()
    );
}

#[test]
fn a_view_change_above_a_stable_checkpoint_re_proposes_from_it() {
    let mut c = Cluster::new();
    for client in 1..=5 {
        c.execute(client, 1);
    }
    assert_eq!(c.replica(2).status().stable_checkpoint, 4);
    // Request 6 prepares everywhere but its commits are lost.
    c.set_drop(|_, _, m| matches!(m, Message::Commit(x) if x.body.view == 0));
    c.execute(6, 1);
    assert_eq!(c.replica(2).status().last_executed, 5);
    c.tick(20);
    let head = c.replica(1).status().head_hash;
    for i in 0..4 {
        let s = c.replica(i).status();
        assert_eq!(
            (
                s.view,
                s.view_change_in_progress,
                s.last_executed,
                s.head_hash
            ),
            (1, false, 6, head),
            "replica {i}"
        );
        // Seq 5 was re-proposed in view 1 (it was prepared above the checkpoint) but not
        // executed twice; seq 6 committed in view 1.
        let store = c.store(i);
        assert_eq!(store.block(5).expect("block 5").view, 0);
        assert_eq!(store.block(6).expect("block 6").view, 1);
        assert_eq!(store.height(), 6);
    }
    let executed_5: usize = c
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::Executed { height: 5, .. }))
        .count();
    assert_eq!(executed_5, 4);
}

#[test]
fn the_new_view_takes_the_highest_view_certificate_per_seq_and_fills_every_gap() {
    let (a, b, c) = (
        batch(&[put_req(1, 1)]),
        batch(&[put_req(2, 1)]),
        batch(&[put_req(3, 1)]),
    );
    // Replica 0 prepared A at 1 and B at 3 in view 0; replica 3 prepared C at 3 in view 1.
    let vc0 = view_change(
        0,
        2,
        vec![prepared_proof(0, 1, a.clone()), prepared_proof(0, 3, b)],
    );
    let vc3 = view_change(3, 2, vec![prepared_proof(1, 3, c.clone())]);
    let mut p = replica(2);
    deliver(&mut p, 0, Message::ViewChange(vc0.clone()));
    let out = deliver(&mut p, 3, Message::ViewChange(vc3.clone()));
    let nv = sign(
        2,
        NewView {
            view: 2,
            view_changes: vec![vc0, view_change(2, 2, vec![]), vc3],
            pre_prepares: vec![
                pre_prepare(2, 1, a),
                pre_prepare(2, 2, Batch::default()),
                pre_prepare(2, 3, c),
            ],
        },
    );
    assert_eq!(out.messages[1], to_all(Message::NewView(nv)));
}
