//! The gRPC transport (the seed's section 2): a tonic server with `PBFTService` and the
//! client API, and per peer a dialler that keeps one `MessageStream` open, fed from a bounded
//! queue, redialling with backoff and jitter when the stream breaks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use pbft_api::pb;
use pbft_api::pb::client_service_server::{ClientService, ClientServiceServer};
use pbft_api::pb::pbft_service_client::PbftServiceClient;
use pbft_api::pb::pbft_service_server::{PbftService, PbftServiceServer};
use pbft_core::{Message, ReplicaId, Source, StateProvider, SyncResponse};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use super::{Backoff, Outbound, SendError, node_name, parse_node_name};
use crate::discovery::PeerResolver;
use crate::metrics::Metrics;
use crate::node::{Inbound, NodeHandle, ReplyRoute};
use crate::status::SharedStatus;
use pbft_api::convert::{
    Wire, from_envelope, from_sync_state_response, to_envelope, to_sync_state_response,
};

/// Settings shared by the server and the diallers.
#[derive(Clone, Debug)]
pub struct GrpcSettings {
    pub max_message_bytes: usize,
    pub dial_timeout: Duration,
    pub queue_capacity: usize,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub submit_timeout: Duration,
    /// The protocol's request size limit: the client API refuses a larger request at once,
    /// with its reason, rather than hand it to the core to be dropped.
    pub max_request_bytes: usize,
    /// TLS on the listener and on dials, when configured.
    pub tls: Option<super::tls::TlsMaterial>,
}

type Provider = Arc<dyn StateProvider + Send + Sync>;

struct Peer {
    id: ReplicaId,
    tx: mpsc::Sender<pb::PbftMessage>,
    channel: Arc<RwLock<Option<Channel>>>,
}

/// Sending side of the gRPC transport.
pub struct GrpcOutbound {
    me: ReplicaId,
    name: String,
    peers: HashMap<ReplicaId, Peer>,
    node: NodeHandle,
    metrics: Metrics,
    settings: GrpcSettings,
    runtime: tokio::runtime::Handle,
}

impl GrpcOutbound {
    /// Starts one dialler per peer. `peers` are (id, "host:port"), looked up through
    /// `resolver` on every dial.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        me: ReplicaId,
        peers: Vec<(ReplicaId, String)>,
        resolver: Arc<PeerResolver>,
        node: NodeHandle,
        status: Arc<SharedStatus>,
        metrics: Metrics,
        settings: GrpcSettings,
        shutdown: Arc<AtomicBool>,
    ) -> Arc<GrpcOutbound> {
        let mut map = HashMap::new();
        for (id, addr) in peers {
            if id == me {
                continue;
            }
            let (tx, rx) = mpsc::channel(settings.queue_capacity);
            let channel = Arc::new(RwLock::new(None));
            let dialler = Dialler {
                me,
                peer: id,
                addr,
                resolver: resolver.clone(),
                rx,
                channel: channel.clone(),
                status: status.clone(),
                metrics: metrics.clone(),
                settings: settings.clone(),
                shutdown: shutdown.clone(),
            };
            tokio::spawn(dialler.run());
            map.insert(id, Peer { id, tx, channel });
        }
        Arc::new(GrpcOutbound {
            me,
            name: node_name(me),
            peers: map,
            node,
            metrics,
            settings,
            runtime: tokio::runtime::Handle::current(),
        })
    }

    fn enqueue(&self, peer: &Peer, envelope: pb::PbftMessage) -> Result<(), SendError> {
        super::enqueue(peer.id, &peer.tx, envelope, &self.metrics)
    }

    /// A sync request becomes a `SyncState` call; its answer goes to the node loop as a
    /// `SyncResponse` from that peer.
    fn sync(&self, peer: &Peer, from_height: u64, max_blocks: u32) {
        let Some(channel) = peer.channel.read().ok().and_then(|c| c.clone()) else {
            // Not connected: the core times out and asks someone else.
            return;
        };
        let (to, node, name, settings) = (
            peer.id,
            self.node.clone(),
            self.name.clone(),
            self.settings.clone(),
        );
        self.runtime.spawn(async move {
            let mut client = PbftServiceClient::new(channel)
                .max_decoding_message_size(settings.max_message_bytes)
                .max_encoding_message_size(settings.max_message_bytes);
            let call = client.sync_state(pb::SyncStateRequest {
                from_height,
                max_blocks,
                node_id: name,
            });
            let resp = match tokio::time::timeout(settings.dial_timeout, call).await {
                Ok(Ok(r)) => r.into_inner(),
                Ok(Err(status)) => {
                    debug!(peer = to.0, %status, "SyncState failed");
                    return;
                }
                Err(_) => return,
            };
            match from_sync_state_response(resp) {
                Ok(msg) => {
                    let _ = node.deliver(Inbound::Message {
                        from: Source::Replica(to),
                        msg: Message::SyncResponse(msg),
                    });
                }
                Err(e) => warn!(peer = to.0, error = %e, "malformed SyncState answer"),
            }
        });
    }
}

