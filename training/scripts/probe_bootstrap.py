"""Probe for issue #13: can the validation set tell the candidates from the shipped head at all?

Paired bootstrap (1000 resamples of the held-out good and the synthetic-defect images of each class,
seed 0) of the validation mean image AUROC of a candidate minus the shipped model's. Candidates: the
density mixtures of probe_mixture.py and mean + max pooling of probe_pooling.py.

    PYTHONPATH=training:training/scripts python training/scripts/probe_bootstrap.py   # needs /tmp/pd/{cache,pool}.npz
"""
import numpy as np
from sklearn.metrics import roc_auc_score

from probe_mixture import C, SPLITS, class_dist, cls, d, f, fit_gaussian, zscores

base = {c: class_dist(c, 1)[0] for c in C}
z0 = zscores(base)
zmap = {k: (d[f"{k}_score"] - z0[k].min(1)) / 0.5 for k in SPLITS}


def fused(z):
    return {k: z[k].min(1) + 0.5 * zmap[k] for k in SPLITS}


def pooled_dist(names):
    out = {}
    for c in C:
        dd = {k: 0 for k in SPLITS}
        for p, j in names:
            mu, prec = fit_gaussian(f[f"train_{p}{j}"].astype(np.float64)[cls["train"] == c])
            for k in SPLITS:
                diff = f[f"{k}_{p}{j}"].astype(np.float64) - mu
                dd[k] = dd[k] + np.einsum("nd,de,ne->n", diff, prec, diff) / len(mu)
        out[c] = dd
    return out


cands = {"shipped": fused(z0)}
for K in (3, 4, 6):
    cands[f"mixture K={K}"] = fused(zscores({"bottle": base["bottle"], "magnetic_tile": class_dist("magnetic_tile", K)[0]}))
cands["mean+max x6"] = fused(zscores(pooled_dist([(p, j) for p in ("mean", "max") for j in range(6)])))


def val_auc(s, c, gi, bi):
    g, b = np.flatnonzero(cls["val"] == c)[gi], np.flatnonzero(cls["v2"] == c)[bi]
    return 100 * roc_auc_score(np.r_[np.zeros(len(g)), np.ones(len(b))], np.r_[s["val"][g], s["v2"][b]])


rng = np.random.default_rng(0)
ng = {c: int((cls["val"] == c).sum()) for c in C}
nb = {c: int((cls["v2"] == c).sum()) for c in C}
for name, s in cands.items():
    if name == "shipped":
        continue
    diffs = []
    for _ in range(1000):
        tot = 0.0
        for c in C:
            gi, bi = rng.integers(0, ng[c], ng[c]), rng.integers(0, nb[c], nb[c])
            tot += (val_auc(s, c, gi, bi) - val_auc(cands["shipped"], c, gi, bi)) / 2
        diffs.append(tot)
    diffs = np.array(diffs)
    full = sum(val_auc(s, c, np.arange(ng[c]), np.arange(nb[c])) - val_auc(cands["shipped"], c, np.arange(ng[c]), np.arange(nb[c]))
               for c in C) / 2
    print(f"{name}: val mean I-AUROC minus shipped = {full:+.2f}, paired bootstrap 95% interval "
          f"[{np.percentile(diffs, 2.5):+.2f}, {np.percentile(diffs, 97.5):+.2f}], P(diff<=0) = {(diffs <= 0).mean():.2f}", flush=True)
