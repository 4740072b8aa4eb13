//! The key Secret: every replica's ed25519 key pair plus the operator's client key.
//!
//! Keys are the cluster's identity: the replicas sign every protocol message with them and
//! the stored ledger carries those signatures. So they are generated exactly once (create if
//! absent, never applied over) and only read afterwards; a Secret that lacks an entry is
//! reported, never repaired by generating a new key.

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

use super::{Cluster, hex};
use crate::crd::OPERATOR_CLIENT_ID;
use crate::{Error, Result};

/// Data key of replica `i`'s secret key (64 hex characters of the seed).
pub fn replica_key_entry(i: i32) -> String {
    format!("replica-{i}.key")
}

/// Data key of replica `i`'s public key (64 hex characters).
pub fn replica_pub_entry(i: i32) -> String {
    format!("replica-{i}.pub")
}

/// Data key of the operator client's secret key.
pub fn client_key_entry() -> String {
    format!("client-{OPERATOR_CLIENT_ID}.key")
}

/// Data key of the operator client's public key.
pub fn client_pub_entry() -> String {
    format!("client-{OPERATOR_CLIENT_ID}.pub")
}

/// The public half of the key Secret: what the replica configuration lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKeys {
    /// Replica public keys in id order (64 lower-case hex characters each).
    pub replicas: Vec<String>,
    /// The operator client's public key (client id 1).
    pub operator_client: String,
}

/// Why the keys in an existing Secret cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyProblem {
    /// Entries the cluster needs that the Secret lacks.
    Missing(Vec<String>),
    /// Entries present but not 64 hex characters.
    Malformed(Vec<String>),
}

impl KeyProblem {
    /// The condition reason for this problem.
    pub fn reason(&self) -> &'static str {
        match self {
            KeyProblem::Missing(_) => "KeysMissing",
            KeyProblem::Malformed(_) => "KeysMalformed",
        }
    }

    /// A message naming the entries.
    pub fn message(&self, secret: &str) -> String {
        match self {
            KeyProblem::Missing(e) => format!(
                "Secret {secret} lacks {}; the controller never regenerates keys of a cluster: restore them or delete the Secret before the cluster first starts",
                e.join(", ")
            ),
            KeyProblem::Malformed(e) => format!(
                "Secret {secret} has entries that are not 64 hex characters: {}",
                e.join(", ")
            ),
        }
    }
}

/// A fresh key pair from 32 bytes of OS randomness: (secret seed hex, public key hex).
fn key_pair(fill: &mut dyn FnMut(&mut [u8; 32]) -> Result<()>) -> Result<(String, String)> {
    let mut seed = [0u8; 32];
    fill(&mut seed)?;
    let key = SigningKey::from_bytes(&seed);
    let pair = (hex(&seed), hex(&key.verifying_key().to_bytes()));
    seed.fill(0);
    Ok(pair)
}

fn os_random(buf: &mut [u8; 32]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| Error::Random(e.to_string()))
}

/// Key entries for `n` replicas and the operator client, from OS randomness.
pub fn generate(n: i32) -> Result<BTreeMap<String, String>> {
    generate_with(n, &mut os_random)
}

/// [`generate`] with an injected randomness source (tests).
pub fn generate_with(
    n: i32,
    fill: &mut dyn FnMut(&mut [u8; 32]) -> Result<()>,
) -> Result<BTreeMap<String, String>> {
    let mut data = BTreeMap::new();
    for i in 0..n {
        let (secret, public) = key_pair(fill)?;
        data.insert(replica_key_entry(i), secret);
        data.insert(replica_pub_entry(i), public);
    }
    let (secret, public) = key_pair(fill)?;
    data.insert(client_key_entry(), secret);
    data.insert(client_pub_entry(), public);
    Ok(data)
}

/// The Secret to create (once) from generated entries.
pub fn build(c: &Cluster, entries: &BTreeMap<String, String>) -> Secret {
    Secret {
        metadata: c.meta(c.keys_secret_name()),
        type_: Some("Opaque".into()),
        data: Some(
            entries
                .iter()
                .map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes())))
                .collect(),
        ),
        ..Secret::default()
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Reads the public keys of `n` replicas and the operator client from a Secret. The replicas'
/// secret key entries must be present too (the pods mount them), but are not parsed here.
pub fn public_keys(secret: &Secret, n: i32) -> Result<PublicKeys, KeyProblem> {
    let empty = BTreeMap::new();
    let data = secret.data.as_ref().unwrap_or(&empty);
    let text = |k: &str| {
        data.get(k)
            .map(|v| String::from_utf8_lossy(&v.0).trim().to_ascii_lowercase())
    };
    let mut missing = Vec::new();
    let mut malformed = Vec::new();
    let mut replicas = Vec::new();
    for i in 0..n {
        if text(&replica_key_entry(i)).is_none() {
            missing.push(replica_key_entry(i));
        }
        match text(&replica_pub_entry(i)) {
            None => missing.push(replica_pub_entry(i)),
            Some(p) if !is_hex64(&p) => malformed.push(replica_pub_entry(i)),
            Some(p) => replicas.push(p),
        }
    }
    let operator_client = match text(&client_pub_entry()) {
        None => {
            missing.push(client_pub_entry());
            String::new()
        }
        Some(p) if !is_hex64(&p) => {
            malformed.push(client_pub_entry());
            String::new()
        }
        Some(p) => p,
    };
    if !missing.is_empty() {
        return Err(KeyProblem::Missing(missing));
    }
    if !malformed.is_empty() {
        return Err(KeyProblem::Malformed(malformed));
    }
    Ok(PublicKeys {
        replicas,
        operator_client,
    })
}

