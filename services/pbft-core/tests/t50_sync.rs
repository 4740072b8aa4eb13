//! State sync: a lagging replica verifies and applies certified blocks from a sync response
//! (exact blocks, events and the checkpoint it then adopts), asks for the rest in chunks,
//! refuses forged data (bad certificate, broken hash link, swapped batch, forged results,
//! oversized or empty answers) as `BadSyncData` and moves to another peer, replaces a silent
//! peer after the sync timeout, and catches up end to end inside a cluster.

mod common;

use common::*;
use pbft_core::{
    Block, CheckpointCert, Config, Digest, Event, Message, Output, PersistOp, RejectReason,
    Replica, Signature, StableCheckpoint, StateDigest, StateProvider, StatusAnnouncement,
    SyncRequest, SyncResponse,
};

/// A cluster that executed `count` requests without replica 3, and replica 3 taken out of
/// it after hearing the checkpoint votes for seq 4: it is syncing from replica 0.
fn syncing_replica(count: u64) -> (Cluster, Replica) {
    syncing_replica_with(count, None)
}

/// [`syncing_replica`], with replica 3 replaced by a fresh one running `cfg` if given.
fn syncing_replica_with(count: u64, cfg: Option<Config>) -> (Cluster, Replica) {
    syncing_replica_after(count, cfg, |_| {})
}

/// [`syncing_replica_with`], where `before` acts on replica 3 before it hears the votes.
fn syncing_replica_after(
    count: u64,
    cfg: Option<Config>,
    before: impl FnOnce(&mut Replica),
) -> (Cluster, Replica) {
    let mut c = Cluster::new();
    c.isolate(3);
    for client in 1..=count {
        c.execute(client, 1);
    }
    let votes: Vec<_> = c
        .take_dropped_to(3)
        .into_iter()
        .filter(|(_, m)| matches!(m, Message::Checkpoint(cp) if cp.body.seq == 4))
        .collect();
    assert_eq!(votes.len(), 3);
    let mut lagging = c.replicas.remove(3);
    if let Some(cfg) = cfg {
        lagging = replica_with(cfg, 3);
    }
    before(&mut lagging);
    let mut last = Output::default();
    for (by, m) in votes {
        last = deliver(&mut lagging, by.0, m);
    }
    assert_eq!(
        last,
        Output {
            messages: vec![sync_request(0, 1)],
            events: vec![Event::SyncStarted { from: 1, target: 4 }],
            ..Output::default()
        }
    );
    (c, lagging)
}

fn sync_request(peer: u32, from_height: u64) -> pbft_core::Envelope {
    to(
        peer,
        Message::SyncRequest(SyncRequest {
            from_height,
            max_blocks: 4,
        }),
    )
}

fn blocks(c: &Cluster, from: u64, count: usize) -> Vec<Block> {
    c.store(0).blocks_from(from, count).expect("memory store")
}

fn response(blocks: Vec<Block>) -> Message {
    Message::SyncResponse(SyncResponse {
        blocks,
        checkpoint: None,
    })
}

fn synced(height: u64) -> Event {
    Event::Executed {
        height,
        view: 0,
        requests: 1,
        synced: true,
    }
}

fn bad_sync_then_ask(peer: u32, from_height: u64) -> Output {
    Output {
        messages: vec![sync_request(peer, from_height)],
        events: vec![Event::Rejected {
            reason: RejectReason::BadSyncData,
        }],
        ..Output::default()
    }
}

#[test]
fn a_lagging_replica_applies_verified_blocks_and_adopts_the_checkpoint() {
    let (c, mut b) = syncing_replica(4);
    let chain = blocks(&c, 1, 4);
    let resp = SyncResponse {
        blocks: chain.clone(),
        checkpoint: c.store(0).checkpoints().expect("memory store").pop(),
    };
    let out = deliver(&mut b, 0, Message::SyncResponse(resp));

    let reference = c.replica(0);
    let d = pbft_core::checkpoint_digest(
        &reference.state().digest(reference.config().state_digest),
        &chain[3].hash(),
    );
    let mut persist: Vec<_> = chain.iter().cloned().map(PersistOp::Block).collect();
    persist.push(PersistOp::Checkpoint(StableCheckpoint {
        cert: CheckpointCert {
            seq: 4,
            digest: d,
            signatures: [0, 1, 2].map(|i| checkpoint(4, d, i)).to_vec(),
        },
        snapshot: std::sync::Arc::new(reference.state().snapshot()),
        block_hash: chain[3].hash(),
    }));
    persist.push(PersistOp::Prune { upto: 4 });
    assert_eq!(
        out,
        Output {
            persist,
            // The target is reached, but the peer may have blocks past its last checkpoint:
            // ask it for more until it answers with none.
            messages: vec![
                to_all(Message::Checkpoint(checkpoint(4, d, 3))),
                sync_request(0, 5)
            ],
            // Synced blocks were answered by the replicas that committed them.
            replies: vec![],
            events: vec![
                synced(1),
                synced(2),
                synced(3),
                synced(4),
                Event::CheckpointStable { seq: 4 },
            ],
        }
    );
    let s = b.status();
    assert_eq!(
        (
            s.last_executed,
            s.head_hash,
            s.stable_checkpoint,
            s.sync_target
        ),
        (4, reference.status().head_hash, 4, Some(4))
    );
    assert_eq!(b.state().snapshot(), reference.state().snapshot());
    // An empty answer at the target ends the sync, and is not held against the peer.
    let out = deliver(&mut b, 0, response(Vec::new()));
    assert_eq!(out, Output::default());
    assert_eq!(b.status().sync_target, None);
}

