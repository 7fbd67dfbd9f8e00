"""Heads fitted after training: normalisation stats, density export parity, resume, no-mask evaluation."""
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from dcam.__main__ import main
from dcam.calibrate import calibrate
from dcam.data import load_test, load_train_val
import dcam.density
from dcam.density import DensityHead, fit_gaussian, kmeans_groups
from dcam.evaluate import evaluate_split, markdown_table, predict, validation_estimate
from dcam.export import check_contract, export_onnx, run_onnx
from dcam.checkpoint import RunInfo, load_checkpoint, save_checkpoint
from dcam.config import variant_config
from dcam.torch_model import DistillModel
from dcam.pixel_norm import PixelNorm
from dcam.recover import model_from_onnx
from dcam.train import train

S = 32


def test_pixel_norm_stats():
    rng = np.random.default_rng(0)
    maps = np.concatenate([rng.normal(1.0, 0.1, (20, 8, 8)), rng.normal(5.0, 2.0, (20, 8, 8))]).astype(np.float32)
    maps[:20, 0, 0] = 1.0  # a pixel that never varies: its std is floored at the class median
    classes = ["a"] * 20 + ["b"] * 20
    pn = PixelNorm(2, 8)
    pn.fit(maps, classes, ["a", "b"])
    idx = torch.tensor([0] * 20 + [1] * 20)
    z = pn(torch.from_numpy(maps), idx).numpy()
    assert abs(z[:20].mean()) < 1e-4 and abs(z[20:].mean()) < 1e-4
    assert pn.std[0, 0, 0] == pytest.approx(float(np.median(maps[:20].std(0))), rel=1e-5)
    assert np.isfinite(z).all()


def test_density_head_matches_numpy():
    rng = np.random.default_rng(1)
    x = [rng.normal(size=(60, 5)), rng.normal(size=(60, 3))]
    classes = ["a"] * 30 + ["b"] * 30
    x[0][30:] += 4.0
    head = DensityHead(["a", "b"], [5, 3])
    head.fit(x, classes)
    head.fit_normalisation(x, classes)
    d = head.distances([torch.from_numpy(v).float() for v in x]).numpy()
    for k, c in enumerate("ab"):
        sel = np.asarray(classes) == c
        ref = 0.0
        for i, v in enumerate(x):
            mu = v[sel].mean(0)
            prec = head.state_dict()[f"prec{i}"][k].double().numpy()
            diff = v - mu
            ref = ref + np.einsum("nd,de,ne->n", diff, prec, diff) / v.shape[1]
        assert np.allclose(d[:, k], ref, rtol=1e-4, atol=1e-4)
    z = head([torch.from_numpy(v).float() for v in x]).numpy()
    assert (z.argmin(1) == np.r_[np.zeros(30), np.ones(30)]).mean() > 0.9  # picks the right class
    assert abs(z[:30, 0].mean()) < 1e-4 and abs(z[:30, 0].std() - 1) < 1e-3


def test_density_mixture_is_the_min_over_groups(monkeypatch):
    """density_groups: class b has two modes; with 2 Gaussians its distance is the smaller of the two."""
    monkeypatch.setattr(dcam.density, "MIN_PER_GROUP", 20)
    rng = np.random.default_rng(1)
    x = [rng.normal(size=(90, 4)), rng.normal(size=(90, 3))]
    x[0][30:60] += 6.0
    x[0][60:] -= 6.0
    classes = ["a"] * 30 + ["b"] * 60
    head = DensityHead(["a", "b"], [4, 3])
    head.fit(x, classes, max_groups=2)
    assert head.groups == [1, 2] and head.state_dict()["mean0"].shape == (3, 4)
    head.fit_normalisation(x, classes)
    d = head.distances([torch.from_numpy(v).float() for v in x]).numpy()
    own = [v[30:] for v in x]
    labels = kmeans_groups(own, 2)
    ref = np.full(90, np.inf)
    for g in range(2):
        gs = [fit_gaussian(v[labels == g]) for v in own]
        ref = np.minimum(ref, sum(np.einsum("nd,de,ne->n", v - mu, prec, v - mu) / v.shape[1] for v, (mu, prec) in zip(x, gs)))
    assert np.allclose(d[:, 1], ref, rtol=1e-4, atol=1e-4)
    # one Gaussian per class (the default) is what every model up to v0.2.0 had
    single = DensityHead(["a", "b"], [4, 3])
    single.fit(x, classes)
    assert single.groups == [1, 1] and single.state_dict()["mean0"].shape == (2, 4)


