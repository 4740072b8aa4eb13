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

pub mod cli;

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pbft_api::convert::Wire;
use pbft_api::pb;
use pbft_api::pb::client_service_client::ClientServiceClient;
use pbft_core::{ClientCore, ClientId, Ed25519Signer, OpResult, Operation, ReplicaId, Reply};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// What went wrong with a request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no quorum: fewer than {needed} matching replies within {timeout:?} ({detail})")]
    NoQuorum {
        needed: usize,
        timeout: Duration,
        detail: String,
    },
    #[error("request rejected by the replicas: {0}")]
    Rejected(String),
    #[error("malformed reply from replica {replica}: {detail}")]
    MalformedReply { replica: u32, detail: String },
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
    /// How long one request may take before it fails with `NoQuorum`.
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

/// Lazily opened connections to every replica, cheap to clone and share between clients.
#[derive(Clone)]
pub struct Connections {
    replicas: Vec<ClientServiceClient<Channel>>,
}

impl Connections {
    /// Checks the cluster size and addresses; connects on first use, so unreachable replicas
    /// do not fail this.
    pub fn new(opts: &ClientOptions) -> Result<Connections, ClientError> {
        let n = opts.replicas.len();
        // n = 1 is the unreplicated baseline server that `pbft bench --unreplicated` uses.
        if n != 1 && (n < 4 || (n - 1) % 3 != 0) {
            return Err(ClientError::ClusterSize(n));
        }
        let mut replicas = Vec::with_capacity(n);
        for addr in &opts.replicas {
            let scheme = if opts.tls.is_some() { "https" } else { "http" };
            let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
                .map_err(|e| ClientError::Address {
                    addr: addr.clone(),
                    detail: e.to_string(),
                })?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true);
            if let Some(tls) = &opts.tls {
                let mut config =
                    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
                if let Some(name) = &tls.server_name {
                    config = config.domain_name(name.clone());
                }
                endpoint = endpoint
                    .tls_config(config)
                    .map_err(|e| ClientError::Tls(e.to_string()))?;
            }
            let channel = endpoint.connect_lazy();
            replicas.push(
                ClientServiceClient::new(channel)
                    .max_decoding_message_size(opts.max_message_bytes)
                    .max_encoding_message_size(opts.max_message_bytes),
            );
        }
        Ok(Connections { replicas })
    }
}

/// A connection to a PBFT cluster. Requests from one client are serialised (PBFT clients
/// have one outstanding request); use several clients for parallel load.
///
/// Requests travel over one long-lived `SubmitStream` per replica rather than a unary call
/// each: under load a unary call per replica per request cost more CPU, at the client and
/// at every replica, than ordering the request did. A stream that fails is reopened on the
/// next request.
pub struct Client {
    core: Mutex<ClientCore>,
    replicas: Vec<ClientServiceClient<Channel>>,
    timeout: Duration,
    retry_after: Duration,
    /// Held for the whole of a request: the links and what they deliver.
    session: tokio::sync::Mutex<Session>,
}

/// Where one request's answers arrive: the per-replica stream senders, and one inbox every
/// stream's reader task writes to.
struct Session {
    links: Vec<Option<mpsc::Sender<pb::Request>>>,
    /// Whether link `i` has carried one of our requests: replica `i` then knows the stream
    /// as our route and pushes our replies down it, even for requests it only saw in a
    /// pre-prepare. Until every link has, requests go to every replica.
    known: Vec<bool>,
    inbox: mpsc::UnboundedReceiver<Answer>,
    inbox_tx: mpsc::UnboundedSender<Answer>,
}

/// What a replica's stream produced.
enum Answer {
    Reply(u32, pb::Reply),
    /// The stream ended with this status (it is reopened on the next request).
    Failed(u32, tonic::Status),
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

impl Client {
    /// Prepares connections to every replica (lazily: unreachable replicas do not fail this).
    pub async fn connect(opts: ClientOptions) -> Result<Client, ClientError> {
        let connections = Connections::new(&opts)?;
        Ok(Client::with_connections(&connections, &opts))
    }

    /// A client over connections shared with other clients (`opts.replicas` and `opts.tls`
    /// are taken from `connections`): many clients then cost a few TCP connections, with
    /// their streams multiplexed by HTTP/2.
    pub fn with_connections(connections: &Connections, opts: &ClientOptions) -> Client {
        let n = connections.replicas.len();
        // Timestamps from the wall clock: a restarted client with the same id stays fresh.
        let core = ClientCore::new(
            ClientId(opts.client_id),
            Box::new(Ed25519Signer::from_secret(opts.secret)),
            n,
            u64::MAX,
            now_ns(),
        );
        let (inbox_tx, inbox) = mpsc::unbounded_channel();
        Client {
            core: Mutex::new(core),
            replicas: connections.replicas.clone(),
            timeout: opts.timeout,
            retry_after: opts.retry_after,
            session: tokio::sync::Mutex::new(Session {
                links: vec![None; n],
                known: vec![false; n],
                inbox,
                inbox_tx,
            }),
        }
    }

