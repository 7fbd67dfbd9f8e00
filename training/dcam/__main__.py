"""CLI: python -m dcam {train,evaluate,export,all,ablation,calibrate,fit-heads,fp16} -- see training/README.md."""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .backbones import BACKBONES, build_teacher
from .calibrate import DEFAULT_FPR, RULES, calibrate, calibrate_oof, left_out_alarms
from .checkpoint import RunInfo, load_checkpoint, save_checkpoint
from .config import VARIANTS, Density, PixelNormMode, ScoreRule, variant_config
from .data import (REPO_ROOT, carve_test_defects, discover_classes, list_images, load_carved_defects, load_image,
                   load_test, load_train_val, load_val_defects, resolve_data_root)
from .evaluate import (evaluate_split, markdown_table, predict, score_rules, synthetic_val_metrics, synthetic_val_split,
                       validation_estimate, write_reports)
from .export import export_onnx, read_metadata, run_onnx
from .oof import oof_scores
from .record import TrainRecord
from .recover import student_model_from_onnx
from .torch_model import DistillModel
from .train import cache_teacher, train


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None, help="MVTec-layout root (default: ../shared/datasets from the repo root)")
    p.add_argument("--classes", nargs="*", default=None, help="product classes (default: every class found)")
    p.add_argument("--val-fraction", type=float, default=0.15, help="share of each class's train/good held out")
    p.add_argument("--seed", type=int, default=0)
    # Default 1: on a small machine shared with other jobs, 2 OpenMP threads spin-waiting on 2 busy
    # cores ran ~10x slower per step than 1 thread. Raise it on a dedicated machine.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _train_args(p: argparse.ArgumentParser) -> None:
    # Default chosen by the ablation on validation data (models/MODEL_CARD.md): STFPM-multi beat every DCAM variant.
    p.add_argument("--variant", default="stfpm", choices=sorted(VARIANTS), help="method / ablation variant (default stfpm)")
    p.add_argument("--backbone", default=None, choices=list(BACKBONES))
    p.add_argument("--teacher-weights", default=None, help="state dict for the teacher (needed for resnet18; "
                   "mobilenet_v2 and efficientnet_lite0 default to their installed weight packages)")
    p.add_argument("--input-size", type=int, default=None, help="S (default 256)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--no-attention", action="store_true", help="ablation: drop the CBAM blocks")
    p.add_argument("--no-cos", action="store_true", help="ablation: drop the channel-wise cosine loss")
    p.add_argument("--no-kl", action="store_true", help="ablation: drop the spatial KL loss")
    p.add_argument("--max-per-class", type=int, default=None, help="cap train images per class (smoke runs)")
    _calibration_args(p)
    p.add_argument("--resume", action="store_true", help="continue from <out>/train_state.pt (same weights as one run)")
    _head_args(p)


def _calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fpr", type=float, default=DEFAULT_FPR,
                   help="calibration: target false-alarm rate on defect-free images (default 0.01)")
    p.add_argument("--calibration", default="oof", choices=RULES,
                   help="oof (default): thresholds from out-of-fold scores of the held-out good images, split-conformal "
                        "quantile for --fpr (calibrate.py); in-sample: the old rule (quantile of scores the heads' "
                        "normalisations were fitted on, which promises fewer false alarms than it gives)")
    p.add_argument("--oof-folds", type=int, default=0,
                   help="folds per class for the out-of-fold scores (0 = leave-one-out, the default)")


# Defaults = the shipped recipe (models/MODEL_CARD.md): chosen on validation data only.
SHIPPED_HEADS = dict(score_rule="max", density="deep", tta_views=1, pixel_norm="none", w_map=1.0,
                     density_groups=12, density_tie_dim=1024, val_from_test=0.1, bank_fraction=0.01,
                     bank_max_entries=10_000, bank_dims=64,
                     bank_w_student=0.1)


def _values(mode) -> list[str]:
    return [m.value for m in mode]


