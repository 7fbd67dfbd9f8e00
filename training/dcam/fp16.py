"""Half-precision variant of an exported model, for GPUs (CUDA provider; TensorRT has its own fp16 flag).

Only the convolutional backbones (teacher, student and the density head's deep stages) run in float16:
they hold nearly all the compute. The input normalisation, the map (cosine, blur, per-pixel statistics)
and the density head stay float32, because squared Mahalanobis distances summed over up to 1280
dimensions lose whole score units in float16 (measured: max |Δscore| 3.0 with the heads in half, on
scores of 1–130). The file keeps the contract's input and output types (docs/DESIGN.md §1), so the
operator loads it like any other model.

A generic converter (onnxconverter-common) was tried first: it leaves the graph's uint8→float Cast
typed float32 and wraps every blocked node in a float16 round trip, so the score itself came out
quantised to float16 steps. This pass casts only at the two region borders.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HALF_SCOPES = ("teacher", "student", "deep")
FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16


def in_scopes(node_name: str, scopes: tuple[str, ...]) -> bool:
    """Whether the exporter named this node under one of the model's submodules `scopes`
    (`/teacher/...`; files from the old export wrapper say `/model/teacher/...`)."""
    parts = node_name.strip("/").split("/")
    if parts[0] == "model":
        parts = parts[1:]
    return len(parts) > 1 and parts[0] in scopes


def to_fp16(proto: onnx.ModelProto, scopes: tuple[str, ...] = HALF_SCOPES) -> onnx.ModelProto:
    """A copy of `proto` with the nodes named under `scopes` in float16 and casts at their borders."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    g = proto.graph
    inferred = onnx.shape_inference.infer_shapes(proto).graph
    dtype = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    inits = {i.name: i for i in g.initializer}
    dtype.update({name: i.data_type for name, i in inits.items()})
    # The exporter shares some weights through Identity nodes: read through them to the initializer.
    forwarded = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity" and n.input[0] in inits}

    # By position: protobuf hands out a new wrapper object on each access, so id() is no key.
    half = {k for k, n in enumerate(g.node) if in_scopes(n.name, scopes)}
    if not half:
        raise ValueError(f"no node is named under {scopes}: not a dcam export")
    half_outputs = {o for k, n in enumerate(g.node) if k in half for o in n.output}
    half_inits: dict[str, TensorProto] = {}
    casts_in: dict[str, onnx.NodeProto] = {}
    casts_out: dict[str, onnx.NodeProto] = {}

    def into_half(t: str) -> str:
        if not t or dtype.get(t) != FLOAT or t in half_outputs:
            return t
        source = forwarded.get(t, t)
        if source in inits:
            name = source + "__fp16"
            if name not in half_inits:
                half_inits[name] = numpy_helper.from_array(numpy_helper.to_array(inits[source]).astype(np.float16), name)
            return name
        name = t + "__fp16"
        casts_in.setdefault(name, helper.make_node("Cast", [t], [name], to=HALF, name=name))
        return name

    for k, n in enumerate(g.node):
        if k not in half:
            continue
        n.input[:] = [into_half(t) for t in n.input]
        for a in n.attribute:
            if n.op_type == "Constant" and a.name == "value" and a.t.data_type == FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
            if n.op_type == "Cast" and a.name == "to" and a.i == FLOAT:
                a.i = HALF
    for k, n in enumerate(g.node):
        if k in half:
            continue
        for j, t in enumerate(n.input):
            if t in half_outputs and dtype.get(t) == FLOAT:
                name = t + "__fp32"
                casts_out.setdefault(name, helper.make_node("Cast", [t], [name], to=FLOAT, name=name))
                n.input[j] = name
    if any(o.name in half_outputs for o in g.output):
        raise ValueError("a graph output comes from the float16 region; the contract's outputs are float32")

    # Keep the nodes in topological order: a cast in right before its first user, a cast out right
    # after its producer.
    ordered, placed = [], set()
    for n in g.node:
        for t in n.input:
            c = casts_in.get(t)
            if c is not None and t not in placed:
                ordered.append(c)
                placed.add(t)
        ordered.append(n)
        for o in n.output:
            if o + "__fp32" in casts_out:
                ordered.append(casts_out[o + "__fp32"])
    used = {t for n in ordered for t in n.input}
    ordered = [n for n in ordered if not (n.op_type == "Identity" and n.output[0] not in used)]
    used = {t for n in ordered for t in n.input}
    del g.node[:]
    g.node.extend(ordered)
    kept = [i for i in g.initializer if i.name in used] + [i for i in half_inits.values() if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    del g.value_info[:]  # types changed inside the region; runtimes infer them again
    set_metadata(proto, "dcam.precision", json.dumps({"float16": list(scopes), "float32": "the rest"}))
    onnx.checker.check_model(proto)
    return proto


def set_metadata(proto: onnx.ModelProto, key: str, value: str) -> None:
    for p in proto.metadata_props:
        if p.key == key:
            p.value = value
            return
    proto.metadata_props.add(key=key, value=value)


def parity(fp32: Path, fp16: Path, images: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """How far the half model's outputs are from the float32 model's on `images`, whether the
    verdicts at the pooled (`_default`) threshold agree and, given labels (1 = defective) of both
    kinds, the image AUROC of each."""
    from .export import run_onnx
    m32, s32 = run_onnx(fp32, images)
    m16, s16 = run_onnx(fp16, images)
    cal = json.loads({p.key: p.value for p in onnx.load(str(fp32), load_external_data=False).metadata_props}["dcam.calibration"])
    threshold = cal["_default"]["threshold"]
    span = max(c["max"] - c["min"] for c in cal.values())
    near = np.abs(s32) < 2 * abs(threshold)  # where verdicts are decided
    report = {
        "images": int(len(images)),
        "max_abs_dscore": float(np.abs(s32 - s16).max()),
        "max_rel_dscore": float((np.abs(s32 - s16) / np.maximum(1.0, np.abs(s32))).max()),
        "max_abs_dscore_over_calibration_span": float(np.abs(s32 - s16).max() / span),
        "max_abs_dmap": float(np.abs(m32 - m16).max()),
        "verdicts_agree_at_default_threshold": float(np.mean((s32 >= threshold) == (s16 >= threshold))),
        "p95_abs_dscore_near_threshold": float(np.percentile(np.abs(s32 - s16)[near], 95)) if near.any() else None,
        "nan": int(np.isnan(s16).sum() + np.isnan(m16).sum()),
    }
    if labels is not None and len(set(labels.tolist())) == 2:
        from sklearn.metrics import roc_auc_score
        report["image_auroc_fp32"] = float(roc_auc_score(labels, s32) * 100)
        report["image_auroc_fp16"] = float(roc_auc_score(labels, np.nan_to_num(s16)) * 100)
    return report


def write_fp16(fp32: Path, out: Path, images: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Writes the half-precision companion of `fp32` to `out`, with its parity in the metadata."""
    proto = to_fp16(onnx.load(str(fp32)))
    onnx.save(proto, str(out))
    report = parity(fp32, out, images, labels)
    set_metadata(proto, "dcam.fp16_parity", json.dumps(report))
    onnx.save(proto, str(out))
    return report
