"""The float16 companion model: backbones in half, the rest float32, the contract kept, parity reported."""
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from dcam.__main__ import main
from dcam.calibrate import calibrate
from dcam.config import variant_config
from dcam.data import load_test, load_train_val
from dcam.evaluate import predict
from dcam.export import check_contract, export_onnx, read_metadata, run_onnx
from dcam.fp16 import HALF_SCOPES, in_scopes, to_fp16
from dcam.torch_model import DistillModel
from dcam.train import train

S = 32


@pytest.fixture(scope="module")
def exported(mvtec_root, tmp_path_factory):
    torch.manual_seed(0)
    classes = ["tile", "widget"]
    tr, va = load_train_val(mvtec_root, classes, S, val_fraction=0.25, seed=0, progress=False)
    model = DistillModel(variant_config("stfpm", input_size=S, score_rule="top1pct_mean", density="map", pixel_norm="score"))
    train(model, tr.images, va.images, epochs=1, batch_size=4, max_steps=2, progress=False, log=lambda *_: None)
    model.fit_heads(classes, tr.images, tr.classes, va.images, va.classes, log=lambda *_: None)
    _, val_scores = predict(model, va.images, progress=False)
    path = tmp_path_factory.mktemp("fp16") / "m.onnx"
    export_onnx(model, path, classes, calibrate(val_scores, va.classes), {}, {"variant": "stfpm"})
    return path, classes


def test_only_the_backbones_turn_half_and_the_contract_holds(exported, tmp_path):
    path, _ = exported
    half = to_fp16(onnx.load(str(path)))
    out = tmp_path / "m.fp16.onnx"
    onnx.save(half, str(out))
    assert check_contract(out) == []
    inits = {i.name: i.data_type for i in half.graph.initializer}
    convs = [n for n in half.graph.node if n.op_type == "Conv"]
    assert convs and all(inits[n.input[1]] == TensorProto.FLOAT16 for n in convs if in_scopes(n.name, HALF_SCOPES))
    # the heads' constants (density means and precisions, pixel statistics) stay float32
    heads = [name for name in inits if "heads" in name]
    assert heads and all(inits[name] == TensorProto.FLOAT for name in heads), heads
    before = sum(i.ByteSize() for i in onnx.load(str(path)).graph.initializer if i.data_type == TensorProto.FLOAT)
    after = sum(i.ByteSize() for i in half.graph.initializer)
    assert after < before, "half weights replace the float ones instead of being added"


def test_half_outputs_stay_close_and_the_cli_records_parity(exported, mvtec_root, tmp_path):
    path, classes = exported
    target = tmp_path / "m.onnx"
    target.write_bytes(path.read_bytes())
    main(["fp16", str(target), "--data-root", str(mvtec_root), "--parity-images", "8"])
    out = tmp_path / "m.fp16.onnx"
    report = json.loads(read_metadata(out)["dcam.fp16_parity"])
    test = load_test(mvtec_root, classes, S, progress=False)
    assert report["images"] == sum(min(8, test.classes.count(c)) for c in classes) and report["nan"] == 0
    assert {"image_auroc_fp32", "image_auroc_fp16"} <= set(report) and 0 <= report["verdicts_agree_at_default_threshold"] <= 1

    m32, s32 = run_onnx(target, test.images)
    m16, s16 = run_onnx(out, test.images)
    assert m16.dtype == np.float32 and s16.dtype == np.float32
    assert np.isfinite(s16).all() and np.isfinite(m16).all()
    # loose: a barely trained 32-px model; the committed model's numbers are in the model card
    assert (np.abs(s16 - s32) / np.maximum(1.0, np.abs(s32))).max() < 0.2, np.c_[s32, s16]
    assert np.abs(s16 - s32).max() > 0, "the companion really computes in float16"


def test_a_model_without_backbone_scopes_is_refused():
    x = onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", [x], [y])
    with pytest.raises(ValueError, match="not a dcam export"):
        to_fp16(onnx.helper.make_model(graph))
