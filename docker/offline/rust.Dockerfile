# A stand-in for the official rust:<version>-bookworm image, made from the host's toolchain for
# machines without a registry (docker/offline/images.sh). Only what docker/Dockerfile's build
# stage uses: cargo and rustc on PATH and a C compiler for ring. Crates come from the host's
# cargo cache (index and downloaded crates), with cargo offline: the build needs no network.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY toolchain /usr/local/rust
COPY registry /usr/local/cargo/registry
ENV CARGO_HOME=/usr/local/cargo \
    CARGO_NET_OFFLINE=true \
    PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
