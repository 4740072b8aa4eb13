//! Crash recovery: a replica rebuilt from the [`MemStore`] its outputs were persisted to has
//! the same head, state, checkpoint and view; damaged stored blocks make `Replica::recover`
//! fail; and what was persisted before a crash still binds the restarted replica (no second
//! batch at a sequence number it accepted, no reuse of sequence numbers it proposed, prepared
//! certificates carried into the next view change).

mod common;

use common::*;
use pbft_core::{
    BlockError, CheckpointCert, Config, ConfigError, Error, Event, Input, MemStore, Message,
    Output, PersistOp, PreparedProof, Recovered, RejectReason, Replica, StableCheckpoint,
    StateDigest, Storage, checkpoint_digest,
};

/// Persists what `rep` decided since its output was last taken, then restarts it from `store`.
fn restart(id: u32, store: &mut MemStore, rep: &mut Replica) -> Replica {
    store
        .persist(&rep.take_output().persist)
        .expect("memory store");
    recovered(id, store.recover().expect("memory store"))
}

fn assert_same(a: &Replica, b: &Replica) {
    assert_eq!(a.status(), b.status());
    assert_eq!(a.state().snapshot(), b.state().snapshot());
    assert_eq!(a.stable_checkpoint(), b.stable_checkpoint());
}

#[test]
fn a_replica_recovered_from_its_store_matches_the_one_that_wrote_it() {
    let mut c = Cluster::new();
    for client in 1..=6 {
        c.execute(client, 1);
    }
    for i in 0..4 {
        let mut back = recovered(i, c.store(i).recover().expect("memory store"));
        let s = back.status();
        // Checkpoint 4 plus blocks 5 and 6 replayed on top.
        assert_eq!(
            (s.stable_checkpoint, s.last_executed),
            (4, 6),
            "replica {i}"
        );
        assert_same(&back, c.replica(i));
        // Replay rebuilt state; it emits nothing (that was persisted and sent before).
        assert_eq!(back.take_output(), Output::default());
    }
}

#[test]
fn recovery_keeps_the_view_entered_by_a_view_change() {
    let mut c = Cluster::new();
    c.isolate(0);
    for i in 1..4 {
        c.submit(i, put_req(1, 1));
    }
    c.tick(20);
    for i in 1..4 {
        let back = recovered(i, c.store(i).recover().expect("memory store"));
        let s = back.status();
        assert_eq!(
            (s.view, s.view_change_in_progress, s.last_executed),
            (1, false, 1)
        );
        assert_same(&back, c.replica(i));
    }
}

#[test]
fn a_replica_that_crashed_mid_view_change_is_still_changing() {
    let mut b = replica(1);
    let mut store = MemStore::new();
    b.handle(Input::Request(put_req(1, 1)));
    for _ in 0..20 {
        b.handle(Input::Tick);
    }
    assert!(b.status().view_change_in_progress);
    let mut back = restart(1, &mut store, &mut b);
    let s = back.status();
    assert_eq!((s.view, s.view_change_in_progress), (1, true));
    // Normal-case traffic for view 1 is refused until a new view arrives.
    let out = deliver(
        &mut back,
        1,
        Message::PrePrepare(pre_prepare(1, 1, batch(&[put_req(1, 1)]))),
    );
    assert_eq!(out, rejected(RejectReason::WrongPhase));
}

#[test]
fn a_restarted_backup_will_not_prepare_another_batch_at_the_same_seq() {
    let mut b = replica(1);
    let mut store = MemStore::new();
    let pp = pre_prepare(0, 1, batch(&[put_req(1, 1)]));
    let d = pp.body.digest;
    b.handle(Input::Receive {
        from: from(0),
        msg: Message::PrePrepare(pp.clone()),
    });
    let mut back = restart(1, &mut store, &mut b);

    // The primary equivocates after the crash: refused as before it.
    let other = pre_prepare(0, 1, batch(&[put_req(2, 1)]));
    let out = deliver(&mut back, 0, Message::PrePrepare(other));
    assert_rejected(&back, &out, RejectReason::Conflicting, 1, 1);
    let out = deliver(&mut back, 0, Message::PrePrepare(pp.clone()));
    assert_rejected(&back, &out, RejectReason::Duplicate, 1, 2);

    // Its own prepare from before the crash still counts: one more makes it prepared.
    let out = deliver(&mut back, 2, Message::Prepare(prepare(0, 1, d, 2)));
    assert_eq!(
        out,
        Output {
            persist: vec![PersistOp::Prepared(PreparedProof {
                pre_prepare: pp,
                prepares: vec![prepare(0, 1, d, 1), prepare(0, 1, d, 2)],
            })],
            messages: vec![to_all(Message::Commit(commit(0, 1, d, 1)))],
            ..Output::default()
        }
    );
}

