"""Probe for issue #13, third round: levers chosen on *real* validation defects.

10 % of each test defect type (at least one image; `dcam.data.carve_test_defects`, seed 0: bottle 6,
magnetic_tile 39) is set aside as validation and never counted as test; the held-out good images are the
validation's good half. Every row prints validation (held-out good vs the set-aside defects) and test
(the rest of the test split) image AUROC, bottle / magnetic_tile / mean; selection reads the first only.

    PYTHONPATH=training python training/scripts/probe_real_validation.py cache   # ~15 min on 1 core -> /tmp/p13
    PYTHONPATH=training python training/scripts/probe_real_validation.py eval    # the table + paired bootstrap
    PYTHONPATH=training python training/scripts/probe_real_validation.py pixel   # per-defect pixel AUROC of map variants

The candidates are the package's own heads on cached features: `dcam/density.py` (one Gaussian per k-means
group; `tie`: the 1280-channel stage shares one covariance per class) and the fused score of `dcam/heads.py`
(z_density + w * z_map, z_map = the pixel-normalised top-1 % map score of the committed map).
"""
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from dcam.anomaly_map import AnomalyMap
from dcam.config import ScoreRule
from dcam.data import DEFAULT_DATA_ROOT, carve_test_defects
from dcam.density import DensityHead, fit_gaussian
from dcam.pixel_norm import PixelNorm

C = ["bottle", "magnetic_tile"]
OUT = Path("/tmp/p13")
DIMS = (24, 32, 96, 160, 320, 1280)


def cache() -> None:
    """Pooled teacher features of the 6 stages under the 8 D4 views, stride-16/32 maps of view 0, and the
    committed model's map and score, for train / held-out good / test."""
    import onnxruntime as ort
    from dcam.backbones import build_deep_teacher, build_teacher
    from dcam.constants import IMAGENET_MEAN, IMAGENET_STD
    from dcam.data import load_test, load_train_val
    from dcam.heads import VIEWS, view
    torch.set_num_threads(1)
    OUT.mkdir(exist_ok=True)
    tr, va = load_train_val(DEFAULT_DATA_ROOT, C, 256, progress=False)
    splits = {"train": tr, "val": va, "test": load_test(DEFAULT_DATA_ROOT, C, 256, progress=False)}
    teacher, deep = build_teacher("mobilenet_v2"), build_deep_teacher("mobilenet_v2")
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    sess = ort.InferenceSession(str(Path(__file__).resolve().parents[2] / "models" / "dcam.onnx"))
    for name, sp in splits.items():
        n = len(sp)
        pooled = [np.zeros((n, 8, d), np.float32) for d in DIMS]
        sp16, sp32 = np.zeros((n, 96, 16, 16), np.float16), np.zeros((n, 320, 8, 8), np.float16)
        maps, scores = np.zeros((n, 256, 256), np.float16), np.zeros(n, np.float32)
        for i in range(0, n, 16):
            xb = sp.images[i:i + 16]
            x = (torch.from_numpy(xb).permute(0, 3, 1, 2).float() / 255 - mean) / std
            with torch.no_grad():
                for v in range(8):
                    f = teacher(view(x, VIEWS[v]))
                    f = f + deep(f[-1])
                    for j, ff in enumerate(f):
                        pooled[j][i:i + 16, v] = ff.mean((2, 3)).numpy()
                    if v == 0:
                        sp16[i:i + 16], sp32[i:i + 16] = f[2].numpy(), f[4].numpy()
            maps[i:i + 16], scores[i:i + 16] = sess.run(["anomaly_map", "score"], {"image": xb})
        extra = {"masks": sp.masks, "defects": np.array(sp.defects)} if name == "test" else {}
        np.savez(OUT / f"{name}.npz", **{f"pool{j}": p for j, p in enumerate(pooled)}, sp16=sp16, sp32b=sp32,
                 maps=maps, scores=scores, cls=np.array(sp.classes), paths=np.array(sp.paths), labels=sp.labels, **extra)
        print("cached", name, flush=True)


def load():
    d = {k: dict(np.load(OUT / f"{k}.npz", allow_pickle=True)) for k in ("train", "val", "test")}
    carved = {str(p) for p in carve_test_defects(DEFAULT_DATA_ROOT, C, 0.1)}
    d["test"]["carved"] = np.array([p in carved for p in d["test"]["paths"]])
    return d


def auc(y, s):
    return 100 * roc_auc_score(y, s)


def density_z(d, views=1, k_max=12, tie=True):
    """[N, C] per-class z-scores (held-out good) of the density head (`dcam/density.py`) fitted on train,
    for val and test; tie: the 1280-channel stage shares one covariance per class."""
    feats = {k: [d[k][f"pool{j}"][:, :views].mean(1) for j in range(6)] for k in d}
    head = DensityHead(C, list(DIMS), tie_dim=1024 if tie else 0)
    head.fit(feats["train"], list(d["train"]["cls"]), max_groups=k_max)
    head.fit_normalisation(feats["val"], list(d["val"]["cls"]))
    with torch.no_grad():
        return {s: head([torch.from_numpy(x).float() for x in feats[s]]).numpy() for s in ("val", "test")}


