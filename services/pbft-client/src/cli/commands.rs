//! The everyday commands: key-value operations, cluster status, key generation and ledger
//! verification.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use pbft_api::convert::Wire;
use pbft_api::pb;
use pbft_core::{Block, Digest, Ed25519Signer, KeyRing, PublicKey, max_faulty};
use serde_json::json;

use super::cluster::{ClusterFile, parse_hex32, random_secret, to_hex, write_secret};
use super::lease::{self, ClientLease};
use super::{OutputFormat, Unavailable, exit, http, table};
use crate::{Client, ClientError, ClientOptions};

/// A command's printable outcome and exit code.
pub struct Outcome {
    pub code: i32,
}

fn show(output: OutputFormat, value: serde_json::Value, table: String) {
    match output {
        OutputFormat::Json => {
            let _ = super::stdout(&format!("{value}\n"));
        }
        OutputFormat::Table => {
            let _ = super::stdout(&table);
        }
    }
}

/// A client for one command, under an id no other pbft process uses meanwhile (see
/// `lease`); the lease lasts as long as the returned value.
async fn client(dir: &Path, timeout: Duration) -> Result<(Client, ClientLease)> {
    let c = ClusterFile::load(dir)?;
    let lease = lease::for_command(dir, &c, timeout)?;
    let id = lease.ids()[0];
    let client = Client::connect(ClientOptions {
        replicas: c.client_addrs(),
        client_id: id,
        secret: c.client_secret(dir, id)?,
        timeout,
        tls: c.client_tls(dir)?,
        ..ClientOptions::default()
    })
    .await?;
    Ok((client, lease))
}

/// Maps client errors to exit codes: unavailability is distinct from other failures.
pub fn error_code(e: &anyhow::Error) -> i32 {
    if e.downcast_ref::<Unavailable>().is_some() {
        return exit::UNAVAILABLE;
    }
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::NoQuorum { .. } | ClientError::Timeout { .. }) => exit::UNAVAILABLE,
        _ => exit::ERROR,
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub async fn put(
    dir: &Path,
    key: &str,
    value: &str,
    out: OutputFormat,
    timeout: Duration,
) -> Result<Outcome> {
    let (client, _lease) = client(dir, timeout).await?;
    client.put(key.as_bytes(), value.as_bytes()).await?;
    show(out, json!({"key": key, "written": true}), "OK\n".into());
    Ok(Outcome { code: exit::OK })
}

pub async fn get(dir: &Path, key: &str, out: OutputFormat, timeout: Duration) -> Result<Outcome> {
    let (client, _lease) = client(dir, timeout).await?;
    let v = client.get(key.as_bytes()).await?;
    match v {
        Some(v) => {
            show(
                out,
                json!({"key": key, "value": text(&v)}),
                format!("{}\n", text(&v)),
            );
            Ok(Outcome { code: exit::OK })
        }
        None => {
            show(out, json!({"key": key, "value": null}), String::new());
            eprintln!("key {key:?} not found");
            Ok(Outcome {
                code: exit::NOT_FOUND,
            })
        }
    }
}

pub async fn del(dir: &Path, key: &str, out: OutputFormat, timeout: Duration) -> Result<Outcome> {
    let (client, _lease) = client(dir, timeout).await?;
    let existed = client.delete(key.as_bytes()).await?;
    // As `get`: a missing key prints nothing on stdout and says so on stderr (exit 4).
    show(
        out,
        json!({"key": key, "existed": existed}),
        if existed {
            "deleted\n".into()
        } else {
            String::new()
        },
    );
    if !existed {
        eprintln!("key {key:?} not found");
    }
    Ok(Outcome {
        code: if existed { exit::OK } else { exit::NOT_FOUND },
    })
}

