"""Hostile input against the middleware: generated bodies, headers, cookies, paths and query
strings through the ASGI and WSGI adapters (raw in-process calls, real code paths, nothing
of relaymw mocked), and a sample over real uvicorn and waitress servers.

Every answer must be one of: an exact refusal in the client's protocol shape (README's error
table), the app's own answer with the request untouched, or a relayed call. Never a 500,
never traceback text. The module runs at least 10,000 generated cases (see the last test).
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from relaymw import Relay, RelayMiddleware, RelayWSGIMiddleware
from relaymw.testing import FakeLLM, serve_asgi
from tests.hostile_strategies import (
    content_lengths,
    cookie_names,
    cookie_triple,
    cookie_values,
    header_names,
    header_values,
    request_bodies,
    signed_cookie,
    split_body,
    tampered,
)
from tests.hostile_strategies import dumps as json_dumps
from tests.hostile_support import (
    CHAT,
    COOKIE_SECRET,
    GATEWAY_PATHS,
    HIDDEN_TAG,
    IN_APP_PATH,
    MAX_BODY,
    PIN_TOKEN,
    REVIEW,
    EchoASGI,
    EchoWSGI,
    RawASGI,
    RawWSGI,
    Response,
    Tally,
    check_gateway_answer,
    check_rejection,
    check_sane,
    examples,
    gateway_expectation,
    hostile_document,
    unforwardable,
)
from tests.support import serve_wsgi

TALLY = Tally()
MIN_TOTAL = 10_000

gateway_paths = st.sampled_from(sorted(GATEWAY_PATHS))


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeLLM]:
    with FakeLLM(seed=7, record_requests=False) as server:
        yield server


@pytest.fixture(scope="module")
def relay(fake: FakeLLM) -> Iterator[Relay]:
    r = Relay(hostile_document(fake.base_url))
    yield r
    r.close()


@pytest.fixture(scope="module")
def asgi(relay: Relay) -> Iterator[RawASGI]:
    harness = RawASGI(relay)
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def wsgi(relay: Relay) -> RawWSGI:
    return RawWSGI(relay)


def _json_request(body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]


# --- ASGI: bodies ------------------------------------------------------------------------------


@examples(1500)
@given(path=gateway_paths, body=request_bodies(), cuts=st.lists(st.integers(0, 2**16), max_size=4))
def test_asgi_gateway_bodies(asgi: RawASGI, path: str, body: bytes, cuts: list[int]) -> None:
    """Generated bodies (broken JSON, wrong types for every field, giant strings, NaN,
    huge numbers, invalid UTF-8), delivered in arbitrary receive chunks."""
    TALLY.count("asgi_gateway_bodies")
    headers = _json_request(body)
    resp = asgi.call("POST", path, headers, split_body(body, cuts))
    kind, parsed = gateway_expectation(body, headers)
    check_gateway_answer(resp, GATEWAY_PATHS[path], kind, parsed, body, asgi.inner.seen, path)


@examples(1500)
@given(path=gateway_paths, body=st.binary(max_size=2000))
def test_asgi_gateway_arbitrary_bytes(asgi: RawASGI, path: str, body: bytes) -> None:
    TALLY.count("asgi_gateway_arbitrary_bytes")
    headers = [(b"content-type", b"application/json")]
    resp = asgi.call("POST", path, headers, [body])
    kind, parsed = gateway_expectation(body, headers)
    check_gateway_answer(resp, GATEWAY_PATHS[path], kind, parsed, body, asgi.inner.seen, path)


@examples(300)
@given(
    path=gateway_paths,
    model=st.sampled_from([CHAT, REVIEW, "not-routed"]),
    depth=st.integers(1, 1100),
    shape=st.sampled_from(["list", "object"]),
    field=st.sampled_from(["messages", "metadata", "tools", "system"]),
)
def test_asgi_deeply_nested_json(
    asgi: RawASGI, path: str, model: str, depth: int, shape: str, field: str
) -> None:
    """orjson parses up to 1024 levels but writes at most 254, and the prompt estimate walks
    the body recursively: nesting in between must still get a clear answer."""
    TALLY.count("asgi_deeply_nested_json")
    if shape == "list":
        inner = b"[" * depth + b"]" * depth
    else:
        inner = b'{"a":' * depth + b"1" + b"}" * depth
    body = b'{"model":"' + model.encode() + b'","' + field.encode() + b'":' + inner + b"}"
    resp = asgi.call("POST", path, _json_request(body), [body])
    kind, parsed = gateway_expectation(body)
    family, seen = GATEWAY_PATHS[path], asgi.inner.seen
    check_gateway_answer(resp, family, kind, parsed, body, seen, path, may_refuse=depth > 64)


# --- ASGI: headers -----------------------------------------------------------------------------


@st.composite
def header_lists(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """Up to 8 drawn headers, sometimes repeated up to 40 times (repeats of content-length
    too), huge values, obs-text and control characters."""
    names = draw(st.lists(header_names, max_size=8))
    out = [(n, draw(content_lengths if n == b"content-length" else header_values)) for n in names]
    if out and draw(st.integers(0, 4)) == 0:
        out = [out[i % len(out)] for i in range(draw(st.integers(1, 40)))]
    return out


@examples(1200)
@given(
    path=st.sampled_from([*sorted(GATEWAY_PATHS), IN_APP_PATH]),
    headers=header_lists(),
    model=st.sampled_from([CHAT, REVIEW, "gpt-v1", "other-model"]),
    stream=st.booleans(),
)
def test_asgi_hostile_headers(
    asgi: RawASGI, path: str, headers: list[tuple[bytes, bytes]], model: str, stream: bool
) -> None:
    """Hostile header sets on a valid body: huge and non-ASCII values, duplicates, lying or
    malformed content-length, forged credentials and pin headers. Credentials never reach
    the upstream (tested elsewhere); here nothing may crash or leak into response headers."""
    TALLY.count("asgi_hostile_headers")
    body = json_dumps(
        {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    )
    resp = asgi.call("POST", path, headers, [body])
    if path == IN_APP_PATH:
        _check_in_app(resp, asgi.inner.seen, body, headers)
        return
    kind, parsed = gateway_expectation(body, headers)
    family, seen = GATEWAY_PATHS[path], asgi.inner.seen
    lenient = unforwardable(headers)
    check_gateway_answer(resp, family, kind, parsed, body, seen, path, may_refuse=lenient)
    for _, value in resp.headers:  # nothing the client sent is echoed into a header
        assert not any(len(v) > 16 and v in value for _, v in headers), value[:80]


def _check_in_app(
    resp: Response,
    seen: dict[str, Any] | None,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    expect_tag: str | None = None,
) -> str:
    """The in-app route chose an eligible version, told the app and the client, and passed the
    request on untouched. Returns the tag."""
    check_sane(resp, headers[:3])
    assert resp.status == 200 and resp.header(b"x-echo") == b"1", (resp.status, resp.body)
    tag = (resp.header(b"x-relaymw-version") or b"").decode()
    assert seen is not None
    assert seen["body"] == body and seen["headers"] == headers, "the app got another request"
    assert seen["choice"] is not None and str(seen["choice"]) == tag
    assert seen["current"] is seen["choice"]
    pinned = _pinned(headers)
    if expect_tag is not None:
        assert tag == expect_tag, (tag, expect_tag)
    elif pinned:
        assert tag == HIDDEN_TAG
    else:
        assert tag in ("claude-v1", "claude-v2"), tag
    return tag


def _first(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    return next((v for k, v in headers if k == name), None)


def _pinned(headers: list[tuple[bytes, bytes]]) -> bool:
    """An operator pin of the hidden version: its header and exactly the right token."""
    return (
        _first(headers, b"x-relaymw-pin") == HIDDEN_TAG.encode()
        and _first(headers, b"x-relaymw-pin-token") == PIN_TOKEN.encode()
    )


@examples(600)
@given(
    token=st.one_of(
        st.just(PIN_TOKEN),
        st.sampled_from([PIN_TOKEN[:-1], PIN_TOKEN + "x", PIN_TOKEN.upper(), "", " " + PIN_TOKEN]),
        st.text(max_size=40),
        st.builds(lambda n: "a" * n, st.integers(1, 10_000)),
    ),
    pin=st.sampled_from([HIDDEN_TAG, "claude-v1", "gpt-v1", "", "x" * 300]),
    surface=st.sampled_from(["in_app", "gateway"]),
)
def test_asgi_operator_pin_needs_the_exact_token(
    asgi: RawASGI, token: str, pin: str, surface: str
) -> None:
    """Generated wrong tokens never pin (the pinned version has weight 0: visible)."""
    TALLY.count("asgi_operator_pin")
    headers = [
        (b"x-relaymw-pin", pin.encode()),
        (b"x-relaymw-pin-token", token.encode("utf-8")),
    ]
    right = token == PIN_TOKEN
    expected = pin if right and pin in ("claude-v1", "claude-v2", HIDDEN_TAG) else None
    if surface == "in_app":
        resp = asgi.call("POST", IN_APP_PATH, headers, [b"{}"])
        tag = _check_in_app(resp, asgi.inner.seen, b"{}", headers, expected)
    else:
        body = json_dumps({"model": REVIEW, "messages": [{"role": "user", "content": "x"}]})
        resp = asgi.call("POST", "/v1/messages", headers, [body])
        check_sane(resp, headers)
        assert resp.status == 200, resp.body
        tag = (resp.header(b"x-relaymw-version") or b"").decode()
        if expected:
            assert tag == expected
    if not right:
        assert tag != HIDDEN_TAG
    if expected:
        assert resp.header(b"set-cookie") is None  # a pin never sets the sticky cookie


# --- ASGI: cookies -----------------------------------------------------------------------------


EITHER = "either"  # an edit that leaves what the cookie says unchanged (spaces, quotes)


@st.composite
def cookie_cases(draw: st.DrawFn, alias: str, cookie_name: str) -> tuple[bytes, str | None]:
    """A Cookie header with up to 300 other cookies and at most one sticky cookie: genuine,
    tampered, expired, for another route, version or secret, or junk. Returns the header and
    the tag that must be honoured (None: must not be; EITHER: an edit that changes nothing
    the cookie says, such as surrounding quotes)."""
    now = int(time.time())
    tag = draw(st.sampled_from(["claude-v1", "claude-v2", HIDDEN_TAG, "gpt-v1", "gpt-v2"]))
    expires = draw(st.sampled_from([now + 3600, now + 10**6, now - 5, 10**12 - 1]))
    signed_for = draw(st.sampled_from([alias, alias, CHAT if alias == REVIEW else REVIEW]))
    secret = draw(st.sampled_from([COOKIE_SECRET] * 8 + ["", "wrong-secret"]))
    genuine = signed_cookie(signed_for, tag, expires, secret)
    kind = draw(st.sampled_from(["genuine", "tampered", "tampered", "junk", "none"]))
    value: str | None = None
    if kind == "genuine":
        value = genuine
    elif kind == "tampered":
        value = draw(tampered(genuine))
    elif kind == "junk":
        value = draw(cookie_values)
    eligible = {"claude-v1", "claude-v2"} if alias == REVIEW else {"gpt-v1", "gpt-v2"}
    valid = secret == COOKIE_SECRET and signed_for == alias and expires > now + 60
    expect: str | None = None
    if value is not None and valid and tag in eligible:
        if value == genuine:
            expect = tag
        elif cookie_triple(value) == cookie_triple(genuine):
            expect = EITHER
    # Other cookies: a few drawn ones, then up to 300 more made from them (cheap to generate).
    others = draw(st.lists(st.tuples(cookie_names, cookie_values), max_size=4))
    pairs = [f"{n}={v}" for n, v in others if n != cookie_name]
    repeat = draw(st.booleans())
    if pairs and repeat:
        pairs = [f"c{i}{pairs[i % len(pairs)]}" for i in range(draw(st.integers(1, 300)))]
    if value is not None:
        pairs.insert(draw(st.integers(0, len(pairs))), f"{cookie_name}={value}")
    sep = draw(st.sampled_from(["; ", ";", " ;  "]))
    return sep.join(pairs).encode("latin-1", "replace"), expect


def _check_sticky(resp: Response, cookie_name: str, alias: str, expect: str | None) -> str:
    tag = (resp.header(b"x-relaymw-version") or b"").decode()
    set_cookie = resp.header(b"set-cookie")
    assert tag != HIDDEN_TAG, "a cookie chose a version of weight 0"
    if expect == EITHER and set_cookie is None:
        return tag
    if expect not in (None, EITHER):
        assert tag == expect and set_cookie is None, (tag, expect, set_cookie)
        return tag
    # Not honoured: chosen by weight, and a fresh cookie that relaymw itself would accept.
    assert set_cookie is not None, resp.headers
    name, _, rest = set_cookie.decode("latin-1").partition("=")
    value = rest.split(";")[0]
    assert name == cookie_name
    fresh = cookie_triple(value)
    assert fresh is not None and fresh[0] == tag
    assert value == signed_cookie(alias, tag, fresh[1]), "the new cookie is not validly signed"
    return tag


@examples(1500)
@given(case=cookie_cases(REVIEW, "relay_review"), method=st.sampled_from(["GET", "POST"]))
def test_asgi_cookies_in_app(asgi: RawASGI, case: tuple[bytes, str | None], method: str) -> None:
    """Tampered, truncated, expired, cross-route, huge, non-ASCII and many cookies: only an
    intact, unexpired, eligible signed cookie is honoured; anything else is replaced."""
    TALLY.count("asgi_cookies_in_app")
    header, honoured = case
    headers = [(b"cookie", header)]
    resp = asgi.call(method, IN_APP_PATH, headers, [b""])
    _check_in_app(resp, asgi.inner.seen, b"", headers, None if honoured == EITHER else honoured)
    _check_sticky(resp, "relay_review", REVIEW, honoured)


@examples(300)
@given(case=cookie_cases(CHAT, "relay_chat"))
def test_asgi_cookies_gateway(asgi: RawASGI, case: tuple[bytes, str | None]) -> None:
    TALLY.count("asgi_cookies_gateway")
    header, honoured = case
    body = json_dumps({"model": CHAT, "messages": [{"role": "user", "content": "x"}]})
    resp = asgi.call("POST", "/v1/chat/completions", [(b"cookie", header)], [body])
    check_sane(resp, header[:100])
    assert resp.status == 200, resp.body
    _check_sticky(resp, "relay_chat", CHAT, honoured)


# --- ASGI: paths, query strings and methods: passthrough untouched ----------------------------

near_paths = st.sampled_from(
    [
        *GATEWAY_PATHS, IN_APP_PATH, "/v1/chat/completions/", "/V1/chat/completions",
        "//v1/messages", "/llm/v1/messages", "/v1/chat/completions\x00", "/api/review/",
        "/api/Review", "/v1/chat%2Fcompletions", "/v1/messages/../messages", "", "/", "*",
    ]
)  # fmt: skip
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH", "BREW"])


@examples(1200)
@given(
    path=near_paths | st.text(max_size=60).map(lambda t: "/" + t),
    method=methods,
    query=st.binary(max_size=200),
    headers=header_lists(),
    body=request_bodies() | st.binary(max_size=500),
)
def test_asgi_paths_and_passthrough(
    asgi: RawASGI,
    path: str,
    method: str,
    query: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
) -> None:
    """A request relaymw does not own reaches the app exactly as sent: method, path, query,
    every header (in order, repeats kept) and every body byte, with no relaymw header added."""
    TALLY.count("asgi_paths_and_passthrough")
    resp = asgi.call(method, path, headers, [body], query=query)
    seen = asgi.inner.seen
    if path in GATEWAY_PATHS and method == "POST":
        kind, parsed = gateway_expectation(body, headers)
        check_gateway_answer(resp, GATEWAY_PATHS[path], kind, parsed, body, seen, path)
        return
    if path == IN_APP_PATH:
        _check_in_app(resp, seen, body, headers)
        return
    check_sane(resp, (method, path))
    assert resp.status == 200 and resp.body == b'{"echo":true}'
    assert resp.headers == [(b"content-type", b"application/json"), (b"x-echo", b"1")]
    assert seen is not None
    assert (seen["method"], seen["path"], seen["query_string"]) == (method, path, query)
    assert seen["headers"] == headers and seen["body"] == body
    assert seen["choice"] is None and seen["current"] is None


# --- WSGI ----------------------------------------------------------------------------------------


def _latin1(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Headers as a WSGI server hands them over: latin-1 text, surrounding whitespace gone."""
    return [(k.decode("latin-1"), v.decode("latin-1").strip(" \t")) for k, v in headers]


