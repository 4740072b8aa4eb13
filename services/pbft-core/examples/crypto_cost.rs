//! What one request's cryptography costs on this machine: signing a 512-byte request,
//! single verification (ZIP215, of a replica message and of a client request), batched
//! ZIP215 verification per signature at several batch sizes, and SHA-256 per KiB.
//! `make bench` runs it so that docs/BENCHMARKS.md can set the measured throughput against
//! the CPU that signatures alone need: every request is signed once by its client and
//! verified by f + 1 replicas (the primary and the batch's voucher).
//!
//! `cargo run --release -p pbft-core --example crypto_cost [-- --json FILE]`

use std::time::Instant;

use pbft_core::{ClientId, Ed25519Signer, KeyRing, Operation, Request, Signer, Verifier};
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

/// A benchmark-shaped operation: a short key and a 512-byte value.
fn put(i: usize) -> Operation {
    Operation::Put {
        key: format!("bench-{i}-0").into_bytes(),
        value: vec![i as u8; 512],
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let json = std::env::args().skip_while(|a| a != "--json").nth(1);
    // Up to 256 clients with 512-byte requests, as the benchmark's load clients send them.
    const CLIENTS: usize = 256;
    const BATCH: usize = 64;
    let keys: Vec<Ed25519Signer> = (0..CLIENTS)
        .map(|i| Ed25519Signer::from_secret([i as u8 + 1; 32]))
        .collect();
    let mut ring = KeyRing::new(&[keys[0].public()])?;
    for (i, k) in keys.iter().enumerate() {
        ring.add_client(ClientId(i as u64), k.public())?;
    }
    let requests: Vec<Request> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| Request::new_signed(ClientId(i as u64), 1, put(i), k))
        .collect();

    // Signing a request: its canonical encoding, the digest clients sign, and Ed25519.
    let sign = median_ns(31, BATCH, || {
        for (i, k) in keys.iter().enumerate().take(BATCH) {
            std::hint::black_box(Request::new_signed(ClientId(i as u64), 2, put(i), k));
        }
    });
    // A replica message: a signature over its (short) signing bytes.
    let replica_msg = vec![3u8; 80];
    let replica_sig = keys[0].sign(&replica_msg);
    let verify_replica = median_ns(31, BATCH, || {
        for _ in 0..BATCH {
            assert!(ring.verify_replica(pbft_core::ReplicaId(0), &replica_msg, &replica_sig));
        }
    });
    let verify_single = median_ns(31, BATCH, || {
        for r in requests.iter().take(BATCH) {
            assert!(r.verify(&ring));
        }
    });
    // Batched checks per signature, by batch size: the primary checks what arrived since its
    // last turn, the voucher a pre-prepare's requests.
    let batched = |n: usize| {
        let refs: Vec<&Request> = requests.iter().take(n).collect();
        median_ns(31, n, || {
            assert!(Request::verify_all(&refs, &ring).iter().all(|ok| *ok));
        })
    };
    let sweep: Vec<(usize, f64)> = [8, 16, 32, BATCH, 128, 256]
        .iter()
        .map(|&n| (n, batched(n)))
        .collect();
    let verify_batch = sweep
        .iter()
        .find(|(n, _)| *n == BATCH)
        .map_or(f64::NAN, |(_, ns)| *ns);
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
        "verify ZIP215, batch of {BATCH}, per sig {:7.1} us",
        us(verify_batch)
    );
    for (n, ns) in &sweep {
        println!("  in a batch of {n:3}, per sig          {:7.1} us", us(*ns));
    }
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
