"""Edge cases of the gateway's fast paths: usage found by byte searches (split anywhere, quoted
in text, repeated), output counted only when asked, usage read from a JSON body's tail, raw
upstream headers, request bodies in several messages and the response seam's ``read_chunk``."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaymw import Relay, RelayMiddleware
from relaymw import protocols as p
from relaymw.config import Upstream
from relaymw.engine import is_event_stream, usage_of_body
from relaymw.testing import FakeLLM, serve_asgi
from relaymw.upstream import AiohttpUpstreamClient
from tests.support import Recorder, relay_document

CHAT = p.Endpoint("openai", "chat", "/chat/completions")
MESSAGES = p.Endpoint("anthropic", "messages", "/messages")
RESPONSES = p.Endpoint("openai", "responses", "/responses")

# Text that quotes what the observer searches for; inside a JSON string every quote is escaped.
QUOTING = 'He said "usage":{"prompt_tokens":999} and "usage": {"x": 1}, then data: [DONE]'


def sse(*events: Any) -> bytes:
    return b"".join(
        b"data: " + (e.encode() if isinstance(e, str) else orjson.dumps(e)) + b"\n\n"
        for e in events
    )


def chunk(content: str | None, usage: Any = None, choices: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m"}
    out["usage"] = usage
    out["choices"] = [{"index": 0, "delta": {"content": content}}] if choices else []
    return out


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion}


# "usage":null on every chunk, as OpenAI sends with include_usage, and the usage-only chunk.
WORDS = [f"word{i} " for i in range(40)]
USAGE_CHUNK = chunk(None, usage(21, 42), choices=False)
STREAM = sse(*(chunk(w) for w in WORDS), chunk(QUOTING), USAGE_CHUNK, "[DONE]")
WITHOUT_USAGE_CHUNK = sse(*(chunk(w) for w in WORDS), chunk(QUOTING), "[DONE]")


def run(stream: bytes, cuts: list[int], **kw: Any) -> tuple[bytes, p.StreamObserver]:
    obs = p.StreamObserver(CHAT, **kw)
    bounds = [0, *sorted(cuts), len(stream)]
    out = [obs.feed(stream[a:b]) for a, b in itertools.pairwise(bounds)]
    out.append(obs.finish())
    return b"".join(out), obs


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(0, len(STREAM)), max_size=12), drop=st.booleans())
def test_deferred_count_equals_the_running_count_however_split(cuts: list[int], drop: bool) -> None:
    eager_out, eager = run(STREAM, cuts, drop_usage_chunk=drop)
    lazy_out, lazy = run(STREAM, cuts, drop_usage_chunk=drop, defer_count=True)
    assert lazy_out == eager_out == (WITHOUT_USAGE_CHUNK if drop else STREAM)
    assert lazy.usage == eager.usage == p.Usage(21, 42)
    assert lazy.done and eager.done
    assert lazy.output_tokens == eager.output_tokens > len(WORDS)


@pytest.mark.parametrize("inside", [b'"usage":{', b'"usage":null', b"[DONE]", b"\n\n"])
def test_usage_split_across_chunk_boundaries(inside: bytes) -> None:
    for at in (STREAM.find(inside), STREAM.rfind(inside)):
        for k in range(1, len(inside)):
            out, obs = run(STREAM, [at + k], drop_usage_chunk=True, defer_count=True)
            assert out == WITHOUT_USAGE_CHUNK, (at, k)
            assert (obs.usage, obs.done) == (p.Usage(21, 42), True)


def test_usage_quoted_in_the_text_is_not_usage() -> None:
    stream = sse(chunk(QUOTING), chunk("more"), "[DONE]")
    for drop in (False, True):
        out, obs = run(stream, [], drop_usage_chunk=drop, defer_count=True)
        assert out == stream  # nothing dropped
        assert obs.usage is None and obs.done
    # And the real usage still wins over the quoted one.
    out, obs = run(STREAM, [], drop_usage_chunk=True)
    assert obs.usage == p.Usage(21, 42)


def test_usage_on_every_chunk_keeps_the_last_and_drops_nothing_with_choices() -> None:
    # Some compatible servers report (cumulative) usage on each content chunk.
    stream = sse(*(chunk(w, usage(5, i + 1)) for i, w in enumerate(WORDS[:6])), "[DONE]")
    for cuts in ([], [len(stream) // 2], list(range(0, len(stream), 97))):
        out, obs = run(stream, cuts, drop_usage_chunk=True, defer_count=True)
        assert out == stream
        assert obs.usage == p.Usage(5, 6)


def test_usage_spelled_with_spaces_is_found() -> None:
    spaced = json.dumps(USAGE_CHUNK)  # ", " and ": " separators
    assert '"usage": {' in spaced
    stream = sse(*(json.dumps(chunk(w)) for w in WORDS[:3]), spaced, "[DONE]")
    out, obs = run(stream, [], drop_usage_chunk=True, defer_count=True)
    assert obs.usage == p.Usage(21, 42)
    assert out == sse(*(json.dumps(chunk(w)) for w in WORDS[:3]), "[DONE]")


def test_crlf_stream_in_one_piece_and_split() -> None:
    stream = STREAM.replace(b"\n", b"\r\n")
    want = WITHOUT_USAGE_CHUNK.replace(b"\n", b"\r\n")
    for cuts in ([], [stream.find(b'"usage":{') + 3], [len(stream) - 3]):
        out, obs = run(stream, cuts, drop_usage_chunk=True, defer_count=True)
        assert out == want
        assert (obs.usage, obs.done) == (p.Usage(21, 42), True)


def test_deferred_events_are_bounded_and_counted_as_they_come() -> None:
    long = sse(*(chunk("x" * 500) for _ in range(400)), "[DONE]")  # ~ 250 KB
    eager = p.StreamObserver(CHAT)
    lazy = p.StreamObserver(CHAT, defer_count=True)
    for i in range(0, len(long), 4096):
        eager.feed(long[i : i + 4096])
        lazy.feed(long[i : i + 4096])
        assert lazy._uncounted_bytes <= 64 << 10
    assert lazy.output_tokens == eager.output_tokens >= 400 * 500 // 3


def test_an_output_limit_counts_as_it_goes_even_when_deferring() -> None:
    obs = p.StreamObserver(CHAT, output_limit=10, defer_count=True)
    obs.feed(STREAM)
    assert obs.limit_reached
    assert obs.cut("m").endswith(b"data: [DONE]\n\n")


def test_deferred_count_is_done_before_a_cut() -> None:
    anthropic = b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n"
        for e in (
            {"type": "message_start", "message": {"id": "msg_1", "model": "claude-x"}},
            {"type": "content_block_start", "index": 0},
            {"type": "content_block_delta", "index": 0, "delta": {"text": "hello " * 30}},
        )
    )
    obs = p.StreamObserver(MESSAGES, defer_count=True)
    obs.feed(anthropic)
    tail = obs.cut()
    # The open block is closed and the output counted, from events kept uncounted until now.
    assert b'"content_block_stop"' in tail
    assert b'"output_tokens":60' in tail and b'"model"' not in tail


# --- usage of a JSON body ------------------------------------------------------------------


def reference(endpoint: p.Endpoint, data: bytes) -> p.Usage | None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return p.usage_from_body(endpoint, obj) if isinstance(obj, dict) else None


U = {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 2}}
BODIES: list[tuple[p.Endpoint, Any]] = [
    # OpenAI puts members after usage; Anthropic ends with it.
    (CHAT, {"choices": [{"message": {"content": QUOTING}}], "usage": U, "service_tier": "x"}),
    (MESSAGES, {"content": [{"text": QUOTING}], "usage": {"input_tokens": 7, "output_tokens": 3}}),
    (RESPONSES, {"output": [], "usage": {"input_tokens": 4, "output_tokens": 2}}),
    # A nested "usage" after the top-level one, or instead of it.
    (CHAT, {"usage": U, "meta": {"usage": {"prompt_tokens": 1}}}),
    (CHAT, {"choices": [], "meta": {"usage": {"prompt_tokens": 1}}}),
    (CHAT, {"choices": [{"usage": U}], "usage": None}),
    (CHAT, {"choices": [{"message": {"content": QUOTING}}]}),  # quoted only
    (CHAT, {"usage": U, "usage_note": {"usage": 1}}),
    (CHAT, ["usage", {"usage": U}]),  # not an object
]


@pytest.mark.parametrize(("endpoint", "body"), BODIES)
@pytest.mark.parametrize("spaced", [False, True])
def test_usage_of_body_reads_exactly_the_top_level_usage(
    endpoint: p.Endpoint, body: Any, spaced: bool
) -> None:
    data = json.dumps(body).encode() if spaced else orjson.dumps(body)
    assert usage_of_body(endpoint, data) == reference(endpoint, data)


def test_usage_of_body_expected_values() -> None:
    assert usage_of_body(CHAT, orjson.dumps(BODIES[0][1])) == p.Usage(10, 5, 2)
    assert usage_of_body(CHAT, orjson.dumps(BODIES[3][1])) == p.Usage(10, 5, 2)
    assert usage_of_body(CHAT, orjson.dumps(BODIES[4][1])) is None
    assert usage_of_body(CHAT, b'{"usage": {"prompt_tokens": 1}') is None  # truncated
    assert usage_of_body(CHAT, b"not json") is None


# --- headers ----------------------------------------------------------------------------------


def test_response_headers_take_raw_names_in_any_case() -> None:
    raw = [
        (b"Content-Type", b"text/event-stream; charset=utf-8"),
        (b"CACHE-CONTROL", b"no-cache"),
        (b"x-request-id", b"req_1"),
        (b"Set-Cookie", b"upstream=1"),
        (b"Content-Length", b"10"),
    ]
    want = [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-cache"),
        (b"x-request-id", b"req_1"),
    ]
    assert p.response_headers(raw) == want
    assert p.response_headers([(k.decode(), v.decode()) for k, v in raw]) == want
    assert is_event_stream(want)
    assert is_event_stream([("content-type", "text/event-stream")])
    assert not is_event_stream([(b"content-type", b"application/json")])
    assert not is_event_stream([("x-content-type", "text/event-stream")])


# --- through a real server --------------------------------------------------------------------


@pytest.fixture
def small_limit_server(fake_llm: FakeLLM) -> Iterator[str]:
    doc = relay_document(fake_llm.base_url)
    doc["gateway"] = {"max_body_bytes": 4096}
    relay = Relay(doc)
    with serve_asgi(RelayMiddleware(lambda *a: None, relay=relay)) as url:  # type: ignore[arg-type]
        yield url
    relay.close()


def body_in_pieces(text: bytes, pause: float = 0.02) -> Iterator[bytes]:
    for i in range(0, len(text), 100):
        yield text[i : i + 100]
        time.sleep(pause)  # separate writes: the server sees several body messages


def test_a_body_in_several_messages_is_read_whole(
    small_limit_server: str, fake_llm: FakeLLM, finished: Recorder
) -> None:
    body = orjson.dumps(
        {"model": "chat-production", "messages": [{"role": "user", "content": "hi " * 200}]}
    )
    r = httpx.post(f"{small_limit_server}/v1/chat/completions", content=body_in_pieces(body))
    assert r.status_code == 200, r.text
    assert fake_llm.requests[-1].body is not None
    assert fake_llm.requests[-1].body["messages"][-1]["content"] == "hi " * 200
    assert finished.wait_for(1)[0]["completion_tokens"] > 0


def test_a_body_over_the_limit_in_several_messages_is_413(small_limit_server: str) -> None:
    body = orjson.dumps({"model": "chat-production", "messages": [], "pad": "x" * 8000})
    r = httpx.post(f"{small_limit_server}/v1/chat/completions", content=body_in_pieces(body, 0))
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


# --- the response seam: read_chunk ----------------------------------------------------------


async def read_all(fake_llm: FakeLLM, settle: float) -> tuple[bytes, int]:
    client = AiohttpUpstreamClient(Upstream(base_url=f"{fake_llm.base_url}/v1"))
    body = orjson.dumps({"model": "m", "stream": True, "messages": []})
    headers = {"content-type": "application/json", "authorization": "Bearer x"}
    waits = 0

    def on_wait() -> None:
        nonlocal waits
        waits += 1

    try:
        resp = await client.send("POST", f"{fake_llm.base_url}/v1/chat/completions", headers, body)
        await asyncio.sleep(settle)
        parts = []
        while piece := await resp.read_chunk(on_wait):
            parts.append(piece)
        assert await resp.read_chunk(on_wait) == b""  # closed: stays at the end
        return b"".join(parts), waits
    finally:
        await client.aclose()


async def test_read_chunk_waits_only_for_data_not_yet_there(fake_llm: FakeLLM) -> None:
    fake_llm.set("*", chunks=4, chunk_delay_ms=30)
    paced, waits = await read_all(fake_llm, 0)
    assert waits >= 3  # each paced chunk had to be waited for
    # The role chunk, 4 content chunks, the finish chunk and [DONE].
    assert paced.endswith(b"data: [DONE]\n\n") and paced.count(b"data: ") == 7
    fake_llm.set("*", chunks=4, chunk_delay_ms=0)
    whole, waits = await read_all(fake_llm, 0.3)  # the whole stream has arrived meanwhile
    assert waits == 0
    assert whole.endswith(b"data: [DONE]\n\n") and whole.count(b"data: ") == 7
