"""Fixtures for tests/deploy; the helpers live in deploylib.py."""

from __future__ import annotations

from typing import Any

import pytest

from deploylib import VALUES_IDS, values_sets


@pytest.fixture(params=values_sets(), ids=VALUES_IDS)
def values_set(request) -> tuple[str, dict[str, Any]]:
    """(name, values) for the chart defaults and every helm/dcam-stream/ci/*-values.yaml."""
    return request.param


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "e2e: runs the real operator binary against a noida-db broker (and prometheus); skips with the reason when one is missing",
    )
