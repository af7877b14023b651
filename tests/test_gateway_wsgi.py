"""The WSGI adapter: a Flask app under waitress, driven by the official SDKs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from flask import Flask, request

from relaymw import Relay, RelayWSGIMiddleware, current_version
from relaymw.testing import FakeLLM
from tests.support import UPSTREAM_KEY, Recorder, relay_document, serve_wsgi


def make_app(relay: Relay) -> Flask:
    app = Flask(__name__)

    @app.post("/echo")
    def echo() -> dict[str, Any]:
        return {"body": request.get_data(as_text=True)}

    @app.post("/api/review")
    def review() -> dict[str, Any]:
        choice = current_version()
        assert choice is request.environ["relaymw.version"]
        client = anthropic.Anthropic(
            api_key="unused",
            base_url="http://llm.invalid",
            http_client=relay.client(flavor="httpx2"),
        )
        msg = client.messages.create(
            model="review-production",
            max_tokens=50,
            messages=[{"role": "user", "content": request.get_json()["code"]}],
        )
        return {"version": str(choice), "text": msg.content[0].text}  # type: ignore[union-attr]

    app.wsgi_app = RelayWSGIMiddleware(app.wsgi_app, relay=relay)  # type: ignore[method-assign]
    return app


@pytest.fixture
def server(fake_llm: FakeLLM) -> Iterator[str]:
    relay = Relay(relay_document(fake_llm.base_url))
    with serve_wsgi(make_app(relay)) as url:
        yield url
    relay.close()


def test_openai_sdk_through_flask(server: str, fake_llm: FakeLLM) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="client-key", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="chat-production", messages=[{"role": "user", "content": "hello"}]
    )
    assert raw.headers["x-relaymw-version"] in ("gpt-v1", "gpt-v2")
    assert raw.parse().choices[0].message.content
    assert fake_llm.requests[-1].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    text = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="chat-production", messages=[{"role": "user", "content": "x"}], stream=True
        )
        if c.choices
    )
    assert text
    emb = client.embeddings.create(model="chat-production", input="a")
    assert emb.data[0].embedding


def test_anthropic_sdk_through_flask(server: str) -> None:
    client = anthropic.Anthropic(base_url=server, api_key="k", max_retries=0)
    msg = client.messages.create(
        model="review-production", max_tokens=10, messages=[{"role": "user", "content": "x"}]
    )
    assert msg.content[0].type == "text"
    with client.messages.stream(
        model="review-production", max_tokens=10, messages=[{"role": "user", "content": "x"}]
    ) as stream:
        assert "".join(stream.text_stream)


def test_cookie_stickiness_and_passthrough(server: str) -> None:
    with httpx.Client(base_url=server) as browser:
        versions = {
            browser.post(
                "/v1/chat/completions",
                json={"model": "chat-production", "messages": [{"role": "user", "content": "x"}]},
            ).headers["x-relaymw-version"]
            for _ in range(10)
        }
        assert len(versions) == 1
        r = browser.post("/echo", content=b"body kept")
        assert r.json() == {"body": "body kept"}


def test_errors_in_protocol_shape(server: str) -> None:
    r = httpx.post(f"{server}/v1/messages", content=b"{oops")
    assert r.status_code == 400
    assert r.json()["type"] == "error"
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_model"


def test_stream_disconnect_is_recorded_once(
    server: str, fake_llm: FakeLLM, finished: Recorder
) -> None:
    fake_llm.set("*", chunks=200, chunk_delay_ms=30)
    with httpx.stream(
        "POST",
        f"{server}/v1/chat/completions",
        json={
            "model": "chat-production",
            "stream": True,
            "messages": [{"role": "user", "content": "x"}],
        },
    ) as r:
        next(r.iter_raw())
    events = finished.wait_for(1, timeout=10)
    time.sleep(0.3)
    assert len(finished.events) == 1
    assert events[0]["error"] == "client_disconnected"


def test_in_app_mode_under_wsgi(server: str, finished: Recorder) -> None:
    with httpx.Client(base_url=server) as browser:
        r = browser.post("/api/review", json={"code": "x = 1"})
        assert r.status_code == 200, r.text
        assert r.json()["version"] == r.headers["x-relaymw-version"]
    events = finished.wait_for(1)
    assert events[0]["mode"] == "in_app" and events[0]["completion_tokens"] > 0
