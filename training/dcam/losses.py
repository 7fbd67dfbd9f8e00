"""Distillation losses on one scale's teacher map t and student map s, both [B,C,H,W]."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
