#!/usr/bin/env bash
# The embedded demo: in-process Kafka, real images from ../shared/datasets, the trained model.
# Extra arguments go to `dcam-stream demo` (e.g. --per-class 50, --dataset DIR, --quiet).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-ort.sh
scripts/build-tools.sh
cargo run --locked --quiet -- demo "$@"
