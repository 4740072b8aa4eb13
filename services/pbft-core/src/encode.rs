//! Canonical byte encoding of protocol values, used for digests and signatures.
//!
//! Signatures must verify on any replica whatever wire format carried the message, so the
//! signed bytes are derived from the core's own types, never from protobuf output (whose
//! encoding is not canonical). Every signed structure starts with a distinct domain tag so a
//! signature over one kind of message can never be replayed as another.

use sha2::{Digest as _, Sha256};

use crate::types::Digest;

/// Domain tags: one per signed or hashed structure.
pub(crate) mod tag {
    pub const REQUEST: u8 = 1;
    pub const BATCH: u8 = 2;
    pub const PRE_PREPARE: u8 = 3;
    pub const PREPARE: u8 = 4;
    pub const COMMIT: u8 = 5;
    pub const CHECKPOINT: u8 = 6;
    pub const VIEW_CHANGE: u8 = 7;
    pub const NEW_VIEW: u8 = 8;
    pub const BLOCK: u8 = 9;
    pub const STATE: u8 = 10;
    pub const RESULTS: u8 = 11;
    pub const CHECKPOINT_STATE: u8 = 12;
    pub const STATUS: u8 = 13;
    pub const STATE_BUCKETS: u8 = 14;
    pub const STATE_BUCKET: u8 = 15;
    pub const PREPARE_UNVOUCHED: u8 = 16;
    pub const REQUEST_DIGEST: u8 = 17;
}

/// Appends fixed-width big-endian integers and length-prefixed byte strings.
#[derive(Default)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// Starts an encoding with a domain tag.
    pub fn new(tag: u8) -> Self {
        Self::with_capacity(tag, 128)
    }

    /// Starts an encoding expected to take about `capacity` bytes, so that a large one is
    /// not copied each time its buffer doubles.
    pub fn with_capacity(tag: u8, capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity.max(1));
        buf.push(tag);
        Encoder { buf }
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u64(v.len() as u64);
        self.buf.extend_from_slice(v);
        self
    }

    pub fn opt_bytes(&mut self, v: Option<&[u8]>) -> &mut Self {
        match v {
            None => self.u8(0),
            Some(b) => self.u8(1).bytes(b),
        }
    }

    pub fn digest(&mut self, d: &Digest) -> &mut Self {
        self.buf.extend_from_slice(&d.0);
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.buf
    }

    /// SHA-256 of what was encoded.
    pub fn hash(&self) -> Digest {
        sha256(&self.buf)
    }
}

/// SHA-256 of a byte string.
pub fn sha256(bytes: &[u8]) -> Digest {
    Digest(Sha256::digest(bytes).into())
}

/// Lowercase hex of bytes (digests, keys in configuration files).
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses 64 hex characters (surrounding whitespace ignored) into 32 bytes: the form keys
/// and digests take in files and configuration.
pub fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in text.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}
