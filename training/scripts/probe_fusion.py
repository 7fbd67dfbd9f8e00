"""Pixel norm + fusion probe; density config given on the command line (stages, views)."""
import sys, numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from probe_density import *
from sklearn.metrics import roc_auc_score
stages = [int(x) for x in sys.argv[1].split(",")]; nv = int(sys.argv[2])
z = dens(stages, nv)
idx = {k: v.argmin(1) for k, v in z.items()}
zd = {k: v.min(1) for k, v in z.items()}
maps = {k: M[k]["maps"] for k in ("val", "v2", "test")}
vcls = cls["val"]
def pn_stats(sel):
    mean, std = [], []
    for c in C:
        m = maps["val"][sel & (vcls == c)].astype(np.float64)
        sd = m.std(0); mean.append(m.mean(0)); std.append(np.maximum(sd, np.median(sd)))
    return np.array(mean, np.float32), np.array(std, np.float32)
def apply(k, mean, std, rows=None):
    m = maps[k] if rows is None else maps[k][rows]
    i = idx[k] if rows is None else idx[k][rows]
    return (m.astype(np.float32) - mean[i]) / std[i]
def pix_auc(masks, m, sub=4):
    return 100 * roc_auc_score(masks[:, ::sub, ::sub].ravel(), m[:, ::sub, ::sub].ravel())
allv = np.ones(len(vcls), bool)
mean, std = pn_stats(allv)
# pixel AUROC: raw vs normalised, val-v2 (in-sample stats), val-v2 cross-fitted, test
v2m = meta["v2m"]; tm = meta["te_masks"]
n_val = len(vcls); src = np.repeat(np.arange(n_val), 2)  # v2 fakes: 2 per held-out image, in order
half = (np.arange(n_val) % 2 == 0)
for c in C:
    sv = cls["v2"] == c; st = cls["test"] == c
    raw_v = pix_auc(v2m[sv], maps["v2"][sv].astype(np.float32)); raw_t = pix_auc(tm[st], maps["test"][st].astype(np.float32))
    nrm_v = pix_auc(v2m[sv], apply("v2", mean, std)[sv]); nrm_t = pix_auc(tm[st], apply("test", mean, std)[st])
    # cross-fit: stats from the other half of held-out images
    out = np.zeros_like(maps["v2"], dtype=np.float32)
    for h in (True, False):
        mA, sA = pn_stats(half == h)
        rows = np.flatnonzero(half[src] != h)
        out[rows] = apply("v2", mA, sA, rows)
    cf_v = pix_auc(v2m[sv], out[sv])
    print(f"pixel {c}: raw val-v2 {raw_v:.1f} test {raw_t:.1f} | norm val-v2 {nrm_v:.1f} (cross-fit {cf_v:.1f}) test {nrm_t:.1f}", flush=True)
# fusion: map score (raw or normalised), z-scored per class on val (in-sample), fused with density
for pn in (False, True):
    ms = {k: top1(apply(k, mean, std) if pn else maps[k].astype(np.float32)) for k in maps}
    mu = np.array([ms["val"][vcls == c].mean() for c in C]); sd = np.array([ms["val"][vcls == c].std() for c in C])
    zm = {k: (ms[k] - mu[idx[k]]) / sd[idx[k]] for k in ms}
    print("pixel_norm", pn, "map only", {k: round(v, 1) for k, v in img_metrics(zm).items()})
    for w in (0.0, 0.25, 0.5, 1.0, 2.0):
        r = img_metrics({k: zd[k] + w * zm[k] for k in zd})
        print(f"pixel_norm {pn} w_map {w}", {k: round(v, 1) for k, v in r.items()},
              "val-v2 mean", round((r["v2_bottle"] + r["v2_magnetic_tile"]) / 2, 2), flush=True)
