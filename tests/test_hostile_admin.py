"""Hostile input against the admin API (``relaymw.admin``), called in-process through a raw
ASGI harness on a relay served from a real file store.

No write without a valid token, whatever the generated credentials look like; generated
bodies, path parameters and query strings for every endpoint never get a 500 or a traceback,
and every refusal is the API's ``{"error": {"type", "message"}}``; a write that is accepted
leaves a valid configuration. Admin tokens never appear in responses, logs, the change log
(``/audit``) or the JSONL audit sink.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relaymw.admin import create_admin_app
from relaymw.config import build_config
from relaymw.engine import Relay
from relaymw.sinks import JsonlAuditSink, LoggingSink
from relaymw.stores import FileStore
from tests.hostile_strategies import dumps, header_values, junk, texts
from tests.hostile_support import Response, Tally, asgi_request, check_sane, examples
from tests.support import relay_document

TALLY = Tally()
ALICE = "alice-admin-token-3f9b1c7e"
CI = "ci-admin-token-8d2a6e40"
TOKENS = {"alice": ALICE, "ci": CI}
JSON = (b"content-type", b"application/json")


class Admin:
    """The admin app of a relay on a TOML file, called in-process on one event loop."""

    def __init__(self, tmp: Path) -> None:
        store = FileStore(tmp / "relay.toml")
        store.save(relay_document("http://127.0.0.1:9"))
        self.relay = Relay.from_store(store)
        self.store = store
        self.app = create_admin_app(self.relay, tokens=TOKENS, rate_limit="1000000/second")
        self.loop = asyncio.new_event_loop()

    def call(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
        query: bytes = b"",
        token: str | None = ALICE,
    ) -> Response:
        hdrs = list(headers if headers is not None else [JSON])
        if token is not None:
            hdrs.append((b"authorization", b"Bearer " + token.encode()))
        return self.loop.run_until_complete(
            asgi_request(self.app, method, path, hdrs, [body], query)
        )

    def revision(self) -> str:
        return self.store.load().revision

    def close(self) -> None:
        self.loop.close()
        self.relay.close()


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Admin]:
    a = Admin(tmp_path_factory.mktemp("admin"))
    yield a
    a.close()


def api_error(resp: Response, status: int | None = None) -> dict[str, Any]:
    """The admin API's error shape: ``{"error": {"type", "message", "details"?}}``."""
    check_sane(resp)
    assert 400 <= resp.status < 500, (resp.status, resp.body[:300])
    if status is not None:
        assert resp.status == status, (resp.status, resp.body[:300])
    assert resp.header(b"content-type") == b"application/json", resp.headers
    doc = orjson.loads(resp.body)
    assert set(doc) == {"error"}, doc
    error = doc["error"]
    assert set(error) <= {"type", "message", "details"}, error
    assert isinstance(error["type"], str) and error["type"], error
    assert isinstance(error["message"], str) and error["message"], error
    return dict(error)


# --- what a write looks like when it is allowed -----------------------------------------------

V3 = {"version_tag": "gpt-v3", "model": "gpt-4.1-mini", "upstream_endpoint": "openai"}
WRITES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/models/versions", V3),
    ("PATCH", "/routes/traffic", {"route_id": "chat-production",
                                  "route_rules": [{"version_tag": "gpt-v1", "weight": 70},
                                                  {"version_tag": "gpt-v2", "weight": 30}]}),
    ("POST", "/routes/traffic", {"model_alias": "new-route",
                                 "route_rules": [{"version_tag": "gpt-v1", "weight": 100}]}),
    ("POST", "/routes/traffic/rollback", {"route_id": "chat-production", "version_tag": "gpt-v1"}),
    ("PUT", "/rollouts/chat-production", {"stage": 1}),
    ("DELETE", "/rollouts/chat-production", None),
]  # fmt: skip
READS = ["/models/versions", "/routes/traffic", "/audit", "/metrics/versions",
         "/models/versions/gpt-v1", "/routes/traffic/chat-production"]  # fmt: skip


