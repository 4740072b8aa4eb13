//! The raw TCP transport (the seed's section 3): each side proves its replica identity in a
//! handshake, then length-delimited `PBFTMessage` frames flow. As with gRPC, every replica
//! dials every peer for its own sending; received connections carry the peer's messages in,
//! and sync answers back out.
//!
//! Handshake (fixed binary layout inside length-delimited frames, version 1):
//! 1. dialler -> acceptor: `HELLO  = [1][id_a: u32][nonce_a: 32]`
//! 2. acceptor -> dialler: `ACCEPT = [1][id_b: u32][nonce_b: 32][sig_b: 64]`, where `sig_b`
//!    signs `TAG || id_a || id_b || nonce_a || nonce_b`; the dialler checks it is the peer it
//!    meant to reach.
//! 3. dialler -> acceptor: `PROOF  = [1][sig_a: 64]` over `TAG || id_b || id_a || nonce_b ||
//!    nonce_a`.
//!
//! Both nonces are fresh, so a recorded handshake cannot be replayed, and a peer that cannot
//! sign with its configured key is refused and counted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use pbft_api::pb;
use pbft_core::{Message, ReplicaId, Signature, Signer, Source, StateProvider, Verifier};
use prost::Message as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tracing::{debug, info, warn};

use super::grpc::{pb_kind, sync_answer};
use super::{Backoff, Outbound, SendError, node_name};
use crate::discovery::PeerResolver;
use crate::metrics::Metrics;
use crate::node::{Inbound, NodeHandle};
use crate::status::SharedStatus;
use pbft_api::convert::{decode_envelope, to_envelope};

const VERSION: u8 = 1;
const TAG: &[u8] = b"pbft-tcp-handshake-v1";
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of the TCP transport.
#[derive(Clone, Debug)]
pub struct TcpSettings {
    pub max_message_bytes: usize,
    pub dial_timeout: Duration,
    pub queue_capacity: usize,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

/// Keys and identity for handshakes.
#[derive(Clone)]
pub struct Identity {
    pub me: ReplicaId,
    pub signer: Arc<dyn Signer>,
    pub verifier: Arc<dyn Verifier>,
    pub n: usize,
}

fn codec(max: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(max)
        .new_codec()
}

fn nonce() -> [u8; 32] {
    // Fresh per handshake; uniqueness matters, not secrecy: mix time and a counter.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let c = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut input = Vec::with_capacity(32);
    input.extend_from_slice(&t.to_be_bytes());
    input.extend_from_slice(&c.to_be_bytes());
    input.extend_from_slice(&std::process::id().to_be_bytes());
    pbft_core::encode::sha256(&input).0
}

fn transcript(
    signer_id: ReplicaId,
    other: ReplicaId,
    nonce_other: &[u8; 32],
    nonce_signer: &[u8; 32],
) -> Vec<u8> {
    let mut t = TAG.to_vec();
    t.extend_from_slice(&other.0.to_be_bytes());
    t.extend_from_slice(&signer_id.0.to_be_bytes());
    t.extend_from_slice(nonce_other);
    t.extend_from_slice(nonce_signer);
    t
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("connection closed during handshake")]
    Closed,
    #[error("handshake timed out")]
    Timeout,
    #[error("malformed handshake frame")]
    Malformed,
    #[error("peer claims replica {0}, which is not in the cluster or not the one dialled")]
    WrongPeer(u32),
    #[error("peer {0} could not prove its identity (bad signature)")]
    BadProof(u32),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

type Conn = Framed<TcpStream, LengthDelimitedCodec>;

async fn recv_frame(conn: &mut Conn) -> Result<bytes::BytesMut, HandshakeError> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.next()).await {
        Err(_) => Err(HandshakeError::Timeout),
        Ok(None) => Err(HandshakeError::Closed),
        Ok(Some(Err(e))) => Err(e.into()),
        Ok(Some(Ok(f))) => Ok(f),
    }
}

