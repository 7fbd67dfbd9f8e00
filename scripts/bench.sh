#!/usr/bin/env bash
# Benchmark tables through a real broker process (noida-db), in one run on the same images:
# per-stage core-times and the limit they set, raw ONNX Runtime vs the end-to-end operator, then
# the operator as its own process with the default config against a plain Python consumer
# (scripts/bench_python_consumer.py: confluent-kafka + Pillow + onnxruntime, commit per batch) on
# the same events, ROUNDS times each, alternating (scripts/bench_fair.py): throughput ratio
# min/median/max, each side's own CPU per image, eta = stage sum / operator CPU per image.
# Extra arguments go to `dcam-stream bench` (e.g. --images 192 --batches 1,8,32).
#   PY_BATCH=32        the Python consumer's batch size
#   ROUNDS=3           runs of each side in the fair comparison
#   PACED_FRACTION=0.8 then the latency at this share of the operator's median throughput (0: not measured)
#   LATENCY_FRACTION=0.8 the latency against librdkafka's mock cluster at this share of a burst's throughput
#   SKIP_PYTHON=1      skip the fair comparison
#   LARGE_JPEGS=16     bottle images re-encoded as 2048x2048 JPEG (q90) into a temp dir: decode + resize
#                      per image, reduced-scale IDCT vs full decode vs Pillow (plain, draft() to 4 x S as the
#                      operator, draft() to S); 0 = off
#   BACKLOG_ROUNDS=8   then those JPEGs published this many times as a backlog: the operator's peak RSS
#   NO_SETUP=1         use the existing .ort and .venv as they are (no fetch-ort.sh / setup-python.sh)
#   DCAM_BIN=path      use this dcam-stream binary instead of building target/release/dcam-stream
set -euo pipefail
cd "$(dirname "$0")/.."
# README numbers need a quiet machine: the load average before anything starts is printed first.
echo "load average before the run: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) cores)"
if [ "${NO_SETUP:-0}" != 1 ]; then
  scripts/fetch-ort.sh
  scripts/setup-python.sh
fi
if [ -z "${DCAM_BIN:-}" ]; then
  scripts/build-tools.sh
  cargo build --locked --release --bin dcam-stream
  DCAM_BIN=target/release/dcam-stream
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
data=$(mktemp -d)
# noida-db ignores SIGTERM and runs a child: its own session/process group, killed as a whole.
setsid .venv/bin/noida-db start --only kafka --kafka-port "$port" --data-dir "$data/db" > "$data/broker.log" 2>&1 &
broker=$!
# (wait reports the kill as 137; under set -e that would become the script's exit status)
trap 'kill -KILL -- -$broker 2>/dev/null; wait $broker 2>/dev/null || true; rm -rf "$data"' EXIT
for _ in $(seq 300); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
export_topic="bench-python-images-$RANDOM"
large_args=()
if [ "${LARGE_JPEGS:-16}" -gt 0 ]; then
  mkdir -p "$data/large"
  .venv/bin/python - "$data/large" "${LARGE_JPEGS:-16}" "${DCAM_DATASETS:-../shared/datasets}" <<'PY'
import glob, os, sys
from PIL import Image
out, n, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
src = sorted(glob.glob(os.path.join(root, "bottle", "test", "*", "*.png")))[:n]
for i, p in enumerate(src):
    Image.open(p).convert("RGB").resize((2048, 2048), Image.BICUBIC).save(os.path.join(out, f"{i:03d}.jpg"), quality=90)
print(f"{len(src)} camera-size JPEGs (2048x2048) in {out}")
PY
  large_args=(--large-jpegs "$data/large")
fi
ORT_DYLIB_PATH="$PWD/.ort/libonnxruntime.so" "$DCAM_BIN" bench --brokers "127.0.0.1:$port" \
  --export-topic "$export_topic" "${large_args[@]}" "$@" | tee "$data/bench.txt"
