"""The teacher-student model: in-graph normalisation, frozen teacher, student, training loss, anomaly
map and (after training) the fitted heads. Its eval `forward` is exactly what `export.py` exports."""
from __future__ import annotations

import torch
from torch import nn

from .anomaly_map import AnomalyMap
from .backbones import build_backbone, build_deep_teacher, build_teacher
from .config import Density, ModelConfig
from .constants import IMAGENET_MEAN, IMAGENET_STD
from .heads import ImageHeads
from .losses import build_loss
from .patch_bank import LAYERS, PatchBank


class Normalize(nn.Module):
    """uint8 NHWC RGB -> float NCHW, ImageNet-normalised (inside the exported graph)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.permute(0, 3, 1, 2).float() - self.mean) / self.std


class DistillModel(nn.Module):
    """`loss` is the training objective chosen for cfg.method (losses.build_loss; its CBAM blocks, if any,
    are trained with the student and never exported); `forward` is the inference graph."""

    def __init__(self, cfg: ModelConfig, teacher_weights: str | None = None, teacher: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.normalize = Normalize()
        self.teacher = teacher if teacher is not None else build_teacher(cfg.backbone, teacher_weights)
        self.student = build_backbone(cfg.backbone)  # same architecture, random init
        self.loss = build_loss(cfg, self.student.channels)
        self.anomaly_map = self._anomaly_map()
        self.heads: ImageHeads | None = None  # attach_heads() after training
        self._teacher_weights = teacher_weights

    def _anomaly_map(self) -> AnomalyMap:
        cfg = self.cfg
        return AnomalyMap(cfg.input_size, cfg.combine, cfg.blur_sigma, cfg.score_rule)

    def reconfigure(self, **changes) -> None:
        """New map/head settings for a trained student (fit-heads, calibrate): drops fitted heads."""
        self.cfg = self.cfg.with_changes(**changes)
        self.anomaly_map = self._anomaly_map()
        self.heads = None

    def attach_heads(self, classes: list[str], groups: list[int] | None = None, bank_entries: int = 0) -> ImageHeads:
        """Unfitted heads of cfg; `groups` / `bank_entries`: the density Gaussians per class and the bank size
        of a fitted model being loaded (fit_bank sizes a new bank itself)."""
        cfg = self.cfg
        deep = build_deep_teacher(cfg.backbone, self._teacher_weights) if cfg.heads.density is Density.DEEP else None
        dims = list(self.teacher.channels) + (list(deep.channels) if deep is not None else [])
        bank = self._bank(bank_entries) if bank_entries else None
        self.heads = ImageHeads(classes, dims, cfg.input_size, cfg.heads.tta_views, cfg.heads.pixel_norm, cfg.heads.w_map, deep,
                                groups, cfg.heads.density_tie_dim, bank).eval()
        return self.heads

    def _bank(self, entries: int) -> PatchBank:
        return PatchBank(self.cfg.input_size, sum(self.teacher.channels[i] for i in LAYERS), entries, self.cfg.heads.bank_dims,
                         sigma=self.cfg.blur_sigma).eval()

    @torch.no_grad()
    def fit_bank(self, train_images, train_classes: list[str], val_images, batch_size: int = 16, log=print) -> None:
        """The heads' patch bank (cfg.heads.bank_fraction > 0): descriptors of the training images, thinned per class;
        then the scales of the bank and student maps from the held-out good images (before anything is fitted
        on the raw map, which they define)."""
        feats = [[] for _ in LAYERS]
        for i in range(0, len(train_images), batch_size):
            t = self.teacher_features(torch.as_tensor(train_images[i:i + batch_size]))
            for k, j in enumerate(LAYERS):
                feats[k].append(t[j])
        full = [None] * (max(LAYERS) + 1)
        for k, j in enumerate(LAYERS):
            full[j] = torch.cat(feats[k])
        cls = list(train_classes)
        positions = full[LAYERS[0]].shape[-1] * full[LAYERS[0]].shape[-2]
        entries = PatchBank.entries_per_class(self.heads.classes, {c: cls.count(c) for c in self.heads.classes}, positions,
                                              self.cfg.heads.bank_fraction, self.cfg.heads.bank_max_entries)
        self.heads.bank = self._bank(sum(entries.values()))
        self.heads.bank.fit(full, cls, entries)
        log(f"[heads] patch bank: {entries} descriptors of {positions} positions per image")
        bank_maps, student_maps = [], []
        for i in range(0, len(val_images), batch_size):
            x = self.normalize(torch.as_tensor(val_images[i:i + batch_size]))
            t = self.teacher(x)
            bank_maps.append(self.heads.bank.map(t))
            student_maps.append(self.anomaly_map.map(t, self.student(x)))
        self.heads.bank.fit_scales(torch.cat(bank_maps), torch.cat(student_maps), self.cfg.heads.bank_w_student)

    def fit_heads(self, classes: list[str], train_images, train_classes, val_images, val_classes, log=print) -> ImageHeads:
        """Attach the heads of cfg and fit them (heads.ImageHeads.fit) with this model's teacher and map."""
        heads = self.attach_heads(classes)
        if self.cfg.heads.bank_fraction > 0:
            self.fit_bank(train_images, train_classes, val_images, log=log)
        heads.fit(self.teacher, self.normalize, self.student_map, self.anomaly_map.score,
                  train_images, train_classes, val_images, val_classes, log=log, max_groups=self.cfg.heads.density_groups)
        return heads

    @torch.no_grad()
    def student_map(self, images_u8) -> torch.Tensor:
        """The raw (un-normalised) anomaly map, for fitting the heads."""
        x = self.normalize(torch.as_tensor(images_u8))
        return self._raw_map(x, self.teacher(x))

    def _raw_map(self, x: torch.Tensor, t: list[torch.Tensor]) -> torch.Tensor:
        """The student's map, or with a patch bank, the bank's map plus the weighted student map."""
        amap = self.anomaly_map.map(t, self.student(x))
        bank = self.heads.bank if self.heads is not None else None
        return bank.combine(amap, t) if bank is not None else amap

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher is frozen, BN statistics included
        if self.heads is not None:
            self.heads.eval()  # fitted, never trained
        return self

    @torch.no_grad()
    def teacher_features(self, images_u8: torch.Tensor) -> list[torch.Tensor]:
        return self.teacher(self.normalize(images_u8))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.student.parameters()) + list(self.loss.parameters())

    def forward(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exported inference graph (attention dropped): uint8 NHWC -> (anomaly_map [N,S,S], score [N]);
        with heads, the map on the score's scale and the fused density + normalised-map score."""
        x = self.normalize(images_u8)
        t = self.teacher(x)
        if self.heads is None:
            return self.anomaly_map(t, self.student(x))
        amap = self._raw_map(x, t)
        return self.heads.fuse(amap, self.anomaly_map.score, self.heads.pooled(self.teacher, x, t))
