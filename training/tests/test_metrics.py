import numpy as np
import pytest

from dcam.calibrate import calibrate, normalise
from dcam.evaluate import au_pro, class_metrics


def test_au_pro_perfect_and_hand_case():
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0, :2] = True                     # region A: 2 px
    masks[0, 3, 3] = True                      # region B: 1 px
    perfect = masks.astype(float)
    assert au_pro(masks, perfect) == pytest.approx(1.0)
    # Region A scores highest, then all 13 normal pixels tie, then region B.
    # PRO = 0.5 for FPR in (0, 1): the area to FPR 0.3 is 0.5 * 0.3 (A detected at FPR 0) -> normalised 0.5.
    amap = np.zeros((1, 4, 4))
    amap[0, 0, :2] = 2.0
    amap[0, 3, 3] = -1.0
    # the tie block jumps FPR 0 -> 1 and PRO stays 0.5, so interpolation at 0.3 gives 0.5
    assert au_pro(masks, amap) == pytest.approx(0.5)


def test_au_pro_half_region():
    # one 4-px region, 12 normal pixels; half the region above everything, half below every normal pixel
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0] = True
    amap = np.zeros((1, 4, 4))
    amap[0, 0, :2] = 5.0
    amap[0, 0, 2:] = -5.0
    amap[0, 1:] = np.linspace(-4, 4, 12).reshape(3, 4)  # distinct normal scores between the halves
    # PRO = 0.5 from FPR 0 until all normals pass (FPR 1): AU-PRO@0.3 = 0.5
    assert au_pro(masks, amap) == pytest.approx(0.5)


def test_class_metrics_image_auroc():
    m = class_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.15]), None, None)
    assert m["image_auroc"] == pytest.approx(75.0)


def test_calibration_rule():
    scores = np.r_[np.linspace(1, 2, 101), np.linspace(10, 11, 11)]
    classes = ["a"] * 101 + ["b"] * 11
    cal = calibrate(scores, classes, fpr=0.01)
    assert set(cal) == {"a", "b", "_default"}
    assert cal["a"]["min"] == pytest.approx(1) and cal["a"]["max"] == pytest.approx(2)
    assert cal["a"]["threshold"] == pytest.approx(1.99)
    assert cal["_default"]["min"] == pytest.approx(1) and cal["_default"]["max"] == pytest.approx(11)
    assert normalise(cal["a"]["threshold"], cal["a"]) == pytest.approx(0.5)
    assert normalise(100.0, cal["a"]) == 1.0 and normalise(-100.0, cal["a"]) == 0.0
