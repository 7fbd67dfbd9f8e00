"""Re-export a committed model with the current code and compare it with the file itself.

    PYTHONPATH=training python training/scripts/reexport_parity.py [--model models/dcam.onnx] [--n 32]

The PyTorch model is rebuilt from the ONNX file (`recover.model_from_onnx`: student convs with BN
folded, head buffers), exported again with the same metadata by `export.export_onnx`, and both files
run in ONNX Runtime (1 thread) on `--n` real test images per class, spread evenly over its test split
(0 = all). A refactoring of the training code that keeps the exported behaviour shows float noise only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def ort_run(path, images, batch=8):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    outs = [sess.run(["anomaly_map", "score"], {"image": images[i:i + batch]}) for i in range(0, len(images), batch)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def main(argv=None) -> int:
    from dcam.data import load_test, resolve_data_root
    from dcam.export import export_onnx, read_metadata
    from dcam.recover import model_from_onnx
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/dcam.onnx")
    ap.add_argument("--out", default="/tmp/dcam-reexport.onnx")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--n", type=int, default=32, help="images per class, spread evenly over its test split; 0 = all")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    meta = read_metadata(args.model)
    classes = json.loads(meta["dcam.classes"])
    model = model_from_onnx(args.model)
    export_onnx(model, args.out, classes, json.loads(meta["dcam.calibration"]), json.loads(meta["dcam.metrics"]),
                json.loads(meta["dcam.train_config"]), meta["dcam.model_name"], meta["dcam.version"])
    s = int(meta["dcam.input_size"])
    test = load_test(resolve_data_root(args.data_root), classes, s, progress=False)
    cls = np.asarray(test.classes)
    idx = np.concatenate([sel if not args.n else sel[np.linspace(0, len(sel) - 1, min(args.n, len(sel))).round().astype(int)]
                          for sel in (np.flatnonzero(cls == c) for c in classes)])
    images = test.images[idx]
    m_old, s_old = ort_run(args.model, images)
    m_new, s_new = ort_run(args.out, images)
    with torch.no_grad():
        m_pt, s_pt = (t.numpy() for t in model(torch.from_numpy(images)))
    ds, dm = np.abs(s_new - s_old), np.abs(m_new - m_old)
    print(f"{len(idx)} real test images ({', '.join(f'{c}: {(cls[idx] == c).sum()}' for c in classes)}); "
          f"scores {s_old.min():.2f}..{s_old.max():.2f}, maps {m_old.min():.2f}..{m_old.max():.2f}")
    print(f"re-exported vs committed ONNX: max|dscore| = {ds.max():.2e} (relative {(ds / np.maximum(1, np.abs(s_old))).max():.2e}), "
          f"max|dmap| = {dm.max():.2e}")
    print(f"PyTorch vs committed ONNX:     max|dscore| = {np.abs(s_pt - s_old).max():.2e}, max|dmap| = {np.abs(m_pt - m_old).max():.2e}")
    print(f"sizes: committed {Path(args.model).stat().st_size / 1e6:.2f} MB, re-exported {Path(args.out).stat().st_size / 1e6:.2f} MB; "
          f"{time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