def _head_args(p: argparse.ArgumentParser) -> None:
    d = SHIPPED_HEADS
    p.add_argument("--score-rule", default=d["score_rule"], choices=_values(ScoreRule), help="map score rule")
    p.add_argument("--density", default=d["density"], choices=_values(Density),
                   help="image density head: pooled map stages, + stride-32 stages (deep), or none")
    p.add_argument("--tta-views", type=int, default=d["tta_views"], choices=[1, 2, 4, 8],
                   help="flip/transpose views averaged for the density features")
    p.add_argument("--pixel-norm", default=d["pixel_norm"], choices=_values(PixelNormMode),
                   help="per-class per-pixel map normalisation from held-out normals: off, for the image score "
                        "only (output map raw), or for the output map too")
    p.add_argument("--w-map", type=float, default=d["w_map"], help="fused score = z_density + w_map * z_map")
    p.add_argument("--density-groups", type=int, default=d["density_groups"],
                   help="up to K Gaussians per class in the density head (k-means groups of >= 50 training images)")
    p.add_argument("--density-tie-dim", type=int, default=d["density_tie_dim"],
                   help="feature stages at least this wide share one covariance across a class's groups (0: none)")
    p.add_argument("--bank-fraction", type=float, default=d["bank_fraction"],
                   help="local patch bank for the map: share of each class's training positions kept (0: none)")
    p.add_argument("--bank-max-entries", type=int, default=d["bank_max_entries"],
                   help="cap on the bank's entries over all classes, which sets the search's cost (0: none)")
    p.add_argument("--bank-dims", type=int, default=d["bank_dims"], help="PCA dimensions of the bank (0: all)")
    p.add_argument("--bank-w-student", type=float, default=d["bank_w_student"],
                   help="with a bank: the student's map in the raw map, relative to the bank's (0: bank map only)")
    p.add_argument("--val-defects", default=None, help="labelled defect images for the validation estimate "
                   "(<dir>/<class>/<defect>/<img>; never the test split); replaces --val-from-test")
    p.add_argument("--val-from-test", type=float, default=d["val_from_test"], metavar="FRACTION",
                   help="set aside this share of each test defect type (at least one image) as real labelled "
                        "validation defects; test metrics leave them out (0: none; classes without real defects "
                        "get synthetic ones)")


def _head_overrides(args) -> dict:
    return dict(score_rule=args.score_rule, density=args.density, tta_views=args.tta_views, pixel_norm=args.pixel_norm,
                w_map=args.w_map, density_groups=args.density_groups, density_tie_dim=args.density_tie_dim,
                bank_fraction=args.bank_fraction, bank_max_entries=args.bank_max_entries, bank_dims=args.bank_dims,
                bank_w_student=args.bank_w_student)


def _classes(args) -> tuple[Path, list[str]]:
    root = resolve_data_root(args.data_root)
    classes = args.classes or discover_classes(root)
    if not classes:
        raise SystemExit(f"no classes with train/good images under {root}")
    return root, classes


def _config(args):
    over = dict(backbone=args.backbone, input_size=args.input_size, temperature=args.temperature, **_head_overrides(args))
    if args.no_attention:
        over["attention"] = False
    if args.no_cos:
        over["w_cos"] = 0.0
    if args.no_kl:
        over["w_kl"] = 0.0
    return variant_config(args.variant, **over)