impl Outbound for GrpcOutbound {
    fn send(&self, to: ReplicaId, msg: &Message) {
        let Some(peer) = self.peers.get(&to) else {
            return;
        };
        if let Message::SyncRequest(req) = msg {
            self.sync(peer, req.from_height, req.max_blocks);
            return;
        }
        let _ = self.enqueue(peer, to_envelope(msg, self.me, &self.name));
    }

    fn broadcast(&self, msg: &Message) -> Vec<(ReplicaId, SendError)> {
        let envelope = to_envelope(msg, self.me, &self.name);
        self.peers
            .values()
            .filter_map(|p| self.enqueue(p, envelope.clone()).err().map(|e| (p.id, e)))
            .collect()
    }
}

/// Keeps one `MessageStream` to one peer open, feeding it from the peer's queue.
struct Dialler {
    me: ReplicaId,
    peer: ReplicaId,
    addr: String,
    resolver: Arc<PeerResolver>,
    rx: mpsc::Receiver<pb::PbftMessage>,
    channel: Arc<RwLock<Option<Channel>>>,
    status: Arc<SharedStatus>,
    metrics: Metrics,
    settings: GrpcSettings,
    shutdown: Arc<AtomicBool>,
}

impl Dialler {
    async fn run(mut self) {
        let label = self.peer.0.to_string();
        let mut backoff = Backoff::new(
            self.settings.backoff_min,
            self.settings.backoff_max,
            u64::from(self.me.0) << 32 | u64::from(self.peer.0),
        );
        let mut failures = 0u64;
        while !self.shutdown.load(Ordering::Relaxed) {
            match self.connect().await {
                Ok((channel, inbound, stream_tx)) => {
                    info!(peer = self.peer.0, addr = %self.addr, "connected to peer");
                    failures = 0;
                    backoff.reset();
                    self.set_connected(Some(channel), true);
                    self.pump(inbound, stream_tx, &label).await;
                    self.set_connected(None, false);
                    if self.shutdown.load(Ordering::Relaxed) {
                        break;
                    }
                    self.metrics
                        .connection_errors
                        .with_label_values(&[&label])
                        .inc();
                    warn!(peer = self.peer.0, "peer stream closed; redialling");
                }
                Err(e) => {
                    failures += 1;
                    self.metrics
                        .connection_errors
                        .with_label_values(&[&label])
                        .inc();
                    // Log the first failure and then every 20th: a peer that is down for a
                    // while should not flood the log.
                    if failures == 1 || failures.is_multiple_of(20) {
                        warn!(peer = self.peer.0, addr = %self.addr, failures, error = %e, "cannot reach peer; retrying");
                    }
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    fn set_connected(&self, channel: Option<Channel>, up: bool) {
        if let Ok(mut c) = self.channel.write() {
            *c = channel;
        }
        if let Some(p) = self.status.peers.get(self.peer.0) {
            if let Ok(mut a) = p.address.write() {
                a.clone_from(&self.addr);
            }
            p.connected.store(up, Ordering::Relaxed);
        }
        self.metrics
            .peer_connected
            .with_label_values(&[&self.peer.0.to_string()])
            .set(i64::from(up));
        self.metrics
            .peer_count
            .set(self.status.peers.connected() as i64);
    }

    async fn connect(
        &self,
    ) -> Result<
        (
            Channel,
            Streaming<pb::PbftMessage>,
            mpsc::Sender<pb::PbftMessage>,
        ),
        String,
    > {
        // Looked up on every dial: a rescheduled pod comes back under a new address.
        let remote = self
            .resolver
            .resolve(&self.addr)
            .await
            .map_err(|e| e.to_string())?;
        debug!(peer = self.peer.0, addr = %self.addr, %remote, "dialling peer");
        let scheme = if self.settings.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{remote}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(self.settings.dial_timeout)
            .tcp_nodelay(true);
        if let Some(tls) = &self.settings.tls {
            // Verified against the name we dial (not the resolved IP), as certificates name
            // hosts.
            endpoint = endpoint
                .tls_config(tls.client_for(&self.addr))
                .map_err(|e| format!("TLS: {e}"))?;
        }
        let channel = tokio::time::timeout(self.settings.dial_timeout, endpoint.connect())
            .await
            .map_err(|_| "dial timed out".to_string())?
            .map_err(|e| format!("{e}: {}", source_chain(&e)))?;
        let mut client = PbftServiceClient::new(channel.clone())
            .max_decoding_message_size(self.settings.max_message_bytes)
            .max_encoding_message_size(self.settings.max_message_bytes);
        let (stream_tx, stream_rx) = mpsc::channel(256);
        let call = client.message_stream(ReceiverStream::new(stream_rx));
        let inbound = tokio::time::timeout(self.settings.dial_timeout, call)
            .await
            .map_err(|_| "stream open timed out".to_string())?
            .map_err(|s| s.to_string())?
            .into_inner();
        Ok((channel, inbound, stream_tx))
    }

    /// Moves messages from the queue onto the stream until either side fails.
    async fn pump(
        &mut self,
        mut inbound: Streaming<pb::PbftMessage>,
        stream_tx: mpsc::Sender<pb::PbftMessage>,
        label: &str,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                msg = self.rx.recv() => {
                    let Some(msg) = msg else { return };
                    let kind = pb_kind(&msg);
                    let bytes = msg.encoded_len() as u64;
                    let start = Instant::now();
                    if stream_tx.send(msg).await.is_err() {
                        return;
                    }
                    self.metrics.send_latency.with_label_values(&[label]).observe(start.elapsed().as_secs_f64());
                    self.metrics.messages_sent.with_label_values(&[label, kind]).inc();
                    self.metrics.bytes_sent.with_label_values(&[label]).inc_by(bytes);
                }
                r = inbound.message() => {
                    // The peer never sends on our stream; any end of it means the link broke.
                    if !matches!(r, Ok(Some(_))) {
                        return;
                    }
                }
                _ = tick.tick() => {
                    if self.shutdown.load(Ordering::Relaxed) {
                        return;
                    }
                }
            }
        }
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = String::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(&s.to_string());
        out.push_str("; ");
        cur = s.source();
    }
    out
}

/// A metrics label for a message type (bounded set).
pub fn pb_kind(m: &pb::PbftMessage) -> &'static str {
    use pb::MessageType as T;
    match pb::MessageType::try_from(m.r#type).unwrap_or(T::Unspecified) {
        T::PrePrepare => "pre_prepare",
        T::Prepare => "prepare",
        T::Commit => "commit",
        T::Checkpoint => "checkpoint",
        T::ViewChange => "view_change",
        T::NewView => "new_view",
        T::Request => "request",
        T::SyncRequest => "sync_request",
        T::SyncResponse => "sync_response",
        T::StatusAnnouncement => "status",
        T::Unspecified => "unknown",
    }
}

/// The server side: `PBFTService` and `ClientService` on one listener.
#[derive(Clone)]
pub struct GrpcServer {
    pub n: usize,
    /// Set on shutdown: open message streams end so the server can drain.
    pub stop: tokio::sync::watch::Receiver<bool>,
    pub node: NodeHandle,
    pub provider: Provider,
    pub status: Arc<SharedStatus>,
    pub metrics: Metrics,
    pub settings: GrpcSettings,
}

impl GrpcServer {
    /// Serves until `shutdown` resolves, then stops accepting and drains.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), tonic::transport::Error> {
        let max = self.settings.max_message_bytes;
        let tls = self.settings.tls.clone();
        let pbft = PbftServiceServer::new(self.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let client = ClientServiceServer::new(self)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &tls {
            builder = builder.tls_config(tls.server())?;
        }
        builder
            .add_service(pbft)
            .add_service(client)
            .serve_with_incoming_shutdown(accepted(listener), shutdown)
            .await
    }

