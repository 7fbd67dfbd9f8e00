"""Option A: output map on the score's scale, map_out = z_density + w * (pixel-normalised map - mu_c) / sd_c."""
import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
sys.argv = ["x", "0,1,2,3,4,5", "2"]
exec(open(str(__import__("pathlib").Path(__file__).parent / "probe_fusion.py")).read().split("# pixel AUROC")[0])
w = 0.5
v2m = meta["v2m"]; tm = meta["te_masks"]
src = np.repeat(np.arange(len(vcls)), 2); half = (np.arange(len(vcls)) % 2 == 0)
ms_val = top1(apply("val", mean, std))
mu = np.array([ms_val[vcls == c].mean() for c in C]); sd = np.array([ms_val[vcls == c].std() for c in C])
def mapA(k, nm):
    i = idx[k]
    return zd[k][:, None, None] + w * (nm - mu[i][:, None, None]) / sd[i][:, None, None]
# cross-fitted v2 normalised maps
out = np.zeros(maps["v2"].shape, np.float32)
for h in (True, False):
    mA, sA = pn_stats(half == h); rows = np.flatnonzero(half[src] != h); out[rows] = apply("v2", mA, sA, rows)
A_v2 = mapA("v2", out); A_te = mapA("test", apply("test", mean, std))
for c in C:
    sv = cls["v2"] == c; st = cls["test"] == c
    print(f"option A pixel {c}: val-v2 (cross-fit) {pix_auc(v2m[sv], A_v2[sv]):.1f}  test {pix_auc(tm[st], A_te[st]):.1f}", flush=True)
    # raw map with the same image-level offset (no pixel norm in the map)
    ms_raw = top1(maps["val"].astype(np.float32)); mur = np.array([ms_raw[vcls == cc].mean() for cc in C]); sdr = np.array([ms_raw[vcls == cc].std() for cc in C])
    B = lambda k: zd[k][:, None, None] + w * (maps[k].astype(np.float32) - mur[idx[k]][:, None, None]) / sdr[idx[k]][:, None, None]
    print(f"option B (raw map + offset) pixel {c}: val-v2 {pix_auc(v2m[sv], B('v2')[sv]):.1f}  test {pix_auc(tm[st], B('test')[st]):.1f}", flush=True)
