"""scripts/bench_fair.py, the operator against a plain Python consumer, at a tiny size so the script
cannot rot: a real noida-db broker, the debug `dcam-stream run` with the default config, the stage
table from a real `dcam-stream bench` run. Its figures are printed and parsed, never judged (no
timings asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from deploylib import REPO
from livelib import Broker, DATASETS, images, operator_bin

SCRIPT = REPO / "scripts" / "bench_fair.py"


def test_both_sides_are_measured_the_same_way_and_the_summary_parses(tmp_path):
    if not (REPO / ".ort" / "libonnxruntime.so").exists():
        pytest.skip("no .ort/libonnxruntime.so (scripts/fetch-ort.sh)")
    binary = operator_bin()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCAM__")}
    env["ORT_DYLIB_PATH"] = str(REPO / ".ort" / "libonnxruntime.so")
    stages = tmp_path / "bench.txt"
    bench = subprocess.run([str(binary), "bench", "--dataset", str(DATASETS), "--images", "2", "--batches", "1,4", "--cost-images", "2",
                            "--paced-fraction", "0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bench.returncode == 0, bench.stderr[-3000:]
    stages.write_text(bench.stdout)

    broker = Broker(tmp_path)
    try:
        broker.create_topics(["fair-images"])
        subprocess.run([str(binary), "produce", *map(str, images(24)), "--topic", "fair-images", "--brokers", broker.brokers],
                       check=True, capture_output=True, timeout=120, env=env, cwd=REPO)
        out = subprocess.run(
            [sys.executable, str(SCRIPT), "--brokers", broker.brokers, "--topic", "fair-images", "--count", "24", "--bin", str(binary),
             "--rounds", "1", "--op-batch", "4", "--py-batch", "4", "--broker-pgid", str(broker.proc.pid), "--stages", str(stages),
             "--logs", str(tmp_path), "--timeout", "240", "--paced-fraction", "0.5", "--paced-count", "6"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )
    finally:
        broker.stop()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.stdout.splitlines() if re.match(r"\| \d+ \| (operator|python) \|", line)]
    assert sorted(r[1] for r in rows) == ["operator", "python"], out.stdout
    for row in rows:
        img_s, cpu_ms, broker_cores = float(row[2]), float(row[3]), float(row[5])
        assert img_s > 0 and cpu_ms > 0, f"{row[1]} was not measured: {row}"
        assert broker_cores > 0, f"the broker's CPU is sampled apart: {row}"
    assert re.search(r"^throughput operator / python, per round: min [0-9.]+, median [0-9.]+, max [0-9.]+$", out.stdout, re.M), out.stdout
    assert re.search(r"^stage sum = parse [0-9.]+ \+ decode [0-9.]+ \+ inference at batch 4 [0-9.]+ = [0-9.]+ ms/image$", out.stdout, re.M), out.stdout
    lat = re.search(r"^p50 (\d+) ms, p99 (\d+) ms, max (\d+) ms; bound max_delay_ms \+ 3 x batch inference \(4 x [0-9.]+ ms\) = \d+ ms; "
                    r"p99 / bound = [0-9.]+$", out.stdout, re.M)
    assert lat and 0 < int(lat.group(1)) <= int(lat.group(2)) <= int(lat.group(3)), out.stdout  # every paced image was scored
    eta = re.search(r"^efficiency = ([0-9.]+)$", out.stdout.splitlines()[-1])
    assert eta and float(eta.group(1)) > 0, out.stdout
