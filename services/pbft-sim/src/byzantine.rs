//! Byzantine replicas. Each runs the honest core (so it knows the protocol state and holds
//! its own key) and then lies: it rewrites, multiplies or withholds what the core wanted to
//! send, re-signing with its own key where that makes the lie more convincing. It can only
//! forge what a real attacker could: it never has another replica's key.

use std::collections::{HashMap, VecDeque};

use pbft_core::{
    Batch, Block, ClientId, Commit, Digest, Ed25519Signer, Message, NewView, PrePrepare, Prepare,
    ReplicaId, Request, Signature, Signed, SyncResponse, ViewChange, primary,
};

use crate::rng::SimRng;

/// What a Byzantine replica does wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Behavior {
    /// As primary: different batches to different backups. As backup: votes for different
    /// digests to different replicas.
    Equivocate,
    /// Adds copies of its messages claiming other authors, and ones with garbage signatures.
    ForgeSignatures,
    /// Sends votes and pre-prepares whose digests do not match.
    WrongDigests,
    /// Re-signs its messages for older and newer views.
    StaleAndFutureViews,
    /// Re-sends old messages it received, to everyone.
    Replay,
    /// Sends nothing while it is the primary.
    SilentPrimary,
    /// Drops every request of the client it censors (client 0), so never proposes them.
    CensorClient,
    /// Different view changes to different replicas; a forged new view as new primary.
    ConflictingViewChanges,
    /// Serves forged or truncated blocks to replicas that sync from it.
    ForgeSync,
    /// As primary: adds to every batch a request its client never signed (the client's
    /// next timestamp, signed with the adversary's own key), and votes for the forged batch.
    /// As backup: vouches for every batch without checking it, and withholds its prepares
    /// from one replica.
    ForgeRequests,
}

/// The client a censoring primary ignores.
pub const CENSORED: ClientId = ClientId(0);

/// A Byzantine replica's private state: its key and what it has overheard.
pub struct Adversary {
    pub id: ReplicaId,
    pub behavior: Behavior,
    n: usize,
    key: Ed25519Signer,
    rng: SimRng,
    heard: VecDeque<Message>,
    /// ForgeRequests: the forged pre-prepare sent for each (view, seq).
    forged: HashMap<(u64, u64), Signed<PrePrepare>>,
}

impl Adversary {
    pub fn new(id: ReplicaId, behavior: Behavior, n: usize, secret: [u8; 32], rng: SimRng) -> Self {
        Adversary {
            id,
            behavior,
            n,
            key: Ed25519Signer::from_secret(secret),
            rng,
            heard: VecDeque::new(),
            forged: HashMap::new(),
        }
    }

    /// Whether the honest core gets to see this input at all.
    pub fn accepts_request(&self, req: &Request) -> bool {
        !(self.behavior == Behavior::CensorClient && req.client == CENSORED)
    }

    /// Remembers messages to replay later.
    pub fn overhear(&mut self, msg: &Message) {
        if self.behavior == Behavior::Replay && !matches!(msg, Message::SyncResponse(_)) {
            self.heard.push_back(msg.clone());
            if self.heard.len() > 256 {
                self.heard.pop_front();
            }
        }
    }

    fn other_replicas(&self) -> Vec<ReplicaId> {
        (0..self.n as u32)
            .map(ReplicaId)
            .filter(|r| *r != self.id)
            .collect()
    }

