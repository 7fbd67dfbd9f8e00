#!/usr/bin/env bash
# Extracts ONNX Runtime's GPU build (core library + CUDA, TensorRT and shared provider libraries)
# from the PyPI onnxruntime-gpu wheel into DEST (default .ort-gpu), the GPU counterpart of
# scripts/fetch-ort.sh. Used by docker/Dockerfile.cuda; runs anywhere with python3 + pip.
#
#   docker/fetch-ort-gpu.sh [DEST]
#   ORT_VERSION=1.31.1        version of onnxruntime-gpu
#   ORT_GPU_WHEEL=path.whl    use a local wheel instead of downloading one (offline builds, tests)
#   TENSORRT_SPEC=tensorrt-cu13-libs==10.16.1.11
#                             also put TensorRT's runtime libraries (libnvinfer, libnvonnxparser, ...)
#                             in DEST/tensorrt. onnxruntime-gpu 1.31.1's TensorRT provider links
#                             libnvinfer.so.10 + libnvonnxparser.so.10: TensorRT 10.x for CUDA 13.
#                             PyPI only has sdists of these; the wheels come from NVIDIA's index:
#   TENSORRT_INDEX_URL=https://pypi.nvidia.com   (extra index used for TENSORRT_SPEC)
#   TENSORRT_WHEEL=path.whl   the same from a local wheel
#
# The CUDA execution provider needs CUDA 13 cuBLAS/cudart/cuRAND and cuDNN 9 at run time (the
# nvidia/cuda:13.x-cudnn-runtime base image); the TensorRT provider also needs TensorRT's libnvinfer.
set -euo pipefail
VERSION=${ORT_VERSION:-1.31.1}
DEST=${1:-.ort-gpu}
WHEEL=${ORT_GPU_WHEEL:-}
mkdir -p "$DEST"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -z "$WHEEL" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$tmp" "onnxruntime-gpu==$VERSION"
  WHEEL=$(ls "$tmp"/onnxruntime_gpu-*.whl)
fi
python3 - "$WHEEL" "$DEST" "$VERSION" <<'PY'
import os, sys, zipfile
wheel, dest, version = sys.argv[1:]
required = [f"libonnxruntime.so.{version}", "libonnxruntime_providers_shared.so",
            "libonnxruntime_providers_cuda.so"]
optional = ["libonnxruntime_providers_tensorrt.so"]
found = {}
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        parts = info.filename.split("/")
        if len(parts) >= 2 and parts[-2] == "capi" and parts[-1] in required + optional:
            target = os.path.join(dest, parts[-1])
            with z.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            os.chmod(target, 0o755)
            found[parts[-1]] = target
missing = [name for name in required if name not in found]
if missing:
    sys.exit(f"{wheel}: missing {', '.join(missing)} under onnxruntime/capi/")
for name in optional:
    if name not in found:
        print(f"warning: {wheel} has no {name}; engine.provider=tensorrt will not work", file=sys.stderr)
PY
TRT_WHEEL=${TENSORRT_WHEEL:-}
if [ -z "$TRT_WHEEL" ] && [ -n "${TENSORRT_SPEC:-}" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
    --extra-index-url "${TENSORRT_INDEX_URL:-https://pypi.nvidia.com}" \
    -d "$tmp/trt" "$TENSORRT_SPEC"
  TRT_WHEEL=$(ls "$tmp"/trt/*.whl)
fi
if [ -n "$TRT_WHEEL" ]; then
  mkdir -p "$DEST/tensorrt"
  python3 - "$TRT_WHEEL" "$DEST/tensorrt" <<'PY'
import os, re, sys, zipfile
wheel, dest = sys.argv[1:]
n = 0
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        base = os.path.basename(info.filename)
        if re.match(r"lib.*\.so(\.\d+)*$", base):
            with z.open(info) as src, open(os.path.join(dest, base), "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            n += 1
for lib in ("libnvinfer.so", "libnvonnxparser.so"):
    if not any(f.startswith(lib) for f in os.listdir(dest)):
        sys.exit(f"{wheel}: no {lib}* inside (the TensorRT provider needs it)")
print(f"TensorRT: {n} libraries in {dest}")
PY
else
  mkdir -p "$DEST/tensorrt"
fi
ln -sf "libonnxruntime.so.$VERSION" "$DEST/libonnxruntime.so"
echo "ONNX Runtime GPU $VERSION at $DEST/"
