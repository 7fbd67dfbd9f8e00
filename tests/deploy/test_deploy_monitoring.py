"""The chart's Grafana dashboard and PrometheusRule, against the real operator and a real Prometheus.

- Every PromQL expression of the dashboard and the rules parses (promtool) and names only metrics a
  running `dcam-stream run` really exports (a scrape of /metrics after real images, dead letters, a
  rejected model and exactly-once transactions), plus Prometheus' own `up`.
- The alerts behave as docs/MONITORING.md says: `promtool test rules` on monitoring/rules_test.yaml.
- End to end: a real `prometheus` scrapes an operator whose heatmap store hangs (lag, nothing
  finishes) and DcamConsumerStalled goes to firing.

The live tests skip with the reason when the operator binary ($DCAM_BIN), the noida-db broker or
prometheus/promtool (Debian package `prometheus`) are missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploylib import CHART, RELEASE, NAMESPACE, by_kind, manifests, one
from livelib import BlackHole, Broker, Operator, Prometheus, images, parse_exposition, program

HERE = Path(__file__).resolve().parent
RULES_TEST = HERE / "monitoring" / "rules_test.yaml"
MONITORING = {"grafana": {"dashboard": {"enabled": True}}, "prometheusRule": {"enabled": True}}
FULLNAME = f"{RELEASE}-dcam-stream"
ALERTS = {"DcamConsumerStalled", "DcamConsumerLagGrowing", "DcamDeadLetterRateHigh", "DcamDown", "DcamAbsent",
          "DcamNotReady", "DcamTransactionsAborting", "DcamAnomalyRateOffBaseline", "DcamModelReloadRejected"}
# Metrics that are not the operator's: Prometheus' own scrape health.
NOT_OURS = {"up"}


# ---- rendering -------------------------------------------------------------------------------------


def dashboard(values: dict[str, Any] | None = None) -> dict[str, Any]:
    docs = manifests(values or MONITORING)
    cms = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert len(cms) == 1
    return json.loads(cms[0]["data"]["dcam-stream.json"])


def rule_groups(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return one(manifests(values or MONITORING), "PrometheusRule")["spec"]["groups"]


def dashboard_exprs(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable (label_values' metric part)."""
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r}", target["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*", query)
        assert m, f"variable {var['name']}: only label_values(<series>, <label>) queries are expected, got {query!r}"
        out.append((f"variable {var['name']!r}", m.group(1)))
    return out


def rule_exprs(groups: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r.get("alert") or r.get("record"), r["expr"]) for g in groups for r in g["rules"]]


# ---- metric names in PromQL ---------------------------------------------------------------------------

GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
            "inf", "nan", "atan2"}


