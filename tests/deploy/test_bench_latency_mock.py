"""scripts/bench_latency_mock.py at a tiny size so the script cannot rot: the debug `dcam-stream run` with
the default config against librdkafka's mock cluster, a few small events paced. Its figures are printed
and parsed, never judged (no timings asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from deploylib import REPO
from livelib import DATASETS, operator_bin


def test_paced_events_are_all_scored_and_the_line_parses(tmp_path):
    if not (REPO / ".ort" / "libonnxruntime.so").exists():
        pytest.skip("no .ort/libonnxruntime.so (scripts/fetch-ort.sh)")
    if not (DATASETS / "magnetic_tile" / "test").is_dir():
        pytest.skip(f"no magnetic_tile test images under {DATASETS}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCAM__")}
    env["ORT_DYLIB_PATH"] = str(REPO / ".ort" / "libonnxruntime.so")
    out = subprocess.run([sys.executable, "scripts/bench_latency_mock.py", "--bin", str(operator_bin()), "--dataset", str(DATASETS),
                          "--burst", "4", "--count", "6", "--logs", str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    m = re.search(r"^latency against the mock cluster \(fetch.wait.max.ms 10\), 6 small events paced at 0.80 x a burst's [0-9.]+ img/s "
                  r"\([0-9.]+ sent\): p50 (\d+) ms, p99 (\d+) ms, max (\d+) ms; .* p99 / bound = [0-9.]+$", out.stdout, re.M)
    assert m and int(m.group(1)) <= int(m.group(2)) <= int(m.group(3)), out.stdout
