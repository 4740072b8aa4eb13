//! Client requests, their results, and the batches the primary orders.

use std::sync::{Arc, OnceLock};

use crate::crypto::{ClientSig, Signer, Verifier};
use crate::encode::{Encoder, tag};
use crate::types::{ClientId, Digest, ReplicaId, Signature, View};

/// An operation on the replicated key-value store.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Get {
        key: Vec<u8>,
    },
    Delete {
        key: Vec<u8>,
    },
    /// Writes `new` only if the current value equals `expected` (`None`: the key is absent).
    Cas {
        key: Vec<u8>,
        expected: Option<Vec<u8>>,
        new: Vec<u8>,
    },
}

impl Operation {
    pub fn key(&self) -> &[u8] {
        match self {
            Operation::Put { key, .. }
            | Operation::Get { key }
            | Operation::Delete { key }
            | Operation::Cas { key, .. } => key,
        }
    }

    /// Bytes of key and values, used to enforce the request size limit.
    pub fn payload_len(&self) -> usize {
        match self {
            Operation::Put { key, value } => key.len() + value.len(),
            Operation::Get { key } | Operation::Delete { key } => key.len(),
            Operation::Cas { key, expected, new } => {
                key.len() + expected.as_ref().map_or(0, Vec::len) + new.len()
            }
        }
    }

    fn encode(&self, e: &mut Encoder) {
        match self {
            Operation::Put { key, value } => e.u8(1).bytes(key).bytes(value),
            Operation::Get { key } => e.u8(2).bytes(key),
            Operation::Delete { key } => e.u8(3).bytes(key),
            Operation::Cas { key, expected, new } => {
                e.u8(4).bytes(key).opt_bytes(expected.as_deref()).bytes(new)
            }
        };
    }
}

/// Bytes a request's encoding takes beyond its payload, at most: client, timestamp, operation
/// tag, length prefixes and signature.
const ENCODING_OVERHEAD: usize = 128;

/// A signed client request. `timestamp` orders one client's requests: a replica executes a
/// request only if its timestamp is above the last one it executed for that client, which
/// makes client retries idempotent.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Request {
    pub client: ClientId,
    pub timestamp: u64,
    pub op: Operation,
    pub signature: Signature,
}

impl Request {
    /// The bytes a client signs.
    pub fn signing_bytes(client: ClientId, timestamp: u64, op: &Operation) -> Vec<u8> {
        let mut e = Encoder::with_capacity(tag::REQUEST, op.payload_len() + ENCODING_OVERHEAD);
        e.u64(client.0).u64(timestamp);
        op.encode(&mut e);
        e.finish()
    }

    /// Builds and signs a request.
    pub fn new_signed(client: ClientId, timestamp: u64, op: Operation, key: &dyn Signer) -> Self {
        let signature = key.sign(&Self::signing_bytes(client, timestamp, &op));
        Request {
            client,
            timestamp,
            op,
            signature,
        }
    }

    /// True when the registered client signed exactly this request.
    pub fn verify(&self, verifier: &dyn Verifier) -> bool {
        verifier.verify_client(
            self.client,
            &Self::signing_bytes(self.client, self.timestamp, &self.op),
            &self.signature,
        )
    }

    /// `verify` for many requests in one batch equation: element `i` says whether
    /// `requests[i]` verifies, exactly as `verify` would.
    pub fn verify_all(requests: &[&Request], verifier: &dyn Verifier) -> Vec<bool> {
        let bytes: Vec<Vec<u8>> = requests
            .iter()
            .map(|r| Self::signing_bytes(r.client, r.timestamp, &r.op))
            .collect();
        let items: Vec<ClientSig<'_>> = requests
            .iter()
            .zip(&bytes)
            .map(|(r, msg)| ClientSig {
                client: r.client,
                msg,
                sig: &r.signature,
            })
            .collect();
        verifier.verify_clients(&items)
    }

    fn encode(&self, e: &mut Encoder) {
        e.u64(self.client.0).u64(self.timestamp);
        self.op.encode(e);
        e.bytes(&self.signature.0);
    }
}

/// What executing an operation returned.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum OpResult {
    /// Result of `Get`: the value, if the key exists.
    Value(Option<Vec<u8>>),
    /// Result of `Put`.
    Written,
    /// Result of `Delete`: whether the key existed.
    Deleted(bool),
    /// `Cas` wrote the new value.
    CasOk,
    /// `Cas` did not write; this is the value it found.
    CasMismatch(Option<Vec<u8>>),
}

impl OpResult {
    pub(crate) fn encode(&self, e: &mut Encoder) {
        match self {
            OpResult::Value(v) => e.u8(1).opt_bytes(v.as_deref()),
            OpResult::Written => e.u8(2),
            OpResult::Deleted(existed) => e.u8(3).u8(u8::from(*existed)),
            OpResult::CasOk => e.u8(4),
            OpResult::CasMismatch(v) => e.u8(5).opt_bytes(v.as_deref()),
        };
    }
}

