"""Secrets never leak: gateway and in-app traffic through uvicorn and waitress with a known
upstream API key, cookie secret, pinning token, storage passwords and client credentials,
while requests go wrong in every way the README lists (bad requests, unreachable, timed-out,
refusing and misbehaving upstreams, an unreachable rate-limit store, rejected configuration
documents). Every response, every log record (root, ``relaymw``, the servers' loggers, and
what reached stdout/stderr), every signal's arguments and the JSONL audit file are searched
for each secret.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask
from flask import Response as FlaskResponse
from flask import request as flask_request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response as StarletteResponse
from starlette.routing import Route

from relaymw import ConfigError, Relay, RelayMiddleware, RelayWSGIMiddleware, signals
from relaymw.sinks import JsonlAuditSink, LoggingSink
from relaymw.stores.base import RawDocument
from relaymw.testing import FakeLLM, serve_asgi
from tests.hostile_strategies import signed_cookie
from tests.hostile_support import Response, check_rejection
from tests.support import UPSTREAM_KEY, free_port, relay_document, serve_wsgi

ENV_KEY_NAME = "HOSTILE_SECRET_UPSTREAM_KEY"  # holds UPSTREAM_KEY
ENV_COOKIE_NAME = "HOSTILE_SECRET_COOKIE"
COOKIE_SECRET = "cookie-secret-9d2e7b"
PIN_TOKEN = "pin-token-5a8c1f"
BROKEN_KEY = "sk-broken-upstream-aa19f0"
WRONG_KEY = "sk-wrong-upstream-31c6de"
URL_PASSWORD = "url-password-6d1f42"
REDIS_PASSWORD = "redis-password-8e2b7a"
CLIENT_KEY = "client-secret-key-4c7e90"
SECRETS = (
    UPSTREAM_KEY, COOKIE_SECRET, PIN_TOKEN, BROKEN_KEY, WRONG_KEY, URL_PASSWORD, REDIS_PASSWORD,
    CLIENT_KEY,
)  # fmt: skip


def _with_password(redis_url: str) -> str:
    return redis_url.replace("redis://", f"redis://:{REDIS_PASSWORD}@", 1)


def secret_document(fake_url: str, redis_url: str) -> dict[str, Any]:
    """Routes that succeed, one whose upstream is unreachable (credentials in its URL), one
    that times out, one whose upstream refuses our key; limits and budgets on a Redis that
    refuses the password (they fail open)."""
    doc = relay_document(fake_url)
    doc["upstreams"]["openai"]["api_key"] = f"${{{ENV_KEY_NAME}}}"
    closed = f"http://127.0.0.1:{free_port()}/v1"
    doc["upstreams"]["broken"] = {"base_url": closed, "api_key": BROKEN_KEY,
                                  "connect_timeout_seconds": 2}  # fmt: skip
    doc["upstreams"]["slow"] = {"base_url": f"{fake_url}/v1", "api_key": UPSTREAM_KEY,
                                "timeout_seconds": 0.3}  # fmt: skip
    doc["upstreams"]["wrongkey"] = {"base_url": f"{fake_url}/v1", "api_key": WRONG_KEY}
    for name, model in (("broken", "gpt-4.1"), ("slow", "slow-model"), ("wrongkey", "gpt-4.1")):
        tag = f"{name}-v1"
        doc["versions"].append({"version_tag": tag, "model": model, "upstream_endpoint": name})
        doc["routes"].append(
            {"model_alias": f"{name}-route", "route_rules": [{"version_tag": tag, "weight": 100}]}
        )
    doc["routes"][0]["rate_limits"] = ["100000/minute"]
    doc["routes"][0]["allow_client_pin"] = True
    doc["rate_limiting"] = {"storage_uri": _with_password(redis_url), "identity": "api_key",
                            "recovery_probe_seconds": 0.2}  # fmt: skip
    doc["budgets"] = [{"scope": "global", "period": "day", "limit_usd": 1000}]
    doc["budgeting"] = {"storage_uri": _with_password(redis_url)}
    doc["sticky"] = {"secret": f"${{{ENV_COOKIE_NAME}}}"}
    doc["pinning"] = {"token": PIN_TOKEN}
    doc["gateway"] = {"max_body_bytes": 4096}
    return doc


# --- capturing everything -------------------------------------------------------------------


class Everything(logging.Handler):
    """Every record of the loggers it is attached to, formatted with its traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class SignalLog:
    """Every keyword argument of every relaymw signal, as text (the RelayConfig of
    ``config_loaded`` aside: it is the configuration itself, api keys included)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.names = [
            n
            for n in signals.__all__
            if isinstance(getattr(signals, n), type(signals.config_loaded))
        ]

    def __call__(self, sender: Any, **kwargs: Any) -> None:
        kwargs.pop("config", None)
        self.lines.append(repr(kwargs))

    def connect(self) -> None:
        for name in self.names:
            getattr(signals, name).connect(self, weak=False)

    def disconnect(self) -> None:
        for name in self.names:
            getattr(signals, name).disconnect(self)


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture) -> Iterator[tuple[Everything, SignalLog]]:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="relaymw")
    handler = Everything()
    names = ["uvicorn", "uvicorn.error", "uvicorn.access", "waitress", "aiohttp", "relaymw"]
    for name in names:
        logging.getLogger(name).addHandler(handler)
    sig = SignalLog()
    sig.connect()
    yield handler, sig
    sig.disconnect()
    for name in names:
        logging.getLogger(name).removeHandler(handler)


# --- the apps ---------------------------------------------------------------------------------


def asgi_app(relay: Relay) -> Any:
    async def review(request: Request) -> StarletteResponse:
        try:
            async with relay.async_client() as client:
                r = await client.post(
                    "http://llm.invalid/v1/messages",
                    content=await request.body(),
                    headers={"x-api-key": CLIENT_KEY, "content-type": "application/json"},
                )
        except httpx.HTTPError as exc:  # the upstream failed: as an SDK would raise it
            return StarletteResponse(_app_error(exc), 502, media_type="application/json")
        return StarletteResponse(r.content, r.status_code, media_type="application/json")

    app = Starlette(routes=[Route("/api/review", review, methods=["POST"])])
    return RelayMiddleware(app, relay=relay)


def _app_error(exc: Exception) -> bytes:
    """The app's own answer when its LLM call failed: the exception's text, which is what
    an app would log or show, so it must hold no secret either."""
    return json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()


def wsgi_app(relay: Relay) -> Any:
    app = Flask(__name__)

    @app.post("/api/review")
    def review() -> FlaskResponse:
        try:
            with relay.client() as client:
                r = client.post(
                    "http://llm.invalid/v1/messages",
                    content=flask_request.get_data(),
                    headers={"x-api-key": CLIENT_KEY, "content-type": "application/json"},
                )
        except httpx.HTTPError as exc:
            return FlaskResponse(_app_error(exc), 502, mimetype="application/json")
        return FlaskResponse(r.content, r.status_code, mimetype="application/json")

    app.wsgi_app = RelayWSGIMiddleware(app.wsgi_app, relay=relay)  # type: ignore[method-assign]
    return app


# --- the traffic ------------------------------------------------------------------------------


def _chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def _messages(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}],
            **extra}  # fmt: skip


def traffic(base: str, fake: FakeLLM) -> list[httpx.Response]:
    """Good calls, bad calls and failing upstreams; the client sends its own credentials."""
    auth = {"authorization": f"Bearer {CLIENT_KEY}", "x-api-key": CLIENT_KEY}
    forged = signed_cookie("chat-production", "gpt-v2", int(time.time()) + 60, "not-the-secret")
    out: list[httpx.Response] = []
    with httpx.Client(base_url=base, headers=auth, timeout=30) as client:

        def post(path: str, **kw: Any) -> None:
            out.append(client.post(path, **kw))

        post("/v1/chat/completions", json=_chat("chat-production"))
        post("/v1/chat/completions", json=_chat("chat-production", stream=True))
        post("/v1/messages", json=_messages("review-production"))
        post("/v1/messages", json=_messages("review-production", stream=True))
        post("/api/review", json=_messages("review-production"))
        post("/v1/chat/completions", content=b"{not json")
        post("/v1/messages", json={"messages": []})
        post("/v1/chat/completions", json=_chat("review-production"))  # protocol mismatch
        post(
            "/v1/chat/completions",
            content=b'{"model":"chat-production","x":"' + b"x" * 5000 + b'"}',
        )
        post(
            "/v1/chat/completions",
            json=_chat("chat-production"),
            headers={"x-relaymw-pin": "gpt-v2", "x-relaymw-pin-token": PIN_TOKEN + "x"},
        )
        post(
            "/v1/chat/completions",
            json=_chat("chat-production"),
            headers={"x-relaymw-pin": "gpt-v2", "x-relaymw-pin-token": PIN_TOKEN},
        )
        post(
            "/v1/chat/completions",
            json=_chat("chat-production"),
            headers={"cookie": f"relay_chat={forged}"},
        )
        post("/v1/chat/completions", json=_chat("broken-route"))  # unreachable
        post("/v1/chat/completions", json=_chat("broken-route", stream=True))
        fake.set("slow-model", fault="stall")
        post("/v1/chat/completions", json=_chat("slow-route"))  # times out
        post("/v1/chat/completions", json=_chat("wrongkey-route"))  # the upstream says 401
        for fault in ("reset", "malformed", "truncate"):
            fake.set("claude-sonnet-4-5", fault=fault)
            fake.set("claude-sonnet-4-5-20250929", fault=fault)
            post("/v1/messages", json=_messages("review-production"))
            post("/v1/messages", json=_messages("review-production", stream=True))
            post("/api/review", json=_messages("review-production"))
        fake.set("*", status=500)
        post("/v1/chat/completions", json=_chat("chat-production"))
        fake.set("*", status=429)
        post("/v1/messages", json=_messages("review-production"))
        fake.reset()  # fmt: skip
    return out


BAD_DOCUMENTS: list[tuple[str, Callable[[dict[str, Any]], object]]] = [
    # A whole document with every secret in it and one mistake (weights sum to 105).
    ("toml", lambda doc: doc["routes"][0]["route_rules"][0].update(weight=55)),
    # A secret's reference on the wrong line: a Decimal field that echoes what it was given.
    ("json", lambda doc: doc["versions"][0].update(cost_limit_per_request=f"${{{ENV_KEY_NAME}}}")),
    ("json", lambda doc: doc["routes"][0].update(model_alias=f"${{{ENV_KEY_NAME}}}", paths=7)),
]
YAML_BROKEN = [  # YAML that quotes part of itself in its error
    f"upstreams:\n  openai:\n    base_url: http://x\n    api_key: *{UPSTREAM_KEY}\n",
    f"upstreams:\n  openai:\n    base_url: http://x\n    api_key: !{UPSTREAM_KEY} x\n",
    f"sticky:\n  secret: '{COOKIE_SECRET}\n",
]


def reject_documents(relay: Relay) -> None:
    import tomli_w

    for i, (fmt, breaks) in enumerate(BAD_DOCUMENTS):
        doc = json.loads(json.dumps(relay.snapshot.document))
        breaks(doc)
        data = tomli_w.dumps(doc) if fmt == "toml" else json.dumps(doc)
        assert not relay.apply_document(RawDocument(data.encode(), fmt, f"bad-{i}", "hostile"))
    for i, text in enumerate(YAML_BROKEN):
        assert not relay.apply_document(RawDocument(text.encode(), "yaml", f"yaml-{i}", "hostile"))


# --- the test ---------------------------------------------------------------------------------


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_KEY_NAME, UPSTREAM_KEY)
    monkeypatch.setenv(ENV_COOKIE_NAME, COOKIE_SECRET)


def test_no_secret_in_responses_logs_signals_or_audit(
    environment: None,
    redis_url: str,
    tmp_path: Path,
    captured: tuple[Everything, SignalLog],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    handler, signal_log = captured
    audit_path = tmp_path / "audit.jsonl"
    audit, logging_sink = JsonlAuditSink(audit_path), LoggingSink(level=logging.DEBUG)
    responses: list[httpx.Response] = []
    try:
        with FakeLLM(api_key=UPSTREAM_KEY, record_requests=False) as fake:
            for serve, make in ((serve_asgi, asgi_app), (serve_wsgi, wsgi_app)):
                relay = Relay(secret_document(fake.base_url, redis_url))
                try:
                    with serve(make(relay)) as base:
                        responses += traffic(base, fake)
                    reject_documents(relay)
                finally:
                    relay.close()
        audit.flush(10)
    finally:
        audit.close()
        logging_sink.close()
    out, err = capfd.readouterr()

    assert len(responses) > 50
    statuses = [r.status_code for r in responses]
    assert 200 in statuses and 502 in statuses and 504 in statuses and 401 in statuses
    leaks: list[str] = []
    for r in responses:
        where = f"a {r.status_code} response to {r.request.url.path}"
        leaks += _leaks(r.content, where)
        leaks += _leaks("\n".join(f"{k}: {v}" for k, v in r.headers.multi_items()), where)
    records = [caplog.text, *handler.lines]
    assert any("rejected configuration" in line for line in records), "no rejection was logged"
    leaks += _leaks("\n".join(records), "the logs")
    leaks += _leaks(out + err, "stdout/stderr")
    leaks += _leaks("\n".join(signal_log.lines), "a signal's arguments")
    audit_text = audit_path.read_text()
    assert '"event":"config_rejected"' in audit_text and '"event":"request_finished"' in audit_text
    leaks += _leaks(audit_text, "the audit file")
    assert not leaks, "\n".join(leaks)


def _leaks(text: str | bytes, where: str) -> list[str]:
    """Each secret found in ``text``, with what surrounds it."""
    data = text.encode("utf-8", "replace") if isinstance(text, str) else text
    return [f"{s} in {where}: {_excerpt(data, s)}" for s in SECRETS if s.encode() in data]


def _no_secret(text: str | bytes, where: str) -> None:
    data = text.encode("utf-8", "replace") if isinstance(text, str) else text
    found = [s for s in SECRETS if s.encode() in data]
    assert not found, f"{found} in {where}: " + _excerpt(data, found[0])


def _excerpt(data: bytes, secret: str) -> str:
    i = data.find(secret.encode())
    return repr(data[max(0, i - 200) : i + len(secret) + 80])


def test_credentials_in_an_upstream_url(
    environment: None, fake_llm: FakeLLM, captured: tuple[Everything, SignalLog]
) -> None:
    """An upstream ``base_url`` with a user and password in it (as some proxies want): a
    request through it gets an answer (a clear error at worst, never a 500), and the password
    shows up nowhere."""
    handler, signal_log = captured
    doc = relay_document(fake_llm.base_url)
    doc["upstreams"]["openai"]["base_url"] = (
        fake_llm.base_url.replace("http://", f"http://ops:{URL_PASSWORD}@") + "/v1"
    )
    try:
        relay = Relay(doc)
    except ConfigError as exc:  # refusing such a URL outright is fine too, if it says why
        _no_secret(str(exc), "the configuration error")
        return
    try:
        with serve_asgi(asgi_app(relay)) as base:
            r = httpx.post(f"{base}/v1/chat/completions", json=_chat("chat-production"))
    finally:
        relay.close()
    assert r.status_code < 500 or r.status_code in (502, 504), (r.status_code, r.text)
    _no_secret(r.content, "the response")
    _no_secret("\n".join(handler.lines), "the logs")
    _no_secret("\n".join(signal_log.lines), "a signal's arguments")


@pytest.mark.parametrize("server", ["asgi", "wsgi"])
@pytest.mark.parametrize("fault", ["reset", "truncate"])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_faults_answer_in_protocol_shape(
    fake_llm: FakeLLM, server: str, fault: str, stream: bool
) -> None:
    """An upstream that resets or cuts its answer short: a 502 in the client's protocol shape
    before anything was sent, or the started stream ended; never a 500."""
    relay = Relay(relay_document(fake_llm.base_url))
    fake_llm.set("*", fault=fault)
    serve = serve_asgi if server == "asgi" else serve_wsgi
    app = asgi_app(relay) if server == "asgi" else wsgi_app(relay)
    try:
        with serve(app) as base:
            r = httpx.post(
                f"{base}/v1/messages", json=_messages("review-production", stream=stream)
            )
    finally:
        relay.close()
    if r.status_code == 200:
        assert stream and r.headers["content-type"].startswith("text/event-stream")
        return
    raw = [(k.encode(), v.encode("latin-1")) for k, v in r.headers.multi_items()]
    check_rejection(Response(r.status_code, raw, r.content), "anthropic", upstream_failed=True)
    assert r.status_code == 502
