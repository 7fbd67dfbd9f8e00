"""Image-level density head: per-class Gaussians on globally average-pooled teacher features.

Each stage's pooled feature vector gets its own Gaussian per class (mean + Ledoit-Wolf shrunk
precision, fitted on the training images). The image distance to a class is the sum over stages of
the squared Mahalanobis distances, each divided by the stage's dimension so that wide stages do not
drown out narrow ones. The exported graph does not know the class: it computes the distance to every
class, normalised by that class's held-out good images (mean/std), and the caller takes the minimum.
Everything is constant buffers, so it exports into the same ONNX graph.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def pool(feats: list[torch.Tensor]) -> list[torch.Tensor]:
    return [f.float().mean(dim=(2, 3)) for f in feats]


def fit_gaussian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and Ledoit-Wolf shrunk precision of the rows of x (float64 for the inverse). A tiny ridge
    keeps the inverse finite when features are constant; with < 2 images the covariance is the identity."""
    from sklearn.covariance import LedoitWolf
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 2:
        return x.mean(axis=0), np.eye(x.shape[1])
    cov = LedoitWolf().fit(x).covariance_
    cov = cov + np.eye(len(cov)) * 1e-6 * max(np.trace(cov) / len(cov), 1e-12)
    return x.mean(axis=0), np.linalg.inv(cov)


MIN_PER_GROUP = 100  # training images per Gaussian at the least, when a class gets several (density_groups)


def kmeans_groups(pooled: list[np.ndarray], k: int, seed: int = 0) -> np.ndarray:
    """Group labels of the rows by k-means on the stages' pooled features, each stage standardised and
    scaled by 1/sqrt(dim) so that every stage weighs alike (training/scripts/probe_mixture.py)."""
    from sklearn.cluster import KMeans
    z = np.concatenate([(x - x.mean(0)) / (x.std(0) + 1e-6) / np.sqrt(x.shape[1]) for x in pooled], 1)
    return KMeans(k, n_init=10, random_state=seed).fit_predict(z)


class DensityHead(nn.Module):
    """distances(pooled) -> [N, C] per-class distances; forward -> per-class z-scores (held-out normals).

    groups[c] Gaussians per class (default 1): the class distance is the minimum over its groups'
    distances (k-means groups of its training images, see `fit`)."""

    def __init__(self, classes: list[str], dims: list[int], groups: list[int] | None = None):
        super().__init__()
        self.classes, self.dims = list(classes), list(dims)
        self._allocate(list(groups) if groups else [1] * len(classes))
        c = len(classes)
        self.register_buffer("z_mu", torch.zeros(c))
        self.register_buffer("z_sd", torch.ones(c))

    def _allocate(self, groups: list[int]) -> None:
        assert len(groups) == len(self.classes) and min(groups) >= 1, groups
        self.groups, m = groups, sum(groups)
        for i, d in enumerate(self.dims):
            self.register_buffer(f"mean{i}", torch.zeros(m, d))
            self.register_buffer(f"prec{i}", torch.zeros(m, d, d))

    def distances(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for i, p in enumerate(pooled):
            diff = p[:, None, :] - getattr(self, f"mean{i}")  # [N, M, D] (no [None]: keeps the buffer name in ONNX)
            m = torch.einsum("ncd,cde,nce->nc", diff, getattr(self, f"prec{i}"), diff)
            total = total + m / self.dims[i]
        if max(self.groups) == 1:
            return total  # one Gaussian per class: the graph of every model up to v0.2.0
        ends = np.cumsum(self.groups).tolist()
        return torch.stack([total[:, e - g:e].amin(dim=1) for g, e in zip(self.groups, ends)], dim=1)

    def forward(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        return (self.distances(pooled) - self.z_mu) / self.z_sd

    @torch.no_grad()
    def fit(self, pooled: list[np.ndarray], classes: list[str], max_groups: int = 1) -> None:
        """Gaussians from the training images' pooled features (list over stages of [N, D]). With
        max_groups > 1 a class gets min(max_groups, n_images // MIN_PER_GROUP) k-means groups (at least 1)."""
        cls = np.asarray(classes)
        self._allocate([max(1, min(max_groups, int((cls == c).sum()) // MIN_PER_GROUP)) for c in self.classes])
        row = 0
        for k, c in enumerate(self.classes):
            own = [p[cls == c] for p in pooled]
            labels = kmeans_groups(own, self.groups[k]) if self.groups[k] > 1 else np.zeros(len(own[0]), int)
            for g in range(self.groups[k]):
                for i in range(len(self.dims)):
                    mu, prec = fit_gaussian(own[i][labels == g])
                    getattr(self, f"mean{i}")[row] = torch.from_numpy(mu).float()
                    getattr(self, f"prec{i}")[row] = torch.from_numpy(prec).float()
                row += 1

    @torch.no_grad()
    def fit_normalisation(self, pooled: list[np.ndarray], classes: list[str]) -> None:
        """Per class: mean/std of the distance of that class's held-out good images."""
        d = self.distances([torch.from_numpy(np.asarray(p)).float() for p in pooled]).numpy()
        cls = np.asarray(classes)
        for k, c in enumerate(self.classes):
            own = d[cls == c, k]
            self.z_mu[k] = float(own.mean())
            self.z_sd[k] = float(max(own.std(), 1e-6))
