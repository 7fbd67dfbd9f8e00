"""Per-class score calibration from held-out defect-free images only.

Rule: threshold = the (1 - fpr) quantile of the class's held-out good scores (linear interpolation;
default fpr = 0.01, i.e. about 1 % false alarms on normal images), min / max = the smallest /
largest held-out good score. `_default` uses all classes' held-out scores pooled. docs/DESIGN.md section 1
then gives normalised = clamp((raw - threshold) / (max - min) + 0.5, 0, 1).
"""
from __future__ import annotations

import numpy as np

DEFAULT_FPR = 0.01


def calibrate_scores(scores: np.ndarray, fpr: float = DEFAULT_FPR) -> dict:
    scores = np.asarray(scores, dtype=np.float64)
    lo, hi = float(scores.min()), float(scores.max())
    if hi - lo < 1e-6:  # keep (max - min) usable as a divisor
        hi = lo + 1e-6
    return {"threshold": float(np.quantile(scores, 1 - fpr)), "min": lo, "max": hi}


def calibrate(scores: np.ndarray, classes: list[str], fpr: float = DEFAULT_FPR) -> dict:
    classes_arr = np.asarray(classes)
    out = {c: calibrate_scores(scores[classes_arr == c], fpr) for c in sorted(set(classes))}
    out["_default"] = calibrate_scores(scores, fpr)
    return out


def normalise(raw: np.ndarray, cal: dict) -> np.ndarray:
    return np.clip((np.asarray(raw) - cal["threshold"]) / (cal["max"] - cal["min"]) + 0.5, 0.0, 1.0)
