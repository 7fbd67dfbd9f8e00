"""MVTec-AD-layout data: class discovery, train/validation split, image + mask loading.

Every image is decoded once, converted to RGB and resized to S x S (bilinear), then kept as
uint8 NHWC in memory -- exactly what the exported ONNX graph receives from the operator.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_ROOT = (REPO_ROOT / ".." / "shared" / "datasets").resolve()


def resolve_data_root(path: str | Path | None) -> Path:
    """Relative paths are taken relative to the repository root, not the CWD."""
    if path is None:
        return DEFAULT_DATA_ROOT
    p = Path(path)
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)


def discover_classes(root: Path) -> list[str]:
    """A class is any sub-folder that has train/good images."""
    return sorted(d.name for d in root.iterdir() if d.is_dir() and list_images(d / "train" / "good"))


def load_image(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)


def load_mask(path: Path | None, size: int) -> np.ndarray:
    if path is None or not path.exists():
        return np.zeros((size, size), dtype=bool)
    with Image.open(path) as im:
        return np.asarray(im.convert("L").resize((size, size), Image.NEAREST)) > 127


@dataclass
class Split:
    """Images of one split, all classes pooled. labels: 0 good / 1 defect; masks only for test."""
    images: np.ndarray                      # uint8 [N,S,S,3]
    classes: list[str]                      # product class per image
    paths: list[str]
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    masks: np.ndarray | None = None         # bool [N,S,S]
    defects: list[str] = field(default_factory=list)
    no_mask_classes: set[str] = field(default_factory=set)  # classes without ground_truth: no pixel metrics

    def __len__(self) -> int:
        return len(self.images)

    def select(self, cls: str) -> "Split":
        idx = [i for i, c in enumerate(self.classes) if c == cls]
        return Split(self.images[idx], [self.classes[i] for i in idx], [self.paths[i] for i in idx],
                     self.labels[idx], None if self.masks is None else self.masks[idx],
                     [self.defects[i] for i in idx] if self.defects else [], self.no_mask_classes & {cls})


def split_train_val(files: list[Path], val_fraction: float, seed: int, min_val: int = 8) -> tuple[list[Path], list[Path]]:
    """Deterministic per-class hold-out of train/good for model selection and calibration."""
    files = list(files)
    random.Random(seed).shuffle(files)
    n_val = min(len(files) - 1, max(min_val, round(len(files) * val_fraction)))
    return sorted(files[n_val:]), sorted(files[:n_val])


def _load(paths: list[Path], size: int, progress: bool, desc: str) -> np.ndarray:
    it = paths
    if progress:
        from tqdm import tqdm
        it = tqdm(paths, desc=desc, leave=False)
    arr = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(it):
        arr[i] = load_image(p, size)
    return arr


def load_train_val(root: Path, classes: list[str], size: int, val_fraction: float = 0.15, seed: int = 0,
                   progress: bool = True, max_per_class: int | None = None) -> tuple[Split, Split]:
    tr_p, tr_c, va_p, va_c = [], [], [], []
    for cls in classes:
        tr, va = split_train_val(list_images(root / cls / "train" / "good"), val_fraction, seed)
        if max_per_class:
            tr = tr[:max_per_class]
        tr_p += tr; tr_c += [cls] * len(tr)
        va_p += va; va_c += [cls] * len(va)
    train = Split(_load(tr_p, size, progress, "load train"), tr_c, [str(p) for p in tr_p], np.zeros(len(tr_p), np.int64))
    val = Split(_load(va_p, size, progress, "load val"), va_c, [str(p) for p in va_p], np.zeros(len(va_p), np.int64))
    return train, val


def has_masks(root: Path, cls: str) -> bool:
    gt = root / cls / "ground_truth"
    return gt.is_dir() and any(list_images(d) for d in gt.iterdir() if d.is_dir())


def _test_entries(root: Path, classes: list[str]) -> list[tuple[Path, str, str]]:
    """(image, class, defect type or "good") of every test image, in a fixed order."""
    out = []
    for cls in classes:
        test_dir = root / cls / "test"
        for d in sorted(x.name for x in test_dir.iterdir() if x.is_dir()) if test_dir.is_dir() else []:
            out += [(p, cls, d) for p in list_images(test_dir / d)]
    return out


def _labelled_split(entries: list[tuple[Path, str, str]], mask_root: Path, classes: list[str], size: int,
                    progress: bool, desc: str) -> Split:
    """Images with their class, defect type and mask (<mask_root>/<class>/ground_truth/<defect>/<stem>_mask.png)."""
    paths = [p for p, _, _ in entries]
    defects = [d for _, _, d in entries]
    images = _load(paths, size, progress, desc)
    masks = [load_mask(None if d == "good" else mask_root / c / "ground_truth" / d / f"{p.stem}_mask.png", size)
             for p, c, d in entries]
    return Split(images, [c for _, c, _ in entries], [str(p) for p in paths],
                 np.asarray([0 if d == "good" else 1 for d in defects], np.int64),
                 np.stack(masks) if masks else np.zeros((0, size, size), bool), defects,
                 {c for c in classes if not has_masks(mask_root, c)})


def carve_test_defects(root: Path, classes: list[str], fraction: float, seed: int = 0) -> list[Path]:
    """Real labelled validation defects taken out of the test split: a deterministic `fraction` of each
    defect type's test images (at least one per type when fraction > 0). Test metrics leave them out
    (`load_test(exclude=...)`), so no image is both a validation and a test image."""
    if fraction <= 0:
        return []
    by_type: dict[tuple[str, str], list[Path]] = {}
    for p, cls, d in _test_entries(root, classes):
        if d != "good":
            by_type.setdefault((cls, d), []).append(p)
    carved = []
    for key in sorted(by_type):
        files = sorted(by_type[key])
        random.Random(seed).shuffle(files)
        carved += files[:max(1, round(fraction * len(files)))]
    return sorted(carved)


def load_test(root: Path, classes: list[str], size: int, progress: bool = True, exclude=()) -> Split:
    """The test split; `exclude`: images set aside as validation defects (carve_test_defects)."""
    skip = {str(p) for p in exclude}
    entries = [e for e in _test_entries(root, classes) if str(e[0]) not in skip]
    return _labelled_split(entries, root, classes, size, progress, "load test")


def load_carved_defects(root: Path, classes: list[str], size: int, carved: list[Path], progress: bool = True) -> Split:
    """The carved-out test defects as a validation split (with their masks)."""
    keep = {str(p) for p in carved}
    entries = [e for e in _test_entries(root, classes) if str(e[0]) in keep]
    return _labelled_split(entries, root, classes, size, progress, "load val defects")


def load_val_defects(root: Path, classes: list[str], size: int, progress: bool = True) -> Split:
    """User-supplied labelled defect images for validation (never the test split):
    <root>/<class>/<defect>/<image>, optional masks at <root>/<class>/ground_truth/<defect>/<stem>_mask.png."""
    entries = []
    for cls in classes:
        d = root / cls
        for defect in sorted(x.name for x in d.iterdir() if x.is_dir() and x.name != "ground_truth") if d.is_dir() else []:
            entries += [(p, cls, defect) for p in list_images(d / defect)]
    return _labelled_split(entries, root, classes, size, progress, "load val defects")


def synthetic_anomalies(images: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste-style defects on held-out good images: a jittered, rotated patch moved elsewhere.

    Gives a defect proxy for model selection that never touches the test split.
    """
    rng = np.random.default_rng(seed)
    n, s = images.shape[:2]
    out, masks = images.copy(), np.zeros((n, s, s), dtype=bool)
    for i in range(n):
        ph, pw = rng.integers(s // 12, s // 5, size=2)
        y0, x0 = rng.integers(0, s - ph), rng.integers(0, s - pw)
        y1, x1 = rng.integers(0, s - ph), rng.integers(0, s - pw)
        patch = images[i, y0:y0 + ph, x0:x0 + pw].astype(np.float32)
        patch = patch * rng.uniform(0.6, 1.4) + rng.uniform(-30, 30)
        patch = np.rot90(patch, k=int(rng.integers(1, 4)))
        ph2, pw2 = patch.shape[:2]
        y1, x1 = min(y1, s - ph2), min(x1, s - pw2)
        out[i, y1:y1 + ph2, x1:x1 + pw2] = np.clip(patch, 0, 255).astype(np.uint8)
        masks[i, y1:y1 + ph2, x1:x1 + pw2] = True
    return out, masks


# Harder, texture-preserving synthetic defects (the CutPaste fakes above are far easier than real ones:
# they rated magnetic_tile 89-94 while test said 79). Designed from the defect *kinds* a user knows
# (thin cracks, small holes, large low-contrast unevenness, texture from elsewhere), never from test images.
SYNTH_KINDS = ("crack", "hole", "uneven", "patch")


def _soft_disc(s: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:s, 0:s]
    r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    return np.clip(1.5 - r, 0, 1)  # 1 inside, soft 0..1 rim, 0 outside


def _crack(img, rng):
    """Thin (1-2 px) random-walk line, darker by 15-45 grey levels."""
    s = img.shape[0]
    n = int(rng.integers(s // 8, s // 3))
    y, x = rng.uniform(0.15 * s, 0.85 * s, size=2)
    ang = rng.uniform(0, 2 * np.pi)
    w = int(rng.integers(1, 3))
    mask = np.zeros((s, s), bool)
    for _ in range(n):
        ang += rng.normal(0, 0.3)
        y, x = np.clip(y + np.sin(ang), 0, s - 1), np.clip(x + np.cos(ang), 0, s - 1)
        mask[int(y):int(y) + w, int(x):int(x) + w] = True
    out = img.astype(np.float32)
    out[mask] -= rng.uniform(15, 45)
    return out, mask


def _hole(img, rng):
    """Small dark soft ellipse (r 3-9 px), 20-60 grey levels darker."""
    s = img.shape[0]
    cy, cx = rng.uniform(0.1 * s, 0.9 * s, size=2)
    a = _soft_disc(s, cy, cx, *rng.uniform(3, 9, size=2))
    out = img.astype(np.float32) - a[..., None] * rng.uniform(20, 60)
    return out, a > 0.5


def _uneven(img, rng):
    """Large region (r 20-60 px) with a smooth, low-contrast brightness change of 8-25 grey levels."""
    s = img.shape[0]
    cy, cx = rng.uniform(0.2 * s, 0.8 * s, size=2)
    ry, rx = rng.uniform(20, 60, size=2)
    yy, xx = np.mgrid[0:s, 0:s]
    g = np.exp(-0.5 * (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2))
    out = img.astype(np.float32) + (g * rng.choice([-1, 1]) * rng.uniform(8, 25))[..., None]
    return out, g > 0.5


def _patch(img, rng, donor):
    """Texture from another good image of the class, pasted unrotated with a soft rim (no jitter)."""
    s = img.shape[0]
    ry, rx = rng.uniform(8, 30, size=2)
    cy, cx = rng.uniform(0.15 * s, 0.85 * s, size=2)
    a = _soft_disc(s, cy, cx, ry, rx)[..., None]
    dy, dx = rng.integers(-s // 3, s // 3 + 1, size=2)
    src = np.roll(donor, (int(dy), int(dx)), axis=(0, 1)).astype(np.float32)
    return img.astype(np.float32) * (1 - a) + src * a, a[..., 0] > 0.5


def synthetic_defects(images: np.ndarray, classes: list[str], per_image: int = 2, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """per_image fakes of each image, kinds cycling through SYNTH_KINDS. Returns images, masks,
    classes and kinds. Donors for "patch" are other images of the same class."""
    rng = np.random.default_rng(seed)
    cls = np.asarray(classes)
    outs, masks, out_cls, kinds = [], [], [], []
    j = 0
    for i in range(len(images)):
        for _ in range(per_image):
            kind = SYNTH_KINDS[j % len(SYNTH_KINDS)]
            j += 1
            if kind == "patch":
                same = np.flatnonzero((cls == cls[i]) & (np.arange(len(images)) != i))
                donor = images[rng.choice(same)] if len(same) else images[i][::-1, ::-1]
                out, m = _patch(images[i], rng, donor)
            else:
                out, m = {"crack": _crack, "hole": _hole, "uneven": _uneven}[kind](images[i], rng)
            outs.append(np.clip(out, 0, 255).astype(np.uint8)); masks.append(m)
            out_cls.append(classes[i]); kinds.append(kind)
    s = images.shape[1]
    if not outs:
        return np.zeros((0, s, s, 3), np.uint8), np.zeros((0, s, s), bool), [], []
    return np.stack(outs), np.stack(masks), out_cls, kinds
