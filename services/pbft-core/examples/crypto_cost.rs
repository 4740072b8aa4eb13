//! What one request's cryptography costs on this machine: signing, single verification
//! (ZIP215, of a replica message and of a client request), batched ZIP215
//! verification per signature, and SHA-256 per KiB. `make bench` runs it so that
//! docs/BENCHMARKS.md can set the measured throughput against the CPU that signatures alone
//! need: every request is signed once by its client and verified once by every replica.
//!
//! `cargo run --release -p pbft-core --example crypto_cost [-- --json FILE]`

use std::time::Instant;

use pbft_core::crypto::ClientSig;
use pbft_core::{ClientId, Ed25519Signer, KeyRing, Signature, Signer, Verifier};
use sha2::Digest as _;

/// Median nanoseconds per item of `rounds` timed runs of `f`, each doing `per_run` items.
fn median_ns(rounds: usize, per_run: usize, mut f: impl FnMut()) -> f64 {
    let mut samples: Vec<f64> = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_nanos() as f64 / per_run as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let json = std::env::args().skip_while(|a| a != "--json").nth(1);
    // 64 clients with 512-byte requests, as the benchmark's load clients send them.
    const CLIENTS: usize = 64;
    let keys: Vec<Ed25519Signer> = (0..CLIENTS)
        .map(|i| Ed25519Signer::from_secret([i as u8 + 1; 32]))
        .collect();
    let mut ring = KeyRing::new(&[keys[0].public()])?;
    for (i, k) in keys.iter().enumerate() {
        ring.add_client(ClientId(i as u64), k.public())?;
    }
    let msgs: Vec<Vec<u8>> = (0..CLIENTS).map(|i| vec![i as u8; 560]).collect();
    let sigs: Vec<Signature> = keys.iter().zip(&msgs).map(|(k, m)| k.sign(m)).collect();
    let items: Vec<ClientSig<'_>> = (0..CLIENTS)
        .map(|i| ClientSig {
            client: ClientId(i as u64),
            msg: &msgs[i],
            sig: &sigs[i],
        })
        .collect();

    let sign = median_ns(31, CLIENTS, || {
        for (k, m) in keys.iter().zip(&msgs) {
            std::hint::black_box(k.sign(m));
        }
    });
    let replica_sig = keys[0].sign(&msgs[0]);
    let verify_replica = median_ns(31, CLIENTS, || {
        for _ in 0..CLIENTS {
            assert!(ring.verify_replica(pbft_core::ReplicaId(0), &msgs[0], &replica_sig));
        }
    });
    let verify_single = median_ns(31, CLIENTS, || {
        for it in &items {
            assert!(ring.verify_client(it.client, it.msg, it.sig));
        }
    });
    let verify_batch = median_ns(31, CLIENTS, || {
        assert!(ring.verify_clients(&items).iter().all(|ok| *ok));
    });
    let block = vec![7u8; 1024];
    let sha256_kib = median_ns(31, 256, || {
        for _ in 0..256 {
            std::hint::black_box(sha2::Sha256::digest(&block));
        }
    });

    let us = |ns: f64| ns / 1000.0;
    println!("sign (client)                       {:7.1} us", us(sign));
    println!(
        "verify a replica message            {:7.1} us",
        us(verify_replica)
    );
    println!(
        "verify ZIP215, one at a time        {:7.1} us",
        us(verify_single)
    );
    println!(
        "verify ZIP215, batch of {CLIENTS}, per sig {:7.1} us",
        us(verify_batch)
    );
    println!(
        "sha-256 per KiB                     {:7.1} us",
        us(sha256_kib)
    );
    // One request at n = 4: signed once, verified (batched) by f+1 = 2 replicas, the primary
    // and the batch's designated voucher (replica/vouch.rs).
    let per_request = sign + 2.0 * verify_batch;
    println!(
        "signatures alone, n = 4: {:.0} us of CPU per request, so at most {:.0} requests/s on 2 cores",
        us(per_request),
        2e9 / per_request
    );
    if let Some(path) = json {
        let body = format!(
            "{{\"sign_us\": {:.2}, \"verify_replica_us\": {:.2}, \"verify_zip215_us\": {:.2}, \
             \"verify_zip215_batch64_us\": {:.2}, \"sha256_kib_us\": {:.2}}}\n",
            us(sign),
            us(verify_replica),
            us(verify_single),
            us(verify_batch),
            us(sha256_kib)
        );
        std::fs::write(path, body)?;
    }
    Ok(())
}
