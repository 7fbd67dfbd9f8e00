#!/usr/bin/env bash
# Offline check of docker/Dockerfile's ONLINE path (the default: ort-download + rust build stages),
# with stand-ins for the public bases that cannot be pulled here. Run after scripts/build-image.sh:
#   python:3.11-slim-bookworm -> the Debian base + Debian's python3 (3.11) and pip;
#   rust:1.95-bookworm        -> the Debian base + Debian's C toolchain, with this host's rustc/cargo
#                                mounted at build time (Debian's rustc is too old);
#   debian:bookworm-slim      -> the debootstrapped base.
# Crates and the ONNX Runtime wheel are downloaded inside the build (crates.io, PyPI). The result is
# tagged $DCAM_CHECK_IMAGE; test it like the shipped image:
#   DCAM_IMAGE=localhost/dcam-check-online:cpu DCAM_IMAGE_TESTS=1 .venv/bin/python -m pytest -s tests/deploy/test_deploy_image.py
# Cold: a full release build inside the container (34 min on this 2-core VM at nice 19); buildah keeps
# the Dockerfile's cargo cache mounts, so a rerun is quick.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${DCAM_BASE_IMAGE:-localhost/dcam-base:bookworm}
PYTHON_STANDIN=localhost/dcam-check-python:3.11-bookworm
RUST_STANDIN=localhost/dcam-check-rust:1.95-bookworm
IMAGE=${DCAM_CHECK_IMAGE:-localhost/dcam-check-online:cpu}
TOOLCHAIN=$(dirname "$(dirname "$(readlink -f "$(rustup which rustc 2>/dev/null || command -v rustc)")")")
PODMAN=(podman --runtime "${DCAM_PODMAN_RUNTIME:-runc}")     # see scripts/build-image.sh for why
LIMITS=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=4096:4096)
log() { echo "== check-online-build: $*"; }

podman image exists "$BASE" || { echo "no $BASE: run scripts/build-image.sh first" >&2; exit 1; }
if ! podman image exists "$PYTHON_STANDIN"; then
  "${PODMAN[@]}" build --pull=never --network=host "${LIMITS[@]}" -t "$PYTHON_STANDIN" -f - . <<EOF
FROM $BASE
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/*
EOF
fi
if ! podman image exists "$RUST_STANDIN"; then
  "${PODMAN[@]}" build --pull=never --network=host "${LIMITS[@]}" -t "$RUST_STANDIN" -f - . <<EOF
FROM $BASE
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake nasm pkg-config zlib1g-dev \
      perl python3 curl ca-certificates && rm -rf /var/lib/apt/lists/*
ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/rust/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
EOF
fi

log "docker/Dockerfile, online stages, rustc $("$TOOLCHAIN/bin/rustc" --version | cut -d' ' -f2) from $TOOLCHAIN"
# buildah 1.28 needs the stage-selecting ARGs spelled out (it skips stages named only via defaults).
# The host CA bundle is mounted for RUN steps only (pip/cargo through a TLS-intercepting proxy); the
# image's bundle is the stand-in's Debian one, as tests/deploy/test_deploy_image.py checks.
nice -n 19 "${PODMAN[@]}" build --pull=never --network=host "${LIMITS[@]}" -f docker/Dockerfile \
  -v "$TOOLCHAIN:/usr/local/rust:ro" -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
  --build-arg BINARY_SOURCE=build --build-arg ORT_SOURCE=ort-download \
  --build-arg RUST_IMAGE="$RUST_STANDIN" --build-arg PYTHON_IMAGE="$PYTHON_STANDIN" --build-arg RUNTIME_IMAGE="$BASE" \
  -t "$IMAGE" .
log "built $IMAGE: $(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.1f MB", $1/1e6}')"