@examples(1200)
@given(path=gateway_paths, body=request_bodies() | st.binary(max_size=600))
def test_wsgi_gateway_bodies(wsgi: RawWSGI, path: str, body: bytes) -> None:
    TALLY.count("wsgi_gateway_bodies")
    resp = wsgi.call("POST", path, [("Content-Type", "application/json")], body)
    kind, parsed = gateway_expectation(body)
    seen = wsgi.inner.seen
    check_gateway_answer(resp, GATEWAY_PATHS[path], kind, parsed, body, seen, path)


@examples(200)
@given(
    path=gateway_paths,
    model=st.sampled_from([CHAT, REVIEW, "other"]),
    depth=st.integers(1, 1100),
)
def test_wsgi_deeply_nested_json(wsgi: RawWSGI, path: str, model: str, depth: int) -> None:
    TALLY.count("wsgi_deeply_nested_json")
    body = b'{"model":"' + model.encode() + b'","messages":' + b"[" * depth + b"]" * depth + b"}"
    resp = wsgi.call("POST", path, [], body)
    kind, parsed = gateway_expectation(body)
    family, seen = GATEWAY_PATHS[path], wsgi.inner.seen
    check_gateway_answer(resp, family, kind, parsed, body, seen, path, may_refuse=depth > 64)


