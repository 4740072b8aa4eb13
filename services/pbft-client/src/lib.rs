//! PBFT client library: signs requests, sends them to the primary (to every replica on a
//! retry), and accepts a result only when f+1 replicas (so at least one honest) returned the
//! same one.
//!
//! ```no_run
//! # async fn demo() -> Result<(), pbft_client::ClientError> {
//! use pbft_client::{Client, ClientOptions};
//! let client = Client::connect(ClientOptions {
//!     replicas: vec!["127.0.0.1:7000".into(), "127.0.0.2:7000".into(),
//!                    "127.0.0.3:7000".into(), "127.0.0.4:7000".into()],
//!     client_id: 1,
//!     secret: [7; 32],
//!     ..ClientOptions::default()
//! }).await?;
//! client.put(b"greeting", b"hello").await?;
//! assert_eq!(client.get(b"greeting").await?, Some(b"hello".to_vec()));
//! # Ok(()) }
//! ```
//!
//! Errors: [`ClientError::Timeout`] when fewer than f+1 replicas answered within the
//! timeout, [`ClientError::NoQuorum`] when more did but no f+1 agreed,
//! [`ClientError::Rejected`] when f+1 replicas refused the request (with their
//! reason), [`ClientError::MalformedRequest`] for a request no replica would order. Each
//! process needs its own client id: replicas drop a request older than the last they
//! executed for its client.

pub mod cli;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pbft_api::convert::Wire;
use pbft_api::pb;
use pbft_api::pb::client_service_client::ClientServiceClient;
use pbft_core::{
    ClientCore, ClientId, Ed25519Signer, OpResult, Operation, ReplicaId, Reply, max_faulty,
};
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// What went wrong with a request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Fewer than f+1 replicas answered within the timeout: the cluster is down,
    /// partitioned or overloaded, or does not know this client. `detail` says what each
    /// replica said or failed with.
    #[error(
        "timed out after {timeout:?}: {needed} matching replies needed, replies from {answered} replica(s) ({detail})"
    )]
    Timeout {
        answered: usize,
        needed: usize,
        timeout: Duration,
        detail: String,
    },
    /// f+1 or more replicas answered within the timeout, but no f+1 of them with the same
    /// result (some are faulty, and the honest ones have not all answered). Which of the
    /// two a failure is only hints at the cause: a faulty replica's reply during an
    /// outage makes it `NoQuorum`, silent faulty replicas make a disagreement `Timeout`.
    #[error("no quorum: fewer than {needed} matching replies within {timeout:?} ({detail})")]
    NoQuorum {
        needed: usize,
        timeout: Duration,
        detail: String,
    },
    /// f+1 replicas refused the request, with the reason (or this client's core refused
    /// to make it).
    #[error("request rejected by the replicas: {0}")]
    Rejected(String),
    /// The request is one no replica would order (an empty key, or larger than
    /// `ClientOptions::max_message_bytes`): refused here, before it is sent. One within
    /// that but over the replicas' `max_request_bytes` is `Rejected` by them. Malformed replies, by contrast, never fail
    /// a request on their own (a faulty replica could send them): they appear in the
    /// `NoQuorum` detail when no f+1 matching replies came.
    #[error("malformed request: {0}")]
    MalformedRequest(#[from] pbft_core::ShapeError),
    #[error("invalid address {addr}: {detail}")]
    Address { addr: String, detail: String },
    #[error("TLS settings: {0}")]
    Tls(String),
    #[error("a cluster needs n = 3f+1 >= 4 replicas, got {0}")]
    ClusterSize(usize),
    #[error("unexpected result {0:?}")]
    Unexpected(OpResult),
}

