# syntax=docker/dockerfile:1
# The websocket image. Build from the repository root, as Copilot does
# (copilot/websocket/manifest.yml):
#   docker build -f docker/websocket.Dockerfile .

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
# Compile every dependency of the websocket package in a layer of its own. Docker
# reuses this layer (locally, or from a registry cache with --cache-from) as long as
# recipe.json is unchanged: a change to the project's code rebuilds only the
# project's crates, not the few hundred dependencies (about 5 minutes on 2 cores).
COPY --from=plan /src/recipe.json recipe.json
RUN cargo chef cook --release --locked -p websocket --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked -p websocket \
    && install -D -m 0755 target/release/websocket /out/websocket

# --- run -----------------------------------------------------------------------
# Google's distroless image (gcr.io sets no pull rate limit, and ECR Public has no
# official copy of it): glibc, libgcc and CA certificates, no shell, no package
# manager, no curl; runs as uid 65532. The page is compiled into the binary.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/websocket /usr/local/bin/websocket
USER 65532:65532
# PORT's default; the ALB forwards to it (image.port in the manifest).
EXPOSE 3000
# For `docker run`: the binary asks its own /healthz, so the image needs no curl.
# ECS ignores this instruction; there the ALB checks /healthz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/websocket", "healthcheck"]
# ECS sends SIGTERM to PID 1: the server itself, which says goodbye to its clients.
ENTRYPOINT ["/usr/local/bin/websocket"]
