//! The replicated application: a key-value store plus the per-client reply table.
//!
//! Both are part of the replicated state: the client table decides whether a request is a
//! retry, so it must be identical on every honest replica and travel with snapshots.
//!
//! Every checkpoint takes a snapshot of the whole state and a digest of it, on the replica's
//! protocol thread. Both used to be linear in the state (a deep copy and one hash over all of
//! it: about 25 ms each second for the benchmark's 13 MB), so the state is kept as
//! [`BUCKETS`] copy-on-write buckets, chosen by a hash of the key:
//! - a snapshot shares every bucket; the first write to a bucket after it copies that bucket
//!   alone (its keys and values are reference-counted, so the copy is a small tree);
//! - each bucket caches its own digest until it is next written, and the state's digest
//!   ([`StateDigest::Buckets`]) hashes the buckets' digests, so a checkpoint rehashes only
//!   the buckets written since the last one.
//!
//! Clusters created before the buckets keep the digest they certified their checkpoints
//! with, [`StateDigest::Linear`]: one hash over every entry in key order.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use crate::encode::{Encoder, tag};
use crate::request::{Batch, OpResult, Operation, Reply};
use crate::types::{ClientId, Digest, ReplicaId, View};

/// Buckets the keys are spread over. Part of the digest's definition: changing it changes
/// every state digest.
pub const BUCKETS: usize = 1 << 14;

/// How a replica digests its state at checkpoints. Every replica of a cluster must use the
/// same one: checkpoints are certified by matching digests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum StateDigest {
    /// Digests of [`BUCKETS`] key buckets, each cached until written, hashed together: a
    /// checkpoint costs the buckets written since the last one.
    #[default]
    Buckets,
    /// One hash over every entry in key order: linear in the state at every checkpoint.
    /// What clusters created before the buckets certified their checkpoints with.
    Linear,
}

impl StateDigest {
    /// Name in configuration files and errors.
    pub fn name(self) -> &'static str {
        match self {
            StateDigest::Buckets => "buckets",
            StateDigest::Linear => "linear",
        }
    }

    /// The other scheme, to tell a misconfigured scheme from a corrupt state.
    pub fn other(self) -> StateDigest {
        match self {
            StateDigest::Buckets => StateDigest::Linear,
            StateDigest::Linear => StateDigest::Buckets,
        }
    }
}

impl fmt::Display for StateDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The last request executed for a client and the result it got, so a retry of it is answered
/// from here instead of being executed twice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientRecord {
    pub timestamp: u64,
    pub result: OpResult,
}

/// Bytes shared between the live state and its snapshots.
type Shared = Arc<[u8]>;

/// The entries whose keys hash to one bucket, and their digest once computed.
#[derive(Clone, Default)]
struct Bucket {
    entries: BTreeMap<Shared, Shared>,
    /// Cleared by every write (see [`Snapshot::bucket_mut`]).
    digest: OnceLock<Digest>,
}

impl Bucket {
    fn digest(&self) -> Digest {
        *self.digest.get_or_init(|| {
            let size: usize = self
                .entries
                .iter()
                .map(|(k, v)| k.len() + v.len() + 16)
                .sum();
            let mut e = Encoder::with_capacity(tag::STATE_BUCKET, size + 16);
            e.u64(self.entries.len() as u64);
            for (k, v) in &self.entries {
                e.bytes(k).bytes(v);
            }
            e.hash()
        })
    }
}

/// Which bucket `key` lives in: 64-bit FNV-1a, folded. Part of the digest's definition, so
/// it must never change (and must not be std's hasher, which may change between releases).
fn bucket_of(key: &[u8]) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    ((h ^ (h >> 32)) as usize) & (BUCKETS - 1)
}

/// The whole replicated state, as saved at a stable checkpoint. Cloning it is cheap (a
/// vector of shared buckets); the clone and the original then diverge bucket by bucket.
#[derive(Clone)]
pub struct Snapshot {
    /// `BUCKETS` slots; `None` for an empty bucket.
    buckets: Vec<Option<Arc<Bucket>>>,
    len: usize,
    clients: Arc<BTreeMap<ClientId, ClientRecord>>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            buckets: vec![None; BUCKETS],
            len: 0,
            clients: Arc::default(),
        }
    }
}