if [ ${#large_args[@]} -gt 0 ]; then
  echo
  echo "Large JPEGs, decode + resize per image on one thread, the same files:"
  .venv/bin/python scripts/bench_python_consumer.py --model "${DCAM__MODEL__PATH:-models/dcam.onnx}" \
    --time-decode "$data"/large/*.jpg > "$data/pillow.json"
  .venv/bin/python - "$data/bench.txt" "$data/pillow.json" <<'PY'
import json, re, sys
bench, pil = open(sys.argv[1]).read(), json.load(open(sys.argv[2]))
scaled = float(re.search(r"reduced-scale IDCT \| ([0-9.]+)", bench).group(1))
full = float(re.search(r"large JPEGs \(\d+\): decode \+ resize, full decode \| ([0-9.]+)", bench).group(1))
print("| decoder | ms/image |\n|---|---:|")
print(f"| dcam-stream, reduced-scale IDCT | {scaled:.2f} |\n| dcam-stream, full decode | {full:.2f} |")
print(f"| Pillow, open + convert + resize | {pil['pillow_ms']:.2f} |")
print(f"| Pillow with draft() to 4 x S, as the operator (same model input) | {pil['pillow_draft4_ms']:.2f} |")
print(f"| Pillow with draft() to S (box-averaged input: the model flags good frames) | {pil['pillow_draft_ms']:.2f} |")
print(f"operator/pillow decode speed = {pil['pillow_ms'] / scaled:.2f} (vs plain Pillow), {pil['pillow_draft4_ms'] / scaled:.2f} "
      f"(vs Pillow draft to 4 x S), {pil['pillow_draft_ms'] / scaled:.2f} (vs Pillow draft to S)")
PY
fi
[ "${SKIP_PYTHON:-0}" = 1 ] && exit 0

# Memory under a backlog of camera-size images: the large JPEGs published BACKLOG_ROUNDS times as raw
# records (noida-db answers a fetch with everything it holds, so the topic stays under librdkafka's
# 100 MB receive limit), then `dcam-stream run` with the default config reads them all; peak RSS.
if [ ${#large_args[@]} -gt 0 ] && [ "${BACKLOG_ROUNDS:-8}" -gt 0 ]; then
  backlog_topic="bench-backlog-$RANDOM"
  backlog=0
  for _ in $(seq "${BACKLOG_ROUNDS:-8}"); do
    n=$("$DCAM_BIN" produce "$data/large" --format raw --topic "$backlog_topic" --brokers "127.0.0.1:$port" | sed -n 's/^published \([0-9]*\) images.*/\1/p')
    backlog=$((backlog + n))
  done
  echo
  echo "A backlog of $backlog camera-size JPEGs (2048x2048, raw records), dcam-stream run with the default config:"
  ORT_DYLIB_PATH="$PWD/.ort/libonnxruntime.so" .venv/bin/python scripts/bench_fair.py --brokers "127.0.0.1:$port" --topic "$backlog_topic" \
    --count "$backlog" --bin "$DCAM_BIN" --model "${DCAM__MODEL__PATH:-models/dcam.onnx}" --rounds 1 --operator-only \
    --broker-pgid "$broker" --logs "$data"
fi

# Latency against a broker that does not spin (librdkafka's mock cluster): small events paced at
# LATENCY_FRACTION (0.8) of a burst's throughput (scripts/bench_latency_mock.py).
if [ "${LATENCY_FRACTION:-0.8}" != 0 ]; then
  echo
  ORT_DYLIB_PATH="$PWD/.ort/libonnxruntime.so" .venv/bin/python scripts/bench_latency_mock.py --bin "$DCAM_BIN" \
    --model "${DCAM__MODEL__PATH:-models/dcam.onnx}" --dataset "${DCAM_DATASETS:-../shared/datasets}" \
    --fraction "${LATENCY_FRACTION:-0.8}" --stages "$data/bench.txt" --logs "$data"
fi

# The operator (`dcam-stream run`, default config) and the Python consumer on the same events: every
# test image of the datasets once, as JSON envelopes, each side its own process, ROUNDS times each,
# alternating; each side's own CPU per image, the broker's apart (scripts/bench_fair.py).
fair_topic="bench-fair-images-$RANDOM"
count=$("$DCAM_BIN" produce "${DCAM_DATASETS:-../shared/datasets}" --topic "$fair_topic" --brokers "127.0.0.1:$port" | sed -n 's/^published \([0-9]*\) images.*/\1/p')
echo
ORT_DYLIB_PATH="$PWD/.ort/libonnxruntime.so" .venv/bin/python scripts/bench_fair.py --brokers "127.0.0.1:$port" --topic "$fair_topic" --count "$count" \
  --bin "$DCAM_BIN" --model "${DCAM__MODEL__PATH:-models/dcam.onnx}" --rounds "${ROUNDS:-3}" --py-batch "${PY_BATCH:-32}" \
  --broker-pgid "$broker" --stages "$data/bench.txt" --logs "$data" --paced-fraction "${PACED_FRACTION:-0.8}"
