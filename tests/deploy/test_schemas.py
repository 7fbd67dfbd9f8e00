"""The record schemas in schemas/ against themselves, the docs, the operator's parser and the real operator.

- Every schema is a valid draft 2020-12 schema and its own `examples` validate.
- The example records in README.md, docs/DESIGN.md and schemas/README.md validate, and the field and enum
  lists the docs give are the schemas' (so docs, schemas and the Rust types cannot drift apart unseen).
- The input schema accepts and refuses what the operator's parser does (the cases of src/event.rs's tests).
- End to end: a noida-db broker and `dcam-stream run` (exactly-once, anomalies topic, heatmaps in a file://
  store, control topic), real images of both classes in every input form plus malformed inputs; every
  record read back from the score, anomaly, dead-letter and control topics validates, and
  examples/subscriber.py prints the right per-class table. Then `dcam-stream replay` of the same topic:
  its records and its summary validate; `replay --dir`: its JSON lines (file-score.json) too.

The live tests skip with the reason when the operator binary ($DCAM_BIN, else target/debug/dcam-stream),
the noida-db broker or the datasets are missing.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from deploylib import REPO
from livelib import DATASETS, MODEL, Broker, Operator, free_port, operator_bin

SCHEMAS = REPO / "schemas"
SCHEMA_FILES = sorted(SCHEMAS.glob("*.json"))
DOCS = [REPO / "README.md", REPO / "docs" / "DESIGN.md", SCHEMAS / "README.md"]
TOKEN = "schema-t0ken"
# A heatmap store root with characters a URI must percent-encode: heatmap_uri stays one valid URI.
HEATMAP_DIR = "heat maps #1 100%"


def load(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{name}.json").read_text())


def registry() -> Registry:
    resources = []
    for path in SCHEMA_FILES:
        schema = json.loads(path.read_text())
        resources.append((schema["$id"], Resource.from_contents(schema)))
    return Registry().with_resources(resources)


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(load(name), registry=registry())


def errors(name: str, instance: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator(name).iter_errors(instance)]


def assert_valid(name: str, instance: Any, what: str = "") -> None:
    found = errors(name, instance)
    assert not found, f"{what or 'record'} does not match schemas/{name}.json: {found}\n{json.dumps(instance)[:2000]}"


def score_errors(record: dict[str, Any], schema: str = "score") -> list[str]:
    return errors(schema, record)


# ---- a. the schemas themselves ----------------------------------------------------------------------


def test_the_expected_schemas_exist():
    names = {p.stem for p in SCHEMA_FILES}
    assert names == {"input", "score", "anomaly", "dead-letter", "control", "replay-summary", "file-score"}, names


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.name)
def test_schema_is_valid_draft_2020_12(path):
    schema = json.loads(path.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    assert re.fullmatch(rf"https://dcam-stream\.dev/schemas/{re.escape(path.stem)}/[0-9]+\.json", schema["$id"]), schema["$id"]
    assert schema.get("examples"), f"{path.name} has no examples"
    for example in schema["examples"]:
        assert_valid(path.stem, example, f"an example of {path.name}")


def test_output_schemas_are_closed_and_require_what_is_always_written():
    """An output record's fields are all listed and (except in file-score, none is optional) required."""
    for name in ("score", "replay-summary", "file-score"):
        schema = load(name)
        assert schema["additionalProperties"] is False, name
        assert set(schema["required"]) == set(schema["properties"]), name
    score = load("score")
    for field in ("model", "source", "latency_ms"):
        sub = score["properties"][field]
        assert sub["additionalProperties"] is False and set(sub["required"]) == set(sub["properties"]), field
    control = load("control")
    for kind in ("threshold", "model"):
        sub = control["$defs"][kind]
        assert sub["additionalProperties"] is False and set(sub["required"]) == set(sub["properties"]), kind
    version = score["properties"]["schema_version"]
    assert (version["type"], version["const"]) == ("integer", 1) and "schema_version" in score["required"]


def test_anomaly_is_a_score_with_is_anomaly_true():
    good = load("score")["examples"][0]
    assert good["is_anomaly"] is True
    assert not errors("anomaly", good)
    assert any("True was expected" in e for e in errors("anomaly", {**good, "is_anomaly": False}))
    assert errors("anomaly", {**good, "extra": 1}), "the anomaly record must be as closed as the score record"


def test_a_new_field_or_a_missing_one_is_caught():
    record = load("score")["examples"][0]
    assert errors("score", {**record, "new_field": 1})
    assert errors("score", {k: v for k, v in record.items() if k != "threshold_source"})
    assert errors("score", {**record, "schema_version": 2})
    assert errors("score", {**record, "source": {**record["source"], "extra": 0}})