/// Dialler side: returns once the peer proved it is `expected`.
pub async fn handshake_dial(
    conn: &mut Conn,
    id: &Identity,
    expected: ReplicaId,
) -> Result<(), HandshakeError> {
    let na = nonce();
    let mut hello = vec![VERSION];
    hello.extend_from_slice(&id.me.0.to_be_bytes());
    hello.extend_from_slice(&na);
    conn.send(bytes::Bytes::from(hello)).await?;
    let f = recv_frame(conn).await?;
    if f.len() != 1 + 4 + 32 + 64 || f[0] != VERSION {
        return Err(HandshakeError::Malformed);
    }
    let b = ReplicaId(u32::from_be_bytes([f[1], f[2], f[3], f[4]]));
    if b != expected {
        return Err(HandshakeError::WrongPeer(b.0));
    }
    let nb: [u8; 32] = f[5..37].try_into().map_err(|_| HandshakeError::Malformed)?;
    let sig = Signature::from_slice(&f[37..101]).ok_or(HandshakeError::Malformed)?;
    if !id
        .verifier
        .verify_replica(b, &transcript(b, id.me, &na, &nb), &sig)
    {
        return Err(HandshakeError::BadProof(b.0));
    }
    let mut proof = vec![VERSION];
    proof.extend_from_slice(&id.signer.sign(&transcript(id.me, b, &nb, &na)).0);
    conn.send(bytes::Bytes::from(proof)).await?;
    Ok(())
}

/// Acceptor side: returns the peer's proven identity.
pub async fn handshake_accept(conn: &mut Conn, id: &Identity) -> Result<ReplicaId, HandshakeError> {
    let f = recv_frame(conn).await?;
    if f.len() != 1 + 4 + 32 || f[0] != VERSION {
        return Err(HandshakeError::Malformed);
    }
    let a = ReplicaId(u32::from_be_bytes([f[1], f[2], f[3], f[4]]));
    if a.0 as usize >= id.n || a == id.me {
        return Err(HandshakeError::WrongPeer(a.0));
    }
    let na: [u8; 32] = f[5..37].try_into().map_err(|_| HandshakeError::Malformed)?;
    let nb = nonce();
    let mut accept = vec![VERSION];
    accept.extend_from_slice(&id.me.0.to_be_bytes());
    accept.extend_from_slice(&nb);
    accept.extend_from_slice(&id.signer.sign(&transcript(id.me, a, &na, &nb)).0);
    conn.send(bytes::Bytes::from(accept)).await?;
    let f = recv_frame(conn).await?;
    if f.len() != 1 + 64 || f[0] != VERSION {
        return Err(HandshakeError::Malformed);
    }
    let sig = Signature::from_slice(&f[1..65]).ok_or(HandshakeError::Malformed)?;
    if !id
        .verifier
        .verify_replica(a, &transcript(a, id.me, &nb, &na), &sig)
    {
        return Err(HandshakeError::BadProof(a.0));
    }
    Ok(a)
}

struct Peer {
    id: ReplicaId,
    tx: mpsc::Sender<pb::PbftMessage>,
}

/// Sending side of the TCP transport.
pub struct TcpOutbound {
    me: ReplicaId,
    name: String,
    peers: HashMap<ReplicaId, Peer>,
    metrics: Metrics,
}

impl TcpOutbound {
    /// Starts one dialler per peer. `peers` are (id, "host:port"), looked up through
    /// `resolver` on every dial.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        id: Identity,
        peers: Vec<(ReplicaId, String)>,
        resolver: Arc<PeerResolver>,
        node: NodeHandle,
        status: Arc<SharedStatus>,
        metrics: Metrics,
        settings: TcpSettings,
        shutdown: Arc<AtomicBool>,
    ) -> Arc<TcpOutbound> {
        let mut map = HashMap::new();
        for (peer, addr) in peers {
            if peer == id.me {
                continue;
            }
            let (tx, rx) = mpsc::channel(settings.queue_capacity);
            tokio::spawn(dial_loop(
                id.clone(),
                peer,
                addr,
                resolver.clone(),
                rx,
                node.clone(),
                status.clone(),
                metrics.clone(),
                settings.clone(),
                shutdown.clone(),
            ));
            map.insert(peer, Peer { id: peer, tx });
        }
        Arc::new(TcpOutbound {
            me: id.me,
            name: node_name(id.me),
            peers: map,
            metrics,
        })
    }

    fn enqueue(&self, peer: &Peer, envelope: pb::PbftMessage) -> Result<(), SendError> {
        super::enqueue(peer.id, &peer.tx, envelope, &self.metrics)
    }
}

