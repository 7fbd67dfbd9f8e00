"""ONNX export per docs/DESIGN.md section 1 (uint8 NHWC in; anomaly_map + score out; metadata)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from . import __version__
from .torch_model import DistillModel

FORMAT_VERSION = "1"
OPSET = 17
REQUIRED_METADATA = ("dcam.format", "dcam.input_size", "dcam.classes", "dcam.calibration", "dcam.model_name",
                     "dcam.version", "dcam.backbone", "dcam.train_config", "dcam.metrics")


def export_onnx(model: DistillModel, path: str | Path, classes: list[str], calibration: dict, metrics: dict,
                train_config: dict, model_name: str = "dcam", version: str = __version__) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The graph is the model's eval forward (normalisation, teacher + student, blurred map, the heads if
    # fitted); the training-only loss, and the DCAM attention inside it, is never traced.
    model.eval()
    s = model.cfg.input_size
    dummy = torch.zeros(2, s, s, 3, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but still exact and simple
        torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=["anomaly_map", "score"],
                          dynamic_axes={"image": {0: "N"}, "anomaly_map": {0: "N"}, "score": {0: "N"}},
                          do_constant_folding=True)
    proto = onnx.load(str(path))
    # The TorchScript exporter leaves the outputs' spatial dims symbolic; pin them to S (only N is dynamic).
    for out in proto.graph.output:
        dims = out.type.tensor_type.shape.dim
        for d in list(dims)[1:]:
            d.ClearField("dim_param")
            d.dim_value = s
        dims[0].dim_param = "N"
    meta = {
        "dcam.format": FORMAT_VERSION,
        "dcam.input_size": str(s),
        "dcam.classes": json.dumps(list(classes)),
        "dcam.calibration": json.dumps(calibration),
        "dcam.model_name": model_name,
        "dcam.version": version,
        "dcam.backbone": model.cfg.backbone,
        "dcam.train_config": json.dumps(train_config),
        "dcam.metrics": json.dumps(metrics),
    }
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    proto.doc_string = "dcam-stream anomaly detector: uint8 NHWC RGB image -> anomaly_map, score"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def run_onnx(path: str | Path, images: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    maps, scores = [], []
    for i in range(0, len(images), batch_size):
        m, sc = sess.run(["anomaly_map", "score"], {"image": images[i:i + batch_size]})
        maps.append(m); scores.append(sc)
    return np.concatenate(maps), np.concatenate(scores)


def read_metadata(path: str | Path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def check_contract(path: str | Path) -> list[str]:
    """Problems with an ONNX file against docs/DESIGN.md section 1 (empty list = conforms)."""
    problems = []
    proto = onnx.load(str(path))
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 17:
        problems.append(f"opset {opset} < 17")
    meta = {p.key: p.value for p in proto.metadata_props}
    problems += [f"missing metadata {k}" for k in REQUIRED_METADATA if k not in meta]
    if problems:
        return problems
    if meta["dcam.format"] != FORMAT_VERSION:
        problems.append("dcam.format != 1")
    s = int(meta["dcam.input_size"])
    classes = json.loads(meta["dcam.classes"])
    cal = json.loads(meta["dcam.calibration"])
    json.loads(meta["dcam.train_config"]); json.loads(meta["dcam.metrics"])
    for c in list(classes) + ["_default"]:
        if c not in cal or not all(isinstance(cal[c].get(k), (int, float)) for k in ("threshold", "min", "max")):
            problems.append(f"calibration missing/invalid for {c}")
        elif not cal[c]["max"] > cal[c]["min"]:
            problems.append(f"calibration max <= min for {c}")

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim], vi.type.tensor_type.elem_type

    ins = {i.name: dims(i) for i in proto.graph.input}
    outs = {o.name: dims(o) for o in proto.graph.output}
    T = onnx.TensorProto
    if list(ins) != ["image"] or ins["image"][1] != T.UINT8 or ins["image"][0][1:] != [s, s, 3] \
            or not isinstance(ins["image"][0][0], str):
        problems.append(f"bad input {ins}")
    if outs.get("anomaly_map", (None, None))[1] != T.FLOAT or outs["anomaly_map"][0][1:] != [s, s] \
            or not isinstance(outs["anomaly_map"][0][0], str):
        problems.append(f"bad anomaly_map {outs.get('anomaly_map')}")
    if outs.get("score", (None, None))[1] != T.FLOAT or len(outs["score"][0]) != 1 or not isinstance(outs["score"][0][0], str):
        problems.append(f"bad score {outs.get('score')}")
    return problems
