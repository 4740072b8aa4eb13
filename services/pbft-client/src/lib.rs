//! PBFT client library: signs requests, sends them to every replica, and accepts a result
//! only when f+1 replicas (so at least one honest) returned the same one.
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
use pbft_api::pb::client_service_client::ClientServiceClient;
use pbft_core::{ClientCore, ClientId, Ed25519Signer, OpResult, Operation, ReplicaId, Reply};
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};

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
    /// Largest message, in bytes.
    pub max_message_bytes: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            replicas: Vec::new(),
            client_id: 0,
            secret: [0; 32],
            timeout: Duration::from_secs(10),
            max_message_bytes: 64 * 1024 * 1024,
        }
    }
}

/// A connection to a PBFT cluster. Requests from one client are serialised (PBFT clients
/// have one outstanding request); use several clients for parallel load.
pub struct Client {
    core: Mutex<ClientCore>,
    replicas: Vec<ClientServiceClient<Channel>>,
    timeout: Duration,
    lock: tokio::sync::Mutex<()>,
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
        let n = opts.replicas.len();
        // n = 1 is the unreplicated baseline server that `pbft bench --unreplicated` uses.
        if n != 1 && (n < 4 || (n - 1) % 3 != 0) {
            return Err(ClientError::ClusterSize(n));
        }
        let mut replicas = Vec::with_capacity(n);
        for addr in &opts.replicas {
            let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| ClientError::Address {
                    addr: addr.clone(),
                    detail: e.to_string(),
                })?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true);
            let channel = endpoint.connect_lazy();
            replicas.push(
                ClientServiceClient::new(channel)
                    .max_decoding_message_size(opts.max_message_bytes)
                    .max_encoding_message_size(opts.max_message_bytes),
            );
        }
        // Timestamps from the wall clock: a restarted client with the same id stays fresh.
        let core = ClientCore::new(
            ClientId(opts.client_id),
            Box::new(Ed25519Signer::from_secret(opts.secret)),
            n,
            u64::MAX,
            now_ns(),
        );
        Ok(Client {
            core: Mutex::new(core),
            replicas,
            timeout: opts.timeout,
            lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Orders and executes one operation; returns the result f+1 replicas agree on.
    pub async fn execute(&self, op: Operation) -> Result<OpResult, ClientError> {
        let _one_at_a_time = self.lock.lock().await;
        let request = {
            let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
            core.abandon();
            core.submit(op)
                .map_err(|e| ClientError::Rejected(e.to_string()))?
                .request
        };
        let pb_req = request.to_pb();
        let mut calls = JoinSet::new();
        for (i, r) in self.replicas.iter().enumerate() {
            let mut r = r.clone();
            let req = pb_req.clone();
            let timeout = self.timeout;
            calls.spawn(async move {
                let mut call = tonic::Request::new(req);
                call.set_timeout(timeout);
                (i as u32, r.submit(call).await)
            });
        }
        let needed = (self.replicas.len() - 1) / 3 + 1;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut errors = Vec::new();
        let mut invalid = 0usize;
        loop {
            let next = tokio::time::timeout_at(deadline, calls.join_next()).await;
            let joined = match next {
                Err(_) | Ok(None) => break,
                Ok(Some(j)) => j,
            };
            let Ok((replica, result)) = joined else {
                continue;
            };
            match result {
                Ok(resp) => match Reply::from_pb(resp.into_inner()) {
                    Ok(reply) => {
                        let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(done) = core.on_reply(ReplicaId(replica), reply) {
                            return Ok(done.result);
                        }
                    }
                    Err(detail) => errors.push(format!("r{replica}: malformed reply: {detail}")),
                },
                Err(status) => {
                    if status.code() == tonic::Code::InvalidArgument {
                        invalid += 1;
                        if invalid >= needed {
                            return Err(ClientError::Rejected(status.message().to_string()));
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