    /// Opens replica `i`'s stream: a reader task forwards its replies (or the status it ended
    /// with) to the inbox; the returned sender feeds it requests.
    fn open_link(
        &self,
        i: usize,
        inbox: &mpsc::UnboundedSender<Answer>,
    ) -> mpsc::Sender<pb::Request> {
        let (tx, rx) = mpsc::channel(64);
        let mut service = self.replicas[i].clone();
        let inbox = inbox.clone();
        let replica = i as u32;
        tokio::spawn(async move {
            let mut replies = match service.submit_stream(ReceiverStream::new(rx)).await {
                Ok(r) => r.into_inner(),
                Err(status) => {
                    let _ = inbox.send(Answer::Failed(replica, status));
                    return;
                }
            };
            loop {
                match replies.message().await {
                    Ok(Some(reply)) => {
                        if inbox.send(Answer::Reply(replica, reply)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        let _ = inbox.send(Answer::Failed(
                            replica,
                            tonic::Status::unavailable("stream closed"),
                        ));
                        return;
                    }
                    Err(status) => {
                        let _ = inbox.send(Answer::Failed(replica, status));
                        return;
                    }
                }
            }
        });
        tx
    }

    /// Hands `req` to replica `i`'s stream, reopening it if it has gone. False when it could
    /// not be handed over (the replica is not reading).
    fn send_to(&self, session: &mut Session, i: usize, req: &pb::Request) -> bool {
        for _ in 0..2 {
            let link = match &session.links[i] {
                Some(l) => l.clone(),
                None => {
                    let l = self.open_link(i, &session.inbox_tx);
                    session.links[i] = Some(l.clone());
                    session.known[i] = false;
                    l
                }
            };
            match link.try_send(req.clone()) {
                Ok(()) => {
                    session.known[i] = true;
                    return true;
                }
                // A full queue means the replica is not reading: skip it this time.
                Err(mpsc::error::TrySendError::Full(_)) => return false,
                Err(mpsc::error::TrySendError::Closed(_)) => session.links[i] = None,
            }
        }
        false
    }

    /// Marks link `i` gone: it is reopened, and announced again, on its next use.
    fn drop_link(session: &mut Session, i: usize) {
        session.links[i] = None;
        session.known[i] = false;
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
        let pb_req = send.request.to_pb();
        // Whatever is left from an earlier request is stale: late replies are dropped, and a
        // stream that failed since is reopened (and announced again) on its next use.
        while let Ok(answer) = session.inbox.try_recv() {
            if let Answer::Failed(replica, _) = answer {
                Self::drop_link(&mut session, replica as usize);
            }
        }
        let n = self.replicas.len();
        // The primary alone once every replica knows our stream (the backups then push
        // their replies to it); every replica otherwise.
        let primary = match send.to {
            pbft_core::Target::Replica(p) if session.known.iter().all(|k| *k) => Some(p.0 as usize),
            _ => None,
        };
        let mut sent = vec![false; n];
        if let Some(p) = primary.filter(|&p| p < n) {
            sent[p] = self.send_to(&mut session, p, &pb_req);
        }
        let mut retry_at = tokio::time::Instant::now() + self.retry_after;
        if !sent.iter().any(|s| *s) {
            for (i, s) in sent.iter_mut().enumerate() {
                *s = self.send_to(&mut session, i, &pb_req);
            }
            retry_at = tokio::time::Instant::now() + self.timeout;
        }
        let needed = (n - 1) / 3 + 1;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut errors = Vec::new();
        let mut invalid = 0usize;
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
                        let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(done) = core.on_reply(ReplicaId(replica), reply) {
                            return Ok(done.result);
                        }
                    }
                    Err(detail) => errors.push(format!("r{replica}: malformed reply: {detail}")),
                },
                Answer::Failed(replica, status) => {
                    let i = replica as usize;
                    Self::drop_link(&mut session, i);
                    if status.code() == tonic::Code::InvalidArgument {
                        invalid += 1;
                        if invalid >= needed {
                            return Err(ClientError::Rejected(status.message().to_string()));
                        }
                    } else {
                        if !resent[i] {
                            // The stream broke (a restarted replica, a dropped connection):
                            // the request may not have reached it, so send it once more.
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
                    }
                    errors.push(format!("r{replica}: {}", status.message()));
                }
            }
        }
        self.core
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .abandon();
        Err(ClientError::NoQuorum {
            needed,
            timeout: self.timeout,
            detail: if errors.is_empty() {
                "no replica answered".into()
            } else {
                errors.join("; ")
            },
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