pub async fn cas(
    dir: &Path,
    key: &str,
    expected: Option<&str>,
    new: &str,
    out: OutputFormat,
    timeout: Duration,
) -> Result<Outcome> {
    let (client, _lease) = client(dir, timeout).await?;
    let r = client
        .cas(key.as_bytes(), expected.map(str::as_bytes), new.as_bytes())
        .await?;
    match r {
        Ok(()) => {
            show(out, json!({"key": key, "swapped": true}), "OK\n".into());
            Ok(Outcome { code: exit::OK })
        }
        Err(current) => {
            let cur = current.as_deref().map(text);
            show(
                out,
                json!({"key": key, "swapped": false, "current": cur}),
                format!(
                    "mismatch: current value is {}\n",
                    cur.as_deref().map_or("absent".into(), |c| format!("{c:?}"))
                ),
            );
            Ok(Outcome {
                code: exit::CAS_MISMATCH,
            })
        }
    }
}

pub fn status(dir: &Path, out: OutputFormat) -> Result<Outcome> {
    let c = ClusterFile::load(dir)?;
    let rows: Vec<serde_json::Value> = c
        .replicas
        .iter()
        .map(|r| http::status(r.http).unwrap_or_else(|| json!({"id": r.id, "down": true})))
        .collect();
    let top = rows
        .iter()
        .filter_map(|s| s["height"].as_u64())
        .max()
        .unwrap_or(0);
    let cells: Vec<Vec<String>> = c
        .replicas
        .iter()
        .zip(&rows)
        .map(|(r, s)| {
            if s["down"] == true {
                let mut row = vec![format!("r{}", r.id)];
                row.extend(std::iter::repeat_n("-".to_string(), 6));
                row.extend(["down".into(), format!("({} does not answer)", r.http)]);
                return row;
            }
            let lag = s["height"]
                .as_u64()
                .map_or_else(|| "-".into(), |h| top.saturating_sub(h).to_string());
            let peers = table::connected_peers(s);
            let state = if s["view_change_in_progress"] == true {
                "view change"
            } else {
                "up"
            };
            vec![
                format!("r{}", r.id),
                table::number(&s["view"]),
                table::replica(&s["primary"]),
                table::number(&s["height"]),
                table::number(&s["stable_checkpoint"]),
                lag,
                format!("{peers}/{}", c.replicas.len() - 1),
                state.into(),
            ]
        })
        .collect();
    let table = table::render(
        &[
            "replica", "view", "primary", "height", "stable", "lag", "peers", "state",
        ],
        &cells,
    );
    let down = rows.iter().filter(|s| s["down"] == true).count();
    show(out, json!({"replicas": rows}), table);
    let f = max_faulty(c.replicas.len());
    Ok(Outcome {
        code: if down > f {
            exit::UNAVAILABLE
        } else {
            exit::OK
        },
    })
}

pub fn keygen(out_file: Option<&Path>, output: OutputFormat) -> Result<Outcome> {
    let secret = random_secret()?;
    let public = to_hex(&Ed25519Signer::from_secret(secret).public().0);
    if let Some(path) = out_file {
        write_secret(path, &secret, false)?;
        show(
            output,
            json!({"public_key": public, "secret_file": path.display().to_string()}),
            format!(
                "public key {public}\nsecret key written to {}\n",
                path.display()
            ),
        );
    } else {
        show(
            output,
            json!({"public_key": public, "secret_key": to_hex(&secret)}),
            format!("public key {public}\nsecret key {}\n", to_hex(&secret)),
        );
    }
    Ok(Outcome { code: exit::OK })
}