    /// Hands one received envelope to the node loop; malformed ones are counted.
    fn receive(&self, envelope: &pb::PbftMessage) {
        let sender = parse_node_name(&envelope.node_id).filter(|r| (r.0 as usize) < self.n);
        let label = sender.map_or_else(|| "unknown".to_string(), |r| r.0.to_string());
        self.metrics
            .messages_received
            .with_label_values(&[&label, pb_kind(envelope)])
            .inc();
        self.metrics
            .bytes_received
            .with_label_values(&[&label])
            .inc_by(envelope.encoded_len() as u64);
        match from_envelope(envelope) {
            Ok(msg) => {
                let from = sender.map_or(Source::Client, Source::Replica);
                let _ = self.node.deliver(Inbound::Message { from, msg });
            }
            Err(e) => {
                self.metrics
                    .rejected
                    .with_label_values(&["malformed"])
                    .inc();
                debug!(peer = %label, error = %e, "malformed message dropped");
            }
        }
    }

    fn status_pb(&self) -> pb::GetStatusResponse {
        let s = self.status.snapshot();
        pb::GetStatusResponse {
            node_id: node_name(ReplicaId(s.id)),
            replica_id: s.id,
            view: s.view,
            primary: s.primary,
            height: s.height,
            stable_checkpoint: s.stable_checkpoint,
            state_digest: crate::keys::parse_hex32(&s.state_digest)
                .map(|d| d.to_vec())
                .unwrap_or_default(),
            peers: s
                .peers
                .iter()
                .map(|p| pb::PeerStatus {
                    node_id: node_name(ReplicaId(p.id)),
                    replica_id: p.id,
                    address: p.address.clone(),
                    connected: p.connected,
                })
                .collect(),
            view_change_in_progress: s.view_change_in_progress,
        }
    }

