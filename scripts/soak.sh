#!/usr/bin/env bash
# Soak: paced events against a real broker (noida-db) for N minutes, both delivery modes side by side,
# a broker restart every 5 minutes (every half run when shorter) and a member joining for 8 s and
# leaving in between. Prints events in/out, lost, duplicates, p50/p99 latency per window and the
# operators' RSS at start and end; exits non-zero on any loss (or a duplicate in exactly-once mode).
# The test suite runs the same test for 3 minutes (tests/soak.rs).
#   scripts/soak.sh [MINUTES (20)] [EVENTS_PER_SECOND_PER_MODE (6)]     SOAK_RELEASE=1 for a release build
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-ort.sh
scripts/build-tools.sh
scripts/setup-python.sh
export DCAM_SOAK_MINUTES="${1:-20}" DCAM_SOAK_RATE="${2:-6}"
echo "soak: $DCAM_SOAK_MINUTES min at $DCAM_SOAK_RATE events/s per mode; load before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
exec cargo test --locked ${SOAK_RELEASE:+--release} --test soak -- --ignored --nocapture --test-threads=1