impl PartialEq for Snapshot {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len
            && self.clients == other.clients
            && self
                .buckets
                .iter()
                .zip(&other.buckets)
                .all(|(a, b)| match (a, b) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a.entries == b.entries,
                    (None, None) => true,
                    _ => false,
                })
    }
}

impl Eq for Snapshot {}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("entries", &self.len)
            .field("clients", &self.clients.len())
            .finish()
    }
}

impl Snapshot {
    /// Number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        let bucket = self.buckets[bucket_of(key)].as_ref()?;
        bucket.entries.get(key).map(|v| &v[..])
    }

    /// Every entry, bucket by bucket (in key order within a bucket).
    pub fn entries(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.buckets
            .iter()
            .flatten()
            .flat_map(|b| b.entries.iter().map(|(k, v)| (&k[..], &v[..])))
    }

    /// Every client's last executed request, by client id.
    pub fn clients(&self) -> impl Iterator<Item = (ClientId, &ClientRecord)> {
        self.clients.iter().map(|(c, r)| (*c, r))
    }

    pub fn client(&self, id: ClientId) -> Option<&ClientRecord> {
        self.clients.get(&id)
    }

    /// Sets `key` to `value`; returns whether it had a value before.
    pub fn insert(&mut self, key: &[u8], value: &[u8]) -> bool {
        let entries = &mut self.bucket_mut(key).entries;
        // Overwriting is the common case: replace the value in place rather than allocate
        // a copy of the key that the map would drop.
        if let Some(old) = entries.get_mut(key) {
            *old = Shared::from(value);
            return true;
        }
        entries.insert(Shared::from(key), Shared::from(value));
        self.len += 1;
        false
    }

    /// Removes `key`; returns whether it had a value.
    pub fn remove(&mut self, key: &[u8]) -> bool {
        let slot = bucket_of(key);
        if !self.buckets[slot]
            .as_ref()
            .is_some_and(|b| b.entries.contains_key(key))
        {
            return false;
        }
        let bucket = self.bucket_mut(key);
        bucket.entries.remove(key);
        let now_empty = bucket.entries.is_empty();
        if now_empty {
            self.buckets[slot] = None;
        }
        self.len -= 1;
        true
    }

    /// Records `record` as `id`'s last executed request; returns whether it had one before.
    pub fn insert_client(&mut self, id: ClientId, record: ClientRecord) -> bool {
        Arc::make_mut(&mut self.clients)
            .insert(id, record)
            .is_some()
    }

    /// The bucket `key` belongs in, unshared from any snapshot and with its digest cleared:
    /// the caller is about to write to it.
    fn bucket_mut(&mut self, key: &[u8]) -> &mut Bucket {
        let slot = self.buckets[bucket_of(key)].get_or_insert_with(Arc::default);
        let bucket = Arc::make_mut(slot);
        bucket.digest.take();
        bucket
    }

    /// Digest of the whole state under `scheme`.
    pub fn digest(&self, scheme: StateDigest) -> Digest {
        match scheme {
            StateDigest::Buckets => self.bucket_digest(),
            StateDigest::Linear => self.linear_digest(),
        }
    }

    fn bucket_digest(&self) -> Digest {
        let filled = self.buckets.iter().flatten().count();
        let mut e = Encoder::with_capacity(
            tag::STATE_BUCKETS,
            64 + filled * 40 + self.clients.len() * 64,
        );
        e.u64(BUCKETS as u64).u64(self.len as u64);
        for (i, b) in self.buckets.iter().enumerate() {
            if let Some(b) = b {
                e.u64(i as u64).digest(&b.digest());
            }
        }
        self.encode_clients(&mut e);
        e.hash()
    }

    fn linear_digest(&self) -> Digest {
        let mut sorted: Vec<(&[u8], &[u8])> = self.entries().collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let size: usize = sorted.iter().map(|(k, v)| k.len() + v.len() + 16).sum();
        let mut e = Encoder::with_capacity(tag::STATE, size + 64 + self.clients.len() * 64);
        e.u64(sorted.len() as u64);
        for (k, v) in sorted {
            e.bytes(k).bytes(v);
        }
        self.encode_clients(&mut e);
        e.hash()
    }

    fn encode_clients(&self, e: &mut Encoder) {
        e.u64(self.clients.len() as u64);
        for (c, rec) in self.clients.iter() {
            e.u64(c.0).u64(rec.timestamp);
            rec.result.encode(e);
        }
    }
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

    /// The state as it is now: cheap, it shares every bucket (see the module's notes).
    pub fn snapshot(&self) -> Snapshot {
        self.state.clone()
    }

    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.state.get(key)
    }

    pub fn len(&self) -> usize {
        self.state.len()
    }

    pub fn is_empty(&self) -> bool {
        self.state.is_empty()
    }

    /// Last executed request of a client, if any.
    pub fn client(&self, id: ClientId) -> Option<&ClientRecord> {
        self.state.client(id)
    }

    fn apply(&mut self, op: &Operation) -> OpResult {
        let state = &mut self.state;
        match op {
            Operation::Put { key, value } => {
                state.insert(key, value);
                OpResult::Written
            }
            Operation::Get { key } => OpResult::Value(state.get(key).map(<[u8]>::to_vec)),
            Operation::Delete { key } => OpResult::Deleted(state.remove(key)),
            Operation::Cas { key, expected, new } => {
                let current = state.get(key);
                if current == expected.as_deref() {
                    state.insert(key, new);
                    OpResult::CasOk
                } else {
                    OpResult::CasMismatch(current.map(<[u8]>::to_vec))
                }
            }
        }
    }

    /// Executes a committed batch in order, skipping requests whose timestamp is not newer
    /// than the client's last executed one.
    pub fn execute(&mut self, batch: &Batch) -> Vec<Executed> {
        batch
            .requests()
            .iter()
            .map(|r| {
                let last = self.state.client(r.client).map(|c| c.timestamp);
                if last.is_some_and(|ts| ts >= r.timestamp) {
                    return Executed::Duplicate(r.client, r.timestamp);
                }
                let result = self.apply(&r.op);
                self.state.insert_client(
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

    /// Digest of the whole state under `scheme`, computed at checkpoints only.
    pub fn digest(&self, scheme: StateDigest) -> Digest {
        self.state.digest(scheme)
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

    fn put(ts: u64, key: &[u8], value: &[u8]) -> Request {
        req(
            ts,
            Operation::Put {
                key: key.to_vec(),
                value: value.to_vec(),
            },
        )
    }

    const SCHEMES: [StateDigest; 2] = [StateDigest::Buckets, StateDigest::Linear];

    #[test]
    fn digest_tracks_state_and_snapshot_roundtrips() {
        let mut kv = KvStore::default();
        let empty = kv.digest(StateDigest::Buckets);
        kv.execute(&Batch::new(vec![put(1, b"a", b"b")]));
        for scheme in SCHEMES {
            assert_ne!(kv.digest(scheme), KvStore::default().digest(scheme));
            let copy = KvStore::from_snapshot(kv.snapshot());
            assert_eq!(copy.digest(scheme), kv.digest(scheme));
        }
        assert_ne!(kv.digest(StateDigest::Buckets), empty);
        assert_ne!(
            kv.digest(StateDigest::Buckets),
            kv.digest(StateDigest::Linear)
        );
    }

    /// A snapshot keeps the state it was taken at, and its digest, while the store goes on;
    /// the store's cached bucket digests follow every write.
    #[test]
    fn snapshots_are_isolated_and_cached_digests_follow_writes() {
        let mut kv = KvStore::default();
        let keys: Vec<Vec<u8>> = (0..2_000u32)
            .map(|i| format!("key-{i}").into_bytes())
            .collect();
        let batch: Vec<Request> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| put(i as u64 + 1, k, b"first"))
            .collect();
        kv.execute(&Batch::new(batch));
        let snap = kv.snapshot();
        let before: Vec<Digest> = SCHEMES.iter().map(|s| kv.digest(*s)).collect();

        // Overwrite one key, delete another, add a third, all after the snapshot.
        kv.execute(&Batch::new(vec![
            put(3_000, &keys[7], b"second"),
            req(
                3_001,
                Operation::Delete {
                    key: keys[8].clone(),
                },
            ),
            put(3_002, b"new", b"x"),
        ]));
        assert_eq!(snap.get(&keys[7]), Some(&b"first"[..]));
        assert_eq!(snap.get(&keys[8]), Some(&b"first"[..]));
        assert_eq!(snap.get(b"new"), None);
        assert_eq!(snap.len(), 2_000);
        assert_eq!(kv.get(&keys[7]), Some(&b"second"[..]));
        assert_eq!(kv.get(&keys[8]), None);
        assert_eq!(kv.len(), 2_000);
        for (scheme, before) in SCHEMES.iter().zip(&before) {
            assert_eq!(snap.digest(*scheme), *before, "{scheme}");
            assert_ne!(kv.digest(*scheme), *before, "{scheme}");
            // The cached digests must be exactly what a store built from scratch computes.
            let fresh = rebuild(&kv.snapshot());
            assert_eq!(fresh.digest(*scheme), kv.digest(*scheme), "{scheme}");
        }
        assert_ne!(kv.snapshot(), snap);
        assert_eq!(rebuild(&snap), snap);
    }

    /// The same entries reached by different histories have the same digest: it depends on
    /// the state alone, never on the order of writes or on deleted keys.
    #[test]
    fn digest_depends_on_the_state_alone() {
        let mut a = Snapshot::default();
        let mut b = Snapshot::default();
        for i in 0..500u32 {
            a.insert(format!("k{i}").as_bytes(), b"v");
        }
        for i in (0..600u32).rev() {
            b.insert(format!("k{i}").as_bytes(), b"other");
        }
        for i in 0..500u32 {
            b.insert(format!("k{i}").as_bytes(), b"v");
        }
        for i in 500..600u32 {
            assert!(b.remove(format!("k{i}").as_bytes()));
        }
        assert!(!b.remove(b"k600"));
        assert_eq!(a, b);
        for scheme in SCHEMES {
            assert_eq!(a.digest(scheme), b.digest(scheme), "{scheme}");
        }
    }

    /// The linear digest is the one older clusters certified their checkpoints with: one hash
    /// over the entries in key order, then the client table. Spelled out here so it cannot
    /// drift.
    #[test]
    fn linear_digest_is_the_certified_format() {
        let mut s = Snapshot::default();
        s.insert(b"b", b"2");
        s.insert(b"a", b"1");
        s.insert(b"", b"");
        s.insert_client(
            ClientId(9),
            ClientRecord {
                timestamp: 4,
                result: OpResult::Written,
            },
        );
        let mut e = Encoder::new(tag::STATE);
        e.u64(3);
        e.bytes(b"").bytes(b"");
        e.bytes(b"a").bytes(b"1");
        e.bytes(b"b").bytes(b"2");
        e.u64(1).u64(9).u64(4);
        OpResult::Written.encode(&mut e);
        assert_eq!(s.digest(StateDigest::Linear), e.hash());
    }

    /// The bucket digest's definition (bucket count, key hash, encoding) is part of the
    /// protocol: a change would split a cluster running mixed versions. This pins it.
    #[test]
    fn bucket_digest_is_pinned() {
        let mut s = Snapshot::default();
        for i in 0..100u32 {
            s.insert(
                format!("key-{i}").as_bytes(),
                format!("value-{i}").as_bytes(),
            );
        }
        s.insert_client(
            ClientId(1),
            ClientRecord {
                timestamp: 2,
                result: OpResult::CasOk,
            },
        );
        assert_eq!(
            s.digest(StateDigest::Buckets).to_hex(),
            "103546228d9ede90bab4b679c4f98442e3d73a5a827312f803581df5a5be51ea"
        );
    }

    fn rebuild(s: &Snapshot) -> Snapshot {
        let mut out = Snapshot::default();
        for (k, v) in s.entries() {
            assert!(!out.insert(k, v));
        }
        for (c, r) in s.clients() {
            assert!(!out.insert_client(c, r.clone()));
        }
        out
    }
}
