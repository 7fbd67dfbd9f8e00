"""Per-class, per-pixel normalisation of the anomaly map from held-out good images.

Normal images of one class have a stable layout (bottle) or stable borders (tiles), so the student
misses the teacher by different amounts at different positions. Dividing out the per-pixel mean and
std of held-out normals turns the map into "how unusual is this value here". The std map is floored
at the class's median std, so pixels that never vary on 31 images cannot blow up.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class PixelNorm(nn.Module):
    def __init__(self, n_classes: int, size: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_classes, size, size))
        self.register_buffer("std", torch.ones(n_classes, size, size))

    def forward(self, amap: torch.Tensor, cls_idx: torch.Tensor) -> torch.Tensor:
        """amap [N,S,S], cls_idx [N] (int64) -> (amap - mean[c]) / std[c]."""
        return (amap - self.mean[cls_idx]) / self.std[cls_idx]

    @torch.no_grad()
    def fit(self, maps: np.ndarray, classes: list[str], class_names: list[str]) -> None:
        cls = np.asarray(classes)
        for k, c in enumerate(class_names):
            m = maps[cls == c].astype(np.float64)
            sd = m.std(axis=0)
            self.mean[k] = torch.from_numpy(m.mean(axis=0)).float()
            self.std[k] = torch.from_numpy(np.maximum(sd, max(float(np.median(sd)), 1e-6))).float()