#[test]
fn a_restarted_primary_does_not_reuse_sequence_numbers_it_proposed() {
    let mut p = replica(0);
    let mut store = MemStore::new();
    p.handle(Input::Request(put_req(1, 1)));
    p.handle(Input::Request(put_req(2, 1)));
    p.handle(Input::Tick);
    let mut back = restart(0, &mut store, &mut p);
    let q = put_req(3, 1);
    // Seqs 1 and 2 are still in flight: the request waits batch_delay, then takes seq 3.
    assert_eq!(submit(&mut back, q.clone()), Output::default());
    let pp = pre_prepare(0, 3, batch(&[q]));
    assert_eq!(
        tick(&mut back, 1),
        Output {
            persist: vec![PersistOp::Accepted(pp.clone())],
            messages: vec![to_all(Message::PrePrepare(pp))],
            ..Output::default()
        }
    );
}

#[test]
fn prepared_certificates_survive_a_restart_into_the_next_view_change() {
    // Replica 2 vouches for seq 1 (as replica 1's prepare in the proof does).
    let mut b = replica(2);
    let mut store = MemStore::new();
    let proof = prepared_proof(0, 1, batch(&[put_req(1, 1)]));
    b.handle(Input::Receive {
        from: from(0),
        msg: Message::PrePrepare(proof.pre_prepare.clone()),
    });
    b.handle(Input::Receive {
        from: from(1),
        msg: Message::Prepare(proof.prepares[0].clone()),
    });
    let mut back = restart(2, &mut store, &mut b);
    deliver(&mut back, 1, Message::ViewChange(view_change(1, 1, vec![])));
    let out = deliver(&mut back, 3, Message::ViewChange(view_change(3, 1, vec![])));
    assert_eq!(
        out.messages[0],
        to_all(Message::ViewChange(view_change(2, 1, vec![proof])))
    );
    assert_eq!(out.events[0], Event::ViewChangeStarted { view: 1 });
}

#[test]
fn accepted_pre_prepares_of_an_older_view_do_not_bind_the_new_one() {
    let old = pre_prepare(0, 1, batch(&[put_req(1, 1)]));
    let mut b = recovered(
        2,
        Recovered {
            view: 1,
            accepted: vec![old],
            ..Recovered::default()
        },
    );
    let pp = pre_prepare(1, 1, batch(&[put_req(2, 1)]));
    let out = deliver(&mut b, 1, Message::PrePrepare(pp.clone()));
    assert_eq!(out.persist, vec![PersistOp::Accepted(pp)]);
    assert_eq!(b.rejected().total(), 0);
}

/// A store whose replica 1 executed 6 blocks on top of stable checkpoint 4.
fn stored_after_six() -> Recovered {
    let mut c = Cluster::new();
    for client in 1..=6 {
        c.execute(client, 1);
    }
    let rec = c.store(1).recover().expect("memory store");
    assert_eq!(
        rec.blocks.iter().map(|b| b.height).collect::<Vec<_>>(),
        [5, 6]
    );
    rec
}

fn recovery_error(state: Recovered) -> BlockError {
    match try_recover(1, state) {
        Err(Error::Recovery(e)) => e,
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("damaged state recovered"),
    }
}

