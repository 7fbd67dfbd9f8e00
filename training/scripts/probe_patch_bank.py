"""Issue #21: a local patch memory bank for the map (PatchCore-style) on the frozen MobileNetV2 teacher.
Run from the repository root with PYTHONPATH=training, OMP_NUM_THREADS=1:

  probe_patch_bank.py cache      # teacher stage outputs (strides 8, 16, 32) of held-out good, validation
                                 # defects, test and training images + masks -> /tmp/bank (~3 min on 1 core)
  probe_patch_bank.py eval CFG.. # bank variants: validation (held-out good vs validation defects) and test

Protocol as the model card: the bank is built from the training images only; choices on validation
(held-out good images + the 45 defects carved from test); test reported. Needs /tmp/oof from
probe_calibration.py cache (the committed model's maps and scores) for the fusion columns.
"""
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dcam.anomaly_map import GaussianBlur
from dcam.backbones import _network, build_teacher, find_packaged_weights
from dcam.data import carve_test_defects, load_carved_defects, load_test, load_train_val, resolve_data_root
from dcam.evaluate import _auroc, au_pro, recall_at_fa
from dcam.patch_bank import descriptors, greedy_coreset
from dcam.torch_model import Normalize

torch.set_num_threads(1)
# PROBE_BACKBONE=efficientnet_lite0 caches that network's stride-8/16 stages instead (PROBE_CACHE: where)
BACKBONE = os.environ.get("PROBE_BACKBONE", "mobilenet_v2")
CACHE = Path(os.environ.get("PROBE_CACHE", "/tmp/bank"))
CLASSES = ["bottle", "magnetic_tile"]
SPLITS = ("heldout", "valdef", "test", "train")
STAGES = {"s8": (4, 7), "s16": (7, 14), "s32": (14, 17)}  # MobileNetV2 features[a:b] -> 32, 96, 160 ch


def cache():
    CACHE.mkdir(exist_ok=True)
    root = resolve_data_root(None)
    tr, va = load_train_val(root, CLASSES, 256, 0.15, 0, False)
    carved = carve_test_defects(root, CLASSES, 0.1, 0)
    splits = {"heldout": va, "valdef": load_carved_defects(root, CLASSES, 256, carved, False),
              "test": load_test(root, CLASSES, 256, False, exclude=carved), "train": tr}
    norm = Normalize()
    if BACKBONE == "mobilenet_v2":
        f = _network("mobilenet_v2", find_packaged_weights("mobilenet_v2")).features.eval()
        first, stages = f[:4], {k: f[a:b] for k, (a, b) in STAGES.items()}
    else:  # the teacher's own stride-4/8/16 stages (backbones.build_backbone); no stride 32
        net = build_teacher(BACKBONE)
        first, stages = net.stages[0], {"s8": net.stages[1], "s16": net.stages[2]}
    for name, split in splits.items():
        t0 = time.time()
        out = {k: [] for k in stages}
        with torch.no_grad():
            for i in range(0, len(split.images), 16):
                x = first(norm(torch.from_numpy(split.images[i:i + 16])))
                for k, stage in stages.items():
                    x = stage(x)
                    out[k].append(x.half().numpy())
        masks = split.masks if split.masks is not None and len(split.masks) else np.zeros((len(split.images), 1, 1), bool)
        np.savez(CACHE / f"{name}.npz", classes=np.asarray(split.classes), labels=np.asarray(split.labels),
                 paths=np.asarray(split.paths), masks=masks.astype(bool),
                 defects=np.asarray(split.defects if split.defects else ["good"] * len(split.images)),
                 **{k: np.concatenate(v) for k, v in out.items()})
        print(name, len(split.images), f"{time.time() - t0:.0f}s", flush=True)


def patches(d: dict, layers: list[str], agg: int) -> torch.Tensor:
    """[N, D, H, W]: the cached stages `layers` as the bank's descriptors (`dcam.patch_bank.descriptors`)."""
    return descriptors([torch.from_numpy(d[k]).float() for k in layers], tuple(range(len(layers))), agg)


