"""Image-level density head: per-class Gaussians on globally average-pooled teacher features.

Each stage's pooled feature vector gets its own Gaussian per class (mean + Ledoit-Wolf shrunk
precision, fitted on the training images). A class may get several Gaussians (k-means groups of its
training images: magnetic tiles come in several kinds of surface); a wide stage (>= tie_dim channels)
then shares one covariance across the class's groups, fitted on the within-group residuals, so that each
group costs only its narrow stages' precisions (a 1280-channel precision is 6.5 MB). The image distance to a class is the sum over stages of
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


def fit_gaussian(x: np.ndarray, centered: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Mean and Ledoit-Wolf shrunk precision of the rows of x (float64 for the inverse). A tiny ridge
    keeps the inverse finite when features are constant; with < 2 images the covariance is the identity.
    centered: the rows are residuals around known means (tied covariances), not centred again."""
    from sklearn.covariance import LedoitWolf
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 2:
        return x.mean(axis=0), np.eye(x.shape[1])
    cov = LedoitWolf(assume_centered=centered).fit(x).covariance_
    cov = cov + np.eye(len(cov)) * 1e-6 * max(np.trace(cov) / len(cov), 1e-12)
    return x.mean(axis=0), np.linalg.inv(cov)


MIN_PER_GROUP = 50  # training images per Gaussian at the least, when a class gets several (density_groups)


def kmeans_groups(pooled: list[np.ndarray], k: int, seed: int = 0) -> np.ndarray:
    """Group labels of the rows by k-means on the stages' pooled features, each stage standardised and
    scaled by 1/sqrt(dim) so that every stage weighs alike (training/scripts/probe_mixture.py)."""
    from sklearn.cluster import KMeans
    z = np.concatenate([(x - x.mean(0)) / (x.std(0) + 1e-6) / np.sqrt(x.shape[1]) for x in pooled], 1)
    return KMeans(k, n_init=10, random_state=seed).fit_predict(z)


class DensityHead(nn.Module):
    """distances(pooled) -> [N, C] per-class distances; forward -> per-class z-scores (held-out normals).

    groups[c] Gaussians per class (default 1): the class distance is the minimum over its groups'
    distances (k-means groups of its training images, see `fit`). Stages with at least `tie_dim`
    channels (0: none) keep one precision per class, shared by its groups: `prec{i}` is then [C, D, D]
    instead of [sum(groups), D, D]. With one group per class both layouts are the same."""

    def __init__(self, classes: list[str], dims: list[int], groups: list[int] | None = None, tie_dim: int = 0):
        super().__init__()
        self.classes, self.dims = list(classes), list(dims)
        self.tied = [bool(tie_dim) and d >= tie_dim for d in self.dims]
        self._allocate(list(groups) if groups else [1] * len(classes))
        c = len(classes)
        self.register_buffer("z_mu", torch.zeros(c))
        self.register_buffer("z_sd", torch.ones(c))

    def _allocate(self, groups: list[int]) -> None:
        assert len(groups) == len(self.classes) and min(groups) >= 1, groups
        self.groups, m = groups, sum(groups)
        for i in range(len(self.dims)):  # a refit may change the layout: no stale buffers
            for name in (f"mean{i}", f"centre{i}", f"offset{i}", f"offset_sq{i}", f"prec{i}"):
                self._buffers.pop(name, None)
        for i, d in enumerate(self.dims):
            if self.tied[i] and max(groups) > 1:
                # a class centre (mean of its training images) and each group's mean relative to it:
                # distances are then taken near the data, where float32 loses little (_tied_distances)
                self.register_buffer(f"centre{i}", torch.zeros(len(groups), d))
                self.register_buffer(f"offset{i}", torch.zeros(m, d))
                self.register_buffer(f"offset_sq{i}", torch.zeros(m))  # o'Po of each group
            else:
                self.register_buffer(f"mean{i}", torch.zeros(m, d))
            self.register_buffer(f"prec{i}", torch.zeros(len(groups) if self.tied[i] else m, d, d))

    def _group_ranges(self) -> list[tuple[int, int]]:
        ends = np.cumsum(self.groups).tolist()
        return [(e - g, e) for g, e in zip(self.groups, ends)]

    def distances(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for i, p in enumerate(pooled):
            prec = getattr(self, f"prec{i}")
            if hasattr(self, f"centre{i}"):
                m = self._tied_distances(p, getattr(self, f"centre{i}"), getattr(self, f"offset{i}"),
                                         getattr(self, f"offset_sq{i}"), prec)
            else:
                diff = p[:, None, :] - getattr(self, f"mean{i}")  # [N, M, D] (no [None]: keeps the buffer name in ONNX)
                m = torch.einsum("ncd,cde,nce->nc", diff, prec, diff)
            total = total + m / self.dims[i]
        if max(self.groups) == 1:
            return total  # one Gaussian per class: the graph of every model up to v0.2.0
        return torch.stack([total[:, a:b].amin(dim=1) for a, b in self._group_ranges()], dim=1)

    def _tied_distances(self, p: torch.Tensor, centre: torch.Tensor, offset: torch.Tensor, offset_sq: torch.Tensor,
                        prec: torch.Tensor) -> torch.Tensor:
        """[N, M] squared Mahalanobis distances of p [N, D] to every group's mean under its class's one
        precision P, as x'Px' - 2 o'Px' + o'Po with x' = p - centre and o = the group's offset: one D x D
        product per class instead of one per group. Every buffer meets the input, so none is folded into
        a new constant by the exporter (a gathered [M, D, D] copy of P would be 6.5 MB per group) and each
        keeps its name in ONNX, which recover.model_from_onnx reads."""
        gi = torch.tensor([k for k, g in enumerate(self.groups) for _ in range(g)])
        x = p[:, None, :] - centre  # [N, C, D]
        y = torch.einsum("nkd,kde->nke", x, prec)
        xpx = (x * y).sum(-1)  # [N, C]
        return xpx[:, gi] - 2 * (y[:, gi] * offset).sum(-1) + offset_sq

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
            for i in range(len(self.dims)):
                if self.tied[i]:  # within-group residuals: the class's spread once the groups' means are removed
                    resid = np.concatenate([own[i][labels == g] - own[i][labels == g].mean(0) for g in range(self.groups[k])])
                    getattr(self, f"prec{i}")[k] = torch.from_numpy(fit_gaussian(resid, centered=True)[1]).float()
                    if hasattr(self, f"centre{i}"):
                        getattr(self, f"centre{i}")[k] = torch.from_numpy(own[i].mean(0)).float()
            for g in range(self.groups[k]):
                for i in range(len(self.dims)):
                    x = own[i][labels == g]
                    if hasattr(self, f"centre{i}"):
                        o = x.mean(0) - own[i].mean(0)
                        getattr(self, f"offset{i}")[row] = torch.from_numpy(o).float()
                        getattr(self, f"offset_sq{i}")[row] = float(o @ getattr(self, f"prec{i}")[k].double().numpy() @ o)
                    elif self.tied[i]:
                        getattr(self, f"mean{i}")[row] = torch.from_numpy(x.mean(0)).float()
                    else:
                        mu, prec = fit_gaussian(x)
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
