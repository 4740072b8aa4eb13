//! Input validation: for every [`RejectReason`] a replica can be made to give, the smallest
//! input that triggers it, asserting that the refusal is the whole output (nothing persisted,
//! sent or replied) and that exactly that reason was counted.

mod common;

use common::*;
use pbft_core::{
    Batch, Digest, Input, Message, NewView, Operation, Output, PrePrepare, PreparedProof,
    RejectReason, Replica, Request, Signature, Signed, Source, SyncRequest, SyncResponse,
    ViewChange,
};

use RejectReason::*;

fn one_put() -> Batch {
    batch(&[put_req(1, 1)])
}

/// Backup 1 holding the pre-prepare for `one_put()` at seq 1.
fn backup_with_pre_prepare() -> (Replica, Digest) {
    let mut b = replica(1);
    let pp = pre_prepare(0, 1, one_put());
    let d = pp.body.digest;
    deliver(&mut b, 0, Message::PrePrepare(pp));
    (b, d)
}

/// The view changes and pre-prepares of a correct new view 1 from replicas 1, 2 and 3, where
/// replica 2 prepared `one_put()` at seq 2 in view 0 and nothing prepared at seq 1.
fn new_view_1_parts() -> (Vec<Signed<ViewChange>>, Vec<Signed<PrePrepare>>) {
    let vcs = vec![
        view_change(1, 1, vec![]),
        view_change(2, 1, vec![prepared_proof(0, 2, one_put())]),
        view_change(3, 1, vec![]),
    ];
    let pps = vec![
        pre_prepare(1, 1, Batch::default()),
        pre_prepare(1, 2, one_put()),
    ];
    (vcs, pps)
}

fn new_view(
    by: u32,
    view: u64,
    view_changes: Vec<Signed<ViewChange>>,
    pre_prepares: Vec<Signed<PrePrepare>>,
) -> Message {
    Message::NewView(sign(
        by,
        NewView {
            view,
            view_changes,
            pre_prepares,
        },
    ))
}

// ----- UnknownSender -----

#[test]
fn request_from_an_unregistered_client_is_an_unknown_sender() {
    let mut b = replica(1);
    let q = pbft_core::Request::new_signed(UNKNOWN_CLIENT, 1, put("k", "v"), &client_key(99));
    let out = submit(&mut b, q);
    assert_rejected(&b, &out, UnknownSender, 1, 1);
    assert_eq!(b.status().pending_requests, 0);
}

#[test]
fn sync_response_from_a_client_is_an_unknown_sender() {
    let mut b = replica(1);
    b.handle(Input::Receive {
        from: Source::Client,
        msg: Message::SyncResponse(SyncResponse {
            blocks: vec![],
            checkpoint: None,
        }),
    });
    let out = b.take_output();
    assert_rejected(&b, &out, UnknownSender, 1, 1);
}

/// RejectReason::UnknownSender is documented as "claims to come from a replica or client not
/// in the configuration"; a phase message naming replica 7 of 4 is counted as a bad signature.
#[test]
fn prepare_from_a_replica_outside_the_configuration_is_an_unknown_sender() {
    let (mut b, d) = backup_with_pre_prepare();
    let out = deliver(&mut b, 3, Message::Prepare(prepare(0, 1, d, 7)));
    assert_rejected(&b, &out, UnknownSender, 1, 1);
}

// ----- BadSignature -----

#[test]
fn request_signed_with_another_clients_key_has_a_bad_signature() {
    let mut p = replica(0);
    let mut q = put_req(1, 1);
    q.signature = put_req(2, 1).signature;
    let out = submit(&mut p, q);
    assert_rejected(&p, &out, BadSignature, 1, 1);
}

