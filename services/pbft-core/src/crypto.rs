//! Signing and verification, behind traits the adapters can supply.
//!
//! The core only needs "sign these bytes as me" and "did principal X sign these bytes". The
//! shipped implementation is ed25519 ([`Ed25519Signer`], [`KeyRing`]); keys are handed in, never
//! generated from OS randomness here, so the simulator can derive them from its seed.
//!
//! Every signature, a client's or a replica's, is checked under the ZIP215 rules
//! (ed25519-zebra, as CometBFT's ed25519consensus does) because only there batch and single
//! verification agree on every input: replicas that happen to batch different messages
//! together still reach the same verdict on each one, so no signer can craft a message
//! that some correct replicas accept and others refuse, and a certificate valid for one
//! replica is valid for all. Small-order ("weak") keys are refused when registered: ZIP215
//! would let their holder's signatures verify for messages it never signed.

use std::collections::{BTreeMap, HashMap};

use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::{IsIdentity, VartimeMultiscalarMul};

use ed25519_dalek::VerifyingKey;
use ed25519_dalek::hazmat::ExpandedSecretKey;

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
    /// Checks many replica signatures at once: element `i` of the answer is exactly what
    /// `verify_replica` says of `items[i]`, however the items are grouped.
    fn verify_replicas(&self, items: &[ReplicaSig<'_>]) -> Vec<bool> {
        items
            .iter()
            .map(|i| self.verify_replica(i.replica, i.msg, i.sig))
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

/// One replica signature to check: who claims to have signed, the bytes, the signature.
#[derive(Clone, Copy, Debug)]
pub struct ReplicaSig<'a> {
    pub replica: ReplicaId,
    pub msg: &'a [u8],
    pub sig: &'a Signature,
}

impl<'a> ReplicaSig<'a> {
    /// Borrows an owned (author, signed bytes, signature) triple.
    pub fn of((replica, msg, sig): &'a (ReplicaId, Vec<u8>, Signature)) -> Self {
        ReplicaSig {
            replica: *replica,
            msg,
            sig,
        }
    }
}

/// An ed25519 private key, expanded once (the secret scalar and nonce prefix are a hash of
/// the seed, which signing would otherwise recompute every time).
pub struct Ed25519Signer {
    expanded: ExpandedSecretKey,
    public: VerifyingKey,
}

impl Ed25519Signer {
    /// Builds a key from 32 secret bytes (a seed). Adapters read them from a key file; the
    /// simulator derives them from its scenario seed.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let expanded = ExpandedSecretKey::from(&secret);
        Ed25519Signer {
            public: VerifyingKey::from(&expanded),
            expanded,
        }
    }

    /// The public half, to register in a [`KeyRing`].
    pub fn public(&self) -> PublicKey {
        PublicKey(self.public.to_bytes())
    }
}

impl Signer for Ed25519Signer {
    fn sign(&self, msg: &[u8]) -> Signature {
        Signature(
            ed25519_dalek::hazmat::raw_sign::<sha2::Sha512>(&self.expanded, msg, &self.public)
                .to_bytes(),
        )
    }
}

/// An ed25519 public key as raw bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

/// The public keys of every replica and registered client.
#[derive(Clone, Default)]
pub struct KeyRing {
    replicas: Vec<ParsedKey>,
    clients: BTreeMap<ClientId, ParsedKey>,
}

/// A public key parsed once for ZIP215 verification: the batch equation uses the
/// decompressed point directly, so no batch pays for decompressing it again
/// (ed25519-zebra's batch API takes key bytes and did, about 4 % of a loaded cluster's CPU).
#[derive(Clone)]
struct ParsedKey {
    key: ed25519_zebra::VerificationKey,
    bytes: [u8; 32],
    point: EdwardsPoint,
}

impl ParsedKey {
    /// The key, unless it is not a point or has small order.
    fn parse(bytes: [u8; 32]) -> Option<Self> {
        let dalek = VerifyingKey::from_bytes(&bytes).ok()?;
        if dalek.is_weak() {
            return None;
        }
        let key = ed25519_zebra::VerificationKey::try_from(bytes).ok()?;
        // ZIP215 decoding, exactly as ed25519-zebra decodes A (non-canonical y accepted).
        let point = CompressedEdwardsY(bytes).decompress()?;
        Some(ParsedKey { key, bytes, point })
    }

    fn verify(&self, msg: &[u8], sig: &Signature) -> bool {
        self.key
            .verify(&ed25519_zebra::Signature::from_bytes(&sig.0), msg)
            .is_ok()
    }
}

