"""Out-of-fold scores of the normal images, for a calibration that keeps its promise (calibrate.py).

The shipped heads fit their density Gaussians on the training images and every normalisation (density
z-scores, per-pixel map mean/std, map-score z-scores, output-map scale) on the held-out good images. A
held-out image's score from those heads is in-sample: its own map shaped the per-pixel statistics it is
divided by, and its own distance the z-scores, so its scores sit lower than a new image's and a
threshold set on them gives more false alarms than it promises (v0.3.0: 6 of 20 bottle test images at a
threshold meant for 1 %).

Here the held-out images are split into k folds per class; for each fold a copy of the heads is fitted
exactly like the shipped ones (same training images for the density, the other folds' held-out images
for every normalisation) and scores the fold. Every held-out image thus gets a score from heads it did
not help fit. The training images are not used: the student was trained on them, so their maps are
in-sample for the student (`oof_scores(train_maps=...)` can add them, for comparison only).
"""
from __future__ import annotations

import copy

import numpy as np

DEFAULT_FOLDS = 5


def folds(classes: list[str], k: int = DEFAULT_FOLDS, seed: int = 0) -> np.ndarray:
    """Fold index per image: each class's images shuffled (seed) and dealt round-robin into k folds."""
    cls = np.asarray(classes)
    out = np.zeros(len(cls), dtype=np.int64)
    rng = np.random.default_rng(seed)
    for c in sorted(set(classes)):
        idx = np.flatnonzero(cls == c)
        out[rng.permutation(idx)] = np.arange(len(idx)) % min(k, len(idx))
    return out


def _copy(heads):
    deep, heads.deep = heads.deep, None  # the frozen teacher stages: shared, not copied
    try:
        twin = copy.deepcopy(heads)
    finally:
        heads.deep = deep
    twin.deep = deep
    return twin


def _take(pooled: list[np.ndarray], sel: np.ndarray) -> list[np.ndarray]:
    return [p[sel] for p in pooled]


def oof_scores(heads, map_score_fn, train_pooled: list[np.ndarray], train_classes: list[str],
               val_pooled: list[np.ndarray], val_maps: np.ndarray, val_classes: list[str], max_groups: int = 1,
               k: int = DEFAULT_FOLDS, seed: int = 0, train_maps: np.ndarray | None = None) -> dict:
    """Out-of-fold scores of the held-out images (`val`), each from a copy of `heads` whose normalisations
    were fitted on the other folds (density Gaussians as shipped: on the training images, which the
    held-out images never enter). `heads` itself is left as it is. With `train_maps`, the training images
    get out-of-fold scores too (density Gaussians refitted without their fold; their maps are the
    student's training data, so these are for comparison, not calibration).
    Returns {"val": scores, "val_fold": fold per image, "train": scores or None}."""
    val_cls = np.asarray(val_classes)
    fold = folds(val_classes, k, seed)
    val_scores = np.zeros(len(val_cls), dtype=np.float64)
    for j in range(fold.max() + 1):
        fit, out = fold != j, fold == j
        twin = _copy(heads)
        twin.fit_features(map_score_fn, train_pooled, train_classes, _take(val_pooled, fit), val_maps[fit],
                          list(val_cls[fit]), max_groups, density=False)
        val_scores[out] = twin.score_features(map_score_fn, _take(val_pooled, out), val_maps[out])
    result = {"val": val_scores, "val_fold": fold, "train": None}
    if train_maps is not None:
        tr_cls = np.asarray(train_classes)
        tfold = folds(train_classes, k, seed)
        tr_scores = np.zeros(len(tr_cls), dtype=np.float64)
        for j in range(tfold.max() + 1):
            fit, out = tfold != j, tfold == j
            twin = _copy(heads)
            twin.fit_features(map_score_fn, _take(train_pooled, fit), list(tr_cls[fit]), val_pooled, val_maps,
                              val_classes, max_groups)
            tr_scores[out] = twin.score_features(map_score_fn, _take(train_pooled, out), train_maps[out])
        result["train"] = tr_scores
    return result
