# syntax=docker/dockerfile:1
# The queue-consumer image. Build from the repository root, as Copilot does
# (copilot/queue-consumer/manifest.yml):
#   docker build -f docker/queue-consumer.Dockerfile .

# --- build ---------------------------------------------------------------------
# The toolchain named by rust-version in Cargo.toml, on Debian 12, which is also what
# the runtime image is built from, so the binary links against the same glibc.
# Docker's official rust image, pulled through its ECR Public mirror: CI, CodeBuild
# and Copilot's local builds pull it without Docker Hub's anonymous rate limit.
FROM public.ecr.aws/docker/library/rust:1.95-slim-bookworm AS chef
# cargo-chef (crates.io) turns the workspace's manifests and lock file into a
# recipe, so the dependencies can be compiled before the project's sources exist.
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

# The recipe: every manifest and Cargo.lock, with the sources stripped out. It only
# changes when a dependency or a manifest does.
FROM chef AS plan
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
# Compile every dependency of the queue-consumer package in a layer of its own. Docker
# reuses this layer (locally, or from a registry cache with --cache-from) as long as
# recipe.json is unchanged: a change to the project's code rebuilds only the
# project's crates, not the few hundred dependencies (about 5 minutes on 2 cores).
COPY --from=plan /src/recipe.json recipe.json
RUN cargo chef cook --release --locked -p queue-consumer --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked -p queue-consumer \
    && install -D -m 0755 target/release/queue-consumer /out/queue-consumer

# --- run -----------------------------------------------------------------------
# Google's distroless image (gcr.io sets no pull rate limit, and ECR Public has no
# official copy of it): glibc, libgcc and CA certificates (for TLS to SQS), no
# shell, no package manager; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/queue-consumer /usr/local/bin/queue-consumer
USER 65532:65532
# ECS sends SIGTERM to PID 1: the worker itself, which drains before exiting.
ENTRYPOINT ["/usr/local/bin/queue-consumer"]