#[test]
fn a_partial_answer_asks_the_same_peer_for_the_rest() {
    let (c, mut b) = syncing_replica(4);
    let chain = blocks(&c, 1, 4);
    let out = deliver(&mut b, 0, response(chain[..2].to_vec()));
    assert_eq!(
        out,
        Output {
            persist: vec![
                PersistOp::Block(chain[0].clone()),
                PersistOp::Block(chain[1].clone())
            ],
            messages: vec![sync_request(0, 3)],
            events: vec![synced(1), synced(2)],
            ..Output::default()
        }
    );
    assert_eq!(b.status().sync_target, Some(4));
    // Blocks it already has are skipped, the rest applied.
    let out = deliver(&mut b, 0, response(chain[1..].to_vec()));
    assert_eq!(
        out.persist[..2],
        [
            PersistOp::Block(chain[2].clone()),
            PersistOp::Block(chain[3].clone())
        ]
    );
    assert_eq!(b.status().last_executed, 4);
    assert_eq!(out.messages.last(), Some(&sync_request(0, 5)));
    deliver(&mut b, 0, response(Vec::new()));
    assert_eq!(b.status().sync_target, None);
}

#[test]
fn a_block_with_a_forged_certificate_is_refused_and_another_peer_asked() {
    let (c, mut b) = syncing_replica(4);
    let chain = blocks(&c, 1, 4);
    let mut forged = chain[0].clone();
    forged.certificate[2].signature = Signature::INVALID;
    let out = deliver(&mut b, 0, response(vec![forged]));
    assert_eq!(out, bad_sync_then_ask(1, 1));
    assert_eq!(b.rejected().get(RejectReason::BadSyncData), 1);
    assert_eq!(b.status().last_executed, 0);

    // The replaced peer is no longer listened to.
    let out = deliver(&mut b, 0, response(chain.clone()));
    assert_eq!(out, rejected(RejectReason::WrongPhase));
    // The new one is.
    let out = deliver(&mut b, 1, response(chain));
    assert_eq!(out.events.len(), 5);
    assert_eq!(b.status().last_executed, 4);
}

#[test]
fn forged_certificates_of_every_kind_are_refused() {
    let (c, _) = syncing_replica(4);
    let chain = blocks(&c, 1, 4);
    let mut cases: Vec<(&str, Block)> = Vec::new();
    let mut short = chain[0].clone();
    short.certificate.pop();
    cases.push(("2f commits", short));
    let mut padded = chain[0].clone();
    padded.certificate[2] = padded.certificate[0].clone();
    cases.push(("one commit twice", padded));
    let mut other_view = chain[0].clone();
    other_view.view = 1;
    cases.push(("certificate for another view", other_view));
    let mut swapped = chain[0].clone();
    swapped.batch = batch(&[put_req(8, 1)]);
    cases.push(("batch swapped", swapped));
    let mut height = chain[1].clone();
    height.prev_hash = Digest::ZERO;
    cases.push(("block 2 at height 1", height));
    for (what, block) in cases {
        let mut b = fresh_syncing_replica();
        let out = deliver(&mut b, 0, response(vec![block]));
        assert_eq!(out, bad_sync_then_ask(1, 1), "{what}");
        assert_eq!(b.status().last_executed, 0, "{what}");
    }
}

/// A fresh replica 3 syncing towards 4 from peer 0, as [`syncing_replica`] leaves it.
fn fresh_syncing_replica() -> Replica {
    let mut b = replica(3);
    for i in 0..3 {
        deliver(
            &mut b,
            i,
            Message::Checkpoint(checkpoint(4, Digest([4; 32]), i)),
        );
    }
    assert_eq!(b.status().sync_target, Some(4));
    b
}

