#!/usr/bin/env bash
# Builds local stand-ins for the base images the Dockerfiles name, from Debian's own
# packages, and tags each with the name the Dockerfile uses, so that
# `podman build --pull=never` builds the real Dockerfiles on a machine that cannot
# reach gcr.io or ECR Public (the end-to-end tests, tests/tests/e2e/images/).
#
#   docker/stand-in-bases.sh runtime   gcr.io/distroless/cc-debian13:nonroot
#
# Only the runtime base: the tests build each Dockerfile's runtime stage, with the
# binary from the workspace's release build in place of the builder stage (whose
# rust image would need a Rust toolchain downloaded into it; see BENCHMARKS.md,
# "Images").
# Each stand-in is rebuilt only when this script changes (the image carries the
# script's hash as a label). Needs root, mmdebstrap and podman (scripts/setup).
#
# The runtime stand-in is made the way distroless makes cc-debian13 (its
# static/static.bzl, base/config.bzl, cc/config.bzl and common/BUILD.bazel): the
# data of exactly these Debian 13 packages, unpacked without their maintainer
# scripts, so no shell, no package manager and no dpkg database; /etc/passwd and
# /etc/group with root, nobody and nonroot (65532); /tmp with mode 1777;
# /home/nonroot owned by 65532; the CA bundle in /etc/ssl/certs/ca-certificates.crt;
# USER 65532, WORKDIR /home/nonroot, PATH and SSL_CERT_FILE as distroless sets them.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME_TAG=gcr.io/distroless/cc-debian13:nonroot
# static: base-files netbase tzdata media-types; base: libc6 libssl3t64 libzstd1
# zlib1g; cc: libgomp1 libstdc++6 libgcc-s1 gcc-14-base; the CA bundle comes from
# ca-certificates' data.
RUNTIME_PACKAGES=(base-files netbase tzdata media-types libc6 libssl3t64 libzstd1 zlib1g
  libgomp1 libstdc++6 libgcc-s1 gcc-14-base ca-certificates)
NONROOT=65532
SUITE=trixie
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

log() { printf 'stand-in-bases: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

arch=${ARCH:-$(dpkg --print-architecture)}
hash=$(sha256sum "$0" | cut -c1-16)-$arch

podman_() { podman --runtime runc --cgroup-manager cgroupfs "$@"; }

current() {
  [[ $(podman_ image inspect --format '{{index .Labels "stand-in"}}' "$1" 2>/dev/null) == "$hash" ]]
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

runtime() {
  if current "$RUNTIME_TAG"; then log "$RUNTIME_TAG is current"; return; fi
  log "building $RUNTIME_TAG from Debian $SUITE ($arch)"
  local include
  include=$(IFS=,; echo "${RUNTIME_PACKAGES[*]}")
  # mmdebstrap resolves and downloads the packages (and their dependencies, which
  # are left out below) and keeps the .debs.
  mmdebstrap --quiet --variant=extract --architectures="$arch" --include="$include" \
    --skip=cleanup/apt/cache "$SUITE" "$work/fetch" "$MIRROR"
  local tree=$work/tree deb
  mkdir -p "$tree"
  for p in "${RUNTIME_PACKAGES[@]}"; do
    deb=$(find "$work/fetch/var/cache/apt/archives" -name "${p}_*.deb" | head -n1)
    [[ -n $deb ]] || die "no .deb for $p"
    dpkg-deb --extract "$deb" "$tree"
  done
  # The CA bundle, as update-ca-certificates would write it; the sources go.
  mkdir -p "$tree/etc/ssl/certs"
  find "$tree/usr/share/ca-certificates" -name '*.crt' -print0 | sort -z |
    xargs -0 cat > "$tree/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$tree/usr/share/ca-certificates" "$tree/usr/sbin/update-ca-certificates" \
    "$tree/etc/ca-certificates" "$tree/etc/ca-certificates.conf"
  cat > "$tree/etc/passwd" <<EOF
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:$NONROOT:$NONROOT:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat > "$tree/etc/group" <<EOF
root:x:0:
nobody:x:65534:
tty:x:5:
staff:x:50:
nonroot:x:$NONROOT:
EOF
  printf 'hosts: files dns\nnetworks: files\n' > "$tree/etc/nsswitch.conf"
  install -d -m 1777 "$tree/tmp"
  install -d -m 0700 "$tree/root"
  install -d -m 0755 "$tree/home"
  install -d -m 0700 -o "$NONROOT" -g "$NONROOT" "$tree/home/nonroot"
  tar --numeric-owner -C "$tree" -cf "$work/rootfs.tar" .
  podman_ import \
    --change "USER $NONROOT" \
    --change "WORKDIR /home/nonroot" \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" \
    --change "LABEL stand-in=$hash" \
    "$work/rootfs.tar" "$RUNTIME_TAG" >/dev/null
  log "tagged $RUNTIME_TAG"
}

case "${1:-}" in
  runtime) runtime ;;
  *) die "usage: docker/stand-in-bases.sh runtime" ;;
esac