#[test]
fn phase_messages_with_bad_signatures_are_refused() {
    let (mut b, d) = backup_with_pre_prepare();
    let mut p = prepare(0, 1, d, 2);
    p.signature = Signature::INVALID;
    let out = deliver(&mut b, 2, Message::Prepare(p));
    assert_rejected(&b, &out, BadSignature, 1, 1);

    // Replica 3 signing a commit that names replica 2.
    let forged = sign(3, commit(0, 1, d, 2).body);
    let out = deliver(&mut b, 3, Message::Commit(forged));
    assert_rejected(&b, &out, BadSignature, 2, 2);

    // A pre-prepare for view 0 signed by a backup rather than the primary.
    let pp = sign(2, pre_prepare(0, 2, one_put()).body);
    let out = deliver(&mut b, 2, Message::PrePrepare(pp));
    assert_rejected(&b, &out, BadSignature, 3, 3);

    let mut cp = checkpoint(4, Digest([1; 32]), 2);
    cp.signature = Signature::INVALID;
    let out = deliver(&mut b, 2, Message::Checkpoint(cp));
    assert_rejected(&b, &out, BadSignature, 4, 4);

    let vc = sign(3, view_change(2, 1, vec![]).body);
    let out = deliver(&mut b, 3, Message::ViewChange(vc));
    assert_rejected(&b, &out, BadSignature, 5, 5);

    // A new view for view 1 signed by replica 2, not the new primary 1.
    let (vcs, pps) = new_view_1_parts();
    let out = deliver(&mut b, 2, new_view(2, 1, vcs, pps));
    assert_rejected(&b, &out, BadSignature, 6, 6);
}

// ----- DigestMismatch -----

#[test]
fn pre_prepare_whose_digest_is_not_its_batchs_is_refused() {
    let mut b = replica(1);
    let pp = sign(
        0,
        PrePrepare {
            view: 0,
            seq: 1,
            digest: batch(&[put_req(2, 1)]).digest(),
            batch: one_put(),
        },
    );
    let out = deliver(&mut b, 0, Message::PrePrepare(pp));
    assert_rejected(&b, &out, DigestMismatch, 1, 1);
    assert_eq!(b.status().pending_requests, 0);
}

// ----- StaleView / FutureView -----

#[test]
fn phase_messages_for_an_older_view_are_stale() {
    let mut b = replica_in_view(2, 1, false);
    let d = one_put().digest();
    let out = deliver(&mut b, 0, Message::PrePrepare(pre_prepare(0, 1, one_put())));
    assert_rejected(&b, &out, StaleView, 1, 1);
    let out = deliver(&mut b, 3, Message::Prepare(prepare(0, 1, d, 3)));
    assert_rejected(&b, &out, StaleView, 2, 2);
    let out = deliver(&mut b, 3, Message::Commit(commit(0, 1, d, 3)));
    assert_rejected(&b, &out, StaleView, 3, 3);
}

#[test]
fn view_change_for_the_current_view_after_it_started_is_stale() {
    let mut b = replica_in_view(2, 1, false);
    let out = deliver(&mut b, 3, Message::ViewChange(view_change(3, 1, vec![])));
    assert_rejected(&b, &out, StaleView, 1, 1);
}

#[test]
fn new_view_for_an_older_view_is_stale() {
    let mut b = replica_in_view(2, 2, true);
    let (vcs, pps) = new_view_1_parts();
    let out = deliver(&mut b, 1, new_view(1, 1, vcs, pps));
    assert_rejected(&b, &out, StaleView, 1, 1);
}

#[test]
fn phase_messages_for_a_later_view_are_future() {
    let mut b = replica(1);
    let d = one_put().digest();
    let out = deliver(&mut b, 1, Message::PrePrepare(pre_prepare(1, 1, one_put())));
    assert_rejected(&b, &out, FutureView, 1, 1);
    // Only one replica (1) is seen working in view 1, short of the f+1 that would make this
    // replica follow, so nothing but the refusal happens.
    let out = deliver(&mut b, 1, Message::Commit(commit(1, 1, d, 1)));
    assert_rejected(&b, &out, FutureView, 2, 2);
    assert!(!b.status().view_change_in_progress);
}

// ----- OutOfWindow -----