def test_a_tied_stage_shares_one_precision_across_a_class_groups(monkeypatch):
    """density_tie_dim: the wide stage keeps one precision per class (fitted on the within-group
    residuals), the narrow stage one per group; distances = numpy reference."""
    from sklearn.covariance import LedoitWolf
    monkeypatch.setattr(dcam.density, "MIN_PER_GROUP", 20)
    rng = np.random.default_rng(2)
    x = [rng.normal(size=(90, 3)), rng.normal(size=(90, 6))]
    x[0][30:60] += 6.0
    x[0][60:] -= 6.0
    x[1][60:] += 2.0
    classes = ["a"] * 30 + ["b"] * 60
    head = DensityHead(["a", "b"], [3, 6], tie_dim=6)
    head.fit(x, classes, max_groups=2)
    sd = head.state_dict()
    assert head.groups == [1, 2] and head.tied == [False, True]
    assert sd["prec0"].shape == (3, 3, 3) and sd["prec1"].shape == (2, 6, 6) and sd["offset1"].shape == (3, 6)
    d = head.distances([torch.from_numpy(v).float() for v in x]).numpy()
    own = [v[30:] for v in x]
    labels = kmeans_groups(own, 2)
    resid = np.concatenate([own[1][labels == g] - own[1][labels == g].mean(0) for g in range(2)])
    tied_prec = np.linalg.inv(LedoitWolf(assume_centered=True).fit(resid).covariance_)
    ref = np.full(90, np.inf)
    for g in range(2):
        mu0, prec0 = fit_gaussian(own[0][labels == g])
        mu1 = own[1][labels == g].mean(0)
        dist = (np.einsum("nd,de,ne->n", x[0] - mu0, prec0, x[0] - mu0) / 3
                + np.einsum("nd,de,ne->n", x[1] - mu1, tied_prec, x[1] - mu1) / 6)
        ref = np.minimum(ref, dist)
    assert np.allclose(d[:, 1], ref, rtol=1e-3, atol=1e-3)
    # one group per class: tied or not, the same model (the layout of every model up to v0.2.0)
    one, untied = DensityHead(["a", "b"], [3, 6], tie_dim=6), DensityHead(["a", "b"], [3, 6])
    one.fit(x, classes); untied.fit(x, classes)
    assert all(torch.allclose(one.state_dict()[k], untied.state_dict()[k], rtol=1e-4, atol=1e-5) for k in untied.state_dict())


@pytest.fixture(scope="module")
def headed(mvtec_root, tmp_path_factory):
    classes = ["tile", "widget"]
    tr, va = load_train_val(mvtec_root, classes, S, val_fraction=0.25, seed=0, progress=False)
    # "map" density keeps this fast; the deep stages' parity is checked on the committed model
    model = DistillModel(variant_config("stfpm", input_size=S, score_rule="top1pct_mean", density="map",
                                        tta_views=2, pixel_norm="score", w_map=0.5))
    train(model, tr.images, va.images, epochs=1, batch_size=4, max_steps=2, progress=False, log=lambda *_: None)
    model.fit_heads(classes, tr.images, tr.classes, va.images, va.classes, log=lambda *_: None)
    _, val_scores = predict(model, va.images, progress=False)
    path = tmp_path_factory.mktemp("heads") / "h.onnx"
    export_onnx(model, path, classes, calibrate(val_scores, va.classes), {}, model.cfg.to_dict() | {"variant": "stfpm"})
    return model, path, classes, tr, va


