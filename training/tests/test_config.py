"""The typed model config and run record, and how they read files written before they were typed."""
import json

import pytest

from dcam.config import (Combine, Density, HeadsConfig, Method, ModelConfig, PixelNormMode, ScoreRule,
                         config_from_train_config, variant_config)
from dcam.record import TrainRecord

# dcam.train_config of a file exported before the modes were typed (v0.5.0, abridged): "" meant off / the method's own.
OLD = {"method": "stfpm", "backbone": "mobilenet_v2", "input_size": 256, "attention": False, "w_cos": 0, "w_kl": 0,
       "scale_weights": [1.0, 1.0, 1.0], "combine": "", "variant": "stfpm", "classes": ["bottle", "magnetic_tile"],
       "epochs": 10, "max_steps": None, "seed": 0, "val_fraction": 0.15, "score_rule": "max", "density": "deep",
       "pixel_norm": "", "density_groups_per_class": [3, 12], "bank_entries": 8459, "oof_folds": "leave-one-out",
       "val_from_test": 0.1, "a_key_from_an_older_version": 7}


def test_old_files_read_as_modes():
    cfg = config_from_train_config(OLD)
    assert (cfg.method, cfg.combine, cfg.heads.density, cfg.heads.pixel_norm, cfg.score_rule) == \
        (Method.STFPM, Combine.PROD, Density.DEEP, PixelNormMode.NONE, ScoreRule.MAX)
    assert cfg.heads.enabled and cfg.heads.density_groups == 1 and cfg.scale_weights == (1.0, 1.0, 1.0)
    assert not HeadsConfig(density="").enabled and ModelConfig().combine is Combine.SUM


def test_a_wrong_mode_fails_at_construction():
    with pytest.raises(ValueError, match="'sums'"):
        ModelConfig(combine="sums")
    with pytest.raises(ValueError):
        ModelConfig(combine="")  # only density and pixel norm have an off value; the old "" is read by from_dict
    assert ModelConfig.from_dict({"combine": ""}).combine is Combine.SUM
    assert ModelConfig.from_dict({"method": "stfpm", "combine": ""}).combine is Combine.PROD


def test_flat_keys_reach_the_model_or_its_heads():
    cfg = variant_config("stfpm", input_size=64, density="map", bank_fraction=0.5, score_rule="top1pct_mean")
    assert (cfg.input_size, cfg.score_rule, cfg.heads.density, cfg.heads.bank_fraction) == \
        (64, ScoreRule.TOP1PCT_MEAN, Density.MAP, 0.5)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg and "heads" not in cfg.to_dict()
    with pytest.raises(TypeError):
        cfg.with_changes(densty="map")  # a misspelt key fails instead of vanishing
    assert cfg.with_changes(method="dcam").combine is Combine.SUM and cfg.combine is Combine.PROD
    assert cfg.with_changes(method="dcam", combine="prod").combine is Combine.PROD


def test_the_record_round_trips_and_keeps_unknown_keys():
    cfg = config_from_train_config(OLD)
    record = TrainRecord.from_dict(OLD)
    assert (record.variant, record.epochs, record.density_groups_per_class, record.bank_entries, record.seed) == \
        ("stfpm", 10, [3, 12], 8459, 0)
    assert record.other == {"a_key_from_an_older_version": 7}  # neither the record's nor the config's
    out = json.loads(json.dumps(record.to_dict(cfg)))  # as exported
    assert out["density"] == "deep" and out["pixel_norm"] == "none" and out["combine"] == "prod"
    assert out["a_key_from_an_older_version"] == 7 and "max_steps" not in out and "hardware" not in out  # unknown: left out
    assert TrainRecord.from_dict(out) == record and config_from_train_config(out) == cfg
