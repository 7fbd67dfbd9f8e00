import numpy as np

from dcam.data import (REPO_ROOT, carve_test_defects, discover_classes, load_carved_defects, load_test, load_train_val,
                       resolve_data_root, synthetic_anomalies)


def test_discover_and_split(mvtec_root):
    assert discover_classes(mvtec_root) == ["tile", "widget"]
    train, val = load_train_val(mvtec_root, ["tile", "widget"], 32, val_fraction=0.25, seed=0, progress=False)
    assert train.images.shape[1:] == (32, 32, 3) and train.images.dtype == np.uint8
    assert len(train) + len(val) == 16
    assert sorted(set(val.classes)) == ["tile", "widget"]
    assert not set(train.paths) & set(val.paths)  # held-out images are never trained on
    again, _ = load_train_val(mvtec_root, ["tile", "widget"], 32, val_fraction=0.25, seed=0, progress=False)
    assert again.paths == train.paths  # deterministic


def test_load_test_with_masks(mvtec_root):
    test = load_test(mvtec_root, ["tile", "widget"], 32, progress=False)
    assert len(test) == 8 and test.masks.shape == (8, 32, 32)
    assert test.labels.sum() == 4
    assert all(test.masks[i].any() == bool(test.labels[i]) for i in range(8))
    assert set(test.defects) == {"good", "scratch"}
    assert len(test.select("tile")) == 4


def test_resolve_relative_to_repo():
    assert resolve_data_root("foo/bar") == (REPO_ROOT / "foo" / "bar").resolve()
    assert resolve_data_root(None).name == "datasets"


def test_synthetic_anomalies_have_masks():
    imgs = np.full((4, 64, 64, 3), 100, np.uint8)
    imgs[:, :32] = 200
    fake, masks = synthetic_anomalies(imgs, seed=1)
    assert fake.shape == imgs.shape and masks.any(axis=(1, 2)).all()
    assert (fake != imgs).any()


def test_carved_validation_defects_leave_the_test_split(mvtec_root):
    """--val-from-test: a deterministic share of each defect type (at least one) becomes validation,
    and the test split no longer holds those images."""
    classes = ["tile", "widget"]
    carved = carve_test_defects(mvtec_root, classes, 0.1)
    assert len(carved) == 2  # 2 defects per type, 10 % -> at least 1 of each type
    assert sorted(p.parent.parent.parent.name for p in carved) == classes
    assert carve_test_defects(mvtec_root, classes, 0.1) == carved  # deterministic
    assert carve_test_defects(mvtec_root, classes, 0.0) == []
    assert len(carve_test_defects(mvtec_root, classes, 1.0)) == 4
    full = load_test(mvtec_root, classes, 32, progress=False)
    test = load_test(mvtec_root, classes, 32, progress=False, exclude=carved)
    val = load_carved_defects(mvtec_root, classes, 32, carved, progress=False)
    assert not set(test.paths) & set(val.paths)
    assert sorted(test.paths + val.paths) == sorted(full.paths)
    assert val.labels.tolist() == [1, 1] and val.masks.any(axis=(1, 2)).all()  # with their masks
    assert test.labels.sum() == 2 and len(test) == 6
