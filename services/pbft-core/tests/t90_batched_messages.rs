//! Messages handed over together (`Input::ReceiveMany`) have their signatures checked in
//! one batch; the replica must then decide exactly what it decides when they arrive one by
//! one, forged signatures included.

mod common;

use common::*;
use pbft_core::{Input, Message, Output, Prepare, RejectReason, Signed, Source};

/// Merges the outputs of one-by-one delivery into the one output of a single input.
fn merged(outs: Vec<Output>) -> Output {
    let mut all = Output::default();
    for o in outs {
        all.persist.extend(o.persist);
        all.messages.extend(o.messages);
        all.replies.extend(o.replies);
        all.events.extend(o.events);
    }
    all
}

/// A whole normal-case round at backup 1 (pre-prepare, prepares, commits, then a
/// checkpoint-free execution), with forgeries mixed in:
/// - a prepare claiming replica 2 that reuses replica 2's real signature over other bytes
///   (in the same batch as the genuine one, so only the signed bytes tell them apart);
/// - a prepare whose signature is garbage;
/// - a commit claiming replica 3, signed by replica 2.
fn round_with_forgeries() -> Vec<(Source, Message)> {
    let b = batch(&[put_req(1, 1), put_req(2, 1)]);
    let pp = pre_prepare(0, 1, b);
    let d = pp.body.digest;
    let genuine = prepare(0, 1, d, 2);
    let replayed = Signed {
        body: Prepare {
            seq: 2,
            ..genuine.body.clone()
        },
        signature: genuine.signature,
    };
    let mut garbage = prepare(0, 1, d, 3);
    garbage.signature.0[7] ^= 0x40;
    let mut wrong_author = commit(0, 1, d, 2);
    wrong_author.body.replica = r(3);
    vec![
        (from(0), Message::PrePrepare(pp)),
        (from(2), Message::Prepare(genuine)),
        (from(2), Message::Prepare(replayed)),
        (from(3), Message::Prepare(garbage)),
        (from(3), Message::Prepare(prepare(0, 1, d, 3))),
        (from(3), Message::Commit(wrong_author)),
        (from(0), Message::Commit(commit(0, 1, d, 0))),
        (from(2), Message::Commit(commit(0, 1, d, 2))),
        (from(3), Message::Commit(commit(0, 1, d, 3))),
    ]
}

#[test]
fn messages_received_together_act_as_if_received_one_by_one() {
    let msgs = round_with_forgeries();

    let mut alone = replica(1);
    let outs: Vec<Output> = msgs
        .iter()
        .cloned()
        .map(|(from, msg)| {
            alone.handle(Input::Receive { from, msg });
            alone.take_output()
        })
        .collect();
    let alone_out = merged(outs);

    let mut together = replica(1);
    together.handle(Input::ReceiveMany(msgs));
    let together_out = together.take_output();

    assert_eq!(together_out, alone_out);
    assert_eq!(together.status(), alone.status());
    assert_eq!(together.rejected(), alone.rejected());
    // The round committed, and each forgery was refused for its signature.
    assert_eq!(together.status().last_executed, 1);
    assert_eq!(together.rejected().get(RejectReason::BadSignature), 3);
}

#[test]
fn a_batch_of_only_good_signatures_is_accepted_whole() {
    let msgs: Vec<(Source, Message)> = round_with_forgeries()
        .into_iter()
        .enumerate()
        .filter(|(i, _)| ![2, 3, 5].contains(i))
        .map(|(_, m)| m)
        .collect();
    let mut rep = replica(1);
    rep.handle(Input::ReceiveMany(msgs));
    assert_eq!(rep.status().last_executed, 1);
    assert_eq!(rep.rejected().total(), 0);
}
