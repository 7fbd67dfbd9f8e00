"""The committed models/dcam.onnx (loaded by the Rust operator) must satisfy DESIGN.md section 1."""
import json
from pathlib import Path

import numpy as np
import pytest

from dcam.export import REQUIRED_METADATA, check_contract, read_metadata, run_onnx

MODEL = Path(__file__).resolve().parents[2] / "models" / "dcam.onnx"


@pytest.mark.skipif(not MODEL.exists(), reason="models/dcam.onnx not committed yet")
def test_committed_model_contract():
    assert check_contract(MODEL) == []
    meta = read_metadata(MODEL)
    assert set(REQUIRED_METADATA) <= set(meta)
    classes = json.loads(meta["dcam.classes"])
    assert classes and set(json.loads(meta["dcam.calibration"])) >= {*classes, "_default"}
    assert MODEL.stat().st_size < 20e6
    s = int(meta["dcam.input_size"])
    imgs = np.random.default_rng(0).integers(0, 256, (2, s, s, 3), dtype=np.uint8)
    maps, scores = run_onnx(MODEL, imgs)
    assert maps.shape == (2, s, s) and maps.dtype == np.float32 and scores.shape == (2,)
    assert np.isfinite(maps).all()
    flat = np.sort(maps.reshape(2, -1), axis=1)
    rule = json.loads(meta["dcam.train_config"]).get("score_rule", "max")
    expect = flat[:, -1] if rule == "max" else flat[:, -(s * s // 100):].mean(1)
    assert np.allclose(scores, expect, atol=1e-5)