# CONTENT_LENGTH as servers may hand it over: waitress and gunicorn validate it, wsgiref (and
# so Django's runserver) passes the header through as sent, decoded as latin-1.
wsgi_content_lengths = st.one_of(
    st.just("auto"),
    st.none(),
    content_lengths.map(lambda b: b.decode("latin-1")),
    st.sampled_from(["²", "١٢", "\uff11\uff12", "9" * 5000, "0" * 30 + "5"]),
)


@examples(900)
@given(
    path=st.sampled_from([*sorted(GATEWAY_PATHS), IN_APP_PATH, "/other"]),
    headers=header_lists(),
    cookie=cookie_cases(REVIEW, "relay_review"),
    length=wsgi_content_lengths,
    terminated=st.booleans(),
    model=st.sampled_from([CHAT, REVIEW, "other-model"]),
)
def test_wsgi_hostile_headers_cookies_and_lengths(
    wsgi: RawWSGI,
    path: str,
    headers: list[tuple[bytes, bytes]],
    cookie: tuple[bytes, str | None],
    length: str | None,
    terminated: bool,
    model: str,
) -> None:
    TALLY.count("wsgi_hostile_headers")
    body = json_dumps({"model": model, "messages": [{"role": "user", "content": "x"}]})
    # The sticky cookie first: a server joins repeated Cookie headers, which would change it.
    hdrs = [("Cookie", cookie[0].decode("latin-1"))]
    hdrs += [(k, v) for k, v in _latin1(headers) if k.lower() not in ("cookie", "content-length")]
    resp = wsgi.call(path=path, method="POST", headers=hdrs, body=body,
                     content_length=length, input_terminated=terminated)  # fmt: skip
    check_sane(resp, (path, length))
    seen = wsgi.inner.seen
    if path == "/other":
        assert resp.status == 200 and seen is not None
        assert resp.header(b"x-relaymw-version") is None
        return
    if path == IN_APP_PATH:
        assert resp.status == 200 and seen is not None and seen["choice"] is not None
        if not _pinned([(k.lower().encode(), v.encode("latin-1")) for k, v in hdrs]):
            _check_sticky(resp, "relay_review", REVIEW, cookie[1])
        return
    effective = _wsgi_body(body, length, terminated)
    if effective is None:  # a length no server should pass on: anything sane will do
        if resp.status >= 400 and resp.header(b"x-relaymw-version") is None:
            check_rejection(resp, GATEWAY_PATHS[path])
        return
    kind, parsed = gateway_expectation(effective)
    if effective is TOO_LARGE:
        kind, parsed = "too_large", None
    lenient = unforwardable([(k.lower().encode(), v.encode("latin-1")) for k, v in hdrs])
    family = GATEWAY_PATHS[path]
    check_gateway_answer(resp, family, kind, parsed, effective, seen, path, may_refuse=lenient)


