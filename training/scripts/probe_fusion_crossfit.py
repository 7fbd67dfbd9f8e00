"""Cross-fitted check: does pixel-normalising the map help the fused image score? Stats from the other half of held-out."""
import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
sys.argv = ["x", "0,1,2,3,4,5", "2"]
exec(open(str(__import__("pathlib").Path(__file__).parent / "probe_fusion.py")).read().split("# pixel AUROC")[0])
src = np.repeat(np.arange(len(vcls)), 2); half = (np.arange(len(vcls)) % 2 == 0)
msv = np.zeros(len(vcls)); ms2 = np.zeros(len(src))
for h in (True, False):
    mA, sA = pn_stats(half == h)
    r_val = np.flatnonzero(half != h); r_v2 = np.flatnonzero(half[src] != h)
    msv[r_val] = top1(apply("val", mA, sA, r_val)); ms2[r_v2] = top1(apply("v2", mA, sA, r_v2))
for pn in (False, True):
    if pn:
        ms = {"val": msv, "v2": ms2, "test": top1(apply("test", mean, std))}
    else:
        ms = {k: top1(maps[k].astype(np.float32)) for k in maps}
    mu = np.array([ms["val"][vcls == c].mean() for c in C]); sd = np.array([ms["val"][vcls == c].std() for c in C])
    zm = {k: (ms[k] - mu[idx[k]]) / sd[idx[k]] for k in ms}
    for w in (0.25, 0.5, 1.0):
        r = img_metrics({k: zd[k] + w * zm[k] for k in zd})
        print(f"cross-fit pixel_norm {pn} w_map {w}", {k: round(v, 1) for k, v in r.items()},
              "val-v2 mean", round((r["v2_bottle"] + r["v2_magnetic_tile"]) / 2, 2), flush=True)
