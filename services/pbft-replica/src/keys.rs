//! Key material: this replica's secret from its key file, everyone's public keys from the
//! configuration.

use std::path::Path;

use pbft_core::{ClientId, Ed25519Signer, KeyRing, PublicKey};

use crate::config::Config;

/// A key that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{what}: expected 64 hex characters (32 bytes)")]
    Format { what: String },
    #[error("{0}")]
    Invalid(String),
}

pub use pbft_core::encode::{parse_hex32, to_hex};

/// Reads this replica's secret key.
pub fn load_signer(path: &Path) -> Result<Ed25519Signer, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let secret = parse_hex32(&text).ok_or_else(|| KeyError::Format {
        what: format!("key file {}", path.display()),
    })?;
    Ok(Ed25519Signer::from_secret(secret))
}

/// Builds the key ring of every replica and registered client.
pub fn key_ring(cfg: &Config) -> Result<KeyRing, KeyError> {
    let replicas = cfg
        .replicas
        .iter()
        .enumerate()
        .map(|(i, r)| {
            parse_hex32(&r.public_key)
                .map(PublicKey)
                .ok_or_else(|| KeyError::Format {
                    what: format!("replicas[{i}].public_key"),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut ring = KeyRing::new(&replicas).map_err(|e| KeyError::Invalid(e.to_string()))?;
    for c in &cfg.clients {
        let key = parse_hex32(&c.public_key).ok_or_else(|| KeyError::Format {
            what: format!("clients[id={}].public_key", c.id),
        })?;
        ring.add_client(ClientId(c.id), PublicKey(key))
            .map_err(|e| KeyError::Invalid(e.to_string()))?;
    }
    Ok(ring)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_rejects() {
        let b = [0xab; 32];
        assert_eq!(parse_hex32(&to_hex(&b)), Some(b));
        assert_eq!(parse_hex32(&format!(" {}\n", to_hex(&b))), Some(b));
        assert_eq!(parse_hex32("abc"), None);
        assert_eq!(parse_hex32(&"zz".repeat(32)), None);
    }
}
