# The websocket image. Build from the repository root, as Copilot does
# (copilot/websocket/manifest.yml):
#   docker build -f docker/websocket.Dockerfile .
# For Graviton, or both at once (a multi-platform image):
#   docker buildx build --platform linux/arm64 -f docker/websocket.Dockerfile .
#   docker buildx build --platform linux/amd64,linux/arm64 -f docker/websocket.Dockerfile .

# --- build ---------------------------------------------------------------------
# The toolchain named by rust-version in Cargo.toml, on Debian 13 (trixie), which is
# also what the runtime image is built from, so the binary links against the glibc it
# runs on.
# Docker's official rust image, pulled through its ECR Public mirror: CI, CodeBuild
# and Copilot's local builds pull it without Docker Hub's anonymous rate limit.
# The build stages run on the builder's own platform ($BUILDPLATFORM) whatever the
# image's platform: an arm64 image built on an x86_64 machine (or the reverse) is
# cross-compiled at native speed with Debian's cross linker (docker/cross.sh),
# instead of running the whole compiler under QEMU emulation.
FROM --platform=$BUILDPLATFORM public.ecr.aws/docker/library/rust:1.95-slim-trixie AS chef
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
# The image's platform (docker build --platform, Copilot's `platform`), and the
# builder's, from BuildKit. cross.sh maps TARGETARCH to a Rust target, installs make
# (jemalloc, the websocket's allocator, builds with it; the rust image has none) and,
# when the two platforms differ, the cross linker, and adds the target's standard
# library.
ARG BUILDARCH
ARG TARGETARCH
COPY docker/cross.sh /usr/local/bin/cross.sh
RUN cross.sh setup
# The linker and C compiler for each target, by the names Debian gives them: the
# cross packages for the other architecture, gcc itself for the builder's own.
# (The AWS SDK's TLS library, aws-lc-sys, compiles C for the target.)
ENV CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER=x86_64-linux-gnu-gcc \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CC_x86_64_unknown_linux_gnu=x86_64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
    AR_x86_64_unknown_linux_gnu=x86_64-linux-gnu-ar \
    AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
# Compile every dependency of the websocket package in a layer of its own. Docker
# reuses this layer (locally, or from a registry cache with --cache-from) as long as
# recipe.json and the platform are unchanged: a change to the project's code
# rebuilds only the project's crates, not the few hundred dependencies (about 5
# minutes on 2 cores).
COPY --from=plan /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --target "$(cross.sh target)" -p websocket --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --target "$(cross.sh target)" -p websocket \
    && install -D -m 0755 "target/$(cross.sh target)/release/websocket" /out/websocket

# --- run -----------------------------------------------------------------------
# Google's distroless image for Debian 13 (gcr.io sets no pull rate limit, and ECR
# Public has no official copy of it; distroless stops patching its Debian 12 images
# in September 2026): glibc, libgcc and CA certificates, no shell, no package
# manager, no curl; runs as uid 65532. The page is compiled into the binary.
FROM gcr.io/distroless/cc-debian13:nonroot
COPY --from=build /out/websocket /usr/local/bin/websocket
USER 65532:65532
# PORT's default; the ALB forwards to it (image.port in the manifest).
EXPOSE 3000
# For `docker run`: the binary asks its own /healthz, so the image needs no curl.
# ECS ignores this instruction: the task definition carries the same check
# (image.healthcheck in copilot/websocket/manifest.yml, HealthCheck in the template).
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/websocket", "healthcheck"]
# ECS sends SIGTERM to PID 1: the server itself, which says goodbye to its clients.
ENTRYPOINT ["/usr/local/bin/websocket"]
