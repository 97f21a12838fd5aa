# syntax=docker/dockerfile:1
# The websocket image. Build from the repository root, as Copilot does
# (copilot/websocket/manifest.yml):
#   docker build -f docker/websocket.Dockerfile .

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
    cargo build --release --locked -p websocket \
    && install -D -m 0755 target/release/websocket /out/websocket

# --- run -----------------------------------------------------------------------
# glibc, libgcc and CA certificates, no shell, no package manager, no curl; runs as
# uid 65532. The page is compiled into the binary.
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
