//! Signing and verification, behind traits the adapters can supply.
//!
//! The core only needs "sign these bytes as me" and "did principal X sign these bytes". The
//! shipped implementation is ed25519 ([`Ed25519Signer`], [`KeyRing`]); keys are handed in, never
//! generated from OS randomness here, so the simulator can derive them from its seed.
//!
//! Replica messages are checked with `verify_strict`. Client requests, the one signature
//! per request every replica must check, are checked under the ZIP215 rules
//! (ed25519-zebra, as CometBFT's ed25519consensus does) because only there batch and single
//! verification agree on every input: replicas that happen to batch different requests
//! together still reach the same verdict on each one, so a client cannot craft a request
//! that some correct replicas accept and others refuse.

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
    /// Checks many client signatures at once: element `i` of the answer is exactly what
    /// `verify_client` says of `items[i]`, however the items are grouped.
    fn verify_clients(&self, items: &[ClientSig<'_>]) -> Vec<bool> {
        items
            .iter()
            .map(|i| self.verify_client(i.client, i.msg, i.sig))
            .collect()
    }
}

/// One client signature to check: who claims to have signed, the bytes, the signature.
#[derive(Clone, Copy, Debug)]
pub struct ClientSig<'a> {
    pub client: ClientId,
    pub msg: &'a [u8],
    pub sig: &'a Signature,
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
    clients: BTreeMap<ClientId, ClientKey>,
}

/// A registered client's key, parsed once for ZIP215 verification.
#[derive(Clone)]
struct ClientKey {
    key: ed25519_zebra::VerificationKey,
    bytes: ed25519_zebra::VerificationKeyBytes,
}

/// Below this many signatures a batch saves too little to pay for its set-up.
const MIN_BATCH: usize = 4;

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

    /// Registers (or replaces) a client's key. Small-order ("weak") keys are refused: ZIP215
    /// would let their holder's signatures verify for messages it never signed.
    pub fn add_client(&mut self, id: ClientId, key: PublicKey) -> Result<(), InvalidKey> {
        let invalid = || InvalidKey(id.to_string());
        let dalek = VerifyingKey::from_bytes(&key.0).map_err(|_| invalid())?;
        if dalek.is_weak() {
            return Err(invalid());
        }
        let zebra = ed25519_zebra::VerificationKey::try_from(key.0).map_err(|_| invalid())?;
        self.clients.insert(
            id,
            ClientKey {
                key: zebra,
                bytes: key.0.into(),
            },
        );
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
        self.clients.get(&who).is_some_and(|c| {
            c.key
                .verify(&ed25519_zebra::Signature::from_bytes(&sig.0), msg)
                .is_ok()
        })
    }

    fn knows_client(&self, who: ClientId) -> bool {
        self.clients.contains_key(&who)
    }

    /// One batch equation for all registered signers; if it fails, each signature on its
    /// own, so one bad request costs its batch a second pass but never the good ones.
    fn verify_clients(&self, items: &[ClientSig<'_>]) -> Vec<bool> {
        let mut verdicts = vec![false; items.len()];
        let known: Vec<(usize, &ClientKey)> = items
            .iter()
            .enumerate()
            .filter_map(|(i, it)| self.clients.get(&it.client).map(|c| (i, c)))
            .collect();
        if known.len() >= MIN_BATCH && batch_holds(items, &known) {
            for (i, _) in known {
                verdicts[i] = true;
            }
            return verdicts;
        }
        for (i, c) in known {
            let it = &items[i];
            verdicts[i] = c
                .key
                .verify(&ed25519_zebra::Signature::from_bytes(&it.sig.0), it.msg)
                .is_ok();
        }
        verdicts
    }
}