impl Outbound for TcpOutbound {
    fn send(&self, to: ReplicaId, msg: &Message) {
        if let Some(peer) = self.peers.get(&to) {
            let _ = self.enqueue(peer, to_envelope(msg, self.me, &self.name));
        }
    }

    fn broadcast(&self, msg: &Message) -> Vec<(ReplicaId, SendError)> {
        let envelope = to_envelope(msg, self.me, &self.name);
        self.peers
            .values()
            .filter_map(|p| self.enqueue(p, envelope.clone()).err().map(|e| (p.id, e)))
            .collect()
    }
}

fn set_connected(status: &SharedStatus, metrics: &Metrics, peer: ReplicaId, addr: &str, up: bool) {
    if let Some(p) = status.peers.get(peer.0) {
        if let Ok(mut a) = p.address.write() {
            *a = addr.to_string();
        }
        p.connected.store(up, Ordering::Relaxed);
    }
    metrics
        .peer_connected
        .with_label_values(&[&peer.0.to_string()])
        .set(i64::from(up));
    metrics.peer_count.set(status.peers.connected() as i64);
}

#[allow(clippy::too_many_arguments)]
async fn dial_loop(
    id: Identity,
    peer: ReplicaId,
    addr: String,
    resolver: Arc<PeerResolver>,
    mut rx: mpsc::Receiver<pb::PbftMessage>,
    node: NodeHandle,
    status: Arc<SharedStatus>,
    metrics: Metrics,
    settings: TcpSettings,
    shutdown: Arc<AtomicBool>,
) {
    let label = peer.0.to_string();
    let mut backoff = Backoff::new(
        settings.backoff_min,
        settings.backoff_max,
        u64::from(id.me.0) << 32 | u64::from(peer.0) | 1 << 63,
    );
    let mut failures = 0u64;
    while !shutdown.load(Ordering::Relaxed) {
        let attempt = async {
            // Looked up on every dial: a rescheduled pod comes back under a new address.
            let remote = resolver.resolve(&addr).await.map_err(|e| e.to_string())?;
            debug!(peer = peer.0, %addr, %remote, "dialling peer (tcp)");
            let stream = tokio::time::timeout(settings.dial_timeout, TcpStream::connect(remote))
                .await
                .map_err(|_| "dial timed out".to_string())?
                .map_err(|e| e.to_string())?;
            let _ = stream.set_nodelay(true);
            let mut conn = Framed::new(stream, codec(settings.max_message_bytes));
            handshake_dial(&mut conn, &id, peer)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(conn)
        };
        match attempt.await {
            Ok(conn) => {
                info!(peer = peer.0, %addr, "connected to peer (tcp)");
                failures = 0;
                backoff.reset();
                set_connected(&status, &metrics, peer, &addr, true);
                let (mut sink, mut stream) = conn.split();
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                loop {
                    tokio::select! {
                        msg = rx.recv() => {
                            let Some(msg) = msg else { return };
                            let kind = pb_kind(&msg);
                            let bytes = msg.encode_to_vec();
                            let len = bytes.len() as u64;
                            let start = Instant::now();
                            if sink.send(bytes::Bytes::from(bytes)).await.is_err() {
                                break;
                            }
                            metrics.send_latency.with_label_values(&[&label]).observe(start.elapsed().as_secs_f64());
                            metrics.messages_sent.with_label_values(&[&label, kind]).inc();
                            metrics.bytes_sent.with_label_values(&[&label]).inc_by(len);
                        }
                        frame = stream.next() => {
                            // Only sync answers come back on our own connection.
                            match frame {
                                Some(Ok(f)) => {
                                    receive_frame(&f, Some(peer), id.n, &node, &metrics);
                                }
                                _ => break,
                            }
                        }
                        _ = tick.tick() => {
                            if shutdown.load(Ordering::Relaxed) { break; }
                        }
                    }
                }
                set_connected(&status, &metrics, peer, &addr, false);
                if shutdown.load(Ordering::Relaxed) {
                    return;
                }
                metrics.connection_errors.with_label_values(&[&label]).inc();
                warn!(peer = peer.0, "tcp connection to peer closed; redialling");
            }
            Err(e) => {
                failures += 1;
                metrics.connection_errors.with_label_values(&[&label]).inc();
                if failures == 1 || failures.is_multiple_of(20) {
                    warn!(peer = peer.0, %addr, failures, error = %e, "cannot reach peer; retrying");
                }
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Decodes one frame from an authenticated peer and hands it to the node loop.
fn receive_frame(
    frame: &[u8],
    from: Option<ReplicaId>,
    n: usize,
    node: &NodeHandle,
    metrics: &Metrics,
) -> Option<Message> {
    let label = from
        .filter(|r| (r.0 as usize) < n)
        .map_or_else(|| "unknown".into(), |r| r.0.to_string());
    metrics
        .bytes_received
        .with_label_values(&[&label])
        .inc_by(frame.len() as u64);
    match decode_envelope(frame) {
        Ok((envelope, msg)) => {
            metrics
                .messages_received
                .with_label_values(&[&label, pb_kind(&envelope)])
                .inc();
            if let Message::SyncRequest(_) = msg {
                return Some(msg);
            }
            let source = from.map_or(Source::Client, Source::Replica);
            let _ = node.deliver(Inbound::Message { from: source, msg });
            None
        }
        Err(e) => {
            metrics.rejected.with_label_values(&["malformed"]).inc();
            debug!(peer = %label, error = %e, "malformed frame dropped");
            None
        }
    }
}

/// Accepts peers' connections: handshake, then frames in (and sync answers out).
pub async fn serve(
    listener: TcpListener,
    id: Identity,
    node: NodeHandle,
    provider: Arc<dyn StateProvider + Send + Sync>,
    metrics: Metrics,
    settings: TcpSettings,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (stream, remote) = match accepted {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(handle_connection(
            stream,
            remote,
            id.clone(),
            node.clone(),
            provider.clone(),
            metrics.clone(),
            settings.clone(),
            stop.clone(),
        ));
    }
}

#[allow(clippy::too_many_arguments)]
async fn handle_connection(
    stream: TcpStream,
    remote: SocketAddr,
    id: Identity,
    node: NodeHandle,
    provider: Arc<dyn StateProvider + Send + Sync>,
    metrics: Metrics,
    settings: TcpSettings,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut conn = Framed::new(stream, codec(settings.max_message_bytes));
    let peer = match handshake_accept(&mut conn, &id).await {
        Ok(p) => p,
        Err(e) => {
            metrics
                .connection_errors
                .with_label_values(&["unknown"])
                .inc();
            metrics
                .rejected
                .with_label_values(&["handshake_failed"])
                .inc();
            warn!(%remote, error = %e, "refused connection: handshake failed");
            return;
        }
    };
    debug!(peer = peer.0, %remote, "peer connected (tcp inbound)");
    loop {
        let frame = tokio::select! {
            f = conn.next() => f,
            _ = stop.wait_for(|s| *s) => return,
        };
        match frame {
            Some(Ok(f)) => {
                if let Some(Message::SyncRequest(req)) =
                    receive_frame(&f, Some(peer), id.n, &node, &metrics)
                {
                    let provider = provider.clone();
                    let budget = settings.max_message_bytes / 2;
                    let max = req.max_blocks.clamp(1, 4096) as usize;
                    let answer = tokio::task::spawn_blocking(move || {
                        sync_answer(&*provider, req.from_height, max, budget)
                    })
                    .await;
                    let Ok(Ok(resp)) = answer else { continue };
                    let envelope =
                        to_envelope(&Message::SyncResponse(resp), id.me, &node_name(id.me));
                    if conn
                        .send(bytes::Bytes::from(envelope.encode_to_vec()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            Some(Err(e)) => {
                // Oversized frames and broken framing end the connection; the peer redials.
                let oversized = e.get_ref().is_some_and(|inner| {
                    inner.is::<tokio_util::codec::LengthDelimitedCodecError>()
                });
                let reason = if oversized { "oversized" } else { "malformed" };
                metrics.rejected.with_label_values(&[reason]).inc();
                warn!(peer = peer.0, error = %e, "bad frame; closing connection");
                return;
            }
            None => return,
        }
    }
}
