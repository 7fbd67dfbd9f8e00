#!/usr/bin/env bash
# Proves the GPU path on a bare Linux machine with an NVIDIA GPU, CUDA 13 / cuDNN 9 libraries, this
# repository and no internet: runs `dcam-stream bench` with engine.provider = cuda, then cuda on the
# float16 model (`python -m dcam fp16`), then tensorrt (fp16, engine cache), at batch 1/8/32/64, and
# prints one table with the execution provider that actually served each run. Builds nothing heavy:
# a prebuilt binary is used when there is one.
# Exits within --budget seconds (default 480 = 8 minutes; each bench run gets a timeout).
#
#   scripts/gpu-check.sh [--provider cuda,cuda-fp16,tensorrt|cpu|cpu-fp16] [--images N] [--batches 1,8,32,64]
#                        [--budget SECONDS] [--ort-dir DIR] [--dataset DIR]
#   scripts/gpu-check.sh --split FILE [PART_MB]   cut FILE into FILE.part.NNN (< 60 MB) + FILE.sha256
#   scripts/gpu-check.sh --join FILE              reassemble FILE from FILE.part.* and check FILE.sha256
#
# ONNX Runtime: --ort-dir, else $ORT_DIR, else .ort-gpu (docker/fetch-ort-gpu.sh), else .ort (CPU
# only). The CUDA provider library (~284 MB) may arrive in parts under 60 MB (docs/DESIGN.md §7):
# every LIB.part.* found there is joined into LIB and checked against LIB.sha256 before use.
# Binary: $DCAM_BIN, else target/release/dcam-stream, else dist/dcam-stream, else `cargo build --release`.
# `--provider cpu` runs the same steps on CPU (CI runs it: tests/deploy/test_gpu_check.py).
# A provider named P-fp16 runs P on the float16 companion of the model ($DCAM__MODEL__PATH, else
# models/dcam.onnx): MODEL.fp16.onnx, written first by `python -m dcam fp16` (.venv) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "gpu-check: $*" >&2; exit 1; }

split_file() { # FILE [PART_MB]
  local file=$1 mb=${2:-50}
  [ -f "$file" ] || die "no file $file"
  [ "$mb" -lt 60 ] || die "parts must stay under 60 MB"
  rm -f "$file".part.*
  split -b "${mb}M" -d -a 3 "$file" "$file.part."
  (cd "$(dirname "$file")" && sha256sum "$(basename "$file")") > "$file.sha256"
  ls -l "$file".part.* "$file.sha256"
}

join_file() { # FILE: cat FILE.part.* > FILE, verified against FILE.sha256
  local file=$1
  compgen -G "$file.part.*" > /dev/null || die "no parts $file.part.*"
  [ -f "$file.sha256" ] || die "$file.sha256 is missing: cannot check the reassembled $file"
  local want got
  want=$(awk '{print $1}' "$file.sha256")
  # Parts sort by their fixed-width numeric suffix; write aside, then move into place.
  cat $(ls "$file".part.* | sort) > "$file.joining"
  got=$(sha256sum "$file.joining" | awk '{print $1}')
  if [ "$want" != "$got" ]; then
    rm -f "$file.joining"
    die "reassembled $file has sha256 $got, expected $want (a part is missing or damaged)"
  fi
  chmod 755 "$file.joining"
  mv "$file.joining" "$file"
  echo "gpu-check: reassembled $file from $(ls "$file".part.* | wc -l) parts, sha256 ok"
}

case "${1:-}" in
  --split) shift; split_file "$@"; exit 0 ;;
  --join) shift; join_file "$1"; exit 0 ;;
esac

providers=cuda,cuda-fp16,tensorrt
images=${GPU_CHECK_IMAGES:-256}
batches=1,8,32,64
budget=480
ort_dir=${ORT_DIR:-}
dataset=${DCAM_DATASETS:-../shared/datasets}
while [ $# -gt 0 ]; do
  case "$1" in
    --provider|--providers) providers=$2; shift 2 ;;
    --images) images=$2; shift 2 ;;
    --batches) batches=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    --ort-dir) ort_dir=$2; shift 2 ;;
    --dataset) dataset=$2; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }

# ONNX Runtime library (and, for GPUs, the provider libraries beside it).
if [ -z "$ort_dir" ]; then
  if [ -e .ort-gpu/libonnxruntime.so ] || compgen -G ".ort-gpu/*.part.*" > /dev/null; then ort_dir=.ort-gpu; else ort_dir=.ort; fi
