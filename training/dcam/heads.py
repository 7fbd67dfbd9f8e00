"""Heads on top of the teacher-student map, fitted after training (no gradient steps):

- bank (optional): a local patch memory bank on the teacher's features (patch_bank.py); its distance map,
  plus the student's map at a chosen weight, is the model's raw map, which everything below treats as
  "the map";
- density: per-class Gaussians on pooled teacher features (density.py), optionally averaged over
  flip/transpose views of the image and extended by the teacher's stride-32 stages;
- pixel_norm: per-class per-pixel map normalisation (pixel_norm.py), for the image score only ("score":
  on validation it helped the image score but hurt pixel AUROC) or for the output map too ("map");
- fusion: the graph does not know the class, so the class is the one with the smallest normalised
  density distance; the map score is normalised by that class's held-out stats and added:
  score = z_density + w_map * z_map. The map is still returned for localisation, put on the score's
  z scale by a per-class affine map (its held-out top-1 % mean and std), so that the operator's heatmap
  (each pixel normalised with the score calibration) stays readable; a per-class affine transform
  leaves per-class pixel AUROC and AU-PRO unchanged.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .config import PixelNormMode
from .density import DensityHead, pool
from .patch_bank import PatchBank
from .pixel_norm import PixelNorm

# D4 as (transpose, flip W, flip H); the first k are used for k views (1, 2, 4 or 8).
VIEWS = ((False, False, False), (False, True, False), (False, False, True), (False, True, True),
         (True, False, False), (True, True, False), (True, False, True), (True, True, True))


def view(x: torch.Tensor, v: tuple[bool, bool, bool]) -> torch.Tensor:
    tr, fw, fh = v
    if tr:
        x = x.transpose(2, 3)
    if fw:
        x = x.flip(3)
    if fh:
        x = x.flip(2)
    return x


class ImageHeads(nn.Module):
    def __init__(self, classes: list[str], dims: list[int], size: int, views: int = 1, pixel_norm: PixelNormMode = PixelNormMode.NONE,
                 w_map: float = 1.0, deep: nn.Module | None = None, groups: list[int] | None = None, tie_dim: int = 0,
                 bank: PatchBank | None = None):
        super().__init__()
        self.bank = bank
        assert views in (1, 2, 4, 8)
        self.classes, self.views, self.w_map, self.norm_mode = list(classes), views, w_map, PixelNormMode(pixel_norm)
        self.deep = deep  # frozen teacher stages past stride 16 (density only); not saved in checkpoints
        self.density = DensityHead(classes, dims, groups, tie_dim)  # groups: Gaussians per class, as fitted (density.py)
        self.pixel_norm = PixelNorm(len(classes), size) if self.norm_mode is not PixelNormMode.NONE else None
        self.register_buffer("map_mu", torch.zeros(len(classes)))
        self.register_buffer("map_sd", torch.ones(len(classes)))
        self.register_buffer("out_mu", torch.zeros(len(classes)))  # output-map scale (raw or normalised map)
        self.register_buffer("out_sd", torch.ones(len(classes)))

    def pooled(self, teacher: nn.Module, x: torch.Tensor, t_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Pooled teacher features averaged over the views (view 0 reuses the map's teacher pass)."""
        acc = None
        for i in range(self.views):
            feats = list(t_feats) if i == 0 else teacher(view(x, VIEWS[i]))
            if self.deep is not None:
                feats = feats + self.deep(feats[-1])
            p = pool(feats)
            acc = p if acc is None else [a + b for a, b in zip(acc, p)]
        return [a / self.views for a in acc]

    def fuse(self, amap: torch.Tensor, map_score_fn, pooled: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        z, idx = self.density(pooled).min(dim=1)
        nmap = self.pixel_norm(amap, idx) if self.pixel_norm is not None else amap
        out = nmap if self.norm_mode is PixelNormMode.MAP else amap
        # [idx].view(): keeps the buffer names in ONNX (recover.model_from_onnx reads them back)
        out = (out - self.out_mu[idx].view(-1, 1, 1)) / self.out_sd[idx].view(-1, 1, 1)
        if self.w_map == 0:
            return out, z
        zm = (map_score_fn(nmap) - self.map_mu[idx]) / self.map_sd[idx]
        return out, z + self.w_map * zm

    @torch.no_grad()
    def features(self, teacher, normalize, student_map, images: np.ndarray, batch_size: int = 16,
                 with_maps: bool = True) -> tuple[list[np.ndarray], np.ndarray | None]:
        """What the heads are fitted on: the pooled teacher features (list over stages of [N, D]) and,
        with_maps, the raw student maps [N, S, S] of the images."""
        out, maps = None, []
        for i in range(0, len(images), batch_size):
            x = normalize(torch.from_numpy(images[i:i + batch_size]))
            p = [q.numpy() for q in self.pooled(teacher, x, teacher(x))]
            out = [[q] for q in p] if out is None else [o + [q] for o, q in zip(out, p)]
            if with_maps:
                maps.append(student_map(images[i:i + batch_size]).numpy())
        return [np.concatenate(o) for o in out], (np.concatenate(maps) if with_maps else None)

    @torch.no_grad()
    def fit(self, teacher, normalize, student_map, map_score_fn, train_images: np.ndarray, train_classes: list[str],
            val_images: np.ndarray, val_classes: list[str], batch_size: int = 16, log=print, max_groups: int = 1) -> None:
        """Gaussians on the training images; every normalisation on the held-out good images."""
        log(f"[heads] density: {len(train_images)} train images, {self.views} view(s)")
        train_pooled, _ = self.features(teacher, normalize, student_map, train_images, batch_size, with_maps=False)
        val_pooled, val_maps = self.features(teacher, normalize, student_map, val_images, batch_size)
        self.fit_features(map_score_fn, train_pooled, train_classes, val_pooled, val_maps, val_classes, max_groups)

    @torch.no_grad()
    def fit_features(self, map_score_fn, train_pooled: list[np.ndarray], train_classes: list[str],
                     val_pooled: list[np.ndarray], val_maps: np.ndarray, val_classes: list[str], max_groups: int = 1,
                     density: bool = True) -> None:
        """`fit` on precomputed features (`features`): the density Gaussians on the training images' pooled
        features (kept as they are with density=False), the density z-scores, per-pixel statistics and
        map-score z-scores on the held-out images'. Out-of-fold calibration (oof.py) refits copies this way."""
        if density:
            self.density.fit(train_pooled, train_classes, max_groups)
        self.density.fit_normalisation(val_pooled, val_classes)
        maps = np.asarray(val_maps, dtype=np.float32)
        cls = np.asarray(val_classes)
        idx = torch.from_numpy(np.array([self.classes.index(c) for c in val_classes]))
        if self.norm_mode is not PixelNormMode.MAP:
            self._fit_stats(self.out_mu, self.out_sd, map_score_fn(torch.from_numpy(maps)).numpy(), cls)
        if self.pixel_norm is not None:
            self.pixel_norm.fit(maps, val_classes, self.classes)
            maps = self.pixel_norm(torch.from_numpy(maps), idx).numpy()
        self._fit_stats(self.map_mu, self.map_sd, map_score_fn(torch.from_numpy(maps)).numpy(), cls)
        if self.norm_mode is PixelNormMode.MAP:
            self.out_mu.copy_(self.map_mu); self.out_sd.copy_(self.map_sd)

    @torch.no_grad()
    def score_features(self, map_score_fn, pooled: list[np.ndarray], maps: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """The image scores the graph gives for precomputed features (`features`)."""
        out = []
        for i in range(0, len(maps), batch_size):
            p = [torch.from_numpy(np.asarray(q[i:i + batch_size])).float() for q in pooled]
            out.append(self.fuse(torch.from_numpy(np.asarray(maps[i:i + batch_size], dtype=np.float32)), map_score_fn, p)[1].numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def _fit_stats(self, mu: torch.Tensor, sd: torch.Tensor, scores: np.ndarray, cls: np.ndarray) -> None:
        for k, c in enumerate(self.classes):
            mu[k] = float(scores[cls == c].mean())
            sd[k] = float(max(scores[cls == c].std(), 1e-6))
