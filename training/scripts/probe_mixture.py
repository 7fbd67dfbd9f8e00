"""Probe for issue #13: several Gaussians per class in the density head (selection on validation only).

magnetic_tile's normal images are far from one mode (tile sizes and surface textures differ, and every
tile is squashed to 256 x 256), so one Gaussian per class is broad. Here a class's training images are
split by k-means (on the pooled features, each stage standardised and scaled by 1/sqrt(dim)) into K
groups, each group gets the shipped per-stage Ledoit-Wolf Gaussians, and the class distance is the
minimum over its groups; then z-scored on held-out good as shipped. Shipped features (6 stages, mean
pooled, 2 views); fused score = z_density + 0.5 * z_map as in probe_pooling.py.

    PYTHONPATH=training python training/scripts/probe_mixture.py   # needs /tmp/pd/cache.npz and /tmp/pd/pool.npz
"""
import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import roc_auc_score

from dcam.density import fit_gaussian

C = ["bottle", "magnetic_tile"]
d = dict(np.load("/tmp/pd/cache.npz"))
f = dict(np.load("/tmp/pd/pool.npz"))
cls = {"train": d["tr_cls"], "val": d["val_cls"], "v2": d["v2_cls"], "test": d["test_cls"]}
SPLITS = ("val", "v2", "test")
feat = {k: [f[f"{k}_mean{j}"].astype(np.float64) for j in range(6)] for k in ("train",) + SPLITS}


def class_dist(c, k_groups, seed=0):
    """{split: [N] distance of every image to class c (min over the class's groups)}"""
    tr = [x[cls["train"] == c] for x in feat["train"]]
    if k_groups == 1:
        labels = np.zeros(len(tr[0]), int)
    else:
        z = np.concatenate([(x - x.mean(0)) / (x.std(0) + 1e-6) / np.sqrt(x.shape[1]) for x in tr], 1)
        labels = KMeans(k_groups, n_init=10, random_state=seed).fit_predict(z)
    out = {k: np.full(len(cls[k]), np.inf) for k in SPLITS}
    for g in range(k_groups):
        gs = [fit_gaussian(x[labels == g]) for x in tr]
        for k in SPLITS:
            dist = sum(np.einsum("nd,de,ne->n", feat[k][j] - mu, prec, feat[k][j] - mu) / len(mu)
                       for j, (mu, prec) in enumerate(gs))
            out[k] = np.minimum(out[k], dist)
    return out, np.bincount(labels)


def zscores(dists):
    z = {}
    for k in SPLITS:
        cols = []
        for c in C:
            own = dists[c]["val"][cls["val"] == c]
            cols.append((dists[c][k] - own.mean()) / own.std())
        z[k] = np.stack(cols, 1)
    return z


def main():
    base = {c: class_dist(c, 1)[0] for c in C}
    z0 = zscores(base)
    zmap = {k: (d[f"{k}_score"] - z0[k].min(1)) / 0.5 for k in SPLITS}


    def report(name, z):
        for w in (0.0, 0.5):
            s = {k: z[k].min(1) + w * zmap[k] for k in SPLITS}
            r = []
            for c in C:
                g, b, t = cls["val"] == c, cls["v2"] == c, cls["test"] == c
                r.append((100 * roc_auc_score(np.r_[np.zeros(g.sum()), np.ones(b.sum())], np.r_[s["val"][g], s["v2"][b]]),
                          100 * roc_auc_score(d["test_lab"][t], s["test"][t])))
            acc = np.mean([z[k].argmin(1) == np.array([C.index(c) for c in cls[k]]) for k in ("test",)])
            print(f"{name:34s} w_map={w}: val {r[0][0]:.1f} / {r[1][0]:.1f} / {(r[0][0] + r[1][0]) / 2:.1f}   "
                  f"test {r[0][1]:.1f} / {r[1][1]:.1f} / {(r[0][1] + r[1][1]) / 2:.1f}   class right on test {100 * acc:.1f} %", flush=True)

    report("K = 1 (shipped)", z0)
    for K in (2, 3, 4, 6):
        dm, sizes = class_dist("magnetic_tile", K)
        report(f"magnetic_tile K = {K} {list(sizes)}", zscores({"bottle": base["bottle"], "magnetic_tile": dm}))
    for K in (2, 3):
        dm, sizes = class_dist("magnetic_tile", K, seed=1)
        report(f"magnetic_tile K = {K} (k-means seed 1) {list(sizes)}", zscores({"bottle": base["bottle"], "magnetic_tile": dm}))


if __name__ == "__main__":
    main()