    /// One client request's life in this replica: from arrival until executed (or given up).
    #[tracing::instrument(
        name = "submit",
        skip_all,
        fields(client = req.client_id, timestamp = req.timestamp)
    )]
    async fn submit_one(
        &self,
        req: pb::Request,
        route: Option<ReplyRoute>,
    ) -> Result<pb::Reply, Status> {
        let request = self.admissible(req).map_err(Status::invalid_argument)?;
        let (tx, rx) = oneshot::channel();
        self.node
            .deliver(Inbound::Submit {
                request,
                reply: Some(tx),
                route,
            })
            .map_err(|e| Status::unavailable(e.to_string()))?;
        match tokio::time::timeout(self.settings.submit_timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply.to_pb()),
            Ok(Err(_)) => Err(Status::unavailable("replica shutting down")),
            Err(_) => {
                self.metrics.requests.with_label_values(&["timeout"]).inc();
                Err(Status::deadline_exceeded(
                    "request not executed in time (the cluster may lack a quorum, or the request was rejected: check its signature and timestamp)",
                ))
            }
        }
    }
}

type BoxStream<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl PbftService for GrpcServer {
    type MessageStreamStream = BoxStream<pb::PbftMessage>;

    async fn message_stream(
        &self,
        request: Request<Streaming<pb::PbftMessage>>,
    ) -> Result<Response<Self::MessageStreamStream>, Status> {
        let mut inbound = request.into_inner();
        let this = self.clone();
        // The response side stays open (and silent) for as long as the peer's side is: its
        // end tells the peer the link is gone.
        let (keep_tx, keep_rx) = mpsc::channel::<Result<pb::PbftMessage, Status>>(1);
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    m = inbound.message() => m,
                    // On shutdown end the stream, so the server's graceful drain finishes.
                    _ = stop.wait_for(|s| *s) => break,
                };
                match next {
                    Ok(Some(envelope)) => this.receive(&envelope),
                    Ok(None) => break,
                    Err(status) => {
                        // tonic refuses frames over the size limit before decoding them.
                        if matches!(
                            status.code(),
                            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
                        ) {
                            this.metrics
                                .rejected
                                .with_label_values(&["oversized"])
                                .inc();
                        }
                        debug!(%status, "inbound stream ended with error");
                        break;
                    }
                }
            }
            drop(keep_tx);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(keep_rx))))
    }

    async fn broadcast_message(
        &self,
        request: Request<pb::BroadcastRequest>,
    ) -> Result<Response<pb::BroadcastResponse>, Status> {
        let envelope = request
            .into_inner()
            .message
            .ok_or_else(|| Status::invalid_argument("BroadcastRequest.message is missing"))?;
        self.receive(&envelope);
        Ok(Response::new(pb::BroadcastResponse { errors: Vec::new() }))
    }

    async fn send_message(
        &self,
        request: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        let envelope = request
            .into_inner()
            .message
            .ok_or_else(|| Status::invalid_argument("SendRequest.message is missing"))?;
        self.receive(&envelope);
        Ok(Response::new(pb::SendResponse {}))
    }

    async fn sync_state(
        &self,
        request: Request<pb::SyncStateRequest>,
    ) -> Result<Response<pb::SyncStateResponse>, Status> {
        let req = request.into_inner();
        let provider = self.provider.clone();
        let budget = self.settings.max_message_bytes / 2;
        let max = req.max_blocks.clamp(1, 4096) as usize;
        let resp = tokio::task::spawn_blocking(move || {
            sync_answer(&*provider, req.from_height, max, budget)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(to_sync_state_response(&resp)))
    }

    async fn get_checkpoint(
        &self,
        request: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<pb::GetCheckpointResponse>, Status> {
        let seq = request.into_inner().sequence_num;
        let cert = self
            .provider
            .checkpoint(seq)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::GetCheckpointResponse {
            found: cert.is_some(),
            checkpoint: cert.map(|c| c.to_pb()),
        }))
    }

    async fn get_status(
        &self,
        _: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        Ok(Response::new(self.status_pb()))
    }
}

