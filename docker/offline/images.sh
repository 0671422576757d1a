#!/usr/bin/env bash
# Makes the base images docker/*/Dockerfile start FROM without pulling anything, for machines
# with a Docker engine but no registry (docker/test.sh runs it):
#   debian:bookworm-slim       debootstrap --variant=minbase bookworm, then docker import;
#   rust:<RUST_VERSION>-bookworm  that base, gcc, the host's Rust toolchain (rustc --print sysroot)
#                              and the host's cargo cache (the crates Cargo.lock names, so run a
#                              cargo build on the host first); cargo runs offline in it.
# An image already present is kept. With a registry none of this is needed: the same
# Dockerfiles pull the official images.
set -euo pipefail

RUST_VERSION=${RUST_VERSION:?RUST_VERSION (e.g. 1.95) must be set}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

if ! have_image debian:bookworm-slim; then
    echo "debian:bookworm-slim: debootstrap from $MIRROR"
    debootstrap --variant=minbase bookworm "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log"; exit 1; }
    # The same sources as the official image, and no apt cache kept in layers.
    rm -f "$work/rootfs/etc/apt/sources.list"
    cat >"$work/rootfs/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
    tar -C "$work/rootfs" -c . | docker import --change 'CMD ["bash"]' - debian:bookworm-slim >/dev/null
    rm -rf "$work/rootfs"
fi

if ! have_image "rust:$RUST_VERSION-bookworm"; then
    sysroot="$(rustc --print sysroot)"
    echo "rust:$RUST_VERSION-bookworm: debian:bookworm-slim with the toolchain in $sysroot"
    mkdir -p "$work/ctx/toolchain"
    # Hard links when /tmp shares the toolchain's file system, copies otherwise; no docs.
    if ! cp -al "$sysroot/bin" "$sysroot/lib" "$work/ctx/toolchain/" 2>/dev/null; then
        rm -rf "$work/ctx/toolchain" && mkdir "$work/ctx/toolchain"
        cp -a "$sysroot/bin" "$sysroot/lib" "$work/ctx/toolchain/"
    fi
    registry="${CARGO_HOME:-$HOME/.cargo}/registry"
    mkdir -p "$work/ctx/registry"
    cp -a "$registry/index" "$registry/cache" "$work/ctx/registry/"
    cp "$here/rust.Dockerfile" "$work/ctx/Dockerfile"
    DOCKER_BUILDKIT=0 docker build -q -t "rust:$RUST_VERSION-bookworm" "$work/ctx" >/dev/null
fi
