# syntax=docker/dockerfile:1
# The queue-consumer image. Build from the repository root, as Copilot does
# (copilot/queue-consumer/manifest.yml):
#   docker build -f docker/queue-consumer.Dockerfile .

# --- build ---------------------------------------------------------------------
# The toolchain named by rust-version in Cargo.toml, on Debian 12, which is also what
# the runtime image is built from, so the binary links against the same glibc.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# The registry and target/ live in BuildKit caches, so a rebuild compiles only what
# changed; the binary is copied out because a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p queue-consumer \
    && install -D -m 0755 target/release/queue-consumer /out/queue-consumer

# --- run -----------------------------------------------------------------------
# glibc, libgcc and CA certificates (for TLS to SQS), no shell, no package manager;
# runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/queue-consumer /usr/local/bin/queue-consumer
USER 65532:65532
# ECS sends SIGTERM to PID 1: the worker itself, which drains before exiting.
ENTRYPOINT ["/usr/local/bin/queue-consumer"]