/// The public keys of freshly generated entries.
pub fn public_keys_of(entries: &BTreeMap<String, String>, n: i32) -> PublicKeys {
    PublicKeys {
        replicas: (0..n)
            .map(|i| {
                entries
                    .get(&replica_pub_entry(i))
                    .cloned()
                    .unwrap_or_default()
            })
            .collect(),
        operator_client: entries
            .get(&client_pub_entry())
            .cloned()
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::PbftClusterSpec;
    use crate::resources::test_support::cluster;

    fn counter_fill() -> impl FnMut(&mut [u8; 32]) -> Result<()> {
        let mut k = 0u8;
        move |b: &mut [u8; 32]| {
            k += 1;
            b.fill(k);
            Ok(())
        }
    }

    #[test]
    fn generated_entries_are_matching_key_pairs() {
        let entries = generate(4).unwrap();
        assert_eq!(entries.len(), 4 * 2 + 2);
        for i in 0..4 {
            let seed = &entries[&replica_key_entry(i)];
            let public = &entries[&replica_pub_entry(i)];
            assert!(is_hex64(seed) && is_hex64(public));
            let mut bytes = [0u8; 32];
            for (j, b) in bytes.iter_mut().enumerate() {
                *b = u8::from_str_radix(&seed[2 * j..2 * j + 2], 16).unwrap();
            }
            let derived = hex(&SigningKey::from_bytes(&bytes).verifying_key().to_bytes());
            assert_eq!(&derived, public, "replica {i}");
        }
        // OS randomness: two generations never share a key.
        let again = generate(4).unwrap();
        assert_ne!(again[&replica_key_entry(0)], entries[&replica_key_entry(0)]);
        assert_ne!(
            entries[&replica_key_entry(0)],
            entries[&replica_key_entry(1)]
        );
    }

    #[test]
    fn randomness_failure_is_an_error() {
        let mut fail = |_: &mut [u8; 32]| Err(Error::Random("no entropy".into()));
        assert!(matches!(generate_with(4, &mut fail), Err(Error::Random(_))));
    }

    #[test]
    fn secret_round_trips_public_keys() {
        let pc = cluster("c1", PbftClusterSpec::default());
        let c = Cluster::new(&pc, 4, "cluster.local").unwrap();
        let entries = generate_with(4, &mut counter_fill()).unwrap();
        let s = build(&c, &entries);
        assert_eq!(s.metadata.name.as_deref(), Some("c1-keys"));
        assert_eq!(s.type_.as_deref(), Some("Opaque"));
        assert!(s.metadata.owner_references.is_some());
        let keys = public_keys(&s, 4).unwrap();
        assert_eq!(keys, public_keys_of(&entries, 4));
        assert_eq!(keys.replicas.len(), 4);
        assert_eq!(keys.operator_client, entries["client-1.pub"]);
        // A larger Secret serves a smaller cluster.
        assert_eq!(public_keys(&s, 1).unwrap().replicas.len(), 1);
    }

    #[test]
    fn missing_and_malformed_entries_are_named() {
        let pc = cluster("c1", PbftClusterSpec::default());
        let c = Cluster::new(&pc, 4, "cluster.local").unwrap();
        let mut entries = generate_with(4, &mut counter_fill()).unwrap();
        entries.remove("replica-2.pub");
        entries.remove("replica-3.key");
        let err = public_keys(&build(&c, &entries), 4).unwrap_err();
        assert_eq!(
            err,
            KeyProblem::Missing(vec!["replica-2.pub".into(), "replica-3.key".into()])
        );
        assert_eq!(err.reason(), "KeysMissing");
        let msg = err.message("c1-keys");
        assert!(msg.contains("replica-2.pub, replica-3.key"), "{msg}");

        // The same Secret is short for a 7-replica cluster.
        let entries = generate_with(4, &mut counter_fill()).unwrap();
        let err = public_keys(&build(&c, &entries), 7).unwrap_err();
        let KeyProblem::Missing(m) = err else {
            panic!("{err:?}")
        };
        assert_eq!(m.len(), 6);

        let mut entries = generate_with(4, &mut counter_fill()).unwrap();
        entries.insert("client-1.pub".into(), "zz".into());
        let err = public_keys(&build(&c, &entries), 4).unwrap_err();
        assert_eq!(err, KeyProblem::Malformed(vec!["client-1.pub".into()]));
        assert_eq!(
            public_keys(&Secret::default(), 1).unwrap_err(),
            KeyProblem::Missing(vec![
                "replica-0.key".into(),
                "replica-0.pub".into(),
                "client-1.pub".into()
            ])
        );
    }
}
