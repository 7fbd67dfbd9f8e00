"""Checkpoints: the config, the trained (non-teacher) weights, the head classes and the run's record
(`RunInfo`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch

from .config import ModelConfig
from .record import TrainRecord
from .torch_model import DistillModel


def _is_teacher(key: str) -> bool:
    # The frozen ImageNet stages come from the weight packages again at load time.
    return key.startswith("teacher.") or key.startswith("heads.deep.")


def trained_state(model: DistillModel) -> dict:
    """Every weight and buffer that is not the frozen teacher's."""
    return {k: v for k, v in model.state_dict().items() if not _is_teacher(k)}


def upgrade_state(state: dict) -> dict:
    """Checkpoints from before the loss modules kept the CBAM blocks at `attention.*`."""
    return {("loss." + k if k.startswith("attention.") else k): v for k, v in state.items()}


@dataclass
class RunInfo:
    """What a checkpoint records beside the weights."""
    classes: list[str] = field(default_factory=list)
    train_config: TrainRecord = field(default_factory=TrainRecord)  # exported as dcam.train_config
    calibration: dict | None = None          # dcam.calibration
    calibration_report: dict | None = None   # the promise behind each threshold (calibrate.py)
    validation_estimate: dict | None = None
    data_root: str | None = None
    teacher_weights: str | None = None       # None: the packaged ImageNet weights
    student_from: str | None = None          # fit-heads --from-onnx: the file the student came from


_RUN_FIELDS = {f.name for f in fields(RunInfo)}


def save_checkpoint(model: DistillModel, path, info: RunInfo | None = None) -> None:
    h = model.heads
    heads = ({"classes": h.classes, "groups": h.density.groups, "bank_entries": h.bank.entries if h.bank is not None else 0}
             if h is not None else None)
    info = info or RunInfo()
    run = {**asdict(info), "train_config": info.train_config.to_dict(model.cfg)}  # flat, as exported
    torch.save({"config": model.cfg.to_dict(), "state_dict": trained_state(model), "heads": heads, **run}, path)


def load_checkpoint(path, teacher_weights: str | None = None) -> tuple[DistillModel, RunInfo]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    info = RunInfo(**{k: v for k, v in ckpt.items() if k in _RUN_FIELDS})
    info.train_config = TrainRecord.from_dict(info.train_config or {})
    model = DistillModel(ModelConfig.from_dict(ckpt["config"]), teacher_weights or info.teacher_weights)
    if ckpt.get("heads"):
        model.attach_heads(ckpt["heads"]["classes"], ckpt["heads"].get("groups"), ckpt["heads"].get("bank_entries", 0))
    missing, unexpected = model.load_state_dict(upgrade_state(ckpt["state_dict"]), strict=False)
    assert not unexpected and all(_is_teacher(k) for k in missing), (missing, unexpected)
    model.eval()
    return model, info
