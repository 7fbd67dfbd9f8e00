#!/usr/bin/env bash
# Benchmark table through a real broker process (noida-db): raw ONNX Runtime vs end-to-end operator.
# Extra arguments go to `dcam-stream bench` (e.g. --images 192 --batches 1,8,32).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-ort.sh
scripts/setup-python.sh
cargo build --locked --release --bin dcam-stream
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
data=$(mktemp -d)
.venv/bin/noida-db start --only kafka --kafka-port "$port" --data-dir "$data" > "$data/broker.log" 2>&1 &
broker=$!
trap 'kill $broker 2>/dev/null; wait $broker 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
ORT_DYLIB_PATH="$PWD/.ort/libonnxruntime.so" target/release/dcam-stream bench --brokers "127.0.0.1:$port" "$@"
