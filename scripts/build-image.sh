#!/usr/bin/env bash
# Builds the CPU image from docker/Dockerfile with no registry and no Docker daemon (rootful podman):
#   1. installs podman/buildah/skopeo/debootstrap (+ kcat for the image tests) from Debian if missing;
#   2. creates the base image from Debian packages: debootstrap a minimal bookworm rootfs, slim it
#      like debian:bookworm-slim, `podman import` it as $DCAM_BASE_IMAGE;
#   3. builds the release binary on the host (same glibc 2.36 as the base) and stages it, the ONNX
#      Runtime library from scripts/fetch-ort.sh and Debian's CA bundle in .image-build/dist;
#   4. `podman build` of the unchanged docker/Dockerfile with the offline build arguments
#      (RUNTIME_IMAGE=<base>, BINARY_SOURCE=prebuilt, ORT_SOURCE=prebuilt), tagged as the chart's
#      default image (values.yaml image.repository : Chart.yaml appVersion).
# Idempotent: an existing base image is reused (DCAM_REBUILD_BASE=1 rebuilds it) and podman's layer
# cache makes a second build cheap. Online, on a normal machine, the same Dockerfile builds with
#   docker build -f docker/Dockerfile -t dcam-stream:0.1.0 .
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${DCAM_BASE_IMAGE:-localhost/dcam-base:bookworm}
WORK=${DCAM_IMAGE_WORK:-/var/tmp/dcam-image}   # debootstrap tree: outside the repo and the build context
DIST=.image-build/dist                         # staged artifacts, the only part of .image-build in the context
ORT_VERSION=$(sed -n 's/^VERSION=\${ORT_VERSION:-\([0-9.]*\)}$/\1/p' scripts/fetch-ort.sh)
APP_VERSION=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' helm/dcam-stream/Chart.yaml)
REPOSITORY=$(awk '/^image:/{f=1} f && /^  repository:/{print $2; exit}' helm/dcam-stream/values.yaml)
IMAGE=${DCAM_IMAGE:-$REPOSITORY:$APP_VERSION}

log() { echo "== build-image: $*"; }

# Podman's defaults fail on VMs like this one (root without CAP_SYS_RESOURCE, cgroup v1 + a cgroup2
# "unified" mount holding the hugetlb controller):
#  - rootful podman sets RLIMIT_NOFILE=1048576 / RLIMIT_NPROC=4194304 in every container:
#    "crun: setrlimit `RLIMIT_NOFILE`: Operation not permitted" -> explicit limits under ours;
#  - crun refuses hybrid cgroups: "crun: cgroups in hybrid mode not supported, drop all controllers
#    from cgroupv2" -> runc (Debian's runc handles hybrid, v1 and v2 hosts).
# The image tests (tests/deploy/test_deploy_image.py) run containers with the same settings.
PODMAN=(podman --runtime "${DCAM_PODMAN_RUNTIME:-runc}")
LIMITS=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=4096:4096)
started=$(date +%s)

# Rootful podman: the tests run containers with the image's own uid on host-owned volumes.
if [ "$(id -u)" != 0 ]; then
  echo "build-image.sh: run as root (rootful podman, apt-get, debootstrap)" >&2
  exit 1
fi

