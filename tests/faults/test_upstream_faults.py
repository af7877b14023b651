"""A broken upstream: FakeLLM resets connections, stalls past the timeout, answers malformed
JSON or cuts a body or a stream short, behind the gateway under uvicorn (ASGI) and waitress
(WSGI). Clients are the official SDKs and raw httpx (for the exact bodies).

What must hold: a clear 502/504 in the client's protocol shape (never a 500 or a 200 the SDK
cannot read); a stream that already started ends, and its record says error; every failure
counts in the version's metrics, and a health check ejects a version that keeps failing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from relaymw import Relay, RelayMiddleware, RelayWSGIMiddleware
from relaymw.metrics import VERSION_ERRORS
from relaymw.testing import FakeLLM, serve_asgi
from tests.faults.harness import (
    PROTOCOLS,
    assert_error_shape,
    gateway_document,
    not_found,
    request_body,
    wait_until,
)
from tests.support import Recorder, serve_wsgi

TIMEOUT_S = 0.5  # the upstreams' read timeout: a stall longer than this is a 504
VERSION = {"openai": "gpt-v1", "anthropic": "claude-v1"}
MODEL = {"openai": "gpt-4.1", "anthropic": "claude-sonnet-4-5"}  # as FakeLLM sees them
# fault → (status, code) the client must get when the fault hits before any response.
EXPECTED = {
    "reset": (502, "upstream_unreachable"),
    "stall": (504, "upstream_timeout"),
    "malformed": (502, "upstream_invalid_response"),
    "truncate": (502, "upstream_unreachable"),
}
TRUNCATED_STREAM_ERRORS = {"upstream_truncated", "upstream_unreachable"}
# A truncated stream has started before it breaks: the streamed tests below cover it.
BEFORE_ANY_RESPONSE = [
    pytest.param(fault, stream, id=f"{fault}-{'stream' if stream else 'json'}")
    for fault in EXPECTED
    for stream in (False, True)
    if not (fault == "truncate" and stream)
]


def _wsgi_not_found(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("404 Not Found", [("Content-Length", "0")])
    return []


class Gateway:
    """A relay served over HTTP, and the official clients pointed at it."""

    def __init__(self, url: str, relay: Relay) -> None:
        self.url, self.relay = url, relay

    def errors(self, protocol: str) -> tuple[int, int]:
        """(request count, error count) of the protocol's version so far."""
        m = self.relay.metrics(VERSION[protocol], route=PROTOCOLS[protocol][1])
        assert m.error_rate == (m.error_count / m.request_count if m.request_count else 0.0)
        return m.request_count, m.error_count

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="client-key", max_retries=0)

    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key="client-key", max_retries=0)


@pytest.fixture(scope="module", params=["asgi", "wsgi"])
def gateway(request: pytest.FixtureRequest, fake_llm_session: FakeLLM) -> Iterator[Gateway]:
    """One relay per adapter for the module; every request goes to gpt-v1 or claude-v1."""
    relay = Relay(gateway_document(fake_llm_session.base_url, timeout=TIMEOUT_S))
    if request.param == "asgi":
        server = serve_asgi(RelayMiddleware(not_found, relay=relay))
    else:
        server = serve_wsgi(RelayWSGIMiddleware(_wsgi_not_found, relay=relay))
    with server as url:
        yield Gateway(url, relay)
    relay.close()


def sdk_error(gw: Gateway, protocol: str, stream: bool) -> tuple[int, Any]:
    """The status and error body the official SDK raised with."""
    messages: Any = [{"role": "user", "content": "hi"}]
    if protocol == "openai":
        with pytest.raises(openai.APIStatusError) as oai:
            gw.openai().chat.completions.create(
                model="chat-production", messages=messages, stream=stream
            )
        return oai.value.status_code, {"error": oai.value.body}
    with pytest.raises(anthropic.APIStatusError) as ant:
        gw.anthropic().messages.create(
            model="review-production", max_tokens=64, messages=messages, stream=stream
        )
    return ant.value.status_code, ant.value.body


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
@pytest.mark.parametrize(("fault", "stream"), BEFORE_ANY_RESPONSE)
def test_a_broken_upstream_gets_a_clear_error(
    gateway: Gateway,
    fake_llm: FakeLLM,
    events: dict[str, Recorder],
    fault: str,
    stream: bool,
    protocol: str,
) -> None:
    status, code = EXPECTED[fault]
    fake_llm.set(MODEL[protocol], fault=fault)
    requests_before, errors_before = gateway.errors(protocol)

    path = PROTOCOLS[protocol][0]
    raw = httpx.post(gateway.url + path, json=request_body(protocol, stream=stream), timeout=10)
    assert raw.status_code == status, raw.text
    assert raw.headers["content-type"].startswith("application/json")
    assert_error_shape(protocol, status, raw.json(), code)
    sdk_status, sdk_body = sdk_error(gateway, protocol, stream)
    assert sdk_status == status
    assert_error_shape(protocol, status, sdk_body, code)

    finished = events["request_finished"].wait_for(2)
    assert [(e["status"], e["error"], e["version"]) for e in finished] == [
        (status, code, VERSION[protocol])
    ] * 2
    failures = events["upstream_error"].wait_for(2, timeout=1)
    assert [(e["version"], e["error"]) for e in failures] == [(VERSION[protocol], code)] * 2
    requests_after, errors_after = gateway.errors(protocol)
    assert (requests_after - requests_before, errors_after - errors_before) == (2, 2)