def test_density_head_export_parity(headed, mvtec_root):
    model, path, classes, _, _ = headed
    assert check_contract(path) == []
    test = load_test(mvtec_root, classes, S, progress=False)
    m_pt, s_pt = predict(model, test.images, progress=False)
    for bs in (1, 3):
        m_ort, s_ort = run_onnx(path, test.images, batch_size=bs)
        assert np.abs(s_ort - s_pt).max() <= 1e-4 and np.abs(m_ort - m_pt).max() <= 1e-3
    # the PyTorch model rebuilt from the ONNX file (what the committed-model test uses) agrees too
    _, s_re = predict(model_from_onnx(path), test.images, progress=False)
    assert np.abs(s_re - s_pt).max() <= 1e-4


def test_density_groups_export_and_reload(headed, tmp_path):
    """A model whose first class has 2 density Gaussians: ONNX parity, rebuilt from ONNX, checkpoint."""
    import copy
    model, _, classes, _, va = headed
    model = copy.deepcopy(model)
    dens = model.heads.density
    old = {k: v.clone() for k, v in dens.state_dict().items()}
    dens._allocate([2, 1])
    for i in range(len(dens.dims)):
        getattr(dens, f"mean{i}").copy_(torch.cat([old[f"mean{i}"][:1], old[f"mean{i}"][:1] + 0.5, old[f"mean{i}"][1:]]))
        getattr(dens, f"prec{i}").copy_(torch.cat([old[f"prec{i}"][:1], old[f"prec{i}"][:1], old[f"prec{i}"][1:]]))
    m_pt, s_pt = predict(model, va.images, progress=False)
    path = export_onnx(model, tmp_path / "g.onnx", classes, calibrate(s_pt, va.classes), {},
                       model.cfg.to_dict() | {"variant": "stfpm", "density_groups_per_class": [2, 1]})
    assert check_contract(path) == []
    m_ort, s_ort = run_onnx(path, va.images, batch_size=3)
    assert np.abs(s_ort - s_pt).max() <= 1e-4 and np.abs(m_ort - m_pt).max() <= 1e-3
    rebuilt = model_from_onnx(path)
    assert rebuilt.heads.density.groups == [2, 1]
    assert np.abs(predict(rebuilt, va.images, progress=False)[1] - s_pt).max() <= 1e-4
    save_checkpoint(model, tmp_path / "g.pt", RunInfo(classes))
    again, _ = load_checkpoint(tmp_path / "g.pt")
    assert again.heads.density.groups == [2, 1]
    assert np.allclose(predict(again, va.images, progress=False)[1], s_pt, atol=1e-5)


def test_tied_groups_export_and_reload(headed, tmp_path, monkeypatch):
    """Two Gaussians per class with the widest stage tied: ONNX parity, rebuilt from ONNX, checkpoint."""
    import copy
    monkeypatch.setattr(dcam.density, "MIN_PER_GROUP", 3)
    model, _, classes, tr, va = headed
    model = copy.deepcopy(model)
    model.reconfigure(density_groups=2, density_tie_dim=96)  # the 96-channel stride-16 stage
    # the fixture holds out all but one training image per class: fit the Gaussians on all of them
    model.fit_heads(classes, np.concatenate([tr.images, va.images]), tr.classes + va.classes, va.images, va.classes,
                    log=lambda *_: None)
    dens = model.heads.density
    assert dens.groups == [2, 2] and dens.tied == [False, False, True] and dens.prec2.shape == (2, 96, 96)
    m_pt, s_pt = predict(model, va.images, progress=False)
    path = export_onnx(model, tmp_path / "t.onnx", classes, calibrate(s_pt, va.classes), {},
                       model.cfg.to_dict() | {"variant": "stfpm", "density_groups_per_class": dens.groups})
    assert check_contract(path) == []
    m_ort, s_ort = run_onnx(path, va.images, batch_size=3)
    assert np.abs(s_ort - s_pt).max() <= 1e-4 and np.abs(m_ort - m_pt).max() <= 1e-3
    rebuilt = model_from_onnx(path)
    assert rebuilt.heads.density.tied == [False, False, True]
    assert np.abs(predict(rebuilt, va.images, progress=False)[1] - s_pt).max() <= 1e-4
    save_checkpoint(model, tmp_path / "t.pt", RunInfo(classes))
    again, _ = load_checkpoint(tmp_path / "t.pt")
    assert np.allclose(predict(again, va.images, progress=False)[1], s_pt, atol=1e-5)


