//! The client side of PBFT, free of I/O: timestamps, retransmission, and the rule that a
//! result counts only when f+1 replicas (so at least one honest) reported it.

use std::collections::BTreeMap;

use crate::crypto::Signer;
use crate::message::primary;
use crate::output::Target;
use crate::request::{OpResult, Operation, Reply, Request};
use crate::types::{ClientId, ReplicaId, Tick, View};

/// Why the client refused a call.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("a request is already outstanding; PBFT clients issue one at a time")]
    Busy,
}

/// A request to put on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientSend {
    pub to: Target,
    pub request: Request,
}

/// A request whose result f+1 replicas agreed on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completed {
    pub timestamp: u64,
    pub result: OpResult,
    /// Replicas whose matching replies made the result count.
    pub voters: Vec<ReplicaId>,
}

#[derive(Clone, Debug)]
struct Pending {
    request: Request,
    sent_at: Tick,
    replies: BTreeMap<ReplicaId, Reply>,
}

/// One client's protocol state.
pub struct ClientCore {
    id: ClientId,
    signer: Box<dyn Signer>,
    n: usize,
    next_timestamp: u64,
    view_hint: View,
    retransmit_after: Tick,
    now: Tick,
    pending: Option<Pending>,
}

impl ClientCore {
    /// `first_timestamp` must exceed every timestamp this client id used before (adapters
    /// use wall-clock nanoseconds so a restarted client stays fresh).
    pub fn new(
        id: ClientId,
        signer: Box<dyn Signer>,
        n: usize,
        retransmit_after: Tick,
        first_timestamp: u64,
    ) -> Self {
        ClientCore {
            id,
            signer,
            n,
            next_timestamp: first_timestamp.max(1),
            view_hint: 0,
            retransmit_after: retransmit_after.max(1),
            now: 0,
            pending: None,
        }
    }

    pub fn id(&self) -> ClientId {
        self.id
    }

    fn f(&self) -> usize {
        crate::config::max_faulty(self.n)
    }

    /// Signs a new request and says where to send it: the primary it believes in.
    pub fn submit(&mut self, op: Operation) -> Result<ClientSend, ClientError> {
        if self.pending.is_some() {
            return Err(ClientError::Busy);
        }
        let ts = self.next_timestamp;
        self.next_timestamp += 1;
        let request = Request::new_signed(self.id, ts, op, self.signer.as_ref());
        self.pending = Some(Pending {
            request: request.clone(),
            sent_at: self.now,
            replies: BTreeMap::new(),
        });
        Ok(ClientSend {
            to: Target::Replica(primary(self.view_hint, self.n)),
            request,
        })
    }

    /// The outstanding request, if any.
    pub fn pending(&self) -> Option<&Request> {
        self.pending.as_ref().map(|p| &p.request)
    }

    /// A reply arrived from `from` (as the transport authenticated it). Returns the result
    /// once f+1 distinct replicas sent matching replies for the outstanding request.
    pub fn on_reply(&mut self, from: ReplicaId, reply: Reply) -> Option<Completed> {
        let need = self.f() + 1;
        let p = self.pending.as_mut()?;
        if reply.replica != from
            || (from.0 as usize) >= self.n
            || reply.client != self.id
            || reply.timestamp != p.request.timestamp
        {
            return None;
        }
        p.replies.insert(from, reply.clone());
        let voters: Vec<ReplicaId> = p
            .replies
            .iter()
            .filter(|(_, r)| r.result == reply.result)
            .map(|(id, _)| *id)
            .collect();
        if voters.len() < need {
            return None;
        }
        // The view to send the next request's primary by: the (f+1)-th highest among the
        // matching replies, which at least one correct replica has reached. The highest
        // alone could be a faulty replica's invention (view k·n + its own id, k huge), which
        // would send every later request to it, to be dropped, for good.
        let mut views: Vec<View> = p
            .replies
            .values()
            .filter(|r| r.result == reply.result)
            .map(|r| r.view)
            .collect();
        views.sort_unstable_by(|a, b| b.cmp(a));
        if let Some(&vouched) = views.get(need - 1) {
            self.view_hint = self.view_hint.max(vouched);
        }
        let done = Completed {
            timestamp: reply.timestamp,
            result: reply.result,
            voters,
        };
        self.pending = None;
        Some(done)
    }