fi
for part0 in "$ort_dir"/*.part.000; do
  [ -e "$part0" ] || continue
  lib=${part0%.part.000}
  if [ -f "$lib" ] && [ -f "$lib.sha256" ] && [ "$(sha256sum "$lib" | awk '{print $1}')" = "$(awk '{print $1}' "$lib.sha256")" ]; then
    continue # already joined
  fi
  join_file "$lib"
done
[ -e "$ort_dir/libonnxruntime.so" ] || die "no $ort_dir/libonnxruntime.so (docker/fetch-ort-gpu.sh makes .ort-gpu; scripts/fetch-ort.sh makes .ort)"
export ORT_DYLIB_PATH="$PWD/$ort_dir/libonnxruntime.so"
export LD_LIBRARY_PATH="$PWD/$ort_dir:$PWD/$ort_dir/tensorrt${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# The binary: never a heavy build when one is already there.
bin=${DCAM_BIN:-}
if [ -z "$bin" ]; then
  for b in target/release/dcam-stream dist/dcam-stream; do [ -x "$b" ] && { bin=$b; break; }; done
fi
if [ -z "$bin" ]; then
  echo "gpu-check: no prebuilt binary; cargo build --release (not counted in the budget)" >&2
  scripts/build-tools.sh
  cargo build --locked --offline --release --bin dcam-stream
  bin=target/release/dcam-stream
  start=$SECONDS
fi
[ -x "$bin" ] || die "binary $bin is not executable"

echo "gpu-check: binary $bin, ONNX Runtime $ORT_DYLIB_PATH, budget ${budget}s"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu-check: GPU /' || true
else
  echo "gpu-check: no nvidia-smi on PATH"
fi
model=${DCAM__MODEL__PATH:-models/dcam.onnx}
fp16_model=${model%.onnx}.fp16.onnx
for p in ${providers//,/ }; do
  if [ "${p%-fp16}" != "$p" ] && [ ! -e "$fp16_model" ]; then
    [ -x .venv/bin/python ] || die "no $fp16_model and no .venv to make it (scripts/setup-python.sh; python -m dcam fp16)"
    echo "gpu-check: writing $fp16_model (python -m dcam fp16; not counted in the budget)"
    .venv/bin/python -W ignore -m dcam fp16 "$model" --data-root "$dataset" --parity-images "${GPU_CHECK_PARITY_IMAGES:-32}"
    start=$SECONDS
  fi
  case ${p%-fp16} in
    cpu) ;;
    cuda) [ -e "$ort_dir/libonnxruntime_providers_cuda.so" ] || echo "gpu-check: warning: no $ort_dir/libonnxruntime_providers_cuda.so" >&2 ;;
    tensorrt) [ -e "$ort_dir/libonnxruntime_providers_tensorrt.so" ] || echo "gpu-check: warning: no $ort_dir/libonnxruntime_providers_tensorrt.so" >&2 ;;
    *) die "unknown provider $p (cpu, cuda, tensorrt, each optionally with -fp16)" ;;
  esac
done

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
list=(${providers//,/ })
summary="$out/summary"
: > "$summary"
status=0
for i in "${!list[@]}"; do
  p=${list[$i]}
  # Share what is left between the providers still to run, keeping 15 s for the summary.
  runs_left=$((${#list[@]} - i))
  t=$(( ($(left) - 15) / runs_left ))
  if [ "$t" -lt 20 ]; then
    echo "gpu-check: $p skipped: budget spent" >&2
    echo "| $p | skipped (budget) | - | - | - | - | - | - | - |" >> "$summary"
    status=1
    continue
  fi
  base=${p%-fp16}
  env_p=(DCAM__ENGINE__PROVIDER="$base")
  if [ "$base" != "$p" ]; then env_p+=(DCAM__MODEL__PATH="$fp16_model"); fi
  if [ "$base" != cpu ]; then env_p+=(DCAM__ENGINE__REQUIRE_GPU=true); fi
  if [ "$p" = tensorrt ]; then
    mkdir -p .trt-cache
    env_p+=(DCAM__ENGINE__TRT_FP16=true DCAM__ENGINE__TRT_ENGINE_CACHE="$PWD/.trt-cache")
  fi
  echo "gpu-check: $p: bench --images $images --batches $batches (timeout ${t}s)"
  log="$out/$p.log"
  set +e
  env "${env_p[@]}" timeout --kill-after=10 "$t" "$bin" bench --dataset "$dataset" --images "$images" \
    --batches "$batches" --cost-images "$images" > "$log" 2> "$out/$p.err"
  rc=$?
  set -e
  if [ $rc -ne 0 ]; then
    why=$([ $rc -eq 124 ] && echo "timed out after ${t}s" || echo "failed (exit $rc)")
    echo "gpu-check: $p $why; last lines:" >&2
    tail -n 15 "$out/$p.err" >&2
    echo "| $p | $why | - | - | - | - | - | - | - |" >> "$summary"
    status=1
    continue
  fi
  cat "$log"
  used=$(sed -n 's/.*provider \([a-z]*\)$/\1/p' "$log" | head -n1)
  # decode-side core-ms per image (parse + decode + resize), for cores needed per device.
  cpu_ms=$(awk -F'|' '/^\| parse/ {p=$3} /^\| decode \+ resize/ {d=$3} END {printf "%.3f", p + d}' "$log")
  # Rows of the main table: | batch | raw | p50 | p99 | e2e | p50 | p99 | start | (b)/(a) | limit | (b)/limit | ...
  awk -F'|' -v p="$p" -v used="$used" -v cpu_ms="$cpu_ms" '
    /^\| batch \| \(a\)/ {t=1; next}
    t && /^\|---/ {next}
    t && /^\| [0-9]+ \|/ {
      gsub(/ /, "", $0); split($0, c, "|")
      printf "| %s | %s | %s | %s | %s | %s | %s | %.2f | %s |\n", p, used, c[2], c[3], c[4], c[6], c[12], c[3] * cpu_ms / 1000, c[11]
    }
    t && /^$/ {t=0}' "$log" >> "$summary"
  if [ "$base" != cpu ] && [ "$used" != "$base" ]; then
    echo "gpu-check: asked for $base, ran on $used" >&2
    status=1
  fi
done

echo
echo "gpu-check summary ($(($SECONDS - start)) s of ${budget}s); cores/device = raw img/s × (parse + decode) core-ms per image"
echo "| provider | used | batch | raw img/s | raw p50 ms | e2e img/s | e2e/limit | cores/device at raw | limit img/s |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
cat "$summary"
exit $status
