"""Gateway and in-app modes through a FastAPI app under uvicorn, driven by the official SDKs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from fastapi import FastAPI, Request

from relaymw import Relay, RelayMiddleware, current_version
from relaymw.stores import RawDocument
from relaymw.testing import FakeLLM
from tests.support import UPSTREAM_KEY, Recorder, free_port, relay_document, serve_asgi

SUFFIXES = ("/chat/completions", "/completions", "/embeddings", "/responses", "/messages")


def make_app(relay: Relay) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, Any]:
        return {"body": (await request.body()).decode()}

    @app.post("/v1/chat/completions")
    async def own_chat(request: Request) -> dict[str, Any]:
        return {"served_by": "app", "body": (await request.json())}

    @app.post("/api/review")
    async def review(request: Request) -> dict[str, Any]:
        choice = current_version()
        assert choice is request.state.relay
        body = await request.json()
        client = anthropic.AsyncAnthropic(
            api_key="unused",
            base_url="http://llm.invalid",
            http_client=relay.async_client(flavor="httpx2"),
        )
        msg = await client.messages.create(
            model="review-production",
            max_tokens=100,
            messages=[{"role": "user", "content": body["code"]}],
        )
        return {"version": str(choice), "text": msg.content[0].text}  # type: ignore[union-attr]

    app.add_middleware(RelayMiddleware, relay=relay)
    return app


@pytest.fixture
def relay(fake_llm: FakeLLM) -> Iterator[Relay]:
    r = Relay(relay_document(fake_llm.base_url))
    yield r
    r.close()


@pytest.fixture
def server(relay: Relay) -> Iterator[str]:
    with serve_asgi(make_app(relay)) as url:
        yield url


def oai(url: str, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{url}/v1", api_key="client-key-should-not-leak", max_retries=0, **kw
    )


def test_openai_chat_json_and_stream(server: str, fake_llm: FakeLLM, finished: Recorder) -> None:
    client = oai(server)
    raw = client.chat.completions.with_raw_response.create(
        model="chat-production", messages=[{"role": "user", "content": "hello"}]
    )
    completion = raw.parse()
    version = raw.headers["x-relaymw-version"]
    assert version in ("gpt-v1", "gpt-v2")
    assert float(raw.headers["x-relaymw-overhead-ms"]) >= 0
    expected_model = "gpt-4.1" if version == "gpt-v1" else "gpt-4.1-mini"
    assert completion.model == expected_model
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens > 0

    sent = fake_llm.requests[-1]
    assert sent.body is not None and sent.body["model"] == expected_model
    # The client's own key never reaches the upstream; the configured one does.
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "client-key-should-not-leak" not in str(sent.headers)
    if version == "gpt-v1":
        assert sent.body["messages"][0] == {"role": "system", "content": "You are v1."}
        assert sent.body["temperature"] == 0.7

    stream = client.chat.completions.create(
        model="chat-production", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text
    events = finished.wait_for(2)
    assert [e["stream"] for e in events] == [False, True]
    assert all(e["route"] == "chat-production" and e["status"] == 200 for e in events)
    assert events[1]["completion_tokens"] > 0  # usage asked for upstream and read
    assert events[1]["ttft_ms"] is not None


def test_openai_stream_hides_injected_usage_chunk(server: str, fake_llm: FakeLLM) -> None:
    chunks = list(
        oai(server).chat.completions.create(
            model="chat-production", messages=[{"role": "user", "content": "x"}], stream=True
        )
    )
    assert all(c.usage is None for c in chunks)
    assert fake_llm.requests[-1].body["stream_options"] == {"include_usage": True}  # type: ignore[index]
    chunks = list(
        oai(server).chat.completions.create(
            model="chat-production",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None


def test_embeddings(server: str) -> None:
    result = oai(server).embeddings.create(model="chat-production", input=["a", "b"])
    assert len(result.data) == 2 and len(result.data[0].embedding) > 0


def test_anthropic_messages_create_and_stream(server: str, fake_llm: FakeLLM) -> None:
    client = anthropic.Anthropic(base_url=server, api_key="client-key", max_retries=0)
    raw = client.messages.with_raw_response.create(
        model="review-production",
        max_tokens=2000,
        system="Be kind.",
        messages=[{"role": "user", "content": "review this"}],
    )
    message = raw.parse()
    assert raw.headers["x-relaymw-version"] in ("claude-v1", "claude-v2")
    assert message.content[0].type == "text"
    sent = fake_llm.requests[-1]
    assert sent.headers["x-api-key"] == UPSTREAM_KEY
    assert sent.body is not None
    assert sent.body["max_tokens"] == 512  # capped by the version
    if raw.headers["x-relaymw-version"] == "claude-v1":
        assert sent.body["system"] == "You review code.\n\nBe kind."
        assert sent.body["model"] == "claude-sonnet-4-5"

    with client.messages.stream(
        model="review-production", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.usage.output_tokens > 0


def test_cookie_keeps_a_browser_on_one_version(server: str) -> None:
    with httpx.Client(base_url=server) as browser:
        seen = set()
        for _ in range(12):
            r = browser.post(
                "/v1/chat/completions",
                json={"model": "chat-production", "messages": [{"role": "user", "content": "x"}]},
            )
            assert r.status_code == 200
            seen.add(r.headers["x-relaymw-version"])
        assert len(seen) == 1
        cookie = browser.cookies.get("relay_chat")
        assert cookie is not None and cookie.startswith(seen.pop())
    # Without the cookie jar, 50/50 weights spread clients over both versions.
    versions = {
        httpx.post(
            f"{server}/v1/chat/completions",
            json={"model": "chat-production", "messages": [{"role": "user", "content": "x"}]},
        ).headers["x-relaymw-version"]
        for _ in range(30)
    }
    assert versions == {"gpt-v1", "gpt-v2"}


def test_set_cookie_attributes(server: str) -> None:
    r = httpx.post(
        f"{server}/v1/chat/completions",
        json={"model": "chat-production", "messages": [{"role": "user", "content": "x"}]},
    )
    cookie = r.headers["set-cookie"]
    for part in ("Max-Age=3600", "Path=/", "HttpOnly", "SameSite=Lax"):
        assert part in cookie
    assert "Secure" not in cookie


def test_passthrough_keeps_body_and_unknown_models_reach_the_app(server: str) -> None:
    r = httpx.post(f"{server}/echo", content=b"raw body \x00 intact")
    assert r.json() == {"body": "raw body \x00 intact"}
    assert "x-relaymw-version" not in r.headers
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "not-an-alias", "x": 1})
    assert r.json() == {"served_by": "app", "body": {"model": "not-an-alias", "x": 1}}


@pytest.mark.parametrize(
    ("path", "content", "status", "code"),
    [
        ("/v1/chat/completions", b"{not json", 400, "invalid_json"),
        ("/v1/chat/completions", b'{"messages": []}', 400, "missing_model"),
        ("/v1/messages", b"[1, 2]", 400, "invalid_request"),
    ],
)
def test_bad_requests_get_protocol_shaped_errors(
    server: str, path: str, content: bytes, status: int, code: str, finished: Recorder
) -> None:
    r = httpx.post(server + path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status
    body = r.json()
    if path == "/v1/messages":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    else:
        assert body["error"]["code"] == code and body["error"]["message"]
    assert finished.wait_for(1)[0]["error"] == code


def test_oversized_body_is_413(fake_llm: FakeLLM) -> None:
    doc = relay_document(fake_llm.base_url)
    doc["gateway"] = {"max_body_bytes": 1000}
    with serve_asgi(make_app(Relay(doc))) as url:
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={
                "model": "chat-production",
                "messages": [{"role": "user", "content": "x" * 5000}],
            },
        )
        assert r.status_code == 413
        assert "1000 bytes" in r.json()["error"]["message"]
        # The SDK surfaces it as a clear error, not a crash.
        with pytest.raises(openai.APIStatusError) as info:
            oai(url).chat.completions.create(
                model="chat-production", messages=[{"role": "user", "content": "x" * 5000}]
            )
        assert info.value.status_code == 413


def test_upstream_unreachable_timeout_and_errors(fake_llm: FakeLLM, finished: Recorder) -> None:
    doc = relay_document(fake_llm.base_url)
    doc["upstreams"]["anthropic"]["base_url"] = f"http://127.0.0.1:{free_port()}"
    doc["upstreams"]["openai"]["timeout_seconds"] = 0.3
    with serve_asgi(make_app(Relay(doc))) as url:
        client = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as info:
            client.messages.create(
                model="review-production",
                max_tokens=10,
                messages=[{"role": "user", "content": "x"}],
            )
        assert info.value.status_code == 502
        assert info.value.body["error"]["type"] == "api_error"  # type: ignore[index]

        fake_llm.set("*", fault="stall")
        with pytest.raises(openai.APIStatusError) as info2:
            oai(url).chat.completions.create(
                model="chat-production", messages=[{"role": "user", "content": "x"}]
            )
        assert info2.value.status_code == 504
        fake_llm.set("*", fault=None, status=503, error_rate=1.0)
        with pytest.raises(openai.APIStatusError) as info3:
            oai(url).chat.completions.create(
                model="chat-production", messages=[{"role": "user", "content": "x"}]
            )
        assert info3.value.status_code == 503  # passed through as the upstream said it
    errors = [e["error"] for e in finished.wait_for(3)]
    assert errors == ["upstream_unreachable", "upstream_timeout", "upstream_error"]


def test_stream_is_not_buffered(server: str, fake_llm: FakeLLM) -> None:
    fake_llm.set("*", chunks=10, chunk_delay_ms=100)
    with httpx.stream(
        "POST",
        f"{server}/v1/chat/completions",
        json={
            "model": "chat-production",
            "stream": True,
            "messages": [{"role": "user", "content": "x"}],
        },
        timeout=10,
    ) as r:
        chunks = r.iter_raw()
        first = next(chunks)
        got_first_at = time.monotonic()
        assert first
        rest = b"".join(chunks)
    assert b"[DONE]" in rest
    record = fake_llm.streams[-1]
    # The first chunk reached the client while FakeLLM still had chunks to send.
    assert record.last_chunk_at is not None and got_first_at < record.last_chunk_at


def test_client_disconnect_closes_upstream_and_records_once(
    server: str, fake_llm: FakeLLM, finished: Recorder
) -> None:
    fake_llm.set("*", chunks=200, chunk_delay_ms=50)
    with httpx.stream(
        "POST",
        f"{server}/v1/chat/completions",
        json={
            "model": "chat-production",
            "stream": True,
            "messages": [{"role": "user", "content": "x"}],
        },
        timeout=10,
    ) as r:
        it = r.iter_raw()
        next(it)
        next(it)
        dropped_at = time.monotonic()
    deadline = time.monotonic() + 3
    while not fake_llm.disconnect_times and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake_llm.disconnect_times, "FakeLLM never saw the upstream stream closed"
    assert fake_llm.disconnect_times[-1] - dropped_at < 1.0
    events = finished.wait_for(1)
    time.sleep(0.3)  # nothing more may arrive
    assert len(finished.events) == 1
    assert events[0]["error"] == "client_disconnected" and events[0]["stream"] is True


def test_stream_cut_while_waiting_for_the_upstream(fake_llm: FakeLLM, finished: Recorder) -> None:
    """The upstream drops a stream while the relay waits for its next chunk, so the error is
    thrown into the waiting coroutine: the stream ends, the request is recorded as failed,
    and the middleware returns. (Compiled with mypyc, a ``finally`` that awaited re-raised
    that handled error from the middleware, and uvicorn dropped the connection.)"""
    fake_llm.set("*", fault="truncate", chunk_delay_ms=20)
    relay = Relay(relay_document(fake_llm.base_url))
    body = json.dumps(
        {"model": "chat-production", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    ).encode()
    scope = {
        "type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
        "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 5000),
        "scheme": "http",
    }  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if not sent:
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(60)  # the client stays: the relay's watcher waits here
        raise AssertionError("the watcher was not stopped")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def app_not_called(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the relay did not take the request")

    async def run() -> None:
        try:
            await RelayMiddleware(app_not_called, relay=relay)(scope, receive, send)
        finally:
            await relay.aclose()

    try:
        asyncio.run(run())
    finally:
        relay.close()
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert sent[-1]["type"] == "http.response.body" and not sent[-1].get("more_body")
    assert [e["error"] for e in finished.wait_for(1)] == ["upstream_unreachable"]


def test_in_app_mode_chooses_before_the_handler_and_meters(server: str, finished: Recorder) -> None:
    with httpx.Client(base_url=server) as browser:
        first = browser.post("/api/review", json={"code": "print(1)"})
        assert first.status_code == 200, first.text
        version = first.headers["x-relaymw-version"]
        assert first.json()["version"] == version
        assert "relay_review" in first.headers["set-cookie"]
        for _ in range(5):
            again = browser.post("/api/review", json={"code": "x"})
            assert again.json()["version"] == version
    events = finished.wait_for(6)
    assert {e["mode"] for e in events} == {"in_app"}
    assert {e["version"] for e in events} == {version}
    assert all(e["completion_tokens"] > 0 for e in events)


def test_claimed_paths_follow_every_configuration(
    relay: Relay, server: str, fake_llm: FakeLLM
) -> None:
    """Whether a path is relaymw's is one lookup in a dict the relay keeps current: a reload
    that moves the in-app path and the gateway prefix takes effect on the next request."""
    assert "x-relaymw-version" not in httpx.post(f"{server}/echo", json={}).headers
    doc = relay_document(fake_llm.base_url, review_production={"paths": ["/echo"]})
    doc["gateway"] = {"path_prefix": "/llm"}
    raw = RawDocument(json.dumps(doc).encode(), "json", "moved", "test")
    assert relay.apply_document(raw)
    assert set(relay.claimed_paths) == {"/echo", *(f"/llm/v1{s}" for s in SUFFIXES)}
    moved = httpx.post(f"{server}/echo", json={"x": 1})
    assert moved.json() == {"body": '{"x":1}'}
    assert moved.headers["x-relaymw-version"] in {"claude-v1", "claude-v2"}  # now in-app
    # The old gateway path is the app's own again; the new one relays.
    own = oai(server).chat.completions.create(model="chat-production", messages=[])
    assert own.model_extra is not None and own.model_extra["served_by"] == "app"
    relayed = httpx.post(
        f"{server}/llm/v1/chat/completions",
        json={"model": "chat-production", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert relayed.status_code == 200
    assert relayed.headers["x-relaymw-version"] in {"gpt-v1", "gpt-v2"}