/// A stored checkpoint certified under the other state digest scheme is a configuration
/// error that names the setting (running on would split the cluster's checkpoints); a state
/// that matches neither is refused as damaged.
#[test]
fn a_checkpoint_certified_under_another_state_digest_names_the_setting() {
    let rec = stored_after_six();
    let cp = rec.checkpoint.clone().expect("stable checkpoint 4");
    let linear = cp.snapshot.digest(StateDigest::Linear);
    let mut relabelled = rec.clone();
    relabelled.checkpoint = Some(StableCheckpoint {
        cert: CheckpointCert {
            digest: checkpoint_digest(&linear, &cp.block_hash),
            ..cp.cert.clone()
        },
        ..cp.clone()
    });
    match try_recover(1, relabelled.clone()) {
        Err(e @ Error::StateDigestScheme { .. }) => {
            let m = e.to_string();
            assert!(
                m.contains("protocol.state_digest: linear") && m.contains("stateDigest: linear"),
                "{m}"
            );
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("recovered under the wrong scheme"),
    }
    // Configured for the scheme it was certified with, it recovers.
    let cfg = Config {
        state_digest: StateDigest::Linear,
        ..config()
    };
    let back = Replica::recover(cfg, r(1), Box::new(replica_key(1)), keyring(), relabelled)
        .expect("recovers under its own scheme");
    assert_eq!(back.status().last_executed, 6);

    let mut damaged = rec;
    let mut snapshot = (*cp.snapshot).clone();
    snapshot.insert(b"planted", b"x");
    damaged.checkpoint = Some(StableCheckpoint {
        snapshot: std::sync::Arc::new(snapshot),
        ..cp
    });
    assert!(matches!(
        try_recover(1, damaged),
        Err(Error::StateMismatch(4))
    ));
}

#[test]
fn a_stored_block_with_wrong_results_fails_recovery() {
    let mut rec = stored_after_six();
    rec.blocks[0].results_digest = pbft_core::Digest([1; 32]);
    assert_eq!(recovery_error(rec), BlockError::Results { height: 5 });
}

#[test]
fn a_stored_block_that_breaks_the_chain_fails_recovery() {
    let mut rec = stored_after_six();
    rec.blocks[1].prev_hash = pbft_core::Digest([1; 32]);
    assert_eq!(recovery_error(rec), BlockError::BrokenLink { height: 6 });
}

#[test]
fn a_missing_stored_block_fails_recovery() {
    let mut rec = stored_after_six();
    rec.blocks.remove(0);
    assert_eq!(
        recovery_error(rec),
        BlockError::Height {
            expected: 5,
            got: 6
        }
    );
}

#[test]
fn a_stored_block_with_a_wrong_state_digest_fails_recovery() {
    // No stable checkpoint at replica 1: blocks 1..=4 are all replayed, 4 records the state.
    let mut c = Cluster::new();
    c.set_drop(|_, to, m| to == r(1) && matches!(m, Message::Checkpoint(_)));
    for client in 1..=4 {
        c.execute(client, 1);
    }
    let rec = c.store(1).recover().expect("memory store");
    assert_eq!(rec.checkpoint, None);

    let mut damaged = rec.clone();
    damaged.blocks[3].state_digest = pbft_core::Digest([1; 32]);
    assert_eq!(recovery_error(damaged), BlockError::State { height: 4 });
    // Off checkpoint heights the digest must be zero.
    let mut damaged = rec.clone();
    damaged.blocks[1].state_digest = pbft_core::Digest([1; 32]);
    assert_eq!(recovery_error(damaged), BlockError::State { height: 2 });
    // The undamaged store recovers.
    assert_eq!(recovered(1, rec).status().last_executed, 4);
}

#[test]
fn a_replica_id_outside_the_cluster_or_a_bad_config_is_refused() {
    let err = Replica::new(config(), r(4), Box::new(replica_key(4)), keyring());
    assert!(matches!(err, Err(Error::UnknownReplica(id)) if id == r(4)));
    let cfg = Config { n: 5, ..config() };
    let err = Replica::new(cfg, r(0), Box::new(replica_key(0)), keyring());
    assert!(matches!(
        err,
        Err(Error::Config(ConfigError::ReplicaCount(5)))
    ));
    let cfg = Config {
        log_window: 3,
        ..config()
    };
    let err = Replica::new(cfg, r(0), Box::new(replica_key(0)), keyring());
    assert!(matches!(
        err,
        Err(Error::Config(ConfigError::Window {
            window: 3,
            interval: 4
        }))
    ));
}
