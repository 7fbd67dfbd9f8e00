import math

import pytest
import torch

from dcam.attention import CBAM
from dcam.config import VARIANTS, variant_config
from dcam.losses import (DCAMFixedLoss, DCAMLoss, STFPMLoss, build_loss, channel_cosine_loss, position_cosine_loss,
                         spatial_kl_loss, stfpm_loss)


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


def test_build_loss_picks_one_module_per_method():
    kinds = {name: type(build_loss(cfg, [5, 5, 5])) for name, cfg in VARIANTS.items()}
    assert kinds == {"stfpm": STFPMLoss, "dcam": DCAMLoss, "dcam_noatt": DCAMLoss, "dcam_cos": DCAMLoss,
                     "dcam_kl": DCAMLoss, "dcam_fixed": DCAMFixedLoss, "dcam_fixed_prod": DCAMFixedLoss}
    assert build_loss(VARIANTS["dcam_noatt"], [5]).attention is None and not list(build_loss(VARIANTS["stfpm"], [5]).parameters())


def test_loss_modules_sum_their_terms_over_scales(feats):
    t, s = feats
    ts, ss, w = [t, 2 * t], [s, s], (1.0, 0.5, 1.0)
    total, parts = STFPMLoss(w)(ts, ss)
    assert float(total) == pytest.approx(float(stfpm_loss(t, s) + 0.5 * stfpm_loss(2 * t, s)), rel=1e-6)
    assert parts["stfpm"] == pytest.approx(float(total), rel=1e-6) and parts["cos"] == 0.0
    cfg = variant_config("dcam_fixed", attention=False, w_kl=0.5, temperature=2.0, scale_weights=w)
    total, parts = build_loss(cfg, [5, 5])(ts, ss)
    expect = sum(wi * (position_cosine_loss(a, b) + channel_cosine_loss(a, b) + 0.5 * spatial_kl_loss(a, b, 2.0))
                 for a, b, wi in zip(ts, ss, w))
    assert float(total) == pytest.approx(float(expect), rel=1e-6)
    assert sum(parts.values()) == pytest.approx(float(total), rel=1e-6) and parts["stfpm"] == 0.0


def test_dcam_fixed_attends_the_teacher_too(feats):
    t, s = feats
    torch.manual_seed(0)
    loss = build_loss(variant_config("dcam_fixed", w_pos=0.0, w_kl=0.0), [5])
    with torch.no_grad():
        mc, ms = loss.attention[0].masks(s)
        assert float(loss([t], [s])[0]) == pytest.approx(float(channel_cosine_loss(t * mc * ms, s * mc * ms)), rel=1e-6)
