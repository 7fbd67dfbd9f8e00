#!/usr/bin/env python3
"""Paced latency of `dcam-stream run` against librdkafka's mock cluster (scripts/idle_mock_broker.py), a
broker that does not spin the way noida-db does (docs/DESIGN.md §5):

- the operator runs with the default config (control topic on) but `fetch.wait.max.ms = 10`: the mock
  holds an empty fetch for its whole fetch.wait.max.ms even when data arrives, where Apache Kafka answers
  as soon as fetch.min.bytes is there, so the default 500 ms would bunch the events into half-second
  batches that no Kafka cluster makes;
- events are small JPEGs (magnetic_tile's test images, ~50 KB as JSON), because the mock keeps only about
  5 MB per partition;
- capacity = a burst of --burst events, timed from the first score to the last; then --count events one at
  a time at --fraction of it; per image, record timestamp -> score published (the score's latency_ms:
  queue + total), p50/p99 against batch.max_delay_ms + 3 x the single-thread inference time of a batch
  (from `dcam-stream bench`'s (c) table, --stages; without it, the median model run measured here).
"""

import argparse
import base64
import glob
import json
import os
import statistics
import subprocess
import sys
import time
import uuid

import bench_fair as bf

TOPICS = ("lat-in", "lat-scores", "lat-dlq", "lat-control", "lat-audit")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True, help="the dcam-stream binary")
    p.add_argument("--dataset", default="../shared/datasets")
    p.add_argument("--model", default="models/dcam.onnx")
    p.add_argument("--burst", type=int, default=60, help="events of the capacity burst (~50 KB each: under the mock's 5 MB)")
    p.add_argument("--count", type=int, default=300, help="events sent one at a time")
    p.add_argument("--fraction", type=float, default=0.8)
    p.add_argument("--max-batch", type=int, default=0, help="batch.max_batch (0: the engine policy's)")
    p.add_argument("--stages", help="`dcam-stream bench` output with the (c) table, for the bound")
    p.add_argument("--max-delay-ms", type=float, default=10.0)
    p.add_argument("--logs", default="/tmp")
    args = p.parse_args()

    files = sorted(glob.glob(os.path.join(args.dataset, "magnetic_tile", "test", "*", "*.*")))
    need = 1 + args.burst + args.count
    if not files:
        sys.exit(f"no magnetic_tile test images under {args.dataset}")
    files = (files * (need // len(files) + 1))[:need]
    events = [json.dumps({"image_id": f"lat-{i}", "class": "magnetic_tile", "image": base64.b64encode(open(f, "rb").read()).decode()}).encode()
              for i, f in enumerate(files)]

    mock = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "idle_mock_broker.py"), *TOPICS],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        brokers = mock.stdout.readline().strip()
        print(run(args, brokers, events))
    finally:
        bf.stop(mock)


def run(args, brokers, events):
    from confluent_kafka import Consumer, Producer

    tag, port = f"lat-{uuid.uuid4().hex[:6]}", bf.free_port()
    cfg = os.path.join(args.logs, f"{tag}.toml")
    with open(cfg, "w") as f:
        f.write('[kafka.extra]\n"fetch.wait.max.ms" = "10"\n')
    env = dict(os.environ, DCAM_CONFIG=cfg, DCAM__KAFKA__BROKERS=brokers, DCAM__KAFKA__INPUT_TOPICS="lat-in", DCAM__KAFKA__GROUP_ID=tag,
               DCAM__DELIVERY__INSTANCE_ID=tag, DCAM__TOPICS__SCORES="lat-scores", DCAM__TOPICS__DEAD_LETTER="lat-dlq",
               DCAM__TOPICS__CONTROL="lat-control", DCAM__TOPICS__CONTROL_AUDIT="lat-audit", DCAM__MODEL__PATH=args.model,
               DCAM__HEATMAP__POLICY="none", DCAM__TELEMETRY__HTTP_ADDR=f"127.0.0.1:{port}", DCAM__TELEMETRY__LOG_LEVEL="warn")
    if args.max_batch:
        env["DCAM__BATCH__MAX_BATCH"] = str(args.max_batch)
    producer = Producer({"bootstrap.servers": brokers, "linger.ms": 0})
    proc = subprocess.Popen([args.bin, "run"], env=env, stdout=subprocess.DEVNULL, stderr=open(f"{args.logs}/{tag}.log", "w"),
                            start_new_session=True)
    burst, paced = events[1:1 + args.burst], events[1 + args.burst:]
    deadline = lambda: time.monotonic() + 300
    try:
        producer.produce("lat-in", events[0])
        producer.flush(10)
        if not bf.wait_scored(port, 1, proc, deadline()):
            sys.exit(f"the warm-up event was not scored (log: {args.logs}/{tag}.log)")
        t0 = time.monotonic()
        for e in burst:
            producer.produce("lat-in", e)
            producer.poll(0)
        producer.flush(10)
        bf.wait_scored(port, 1 + len(burst), proc, deadline())
        capacity = len(burst) / (time.monotonic() - t0)
        rate = args.fraction * capacity
        t0 = time.monotonic()
        for i, e in enumerate(paced):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            producer.produce("lat-in", e)
            producer.poll(0)
        producer.flush(10)
        sent = len(paced) / (time.monotonic() - t0)
        bf.wait_scored(port, len(events), proc, deadline())
    finally:
        bf.stop(proc)

    reader = Consumer({"bootstrap.servers": brokers, "group.id": f"{tag}-reader", "auto.offset.reset": "earliest"})
    reader.subscribe(["lat-scores"])
    scores, until = [], time.monotonic() + 60
    while len(scores) < len(events) and time.monotonic() < until:
        m = reader.poll(0.5)
        if m is not None and not m.error():
            scores.append(json.loads(m.value()))
    reader.close()
    first_paced = 1 + len(burst)
    parts = [s["latency_ms"] for s in scores if int(s["image_id"].rsplit("-", 1)[1]) >= first_paced]
    if len(parts) < len(paced):
        sys.exit(f"only {len(parts)} of {len(paced)} paced events scored (log: {args.logs}/{tag}.log)")
    lat = sorted(q["queue"] + q["total"] for q in parts)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    model = statistics.median(q["inference"] for q in parts)
    if args.stages:
        _, _, at, infer = bf.stage_sum_ms(args.stages, args.max_batch or None)
        batch_ms, basis = at * infer, f"batch inference {at} x {infer:.1f} ms"
    else:
        batch_ms, basis = model, "the median model run"
    bound = args.max_delay_ms + 3 * batch_ms
    return (f"latency against the mock cluster (fetch.wait.max.ms 10), {len(parts)} small events paced at {args.fraction:.2f} x a "
            f"burst's {capacity:.1f} img/s ({sent:.1f} sent): p50 {pct(0.5):.0f} ms, p99 {pct(0.99):.0f} ms, max {lat[-1]:.0f} ms; "
            f"medians: in the topic {statistics.median(q['queue'] for q in parts):.0f} ms, consume -> publish "
            f"{statistics.median(q['total'] for q in parts):.0f} ms, model run {model:.0f} ms; bound max_delay_ms + 3 x {basis} = {bound:.0f} ms; "
            f"p99 / bound = {pct(0.99) / bound:.2f}")


if __name__ == "__main__":
    main()
