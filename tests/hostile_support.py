"""Shared harness of the hostile-input suites: raw ASGI and WSGI calls (no server, no mocking
of relaymw), the relay configuration they run against, hypothesis settings and checks.

The raw calls build ``scope``/``receive``/``send`` and ``environ``/``start_response``
themselves, so thousands of generated requests run in seconds through the real middleware;
a smaller sample goes through uvicorn and waitress in the test modules to prove the stack.
"""

from __future__ import annotations

import asyncio
import copy
import io
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

import attrs
import orjson
from hypothesis import HealthCheck, Phase, settings

from relaymw import RelayMiddleware, RelayWSGIMiddleware
from relaymw.engine import Relay
from tests.support import UPSTREAM_KEY, relay_document

# --- hypothesis ------------------------------------------------------------------------------

# Deterministic (CI reruns the same cases), no example database, no deadline: the cases are
# fast, but a shared 2-core machine makes per-example timing meaningless.
HOSTILE = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    report_multiple_bugs=False,  # shrink one failure fast rather than every distinct one
    phases=(Phase.explicit, Phase.generate, Phase.shrink),  # no explain: plain examples
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
        HealthCheck.large_base_example,
    ],
)
# RELAYMW_HOSTILE_SCALE=10 runs ten times the cases (a deeper, slower run).
SCALE = float(os.environ.get("RELAYMW_HOSTILE_SCALE", "1"))


def examples(n: int) -> settings:
    return settings(HOSTILE, max_examples=max(1, int(n * SCALE)))


