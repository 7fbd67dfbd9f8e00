import math

import pytest
import torch

from dcam.attention import CBAM
from dcam.losses import channel_cosine_loss, position_cosine_loss, spatial_kl_loss, stfpm_loss


@pytest.fixture
def feats():
    torch.manual_seed(0)
    return torch.randn(2, 5, 6, 7), torch.randn(2, 5, 6, 7)


def test_identical_maps_give_zero(feats):
    t, _ = feats
    for fn in (channel_cosine_loss, position_cosine_loss, spatial_kl_loss, stfpm_loss):
        assert abs(float(fn(t, t.clone()))) < 1e-5, fn.__name__


def test_known_values():
    t = torch.zeros(1, 2, 1, 2)
    t[0, 0, 0, 0] = 1; t[0, 1, 0, 1] = 1        # channel 0 at pos 0, channel 1 at pos 1
    s = torch.zeros(1, 2, 1, 2)
    s[0, 0, 0, 1] = 1; s[0, 1, 0, 1] = 1        # channel 0 at pos 1, channel 1 at pos 1
    # channel-wise: channel 0 orthogonal (1), channel 1 identical (0) -> 0.5
    assert float(channel_cosine_loss(t, s)) == pytest.approx(0.5, abs=1e-6)
    # per position: pos 0: t=(1,0), s=(0,0) -> cos 0 -> 1; pos 1: t=(0,1), s=(1,1) -> 1 - 1/sqrt2
    assert float(position_cosine_loss(t, s)) == pytest.approx((1 + 1 - 1 / math.sqrt(2)) / 2, abs=1e-6)


def test_stfpm_equals_position_cosine_for_nonzero_features(feats):
    t, s = feats
    assert float(stfpm_loss(t, s)) == pytest.approx(float(position_cosine_loss(t, s)), rel=1e-5)


def test_kl_matches_manual(feats):
    t, s = feats
    T = 4.0
    pt = torch.softmax(t.flatten(2) / T, 2)
    ps = torch.softmax(s.flatten(2) / T, 2)
    manual = (pt * (pt.log() - ps.log())).sum(2).mean() * T * T
    assert float(spatial_kl_loss(t, s, T)) == pytest.approx(float(manual), rel=1e-5)
    assert float(spatial_kl_loss(t, s, T)) > 0


def test_scale_invariance(feats):
    t, s = feats
    assert float(channel_cosine_loss(t, 3 * s)) == pytest.approx(float(channel_cosine_loss(t, s)), rel=1e-5)
    assert float(position_cosine_loss(t, 3 * s)) == pytest.approx(float(position_cosine_loss(t, s)), rel=1e-5)


def test_cbam_shapes_and_ranges():
    x = torch.randn(3, 24, 16, 16)
    cbam = CBAM(24, reduction=4)
    mc, ms = cbam.masks(x)
    assert mc.shape == (3, 24, 1, 1) and ms.shape == (3, 1, 16, 16)
    assert ((mc > 0) & (mc < 1)).all() and ((ms > 0) & (ms < 1)).all()
    assert cbam(x).shape == x.shape