#[test]
fn a_block_that_breaks_the_hash_chain_is_refused_after_the_good_prefix() {
    let (c, mut b) = syncing_replica(4);
    let chain = blocks(&c, 1, 4);
    let mut broken = chain[1].clone();
    broken.prev_hash = Digest([1; 32]);
    let out = deliver(&mut b, 0, response(vec![chain[0].clone(), broken]));
    assert_eq!(
        out,
        Output {
            persist: vec![PersistOp::Block(chain[0].clone())],
            messages: vec![sync_request(1, 2)],
            events: vec![
                synced(1),
                Event::Rejected {
                    reason: RejectReason::BadSyncData
                }
            ],
            ..Output::default()
        }
    );
    assert_eq!(b.status().head_hash, chain[0].hash());
}

#[test]
fn a_block_with_forged_results_is_refused_but_its_certified_batch_is_kept() {
    let (c, mut b) = syncing_replica(4);
    let chain = blocks(&c, 1, 4);
    let mut forged = chain[0].clone();
    forged.results_digest = Digest([1; 32]);
    let out = deliver(&mut b, 0, response(vec![forged]));
    // The certificate proves the batch; the replica records its own results for it.
    assert_eq!(
        out,
        Output {
            persist: vec![PersistOp::Block(chain[0].clone())],
            messages: vec![sync_request(1, 2)],
            events: vec![
                synced(1),
                Event::Rejected {
                    reason: RejectReason::BadSyncData
                }
            ],
            ..Output::default()
        }
    );
}

/// A peer that records a forged state digest is caught and replaced. The block's batch is
/// still executed (its certificate proves it committed), so the next peer is asked for the
/// block after it.
#[test]
fn a_block_with_a_forged_state_digest_is_refused() {
    let (c, mut b) = syncing_replica(4);
    let mut chain = blocks(&c, 1, 4);
    chain[3].state_digest = Digest([1; 32]);
    let out = deliver(&mut b, 0, response(chain));
    assert_eq!(
        out.events.last(),
        Some(&Event::Rejected {
            reason: RejectReason::BadSyncData
        })
    );
    assert_eq!(out.messages.last(), Some(&sync_request(1, 5)));
    assert_eq!(b.status().last_executed, 4);
}

/// A replica configured with the other state digest scheme than its cluster's, syncing
/// from an empty store, finds every checkpoint block's digest at odds with its own. When
/// the checkpoint votes of f+1 replicas (one of them correct) certify its state digested
/// the other way, it must say which setting is wrong, not only refuse the block. A lying
/// peer alone cannot make it say so: it can compute that digest, not forge the votes.
#[test]
fn a_replica_with_the_other_state_digest_scheme_is_told_so() {
    let linear = Config {
        state_digest: StateDigest::Linear,
        ..config()
    };
    let (c, mut b) = syncing_replica_with(4, Some(linear));
    let out = deliver(&mut b, 0, response(blocks(&c, 1, 4)));
    assert_eq!(
        out.events[out.events.len() - 2..],
        [
            Event::StateDigestScheme {
                height: 4,
                configured: StateDigest::Linear,
                certified: StateDigest::Buckets,
            },
            Event::Rejected {
                reason: RejectReason::BadSyncData
            },
        ]
    );
    // A correctly configured replica whose peer records the state's digest under the
    // other scheme: bad data, no word about the setting.
    let (c, mut b) = syncing_replica(4);
    let mut chain = blocks(&c, 1, 4);
    chain[3].state_digest = c.replica(0).state().digest(StateDigest::Linear);
    let out = deliver(&mut b, 0, response(chain));
    assert_eq!(
        out.events.last(),
        Some(&Event::Rejected {
            reason: RejectReason::BadSyncData
        })
    );
    assert!(
        !out.events
            .iter()
            .any(|e| matches!(e, Event::StateDigestScheme { .. }))
    );
}

#[test]
fn more_blocks_than_asked_for_is_bad_sync_data() {
    let (c, mut b) = syncing_replica(5);
    let out = deliver(&mut b, 0, response(blocks(&c, 1, 5)));
    assert_eq!(out, bad_sync_then_ask(1, 1));
    assert_eq!(b.status().last_executed, 0);
}

#[test]
fn an_empty_answer_from_a_peer_that_claimed_more_is_bad_sync_data() {
    let (_, mut b) = syncing_replica(4);
    let out = deliver(&mut b, 0, response(vec![]));
    assert_eq!(out, bad_sync_then_ask(1, 1));
}

