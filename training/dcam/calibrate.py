"""Per-class score calibration from defect-free images only.

Two rules (`--calibration`):

- `oof` (default since v0.4.0): the scores that set a threshold come from images that fitted nothing.
  Every held-out good image gets an out-of-fold score (oof.py: the heads' normalisations refitted
  without its fold), and the threshold is the split-conformal quantile of a class's n out-of-fold
  scores for the target false-alarm rate `fpr`: the k-th smallest with k = ceil((n + 1)(1 - fpr)), or
  the largest when that exceeds n. For a new defect-free image exchangeable with those n, the chance of
  a false alarm is then (n + 1 - k) / (n + 1) (the *promised* rate, <= fpr when n >= 1/fpr - 1), and the
  false-alarm rate of this particular threshold follows Beta(n + 1 - k, k), whose central 95 % interval
  is reported beside it. min / max = the smallest / largest out-of-fold score.
- `in-sample` (up to v0.3.0): the (1 - fpr) quantile (linear interpolation) of the held-out good
  scores of the model whose normalisations were fitted on those same images, which promises less than
  it keeps (models/MODEL_CARD.md).

`_default` uses all classes' scores pooled. docs/DESIGN.md section 1 then gives
normalised = clamp((raw - threshold) / (max - min) + 0.5, 0, 1) and is_anomaly <=> raw >= threshold.
"""
from __future__ import annotations

import math

import numpy as np

DEFAULT_FPR = 0.01
RULES = ("oof", "in-sample")


def _min_max(scores: np.ndarray) -> tuple[float, float]:
    lo, hi = float(scores.min()), float(scores.max())
    if hi - lo < 1e-6:  # keep (max - min) usable as a divisor
        hi = lo + 1e-6
    return lo, hi


def calibrate_scores(scores: np.ndarray, fpr: float = DEFAULT_FPR) -> dict:
    """The in-sample rule: the (1 - fpr) quantile of the scores."""
    scores = np.asarray(scores, dtype=np.float64)
    lo, hi = _min_max(scores)
    return {"threshold": float(np.quantile(scores, 1 - fpr)), "min": lo, "max": hi}


def calibrate(scores: np.ndarray, classes: list[str], fpr: float = DEFAULT_FPR) -> dict:
    classes_arr = np.asarray(classes)
    out = {c: calibrate_scores(scores[classes_arr == c], fpr) for c in sorted(set(classes))}
    out["_default"] = calibrate_scores(scores, fpr)
    return out


def conformal_rank(n: int, fpr: float) -> int:
    """1-based rank k of the threshold among n sorted out-of-fold scores: ceil((n + 1)(1 - fpr)), at most n."""
    return max(1, min(n, math.ceil((n + 1) * (1 - fpr) - 1e-9)))


def beta_interval(a: float, b: float, conf: float = 0.95) -> tuple[float, float]:
    from scipy.stats import beta
    return float(beta.ppf((1 - conf) / 2, a, b)), float(beta.ppf(1 - (1 - conf) / 2, a, b))


def clopper_pearson(x: int, n: int, conf: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for x successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    from scipy.stats import beta
    a = (1 - conf) / 2
    lo = 0.0 if x == 0 else float(beta.ppf(a, x, n - x + 1))
    hi = 1.0 if x == n else float(beta.ppf(1 - a, x + 1, n - x))
    return lo, hi


def calibrate_oof_scores(scores: np.ndarray, fpr: float = DEFAULT_FPR) -> tuple[dict, dict]:
    """(calibration entry, report) from one class's out-of-fold scores: the split-conformal threshold, the
    promised false-alarm rate and its 95 % interval."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    k = conformal_rank(n, fpr)
    lo, hi = _min_max(s)
    promised = (n + 1 - k) / (n + 1)
    ci = beta_interval(n + 1 - k, k)
    report = {"rule": "oof-conformal", "target_fpr": fpr, "n": n, "rank": k, "promised_fa": promised,
              "promised_fa_95": list(ci), "oof_above_threshold": int((s > s[k - 1]).sum())}
    return {"threshold": float(s[k - 1]), "min": lo, "max": hi}, report


def calibrate_oof(scores: np.ndarray, classes: list[str], fpr: float = DEFAULT_FPR) -> tuple[dict, dict]:
    """Per class and `_default` (pooled): (calibration for dcam.calibration, report for dcam.metrics)."""
    classes_arr = np.asarray(classes)
    cal, rep = {}, {}
    for c in sorted(set(classes)) + ["_default"]:
        cal[c], rep[c] = calibrate_oof_scores(scores if c == "_default" else scores[classes_arr == c], fpr)
    return cal, rep


def left_out_alarms(scores: np.ndarray, classes: list[str], fpr: float = DEFAULT_FPR) -> np.ndarray:
    """For validation: whether each image raises a false alarm at the threshold the oof rule sets from its
    class's *other* out-of-fold scores. Counting alarms at the threshold these same scores set would be
    in-sample for the threshold (at n < 1/fpr it is their maximum, which always counts itself)."""
    scores, cls = np.asarray(scores, np.float64), np.asarray(classes)
    out = np.zeros(len(scores), dtype=bool)
    for c in set(classes):
        idx = np.flatnonzero(cls == c)
        for i in idx:
            others = np.sort(scores[idx[idx != i]])
            if len(others):
                out[i] = scores[i] >= others[conformal_rank(len(others), fpr) - 1]
    return out


def normalise(raw: np.ndarray, cal: dict) -> np.ndarray:
    return np.clip((np.asarray(raw) - cal["threshold"]) / (cal["max"] - cal["min"]) + 0.5, 0.0, 1.0)
