//! Peer discovery: turns a peer's `host:port` into the socket address to dial.
//!
//! Under a StatefulSet a peer is a DNS name (`pbft-2.pbft-headless.default.svc.cluster.local`)
//! that exists only once the pod is scheduled, and whose address changes when the pod is
//! rescheduled. So diallers resolve on every attempt, a name that does not resolve yet is an
//! ordinary connection error retried with backoff, and answers (negative ones above all) are
//! cached only briefly. IP literals never touch DNS, so a cluster configured with plain
//! addresses needs no resolver at all.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use tracing::{info, warn};

use crate::config::StatefulSetPeers;

/// How long one query to an explicitly configured name server may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);
/// "No such name" is remembered at most this long: the pod may be scheduled any moment.
const NEGATIVE_TTL_MAX: Duration = Duration::from_secs(1);
/// A resolved address is reused at most this long: a rescheduled pod gets a new IP.
const POSITIVE_TTL_MAX: Duration = Duration::from_secs(5);
/// `resolve_until` logs its first failure, then at most this often.
const RETRY_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Why a peer address could not be turned into a socket address.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("peer address {addr:?} is not host:port ({reason})")]
    InvalidAddress { addr: String, reason: &'static str },
    #[error("cannot set up the DNS resolver: {0}")]
    Resolver(#[source] NetError),
    #[error("cannot resolve {host}: {source}")]
    Lookup {
        host: String,
        #[source]
        source: NetError,
    },
    #[error("{host} resolved to no address")]
    NoAddress { host: String },
    #[error("gave up resolving {addr}")]
    GaveUp {
        addr: String,
        /// The last failure, if an attempt finished before giving up.
        #[source]
        last: Option<Box<DiscoveryError>>,
    },
}

pub type Result<T, E = DiscoveryError> = std::result::Result<T, E>;

/// Where names are looked up.
enum Backend {
    /// Only this resolver, built at start (`statefulset.dns_server`).
    Explicit(TokioResolver),
    /// The system configuration (`/etc/resolv.conf`), read the first time a name needs it,
    /// so a cluster of IP literals runs even where that file is missing or broken.
    System(OnceLock<Result<TokioResolver, String>>),
}

/// Resolves peer addresses; shared by every dialler of a replica (one cache, one pool).
pub struct PeerResolver {
    backend: Backend,
}

impl std::fmt::Debug for PeerResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match &self.backend {
            Backend::Explicit(_) => "explicit",
            Backend::System(_) => "system",
        };
        f.debug_struct("PeerResolver")
            .field("backend", &backend)
            .finish()
    }
}

impl PeerResolver {
    /// A resolver that asks only `statefulset.dns_server` when one is set, and the system's
    /// configuration otherwise.
    pub fn new(statefulset: Option<&StatefulSetPeers>) -> Result<PeerResolver> {
        let backend = match statefulset.and_then(|s| s.dns_server) {
            Some(server) => Backend::Explicit(explicit_resolver(server)?),
            None => Backend::System(OnceLock::new()),
        };
        Ok(PeerResolver { backend })
    }

    /// `host:port` to a socket address. IP literals (`10.0.0.1:7000`, `[::1]:7000`) are
    /// returned as they are; names are looked up, and the first address found is used.
    pub async fn resolve(&self, addr: &str) -> Result<SocketAddr> {
        let (host, port) = match parse(addr)? {
            Target::Literal(sa) => return Ok(sa),
            Target::Name(host, port) => (host, port),
        };
        let resolver = self.resolver()?;
        let lookup = resolver
            .lookup_ip(host)
            .await
            .map_err(|source| DiscoveryError::Lookup {
                host: host.to_string(),
                source,
            })?;
        let ip = lookup
            .iter()
            .next()
            .ok_or_else(|| DiscoveryError::NoAddress {
                host: host.to_string(),
            })?;
        Ok(SocketAddr::new(ip, port))
    }

    /// Resolves `addr`, retrying every `retry` until it resolves or `give_up` completes.
    /// The first failure is logged, then one line every 30 s while it keeps failing. An
    /// address that is not `host:port` at all fails at once: retrying cannot fix it.
    pub async fn resolve_until(
        &self,
        addr: &str,
        retry: Duration,
        give_up: impl Future<Output = ()>,
    ) -> Result<SocketAddr> {
        tokio::pin!(give_up);
        let mut failures = 0u64;
        let mut last: Option<DiscoveryError> = None;
        let mut last_log: Option<tokio::time::Instant> = None;
        loop {
            let attempt = tokio::select! {
                r = self.resolve(addr) => r,
                _ = &mut give_up => break,
            };
            let err = match attempt {
                Ok(sa) => {
                    if failures > 0 {
                        info!(%addr, resolved = %sa, failures, "peer address resolves now");
                    }
                    return Ok(sa);
                }
                Err(e @ DiscoveryError::InvalidAddress { .. }) => return Err(e),
                Err(e) => e,
            };
            failures += 1;
            if last_log.is_none_or(|t| t.elapsed() >= RETRY_LOG_INTERVAL) {
                warn!(%addr, failures, error = %err, "peer address does not resolve yet; retrying");
                last_log = Some(tokio::time::Instant::now());
            }
            last = Some(err);
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = &mut give_up => break,
            }
        }
        Err(DiscoveryError::GaveUp {
            addr: addr.to_string(),
            last: last.map(Box::new),
        })
    }

    fn resolver(&self) -> Result<&TokioResolver> {
        match &self.backend {
            Backend::Explicit(r) => Ok(r),
            Backend::System(cell) => cell
                .get_or_init(|| system_resolver().map_err(|e| e.to_string()))
                .as_ref()
                .map_err(|e| DiscoveryError::Resolver(NetError::Msg(e.clone()))),
        }
    }
}