/// How to reach the cluster and who we are.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Client API addresses (`host:port`) of every replica, in replica-id order.
    pub replicas: Vec<String>,
    pub client_id: u64,
    /// The client's ed25519 secret key; its public key must be registered with the replicas.
    pub secret: [u8; 32],
    /// How long one request may take before it fails with `Timeout` (or `NoQuorum`).
    pub timeout: Duration,
    /// How long to wait for f+1 replies from a request sent to the primary alone before
    /// sending it to every replica (a faulty or unreachable primary, a view change).
    pub retry_after: Duration,
    /// Largest message, in bytes.
    pub max_message_bytes: usize,
    /// Talk TLS to replicas whose gRPC listener has `tls` configured.
    pub tls: Option<ClientTls>,
}

/// How to verify the replicas' TLS certificates.
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// PEM certificate(s) of the CA that signed the replicas' certificates.
    pub ca_pem: Vec<u8>,
    /// Verify against this name instead of the host in each replica address.
    pub server_name: Option<String>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            replicas: Vec::new(),
            client_id: 0,
            secret: [0; 32],
            timeout: Duration::from_secs(10),
            retry_after: Duration::from_millis(500),
            max_message_bytes: 64 * 1024 * 1024,
            tls: None,
        }
    }
}

/// A replica's gRPC endpoint, over TLS when `tls` is given (the CA and server name of
/// `ClientOptions::tls`).
pub fn replica_endpoint(addr: &str, tls: Option<&ClientTls>) -> Result<Endpoint, ClientError> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| ClientError::Address {
            addr: addr.to_string(),
            detail: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
        if let Some(name) = &tls.server_name {
            config = config.domain_name(name.clone());
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| ClientError::Tls(e.to_string()))?;
    }
    Ok(endpoint)
}

/// Lazily opened connections to every replica, cheap to clone and share between clients.
#[derive(Clone)]
pub struct Connections {
    mux: Arc<Mux>,
}

impl Connections {
    /// Checks the cluster size and addresses; connects on first use, so unreachable replicas
    /// do not fail this.
    pub fn new(opts: &ClientOptions) -> Result<Connections, ClientError> {
        let n = opts.replicas.len();
        // n = 1 is the unreplicated baseline server that `pbft bench --unreplicated` uses.
        if n != 1 && (n < 4 || !(n - 1).is_multiple_of(3)) {
            return Err(ClientError::ClusterSize(n));
        }
        let mut replicas = Vec::with_capacity(n);
        for addr in &opts.replicas {
            let endpoint = replica_endpoint(addr, opts.tls.as_ref())?;
            let channel = endpoint.connect_lazy();
            replicas.push(
                ClientServiceClient::new(channel)
                    .max_decoding_message_size(opts.max_message_bytes)
                    .max_encoding_message_size(opts.max_message_bytes),
            );
        }
        Ok(Connections {
            mux: Arc::new(Mux {
                links: (0..n).map(|_| Mutex::new(None)).collect(),
                reopened: (0..n).map(|_| Mutex::new(None)).collect(),
                replicas,
                inboxes: Arc::default(),
            }),
        })
    }
}

/// Requests queued for one replica's stream while it is not being read.
const LINK_QUEUE: usize = 4096;

/// Most bytes of requests sent in one message (a larger request still goes, alone).
const REQUEST_BATCH_BYTES: usize = 256 * 1024;

/// Where the replies for each client of one [`Connections`] go.
type Inboxes = Arc<Mutex<HashMap<u64, Inbox>>>;

/// One client's entry in the shared inboxes.
struct Inbox {
    tx: mpsc::UnboundedSender<Answer>,
    /// The timestamp of the client's request in flight, 0 while it has none. Only answers
    /// for that request reach the inbox; the rest are dropped where they arrive:
    /// - late ones, for a request already completed: every replica answers, the client
    ///   completes on the first f + 1 matching replies, and handing it the rest woke its
    ///   task for nothing, about two wake-ups per request under load;
    /// - any for an idle client, or for a timestamp it never sent: a faulty replica sees
    ///   every client id on a shared stream and could otherwise fill the (unbounded) inbox
    ///   of every client that is not reading it.
    pending: Arc<AtomicU64>,
}

