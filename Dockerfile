# The bgjobs operator image: `docker build -t bgjobs:0.1.0 .` (the tag is the chart's appVersion; the chart's default
# image is bgjobs:<appVersion>). Multi-stage: a Rust builder, then a slim Debian runtime running as a non-root user.

# --- build ------------------------------------------------------------------------------------------------------------
# Cargo.toml's rust-version (1.89) or newer; bookworm, so the binary links against the runtime stage's glibc.
FROM rust:1.89-bookworm AS builder
WORKDIR /src
# Dependencies first, in their own layer: a change to src/ does not rebuild them. The workspace's dev-tool members
# (e2e/history, e2e/test-worker, e2e/bench, e2e/node-agent) and the integration tests (tests) are not built; cargo
# only needs their manifests, so they get empty sources.
COPY Cargo.toml Cargo.lock ./
COPY e2e/history/Cargo.toml e2e/history/
COPY e2e/test-worker/Cargo.toml e2e/test-worker/
COPY e2e/bench/Cargo.toml e2e/bench/
COPY e2e/node-agent/Cargo.toml e2e/node-agent/
COPY tests/Cargo.toml tests/
RUN mkdir -p src e2e/history/src e2e/test-worker/src e2e/bench/src e2e/node-agent/src && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs && touch e2e/history/src/lib.rs && echo 'fn main() {}' > e2e/history/src/main.rs \
    && echo 'fn main() {}' > e2e/test-worker/src/main.rs && echo 'fn main() {}' > e2e/bench/src/main.rs \
    && touch e2e/node-agent/src/lib.rs && echo 'fn main() {}' > e2e/node-agent/src/main.rs \
    && cargo build --release --locked --bin bgjobs \
    && rm -rf src target/release/.fingerprint/bgjobs-* target/release/deps/bgjobs-* target/release/deps/libbgjobs-*
COPY src ./src
RUN cargo build --release --locked --bin bgjobs && strip target/release/bgjobs

# --- run --------------------------------------------------------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 65532 bgjobs \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin bgjobs
COPY --from=builder /src/target/release/bgjobs /usr/local/bin/bgjobs
# Numeric, so Kubernetes can verify runAsNonRoot without reading /etc/passwd.
USER 65532:65532
# /metrics, /healthz, /readyz when started with --metrics-addr 0.0.0.0:8080 (the chart does).
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/bgjobs"]
CMD ["operator"]
LABEL org.opencontainers.image.title="bgjobs" \
      org.opencontainers.image.description="Kubernetes operator: BackgroundJob custom resources as a durable, parallel job queue" \
      org.opencontainers.image.licenses="Apache-2.0"