#[test]
fn sequence_numbers_outside_the_watermarks_are_out_of_window() {
    let mut b = replica(1);
    let d = one_put().digest();
    // Low watermark 0 (exclusive), high watermark 0 + log_window = 8.
    let out = deliver(&mut b, 2, Message::Prepare(prepare(0, 0, d, 2)));
    assert_rejected(&b, &out, OutOfWindow, 1, 1);
    let out = deliver(&mut b, 2, Message::Prepare(prepare(0, 9, d, 2)));
    assert_rejected(&b, &out, OutOfWindow, 2, 2);
    let out = deliver(&mut b, 0, Message::PrePrepare(pre_prepare(0, 9, one_put())));
    assert_rejected(&b, &out, OutOfWindow, 3, 3);
    let out = deliver(&mut b, 2, Message::Commit(commit(0, 9, d, 2)));
    assert_rejected(&b, &out, OutOfWindow, 4, 4);
    // Seq 8 is the last one inside.
    let pp = pre_prepare(0, 8, one_put());
    let out = deliver(&mut b, 0, Message::PrePrepare(pp.clone()));
    assert_eq!(out.persist, vec![pbft_core::PersistOp::Accepted(pp)]);
    assert_eq!(b.rejected().total(), 4);
}

// ----- Duplicate -----

#[test]
fn repeated_phase_messages_are_duplicates() {
    let (mut b, d) = backup_with_pre_prepare();
    let out = deliver(&mut b, 0, Message::PrePrepare(pre_prepare(0, 1, one_put())));
    assert_rejected(&b, &out, Duplicate, 1, 1);
    deliver(&mut b, 3, Message::Prepare(prepare(0, 1, d, 3)));
    let out = deliver(&mut b, 3, Message::Prepare(prepare(0, 1, d, 3)));
    assert_rejected(&b, &out, Duplicate, 2, 2);
    deliver(&mut b, 3, Message::Commit(commit(0, 1, d, 3)));
    let out = deliver(&mut b, 3, Message::Commit(commit(0, 1, d, 3)));
    assert_rejected(&b, &out, Duplicate, 3, 3);
}

#[test]
fn repeated_checkpoint_is_a_duplicate() {
    let mut b = replica(1);
    let cp = checkpoint(4, Digest([1; 32]), 2);
    assert_eq!(
        deliver(&mut b, 2, Message::Checkpoint(cp.clone())),
        Output::default()
    );
    let out = deliver(&mut b, 2, Message::Checkpoint(cp));
    assert_rejected(&b, &out, Duplicate, 1, 1);
}

#[test]
fn own_or_repeated_view_change_is_a_duplicate() {
    let mut b = replica(2);
    let out = deliver(&mut b, 3, Message::ViewChange(view_change(2, 1, vec![])));
    assert_rejected(&b, &out, Duplicate, 1, 1);
    let vc = view_change(3, 1, vec![]);
    assert_eq!(
        deliver(&mut b, 3, Message::ViewChange(vc.clone())),
        Output::default()
    );
    let out = deliver(&mut b, 3, Message::ViewChange(vc));
    assert_rejected(&b, &out, Duplicate, 2, 2);
}

// ----- Conflicting -----

#[test]
fn equivocating_primary_and_backups_are_conflicting() {
    let (mut b, d) = backup_with_pre_prepare();
    let other = batch(&[put_req(2, 1)]);
    let out = deliver(
        &mut b,
        0,
        Message::PrePrepare(pre_prepare(0, 1, other.clone())),
    );
    assert_rejected(&b, &out, Conflicting, 1, 1);
    deliver(&mut b, 3, Message::Prepare(prepare(0, 1, d, 3)));
    let out = deliver(
        &mut b,
        3,
        Message::Prepare(prepare(0, 1, other.digest(), 3)),
    );
    assert_rejected(&b, &out, Conflicting, 2, 2);
    deliver(&mut b, 3, Message::Commit(commit(0, 1, d, 3)));
    let out = deliver(&mut b, 3, Message::Commit(commit(0, 1, other.digest(), 3)));
    assert_rejected(&b, &out, Conflicting, 3, 3);
}

