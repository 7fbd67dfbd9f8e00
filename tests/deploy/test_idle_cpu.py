"""scripts/idle-cpu.sh, at a tiny size so the script cannot rot: the real operator, idle against
librdkafka's mock cluster and against a noida-db broker, control topic on and off. Its figures are
printed and parsed, never judged (no timings asserted)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from deploylib import REPO
from livelib import operator_bin


def test_every_broker_and_control_setting_gets_a_row():
    if not (REPO / ".ort" / "libonnxruntime.so").exists():
        pytest.skip("no .ort/libonnxruntime.so (scripts/fetch-ort.sh)")
    if not shutil.which("curl"):
        pytest.skip("curl is missing")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCAM__")}
    env.update(BIN=str(operator_bin()), SETTLE="1", ORT_DYLIB_PATH=str(REPO / ".ort" / "libonnxruntime.so"))
    out = subprocess.run(["bash", "scripts/idle-cpu.sh", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = re.findall(r"^\| (mock cluster|noida-db) \| (idle-control|off) \| ([0-9.]+) \| ([0-9.]+|-) \|$", out.stdout, re.M)
    assert [(b, c) for b, c, _, _ in rows] == [("mock cluster", "idle-control"), ("mock cluster", "off"),
                                               ("noida-db", "idle-control"), ("noida-db", "off")], out.stdout
    assert all(broker != "-" for b, _, _, broker in rows if b == "noida-db"), "the broker's CPU is sampled apart"
