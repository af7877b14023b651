"""Automatic rollback end to end: a failing canary is ejected and the store records it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from relaymw import Relay, RelayMiddleware, signals
from relaymw.config import load_document
from relaymw.stores import FileStore
from relaymw.stores.file import dump_document
from relaymw.testing import FakeLLM, serve_asgi
from tests.support import Recorder, relay_document


async def _app(scope: object, receive: object, send: object) -> None:  # never reached
    raise AssertionError("not an LLM request")


@pytest.fixture
def ejections() -> Iterator[Recorder]:
    rec = Recorder()
    signals.version_ejected.connect(rec)
    yield rec
    signals.version_ejected.disconnect(rec)


@pytest.fixture
def weight_changes() -> Iterator[Recorder]:
    rec = Recorder()
    signals.weights_changed.connect(rec)
    yield rec
    signals.weights_changed.disconnect(rec)


def test_a_failing_canary_is_ejected_and_written_back(
    fake_llm: FakeLLM, tmp_path: Path, ejections: Recorder, weight_changes: Recorder
) -> None:
    doc = relay_document(fake_llm.base_url)
    doc["routes"][0]["route_rules"] = [
        {"version_tag": "gpt-v1", "weight": 80},
        {"version_tag": "gpt-v2", "weight": 20},
    ]
    doc["routes"][0]["sticky_sessions"] = {"enabled": False}
    doc["routes"][0]["health_check"] = {
        "enabled": True,
        "error_rate_threshold": 0.1,
        "min_requests": 20,
        "window_seconds": 120,
    }
    path = tmp_path / "relay.toml"
    path.write_bytes(dump_document(doc, "toml"))
    # The canary (gpt-v2 → gpt-4.1-mini) fails one request in five.
    fake_llm.set("gpt-4.1-mini", error_rate=0.2, status=503)
    relay = Relay.from_store(FileStore(path, poll_interval=0.05))
    body = {"model": "chat-production", "messages": [{"role": "user", "content": "x"}]}
    try:
        with serve_asgi(RelayMiddleware(_app, relay=relay)) as url, httpx.Client() as client:
            ejected_at = None
            for _ in range(2000):
                client.post(f"{url}/v1/chat/completions", json=body)
                if ejections.events:
                    ejected_at = time.monotonic()
                    break
            assert ejected_at is not None, "the canary was never ejected"
            event = ejections.events[0]
            assert event["route"] == "chat-production" and event["version"] == "gpt-v2"
            assert event["reason"] == "error_rate"
            assert event["evidence"]["request_count"] >= 20
            assert event["evidence"]["error_rate"] > 0.1
            assert event["new_weights"] == {"gpt-v1": 100.0, "gpt-v2": 0.0}

            # The change says who made it and why, and the store shows the rollback.
            change = weight_changes.wait_for(1)[0]
            assert change["actor"] == "health-check: error_rate"
            stored = load_document(path)
            rules = {r["version_tag"]: r["weight"] for r in stored["routes"][0]["route_rules"]}
            assert rules == {"gpt-v1": 100.0, "gpt-v2": 0.0}
            assert change["after"] == {"gpt-v1": 100.0, "gpt-v2": 0.0}

            # Nothing sent after the ejection reaches the canary.
            seen_before = sum(1 for r in fake_llm.requests if r.received_at >= ejected_at)
            versions = {
                client.post(f"{url}/v1/chat/completions", json=body).headers["x-relaymw-version"]
                for _ in range(100)
            }
            assert versions == {"gpt-v1"}
            late = [
                r
                for r in fake_llm.requests
                if r.received_at >= ejected_at and r.body and r.body["model"] == "gpt-4.1-mini"
            ]
            assert seen_before <= 1 and not late
        # A restarted relay reads the rollback from the store.
        again = Relay.from_store(str(path), watch=False)
        assert again.snapshot.routes["chat-production"].table.eligible == {"gpt-v1"}
        metrics = relay.metrics("gpt-v2", route="chat-production")
        assert metrics.request_count >= 20 and metrics.error_rate > 0.1
    finally:
        relay.close()