# ---- 1. tools from Debian (kcat: the image tests read scores back with it) ----------------------
need=()
for pair in podman:podman buildah:buildah skopeo:skopeo debootstrap:debootstrap kcat:kcat runc:runc; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# ---- 2. base image from Debian packages --------------------------------------------------------
if [ "${DCAM_REBUILD_BASE:-0}" = 1 ] || ! podman image exists "$BASE"; then
  # The Debian mirror apt already uses (deb822 or one-line sources), so a proxy/snapshot setup carries over.
  mirror=${DEBIAN_MIRROR:-$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit} /^deb / && $3 ~ /debian\/?$/ {print $3; exit}' || true)}
  mirror=${mirror:-http://deb.debian.org/debian}
  log "debootstrap bookworm (minbase) from $mirror into $WORK/rootfs"
  rm -rf "$WORK/rootfs"
  mkdir -p "$WORK"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" "$mirror" > "$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
  # Slim it the way debian:*-slim is: no docs, man pages, locales or package lists/caches.
  r="$WORK/rootfs"
  rm -rf "$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/info/* "$r"/usr/share/locale/* \
         "$r"/usr/share/lintian "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin \
         "$r"/var/cache/apt/archives/*.deb "$r"/var/cache/debconf/*-old "$r"/var/log/* "$r"/tmp/* \
         "$r"/root/.bash_history
  # debootstrap copies the host's resolv.conf and hostname; an image must not carry them.
  : > "$r/etc/resolv.conf"
  echo localhost > "$r/etc/hostname"
  podman image rm -f "$BASE" >/dev/null 2>&1 || true
  tar --numeric-owner -C "$r" -c . \
    | podman import --change 'CMD ["bash"]' --message "debootstrap --variant=minbase bookworm $mirror" - "$BASE" >/dev/null
  rm -rf "$r"
fi
log "base $BASE: $(podman image inspect --format '{{.Size}}' "$BASE" | awk '{printf "%.1f MB", $1/1e6}')"

# Debian's CA bundle for the image (the online build copies the rust:*-bookworm one). Not the host's:
# a host may trust extra local CAs (this VM trusts its TLS-intercepting egress proxy's), which must
# never ship. Generated by Debian's ca-certificates package in a throwaway container of the base.
if [ "${DCAM_REBUILD_BASE:-0}" = 1 ] || [ ! -s "$WORK/ca-certificates.crt" ]; then
  log "Debian CA bundle (ca-certificates in a container of $BASE)"
  mkdir -p "$WORK"
  "${PODMAN[@]}" run --rm --network=host "${LIMITS[@]}" "$BASE" sh -c \
    'apt-get update -qq && apt-get install -y -qq --no-install-recommends ca-certificates >/dev/null 2>&1 \
     && cat /etc/ssl/certs/ca-certificates.crt' > "$WORK/ca-certificates.crt.tmp"
  mv "$WORK/ca-certificates.crt.tmp" "$WORK/ca-certificates.crt"
fi

# ---- 3. host-built artifacts -------------------------------------------------------------------
# The base is bookworm (glibc 2.36): a binary linked against a newer host glibc would not start there.
glibc=$(getconf GNU_LIBC_VERSION | awk '{print $2}')
if [ "$(printf '%s\n2.36\n' "$glibc" | sort -V | tail -1)" != 2.36 ]; then
  echo "build-image.sh: host glibc $glibc is newer than bookworm's 2.36; build the binary on bookworm" >&2
  exit 1
fi
log "release binary (cargo build --release --locked) and ONNX Runtime $ORT_VERSION"
scripts/fetch-ort.sh
scripts/build-tools.sh
cargo build --release --locked
mkdir -p "$DIST"
# Without debug info, as the Dockerfile's build stage does (146 -> 30 MB; symbols stay).
strip --strip-debug -o "$DIST/dcam-stream" target/release/dcam-stream
cp ".ort/libonnxruntime.so.$ORT_VERSION" "$DIST/"
cp "$WORK/ca-certificates.crt" "$DIST/ca-certificates.crt"

# ---- 4. the image ------------------------------------------------------------------------------
log "podman build -f docker/Dockerfile -> $IMAGE"
build_started=$(date +%s)
# --pull=never: the base is local and nothing else may be fetched; --network=none proves it.
"${PODMAN[@]}" build --pull=never --network=none "${LIMITS[@]}" -f docker/Dockerfile \
  --build-arg RUNTIME_IMAGE="$BASE" --build-arg BINARY_SOURCE=prebuilt --build-arg ORT_SOURCE=prebuilt \
  --build-arg ORT_VERSION="$ORT_VERSION" \
  --label org.opencontainers.image.version="$APP_VERSION" \
  -t "$IMAGE" .
now=$(date +%s)
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
log "built $IMAGE: $(awk -v s="$size" 'BEGIN{printf "%.1f MB", s/1e6}') (podman build $((now - build_started)) s, whole script $((now - started)) s)"
# Drop this image's superseded builds (untagged by the new one); other images are left alone.
podman image prune -f --filter label=org.opencontainers.image.title=dcam-stream >/dev/null
