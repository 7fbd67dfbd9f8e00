#!/usr/bin/env python3
"""The operator against a plain Python consumer, each as its own process, measured the same way
from outside (scripts/bench.sh runs it after `dcam-stream bench`):

- `dcam-stream run` with the default configuration (control topic on; heatmaps off, as the Python
  consumer writes none), and scripts/bench_python_consumer.py, read the same N events from the
  same topic, ROUNDS times each, alternating (op, py, py, op, op, py, ...);
- before each run the broker is left to settle (quiet for two seconds in a row, at most a minute),
  so no side pays for the state rewrites the step before it set off;
- each process's own CPU time (utime + stime of every thread, /proc/PID/stat) is sampled every
  100 ms, as is the broker's (every process of its process group) and this script's; nothing is
  charged to the side it does not belong to. The scores are read back after each run (a reader
  running beside it would spin against noida-db and take CPU from the side measured);
- the window is steady state: from the first score record's timestamp to the last one's, and the
  images in it are the records after the first (start-up, group join and the first batch fall
  outside it, for both sides);
- eta = sum of the single-thread stage costs (parse + decode + inference at the operator's batch,
  from `dcam-stream bench`'s (c) table) / the operator's CPU per image; available cores = cores
  minus what the broker and the reader used in the window; e2e / (available / stage sum).

The last line is `efficiency = X.XX` (eta, median over the rounds).
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid

TICK = os.sysconf("SC_CLK_TCK")


def stat_fields(pid):
    """/proc/PID/stat after the command name (fields 3 on; None when the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_cpu_s(pid):
    """utime + stime of a live process, all its threads, in seconds (None when gone)."""
    fields = stat_fields(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / TICK


def group_pids(pgid):
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and (fields := stat_fields(p)) and int(fields[2]) == pgid]


def self_cpu_s():
    t = os.times()
    return t.user + t.system


def peak_rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Sampler(threading.Thread):
    """(wall time, side's CPU, broker's CPU, this script's CPU) every 100 ms."""

    def __init__(self, pid, broker_pgid):
        super().__init__(daemon=True)
        # The broker's processes, listed once: scanning /proc every sample would cost the reader.
        self.pid, self.broker_pids = pid, group_pids(broker_pgid) if broker_pgid else []
        self.samples, self.stop = [], threading.Event()
        self.peak_rss_mb = float("nan")

    def run(self):
        while not self.stop.is_set():
            own = proc_cpu_s(self.pid)
            if own is None:
                break
            broker = sum(proc_cpu_s(p) or 0.0 for p in self.broker_pids)
            self.samples.append((time.time(), own, broker, self_cpu_s()))
            rss = peak_rss_mb(self.pid)
            if rss == rss:  # NaN once the process is gone: keep the last reading
                self.peak_rss_mb = rss
            self.stop.wait(0.1)

    def at(self, t):
        """The samples linearly interpolated at wall time t."""
        s = self.samples
        for a, b in zip(s, s[1:]):
            if a[0] <= t <= b[0]:
                w = (t - a[0]) / (b[0] - a[0]) if b[0] > a[0] else 0.0
                return tuple(x + w * (y - x) for x, y in zip(a[1:], b[1:]))
        return s[-1][1:] if t > s[-1][0] else s[0][1:]


def read_scores(brokers, topic, count, timeout):
    """Record timestamps (s) of the first `count` records of `topic`, read after the run: a
    consumer reading while the side runs would spin against noida-db (it answers an empty fetch at
    once) and take a core's share from both sides."""
    return [m.timestamp()[1] / 1000.0 for m in read_records(brokers, topic, count, timeout)]


def read_records(brokers, topic, count, timeout):
    """The first `count` records of `topic` (fewer when the timeout passes first)."""
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": f"fair-reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topic])
    records, deadline = [], time.monotonic() + timeout
    try:
        while len(records) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            records.append(msg)
    finally:
        consumer.close()
    return records


