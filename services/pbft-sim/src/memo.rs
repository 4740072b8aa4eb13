//! Memoised signature verification for the simulator.
//!
//! In a simulated cluster every broadcast is verified by each of the other n-1 replicas over
//! the very same bytes, and ed25519 verification is nearly all of the simulator's CPU time.
//! Verification is a pure function of (key, bytes, signature), so remembering its answers
//! changes no outcome: forged and tampered messages differ in bytes or signature and are
//! verified for real. This keeps thousands of scenarios inside `cargo test`.

use std::collections::HashMap;
use std::sync::Mutex;

use pbft_core::encode::sha256;
use pbft_core::{ClientId, Digest, KeyRing, ReplicaId, Signature, Verifier};

/// A [`KeyRing`] whose answers are cached by a hash of everything they depend on.
pub struct MemoVerifier {
    ring: KeyRing,
    cache: Mutex<HashMap<Digest, bool>>,
}

/// Entries kept before the cache starts over, bounding memory on long runs.
const CAPACITY: usize = 200_000;

impl MemoVerifier {
    pub fn new(ring: KeyRing) -> Self {
        MemoVerifier {
            ring,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn memo(
        &self,
        kind: u8,
        who: u64,
        msg: &[u8],
        sig: &Signature,
        f: impl FnOnce() -> bool,
    ) -> bool {
        let mut key = Vec::with_capacity(msg.len() + 80);
        key.push(kind);
        key.extend_from_slice(&who.to_be_bytes());
        key.extend_from_slice(&sig.0);
        key.extend_from_slice(msg);
        let key = sha256(&key);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = cache.get(&key) {
            return *v;
        }
        let v = f();
        if cache.len() >= CAPACITY {
            cache.clear();
        }
        cache.insert(key, v);
        v
    }
}

impl Verifier for MemoVerifier {
    fn verify_replica(&self, who: ReplicaId, msg: &[u8], sig: &Signature) -> bool {
        self.memo(0, u64::from(who.0), msg, sig, || {
            self.ring.verify_replica(who, msg, sig)
        })
    }

    fn verify_client(&self, who: ClientId, msg: &[u8], sig: &Signature) -> bool {
        self.memo(1, who.0, msg, sig, || {
            self.ring.verify_client(who, msg, sig)
        })
    }

    fn knows_client(&self, who: ClientId) -> bool {
        self.ring.knows_client(who)
    }
}