/// Blocks from `from` (at most `max`, and within `budget` bytes) plus the latest stable
/// checkpoint: the answer to a sync request (the seed's SyncState, section 4.4), for both
/// transports.
pub fn sync_answer(
    provider: &dyn StateProvider,
    from: u64,
    max: usize,
    budget: usize,
) -> Result<SyncResponse, pbft_core::StorageError> {
    let mut blocks = Vec::new();
    let mut size = 0;
    for b in provider.blocks_from(from, max)? {
        size += b.to_pb().encoded_len();
        if size > budget && !blocks.is_empty() {
            break;
        }
        blocks.push(b);
    }
    let checkpoint = provider.checkpoints()?.into_iter().next_back();
    Ok(SyncResponse { blocks, checkpoint })
}

#[tonic::async_trait]
impl ClientService for GrpcServer {
    type SubmitStreamStream = BoxStream<pb::Reply>;
    type SubmitBatchesStream = BoxStream<pb::ReplyBatch>;

    async fn submit(&self, request: Request<pb::Request>) -> Result<Response<pb::Reply>, Status> {
        self.submit_one(request.into_inner(), None)
            .await
            .map(Response::new)
    }

    async fn submit_stream(
        &self,
        request: Request<Streaming<pb::Request>>,
    ) -> Result<Response<Self::SubmitStreamStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(1024);
        // Replies the node pushes for this stream's client (see `ReplyRoute`) join the
        // answers to the requests sent here.
        let (route, mut pushed) = mpsc::channel::<pbft_core::Reply>(1024);
        // A weak sender: the reply stream still ends once the client has closed its side
        // and every request sent here is answered. The first reply pushed after that ends
        // this task, which closes the route for the node.
        let out = tx.downgrade();
        tokio::spawn(async move {
            while let Some(reply) = pushed.recv().await {
                let Some(out) = out.upgrade() else { return };
                if out.send(Ok(reply.to_pb())).await.is_err() {
                    return;
                }
            }
        });
        let this = self.clone();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                let req = tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(req)) => req,
                        Ok(None) | Err(_) => break,
                    },
                    // On shutdown end the stream, as message streams do, so the server's
                    // graceful drain does not wait for clients that keep theirs open.
                    _ = stop.wait_for(|s| *s) => break,
                };
                let (this, tx, route) = (this.clone(), tx.clone(), route.clone());
                tokio::spawn(async move {
                    let _ = tx.send(this.submit_one(req, Some(route)).await).await;
                });
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn submit_batches(
        &self,
        request: Request<Streaming<pb::RequestBatch>>,
    ) -> Result<Response<Self::SubmitBatchesStream>, Status> {
        let mut inbound = request.into_inner();
        let (out, rx) = mpsc::channel(16);
        // The route every client announced here is given: the persistence thread pushes
        // their replies into it, and the writer below packs whatever has queued up into
        // one message, so a batch executed for many clients costs one frame, not one each.
        let (route, pushed) = mpsc::channel::<pbft_core::Reply>(BATCH_ROUTE_CAPACITY);
        // Bounded: a client that sends malformed requests without reading the answers
        // must not grow this replica's memory. A rejection that does not fit is dropped;
        // the request was counted as rejected already.
        let (rejects, rejected) = mpsc::channel(BATCH_ROUTE_CAPACITY);
        let budget = self.settings.max_message_bytes / 2;
        tokio::spawn(write_reply_batches(pushed, rejected, out, budget));
        let this = self.clone();
        let mut stop = self.stop.clone();
        // Reads until the client closes its side; dropping `rejects` then ends the writer,
        // which closes the route for the node.
        tokio::spawn(async move {
            loop {
                let batch = tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(batch)) => batch,
                        Ok(None) | Err(_) => break,
                    },
                    _ = stop.wait_for(|s| *s) => break,
                };
                for req in batch.requests {
                    if let Some(rejection) = this.submit_routed(req, &route) {
                        let _ = rejects.try_send(rejection);
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_status(
        &self,
        _: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        Ok(Response::new(self.status_pb()))
    }
}

/// Replies a `SubmitBatches` stream may have queued: one per announced client in flight,
/// and then some for retries.
const BATCH_ROUTE_CAPACITY: usize = 8192;

impl GrpcServer {
    /// The request in `req`, or why no replica would order it (counted as malformed):
    /// a client gets that reason at once instead of timing out.
    fn admissible(&self, req: pb::Request) -> Result<pbft_core::Request, String> {
        let checked = pbft_core::Request::from_pb(req)
            .map_err(|e| format!("malformed request: {e}"))
            .and_then(|r| {
                r.check_shape(self.settings.max_request_bytes)
                    .map(|()| r)
                    .map_err(|e| e.to_string())
            });
        if checked.is_err() {
            self.metrics
                .rejected
                .with_label_values(&["malformed"])
                .inc();
        }
        checked
    }

    /// Hands one request of a `SubmitBatches` stream to the node, its answer to go down
    /// `route`; a rejection when it cannot be taken.
    fn submit_routed(&self, req: pb::Request, route: &ReplyRoute) -> Option<pb::Rejection> {
        let (client_id, timestamp) = (req.client_id, req.timestamp);
        // Nothing waits here for the reply, so this span covers the hand-over only; the
        // `execute` and `persist` spans cover the rest of the request's life.
        let _span =
            tracing::info_span!("submit", client = client_id, timestamp, batched = true).entered();
        let (reason, retryable) = match self.admissible(req) {
            Err(reason) => (reason, false),
            Ok(request) => match self.node.deliver(Inbound::Submit {
                request,
                reply: None,
                route: Some(route.clone()),
            }) {
                Ok(()) => return None,
                Err(e) => (e.to_string(), true),
            },
        };
        Some(pb::Rejection {
            client_id,
            timestamp,
            reason,
            retryable,
        })
    }
}

/// The sending half of a `SubmitBatches` stream: whatever replies and rejections have queued
/// up go out together, in messages of at most `budget` bytes. Ends when the reading half
/// has ended (`rejected` closed) or the client has gone.
async fn write_reply_batches(
    mut pushed: mpsc::Receiver<pbft_core::Reply>,
    mut rejected: mpsc::Receiver<pb::Rejection>,
    out: mpsc::Sender<Result<pb::ReplyBatch, Status>>,
    budget: usize,
) {
    let mut queued = Vec::new();
    loop {
        let mut batch = pb::ReplyBatch::default();
        tokio::select! {
            n = pushed.recv_many(&mut queued, BATCH_ROUTE_CAPACITY) => {
                if n == 0 {
                    return;
                }
            }
            r = rejected.recv() => match r {
                Some(r) => batch.rejections.push(r),
                None => return,
            },
            _ = out.closed() => return,
        }
        while let Ok(r) = rejected.try_recv() {
            batch.rejections.push(r);
        }
        let mut size = batch.encoded_len();
        for reply in queued.drain(..) {
            let reply = reply.to_pb();
            let len = reply.encoded_len() + 8;
            if size + len > budget && !(batch.replies.is_empty() && batch.rejections.is_empty()) {
                if out.send(Ok(std::mem::take(&mut batch))).await.is_err() {
                    return;
                }
                size = 0;
            }
            size += len;
            batch.replies.push(reply);
        }
        if out.send(Ok(batch)).await.is_err() {
            return;
        }
    }
}

/// Binds the gRPC listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// The connections `listener` accepts, with Nagle's algorithm off. Tonic applies its
/// builder's `tcp_nodelay` only to listeners it binds itself, never to an incoming stream
/// handed to it, so the server's sockets had Nagle on: a reply or message written while an
/// earlier segment was unacknowledged waited for the peer's delayed ACK (40 ms on Linux).
fn accepted(listener: tokio::net::TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt as _;

    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = accepted(listener);
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let server_side = incoming.next().await.unwrap().unwrap();
        assert!(
            server_side.nodelay().unwrap(),
            "the server's socket must not delay writes"
        );
        // The default for a fresh socket is Nagle on: the option above did the work.
        assert!(!client.nodelay().unwrap());
    }
}
