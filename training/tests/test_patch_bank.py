"""The local patch bank (patch_bank.py): nearest-neighbour distances, coreset, export parity, reload."""
import copy

import numpy as np
import pytest
import torch

import dcam.patch_bank
from dcam.calibrate import calibrate
from dcam.checkpoint import RunInfo, load_checkpoint, save_checkpoint
from dcam.config import variant_config
from dcam.data import load_test, load_train_val
from dcam.evaluate import predict
from dcam.export import check_contract, export_onnx, run_onnx
from dcam.patch_bank import PatchBank, greedy_coreset
from dcam.recover import model_from_onnx
from dcam.torch_model import DistillModel
from dcam.train import train

S = 32


@pytest.mark.parametrize("dims", [0, 4])
def test_distances_are_those_to_the_nearest_bank_entry(monkeypatch, dims):
    monkeypatch.setattr(dcam.patch_bank, "CHUNK", 7)  # several chunks, the last one short
    g = torch.Generator().manual_seed(0)
    feats = [None, torch.randn(3, 5, 4, 4, generator=g), torch.randn(3, 3, 2, 2, generator=g)]
    bank = PatchBank(16, 8, 20, dims, agg=1, sigma=0)
    bank.fit(feats, ["a", "a", "b"], {"a": 12, "b": 8})
    assert len(bank.chunks()) == 3 and bank.chunks()[-1].shape[1] == 6
    d = bank.distances(feats)
    # brute force in float64 on the same projected descriptors
    x = dcam.patch_bank.descriptors(feats, (1, 2), 1).permute(0, 2, 3, 1).reshape(-1, 8).double()
    q = (x - bank.centre.double()) @ bank.proj.double()
    aug = torch.cat([c.double() for c in bank.chunks()], 1)
    entries = -aug[:-1].T / 2
    assert torch.allclose((entries ** 2).sum(1), aug[-1], rtol=1e-4)
    ref = torch.cdist(q, entries).min(1).values.view(3, 4, 4)
    # |q|^2 - 2 q.b + |b|^2 in float32 cancels near 0, and the square root magnifies that: sqrt(1e-6) = 1e-3
    assert torch.allclose(d.double(), ref, atol=3e-3)
    # a training descriptor that was kept is at distance ~0; the bank holds 12 + 8 entries of the right classes
    assert d.min() < 1e-2


def test_greedy_coreset_keeps_the_rare_pattern():
    x = torch.cat([torch.randn(500, 3) * 0.1, torch.tensor([[8.0, 8.0, 8.0]])])
    picked = greedy_coreset(x, 5, seed=1)
    assert len(set(picked.tolist())) == 5 and 500 in picked.tolist()  # k-means would average it away


def test_the_bank_is_a_share_of_each_class_up_to_a_cap_on_the_whole():
    n = {"bottle": 178, "magnetic_tile": 648}
    assert PatchBank.entries_per_class(list(n), n, 1024, 0.01, 10_000) == {"bottle": 1823, "magnetic_tile": 6636}
    n["new"] = 1000  # a third class with 1000 normal images: all three shrink by the same factor
    e = PatchBank.entries_per_class(list(n), n, 1024, 0.01, 10_000)
    assert abs(sum(e.values()) - 10_000) <= 2 and e["new"] / e["bottle"] == pytest.approx(1000 / 178, rel=1e-2)
    assert PatchBank.entries_per_class(["a"], {"a": 1}, 4, 0.01) == {"a": 1}  # at least one


@pytest.fixture(scope="module")
def banked(mvtec_root, tmp_path_factory):
    classes = ["tile", "widget"]
    tr, va = load_train_val(mvtec_root, classes, S, val_fraction=0.25, seed=0, progress=False)
    model = DistillModel(variant_config("stfpm", input_size=S, density="map", w_map=1.0, bank_fraction=0.5,
                                        bank_dims=16, bank_w_student=0.5))
    train(model, tr.images, va.images, epochs=1, batch_size=4, max_steps=2, progress=False, log=lambda *_: None)
    model.fit_heads(classes, tr.images, tr.classes, va.images, va.classes, log=lambda *_: None)
    _, val_scores = predict(model, va.images, progress=False)
    path = tmp_path_factory.mktemp("bank") / "b.onnx"
    export_onnx(model, path, classes, calibrate(val_scores, va.classes), {},
                model.cfg.to_dict() | {"variant": "stfpm", "bank_entries": model.heads.bank.entries,
                                       "density_groups_per_class": model.heads.density.groups})
    return model, path, classes, tr, va


def test_bank_is_fitted_on_the_training_images(banked):
    model, _, _, tr, _ = banked
    bank = model.heads.bank
    positions = (S // 8) ** 2
    assert bank.entries == sum(max(1, round(0.5 * tr.classes.count(c) * positions)) for c in ("tile", "widget"))
    assert float(bank.scale) > 0 and float(bank.w_student) > 0
    with torch.no_grad():
        x = torch.from_numpy(tr.images)
        t = model.teacher_features(x)
        assert float(bank.map(t).max()) < 1.0  # training images are close to their own bank
        # the model's raw map is the bank's plus the weighted student's, and the fused score is made from it
        student = model.anomaly_map.map(t, model.student(model.normalize(x)))
        assert torch.allclose(model.student_map(tr.images), bank.map(t) + bank.w_student * student, atol=1e-6)


def test_bank_export_parity_and_reload(banked, mvtec_root, tmp_path):
    model, path, classes, _, va = banked
    assert check_contract(path) == []
    test = load_test(mvtec_root, classes, S, progress=False)
    m_pt, s_pt = predict(model, test.images, progress=False)
    for bs in (1, 3):
        m_ort, s_ort = run_onnx(path, test.images, batch_size=bs)
        assert np.abs(s_ort - s_pt).max() <= 1e-4 and np.abs(m_ort - m_pt).max() <= 1e-4
    rebuilt = model_from_onnx(path)
    assert rebuilt.heads.bank.entries == model.heads.bank.entries
    m_re, s_re = predict(rebuilt, test.images, progress=False)
    assert np.abs(s_re - s_pt).max() <= 1e-4 and np.abs(m_re - m_pt).max() <= 1e-4
    save_checkpoint(model, tmp_path / "b.pt", RunInfo(classes))
    again, _ = load_checkpoint(tmp_path / "b.pt")
    assert np.allclose(predict(again, va.images, progress=False)[1], predict(model, va.images, progress=False)[1], atol=1e-5)


def test_the_bank_map_points_at_the_defect(banked, mvtec_root):
    """The synthetic defects are bright rectangles: the bank map (student weight 0) peaks inside them."""
    model, _, classes, _, _ = banked
    model = copy.deepcopy(model)
    model.heads.bank.w_student.zero_()
    test = load_test(mvtec_root, classes, S, progress=False)
    maps, _ = predict(model, test.images, progress=False)
    bad = np.flatnonzero(test.labels == 1)
    inside = [maps[i][test.masks[i]].mean() for i in bad]
    outside = [maps[i][~test.masks[i]].mean() for i in bad]
    assert all(a > b for a, b in zip(inside, outside))
