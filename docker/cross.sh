#!/bin/sh
# The build stage of both Dockerfiles runs on the builder's own platform and
# compiles for the image's: this script turns BuildKit's TARGETARCH into a Rust
# target, and sets up what compiling and linking for it needs.
#
#   cross.sh target     the Rust target for TARGETARCH
#   cross.sh packages   the Debian packages the build needs on top of the rust image:
#                       make, which jemalloc (the websocket's allocator) builds
#                       with, and, from another BUILDARCH, the cross compiler and
#                       the target's C library
#   cross.sh setup      installs those packages and the target's standard library
#
# TARGETARCH and BUILDARCH are BuildKit's (amd64, arm64); without BUILDARCH the
# build stage's own architecture is used. The Dockerfiles name the linkers the
# packages provide (x86_64-linux-gnu-gcc, aarch64-linux-gnu-gcc); on its own
# architecture Debian's gcc provides the same name.
set -eu

case "${TARGETARCH:-}" in
  amd64) target=x86_64-unknown-linux-gnu gcc=gcc-x86-64-linux-gnu libc=libc6-dev-amd64-cross ;;
  arm64) target=aarch64-unknown-linux-gnu gcc=gcc-aarch64-linux-gnu libc=libc6-dev-arm64-cross ;;
  *)
    echo "cross.sh: TARGETARCH is '${TARGETARCH:-}'; the images are built for amd64 or arm64 (docker build --platform linux/amd64 or linux/arm64)" >&2
    exit 1
    ;;
esac

packages() {
  build=${BUILDARCH:-$(dpkg --print-architecture)}
  if [ "$build" = "$TARGETARCH" ]; then
    echo "make"
  else
    echo "make $gcc $libc"
  fi
}

case "${1:-}" in
  target)
    echo "$target"
    ;;
  packages)
    packages
    ;;
  setup)
    needed=$(packages)
    if [ -n "$needed" ]; then
      apt-get update
      # Word splitting is wanted: one name per package.
      # shellcheck disable=SC2086
      apt-get install -y --no-install-recommends $needed
      rm -rf /var/lib/apt/lists/*
    fi
    rustup target add "$target"
    ;;
  *)
    echo "usage: cross.sh target|packages|setup" >&2
    exit 2
    ;;
esac
