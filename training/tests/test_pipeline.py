"""Tiny end-to-end runs: train -> calibrate -> export -> ONNX Runtime parity; and the CLI."""
import json

import numpy as np
import onnx
import pytest

from dcam.checkpoint import load_checkpoint
from dcam.__main__ import main
from dcam.calibrate import calibrate
from dcam.data import load_test, load_train_val
from dcam.evaluate import evaluate_split, predict
from dcam.export import check_contract, export_onnx, read_metadata, run_onnx
from dcam.config import VARIANTS, Density, variant_config
from dcam.torch_model import DistillModel
from dcam.train import train

S = 64


@pytest.fixture(scope="module")
def trained(mvtec_root, tmp_path_factory):
    classes = ["tile", "widget"]
    tr, va = load_train_val(mvtec_root, classes, S, val_fraction=0.25, seed=0, progress=False)
    model = DistillModel(variant_config("dcam_fixed", input_size=S))
    info = train(model, tr.images, va.images, epochs=2, batch_size=4, progress=False, log=lambda *_: None)
    _, val_scores = predict(model, va.images, progress=False)
    cal = calibrate(val_scores, va.classes)
    path = tmp_path_factory.mktemp("export") / "m.onnx"
    export_onnx(model, path, classes, cal, {"mean": {}}, {"variant": "dcam_fixed"})
    return model, path, classes, info


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_trains(variant, mvtec_root):
    tr, va = load_train_val(mvtec_root, ["widget"], 32, val_fraction=0.25, seed=0, progress=False)
    model = DistillModel(variant_config(variant, input_size=32))
    info = train(model, tr.images, va.images, epochs=3, batch_size=3, max_steps=2, progress=False, log=lambda *_: None)
    assert info["steps"] == 2 and np.isfinite(info["history"][0]["train_loss"])
    maps, scores = predict(model, va.images, progress=False)
    assert maps.shape == (len(va), 32, 32) and np.allclose(scores, maps.reshape(len(va), -1).max(1))


def test_top1pct_score_rule_and_parity(mvtec_root, tmp_path):
    tr, va = load_train_val(mvtec_root, ["widget"], 64, val_fraction=0.25, seed=0, progress=False)
    model = DistillModel(variant_config("stfpm", input_size=64, score_rule="top1pct_mean"))
    train(model, tr.images, va.images, epochs=1, batch_size=4, max_steps=1, progress=False, log=lambda *_: None)
    maps, scores = predict(model, va.images, progress=False)
    k = 64 * 64 // 100
    expect = np.sort(maps.reshape(len(va), -1), axis=1)[:, -k:].mean(1)
    assert np.allclose(scores, expect, atol=1e-6)
    path = export_onnx(model, tmp_path / "t.onnx", ["widget"], calibrate(scores, va.classes), {}, {})
    assert check_contract(path) == []
    m_ort, s_ort = run_onnx(path, va.images, batch_size=3)
    assert np.abs(s_ort - scores).max() <= 1e-4 and np.abs(m_ort - maps).max() <= 1e-3


def test_teacher_is_frozen(trained):
    model = trained[0]
    model.train()
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())


def test_export_contract(trained):
    model, path, classes, _ = trained
    assert check_contract(path) == []
    meta = read_metadata(path)
    assert json.loads(meta["dcam.classes"]) == classes and meta["dcam.input_size"] == str(S)
    assert set(json.loads(meta["dcam.calibration"])) == {*classes, "_default"}
    assert onnx.load(str(path)).opset_import[0].version >= 17
    # the training-only attention is not in the graph
    assert not any("attention" in i.name for i in onnx.load(str(path)).graph.initializer)


def test_onnx_parity_and_dynamic_batch(trained, mvtec_root):
    model, path, classes, _ = trained
    test = load_test(mvtec_root, classes, S, progress=False)
    m_pt, s_pt = predict(model, test.images, progress=False)
    for bs in (1, 3, 8):
        m_ort, s_ort = run_onnx(path, test.images, batch_size=bs)
        assert m_ort.dtype == np.float32 and m_ort.shape == (len(test), S, S) and s_ort.shape == (len(test),)
        assert np.abs(s_ort - s_pt).max() <= 1e-4
        assert np.abs(m_ort - m_pt).max() <= 1e-3


def test_evaluate_metrics(trained, mvtec_root):
    model, _, classes, _ = trained
    test = load_test(mvtec_root, classes, S, progress=False)
    metrics, maps, scores = evaluate_split(model, test, progress=False)
    assert set(metrics["per_class"]) == set(classes)
    for k in ("image_auroc", "pixel_auroc", "au_pro"):
        assert 0 <= metrics["mean"][k] <= 100