#[test]
fn an_answer_from_a_peer_that_was_not_asked_is_the_wrong_phase() {
    let (c, mut b) = syncing_replica(4);
    let out = deliver(&mut b, 2, response(blocks(&c, 1, 4)));
    assert_rejected(&b, &out, RejectReason::WrongPhase, 1, 1);
    assert_eq!(b.status().last_executed, 0);
}

#[test]
fn a_silent_peer_is_replaced_after_the_sync_timeout_in_turn() {
    let (_, mut b) = syncing_replica(4);
    assert_eq!(tick(&mut b, 9), Output::default());
    let ask = |peer| Output {
        messages: vec![sync_request(peer, 1)],
        ..Output::default()
    };
    assert_eq!(tick(&mut b, 1), ask(1));
    assert_eq!(tick(&mut b, 10), ask(2));
    // Every peer failed once: start over with the first.
    assert_eq!(tick(&mut b, 10), ask(0));
    assert_eq!(b.status().sync_target, Some(4));
}

#[test]
fn sync_prefers_peers_that_claim_to_be_ahead_and_skips_those_that_failed() {
    let mut b = replica(3);
    // Only replicas 1 and 2 claim checkpoint 12.
    deliver(
        &mut b,
        1,
        Message::Checkpoint(checkpoint(12, Digest([1; 32]), 1)),
    );
    let out = deliver(
        &mut b,
        2,
        Message::Checkpoint(checkpoint(12, Digest([1; 32]), 2)),
    );
    assert_eq!(out.messages, vec![sync_request(1, 1)]);
    let ask = |peer| Output {
        messages: vec![sync_request(peer, 1)],
        ..Output::default()
    };
    assert_eq!(tick(&mut b, 10), ask(2));
    // Both peers that are ahead failed: try the one left, then start over.
    assert_eq!(tick(&mut b, 10), ask(0));
    assert_eq!(tick(&mut b, 10), ask(1));
}

#[test]
fn a_replica_cut_off_for_two_checkpoints_catches_up_by_sync_in_chunks() {
    let mut c = Cluster::new();
    c.isolate(3);
    for client in 1..=8 {
        c.execute(client, 1);
    }
    c.heal();
    for client in 1..=4 {
        c.execute(client, 2);
    }
    let head = c.replica(0).status().head_hash;
    let s = c.replica(3).status();
    assert_eq!(
        (
            s.last_executed,
            s.head_hash,
            s.stable_checkpoint,
            s.sync_target
        ),
        (12, head, 12, None)
    );
    assert_eq!(
        c.replica(3).state().snapshot(),
        c.replica(0).state().snapshot()
    );
    let started: Vec<_> = c
        .events
        .iter()
        .filter(|(who, e)| *who == r(3) && matches!(e, Event::SyncStarted { .. }))
        .map(|(_, e)| e.clone())
        .collect();
    assert_eq!(
        started,
        vec![Event::SyncStarted {
            from: 1,
            target: 12
        }]
    );
    assert_eq!(c.store(3).height(), 12);
}

/// Between checkpoints there is no checkpoint vote to learn a height from: the status
/// announcements carry it. A replica cut off for two requests, then healed on an idle
/// cluster, fetches the two blocks once f+1 peers announce them and it has been stalled.
#[test]
fn status_announcements_bring_an_idle_laggard_up_to_date_between_checkpoints() {
    let cfg = Config {
        status_interval: 50,
        ..config()
    };
    let mut c = Cluster::with_config(cfg);
    c.isolate(3);
    c.execute(1, 1);
    c.execute(2, 1);
    c.heal();
    assert_eq!(c.replica(0).status().last_executed, 2);
    assert_eq!(c.replica(3).status().last_executed, 0);
    // Not before the replica has been without progress for a retransmit interval (1,000):
    // ordinary pipelining also leaves replicas a little behind.
    c.tick(900);
    assert_eq!(c.replica(3).status().last_executed, 0);
    c.tick(200);
    let s = c.replica(3).status();
    assert_eq!(
        (s.last_executed, s.head_hash),
        (2, c.replica(0).status().head_hash)
    );
    assert!(
        c.events
            .iter()
            .any(|(who, e)| *who == r(3) && *e == Event::SyncStarted { from: 1, target: 2 })
    );
}

