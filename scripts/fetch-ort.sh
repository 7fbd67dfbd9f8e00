#!/usr/bin/env bash
# Puts ONNX Runtime's shared library at .ort/libonnxruntime.so, taken from the PyPI wheel
# (ort's own binary download cannot run here). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${ORT_VERSION:-1.31.1}
DEST=.ort
if [ -f "$DEST/libonnxruntime.so.$VERSION" ]; then exit 0; fi
mkdir -p "$DEST"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$tmp" "onnxruntime==$VERSION"
python3 - "$tmp" "$DEST" "$VERSION" <<'PY'
import glob, sys, zipfile, os
tmp, dest, version = sys.argv[1:]
wheel = glob.glob(os.path.join(tmp, "onnxruntime-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(f"capi/libonnxruntime.so.{version}"))
    with z.open(name) as src, open(os.path.join(dest, f"libonnxruntime.so.{version}"), "wb") as out:
        out.write(src.read())
PY
ln -sf "libonnxruntime.so.$VERSION" "$DEST/libonnxruntime.so"
echo "ONNX Runtime $VERSION at $DEST/libonnxruntime.so"