class Tally:
    """How many generated cases each test ran, so a module can prove its total."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# --- the configuration under attack ----------------------------------------------------------

COOKIE_SECRET = "cookie-secret-hostile-7f3a"
PIN_TOKEN = "pin-token-hostile-91c2"
SECRETS = (UPSTREAM_KEY, COOKIE_SECRET, PIN_TOKEN)
MAX_BODY = 64 * 1024
CHAT, REVIEW = "chat-production", "review-production"
ALIASES = (CHAT, REVIEW)
# allow_client_pin on the chat route: its tags are accepted as ``model``.
PIN_TAGS = ("gpt-v1", "gpt-v2")
ROUTE_FAMILY = {CHAT: "openai", REVIEW: "anthropic", "gpt-v1": "openai", "gpt-v2": "openai"}
IN_APP_PATH = "/api/review"
# claude-v3 is on the review route with weight 0: only an operator pin with the right token
# can choose it, so a forged cookie or a wrong token naming it is visible in the response.
HIDDEN_TAG = "claude-v3"


def hostile_document(fake_url: str) -> dict[str, Any]:
    """``relay_document`` plus everything hostile input can reach: signed cookies, operator
    pinning, client pins, a cost cap (clamp), rate limits and a budget (in memory), and a
    small body limit so 413 is reachable without megabytes per case."""
    doc = relay_document(fake_url)
    doc["versions"].append(
        {
            "version_tag": HIDDEN_TAG,
            "model": "claude-sonnet-4-5",
            "upstream_endpoint": "anthropic",
            "parameters": {"max_tokens": 64},
        }
    )
    chat, review = doc["routes"]
    chat.update(allow_client_pin=True, cost_limit_per_request=0.5, cost_policy="clamp")
    review["route_rules"].append({"version_tag": HIDDEN_TAG, "weight": 0})
    review["rate_limits"] = ["1000000/minute"]
    review["token_limits"] = ["1000000000/minute"]
    doc["budgets"] = [{"scope": "global", "period": "day", "limit_usd": 1000000}]
    doc["sticky"] = {"secret": COOKIE_SECRET}
    doc["pinning"] = {"token": PIN_TOKEN}
    doc["gateway"] = {"max_body_bytes": MAX_BODY}
    return copy.deepcopy(doc)


GATEWAY_PATHS = {
    "/v1/chat/completions": "openai",
    "/v1/completions": "openai",
    "/v1/embeddings": "openai",
    "/v1/responses": "openai",
    "/v1/messages": "anthropic",
}

# --- what a response must never be -------------------------------------------------------------

_TRACEBACK = re.compile(
    rb'Traceback \(most recent call last\)|File "[^"]+", line \d+|'
    rb"\b(?:TypeError|KeyError|AttributeError|RecursionError|ValueError|IndexError)\b"
)


@attrs.define
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    crash: str | None = None  # the traceback when the middleware raised

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def all(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name]

    def json(self) -> Any:
        return orjson.loads(self.body)


def check_sane(resp: Response, context: object = "") -> None:
    """No crash, no 500, no traceback text and no header that could split a response."""
    assert resp.crash is None, f"middleware raised for {context!r}:\n{resp.crash}"
    assert resp.status < 500, f"{resp.status} for {context!r}: {resp.body[:500]!r}"
    assert resp.status >= 100, resp.status
    assert not _TRACEBACK.search(resp.body), f"traceback text in response: {resp.body[:800]!r}"
    for name, value in resp.headers:
        assert b"\r" not in value and b"\n" not in value, (name, value)
        assert b"\r" not in name and b"\n" not in name and b":" not in name, name


# The error types Anthropic's API (and so its SDK) knows.
ANTHROPIC_ERROR_TYPES = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "billing_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
        "rate_limit_error",
        "api_error",
        "timeout_error",
        "overloaded_error",
    }
)


def check_rejection(
    resp: Response, family: str, code: str | None = None, upstream_failed: bool = False
) -> dict[str, Any]:
    """A relaymw refusal: a 4xx JSON error in the client's protocol shape (``upstream_failed``:
    also relaymw's 502/504 for an unreachable or silent upstream). Returns the error."""
    allowed = (502, 504) if upstream_failed else ()
    assert 400 <= resp.status < 500 or resp.status in allowed, (resp.status, resp.body[:300])
    assert resp.header(b"content-type") == b"application/json", resp.headers
    length = resp.header(b"content-length")
    assert length is not None and int(length) == len(resp.body)
    doc = resp.json()
    if family == "anthropic":
        assert set(doc) == {"type", "error"} and doc["type"] == "error", doc
        err = doc["error"]
        assert err["type"] in ANTHROPIC_ERROR_TYPES, err
    else:
        assert set(doc) == {"error"}, doc
        err = doc["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["type"], str) and err["type"], err
    assert isinstance(err["message"], str) and err["message"], err
    if code is not None:
        assert err["code"] == code, (err, code)
    return dict(err)


def assert_no_secrets(text: str | bytes, where: str, secrets: Iterable[str] = SECRETS) -> None:
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    for secret in secrets:
        assert secret.encode() not in data, f"secret {secret[:6]}... found in {where}"


# --- raw ASGI -------------------------------------------------------------------------------------


class EchoASGI:
    """The app behind the middleware: answers 200 and remembers exactly what it received."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] | None = None

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        from relaymw import current_version

        choice = scope.get("state", {}).get("relay")
        self.seen = {
            "method": scope["method"],
            "path": scope["path"],
            "raw_path": scope.get("raw_path"),
            "query_string": scope["query_string"],
            "headers": list(scope["headers"]),
            "body": b"".join(chunks),
            "choice": choice,
            "current": current_version(),
        }
        body = b'{"echo":true}'
        headers = [(b"content-type", b"application/json"), (b"x-echo", b"1")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class RawASGI:
    """Calls an ASGI app in-process on one persistent event loop (the relay's upstream
    clients are bound to it), checking every message the app sends against the ASGI spec."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.inner = EchoASGI()
        self.app = RelayMiddleware(self.inner, relay=relay)
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        self.loop.run_until_complete(self.relay.aclose())
        self.loop.close()

    def call(
        self,
        method: str,
        path: str,
        headers: list[tuple[bytes, bytes]],
        body_parts: list[bytes],
        query: bytes = b"",
        client: tuple[str, int] | None = ("203.0.113.7", 40000),
        scheme: str = "http",
    ) -> Response:
        self.inner.seen = None
        return self.loop.run_until_complete(
            asgi_request(self.app, method, path, headers, body_parts, query, client, scheme)
        )


async def asgi_request(
    app: Any,
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    body_parts: list[bytes],
    query: bytes = b"",
    client: tuple[str, int] | None = ("203.0.113.7", 40000),
    scheme: str = "http",
) -> Response:
    """One HTTP request to an ASGI app, as a server would make it: the body in the given
    receive messages, then (once the response is complete) a disconnect."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": scheme,
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": client,
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    parts = list(body_parts) or [b""]
    finished = asyncio.Event()
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if parts:
            chunk = parts.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(parts)}
        await finished.wait()  # a real client stays until the response is complete
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            finished.set()

    try:
        await asyncio.wait_for(app(scope, receive, send), timeout=30)
    except Exception:
        return Response(500, [], b"", crash=traceback.format_exc())
    finally:
        finished.set()
    return _asgi_response(messages)


def _asgi_response(messages: list[dict[str, Any]]) -> Response:
    if not messages:
        return Response(500, [], b"", crash="the app sent no response at all")
    start, rest = messages[0], messages[1:]
    assert start["type"] == "http.response.start", start
    status = start["status"]
    assert isinstance(status, int), status
    headers: list[tuple[bytes, bytes]] = []
    for name, value in start.get("headers", []):
        assert isinstance(name, bytes) and isinstance(value, bytes), (name, value)
        headers.append((name, value))
    body = b""
    for i, message in enumerate(rest):
        assert message["type"] == "http.response.body", message
        body += message.get("body", b"")
        if not message.get("more_body"):
            assert i == len(rest) - 1, "messages after the final body message"
    assert rest and not rest[-1].get("more_body"), "the response never ended"
    return Response(status, headers, body)


# --- raw WSGI -------------------------------------------------------------------------------------


class EchoWSGI:
    def __init__(self) -> None:
        self.seen: dict[str, Any] | None = None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        from relaymw import current_version

        length = environ.get("CONTENT_LENGTH") or ""
        stream = environ["wsgi.input"]
        ok = length.isascii() and length.isdigit() and len(length) < 12
        body = stream.read(int(length)) if ok else b""
        self.seen = {
            "method": environ["REQUEST_METHOD"],
            "path": environ["PATH_INFO"],
            "query": environ.get("QUERY_STRING", ""),
            "headers": {k: v for k, v in environ.items() if k.startswith("HTTP_")},
            "body": body,
            "choice": environ.get("relaymw.version"),
            "current": current_version(),
        }
        start_response("200 OK", [("Content-Type", "application/json"), ("X-Echo", "1")])
        return [b'{"echo":true}']


class RawWSGI:
    def __init__(self, relay: Relay) -> None:
        self.inner = EchoWSGI()
        self.app = RelayWSGIMiddleware(self.inner, relay=relay)

    def call(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes,
        query: str = "",
        content_length: str | None = "auto",
        input_terminated: bool = False,
    ) -> Response:
        """``headers`` are (name, value) as a server decodes them (latin-1 str); repeated
        names are joined with ", " as PEP 3333 servers do. ``content_length`` "auto" is the
        body's length, None leaves CONTENT_LENGTH out, anything else is sent as is."""
        self.inner.seen = None
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method,
            "SCRIPT_NAME": "",
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8000",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "203.0.113.7",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        if input_terminated:
            environ["wsgi.input_terminated"] = True
        if content_length == "auto":
            environ["CONTENT_LENGTH"] = str(len(body))
        elif content_length is not None:
            environ["CONTENT_LENGTH"] = content_length
        for name, value in headers:
            key = name.upper().replace("-", "_")
            if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                environ.setdefault(key, value)
                continue
            key = "HTTP_" + key
            environ[key] = f"{environ[key]}, {value}" if key in environ else value
        return self._run(environ)

    def _run(self, environ: dict[str, Any]) -> Response:
        started: list[tuple[str, list[tuple[str, str]]]] = []

        def start_response(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
            assert isinstance(status, str) and re.fullmatch(r"\d{3} .+", status), status
            for name, value in headers:
                assert isinstance(name, str) and isinstance(value, str), (name, value)
                value.encode("latin-1")  # PEP 3333: header values must be latin-1
            started.append((status, list(headers)))
            return lambda data: None

        try:
            result = self.app(environ, start_response)
            try:
                body = b"".join(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except Exception:
            return Response(500, [], b"", crash=traceback.format_exc())
        assert started, "start_response was never called"
        status, headers = started[-1]
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        return Response(int(status[:3]), raw, body)


# --- expectations of a gateway request ------------------------------------------------------------


def gateway_expectation(
    body: bytes, headers: Iterable[tuple[bytes, bytes]] = (), limit: int = MAX_BODY
) -> tuple[str, Any]:
    """What relaymw must do with a POST to a gateway path, per the README's error table:
    ``(kind, parsed)`` with kind ``too_large``, ``invalid_json``, ``invalid_request``,
    ``missing_model``, ``passthrough`` (a model relaymw does not route) or ``claimed``.

    A declared Content-Length over the limit on a body that is not (a server would never
    deliver that body: it waits for the rest) may be refused early or judged by the body:
    kind ``declared_too_large``, with the body's own ``(kind, parsed)``."""
    if len(body) > limit:
        return "too_large", None
    declared = any(
        name == b"content-length" and value.isdigit() and int(value) > limit
        for name, value in headers
    )
    if declared:
        return "declared_too_large", gateway_expectation(body, (), limit)
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "invalid_json", None
    if not isinstance(parsed, dict):
        return "invalid_request", parsed
    model = parsed.get("model")
    if not isinstance(model, str) or not model:
        return "missing_model", parsed
    if model in ALIASES or model in PIN_TAGS:
        return "claimed", parsed
    return "passthrough", parsed


_CODES = {
    "too_large": (413, "request_too_large"),
    "invalid_json": (400, "invalid_json"),
    "invalid_request": (400, "invalid_request"),
    "missing_model": (400, "missing_model"),
}


def check_gateway_answer(
    resp: Response,
    family: str,
    kind: str,
    parsed: Any,
    sent_body: bytes,
    seen: dict[str, Any] | None,
    path: str,
    may_refuse: bool = False,
) -> None:
    """The answer matches the expectation: an exact refusal, the app given the body untouched,
    or a relayed call (or a documented refusal of it) from the chosen version.

    ``may_refuse``: a claimed request relaymw cannot relay as it is (a header value the HTTP
    client refuses to send, JSON nested deeper than it can write) may also get any clear 4xx
    in the client's protocol shape instead."""
    check_sane(resp, (path, sent_body[:200]))
    if kind == "declared_too_large":
        if resp.status == 413:
            check_rejection(resp, family, "request_too_large")
            return
        kind, parsed = parsed
    if kind in _CODES:
        status, code = _CODES[kind]
        assert resp.status == status, (resp.status, resp.body[:300], kind)
        check_rejection(resp, family, code)
        assert seen is None, "a refused request reached the app"
        return
    if kind == "passthrough":
        assert resp.status == 200 and resp.header(b"x-echo") == b"1", (resp.status, resp.body)
        assert seen is not None and seen["body"] == sent_body, "the app got another body"
        assert seen["path"] == path
        assert resp.header(b"x-relaymw-version") is None
        return
    assert seen is None, "a claimed request reached the app"
    model = parsed["model"]
    relayed = resp.header(b"x-relaymw-version") is not None
    if may_refuse and resp.status != 200:
        if not relayed:
            check_rejection(resp, family)  # relaymw's own refusal: shaped
        assert 400 <= resp.status < 500, resp.status
        return
    if ROUTE_FAMILY[model] != family:
        check_rejection(resp, family, "protocol_mismatch")
        return
    if resp.status != 200:
        err = check_rejection(resp, family)  # nothing else may refuse it
        assert err.get("code") == "cost_limit_exceeded", err
        return
    version = resp.header(b"x-relaymw-version")
    assert version is not None, resp.headers
    if model in PIN_TAGS:
        assert version == model.encode(), (version, model)
    ctype = resp.header(b"content-type") or b""
    if ctype.startswith(b"text/event-stream"):
        assert _stream_complete(resp.body, path), resp.body[-300:]
    else:
        assert ctype.startswith(b"application/json"), ctype
        orjson.loads(resp.body)


# The client headers relaymw forwards upstream (README: "other headers").
FORWARDED = frozenset({b"accept", b"openai-beta", b"anthropic-beta", b"anthropic-version"})


def unforwardable(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a header relaymw forwards holds what an HTTP client cannot (or should not)
    send on: a control character, a byte outside visible ASCII, or kilobytes of value that
    the upstream's server may refuse. relaymw may then refuse the call itself (any clear 4xx
    in the client's shape), or relay it and pass the upstream's own 4xx back as is."""
    forwarded = [v for k, v in headers if k.lower() in FORWARDED]
    too_long = sum(len(v) for v in forwarded) > 4096
    return too_long or any(not (0x20 <= b < 0x7F or b == 0x09) for v in forwarded for b in v)


def _stream_complete(body: bytes, path: str) -> bool:
    if path.endswith("/messages"):
        return b"message_stop" in body
    if path.endswith("/responses"):
        return b"response.completed" in body or b"response.incomplete" in body
    return body.rstrip().endswith(b"data: [DONE]")
