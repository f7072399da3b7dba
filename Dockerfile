# The loopcsi node plugin image: the driver on a slim Debian with the tools it runs (blkid from
# util-linux; mkfs.ext4 and resize2fs from e2fsprogs; mkfs.xfs and xfs_growfs from xfsprogs).
#
#   docker build -t registry.example.com/storage/loopcsi:v0.1.0 .
#
# Needs BuildKit (the default builder since Docker 23; podman and buildah have it too) for the
# cache mounts. No protoc is installed: build.rs takes protoc from the protoc-bin-vendored crate.
# There is no HEALTHCHECK: Kubernetes probes the driver through the livenessprobe sidecar.

# The oldest Rust that builds Cargo.lock: at least Cargo.toml's rust-version and every locked
# dependency's (tests/manifests.rs checks both). The builder and the runtime use the same Debian
# release, so the binary runs against the glibc it was linked with.
ARG RUST_VERSION=1.89.0
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin loopcsi \
    && install -D -m 0755 target/release/loopcsi /out/loopcsi

FROM debian:${DEBIAN_RELEASE}-slim
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends e2fsprogs xfsprogs util-linux \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/loopcsi /usr/local/bin/loopcsi
ENTRYPOINT ["loopcsi"]
