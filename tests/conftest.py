"""Shared fixtures: a real FakeLLM upstream and a real Redis (required when CI is set)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from relaymw import signals
from relaymw.testing import FakeLLM
from tests.support import Recorder

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
    rec = Recorder()
    signals.request_finished.connect(rec)
    yield rec
    signals.request_finished.disconnect(rec)
