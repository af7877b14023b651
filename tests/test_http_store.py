"""HttpStore against a real HTTP server on 127.0.0.1: ETags, failures, auth, a relay on top.

The document server is a small Starlette app under uvicorn with switchable behaviour; the
relay serves real requests through ``RelayMiddleware`` to the FakeLLM. Nothing is mocked.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w

from relaymw import Relay, RelayMiddleware, signals
from relaymw.errors import StoreError, StoreReadOnlyError
from relaymw.stores import RawDocument, open_store
from relaymw.stores.http import AUTH_ENV, HttpStore, safe_url
from relaymw.testing import FakeLLM
from tests.support import (
    DocumentServer,
    forked_worker,
    free_port,
    not_found,
    recording,
    relay_document,
    serve_asgi,
    wait_until,
)

POLL = 0.05
TIMEOUT = 0.3
TOKEN = "sekrit-token-0123456789"


def doc(fake_url: str, v1: float, v2: float) -> dict[str, Any]:
    rules = [{"version_tag": "gpt-v1", "weight": v1}, {"version_tag": "gpt-v2", "weight": v2}]
    return relay_document(fake_url, chat_production={"route_rules": rules})


@pytest.fixture
def docs(fake_llm: FakeLLM) -> Iterator[DocumentServer]:
    server = DocumentServer(delay=TIMEOUT * 4)
    server.publish(doc(fake_llm.base_url, 100, 0))
    with server:
        yield server


def ask(base: str) -> str:
    body = {"model": "chat-production", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=5)
    assert r.status_code == 200, r.text
    return r.headers["x-relaymw-version"]


# --- the store alone ------------------------------------------------------------------------


def test_load_and_read_only(docs: DocumentServer) -> None:
    store = open_store(docs.url)
    assert isinstance(store, HttpStore) and store.writable is False
    try:
        raw = store.load()
        assert (raw.format, raw.revision, raw.source) == ("json", docs.etag, store.describe())
        assert json.loads(raw.data) == json.loads(docs.body)
        with pytest.raises(StoreReadOnlyError) as info:
            store.save({"versions": []})
        assert str(info.value) == (
            f"the HTTP store {docs.url} is read-only; change the document at its source"
        )
        relay = Relay(store=store, watch=False)
        with pytest.raises(StoreReadOnlyError):
            relay.update_document(lambda d: d)
    finally:
        store.close()


def test_format_follows_content_type_then_suffix_and_revision_without_etag(
    docs: DocumentServer,
) -> None:
    document: dict[str, Any] = {"versions": [], "routes": []}
    docs.body, docs.etag, docs.content_type = tomli_w.dumps(document).encode(), None, "text/plain"
    toml_url = docs.url.replace(".json", ".toml")
    for url, content_type, fmt in [
        (toml_url, "text/plain", "toml"),
        (toml_url, "application/toml", "toml"),
        (docs.url, "application/yaml", "yaml"),
        (docs.url, "text/plain", "json"),
    ]:
        docs.content_type = content_type
        store = HttpStore(url)
        raw = store.load()
        store.close()
        assert raw.format == fmt, (url, content_type)
        assert raw.revision == "sha256:" + hashlib.sha256(docs.body).hexdigest()[:16]


def test_watch_sends_if_none_match_and_a_304_delivers_nothing(docs: DocumentServer) -> None:
    store = HttpStore(docs.url, poll_interval=POLL)
    changes: list[RawDocument] = []
    errors: list[Exception] = []
    store.load()
    store.watch(changes.append, errors.append)
    try:
        wait_until(lambda: docs.answers.count(304) >= 3)
        assert changes == [] and errors == []
        assert all(h.get("if-none-match") == docs.etag for h in docs.requests[1:])
        docs.publish({"changed": True})
        wait_until(lambda: len(changes) == 1)
        assert changes[0].revision == docs.etag and json.loads(changes[0].data) == {"changed": True}
        wait_until(lambda: docs.requests[-1].get("if-none-match") == docs.etag)
    finally:
        start = time.monotonic()
        store.close()
        assert time.monotonic() - start < 1.0


def test_auth_header_is_sent_but_never_shown(
    docs: DocumentServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = HttpStore(docs.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=TIMEOUT)
    try:
        store.load()
        assert docs.requests[-1]["authorization"] == f"Bearer {TOKEN}"
        docs.mode = "error"
        with pytest.raises(StoreError) as info:
            store.load()
        assert "HTTP 500" in str(info.value) and TOKEN not in str(info.value)
        assert TOKEN not in store.describe()
    finally:
        store.close()
    monkeypatch.setenv(AUTH_ENV, TOKEN)
    docs.mode = "ok"
    store = HttpStore(docs.url)
    store.load()
    store.close()
    assert docs.requests[-1]["authorization"] == f"Bearer {TOKEN}"
    # Credentials in the URL authenticate, but describe() and errors leave them out.
    url = f"http://user:{TOKEN}@127.0.0.1:{free_port()}/relay.json?access_token={TOKEN}&v=2"
    store = HttpStore(url, timeout=TIMEOUT)
    with pytest.raises(StoreError) as info:
        store.load()
    store.close()
    assert "cannot reach" in str(info.value)
    for text in (store.describe(), str(info.value)):
        assert TOKEN not in text and "user" not in text, text
    assert store.describe().endswith("/relay.json?access_token=***&v=2")
    assert safe_url(f"https://h/x.json?sig={'a' * 40}&page=1") == "https://h/x.json?sig=***&page=1"


# --- a relay on the store --------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["error", "slow", "binary", "refused", "invalid"])
def test_relay_keeps_serving_through_failures(
    docs: DocumentServer, fake_llm: FakeLLM, failure: str
) -> None:
    store = HttpStore(docs.url, poll_interval=POLL, timeout=TIMEOUT)
    relay = Relay(store=store)
    good = relay.snapshot.revision
    with (
        recording(signals.store_unavailable, relay) as unavailable,
        recording(signals.config_rejected, relay) as rejected,
        serve_asgi(RelayMiddleware(not_found, relay=relay)) as base,
    ):
        try:
            assert ask(base) == "gpt-v1"
            if failure == "refused":
                docs.stop()
            elif failure == "invalid":
                docs.publish(doc(fake_llm.base_url, 70, 10))  # weights sum to 80
            else:
                docs.mode = failure
            signal = rejected if failure == "invalid" else unavailable
            wait_until(lambda: len(signal.events) == 1)
            time.sleep(TIMEOUT * 3 + POLL * 4)  # several failed polls
            assert len(signal.events) == 1, signal.events  # once per outage
            event = signal.events[0]
            if failure == "invalid":
                assert unavailable.events == []
                assert any("weight" in e for e in event["errors"])
            else:
                assert rejected.events == []
                assert event["store"] == store.describe() and event["component"] == "config"
            assert relay.snapshot.revision == good
            assert [ask(base) for _ in range(3)] == ["gpt-v1"] * 3
            # Heal the source with a new valid document: picked up within a second.
            docs.mode = "ok"
            docs.publish(doc(fake_llm.base_url, 0, 100))
            if failure == "refused":
                docs.start()
            wait_until(lambda: relay.snapshot.revision == docs.etag, timeout=1.0)
            assert ask(base) == "gpt-v2"
        finally:
            relay.close()


FORKED = """
from relaymw import Relay
from relaymw.stores.http import HttpStore

relay = Relay(store=HttpStore(sys.argv[1], poll_interval=0.05))  # polling starts in the parent
"""


def test_a_forked_worker_keeps_polling(
    docs: DocumentServer, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    out = forked_worker(
        tmp_path, FORKED, docs.url, lambda: docs.publish(doc(fake_llm.base_url, 0, 100))
    )
    assert "child exit 0" in out, out