#[test]
fn checkpoint_with_a_second_digest_is_conflicting() {
    let mut b = replica(1);
    deliver(
        &mut b,
        2,
        Message::Checkpoint(checkpoint(4, Digest([1; 32]), 2)),
    );
    let out = deliver(
        &mut b,
        2,
        Message::Checkpoint(checkpoint(4, Digest([2; 32]), 2)),
    );
    assert_rejected(&b, &out, Conflicting, 1, 1);
}

#[test]
fn second_different_view_change_for_the_same_view_is_conflicting() {
    let mut b = replica(2);
    deliver(&mut b, 3, Message::ViewChange(view_change(3, 1, vec![])));
    let other = view_change(3, 1, vec![prepared_proof(0, 1, one_put())]);
    let out = deliver(&mut b, 3, Message::ViewChange(other));
    assert_rejected(&b, &out, Conflicting, 1, 1);
}

/// A view change for an older view than one already held from the same replica is what an
/// honest replica's messages look like after the network reordered them, not equivocation,
/// which is what `Conflicting` is documented to mean (`StaleView` is the nearest fit).
#[test]
fn older_view_change_after_a_newer_one_is_not_conflicting() {
    let mut b = replica(2);
    deliver(&mut b, 3, Message::ViewChange(view_change(3, 2, vec![])));
    let out = deliver(&mut b, 3, Message::ViewChange(view_change(3, 1, vec![])));
    assert_eq!(out.events.len(), 1);
    assert_eq!(b.rejected().total(), 1);
    assert_eq!(b.rejected().get(Conflicting), 0);
}

// ----- WrongPhase -----

#[test]
fn prepare_from_the_primary_is_the_wrong_phase() {
    let (mut b, d) = backup_with_pre_prepare();
    let out = deliver(&mut b, 0, Message::Prepare(prepare(0, 1, d, 0)));
    assert_rejected(&b, &out, WrongPhase, 1, 1);
}

#[test]
fn pre_prepare_at_the_primary_is_the_wrong_phase() {
    let mut p = replica(0);
    let out = deliver(&mut p, 0, Message::PrePrepare(pre_prepare(0, 1, one_put())));
    assert_rejected(&p, &out, WrongPhase, 1, 1);
}

#[test]
fn phase_messages_during_a_view_change_are_the_wrong_phase() {
    let mut b = replica_in_view(2, 1, true);
    let d = one_put().digest();
    let out = deliver(&mut b, 1, Message::PrePrepare(pre_prepare(1, 1, one_put())));
    assert_rejected(&b, &out, WrongPhase, 1, 1);
    let out = deliver(&mut b, 3, Message::Prepare(prepare(1, 1, d, 3)));
    assert_rejected(&b, &out, WrongPhase, 2, 2);
}

#[test]
fn sync_messages_outside_a_sync_are_the_wrong_phase() {
    let mut b = replica(1);
    // Sync requests are for the adapter's state provider, never the core.
    let out = deliver(
        &mut b,
        2,
        Message::SyncRequest(SyncRequest {
            from_height: 1,
            max_blocks: 4,
        }),
    );
    assert_rejected(&b, &out, WrongPhase, 1, 1);
    let out = deliver(
        &mut b,
        2,
        Message::SyncResponse(SyncResponse {
            blocks: vec![],
            checkpoint: None,
        }),
    );
    assert_rejected(&b, &out, WrongPhase, 2, 2);
}

// ----- Malformed -----

#[test]
fn oversized_or_keyless_requests_are_malformed() {
    let mut p = replica(0);
    // Key and value of 64 bytes in all are allowed (max_request_bytes = 64), 65 are not.
    let big = request(1, 1, put("k", &"v".repeat(64)));
    let out = submit(&mut p, big);
    assert_rejected(&p, &out, Malformed, 1, 1);
    let empty = request(1, 1, Operation::Delete { key: vec![] });
    let out = submit(&mut p, empty);
    assert_rejected(&p, &out, Malformed, 2, 2);
    let fits = request(1, 1, put("k", &"v".repeat(63)));
    assert_eq!(submit(&mut p, fits).messages.len(), 1);
}

