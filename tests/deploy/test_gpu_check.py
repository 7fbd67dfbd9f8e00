"""scripts/gpu-check.sh on CPU (`--provider cpu,cpu-fp16`), so the GPU script cannot rot: a tiny bench with
the already built debug binary ($DCAM_BIN, else target/debug/dcam-stream) on the in-process
cluster, and the split / reassemble of a provider library with its checksum. No timings asserted."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from deploylib import REPO

SCRIPT = REPO / "scripts" / "gpu-check.sh"


def dcam_bin() -> Path:
    b = Path(os.environ.get("DCAM_BIN", REPO / "target" / "debug" / "dcam-stream"))
    if not b.exists():
        pytest.skip(f"no dcam-stream binary at {b} (cargo build, or set DCAM_BIN)")
    return b


def test_gpu_check_runs_on_cpu_and_prints_the_provider_used(tmp_path):
    # A copy of the model, so the float16 companion the script writes beside it lands in tmp.
    model = tmp_path / "dcam.onnx"
    model.write_bytes((REPO / "models" / "dcam.onnx").read_bytes())
    env = dict(os.environ, DCAM_BIN=str(dcam_bin()), DCAM__MODEL__PATH=str(model), GPU_CHECK_PARITY_IMAGES="4")
    if not (REPO / ".ort" / "libonnxruntime.so").exists():
        pytest.skip("no .ort/libonnxruntime.so (scripts/fetch-ort.sh)")
    datasets = os.environ.get("DCAM_DATASETS", str(REPO.parent / "shared" / "datasets"))
    out = subprocess.run(
        [str(SCRIPT), "--provider", "cpu,cpu-fp16", "--images", "4", "--batches", "1,2", "--budget", "240", "--ort-dir", ".ort", "--dataset", datasets],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("| provider | used | batch |"))
    rows = [[c.strip() for c in l.strip().strip("|").split("|")] for l in lines[header + 2 :] if l.startswith("|")]
    assert [(r[0], r[1], r[2]) for r in rows] == [("cpu", "cpu", "1"), ("cpu", "cpu", "2"), ("cpu-fp16", "cpu", "1"), ("cpu-fp16", "cpu", "2")], out.stdout
    assert (tmp_path / "dcam.fp16.onnx").exists() and "[fp16]" in out.stdout, out.stdout
    for r in rows:
        for cell in r[3:]:
            float(cell)
    assert any(l.startswith("e2e/limit = ") for l in lines), out.stdout


def test_provider_library_parts_are_reassembled_and_checked(tmp_path):
    lib = tmp_path / "libonnxruntime_providers_cuda.so"
    payload = os.urandom(3 * 1024 * 1024 + 17)
    lib.write_bytes(payload)
    subprocess.run([str(SCRIPT), "--split", str(lib), "1"], check=True, capture_output=True)
    parts = sorted(tmp_path.glob(lib.name + ".part.*"))
    assert len(parts) == 4 and all(p.stat().st_size <= 1024 * 1024 for p in parts)
    lib.unlink()
    subprocess.run([str(SCRIPT), "--join", str(lib)], check=True, capture_output=True)
    assert lib.read_bytes() == payload
    # A damaged part is refused and leaves no library behind.
    lib.unlink()
    parts[1].write_bytes(parts[1].read_bytes()[:-1])
    bad = subprocess.run([str(SCRIPT), "--join", str(lib)], capture_output=True, text=True)
    assert bad.returncode != 0 and "sha256" in bad.stderr
    assert not lib.exists()
