//! The safety properties checked after every step of a simulation. Each check compares what
//! one honest replica or client just did against what every other honest participant did
//! before, so the first violating step is the one reported.

use std::collections::HashMap;

use pbft_core::{Block, ClientId, Completed, Digest, OpResult, Reply, Request, Seq};

/// A broken property, with enough detail to start debugging from.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error(
        "agreement: replica {replica} committed block {height} with hash {got}, replica {other} committed {expected}"
    )]
    Agreement {
        height: Seq,
        replica: usize,
        got: Digest,
        other: usize,
        expected: Digest,
    },
    #[error(
        "checkpoint: replica {replica} has state digest {got} at {seq}, replica {other} has {expected}"
    )]
    Checkpoint {
        seq: Seq,
        replica: usize,
        got: Digest,
        other: usize,
        expected: Digest,
    },
    #[error("replies: honest replicas gave different results for {client} ts {timestamp}")]
    Replies { client: ClientId, timestamp: u64 },
    #[error(
        "client {client} accepted {result:?} for ts {timestamp}, which no honest replica executed"
    )]
    Acceptance {
        client: ClientId,
        timestamp: u64,
        result: OpResult,
    },
    #[error(
        "forgery: replica {replica} committed at height {height} a request of {client} ts {timestamp} that the client never sent"
    )]
    Forged {
        height: Seq,
        replica: usize,
        client: ClientId,
        timestamp: u64,
    },
    #[error("replica {replica} failed to recover from its durable state: {error}")]
    Recovery { replica: usize, error: String },
    #[error(
        "liveness: {pending} client requests still pending {waited} ms after the network healed"
    )]
    Liveness { pending: usize, waited: u64 },
}

/// Everything honest participants have said so far.
#[derive(Default)]
pub struct Invariants {
    blocks: HashMap<Seq, (Digest, usize)>,
    checkpoints: HashMap<Seq, (Digest, usize)>,
    executed: HashMap<(ClientId, u64), OpResult>,
    /// Every request a client sent, exactly as signed.
    submitted: HashMap<(ClientId, u64), Request>,
}

impl Invariants {
    /// Records a request as its client sent it.
    pub fn on_submit(&mut self, req: &Request) {
        self.submitted
            .insert((req.client, req.timestamp), req.clone());
    }

    /// No two honest replicas commit different blocks at one height, and every request in
    /// an honest replica's block is one its client sent.
    pub fn on_block(&mut self, replica: usize, block: &Block) -> Result<(), Violation> {
        for req in block.batch.requests() {
            if self.submitted.get(&(req.client, req.timestamp)) != Some(req) {
                return Err(Violation::Forged {
                    height: block.height,
                    replica,
                    client: req.client,
                    timestamp: req.timestamp,
                });
            }
        }
        let hash = block.hash();
        match self.blocks.get(&block.height) {
            Some((expected, other)) if *expected != hash => Err(Violation::Agreement {
                height: block.height,
                replica,
                got: hash,
                other: *other,
                expected: *expected,
            }),
            Some(_) => Ok(()),
            None => {
                self.blocks.insert(block.height, (hash, replica));
                Ok(())
            }
        }
    }

    /// Honest replicas' checkpoint digests agree at every checkpoint.
    pub fn on_checkpoint(
        &mut self,
        replica: usize,
        seq: Seq,
        digest: Digest,
    ) -> Result<(), Violation> {
        match self.checkpoints.get(&seq) {
            Some((expected, other)) if *expected != digest => Err(Violation::Checkpoint {
                seq,
                replica,
                got: digest,
                other: *other,
                expected: *expected,
            }),
            Some(_) => Ok(()),
            None => {
                self.checkpoints.insert(seq, (digest, replica));
                Ok(())
            }
        }
    }

    /// Records what an honest replica executed, as its reply says.
    pub fn on_honest_reply(&mut self, reply: &Reply) -> Result<(), Violation> {
        let key = (reply.client, reply.timestamp);
        match self.executed.get(&key) {
            Some(r) if *r != reply.result => Err(Violation::Replies {
                client: reply.client,
                timestamp: reply.timestamp,
            }),
            Some(_) => Ok(()),
            None => {
                self.executed.insert(key, reply.result.clone());
                Ok(())
            }
        }
    }

    /// A client may only accept a result an honest replica executed.
    pub fn on_accept(&self, client: ClientId, done: &Completed) -> Result<(), Violation> {
        match self.executed.get(&(client, done.timestamp)) {
            Some(r) if *r == done.result => Ok(()),
            _ => Err(Violation::Acceptance {
                client,
                timestamp: done.timestamp,
                result: done.result.clone(),
            }),
        }
    }

    /// Highest height any honest replica committed.
    pub fn max_height(&self) -> Seq {
        self.blocks.keys().copied().max().unwrap_or(0)
    }
}
