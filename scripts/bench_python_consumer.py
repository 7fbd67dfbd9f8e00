#!/usr/bin/env python3
"""A plain Python consumer, written the way teams usually write one, as the baseline for
scripts/bench.sh: confluent-kafka + Pillow + onnxruntime (default session options), decode each
event then infer in batches, publish one score record per image, commit synchronously per batch.

    bench_python_consumer.py --brokers H:P --topic T --count N [--batch 32] [--model models/dcam.onnx]

Prints one JSON line: {"images", "img_s", "startup_s", "batch"}; img/s is measured from the
first consumed record to the last commit, as `dcam-stream bench` measures first consume → last
score. Also: `--time-decode FILE...` times Pillow decode + resize (with and without draft()) per
file on this one thread and prints a JSON line, for the decode comparison in scripts/bench.sh.
"""

import argparse
import base64
import io
import json
import sys
import time
import uuid


def model_size(session):
    meta = session.get_modelmeta().custom_metadata_map
    return int(meta["dcam.input_size"])


def decode(value, size, draft, draft_keep=1):
    """draft: a JPEG's IDCT at reduced scale, keeping at least draft_keep x size on each side (1 is
    what draft() is usually given; the model needs 4: docs/DESIGN.md §8, camera-size JPEGs)."""
    from PIL import Image

    if value[:1] == b"{":
        env = json.loads(value)
        data = base64.b64decode(env["image"])
        image_id = env["image_id"]
    else:
        data, image_id = value, None
    img = Image.open(io.BytesIO(data))
    if draft and img.format == "JPEG":
        img.draft("RGB", (size * draft_keep, size * draft_keep))
    img = img.convert("RGB").resize((size, size), Image.BILINEAR)
    return image_id, img


def consume(args):
    import numpy as np
    import onnxruntime as ort
    from confluent_kafka import Consumer, Producer

    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    size = model_size(session)
    consumer = Consumer(
        {
            "bootstrap.servers": args.brokers,
            "group.id": args.group or f"python-bench-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 10000,
        }
    )
    producer = Producer({"bootstrap.servers": args.brokers, "linger.ms": 5})
    scores_topic = args.scores or f"{args.topic}.python-scores"
    consumer.subscribe([args.topic])
    started = time.monotonic()
    first = None
    done = 0
    batch_msgs, batch_imgs, batch_ids = [], [], []

    def flush_batch():
        nonlocal done
        if not batch_imgs:
            return
        x = np.stack([np.asarray(i, dtype=np.uint8) for i in batch_imgs])
        _, scores = session.run(["anomaly_map", "score"], {"image": x})
        for msg, image_id, score in zip(batch_msgs, batch_ids, scores.reshape(-1)):
            record = {"image_id": image_id or f"{msg.topic()}-{msg.partition()}-{msg.offset()}", "raw_score": float(score)}
            producer.produce(scores_topic, json.dumps(record).encode(), key=msg.key())
        producer.flush()
        consumer.commit(asynchronous=False)
        done += len(batch_imgs)
        batch_msgs.clear()
        batch_imgs.clear()
        batch_ids.clear()

    deadline = started + args.timeout
    while done + len(batch_imgs) < args.count and time.monotonic() < deadline:
        msg = consumer.poll(0.05 if batch_imgs else 1.0)
        if msg is None:
            flush_batch()  # nothing more for now: score what we have
            continue
        if msg.error():
            print(f"consumer error: {msg.error()}", file=sys.stderr)
            continue
        if first is None:
            first = time.monotonic()
        image_id, img = decode(msg.value(), size, args.draft)
        batch_msgs.append(msg)
        batch_imgs.append(img)
        batch_ids.append(image_id)
        if len(batch_imgs) >= args.batch:
            flush_batch()
    flush_batch()
    end = time.monotonic()
    consumer.close()
    if first is None or done == 0:
        print(json.dumps({"images": 0, "img_s": 0.0, "startup_s": None, "batch": args.batch}))
        return 1
    print(json.dumps({"images": done, "img_s": done / (end - first), "startup_s": first - started, "batch": args.batch}))
    return 0 if done >= args.count else 1


def time_decode(args):
    """Pillow decode + resize on one thread, per file: plain, with draft() to the model size (what
    draft() is usually given), and with draft() to 4x the model size (the operator's rule)."""
    import onnxruntime as ort

    size = args.size or model_size(ort.InferenceSession(args.model, providers=["CPUExecutionProvider"]))
    blobs = [open(p, "rb").read() for p in args.time_decode]
    out = {"files": len(blobs), "size": size}
    for label, draft, keep in (("pillow_ms", False, 1), ("pillow_draft_ms", True, 1), ("pillow_draft4_ms", True, 4)):
        for b in blobs[:2]:
            decode(b, size, draft, keep)  # warm
        t = time.perf_counter()
        for _ in range(args.repeat):
            for b in blobs:
                decode(b, size, draft, keep)
        out[label] = (time.perf_counter() - t) * 1000 / (len(blobs) * args.repeat)
    print(json.dumps(out))
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--brokers")
    p.add_argument("--topic")
    p.add_argument("--scores", help="output topic (default TOPIC.python-scores)")
    p.add_argument("--group")
    p.add_argument("--count", type=int, help="records to score, then stop")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--model", default="models/dcam.onnx")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    p.add_argument("--draft", action="store_true", help="use Pillow's JPEG draft() (teams mostly do not)")
    p.add_argument("--time-decode", nargs="+", metavar="FILE")
    p.add_argument("--size", type=int, help="resize target for --time-decode (default: the model's)")
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    if args.time_decode:
        return time_decode(args)
    if not (args.brokers and args.topic and args.count):
        p.error("--brokers, --topic and --count are needed (or --time-decode)")
    return consume(args)


if __name__ == "__main__":
    sys.exit(main())
