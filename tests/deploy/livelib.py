"""Real processes for the monitoring tests: a noida-db Kafka broker, the `dcam-stream run` operator,
`prometheus`, and the tools to feed and read them.

Everything here skips (never fails) when its program is missing, with the reason; every process is
started in its own process group and that group is killed on exit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from deploylib import REPO

DATASETS = Path(os.environ.get("DCAM_DATASETS", REPO.parent / "shared" / "datasets"))
MODEL = REPO / "models" / "dcam.onnx"


# ---- what the tests need, or why they skip ----------------------------------------------------------


def operator_bin() -> Path:
    """$DCAM_BIN (scripts/test.sh exports it), else target/debug/dcam-stream; skips when missing."""
    env = os.environ.get("DCAM_BIN")
    path = Path(env) if env else REPO / "target" / "debug" / "dcam-stream"
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.skip(f"operator binary not found ({'DCAM_BIN=' + env if env else 'DCAM_BIN unset, no target/debug/dcam-stream'}): "
                    "build it (cargo build) and set DCAM_BIN")
    if not MODEL.is_file():
        pytest.skip(f"{MODEL} is missing")
    return path


def broker_bin() -> Path:
    """noida-db from the test venv ($NOIDA_DB_BIN wins); skips when missing."""
    env = os.environ.get("NOIDA_DB_BIN")
    path = Path(env) if env else REPO / ".venv" / "bin" / "noida-db"
    if not path.is_file():
        pytest.skip(f"noida-db broker not found at {path} (scripts/setup-python.sh installs it)")
    return path


def program(name: str) -> str:
    """A program on PATH (promtool, prometheus); skips when missing."""
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} not found on PATH (Debian: apt-get install prometheus; scripts/test.sh does it)")
    return found


def images(n: int) -> list[Path]:
    """n real images from the MVTec-layout datasets, spread over classes and good/defect folders."""
    found = sorted(DATASETS.glob("*/test/*/*.png"))
    if not found:
        pytest.skip(f"no images under {DATASETS}/*/test/*/ (set DCAM_DATASETS)")
    step = max(1, len(found) // n)
    return found[::step][:n]


# ---- processes ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not listen on {port} in {timeout}s:\n{tail(log)}")
        time.sleep(0.1)


def tail(log: Path | None, n: int = 4000) -> str:
    if log is None or not log.exists():
        return ""
    return log.read_text(errors="replace")[-n:]


class Process:
    """A child in its own process group; `stop` ends the whole group."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.log = log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT,
                                     env=env, cwd=cwd, start_new_session=True)

    def stop(self, grace: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # The group may hold children that outlive the leader (noida-db does): kill it whole.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._out.close()


class Broker(Process):
    """A noida-db Kafka broker on a free port; it ignores SIGTERM, so `stop` SIGKILLs its group."""

    def __init__(self, tmp: Path):
        self.port = free_port()
        self.brokers = f"127.0.0.1:{self.port}"
        super().__init__([str(broker_bin()), "start", "--only", "kafka", "--kafka-port", str(self.port),
                          "--data-dir", str(tmp / "broker-data")], tmp / "broker.log")
        wait_port(self.port, 60, "noida-db", self.proc, self.log)

    def stop(self, grace: float = 0.5) -> None:
        super().stop(grace)

    def create_topics(self, names: list[str], partitions: int = 1) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.brokers})
        futures = admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names],
                                      operation_timeout=10)
        for name, f in futures.items():
            try:
                f.result(timeout=30)
            except Exception as exc:  # an existing topic is fine
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise

    def produce_junk(self, topic: str, n: int) -> None:
        """n records that are no image (dead letters of kind `schema`/`unsupported_format`)."""
        from confluent_kafka import Producer

        p = Producer({"bootstrap.servers": self.brokers})
        for i in range(n):
            p.produce(topic, key=f"junk-{i}".encode(), value=b"this is not an image",
                      headers=[("dcam-image-id", f"junk-{i}".encode())])
        assert p.flush(30) == 0, "junk records were not acknowledged"


