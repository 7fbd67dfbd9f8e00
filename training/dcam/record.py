"""How a model was made: the run's record beside its `ModelConfig`. Exported flat into one JSON object,
`dcam.train_config`, whose keys are the contract (recover.py and older files read them); a field that
is not known (None) is left out rather than invented."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from .config import ModelConfig


@dataclass
class TrainRecord:
    variant: str = "dcam"
    classes: list[str] = field(default_factory=list)
    # The student's training (train.py); None when the student came from elsewhere and did not say.
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    val_fraction: float = 0.15
    seed: int = 0
    n_train: int | None = None
    n_val: int | None = None
    steps: int | None = None
    best_epoch: int | None = None
    train_time_s: float | None = None
    hardware: str | None = None
    student_from: str | None = None              # fit-heads --from-onnx: the file the student came from
    # The heads (fitted after training) and the calibration.
    bank_entries: int | None = None              # recover.model_from_onnx sizes the bank from it
    density_groups_per_class: list[int] | None = None  # recover.model_from_onnx needs them (absent: 1 each)
    heads_fit_s: float | None = None
    calibration_fpr: float | None = None
    calibration_rule: str | None = None
    oof_folds: int | str | None = None           # "leave-one-out" or a fold count
    val_from_test: float = 0.0                   # the share of each test defect type set aside as validation
    validation_estimate_kind: str | None = None
    other: dict = field(default_factory=dict)    # keys of older files this version does not know, kept as they were

    def to_dict(self, cfg: ModelConfig) -> dict:
        """`dcam.train_config`: the model's config and this record, flat."""
        run = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "other"}
        return {**self.other, **cfg.to_dict(), **{k: v for k, v in run.items() if v is not None}}

    @classmethod
    def from_dict(cls, d: dict) -> TrainRecord:
        """The record of a `dcam.train_config` or a checkpoint's; the model config's own keys are not part of
        it (config.config_from_train_config reads those)."""
        names = {f.name for f in fields(cls)} - {"other"}
        model_keys = set(ModelConfig.known(d))
        return cls(**{k: v for k, v in d.items() if k in names},
                   other={k: v for k, v in d.items() if k not in names and k not in model_keys})
