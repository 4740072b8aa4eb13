//! DNS discovery against a real DNS server (dnsmasq) on 127.0.0.53: peers named by
//! StatefulSet convention, resolved on every dial, retried until the names exist.
//!
//! dnsmasq is required, never skipped: install the Debian package `dnsmasq-base`.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, N, Options, StatefulSetOptions, statefulset_host};
use pbft_replica::config::StatefulSetPeers;
use pbft_replica::discovery::{DiscoveryError, PeerResolver};

const DNS_IP: &str = "127.0.0.53";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("runtime")
}

/// The dnsmasq binary; a missing one fails the test with what to install.
fn dnsmasq_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join("dnsmasq"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "dnsmasq not found (PATH, /usr/sbin, /sbin): these tests need a real DNS server; \
                 install the Debian package `dnsmasq-base` (apt-get install -y dnsmasq-base)"
            )
        })
}

/// A UDP port on 127.0.0.53, below the ephemeral range, that is free for TCP too (dnsmasq
/// serves both). The returned socket holds it until dnsmasq is started.
fn reserve_dns_port() -> (UdpSocket, SocketAddr) {
    for _ in 0..100 {
        let port = common::free_addr(DNS_IP).port();
        if let Ok(s) = UdpSocket::bind(format!("{DNS_IP}:{port}")) {
            let addr = s.local_addr().expect("addr");
            return (s, addr);
        }
    }
    panic!("no free port on {DNS_IP}");
}

/// A dnsmasq child answering for `cluster.local` only: unknown names there are NXDOMAIN,
/// like a cluster's DNS before a pod exists. Killed on drop.
struct Dnsmasq {
    child: Child,
    log: PathBuf,
}