def map_z(d, cls_idx):
    """z-scored top-1 % mean of the committed map after per-class per-pixel normalisation (held-out good):
    `dcam/pixel_norm.py` and the map score of `dcam/anomaly_map.py`, put on z by `dcam/heads.py`'s rule."""
    norm = PixelNorm(len(C), 256)
    norm.fit(d["val"]["maps"].astype(np.float32), list(d["val"]["cls"]), C)
    top1 = AnomalyMap(256, score_rule=ScoreRule.TOP1PCT_MEAN).score
    with torch.no_grad():
        out = {s: top1(norm(torch.from_numpy(d[s]["maps"].astype(np.float32)), torch.from_numpy(cls_idx[s]))).double().numpy()
               for s in ("val", "test")}
    for k, c in enumerate(C):
        ref = out["val"][d["val"]["cls"] == c]
        for s in out:
            sel = cls_idx[s] == k
            out[s][sel] = (out[s][sel] - ref.mean()) / ref.std()
    return out


def fused(d, w=0.25, **kw):
    z = density_z(d, **kw)
    zm = map_z(d, {s: z[s].argmin(1) for s in z})
    return {s: z[s].min(1) + w * zm[s] for s in z}


def val_test(d, score, c):
    g, vd = d["val"]["cls"] == c, d["test"]["carved"] & (d["test"]["cls"] == c)
    t = ~d["test"]["carved"] & (d["test"]["cls"] == c)
    y_val = np.r_[np.zeros(g.sum()), np.ones(vd.sum())]
    return (y_val, np.r_[score["val"][g], score["test"][vd]]), (d["test"]["labels"][t], score["test"][t])


def row(d, name, score):
    r = [[auc(*part) for part in val_test(d, score, c)] for c in C]
    print(f"| {name} | {r[0][0]:.1f} / {r[1][0]:.1f} / {(r[0][0] + r[1][0]) / 2:.1f} | "
          f"{r[0][1]:.1f} / {r[1][1]:.1f} / {(r[0][1] + r[1][1]) / 2:.1f} |", flush=True)


def evaluate() -> None:
    d = load()
    print("| candidate | val I (bottle / magnetic_tile / mean) | test I |\n|---|---|---|")
    row(d, "v0.2.0 as committed (2 views, 1 Gaussian, w 0.5)", {s: d[s]["scores"] for s in ("val", "test")})
    cands = {}
    for views in (1, 2, 8):
        for k in (1, 6, 12):
            for tie in (False, True):
                name = f"{views} view(s), up to {k} Gaussians{', 1280 tied' if tie else ''}, w 0.25"
                cands[name] = fused(d, 0.25, views=views, k_max=k, tie=tie)
                row(d, name, cands[name])
    for w in (0.0, 0.5, 1.0):
        row(d, f"1 view, up to 12, tied, w {w}", fused(d, w, views=1, k_max=12, tie=True))
    # Paired bootstrap on magnetic_tile validation: each candidate minus the cheapest mixture row.
    base = "1 view(s), up to 12 Gaussians, 1280 tied, w 0.25"
    (y, ref), _ = val_test(d, cands[base], "magnetic_tile")
    rng = np.random.default_rng(0)
    ng, nd = int((y == 0).sum()), int(y.sum())
    draws = [np.r_[rng.integers(0, ng, ng), ng + rng.integers(0, nd, nd)] for _ in range(2000)]
    print(f"\npaired bootstrap (2000 draws), magnetic_tile validation AUROC minus '{base}':")
    for name, score in cands.items():
        (_, v), _ = val_test(d, score, "magnetic_tile")
        diffs = [auc(y[i], v[i]) - auc(y[i], ref[i]) for i in draws]
        lo, hi = np.percentile(diffs, [2.5, 97.5])
        print(f"  {name}: {auc(y, v) - auc(y, ref):+.1f} [{lo:+.1f}, {hi:+.1f}]", flush=True)


def pixel() -> None:
    """Per-defect-type pixel AUROC on magnetic_tile's test images: the committed map and stride-32 variants."""
    import torch.nn.functional as F
    d, c = load(), "magnetic_tile"
    te = d["test"]
    sel = (te["cls"] == c) & ~te["carved"]

    def up(m):
        return F.interpolate(torch.from_numpy(m).float()[:, None], size=(256, 256), mode="bilinear")[:, 0].numpy()
    x = d["train"]["sp32b"][d["train"]["cls"] == c].astype(np.float32).transpose(0, 2, 3, 1).reshape(-1, 320)
    mu, prec = fit_gaussian(x)
    a = te["sp32b"].astype(np.float32).transpose(0, 2, 3, 1) - mu
    variants = {"committed map": te["maps"].astype(np.float32),
                "patch Gaussian, stride 32 (320 ch)": up(np.einsum("nhwd,de,nhwe->nhw", a, prec, a))}
    for name, m in variants.items():
        cells = []
        for defect in ("blowhole", "break", "crack", "fray", "uneven"):
            s = sel & ((te["defects"] == defect) | (te["labels"] == 0))
            cells.append(f"{defect} {auc(te['masks'][s].ravel(), m[s].ravel()):.1f}")
        print(f"{name}: all {auc(te['masks'][sel].ravel(), m[sel].ravel()):.1f} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    {"cache": cache, "eval": evaluate, "pixel": pixel}[sys.argv[1]]()
