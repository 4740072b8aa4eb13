//! Who checks a batch's client signatures: the primary and f designated backups vouch; the
//! others prepare without checking and are prepared only once f prepares vouch; a late
//! voucher makes a backup check the batch itself and suspect the voucher for a while; a
//! batch with a forged request never prepares, and a certificate without vouches carries
//! nothing into a new view.
//!
//! In view 0 with n = 4 (f = 1), the designated voucher of sequence s is backup
//! `1 + s % 3`: replica 2 for sequence 1, replica 3 for 2, replica 1 for 3. The test
//! configuration's vouch timeout is 5 ticks.

mod common;

use common::*;
use pbft_core::{Config, Event, Message, Output, PersistOp, PreparedProof, RejectReason, Request};

/// Replica 1 receives the pre-prepare of sequence 1 (replica 2 vouches for it) and replica
/// 3's unvouched prepare: two matching prepares, no vouch.
fn backup_waiting_for_its_voucher(batch_of: &[Request]) -> (pbft_core::Replica, pbft_core::Digest) {
    waiting_with(config(), batch_of)
}

fn waiting_with(cfg: Config, batch_of: &[Request]) -> (pbft_core::Replica, pbft_core::Digest) {
    let mut b = replica_with(cfg, 1);
    let pp = pre_prepare(0, 1, batch(batch_of));
    let d = pp.body.digest;
    deliver(&mut b, 0, Message::PrePrepare(pp));
    let out = deliver(&mut b, 3, Message::Prepare(unvouched_prepare(0, 1, d, 3)));
    assert_eq!(
        out,
        Output::default(),
        "2f prepares without a vouch do not prepare"
    );
    (b, d)
}

#[test]
fn two_f_prepares_without_a_vouch_do_not_prepare_until_the_voucher_vouches() {
    let (mut b, d) = backup_waiting_for_its_voucher(&[put_req(1, 1)]);
    let out = deliver(&mut b, 2, Message::Prepare(prepare(0, 1, d, 2)));
    assert!(
        out.messages
            .contains(&to_all(Message::Commit(commit(0, 1, d, 1)))),
        "the vouch completes the certificate: {out:?}"
    );
}

#[test]
fn a_prepare_upgraded_to_vouching_replaces_the_unvouched_one() {
    let (mut b, d) = backup_waiting_for_its_voucher(&[put_req(1, 1)]);
    // Replica 2's unvouched prepare first (say it had not checked yet), then its vouch.
    assert_eq!(
        deliver(&mut b, 2, Message::Prepare(unvouched_prepare(0, 1, d, 2))),
        Output::default()
    );
    let out = deliver(&mut b, 3, Message::Prepare(prepare(0, 1, d, 3)));
    let proof = PreparedProof {
        pre_prepare: pre_prepare(0, 1, batch(&[put_req(1, 1)])),
        prepares: vec![prepare(0, 1, d, 3), unvouched_prepare(0, 1, d, 1)],
    };
    assert_eq!(out.persist, vec![PersistOp::Prepared(proof)]);
    // A downgrade back to unvouched is only a duplicate.
    let out = deliver(&mut b, 3, Message::Prepare(unvouched_prepare(0, 1, d, 3)));
    assert_eq!(out, rejected(RejectReason::Duplicate));
}

#[test]
fn a_silent_voucher_makes_the_backup_check_vouch_and_suspect_it() {
    let (mut b, d) = backup_waiting_for_its_voucher(&[put_req(1, 1)]);
    assert_eq!(tick(&mut b, 4), Output::default());
    // The vouch timeout: replica 1 checks the batch itself; its vouching prepare, with
    // replica 3's, prepares it, and its request is timed from now on.
    let out = tick(&mut b, 1);
    assert_eq!(
        out.messages,
        vec![
            to_all(Message::Prepare(prepare(0, 1, d, 1))),
            to_all(Message::Commit(commit(0, 1, d, 1))),
        ]
    );
    assert_eq!(
        out.events,
        vec![Event::VouchTimeout {
            seq: 1,
            valid: true
        }]
    );
    assert_eq!(b.status().pending_requests, 1);
    // Replica 2 is suspected: the next batch it should vouch for (sequence 4) is checked
    // at once, and replica 1's prepare for it vouches.
    let pp4 = pre_prepare(0, 4, batch(&[put_req(2, 1)]));
    let out = deliver(&mut b, 0, Message::PrePrepare(pp4.clone()));
    assert_eq!(
        out.messages,
        vec![to_all(Message::Prepare(prepare(0, 4, pp4.body.digest, 1)))]
    );
    // A batch replica 3 vouches for (sequence 2) is still left to replica 3.
    let pp2 = pre_prepare(0, 2, batch(&[put_req(3, 1)]));
    let out = deliver(&mut b, 0, Message::PrePrepare(pp2.clone()));
    assert_eq!(
        out.messages,
        vec![to_all(Message::Prepare(unvouched_prepare(
            0,
            2,
            pp2.body.digest,
            1
        )))]
    );
}

#[test]
fn a_suspicion_ends_after_twenty_vouch_timeouts() {
    // A view-change timeout far away, so the waiting request does not start one.
    let cfg = Config {
        view_change_timeout: 10_000,
        max_view_change_timeout: 10_000,
        ..config()
    };
    let (mut b, _) = waiting_with(cfg, &[put_req(1, 1)]);
    tick(&mut b, 5);
    // Suspected from tick 5 until tick 5 + 20 * 5 = 105.
    tick(&mut b, 100);
    let pp4 = pre_prepare(0, 4, batch(&[put_req(2, 1)]));
    let out = deliver(&mut b, 0, Message::PrePrepare(pp4.clone()));
    assert_eq!(
        out.messages,
        vec![to_all(Message::Prepare(unvouched_prepare(
            0,
            4,
            pp4.body.digest,
            1
        )))]
    );
}