TOO_LARGE = b"<over the limit>"


def _wsgi_body(body: bytes, length: str | None, terminated: bool) -> bytes | None:
    """The body a WSGI app may read (PEP 3333): CONTENT_LENGTH bytes when it is a number;
    without one, the whole input only when the server marks it terminated. None when the
    length is neither a number nor absent (undefined)."""
    if length == "auto":
        return body
    if length is not None and length.isascii() and length.isdigit():
        n = int(length) if len(length.lstrip("0")) <= 18 else MAX_BODY + 1
        return TOO_LARGE if n > MAX_BODY else body[:n]
    if not length:
        return body if terminated else b""
    return None


@examples(600)
@given(
    path=near_paths | st.text(st.characters(max_codepoint=0xFF), max_size=60).map("/{}".format),
    method=methods,
    query=st.text(st.characters(max_codepoint=0xFF), max_size=100),
    body=st.binary(max_size=300),
)
def test_wsgi_passthrough_untouched(
    wsgi: RawWSGI, path: str, method: str, query: str, body: bytes
) -> None:
    TALLY.count("wsgi_passthrough")
    headers = [("X-Anything", "v\xe9"), ("Authorization", "Bearer client")]
    resp = wsgi.call(method, path, headers, body, query=query)
    seen = wsgi.inner.seen
    if path in GATEWAY_PATHS and method == "POST":
        kind, parsed = gateway_expectation(body)
        check_gateway_answer(resp, GATEWAY_PATHS[path], kind, parsed, body, seen, path)
        return
    check_sane(resp, (method, path))
    assert resp.status == 200 and seen is not None
    assert (seen["method"], seen["path"], seen["query"]) == (method, path, query)
    assert seen["body"] == body
    assert seen["headers"] == {"HTTP_X_ANYTHING": "v\xe9", "HTTP_AUTHORIZATION": "Bearer client"}
    if path == IN_APP_PATH:
        assert seen["choice"] is not None
    else:
        assert seen["choice"] is None and resp.header(b"x-relaymw-version") is None


