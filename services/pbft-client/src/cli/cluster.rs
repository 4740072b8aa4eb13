//! A local cluster's layout on disk: `cluster.yaml` (addresses and public keys, read by every
//! command), per-replica configs, and key files. `pbft up` writes it once and reuses it, so
//! running `pbft up` again resumes the same cluster with the same data.

use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use pbft_core::Ed25519Signer;
use serde::{Deserialize, Serialize};

/// One replica of a local cluster.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaInfo {
    pub id: u32,
    /// Replica-to-replica listener.
    pub listen: SocketAddr,
    /// gRPC client API (equal to `listen` under the gRPC transport).
    pub client: SocketAddr,
    /// HTTP sidecar.
    pub http: SocketAddr,
    pub public_key: String,
}

/// `cluster.yaml`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterFile {
    pub transport: String,
    pub replicas: Vec<ReplicaInfo>,
    /// The client id the CLI uses; its secret is in `keys/client-<id>.key`.
    pub client_id: u64,
    /// Extra client ids registered for load generation (`bench`, demo load).
    pub load_clients: Vec<u64>,
    /// TLS towards the replicas, when their gRPC listeners have it on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClusterTls>,
}

/// `tls:` in `cluster.yaml`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterTls {
    /// PEM file of the CA that signed the replicas' certificates (relative paths are relative
    /// to the cluster directory).
    pub ca_file: PathBuf,
    /// Verify the replicas' certificates against this name instead of the address's host.
    #[serde(default)]
    pub server_name: Option<String>,
}

pub use pbft_core::encode::{parse_hex32, to_hex};

/// 32 random bytes from the operating system.
pub fn random_secret() -> Result<[u8; 32]> {
    let mut f =
        fs::File::open("/dev/urandom").context("cannot open /dev/urandom for key generation")?;
    let mut out = [0u8; 32];
    f.read_exact(&mut out).context("cannot read /dev/urandom")?;
    Ok(out)
}

/// Reads a secret key file (64 hex characters).
pub fn read_secret(path: &Path) -> Result<[u8; 32]> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("cannot read key file {}", path.display()))?;
    parse_hex32(&text).with_context(|| {
        format!(
            "{} is not a key (expected 64 hex characters)",
            path.display()
        )
    })
}

/// Writes a secret key as hex, readable by its owner only from the start: the file is
/// created with mode 0600 (and a file left by an interrupted run is narrowed to it before
/// anything is written). With `overwrite` false an existing file is refused, atomically.
pub fn write_secret(path: &Path, secret: &[u8; 32], overwrite: bool) -> Result<()> {
    use std::io::Write as _;
    let mut open = fs::OpenOptions::new();
    open.write(true);
    if overwrite {
        open.create(true).truncate(true);
    } else {
        open.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        open.mode(0o600);
    }
    let mut file = open.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => {
            anyhow::anyhow!("{} exists; refusing to overwrite a key", path.display())
        }
        _ => anyhow::Error::new(e).context(format!("cannot write {}", path.display())),
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict {} to its owner", path.display()))?;
    }
    if let Err(e) = file.write_all(to_hex(secret).as_bytes()) {
        // No empty or partial key left behind for the next run to trip over.
        drop(file);
        let _ = fs::remove_file(path);
        return Err(anyhow::Error::new(e).context(format!("cannot write {}", path.display())));
    }
    Ok(())
}

impl ClusterFile {
    /// The client's TLS settings, with the CA read from disk.
    pub fn client_tls(&self, dir: &Path) -> Result<Option<crate::ClientTls>> {
        let Some(tls) = &self.tls else {
            return Ok(None);
        };
        let path = dir.join(&tls.ca_file);
        let ca_pem = fs::read(&path)
            .with_context(|| format!("cannot read the TLS CA file {}", path.display()))?;
        Ok(Some(crate::ClientTls {
            ca_pem,
            server_name: tls.server_name.clone(),
        }))
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join("cluster.yaml")
    }

    /// Loads the layout `pbft up` wrote.
    pub fn load(dir: &Path) -> Result<ClusterFile> {
        let path = Self::path(dir);
        let text = fs::read_to_string(&path).with_context(|| {
            format!(
                "no cluster at {} (start one with `pbft up --data {}`)",
                dir.display(),
                dir.display()
            )
        })?;
        serde_saphyr::from_str(&text)
            .map_err(|e| anyhow::anyhow!("invalid {}: {e}", path.display()))
    }

    pub fn client_secret(&self, dir: &Path, id: u64) -> Result<[u8; 32]> {
        read_secret(&dir.join("keys").join(format!("client-{id}.key")))
    }