#[test]
fn batch_over_max_batch_is_malformed() {
    let mut b = replica(1);
    let reqs: Vec<_> = (1..=5).map(|c| put_req(c, 1)).collect();
    let out = deliver(
        &mut b,
        0,
        Message::PrePrepare(pre_prepare(0, 1, batch(&reqs))),
    );
    assert_rejected(&b, &out, Malformed, 1, 1);
}

#[test]
fn pre_prepare_carrying_a_bad_request_is_refused_for_it() {
    // By the designated voucher of sequence 1 (the others refuse it later: t15_vouching).
    let mut b = replica(2);
    let mut forged = put_req(1, 1);
    forged.timestamp = 2;
    let out = deliver(
        &mut b,
        0,
        Message::PrePrepare(pre_prepare(0, 1, batch(&[put_req(2, 1), forged]))),
    );
    assert_rejected(&b, &out, BadSignature, 1, 1);
}

#[test]
fn checkpoint_off_the_interval_is_malformed() {
    let mut b = replica(1);
    let out = deliver(
        &mut b,
        2,
        Message::Checkpoint(checkpoint(3, Digest([1; 32]), 2)),
    );
    assert_rejected(&b, &out, Malformed, 1, 1);
    let out = deliver(
        &mut b,
        2,
        Message::Checkpoint(checkpoint(0, Digest::ZERO, 2)),
    );
    assert_rejected(&b, &out, Malformed, 2, 2);
}

// ----- StaleRequest / Overloaded -----

#[test]
fn request_older_than_the_clients_last_executed_one_is_stale() {
    let mut c = Cluster::new();
    c.submit(0, put_req(1, 5));
    let b = c.replica_mut(1);
    let out = submit(b, put_req(1, 4));
    assert_rejected(b, &out, StaleRequest, 1, 1);
}

#[test]
fn full_request_queue_is_overloaded() {
    let cfg = pbft_core::Config {
        max_pending_requests: 1,
        ..config()
    };
    let mut p = replica_with(cfg, 0);
    submit(&mut p, put_req(1, 1)); // proposed at once
    assert_eq!(submit(&mut p, put_req(2, 1)), Output::default()); // queued
    let out = submit(&mut p, put_req(3, 1));
    assert_rejected(&p, &out, Overloaded, 1, 1);
}

// ----- InvalidCertificate -----

#[test]
fn view_change_with_a_forged_prepared_proof_is_an_invalid_certificate() {
    let mut b = replica(2);
    // One of the two prepares is signed by the wrong key: 1 valid of the 2f = 2 needed.
    let mut proof = prepared_proof(0, 1, one_put());
    proof.prepares[1] = sign(3, proof.prepares[1].body.clone());
    let out = deliver(
        &mut b,
        3,
        Message::ViewChange(view_change(3, 1, vec![proof])),
    );
    assert_rejected(&b, &out, InvalidCertificate, 1, 1);

    // The same prepare twice counts once.
    let mut proof = prepared_proof(0, 1, one_put());
    proof.prepares[1] = proof.prepares[0].clone();
    let out = deliver(
        &mut b,
        3,
        Message::ViewChange(view_change(3, 1, vec![proof])),
    );
    assert_rejected(&b, &out, InvalidCertificate, 2, 2);

    // The primary's own prepare does not count.
    let proof = prepared_proof(0, 1, one_put());
    let padded = PreparedProof {
        prepares: vec![proof.prepares[0].clone(), prepare(0, 1, proof.digest(), 0)],
        ..proof
    };
    let out = deliver(
        &mut b,
        3,
        Message::ViewChange(view_change(3, 1, vec![padded])),
    );
    assert_rejected(&b, &out, InvalidCertificate, 3, 3);

    // A pre-prepare whose digest is not its batch's.
    let mut proof = prepared_proof(0, 1, one_put());
    proof.pre_prepare = sign(
        0,
        PrePrepare {
            batch: batch(&[put_req(2, 1)]),
            ..proof.pre_prepare.body.clone()
        },
    );
    let out = deliver(
        &mut b,
        3,
        Message::ViewChange(view_change(3, 1, vec![proof])),
    );
    assert_rejected(&b, &out, InvalidCertificate, 4, 4);

    // A certificate from the view being changed to cannot exist yet.
    let proof = prepared_proof(1, 1, one_put());
    let out = deliver(
        &mut b,
        3,
        Message::ViewChange(view_change(3, 1, vec![proof])),
    );
    assert_rejected(&b, &out, InvalidCertificate, 5, 5);

    // Seq 9 is above stable_seq 0 + log_window 8.
    let proof = prepared_proof(0, 9, one_put());
    let out = deliver(
        &mut b,
        3,
        Message::ViewChange(view_change(3, 1, vec![proof])),
    );
    assert_rejected(&b, &out, InvalidCertificate, 6, 6);

    // Two certificates for one seq.
    let proofs = vec![
        prepared_proof(0, 1, one_put()),
        prepared_proof(0, 1, one_put()),
    ];
    let out = deliver(&mut b, 3, Message::ViewChange(view_change(3, 1, proofs)));
    assert_rejected(&b, &out, InvalidCertificate, 7, 7);
}