# --- real servers ------------------------------------------------------------------------------


def _http(
    base: str, method: str, target: str, headers: list[tuple[str, bytes]], body: bytes
) -> Response:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.putheader("Connection", "close")
        conn.endheaders(body)
        r = conn.getresponse()
        data = r.read()
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in r.getheaders()]
        return Response(r.status, raw, data)
    finally:
        conn.close()


# Header values uvicorn (httptools) and waitress accept: no control characters but HTAB,
# no edge whitespace (obs-text bytes 0x80-0xFF are fine).
_NO_CONTROLS = bytes.maketrans(bytes([*range(0x20), 0x7F]), b"_" * 33)
server_header_values = header_values.map(
    lambda v: v[:2000].replace(b"\t", b" ").translate(_NO_CONTROLS).strip() or b"v"
)
server_headers = st.lists(
    st.tuples(
        st.sampled_from(["Cookie", "Authorization", "X-Api-Key", "Accept", "X-Relaymw-Pin",
                         "X-Relaymw-Pin-Token", "X-Forwarded-For", "Anthropic-Beta"]),
        server_header_values,
    ),
    max_size=6,
)  # fmt: skip


@pytest.fixture(scope="module")
def uvicorn_url(fake: FakeLLM) -> Iterator[tuple[str, EchoASGI]]:
    relay = Relay(hostile_document(fake.base_url))
    inner = EchoASGI()
    with serve_asgi(RelayMiddleware(inner, relay=relay)) as url:
        yield url, inner
    relay.close()