/// Whether the ZIP215 batch equation holds for `known` (indices into `items`, with the
/// signer's key): true exactly when every one of those signatures verifies on its own.
fn batch_holds(items: &[ClientSig<'_>], known: &[(usize, &ClientKey)]) -> bool {
    let mut batch = ed25519_zebra::batch::Verifier::new();
    for (i, c) in known {
        let it = &items[*i];
        batch.queue((
            c.bytes,
            ed25519_zebra::Signature::from_bytes(&it.sig.0),
            it.msg,
        ));
    }
    batch.verify(TranscriptRng::new(items)).is_ok()
}

/// The batch equation's random coefficients, derived from everything in the batch (as
/// ed25519-dalek's deterministic batch verification does): a signer cannot choose its
/// signatures after learning the coefficients, and the core stays free of OS randomness.
/// SHA-512 in counter mode over a digest of the batch.
struct TranscriptRng {
    seed: [u8; 64],
    counter: u64,
    block: [u8; 64],
    used: usize,
}

impl TranscriptRng {
    fn new(items: &[ClientSig<'_>]) -> Self {
        use sha2::Digest as _;
        let mut h = sha2::Sha512::new();
        h.update(b"pbft client batch v1");
        for it in items {
            h.update(it.client.0.to_le_bytes());
            h.update((it.msg.len() as u64).to_le_bytes());
            h.update(it.msg);
            h.update(it.sig.0);
        }
        TranscriptRng {
            seed: h.finalize().into(),
            counter: 0,
            block: [0; 64],
            used: 64,
        }
    }

    fn next_byte(&mut self) -> u8 {
        use sha2::Digest as _;
        if self.used == self.block.len() {
            let mut h = sha2::Sha512::new();
            h.update(self.seed);
            h.update(self.counter.to_le_bytes());
            self.block = h.finalize().into();
            self.counter += 1;
            self.used = 0;
        }
        self.used += 1;
        self.block[self.used - 1]
    }
}

impl rand_core::TryRng for TranscriptRng {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for b in dst {
            *b = self.next_byte();
        }
        Ok(())
    }
}

impl rand_core::TryCryptoRng for TranscriptRng {}

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

    #[test]
    fn small_order_client_keys_are_refused() {
        // The identity point: every signature with R = identity and s = 0 would verify.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let mut ring = KeyRing::new(&[]).unwrap();
        assert!(ring.add_client(ClientId(1), PublicKey(identity)).is_err());
        assert!(!ring.knows_client(ClientId(1)));
    }

    /// Ten clients; `bad` lists the items whose signature is broken in some way.
    fn mixed_batch(bad: &[usize]) -> (KeyRing, Vec<(ClientId, Vec<u8>, Signature)>) {
        let mut ring = KeyRing::new(&[]).unwrap();
        let mut items = Vec::new();
        for i in 0..10u64 {
            let key = Ed25519Signer::from_secret([10 + i as u8; 32]);
            ring.add_client(ClientId(i), key.public()).unwrap();
            let msg = format!("request {i}").into_bytes();
            let mut sig = key.sign(&msg);
            if bad.contains(&(i as usize)) {
                match i % 3 {
                    0 => sig.0[5] ^= 1,                         // a flipped bit in R
                    1 => sig = key.sign(b"some other request"), // valid, other bytes
                    _ => sig.0[40] ^= 0x80,                     // a flipped bit in s
                }
            }
            items.push((ClientId(i), msg, sig));
        }
        (ring, items)
    }

    fn client_sigs(items: &[(ClientId, Vec<u8>, Signature)]) -> Vec<ClientSig<'_>> {
        items
            .iter()
            .map(|(c, m, s)| ClientSig {
                client: *c,
                msg: m,
                sig: s,
            })
            .collect()
    }

    fn batch_and_single(
        ring: &KeyRing,
        items: &[(ClientId, Vec<u8>, Signature)],
    ) -> (Vec<bool>, Vec<bool>) {
        let sigs = client_sigs(items);
        let single = items
            .iter()
            .map(|(c, m, s)| ring.verify_client(*c, m, s))
            .collect();
        (ring.verify_clients(&sigs), single)
    }

    #[test]
    fn batch_verdicts_are_exactly_the_single_verdicts() {
        for bad in [vec![], vec![0], vec![4], vec![2, 7, 9], (0..10).collect()] {
            let (ring, items) = mixed_batch(&bad);
            let (batch, single) = batch_and_single(&ring, &items);
            assert_eq!(batch, single, "bad items {bad:?}");
            let expect: Vec<bool> = (0..10).map(|i| !bad.contains(&i)).collect();
            assert_eq!(batch, expect, "bad items {bad:?}");
        }
    }

    #[test]
    fn the_batch_equation_itself_holds_only_for_an_all_valid_batch() {
        // Not only the per-signature fallback: a valid batch passes in one equation.
        for (bad, holds) in [(vec![], true), (vec![6], false), (vec![1, 8], false)] {
            let (ring, items) = mixed_batch(&bad);
            let sigs = client_sigs(&items);
            let known: Vec<(usize, &ClientKey)> = items
                .iter()
                .enumerate()
                .map(|(i, (c, _, _))| (i, &ring.clients[c]))
                .collect();
            assert_eq!(batch_holds(&sigs, &known), holds, "bad items {bad:?}");
        }
    }

    #[test]
    fn unregistered_signers_fail_in_a_batch_without_failing_the_others() {
        let (ring, mut items) = mixed_batch(&[]);
        items[3].0 = ClientId(77);
        let (batch, single) = batch_and_single(&ring, &items);
        assert_eq!(batch, single);
        assert_eq!(batch.iter().filter(|ok| !**ok).count(), 1);
        assert!(!batch[3]);
    }
}