    /// Rewrites what the honest core wants to send (`to`, message) into what the adversary
    /// actually sends. `view` is the core's current view.
    pub fn corrupt(
        &mut self,
        view: u64,
        outgoing: Vec<(ReplicaId, Message)>,
    ) -> Vec<(ReplicaId, Message)> {
        let is_primary = primary(view, self.n) == self.id;
        let mut out = Vec::new();
        match self.behavior {
            Behavior::SilentPrimary if is_primary => return out,
            Behavior::SilentPrimary | Behavior::CensorClient | Behavior::ForgeSync => {
                return outgoing;
            }
            _ => {}
        }
        for (to, msg) in outgoing {
            match self.behavior {
                Behavior::Equivocate => out.push((to, self.equivocate(to, msg))),
                Behavior::ForgeSignatures => {
                    if let Some(forged) = self.forge(&msg) {
                        out.push((to, forged));
                    }
                    out.push((to, msg));
                }
                Behavior::WrongDigests => {
                    let msg = match msg {
                        // The pre-prepare signature covers the digest, not the batch: send
                        // half the backups a different batch under the same signed digest.
                        Message::PrePrepare(pp) if self.second_group(to) => {
                            let mut pp = pp;
                            pp.body.batch = alternative_batch(&pp.body.batch);
                            Message::PrePrepare(pp)
                        }
                        msg if self.rng.chance(60) => self.wrong_digest(msg),
                        msg => msg,
                    };
                    out.push((to, msg));
                }
                Behavior::StaleAndFutureViews => {
                    if let Some(shifted) = self.shift_view(&msg) {
                        out.push((to, shifted));
                    }
                    out.push((to, msg));
                }
                Behavior::Replay => {
                    out.push((to, msg));
                    if !self.heard.is_empty() && self.rng.chance(30) {
                        let i = self.rng.range(0, self.heard.len() as u64 - 1) as usize;
                        out.push((to, self.heard[i].clone()));
                    }
                }
                Behavior::ConflictingViewChanges => {
                    out.push((to, self.conflicting_view_change(to, msg)));
                }
                Behavior::ForgeRequests => {
                    // Its vouches are withheld from one replica, which must then get them
                    // from correct replicas (their upgraded prepares) or check itself.
                    let withheld = matches!(&msg, Message::Prepare(_))
                        && self.other_replicas().first() == Some(&to);
                    if !withheld {
                        out.push((to, self.forge_requests(msg)));
                    }
                }
                Behavior::SilentPrimary | Behavior::CensorClient | Behavior::ForgeSync => {
                    out.push((to, msg));
                }
            }
        }
        out
    }

    /// ForgeRequests: a pre-prepare gains a forged request (the same forgery for every
    /// backup); prepares and commits follow the forged batch, and every prepare vouches.
    fn forge_requests(&mut self, msg: Message) -> Message {
        match msg {
            Message::PrePrepare(pp) => {
                let key = (pp.body.view, pp.body.seq);
                if let Some(forged) = self.forged.get(&key) {
                    return Message::PrePrepare(forged.clone());
                }
                let mut requests = pp.body.batch.requests().to_vec();
                let Some(victim) = requests.first().map(|r| (r.client, r.timestamp)) else {
                    return Message::PrePrepare(pp);
                };
                let op = pbft_core::Operation::Put {
                    key: b"forged".to_vec(),
                    value: b"by the primary".to_vec(),
                };
                requests.push(Request::new_signed(victim.0, victim.1 + 1, op, &self.key));
                let batch = Batch::new(requests);
                let forged = Signed::sign(
                    PrePrepare {
                        digest: batch.digest(),
                        batch,
                        ..pp.body
                    },
                    &self.key,
                );
                self.forged.insert(key, forged.clone());
                Message::PrePrepare(forged)
            }
            Message::Prepare(p) => {
                let digest = self
                    .forged
                    .get(&(p.body.view, p.body.seq))
                    .map_or(p.body.digest, |f| f.body.digest);
                Message::Prepare(Signed::sign(
                    Prepare {
                        digest,
                        vouches: true,
                        ..p.body
                    },
                    &self.key,
                ))
            }
            Message::Commit(c) => match self.forged.get(&(c.body.view, c.body.seq)) {
                Some(f) => Message::Commit(Signed::sign(
                    Commit {
                        digest: f.body.digest,
                        ..c.body
                    },
                    &self.key,
                )),
                None => Message::Commit(c),
            },
            other => other,
        }
    }

    /// Replicas in the "upper half" get the alternative story.
    fn second_group(&self, to: ReplicaId) -> bool {
        let others = self.other_replicas();
        others.iter().position(|r| *r == to).unwrap_or(0) >= others.len() / 2
    }