@pytest.fixture(scope="module")
def waitress_url(fake: FakeLLM) -> Iterator[tuple[str, EchoWSGI]]:
    relay = Relay(hostile_document(fake.base_url))
    inner = EchoWSGI()
    with serve_wsgi(RelayWSGIMiddleware(inner, relay=relay)) as url:
        yield url, inner
    relay.close()


def _server_case(
    base: str,
    inner: EchoASGI | EchoWSGI,
    path: str,
    body: bytes,
    headers: list[tuple[str, bytes]],
    query: str,
) -> None:
    inner.seen = None
    target = quote(path, safe="/%") + ("?" + quote(query, safe="=&") if query else "")
    resp = _http(base, "POST", target, [("Content-Type", b"application/json"), *headers], body)
    assert resp.status != 500, f"500 (the middleware raised) for {target!r} {headers!r}"
    assert resp.header(b"content-type") != b"text/plain; charset=utf-8", (
        f"the server itself refused the generated request: {resp.status} {resp.body!r} "
        f"for {target!r} {headers!r}"
    )
    if path in GATEWAY_PATHS:
        kind, parsed = gateway_expectation(body)
        lenient = unforwardable((k.lower().encode(), v) for k, v in headers)
        seen, family = inner.seen, GATEWAY_PATHS[path]
        check_gateway_answer(resp, family, kind, parsed, body, seen, path, may_refuse=lenient)
    else:
        check_sane(resp, path)
        assert resp.status == 200 and inner.seen is not None and inner.seen["body"] == body