def operator_done(port, count):
    """Whether the operator's /metrics counts `count` input events with an outcome."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return False
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("dcam_images_total{")) >= count


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def operator_env(args, tag, port, topic):
    """`dcam-stream run` with the default config: its own group, score topic and metrics port."""
    env = dict(
        os.environ,
        DCAM__KAFKA__BROKERS=args.brokers,
        DCAM__KAFKA__INPUT_TOPICS=topic,
        DCAM__KAFKA__GROUP_ID=tag,
        DCAM__DELIVERY__INSTANCE_ID=tag,
        DCAM__TOPICS__SCORES=tag,
        DCAM__TOPICS__DEAD_LETTER=f"{tag}.dlq",
        DCAM__MODEL__PATH=args.model,
        DCAM__HEATMAP__POLICY="none",
        DCAM__TELEMETRY__HTTP_ADDR=f"127.0.0.1:{port}",
        DCAM__TELEMETRY__LOG_LEVEL="warn",
    )
    if args.op_batch:
        env["DCAM__BATCH__MAX_BATCH"] = str(args.op_batch)
    env.update(kv.split("=", 1) for kv in args.op_set)
    return env


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_scored(port, count, proc, deadline):
    while proc.poll() is None and time.monotonic() < deadline and not operator_done(port, count):
        time.sleep(0.2)
    return operator_done(port, count)


def send_paced(producer, topic, events, rate):
    """Publishes (key, value, headers) events one at a time, evenly spaced at `rate` per second; the seconds it took."""
    t0 = time.monotonic()
    for i, (key, value, headers) in enumerate(events):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        producer.produce(topic, value, key, headers=headers)
        producer.poll(0)
    producer.flush(30)
    return time.monotonic() - t0


def latency_summary(parts):
    """Of the scores' latency_ms: record timestamp -> score published (queue + total), p50/p99/max, and the
    medians of each part."""
    lat = sorted(p["queue"] + p["total"] for p in parts)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    median = {k: statistics.median(p[k] for p in parts) for k in ("queue", "inference", "total")}
    return {"p50": pct(0.5), "p99": pct(0.99), "max": lat[-1], "n": len(lat), "median": median}


def paced_latency(args, rate):
    """Latency at `rate` events/s below what the operator sustains: a running `dcam-stream run` (default
    config; group joined, model warm, one event scored) gets --paced-count events one at a time, evenly
    spaced; per image, record timestamp -> score published (the score's latency_ms: queue + total)."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    events = [(m.key(), m.value(), m.headers()) for m in read_records(args.brokers, args.topic, args.paced_count + 1, 120)]
    if len(events) < 2:
        sys.exit(f"paced: only {len(events)} events in {args.topic}")
    tag, port = f"fair-paced-{uuid.uuid4().hex[:6]}", free_port()
    topic = f"{tag}-in"
    admin = AdminClient({"bootstrap.servers": args.brokers})  # kept alive until the topic exists
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": args.brokers, "linger.ms": 0})
    warm, paced = events[0], events[1:]
    producer.produce(topic, warm[1], warm[0], headers=warm[2])
    producer.flush(30)
    proc = subprocess.Popen([args.bin, "run"], env=operator_env(args, tag, port, topic), stdout=subprocess.DEVNULL,
                            stderr=open(f"{args.logs}/{tag}.log", "w"), start_new_session=True)
    try:
        if not wait_scored(port, 1, proc, time.monotonic() + args.timeout):
            sys.exit(f"paced: the warm-up event was not scored (log: {args.logs}/{tag}.log)")
        sent_s = send_paced(producer, topic, paced, rate)
        wait_scored(port, len(events), proc, time.monotonic() + args.timeout)
    finally:
        stop(proc)
    scores = [json.loads(m.value()) for m in read_records(args.brokers, tag, len(events), 60)]
    parts = [s["latency_ms"] for s in scores if s["source"]["offset"] > 0]
    if len(parts) < len(paced):
        sys.exit(f"paced: only {len(parts)} of {len(paced)} scores (log: {args.logs}/{tag}.log)")
    return {"rate": len(paced) / sent_s, **latency_summary(parts)}


def settle(broker_pgid, quiet_cores=0.35, quiet_windows=2, limit_s=60.0):
    """Waits until the broker has been quiet (under `quiet_cores` for `quiet_windows` one-second
    windows in a row; an idle noida-db takes ~0.2 of a core), so no side pays for what the step
    before it left behind: noida-db rewrites its whole state file (~2 s of CPU with the bench's
    images) after produces and commits (docs/DESIGN.md §5). Seconds waited."""
    pids, start, quiet = group_pids(broker_pgid), time.monotonic(), 0
    while quiet < quiet_windows and time.monotonic() - start < limit_s:
        before = sum(proc_cpu_s(p) or 0.0 for p in pids)
        time.sleep(1.0)
        quiet = quiet + 1 if sum(proc_cpu_s(p) or 0.0 for p in pids) - before < quiet_cores else 0
    return time.monotonic() - start


def measure(side, argv, env, scores_topic, args, metrics_port=None):
    """Runs one side until it scored args.count events; its window figures."""
    settled = settle(args.broker_pgid) if args.broker_pgid else 0.0
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=open(f"{args.logs}/{scores_topic}.log", "w"), start_new_session=True)
    sampler = Sampler(proc.pid, args.broker_pgid)
    sampler.start()
    deadline = time.monotonic() + args.timeout
    try:
        # The Python consumer exits after --count; the operator is asked through /metrics (0.5 s).
        while proc.poll() is None and time.monotonic() < deadline:
            if metrics_port and operator_done(metrics_port, args.count):
                break
            time.sleep(0.5)
    finally:
        sampler.stop.set()
        sampler.join()
        stop(proc)
    stamps = read_scores(args.brokers, scores_topic, args.count, 60)
    if len(stamps) < args.count:
        sys.exit(f"{side}: only {len(stamps)} of {args.count} scores within {args.timeout} s (log: {args.logs}/{scores_topic}.log)")
    t0, t1 = min(stamps), max(stamps)
    images = sum(1 for s in stamps if s > t0)
    if images == 0:
        sys.exit(f"{side}: every score has the same timestamp; too few events for a steady-state window (raise --count)")
    (own0, broker0, reader0), (own1, broker1, reader1) = sampler.at(t0), sampler.at(t1)
    window = t1 - t0
    return {
        "side": side,
        "img_s": images / window,
        "cpu_ms_per_image": (own1 - own0) * 1000 / images,
        "cores_used": (own1 - own0) / window,
        "broker_cores": (broker1 - broker0) / window,
        "reader_cores": (reader1 - reader0) / window,
        "window_s": window,
        "peak_rss_mb": sampler.peak_rss_mb,
        "settled_s": settled,
    }