#[test]
fn view_change_with_a_short_checkpoint_proof_is_an_invalid_certificate() {
    let mut b = replica(2);
    let d = Digest([1; 32]);
    let vc = sign(
        3,
        ViewChange {
            new_view: 1,
            replica: r(3),
            stable_seq: 4,
            checkpoint_proof: vec![checkpoint(4, d, 0), checkpoint(4, d, 3)],
            prepared: vec![],
        },
    );
    let out = deliver(&mut b, 3, Message::ViewChange(vc));
    assert_rejected(&b, &out, InvalidCertificate, 1, 1);
    // A non-genesis stable checkpoint with no proof at all.
    let vc = sign(
        3,
        ViewChange {
            new_view: 1,
            replica: r(3),
            stable_seq: 4,
            checkpoint_proof: vec![],
            prepared: vec![],
        },
    );
    let out = deliver(&mut b, 3, Message::ViewChange(vc));
    assert_rejected(&b, &out, InvalidCertificate, 2, 2);
}

#[test]
fn new_view_that_differs_from_the_recomputation_is_an_invalid_certificate() {
    let mut b = replica_in_view(2, 1, true);
    let (vcs, pps) = new_view_1_parts();

    // The null batch that fills the gap at seq 1 is missing.
    let out = deliver(&mut b, 1, new_view(1, 1, vcs.clone(), pps[1..].to_vec()));
    assert_rejected(&b, &out, InvalidCertificate, 1, 1);

    // The prepared batch at seq 2 is replaced by another one.
    let swapped = vec![pps[0].clone(), pre_prepare(1, 2, batch(&[put_req(2, 1)]))];
    let out = deliver(&mut b, 1, new_view(1, 1, vcs.clone(), swapped));
    assert_rejected(&b, &out, InvalidCertificate, 2, 2);

    // The prepared batch is dropped, as if never prepared.
    let nulls = vec![pps[0].clone(), pre_prepare(1, 2, Batch::default())];
    let out = deliver(&mut b, 1, new_view(1, 1, vcs.clone(), nulls));
    assert_rejected(&b, &out, InvalidCertificate, 3, 3);

    // An extra pre-prepare beyond the highest prepared seq.
    let mut extra = pps.clone();
    extra.push(pre_prepare(1, 3, batch(&[put_req(2, 1)])));
    let out = deliver(&mut b, 1, new_view(1, 1, vcs.clone(), extra));
    assert_rejected(&b, &out, InvalidCertificate, 4, 4);

    // Only 2f view changes.
    let out = deliver(&mut b, 1, new_view(1, 1, vcs[..2].to_vec(), pps.clone()));
    assert_rejected(&b, &out, InvalidCertificate, 5, 5);

    // 2f+1 view changes, but two of them from the same replica.
    let twice = vec![vcs[0].clone(), vcs[1].clone(), vcs[1].clone()];
    let out = deliver(&mut b, 1, new_view(1, 1, twice, pps.clone()));
    assert_rejected(&b, &out, InvalidCertificate, 6, 6);

    // A view change for another view.
    let other = vec![vcs[0].clone(), vcs[1].clone(), view_change(3, 2, vec![])];
    let out = deliver(&mut b, 1, new_view(1, 1, other, pps.clone()));
    assert_rejected(&b, &out, InvalidCertificate, 7, 7);

    // A recomputed pre-prepare not signed by the new primary.
    let mut unsigned = pps.clone();
    unsigned[0].signature = Signature::INVALID;
    let out = deliver(&mut b, 1, new_view(1, 1, vcs.clone(), unsigned));
    assert_rejected(&b, &out, InvalidCertificate, 8, 8);

    // Through all that the replica kept waiting for view 1; the genuine one is accepted.
    assert!(b.status().view_change_in_progress);
    let out = deliver(&mut b, 1, new_view(1, 1, vcs, pps));
    assert_eq!(b.rejected().total(), 8);
    assert!(!out.persist.is_empty());
    assert!(!b.status().view_change_in_progress);
}

