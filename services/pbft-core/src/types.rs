//! Identifiers and fixed-size values shared by every part of the protocol.
//!
//! They are newtypes so that a view can never be passed where a sequence number is expected,
//! and so that adapters convert wire integers exactly once (at their boundary).

use std::fmt;

/// Index of a replica in the cluster configuration, `0..n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ReplicaId(pub u32);

/// A registered client. Clients are identified by number; their public key is in the
/// [`crate::KeyRing`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ClientId(pub u64);

/// A PBFT view number. The primary of view `v` is replica `v mod n`.
pub type View = u64;

/// A sequence number; committed sequence number `s` becomes block height `s`.
pub type Seq = u64;

/// Virtual time in ticks. The core never reads a clock: the adapter feeds ticks in.
pub type Tick = u64;

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}", self.0)
    }
}

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The all-zero digest: the previous hash of the first block, and "no batch".
    pub const ZERO: Digest = Digest([0; 32]);

    /// Parses a digest from wire bytes, which must be exactly 32 long.
    pub fn from_slice(bytes: &[u8]) -> Option<Digest> {
        bytes.try_into().ok().map(Digest)
    }

    /// Short hex prefix for logs.
    pub fn short(&self) -> String {
        crate::encode::to_hex(&self.0[..4])
    }

    /// Full lowercase hex.
    pub fn to_hex(&self) -> String {
        crate::encode::to_hex(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.short())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// An ed25519 signature (64 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature(pub [u8; 64]);

impl Signature {
    /// A signature that verifies under no key; used by tests and by Byzantine replicas in the
    /// simulator.
    pub const INVALID: Signature = Signature([0; 64]);

    /// Parses a signature from wire bytes, which must be exactly 64 long.
    pub fn from_slice(bytes: &[u8]) -> Option<Signature> {
        bytes.try_into().ok().map(Signature)
    }
}

impl Default for Signature {
    fn default() -> Self {
        Signature::INVALID
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sig:")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}