/// A resolver that asks `server` (UDP, then TCP) and nothing else: no search domains, no
/// hosts file, short timeouts.
fn explicit_resolver(server: SocketAddr) -> Result<TokioResolver> {
    let mut ns = NameServerConfig::udp_and_tcp(server.ip());
    for c in &mut ns.connections {
        c.port = server.port();
    }
    let config = ResolverConfig::from_parts(None, Vec::new(), vec![ns]);
    let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
    let opts = builder.options_mut();
    opts.timeout = QUERY_TIMEOUT;
    opts.attempts = 1;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.try_tcp_on_error = true;
    bound_ttls(opts);
    builder.build().map_err(DiscoveryError::Resolver)
}

/// The system's resolver configuration, with the same bounds on caching.
fn system_resolver() -> Result<TokioResolver> {
    let mut builder = TokioResolver::builder_tokio().map_err(DiscoveryError::Resolver)?;
    bound_ttls(builder.options_mut());
    builder.build().map_err(DiscoveryError::Resolver)
}

fn bound_ttls(opts: &mut ResolverOpts) {
    opts.negative_max_ttl = Some(NEGATIVE_TTL_MAX);
    opts.positive_max_ttl = Some(POSITIVE_TTL_MAX);
}

/// A parsed peer address.
#[derive(Debug, PartialEq, Eq)]
enum Target<'a> {
    Literal(SocketAddr),
    Name(&'a str, u16),
}

fn parse(addr: &str) -> Result<Target<'_>> {
    let invalid = |reason| DiscoveryError::InvalidAddress {
        addr: addr.to_string(),
        reason,
    };
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return Ok(Target::Literal(sa));
    }
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| invalid("no port"))?;
    let port: u16 = port.parse().map_err(|_| invalid("bad port"))?;
    if host.is_empty() {
        return Err(invalid("empty host"));
    }
    // A bare IPv6 literal needs brackets; an IP here means a malformed address.
    if host.contains(':') || host.starts_with('[') || host.parse::<IpAddr>().is_ok() {
        return Err(invalid("IPv6 addresses need brackets: [addr]:port"));
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err(invalid("not a DNS name"));
    }
    Ok(Target::Name(host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_literals() {
        assert_eq!(
            parse("pbft-0.pbft-headless.default.svc.cluster.local:7000").unwrap(),
            Target::Name("pbft-0.pbft-headless.default.svc.cluster.local", 7000)
        );
        assert_eq!(parse("localhost:1").unwrap(), Target::Name("localhost", 1));
        assert_eq!(
            parse("10.1.2.3:7000").unwrap(),
            Target::Literal("10.1.2.3:7000".parse().unwrap())
        );
        assert_eq!(
            parse("[::1]:7000").unwrap(),
            Target::Literal("[::1]:7000".parse().unwrap())
        );
    }

    #[test]
    fn rejects_malformed_addresses() {
        for bad in [
            "",
            "pbft-0",
            "pbft-0:",
            ":7000",
            "pbft-0:70000",
            "pbft-0:x",
            "::1:7000",
            "[::1:7000",
            "pbft 0:7000",
            "1.2.3.4",
        ] {
            assert!(
                matches!(parse(bad), Err(DiscoveryError::InvalidAddress { .. })),
                "{bad:?} parsed as {:?}",
                parse(bad)
            );
        }
    }

    #[tokio::test]
    async fn ip_literals_need_no_dns() {
        // Neither backend is asked: the explicit server does not exist, and the system one
        // is never built.
        let dead = StatefulSetPeers {
            dns_server: Some("127.0.0.1:1".parse().unwrap()),
            ..StatefulSetPeers::default()
        };
        for r in [
            PeerResolver::new(None).unwrap(),
            PeerResolver::new(Some(&dead)).unwrap(),
        ] {
            assert_eq!(
                r.resolve("127.0.0.2:7000").await.unwrap(),
                "127.0.0.2:7000".parse().unwrap()
            );
            assert_eq!(
                r.resolve("[::1]:9").await.unwrap(),
                "[::1]:9".parse().unwrap()
            );
        }
        let r = PeerResolver::new(None).unwrap();
        let _ = r.resolve("10.0.0.1:1").await.unwrap();
        assert!(matches!(&r.backend, Backend::System(c) if c.get().is_none()));
    }

    #[tokio::test]
    async fn resolve_until_gives_up_when_told_and_not_on_garbage() {
        let dead = StatefulSetPeers {
            dns_server: Some("127.0.0.1:1".parse().unwrap()),
            ..StatefulSetPeers::default()
        };
        let r = PeerResolver::new(Some(&dead)).unwrap();
        let err = r
            .resolve_until(
                "pbft-1.pbft-headless.default.svc.cluster.local:7000",
                Duration::from_millis(20),
                tokio::time::sleep(Duration::from_millis(300)),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, DiscoveryError::GaveUp { .. }), "{err}");
        let err = r
            .resolve_until("no-port", Duration::from_millis(20), std::future::pending())
            .await
            .unwrap_err();
        assert!(
            matches!(err, DiscoveryError::InvalidAddress { .. }),
            "{err}"
        );
        let ok = r
            .resolve_until(
                "127.0.0.3:5",
                Duration::from_secs(1),
                std::future::pending(),
            )
            .await
            .unwrap();
        assert_eq!(ok, "127.0.0.3:5".parse().unwrap());
    }
}