/// Walks replica `replica`'s chain from genesis through SyncState, checking every hash link
/// and commit certificate; names the first bad block.
/// Each step (connecting, then each batch of blocks) may take `timeout`; a replica that
/// does not answer in it is unavailable (exit 3).
pub async fn verify_ledger(
    dir: &Path,
    replica: u32,
    out: OutputFormat,
    timeout: Duration,
) -> Result<Outcome> {
    let c = ClusterFile::load(dir)?;
    let r = c
        .replicas
        .iter()
        .find(|r| r.id == replica)
        .with_context(|| format!("no replica {replica} in this cluster"))?;
    let keys = c
        .replicas
        .iter()
        .map(|r| {
            parse_hex32(&r.public_key)
                .map(PublicKey)
                .context("bad public key in cluster.yaml")
        })
        .collect::<Result<Vec<_>>>()?;
    let ring = KeyRing::new(&keys)?;
    let n = c.replicas.len();
    let quorum = 2 * max_faulty(n) + 1;
    // The replica's peer API: its listen address under gRPC (under TCP, the client port
    // serves the same gRPC services).
    let addr = if c.transport == "tcp" {
        r.client
    } else {
        r.listen
    };
    let tls = c.client_tls(dir)?;
    let endpoint = crate::replica_endpoint(&addr.to_string(), tls.as_ref())?.timeout(timeout);
    let unreachable = |e: &dyn std::fmt::Display| {
        Unavailable(format!("cannot reach replica {replica} at {addr}: {e}"))
    };
    let channel = match tokio::time::timeout(timeout, endpoint.connect()).await {
        Ok(Ok(ch)) => ch,
        Ok(Err(e)) if refused_or_timed_out(&e) => {
            return Err(unreachable(&error_chain(&e)).into());
        }
        // TLS (a wrong CA or server name) and the like: the setup is wrong, not the replica
        // down.
        Ok(Err(e)) => bail!(
            "cannot connect to replica {replica} at {addr}: {}",
            error_chain(&e)
        ),
        Err(_) => return Err(unreachable(&format!("no answer in {timeout:?}")).into()),
    };
    let mut api = pb::pbft_service_client::PbftServiceClient::new(channel)
        .max_decoding_message_size(64 << 20);
    let mut prev = Digest::ZERO;
    let mut height = 1u64;
    loop {
        let request = pb::SyncStateRequest {
            from_height: height,
            max_blocks: 256,
            node_id: "pbft-cli".into(),
        };
        let resp = match api.sync_state(request).await {
            Ok(r) => r.into_inner(),
            Err(s) if is_unreachable(s.code()) => {
                return Err(unreachable(&format!("SyncState: {}", s.message())).into());
            }
            Err(s) => bail!(
                "replica {replica} refused SyncState from height {height}: {}",
                s.message()
            ),
        };
        if resp.blocks.is_empty() {
            break;
        }
        for b in resp.blocks {
            let at = b.height;
            let block = match Block::from_pb(b) {
                Ok(b) => b,
                Err(e) => return bad(out, replica, at, &format!("undecodable: {e}")),
            };
            if let Err(e) = block.verify(height, &prev, n, quorum, &ring) {
                return bad(out, replica, height, &e.to_string());
            }
            prev = block.hash();
            height += 1;
        }
    }
    let blocks = height - 1;
    show(
        out,
        json!({"replica": replica, "valid": true, "blocks": blocks, "head_hash": prev.to_hex()}),
        format!(
            "ledger of replica {replica}: {blocks} blocks, every link and certificate valid; head {}\n",
            prev.to_hex()
        ),
    );
    Ok(Outcome { code: exit::OK })
}

/// gRPC codes that mean the replica did not answer, rather than refused.
fn is_unreachable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
    )
}

/// Whether a connection failed because nothing answered (refused, reset, unreachable or
/// timed out), rather than because of how it was set up.
fn refused_or_timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::*;
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | TimedOut
                    | HostUnreachable
                    | NetworkUnreachable
                    | AddrNotAvailable
                    | NotConnected
            )
        {
            return true;
        }
        // tonic's connect timeout is its own (private) error type.
        if c.to_string().contains("timed out") {
            return true;
        }
        cur = c.source();
    }
    false
}

/// An error and its sources, `: `-joined (a transport error alone says only "transport
/// error").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    crate::with_sources(e.to_string(), e.source())
}

fn bad(out: OutputFormat, replica: u32, height: u64, why: &str) -> Result<Outcome> {
    show(
        out,
        json!({"replica": replica, "valid": false, "first_bad_block": height, "reason": why}),
        format!("ledger of replica {replica}: first bad block is {height}: {why}\n"),
    );
    Ok(Outcome {
        code: exit::LEDGER_INVALID,
    })
}