/// Marks a client's request as in flight for [`dispatch`] until dropped, whichever way
/// `execute` returns (or is cancelled).
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn start(pending: &'a AtomicU64, timestamp: u64) -> Self {
        pending.store(timestamp, Ordering::Relaxed);
        InFlight(pending)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

/// The clients of one [`Connections`] share one `SubmitBatches` stream per replica: the
/// requests any of them has queued go out together, and the replica packs the replies it
/// has ready for all of them into one message. A message per request per replica cost
/// more CPU under load, at the client and at every replica, than ordering the request did.
struct Mux {
    replicas: Vec<ClientServiceClient<Channel>>,
    /// Each replica's open stream, if any.
    links: Vec<Mutex<Option<Link>>>,
    /// When a probe last reopened each replica's stream (see [`Mux::may_probe`]).
    reopened: Vec<Mutex<Option<std::time::Instant>>>,
    inboxes: Inboxes,
}

/// How often a probe may reopen the stream to a replica whose stream is down: a dead
/// replica's stream fails at once, and every client on it then retries its request to
/// every replica, so this bounds that to once per interval.
const PROBE_REOPEN: Duration = Duration::from_secs(1);

/// One replica's stream: where to queue requests, and which opening of it this is.
#[derive(Clone)]
struct Link {
    tx: mpsc::Sender<pb::Request>,
    generation: u64,
}

/// Numbers the openings of every stream, so that a client can tell whether the replica
/// it announced itself to is still on the other end of the same stream.
static GENERATION: AtomicU64 = AtomicU64::new(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Mux {
    /// Replica `i`'s stream, opened when it is not (or no longer) open.
    fn link(&self, i: usize) -> Link {
        let mut slot = lock(&self.links[i]);
        if let Some(link) = slot.as_ref().filter(|l| !l.tx.is_closed()) {
            return link.clone();
        }
        let link = self.open(i);
        *slot = Some(link.clone());
        link
    }

    /// The generation of replica `i`'s open stream; 0 when none is open.
    fn generation(&self, i: usize) -> u64 {
        lock(&self.links[i])
            .as_ref()
            .filter(|l| !l.tx.is_closed())
            .map_or(0, |l| l.generation)
    }

    /// Whether a probe may go to replica `i`: always while its stream is open; when it is
    /// not, once per [`PROBE_REOPEN`] for all clients together, since the probe reopens it.
    fn may_probe(&self, i: usize) -> bool {
        if self.generation(i) != 0 {
            return true;
        }
        let mut last = lock(&self.reopened[i]);
        if last.is_some_and(|t| t.elapsed() < PROBE_REOPEN) {
            return false;
        }
        *last = Some(std::time::Instant::now());
        true
    }

    /// Forgets replica `i`'s stream if it is still the `generation` one: the next request
    /// opens a new one.
    fn reset(&self, i: usize, generation: u64) {
        let mut slot = lock(&self.links[i]);
        if slot.as_ref().is_some_and(|l| l.generation == generation) {
            *slot = None;
        }
    }

    /// Opens replica `i`'s stream: a task sends what is queued and hands every reply to its
    /// client's inbox; when the stream ends, every client hears of it.
    fn open(&self, i: usize) -> Link {
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let mut service = self.replicas[i].clone();
        let inboxes = self.inboxes.clone();
        let replica = i as u32;
        tokio::spawn(async move {
            let status = match service.submit_batches(request_batches(rx)).await {
                Err(status) => status,
                Ok(response) => {
                    let mut batches = response.into_inner();
                    loop {
                        match batches.message().await {
                            Ok(Some(batch)) => dispatch(&inboxes, replica, batch),
                            Ok(None) => break tonic::Status::unavailable("stream closed"),
                            Err(status) => break status,
                        }
                    }
                }
            };
            // Only clients with a request in flight hear of it (and resend at once); an
            // idle one finds the stream gone when it next sends (`Client::knows` compares
            // generations), so a replica that keeps closing its stream cannot pile up
            // failures in idle clients' inboxes.
            for inbox in lock(&inboxes).values() {
                if inbox.pending.load(Ordering::Relaxed) != 0 {
                    let _ = inbox
                        .tx
                        .send(Answer::Failed(replica, generation, status.clone()));
                }
            }
        });
        Link { tx, generation }
    }
}

/// The requests queued on `rx`, as messages of whatever has queued up since the last one.
fn request_batches(
    rx: mpsc::Receiver<pb::Request>,
) -> impl futures_util::Stream<Item = pb::RequestBatch> + Send + 'static {
    futures_util::stream::unfold((rx, None), |(mut rx, carried)| async move {
        let first = match carried {
            Some(request) => request,
            None => rx.recv().await?,
        };
        let mut size = first.encoded_len();
        let mut requests = vec![first];
        let mut carried = None;
        while let Ok(request) = rx.try_recv() {
            size += request.encoded_len();
            if size > REQUEST_BATCH_BYTES {
                carried = Some(request);
                break;
            }
            requests.push(request);
        }
        Some((pb::RequestBatch { requests }, (rx, carried)))
    })
}

/// Hands each reply and rejection in `batch` to its client's inbox if it answers the
/// request that client has in flight; drops the rest here (see [`Inbox::pending`]).
fn dispatch(inboxes: &Inboxes, replica: u32, batch: pb::ReplyBatch) {
    let inboxes = lock(inboxes);
    let open = |client: u64, timestamp: u64| {
        inboxes.get(&client).filter(|inbox| {
            let pending = inbox.pending.load(Ordering::Relaxed);
            pending != 0 && timestamp == pending
        })
    };
    for reply in batch.replies {
        if let Some(inbox) = open(reply.client_id, reply.timestamp) {
            let _ = inbox.tx.send(Answer::Reply(replica, reply));
        }
    }
    for rejection in batch.rejections {
        if let Some(inbox) = open(rejection.client_id, rejection.timestamp) {
            let _ = inbox.tx.send(Answer::Rejected(replica, rejection));
        }
    }
}

/// A connection to a PBFT cluster. Requests from one client are serialised (PBFT clients
/// have one outstanding request); use several clients for parallel load, over one shared
/// [`Connections`] (see [`Client::with_connections`]).
pub struct Client {
    id: u64,
    core: Mutex<ClientCore>,
    mux: Arc<Mux>,
    timeout: Duration,
    retry_after: Duration,
    /// The largest request this client sends (`ClientOptions::max_message_bytes`).
    max_message_bytes: usize,
    /// Our entry in the shared inboxes, to remove on drop.
    inbox_tx: mpsc::UnboundedSender<Answer>,
    /// Shared with our entry: the timestamp of our request in flight (0: none).
    pending: Arc<AtomicU64>,
    /// Held for the whole of a request.
    session: tokio::sync::Mutex<Session>,
}

/// What one request needs across its answers.
struct Session {
    /// For each replica, the generation of the stream over which it has received one of
    /// our requests (0: none): it then knows the stream as our route and pushes our
    /// replies down it, even for requests it only saw in a pre-prepare. Until n - f
    /// replicas' current streams have carried one, requests go to every replica.
    known: Vec<u64>,
    /// Requests sent so far: every [`PROBE_EVERY`]th also goes to the replicas that do
    /// not know our stream.
    requests: u64,
    inbox: mpsc::UnboundedReceiver<Answer>,
}

/// While some replica does not know a client's stream (it was down, or restarted and its
/// stream was reopened), every this many requests also go to it, so that a replica back
/// from a restart learns the stream again and pushes replies down it. While it stays
/// down, [`Mux::may_probe`] keeps the probes from reopening its stream more than once per
/// [`PROBE_REOPEN`].
const PROBE_EVERY: u64 = 8;

/// What a replica's stream produced for us.
enum Answer {
    Reply(u32, pb::Reply),
    /// The replica refused our request without ordering it.
    Rejected(u32, pb::Rejection),
    /// The stream of that generation ended with this status (it is reopened on the next
    /// request).
    Failed(u32, u64, tonic::Status),
}

/// The replicas that refused a request for good (malformed, say). A request fails only
/// once f+1 different replicas have, so one of them is correct: a faulty replica that
/// sends the same refusal again and again (it may fill a whole reply batch with them)
/// counts once, and cannot fail a valid request on its own.
struct Refusals {
    by: BTreeSet<u32>,
    needed: usize,
}

impl Refusals {
    fn new(needed: usize) -> Self {
        Refusals {
            by: BTreeSet::new(),
            needed,
        }
    }

    /// Records `replica`'s refusal; whether f+1 different replicas have now refused.
    fn add(&mut self, replica: u32) -> bool {
        self.by.insert(replica);
        self.by.len() >= self.needed
    }
}

/// A broken link's status with the errors beneath it: tonic says "tcp connect error" and
/// keeps "Connection refused (os error 111)" in its source chain, which is the useful part.
fn status_detail(status: &tonic::Status) -> String {
    with_sources(
        status.message().to_string(),
        std::error::Error::source(status),
    )
}

/// `head` followed by each error of `source`'s chain that it does not already say,
/// `: `-joined.
pub(crate) fn with_sources(
    head: String,
    mut source: Option<&(dyn std::error::Error + 'static)>,
) -> String {
    let mut out = head;
    while let Some(e) = source {
        let text = e.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

impl Drop for Client {
    fn drop(&mut self) {
        let mut inboxes = lock(&self.mux.inboxes);
        if inboxes
            .get(&self.id)
            .is_some_and(|inbox| inbox.tx.same_channel(&self.inbox_tx))
        {
            inboxes.remove(&self.id);
        }
    }
}

impl Client {
    /// Prepares connections to every replica (lazily: unreachable replicas do not fail this).
    pub async fn connect(opts: ClientOptions) -> Result<Client, ClientError> {
        let connections = Connections::new(&opts)?;
        Ok(Client::with_connections(&connections, &opts))
    }

    /// A client over connections shared with other clients (`opts.replicas` and `opts.tls`
    /// are taken from `connections`): many clients then cost one stream per replica, and
    /// their requests and replies travel in batches. Each client needs its own id.
    pub fn with_connections(connections: &Connections, opts: &ClientOptions) -> Client {
        let mux = connections.mux.clone();
        let n = mux.replicas.len();
        // Timestamps from the wall clock: a restarted client with the same id stays fresh.
        let core = ClientCore::new(
            ClientId(opts.client_id),
            Box::new(Ed25519Signer::from_secret(opts.secret)),
            n,
            u64::MAX,
            now_ns(),
        );
        let (inbox_tx, inbox) = mpsc::unbounded_channel();
        let pending = Arc::new(AtomicU64::new(0));
        lock(&mux.inboxes).insert(
            opts.client_id,
            Inbox {
                tx: inbox_tx.clone(),
                pending: pending.clone(),
            },
        );
        Client {
            id: opts.client_id,
            core: Mutex::new(core),
            mux,
            timeout: opts.timeout,
            retry_after: opts.retry_after,
            max_message_bytes: opts.max_message_bytes,
            inbox_tx,
            pending,
            session: tokio::sync::Mutex::new(Session {
                known: vec![0; n],
                requests: 0,
                inbox,
            }),
        }
    }

    /// Queues `req` on replica `i`'s stream, reopening it if it has gone. False when it
    /// could not be queued (the replica is not reading).
    fn send_to(&self, session: &mut Session, i: usize, req: &pb::Request) -> bool {
        for _ in 0..2 {
            let link = self.mux.link(i);
            match link.tx.try_send(req.clone()) {
                Ok(()) => {
                    session.known[i] = link.generation;
                    return true;
                }
                // A full queue means the replica is not reading: skip it this time.
                Err(mpsc::error::TrySendError::Full(_)) => return false,
                Err(mpsc::error::TrySendError::Closed(_)) => self.mux.reset(i, link.generation),
            }
        }
        false
    }

    /// The stream of `generation` to replica `i` is gone: it is reopened, and we are
    /// announced again, on its next use.
    fn drop_link(&self, session: &mut Session, i: usize, generation: u64) {
        self.mux.reset(i, generation);
        if session.known[i] == generation {
            session.known[i] = 0;
        }
    }

    /// Whether at least n - f replicas' current streams have carried one of our requests:
    /// at least f + 1 correct ones among them push their replies to us, which is all a
    /// result needs. Not every replica: a stream to a dead one never opens, and waiting
    /// for it sent every request to every replica, so each backup checked each request on
    /// arrival for as long as one replica was down.
    fn quorum_known(&self, session: &Session) -> bool {
        let n = session.known.len();
        let known = (0..n).filter(|&i| self.knows(session, i)).count();
        known >= n - max_faulty(n)
    }

    /// Whether replica `i`'s current stream has carried one of our requests.
    fn knows(&self, session: &Session, i: usize) -> bool {
        let g = session.known[i];
        g != 0 && g == self.mux.generation(i)
    }

    /// Orders and executes one operation; returns the result f+1 replicas agree on.
    pub async fn execute(&self, op: Operation) -> Result<OpResult, ClientError> {
        let mut session = self.session.lock().await;
        let send = {
            let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
            core.abandon();
            core.submit(op)
                .map_err(|e| ClientError::Rejected(e.to_string()))?
        };
        // The replicas' own limit may be lower (`max_request_bytes`); they then refuse it
        // with their reason. The timestamp it took is simply skipped.
        send.request.check_shape(self.max_message_bytes)?;
        let pb_req = send.request.to_pb();
        // Whatever is left from an earlier request is stale: late replies are dropped, and a
        // stream that failed since is reopened (and announced again) on its next use.
        while let Ok(answer) = session.inbox.try_recv() {
            if let Answer::Failed(replica, generation, _) = answer {
                self.drop_link(&mut session, replica as usize, generation);
            }
        }
        // From here until we return, answers for this request reach our inbox.
        let _in_flight = InFlight::start(&self.pending, pb_req.timestamp);
        let n = self.mux.replicas.len();
        // The primary alone once n - f replicas know our stream (the backups among them
        // then push their replies to it); every replica otherwise.
        let primary = match send.to {
            pbft_core::Target::Replica(p) if self.quorum_known(&session) => Some(p.0 as usize),
            _ => None,
        };
        let mut sent = vec![false; n];
        session.requests += 1;
        if let Some(p) = primary.filter(|&p| p < n) {
            sent[p] = self.send_to(&mut session, p, &pb_req);
            if session.requests % PROBE_EVERY == 0 {
                let unknown: Vec<usize> = (0..n)
                    .filter(|&i| i != p && !self.knows(&session, i) && self.mux.may_probe(i))
                    .collect();
                for i in unknown {
                    sent[i] = self.send_to(&mut session, i, &pb_req);
                }
            }
        }
        let mut retry_at = tokio::time::Instant::now() + self.retry_after;
        if !sent.iter().any(|s| *s) {
            for (i, s) in sent.iter_mut().enumerate() {
                *s = self.send_to(&mut session, i, &pb_req);
            }
            retry_at = tokio::time::Instant::now() + self.timeout;
        }
        let needed = max_faulty(n) + 1;
        let deadline = tokio::time::Instant::now() + self.timeout;
        // The last thing each replica said (its result, or why it refused) or failed with:
        // retries would repeat it.
        let mut errors: BTreeMap<u32, String> = BTreeMap::new();
        let mut refusals = Refusals::new(needed);
        // Replicas that sent a well-formed reply: with f+1 of them and no f+1 agreeing the
        // failure is no quorum, with fewer a timeout.
        let mut answered: BTreeSet<u32> = BTreeSet::new();
        let mut resent = vec![false; n];
        loop {
            let wake = retry_at.min(deadline);
            let answer = match tokio::time::timeout_at(wake, session.inbox.recv()).await {
                Ok(Some(a)) => a,
                Ok(None) => break,
                Err(_) if wake < deadline => {
                    // No f+1 replies from the primary alone: every replica gets the request,
                    // which also starts the backups' timers against a faulty primary.
                    for (i, s) in sent.iter_mut().enumerate() {
                        if !*s {
                            *s = self.send_to(&mut session, i, &pb_req);
                        }
                    }
                    retry_at = deadline;
                    continue;
                }
                Err(_) => break,
            };
            match answer {
                Answer::Reply(replica, resp) => match Reply::from_pb(resp) {
                    Ok(reply) => {
                        // A late reply to an earlier request is no answer to this one.
                        if reply.timestamp == pb_req.timestamp {
                            answered.insert(replica);
                            errors.insert(replica, format!("replied {:?}", reply.result));
                        }
                        let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(done) = core.on_reply(ReplicaId(replica), reply) {
                            return Ok(done.result);
                        }
                    }
                    Err(detail) => {
                        errors.insert(replica, format!("malformed reply: {detail}"));
                    }
                },
                Answer::Rejected(replica, rejection) => {
                    if rejection.timestamp != pb_req.timestamp {
                        continue;
                    }
                    errors.insert(replica, rejection.reason.clone());
                    // A malformed request stays malformed; an overloaded replica gets it
                    // again on the retry.
                    if !rejection.retryable && refusals.add(replica) {
                        return Err(ClientError::Rejected(rejection.reason));
                    }
                }
                Answer::Failed(replica, generation, status) => {
                    let i = replica as usize;
                    self.drop_link(&mut session, i, generation);
                    // A stream ends for every client on it, never for one request (a
                    // request the replica refuses gets a `Rejection`), so this is a broken
                    // link, whatever its status.
                    if !resent[i] {
                        // The stream broke (a restarted replica, a dropped connection): the
                        // request may not have reached it, so send it once more.
                        resent[i] = true;
                        self.send_to(&mut session, i, &pb_req);
                    }
                    // A broken stream to the primary is as telling as a timeout: send to
                    // everyone now rather than after `retry_after` (a killed primary).
                    if sent.iter().any(|s| !*s) {
                        for (j, s) in sent.iter_mut().enumerate() {
                            if !*s {
                                *s = self.send_to(&mut session, j, &pb_req);
                            }
                        }
                        retry_at = deadline;
                    }
                    errors.insert(replica, status_detail(&status));
                }
            }
        }
        self.core
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .abandon();
        let detail = if errors.is_empty() {
            "no replica answered".into()
        } else {
            errors
                .iter()
                .map(|(r, e)| format!("r{r}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        if answered.len() >= needed {
            return Err(ClientError::NoQuorum {
                needed,
                timeout: self.timeout,
                detail,
            });
        }
        Err(ClientError::Timeout {
            answered: answered.len(),
            needed,
            timeout: self.timeout,
            detail,
        })
    }

    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), ClientError> {
        match self
            .execute(Operation::Put {
                key: key.to_vec(),
                value: value.to_vec(),
            })
            .await?
        {
            OpResult::Written => Ok(()),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        match self.execute(Operation::Get { key: key.to_vec() }).await? {
            OpResult::Value(v) => Ok(v),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Deletes a key; returns whether it existed.
    pub async fn delete(&self, key: &[u8]) -> Result<bool, ClientError> {
        match self
            .execute(Operation::Delete { key: key.to_vec() })
            .await?
        {
            OpResult::Deleted(existed) => Ok(existed),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Compare-and-swap: `Ok(Ok(()))` when written, `Ok(Err(current))` when the value differed.
    pub async fn cas(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<Result<(), Option<Vec<u8>>>, ClientError> {
        match self
            .execute(Operation::Cas {
                key: key.to_vec(),
                expected: expected.map(<[u8]>::to_vec),
                new: new.to_vec(),
            })
            .await?
        {
            OpResult::CasOk => Ok(Ok(())),
            OpResult::CasMismatch(cur) => Ok(Err(cur)),
            other => Err(ClientError::Unexpected(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request no replica would order fails at once with its reason, before anything is
    /// sent (the addresses here answer nothing: sending would end in `NoQuorum` after the
    /// timeout instead).
    #[tokio::test]
    async fn a_malformed_request_fails_before_it_is_sent() {
        let client = Client::connect(ClientOptions {
            replicas: (1..=4).map(|i| format!("127.0.0.{i}:1")).collect(),
            max_message_bytes: 1024,
            timeout: Duration::from_secs(30),
            ..ClientOptions::default()
        })
        .await
        .expect("client");
        match client.put(b"", b"v").await {
            Err(ClientError::MalformedRequest(pbft_core::ShapeError::EmptyKey)) => {}
            other => panic!("empty key: {other:?}"),
        }
        match client.put(b"k", &[0; 2048]).await {
            Err(ClientError::MalformedRequest(pbft_core::ShapeError::TooLarge { .. })) => {}
            other => panic!("too large: {other:?}"),
        }
    }

    fn reply(client: u64, timestamp: u64) -> pb::Reply {
        pb::Reply {
            client_id: client,
            timestamp,
            ..Default::default()
        }
    }

    fn rejection(client: u64, timestamp: u64) -> pb::Rejection {
        pb::Rejection {
            client_id: client,
            timestamp,
            ..Default::default()
        }
    }

    #[test]
    fn a_request_fails_only_when_f_plus_one_different_replicas_refuse_it() {
        let mut refusals = Refusals::new(2);
        assert!(!refusals.add(3));
        assert!(
            !refusals.add(3),
            "one replica repeating itself is still one"
        );
        assert!(!refusals.add(3));
        assert!(refusals.add(1));
    }

    #[test]
    fn status_detail_names_the_cause_beneath_the_status() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused here");
        let mut status = tonic::Status::unavailable("tcp connect error");
        status.set_source(Arc::new(io));
        assert_eq!(status_detail(&status), "tcp connect error: refused here");
        assert_eq!(
            status_detail(&tonic::Status::unavailable("gone")),
            "gone",
            "a status without a source is its message"
        );
    }

    /// Only answers for the request a client has in flight reach its inbox: none while it
    /// is idle (a faulty replica could otherwise fill it), none for another timestamp, and
    /// none once the request is done.
    #[test]
    fn only_answers_for_the_request_in_flight_reach_the_inbox() {
        let inboxes: Inboxes = Arc::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let pending = Arc::new(AtomicU64::new(0));
        lock(&inboxes).insert(
            7,
            Inbox {
                tx,
                pending: pending.clone(),
            },
        );
        let batch = |replies, rejections| pb::ReplyBatch {
            replies,
            rejections,
        };
        // Idle: a flood of answers for any timestamp is dropped.
        dispatch(
            &inboxes,
            1,
            batch(vec![reply(7, 5), reply(7, u64::MAX)], vec![rejection(7, 6)]),
        );
        assert!(rx.try_recv().is_err(), "nothing reaches an idle client");

        {
            let _in_flight = InFlight::start(&pending, 5);
            dispatch(
                &inboxes,
                2,
                batch(
                    vec![reply(7, 5), reply(8, 5), reply(7, 4), reply(7, 6)],
                    vec![rejection(7, 5)],
                ),
            );
            assert!(matches!(rx.try_recv(), Ok(Answer::Reply(2, r)) if r.timestamp == 5));
            assert!(matches!(rx.try_recv(), Ok(Answer::Rejected(2, r)) if r.timestamp == 5));
            assert!(
                rx.try_recv().is_err(),
                "other clients and timestamps stay out"
            );
        }
        // Done (the guard dropped): late answers for request 5 are dropped.
        dispatch(&inboxes, 3, batch(vec![reply(7, 5)], vec![rejection(7, 5)]));
        assert!(rx.try_recv().is_err(), "late answers are dropped");
        assert_eq!(pending.load(Ordering::Relaxed), 0);
    }
}
