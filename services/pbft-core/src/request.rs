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

/// Why a request cannot be ordered, whatever its signature says.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("request too large: {size} bytes of key and values, at most {max}")]
    TooLarge { size: usize, max: usize },
    #[error("request has an empty key")]
    EmptyKey,
}

impl Request {
    /// Whether the request is one a replica may order: a key, and at most
    /// `max_request_bytes` of key and values. Replicas check it on arrival, and the client
    /// API answers a failure with its reason instead of leaving the client to time out.
    pub fn check_shape(&self, max_request_bytes: usize) -> Result<(), ShapeError> {
        if self.op.key().is_empty() {
            return Err(ShapeError::EmptyKey);
        }
        let size = self.op.payload_len();
        if size > max_request_bytes {
            return Err(ShapeError::TooLarge {
                size,
                max: max_request_bytes,
            });
        }
        Ok(())
    }

    /// The bytes a client signs: a domain tag and the SHA-256 of the request's canonical
    /// encoding, not the encoding itself. Ed25519 hashes its message with SHA-512 twice to
    /// sign and once per check, and each request is checked by two replicas; hashing a
    /// 33-byte message there instead of the whole request (about 600 bytes at 512-byte
    /// values) took that SHA-512 work from about 7 % of a loaded machine to about 1.5 %
    /// (docs/BENCHMARKS.md, round 16). A signature still binds client, timestamp and
    /// operation, as long as SHA-256 resists collisions, which the batch digests and the
    /// ledger's hash chain already rely on.
    pub fn signing_bytes(client: ClientId, timestamp: u64, op: &Operation) -> Vec<u8> {
        let mut signed = Encoder::with_capacity(tag::REQUEST_DIGEST, 33);
        signed.digest(&Self::encoding(client, timestamp, op).hash());
        signed.finish()
    }

    /// What clients signed before round 16: the canonical encoding itself. Replicas still
    /// accept it, so requests already in ledgers and journals, and clients not yet upgraded,
    /// stay valid (docs/OPERATIONS.md, upgrades). The two messages cannot be confused: they
    /// start with different domain tags.
    pub fn legacy_signing_bytes(client: ClientId, timestamp: u64, op: &Operation) -> Vec<u8> {
        Self::encoding(client, timestamp, op).finish()
    }

    fn encoding(client: ClientId, timestamp: u64, op: &Operation) -> Encoder {
        let mut e = Encoder::with_capacity(tag::REQUEST, op.payload_len() + ENCODING_OVERHEAD);
        e.u64(client.0).u64(timestamp);
        op.encode(&mut e);
        e
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

    /// True when the registered client signed exactly this request, in either format.
    pub fn verify(&self, verifier: &dyn Verifier) -> bool {
        verifier.verify_client(
            self.client,
            &Self::signing_bytes(self.client, self.timestamp, &self.op),
            &self.signature,
        ) || self.verify_legacy(verifier)
    }

    fn verify_legacy(&self, verifier: &dyn Verifier) -> bool {
        verifier.verify_client(
            self.client,
            &Self::legacy_signing_bytes(self.client, self.timestamp, &self.op),
            &self.signature,
        )
    }

    /// `verify` for many requests in one batch equation: element `i` says whether
    /// `requests[i]` verifies, exactly as `verify` would. A request that fails the batch is
    /// checked once more against the legacy format, one at a time; only requests signed
    /// that way, or not at all, pay for it.
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
        let mut verdicts = verifier.verify_clients(&items);
        for (ok, r) in verdicts.iter_mut().zip(requests) {
            if !*ok {
                *ok = r.verify_legacy(verifier);
            }
        }
        verdicts
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
        let mut t = r.clone();
        t.op = Operation::Put {
            key: b"a".to_vec(),
            value: b"w".to_vec(),
        };
        assert!(!t.verify(&ring));
        let mut t = r;
        t.client = ClientId(2);
        assert!(!t.verify(&ring));
    }

    /// Requests signed the pre-round-16 way (over the whole encoding) still verify, alone and
    /// in a batch beside new ones, and a legacy signature binds the request as well.
    #[test]
    fn legacy_signatures_still_verify() {
        let key = Ed25519Signer::from_secret([5; 32]);
        let mut ring = KeyRing::new(&[]).unwrap();
        ring.add_client(ClientId(1), key.public()).unwrap();
        let legacy = Request {
            client: ClientId(1),
            timestamp: 3,
            op: put("a"),
            signature: key.sign(&Request::legacy_signing_bytes(ClientId(1), 3, &put("a"))),
        };
        let new = Request::new_signed(ClientId(1), 4, put("b"), &key);
        assert!(legacy.verify(&ring));
        let mut forged = legacy.clone();
        forged.op = put("b");
        assert!(!forged.verify(&ring));
        // A signature over one format's message is no signature over the other's.
        let mut swapped = new.clone();
        swapped.signature = key.sign(&Request::legacy_signing_bytes(ClientId(1), 4, &put("c")));
        assert!(!swapped.verify(&ring));
        let all = [&legacy, &new, &forged, &swapped, &new, &legacy];
        assert_eq!(
            Request::verify_all(&all, &ring),
            vec![true, true, false, false, true, true]
        );
    }

    /// Clients sign a tagged digest of the request, so the message Ed25519 hashes is the same
    /// 33 bytes whatever the payload, and two operations that differ only in where one byte
    /// string ends and the next begins still sign different messages.
    #[test]
    fn clients_sign_a_fixed_size_digest_of_the_encoding() {
        let big = Operation::Put {
            key: b"k".to_vec(),
            value: vec![7; 64 * 1024],
        };
        let signed = Request::signing_bytes(ClientId(1), 1, &big);
        assert_eq!(signed.len(), 33);
        assert_eq!(signed[0], tag::REQUEST_DIGEST);
        let ab_c = Operation::Cas {
            key: b"ab".to_vec(),
            expected: None,
            new: b"c".to_vec(),
        };
        let a_bc = Operation::Cas {
            key: b"a".to_vec(),
            expected: Some(b"b".to_vec()),
            new: b"c".to_vec(),
        };
        assert_ne!(
            Request::signing_bytes(ClientId(1), 1, &ab_c),
            Request::signing_bytes(ClientId(1), 1, &a_bc)
        );
    }
}
