"""Anomaly map and image score from teacher/student features (the part that goes into ONNX)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Combine, ScoreRule


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    radius = int(4 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


class GaussianBlur(nn.Module):
    """Separable Gaussian blur on [B,1,H,W] with reflect padding (no dark borders)."""

    def __init__(self, sigma: float = 4.0):
        super().__init__()
        k = gaussian_kernel1d(sigma)
        self.pad = len(k) // 2
        self.register_buffer("kx", k.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("ky", k.view(1, 1, -1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(F.pad(x, (self.pad, self.pad, 0, 0), mode="reflect"), self.kx)
        return F.conv2d(F.pad(x, (0, 0, self.pad, self.pad), mode="reflect"), self.ky)


class AnomalyMap(nn.Module):
    """Per scale 1 - cos over channels at each position, upsampled to S x S, summed (DCAM) or
    multiplied (STFPM) over scales, then blurred. Score = max of the map, or the mean of its top 1 %
    of values (less sensitive to a single noisy pixel; chosen on validation data, see MODEL_CARD)."""

    def __init__(self, size: int, combine: Combine = Combine.SUM, sigma: float = 4.0, score_rule: ScoreRule = ScoreRule.MAX):
        super().__init__()
        self.size, self.combine, self.score_rule = size, Combine(combine), ScoreRule(score_rule)
        self.k = max(1, size * size // 100)
        self.blur = GaussianBlur(sigma) if sigma > 0 else nn.Identity()

    def map(self, t_feats: list[torch.Tensor], s_feats: list[torch.Tensor]) -> torch.Tensor:
        amap = None
        for t, s in zip(t_feats, s_feats):
            d = 1 - F.cosine_similarity(t, s, dim=1, eps=1e-8).unsqueeze(1)
            d = F.interpolate(d, size=(self.size, self.size), mode="bilinear", align_corners=False)
            if amap is None:
                amap = d
            elif self.combine is Combine.SUM:
                amap = amap + d
            else:
                amap = amap * d
        return self.blur(amap).squeeze(1)

    def score(self, amap: torch.Tensor) -> torch.Tensor:
        if self.score_rule is ScoreRule.MAX:
            return amap.flatten(1).amax(dim=1)
        return torch.topk(amap.flatten(1), self.k, dim=1).values.mean(dim=1)

    def forward(self, t_feats: list[torch.Tensor], s_feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        amap = self.map(t_feats, s_feats)
        return amap, self.score(amap)