#[test]
fn every_reject_reason_has_a_distinct_name() {
    let names: std::collections::BTreeSet<_> =
        RejectReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(names.len(), RejectReason::ALL.len());
    assert_eq!(BadSyncData.to_string(), "bad_sync_data");
}

// ----- requests checked in one signature batch -----

/// Collects the requests of every pre-prepare in `out`.
fn proposed(out: &Output) -> Vec<Request> {
    out.messages
        .iter()
        .filter_map(|e| match &e.msg {
            Message::PrePrepare(m) => Some(m.body.batch.requests().to_vec()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn requests_submitted_together_are_judged_one_by_one() {
    let mut p = replica(0);
    let mut forged = put_req(2, 1);
    forged.signature = put_req(6, 1).signature;
    let unknown = Request {
        client: UNKNOWN_CLIENT,
        ..put_req(7, 1)
    };
    let good = [put_req(1, 1), put_req(3, 1), put_req(4, 1), put_req(5, 1)];
    let mut together = vec![good[0].clone(), forged, good[1].clone(), unknown];
    together.extend_from_slice(&good[2..]);
    p.handle(Input::Requests(together));
    let mut out = p.take_output();
    out.messages.extend(tick(&mut p, 2).messages);
    assert_eq!(p.rejected().get(BadSignature), 1);
    assert_eq!(p.rejected().get(UnknownSender), 1);
    assert_eq!(p.rejected().total(), 2);
    assert_eq!(
        proposed(&out),
        good.to_vec(),
        "the good ones, in arrival order"
    );
}

#[test]
fn a_full_batch_of_fresh_requests_is_verified_and_prepared() {
    let mut b = replica(1);
    let requests: Vec<Request> = (1..=4).map(|c| put_req(c, 1)).collect();
    let out = deliver(
        &mut b,
        0,
        Message::PrePrepare(pre_prepare(0, 1, batch(&requests))),
    );
    assert_eq!(b.rejected().total(), 0);
    assert!(
        out.messages
            .iter()
            .any(|e| matches!(e.msg, Message::Prepare(_))),
        "the backup votes for the batch: {out:?}"
    );
}

#[test]
fn one_forged_request_in_a_full_batch_refuses_the_pre_prepare() {
    // Replica 2 is the designated voucher of sequence 1 in view 0: it checks before preparing.
    let mut b = replica(2);
    let mut requests: Vec<Request> = (1..=4).map(|c| put_req(c, 1)).collect();
    requests[2].timestamp = 9;
    let out = deliver(
        &mut b,
        0,
        Message::PrePrepare(pre_prepare(0, 1, batch(&requests))),
    );
    assert_rejected(&b, &out, BadSignature, 1, 1);
}