# obs-text in a forwarded header: latin-1 to a WSGI app, and httpx encodes ASCII only.
_OBS_TEXT = json_dumps({"model": REVIEW, "messages": [{"role": "user", "content": "x"}]})
server_paths = st.sampled_from([*sorted(GATEWAY_PATHS), IN_APP_PATH, "/elsewhere"])


@examples(250)
@given(path=server_paths, body=request_bodies(), headers=server_headers, query=st.text(max_size=30))
@example(path="/v1/messages", body=_OBS_TEXT, headers=[("Accept", b"caf\xc3\xa9")], query="")
def test_uvicorn_sample(
    uvicorn_url: tuple[str, EchoASGI],
    path: str,
    body: bytes,
    headers: list[tuple[str, bytes]],
    query: str,
) -> None:
    TALLY.count("uvicorn_sample")
    _server_case(*uvicorn_url, path, body, headers, query)


@examples(250)
@given(path=server_paths, body=request_bodies(), headers=server_headers, query=st.text(max_size=30))
@example(path="/v1/messages", body=_OBS_TEXT, headers=[("Accept", b"caf\xc3\xa9")], query="")
@example(path="/v1/messages", body=_OBS_TEXT, headers=[("Anthropic-Beta", b"\xff")], query="")
def test_waitress_sample(
    waitress_url: tuple[str, EchoWSGI],
    path: str,
    body: bytes,
    headers: list[tuple[str, bytes]],
    query: str,
) -> None:
    TALLY.count("waitress_sample")
    _server_case(*waitress_url, path, body, headers, query)


@pytest.fixture(scope="module")
def uvicorn_h11_url(fake: FakeLLM) -> Iterator[tuple[str, EchoASGI]]:
    """uvicorn on h11: its default when httptools is not installed (relaymw does not require
    it). h11 hands the app header values with control characters (but CR, LF, NUL, VT, FF)."""
    relay = Relay(hostile_document(fake.base_url))
    inner = EchoASGI()
    with serve_asgi(RelayMiddleware(inner, relay=relay), http="h11") as url:
        yield url, inner
    relay.close()