/// One signature with the key it must verify under.
#[derive(Clone, Copy)]
struct Item<'a> {
    key: &'a ParsedKey,
    msg: &'a [u8],
    sig: &'a Signature,
}

/// Below this many signatures a batch saves too little to pay for its set-up.
const MIN_BATCH: usize = 4;

/// A public key that is not a valid ed25519 point.
#[derive(Debug, thiserror::Error)]
#[error("invalid ed25519 public key for {0}")]
pub struct InvalidKey(pub String);

impl KeyRing {
    /// Key ring for replicas `0..keys.len()`. Small-order keys are refused.
    pub fn new(replica_keys: &[PublicKey]) -> Result<Self, InvalidKey> {
        let replicas = replica_keys
            .iter()
            .enumerate()
            .map(|(i, k)| ParsedKey::parse(k.0).ok_or_else(|| InvalidKey(format!("replica {i}"))))
            .collect::<Result<_, _>>()?;
        Ok(KeyRing {
            replicas,
            clients: BTreeMap::new(),
        })
    }

    /// Registers (or replaces) a client's key. Small-order keys are refused.
    pub fn add_client(&mut self, id: ClientId, key: PublicKey) -> Result<(), InvalidKey> {
        let parsed = ParsedKey::parse(key.0).ok_or_else(|| InvalidKey(id.to_string()))?;
        self.clients.insert(id, parsed);
        Ok(())
    }

    pub fn replica_count(&self) -> usize {
        self.replicas.len()
    }
}

impl Verifier for KeyRing {
    fn verify_replica(&self, who: ReplicaId, msg: &[u8], sig: &Signature) -> bool {
        self.replicas
            .get(who.0 as usize)
            .is_some_and(|k| k.verify(msg, sig))
    }

    fn verify_client(&self, who: ClientId, msg: &[u8], sig: &Signature) -> bool {
        self.clients.get(&who).is_some_and(|k| k.verify(msg, sig))
    }

    fn knows_client(&self, who: ClientId) -> bool {
        self.clients.contains_key(&who)
    }