    /// Advances time; returns a retransmission to every replica when the outstanding request
    /// has waited too long (the primary may be faulty: backups will then suspect it).
    pub fn tick(&mut self) -> Option<ClientSend> {
        self.now += 1;
        let p = self.pending.as_mut()?;
        if self.now.saturating_sub(p.sent_at) < self.retransmit_after {
            return None;
        }
        p.sent_at = self.now;
        Some(ClientSend {
            to: Target::All,
            request: p.request.clone(),
        })
    }

    /// Gives up on the outstanding request (the caller reports a timeout). Its timestamp is
    /// never reused, so a late execution cannot be confused with a later request.
    pub fn abandon(&mut self) -> Option<Request> {
        self.pending.take().map(|p| p.request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Ed25519Signer;

    fn client() -> ClientCore {
        ClientCore::new(
            ClientId(1),
            Box::new(Ed25519Signer::from_secret([9; 32])),
            4,
            10,
            1,
        )
    }

    fn reply(from: u32, ts: u64, result: OpResult) -> Reply {
        Reply {
            view: 0,
            timestamp: ts,
            client: ClientId(1),
            replica: ReplicaId(from),
            result,
        }
    }

    #[test]
    fn needs_f_plus_one_matching_replies_from_distinct_replicas() {
        let mut c = client();
        let send = c
            .submit(Operation::Get { key: b"k".to_vec() })
            .expect("idle client");
        assert_eq!(send.to, Target::Replica(ReplicaId(0)));
        let ts = send.request.timestamp;
        let good = OpResult::Value(Some(b"v".to_vec()));
        let bad = OpResult::Value(None);
        assert_eq!(c.on_reply(ReplicaId(3), reply(3, ts, bad.clone())), None);
        assert_eq!(c.on_reply(ReplicaId(0), reply(0, ts, good.clone())), None);
        // The same replica twice is one vote; a reply claiming another sender is ignored.
        assert_eq!(c.on_reply(ReplicaId(0), reply(0, ts, good.clone())), None);
        assert_eq!(c.on_reply(ReplicaId(3), reply(1, ts, good.clone())), None);
        // A reply for another timestamp does not count.
        assert_eq!(
            c.on_reply(ReplicaId(1), reply(1, ts + 1, good.clone())),
            None
        );
        let done = c
            .on_reply(ReplicaId(1), reply(1, ts, good.clone()))
            .expect("f+1 matching");
        assert_eq!(done.result, good);
        assert_eq!(done.voters, vec![ReplicaId(0), ReplicaId(1)]);
        assert!(c.pending().is_none());
    }

    /// A faulty replica that reports a huge view in an otherwise correct reply must not
    /// choose the primary of every later request (itself, to drop them); a view f+1
    /// replicas report is followed.
    #[test]
    fn the_primary_follows_a_view_f_plus_one_replicas_report() {
        let mut c = client();
        let put = || Operation::Put {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
        };
        let ts = c.submit(put()).expect("idle").request.timestamp;
        let lie = Reply {
            view: 1_000_000 * 4 + 3,
            ..reply(3, ts, OpResult::Written)
        };
        assert!(c.on_reply(ReplicaId(3), lie).is_none());
        c.on_reply(ReplicaId(1), reply(1, ts, OpResult::Written))
            .expect("f+1 matching");
        let next = c.submit(put()).expect("idle");
        assert_eq!(
            next.to,
            Target::Replica(ReplicaId(0)),
            "still view 0's primary"
        );
        // Two replicas in view 5: its primary, replica 1, is where requests go now.
        let ts = next.request.timestamp;
        for from in [2, 3] {
            let moved = Reply {
                view: 5,
                ..reply(from, ts, OpResult::Written)
            };
            let _ = c.on_reply(ReplicaId(from), moved);
        }
        let after = c.submit(put()).expect("idle");
        assert_eq!(after.to, Target::Replica(ReplicaId(1)));
    }

    #[test]
    fn one_request_at_a_time_and_retransmits_to_all() {
        let mut c = client();
        c.submit(Operation::Get { key: b"k".to_vec() }).unwrap();
        assert_eq!(
            c.submit(Operation::Get { key: b"k".to_vec() }),
            Err(ClientError::Busy)
        );
        for _ in 0..9 {
            assert!(c.tick().is_none());
        }
        let again = c.tick().expect("timeout");
        assert_eq!(again.to, Target::All);
        let abandoned = c.abandon().unwrap();
        let next = c.submit(Operation::Get { key: b"k".to_vec() }).unwrap();
        assert!(next.request.timestamp > abandoned.timestamp);
    }
}