# ---- b. the docs --------------------------------------------------------------------------------------


def fenced_json(text: str) -> list[str]:
    return re.findall(r"```json\n(.*?)```", text, re.S)


def schema_for_example(obj: dict[str, Any]) -> str:
    if "raw_score" in obj:
        return "score"
    if "kind" in obj:
        return "control"
    if "image_id" in obj and ("image" in obj or "image_uri" in obj):
        return "input"
    if "dcam-error-kind" in obj:
        return "dead-letter"
    if "dead_letters" in obj:
        return "replay-summary"
    raise AssertionError(f"no schema for this example: {obj}")


def test_fenced_json_examples_in_the_docs_validate():
    checked = []
    for doc in DOCS:
        for block in fenced_json(doc.read_text()):
            obj = json.loads(block)
            name = schema_for_example(obj)
            found = score_errors(obj, name) if name in ("score", "anomaly") else errors(name, obj)
            assert not found, f"the {name} example in {doc.relative_to(REPO)} does not validate: {found}\n{block}"
            checked.append((doc.name, name))
    assert ("README.md", "score") in checked, checked


def test_inline_envelope_examples_in_the_docs_validate():
    """`{"image_id": ...}` envelopes written inline, with their placeholders (`<base64>`, `{...}`) filled in."""
    found = 0
    for doc in DOCS[:2]:
        for snippet in re.findall(r'`(\{"image_id".*?\})`', doc.read_text()):
            filled = snippet.replace('"<base64>"', '"iVBORw0KGgo="').replace("{...}", "{}")
            assert_valid("input", json.loads(filled), f"the envelope in {doc.name}")
            found += 1
    assert found >= 2, "the envelope examples of README.md and docs/DESIGN.md were not found"


def design_section(number: int) -> str:
    text = (REPO / "docs" / "DESIGN.md").read_text()
    m = re.search(rf"^## {number}\. .*?(?=^## |\Z)", text, re.S | re.M)
    assert m, f"docs/DESIGN.md has no section {number}"
    return m.group(0)


