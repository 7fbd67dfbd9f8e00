#!/usr/bin/env bash
# A longer fuzz campaign over the input parsers than the test suite runs: the properties of
# tests/fuzz_parsers.rs (event parser on arbitrary bytes, JSON envelopes and headers; decoder on
# arbitrary bytes and damaged real images of every format), CASES inputs per property.
# Prints executions and crashes; a crash prints the minimal failing input and exits non-zero.
# Same build as the test suite (dependencies optimised), so it starts without a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
CASES=${CASES:-20000}
PROPERTIES=4
scripts/fetch-ort.sh >/dev/null
scripts/build-tools.sh
started=$(date +%s)
status=0
PROPTEST_CASES=$CASES cargo test --locked --test fuzz_parsers -- --test-threads=2 || status=$?
elapsed=$(( $(date +%s) - started ))
crashes=$([ "$status" -eq 0 ] && echo 0 || echo "at least 1 (see above)")
echo
echo "| properties | cases each | executions | crashes | seconds |"
echo "|---:|---:|---:|---|---:|"
echo "| $PROPERTIES | $CASES | $((PROPERTIES * CASES)) | $crashes | $elapsed |"
exit "$status"
