"""Prediction, metrics (image AUROC, pixel AUROC, AU-PRO@0.3) and report artefacts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score, roc_curve
from tqdm import tqdm

from .calibrate import clopper_pearson, normalise
from .data import SYNTH_KINDS, Split, synthetic_anomalies, synthetic_defects


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, batch_size: int = 16, progress: bool = True,
            t_cache: list[torch.Tensor] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC -> (maps [N,S,S], scores [N]) with the same graph that gets exported.
    t_cache: precomputed teacher maps (ablation runs share them across variants)."""
    model.eval()
    maps, scores = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="predict", leave=False, disable=not progress):
        x = torch.from_numpy(images[i:i + batch_size])
        if t_cache is None:
            m, s = model(x)
        else:
            m, s = model.anomaly_map([t[i:i + batch_size].float() for t in t_cache], model.student(model.normalize(x)))
        maps.append(m.numpy()); scores.append(s.numpy())
    return np.concatenate(maps), np.concatenate(scores)


def au_pro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to FPR = fpr_limit, divided by fpr_limit.

    PRO at a threshold = mean over all ground-truth connected regions (8-connectivity, per image)
    of the fraction of the region's pixels above the threshold; FPR = fraction of defect-free
    pixels above it. Computed exactly over all thresholds by sorting (as MVTec's reference code).
    """
    masks = masks.astype(bool)
    pro_w = np.zeros(masks.shape, dtype=np.float64)
    regions = []
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        for r in range(1, n + 1):
            regions.append((i, lab == r))
    if not regions or masks.all():
        return float("nan")
    for i, reg in regions:
        pro_w[i][reg] = 1.0 / (reg.sum() * len(regions))
    fpr_w = np.where(masks, 0.0, 1.0 / (~masks).sum())
    order = np.argsort(-maps.ravel(), kind="stable")
    scores = maps.ravel()[order]
    fpr = np.cumsum(fpr_w.ravel()[order])
    pro = np.cumsum(pro_w.ravel()[order])
    keep = np.r_[np.diff(scores) != 0, True]  # one point per distinct threshold (ties move together)
    fpr, pro = np.r_[0.0, fpr[keep]], np.r_[0.0, pro[keep]]
    cut = np.searchsorted(fpr, fpr_limit, side="right")
    x, y = fpr[:cut], pro[:cut]
    if cut < len(fpr):  # close the curve exactly at fpr_limit
        x = np.r_[x, fpr_limit]
        y = np.r_[y, np.interp(fpr_limit, fpr[cut - 1:cut + 1], pro[cut - 1:cut + 1])]
    return float(np.trapezoid(y, x) / fpr_limit)


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else float("nan")


def class_metrics(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray | None, maps: np.ndarray | None,
                  with_pro: bool = True) -> dict:
    out = {"image_auroc": 100 * _auroc(labels, scores), "n_good": int((labels == 0).sum()), "n_defect": int(labels.sum())}
    if masks is not None and maps is not None:
        out["pixel_auroc"] = 100 * _auroc(masks.ravel(), maps.ravel())
        if with_pro:
            out["au_pro"] = 100 * au_pro(masks, maps)
    return out


def recall_at_fa(good: np.ndarray, bad: np.ndarray, fa: float) -> float:
    """Highest share of `bad` flagged by any threshold that flags at most a share `fa` of `good`
    (flagged: score >= threshold; the best such threshold lies just above the (m+1)-th largest good
    score, m = floor(fa * n_good))."""
    good, bad = np.sort(np.asarray(good, np.float64))[::-1], np.asarray(bad, np.float64)
    if len(bad) == 0:
        return float("nan")
    m = int(np.floor(fa * len(good) + 1e-9))
    return 1.0 if m >= len(good) else float((bad > good[m]).mean())


def operating_metrics(good: np.ndarray, bad: np.ndarray, threshold: float, alarms: np.ndarray | None = None) -> dict:
    """What a user who acts on `score >= threshold` gets (in %): false alarms on the good images (with the
    Clopper-Pearson 95 % interval of that rate), recall on the defective ones, and, for comparison, the
    recall the scores allow at 1 % and 5 % false alarms (thresholds set on these very good images).
    `alarms`: per good image, whether it raised a false alarm, where that is not `good >= threshold` (the
    good images set the threshold: calibrate.left_out_alarms)."""
    good, bad = np.asarray(good, np.float64), np.asarray(bad, np.float64)
    fa = int((good >= threshold).sum() if alarms is None else np.asarray(alarms).sum())
    hit = int((bad >= threshold).sum())
    out = {"threshold": float(threshold), "false_alarms": fa, "n_good": len(good)}
    if len(good):
        lo, hi = clopper_pearson(fa, len(good))
        out |= {"fa_at_threshold": 100 * fa / len(good), "fa_at_threshold_95": [round(100 * lo, 2), round(100 * hi, 2)]}
    if len(bad):
        out |= {"detected": hit, "n_defect": len(bad), "recall_at_threshold": 100 * hit / len(bad)}
        if len(good):
            out |= {"recall_at_1pct_fa": 100 * recall_at_fa(good, bad, 0.01), "recall_at_5pct_fa": 100 * recall_at_fa(good, bad, 0.05)}
    return out


OPERATING_KEYS = ("fa_at_threshold", "recall_at_threshold", "recall_at_1pct_fa", "recall_at_5pct_fa")


def _mean(per_class: dict) -> dict:
    """Mean over the classes that have the metric (pixel metrics skip classes without masks)."""
    out = {}
    for k in ("image_auroc", "pixel_auroc", "au_pro") + OPERATING_KEYS:
        vals = [v[k] for v in per_class.values() if k in v and np.isfinite(v[k])]
        if vals:
            out[k] = float(np.mean(vals))
    return out


def evaluate_split(model, split: Split, progress: bool = True, with_pro: bool = True,
                   t_cache: list | None = None, calibration: dict | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Per-class metrics; with `calibration` (dcam.calibration), also what users act on: false alarms and
    recall at each class's threshold, recall at 1 % / 5 % false alarms (operating_metrics)."""
    maps, scores = predict(model, split.images, progress=progress, t_cache=t_cache)
    classes = np.asarray(split.classes)
    per_class = {}
    for cls in sorted(set(split.classes)):
        sel = classes == cls
        no_masks = split.masks is None or cls in split.no_mask_classes
        per_class[cls] = class_metrics(split.labels[sel], scores[sel], None if no_masks else split.masks[sel],
                                       maps[sel], with_pro)
        if calibration is not None:
            cal = calibration.get(cls, calibration.get("_default"))
            lab = split.labels[sel]
            per_class[cls].update(operating_metrics(scores[sel][lab == 0], scores[sel][lab == 1], cal["threshold"]))
        if no_masks:
            per_class[cls]["pixel_metrics"] = "no masks"
        if split.defects:  # image (and pixel) AUROC of each defect type against the class's good images
            defects = np.asarray(split.defects)
            good = sel & (defects == "good")
            kinds = [d for d in sorted(set(defects[sel])) if d != "good"]
            per_class[cls]["per_defect_image_auroc"] = {
                str(d): round(100 * _auroc(np.r_[np.zeros(good.sum()), np.ones((sel & (defects == d)).sum())],
                                      np.r_[scores[good], scores[sel & (defects == d)]]), 2) for d in kinds}
            if not no_masks:  # one defect type's masked pixels among its own and the good images' pixels
                per_class[cls]["per_defect_pixel_auroc"] = {
                    str(d): round(100 * _auroc(split.masks[good | (sel & (defects == d))].ravel(),
                                               maps[good | (sel & (defects == d))].ravel()), 2) for d in kinds}
    return {"per_class": {k: _round(v) for k, v in per_class.items()}, "mean": _round(_mean(per_class))}, maps, scores


def synthetic_val_split(val: Split) -> Split:
    """Held-out good images plus CutPaste-style fakes of them (label 1, with masks)."""
    fake, fake_masks = synthetic_anomalies(val.images, seed=123)
    return Split(np.concatenate([val.images, fake]), val.classes * 2, val.paths * 2,
                 np.r_[np.zeros(len(val)), np.ones(len(val))].astype(np.int64),
                 np.concatenate([np.zeros_like(fake_masks), fake_masks]))


def synthetic_val_metrics(model, val: Split, progress: bool = True, t_cache: list | None = None) -> dict:
    """Model-selection proxy that never touches test: held-out good vs CutPaste-style fakes of them.
    t_cache, when given, must be the teacher maps of synthetic_val_split(val).images."""
    both = synthetic_val_split(val)
    metrics, maps, _ = evaluate_split(model, both, progress=progress, with_pro=False, t_cache=t_cache)
    metrics["score_rules"] = score_rules(both, maps)
    return metrics


def estimate_split(val: Split, defects: Split | None = None, per_image: int = 2, seed: int = 7,
                   source: str = "--val-defects") -> tuple[Split, dict[str, str]]:
    """Held-out good images plus defects: real labelled ones where the class has some (`defects`: the
    user's --val-defects, or images carved out of the test split), else harder synthetic ones (thin
    cracks, small holes, low-contrast unevenness, foreign texture). Returns the split and, per class,
    which kind of estimate it gives."""
    real = set(defects.classes) if defects is not None else set()
    synth_idx = [i for i, c in enumerate(val.classes) if c not in real]
    s_imgs, s_masks, s_cls, s_kinds = synthetic_defects(val.images[synth_idx], [val.classes[i] for i in synth_idx],
                                                        per_image, seed)
    parts = [(s_imgs, s_masks, s_cls, s_kinds)]
    if real:
        parts.append((defects.images, defects.masks, defects.classes, defects.defects))
    imgs = np.concatenate([p[0] for p in parts])
    masks = np.concatenate([p[1] for p in parts])
    cls = [c for p in parts for c in p[2]]
    kinds_of = {c: (f"real labelled validation defects ({defects.classes.count(c)} images, {source})" if c in real else
                    f"synthetic defects on held-out good images ({'/'.join(SYNTH_KINDS)}, {per_image} per image)")
                for c in sorted(set(val.classes))}
    both = Split(np.concatenate([val.images, imgs]), list(val.classes) + cls, list(val.paths) + [""] * len(imgs),
                 np.r_[np.zeros(len(val)), np.ones(len(imgs))].astype(np.int64),
                 np.concatenate([np.zeros((len(val),) + val.images.shape[1:3], bool), masks]),
                 ["good"] * len(val) + [k for p in parts for k in p[3]],
                 defects.no_mask_classes if defects is not None else set())
    return both, kinds_of


def validation_estimate(model, val: Split, defects: Split | None = None, progress: bool = True,
                        source: str = "--val-defects", calibration: dict | None = None,
                        good_scores: np.ndarray | None = None, good_alarms: np.ndarray | None = None) -> dict:
    """What a training run prints as its estimate of test image AUROC (never uses a test image). With
    `calibration`, also the operating metrics at its thresholds, the false alarms counted on `good_scores`
    (the held-out good images' out-of-fold scores, oof.py) where given: the model's own scores of those
    images are in-sample for its normalisations; `good_alarms`: their false alarms at thresholds set
    without them (calibrate.left_out_alarms), as those scores set the threshold."""
    both, kinds = estimate_split(val, defects, source=source)
    metrics, _, scores = evaluate_split(model, both, progress=progress, with_pro=True)
    n = len(val)
    good = scores[:n] if good_scores is None else np.asarray(good_scores)
    val_cls, bad_cls = np.asarray(val.classes), np.asarray(both.classes[n:])
    for c, kind in kinds.items():
        metrics["per_class"][c]["estimate_kind"] = kind
        if calibration is not None:
            t = calibration.get(c, calibration.get("_default"))["threshold"]
            op = operating_metrics(good[val_cls == c], scores[n:][bad_cls == c], t,
                                   None if good_alarms is None else np.asarray(good_alarms)[val_cls == c])
            metrics["per_class"][c].update({k: (round(v, 2) if isinstance(v, float) else v) for k, v in op.items()})
            metrics["per_class"][c]["good_scores"] = "out-of-fold" if good_scores is not None else "in-sample"
            if good_alarms is not None:
                metrics["per_class"][c]["false_alarms_counted"] = "each image at the threshold set without it"
    if calibration is not None:
        metrics["mean"] = _round(_mean(metrics["per_class"]))
    metrics["kind"] = "; ".join(f"{c}: {k}" for c, k in kinds.items())
    return metrics


def score_rules(split: Split, maps: np.ndarray) -> dict:
    """Image AUROC per class for alternative image-score rules computed from the same maps
    (max = what the exported graph outputs; top-1% mean = mean of the largest 1 % of map values)."""
    flat = maps.reshape(len(maps), -1)
    k = max(1, flat.shape[1] // 100)
    rules = {"max": flat.max(1), "top1pct_mean": np.partition(flat, -k, axis=1)[:, -k:].mean(1)}
    classes = np.asarray(split.classes)
    return {name: {cls: round(100 * _auroc(split.labels[classes == cls], sc[classes == cls]), 2)
                   for cls in sorted(set(split.classes))} for name, sc in rules.items()}


def _round(d: dict) -> dict:
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in d.items()}


def markdown_table(metrics: dict, title: str = "") -> str:
    """Per class: AUROC metrics, and where computed the operating metrics at the shipped threshold."""
    op = any("fa_at_threshold" in m for m in metrics["per_class"].values())
    head = "| class | image AUROC | pixel AUROC | AU-PRO@0.3 |"
    if op:
        head += " false alarms at threshold | recall at threshold | recall @1% FA | recall @5% FA |"
    lines = [f"### {title}" if title else "", "", head, "|" + "---|" * (head.count("|") - 1)]
    rows = list(metrics["per_class"].items()) + [("**mean**", metrics["mean"])]
    def cell(m, k):
        return f"{m[k]:.1f}" if k in m else m.get("pixel_metrics", "n/a")
    def opcell(m, k, num, den):
        if k not in m or not np.isfinite(m[k]):
            return "n/a"
        return f"{m[k]:.1f} % ({m[num]}/{m[den]})" if num in m else f"{m[k]:.1f} %"
    for cls, m in rows:
        line = f"| {cls} | {cell(m, 'image_auroc')} | {cell(m, 'pixel_auroc')} | {cell(m, 'au_pro')} |"
        if op:
            line += (f" {opcell(m, 'fa_at_threshold', 'false_alarms', 'n_good')} | {opcell(m, 'recall_at_threshold', 'detected', 'n_defect')}"
                     f" | {opcell(m, 'recall_at_1pct_fa', '', '')} | {opcell(m, 'recall_at_5pct_fa', '', '')} |")
        lines.append(line)
    return "\n".join(lines).strip() + "\n"


def plot_roc(split: Split, scores: np.ndarray, out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths, classes = [], np.asarray(split.classes)
    for cls in sorted(set(split.classes)):
        sel = classes == cls
        fpr, tpr, _ = roc_curve(split.labels[sel], scores[sel])
        fig, ax = plt.subplots(figsize=(3.2, 3.2), dpi=80)
        ax.plot(fpr, tpr, lw=1.5, label=f"AUROC {100 * _auroc(split.labels[sel], scores[sel]):.1f}")
        ax.plot([0, 1], [0, 1], "k--", lw=0.7)
        ax.set(xlabel="FPR", ylabel="TPR", title=f"{cls}: image ROC")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        p = out_dir / f"roc_{cls}.png"
        fig.savefig(p); plt.close(fig); paths.append(p)
    return paths


def plot_overlays(split: Split, maps: np.ndarray, scores: np.ndarray, calibration: dict, out_path: Path,
                  per_class: int = 6, seed: int = 0) -> Path:
    """Grid of test images with the calibrated heatmap overlaid; title = normalised score, label."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rng = np.random.default_rng(seed)
    classes = sorted(set(split.classes))
    cls_arr = np.asarray(split.classes)
    fig, axes = plt.subplots(len(classes), per_class, figsize=(1.6 * per_class, 1.8 * len(classes)), dpi=80, squeeze=False)
    for r, cls in enumerate(classes):
        good = np.flatnonzero((cls_arr == cls) & (split.labels == 0))
        bad = np.flatnonzero((cls_arr == cls) & (split.labels == 1))
        n_good = min(len(good), max(1, per_class // 3))
        idx = list(rng.choice(good, n_good, replace=False)) + list(rng.choice(bad, min(len(bad), per_class - n_good), replace=False))
        cal = calibration.get(cls, calibration["_default"])
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c >= len(idx):
                continue
            i = idx[c]
            ax.imshow(split.images[i])
            ax.imshow(normalise(maps[i], cal), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            tag = split.defects[i] if split.defects else ("good" if split.labels[i] == 0 else "defect")
            ax.set_title(f"{tag}\n{float(normalise(scores[i], cal)):.2f}", fontsize=7,
                         color="red" if scores[i] >= cal["threshold"] else "black")
    fig.suptitle("test images: heatmap (normalised) and score; red = flagged", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path); plt.close(fig)
    return out_path


def write_reports(metrics: dict, split: Split, maps: np.ndarray, scores: np.ndarray, calibration: dict, out_dir: Path,
                  title: str = "test") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out_dir / "metrics.md").write_text(markdown_table(metrics, title))
    plot_roc(split, scores, out_dir)
    plot_overlays(split, maps, scores, calibration, out_dir / "overlays.png")
