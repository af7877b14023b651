"""Shared fixtures: a real FakeLLM upstream, the shared Redis (required when CI is set) and a
``redis-server`` of the test's own."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from relaymw import signals
from relaymw.testing import FakeLLM
from tests.support import REDIS_PASSWORD, Recorder, RedisServer, recording

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A reachable Redis: skipped on a laptop without one, a failure when CI is set."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except Exception as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs Redis at {REDIS_URL}: {exc}")
        pytest.skip(f"no Redis at {REDIS_URL}")
    return REDIS_URL


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A started ``redis-server`` of this test's own with :data:`REDIS_PASSWORD`, without
    persistence (killed at the end)."""
    with RedisServer(tmp_path, password=REDIS_PASSWORD) as server:
        yield server


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test uses."""
    return f"relaymw-test:{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def fake_llm_session() -> Iterator[FakeLLM]:
    with FakeLLM(seed=1234) as fake:
        yield fake


@pytest.fixture
def fake_llm(fake_llm_session: FakeLLM) -> FakeLLM:
    """The session's FakeLLM, reset to default behaviour for each test."""
    fake_llm_session.reset()
    return fake_llm_session


@pytest.fixture
def finished() -> Iterator[Recorder]:
    """Every ``request_finished`` event sent during the test."""
    with recording(signals.request_finished) as rec:
        yield rec
