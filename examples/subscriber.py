#!/usr/bin/env python3
"""A dcam-stream score subscriber to copy: reads the scores topic, checks every record against
schemas/score.json, follows heatmap_uri, and prints a per-class table every few seconds.

    pip install confluent-kafka jsonschema        # boto3 too, to fetch s3:// heatmaps
    python examples/subscriber.py --brokers localhost:9092 --topic scores --group my-dashboard
    python examples/subscriber.py --brokers localhost:9092 --max-records 100   # stop after 100 records
    python examples/subscriber.py --brokers localhost:9092 --seconds 60        # stop after a minute

It reads with isolation.level=read_committed, so with delivery.mode = exactly_once it sees only committed
scores; with at_least_once it drops the duplicates a restart can cause, by the input record a score is
for (`source`: topic, partition, offset). A new group starts at the oldest record (--offset-reset).
Unknown fields are let through and named once (fields may be added within a schema_version, see
schemas/README.md); a record that fails the schema is printed and counted, and the exit status is 1.
s3:// heatmaps are fetched with boto3 when it is installed (AWS_ENDPOINT_URL etc. from the environment).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import urllib.parse
from collections import OrderedDict
from pathlib import Path

try:
    from confluent_kafka import Consumer, KafkaError
    from jsonschema import Draft202012Validator
except ImportError as exc:  # pragma: no cover - a missing dependency, say which
    sys.exit(f"{exc.name} is missing: pip install confluent-kafka jsonschema")

DEFAULT_SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "score.json"
SEEN_LIMIT = 100_000  # inputs remembered for dropping duplicates


def tolerant(schema):
    """The schema as a reader should apply it: unknown fields allowed (additionalProperties: false dropped)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("additionalProperties") is False:
                del node["additionalProperties"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def unknown_fields(schema, record, prefix=""):
    """Field paths in `record` that `schema` does not list (for the one-time notice)."""
    unknown = []
    props = schema.get("properties", {})
    for name, value in record.items():
        if name not in props:
            unknown.append(prefix + name)
        elif isinstance(value, dict) and "properties" in props[name]:
            unknown += unknown_fields(props[name], value, f"{prefix}{name}.")
    return unknown


def heatmap_size(uri):
    """Fetches a heatmap; returns (bytes, None) or (None, why not)."""
    # A URI: its path is percent-encoded (a store root with a space or '#' in it), so decode it.
    parts = urllib.parse.urlsplit(uri)
    path = urllib.parse.unquote(parts.path)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            return None, "on another host"
        if not os.path.isfile(path):
            return None, "no such file here"
        with open(path, "rb") as f:
            return len(f.read()), None
    if parts.scheme == "s3":
        try:
            import boto3
        except ImportError:
            return None, "would fetch it with boto3 (not installed)"
        bucket, key = parts.netloc, path.removeprefix("/")
        try:
            body = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:  # credentials, network, missing object: report and go on
            return None, f"fetch failed: {exc}"
        return len(body), None
    return None, "unknown scheme"


class Table:
    """Per-class counts: images, anomalies, the last score."""

    def __init__(self):
        self.rows = {}

    def add(self, record):
        cls = record.get("class") or "(none)"
        row = self.rows.setdefault(cls, {"images": 0, "anomalies": 0, "last": None})
        row["images"] += 1
        row["anomalies"] += bool(record.get("is_anomaly"))
        row["last"] = record.get("score")

    def render(self):
        lines = [f"{'class':<20} {'images':>7} {'anomalies':>9} {'rate':>7} {'last score':>10}"]
        total_images = total_anomalies = 0
        for cls in sorted(self.rows):
            row = self.rows[cls]
            total_images += row["images"]
            total_anomalies += row["anomalies"]
            last = "-" if row["last"] is None else f"{row['last']:.3f}"
            lines.append(f"{cls:<20} {row['images']:>7} {row['anomalies']:>9} {rate(row['anomalies'], row['images']):>7} {last:>10}")
        lines.append(f"{'total':<20} {total_images:>7} {total_anomalies:>9} {rate(total_anomalies, total_images):>7}")
        return "\n".join(lines)


def rate(part, whole):
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers", default="localhost:9092", help="bootstrap servers (default %(default)s)")
    ap.add_argument("--topic", default="scores", help="scores topic (default %(default)s); the anomalies topic works too")
    ap.add_argument("--group", default="dcam-subscriber", help="consumer group id, your own (default %(default)s)")
    ap.add_argument("--max-records", type=int, default=0, help="stop after this many records (0 = never)")
    ap.add_argument("--seconds", type=float, default=0, help="stop after this many seconds (0 = never)")
    ap.add_argument("--refresh", type=float, default=5, help="print the table every this many seconds (default %(default)s)")
    ap.add_argument("--schema", type=Path, default=DEFAULT_SCHEMA, help="score schema (default %(default)s)")
    ap.add_argument("--offset-reset", default="earliest", choices=["earliest", "latest"], help="where a new group starts")
    args = ap.parse_args(argv)

    schema = json.loads(args.schema.read_text())
    validator = Draft202012Validator(tolerant(schema))
    consumer = Consumer({
        "bootstrap.servers": args.brokers,
        "group.id": args.group,
        "isolation.level": "read_committed",  # exactly-once: only committed transactions
        "auto.offset.reset": args.offset_reset,
        "enable.auto.commit": True,
    })
    consumer.subscribe([args.topic])

    table = Table()
    seen = OrderedDict()  # (topic, partition, offset) of inputs already counted
    read = duplicates = invalid = 0
    noticed = set()
    started = last_print = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if args.max_records and read >= args.max_records:
                break
            if args.seconds and now - started >= args.seconds:
                break
            if now - last_print >= args.refresh:
                print(f"--- {read} records, {duplicates} duplicates, {invalid} invalid, {now - started:.0f} s ---\n{table.render()}", flush=True)
                last_print = now
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    print(f"consumer error: {msg.error()}", file=sys.stderr, flush=True)
                continue
            read += 1
            where = f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
            try:
                record = json.loads(msg.value())
            except (TypeError, ValueError) as exc:
                invalid += 1
                print(f"INVALID {where}: not JSON: {exc}", flush=True)
                continue
            # Operators older than the schema_version field wrote none: their records are version 1 (a rolling upgrade mixes both).
            if isinstance(record, dict) and "schema_version" not in record:
                record["schema_version"] = 1
            errors = sorted(validator.iter_errors(record), key=lambda e: list(e.absolute_path))
            if errors:
                invalid += 1
                if isinstance(record, dict) and record.get("schema_version") != schema["properties"]["schema_version"].get("const"):
                    print(f"INVALID {where}: schema_version {record.get('schema_version')!r} is not this schema's; "
                          "a new major version means a breaking change: update the schema and this code", flush=True)
                for e in errors[:3]:
                    print(f"INVALID {where}: {'/'.join(map(str, e.absolute_path)) or '(record)'}: {e.message}", flush=True)
                continue
            for name in unknown_fields(schema, record):
                if name not in noticed:
                    noticed.add(name)
                    print(f"note: field {name!r} is not in {args.schema.name} (added in a newer operator?)", flush=True)
            src = record["source"]
            dedupe = (src["topic"], src["partition"], src["offset"])
            if dedupe in seen:
                duplicates += 1
                continue
            seen[dedupe] = None
            if len(seen) > SEEN_LIMIT:
                seen.popitem(last=False)
            table.add(record)
            if record["heatmap_uri"]:
                size, why = heatmap_size(record["heatmap_uri"])
                print(f"heatmap {record['image_id']} {record['heatmap_uri']}: " + (f"{size} bytes" if why is None else why), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()  # commits the offsets read (enable.auto.commit)
    print(f"=== final: {read} records, {duplicates} duplicates, {invalid} invalid, {time.monotonic() - started:.0f} s ===\n{table.render()}", flush=True)
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
