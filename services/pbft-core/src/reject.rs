//! Why a replica refused an input. Every refusal is counted by reason, so an operator can tell
//! a noisy network from a lying peer, and the replica carries on.

use std::collections::BTreeMap;
use std::fmt;

/// The reason an incoming message or request was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RejectReason {
    /// Claims to come from a replica or client not in the configuration.
    UnknownSender,
    /// Signature does not verify under the claimed author's key.
    BadSignature,
    /// A digest does not match the content it describes.
    DigestMismatch,
    /// For a view older than the replica's.
    StaleView,
    /// For a view newer than the replica's; it will catch up by view change or sync.
    FutureView,
    /// Sequence number outside the low/high watermarks.
    OutOfWindow,
    /// Already have this exact message.
    Duplicate,
    /// Conflicts with a message the same author sent before (equivocation).
    Conflicting,
    /// Well-formed but not acceptable now: wrong sender for its type, or normal-case
    /// traffic during a view change.
    WrongPhase,
    /// A certificate inside the message (prepared, checkpoint, view change, commit) is
    /// invalid or short of a quorum.
    InvalidCertificate,
    /// Structurally invalid: empty or oversized fields, too many entries.
    Malformed,
    /// A client request older than the client's last executed one.
    StaleRequest,
    /// The primary's request queue is full.
    Overloaded,
    /// A sync response that is forged, truncated or does not extend the local chain.
    BadSyncData,
}

impl RejectReason {
    pub const ALL: [RejectReason; 14] = [
        RejectReason::UnknownSender,
        RejectReason::BadSignature,
        RejectReason::DigestMismatch,
        RejectReason::StaleView,
        RejectReason::FutureView,
        RejectReason::OutOfWindow,
        RejectReason::Duplicate,
        RejectReason::Conflicting,
        RejectReason::WrongPhase,
        RejectReason::InvalidCertificate,
        RejectReason::Malformed,
        RejectReason::StaleRequest,
        RejectReason::Overloaded,
        RejectReason::BadSyncData,
    ];

    /// Stable snake_case name, used as a metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::UnknownSender => "unknown_sender",
            RejectReason::BadSignature => "bad_signature",
            RejectReason::DigestMismatch => "digest_mismatch",
            RejectReason::StaleView => "stale_view",
            RejectReason::FutureView => "future_view",
            RejectReason::OutOfWindow => "out_of_window",
            RejectReason::Duplicate => "duplicate",
            RejectReason::Conflicting => "conflicting",
            RejectReason::WrongPhase => "wrong_phase",
            RejectReason::InvalidCertificate => "invalid_certificate",
            RejectReason::Malformed => "malformed",
            RejectReason::StaleRequest => "stale_request",
            RejectReason::Overloaded => "overloaded",
            RejectReason::BadSyncData => "bad_sync_data",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Running totals of refusals by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RejectCounts(BTreeMap<RejectReason, u64>);

impl RejectCounts {
    pub fn add(&mut self, reason: RejectReason) {
        *self.0.entry(reason).or_default() += 1;
    }

    pub fn get(&self, reason: RejectReason) -> u64 {
        self.0.get(&reason).copied().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = (RejectReason, u64)> + '_ {
        self.0.iter().map(|(r, c)| (*r, *c))
    }
}