def _raw_stream(gw: Gateway, protocol: str) -> tuple[int, bytes]:
    """Status and body of a raw streamed request; a body cut mid-chunk also ends it."""
    body = b""
    path = PROTOCOLS[protocol][0]
    json = request_body(protocol, stream=True)
    with httpx.stream("POST", gw.url + path, json=json, timeout=10) as r:
        try:
            for chunk in r.iter_bytes():
                body += chunk
        except httpx.RemoteProtocolError:
            pass  # the gateway dropped the connection: the stream has ended too
        return r.status_code, body


def _sdk_stream(gw: Gateway, protocol: str) -> list[str]:
    """What the official SDK read before the stream ended: chunk finish reasons (OpenAI) or
    event types (Anthropic)."""
    seen: list[str] = []
    try:
        if protocol == "openai":
            chunks = gw.openai().chat.completions.create(
                model="chat-production", messages=[{"role": "user", "content": "x"}], stream=True
            )
            seen = [str(c.choices[0].finish_reason) for c in chunks if c.choices]
        else:
            events = gw.anthropic().messages.create(
                model="review-production",
                max_tokens=64,
                messages=[{"role": "user", "content": "x"}],
                stream=True,
            )
            seen = [e.type for e in events]
    except (openai.APIConnectionError, anthropic.APIConnectionError):
        pass  # also an end the client can see
    return seen


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
@pytest.mark.parametrize("fault", ["truncate", "stall"])
def test_a_stream_broken_after_it_started_ends_and_is_recorded_as_an_error(
    gateway: Gateway,
    fake_llm: FakeLLM,
    events: dict[str, Recorder],
    fault: str,
    protocol: str,
) -> None:
    if fault == "truncate":  # FakeLLM sends word0..word3 of 8, then closes the connection
        fake_llm.set(MODEL[protocol], fault="truncate", chunks=8)
        recorded, missing = TRUNCATED_STREAM_ERRORS, b"word4"
    else:  # word0 comes at once, then nothing for longer than the timeout
        fake_llm.set(MODEL[protocol], chunk_delay_ms=TIMEOUT_S * 3000, chunks=4)
        recorded, missing = {"upstream_timeout"}, b"word1"
    requests_before, errors_before = gateway.errors(protocol)

    status, body = _raw_stream(gateway, protocol)
    assert status == 200
    assert b"word0" in body and missing not in body  # it had started, and broke
    assert b"[DONE]" not in body and b"message_stop" not in body
    seen = _sdk_stream(gateway, protocol)
    assert "stop" not in seen and "message_stop" not in seen, seen

    finished = events["request_finished"].wait_for(2)
    assert len(finished) == 2
    for event in finished:
        assert event["stream"] is True and event["version"] == VERSION[protocol]
        assert event["error"] in recorded and event["error"] in VERSION_ERRORS, event
    failures = events["upstream_error"].wait_for(2, timeout=1)
    assert [e["version"] for e in failures] == [VERSION[protocol]] * 2
    requests_after, errors_after = gateway.errors(protocol)
    assert (requests_after - requests_before, errors_after - errors_before) == (2, 2)
    if fault == "truncate":
        assert sum(s.truncated for s in fake_llm.streams) == 2


def test_health_counts_every_fault_and_ejects_the_failing_version(
    fake_llm: FakeLLM, events: dict[str, Recorder]
) -> None:
    """gpt-v2 fails by turns (reset, truncated stream, stall); a health check with a 20%
    threshold over at least 10 requests ejects it and gpt-v1 takes all the traffic."""
    doc = gateway_document(fake_llm.base_url, chat=(50, 50), timeout=TIMEOUT_S)
    doc["routes"][0]["health_check"] = {
        "enabled": True,
        "error_rate_threshold": 0.2,
        "min_requests": 10,
        "window_seconds": 60,
    }
    relay = Relay(doc)
    faults = ["reset", "truncate", "reset", "truncate", "stall"]
    failed = 0
    try:
        with serve_asgi(RelayMiddleware(not_found, relay=relay)) as url:
            gw = Gateway(url, relay)
            for n in range(200):
                fake_llm.set("gpt-4.1-mini", fault=faults[n % len(faults)])
                status, body = _raw_stream(gw, "openai")
                if status != 200 or b"[DONE]" not in body:
                    failed += 1
                if events["version_ejected"].events:
                    break
            [ejection] = events["version_ejected"].wait_for(1)
            assert (ejection["version"], ejection["reason"]) == ("gpt-v2", "error_rate")
            assert ejection["new_weights"] == {"gpt-v1": 100.0, "gpt-v2": 0.0}
            after = [_raw_stream(gw, "openai") for _ in range(20)]
            assert all(s == 200 and b"[DONE]" in b for s, b in after)
        canary = relay.metrics("gpt-v2", route="chat-production")
        stable = relay.metrics("gpt-v1", route="chat-production")
        assert failed >= 10 and canary.error_count == failed and stable.error_count == 0
        assert canary.error_rate == 1.0 and canary.request_count == failed
        assert stable.request_count == sum(1 for s in fake_llm.streams if s.model == "gpt-4.1")
        wait_until(lambda: relay.snapshot.ejected == {"chat-production": {"gpt-v2"}}, 1, "ejected")
    finally:
        relay.close()
