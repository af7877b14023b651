"""Invalid configurations pushed through each store (file, Redis, HTTP) while four clients keep
sending requests through a uvicorn gateway.

What must hold: not one request fails; each invalid document is rejected with
``config_rejected`` (naming the store and the problem) and the last-known-good keeps serving;
a valid document pushed afterwards is served, so the store is still followed."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import redis

import relaymw.stores.redis  # registers redis://
from relaymw import Relay, RelayMiddleware
from relaymw.stores import FileStore, Store
from relaymw.stores.file import dump_document
from relaymw.stores.http import HttpStore
from relaymw.stores.redis import RedisStore
from relaymw.testing import FakeLLM, serve_asgi
from tests.faults.harness import (
    DocumentServer,
    Load,
    gateway_document,
    not_found,
    wait_until,
    with_chat_weights,
)
from tests.support import Recorder

assert relaymw.stores.redis


class Source(Protocol):
    """Where a relay's configuration comes from, and how an operator changes it there."""

    store: Store

    def push(self, document: dict[str, Any]) -> None: ...

    def push_text(self, text: bytes) -> None: ...


class FileSource:
    def __init__(self, path: Path, document: dict[str, Any]) -> None:
        self.path = path
        self.push(document)
        self.store: Store = FileStore(path, poll_interval=0.05)

    def push(self, document: dict[str, Any]) -> None:
        self.push_text(dump_document(document, "toml"))

    def push_text(self, text: bytes) -> None:
        temp = self.path.with_suffix(".tmp")  # replaced whole, as an editor or deploy tool does
        temp.write_bytes(text)
        os.replace(temp, self.path)


class RedisSource:
    def __init__(self, redis_url: str, key: str, document: dict[str, Any]) -> None:
        self.redis_url, self.key = redis_url, key
        self.writer = RedisStore(f"{redis_url}?key={key}")
        self.push(document)
        self.store: Store = RedisStore(f"{redis_url}?key={key}&poll_interval=0.2")

    def push(self, document: dict[str, Any]) -> None:
        self.writer.save(document)  # the store keeps whatever it is given: the relay validates

    def push_text(self, text: bytes) -> None:
        """As a tool writing the hash by hand would, then announcing it."""
        with redis.Redis.from_url(self.redis_url) as client:
            revision = int(client.hget(self.key, "revision") or 0) + 1
            client.hset(self.key, mapping={"document": text, "revision": str(revision)})
            client.publish(f"{self.key}:changes", str(revision))


class HttpSource:
    def __init__(self, server: DocumentServer, document: dict[str, Any]) -> None:
        self.server = server
        self.push(document)
        self.store: Store = HttpStore(server.url, poll_interval=0.05)

    def push(self, document: dict[str, Any]) -> None:
        self.push_text(json.dumps(document).encode())

    def push_text(self, text: bytes) -> None:
        self.server.body = text


@pytest.fixture(params=["file", "redis", "http"])
def source_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_source(source_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """``make(document)``: a source of ``source_kind`` holding ``document``."""
    cleanup: list[Callable[[], None]] = []

    def make(document: dict[str, Any]) -> Source:
        if source_kind == "file":
            return FileSource(tmp_path / "relay.toml", document)
        if source_kind == "redis":
            redis_url = request.getfixturevalue("redis_url")
            key = request.getfixturevalue("redis_prefix") + ":config"
            source = RedisSource(redis_url, key, document)
            cleanup.append(source.writer.close)
            return source
        server = DocumentServer().__enter__()
        cleanup.append(lambda: server.__exit__(None, None, None))
        return HttpSource(server, document)

    yield make
    for step in cleanup:
        step()


def invalid_documents(good: dict[str, Any], kind: str) -> list[tuple[str, bytes | dict[str, Any]]]:
    """(what is wrong, the document or raw text) for three kinds of mistake."""
    bad_weights = with_chat_weights(good, 70, 10)
    unknown_tag = with_chat_weights(good, 100, 0)
    unknown_tag["routes"][0]["route_rules"][1]["version_tag"] = "gpt-v9"
    broken = b"[[versions]\nversion_tag = " if kind == "file" else b'{"versions": [{"version_'
    return [("weights sum to 80", bad_weights), ("gpt-v9", unknown_tag), ("", broken)]


def test_an_invalid_config_pushed_mid_load_fails_no_request(
    make_source: Any,
    source_kind: str,
    fake_llm: FakeLLM,
    events: dict[str, Recorder],
) -> None:
    good = gateway_document(fake_llm.base_url)  # chat: all gpt-v1
    source = make_source(good)
    relay = Relay(store=source.store)
    known_good = relay.snapshot.revision
    rejected = events["config_rejected"]
    try:
        with serve_asgi(RelayMiddleware(not_found, relay=relay)) as url, Load(url) as load:
            wait_until(lambda: load.count() >= 20, 10, "warm-up traffic")
            for n, (problem, document) in enumerate(invalid_documents(good, source_kind), 1):
                if isinstance(document, bytes):
                    source.push_text(document)
                else:
                    source.push(document)
                wait_until(lambda: len(rejected.events) >= n, 5, "config_rejected")  # noqa: B023
                event = rejected.events[n - 1]
                assert event["source"] == source.store.describe()
                assert event["errors"] and all(isinstance(e, str) for e in event["errors"])
                assert problem in "\n".join(event["errors"]), event["errors"]
                assert relay.snapshot.revision == known_good
                served = load.count()
                wait_until(lambda: load.count() >= served + 10, 10, "traffic on the old config")  # noqa: B023
            fixed_at = time.monotonic()
            source.push(with_chat_weights(good, 0, 100))
            wait_until(lambda: relay.snapshot.revision != known_good, 5, "the valid change")
            loaded_at, changed = time.monotonic(), load.count()
            wait_until(lambda: load.count() >= changed + 20, 10, "traffic on the new config")
        outcomes = load.stop()
    finally:
        relay.close()
    failed = [(o.status, o.body) for o in outcomes if o.status != 200]
    assert failed == [] and len(outcomes) >= 80
    chat = [o for o in outcomes if o.protocol == "openai"]
    assert {o.version for o in chat if o.done < fixed_at} == {"gpt-v1"}  # last-known-good
    assert {o.version for o in chat if o.sent > loaded_at} == {"gpt-v2"}  # the store followed
    assert len(rejected.events) == 3
    assert events["store_unavailable"].events == []