class Operator(Process):
    """`dcam-stream run` against `brokers`, with the committed model and /metrics on a free port."""

    def __init__(self, tmp: Path, brokers: str, env: dict[str, str] | None = None, name: str = "operator"):
        self.bin = operator_bin()
        self.port = free_port()
        full = {k: v for k, v in os.environ.items() if not k.startswith("DCAM__")}
        full.update({
            "DCAM__KAFKA__BROKERS": brokers,
            "DCAM__KAFKA__INPUT_TOPICS": "images",
            "DCAM__KAFKA__GROUP_ID": f"monitoring-{name}",
            "DCAM__KAFKA__SESSION_TIMEOUT_MS": "6000",
            "DCAM__TOPICS__SCORES": "scores",
            "DCAM__TOPICS__DEAD_LETTER": "images.dlq",
            "DCAM__TOPICS__CONTROL": "dcam.control",
            "DCAM__MODEL__PATH": str(MODEL),
            "DCAM__HEATMAP__STORE": f"file://{tmp / 'heatmaps'}",
            "DCAM__ENGINE__WARMUP_BATCHES": "0",
            "DCAM__BATCH__MAX_BATCH": "8",
            "DCAM__DELIVERY__COMMIT_INTERVAL_MS": "200",
            "DCAM__TELEMETRY__HTTP_ADDR": f"127.0.0.1:{self.port}",
            "DCAM__TELEMETRY__LOG_FORMAT": "text",
            "DCAM__TELEMETRY__LOG_LEVEL": "info,rdkafka=warn",
        })
        full.update(env or {})
        super().__init__([str(self.bin), "run"], tmp / f"{name}.log", env=full, cwd=REPO)

    def get(self, path: str, timeout: float = 5) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"operator exited with {self.proc.returncode}:\n{tail(self.log)}")
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"operator not ready in {timeout}s:\n{tail(self.log)}")
            time.sleep(0.3)

    def metrics(self) -> str:
        code, body = self.get("/metrics")
        assert code == 200, f"/metrics answered {code}"
        return body

    def produce(self, brokers: str, paths: list[Path], topic: str = "images") -> None:
        """Publishes real image files with `dcam-stream produce` (id and class from the path)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DCAM__")}
        subprocess.run([str(self.bin), "produce", *map(str, paths), "--topic", topic, "--brokers", brokers],
                       check=True, capture_output=True, timeout=120, env=env, cwd=REPO)


class BlackHole:
    """A TCP server that accepts connections and never answers: a dependency that hangs."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for c in self.held:
            c.close()


class Prometheus(Process):
    """A real `prometheus` scraping one target every second and evaluating `rules` every second."""

    def __init__(self, tmp: Path, target: str, rules: dict[str, Any], labels: dict[str, str], job: str):
        self.port = free_port()
        (tmp / "rules.yml").write_text(json.dumps(rules))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(tmp / "rules.yml")],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target], "labels": labels}]}],
        }
        (tmp / "prometheus.yml").write_text(json.dumps(config))
        super().__init__([program("prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
                          f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}"],
                         tmp / "prometheus.log")
        wait_port(self.port, 30, "prometheus", self.proc, self.log)
        # The port opens before the TSDB and rules are loaded; until then the API answers 503.
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:  # urllib's HTTPError (503) and connection errors
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus not ready within 60 s:\n{tail(self.log)}")
            time.sleep(0.2)

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/{path}", timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]


def parse_exposition(text: str) -> tuple[set[str], set[str]]:
    """(names of the samples, names a `# TYPE` line declares with the suffixes its type gets)."""
    samples, declared = set(), set()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["", "_sum", "_count"],
                "gauge": [""], "info": ["_info"], "unknown": [""], "stateset": [""], "gaugehistogram": ["_bucket", "_gsum", "_gcount"]}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            base = name.removesuffix("_total") if kind == "counter" else name
            declared |= {base + s for s in suffixes.get(kind, [""])}
        elif line and not line.startswith("#"):
            samples.add(line.split("{", 1)[0].split(" ", 1)[0])
    return samples, declared