    fn equivocate(&mut self, to: ReplicaId, msg: Message) -> Message {
        if !self.second_group(to) {
            return msg;
        }
        match msg {
            Message::PrePrepare(pp) => {
                let batch = alternative_batch(&pp.body.batch);
                Message::PrePrepare(Signed::sign(
                    PrePrepare {
                        digest: batch.digest(),
                        batch,
                        ..pp.body
                    },
                    &self.key,
                ))
            }
            Message::Prepare(p) => Message::Prepare(Signed::sign(
                Prepare {
                    digest: self.alt_digest(p.body.digest),
                    ..p.body
                },
                &self.key,
            )),
            Message::Commit(c) => Message::Commit(Signed::sign(
                Commit {
                    digest: self.alt_digest(c.body.digest),
                    ..c.body
                },
                &self.key,
            )),
            other => other,
        }
    }

    /// A digest a backup in the second group could plausibly have seen: the equivocated
    /// batch's digest is unknown here, so use a deterministic variant.
    fn alt_digest(&mut self, d: Digest) -> Digest {
        let mut x = d.0;
        x[0] ^= 0xff;
        Digest(x)
    }

    fn forge(&mut self, msg: &Message) -> Option<Message> {
        let victim = *self.rng.pick(&self.other_replicas());
        Some(match msg {
            Message::Prepare(p) => Message::Prepare(Signed {
                body: Prepare {
                    replica: victim,
                    ..p.body.clone()
                },
                signature: p.signature,
            }),
            Message::Commit(c) => Message::Commit(Signed {
                body: Commit {
                    replica: victim,
                    digest: self.alt_digest(c.body.digest),
                    ..c.body.clone()
                },
                signature: Signature(self.rng_sig()),
            }),
            Message::PrePrepare(pp) => {
                // A pre-prepare for a view whose primary is someone else, with our signature.
                Message::PrePrepare(Signed {
                    body: PrePrepare {
                        view: pp.body.view + 1,
                        ..pp.body.clone()
                    },
                    signature: pp.signature,
                })
            }
            Message::Checkpoint(c) => Message::Checkpoint(Signed {
                body: pbft_core::Checkpoint {
                    replica: victim,
                    state_digest: self.alt_digest(c.body.state_digest),
                    ..c.body.clone()
                },
                signature: c.signature,
            }),
            Message::ViewChange(vc) => Message::ViewChange(Signed {
                body: ViewChange {
                    replica: victim,
                    new_view: vc.body.new_view + 1,
                    ..vc.body.clone()
                },
                signature: vc.signature,
            }),
            Message::Request(r) => Message::Request(Request {
                timestamp: r.timestamp + 1_000,
                ..r.clone()
            }),
            _ => return None,
        })
    }

    fn rng_sig(&mut self) -> [u8; 64] {
        let mut s = [0u8; 64];
        s[..32].copy_from_slice(&self.rng.bytes32());
        s[32..].copy_from_slice(&self.rng.bytes32());
        s
    }

    fn wrong_digest(&mut self, msg: Message) -> Message {
        match msg {
            Message::PrePrepare(pp) => {
                // Signed correctly, but the digest describes a different batch.
                let digest = self.alt_digest(pp.body.digest);
                Message::PrePrepare(Signed::sign(PrePrepare { digest, ..pp.body }, &self.key))
            }
            Message::Prepare(p) => Message::Prepare(Signed::sign(
                Prepare {
                    digest: Digest(self.rng.bytes32()),
                    ..p.body
                },
                &self.key,
            )),
            Message::Commit(c) => Message::Commit(Signed::sign(
                Commit {
                    digest: Digest(self.rng.bytes32()),
                    ..c.body
                },
                &self.key,
            )),
            Message::Checkpoint(c) => Message::Checkpoint(Signed::sign(
                pbft_core::Checkpoint {
                    state_digest: Digest(self.rng.bytes32()),
                    ..c.body
                },
                &self.key,
            )),
            other => other,
        }
    }

