"""Shared fixtures: a tiny synthetic MVTec-layout dataset in a temp dir (never the real data)."""
import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)


def _texture(rng, size, gray=False):
    base = rng.integers(90, 140, (size, size, 1 if gray else 3)).astype(np.uint8)
    return base[..., 0] if gray else base


@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory):
    """Two classes (one RGB PNG, one grayscale JPEG of other sizes), with defects and masks."""
    root = tmp_path_factory.mktemp("mvtec")
    rng = np.random.default_rng(0)
    for cls, gray, ext, size in (("widget", False, ".png", 48), ("tile", True, ".jpg", 40)):
        for split, n in (("train/good", 8), ("test/good", 2)):
            d = root / cls / split
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_texture(rng, size, gray)).save(d / f"{i:03d}{ext}")
        d, g = root / cls / "test" / "scratch", root / cls / "ground_truth" / "scratch"
        d.mkdir(parents=True); g.mkdir(parents=True)
        for i in range(2):
            img = _texture(rng, size, gray)
            mask = np.zeros((size, size), np.uint8)
            mask[10:20, 12:24] = 255
            img[mask > 0] = 250
            Image.fromarray(img).save(d / f"{i:03d}{ext}")
            Image.fromarray(mask).save(g / f"{i:03d}_mask.png")
    return root
