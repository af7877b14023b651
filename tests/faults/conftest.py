"""Fixtures of the fault suite: a private ``redis-server`` and recorders for relaymw's signals.

Everything runs as real processes and servers on 127.0.0.1; see ``harness.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from relaymw import signals
from tests.support import Recorder, RedisServer

RECORDED = (
    "config_loaded",
    "config_rejected",
    "request_finished",
    "store_unavailable",
    "upstream_error",
    "version_ejected",
)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A started ``redis-server`` of this test's own that keeps its data over a restart
    (killed at the end)."""
    with RedisServer(tmp_path, persistent=True) as server:
        yield server


@pytest.fixture
def events() -> Iterator[dict[str, Recorder]]:
    """Every event of the signals in :data:`RECORDED`, whoever sent it, during the test."""
    recorders = {name: Recorder() for name in RECORDED}
    for name, rec in recorders.items():
        getattr(signals, name).connect(rec)
    yield recorders
    for name, rec in recorders.items():
        getattr(signals, name).disconnect(rec)