def cmd_train(args) -> Path:
    root, classes = _classes(args)
    cfg = _config(args)
    out = Path(args.out or REPO_ROOT / "training" / "runs" / f"{args.variant}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    print(f"[train] variant={args.variant} classes={classes} S={cfg.input_size} data={root}")
    train_split, val_split = load_train_val(root, classes, cfg.input_size, args.val_fraction, args.seed,
                                            not args.quiet, args.max_per_class)
    print(f"[train] {len(train_split)} train / {len(val_split)} held-out good images")
    model = DistillModel(cfg, args.teacher_weights)
    info = train(model, train_split.images, val_split.images, args.epochs, args.batch_size, args.lr, args.seed,
                 args.max_steps, not args.quiet, state_path=out / "train_state.pt", resume=args.resume)
    record = TrainRecord(args.variant, classes, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                         lr=args.lr, optimizer="adam+cosine", val_fraction=args.val_fraction, seed=args.seed,
                         calibration_fpr=args.fpr, n_train=len(train_split), n_val=len(val_split), steps=info["steps"],
                         best_epoch=info["best_epoch"], train_time_s=info["train_time_s"],
                         hardware=f"CPU, {torch.get_num_threads()} threads")
    (out / "train.json").write_text(json.dumps({"train_config": record.to_dict(cfg), **info}, indent=2))
    print(f"[train] student done in {info['train_time_s']:.0f}s, best epoch {info['best_epoch']}")
    return _fit_heads_and_save(args, model, root, train_split, val_split, RunInfo(classes, record, teacher_weights=args.teacher_weights),
                               out / "model.pt")


def _fit_heads_and_save(args, model, root, train_split, val_split, run: RunInfo, path: Path) -> Path:
    """Fit the heads (if any), calibrate on held-out good, print the validation estimate, save `run`
    with them."""
    classes, record = run.classes, run.train_config
    t0 = time.time()
    model.eval()  # BatchNorm must not update its running statistics while the heads are fitted
    feats = None
    if model.cfg.heads.enabled:
        heads = model.attach_heads(classes)
        if model.cfg.heads.bank_fraction > 0:
            model.fit_bank(train_split.images, train_split.classes, val_split.images)
            record.bank_entries = heads.bank.entries
        print(f"[heads] density: {len(train_split)} train images, {heads.views} view(s)")
        feats = _head_features(model, train_split, val_split)
        heads.fit_features(model.anomaly_map.score, feats[0], train_split.classes, feats[1], feats[2], val_split.classes,
                           model.cfg.heads.density_groups)
        record.density_groups_per_class = heads.density.groups
    record.heads_fit_s = round(time.time() - t0, 1)
    cal, report, good_scores = _calibration(args, model, train_split, val_split, record, feats)
    defects, source = _validation_defects(args, root, classes, model.cfg.input_size, record)
    est = validation_estimate(model, val_split, defects, progress=not args.quiet, source=source, calibration=cal,
                              good_scores=good_scores, good_alarms=None if good_scores is None else
                              left_out_alarms(good_scores, val_split.classes, args.fpr))
    # The old CutPaste proxy too, labelled as such: neither kind tracked test for both models in
    # MODEL_CARD.md, so a run shows both rather than one number picked after seeing test.
    cut = synthetic_val_metrics(model, val_split, not args.quiet)
    est["cutpaste"] = {"kind": "CutPaste-style fakes of held-out good images (easier)", "per_class": cut["per_class"],
                       "mean": cut["mean"]}
    record.validation_estimate_kind = est["kind"]
    save_checkpoint(model, path, replace(run, calibration=cal, calibration_report=report, data_root=str(root),
                                         validation_estimate=est))
    (path.parent / "validation_estimate.json").write_text(json.dumps(est, indent=2))
    print(f"[train] calibration: {json.dumps(cal)}")
    _print_calibration_report(report)
    print(markdown_table(est, f"validation estimate of test AUROC -- {est['kind']}"))
    for c, m in est["per_class"].items():
        kinds = {str(k): v for k, v in m.get("per_defect_image_auroc", {}).items()}
        print(f"[train] validation estimate {c}: image AUROC {m['image_auroc']:.1f} ({m['estimate_kind']}); per kind {kinds}; "
              f"CutPaste estimate {est['cutpaste']['per_class'][c]['image_auroc']:.1f}")
    print(f"[train] checkpoint {path}")
    return path


def _head_features(model, train_split, val_split):
    """(train pooled features, held-out pooled features, held-out raw maps): what the heads are fitted on."""
    h = model.heads
    tp, _ = h.features(model.teacher, model.normalize, model.student_map, train_split.images, with_maps=False)
    vp, vm = h.features(model.teacher, model.normalize, model.student_map, val_split.images)
    return tp, vp, vm


def _calibration(args, model, train_split, val_split, record: TrainRecord, feats=None):
    """(dcam.calibration, its report, the held-out good scores it rests on, out-of-fold where the rule is oof).
    oof: each held-out image is scored by heads whose normalisations were fitted without it (oof.py); a model
    without heads fits nothing on the held-out images, so its scores of them are out-of-sample already."""
    record.calibration_fpr, record.calibration_rule = args.fpr, args.calibration
    if args.calibration == "in-sample":
        _, val_scores = predict(model, val_split.images, progress=not args.quiet)
        return calibrate(val_scores, val_split.classes, args.fpr), {"_rule": "in-sample quantile"}, None
    if model.heads is None:
        _, good = predict(model, val_split.images, progress=not args.quiet)
    else:
        feats = feats or _head_features(model, train_split, val_split)
        t0 = time.time()
        good = oof_scores(model.heads, model.anomaly_map.score, feats[0], train_split.classes, feats[1], feats[2],
                          val_split.classes, model.cfg.heads.density_groups, k=args.oof_folds or len(val_split),
                          seed=record.seed)["val"]
        print(f"[calibrate] out-of-fold scores of {len(good)} held-out good images in {time.time() - t0:.0f}s")
    record.oof_folds = args.oof_folds or "leave-one-out"
    cal, report = calibrate_oof(good, val_split.classes, args.fpr)
    report["_rule"] = ("threshold = the k-th smallest of a class's n out-of-fold held-out good scores, k = ceil((n+1)(1-fpr)) "
                       "(at most n); promised false-alarm rate (n+1-k)/(n+1), 95 % interval Beta(n+1-k, k)")
    return cal, report, good


def _print_calibration_report(report: dict) -> None:
    for c, r in report.items():
        if not c.startswith("_"):
            print(f"[calibrate] {c}: threshold rank {r['rank']} of {r['n']} out-of-fold scores, promised false-alarm rate "
                  f"{100 * r['promised_fa']:.2f} % (95 %: {100 * r['promised_fa_95'][0]:.2f}-{100 * r['promised_fa_95'][1]:.2f} %)"
                  f" for target {100 * r['target_fpr']:.1f} %")


def _validation_defects(args, root: Path, classes: list[str], size: int, record: TrainRecord):
    """The real defects of the validation estimate, and where they come from: --val-defects, else the
    --val-from-test share of the test split (recorded in the run's record, so `evaluate` leaves them out)."""
    record.val_from_test = 0.0 if args.val_defects else args.val_from_test
    if args.val_defects:
        return load_val_defects(resolve_data_root(args.val_defects), classes, size, not args.quiet), "--val-defects"
    carved = carve_test_defects(root, classes, args.val_from_test, record.seed)
    if not carved:
        return None, ""
    return (load_carved_defects(root, classes, size, carved, not args.quiet),
            f"{args.val_from_test:.0%} of each test defect type, set aside: not in the test metrics")


def cmd_fit_heads(args) -> Path:
    """Fit the heads on an existing student (a checkpoint, or the student inside an exported ONNX)."""
    if args.from_onnx:
        model, meta = student_model_from_onnx(args.from_onnx, args.teacher_weights)
        record = replace(TrainRecord.from_dict(json.loads(meta["dcam.train_config"])), student_from=str(args.from_onnx))
        run = RunInfo(json.loads(meta["dcam.classes"]), record, student_from=str(args.from_onnx))
    else:
        model, old = load_checkpoint(args.checkpoint, args.teacher_weights)
        # The student and where it came from carry over; what the heads produce is made anew.
        run = RunInfo(old.classes, replace(old.train_config), data_root=old.data_root, teacher_weights=old.teacher_weights,
                      student_from=old.student_from)
    model.reconfigure(**_head_overrides(args))
    record = run.train_config
    root = resolve_data_root(args.data_root)
    train_split, val_split = load_train_val(root, run.classes, model.cfg.input_size, record.val_fraction, record.seed,
                                            not args.quiet)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return _fit_heads_and_save(args, model, root, train_split, val_split, run, out / "model.pt")


def cmd_evaluate(args, checkpoint: Path | None = None) -> dict:
    ckpt_path = Path(checkpoint or args.checkpoint)
    model, run = load_checkpoint(ckpt_path, args.teacher_weights)
    root = resolve_data_root(args.data_root or run.data_root)
    classes, record = run.classes, run.train_config
    s = model.cfg.input_size
    out = Path(args.out_eval or ckpt_path.parent / "eval")
    _, val_split = load_train_val(root, classes, s, record.val_fraction, record.seed, not args.quiet)
    val_metrics = synthetic_val_metrics(model, val_split, not args.quiet)
    carved = carve_test_defects(root, classes, record.val_from_test, record.seed)  # validation, not test
    test = load_test(root, classes, s, not args.quiet, exclude=carved)
    t0 = time.time()
    metrics, maps, scores = evaluate_split(model, test, not args.quiet, calibration=run.calibration)
    metrics["calibration"] = _promised_vs_measured(run.calibration_report or {}, metrics)
    metrics["inference_s_per_image"] = round((time.time() - t0) / max(len(test), 1), 4)
    metrics["test_images"] = len(test)
    metrics["validation_defects_from_test"] = [str(Path(p).relative_to(root)) for p in carved]
    metrics["val_synthetic"] = val_metrics  # CutPaste fakes (the old proxy; kept for comparison)
    if run.validation_estimate:
        metrics["validation_estimate"] = run.validation_estimate
    metrics["score_rules"] = score_rules(test, maps)  # reported only; the rule is chosen on val_synthetic
    write_reports(metrics, test, maps, scores, run.calibration, out)
    print(markdown_table(metrics, f"test ({ckpt_path.parent.name})"))
    for c, r in metrics["calibration"].items():
        if "promised_fa" in r and "measured_fa" in r:
            print(f"[evaluate] {c}: false alarms promised {r['promised_fa']:.2f} % (95 %: "
                  f"{r['promised_fa_95'][0]:.2f}-{r['promised_fa_95'][1]:.2f} %, {r['n']} out-of-fold images), "
                  f"measured {r['measured_fa']:.1f} % ({r['false_alarms']}/{r['n_good']} good test images; 95 %: "
                  f"{r['measured_fa_95'][0]:.1f}-{r['measured_fa_95'][1]:.1f} %)")
    print(f"[evaluate] synthetic-validation mean: {val_metrics['mean']}; reports in {out}")
    return metrics


def _report_pct(r: dict) -> dict:
    """A class's calibration report with the promised rates in % (like every rate in the metrics)."""
    r = dict(r)
    if "promised_fa" in r:
        r["promised_fa"] = round(100 * r["promised_fa"], 2)
        r["promised_fa_95"] = [round(100 * v, 2) for v in r["promised_fa_95"]]
        r["target_fpr"] = round(100 * r["target_fpr"], 2)
    return r


def _promised_vs_measured(report: dict, metrics: dict) -> dict:
    """Per class: the calibration's promise (calibrate.calibrate_oof_scores) beside the false alarms measured on test."""
    out = {}
    for c, m in metrics["per_class"].items():
        if "fa_at_threshold" in m:
            out[c] = {**_report_pct(report.get(c, {})), "threshold": m["threshold"],
                      "measured_fa": m["fa_at_threshold"], "measured_fa_95": m["fa_at_threshold_95"],
                      "false_alarms": m["false_alarms"], "n_good": m["n_good"]}
    if "_default" in report:
        out["_default"] = _report_pct(report["_default"])
    if "_rule" in report:
        out["_rule"] = report["_rule"]
    return out


def cmd_export(args, checkpoint: Path | None = None) -> Path:
    ckpt_path = Path(checkpoint or args.checkpoint)
    model, run = load_checkpoint(ckpt_path, args.teacher_weights)
    metrics_path = Path(args.out_eval or ckpt_path.parent / "eval") / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    summary = {k: metrics[k] for k in ("per_class", "mean", "calibration", "val_synthetic", "validation_estimate") if k in metrics}
    if "calibration" not in summary and run.calibration_report:
        summary["calibration"] = {c: (r if c.startswith("_") else _report_pct(r)) for c, r in run.calibration_report.items()}
    out = Path(args.output)
    name = args.model_name or (f"{run.train_config.variant}-multi-{model.cfg.backbone}"
                               .replace("_", "").replace("-v2", "v2") + ("-density" if model.cfg.heads.enabled else "")
                               + ("-bank" if model.cfg.heads.bank_fraction > 0 else ""))
    export_onnx(model, out, run.classes, run.calibration, summary, run.train_config.to_dict(model.cfg), name,
                args.model_version)
    # Parity check on random images: ONNX Runtime vs PyTorch.
    imgs = np.random.default_rng(0).integers(0, 256, (3, model.cfg.input_size, model.cfg.input_size, 3), dtype=np.uint8)
    m_ort, s_ort = run_onnx(out, imgs)
    m_pt, s_pt = predict(model, imgs, progress=False)
    print(f"[export] {out} ({out.stat().st_size / 1e6:.1f} MB); ORT vs torch: max|dscore|={np.abs(s_ort - s_pt).max():.2e} "
          f"max|dmap|={np.abs(m_ort - m_pt).max():.2e}")
    if args.fp16:
        _write_fp16(out, resolve_data_root(args.data_root or run.data_root), args.parity_images)
    return out


def _write_fp16(model: Path, root: Path, per_class: int) -> Path:
    from .fp16 import write_fp16
    # Parity compares two precisions of one model, not quality, so any real images serve: an even
    # sample of each class's test folders (defects included), random pixels when there are none.
    s = int(read_metadata(model)["dcam.input_size"])
    paths = []
    classes = sorted(d for d in root.iterdir() if (d / "test").is_dir()) if root.is_dir() else []
    for cls in classes:
        files = [p for sub in sorted((cls / "test").iterdir()) if sub.is_dir() for p in list_images(sub)]
        paths += files[::max(1, len(files) // per_class)][:per_class]
    images = (np.stack([load_image(p, s) for p in paths]) if paths
              else np.random.default_rng(0).integers(0, 256, (8, s, s, 3), dtype=np.uint8))
    labels = np.asarray([int(p.parent.name != "good") for p in paths]) if paths else None
    out = model.with_suffix(".fp16.onnx")
    report = write_fp16(model, out, images, labels)
    print(f"[fp16] {out} ({out.stat().st_size / 1e6:.1f} MB); float16 vs float32 on {report['images']} images: "
          f"max|dscore|={report['max_abs_dscore']:.3g} (max relative {report['max_rel_dscore']:.2%}), "
          f"p95 near the threshold {report['p95_abs_dscore_near_threshold']}, max|dmap|={report['max_abs_dmap']:.3g}, "
          f"verdicts agree on {report['verdicts_agree_at_default_threshold']:.1%}"
          + (f", image AUROC {report['image_auroc_fp32']:.1f} (float32) vs {report['image_auroc_fp16']:.1f} (float16)"
             if "image_auroc_fp16" in report else ""))
    if report["nan"]:
        raise SystemExit(f"[fp16] {report['nan']} NaN outputs: the float16 model is not usable")
    return out


def cmd_fp16(args) -> Path:
    """The half-precision companion of an exported model (for GPUs), with its parity reported."""
    return _write_fp16(Path(args.model), resolve_data_root(args.data_root), args.parity_images)


def cmd_calibrate(args) -> Path:
    """Recompute the per-class calibration from the held-out good images (optionally with another
    image-score rule) and write a new checkpoint next to the old one. The heads stay as they are; with the
    oof rule (default) copies of them are refitted without each held-out image to score it (oof.py)."""
    ckpt_path = Path(args.checkpoint)
    model, run = load_checkpoint(ckpt_path, args.teacher_weights)
    record = replace(run.train_config)
    if args.score_rule and model.heads is not None:
        raise SystemExit("the heads' map-score statistics depend on the score rule: use fit-heads --score-rule instead")
    if args.score_rule:
        model.reconfigure(score_rule=args.score_rule)  # a model without heads (refused above otherwise)
    root = resolve_data_root(args.data_root or run.data_root)
    train_split, val_split = load_train_val(root, run.classes, model.cfg.input_size, record.val_fraction, record.seed,
                                            not args.quiet)
    cal, report, _ = _calibration(args, model, train_split, val_split, record)
    out = Path(args.output_checkpoint or ckpt_path.with_name(ckpt_path.stem + "-calibrated.pt"))
    save_checkpoint(model, out, replace(run, calibration=cal, calibration_report=report, train_config=record))
    print(f"[calibrate] {out}: {json.dumps(cal)}")
    _print_calibration_report(report)
    return out


def cmd_all(args) -> None:
    ckpt = cmd_train(args)
    cmd_evaluate(args, ckpt)
    cmd_export(args, ckpt)


def cmd_ablation(args) -> None:
    """Train every variant on the same data, teacher cache, seed and budget; compare."""
    root, classes = _classes(args)
    s = args.input_size or 256
    out = Path(args.out or REPO_ROOT / "training" / "runs" / f"ablation-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    train_split, val_split = load_train_val(root, classes, s, args.val_fraction, args.seed, not args.quiet, args.max_per_class)
    # the same test images as `evaluate` reports on: without the ones set aside as validation defects
    test = load_test(root, classes, s, not args.quiet, exclude=carve_test_defects(root, classes, args.val_from_test, args.seed))
    teacher = build_teacher(args.backbone or "mobilenet_v2", args.teacher_weights)
    probe = DistillModel(variant_config("dcam", input_size=s, backbone=args.backbone), teacher=teacher)
    t_train = cache_teacher(probe, train_split.images, progress=not args.quiet)
    t_val = cache_teacher(probe, val_split.images, progress=not args.quiet)
    t_synth = cache_teacher(probe, synthetic_val_split(val_split).images, progress=not args.quiet, dtype=torch.float32)
    t_test = cache_teacher(probe, test.images, progress=not args.quiet, dtype=torch.float32)
    results = json.loads((out / "ablation.json").read_text()) if (out / "ablation.json").exists() else {}
    for name in args.variants:
        if name in results:
            continue
        torch.manual_seed(args.seed)
        model = DistillModel(variant_config(name, input_size=s, backbone=args.backbone), teacher=teacher)
        print(f"[ablation] {name}")
        info = train(model, train_split.images, val_split.images, args.epochs, args.batch_size, args.lr, args.seed,
                     args.max_steps, not args.quiet, t_train=t_train, t_val=t_val)
        val_m = synthetic_val_metrics(model, val_split, not args.quiet, t_cache=t_synth)
        test_m, _, _ = evaluate_split(model, test, not args.quiet, t_cache=t_test)
        results[name] = {"val_synthetic": val_m, "test": test_m, "train_time_s": info["train_time_s"],
                         "best_epoch": info["best_epoch"], "steps": info["steps"], "config": model.cfg.to_dict()}
        save_checkpoint(model, out / f"{name}.pt")
        (out / "ablation.json").write_text(json.dumps(results, indent=2))
        print(f"[ablation] {name}: val-synthetic {val_m['mean']} | test {test_m['mean']}")
    (out / "ablation.md").write_text(ablation_table(results, classes))
    print(ablation_table(results, classes))


def ablation_table(results: dict, classes: list[str]) -> str:
    head = "| variant | val-synth I-AUROC | val-synth P-AUROC | " + " | ".join(f"{c} I / P / PRO" for c in classes) + \
           " | mean I-AUROC | mean P-AUROC | mean AU-PRO | train s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        v, t = r["val_synthetic"]["mean"], r["test"]
        cells = [f"{t['per_class'][c]['image_auroc']:.1f} / {t['per_class'][c]['pixel_auroc']:.1f} / {t['per_class'][c]['au_pro']:.1f}"
                 for c in classes]
        lines.append(f"| {name} | {v['image_auroc']:.1f} | {v['pixel_auroc']:.1f} | " + " | ".join(cells) +
                     f" | {t['mean']['image_auroc']:.1f} | {t['mean']['pixel_auroc']:.1f} | {t['mean']['au_pro']:.1f} | {r['train_time_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dcam", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_train = sub.add_parser("train", help="train one student on all classes")
    p_eval = sub.add_parser("evaluate", help="test-split metrics + reports for a checkpoint")
    p_exp = sub.add_parser("export", help="export a checkpoint to ONNX (docs/DESIGN.md section 1)")
    p_all = sub.add_parser("all", help="train, evaluate and export")
    p_abl = sub.add_parser("ablation", help="train and compare several variants on the same budget")
    p_cal = sub.add_parser("calibrate", help="recompute calibration (optionally another score rule) from held-out good images")
    p_fit = sub.add_parser("fit-heads", help="fit density/normalisation heads on a trained student, calibrate, estimate")
    p_f16 = sub.add_parser("fp16", help="write <model>.fp16.onnx: the backbones in float16 for GPUs, parity reported")
    p_f16.add_argument("model", nargs="?", default=str(REPO_ROOT / "models" / "dcam.onnx"))
    p_f16.add_argument("--data-root", default=None, help="images for the parity check (default: ../shared/datasets)")
    p_f16.add_argument("--threads", type=int, default=1)
    for p in (p_train, p_eval, p_exp, p_all, p_abl, p_cal, p_fit):
        _data_args(p)
    for p in (p_train, p_all, p_abl):
        _train_args(p)
        p.add_argument("--out", default=None, help="run directory (default training/runs/<name>-<time>)")
    _head_args(p_fit)
    _calibration_args(p_fit)
    p_fit.add_argument("--from-onnx", default=None, help="take the student (and its config) from this exported model")
    p_fit.add_argument("--checkpoint", default=None)
    p_fit.add_argument("--teacher-weights", default=None)
    p_fit.add_argument("--out", required=True, help="run directory for the new checkpoint")
    p_cal.add_argument("--score-rule", default=None, choices=_values(ScoreRule))
    _calibration_args(p_cal)
    p_cal.add_argument("--output-checkpoint", default=None)
    for p in (p_eval, p_exp, p_cal):
        p.add_argument("--checkpoint", required=True)
        p.add_argument("--teacher-weights", default=None)
    for p in (p_eval, p_exp, p_all):
        p.add_argument("--out-eval", default=None, help="report directory (default <run>/eval)")
    for p in (p_exp, p_all):
        p.add_argument("--output", default=str(REPO_ROOT / "models" / "dcam.onnx"))
        p.add_argument("--model-name", default=None, help="default: <variant>-mobilenetv2 / <variant>-<backbone>")
        p.add_argument("--model-version", default=__version__)
        p.add_argument("--fp16", action="store_true", help="also write <output>.fp16.onnx (backbones in float16, for GPUs)")
    for p in (p_exp, p_all, p_f16):
        p.add_argument("--parity-images", type=int, default=32, help="fp16 parity: images per class")
    p_abl.add_argument("--variants", nargs="+", default=["stfpm", "dcam", "dcam_fixed", "dcam_noatt", "dcam_cos", "dcam_kl"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"train": cmd_train, "evaluate": cmd_evaluate, "export": cmd_export, "all": cmd_all, "ablation": cmd_ablation,
     "calibrate": cmd_calibrate, "fit-heads": cmd_fit_heads, "fp16": cmd_fp16}[args.cmd](args)


if __name__ == "__main__":
    main()
