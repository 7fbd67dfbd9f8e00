"""Issue #21: the calibration before/after on the committed student and heads (models/MODEL_CARD.md,
"v0.4.0: thresholds that keep their promise"). Run from the repository root with PYTHONPATH=training,
OMP_NUM_THREADS=1:

  probe_calibration.py cache OLD.onnx           # pooled teacher features, raw maps, scores of held-out good,
                                                 # val defects, test and train -> /tmp/oof (~2 min on 1 core)
  probe_calibration.py folds OLD.onnx           # validation: held-out out-of-fold scores for k = 5, 10 and
                                                 # leave-one-out; FA/recall of each threshold rule (no test)
  probe_calibration.py pool OLD.onnx            # the rejected alternative: training images' out-of-fold
                                                 # scores (density refitted without their fold) pooled in (no test)
  probe_calibration.py table OLD.onnx NEW.onnx  # before/after per class on validation and test, and the
                                                 # verdicts on scripts/demo.sh's 48-image sample

`table` uses ONNX Runtime scores of both files (the operator's runtime); `cache` and the rest use the
PyTorch model rebuilt from OLD (recover.model_from_onnx; scores within 1e-4 of ONNX Runtime).
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dcam.calibrate import calibrate_oof, calibrate_oof_scores, clopper_pearson, conformal_rank, left_out_alarms
from dcam.data import carve_test_defects, load_carved_defects, load_image, load_test, load_train_val, resolve_data_root
from dcam.evaluate import _auroc, operating_metrics
from dcam.export import read_metadata, run_onnx
from dcam.oof import oof_scores
from dcam.recover import model_from_onnx

torch.set_num_threads(1)
CACHE = Path("/tmp/oof")
CLASSES = ["bottle", "magnetic_tile"]
SPLITS = ("heldout", "valdef", "test", "train")


def load(name):
    return dict(np.load(CACHE / f"{name}.npz"))


def pooled(d):
    return [d[f"pooled{i}"] for i in range(6)]


def cache(model_path):
    CACHE.mkdir(exist_ok=True)
    model = model_from_onnx(model_path)
    root = resolve_data_root(None)
    tr, va = load_train_val(root, CLASSES, 256, 0.15, 0, False)
    carved = carve_test_defects(root, CLASSES, 0.1, 0)
    splits = {"heldout": va, "valdef": load_carved_defects(root, CLASSES, 256, carved, False),
              "test": load_test(root, CLASSES, 256, False, exclude=carved), "train": tr}
    h = model.heads
    for name, split in splits.items():
        t0 = time.time()
        p, m = h.features(model.teacher, model.normalize, model.student_map, split.images)
        s = h.score_features(model.anomaly_map.score, p, m)
        np.savez(CACHE / f"{name}.npz", maps=m, scores=s, classes=np.asarray(split.classes), labels=np.asarray(split.labels),
                 paths=np.asarray(split.paths), **{f"pooled{i}": q for i, q in enumerate(p)})
        print(name, len(split.images), f"{time.time() - t0:.0f}s", flush=True)


def _rates(name, good, bad, t, alarms=None):
    m = operating_metrics(good, bad, t, alarms)
    return (f"  {name:26s} thr {t:7.3f}  FA {m['false_alarms']}/{m['n_good']} {m['fa_at_threshold']:5.1f} % "
            f"{m['fa_at_threshold_95']}  recall {m['detected']}/{m['n_defect']} {m['recall_at_threshold']:5.1f} %  "
            f"R@1% {m['recall_at_1pct_fa']:5.1f}  R@5% {m['recall_at_5pct_fa']:5.1f}")


def folds(model_path):
    """Validation only: held-out good (out-of-fold) vs the set-aside defects."""
    model = model_from_onnx(model_path)
    old = json.loads(read_metadata(model_path)["dcam.calibration"])
    H, V = load("heldout"), load("valdef")
    hc, vc = list(H["classes"]), np.asarray(V["classes"])
    res = {}
    for k in (5, 10, len(hc)):
        res[k] = oof_scores(model.heads, model.anomaly_map.score, None, None, pooled(H), H["maps"], hc, 12, k=k)["val"]
    np.save(CACHE / "oof_loo.npy", res[len(hc)])
    for c in CLASSES:
        sel, bad = np.asarray(hc) == c, V["scores"][vc == c]
        print(f"== {c}: {sel.sum()} held-out good, {len(bad)} validation defects")
        print(f"  in-sample held-out q50/90/99/max {np.quantile(H['scores'][sel], [.5, .9, .99, 1]).round(2)}")
        print(_rates("v0.3.0 threshold (on LOO)", res[len(hc)][sel], bad, old[c]["threshold"]))
        for k, s in res.items():
            print(f"  k={'LOO' if k == len(hc) else k}: out-of-fold q50/90/99/max {np.quantile(s[sel], [.5, .9, .99, 1]).round(2)}")
            for fpr in (0.01, 0.05):
                cal, rep = calibrate_oof(s, hc, fpr)
                al = left_out_alarms(s, hc, fpr)[sel]
                print(_rates(f"oof fpr={fpr}", s[sel], bad, cal[c]["threshold"], al) +
                      f"  promised {100 * rep[c]['promised_fa']:.2f} % {np.round(100 * np.array(rep[c]['promised_fa_95']), 2)}")


def pool(model_path):
    """The alternative of calibrating on the training images too (validation only)."""
    model = model_from_onnx(model_path)
    H, V, T = load("heldout"), load("valdef"), load("train")
    loo = np.load(CACHE / "oof_loo.npy")
    tr = oof_scores(model.heads, model.anomaly_map.score, pooled(T), list(T["classes"]), pooled(H), H["maps"],
                    list(H["classes"]), 12, k=10, train_maps=T["maps"])["train"]
    hc, vc, tc = np.asarray(H["classes"]), np.asarray(V["classes"]), np.asarray(T["classes"])
    for c in CLASSES:
        g, t, b = loo[hc == c], tr[tc == c], V["scores"][vc == c]
        print(f"{c}: train out-of-fold q50/90/99/max {np.quantile(t, [.5, .9, .99, 1]).round(2)}, held-out LOO "
              f"{np.quantile(g, [.5, .9, .99, 1]).round(2)}, AUROC held-out vs train "
              f"{100 * _auroc(np.r_[np.zeros(len(t)), np.ones(len(g))], np.r_[t, g]):.1f}")
        cal, rep = calibrate_oof_scores(np.r_[g, t], 0.01)
        n = len(g) + len(t) - 1
        al = np.array([gi >= np.sort(np.r_[np.delete(g, i), t])[conformal_rank(n, 0.01) - 1] for i, gi in enumerate(g)])
        print(_rates("pooled train + held-out", g, b, cal["threshold"], al) +
              f"  promised {100 * rep['promised_fa']:.2f} % {np.round(100 * np.array(rep['promised_fa_95']), 2)} (n={rep['n']})")


def _demo_sample(root: Path, per_class: int = 24):
    """src/dataset.rs: each class's test/ images in path order, `sample_per_class` (24 per class, spread)."""
    out = []
    for c in CLASSES:
        files = sorted((p for p in (root / c / "test").rglob("*") if p.is_file() and p.suffix.lower() in
                        (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")), key=lambda p: p.parts)
        step = len(files) / per_class
        out += [(c, files[int(i * step)]) for i in range(per_class)]
    return out


def table(old_path, new_path):
    old, new = (json.loads(read_metadata(p)["dcam.calibration"]) for p in (old_path, new_path))
    H, V, T = load("heldout"), load("valdef"), load("test")
    root = resolve_data_root(None)
    demo = _demo_sample(root)
    paths = list(T["paths"]) + list(V["paths"]) + [str(p) for _, p in demo]
    imgs = np.stack([load_image(Path(p), 256) for p in paths])
    s_old, s_new = run_onnx(old_path, imgs)[1], run_onnx(new_path, imgs)[1]
    print(f"ONNX Runtime scores, old vs new file: max |dscore| {np.abs(s_old - s_new).max():.2e} on {len(paths)} images")
    nt, nv = len(T["paths"]), len(V["paths"])
    loo = np.load(CACHE / "oof_loo.npy")
    hc, vc, tc = np.asarray(H["classes"]), np.asarray(V["classes"]), np.asarray(T["classes"])
    print("| split | class | calibration | threshold | FA at threshold [95 % CP] | recall at threshold | recall @1% FA | recall @5% FA | image AUROC |")
    print("|---|---|---|---|---|---|---|---|---|")
    def row(split, c, name, t, good, bad, alarms=None):
        m = operating_metrics(good, bad, t, alarms)
        au = 100 * _auroc(np.r_[np.zeros(len(good)), np.ones(len(bad))], np.r_[good, bad])
        print(f"| {split} | {c} | {name} | {t:.2f} | {m['fa_at_threshold']:.1f} % ({m['false_alarms']}/{m['n_good']}) "
              f"[{m['fa_at_threshold_95'][0]:.1f}, {m['fa_at_threshold_95'][1]:.1f}] | {m['recall_at_threshold']:.1f} % "
              f"({m['detected']}/{m['n_defect']}) | {m['recall_at_1pct_fa']:.1f} | {m['recall_at_5pct_fa']:.1f} | {au:.1f} |")
    alarms = left_out_alarms(loo, list(hc), 0.01)
    for c in CLASSES:
        g, b = loo[hc == c], s_old[nt:nt + nv][vc == c]
        row("validation", c, "v0.3.0", old[c]["threshold"], g, b)
        row("validation", c, "v0.4.0", new[c]["threshold"], g, b, alarms[hc == c])
    for c in CLASSES:
        sel = tc == c
        lab = T["labels"][sel]
        for name, s, cal in (("v0.3.0", s_old[:nt], old), ("v0.4.0", s_new[:nt], new)):
            row("test", c, name, cal[c]["threshold"], s[sel][lab == 0], s[sel][lab == 1])
    verdicts = {}
    for name, s, cal in (("v0.3.0", s_old, old), ("v0.4.0", s_new, new)):
        v = [bool(s[nt + nv + i] >= cal[c]["threshold"]) for i, (c, _) in enumerate(demo)]
        truth = [p.parent.name != "good" for _, p in demo]
        verdicts[name] = v
        print(f"demo sample {name}: agree with labels {sum(a == b for a, b in zip(v, truth))}/48, anomalies {sum(v)} "
              f"(defects flagged {sum(a and b for a, b in zip(v, truth))}/{sum(truth)}, good flagged "
              f"{sum(a and not b for a, b in zip(v, truth))}/{48 - sum(truth)})")
    for i, (c, p) in enumerate(demo):
        if verdicts["v0.3.0"][i] != verdicts["v0.4.0"][i]:
            print(f"  {c}/{p.parent.name}/{p.name} raw {s_new[nt + nv + i]:.2f}: "
                  f"{'ANOMALY' if verdicts['v0.3.0'][i] else 'ok'} -> {'ANOMALY' if verdicts['v0.4.0'][i] else 'ok'}")


if __name__ == "__main__":
    {"cache": cache, "folds": folds, "pool": pool, "table": table}[sys.argv[1]](*sys.argv[2:])
