"""Local patch memory bank for the anomaly map (PatchCore-style), fitted without gradient steps.

The frozen teacher's stride-8 and stride-16 features, each averaged over 3 x 3 neighbourhoods and the
stride-16 one resized to the stride-8 grid, are concatenated into one descriptor per stride-8 position.
Each class's training images give a bank of such descriptors, thinned by greedy k-centre selection
(a coreset that keeps rare normal patterns, which k-means would average away). At inference a
position's anomaly is its Euclidean distance to the nearest bank entry of any class (the union: the
graph does not know the class); the grid is upsampled to S x S and blurred like the student's map.

The nearest-neighbour search is the graph's largest cost: one [H*W, D] x [D, M] product per image.
It runs in chunks of the bank, so each chunk's distance block stays in cache (about 1.6x faster in
ONNX Runtime on one thread than one product), and the squared norms ride along as one extra input
dimension, so each chunk is a single MatMul followed by a ReduceMin.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .anomaly_map import GaussianBlur

LAYERS = (1, 2)  # the teacher's stride-8 and stride-16 stages (MultiScale outputs)
CHUNK = 512  # bank entries per MatMul in the graph (see the module docstring)


def descriptors(feats: list[torch.Tensor], layers: tuple[int, ...], agg: int) -> torch.Tensor:
    """[N, D, H, W]: the chosen teacher stages, averaged over agg x agg neighbourhoods, on the first one's grid."""
    out = []
    for i in layers:
        x = F.avg_pool2d(feats[i], agg, 1, agg // 2) if agg > 1 else feats[i]
        if out and x.shape[-2:] != out[0].shape[-2:]:
            x = F.interpolate(x, size=out[0].shape[-2:], mode="bilinear", align_corners=False)
        out.append(x)
    return torch.cat(out, 1)


def greedy_coreset(x: torch.Tensor, m: int, seed: int = 0, pool: int = 200_000, proj_dim: int = 32) -> torch.Tensor:
    """Indices of m rows of x chosen by greedy k-centre selection (each pick the row farthest from those
    picked so far), on a random projection and at most `pool` random candidate rows, as PatchCore
    approximates it (the exact pass over 660k rows takes ~20 min on one core)."""
    g = torch.Generator().manual_seed(seed)
    cand = torch.randperm(len(x), generator=g)[:pool] if len(x) > pool else torch.arange(len(x))
    if m >= len(cand):
        return cand
    p = x[cand] @ torch.randn(x.shape[1], proj_dim, generator=g)
    sq = (p ** 2).sum(1)
    first = int(torch.randint(len(p), (1,), generator=g))
    picked = [first]
    dist = sq - 2 * (p @ p[first]) + sq[first]
    for _ in range(m - 1):
        i = int(dist.argmax())
        picked.append(i)
        dist = torch.minimum(dist, sq - 2 * (p @ p[i]) + sq[i])
    return cand[torch.tensor(picked)]


class PatchBank(nn.Module):
    """Nearest-neighbour distance map of the teacher's local descriptors to a bank of normal ones.

    Buffers (named so that recover.model_from_onnx can read them back): `chunk0`, `chunk1`, ... [D + 1, <= CHUNK]
    hold -2 x each entry and its squared norm, so that [q, 1] @ chunk = |b|^2 - 2 q.b (one buffer per chunk:
    a slice of one big buffer would be exported as a new, renamed constant); `scale` divides the
    distances (set so held-out normal maps peak near 1, which puts the bank and the student map on one
    scale before they are added); `w_student` weighs the student's map in the sum."""

    def __init__(self, size: int, channels: int, entries: int, dims: int = 0, layers: tuple[int, ...] = LAYERS,
                 agg: int = 3, sigma: float = 4.0):
        super().__init__()
        self.size, self.layers, self.agg = size, tuple(layers), agg
        dims = dims or channels
        # PCA of the training descriptors (identity when dims = channels): halves the search at 64 of 128
        self.register_buffer("centre", torch.zeros(channels))
        self.register_buffer("proj", torch.eye(channels, dims))
        self.blur = GaussianBlur(sigma) if sigma > 0 else nn.Identity()
        self.entries = entries
        for i, a in enumerate(range(0, entries, CHUNK)):  # -2 x entries and squared norms
            self.register_buffer(f"chunk{i}", torch.zeros(dims + 1, min(CHUNK, entries - a)))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("w_student", torch.zeros(()))

    def distances(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """[N, H, W] Euclidean distance of every position's descriptor to its nearest bank entry."""
        x = descriptors(feats, self.layers, self.agg)
        n, d, h, w = x.shape
        q = (x.permute(0, 2, 3, 1).reshape(n, h * w, d) - self.centre) @ self.proj
        qq = (q * q).sum(-1)
        q1 = torch.cat([q, torch.ones_like(q[..., :1])], -1)
        best = None
        for chunk in self.chunks():
            m = (q1 @ chunk).amin(-1)
            best = m if best is None else torch.minimum(best, m)
        return (best + qq).clamp_min(0).sqrt().view(n, h, w)

    def chunks(self) -> list[torch.Tensor]:
        return [getattr(self, f"chunk{i}") for i in range((self.entries + CHUNK - 1) // CHUNK)]

    def map(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """[N, S, S] bank map on the scale the fit set."""
        d = self.distances(feats).unsqueeze(1) / self.scale
        d = F.interpolate(d, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.blur(d).squeeze(1)

    def combine(self, student_map: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        """The model's raw map: bank map + w_student x the student's map (each on its held-out scale)."""
        return self.map(feats) + self.w_student * student_map

    @staticmethod
    def entries_per_class(classes: list[str], n_images: dict[str, int], positions: int, fraction: float,
                          max_entries: int = 0) -> dict[str, int]:
        """How many descriptors each class keeps: `fraction` of its training positions (at least one), all
        scaled down together when they would exceed `max_entries` (0: no cap). The search costs in proportion
        to the bank, which is the union of the classes': the cap keeps a model with more classes or more
        training images at the throughput it was sized for."""
        want = {c: fraction * n_images[c] * positions for c in classes}
        total = sum(want.values())
        shrink = max_entries / total if max_entries and total > max_entries else 1.0
        return {c: max(1, int(w * shrink + 0.5)) for c, w in want.items()}

    @torch.no_grad()
    def fit(self, feats: list[torch.Tensor], classes: list[str], entries: dict[str, int], seed: int = 0) -> None:
        """The bank from training images' teacher features (list over stages of [N, C, H, W]):
        `entries[c]` descriptors of class c's images, chosen by greedy_coreset."""
        x = descriptors(feats, self.layers, self.agg)
        flat = x.permute(0, 2, 3, 1).reshape(len(x), -1, x.shape[1])
        every = flat.reshape(-1, x.shape[1])
        self.centre.copy_(every.mean(0))
        if self.proj.shape[1] < self.proj.shape[0]:
            sample = every[torch.randperm(len(every), generator=torch.Generator().manual_seed(seed))[:200_000]]
            v = torch.linalg.svd(sample - self.centre, full_matrices=False)[2][:self.proj.shape[1]]
            self.proj.zero_()  # fewer descriptors than dims (tiny data): the extra columns stay 0
            self.proj[:, :len(v)] = v.T
        flat = (flat - self.centre) @ self.proj
        cls = np.asarray(classes)
        parts = []
        for c, m in entries.items():
            own = flat[torch.from_numpy(cls == c)].reshape(-1, flat.shape[-1])
            parts.append(own[greedy_coreset(own, m, seed)])
        bank = torch.cat(parts)
        assert bank.shape == (self.entries, self.proj.shape[1]), (bank.shape, self.entries, self.proj.shape)
        aug = torch.cat([-2 * bank.T, (bank * bank).sum(1)[None]], 0)
        for i, chunk in enumerate(self.chunks()):
            chunk.copy_(aug[:, i * CHUNK:i * CHUNK + chunk.shape[1]])

    @torch.no_grad()
    def fit_scales(self, bank_maps: torch.Tensor, student_maps: torch.Tensor, w_student: float) -> None:
        """Scale from held-out normal images' maps: the bank map's 99th percentile becomes 1, and the
        student map is weighed so that its 99th percentile becomes w_student."""
        self.scale.mul_(torch.quantile(bank_maps.flatten()[::7], 0.99))
        self.w_student.fill_(w_student / float(torch.quantile(student_maps.flatten()[::7], 0.99).clamp_min(1e-9)))
