"""Out-of-fold calibration (oof.py, calibrate.calibrate_oof) and the metrics users act on
(evaluate.operating_metrics): synthetic data only, each test well under a minute."""
import numpy as np
import pytest
import torch

from dcam.anomaly_map import AnomalyMap
from dcam.calibrate import calibrate, calibrate_oof, calibrate_oof_scores, clopper_pearson, conformal_rank
from dcam.evaluate import markdown_table, operating_metrics, recall_at_fa
from dcam.heads import ImageHeads
from dcam.oof import folds, oof_scores

CLASSES = ["a", "b"]
DIMS = [4, 6]
SIZE = 8
SCORE = AnomalyMap(SIZE, "sum", 0.0, "top1pct_mean").score  # the map score rule of the shipped model


def _normals(rng, n, shift):
    """n normal images of two classes: Gaussian pooled features (class b shifted) and Gaussian maps."""
    cls = ["a"] * (n // 2) + ["b"] * (n - n // 2)
    off = np.asarray([0.0 if c == "a" else shift for c in cls])[:, None]
    pooled = [rng.normal(size=(n, d)) + off for d in DIMS]
    maps = (rng.normal(1.0, 0.3, (n, SIZE, SIZE)) + rng.normal(0, 0.1, (n, 1, 1))).astype(np.float32)
    return pooled, maps, cls


def _heads():
    return ImageHeads(CLASSES, DIMS, SIZE, pixel_norm="score", w_map=0.25).eval()


def _fitted(seed, n_train=200, n_val=40):
    rng = np.random.default_rng(seed)
    tp, _, tc = _normals(rng, n_train, 6.0)
    vp, vm, vc = _normals(rng, n_val, 6.0)
    heads = _heads()
    heads.fit_features(SCORE, tp, tc, vp, vm, vc)
    return rng, heads, (tp, tc, vp, vm, vc)


def test_conformal_rank_and_promise():
    assert conformal_rank(99, 0.01) == 99 and conformal_rank(31, 0.01) == 31 and conformal_rank(199, 0.01) == 198
    cal, rep = calibrate_oof_scores(np.arange(1, 100, dtype=float), 0.05)  # n = 99: k = ceil(100 * 0.95) = 95
    assert rep["rank"] == 95 and cal["threshold"] == 95.0 and rep["promised_fa"] == pytest.approx(5 / 100)
    lo, hi = rep["promised_fa_95"]
    assert lo < 0.05 < hi and rep["oof_above_threshold"] == 4
    _, rep = calibrate_oof_scores(np.arange(31, dtype=float), 0.01)  # too few images for 1 %: the max, promising 1/32
    assert rep["rank"] == 31 and rep["promised_fa"] == pytest.approx(1 / 32)
    cal, rep = calibrate_oof(np.r_[np.arange(10.0), np.arange(20.0)], ["a"] * 10 + ["b"] * 20, 0.1)
    assert set(cal) == set(rep) == {"a", "b", "_default"} and rep["_default"]["n"] == 30
    assert all(set(v) == {"threshold", "min", "max"} for v in cal.values())  # dcam.calibration stays {threshold, min, max}


def test_clopper_pearson():
    lo, hi = clopper_pearson(0, 20)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 20), rel=1e-6)
    lo, hi = clopper_pearson(6, 20)
    assert lo < 0.3 < hi and clopper_pearson(20, 20)[1] == 1.0


def test_folds_cover_each_class():
    f = folds(["a"] * 7 + ["b"] * 3, k=5)
    assert sorted(f[:7]) == [0, 0, 1, 1, 2, 3, 4] and sorted(f[7:]) == [0, 1, 2]
    assert sorted(folds(["a"] * 7, k=100)) == list(range(7))  # k >= n: leave-one-out


def test_features_path_is_the_graph():
    """score_features (what oof.py scores with) gives the exported forward's score."""
    rng, heads, (tp, tc, vp, vm, vc) = _fitted(0)
    ref = heads.fuse(torch.from_numpy(vm), SCORE, [torch.from_numpy(p).float() for p in vp])[1].numpy()
    assert np.allclose(heads.score_features(SCORE, vp, vm), ref, atol=1e-6)


