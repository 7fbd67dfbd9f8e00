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


class DensityHead(nn.Module):
    """distances(pooled) -> [N, C] per-class distances; forward -> per-class z-scores (held-out normals)."""

    def __init__(self, classes: list[str], dims: list[int]):
        super().__init__()
        self.classes, self.dims = list(classes), list(dims)
        c = len(classes)
        for i, d in enumerate(dims):
            self.register_buffer(f"mean{i}", torch.zeros(c, d))
            self.register_buffer(f"prec{i}", torch.zeros(c, d, d))
        self.register_buffer("z_mu", torch.zeros(c))
        self.register_buffer("z_sd", torch.ones(c))

    def distances(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for i, p in enumerate(pooled):
            diff = p[:, None, :] - getattr(self, f"mean{i}")  # [N, C, D] (no [None]: keeps the buffer name in ONNX)
            m = torch.einsum("ncd,cde,nce->nc", diff, getattr(self, f"prec{i}"), diff)
            total = total + m / self.dims[i]
        return total

    def forward(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        return (self.distances(pooled) - self.z_mu) / self.z_sd

    @torch.no_grad()
    def fit(self, pooled: list[np.ndarray], classes: list[str]) -> None:
        """Gaussians from the training images' pooled features (list over stages of [N, D])."""
        cls = np.asarray(classes)
        for i in range(len(self.dims)):
            for k, c in enumerate(self.classes):
                mu, prec = fit_gaussian(pooled[i][cls == c])
                getattr(self, f"mean{i}")[k] = torch.from_numpy(mu).float()
                getattr(self, f"prec{i}")[k] = torch.from_numpy(prec).float()

    @torch.no_grad()
    def fit_normalisation(self, pooled: list[np.ndarray], classes: list[str]) -> None:
        """Per class: mean/std of the distance of that class's held-out good images."""
        d = self.distances([torch.from_numpy(np.asarray(p)).float() for p in pooled]).numpy()
        cls = np.asarray(classes)
        for k, c in enumerate(self.classes):
            own = d[cls == c, k]
            self.z_mu[k] = float(own.mean())
            self.z_sd[k] = float(max(own.std(), 1e-6))