    fn shift_view(&mut self, msg: &Message) -> Option<Message> {
        let delta: i64 = *self.rng.pick(&[-2, -1, 1, 2, 5]);
        let shift = |v: u64| v.saturating_add_signed(delta);
        Some(match msg {
            Message::PrePrepare(pp) => Message::PrePrepare(Signed::sign(
                PrePrepare {
                    view: shift(pp.body.view),
                    ..pp.body.clone()
                },
                &self.key,
            )),
            Message::Prepare(p) => Message::Prepare(Signed::sign(
                Prepare {
                    view: shift(p.body.view),
                    ..p.body.clone()
                },
                &self.key,
            )),
            Message::Commit(c) => Message::Commit(Signed::sign(
                Commit {
                    view: shift(c.body.view),
                    ..c.body.clone()
                },
                &self.key,
            )),
            Message::ViewChange(vc) => Message::ViewChange(Signed::sign(
                ViewChange {
                    new_view: shift(vc.body.new_view),
                    ..vc.body.clone()
                },
                &self.key,
            )),
            _ => return None,
        })
    }

    fn conflicting_view_change(&mut self, to: ReplicaId, msg: Message) -> Message {
        match msg {
            Message::ViewChange(vc) if self.second_group(to) => {
                // Claim nothing was prepared: if believed, committed requests would be lost.
                Message::ViewChange(Signed::sign(
                    ViewChange {
                        prepared: Vec::new(),
                        ..vc.body
                    },
                    &self.key,
                ))
            }
            Message::ViewChange(vc) => {
                // Claim a prepared certificate that does not exist.
                let mut body = vc.body;
                let seq = body.stable_seq + 1;
                let batch = Batch::default();
                let pp = Signed::sign(
                    PrePrepare {
                        view: body.new_view.saturating_sub(1),
                        seq,
                        digest: batch.digest(),
                        batch,
                    },
                    &self.key,
                );
                body.prepared.retain(|p| p.seq() != seq);
                body.prepared.push(pbft_core::PreparedProof {
                    pre_prepare: pp,
                    prepares: Vec::new(),
                });
                Message::ViewChange(Signed::sign(body, &self.key))
            }
            Message::NewView(nv) => {
                // Drop the batches the view changes carried: replace them with null requests.
                let pre_prepares = nv
                    .body
                    .pre_prepares
                    .into_iter()
                    .map(|pp| {
                        let batch = Batch::default();
                        Signed::sign(
                            PrePrepare {
                                digest: batch.digest(),
                                batch,
                                ..pp.body
                            },
                            &self.key,
                        )
                    })
                    .collect();
                Message::NewView(Signed::sign(
                    NewView {
                        pre_prepares,
                        ..nv.body
                    },
                    &self.key,
                ))
            }
            other => other,
        }
    }

    /// What this replica answers to a sync request, given the honest answer.
    pub fn corrupt_sync(&mut self, honest: SyncResponse) -> SyncResponse {
        if self.behavior != Behavior::ForgeSync {
            return honest;
        }
        let mut resp = honest;
        match self.rng.range(0, 3) {
            0 => {
                // Truncated: nothing at all.
                resp.blocks.clear();
            }
            1 => {
                // A different batch under the original certificate.
                if let Some(b) = resp.blocks.first_mut() {
                    forge_block(b);
                }
            }
            2 => {
                // Broken link.
                if let Some(b) = resp.blocks.last_mut() {
                    b.prev_hash = Digest([7; 32]);
                }
            }
            _ => {
                // Certificate stripped to a single vote.
                for b in &mut resp.blocks {
                    b.certificate.truncate(1);
                }
            }
        }
        resp
    }
}

/// A different batch built from the same requests: reversed, or empty if that changes
/// nothing.
fn alternative_batch(batch: &Batch) -> Batch {
    let mut requests = batch.requests().to_vec();
    if requests.len() > 1 {
        requests.reverse();
    } else {
        requests.clear();
    }
    Batch::new(requests)
}

fn forge_block(b: &mut Block) {
    let requests = b.batch.requests_mut();
    requests.reverse();
    if requests.len() < 2 {
        requests.clear();
    }
    b.results_digest = Digest([9; 32]);
}
