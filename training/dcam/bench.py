"""CPU throughput of ONNX models in ONNX Runtime: 1 intra-op thread, batch 8, same images.

    python -m dcam.bench OLD.onnx NEW.onnx [--rounds 20]

The models run in alternating rounds, so load from other jobs on a shared machine hits both alike;
the ratio is the number to read, not the absolute img/s.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None) -> None:
    import onnxruntime as ort
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    sessions = []
    for path in args.models:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        s = sess.get_inputs()[0].shape[1]
        sessions.append((path, sess, s))
    rng = np.random.default_rng(0)
    totals = [0.0] * len(sessions)
    for r in range(args.rounds + 1):
        for i, (_, sess, s) in enumerate(sessions):
            x = rng.integers(0, 256, (args.batch, s, s, 3), dtype=np.uint8)
            t0 = time.perf_counter()
            sess.run(None, {"image": x})
            if r:  # round 0 is warm-up
                totals[i] += time.perf_counter() - t0
    rates = [args.rounds * args.batch / t for t in totals]
    for (path, _, _), rate in zip(sessions, rates):
        print(f"{path}: {rate:.1f} img/s (1 thread, batch {args.batch}, {args.rounds} rounds)")
    for (path, _, _), rate in zip(sessions[1:], rates[1:]):
        print(f"ratio {path} / {sessions[0][0]}: {rate / rates[0]:.2f}")


if __name__ == "__main__":
    main()
