"""Distillation losses.

The terms are functions of one scale's teacher map t and student map s, both [B,C,H,W]. The loss
modules sum them over the scales; `build_loss` picks the module for a config once, when the model is
built, so the training step never branches on the method.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CBAM
from .config import Method, ModelConfig

PARTS = ("cos", "kl", "pos", "stfpm")  # the names a loss reports its terms under


def channel_cosine_loss(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Mean over channels of 1 - cos(t_c, s_c), each channel a vector over H*W."""
    return (1 - F.cosine_similarity(t.flatten(2), s.flatten(2), dim=2, eps=1e-8)).mean()


def spatial_kl_loss(t: torch.Tensor, s: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Per channel, KL(softmax_HW(t/T) || softmax_HW(s/T)) * T^2, averaged over channels."""
    log_pt = F.log_softmax(t.flatten(2) / temperature, dim=2)
    log_ps = F.log_softmax(s.flatten(2) / temperature, dim=2)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=2)
    return kl.mean() * temperature ** 2


def position_cosine_loss(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Mean over positions of 1 - cos over channels: the quantity the anomaly map reports."""
    return (1 - F.cosine_similarity(t, s, dim=1, eps=1e-8)).mean()


def stfpm_loss(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """STFPM: 1/2 * squared L2 between channel-normalised features, averaged over positions."""
    tn, sn = F.normalize(t, dim=1), F.normalize(s, dim=1)
    return 0.5 * ((tn - sn) ** 2).sum(dim=1).mean()


class DistillLoss(nn.Module):
    """sum over scales i of scale_weight[i] * sum of terms(i, t_i, s_i); forward returns
    (total, {part: weighted float value}) for logging."""

    def __init__(self, scale_weights=(1.0, 1.0, 1.0)):
        super().__init__()
        self.scale_weights = tuple(scale_weights)

    def terms(self, i: int, t: torch.Tensor, s: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, t_feats: list[torch.Tensor], s_feats: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        total, parts = 0.0, dict.fromkeys(PARTS, 0.0)
        for i, (t, s, w) in enumerate(zip(t_feats, s_feats, self.scale_weights)):
            for k, v in self.terms(i, t, s).items():
                parts[k] += float(v.detach()) * w
                total = total + w * v
        return total, parts


class STFPMLoss(DistillLoss):
    """Multi-class STFPM: the per-position distance between channel-normalised maps, every scale."""

    def terms(self, i, t, s):
        return {"stfpm": stfpm_loss(t, s)}


class DCAMLoss(DistillLoss):
    """DCAM as specified: a CBAM block per student scale (training only: trained here, never in the
    exported graph) refines the student map, then w_cos * channel-wise cosine + w_kl * spatial KL at
    temperature T between the teacher map and the attended student map. A zero weight drops its term."""

    def __init__(self, channels: list[int], scale_weights=(1.0, 1.0, 1.0), attention: bool = True, reduction: int = 4,
                 w_cos: float = 1.0, w_kl: float = 1.0, temperature: float = 4.0):
        super().__init__(scale_weights)
        self.attention = nn.ModuleList(CBAM(c, reduction) for c in channels) if attention else None
        self.w_cos, self.w_kl, self.temperature = w_cos, w_kl, temperature

    def attend(self, i: int, t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.attention is None:
            return t, s
        mc, ms = self.attention[i].masks(s)
        return t, s * mc * ms

    def terms(self, i, t, s):
        ta, sa = self.attend(i, t, s)
        terms = {}
        if self.w_cos:
            terms["cos"] = self.w_cos * channel_cosine_loss(ta, sa)
        if self.w_kl:
            terms["kl"] = self.w_kl * spatial_kl_loss(ta, sa, self.temperature)
        return terms


class DCAMFixedLoss(DCAMLoss):
    """The fix for both docs/DESIGN.md section 7 suspects: the student's CBAM masks (detached) also
    weight the teacher map (attend_teacher), and a per-position cosine term (w_pos) on the raw,
    un-attended maps trains what the anomaly map measures."""

    def __init__(self, channels: list[int], scale_weights=(1.0, 1.0, 1.0), attention: bool = True, reduction: int = 4,
                 w_cos: float = 1.0, w_kl: float = 1.0, temperature: float = 4.0, w_pos: float = 1.0,
                 attend_teacher: bool = True):
        super().__init__(channels, scale_weights, attention, reduction, w_cos, w_kl, temperature)
        self.w_pos, self.attend_teacher = w_pos, attend_teacher

    def attend(self, i, t, s):
        if self.attention is None or not self.attend_teacher:
            return super().attend(i, t, s)
        mc, ms = self.attention[i].masks(s)
        return t * (mc * ms).detach(), s * mc * ms

    def terms(self, i, t, s):
        pos = {"pos": self.w_pos * position_cosine_loss(t, s)} if self.w_pos else {}
        return {**pos, **super().terms(i, t, s)}


def build_loss(cfg: ModelConfig, channels: list[int]) -> DistillLoss:
    """The loss module of a config (the only place that looks at cfg.method for training)."""
    if cfg.method is Method.STFPM:
        return STFPMLoss(cfg.scale_weights)
    dcam = dict(scale_weights=cfg.scale_weights, attention=cfg.attention, reduction=cfg.reduction, w_cos=cfg.w_cos,
                w_kl=cfg.w_kl, temperature=cfg.temperature)
    if cfg.w_pos or cfg.attend_teacher:
        return DCAMFixedLoss(channels, **dcam, w_pos=cfg.w_pos, attend_teacher=cfg.attend_teacher)
    return DCAMLoss(channels, **dcam)