    fn verify_clients(&self, items: &[ClientSig<'_>]) -> Vec<bool> {
        let items: Vec<Option<Item<'_>>> = items
            .iter()
            .map(|it| {
                self.clients.get(&it.client).map(|key| Item {
                    key,
                    msg: it.msg,
                    sig: it.sig,
                })
            })
            .collect();
        verify_batch(&items)
    }

    fn verify_replicas(&self, items: &[ReplicaSig<'_>]) -> Vec<bool> {
        let items: Vec<Option<Item<'_>>> = items
            .iter()
            .map(|it| {
                self.replicas.get(it.replica.0 as usize).map(|key| Item {
                    key,
                    msg: it.msg,
                    sig: it.sig,
                })
            })
            .collect();
        verify_batch(&items)
    }
}

/// Verdicts for `items` (`None`: an unknown signer, never valid): one batch equation for
/// all known signers; if it fails, each signature on its own, so one bad signature costs
/// its batch a second pass but never the good ones.
fn verify_batch(items: &[Option<Item<'_>>]) -> Vec<bool> {
    let known: Vec<Item<'_>> = items.iter().flatten().copied().collect();
    if known.len() >= MIN_BATCH && batch_holds(&known) {
        return items.iter().map(Option::is_some).collect();
    }
    items
        .iter()
        .map(|it| it.is_some_and(|it| it.key.verify(it.msg, it.sig)))
        .collect()
}

/// Whether the ZIP215 batch equation holds for `items`: true exactly when every one of
/// those signatures verifies on its own.
///
/// The equation is ed25519-zebra's (ZIP215):
/// `8·[-Σ z_i·s_i]B + 8·Σ [z_i]R_i + 8·Σ [z_i·k_i]A_i = 0` with `k_i = H(R_i ‖ A_i ‖ M_i)`,
/// each `s_i` canonical and each `R_i` any valid encoding, and the terms of one signer
/// coalesced into one coefficient. It differs only in taking `A_i` already decompressed.
/// `tests::own_batch_equation_agrees_with_ed25519_zebra` holds the two side by side.
#[allow(non_snake_case)]
fn batch_holds(items: &[Item<'_>]) -> bool {
    use sha2::Digest as _;
    let mut rng = TranscriptRng::new(items);
    let mut B_coeff = Scalar::ZERO;
    let mut coeffs: Vec<Scalar> = Vec::with_capacity(items.len() * 2 + 1);
    let mut points: Vec<EdwardsPoint> = Vec::with_capacity(items.len() * 2 + 1);
    // Where each signer's coalesced A coefficient sits in `coeffs`.
    let mut signer_at: HashMap<[u8; 32], usize> = HashMap::with_capacity(items.len());
    for it in items {
        let (r_bytes, s_bytes) = it.sig.0.split_at(32);
        let (Ok(r_bytes), Ok(s_bytes)) =
            (<[u8; 32]>::try_from(r_bytes), <[u8; 32]>::try_from(s_bytes))
        else {
            return false;
        };
        let Some(R) = CompressedEdwardsY(r_bytes).decompress() else {
            return false;
        };
        let Some(s) = Option::<Scalar>::from(Scalar::from_canonical_bytes(s_bytes)) else {
            return false;
        };
        let k = Scalar::from_hash(
            sha2::Sha512::new()
                .chain_update(r_bytes)
                .chain_update(it.key.bytes)
                .chain_update(it.msg),
        );
        let z = Scalar::from(rng.next_u128());
        B_coeff -= z * s;
        coeffs.push(z);
        points.push(R);
        let at = *signer_at.entry(it.key.bytes).or_insert_with(|| {
            coeffs.push(Scalar::ZERO);
            points.push(it.key.point);
            coeffs.len() - 1
        });
        coeffs[at] += z * k;
    }
    coeffs.push(B_coeff);
    points.push(ED25519_BASEPOINT_POINT);
    EdwardsPoint::vartime_multiscalar_mul(&coeffs, &points)
        .mul_by_cofactor()
        .is_identity()
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
    fn new(items: &[Item<'_>]) -> Self {
        use sha2::Digest as _;
        let mut h = sha2::Sha512::new();
        h.update(b"pbft signature batch v2");
        for it in items {
            h.update(it.key.bytes);
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

    /// 128 random bits: enough that a forged signature passes a batch with probability
    /// 2^-128.
    fn next_u128(&mut self) -> u128 {
        use sha2::Digest as _;
        if self.used + 16 > self.block.len() {
            let mut h = sha2::Sha512::new();
            h.update(self.seed);
            h.update(self.counter.to_le_bytes());
            self.block = h.finalize().into();
            self.counter += 1;
            self.used = 0;
        }
        let mut b = [0u8; 16];
        b.copy_from_slice(&self.block[self.used..self.used + 16]);
        self.used += 16;
        u128::from_le_bytes(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex<const N: usize>(s: &str) -> [u8; N] {
        let mut out = [0u8; N];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn signing_matches_rfc_8032_and_ed25519_dalek() {
        // RFC 8032 section 7.1, test 1 (empty message).
        let key = Ed25519Signer::from_secret(unhex(
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        ));
        assert_eq!(
            key.public().0,
            unhex::<32>("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
        );
        assert_eq!(
            key.sign(b"").0,
            unhex::<64>(
                "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
            )
        );
        for seed in 0..8u8 {
            let secret = [seed.wrapping_mul(37).wrapping_add(1); 32];
            let ours = Ed25519Signer::from_secret(secret);
            let theirs = ed25519_dalek::SigningKey::from_bytes(&secret);
            let msg = vec![seed; 100 * seed as usize];
            use ed25519_dalek::Signer as _;
            assert_eq!(ours.sign(&msg).0, theirs.sign(&msg).to_bytes());
        }
    }

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

    #[test]
    fn small_order_replica_keys_are_refused() {
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let good = Ed25519Signer::from_secret([5; 32]).public();
        let err = KeyRing::new(&[good, PublicKey(identity)]).err().unwrap();
        assert_eq!(err.0, "replica 1");
    }

    /// Replica signatures checked together get exactly their single verdicts: good ones,
    /// broken ones, another replica's signature, and an author outside the ring.
    #[test]
    fn replica_batches_agree_with_single_checks() {
        let keys: Vec<Ed25519Signer> = (0..4u8)
            .map(|i| Ed25519Signer::from_secret([60 + i; 32]))
            .collect();
        let ring = KeyRing::new(&keys.iter().map(|k| k.public()).collect::<Vec<_>>()).unwrap();
        for bad in [vec![], vec![1], vec![0, 5], vec![6], (0..8).collect()] {
            let mut items = Vec::new();
            for i in 0..8usize {
                let who = i % 4;
                let msg = format!("vote {i}").into_bytes();
                let mut sig = keys[who].sign(&msg);
                let mut author = ReplicaId(who as u32);
                if bad.contains(&i) {
                    match i % 3 {
                        0 => sig.0[3] ^= 1,
                        1 => author = ReplicaId(((who + 1) % 4) as u32),
                        _ => author = ReplicaId(9),
                    }
                }
                items.push((author, msg, sig));
            }
            let sigs: Vec<ReplicaSig<'_>> = items.iter().map(ReplicaSig::of).collect();
            let single: Vec<bool> = items
                .iter()
                .map(|(a, m, s)| ring.verify_replica(*a, m, s))
                .collect();
            let expect: Vec<bool> = (0..8).map(|i| !bad.contains(&i)).collect();
            assert_eq!(ring.verify_replicas(&sigs), single, "bad items {bad:?}");
            assert_eq!(single, expect, "bad items {bad:?}");
        }
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

    /// Each item with its signer's key (every signer registered).
    fn known_keys<'a>(
        ring: &'a KeyRing,
        items: &'a [(ClientId, Vec<u8>, Signature)],
    ) -> Vec<Item<'a>> {
        items
            .iter()
            .map(|(c, msg, sig)| Item {
                key: &ring.clients[c],
                msg,
                sig,
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
            let known = known_keys(&ring, &items);
            assert_eq!(batch_holds(&known), holds, "bad items {bad:?}");
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

    /// The batch equation over cached key points against ed25519-zebra's own batch
    /// verifier and its single verification, on batches with one signer signing several
    /// requests, broken R, broken s, s >= l, R off the curve, and signatures of other bytes.
    #[test]
    fn own_batch_equation_agrees_with_ed25519_zebra() {
        let keys: Vec<Ed25519Signer> = (0..6u8)
            .map(|i| Ed25519Signer::from_secret([40 + i; 32]))
            .collect();
        let mut ring = KeyRing::new(&[]).unwrap();
        for (i, k) in keys.iter().enumerate() {
            ring.add_client(ClientId(i as u64), k.public()).unwrap();
        }
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut held, mut refused) = (0, 0);
        for round in 0..300 {
            let len = 4 + (next() % 12) as usize;
            let mut items = Vec::new();
            for j in 0..len {
                // Few signers, so one signer's terms are often coalesced.
                let who = (next() % keys.len() as u64) as usize;
                let msg = format!("round {round} item {j}").into_bytes();
                let mut sig = keys[who].sign(&msg);
                if round % 2 == 1 && next() % 6 == 0 {
                    match next() % 5 {
                        0 => sig.0[(next() % 32) as usize] ^= 1 << (next() % 8),
                        1 => sig.0[32 + (next() % 31) as usize] ^= 1 << (next() % 8),
                        2 => sig.0[63] |= 0xF0, // s >= l: refused, never reduced
                        3 => sig.0[..32].copy_from_slice(&[0xFF; 32]), // R not a point
                        _ => sig = keys[who].sign(b"other bytes"),
                    }
                }
                items.push((ClientId(who as u64), msg, sig));
            }
            let known = known_keys(&ring, &items);
            let ours = batch_holds(&known);
            let mut zebra = ed25519_zebra::batch::Verifier::new();
            for (c, m, s) in &items {
                zebra.queue((
                    ed25519_zebra::VerificationKeyBytes::from(ring.clients[c].bytes),
                    ed25519_zebra::Signature::from_bytes(&s.0),
                    m.as_slice(),
                ));
            }
            let theirs = zebra
                .verify(TranscriptRngCompat(TranscriptRng::new(&known)))
                .is_ok();
            let singles = items.iter().all(|(c, m, s)| ring.verify_client(*c, m, s));
            assert_eq!(ours, theirs, "round {round}");
            assert_eq!(ours, singles, "round {round}");
            if ours {
                held += 1;
            } else {
                refused += 1;
            }
        }
        // Both outcomes were exercised many times.
        assert!(held > 100 && refused > 30, "held {held}, refused {refused}");
    }

    /// ed25519-zebra's verifier wants a `rand_core` generator; ours only makes `u128`s.
    struct TranscriptRngCompat(TranscriptRng);

    impl rand_core::TryRng for TranscriptRngCompat {
        type Error = std::convert::Infallible;
        fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
            Ok(self.0.next_u128() as u32)
        }
        fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
            Ok(self.0.next_u128() as u64)
        }
        fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
            for chunk in dst.chunks_mut(16) {
                let b = self.0.next_u128().to_le_bytes();
                chunk.copy_from_slice(&b[..chunk.len()]);
            }
            Ok(())
        }
    }

    impl rand_core::TryCryptoRng for TranscriptRngCompat {}
}