def grafana_to_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, so Prometheus can parse it."""
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", "x", expr)


def metric_names(expr: str) -> set[str]:
    """Metric names a (parseable) PromQL expression selects.

    Strings, label matchers, ranges, offsets, grouping labels and numbers go first; what is left are
    function and aggregation names (followed by '('), keywords and metric names.
    """
    e = grafana_to_promql(expr)
    e = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', e)  # string literals
    e = re.sub(r"\{[^{}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges and subqueries
    e = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"(?<![A-Za-z_:0-9])[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?", " ", e)  # numbers
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        if re.match(r"\s*\(", e[m.end():]) or m.group(0).lower() in KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def test_metric_names_parser():
    assert metric_names('sum by (le) (rate(dcam_end_to_end_seconds_bucket{job=~"$job", le!="+Inf"}[$__rate_interval]))') \
        == {"dcam_end_to_end_seconds_bucket"}
    assert metric_names('histogram_quantile(0.99, sum by (le) (rate(a_bucket[5m]))) / on (pod) group_left (x) b offset 1h') \
        == {"a_bucket", "b"}
    assert metric_names('x unless x offset 15m or vector(0) > 1e-3 and abs(y - avg_over_time((y)[1d:5m]))') == {"x", "y"}
    assert metric_names('up{job="a", namespace="b"} == 0') == {"up"}
    assert metric_names('max(job_class:dcam_ratio:rate{job="a"}) > bool 2') == {"job_class:dcam_ratio:rate"}


def promtool_check(exprs: list[tuple[str, str]], tmp_path: Path) -> None:
    """Parses every expression with Prometheus' own parser (`promtool check rules` on recording rules)."""
    rules = {"groups": [{"name": "parse", "rules": [{"record": f"check:{i}", "expr": grafana_to_promql(e)}
                                                    for i, (_, e) in enumerate(exprs)]}]}
    path = tmp_path / "parse.yml"
    path.write_text(yaml.safe_dump(rules))
    r = subprocess.run([program("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"promtool cannot parse:\n{r.stdout}\n{r.stderr}\n" + "\n".join(f"{i}: {w}" for i, (w, _) in enumerate(exprs))


# ---- the chart objects ----------------------------------------------------------------------------------


def test_monitoring_is_off_by_default():
    docs = manifests({})
    assert not by_kind(docs, "PrometheusRule")
    assert [d["metadata"]["name"] for d in by_kind(docs, "ConfigMap")] == [FULLNAME]


def test_dashboard_configmap_for_the_grafana_sidecar():
    docs = manifests({"grafana": {"dashboard": {"enabled": True, "namespace": "monitoring",
                                                "annotations": {"grafana_folder": "Inspection"}, "labels": {"team": "vision"}}}})
    cm = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == f"{FULLNAME}-dashboard"][0]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["labels"]["team"] == "vision"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Inspection"}
    assert list(cm["data"]) == ["dcam-stream.json"]
    # The operator's own ConfigMap is untouched.
    assert one([d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == FULLNAME], "ConfigMap")["data"]["config.toml"]
    custom = manifests({"grafana": {"dashboard": {"enabled": True, "sidecarLabel": "dashboards", "sidecarLabelValue": "dcam"}}})
    labels = [d for d in by_kind(custom, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")][0]["metadata"]["labels"]
    assert labels["dashboards"] == "dcam" and "grafana_dashboard" not in labels


def test_dashboard_shape():
    dash = dashboard()
    assert dash["uid"] == "dcam-stream" and dash["title"]
    titles = {p["title"] for p in dash["panels"]}
    for wanted in ("Throughput by outcome", "Latency p50 / p99", "Consumer lag per partition", "Dead letters by kind",
                   "Anomaly rate per class", "Paused partitions and seconds without progress", "Transactions",
                   "Model per instance", "Model reloads", "Ready per instance", "Threshold in force per class"):
        assert wanted in titles
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in dash["panels"]}
    assert any("dcam_ready{" in e for e in exprs["Ready per instance"])
    assert any("dcam_threshold{" in e and "class" in e and "source" in e for e in exprs["Threshold in force per class"])
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "namespace", "job"} <= variables
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and p["description"], p["title"]
        for t in p["targets"]:
            # Every query is scoped to the picked release(s).
            assert 'namespace=~"$namespace"' in t["expr"] and 'job=~"$job"' in t["expr"], (p["title"], t["expr"])


def test_prometheus_rule_shape():
    docs = manifests({"prometheusRule": {"enabled": True, "labels": {"release": "kps"}, "alertLabels": {"team": "vision"}}})
    rule = one(docs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kps"
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert set(alerts) == ALERTS
    for name, r in alerts.items():
        assert r["labels"]["team"] == "vision" and r["labels"]["severity"] in ("warning", "critical"), name
        assert r["annotations"]["summary"] and r["annotations"]["description"], name
        # Scoped to this release's series, like the ServiceMonitor's job label.
        assert f'job="{FULLNAME}", namespace="{NAMESPACE}"' in r["expr"], name
    custom = one(manifests({"prometheusRule": {"enabled": True, "selector": 'service="dcam"',
                                                "disabled": ["DcamAbsent", "DcamNotReady", "DcamAnomalyRateOffBaseline"]}}),
                 "PrometheusRule")
    kept = {r["alert"]: r for g in custom["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert set(kept) == ALERTS - {"DcamAbsent", "DcamNotReady", "DcamAnomalyRateOffBaseline"}
    assert all('service="dcam"' in r["expr"] and "job=" not in r["expr"] for r in kept.values())
    # Each alert's `for` and severity come from values, e.g. DcamNotReady's.
    tuned = one(manifests({"prometheusRule": {"enabled": True, "notReady": {"for": "3m", "severity": "critical"}}}),
                "PrometheusRule")
    not_ready = next(r for g in tuned["spec"]["groups"] for r in g["rules"] if r.get("alert") == "DcamNotReady")
    assert not_ready["for"] == "3m" and not_ready["labels"]["severity"] == "critical"
    assert not_ready["expr"].startswith("max by (namespace, job, pod) (dcam_ready{") and not_ready["expr"].endswith(" == 0")


def test_monitoring_values_rejected_by_schema():
    from deploylib import chart, helm

    for values, expected in (
        ({"prometheusRule": {"disabled": ["DcamNoSuchAlert"]}}, "/prometheusRule/disabled/0"),
        ({"prometheusRule": {"consumerStalled": {"for": "five minutes"}}}, "/prometheusRule/consumerStalled/for"),
        ({"prometheusRule": {"deadLetters": {"ratio": 5}}}, "/prometheusRule/deadLetters/ratio"),
        ({"prometheusRule": {"notReady": {"for": "ten minutes"}}}, "/prometheusRule/notReady/for"),
        ({"prometheusRule": {"notReady": {"threshold": 1}}}, "threshold"),
        ({"grafana": {"dashboard": {"bogus": 1}}}, "bogus"),
    ):
        with pytest.raises(helm().HelmValuesError) as err:
            chart().validate_schema(values)
        assert expected in str(err.value)


def test_dashboard_promql_parses(tmp_path):
    promtool_check(dashboard_exprs(dashboard()), tmp_path)


def test_rules_pass_promtool_check(tmp_path):
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule_groups()}))
    r = subprocess.run([program("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in r.stdout, r.stdout


def test_rules_unit_tests_with_promtool(tmp_path):
    """monitoring/rules_test.yaml against the rules the chart renders with its default values."""
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    shutil.copy(RULES_TEST, tmp_path / "rules_test.yaml")
    r = subprocess.run([program("promtool"), "test", "rules", "rules_test.yaml"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULES_TEST.read_text()))
    assert tested == ALERTS, f"alerts without a promtool unit test: {ALERTS - tested}"


# ---- against the real operator ----------------------------------------------------------------------------


@pytest.mark.e2e
def test_every_queried_metric_is_exported(tmp_path):
    """Dashboard and alert PromQL name only metrics in a real scrape of `dcam-stream run`."""
    exprs = dashboard_exprs(dashboard()) + rule_exprs(rule_groups())
    queried: dict[str, set[str]] = {}
    for where, expr in exprs:
        for name in metric_names(expr):
            queried.setdefault(name, set()).add(where)
    assert "dcam_seconds_since_progress" in queried and "dcam_model_reloads_total" in queried

    broker = Broker(tmp_path)
    op = None
    try:
        broker.create_topics(["images"], partitions=2)
        broker.create_topics(["scores", "images.dlq", "dcam.control"])
        op = Operator(tmp_path, broker.brokers, {
            # exactly_once: the transaction counters exist; the token: the API may announce a model.
            "DCAM__DELIVERY__MODE": "exactly_once", "DCAM__DELIVERY__INSTANCE_ID": "metrics-0",
            "DCAM__TELEMETRY__API_TOKEN": "t0ken", "DCAM__HEATMAP__POLICY": "all",
            # The broken model below is refused for being broken, not for its place.
            "DCAM__MODEL__ALLOWED_SOURCES": str(tmp_path),
        })
        op.wait_ready()
        op.produce(broker.brokers, images(8))
        broker.produce_junk("images", 2)
        # A model that fails its checks: refused, counted as dcam_model_reloads_total{kind="rejected"}.
        bad = tmp_path / "broken.onnx"
        bad.write_bytes(b"not an onnx model")
        import urllib.request
        req = urllib.request.Request(f"http://127.0.0.1:{op.port}/api/model", method="POST",
                                     data=json.dumps({"uri": str(bad)}).encode(),
                                     headers={"Authorization": "Bearer t0ken", "Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=60)
            pytest.fail("a broken model was accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 422, e.read()
        want = {"dcam_consumer_lag", "dcam_dead_letters_total", "dcam_transactions_total", "dcam_model_reloads_total",
                'outcome="anomaly"', 'outcome="normal"', 'outcome="dead_letter"'}
        deadline = time.monotonic() + 60
        while True:
            text = op.metrics()
            missing = {w for w in want if w not in text}
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert not missing, f"the scrape lacks {missing} after 60 s:\n{text}"
        # The scrape-time gauges: ready, and one threshold per class as GET /api/thresholds has it.
        assert "dcam_ready 1" in text.splitlines(), text
        table = json.loads(op.get("/api/thresholds")[1])
        in_force = thresholds_in(text)
        assert set(in_force) == set(table) and "_default" in in_force, (in_force, table)
        for cls, (source, value) in in_force.items():
            assert source == table[cls]["source"] and abs(value - table[cls]["threshold"]) < 1e-6, (cls, in_force, table)
        # A runtime change (through the control topic) shows at the next scrapes, with its source.
        cls = next(c for c in sorted(in_force) if c != "_default")
        req = urllib.request.Request(f"http://127.0.0.1:{op.port}/api/thresholds/{cls}", method="PUT",
                                     data=json.dumps({"threshold": 1.25}).encode(),
                                     headers={"Authorization": "Bearer t0ken", "Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=30).read()
        deadline = time.monotonic() + 30
        while thresholds_in(op.metrics()).get(cls) != ("runtime", 1.25) and time.monotonic() < deadline:
            time.sleep(0.5)
        after = thresholds_in(op.metrics())
        assert after.get(cls) == ("runtime", 1.25), after
        assert {c: v for c, v in after.items() if c != cls} == {c: v for c, v in in_force.items() if c != cls}
    finally:
        if op is not None:
            op.stop()
        broker.stop()
    samples, declared = parse_exposition(text)
    exported = samples | declared
    unknown = {name: sorted(where) for name, where in queried.items() if name not in exported | NOT_OURS}
    assert not unknown, f"PromQL names metrics the operator does not export: {unknown}\nexported: {sorted(exported)}"
    # Every name is in a sample, not only in a # TYPE line: the series really exist.
    assert set(queried) - NOT_OURS <= samples, sorted(set(queried) - NOT_OURS - samples)


def thresholds_in(text: str) -> dict[str, tuple[str, float]]:
    """class -> (source, threshold) from the dcam_threshold lines of a scrape; fails on a class seen twice."""
    out: dict[str, tuple[str, float]] = {}
    for line in text.splitlines():
        m = re.fullmatch(r"dcam_threshold\{(.*)\} (\S+)", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            assert labels["class"] not in out, f"two dcam_threshold series for class {labels['class']!r}:\n{text}"
            out[labels["class"]] = (labels["source"], float(m.group(2)))
    return out


def test_thresholds_in_parser():
    text = ('# TYPE dcam_threshold gauge\ndcam_threshold{class="bottle",source="runtime"} 1.25\n'
            'dcam_threshold{source="model",class="_default"} 2.3599998950958252\ndcam_ready 1\n# EOF\n')
    assert thresholds_in(text) == {"bottle": ("runtime", 1.25), "_default": ("model", 2.3599998950958252)}
    with pytest.raises(AssertionError, match="two dcam_threshold series"):
        thresholds_in(text + 'dcam_threshold{class="bottle",source="config"} 2\n')


@pytest.mark.e2e
def test_stall_alert_fires_in_prometheus(tmp_path):
    """A real Prometheus scrapes an operator whose heatmap store hangs: lag, nothing finishes, and
    DcamConsumerStalled (rendered with a 3 s threshold and `for: 2s`) goes pending, then firing;
    DcamNotReady (rendered with `for: 2s`) fires too, from dcam_ready."""
    program("prometheus")
    values = {"prometheusRule": {"enabled": True, "consumerStalled": {"seconds": 3, "for": "2s"},
                                 "notReady": {"for": "2s"}}}
    groups = rule_groups(values)
    hole = BlackHole()
    broker = Broker(tmp_path)
    op = prom = None
    try:
        broker.create_topics(["images"])
        broker.create_topics(["scores", "images.dlq", "dcam.control"])
        op = Operator(tmp_path, broker.brokers, {
            # Every image gets a heatmap, written to an S3 endpoint that accepts and never answers,
            # with timeouts far beyond the test: inputs are scored but never finish.
            "DCAM__HEATMAP__POLICY": "all", "DCAM__HEATMAP__STORE": "s3://stalled/heatmaps",
            "DCAM__S3__ENDPOINT": f"http://127.0.0.1:{hole.port}", "DCAM__S3__ALLOW_HTTP": "true",
            "DCAM__S3__ACCESS_KEY_ID": "test", "DCAM__S3__SECRET_ACCESS_KEY": "test",
            "DCAM__HEATMAP__WRITE_TIMEOUT_MS": "600000", "DCAM__S3__REQUEST_TIMEOUT_MS": "600000",
            "DCAM__PIPELINE__MAX_IN_FLIGHT": "8",
            # The stall clock is what the alert reads; keep the process alive while it runs.
            "DCAM__PIPELINE__STUCK_AFTER_MS": "1000", "DCAM__PIPELINE__RESTART_STALLED_AFTER_MS": "0",
            "DCAM__PIPELINE__SHUTDOWN_TIMEOUT_MS": "2000",
        })
        op.wait_ready()
        # The job and namespace labels the chart's default selector expects (what the ServiceMonitor gives).
        prom = Prometheus(tmp_path, f"127.0.0.1:{op.port}", {"groups": groups},
                          labels={"namespace": NAMESPACE, "pod": f"{FULLNAME}-0"}, job=FULLNAME)
        # Healthy and idle first: nothing fires.
        deadline = time.monotonic() + 30
        while not prom.api("query?query=up")["result"] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert prom.api("query?query=up")["result"][0]["value"][1] == "1"
        assert not [a for a in prom.api("alerts")["alerts"] if a["labels"]["alertname"] in ("DcamConsumerStalled", "DcamNotReady")]

        op.produce(broker.brokers, images(12))
        states: list[str] = []
        deadline = time.monotonic() + 90
        firing = None
        while time.monotonic() < deadline:
            alerts = [a for a in prom.api("alerts")["alerts"] if a["labels"]["alertname"] == "DcamConsumerStalled"]
            states += [a["state"] for a in alerts if not states or states[-1] != a["state"]]
            firing = next((a for a in alerts if a["state"] == "firing"), None)
            if firing:
                break
            time.sleep(0.5)
        metrics = op.metrics()
        assert firing, (f"DcamConsumerStalled did not fire in 90 s (states seen: {states});\n"
                        f"operator metrics:\n{metrics}\nprometheus alerts: {prom.api('alerts')}")
        assert "pending" in states, f"the alert skipped pending (`for: 2s`): {states}"
        assert firing["labels"] == {"alertname": "DcamConsumerStalled", "severity": "critical", "job": FULLNAME,
                                    "namespace": NAMESPACE, "pod": f"{FULLNAME}-0"}
        assert float(firing["value"]) >= 3
        # What the alert stands on, read back from the operator itself.
        assert op.get("/readyz")[0] == 503
        lag = [l for l in metrics.splitlines() if l.startswith("dcam_consumer_lag{")]
        assert lag and all(float(l.rsplit(" ", 1)[1]) > 0 for l in lag), lag
        assert "dcam_images_total" not in metrics, "an input finished: the stall was not real"
        # /readyz fails, so dcam_ready is 0 and DcamNotReady fires (its `for: 2s` from values).
        assert "dcam_ready 0" in metrics.splitlines(), metrics
        deadline = time.monotonic() + 30
        not_ready = []
        while not not_ready and time.monotonic() < deadline:
            not_ready = [a for a in prom.api("alerts")["alerts"]
                         if a["labels"]["alertname"] == "DcamNotReady" and a["state"] == "firing"]
            time.sleep(0.5)
        assert not_ready, f"DcamNotReady did not fire: {prom.api('alerts')}"
        assert not_ready[0]["labels"] == {"alertname": "DcamNotReady", "severity": "warning", "job": FULLNAME,
                                          "namespace": NAMESPACE, "pod": f"{FULLNAME}-0"}
        # The operator is alive and scraped: the down/absent alerts stay quiet.
        others = {a["labels"]["alertname"] for a in prom.api("alerts")["alerts"]}
        assert not others & {"DcamDown", "DcamAbsent"}, others
    finally:
        if prom is not None:
            prom.stop()
        if op is not None:
            op.stop()
        broker.stop()
        hole.close()
