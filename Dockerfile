# syntax=docker/dockerfile:1
#
# jetmq-broker and jetmq-ingestor in one image (compose/ picks the binary per service).
#
#   docker build -t jetmq:local .
#
# Build stage: rdkafka builds its bundled librdkafka (C, make; no cmake) against the system
# OpenSSL and zlib, so the build needs a C toolchain and their headers.
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
# Unpinned on purpose: Debian stable only ships security fixes within a release, and exact
# versions would break the build each time one lands.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the target directory between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p jetmq-broker -p jetmq-ingestor \
 && install -D -m 0755 target/release/jetmq-broker /out/jetmq-broker \
 && install -D -m 0755 target/release/jetmq-ingestor /out/jetmq-ingestor

# Runtime: the broker links only libc; the ingestor also links libssl3 and zlib (librdkafka).
# curl is for the container healthchecks (GET /readyz).
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin jetmq \
 && install -d -o 10001 -g 10001 -m 0700 /etc/jetmq /etc/jetmq/auth
COPY --from=build /out/jetmq-broker /out/jetmq-ingestor /usr/local/bin/
USER 10001:10001
# MQTT and health/metrics (broker); health/metrics (ingestor).
EXPOSE 1883 8080 9464
STOPSIGNAL SIGTERM
CMD ["jetmq-broker", "--help"]