/// One replica's answer to a client. The client accepts a result once `f + 1` replicas sent
/// matching replies; the transport authenticates which replica sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub view: View,
    pub timestamp: u64,
    pub client: ClientId,
    pub replica: ReplicaId,
    pub result: OpResult,
}

/// An ordered batch of requests: the unit the protocol agrees on for one sequence number.
/// The empty batch is the "null request" a new primary uses to fill gaps.
#[derive(Clone, Default)]
pub struct Batch {
    /// Shared: a batch is copied into its slot, its stored pre-prepare, its block and the
    /// block's stored copy, and each deep copy cost an allocation per request.
    requests: Arc<Vec<Request>>,
    /// The digest, once computed: a batch's digest is asked for when it is checked, stored,
    /// and hashed into its block, and hashing every request each time was 4-5 % of a loaded
    /// backup. Cleared by [`Batch::requests_mut`], the only way to change the requests.
    digest: OnceLock<Digest>,
}

impl PartialEq for Batch {
    fn eq(&self, other: &Self) -> bool {
        self.requests == other.requests
    }
}

impl Eq for Batch {}

/// The requests alone: whether the digest was computed yet is not part of the batch.
impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("requests", &self.requests)
            .finish()
    }
}

impl Batch {
    pub fn new(requests: Vec<Request>) -> Self {
        Batch {
            requests: Arc::new(requests),
            digest: OnceLock::new(),
        }
    }

    pub fn requests(&self) -> &[Request] {
        &self.requests
    }

    pub fn into_requests(self) -> Vec<Request> {
        Arc::unwrap_or_clone(self.requests)
    }

    /// The requests, to change (tests and Byzantine replicas in the simulator); forgets the
    /// cached digest.
    pub fn requests_mut(&mut self) -> &mut Vec<Request> {
        self.digest.take();
        Arc::make_mut(&mut self.requests)
    }

    /// The digest every phase message refers to; it binds the exact requests and signatures.
    pub fn digest(&self) -> Digest {
        *self.digest.get_or_init(|| {
            let size = self
                .requests
                .iter()
                .map(|r| r.op.payload_len() + ENCODING_OVERHEAD)
                .sum();
            let mut e = Encoder::with_capacity(tag::BATCH, size);
            e.u64(self.requests.len() as u64);
            for r in self.requests.iter() {
                r.encode(&mut e);
            }
            e.hash()
        })
    }

    pub fn len(&self) -> usize {
        self.requests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Ed25519Signer, KeyRing};

    fn put(k: &str) -> Operation {
        Operation::Put {
            key: k.into(),
            value: b"v".to_vec(),
        }
    }

    #[test]
    fn batch_digest_binds_order_and_content() {
        let key = Ed25519Signer::from_secret([5; 32]);
        let a = Request::new_signed(ClientId(1), 1, put("a"), &key);
        let b = Request::new_signed(ClientId(1), 2, put("b"), &key);
        let ab = Batch::new(vec![a.clone(), b.clone()]).digest();
        assert_ne!(ab, Batch::new(vec![b.clone(), a.clone()]).digest());
        assert_ne!(ab, Batch::new(vec![a.clone()]).digest());
        assert_ne!(Batch::default().digest(), Digest::ZERO);
    }

    /// The cached digest follows every change made through `requests_mut`, and clones carry
    /// it only while they are the same batch.
    #[test]
    fn cached_batch_digest_follows_changes() {
        let key = Ed25519Signer::from_secret([5; 32]);
        let a = Request::new_signed(ClientId(1), 1, put("a"), &key);
        let b = Request::new_signed(ClientId(1), 2, put("b"), &key);
        let mut batch = Batch::new(vec![a.clone(), b.clone()]);
        let before = batch.digest();
        let copy = batch.clone();
        batch.requests_mut().reverse();
        assert_eq!(batch.digest(), Batch::new(vec![b, a]).digest());
        assert_ne!(batch.digest(), before);
        assert_eq!(copy.digest(), before);
        assert_ne!(copy, batch);
    }

    #[test]
    fn request_signature_covers_every_field() {
        let key = Ed25519Signer::from_secret([5; 32]);
        let mut ring = KeyRing::new(&[]).unwrap();
        ring.add_client(ClientId(1), key.public()).unwrap();
        let r = Request::new_signed(ClientId(1), 7, put("a"), &key);
        assert!(r.verify(&ring));
        let mut t = r.clone();
        t.timestamp = 8;
        assert!(!t.verify(&ring));
        let mut t = r.clone();
        t.op = put("b");
        assert!(!t.verify(&ring));
        let mut t = r;
        t.client = ClientId(2);
        assert!(!t.verify(&ring));
    }
}
