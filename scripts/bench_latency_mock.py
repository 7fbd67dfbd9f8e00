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
    events = [(None, json.dumps({"image_id": f"lat-{i}", "class": "magnetic_tile",
                                  "image": base64.b64encode(open(f, "rb").read()).decode()}).encode(), None)
              for i, f in enumerate(files)]

    mock = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "idle_mock_broker.py"), *TOPICS],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        brokers = mock.stdout.readline().strip()
        print(run(args, brokers, events))
    finally:
        bf.stop(mock)


def run(args, brokers, events):
    from confluent_kafka import Producer

    tag, port = f"lat-{uuid.uuid4().hex[:6]}", bf.free_port()
    cfg = os.path.join(args.logs, f"{tag}.toml")
    with open(cfg, "w") as f:
        f.write('[kafka.extra]\n"fetch.wait.max.ms" = "10"\n')
    # The mock answers no CreateTopics: the operator uses the topics it was started with.
    topics = dict(zip(("SCORES", "DEAD_LETTER", "CONTROL", "CONTROL_AUDIT"), TOPICS[1:]))
    operator = argparse.Namespace(brokers=brokers, model=args.model, op_batch=args.max_batch,
                                  op_set=[f"DCAM__TOPICS__{k}={v}" for k, v in topics.items()])
    env = dict(bf.operator_env(operator, tag, port, TOPICS[0]), DCAM_CONFIG=cfg)
    producer = Producer({"bootstrap.servers": brokers, "linger.ms": 0})
    proc = subprocess.Popen([args.bin, "run"], env=env, stdout=subprocess.DEVNULL, stderr=open(f"{args.logs}/{tag}.log", "w"),
                            start_new_session=True)
    burst, paced = events[1:1 + args.burst], events[1 + args.burst:]
    deadline = lambda: time.monotonic() + 300
    try:
        bf.send_paced(producer, TOPICS[0], events[:1], 1.0)
        if not bf.wait_scored(port, 1, proc, deadline()):
            sys.exit(f"the warm-up event was not scored (log: {args.logs}/{tag}.log)")
        t0 = time.monotonic()
        bf.send_paced(producer, TOPICS[0], burst, float("inf"))
        bf.wait_scored(port, 1 + len(burst), proc, deadline())
        capacity = len(burst) / (time.monotonic() - t0)
        sent = len(paced) / bf.send_paced(producer, TOPICS[0], paced, args.fraction * capacity)
        bf.wait_scored(port, len(events), proc, deadline())
    finally:
        bf.stop(proc)

    scores = [json.loads(m.value()) for m in bf.read_records(brokers, TOPICS[1], len(events), 60)]
    first_paced = 1 + len(burst)
    parts = [s["latency_ms"] for s in scores if int(s["image_id"].rsplit("-", 1)[1]) >= first_paced]
    if len(parts) < len(paced):
        sys.exit(f"only {len(parts)} of {len(paced)} paced events scored (log: {args.logs}/{tag}.log)")
    lat = bf.latency_summary(parts)
    model = lat["median"]["inference"]
    if args.stages:
        _, _, at, infer = bf.stage_sum_ms(args.stages, args.max_batch or None)
        batch_ms, basis = at * infer, f"batch inference {at} x {infer:.1f} ms"
    else:
        batch_ms, basis = model, "the median model run"
    bound = args.max_delay_ms + 3 * batch_ms
    return (f"latency against the mock cluster (fetch.wait.max.ms 10), {lat['n']} small events paced at {args.fraction:.2f} x a "
            f"burst's {capacity:.1f} img/s ({sent:.1f} sent): p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms, max {lat['max']:.0f} ms; "
            f"medians: in the topic {lat['median']['queue']:.0f} ms, consume -> publish {lat['median']['total']:.0f} ms, "
            f"model run {model:.0f} ms; bound max_delay_ms + 3 x {basis} = {bound:.0f} ms; p99 / bound = {lat['p99'] / bound:.2f}")


if __name__ == "__main__":
    main()