def test_heads_checkpoint_roundtrip(headed, tmp_path):
    model, _, classes, _, va = headed
    save_checkpoint(model, tmp_path / "m.pt", RunInfo(classes))
    again, _ = load_checkpoint(tmp_path / "m.pt")
    _, a = predict(model, va.images, progress=False)
    _, b = predict(again, va.images, progress=False)
    assert np.allclose(a, b, atol=1e-5)


def test_resume_is_deterministic(mvtec_root, tmp_path):
    tr, va = load_train_val(mvtec_root, ["widget"], S, val_fraction=0.25, seed=0, progress=False)
    kw = dict(batch_size=3, progress=False)
    torch.manual_seed(0)  # same init for each run (a fresh process starts from torch's fixed default seed)
    full = DistillModel(variant_config("stfpm", input_size=S))
    train(full, tr.images, va.images, epochs=2, state_path=tmp_path / "a.pt", log=lambda *_: None, **kw)

    def killed_after_epoch_1(msg):
        if msg.startswith("epoch 1:"):
            raise KeyboardInterrupt
    torch.manual_seed(0)
    part = DistillModel(variant_config("stfpm", input_size=S))
    with pytest.raises(KeyboardInterrupt):
        train(part, tr.images, va.images, epochs=2, state_path=tmp_path / "b.pt", log=killed_after_epoch_1, **kw)
    resumed = DistillModel(variant_config("stfpm", input_size=S))  # a fresh process
    info = train(resumed, tr.images, va.images, epochs=2, state_path=tmp_path / "b.pt", resume=True,
                 log=lambda *_: None, **kw)
    assert [h["epoch"] for h in info["history"]] == [1, 2]
    a, b = full.student.state_dict(), resumed.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_class_without_masks(mvtec_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(mvtec_root, root)
    shutil.rmtree(root / "tile" / "ground_truth")  # a new class that has no masks
    classes = ["tile", "widget"]
    tr, va = load_train_val(root, classes, S, val_fraction=0.25, seed=0, progress=False)
    model = DistillModel(variant_config("stfpm", input_size=S, density="map"))
    train(model, tr.images, va.images, epochs=1, batch_size=4, max_steps=1, progress=False, log=lambda *_: None)
    model.fit_heads(classes, tr.images, tr.classes, va.images, va.classes, log=lambda *_: None)
    test = load_test(root, classes, S, progress=False)
    assert test.no_mask_classes == {"tile"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning / NaN means
        metrics, _, _ = evaluate_split(model, test, progress=False)
        est = validation_estimate(model, va, progress=False)
    tile, widget = metrics["per_class"]["tile"], metrics["per_class"]["widget"]
    assert tile["pixel_metrics"] == "no masks" and "pixel_auroc" not in tile and np.isfinite(tile["image_auroc"])
    assert np.isfinite(widget["pixel_auroc"]) and metrics["mean"]["pixel_auroc"] == widget["pixel_auroc"]
    assert "no masks" in markdown_table(metrics) and "nan" not in markdown_table(metrics)
    assert "synthetic" in est["kind"] and np.isfinite(est["per_class"]["tile"]["image_auroc"])
    # and the whole CLI (train, heads, evaluate, export) on it, warnings as errors
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        main(["all", "--data-root", str(root), "--input-size", str(S), "--epochs", "1", "--max-steps", "1",
              "--batch-size", "4", "--val-fraction", "0.25", "--out", str(out), "--output", str(tmp_path / "m.onnx"),
              "--quiet", "--density", "map"])
    saved = json.loads((out / "eval" / "metrics.json").read_text())
    assert saved["per_class"]["tile"]["pixel_metrics"] == "no masks" and check_contract(tmp_path / "m.onnx") == []
    assert "nan" not in (out / "eval" / "metrics.md").read_text().lower()