impl Dnsmasq {
    fn start(addr: SocketAddr, records: &[(String, IpAddr)], extra: &[String], log: &Path) -> Self {
        let out = std::fs::File::create(log).expect("dnsmasq log");
        let mut cmd = Command::new(dnsmasq_binary());
        cmd.args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--pid-file",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--local=/cluster.local/",
            "--log-facility=-",
            "--log-queries",
        ])
        .arg(format!("--listen-address={}", addr.ip()))
        .arg(format!("--port={}", addr.port()))
        .args(
            records
                .iter()
                .map(|(name, ip)| format!("--host-record={name},{ip}")),
        )
        .args(extra)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out);
        let child = cmd.spawn().expect("spawn dnsmasq");
        Dnsmasq {
            child,
            log: log.to_owned(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until `host` resolves through it, failing with its log otherwise.
    fn wait_serving(&mut self, resolver: &PeerResolver, host: &str, rt: &tokio::runtime::Runtime) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("dnsmasq exited ({st}):\n{}", self.log());
            }
            let got = rt.block_on(resolver.resolve(&format!("{host}:1")));
            match got {
                Ok(_) => return,
                Err(e) if Instant::now() > deadline => {
                    panic!("dnsmasq does not answer for {host}: {e}\n{}", self.log())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn resolver_for(dns: SocketAddr) -> PeerResolver {
    PeerResolver::new(Some(&StatefulSetPeers {
        dns_server: Some(dns),
        ..StatefulSetPeers::default()
    }))
    .expect("resolver")
}

/// Replicas that know their peers only by StatefulSet names start before the names exist
/// (before the DNS server is even up), keep retrying, and form a working cluster once the
/// names resolve.
fn statefulset_peers_found_once_dns_answers(transport: &'static str) {
    let _ = dnsmasq_binary();
    let (reservation, dns) = reserve_dns_port();
    let c = Cluster::start_with(
        transport,
        Options {
            statefulset: Some(StatefulSetOptions { dns_server: dns }),
            ..Options::default()
        },
    );

    // Every replica has tried and failed to resolve a peer, and none is ready.
    c.wait_for(
        "every replica to log a failed peer lookup",
        Duration::from_secs(20),
        |c| (0..N).all(|i| c.log(i).contains("cannot resolve pbft-")),
    );
    for i in 0..N {
        let code = c.http_get(i, "/readyz").map(|(code, _)| code);
        assert_ne!(code, Some(200), "replica {i} ready without peers");
    }

    drop(reservation);
    let records: Vec<(String, IpAddr)> = (0..N)
        .map(|i| (statefulset_host(i), c.listen[i].ip()))
        .collect();
    let mut dnsmasq = Dnsmasq::start(dns, &records, &[], &c.dir.path().join("dnsmasq.log"));
    let rt = rt();
    dnsmasq.wait_serving(&resolver_for(dns), &statefulset_host(0), &rt);

    let dns_up = Instant::now();
    c.wait_all_ready();
    println!(
        "[{transport}] all replicas ready {:?} after the names started resolving",
        dns_up.elapsed()
    );
    let client = rt.block_on(c.client(0));
    rt.block_on(async {
        for i in 0..20 {
            let key = format!("dns-{i}");
            client
                .put(key.as_bytes(), b"v")
                .await
                .unwrap_or_else(|e| panic!("put {key}: {e}"));
        }
    });
    let got = rt.block_on(client.get(b"dns-7")).expect("get");
    assert_eq!(got, Some(b"v".to_vec()));
    c.wait_agree(&[0, 1, 2, 3], 20, Duration::from_secs(20));

    // The peers were reached by name, through this server.
    let status = c.status(0).expect("status");
    let peers = status["peers"].as_array().expect("peers");
    for p in peers {
        let addr = p["address"].as_str().unwrap_or_default();
        assert!(
            addr.ends_with(&format!(
                ".pbft-headless.default.svc.cluster.local:{}",
                c.listen[0].port()
            )),
            "peer address {addr}"
        );
        assert_eq!(p["connected"], true, "{p}");
    }
    let log = dnsmasq.log();
    for i in 1..N {
        assert!(
            log.contains(&format!("query[A] {}", statefulset_host(i))),
            "no query for replica {i}:\n{log}"
        );
    }
}

/// The resolver alone: NXDOMAIN is an error, not remembered for long, and `resolve_until`
/// returns soon after the name appears.
#[test]
fn resolver_sees_a_name_soon_after_it_appears() {
    let (reservation, dns) = reserve_dns_port();
    drop(reservation);
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = dir.path().join("hosts.d");
    std::fs::create_dir(&hosts).expect("hosts dir");
    let mut dnsmasq = Dnsmasq::start(
        dns,
        &[(statefulset_host(0), "127.0.0.1".parse().expect("ip"))],
        &[format!("--hostsdir={}", hosts.display())],
        &dir.path().join("dnsmasq.log"),
    );
    let rt = rt();
    let resolver = resolver_for(dns);
    dnsmasq.wait_serving(&resolver, &statefulset_host(0), &rt);

    let name = format!("{}:7000", statefulset_host(3));
    let err = rt.block_on(resolver.resolve(&name)).unwrap_err();
    assert!(matches!(err, DiscoveryError::Lookup { .. }), "{err}");

    let started = Instant::now();
    let resolved = rt.block_on(async {
        let wait = resolver.resolve_until(
            &name,
            Duration::from_millis(100),
            tokio::time::sleep(Duration::from_secs(15)),
        );
        let appear = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            // Written aside, then renamed in: dnsmasq never reads a half-written file.
            let tmp = dir.path().join("pbft-3.tmp");
            std::fs::write(&tmp, format!("127.0.0.4 {}\n", statefulset_host(3)))
                .expect("write hosts");
            std::fs::rename(&tmp, hosts.join("pbft-3")).expect("rename hosts");
        };
        let (r, ()) = tokio::join!(wait, appear);
        r
    });
    let resolved = resolved.unwrap_or_else(|e| panic!("{e}\n{}", dnsmasq.log()));
    assert_eq!(resolved, "127.0.0.4:7000".parse().expect("addr"));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    println!("name resolved {took:?} after the first attempt (appeared at 500 ms)");
}

mod grpc {
    #[test]
    fn statefulset_peers_found_once_dns_answers() {
        super::statefulset_peers_found_once_dns_answers("grpc");
    }
}

mod tcp {
    #[test]
    fn statefulset_peers_found_once_dns_answers() {
        super::statefulset_peers_found_once_dns_answers("tcp");
    }
}
