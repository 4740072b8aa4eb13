//! Replica-to-replica transports. Both carry `PBFTMessage` envelopes and hand what they
//! receive to the node loop; both keep one bounded outbound queue per peer, so a slow or
//! dead peer costs counted drops, never memory or the other peers' progress.

pub mod grpc;
pub mod tcp;
pub mod tls;

use std::time::Duration;

use pbft_core::{Message, ReplicaId};

/// How the node loop sends. Implementations never block: they enqueue or drop (counted).
pub trait Outbound: Send + Sync {
    /// Sends to one peer (a `SyncRequest` becomes the transport's sync call).
    fn send(&self, to: ReplicaId, msg: &Message);
    /// Sends to every peer; returns the peers it could not enqueue for, with why.
    fn broadcast(&self, msg: &Message) -> Vec<(ReplicaId, SendError)>;
}

/// Why a message did not reach a peer's queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("peer queue full")]
    QueueFull,
    #[error("unknown peer")]
    UnknownPeer,
    #[error("transport stopped")]
    Closed,
}

impl SendError {
    pub fn label(&self) -> &'static str {
        match self {
            SendError::QueueFull => "queue_full",
            SendError::UnknownPeer => "unknown_peer",
            SendError::Closed => "closed",
        }
    }
}

/// Puts an envelope on a peer's bounded queue without waiting; a full or closed queue drops
/// it and counts the drop, so one slow peer never holds up the others.
pub(crate) fn enqueue(
    peer: ReplicaId,
    tx: &tokio::sync::mpsc::Sender<pbft_api::pb::PbftMessage>,
    envelope: pbft_api::pb::PbftMessage,
    metrics: &crate::metrics::Metrics,
) -> Result<(), SendError> {
    use tokio::sync::mpsc::error::TrySendError;
    tx.try_send(envelope).map_err(|e| {
        let err = match e {
            TrySendError::Full(_) => SendError::QueueFull,
            TrySendError::Closed(_) => SendError::Closed,
        };
        metrics
            .dropped_messages
            .with_label_values(&[&peer.0.to_string(), err.label()])
            .inc();
        err
    })
}

/// The name a replica uses in envelopes' `node_id`.
pub fn node_name(id: ReplicaId) -> String {
    format!("replica-{}", id.0)
}

/// Parses a `node_id` back into a replica id (`replica-3` -> 3).
pub fn parse_node_name(name: &str) -> Option<ReplicaId> {
    name.strip_prefix("replica-")?.parse().ok().map(ReplicaId)
}

/// Exponential backoff with jitter for redialling: doubles from `min` up to `max`, and
/// each wait is drawn from the upper half of the current step so peers do not redial in
/// lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
    seed: u64,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration, seed: u64) -> Self {
        Backoff {
            min,
            max,
            current: min,
            seed: seed | 1,
        }
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }

    /// The next wait.
    pub fn next_delay(&mut self) -> Duration {
        // xorshift: jitter needs no cryptographic quality.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let step = self.current.as_millis().max(1) as u64;
        let delay = Duration::from_millis(step / 2 + self.seed % (step / 2 + 1));
        self.current = (self.current * 2).min(self.max);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_round_trip() {
        assert_eq!(
            parse_node_name(&node_name(ReplicaId(7))),
            Some(ReplicaId(7))
        );
        assert_eq!(parse_node_name("replica-x"), None);
        assert_eq!(parse_node_name("7"), None);
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000), 42);
        let waits: Vec<u64> = (0..8).map(|_| b.next_delay().as_millis() as u64).collect();
        assert!((50..=100).contains(&waits[0]), "{waits:?}");
        assert!((100..=200).contains(&waits[1]), "{waits:?}");
        assert!(waits[7] <= 1000 && waits[7] >= 500, "{waits:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}

/// An [`Outbound`] installed after construction (the transport needs the node's handle,
/// and the node needs an outbound). Messages before installation are dropped.
#[derive(Default)]
pub struct LateOutbound {
    inner: std::sync::OnceLock<std::sync::Arc<dyn Outbound>>,
}

impl LateOutbound {
    pub fn set(&self, o: std::sync::Arc<dyn Outbound>) {
        let _ = self.inner.set(o);
    }
}

impl Outbound for LateOutbound {
    fn send(&self, to: ReplicaId, msg: &Message) {
        if let Some(o) = self.inner.get() {
            o.send(to, msg);
        }
    }

    fn broadcast(&self, msg: &Message) -> Vec<(ReplicaId, SendError)> {
        match self.inner.get() {
            Some(o) => o.broadcast(msg),
            None => Vec::new(),
        }
    }
}