#[test]
fn a_forged_request_never_prepares_at_a_backup_that_did_not_check() {
    let mut forged = put_req(2, 1);
    forged.timestamp = 9; // no longer what client 2 signed
    let (mut b, d) = backup_waiting_for_its_voucher(&[put_req(1, 1), forged]);
    // The designated voucher refuses; at the vouch timeout replica 1 checks, finds the
    // forgery, and neither vouches nor prepares, nor times the forged request.
    let out = tick(&mut b, 5);
    assert_eq!(
        out.events,
        vec![
            Event::VouchTimeout {
                seq: 1,
                valid: false
            },
            Event::Rejected {
                reason: RejectReason::BadSignature
            },
        ]
    );
    assert!(out.messages.is_empty() && out.persist.is_empty());
    assert_eq!(b.status().pending_requests, 0);
    // A lying vouch from a faulty replica 2 would be the f-th vouch if replica 1 trusted
    // vouches alone; it does, by design (f+1 vouchers include a correct one), so the only
    // defence is that replica 2 and the primary cannot both be faulty with f = 1. Nothing
    // further happens here without it: more ticks change nothing.
    assert_eq!(tick(&mut b, 50), Output::default());
    assert_eq!(
        deliver(&mut b, 2, Message::Prepare(unvouched_prepare(0, 1, d, 2))),
        Output::default()
    );
}

#[test]
fn a_designated_voucher_refuses_a_forged_request_at_once() {
    let mut forged = put_req(2, 1);
    forged.timestamp = 9;
    let mut b = replica(2);
    let pp = pre_prepare(0, 1, batch(&[put_req(1, 1), forged]));
    let out = deliver(&mut b, 0, Message::PrePrepare(pp));
    assert_rejected(&b, &out, RejectReason::BadSignature, 1, 1);
}

#[test]
fn a_view_change_whose_certificate_lacks_a_vouch_is_an_invalid_certificate() {
    let mut b = replica(2);
    let mut proof = prepared_proof(0, 1, batch(&[put_req(1, 1)]));
    let d = proof.digest();
    proof.prepares = vec![unvouched_prepare(0, 1, d, 1), unvouched_prepare(0, 1, d, 3)];
    let out = deliver(
        &mut b,
        3,
        Message::ViewChange(view_change(3, 1, vec![proof.clone()])),
    );
    assert_rejected(&b, &out, RejectReason::InvalidCertificate, 1, 1);
    // With one of the two vouching it carries the batch.
    proof.prepares[1] = prepare(0, 1, d, 3);
    let out = deliver(
        &mut b,
        3,
        Message::ViewChange(view_change(3, 1, vec![proof])),
    );
    assert_eq!(b.rejected().total(), 1, "{out:?}");
}

#[test]
fn a_cluster_with_a_silent_voucher_still_commits_every_batch() {
    let mut c = Cluster::new();
    // Replica 2 hears everything but says nothing to anyone.
    c.set_drop(|from, _, _| from == r(2));
    for ts in 1..=6 {
        c.execute(1, ts);
        c.tick(6);
    }
    for i in [0, 1, 3] {
        assert_eq!(c.replica(i).status().last_executed, 6, "replica {i}");
    }
}

#[test]
fn with_check_every_batch_every_backup_checks_and_vouches() {
    // The rolling-upgrade mode: replica 1 is not sequence 1's designated voucher, but
    // checks and vouches anyway, so replicas that predate vouching accept its prepare.
    let cfg = Config {
        check_every_batch: true,
        ..config()
    };
    let mut b = replica_with(cfg.clone(), 1);
    let pp = pre_prepare(0, 1, batch(&[put_req(1, 1)]));
    let out = deliver(&mut b, 0, Message::PrePrepare(pp.clone()));
    assert_eq!(
        out.messages,
        vec![to_all(Message::Prepare(prepare(0, 1, pp.body.digest, 1)))]
    );
    let mut forged = put_req(2, 1);
    forged.timestamp = 9;
    let mut b = replica_with(cfg, 1);
    let out = deliver(
        &mut b,
        0,
        Message::PrePrepare(pre_prepare(0, 1, batch(&[forged]))),
    );
    assert_rejected(&b, &out, RejectReason::BadSignature, 1, 1);
}

#[test]
fn a_stuck_peer_gets_an_upgraded_vouch_from_a_replica_prepared_by_certificate() {
    // Replica 1 prepared sequence 1 on replica 2's vouch without checking the batch
    // itself. When it re-sends its votes (no progress for a retransmission interval), its
    // prepare vouches: the f+1 vouchers made the batch valid here too, and a peer the
    // vouchers left out may need exactly this vouch.
    let cfg = Config {
        retransmit_interval: 30,
        view_change_timeout: 10_000,
        max_view_change_timeout: 10_000,
        ..config()
    };
    let (mut b, d) = waiting_with(cfg, &[put_req(1, 1)]);
    let out = deliver(&mut b, 2, Message::Prepare(prepare(0, 1, d, 2)));
    assert!(!out.persist.is_empty(), "prepared: {out:?}");
    let out = tick(&mut b, 30);
    assert!(
        out.messages
            .contains(&to_all(Message::Prepare(prepare(0, 1, d, 1)))),
        "re-sent vouching: {out:?}"
    );
    assert!(
        !out.messages
            .contains(&to_all(Message::Prepare(unvouched_prepare(0, 1, d, 1)))),
        "{out:?}"
    );
}