    pub fn client_addrs(&self) -> Vec<String> {
        self.replicas.iter().map(|r| r.client.to_string()).collect()
    }

    /// The addresses `generate` gives replica `i`: 127.0.0.(i+1) with its peer listener on
    /// `base_port`, its sidecar on the next port, and (TCP only) its client listener on the
    /// one after; [listen, http, client].
    pub fn loopback_addrs(i: usize, transport: &str, base_port: u16) -> Result<[SocketAddr; 3]> {
        let ports = if transport == "tcp" { 2 } else { 1 };
        if base_port == 0 {
            bail!("--port 0 is not a port a cluster can be reached on; pick one, e.g. 7000");
        }
        if base_port.checked_add(ports).is_none() {
            bail!(
                "--port {base_port} leaves no room for the {} ports each replica needs",
                ports + 1
            );
        }
        let ip = std::net::Ipv4Addr::new(127, 0, 0, (i + 1) as u8);
        let at = |port: u16| SocketAddr::from((ip, port));
        let listen = at(base_port);
        let client = if transport == "tcp" {
            at(base_port + 2)
        } else {
            listen
        };
        Ok([listen, at(base_port + 1), client])
    }

    /// Whether `generate` can lay out `n` replicas.
    pub fn check_size(n: usize) -> Result<()> {
        if n < 4 || !(n - 1).is_multiple_of(3) {
            bail!("--replicas must be 3f+1 with f >= 1 (4, 7, 10, ...), got {n}");
        }
        if n > 250 {
            bail!("--replicas {n} is more than this machine's loopback plan supports (250)");
        }
        Ok(())
    }

    /// Creates keys and configs for a new cluster of `n` replicas on 127.0.0.1..n.
    pub fn generate(dir: &Path, n: usize, transport: &str, base_port: u16) -> Result<ClusterFile> {
        Self::check_size(n)?;
        let keys = dir.join("keys");
        fs::create_dir_all(&keys).with_context(|| format!("cannot create {}", keys.display()))?;
        let mut replicas = Vec::new();
        for i in 0..n {
            let secret = random_secret()?;
            write_secret(&keys.join(format!("replica-{i}.key")), &secret, true)?;
            let [listen, http, client] = Self::loopback_addrs(i, transport, base_port)?;
            replicas.push(ReplicaInfo {
                id: i as u32,
                listen,
                client,
                http,
                public_key: to_hex(&Ed25519Signer::from_secret(secret).public().0),
            });
        }
        let client_ids: Vec<u64> = (0..1025).collect();
        let mut clients = Vec::new();
        for id in &client_ids {
            let secret = random_secret()?;
            write_secret(&keys.join(format!("client-{id}.key")), &secret, true)?;
            clients.push((*id, to_hex(&Ed25519Signer::from_secret(secret).public().0)));
        }
        let file = ClusterFile {
            transport: transport.to_string(),
            replicas,
            client_id: 0,
            load_clients: client_ids[1..].to_vec(),
            tls: None,
        };
        for r in &file.replicas {
            let cfg = replica_config(dir, &file, r, &clients);
            fs::write(dir.join(format!("replica-{}.yaml", r.id)), cfg)?;
        }
        let yaml = serde_saphyr::to_string(&file).map_err(|e| anyhow::anyhow!("{e}"))?;
        fs::write(Self::path(dir), yaml)?;
        Ok(file)
    }
}

fn replica_config(
    dir: &Path,
    c: &ClusterFile,
    r: &ReplicaInfo,
    clients: &[(u64, String)],
) -> String {
    let mut out = format!(
        "# Written by `pbft up`; see docs/CONFIG.md.\nid: {}\nlisten: {}\nhttp_listen: {}\ndata_dir: {}\nkey_file: {}\ntransport: {}\n",
        r.id,
        r.listen,
        r.http,
        dir.join(format!("data-{}", r.id)).display(),
        dir.join("keys")
            .join(format!("replica-{}.key", r.id))
            .display(),
        c.transport,
    );
    if c.transport == "tcp" {
        out.push_str(&format!("client_listen: {}\n", r.client));
    }
    out.push_str("replicas:\n");
    for p in &c.replicas {
        out.push_str(&format!(
            "  - public_key: {}\n    address: {}\n",
            p.public_key, p.listen
        ));
    }
    out.push_str("clients:\n");
    for (id, pk) in clients {
        out.push_str(&format!("  - id: {id}\n    public_key: {pk}\n"));
    }
    out
}
