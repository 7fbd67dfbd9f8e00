"""Probe for issue #13: a patch-level density map (not committed to the graph unless it wins on validation).

Per class and per teacher map stage, one Gaussian over the *patch* feature vectors of the class's
training images, pooled over all positions (position-agnostic: tiles are not aligned). The patch map is
the squared Mahalanobis distance / dim at every position, upsampled to S, summed over the chosen stages,
blurred like the student map, and put on a z scale by the class's held-out good images (top-1 % mean).

    PYTHONPATH=training python training/scripts/probe_patch_density.py cache   # ~10 min on 1 core -> /tmp/pd
    PYTHONPATH=training python training/scripts/probe_patch_density.py eval    # the table: val (select) / test (report)

The class of an image is its true class here (the graph uses the density argmin: right for 664/665
test images). The committed model's outputs come from ONNX Runtime. Pixel AUROC is on every second
pixel in each direction (speed); the final model is evaluated exactly by `python -m dcam evaluate`.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(1)
CACHE = "/tmp/pd"
C = ["bottle", "magnetic_tile"]
S = 256
RIDGE = 0.01  # covariance + RIDGE * mean variance * I (fixed before looking at any result)


def cache():
    import onnxruntime as ort
    from dcam.backbones import build_teacher
    from dcam.data import load_test, load_train_val, resolve_data_root, synthetic_defects
    from dcam.torch_model import Normalize
    t0 = time.time()
    root = resolve_data_root(None)
    tr, va = load_train_val(root, C, S, 0.15, 0, False)
    te = load_test(root, C, S, False)
    v2, v2m, v2c, v2k = synthetic_defects(va.images, va.classes, per_image=2, seed=7)  # = evaluate.estimate_split
    print("loaded", time.time() - t0, flush=True)
    opts = ort.SessionOptions(); opts.intra_op_num_threads = 1; opts.inter_op_num_threads = 1
    sess = ort.InferenceSession("models/dcam.onnx", opts, providers=["CPUExecutionProvider"])
    sets = {"val": va.images, "v2": v2, "test": te.images}
    out = {"tr_cls": np.array(tr.classes), "val_cls": np.array(va.classes), "v2_cls": np.array(v2c), "v2_kind": np.array(v2k),
           "v2_masks": v2m, "test_cls": np.array(te.classes), "test_lab": te.labels, "test_masks": te.masks,
           "test_def": np.array(te.defects)}
    for k, imgs in sets.items():
        ms, ss = [], []
        for i in range(0, len(imgs), 8):
            m, s = sess.run(None, {"image": imgs[i:i + 8]}); ms.append(m.astype(np.float16)); ss.append(s)
        out[f"{k}_map"], out[f"{k}_score"] = np.concatenate(ms), np.concatenate(ss)
        print("onnx", k, time.time() - t0, flush=True)
    teacher, norm = build_teacher("mobilenet_v2"), Normalize()
    # Gaussians from the training images: running sums per class and stage (float64)
    dims = teacher.channels
    n = np.zeros((len(C), 3)); s1 = [[np.zeros(d) for d in dims] for _ in C]; s2 = [[np.zeros((d, d)) for d in dims] for _ in C]
    cls = np.array(tr.classes)
    with torch.no_grad():
        for i in range(0, len(tr), 16):
            feats = teacher(norm(torch.from_numpy(tr.images[i:i + 16])))
            for j, f in enumerate(feats):
                f = f.double().permute(0, 2, 3, 1).numpy()
                for b in range(len(f)):
                    k = C.index(cls[i + b]); x = f[b].reshape(-1, f.shape[-1])
                    n[k, j] += len(x); s1[k][j] += x.sum(0); s2[k][j] += x.T @ x
    print("fit sums", time.time() - t0, flush=True)
    for k in range(len(C)):
        for j, d in enumerate(dims):
            mu = s1[k][j] / n[k, j]
            cov = s2[k][j] / n[k, j] - np.outer(mu, mu)
            cov += np.eye(d) * RIDGE * np.trace(cov) / d
            out[f"mu{k}_{j}"], out[f"prec{k}_{j}"] = mu.astype(np.float32), np.linalg.inv(cov).astype(np.float32)
    with torch.no_grad():
        for k, imgs in sets.items():
            dist = [[] for _ in dims]
            for i in range(0, len(imgs), 16):
                feats = teacher(norm(torch.from_numpy(imgs[i:i + 16])))
                for j, f in enumerate(feats):
                    per_cls = []
                    for c in range(len(C)):
                        diff = f.permute(0, 2, 3, 1) - torch.from_numpy(out[f"mu{c}_{j}"])
                        per_cls.append(torch.einsum("nhwd,de,nhwe->nhw", diff, torch.from_numpy(out[f"prec{c}_{j}"]), diff) / dims[j])
                    dist[j].append(torch.stack(per_cls, 1).numpy())
            for j in range(len(dims)):
                out[f"{k}_pd{j}"] = np.concatenate(dist[j])
            print("patch maps", k, time.time() - t0, flush=True)
    np.savez(f"{CACHE}/cache.npz", **out)
    print("done", time.time() - t0, flush=True)


def evaluate():
    from sklearn.metrics import roc_auc_score
    from dcam.anomaly_map import GaussianBlur
    from dcam.evaluate import au_pro
    d = dict(np.load(f"{CACHE}/cache.npz"))
    blur = GaussianBlur(4.0)

    def patch_map(k, stages, rows):
        cls_idx = np.array([C.index(c) for c in d[f"{k}_cls"][rows]]) if k != "val" else np.array([C.index(c) for c in d["val_cls"][rows]])
        acc = 0
        for j in stages:
            pd = torch.from_numpy(d[f"{k}_pd{j}"][rows][np.arange(len(rows)), cls_idx])[:, None]
            acc = acc + F.interpolate(pd, size=(S, S), mode="bilinear", align_corners=False)
        return blur(acc).squeeze(1).numpy()

    def top1(m):
        flat = m.reshape(len(m), -1); kk = flat.shape[1] // 100
        return np.partition(flat, -kk, axis=1)[:, -kk:].mean(1)

    def auc(y, s):
        return 100 * roc_auc_score(y, s)

    results = []
    for stages in ([1], [2], [1, 2], [0, 1, 2]):
        name = "+".join(f"s{j}" for j in stages)
        # z scale per class from the held-out good images
        vm = patch_map("val", stages, np.arange(len(d["val_cls"])))
        vt = top1(vm)
        mu = {c: vt[d["val_cls"] == c].mean() for c in C}; sd = {c: vt[d["val_cls"] == c].std() for c in C}
        for split in ("v2", "test"):
            good_cls = d["val_cls"] if split == "v2" else None
            for c in C:
                if split == "v2":
                    g, b = np.flatnonzero(d["val_cls"] == c), np.flatnonzero(d["v2_cls"] == c)
                    pm = np.concatenate([vm[g], patch_map("v2", stages, b)])
                    om = np.concatenate([d["val_map"][g], d["v2_map"][b]]).astype(np.float32)
                    sc = np.r_[d["val_score"][g], d["v2_score"][b]]
                    y = np.r_[np.zeros(len(g)), np.ones(len(b))]
                    masks = np.concatenate([np.zeros((len(g), S, S), bool), d["v2_masks"][b]])
                else:
                    r = np.flatnonzero(d["test_cls"] == c)
                    pm, om, sc = patch_map("test", stages, r), d["test_map"][r].astype(np.float32), d["test_score"][r]
                    y, masks = d["test_lab"][r], d["test_masks"][r]
                zp = (pm - mu[c]) / sd[c]
                zt = (top1(pm) - mu[c]) / sd[c]
                row = {"stages": name, "split": split, "class": c,
                       "I score (now)": auc(y, sc), "I patch": auc(y, zt)}
                for w in (0.25, 0.5, 1.0):
                    row[f"I score+{w}patch"] = auc(y, sc + w * zt)
                sub = (slice(None), slice(None, None, 2), slice(None, None, 2))
                mk = masks[sub].ravel()
                row["P now"] = auc(mk, om[sub].ravel())
                row["P patch"] = auc(mk, zp[sub].ravel())
                for w in (0.5, 1.0, 2.0):
                    row[f"P now+{w}patch"] = auc(mk, (om + w * zp)[sub].ravel())
                results.append(row)
                print(row, flush=True)
    import json
    with open(f"{CACHE}/results.json", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    {"cache": cache, "eval": evaluate}[sys.argv[1]]()
