import sys, json, itertools, numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from sklearn.metrics import roc_auc_score
from dcam.density import fit_gaussian
C = ["bottle", "magnetic_tile"]
meta = np.load("/tmp/cache/meta.npz", allow_pickle=True)
cls = {"train": meta["tr_cls"], "val": meta["va_cls"], "v2": meta["v2c"], "v1": meta["va_cls"], "test": meta["te_cls"]}
F = {k: np.load(f"/tmp/cache/feat_{k}.npz") for k in ("train", "val", "v2", "test")}
M = {k: np.load(f"/tmp/cache/map_{k}.npz") for k in ("val", "v2", "v1", "test")}
ORDER = [0, 1, 5, 4, 2, 3, 6, 7]  # cache views (rot90 k, flip) in the order of heads.VIEWS subsets 1/2/4
def feats(k, stages, nv):
    return [np.mean([F[k][f"v{ORDER[v]}_s{j}"] for v in range(nv)], axis=0) for j in stages]
def dens(stages, nv, divide=True):
    tr = feats("train", stages, nv)
    G = {}
    for c in C:
        G[c] = [fit_gaussian(x[cls["train"] == c]) for x in tr]
    def dist(k):
        fs = feats(k, stages, nv); out = np.zeros((len(fs[0]), len(C)))
        for ci, c in enumerate(C):
            for x, (mu, P), j in zip(fs, G[c], stages):
                d = x - mu; out[:, ci] += np.einsum("nd,de,ne->n", d, P, d) / (x.shape[1] if divide else 1)
        return out
    D = {k: dist(k) for k in ("val", "v2", "test")}
    mu = np.array([D["val"][cls["val"] == c, i].mean() for i, c in enumerate(C)])
    sd = np.array([D["val"][cls["val"] == c, i].std() for i, c in enumerate(C)])
    return {k: (v - mu) / sd for k, v in D.items()}
def auc(y, s): return 100 * roc_auc_score(y, s)
def img_metrics(score):
    """val-v2 and val-v1 estimate per class, test per class"""
    r = {}
    for c in C:
        g = score["val"][cls["val"] == c]
        r[f"v2_{c}"] = auc(np.r_[np.zeros(len(g)), np.ones((cls["v2"] == c).sum())], np.r_[g, score["v2"][cls["v2"] == c]])
        if "v1" in score:
            r[f"v1_{c}"] = auc(np.r_[np.zeros(len(g)), np.ones((cls["v1"] == c).sum())], np.r_[g, score["v1"][cls["v1"] == c]])
        s = cls["test"] == c
        r[f"test_{c}"] = auc(meta["te_lab"][s], score["test"][s])
    return r
def top1(m):
    f = m.reshape(len(m), -1).astype(np.float32); k = f.shape[1] // 100
    return np.partition(f, -k, axis=1)[:, -k:].mean(1)
if __name__ == "__main__":
    rows = []
    for name, stages in (("map", [0, 1, 2]), ("deep", [0, 1, 2, 3, 4, 5]), ("deep_no1280", [0, 1, 2, 3, 4])):
        for nv in (1, 2):
            z = dens(stages, nv)
            acc = {k: float(np.mean(np.array(C)[z[k].argmin(1)] == cls[k])) for k in z}
            r = img_metrics({k: v.min(1) for k, v in z.items()})
            rows.append((name, nv, r, acc["test"], acc["v2"]))
            print(name, nv, {k: round(v, 1) for k, v in r.items()}, "cls acc test", acc["test"], flush=True)
    z = dens([0, 1, 2], 1, divide=False)
    print("map, undivided", {k: round(v, 1) for k, v in img_metrics({k: v.min(1) for k, v in z.items()}).items()})
