//! A snapshot of the replica's state for `/status`, `/readyz` and `GetStatus`, refreshed by
//! the node loop and read by the servers without touching the protocol state.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// One peer as the transport sees it.
#[derive(Debug)]
pub struct PeerState {
    pub id: u32,
    pub address: RwLock<String>,
    pub connected: AtomicBool,
}

/// Connection state of every peer, shared by the transport (writer) and status (readers).
#[derive(Debug, Default)]
pub struct PeerTable {
    pub peers: Vec<Arc<PeerState>>,
}

impl PeerTable {
    pub fn new(peers: impl IntoIterator<Item = (u32, String)>) -> Self {
        PeerTable {
            peers: peers
                .into_iter()
                .map(|(id, address)| {
                    Arc::new(PeerState {
                        id,
                        address: RwLock::new(address),
                        connected: AtomicBool::new(false),
                    })
                })
                .collect(),
        }
    }

    pub fn get(&self, id: u32) -> Option<&Arc<PeerState>> {
        self.peers.iter().find(|p| p.id == id)
    }

    pub fn connected(&self) -> usize {
        self.peers
            .iter()
            .filter(|p| p.connected.load(Ordering::Relaxed))
            .count()
    }
}

/// A peer in `/status`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PeerView {
    pub id: u32,
    pub address: String,
    pub connected: bool,
}

/// What `/status` returns.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct StatusView {
    pub id: u32,
    pub n: usize,
    pub f: usize,
    pub view: u64,
    pub primary: u32,
    pub view_change_in_progress: bool,
    pub height: u64,
    pub head_hash: String,
    /// Digest of the replicated state at `state_digest_height` (refreshed at most once a
    /// second while /status is being read: it is linear in the state's size).
    pub state_digest: String,
    pub state_digest_height: u64,
    pub stable_checkpoint: u64,
    pub sync_target: Option<u64>,
    pub pending_requests: usize,
    /// Client requests this process has executed since it started (a block holds a batch
    /// of them, so `height` counts batches): what a rate of commits is computed from.
    pub executed_requests: u64,
    pub transport: String,
    pub peers: Vec<PeerView>,
}

/// Shared status: the latest snapshot plus a heartbeat the node loop bumps every turn.
#[derive(Debug, Default)]
pub struct SharedStatus {
    pub view: RwLock<StatusView>,
    heartbeat_ms: AtomicU64,
    digest_requested: AtomicBool,
    pub peers: PeerTable,
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl SharedStatus {
    pub fn new(peers: PeerTable) -> Self {
        SharedStatus {
            view: RwLock::new(StatusView::default()),
            heartbeat_ms: AtomicU64::new(unix_ms()),
            digest_requested: AtomicBool::new(true),
            peers,
        }
    }

    /// Asks the node loop to refresh the state digest (a reader of /status wants it).
    pub fn request_digest(&self) {
        self.digest_requested.store(true, Ordering::Relaxed);
    }

    /// Whether a digest was asked for since the last call (and clears the request).
    pub fn take_digest_request(&self) -> bool {
        self.digest_requested.swap(false, Ordering::Relaxed)
    }

    pub fn beat(&self) {
        self.heartbeat_ms.store(unix_ms(), Ordering::Relaxed);
    }

    /// Milliseconds since the node loop last went round.
    pub fn since_heartbeat_ms(&self) -> u64 {
        unix_ms().saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed))
    }

    /// The snapshot with live peer states filled in.
    pub fn snapshot(&self) -> StatusView {
        let mut v = self.view.read().map(|v| v.clone()).unwrap_or_default();
        v.peers = self
            .peers
            .peers
            .iter()
            .map(|p| PeerView {
                id: p.id,
                address: p.address.read().map(|a| a.clone()).unwrap_or_default(),
                connected: p.connected.load(Ordering::Relaxed),
            })
            .collect();
        v
    }

    pub fn set(&self, v: StatusView) {
        if let Ok(mut cur) = self.view.write() {
            *cur = v;
        }
    }
}