def _valid(authorization: bytes) -> bool:
    """As documented: ``Authorization: Bearer <token>`` with a configured token (the scheme
    in any case, spaces around the token ignored)."""
    scheme, _, credential = authorization.decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and credential.strip() in (ALICE, CI)


def _near_misses(token: str) -> list[str]:
    return [token[:-1], token + "x", token.upper(), token[1:], token.replace("-", "_"),
            token + "\x00", "x" + token, token[: len(token) // 2], ""]  # fmt: skip


credentials = st.one_of(
    st.sampled_from([f"Bearer {t}" for t in (*_near_misses(ALICE), *_near_misses(CI))]),
    st.sampled_from([f"Basic {ALICE}", f"Token {ALICE}", ALICE, f"Bearer{ALICE}",
                     f"Bearer  {CI}x", "Bearer", "Bearer ", f"bearer {ALICE} {CI}"]),
    st.text(max_size=60).map(lambda t: "Bearer " + t),
    st.text(max_size=60),
).map(lambda t: t.encode("utf-8"))  # fmt: skip
other_places = st.sampled_from(
    [[(b"x-api-key", ALICE.encode())], [(b"cookie", f"token={ALICE}".encode())],
     [(b"x-admin-token", CI.encode())], []]
)  # fmt: skip


@examples(1500)
@given(
    write=st.sampled_from(WRITES),
    auth=st.lists(credentials, max_size=2),
    elsewhere=other_places,
    query=st.sampled_from([b"", f"token={ALICE}".encode(), f"access_token={CI}".encode()]),
)
def test_no_write_without_a_valid_token(
    admin: Admin,
    write: tuple[str, str, dict[str, Any] | None],
    auth: list[bytes],
    elsewhere: list[tuple[bytes, bytes]],
    query: bytes,
) -> None:
    """Generated wrong credentials (near misses of the real tokens, other schemes, the token
    in another header, a cookie or the query string): 401, and nothing written."""
    TALLY.count("no_write_without_a_valid_token")
    method, path, body = write
    headers = [JSON, *elsewhere, *[(b"authorization", a) for a in auth]]
    if auth and _valid(auth[0]):
        return  # a valid token (one in a thousand): not this test's business
    before, document = admin.revision(), copy.deepcopy(admin.relay.snapshot.document)
    raw = json.dumps(body).encode() if body is not None else b""
    resp = admin.call(method, path, raw, headers, query, token=None)
    error = api_error(resp, 401)
    assert error["type"] == "authentication_error"
    assert resp.header(b"www-authenticate") is not None
    assert admin.revision() == before and admin.relay.snapshot.document == document


@examples(300)
@given(path=st.sampled_from(READS), auth=st.lists(credentials, max_size=1))
def test_no_read_without_a_valid_token(admin: Admin, path: str, auth: list[bytes]) -> None:
    TALLY.count("no_read_without_a_valid_token")
    if auth and _valid(auth[0]):
        return
    resp = admin.call("GET", path, headers=[(b"authorization", a) for a in auth], token=None)
    api_error(resp, 401)


def test_the_writes_work_with_a_valid_token(admin: Admin) -> None:
    """The control for the test above: the same writes, with a token, are accepted."""
    for method, path, body in WRITES:
        raw = json.dumps(body).encode() if body is not None else b""
        resp = admin.call(method, path, raw, token=CI if method == "DELETE" else ALICE)
        assert resp.status in (200, 201, 204), (method, path, resp.status, resp.body)
    assert {"gpt-v3", "gpt-v1"} <= {v.version_tag for v in admin.relay.config.versions}


# --- generated bodies for every endpoint ----------------------------------------------------------

tags = st.sampled_from(["gpt-v1", "gpt-v2", "claude-v1", "gpt-v9", "", "Bad Tag!"]) | texts
aliases = st.sampled_from(["chat-production", "review-production", "nope", ""]) | texts
rule_lists = st.lists(
    st.fixed_dictionaries({"version_tag": tags, "weight": st.integers(-5, 120) | junk},
                          optional={"extra": junk}),
    max_size=4,
) | junk  # fmt: skip
version_bodies = st.fixed_dictionaries(
    {"version_tag": tags, "model": texts | junk, "upstream_endpoint": st.sampled_from(["openai",
     "anthropic", "nope"]) | junk},
    optional={"parameters": junk, "system_prompt": texts | junk,
              "cost_limit_per_request": junk, "metadata": junk, "version_id": junk,
              "rate_limits": junk, "extra": junk},
)  # fmt: skip
route_bodies = st.fixed_dictionaries(
    {"model_alias": aliases | junk, "route_rules": rule_lists},
    optional={"sticky_sessions": junk, "paths": junk, "health_check": junk,
              "cost_policy": junk, "rate_limits": junk, "route_id": junk, "ejected": junk},
)  # fmt: skip
weight_bodies = st.fixed_dictionaries(
    {"route_id": aliases | junk, "route_rules": rule_lists}, optional={"extra": junk}
)
rollback_bodies = st.fixed_dictionaries(
    {"route_id": aliases | junk, "version_tag": tags | junk}, optional={"extra": junk}
)
ENDPOINT_BODIES: dict[tuple[str, str], st.SearchStrategy[Any]] = {
    ("POST", "/models/versions"): version_bodies,
    ("POST", "/routes/traffic"): route_bodies,
    ("PATCH", "/routes/traffic"): weight_bodies,
    ("POST", "/routes/traffic/rollback"): rollback_bodies,
    ("PUT", "/rollouts/{alias}"): junk,
}


@st.composite
def body_bytes(draw: st.DrawFn, structured: st.SearchStrategy[Any]) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return dumps(draw(junk))
    if kind == 2:  # deeper than anyone writes a configuration
        depth = draw(st.integers(1, 3000))
        return b'{"version_tag":' + b"[" * depth + b"]" * depth + b"}"
    return dumps(draw(structured))


content_types = st.sampled_from(
    [b"application/json", b"application/json; charset=utf-8", b"text/plain", b"",
     b"application/merge-patch+json", b"application/x-www-form-urlencoded"]
)  # fmt: skip


@examples(1200)
@given(
    endpoint=st.sampled_from(sorted(ENDPOINT_BODIES)),
    data=st.data(),
    content_type=content_types,
    alias=aliases,
)
def test_generated_bodies_for_every_write_endpoint(
    admin: Admin,
    endpoint: tuple[str, str],
    data: st.DataObject,
    content_type: bytes,
    alias: str,
) -> None:
    TALLY.count("generated_bodies")
    method, template = endpoint
    body = data.draw(body_bytes(ENDPOINT_BODIES[endpoint]))
    path = template.replace("{alias}", alias or "x")
    headers = [(b"content-type", content_type)] if content_type else []
    resp = admin.call(method, path, body, headers)
    _check_answer(resp, admin)


def _check_answer(resp: Response, admin: Admin) -> None:
    """A success leaves a valid stored configuration; anything else is a clean 4xx error."""
    check_sane(resp, resp.body[:200])
    if resp.status < 300:
        build_config(admin.relay.snapshot.document)
        return
    if resp.status in (307, 308):  # Starlette's redirect to the path without a trailing slash
        assert resp.header(b"location") is not None
        return
    api_error(resp)


@examples(800)
@given(
    method=st.sampled_from(["GET", "PUT", "DELETE", "POST", "PATCH", "HEAD", "OPTIONS"]),
    prefix=st.sampled_from(["/models/versions/", "/routes/traffic/", "/rollouts/", "/", "/x/"]),
    name=texts | st.sampled_from(["gpt-v1", "chat-production", "..", "%2F", "a/b/c"]),
    # What uvicorn (h11 or httptools) delivers: visible ASCII; it refuses other bytes itself.
    query=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=80).map(
        str.encode
    ),
)
def test_generated_paths_and_queries(
    admin: Admin, method: str, prefix: str, name: str, query: bytes
) -> None:
    TALLY.count("generated_paths")
    resp = admin.call(method, prefix + name, b"{}", query=query)
    _check_answer(resp, admin)


query_values = st.one_of(
    texts,
    st.sampled_from(["2026-01-01T00:00:00Z", "0001-01-01T00:00:00", "9999-12-31T23:59:59+14:00",
                     "-1", "0", "1001", "1e3", "99999999999999999999", "NaN", "", " 5 "]),
)  # fmt: skip


@examples(800)
@given(
    path=st.sampled_from(["/metrics/versions", "/audit"]),
    params=st.dictionaries(
        st.sampled_from(["start_time", "end_time", "metrics", "route_id", "version_tag",
                         "limit", "x"]),
        query_values,
        max_size=4,
    ),
)  # fmt: skip
def test_generated_query_parameters(admin: Admin, path: str, params: dict[str, str]) -> None:
    TALLY.count("generated_queries")
    from urllib.parse import urlencode

    resp = admin.call("GET", path, query=urlencode(params).encode())
    _check_answer(resp, admin)
    if resp.status == 200:
        orjson.loads(resp.body)


@examples(300)
@given(value=header_values)
def test_generated_authorization_bytes(admin: Admin, value: bytes) -> None:
    """Any bytes a server hands over as the Authorization header (obs-text included)."""
    TALLY.count("authorization_bytes")
    resp = admin.call("POST", "/routes/traffic/rollback", b"{}", [JSON, (b"authorization", value)],
                      token=None)  # fmt: skip
    if _valid(value):
        _check_answer(resp, admin)
    else:
        api_error(resp, 401)


# --- tokens never leak ---------------------------------------------------------------------------


def test_admin_tokens_never_appear_anywhere(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused calls with credentials that contain a real token, successful writes by each
    token, then the change log: no token in a response, a log line, ``/audit`` or the JSONL
    audit file; the change log names the token's owner instead."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="relaymw")
    audit_path = tmp_path / "audit.jsonl"
    sinks = JsonlAuditSink(audit_path), LoggingSink(level=logging.DEBUG)
    admin = Admin(tmp_path)
    bodies: list[bytes] = []
    try:
        for bad in (f"Bearer {ALICE}x", f"Basic {ALICE}", f"Bearer {CI[:-1]}", ALICE):
            headers = [JSON, (b"authorization", bad.encode())]
            resp = admin.call("PATCH", "/routes/traffic", b"{}", headers, token=None)
            api_error(resp, 401)
            bodies.append(resp.body + repr(resp.headers).encode())
        for token in (ALICE, CI):
            for method, path, body in WRITES:
                raw = json.dumps(body).encode() if body is not None else b""
                resp = admin.call(method, path, raw, token=token)
                bodies.append(resp.body + repr(resp.headers).encode())
            resp = admin.call("POST", "/models/versions", b'{"version_tag": 5}', token=token)
            bodies.append(resp.body)
        audit = admin.call("GET", "/audit", query=b"limit=1000")
        assert audit.status == 200
        entries = orjson.loads(audit.body)["entries"]
        assert entries, "no change was logged"
        assert {"alice", "ci"} <= {str(e.get("actor")) for e in entries}, entries[-3:]
        bodies.append(audit.body)
        sinks[0].flush(10)
    finally:
        admin.close()
        for sink in sinks:
            sink.close()
    everything = {
        "responses": b"\n".join(bodies).decode("utf-8", "replace"),
        "logs": caplog.text,
        "the audit file": audit_path.read_text(),
        "the stored document": (tmp_path / "relay.toml").read_text(),
    }
    leaks = [f"{t[:8]}... in {where}" for where, text in everything.items() for t in (ALICE, CI)
             if t in text]  # fmt: skip
    assert not leaks, leaks


def test_generated_case_total() -> None:
    expected = {
        n for n, o in globals().items() if n.startswith("test_") and hasattr(o, "hypothesis")
    }
    print(f"\nhostile admin cases run: {TALLY.total} {TALLY.counts}")
    assert len(TALLY.counts) == len(expected), "run the whole module to check the total"
    assert TALLY.total >= 4000, TALLY.counts
