#!/usr/bin/env python3
"""Does a reduced-scale JPEG decode keep the model's verdicts? Each image of a class is re-encoded as a
camera-size JPEG (default 2048², q90), then given to the model four ways: decoded at full scale and
resized (the reference), and with libjpeg-turbo's reduced-scale IDCT (Pillow's draft(), the library the
operator uses) down to at least 1, 2 and 4 times the model size S before the same resize. Prints, per
split, each way's raw-score shift against the reference and its flags at the model's threshold.

  .venv/bin/python scripts/jpeg_fidelity.py                  # bottle, train (every 5th) and test
  .venv/bin/python scripts/jpeg_fidelity.py --cls bottle --size 3000 --splits test

Training resized with PIL's antialiased BILINEAR; the operator keeps its IDCT reduction to >= 4 x S
(src/inference/decode.rs, IDCT_KEEPS_SIZES) on what this printed (docs/DESIGN.md §8)."""

import argparse
import glob
import io
import json
import os
import statistics

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

KEEPS = (1, 2, 4)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/dcam.onnx")
    p.add_argument("--dataset", default="../shared/datasets")
    p.add_argument("--cls", default="bottle")
    p.add_argument("--splits", nargs="+", default=["train", "test"])
    p.add_argument("--step", type=int, default=5, help="every Nth training image (the test split is read whole)")
    p.add_argument("--size", type=int, default=2048, help="the camera frame's side")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--limit", type=int, default=0, help="at most this many images per split (0: all)")
    args = p.parse_args()

    meta = {m.key: m.value for m in onnx.load(args.model, load_external_data=False).metadata_props}
    s_px = int(meta["dcam.input_size"])
    threshold = json.loads(meta["dcam.calibration"])[args.cls]["threshold"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])

    def model_input(jpeg, keep):
        im = Image.open(io.BytesIO(jpeg))
        if keep:
            im.draft("RGB", (keep * s_px, keep * s_px))
        return np.asarray(im.convert("RGB").resize((s_px, s_px), Image.BILINEAR))

    print(f"{args.cls} images as {args.size}² JPEG q{args.quality}; S = {s_px}; threshold {threshold:.2f}")
    for split in args.splits:
        paths = sorted(f for f in glob.glob(os.path.join(args.dataset, args.cls, split, "*", "*.*")) if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp")))
        if not paths:
            raise SystemExit(f"no images under {os.path.join(args.dataset, args.cls, split)}")
        if split == "train":
            paths = paths[:: args.step]
        if args.limit:
            paths = paths[:: max(1, len(paths) // args.limit)][: args.limit]
        rows = []
        for path in paths:
            frame = io.BytesIO()
            Image.open(path).convert("RGB").resize((args.size, args.size), Image.BICUBIC).save(frame, "JPEG", quality=args.quality)
            batch = np.stack([model_input(frame.getvalue(), keep) for keep in (0, *KEEPS)])
            scores = session.run(["score"], {"image": batch})[0].ravel().tolist()
            rows.append((os.path.basename(os.path.dirname(path)) == "good", scores))
        good = sum(g for g, _ in rows)
        print(f"\n{split}: {len(rows)} images, {good} good")
        print("| decode | raw score − full decode: median | max abs | false alarms | defects flagged |")
        print("|---|---:|---:|---:|---:|")
        for i, name in enumerate(["full decode + resize", *(f"IDCT to >= {k} x S + resize" for k in KEEPS)]):
            shift = [s[i] - s[0] for _, s in rows]
            alarms = sum(s[i] > threshold for g, s in rows if g)
            caught = sum(s[i] > threshold for g, s in rows if not g)
            print(f"| {name} | {statistics.median(shift):+.2f} | {max(map(abs, shift)):.2f} | {alarms}/{good} | {caught}/{len(rows) - good} |")


if __name__ == "__main__":
    main()
