//! The replicated application: a key-value store plus the per-client reply table.
//!
//! Both are part of the replicated state: the client table decides whether a request is a
//! retry, so it must be identical on every honest replica and travel with snapshots.

use std::collections::BTreeMap;

use crate::encode::{Encoder, tag};
use crate::request::{Batch, OpResult, Operation, Reply};
use crate::types::{ClientId, Digest, ReplicaId, View};

/// The last request executed for a client and the result it got, so a retry of it is answered
/// from here instead of being executed twice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientRecord {
    pub timestamp: u64,
    pub result: OpResult,
}

/// The whole replicated state, as saved at a stable checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub entries: BTreeMap<Vec<u8>, Vec<u8>>,
    pub clients: BTreeMap<ClientId, ClientRecord>,
}

/// The deterministic state machine every replica executes committed batches on.
#[derive(Clone, Debug, Default)]
pub struct KvStore {
    state: Snapshot,
}

/// The outcome of executing one request of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Executed {
    /// Executed now, with this result.
    Done(ClientId, u64, OpResult),
    /// Skipped: the client already had this or a later timestamp executed.
    Duplicate(ClientId, u64),
}

impl KvStore {
    pub fn from_snapshot(state: Snapshot) -> Self {
        KvStore { state }
    }

    pub fn snapshot(&self) -> Snapshot {
        self.state.clone()
    }

    pub fn get(&self, key: &[u8]) -> Option<&Vec<u8>> {
        self.state.entries.get(key)
    }

    pub fn len(&self) -> usize {
        self.state.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.state.entries.is_empty()
    }

    /// Last executed request of a client, if any.
    pub fn client(&self, id: ClientId) -> Option<&ClientRecord> {
        self.state.clients.get(&id)
    }

    fn apply(&mut self, op: &Operation) -> OpResult {
        let entries = &mut self.state.entries;
        match op {
            Operation::Put { key, value } => {
                entries.insert(key.clone(), value.clone());
                OpResult::Written
            }
            Operation::Get { key } => OpResult::Value(entries.get(key).cloned()),
            Operation::Delete { key } => OpResult::Deleted(entries.remove(key).is_some()),
            Operation::Cas { key, expected, new } => {
                let current = entries.get(key);
                if current == expected.as_ref() {
                    entries.insert(key.clone(), new.clone());
                    OpResult::CasOk
                } else {
                    OpResult::CasMismatch(current.cloned())
                }
            }
        }
    }

    /// Executes a committed batch in order, skipping requests whose timestamp is not newer
    /// than the client's last executed one.
    pub fn execute(&mut self, batch: &Batch) -> Vec<Executed> {
        batch
            .requests
            .iter()
            .map(|r| {
                let last = self.state.clients.get(&r.client).map(|c| c.timestamp);
                if last.is_some_and(|ts| ts >= r.timestamp) {
                    return Executed::Duplicate(r.client, r.timestamp);
                }
                let result = self.apply(&r.op);
                self.state.clients.insert(
                    r.client,
                    ClientRecord {
                        timestamp: r.timestamp,
                        result: result.clone(),
                    },
                );
                Executed::Done(r.client, r.timestamp, result)
            })
            .collect()
    }

    /// Digest of the whole state. Computed at checkpoints only: it is linear in the state size.
    pub fn digest(&self) -> Digest {
        let mut e = Encoder::new(tag::STATE);
        e.u64(self.state.entries.len() as u64);
        for (k, v) in &self.state.entries {
            e.bytes(k).bytes(v);
        }
        e.u64(self.state.clients.len() as u64);
        for (c, rec) in &self.state.clients {
            e.u64(c.0).u64(rec.timestamp);
            rec.result.encode(&mut e);
        }
        e.hash()
    }
}

/// Digest of a batch's execution results, recorded in its block.
pub fn results_digest(results: &[Executed]) -> Digest {
    let mut e = Encoder::new(tag::RESULTS);
    e.u64(results.len() as u64);
    for r in results {
        match r {
            Executed::Done(c, ts, res) => {
                e.u8(1).u64(c.0).u64(*ts);
                res.encode(&mut e);
            }
            Executed::Duplicate(c, ts) => {
                e.u8(2).u64(c.0).u64(*ts);
            }
        }
    }
    e.hash()
}

/// The reply a replica sends for an executed request.
pub fn reply_for(view: View, replica: ReplicaId, exec: &Executed) -> Option<Reply> {
    match exec {
        Executed::Done(client, ts, result) => Some(Reply {
            view,
            timestamp: *ts,
            client: *client,
            replica,
            result: result.clone(),
        }),
        Executed::Duplicate(..) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Ed25519Signer;
    use crate::request::Request;

    fn req(ts: u64, op: Operation) -> Request {
        Request::new_signed(ClientId(1), ts, op, &Ed25519Signer::from_secret([1; 32]))
    }

    #[test]
    fn operations_and_duplicates() {
        let mut kv = KvStore::default();
        let k = b"k".to_vec();
        let batch = Batch::new(vec![
            req(
                1,
                Operation::Cas {
                    key: k.clone(),
                    expected: None,
                    new: b"1".to_vec(),
                },
            ),
            req(2, Operation::Get { key: k.clone() }),
            req(2, Operation::Delete { key: k.clone() }),
            req(
                3,
                Operation::Cas {
                    key: k.clone(),
                    expected: Some(b"0".to_vec()),
                    new: b"2".to_vec(),
                },
            ),
            req(4, Operation::Delete { key: k.clone() }),
        ]);
        let out = kv.execute(&batch);
        let c = ClientId(1);
        assert_eq!(
            out,
            vec![
                Executed::Done(c, 1, OpResult::CasOk),
                Executed::Done(c, 2, OpResult::Value(Some(b"1".to_vec()))),
                Executed::Duplicate(c, 2),
                Executed::Done(c, 3, OpResult::CasMismatch(Some(b"1".to_vec()))),
                Executed::Done(c, 4, OpResult::Deleted(true)),
            ]
        );
        assert!(kv.is_empty());
        assert_eq!(kv.client(c).map(|r| r.timestamp), Some(4));
    }

    #[test]
    fn digest_tracks_state_and_snapshot_roundtrips() {
        let mut kv = KvStore::default();
        let empty = kv.digest();
        kv.execute(&Batch::new(vec![req(
            1,
            Operation::Put {
                key: b"a".to_vec(),
                value: b"b".to_vec(),
            },
        )]));
        assert_ne!(kv.digest(), empty);
        let copy = KvStore::from_snapshot(kv.snapshot());
        assert_eq!(copy.digest(), kv.digest());
    }
}