/// One peer's claim is not enough (it may be lying); f+1 claims are, up to the lower one.
#[test]
fn one_status_announcement_ahead_is_not_enough_to_sync_f_plus_1_are() {
    let mut b = replica(3);
    tick(&mut b, 1_000);
    let ann = |by: u32, height| {
        Message::StatusAnnouncement(sign(
            by,
            StatusAnnouncement {
                view: 0,
                height,
                replica: r(by),
            },
        ))
    };
    assert_eq!(deliver(&mut b, 1, ann(1, 40)), Output::default());
    assert_eq!(
        deliver(&mut b, 2, ann(2, 7)),
        Output {
            messages: vec![sync_request(1, 1)],
            events: vec![Event::SyncStarted { from: 1, target: 7 }],
            ..Output::default()
        }
    );
    // A forged announcement (signed by someone else) is refused.
    let forged = Message::StatusAnnouncement(sign(
        0,
        StatusAnnouncement {
            view: 0,
            height: 99,
            replica: r(1),
        },
    ));
    let out = deliver(&mut b, 1, forged);
    assert_eq!(out, rejected(RejectReason::BadSignature));
}

/// While a replica syncs, its view-change timers would measure its own lag, not the
/// primary: the request it waits for may be in a block it has not fetched yet. A timer that
/// ran out then put a restarted replica alone into a view change the others never joined
/// (found by the multi-process test `shared_connections_serve_many_clients`). A timer
/// started during the sync runs a full timeout from its end, if the request is still not
/// executed.
#[test]
fn a_syncing_replica_does_not_blame_the_primary_for_its_own_lag() {
    let (c, mut b) = syncing_replica(4);
    let timeout = config().view_change_timeout;
    // A client's request, not yet ordered anywhere.
    submit(&mut b, put_req(8, 1));
    // The sync peers are slow: three timeouts go by, the peer changing at each sync timeout.
    let out = tick(&mut b, 3 * timeout);
    assert_no_view_change(&out, "while syncing");
    assert!(
        out.messages
            .iter()
            .any(|m| matches!(m.msg, Message::SyncRequest(_))),
        "the sync goes on"
    );
    // The waiting request still goes to the primary, in case it lacks it.
    assert!(
        out.messages
            .iter()
            .any(|m| *m == to(0, Message::Request(put_req(8, 1)))),
        "forwarded to the primary: {:?}",
        out.messages
    );
    let s = b.status();
    assert_eq!((s.view, s.view_change_in_progress), (0, false));

    // The sync ends (the last peer asked answers with the blocks, then with none).
    let peer = last_sync_peer(&out);
    deliver(&mut b, peer, response(blocks(&c, 1, 4)));
    deliver(&mut b, peer, response(Vec::new()));
    assert_eq!(b.status().sync_target, None);
    // Level now: the timer, started during the sync, runs a full timeout from its end.
    let out = tick(&mut b, timeout - 1);
    assert_no_view_change(&out, "before a full timeout after the sync");
    assert_view_change(&tick(&mut b, 1));
}

fn assert_view_change(out: &Output) {
    let started = Event::ViewChangeStarted { view: 1 };
    assert!(out.events.contains(&started), "{:?}", out.events);
}

fn assert_no_view_change(out: &Output, when: &str) {
    let started = out
        .events
        .iter()
        .any(|e| matches!(e, Event::ViewChangeStarted { .. }));
    assert!(!started, "a view change {when}: {:?}", out.events);
}

/// The timers stand still during a sync rather than restart after it: one started before
/// the sync runs out after the rest of its timeout. Restarting them instead would let a
/// primary that makes a backup sync briefly at every checkpoint keep its timers from ever
/// running out.
#[test]
fn a_sync_pauses_the_timers_it_does_not_restart_them() {
    let timeout = config().view_change_timeout;
    let (c, mut b) = syncing_replica_after(4, None, |b| {
        submit(b, put_req(8, 1));
        tick(b, timeout / 2);
    });
    let out = tick(&mut b, timeout);
    assert_no_view_change(&out, "while syncing");
    let peer = last_sync_peer(&out);
    deliver(&mut b, peer, response(blocks(&c, 1, 4)));
    deliver(&mut b, peer, response(Vec::new()));
    assert_eq!(b.status().sync_target, None);
    let out = tick(&mut b, timeout - timeout / 2 - 1);
    assert_no_view_change(&out, "before the timeout's rest after the sync");
    assert_view_change(&tick(&mut b, 1));
}

/// The peer the last sync request in `out` went to.
fn last_sync_peer(out: &Output) -> u32 {
    let peer = out
        .messages
        .iter()
        .rev()
        .find_map(|m| match (&m.to, &m.msg) {
            (pbft_core::Target::Replica(p), Message::SyncRequest(_)) => Some(p.0),
            _ => None,
        });
    match peer {
        Some(p) => p,
        None => panic!("no sync request in {:?}", out.messages),
    }
}
