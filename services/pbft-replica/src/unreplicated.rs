//! The unreplicated baseline: the same service (signature checks, execution on the same KV
//! store, blocks fsync'd to the same redb store, the same gRPC client API) without consensus.
//! It exists so `pbft bench --unreplicated` can report what replication costs, measured in
//! the same run. It tolerates no faults; never deploy it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pbft_core::kv::{reply_for, results_digest};
use pbft_core::{
    Batch, Block, Digest, KeyRing, KvStore, PersistOp, ReplicaId, Reply, Request, Storage,
};
use tokio::sync::oneshot;
use tracing::info;

use crate::metrics::Metrics;
use crate::node::{Inbound, ReplyRoute};
use crate::status::{SharedStatus, StatusView};
use crate::storage::RedbStore;

const MAX_BATCH: usize = 512;

/// Where a request's reply goes: its `Submit` call, or its client's stream.
type Answer = (Option<oneshot::Sender<Reply>>, Option<ReplyRoute>);

/// Executes submitted requests in arrival order, in batches, persisting each batch as a
/// block before replying.
pub fn run_loop(
    mut store: RedbStore,
    ring: Arc<KeyRing>,
    rx: Receiver<Inbound>,
    status: Arc<SharedStatus>,
    metrics: Metrics,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let mut kv = KvStore::default();
    let mut head = Digest::ZERO;
    let mut height = 0u64;
    for block in store.recover().context("recover")?.blocks {
        kv.execute(&block.batch);
        head = block.hash();
        height = block.height;
    }
    info!(height, "unreplicated baseline recovered");
    while !stop.load(Ordering::Relaxed) {
        let first = match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(x) => x,
            Err(RecvTimeoutError::Timeout) => {
                status.beat();
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut inputs = vec![first];
        while inputs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(x) => inputs.push(x),
                Err(_) => break,
            }
        }
        // Signatures are checked in one batch, as the replicated path does, so that the
        // ratio the benchmark reports is the cost of replication and nothing else.
        let submitted: Vec<(Request, Answer)> = inputs
            .into_iter()
            .filter_map(|input| match input {
                Inbound::Submit {
                    request,
                    reply,
                    route,
                } => Some((request, (reply, route))),
                Inbound::Message { .. } => None,
            })
            .collect();
        let refs: Vec<&Request> = submitted.iter().map(|(r, _)| r).collect();
        let verdicts = Request::verify_all(&refs, ring.as_ref());
        let mut requests = Vec::new();
        let mut waiters = Vec::new();
        for ((request, answer), ok) in submitted.into_iter().zip(verdicts) {
            if ok {
                waiters.push((request.client, request.timestamp, answer, Instant::now()));
                requests.push(request);
            } else {
                metrics.rejected.with_label_values(&["bad_signature"]).inc();
            }
        }
        if requests.is_empty() {
            continue;
        }
        let batch = Batch::new(requests);
        let results = kv.execute(&batch);
        height += 1;
        let block = Block {
            height,
            prev_hash: head,
            results_digest: results_digest(&results),
            state_digest: Digest::ZERO,
            view: 0,
            certificate: Vec::new(),
            batch,
        };
        head = block.hash();
        let t = Instant::now();
        store.persist(&[PersistOp::Block(block)])?;
        metrics.storage_latency.observe(t.elapsed().as_secs_f64());
        metrics.committed_height.set(height as i64);
        metrics.batch_size.observe(results.len() as f64);
        for exec in &results {
            let Some(reply) = reply_for(0, ReplicaId(0), exec) else {
                continue;
            };
            if let Some(i) = waiters
                .iter()
                .position(|(c, ts, _, _)| *c == reply.client && *ts == reply.timestamp)
            {
                let (_, _, (tx, route), since) = waiters.swap_remove(i);
                metrics
                    .commit_latency
                    .observe(since.elapsed().as_secs_f64());
                match (tx, route) {
                    (Some(tx), _) => {
                        let _ = tx.send(reply);
                    }
                    // A `SubmitBatches` request: answered down its stream, never blocking.
                    (None, Some(route)) => {
                        let _ = route.try_send(reply);
                    }
                    (None, None) => {}
                }
            }
        }
        status.set(StatusView {
            n: 1,
            height,
            head_hash: head.to_hex(),
            transport: "unreplicated".into(),
            ..StatusView::default()
        });
        status.beat();
    }
    Ok(())
}
