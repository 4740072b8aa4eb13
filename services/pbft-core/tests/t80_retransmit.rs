//! Recovering lost messages: after `retransmit_interval` ticks without progress a replica
//! re-sends its own votes (a backup its prepare and commit, the primary its pre-prepare, a
//! replica changing views its view change, an unstable checkpoint its vote), and a peer that
//! repeats a vote for a committed slot is sent this replica's votes, at most once per
//! interval.

mod common;

use common::*;
use pbft_core::{Config, Event, Message, Output, RejectReason};

/// Retransmission every 30 ticks; view changes far enough away never to interfere.
fn cfg() -> Config {
    Config {
        retransmit_interval: 30,
        view_change_timeout: 1_000,
        max_view_change_timeout: 1_000,
        ..config()
    }
}

#[test]
fn a_stalled_backup_re_sends_its_prepare_and_commit() {
    let mut b = replica_with(cfg(), 1);
    let pp = pre_prepare(0, 1, batch(&[put_req(1, 1)]));
    let d = pp.body.digest;
    deliver(&mut b, 0, Message::PrePrepare(pp));
    deliver(&mut b, 2, Message::Prepare(prepare(0, 1, d, 2)));
    // Replica 1 prepared without checking (replica 2 vouched for seq 1); it re-sends its
    // prepare vouching, the certificate having shown the batch valid.
    let votes = Output {
        messages: vec![
            to_all(Message::Prepare(prepare(0, 1, d, 1))),
            to_all(Message::Commit(commit(0, 1, d, 1))),
        ],
        ..Output::default()
    };
    assert_eq!(tick(&mut b, 29), Output::default());
    assert_eq!(tick(&mut b, 1), votes);
    assert_eq!(tick(&mut b, 29), Output::default());
    assert_eq!(tick(&mut b, 1), votes);
}

#[test]
fn a_stalled_primary_re_sends_its_pre_prepare() {
    let mut p = replica_with(cfg(), 0);
    let q = put_req(1, 1);
    submit(&mut p, q.clone());
    assert_eq!(tick(&mut p, 29), Output::default());
    assert_eq!(
        tick(&mut p, 1),
        Output {
            messages: vec![to_all(Message::PrePrepare(pre_prepare(0, 1, batch(&[q]))))],
            ..Output::default()
        }
    );
}

#[test]
fn an_idle_replica_sends_nothing() {
    let mut b = replica_with(cfg(), 1);
    assert_eq!(tick(&mut b, 100), Output::default());
}

#[test]
fn a_replica_changing_views_re_sends_its_view_change() {
    let mut b = replica_with(cfg(), 2);
    deliver(&mut b, 1, Message::ViewChange(view_change(1, 1, vec![])));
    deliver(&mut b, 3, Message::ViewChange(view_change(3, 1, vec![])));
    assert!(b.status().view_change_in_progress);
    assert_eq!(tick(&mut b, 29), Output::default());
    assert_eq!(
        tick(&mut b, 1),
        Output {
            messages: vec![to_all(Message::ViewChange(view_change(2, 1, vec![])))],
            ..Output::default()
        }
    );
}

#[test]
fn an_unstable_checkpoint_vote_is_re_sent() {
    let mut c = Cluster::with_config(cfg());
    c.set_drop(|_, to, m| to == r(1) && matches!(m, Message::Checkpoint(_)));
    for client in 1..=4 {
        c.execute(client, 1);
    }
    let b = c.replica_mut(1);
    let d = pbft_core::checkpoint_digest(
        &b.state().digest(b.config().state_digest),
        &b.status().head_hash,
    );
    assert_eq!(b.status().stable_checkpoint, 0);
    let out = tick(b, 30);
    assert!(out.messages.iter().all(|e| e.to == pbft_core::Target::All));
    assert_eq!(
        out.messages.last(),
        Some(&to_all(Message::Checkpoint(checkpoint(4, d, 1))))
    );
}

#[test]
fn a_repeated_vote_for_a_committed_slot_is_answered_once_per_interval() {
    let mut c = Cluster::with_config(cfg());
    c.execute(1, 1);
    let d = c.store(2).block(1).expect("block 1").batch.digest();
    let b = c.replica_mut(2);
    let help = Output {
        messages: vec![
            to(3, Message::Prepare(prepare(0, 1, d, 2))),
            to(3, Message::Commit(commit(0, 1, d, 2))),
        ],
        events: vec![Event::Rejected {
            reason: RejectReason::Duplicate,
        }],
        ..Output::default()
    };
    assert_eq!(deliver(b, 3, Message::Commit(commit(0, 1, d, 3))), help);
    // Within the interval only the duplicate is counted (replica 3's prepare for seq 1
    // did not vouch: replica 2 was its designated voucher).
    let out = deliver(b, 3, Message::Prepare(unvouched_prepare(0, 1, d, 3)));
    assert_eq!(out, rejected(RejectReason::Duplicate));
    tick(b, 30);
    assert_eq!(deliver(b, 3, Message::Commit(commit(0, 1, d, 3))), help);
}