def stage_sum_ms(bench_txt, batch):
    """parse + decode + inference at `batch` (default: the configuration's, from the bench's
    policy line; else the nearest batch measured), from (c)."""
    text = open(bench_txt).read()
    if batch is None:
        batch = int(re.search(r"^engine policy of this configuration: .* max_batch (\d+)", text, re.M).group(1))
    parse = float(re.search(r"\| parse \(event parser: envelope \+ base64\) \| ([0-9.]+) \|", text).group(1))
    decode = float(re.search(r"\| decode \+ resize \(Decoder\) \| ([0-9.]+) \|", text).group(1))
    infer = {int(b): float(ms) for b, ms in re.findall(r"\| inference, 1 intra-op thread, batch (\d+) \| ([0-9.]+) \|", text)}
    at = min(infer, key=lambda b: abs(b - batch))
    return parse, decode, at, infer[at]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--brokers", required=True)
    p.add_argument("--topic", required=True, help="the events (published once, read by every run)")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--bin", required=True, help="the dcam-stream binary")
    p.add_argument("--model", default="models/dcam.onnx")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--operator-only", action="store_true", help="no Python runs (to compare operator settings quickly)")
    p.add_argument("--py-batch", type=int, default=32)
    p.add_argument("--op-batch", type=int, help="the operator's batch.max_batch (default: the config's, which --stages names)")
    p.add_argument("--op-set", nargs="*", default=[], metavar="DCAM__SECTION__KEY=VALUE",
                   help="settings for the operator on top of the default config (to compare a policy)")
    p.add_argument("--broker-pgid", type=int, default=0)
    p.add_argument("--stages", help="`dcam-stream bench` output with the (c) table, for eta")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--logs", default="/tmp")
    p.add_argument("--paced-fraction", type=float, default=0.0,
                   help="then the latency at this share of the operator's median throughput (0: not measured)")
    p.add_argument("--paced-count", type=int, default=300, help="events sent one at a time for the latency")
    p.add_argument("--max-delay-ms", type=float, default=10.0, help="the config's batch.max_delay_ms, for the latency bound")
    args = p.parse_args()

    cores = os.cpu_count()
    load = os.getloadavg()[0]
    print(f"fair bench: {args.count} events, {args.rounds} rounds per side alternating, {cores} cores, load average before {load:.2f}")
    if args.op_set:
        print(f"operator settings over the default config: {' '.join(args.op_set)}")
    runs = []
    for r in range(args.rounds):
        order = ("operator", "python") if r % 2 == 0 else ("python", "operator")
        if args.operator_only:
            order = ("operator",)
        for side in order:
            tag, port = f"fair-{side}-{r}-{uuid.uuid4().hex[:6]}", free_port()
            if side == "operator":
                env = operator_env(args, tag, port, args.topic)
                argv = [args.bin, "run"]
            else:
                env = dict(os.environ)
                argv = [sys.executable, os.path.join(os.path.dirname(__file__), "bench_python_consumer.py"), "--brokers", args.brokers,
                        "--topic", args.topic, "--scores", tag, "--group", tag, "--count", str(args.count), "--batch", str(args.py_batch),
                        "--model", args.model]
            run = measure(side, argv, env, tag, args, port if side == "operator" else None)
            run["round"] = r + 1
            runs.append(run)
            print(f"  round {r + 1} {side}: {run['img_s']:.1f} img/s", file=sys.stderr)

    print("| round | side | img/s | CPU ms/image (own process) | cores used | broker cores | bench script cores | peak RSS MB | window s | broker settled s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for x in runs:
        print(f"| {x['round']} | {x['side']} | {x['img_s']:.1f} | {x['cpu_ms_per_image']:.1f} | {x['cores_used']:.2f} | {x['broker_cores']:.2f} "
              f"| {x['reader_cores']:.2f} | {x['peak_rss_mb']:.0f} | {x['window_s']:.1f} | {x['settled_s']:.0f} |")
    op = [x for x in runs if x["side"] == "operator"]
    py = [x for x in runs if x["side"] == "python"]
    print()
    if py:
        ratios = sorted(o["img_s"] / q["img_s"] for o, q in zip(op, py))
        cpu_ratios = sorted(q["cpu_ms_per_image"] / o["cpu_ms_per_image"] for o, q in zip(op, py))
        print(f"throughput operator / python, per round: min {ratios[0]:.2f}, median {statistics.median(ratios):.2f}, max {ratios[-1]:.2f}")
        print(f"CPU per image python / operator, per round: min {cpu_ratios[0]:.2f}, median {statistics.median(cpu_ratios):.2f}, max {cpu_ratios[-1]:.2f}")
    print(f"operator peak RSS: max {max(x['peak_rss_mb'] for x in op):.0f} MB")
    if args.stages:
        parse, decode, at, infer = stage_sum_ms(args.stages, args.op_batch)
        stages = parse + decode + infer
        cpu = statistics.median(x["cpu_ms_per_image"] for x in op)
        eta = stages / cpu
        avail = statistics.median(cores - x["broker_cores"] - x["reader_cores"] for x in op)
        e2e = statistics.median(x["img_s"] for x in op)
        print(f"stage sum = parse {parse:.2f} + decode {decode:.2f} + inference at batch {at} {infer:.2f} = {stages:.2f} ms/image")
        print(f"operator CPU per image (median) = {cpu:.2f} ms; available cores (median) = {avail:.2f}")
        print(f"e2e / (available cores / stage sum) = {e2e / (avail * 1000 / stages):.2f}")
    if args.paced_fraction > 0:
        rate = args.paced_fraction * statistics.median(x["img_s"] for x in op)
        lat = paced_latency(args, rate)
        print(f"\nlatency, paced at {args.paced_fraction:.2f} x the operator's median throughput ({rate:.1f} img/s asked, "
              f"{lat['rate']:.1f} sent), record timestamp -> score published, {lat['n']} images:")
        line = f"p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms, max {lat['max']:.0f} ms"
        if args.stages:
            bound = args.max_delay_ms + 3 * at * infer
            line += f"; bound max_delay_ms + 3 x batch inference ({at} x {infer:.1f} ms) = {bound:.0f} ms; p99 / bound = {lat['p99'] / bound:.2f}"
        print(line)
        m = lat["median"]
        print(f"medians: in the topic before consume {m['queue']:.0f} ms, consume -> publish {m['total']:.0f} ms "
              f"(of which the batch's model run {m['inference']:.0f} ms)")
    if args.stages:
        print(f"efficiency = {eta:.2f}")


if __name__ == "__main__":
    main()
