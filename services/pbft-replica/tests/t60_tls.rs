//! TLS on the gRPC transport: four replicas with certificates from a throwaway CA talk to
//! each other and to TLS clients; a plaintext client gets nothing, and a client that does not
//! trust the CA gets nothing either.

mod common;

use std::time::Duration;

use common::{Cluster, Options, TestCa, client_secret};
use pbft_client::{Client, ClientError, ClientOptions, ClientTls};

#[test]
fn replicas_and_clients_speak_tls() {
    let c = Cluster::start_with(
        "grpc",
        Options {
            tls: true,
            ..Options::default()
        },
    );
    c.wait_all_ready();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = rt.block_on(c.client(0));
    rt.block_on(async {
        for i in 0..20 {
            let key = format!("tls-{i}");
            client
                .put(key.as_bytes(), b"sealed")
                .await
                .unwrap_or_else(|e| panic!("put {key} over TLS: {e}"));
        }
    });
    c.wait_agree(&[0, 1, 2, 3], 20, Duration::from_secs(20));

    let stranger = |tls: Option<ClientTls>| {
        rt.block_on(async {
            let client = Client::connect(ClientOptions {
                replicas: c.client_addrs.iter().map(|a| a.to_string()).collect(),
                client_id: 1,
                secret: client_secret(1),
                timeout: Duration::from_secs(2),
                tls,
                ..ClientOptions::default()
            })
            .await
            .expect("client options");
            client.put(b"tls-stranger", b"x").await
        })
    };
    // Plaintext HTTP/2 against a TLS listener: no replica answers.
    let plain = stranger(None);
    assert!(
        matches!(plain, Err(ClientError::Timeout { answered: 0, .. })),
        "a plaintext client must not get through: {plain:?}"
    );
    // TLS, but trusting another CA: the replicas' certificates do not verify.
    let other_ca = TestCa::new();
    let untrusted = stranger(Some(ClientTls {
        ca_pem: other_ca.ca_pem.into_bytes(),
        server_name: Some(common::TLS_NAME.to_string()),
    }));
    assert!(
        matches!(untrusted, Err(ClientError::Timeout { answered: 0, .. })),
        "a client that does not trust the CA must not get through: {untrusted:?}"
    );
    let got = rt
        .block_on(client.get(b"tls-stranger"))
        .expect("get over TLS");
    assert_eq!(got, None, "neither stranger's write was executed");
}
