//! Signing and verification, behind traits the adapters can supply.
//!
//! The core only needs "sign these bytes as me" and "did principal X sign these bytes". The
//! shipped implementation is ed25519 ([`Ed25519Signer`], [`KeyRing`]); keys are handed in, never
//! generated from OS randomness here, so the simulator can derive them from its seed.

use std::collections::BTreeMap;

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};

use crate::types::{ClientId, ReplicaId, Signature};

/// Signs bytes with the local principal's private key.
pub trait Signer: Send + Sync {
    fn sign(&self, msg: &[u8]) -> Signature;
}

/// A shared signer signs too: one key can serve the protocol and a transport handshake.
impl<S: Signer + ?Sized> Signer for std::sync::Arc<S> {
    fn sign(&self, msg: &[u8]) -> Signature {
        (**self).sign(msg)
    }
}

/// Checks signatures of replicas and registered clients.
pub trait Verifier: Send + Sync {
    /// True when `sig` is replica `who`'s signature over `msg`. Unknown replicas never verify.
    fn verify_replica(&self, who: ReplicaId, msg: &[u8], sig: &Signature) -> bool;
    /// True when `sig` is client `who`'s signature over `msg`. Unregistered clients never verify.
    fn verify_client(&self, who: ClientId, msg: &[u8], sig: &Signature) -> bool;
    /// Whether the client is registered at all (to tell "unknown client" from "bad signature").
    fn knows_client(&self, who: ClientId) -> bool;
}

/// An ed25519 private key.
pub struct Ed25519Signer {
    key: SigningKey,
}

impl Ed25519Signer {
    /// Builds a key from 32 secret bytes (a seed). Adapters read them from a key file; the
    /// simulator derives them from its scenario seed.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Ed25519Signer {
            key: SigningKey::from_bytes(&secret),
        }
    }

    /// The public half, to register in a [`KeyRing`].
    pub fn public(&self) -> PublicKey {
        PublicKey(self.key.verifying_key().to_bytes())
    }
}

impl Signer for Ed25519Signer {
    fn sign(&self, msg: &[u8]) -> Signature {
        Signature(self.key.sign(msg).to_bytes())
    }
}

/// An ed25519 public key as raw bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

/// The public keys of every replica and registered client.
#[derive(Clone, Default)]
pub struct KeyRing {
    replicas: Vec<Option<VerifyingKey>>,
    clients: BTreeMap<ClientId, VerifyingKey>,
}

/// A public key that is not a valid ed25519 point.
#[derive(Debug, thiserror::Error)]
#[error("invalid ed25519 public key for {0}")]
pub struct InvalidKey(pub String);

impl KeyRing {
    /// Key ring for replicas `0..keys.len()`.
    pub fn new(replica_keys: &[PublicKey]) -> Result<Self, InvalidKey> {
        let replicas = replica_keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                VerifyingKey::from_bytes(&k.0)
                    .map(Some)
                    .map_err(|_| InvalidKey(format!("replica {i}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(KeyRing {
            replicas,
            clients: BTreeMap::new(),
        })
    }

    /// Registers (or replaces) a client's key.
    pub fn add_client(&mut self, id: ClientId, key: PublicKey) -> Result<(), InvalidKey> {
        let vk = VerifyingKey::from_bytes(&key.0).map_err(|_| InvalidKey(id.to_string()))?;
        self.clients.insert(id, vk);
        Ok(())
    }

    pub fn replica_count(&self) -> usize {
        self.replicas.len()
    }
}

fn verify(key: &VerifyingKey, msg: &[u8], sig: &Signature) -> bool {
    let sig = ed25519_dalek::Signature::from_bytes(&sig.0);
    key.verify_strict(msg, &sig).is_ok()
}

impl Verifier for KeyRing {
    fn verify_replica(&self, who: ReplicaId, msg: &[u8], sig: &Signature) -> bool {
        match self.replicas.get(who.0 as usize) {
            Some(Some(key)) => verify(key, msg, sig),
            _ => false,
        }
    }

    fn verify_client(&self, who: ClientId, msg: &[u8], sig: &Signature) -> bool {
        self.clients
            .get(&who)
            .is_some_and(|key| verify(key, msg, sig))
    }

    fn knows_client(&self, who: ClientId) -> bool {
        self.clients.contains_key(&who)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_for_the_signer_and_the_bytes() {
        let a = Ed25519Signer::from_secret([1; 32]);
        let b = Ed25519Signer::from_secret([2; 32]);
        let ring = KeyRing::new(&[a.public(), b.public()]).unwrap();
        let sig = a.sign(b"hello");
        assert!(ring.verify_replica(ReplicaId(0), b"hello", &sig));
        assert!(!ring.verify_replica(ReplicaId(1), b"hello", &sig));
        assert!(!ring.verify_replica(ReplicaId(0), b"hellp", &sig));
        assert!(!ring.verify_replica(ReplicaId(7), b"hello", &sig));
        assert!(!ring.verify_replica(ReplicaId(0), b"hello", &Signature::INVALID));
    }

    #[test]
    fn clients_must_be_registered() {
        let c = Ed25519Signer::from_secret([3; 32]);
        let mut ring = KeyRing::new(&[]).unwrap();
        let sig = c.sign(b"op");
        assert!(!ring.verify_client(ClientId(9), b"op", &sig));
        ring.add_client(ClientId(9), c.public()).unwrap();
        assert!(ring.verify_client(ClientId(9), b"op", &sig));
        assert!(ring.knows_client(ClientId(9)));
    }
}