_H11_VALUE_BYTES = bytes([0x09, *range(0x01, 0x09), *range(0x0E, 0x20), *range(0x20, 0x100)])
h11_header_values = st.lists(st.sampled_from(_H11_VALUE_BYTES), min_size=1, max_size=30).map(
    lambda v: bytes(v).strip(b" \t") or b"v"
)


@examples(150)
@given(
    path=st.sampled_from(sorted(GATEWAY_PATHS)),
    name=st.sampled_from(["Accept", "Anthropic-Beta", "Anthropic-Version", "OpenAI-Beta",
                          "Authorization", "Cookie", "X-Anything"]),
    value=h11_header_values,
    model=st.sampled_from([CHAT, REVIEW]),
)  # fmt: skip
def test_uvicorn_h11_header_bytes(
    uvicorn_h11_url: tuple[str, EchoASGI], path: str, name: str, value: bytes, model: str
) -> None:
    """Every header byte h11 lets through, in the headers relaymw forwards upstream too."""
    TALLY.count("uvicorn_h11_header_bytes")
    body = json_dumps({"model": model, "messages": [{"role": "user", "content": "x"}]})
    _server_case(*uvicorn_h11_url, path, body, [(name, value)], "")


@pytest.fixture(scope="module")
def wsgiref_url(fake: FakeLLM) -> Iterator[str]:
    """wsgiref, the server under Django's runserver: it hands Content-Length over as sent."""
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    relay = Relay(hostile_document(fake.base_url))
    server = make_server("127.0.0.1", 0, RelayWSGIMiddleware(EchoWSGI(), relay=relay),
                         handler_class=Quiet)  # fmt: skip
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    relay.close()


@pytest.mark.parametrize("length", [b"\xb2", b"\xb9", b"9" * 5000, b"-1", b"0x10"])
def test_wsgiref_content_length_as_sent(wsgiref_url: str, length: bytes) -> None:
    """A Content-Length that is not a number (a superscript digit passes str.isdigit; 5,000
    digits pass it too but not int()): a clear 4xx, not a 500."""
    body = b'{"model":"chat-production","messages":[]}'
    host, port = wsgiref_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        conn.putrequest("POST", "/v1/chat/completions", skip_accept_encoding=True)
        conn.putheader("Content-Length", length)
        conn.putheader("Connection", "close")
        conn.endheaders(body)
        r = conn.getresponse()
        resp = Response(r.status, [(k.lower().encode(), v.encode()) for k, v in r.getheaders()],
                        r.read())  # fmt: skip
    finally:
        conn.close()
    check_sane(resp, length[:20])
    check_rejection(resp, "openai")


def test_oversized_body_over_a_real_server_is_413(uvicorn_url: tuple[str, EchoASGI]) -> None:
    body = b'{"model":"chat-production","messages":"' + b"x" * (MAX_BODY + 10) + b'"}'
    for path, family in GATEWAY_PATHS.items():
        resp = _http(uvicorn_url[0], "POST", path, [], body)
        check_sane(resp, path)
        assert resp.status == 413
        check_rejection(resp, family, "request_too_large")


def test_non_object_bodies_are_invalid_request(asgi: RawASGI) -> None:
    for value in ([1, 2], None, "s", 3.5, True):
        body = json_dumps(value)
        for path, family in GATEWAY_PATHS.items():
            resp = asgi.call("POST", path, _json_request(body), [body])
            check_rejection(resp, family, "invalid_request")


# --- the total ---------------------------------------------------------------------------------


def test_generated_case_total() -> None:
    """Runs last: the module's generated cases add up to at least 10,000."""
    expected = {
        name.removeprefix("test_")
        for name, obj in globals().items()
        if name.startswith("test_") and hasattr(obj, "hypothesis")
    }
    print(f"\nhostile cases run: {TALLY.total} {TALLY.counts}")
    assert len(TALLY.counts) == len(expected), (
        "run the whole module to check the total; ran only " + ", ".join(sorted(TALLY.counts))
    )
    assert TALLY.total >= MIN_TOTAL, TALLY.counts
