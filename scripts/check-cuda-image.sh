#!/usr/bin/env bash
# Offline check of docker/Dockerfile.cuda as far as it goes without its bases: nvidia/cuda:13.x,
# python:3.11-slim-bookworm and rust:* cannot be pulled here. Run after scripts/build-image.sh
# (same base image, same podman settings). What it does, for real:
#   1. a stand-in for python:3.11-slim-bookworm from Debian packages (bookworm's python3 is 3.11);
#   2. the `ort-download` stage of docker/Dockerfile and of docker/Dockerfile.cuda with that stand-in:
#      docker/fetch-ort-gpu.sh downloads onnxruntime-gpu from PyPI inside the build and the stage's own
#      `test -f` passes (TENSORRT_SPEC= : TensorRT wheels come from pypi.nvidia.com, not reachable here);
#   3. the binary with the GPU image's cargo features, built on the host, plus that stage's libraries,
#      staged in .image-build/dist-cuda for the `prebuilt` stage;
#   4. the runtime stage on a STAND-IN base (CUDA_IMAGE=the Debian base: no CUDA, no cuDNN): layout,
#      user and entrypoint as in the real image; the GPU ONNX Runtime build scores on its CPU provider,
#      and provider=cuda with require_gpu=true fails at start-up (no CUDA libraries) instead of falling
#      back. Not verified here: the nvidia/cuda base, CUDA/cuDNN/TensorRT at run time, a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${DCAM_BASE_IMAGE:-localhost/dcam-base:bookworm}
WORK=${DCAM_IMAGE_WORK:-/var/tmp/dcam-image}   # Debian CA bundle made by scripts/build-image.sh
PYTHON_STANDIN=localhost/dcam-check-python:3.11-bookworm
STANDIN_IMAGE=localhost/dcam-stream:cuda-standin-base
DIST=.image-build/dist-cuda
ORT_VERSION=$(sed -n 's/^VERSION=\${ORT_VERSION:-\([0-9.]*\)}$/\1/p' scripts/fetch-ort.sh)
PODMAN=(podman --runtime "${DCAM_PODMAN_RUNTIME:-runc}")     # see scripts/build-image.sh for why
LIMITS=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=4096:4096)
log() { echo "== check-cuda-image: $*"; }

podman image exists "$BASE" || { echo "no $BASE: run scripts/build-image.sh first" >&2; exit 1; }

# ---- 1. python stand-in (network: apt inside the build) -----------------------------------------
if ! podman image exists "$PYTHON_STANDIN"; then
  log "stand-in for python:3.11-slim-bookworm: $BASE + Debian python3/pip"
  "${PODMAN[@]}" build --pull=never --network=host "${LIMITS[@]}" -t "$PYTHON_STANDIN" -f - . <<EOF
FROM $BASE
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/*
EOF
fi

# ---- 2. the ONNX Runtime stages, downloading from PyPI inside the build -------------------------
# The host's CA bundle is mounted into these throwaway build containers only, so pip trusts whatever
# TLS-intercepting proxy the host trusts; nothing from these stages but libonnxruntime* ships.
for f in Dockerfile Dockerfile.cuda; do
  tag=$([ "$f" = Dockerfile ] && echo cpu || echo cuda)
  log "docker/$f --target ort-download (PYTHON_IMAGE=$PYTHON_STANDIN)"
  "${PODMAN[@]}" build --pull=never --network=host "${LIMITS[@]}" -f "docker/$f" --target ort-download \
    -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
    --build-arg PYTHON_IMAGE="$PYTHON_STANDIN" --build-arg TENSORRT_SPEC= -t "localhost/dcam-check-ort:$tag" .
done
cpu_lib=$("${PODMAN[@]}" run --rm "${LIMITS[@]}" localhost/dcam-check-ort:cpu sha256sum "/src/.ort/libonnxruntime.so.$ORT_VERSION" | cut -d' ' -f1)
[ "$cpu_lib" = "$(sha256sum ".ort/libonnxruntime.so.$ORT_VERSION" | cut -d' ' -f1)" ] \
  || { echo "docker/Dockerfile ort-download stage gave a different libonnxruntime than scripts/fetch-ort.sh" >&2; exit 1; }
log "docker/Dockerfile ort-download: libonnxruntime.so.$ORT_VERSION identical to the host's .ort/ (prebuilt) copy"

# ---- 3. staged files for the prebuilt stage -------------------------------------------------------
log "cargo build --release --locked --features cuda,tensorrt (the GPU image's CARGO_FEATURES)"
scripts/build-tools.sh
cargo build --release --locked --features cuda,tensorrt
rm -rf "$DIST"
mkdir -p "$DIST/ort-gpu"
strip --strip-debug -o "$DIST/dcam-stream" target/release/dcam-stream   # as the Dockerfile's build stage
cp "$WORK/ca-certificates.crt" "$DIST/ca-certificates.crt"
cid=$(podman create "${LIMITS[@]}" localhost/dcam-check-ort:cuda)
podman cp "$cid:/src/.ort-gpu/." "$DIST/ort-gpu/"
podman rm "$cid" >/dev/null
# Put the CPU image's binary back in target/release (scripts/build-image.sh stages it from there).
cargo build --release --locked
ls -l "$DIST/ort-gpu"

# ---- 4. runtime stage on the stand-in base ----------------------------------------------------------
log "docker/Dockerfile.cuda runtime stage with CUDA_IMAGE=$BASE (stand-in: no CUDA libraries)"
"${PODMAN[@]}" build --pull=never --network=none "${LIMITS[@]}" -f docker/Dockerfile.cuda \
  --build-arg CUDA_IMAGE="$BASE" --build-arg BINARY_SOURCE=prebuilt --build-arg ORT_SOURCE=prebuilt \
  -t "$STANDIN_IMAGE" .
podman image inspect --format 'user={{.Config.User}} entrypoint={{.Config.Entrypoint}} cmd={{.Config.Cmd}} size={{.Size}}' "$STANDIN_IMAGE"
run=("${PODMAN[@]}" run --rm --network=none "${LIMITS[@]}" --read-only --read-only-tmpfs=false --tmpfs /tmp
     --cap-drop=ALL --security-opt=no-new-privileges)
log "model inspect"
"${run[@]}" "$STANDIN_IMAGE" model inspect /opt/dcam/models/dcam.onnx | sed -n 1,6p   # sed reads it all (no SIGPIPE)
img=$(find "${DCAM_DATASET:-../shared/datasets}/magnetic_tile/test" -name '*.jpg' | sort | head -1)
log "score on the GPU ONNX Runtime build's CPU provider: $img"
"${run[@]}" -v "$(realpath "$img"):/in/image.jpg:ro" "$STANDIN_IMAGE" score /in/image.jpg
log "provider=cuda, require_gpu=true: must refuse to start without CUDA"
set +e
out=$("${run[@]}" -e DCAM__ENGINE__PROVIDER=cuda -e DCAM__ENGINE__REQUIRE_GPU=true \
      -v "$(realpath "$img"):/in/image.jpg:ro" "$STANDIN_IMAGE" score /in/image.jpg 2>&1)
rc=$?
set -e
echo "$out" | tail -5
[ $rc -ne 0 ] || { echo "provider=cuda with require_gpu=true ran without a GPU" >&2; exit 1; }
log "OK (exit $rc as expected). Not verified: nvidia/cuda base, CUDA/cuDNN/TensorRT libraries, a GPU."
