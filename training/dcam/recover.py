"""Rebuild a PyTorch checkpoint from an exported ONNX file (its student weights), so a committed model
can get new heads without retraining the student (10 epochs cost ~35 min on the shared CPU).

The TorchScript exporter folds each BatchNorm into the preceding Conv (eval mode). The ONNX Conv
nodes run teacher first, then student, in module order, so the second half maps onto the student's
Conv2d modules; each folded bias goes into the following BatchNorm, set to an identity otherwise.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from .config import config_from_train_config
from .record import TrainRecord
from .export import read_metadata
from .torch_model import DistillModel


def _conv_bn_pairs(net: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    mods = list(net.modules())
    pairs = []
    for a, b in zip(mods, mods[1:]):
        if isinstance(a, nn.Conv2d):
            assert isinstance(b, nn.BatchNorm2d), f"conv without BN: {a}"
            pairs.append((a, b))
    return pairs


@torch.no_grad()
def load_student_from_onnx(model: DistillModel, path) -> None:
    proto = onnx.load(str(path))
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    convs = [(init[n.input[1]], init[n.input[2]] if len(n.input) > 2 else None)
             for n in proto.graph.node if n.op_type == "Conv" and n.input[1] in init]  # not the blur
    t_pairs, s_pairs = _conv_bn_pairs(model.teacher), _conv_bn_pairs(model.student)
    # teacher, student, then (graphs with heads) more teacher passes and the deep stages
    assert len(convs) >= len(t_pairs) + len(s_pairs), (len(convs), len(t_pairs), len(s_pairs))
    # The first half must be the (known) teacher, folded: that checks the node order assumption.
    for (w, _), (conv, bn) in zip(convs[:len(t_pairs)], t_pairs):
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(-1, 1, 1, 1)
        assert np.allclose(w, (conv.weight * scale).numpy(), atol=1e-5), "ONNX conv order is not teacher-then-student"
    for (w, b), (conv, bn) in zip(convs[len(t_pairs):len(t_pairs) + len(s_pairs)], s_pairs):
        conv.weight.copy_(torch.from_numpy(np.array(w)))
        bn.weight.fill_(1.0)
        bn.bias.copy_(torch.from_numpy(np.array(b)) if b is not None else torch.zeros_like(bn.bias))
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)  # (x - 0) / sqrt(1 - eps + eps) * 1 + b = x + b
    model.eval()  # eval-mode BN, or the next forward pass would overwrite these statistics


def student_model_from_onnx(path, teacher_weights=None) -> tuple[DistillModel, dict]:
    """The model of an exported file without its heads: config from dcam.train_config, student from the
    folded convs. Returns it with the file's metadata."""
    meta = read_metadata(path)
    model = DistillModel(config_from_train_config(json.loads(meta["dcam.train_config"])), teacher_weights)
    load_student_from_onnx(model, path)
    return model, meta


# Without a per-pixel normalisation the output map and the map score share their statistics, and the
# exporter keeps one of two identical initializers: read the twin's.
_TWINS = {"out_mu": "map_mu", "out_sd": "map_sd", "map_mu": "out_mu", "map_sd": "out_sd"}


def _initializer_name(init: dict, name: str) -> str:
    for n in (name, _TWINS.get(name)):
        # files up to v0.2.0 exported a wrapper module, which prefixed every name with "model."
        for key in (f"heads.{n}", f"model.heads.{n}"):
            if key in init:
                return key
    raise KeyError(f"heads.{name} is not an initializer of the ONNX file")


@torch.no_grad()
def model_from_onnx(path, teacher_weights=None) -> DistillModel:
    """The PyTorch model an exported file was made from: `student_model_from_onnx`, plus the fitted
    head buffers from the initializers of the same name (used for parity tests)."""
    model, meta = student_model_from_onnx(path, teacher_weights)
    if model.cfg.heads.enabled:
        record = TrainRecord.from_dict(json.loads(meta["dcam.train_config"]))
        # density_groups_per_class is absent up to v0.2.0: 1 Gaussian each
        heads = model.attach_heads(json.loads(meta["dcam.classes"]), record.density_groups_per_class,
                                   record.bank_entries or 0)
        init = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
        persistent = set(heads.state_dict())  # not the blur kernels, which the model makes itself
        for name, buf in heads.named_buffers():
            if name in persistent and not name.startswith("deep."):
                buf.copy_(torch.from_numpy(np.array(init[_initializer_name(init, name)])))
    return model.eval()