def nn_dist(q: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Euclidean distance of each row of q to its nearest row of bank."""
    bb = (bank ** 2).sum(1)
    out = []
    for i in range(0, len(q), chunk):
        a = q[i:i + chunk]
        d = (a ** 2).sum(1, keepdim=True) - 2 * a @ bank.T + bb
        out.append(d.min(1).values.clamp_min(0).sqrt())
    return torch.cat(out)


def bank_maps(d: dict, layers, agg, bank, mean, proj, blur) -> np.ndarray:
    maps = []
    for i in range(0, len(d["classes"]), 32):
        sub = {k: d[k][i:i + 32] for k in layers}
        x = patches(sub, layers, agg)
        n, c, h, w = x.shape
        q = x.permute(0, 2, 3, 1).reshape(-1, c)
        q = (q - mean) @ proj if proj is not None else q
        dist = nn_dist(q, bank).view(n, 1, h, w)
        dist = F.interpolate(dist, size=(256, 256), mode="bilinear", align_corners=False)
        maps.append(blur(dist).squeeze(1).numpy())
    return np.concatenate(maps)


def build(train, layers, agg, per_class, dims, seed=0):
    x = patches({k: train[k] for k in layers}, layers, agg)
    c = x.shape[1]
    flat = x.permute(0, 2, 3, 1).reshape(len(x), -1, c)
    cls = train["classes"]
    allp = flat.reshape(-1, c)
    mean = allp.mean(0)
    proj = None
    if dims and dims < c:  # PCA on all training patches (a fixed linear map in the graph)
        sub = allp[torch.randperm(len(allp), generator=torch.Generator().manual_seed(seed))[:200000]] - mean
        _, _, v = torch.linalg.svd(sub, full_matrices=False)
        proj = v[:dims].T.contiguous()
    banks = []
    for k, cname in enumerate(CLASSES):
        p = flat[torch.from_numpy(cls == cname)].reshape(-1, c)
        p = (p - mean) @ proj if proj is not None else p
        m = per_class[k]
        if m < 1:  # fraction
            m = int(m * len(p))
        t0 = time.time()
        banks.append(p[greedy_coreset(p, m, seed)])
        print(f"  bank {cname}: {len(p)} patches -> {len(banks[-1])} ({time.time() - t0:.0f}s)", flush=True)
    return torch.cat(banks), mean, proj


def report(tag, maps, d, extra_scores=None):
    cls, lab = d["classes"], d["labels"]
    rows = []
    score = maps.reshape(len(maps), -1).max(1)
    for c in CLASSES:
        s = cls == c
        good, bad = score[s & (lab == 0)], score[s & (lab == 1)]
        row = {"auroc": 100 * _auroc(lab[s], score[s]), "r1": 100 * recall_at_fa(good, bad, 0.01),
               "r5": 100 * recall_at_fa(good, bad, 0.05)}
        if d["masks"].shape[-1] == 256:
            m = d["masks"][s]
            row["pix"] = 100 * _auroc(m.ravel(), maps[s].ravel())
            row["pro"] = 100 * au_pro(m, maps[s])
        rows.append(f"{c}: " + " ".join(f"{k} {v:.1f}" for k, v in row.items()))
    print(f"{tag} | " + " | ".join(rows), flush=True)


def load(name):
    return dict(np.load(CACHE / f"{name}.npz"))


def evaluate(cfgs):
    data = {k: load(k) for k in SPLITS}
    # validation = held-out good + carved defects, as one split
    val = {k: np.concatenate([data["heldout"][k], data["valdef"][k]]) for k in ("classes", "labels", *(k for k in STAGES if k in data["heldout"]))}
    hm = data["heldout"]["masks"]
    val["masks"] = np.concatenate([np.zeros((len(hm), 256, 256), bool), data["valdef"]["masks"]])
    blur = GaussianBlur(4.0)
    for cfg in cfgs:
        layers, agg, m_b, m_t, dims = cfg.split(":")
        layers, agg, dims = layers.split("+"), int(agg), int(dims)
        per = [float(m_b), float(m_t)]
        per = [int(p) if p >= 1 else p for p in per]
        t0 = time.time()
        bank, mean, proj = build(data["train"], layers, agg, per, dims)
        vm = bank_maps(val, layers, agg, bank, mean, proj, blur)
        report(f"{cfg} val", vm, val)
        tm = bank_maps(data["test"], layers, agg, bank, mean, proj, blur)
        report(f"{cfg} test", tm, data["test"])
        np.savez(CACHE / f"maps_{cfg.replace(':', '_').replace('+', '-')}.npz", val=vm.astype(np.float16),
                 test=tm.astype(np.float16), bank_size=len(bank))
        print(f"  {cfg}: bank {len(bank)} x {bank.shape[1]} ({time.time() - t0:.0f}s)", flush=True)


def zscore(x, cls, ref, ref_cls):
    """Per class: (x - mean) / std of that class's held-out good values (ref)."""
    out = np.zeros(len(x), np.float64)
    for c in CLASSES:
        r = ref[ref_cls == c]
        out[cls == c] = (x[cls == c] - r.mean()) / max(r.std(), 1e-9)
    return out


def fusion(tag, weights):
    """Image scores: z(bank max) + w_d z(density) + w_s z(student map max), per class z-scored on the held-out
    good images; maps: bank map + w_p x student map, each divided by its held-out top-1 % mean."""
    from dcam.recover import model_from_onnx
    model = model_from_onnx("models/dcam.onnx")
    dens = model.heads.density
    saved = np.load(CACHE / f"maps_{tag}.npz")
    oof = {k: dict(np.load(f"/tmp/oof/{k}.npz")) for k in ("heldout", "valdef", "test")}
    def dz(d):
        with torch.no_grad():
            return dens([torch.from_numpy(d[f"pooled{i}"]).float() for i in range(6)]).min(1).values.numpy()
    sets = {"val": {"bank": saved["val"].astype(np.float32),
                    "student": np.concatenate([oof["heldout"]["maps"], oof["valdef"]["maps"]]),
                    "dens": np.concatenate([dz(oof["heldout"]), dz(oof["valdef"])])},
            "test": {"bank": saved["test"].astype(np.float32), "student": oof["test"]["maps"], "dens": dz(oof["test"])}}
    data = {"val": {k: np.concatenate([load("heldout")[k], load("valdef")[k]]) for k in ("classes", "labels")},
            "test": {k: load("test")[k] for k in ("classes", "labels", "masks")}}
    nh = len(oof["heldout"]["maps"])
    data["val"]["masks"] = np.concatenate([np.zeros((nh, 256, 256), bool), load("valdef")["masks"]])
    ref_cls = data["val"]["classes"][:nh]
    for split in ("val",) if os.environ.get("VAL_ONLY") else ("val", "test"):
        d, s = data[split], sets[split]
        for k in ("bank", "student"):
            s[k + "_max"] = s[k].reshape(len(s[k]), -1).max(1)
        ref = sets["val"]
        for wd, ws, wp in weights:
            z = zscore(s["bank_max"], d["classes"], ref["bank_max"][:nh], ref_cls)
            if wd:
                z = z + wd * zscore(s["dens"], d["classes"], ref["dens"][:nh], ref_cls)
            if ws:
                z = z + ws * zscore(s["student_max"], d["classes"], ref["student_max"][:nh], ref_cls)
            maps = s["bank"] / np.percentile(ref["bank"][:nh], 99) + (wp * s["student"] / np.percentile(ref["student"][:nh], 99) if wp else 0)
            report_scores(f"{tag} {split} wd={wd} ws={ws} wp={wp}", z, maps, d)


def report_scores(tag, score, maps, d):
    cls, lab = d["classes"], d["labels"]
    rows = []
    for c in CLASSES:
        s = cls == c
        good, bad = score[s & (lab == 0)], score[s & (lab == 1)]
        row = {"auroc": 100 * _auroc(lab[s], score[s]), "r1": 100 * recall_at_fa(good, bad, 0.01),
               "r5": 100 * recall_at_fa(good, bad, 0.05)}
        if maps is not None:
            row["pix"] = 100 * _auroc(d["masks"][s].ravel(), maps[s].ravel())
            row["pro"] = 100 * au_pro(d["masks"][s], maps[s])
        rows.append(f"{c}: " + " ".join(f"{k} {v:.1f}" for k, v in row.items()))
    print(f"{tag} | " + " | ".join(rows), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "cache":
        cache()
    elif sys.argv[1] == "fusion":  # fusion TAG wd,ws,wp ...
        fusion(sys.argv[2], [tuple(float(v) for v in w.split(",")) for w in sys.argv[3:]])
    else:
        evaluate(sys.argv[2:])
