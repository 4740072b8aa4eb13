# The pbft image: pbft-replica, pbft-controller and the pbft CLI on an empty root file system
# (glibc and the binaries' own libraries only; no shell), running as uid 65532.
#
# Normal build (compiles inside Docker):
#   docker build -t pbft:0.1.0 .
# From binaries already built on the host (what `make image` does; needs no Rust image):
#   docker build --target runtime-prebuilt --build-arg BASE_IMAGE=pbft-base:bookworm -t pbft:0.1.0 .
# The prebuilt stages come first on purpose: Docker's classic builder builds every stage
# before the target, so the Rust builder stage must not precede `runtime-prebuilt`.

ARG BASE_IMAGE=debian:bookworm-slim
ARG RUST_IMAGE=rust:1.95-slim-bookworm

# ---- tools to assemble the runtime root file system
FROM ${BASE_IMAGE} AS base
COPY deploy/docker/assemble-rootfs.sh /usr/local/sbin/assemble-rootfs

# ---- binaries built on the host and staged in build/docker-bin/ (`make image`)
FROM base AS rootfs-prebuilt
COPY build/docker-bin/ /staging/
RUN assemble-rootfs /staging /rootfs

FROM scratch AS runtime-prebuilt
COPY --from=rootfs-prebuilt /rootfs/ /
USER 65532:65532
WORKDIR /var/lib/pbft
ENV PBFT_DATA_DIR=/var/lib/pbft
# 7000 replica + gRPC client API, 7001 client API under the TCP transport, 8000 replica HTTP
# sidecar, 8080 controller HTTP.
EXPOSE 7000 7001 8000 8080
ENTRYPOINT ["/usr/local/bin/pbft-replica"]

# ---- the normal path: compile in a Rust builder, caching dependencies in their own layer
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# Manifests (and the protobuf build script) first, with stub targets: dependencies compile
# once into their own layer and stay cached while only our sources change.
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY services/pbft-api/Cargo.toml services/pbft-api/build.rs services/pbft-api/
COPY services/pbft-core/Cargo.toml services/pbft-core/
COPY services/pbft-sim/Cargo.toml services/pbft-sim/
COPY services/pbft-replica/Cargo.toml services/pbft-replica/
COPY services/pbft-client/Cargo.toml services/pbft-client/
COPY services/pbft-controller/Cargo.toml services/pbft-controller/
COPY proto proto
COPY deploy/docker/stub-targets.sh /usr/local/bin/stub-targets
RUN stub-targets . \
    && cargo build --release --locked -p pbft-replica -p pbft-client -p pbft-controller
COPY services services
# COPY keeps the context's timestamps, which can be older than the stubs: touch so cargo
# rebuilds our crates.
RUN find services -name '*.rs' -exec touch {} + \
    && cargo build --release --locked -p pbft-replica -p pbft-client -p pbft-controller \
    && mkdir -p /out \
    && cp target/release/pbft-replica target/release/pbft target/release/pbft-controller /out/

FROM base AS rootfs
COPY --from=builder /out/ /staging/
RUN assemble-rootfs /staging /rootfs

FROM scratch AS runtime
COPY --from=rootfs /rootfs/ /
USER 65532:65532
WORKDIR /var/lib/pbft
ENV PBFT_DATA_DIR=/var/lib/pbft
EXPOSE 7000 7001 8000 8080
ENTRYPOINT ["/usr/local/bin/pbft-replica"]
