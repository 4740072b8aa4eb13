//! Generates the `pbft.v1` protobuf messages and gRPC services from `proto/pbft/v1`.
//!
//! The `.proto` files are parsed by `protox`, a pure-Rust compiler, so building
//! needs no system `protoc`; its descriptor set is handed to `tonic-prost-build`.

use std::path::PathBuf;

/// The files that make up the `pbft.v1` package, relative to the proto root.
const PROTOS: [&str; 3] = [
    "pbft/v1/types.proto",
    "pbft/v1/service.proto",
    "pbft/v1/client.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto");

    // A directory is scanned recursively, so any edit under proto/ regenerates.
    println!("cargo:rerun-if-changed={}", proto_root.display());

    let fds = protox::compile(PROTOS, [&proto_root])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
