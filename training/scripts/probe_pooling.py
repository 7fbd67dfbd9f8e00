"""Probe for issue #13: second-order / max pooling for the density head (selection on validation only).

The shipped density head pools each of the 6 teacher stages by its spatial *mean*. A thin crack, a hole
or an uneven patch changes the spread of a channel over the image more than its mean, so here each
stage is also pooled by its spatial *std* and *max*; every (stage, pooling) pair gets its own
per-class Gaussian (Ledoit-Wolf), distances / dim summed as in density.py, z-scored on held-out good.
Features are averaged over the shipped 2 views (identity, horizontal flip).

    PYTHONPATH=training python training/scripts/probe_pooling.py cache   # needs /tmp/pd/cache.npz (probe_patch_density.py cache)
    PYTHONPATH=training python training/scripts/probe_pooling.py eval

Fused score = z_density + 0.5 * z_map, where z_map is recovered from the committed graph's outputs as
(score - z_density_shipped) / 0.5 (the shipped z_density recomputed here; checked against the graph).
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch

torch.set_num_threads(1)
CACHE = "/tmp/pd"
C = ["bottle", "magnetic_tile"]
S = 256
POOLS = ("mean", "std", "max")


def cache():
    from dcam.backbones import build_deep_teacher, build_teacher
    from dcam.data import load_test, load_train_val, resolve_data_root, synthetic_defects
    from dcam.heads import VIEWS, view
    from dcam.torch_model import Normalize
    t0 = time.time()
    root = resolve_data_root(None)
    tr, va = load_train_val(root, C, S, 0.15, 0, False)
    te = load_test(root, C, S, False)
    v2, _, _, _ = synthetic_defects(va.images, va.classes, per_image=2, seed=7)
    teacher, deep, norm = build_teacher("mobilenet_v2"), build_deep_teacher("mobilenet_v2"), Normalize()
    out = {}
    with torch.no_grad():
        for k, imgs in {"train": tr.images, "val": va.images, "v2": v2, "test": te.images}.items():
            acc = {}
            for i in range(0, len(imgs), 16):
                x = norm(torch.from_numpy(imgs[i:i + 16]))
                per = {}
                for v in range(2):
                    feats = teacher(view(x, VIEWS[v]))
                    feats = feats + deep(feats[-1])
                    for j, f in enumerate(feats):
                        f = f.float().flatten(2)
                        for p, val in (("mean", f.mean(2)), ("std", f.std(2)), ("max", f.amax(2))):
                            per[(p, j)] = per.get((p, j), 0) + val.numpy() / 2
                for key, val in per.items():
                    acc.setdefault(key, []).append(val)
            for (p, j), vals in acc.items():
                out[f"{k}_{p}{j}"] = np.concatenate(vals)
            print("features", k, time.time() - t0, flush=True)
    np.savez(f"{CACHE}/pool.npz", **out)


def evaluate():
    from sklearn.metrics import roc_auc_score
    from dcam.density import fit_gaussian
    d = dict(np.load(f"{CACHE}/cache.npz"))
    f = dict(np.load(f"{CACHE}/pool.npz"))
    cls = {"train": d["tr_cls"], "val": d["val_cls"], "v2": d["v2_cls"], "test": d["test_cls"]}
    gauss = {}

    def zdens(feats):
        """feats: list of (pool, stage) -> {split: [N, C] z-scores}"""
        dist = {k: np.zeros((len(cls[k]), len(C))) for k in ("val", "v2", "test")}
        for key in feats:
            p, j = key
            x = f[f"train_{p}{j}"].astype(np.float64)
            for ci, c in enumerate(C):
                if (key, c) not in gauss:
                    gauss[(key, c)] = fit_gaussian(x[cls["train"] == c])
                mu, prec = gauss[(key, c)]
                for k in dist:
                    diff = f[f"{k}_{p}{j}"].astype(np.float64) - mu
                    dist[k][:, ci] += np.einsum("nd,de,ne->n", diff, prec, diff) / x.shape[1]
        z = {}
        mu = np.array([dist["val"][cls["val"] == c, ci].mean() for ci, c in enumerate(C)])
        sd = np.array([dist["val"][cls["val"] == c, ci].std() for ci, c in enumerate(C)])
        for k in dist:
            z[k] = (dist[k] - mu) / sd
        return z

    shipped = [("mean", j) for j in range(6)]
    z0 = zdens(shipped)
    zmin0 = {k: v.min(1) for k, v in z0.items()}
    zmap = {k: (d[f"{k}_score"] - zmin0[k]) / 0.5 for k in ("val", "v2", "test")}
    # check: the graph's class choice and score decomposition (z_map of held-out good ~ N(0,1) per class)
    print("z_map held-out good mean/std per class:", [(round(zmap["val"][cls["val"] == c].mean(), 3),
                                                       round(zmap["val"][cls["val"] == c].std(), 3)) for c in C])

    def aurocs(score):
        res = {}
        for c in C:
            g = cls["val"] == c; b = cls["v2"] == c
            res[f"val {c}"] = 100 * roc_auc_score(np.r_[np.zeros(g.sum()), np.ones(b.sum())], np.r_[score["val"][g], score["v2"][b]])
            t = cls["test"] == c
            res[f"test {c}"] = 100 * roc_auc_score(d["test_lab"][t], score["test"][t])
        res["val mean"] = (res["val bottle"] + res["val magnetic_tile"]) / 2
        res["test mean"] = (res["test bottle"] + res["test magnetic_tile"]) / 2
        return res

    candidates = {
        "shipped: mean x 6 stages": shipped,
        "mean + std x 6 stages": shipped + [("std", j) for j in range(6)],
        "mean + max x 6 stages": shipped + [("max", j) for j in range(6)],
        "mean x 6 + std x 5 (no 1280)": shipped + [("std", j) for j in range(5)],
        "mean x 6 + max x 5 (no 1280)": shipped + [("max", j) for j in range(5)],
        "mean x 6 + std x 3 map stages": shipped + [("std", j) for j in range(3)],
        "mean x 6 + std, max x 5 (no 1280)": shipped + [(p, j) for p in ("std", "max") for j in range(5)],
        "std x 6 only": [("std", j) for j in range(6)],
    }
    rows = []
    for name, feats in candidates.items():
        z = zdens(feats)
        zm = {k: v.min(1) for k, v in z.items()}
        for w in (0.0, 0.5):
            r = aurocs({k: zm[k] + w * zmap[k] for k in zm})
            r["name"], r["w_map"] = name, w
            rows.append(r)
            print(f"{name:38s} w_map={w}: val {r['val bottle']:.1f} / {r['val magnetic_tile']:.1f} / {r['val mean']:.1f}"
                  f"   test {r['test bottle']:.1f} / {r['test magnetic_tile']:.1f} / {r['test mean']:.1f}", flush=True)
    import json
    json.dump(rows, open(f"{CACHE}/pool_results.json", "w"), indent=1)


if __name__ == "__main__":
    {"cache": cache, "eval": evaluate}[sys.argv[1]]()