def backticked(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def test_design_score_fields_are_the_schemas():
    """docs/DESIGN.md §3 lists the score record's fields (nested ones in braces) and threshold_source's values."""
    bullet = re.search(r"\*\*Scores\*\*.*?JSON:(.*?)(?=\n- \*\*)", design_section(3), re.S).group(1)
    props = load("score")["properties"]
    nested = dict(re.findall(r"`(\w+)`\s*\{([^}]*)\}", bullet))
    for field, inner in nested.items():
        assert set(backticked(inner)) == set(props[field]["properties"]), (field, inner)
    top = re.sub(r"\{[^}]*\}", "", bullet)
    sources = re.search(r"`threshold_source`\s*\(([^)]*)\)", top).group(1)
    assert set(backticked(sources.split(":")[0])) == set(props["threshold_source"]["enum"]), sources
    top = re.sub(r"\([^)]*\)", "", top)
    assert set(backticked(top)) == set(props), f"DESIGN.md §3 lists {sorted(backticked(top))}, score.json has {sorted(props)}"


def test_docs_list_every_dead_letter_kind():
    kinds = set(load("dead-letter")["properties"]["dcam-error-kind"]["enum"])
    for doc in DOCS[:2]:
        m = re.search(r"`dcam-error-kind`\s*\(([^)]*)\)", doc.read_text())
        assert m, f"{doc.name} does not list the dead-letter kinds"
        assert set(backticked(m.group(1))) == kinds, f"{doc.name} lists {backticked(m.group(1))}, the schema {sorted(kinds)}"


def test_design_control_records_are_the_schemas():
    text = design_section(9)
    defs = load("control")["$defs"]
    for kind in ("threshold", "model"):
        m = re.search(r'`(\{"kind": "' + kind + r'".*?\})`', text)
        assert m, f"docs/DESIGN.md §9 shows no {kind} record"
        keys = set(re.findall(r'(?<!: )"(\w+)"', m.group(1)))
        assert keys == set(defs[kind]["properties"]), (kind, keys)


# ---- the input schema against the operator's parser --------------------------------------------------

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()

# (envelope, the dead-letter kind the operator's parser gives it, or None where it passes the parser):
# the cases of src/event.rs malformed_envelopes_are_rejected_with_kind, then more of what serde and the
# parser do. The end-to-end test publishes them all and checks the operator's verdicts.
PARSER_CASES = [
    ({"image": "AAAA"}, "schema"),
    ({"image_id": "bad id!", "image": "AAAA"}, "schema"),
    ({"image_id": 7, "image": "AAAA"}, "schema"),
    ({"image_id": "x", "image": "@@@"}, "decode"),
    ({"image_id": "x"}, "schema"),
    ({"image_id": "x", "image": "AAAA", "image_uri": "file:///a"}, "schema"),
    ({"image_id": "x", "image": "AAAA", "attributes": [1]}, "schema"),
    ({"image_id": "x" * 257, "image": "AAAA"}, "schema"),
    ({"image_id": "x" * 256, "image": "AAAA"}, None),
    ({"image_id": "a:b.c-1", "class": "tile", "image": PNG, "content_type": "image/png"}, None),
    ({"image_id": "x", "image": PNG, "image_uri": None, "class": None, "attributes": None, "captured_at": None}, None),
    ({"image_id": "x", "image": None, "image_uri": None}, "schema"),
    ({"image_id": None, "image": PNG}, "schema"),
    ({"image_id": "x", "image": PNG, "class": ""}, "schema"),
    ({"image_id": "x", "image": PNG, "class": "a\nb"}, "schema"),
    ({"image_id": "x", "image": PNG, "class": "k" * 129}, "schema"),
    # Characters, not bytes: 128 two-byte characters pass, 129 do not.
    ({"image_id": "x", "image": PNG, "class": "é" * 128}, None),
    ({"image_id": "x", "image": PNG, "class": "é" * 129}, "schema"),
    ({"image_id": "x", "image": PNG, "content_type": 5}, "schema"),
    ({"image_id": "x\n", "image": PNG}, "schema"),
    ({"image_id": "x", "image": ""}, "schema"),
    ({"image_id": "x", "image": f"  {PNG}\n"}, None),
    ({"image_id": "x", "image": PNG, "unknown_field": [1, 2]}, None),
    ({"image_id": "x", "image_uri": "file://localhost/var/a%20b.png"}, None),
    ({"image_id": "x", "image_uri": "s3://bucket/key.jpg"}, None),
    ({"image_id": "x", "image_uri": "http://example.com/a.png"}, "fetch"),
]


@pytest.mark.parametrize("envelope,kind", PARSER_CASES, ids=[str(i) for i in range(len(PARSER_CASES))])
def test_input_schema_agrees_with_the_parser(envelope, kind):
    found = errors("input", envelope)
    assert (not found) == (kind is None), f"{envelope!r}: schema errors {found}; the parser: {kind or 'passes'}"


def test_base64_pattern_is_the_operators():
    """Standard alphabet, canonical padding, no trailing bits (the base64 crate's STANDARD engine)."""
    for n in range(1, 40):
        data = bytes((i * 37 + n) % 256 for i in range(n))
        assert not errors("input", {"image_id": "x", "image": base64.b64encode(data).decode()}), n
    for bad in ["AB==", "ABC=", "AAA", "AAAAA", "AA=A", "A===", "AA==AA==", "AA AA", "AAAA-_AA", "Zm9v\nYmFy"]:
        assert errors("input", {"image_id": "x", "image": bad}), bad
        with pytest.raises(ValueError):
            strict_b64(bad)


def strict_b64(s: str) -> bytes:
    """base64 as the operator decodes it. Python accepts trailing bits (AB==); re-encoding shows them."""
    data = base64.b64decode(s, validate=True)
    if base64.b64encode(data).decode() != s:
        raise ValueError("non-canonical trailing bits")
    return data


def test_raw_headers_def():
    raw = {"$ref": "https://dcam-stream.dev/schemas/input/1.json#/$defs/raw_headers"}
    v = Draft202012Validator(raw, registry=registry())
    assert v.is_valid({"dcam-image-id": "cam3-1", "dcam-class": "bottle", "traceparent": "00-ab-cd-01", "other": "x"})
    assert not v.is_valid({"dcam-image-id": "bad id"})
    assert not v.is_valid({"dcam-class": ""})


# ---- the subscriber's reading of the schema -------------------------------------------------------------


def subscriber_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("subscriber", REPO / "examples" / "subscriber.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_subscriber_lets_new_fields_through_and_names_them():
    """Fields may be added within a schema_version: the subscriber accepts them, the test schema does not."""
    sub = subscriber_module()
    schema = load("score")
    reader = Draft202012Validator(sub.tolerant(schema))
    record = schema["examples"][0]
    newer = {**record, "new_field": 1, "model": {**record["model"], "digest": "sha256:00"}}
    assert reader.is_valid(newer) and errors("score", newer)
    assert sorted(sub.unknown_fields(schema, newer)) == ["model.digest", "new_field"]
    assert not reader.is_valid({k: v for k, v in record.items() if k != "score"})
    assert not reader.is_valid({**record, "schema_version": 2})
    table = sub.Table()
    for r in (record, {**record, "class": None, "is_anomaly": False, "score": 0.25}):
        table.add(r)
    lines = table.render().splitlines()
    assert lines[1].split() == ["(none)", "1", "0", "0.0%", "0.250"] and lines[-1].split() == ["total", "2", "1", "50.0%"]


def test_subscriber_decodes_heatmap_uris(tmp_path):
    """heatmap_uri is percent-encoded: the subscriber follows one whose path has a space, '#' and '%'."""
    sub = subscriber_module()
    png = tmp_path / HEATMAP_DIR / "0.1.0" / "images" / "0" / "5.png"
    png.parent.mkdir(parents=True)
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    uri = "file://" + urllib.parse.quote(str(png), safe="/")
    assert not errors("score", {**load("score")["examples"][0], "heatmap_uri": uri})
    assert sub.heatmap_size(uri) == (8, None)
    assert errors("score", {**load("score")["examples"][0], "heatmap_uri": f"file://{png}"}), "a raw path is not a valid URI"


# ---- c. end to end --------------------------------------------------------------------------------------


def pick_images() -> dict[str, dict[str, list[Path]]]:
    """Per class: two defect-free and two defective test images (from two defect types)."""
    out: dict[str, dict[str, list[Path]]] = {}
    for cls in ("bottle", "magnetic_tile"):
        test = DATASETS / cls / "test"
        if not (test / "good").is_dir():
            pytest.skip(f"no {test}/good (set DCAM_DATASETS)")
        files = lambda d: sorted(p for p in d.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        defects = sorted(d for d in test.iterdir() if d.is_dir() and d.name != "good")[:2]
        out[cls] = {"good": files(test / "good")[:3], "defect": [files(d)[0] for d in defects]}
    return out


class Input:
    """One record published to the input topic, and what the operator must make of it."""

    def __init__(self, key: str, value: bytes, headers: list[tuple[str, bytes]], outcome: str,
                 envelope: dict[str, Any] | None = None, schema_valid: bool | None = None):
        self.key, self.value, self.headers, self.outcome = key, value, headers, outcome
        self.envelope, self.schema_valid = envelope, schema_valid
        self.partition = self.offset = None


# Headers a dead letter (and a stand-in for one) carries; none may reach a new dead letter.
STALE_ERROR_HEADERS = [("dcam-error-kind", b"fetch"), ("dcam-error", b"no such file"), ("dcam-source", b"images/0/3"),
                       ("dcam-original-error-kind", b"decode"), ("dcam-original-error", b"bad base64")]
OWN_HEADERS = {k for k, _ in STALE_ERROR_HEADERS}


def envelope_input(key: str, envelope: dict[str, Any], outcome: str, schema_valid: bool, headers=()) -> Input:
    return Input(key, json.dumps(envelope).encode(), list(headers), outcome, envelope, schema_valid)


def build_inputs(claims: Path) -> list[Input]:
    imgs = pick_images()
    b64 = lambda p: base64.b64encode(p.read_bytes()).decode()
    ctype = lambda p: "image/png" if p.suffix == ".png" else "image/jpeg"
    bottle, tile = imgs["bottle"], imgs["magnetic_tile"]
    claim = claims / "bottle-claim.png"
    shutil.copyfile(bottle["defect"][1], claim)
    trace = ("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    return [
        envelope_input("in-0", {"image_id": "bottle-good-0", "class": "bottle", "image": b64(bottle["good"][0]),
                                "content_type": ctype(bottle["good"][0]), "captured_at": "2026-11-27T08:00:00Z",
                                "attributes": {"label": "good", "line": "3"}}, "score", True, [trace]),
        Input("in-1", bottle["good"][1].read_bytes(), [("dcam-image-id", b"bottle-good-1"), ("dcam-class", b"bottle")], "score"),
        envelope_input("in-2", {"image_id": "bottle-defect-0", "class": "bottle", "image": b64(bottle["defect"][0]),
                                "attributes": {"label": bottle["defect"][0].parent.name}}, "score", True),
        envelope_input("in-3", {"image_id": "bottle-defect-1", "class": "bottle", "image_uri": claim.as_uri(),
                                "attributes": {"label": bottle["defect"][1].parent.name}}, "score", True),
        envelope_input("in-4", {"image_id": "tile-good-0", "class": "magnetic_tile", "image": b64(tile["good"][0]),
                                "content_type": None, "attributes": None}, "score", True),
        Input("in-5", tile["good"][1].read_bytes(), [("dcam-image-id", b"tile-good-1"), ("dcam-class", b"magnetic_tile")], "score"),
        envelope_input("in-6", {"image_id": "tile-defect-0", "class": "magnetic_tile", "image": b64(tile["defect"][0]),
                                "attributes": {"label": tile["defect"][0].parent.name}, "extra_field": 1}, "score", True),
        Input("in-7", tile["defect"][1].read_bytes(), [("dcam-image-id", b"tile-defect-1"), ("dcam-class", b"magnetic_tile")], "score"),
        # Raw bytes without headers: the id is <topic>-<partition>-<offset>, the class null.
        Input("in-8", tile["good"][2].read_bytes(), [], "score"),
        # Malformed: each one is dead-lettered with this kind.
        Input("in-9", b"{not json", [], "schema", schema_valid=False),
        envelope_input("in-10", {"image_id": "bad id!", "image": "AAAA"}, "schema", False),
        envelope_input("in-11", {"image_id": "both-1", "image": PNG, "image_uri": claim.as_uri()}, "schema", False),
        envelope_input("in-12", {"image_id": "b64-1", "image": "@@@"}, "decode", False),
        envelope_input("in-13", {"image_id": "outside-1", "image_uri": "file:///etc/hostname"}, "fetch", True),
        Input("in-14", b"this is not an image", [("dcam-image-id", b"junk-1")], "unsupported_format|schema|decode"),
        # A redriven record that fails again: its earlier dead letter's headers are replaced.
        Input("in-15", b"{still not json", STALE_ERROR_HEADERS + [("dcam-redriven-from", b"images.dlq/0/7")], "schema", schema_valid=False),
    ] + [
        # None of these carries a real image: those the parser passes fail later, never as `schema`
        # and never for their base64.
        envelope_input(f"case-{i}", envelope, kind or "decode|unsupported_format|fetch", kind is None)
        for i, (envelope, kind) in enumerate(PARSER_CASES)
    ]


def publish(brokers: str, topic: str, inputs: list[Input]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": brokers, "acks": "all"})
    for inp in inputs:
        def report(err, msg, inp=inp):
            assert err is None, f"{inp.key}: {err}"
            inp.partition, inp.offset = msg.partition(), msg.offset()

        producer.produce(topic, key=inp.key.encode(), value=inp.value, headers=inp.headers, on_delivery=report)
        producer.flush(30)  # one at a time: offsets follow the list's order within a partition
    assert all(i.offset is not None for i in inputs), "inputs were not acknowledged"


def read_topics(brokers: str, want: dict[str, int], timeout: float = 180) -> dict[str, list[Any]]:
    """Every record of each topic (read_committed, from the beginning) once `want[topic]` are there."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": brokers, "group.id": f"schemas-reader-{time.time_ns()}",
                         "isolation.level": "read_committed", "enable.auto.commit": False,
                         "auto.offset.reset": "earliest", "receive.message.max.bytes": 1_000_000_000})
    parts = []
    for topic in want:
        md = consumer.list_topics(topic, timeout=15).topics[topic]
        parts += [TopicPartition(topic, p, 0) for p in md.partitions]
    consumer.assign(parts)
    got: dict[str, list[Any]] = {t: [] for t in want}
    deadline = time.monotonic() + timeout
    try:
        while any(len(got[t]) < n for t, n in want.items()) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            got[msg.topic()].append(msg)
        # Anything beyond what was expected (a duplicate, a stray record) shows up within a second more.
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                got[msg.topic()].append(msg)
    finally:
        consumer.close()
    return got


def headers_of(msg) -> dict[str, str]:
    out = {}
    for k, v in msg.headers() or []:
        out[k] = v.decode("utf-8") if v is not None else ""
    return out


def api(op: Operator, method: str, path: str, body: Any = None, timeout: float = 120) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{op.port}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def final_table(stdout: str) -> dict[str, tuple[int, int, str, str]]:
    """class -> (images, anomalies, rate, last score) from the subscriber's final table."""
    block = stdout.split("=== final:", 1)[1].splitlines()[2:]
    rows = {}
    for line in block:
        parts = line.split()
        if len(parts) >= 4:
            rows[parts[0]] = (int(parts[1]), int(parts[2]), parts[3], parts[4] if len(parts) > 4 else "")
    return rows


def parse_summary(run: subprocess.CompletedProcess) -> dict[str, Any]:
    """The summary record `replay` prints: its stdout is that one JSON line, nothing else; stderr
    has the same numbers for people."""
    lines = run.stdout.splitlines()
    assert len(lines) == 1, f"replay's stdout should be one summary line:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    summary = json.loads(lines[0])
    assert f"replayed {summary['records']} records ({summary['scored']} scored" in run.stderr, run.stderr[-3000:]
    return summary


def heatmap_path(uri: str) -> Path:
    """The file a file:// heatmap_uri names (its path is percent-encoded)."""
    parts = urllib.parse.urlsplit(uri)
    assert parts.scheme == "file" and parts.netloc == "" and not parts.query and not parts.fragment, uri
    return Path(urllib.parse.unquote(parts.path))


def s3_nowhere() -> dict[str, str]:
    """S3 settings that fail at once (a closed local port), so the s3:// image_uri case never waits on a
    real endpoint or on credential discovery."""
    return {"DCAM__S3__ENDPOINT": f"http://127.0.0.1:{free_port()}", "DCAM__S3__ALLOW_HTTP": "true",
            "DCAM__S3__ACCESS_KEY_ID": "test", "DCAM__S3__SECRET_ACCESS_KEY": "test"}


def cli_env(tmp: Path, brokers: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCAM__")}
    env.update({"DCAM__MODEL__PATH": str(MODEL), "DCAM__ENGINE__WARMUP_BATCHES": "0",
                "DCAM__TELEMETRY__LOG_FORMAT": "text", "DCAM__TELEMETRY__LOG_LEVEL": "warn"})
    if brokers:
        env.update({"DCAM__KAFKA__BROKERS": brokers, "DCAM__KAFKA__GROUP_ID": "schemas-replay",
                    "DCAM__HEATMAP__STORE": f"file://{tmp / HEATMAP_DIR}", "DCAM__HEATMAP__POLICY": "all",
                    "DCAM__DECODE__FILE_URI_ROOT": str(tmp / "claims"), **s3_nowhere()})
    return env


def check_score(msg, by_source: dict[tuple[int, int], Input], schema: str = "score") -> dict[str, Any]:
    record = json.loads(msg.value())
    found = score_errors(record, schema)
    assert not found, f"a {schema} record does not match schemas/{schema}.json: {found}\n{json.dumps(record)}"
    src = record["source"]
    inp = by_source[(src["partition"], src["offset"])]
    assert inp.outcome == "score", f"{inp.key} should have been dead-lettered, got a score"
    assert msg.key().decode() == record["image_id"]
    assert headers_of(msg)["dcam-source"] == f"{src['topic']}/{src['partition']}/{src['offset']}"
    if inp.envelope is not None:
        assert record["image_id"] == inp.envelope["image_id"] and record["class"] == inp.envelope.get("class")
        assert record["attributes"] == inp.envelope.get("attributes")
    else:
        hdr = {k: v.decode() for k, v in inp.headers}
        assert record["image_id"] == hdr.get("dcam-image-id", f"images-{src['partition']}-{src['offset']}")
        assert record["class"] == hdr.get("dcam-class") and record["attributes"] is None
    if record["heatmap_uri"]:
        assert heatmap_path(record["heatmap_uri"]).is_file(), record["heatmap_uri"]
    return record


def check_dead_letter(msg, by_source: dict[tuple[int, int], Input]) -> dict[str, str]:
    headers = headers_of(msg)
    assert_valid("dead-letter", headers, "dead-letter headers")
    names = [k for k, _ in msg.headers() or []]
    for own in ("dcam-error-kind", "dcam-error", "dcam-source"):
        assert names.count(own) == 1, f"exactly one current {own}: {msg.headers()}"
    assert not any(n.startswith("dcam-original-error") for n in names), f"no stale dcam-original-error*: {msg.headers()}"
    topic, partition, offset = headers["dcam-source"].rsplit("/", 2)
    inp = by_source[(int(partition), int(offset))]
    assert headers["dcam-error-kind"] in inp.outcome.split("|"), (inp.key, inp.outcome, headers)
    if inp.schema_valid:
        assert "base64" not in headers["dcam-error"], (inp.key, headers)
    assert msg.key().decode() == inp.key and msg.value() == inp.value, "a dead letter is the input record as it came"
    for k, v in inp.headers:
        if k not in OWN_HEADERS:
            assert headers[k] == v.decode(), (k, headers)
    return headers


@pytest.mark.e2e
def test_real_records_match_the_schemas(tmp_path):
    bin_path = operator_bin()
    claims = tmp_path / "claims"
    claims.mkdir()
    inputs = build_inputs(claims)
    for inp in inputs:
        if inp.schema_valid is not None and inp.envelope is not None:
            assert (not errors("input", inp.envelope)) == inp.schema_valid, (inp.key, errors("input", inp.envelope))
    scored = [i for i in inputs if i.outcome == "score"]
    dead = [i for i in inputs if i.outcome != "score"]

    broker = Broker(tmp_path)
    op = None
    try:
        broker.create_topics(["images"], partitions=2)
        # The operator creates the control topic itself (compacted).
        broker.create_topics(["scores", "anomalies", "images.dlq", "replayed", "replayed.dlq"])
        op = Operator(tmp_path, broker.brokers, {
            "DCAM__KAFKA__GROUP_ID": "schemas-operator",
            "DCAM__DELIVERY__MODE": "exactly_once", "DCAM__DELIVERY__INSTANCE_ID": "schemas-0",
            "DCAM__TOPICS__ANOMALIES": "anomalies",
            "DCAM__HEATMAP__STORE": f"file://{tmp_path / HEATMAP_DIR}",
            "DCAM__DECODE__FILE_URI_ROOT": str(claims),
            "DCAM__TELEMETRY__API_TOKEN": TOKEN, **s3_nowhere(),
            # The announced model is a copy in tmp_path: models load only from allowed sources.
            "DCAM__MODEL__ALLOWED_SOURCES": str(tmp_path),
        }, name="schemas")
        op.wait_ready(timeout=120)

        # Control records: a runtime threshold (bottle, at its current value), one back to the model's
        # calibration (_default), and a model announcement (a copy of the model, so it really loads).
        thresholds = api(op, "GET", "/api/thresholds")
        api(op, "PUT", "/api/thresholds/bottle", {"threshold": thresholds["bottle"]["threshold"]})
        api(op, "PUT", "/api/thresholds/_default", {"threshold": None})
        model_copy = tmp_path / "dcam-copy.onnx"
        shutil.copyfile(MODEL, model_copy)
        api(op, "POST", "/api/model", {"uri": str(model_copy)}, timeout=180)

        publish(broker.brokers, "images", inputs)
        by_source = {(i.partition, i.offset): i for i in inputs}
        got = read_topics(broker.brokers, {"scores": len(scored), "images.dlq": len(dead), "dcam.control": 3})
        scores = [check_score(m, by_source) for m in got["scores"]]
        assert sorted(r["source"]["offset"] for r in scores) == sorted(i.offset for i in scored) and len(scores) == len(scored), \
            f"{len(scores)} scores for {len(scored)} scorable inputs:\n{[json.loads(m.value()) for m in got['scores']]}"
        assert {r["image_id"] for r in scores} >= {"bottle-good-0", "bottle-defect-1", "tile-good-0", "tile-defect-1"}
        assert any(r["class"] is None for r in scores) and any(r["heatmap_uri"] for r in scores)
        # The runtime threshold judged bottle; the others were judged by the model's calibration.
        assert {r["threshold_source"] for r in scores if r["class"] == "bottle"} == {"runtime"}, scores
        assert {r["threshold_source"] for r in scores if r["class"] != "bottle"} == {"model"}, scores

        dead_letters = [check_dead_letter(m, by_source) for m in got["images.dlq"]]
        assert len(dead_letters) == len(dead), dead_letters
        assert {h["dcam-error-kind"] for h in dead_letters} >= {"schema", "decode", "fetch"}

        n_anomalies = sum(r["is_anomaly"] for r in scores)
        assert 0 < n_anomalies < len(scores), "expected both verdicts among real good and defective images"
        anomalies = read_topics(broker.brokers, {"anomalies": n_anomalies}, timeout=30)["anomalies"]
        assert len(anomalies) == n_anomalies
        for m in anomalies:
            check_score(m, by_source, "anomaly")

        control = got["dcam.control"]
        assert len(control) == 3, [m.value() for m in control]
        for m in control:
            record = json.loads(m.value())
            assert_valid("control", record, "a control record")
            key = m.key().decode()
            assert key == ("model" if record["kind"] == "model" else f"threshold/{record['model_version']}/{record['class']}")
            assert record["by"] == "operator"  # the writer telemetry.api_token names

        # The subscriber example, against the same topic: exit 0, the right table, heatmaps followed.
        sub = subprocess.run([sys.executable, str(REPO / "examples" / "subscriber.py"), "--brokers", broker.brokers,
                              "--topic", "scores", "--group", "schemas-subscriber", "--max-records", str(len(scores)),
                              "--seconds", "120", "--refresh", "1"], capture_output=True, text=True, timeout=180)
        assert sub.returncode == 0, f"subscriber exited {sub.returncode}:\n{sub.stdout}\n{sub.stderr}"
        assert "INVALID" not in sub.stdout and "note: field" not in sub.stdout, sub.stdout
        table = final_table(sub.stdout)
        for cls in {r["class"] or "(none)" for r in scores}:
            rows = [r for r in scores if (r["class"] or "(none)") == cls]
            images, anomalous, rate, last = table[cls]
            assert (images, anomalous) == (len(rows), sum(r["is_anomaly"] for r in rows)), (cls, table[cls], sub.stdout)
            assert rate == f"{100.0 * anomalous / images:.1f}%"
            assert last in {f"{r['score']:.3f}" for r in rows}, (cls, last)
        assert table["total"][:2] == (len(scores), n_anomalies), sub.stdout
        followed = dict(re.findall(r"^heatmap \S+ (\S+): (\d+) bytes$", sub.stdout, re.M))
        uris = {r["heatmap_uri"] for r in scores if r["heatmap_uri"]}
        assert set(followed) == uris, sub.stdout
        for uri, size in followed.items():
            assert int(size) == heatmap_path(uri).stat().st_size

        op.stop()
        op = None

        # replay of the same topic: its scores, dead letters and summary.
        rep = subprocess.run([str(bin_path), "replay", "--input-topic", "images", "--from", "2000-01-01T00:00:00Z",
                              "--output-topic", "replayed"], capture_output=True, text=True, timeout=300,
                             env=cli_env(tmp_path, broker.brokers), cwd=REPO)
        assert rep.returncode == 0, f"replay exited {rep.returncode}:\n{rep.stdout[-3000:]}\n{rep.stderr[-3000:]}"
        summary = parse_summary(rep)
        assert_valid("replay-summary", summary, "the replay summary")
        assert (summary["records"], summary["scored"], summary["dead_letters"]) == (len(inputs), len(scored), len(dead)), summary
        assert sum(e - s for s, e in summary["ranges"].values()) == len(inputs), summary
        replayed = read_topics(broker.brokers, {"replayed": len(scored), "replayed.dlq": len(dead)}, timeout=60)
        rescored = [check_score(m, by_source) for m in replayed["replayed"]]
        assert len(rescored) == len(scored) and sum(r["is_anomaly"] for r in rescored) == summary["anomalies"]
        assert all("/replay/" in r["heatmap_uri"] for r in rescored), "policy all: every replayed score has a heatmap under replay/"
        assert len([check_dead_letter(m, by_source) for m in replayed["replayed.dlq"]]) == len(dead)
    finally:
        if op is not None:
            op.stop()
        broker.stop()


@pytest.mark.e2e
def test_replay_dir_lines_and_summary(tmp_path):
    """`replay --dir`: its JSON lines match file-score.json (scored and refused) and its summary replay-summary.json."""
    bin_path = operator_bin()
    imgs = pick_images()
    junk = tmp_path / "notes.png"
    junk.write_bytes(b"not an image at all")
    files = [imgs["bottle"]["defect"][0], imgs["magnetic_tile"]["good"][0], junk]
    out = tmp_path / "lines.jsonl"
    r = subprocess.run([str(bin_path), "replay", "--dir", *map(str, files), "--output", str(out), "--heatmaps", str(tmp_path / "hm")],
                       capture_output=True, text=True, timeout=300, env={**cli_env(tmp_path), "DCAM__HEATMAP__POLICY": "all"}, cwd=REPO)
    assert r.returncode == 0, f"replay --dir exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["path"] for line in lines] == [str(f) for f in files]
    for line in lines:
        assert_valid("file-score", line, "a replay --dir line")
    assert lines[0]["class"] == "bottle" and lines[0]["label"] == imgs["bottle"]["defect"][0].parent.name
    assert lines[0]["heatmap"] and Path(lines[0]["heatmap"]).is_file()
    assert lines[2]["error_kind"] and lines[2]["score"] is None
    summary = parse_summary(r)
    assert_valid("replay-summary", summary, "the replay --dir summary")
    assert (summary["records"], summary["scored"], summary["dead_letters"]) == (3, 2, 1), summary
    assert summary["anomalies"] == sum(bool(line["is_anomaly"]) for line in lines) and summary["ranges"] == {}
