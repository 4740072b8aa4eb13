//! TLS material for the gRPC transport, read once at start-up so a missing or malformed file
//! stops the replica with a message naming it instead of failing every dial later.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::TlsConfig;

/// A TLS file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read TLS {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS {what} {path} holds no PEM block")]
    NotPem { what: &'static str, path: PathBuf },
}

/// This replica's certificate and key, and the CA its peers' certificates must chain to.
#[derive(Clone, Debug)]
pub struct TlsMaterial {
    identity: Identity,
    ca: Certificate,
    server_name: Option<String>,
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TlsError::NotPem {
            what,
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

impl TlsMaterial {
    pub fn load(cfg: &TlsConfig) -> Result<TlsMaterial, TlsError> {
        let cert = read_pem("certificate", &cfg.cert_file)?;
        let key = read_pem("key", &cfg.key_file)?;
        let ca = read_pem("CA", &cfg.ca_file)?;
        Ok(TlsMaterial {
            identity: Identity::from_pem(cert, key),
            ca: Certificate::from_pem(ca),
            server_name: cfg.server_name.clone(),
        })
    }

    /// What the listener presents.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(self.identity.clone())
    }

    /// How to dial `addr` (`host:port`): its certificate must chain to our CA and name the
    /// host (or the configured `server_name`).
    pub fn client_for(&self, addr: &str) -> ClientTlsConfig {
        let name = self
            .server_name
            .clone()
            .unwrap_or_else(|| host_of(addr).to_owned());
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .domain_name(name)
    }
}

/// The host part of `host:port` or `[v6]:port`.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_the_part_before_the_port() {
        assert_eq!(
            host_of("pbft-1.pbft-headless.default.svc.cluster.local:7000"),
            "pbft-1.pbft-headless.default.svc.cluster.local"
        );
        assert_eq!(host_of("127.0.0.2:7000"), "127.0.0.2");
        assert_eq!(host_of("[::1]:7000"), "::1");
    }

    #[test]
    fn missing_or_non_pem_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").expect("write");
        let cfg = TlsConfig {
            cert_file: junk.clone(),
            key_file: junk.clone(),
            ca_file: junk.clone(),
            server_name: None,
        };
        let err = TlsMaterial::load(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("certificate") && err.contains("junk.pem"),
            "{err}"
        );
        let cfg = TlsConfig {
            cert_file: dir.path().join("missing.crt"),
            ..cfg
        };
        let err = TlsMaterial::load(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("cannot read TLS certificate") && err.contains("missing.crt"),
            "{err}"
        );
    }
}