def test_oof_scores_are_not_in_sample_and_leave_the_heads_alone():
    rng, heads, (tp, tc, vp, vm, vc) = _fitted(1)
    before = {k: v.clone() for k, v in heads.state_dict().items()}
    in_sample = heads.score_features(SCORE, vp, vm)
    oof = oof_scores(heads, SCORE, tp, tc, vp, vm, vc, k=len(vc))["val"]
    assert all(torch.equal(v, heads.state_dict()[k]) for k, v in before.items())
    # an image scored by heads fitted without it sits higher than in-sample, and so does the threshold
    assert oof.mean() > in_sample.mean()
    for c in CLASSES:
        sel = np.asarray(vc) == c
        assert calibrate_oof(oof, vc, 0.05)[0][c]["threshold"] >= calibrate(in_sample, vc, 0.05)[c]["threshold"]
    # leave-one-out: an image's score comes from heads that never saw it, so a defect-like map on it is
    # not divided out by its own statistics (in-sample, it would raise its pixels' mean and std)
    vm2 = vm.copy(); vm2[0, :2, :2] += 5.0
    oof2 = oof_scores(heads, SCORE, tp, tc, vp, vm2, vc, k=len(vc))["val"]
    heads2 = _heads(); heads2.fit_features(SCORE, tp, tc, vp, vm2, vc)
    assert oof2[0] - oof[0] > heads2.score_features(SCORE, vp, vm2)[0] - in_sample[0]


def test_promised_false_alarm_rate_is_kept_on_gaussian_data():
    """Fit heads on 40 held-out normals, threshold for 5 % false alarms; measure on 2000 new normals. Averaged
    over repetitions, the out-of-fold threshold keeps its promise (within the spread the Beta interval
    allows), while the in-sample rule gives clearly more false alarms than the 5 % it is meant for."""
    fa_oof, fa_in, promised = [], [], []
    for seed in range(12):
        rng, heads, (tp, tc, vp, vm, vc) = _fitted(seed)
        oof = oof_scores(heads, SCORE, tp, tc, vp, vm, vc, k=len(vc))["val"]
        cal, rep = calibrate_oof(oof, vc, 0.05)
        cal_in = calibrate(heads.score_features(SCORE, vp, vm), vc, 0.05)
        np_, nm, nc = _normals(rng, 2000, 6.0)
        new = heads.score_features(SCORE, np_, nm)
        sel = np.asarray(nc) == "a"
        fa_oof.append((new[sel] >= cal["a"]["threshold"]).mean())
        fa_in.append((new[sel] >= cal_in["a"]["threshold"]).mean())
        promised.append(rep["a"]["promised_fa"])
        lo, hi = rep["a"]["promised_fa_95"]
        assert lo <= promised[-1] <= hi
    # n = 20 per class: k = ceil(21 * 0.95) = 20, promised 1/21; the mean of 12 Beta(1, 20) draws has sd ~1.3 %
    assert np.mean(promised) == pytest.approx(1 / 21)
    assert np.mean(fa_oof) <= np.mean(promised) + 0.03
    assert np.mean(fa_in) > np.mean(fa_oof) and np.mean(fa_in) > 0.05 + 0.03


def test_recall_at_fa_and_operating_metrics():
    good = np.arange(100, dtype=float)
    bad = np.array([50.5, 98.5, 99.5, 200.0])
    assert recall_at_fa(good, bad, 0.01) == 0.75  # one false alarm allowed: threshold just above 98
    assert recall_at_fa(good, bad, 0.0) == 0.5 and recall_at_fa(good, bad, 0.05) == 0.75
    assert recall_at_fa(good, bad, 0.5) == 1.0 and np.isnan(recall_at_fa(good, np.zeros(0), 0.01))
    m = operating_metrics(good, bad, 99.0)  # flagged: score >= threshold
    assert (m["false_alarms"], m["n_good"], m["detected"], m["n_defect"]) == (1, 100, 2, 4)
    assert m["fa_at_threshold"] == 1.0 and m["recall_at_threshold"] == 50.0
    assert m["recall_at_1pct_fa"] == 75.0 and m["recall_at_5pct_fa"] == 75.0
    lo, hi = m["fa_at_threshold_95"]
    assert lo < 1.0 < hi
    only_good = operating_metrics(good, np.zeros(0), 99.0)
    assert "recall_at_threshold" not in only_good and only_good["false_alarms"] == 1
    table = markdown_table({"per_class": {"a": {"image_auroc": 90.0, **m}, "b": {"image_auroc": 80.0, **only_good}},
                            "mean": {"image_auroc": 85.0}})
    assert "1.0 % (1/100)" in table and "50.0 % (2/4)" in table and "75.0 %" in table and "nan" not in table


def test_left_out_alarms():
    """Validation counts each held-out image against the threshold its class's other images set."""
    from dcam.calibrate import left_out_alarms
    scores = np.r_[np.arange(10.0), np.arange(10.0) + 0.5]
    flags = left_out_alarms(scores, ["a"] * 10 + ["b"] * 10, 0.01)  # 9 others: threshold = their maximum
    assert flags.tolist() == [False] * 9 + [True] + [False] * 9 + [True]
    # at the threshold all of them set, the image that set it would count itself: not what validation counts
    assert (scores[:10] >= calibrate_oof(scores[:10], ["a"] * 10, 0.01)[0]["a"]["threshold"]).sum() == 1
