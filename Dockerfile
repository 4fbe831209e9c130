# syntax=docker/dockerfile:1
#
# Ambit's node image: ambit-agent, ambitctl, the ambit-cni plugin and ambit-cni-install, the
# script the DaemonSet's init container runs (deploy/daemonset/). Build from the repository root:
#
#   docker build -t ambit:latest .
#
# The build stage installs what `cargo xtask setup` installs for a build (xtask/src/setup.rs):
# nightly rust-src and bpf-linker against LLVM 22 for the eBPF programs, which agent/build.rs
# compiles and embeds, and protoc with the well-known .proto files for ambit-proto.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
# bpf-linker's version; it is built against LLVM 22 (--features llvm-22).
ARG BPF_LINKER_VERSION=0.13.0

# LLVM 22 comes from bookworm-security, as on the development machines.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      llvm-22-dev libpolly-22-dev zlib1g-dev libzstd-dev \
      protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*

# aya-build compiles ebpf/ambit-ebpf with `rustup run nightly`, for the bpf target (build-std).
RUN rustup toolchain install nightly --profile minimal --component rust-src

RUN PATH="/usr/lib/llvm-22/bin:$PATH" cargo install bpf-linker \
      --version "${BPF_LINKER_VERSION}" --no-default-features --features llvm-22 \
 && bpf-linker --version

WORKDIR /src
COPY . .
# The registry and the target dir are cache mounts (BuildKit): a rebuild after a source change
# recompiles only what changed. The binaries are copied out of the cached target dir.
RUN --mount=type=cache,id=ambit-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=ambit-target,target=/src/target \
    cargo build --release --locked -p ambit-agent \
      --bin ambit-agent --bin ambitctl --bin ambit-cni \
 && mkdir -p /out \
 && cp target/release/ambit-agent target/release/ambitctl target/release/ambit-cni /out/

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates: TLS roots for anything not pinned to the mesh roots; jq: ambit-cni-install.
# sh, coreutils and mount (the bpffs init container) are part of the base image.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates jq \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ambit-agent /out/ambitctl /out/ambit-cni /usr/local/bin/
COPY --chmod=0755 deploy/daemonset/ambit-cni-install /usr/local/bin/ambit-cni-install
# Root: the agent needs its capabilities as uid 0 (deploy/daemonset/daemonset.yaml adds them).
USER 0:0
CMD ["ambit-agent", "run", "--config", "/etc/ambit/config.yaml", "--log-format", "json"]