def test_cli_all(mvtec_root, tmp_path):
    out = tmp_path / "run"
    onnx_path = tmp_path / "cli.onnx"
    main(["all", "--data-root", str(mvtec_root), "--input-size", "32", "--epochs", "1", "--max-steps", "2",
          "--batch-size", "4", "--val-fraction", "0.25", "--out", str(out), "--output", str(onnx_path), "--quiet",
          "--variant", "dcam", "--density", "none", "--pixel-norm", "none", "--score-rule", "max"])  # map-only model
    assert (out / "model.pt").exists() and (out / "eval" / "metrics.json").exists()
    assert (out / "eval" / "overlays.png").exists() and (out / "eval" / "roc_widget.png").exists()
    assert check_contract(onnx_path) == []
    metrics = json.loads(read_metadata(onnx_path)["dcam.metrics"])
    assert "image_auroc" in metrics["mean"]
    main(["calibrate", "--checkpoint", str(out / "model.pt"), "--data-root", str(mvtec_root), "--score-rule",
          "top1pct_mean", "--output-checkpoint", str(out / "cal.pt"), "--quiet"])
    main(["export", "--checkpoint", str(out / "cal.pt"), "--output", str(tmp_path / "cal.onnx"), "--quiet"])
    assert json.loads(read_metadata(tmp_path / "cal.onnx")["dcam.train_config"])["score_rule"] == "top1pct_mean"
    # Heads fitted anew on the checkpoint's student: its run record carries over, the heads' outputs are new.
    main(["fit-heads", "--checkpoint", str(out / "model.pt"), "--data-root", str(mvtec_root), "--density", "map",
          "--out", str(tmp_path / "heads"), "--quiet"])
    _, before = load_checkpoint(out / "model.pt")
    model, after = load_checkpoint(tmp_path / "heads" / "model.pt")
    assert (after.classes, after.teacher_weights, after.train_config.seed, after.train_config.steps) == \
        (before.classes, before.teacher_weights, before.train_config.seed, before.train_config.steps)
    assert model.cfg.heads.density is Density.MAP and after.train_config.density_groups_per_class == [1] * len(after.classes)
    assert after.calibration and after.calibration_report and after.validation_estimate


def test_cli_ablation(mvtec_root, tmp_path):
    out = tmp_path / "abl"
    main(["ablation", "--data-root", str(mvtec_root), "--input-size", "32", "--epochs", "1", "--max-steps", "1",
          "--batch-size", "4", "--val-fraction", "0.25", "--out", str(out), "--quiet", "--variants", "stfpm", "dcam"])
    res = json.loads((out / "ablation.json").read_text())
    assert set(res) == {"stfpm", "dcam"} and "au_pro" in res["dcam"]["test"]["mean"]
    assert "| stfpm |" in (out / "ablation.md").read_text()


def test_cli_defaults_are_the_shipped_recipe(mvtec_root, tmp_path):
    """`all` without method flags: STFPM student, a patch bank (1 % of each class's positions, 64 PCA dimensions)
    whose map takes the student's at 0.1, deep density (up to 12 Gaussians per class, the 1280-channel stage
    tied) on 1 view, the map's maximum fused at 1.0, 10 % of each test defect type as validation."""
    out = tmp_path / "run"
    main(["all", "--data-root", str(mvtec_root), "--input-size", "32", "--epochs", "1", "--max-steps", "1",
          "--batch-size", "4", "--val-fraction", "0.25", "--out", str(out), "--output", str(tmp_path / "d.onnx"), "--quiet"])
    tc = json.loads(read_metadata(tmp_path / "d.onnx")["dcam.train_config"])
    assert (tc["variant"], tc["score_rule"], tc["density"], tc["tta_views"], tc["pixel_norm"], tc["w_map"],
            tc["density_groups"], tc["density_tie_dim"], tc["val_from_test"], tc["bank_fraction"], tc["bank_dims"],
            tc["bank_w_student"]) == ("stfpm", "max", "deep", 1, "none", 1.0, 12, 1024, 0.1, 0.01, 64, 0.1)
    assert tc["bank_entries"] > 0
    est = json.loads((out / "validation_estimate.json").read_text())
    assert all("real labelled" in m["estimate_kind"] for m in est["per_class"].values())
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["test_images"] == 6 and len(metrics["validation_defects_from_test"]) == 2  # set aside, not tested
    assert read_metadata(tmp_path / "d.onnx")["dcam.model_name"] == "stfpm-multi-mobilenetv2-density-bank"
    assert (out / "validation_estimate.json").exists() and check_contract(tmp_path / "d.onnx") == []
    # out-of-fold calibration by default, and the metrics users act on in the report and the metadata
    assert (tc["calibration_rule"], tc["calibration_fpr"], tc["oof_folds"]) == ("oof", 0.01, "leave-one-out")
    for m in (metrics["per_class"]["widget"], est["per_class"]["widget"]):
        assert {"fa_at_threshold", "recall_at_threshold", "recall_at_1pct_fa", "recall_at_5pct_fa", "image_auroc"} <= set(m)
    assert est["per_class"]["widget"]["good_scores"] == "out-of-fold"
    meta_metrics = json.loads(read_metadata(tmp_path / "d.onnx")["dcam.metrics"])
    cal = meta_metrics["calibration"]["widget"]
    assert {"promised_fa", "promised_fa_95", "n", "measured_fa", "false_alarms"} <= set(cal)
    assert "recall_at_threshold" in meta_metrics["per_class"]["widget"]
    assert cal["threshold"] == pytest.approx(json.loads(read_metadata(tmp_path / "d.onnx")["dcam.calibration"])["widget"]["threshold"], abs=0.01)
    main(["calibrate", "--checkpoint", str(out / "model.pt"), "--data-root", str(mvtec_root), "--quiet",
          "--output-checkpoint", str(tmp_path / "c.pt")])
    import torch
    ckpt = torch.load(tmp_path / "c.pt", weights_only=False)
    assert ckpt["calibration"] == json.loads(read_metadata(tmp_path / "d.onnx")["dcam.calibration"])  # same rule, same data
    assert ckpt["calibration_report"]["widget"]["rule"] == "oof-conformal"
    with pytest.raises(SystemExit):  # the heads' statistics depend on the score rule
        main(["calibrate", "--checkpoint", str(out / "model.pt"), "--data-root", str(mvtec_root), "--score-rule", "max",
              "--quiet"])
