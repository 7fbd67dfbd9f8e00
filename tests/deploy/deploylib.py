"""Shared helpers for the deployment checks (Helm chart, Dockerfiles).

Run from the repository root:  .venv/bin/python -m pytest tests/deploy
Everything renders offline through the Helm SDK (PyPI helm-python-sdk); nothing writes outside tmp dirs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "dcam-stream"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
DEFAULT_TOML = REPO / "config" / "default.toml"
RELEASE = "rel"
NAMESPACE = "dcam"

# Tables of config/default.toml whose keys are free-form (librdkafka properties, class names).
FREE_FORM_TABLES = {"kafka.extra", "model.thresholds"}


def helm():
    """The Helm SDK module (helm-python-sdk installs it as `helm_python`)."""
    try:
        import helm_python
    except ImportError as exc:  # pragma: no cover - environment problem, say so loudly
        pytest.fail(f"helm-python-sdk is not installed in {sys.executable}: {exc}")
    return helm_python


def values_sets() -> list[tuple[str, dict[str, Any]]]:
    """(id, values) for the chart defaults and each ci/*-values.yaml."""
    sets: list[tuple[str, dict[str, Any]]] = [("default", {})]
    for path in CI_VALUES:
        sets.append((path.stem, yaml.safe_load(path.read_text()) or {}))
    return sets


VALUES_IDS = [name for name, _ in values_sets()]


@lru_cache(maxsize=None)
def _chart():
    return helm().Chart.load(str(CHART))


def chart():
    return _chart()


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Render the chart (template path -> text) like `helm template rel -n dcam`."""
    return chart().render(values=values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)


def manifests(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders (NOTES.txt excluded)."""
    docs: list[dict[str, Any]] = []
    for path, text in sorted(render(values).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("__template__", path)
                docs.append(doc)
    return docs


def strip_private(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if not k.startswith("__")}


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected exactly one {kind}, got {len(found)}"
    return found[0]


def workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    found = [d for d in docs if d.get("kind") in ("Deployment", "StatefulSet")]
    assert len(found) == 1, f"expected one Deployment or StatefulSet, got {[d['kind'] for d in found]}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = workload(docs)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def config_map(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The operator's ConfigMap (the one with config.toml; the Grafana dashboard has its own)."""
    return one([d for d in by_kind(docs, "ConfigMap") if "config.toml" in d.get("data", {})], "ConfigMap")


def config_toml(docs: list[dict[str, Any]]) -> str:
    return config_map(docs)["data"]["config.toml"]


# ---- the operator's config contract -----------------------------------------------------------


@lru_cache(maxsize=None)
def default_config() -> dict[str, Any]:
    return tomllib.loads(DEFAULT_TOML.read_text())


def flat_keys(table: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted keys of a parsed TOML document; free-form tables count as one key."""
    keys: set[str] = set()
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in FREE_FORM_TABLES:
            keys |= flat_keys(value, dotted + ".")
        else:
            keys.add(dotted)
    return keys


def default_keys() -> set[str]:
    return flat_keys(default_config())


def default_http_port() -> int:
    addr = default_config()["telemetry"]["http_addr"]
    return int(addr.rsplit(":", 1)[1])


def dcam_bin() -> Path:
    """The operator binary: $DCAM_BIN, else target/debug/dcam-stream; a missing binary FAILS the test."""
    env = os.environ.get("DCAM_BIN")
    candidate = Path(env) if env else REPO / "target" / "debug" / "dcam-stream"
    if not candidate.is_file() or not os.access(candidate, os.X_OK):
        how = f"DCAM_BIN={env}" if env else "DCAM_BIN is unset and target/debug/dcam-stream"
        pytest.fail(
            f"{how} is not an executable file. Build the operator first "
            "(cargo build, then DCAM_BIN=target/debug/dcam-stream) so the rendered config can be "
            "checked with `dcam-stream config check`.",
            pytrace=False,
        )
    return candidate


def config_check(toml_text: str, tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `dcam-stream config check FILE` on toml_text with only the given DCAM__* env vars."""
    path = tmp_path / "config.toml"
    path.write_text(toml_text)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DCAM__")}
    clean.update(env or {})
    return subprocess.run(
        [str(dcam_bin()), "config", "check", str(path)],
        capture_output=True, text=True, env=clean, cwd=tmp_path, timeout=60,
    )


def tool(name: str) -> str:
    """An executable from the test venv (next to the interpreter) or PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found next to {sys.executable} or on PATH (pip install it into .venv)")
    return found
