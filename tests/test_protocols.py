"""Unit tests of relaymw.protocols: pure wire logic, checked against the official SDKs."""

from __future__ import annotations

import itertools
from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaymw import protocols as p
from relaymw.config import Upstream, Version
from relaymw.errors import RequestRejected

EPS = p.gateway_paths()
CHAT = EPS["/v1/chat/completions"]
COMPLETIONS = EPS["/v1/completions"]
EMBEDDINGS = EPS["/v1/embeddings"]
RESPONSES = EPS["/v1/responses"]
MESSAGES = EPS["/v1/messages"]

OPENAI_UP = Upstream(base_url="https://api.openai.com/v1", protocol="openai", api_key="sk-up")
ANTHROPIC_UP = Upstream(
    base_url="https://api.anthropic.com", protocol="anthropic", api_key="sk-ant-up"
)


def version(
    params: dict[str, Any] | None = None,
    sp: str | None = None,
    model: str = "openai/gpt-4.1",
    upstream: str = "openai",
) -> Version:
    return Version("v1", model, upstream, parameters=params or {}, system_prompt=sp)


def rewrite(body: dict[str, Any], ep: p.Endpoint, v: Version) -> dict[str, Any]:
    up = ANTHROPIC_UP if ep.family == "anthropic" else OPENAI_UP
    return p.rewrite_request(body, ep, v, up)


# --- paths and reading the request ----------------------------------------------------------


@pytest.mark.parametrize("prefix", ["/llm", "/llm/", "llm", " /llm/ "])
def test_gateway_paths_prefix_is_normalised(prefix: str) -> None:
    paths = p.gateway_paths(prefix)
    assert set(paths) == {
        "/llm/v1/chat/completions",
        "/llm/v1/completions",
        "/llm/v1/embeddings",
        "/llm/v1/responses",
        "/llm/v1/messages",
    }
    assert paths["/llm/v1/messages"] == p.Endpoint("anthropic", "messages", "/messages")
    assert paths["/llm/v1/responses"] == p.Endpoint("openai", "responses", "/responses")


def test_gateway_paths_without_prefix() -> None:
    assert p.gateway_paths("/") == p.gateway_paths("") == EPS
    assert EPS["/v1/chat/completions"] == p.Endpoint("openai", "chat", "/chat/completions")
    assert {e.kind for e in EPS.values()} == {
        "chat",
        "completions",
        "embeddings",
        "responses",
        "messages",
    }


def test_parse_body() -> None:
    assert p.parse_body(b'{"model": "a", "n": 1}') == {"model": "a", "n": 1}


@pytest.mark.parametrize(
    ("raw", "code", "words"),
    [
        (b"", "invalid_json", "empty"),
        (b"  ", "invalid_json", "empty"),
        (b'{"model": ', "invalid_json", "invalid JSON"),
        (b"\xff\xfe", "invalid_json", "invalid JSON"),
        (b"[1, 2]", "invalid_request", "not an array"),
        (b'"x"', "invalid_request", "not a string"),
        (b"null", "invalid_request", "not null"),
        (b"true", "invalid_request", "not a boolean"),
        (b"3", "invalid_request", "not a number"),
    ],
)
def test_parse_body_rejects(raw: bytes, code: str, words: str) -> None:
    with pytest.raises(RequestRejected) as info:
        p.parse_body(raw)
    assert (info.value.status, info.value.code) == (400, code)
    assert words in info.value.message


def test_requested_model() -> None:
    assert p.requested_model({"model": "code-review"}) == "code-review"
    for body in ({}, {"model": ""}, {"model": 3}, {"model": None}, {"model": ["a"]}):
        with pytest.raises(RequestRejected) as info:
            p.requested_model(body)
        assert (info.value.status, info.value.code) == (400, "missing_model")
        assert '"model"' in info.value.message


def test_is_stream() -> None:
    assert p.is_stream({"stream": True})
    assert not p.is_stream({"stream": "true"})
    assert not p.is_stream({"stream": 1})
    assert not p.is_stream({})


def test_check_family() -> None:
    p.check_family(CHAT, OPENAI_UP, "gpt-v1")
    p.check_family(MESSAGES, ANTHROPIC_UP, "claude-v1")
    with pytest.raises(RequestRejected) as info:
        p.check_family(CHAT, ANTHROPIC_UP, "claude-v1")
    exc = info.value
    assert (exc.status, exc.code) == (400, "protocol_mismatch")
    assert "'claude-v1'" in exc.message
    assert "/v1/messages" in exc.message
    with pytest.raises(RequestRejected) as info:
        p.check_family(MESSAGES, OPENAI_UP, "gpt-v1")
    assert "'gpt-v1'" in info.value.message
    assert "/v1/chat/completions" in info.value.message


# --- rewriting --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "upstream_name", "up", "sent"),
    [
        ("openai/gpt-4.1", "openai", OPENAI_UP, "gpt-4.1"),
        ("oa/gpt-4.1", "oa", OPENAI_UP, "gpt-4.1"),  # the upstream's own name
        ("openai/gpt-4.1", "oa", OPENAI_UP, "gpt-4.1"),  # the protocol's name
        ("gpt-4.1", "openai", OPENAI_UP, "gpt-4.1"),
        ("meta-llama/Llama-3-8b", "openai", OPENAI_UP, "meta-llama/Llama-3-8b"),
        (
            "anthropic/claude-sonnet-4-20250514",
            "anthropic",
            ANTHROPIC_UP,
            "claude-sonnet-4-20250514",
        ),
    ],
)
def test_model_prefix_is_stripped(model: str, upstream_name: str, up: Upstream, sent: str) -> None:
    ep = MESSAGES if up.protocol == "anthropic" else CHAT
    v = Version("v1", model, upstream_name)
    body = {"model": "code-review-production", "messages": []}
    assert p.rewrite_request(body, ep, v, up)["model"] == sent


def test_rewrite_mutates_and_returns_body() -> None:
    body = {"model": "alias", "messages": [{"role": "user", "content": "hi"}]}
    out = rewrite(body, CHAT, version({"temperature": 0.7}))
    assert out is body
    assert out == {
        "model": "gpt-4.1",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.7,
    }


def test_parameters_override_client_values() -> None:
    body = {"model": "a", "messages": [], "temperature": 0.1, "top_p": 0.5, "user": "u1"}
    out = rewrite(body, CHAT, version({"temperature": 0.7, "top_p": 0.9, "seed": 7}))
    assert out["temperature"] == 0.7
    assert out["top_p"] == 0.9
    assert out["seed"] == 7
    assert out["user"] == "u1"  # the client's own parameters stay


def test_parameters_never_touch_model_or_streaming() -> None:
    params = {"model": "evil", "stream": True, "stream_options": {}, "temperature": 1}
    out = rewrite({"model": "a", "messages": []}, CHAT, version(params))
    assert out["model"] == "gpt-4.1"
    assert "stream" not in out
    assert "stream_options" not in out


def test_anthropic_parameters() -> None:
    v = version(
        {"temperature": 0.7, "max_tokens": 4096, "top_p": 0.9, "top_k": 40},
        model="anthropic/claude-sonnet-4-20250514",
        upstream="anthropic",
    )
    body = {"model": "a", "max_tokens": 8000, "messages": [], "temperature": 0}
    out = rewrite(body, MESSAGES, v)
    assert out == {
        "model": "claude-sonnet-4-20250514",
        "max_tokens": 4096,
        "messages": [],
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
    }


CAP_KEYS = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
CLIENT_KEYS = {
    CHAT: ["max_tokens", "max_completion_tokens"],
    COMPLETIONS: ["max_tokens"],
    RESPONSES: ["max_output_tokens"],
    MESSAGES: ["max_tokens"],
}


@pytest.mark.parametrize("cap_key", CAP_KEYS)
@pytest.mark.parametrize(
    ("ep", "client_key"), [(ep, k) for ep, keys in CLIENT_KEYS.items() for k in keys]
)
@pytest.mark.parametrize(("client", "sent"), [(100, 100), (1000, 500), (500, 500)])
def test_max_tokens_cap(
    cap_key: str, ep: p.Endpoint, client_key: str, client: int, sent: int
) -> None:
    out = rewrite({"model": "a", client_key: client}, ep, version({cap_key: 500}))
    assert out[client_key] == sent
    assert [k for k in CAP_KEYS if k in out] == [client_key]  # no second spelling added


@pytest.mark.parametrize("cap_key", CAP_KEYS)
@pytest.mark.parametrize(
    ("ep", "default_key"),
    [
        (COMPLETIONS, "max_tokens"),
        (RESPONSES, "max_output_tokens"),
        (MESSAGES, "max_tokens"),
    ],
)
def test_max_tokens_cap_is_set_when_client_sent_none(
    cap_key: str, ep: p.Endpoint, default_key: str
) -> None:
    out = rewrite({"model": "a"}, ep, version({cap_key: 500}))
    assert out == {"model": "gpt-4.1", default_key: 500}


@pytest.mark.parametrize(
    ("cap_key", "sent_key"),
    [
        ("max_tokens", "max_tokens"),
        ("max_output_tokens", "max_tokens"),
        # A chat version spelling max_completion_tokens targets models that only take that one.
        ("max_completion_tokens", "max_completion_tokens"),
    ],
)
def test_chat_cap_key_when_client_sent_none(cap_key: str, sent_key: str) -> None:
    out = rewrite({"model": "a", "messages": []}, CHAT, version({cap_key: 500}))
    assert out == {"model": "gpt-4.1", "messages": [], sent_key: 500}


def test_cap_replaces_null_and_junk_client_values() -> None:
    out = rewrite({"model": "a", "max_completion_tokens": None}, CHAT, version({"max_tokens": 9}))
    assert out == {"model": "gpt-4.1", "max_completion_tokens": 9}
    out = rewrite({"model": "a", "max_tokens": "lots"}, MESSAGES, version({"max_tokens": 9}))
    assert out["max_tokens"] == 9
    out = rewrite({"model": "a", "max_tokens": 8.5}, COMPLETIONS, version({"max_tokens": 9}))
    assert out["max_tokens"] == 8.5


def test_cap_spelled_twice_uses_the_lower() -> None:
    v = version({"max_tokens": 800, "max_completion_tokens": 300, "max_output_tokens": 600})
    assert rewrite({"model": "a", "max_tokens": 1000}, CHAT, v)["max_tokens"] == 300
    v = version({"max_tokens": 300, "max_output_tokens": 600})
    assert rewrite({"model": "a"}, RESPONSES, v) == {"model": "gpt-4.1", "max_output_tokens": 300}


def test_cap_applies_to_every_key_the_client_sent() -> None:
    body = {"model": "a", "max_tokens": 900, "max_completion_tokens": 100}
    out = rewrite(body, CHAT, version({"max_tokens": 500}))
    assert (out["max_tokens"], out["max_completion_tokens"]) == (500, 100)


def test_embeddings_skip_generation_parameters_and_system_prompt() -> None:
    params = {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 5,
        "max_tokens": 100,
        "max_completion_tokens": 100,
        "max_output_tokens": 100,
        "stop": ["x"],
        "seed": 1,
        "n": 2,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.1,
        "logit_bias": {"1": 2},
        "response_format": {"type": "json_object"},
        "dimensions": 256,
        "encoding_format": "base64",
        "user": "svc",
    }
    v = version(params, sp="Be terse.", model="openai/text-embedding-3-small")
    body = {"model": "emb", "input": ["a", "b"]}
    assert rewrite(body, EMBEDDINGS, v) == {
        "model": "text-embedding-3-small",
        "input": ["a", "b"],
        "dimensions": 256,
        "encoding_format": "base64",
        "user": "svc",
    }


SP = "You review code."


def test_system_prompt_chat() -> None:
    msgs = [{"role": "system", "content": "client"}, {"role": "user", "content": "hi"}]
    out = rewrite({"model": "a", "messages": list(msgs)}, CHAT, version(sp=SP))
    assert out["messages"] == [{"role": "system", "content": SP}, *msgs]
    out = rewrite({"model": "a", "messages": []}, CHAT, version(sp=SP))
    assert out["messages"] == [{"role": "system", "content": SP}]


@pytest.mark.parametrize(
    ("prompt", "sent"),
    [
        ("Write a haiku", f"{SP}\n\nWrite a haiku"),
        (["one", "two"], [f"{SP}\n\none", f"{SP}\n\ntwo"]),
        ([1, 2, 3], [1, 2, 3]),  # token ids
        ([[1, 2], [3]], [[1, 2], [3]]),
        (["text", [4, 5]], [f"{SP}\n\ntext", [4, 5]]),
    ],
)
def test_system_prompt_completions(prompt: Any, sent: Any) -> None:
    out = rewrite({"model": "a", "prompt": prompt}, COMPLETIONS, version(sp=SP))
    assert out["prompt"] == sent


@pytest.mark.parametrize(
    ("instructions", "sent"),
    [(None, SP), ("", SP), ("Answer in French.", f"{SP}\n\nAnswer in French.")],
)
def test_system_prompt_responses(instructions: str | None, sent: str) -> None:
    body: dict[str, Any] = {"model": "a", "input": "hi"}
    if instructions is not None:
        body["instructions"] = instructions
    assert rewrite(body, RESPONSES, version(sp=SP))["instructions"] == sent


@pytest.mark.parametrize(
    ("system", "sent"),
    [
        (None, SP),
        ("", SP),
        ("Client rules.", f"{SP}\n\nClient rules."),
        (
            [{"type": "text", "text": "Cached.", "cache_control": {"type": "ephemeral"}}],
            [
                {"type": "text", "text": SP},
                {"type": "text", "text": "Cached.", "cache_control": {"type": "ephemeral"}},
            ],
        ),
    ],
)
def test_system_prompt_anthropic(system: Any, sent: Any) -> None:
    body: dict[str, Any] = {"model": "a", "max_tokens": 5, "messages": []}
    if system is not None:
        body["system"] = system
    v = version(sp=SP, model="anthropic/claude-sonnet-4-20250514", upstream="anthropic")
    assert rewrite(body, MESSAGES, v)["system"] == sent


@pytest.mark.parametrize("ep", [CHAT, COMPLETIONS, RESPONSES, MESSAGES])
def test_no_system_prompt_leaves_the_body(ep: p.Endpoint) -> None:
    body = {"model": "a", "messages": [], "prompt": "x", "input": "y"}
    assert rewrite(dict(body), ep, version()) == {**body, "model": "gpt-4.1"}


def test_upstream_url() -> None:
    assert p.upstream_url(OPENAI_UP, CHAT) == "https://api.openai.com/v1/chat/completions"
    slash = Upstream(base_url="http://127.0.0.1:8000/v1/", protocol="openai")
    assert p.upstream_url(slash, RESPONSES) == "http://127.0.0.1:8000/v1/responses"
    assert p.upstream_url(ANTHROPIC_UP, MESSAGES) == "https://api.anthropic.com/v1/messages"
    slash = Upstream(base_url="https://gw.internal/anthropic/", protocol="anthropic")
    assert p.upstream_url(slash, MESSAGES) == "https://gw.internal/anthropic/v1/messages"
    with_v1 = Upstream(base_url="https://api.anthropic.com/v1", protocol="anthropic")
    assert p.upstream_url(with_v1, MESSAGES) == "https://api.anthropic.com/v1/messages"


# --- headers ----------------------------------------------------------------------------------

# What the official SDKs send, plus a browser's cookie and a proxy's credentials (ASGI style).
CLIENT_HEADERS = [
    (b"host", b"app.internal"),
    (b"accept", b"application/json"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
    (b"content-length", b"123"),
    (b"content-type", b"application/json"),
    (b"user-agent", b"OpenAI/Python 2.12.0"),
    (b"x-stainless-lang", b"python"),
    (b"x-stainless-package-version", b"2.12.0"),
    (b"x-stainless-retry-count", b"0"),
    (b"authorization", b"Bearer sk-client-secret"),
    (b"x-api-key", b"sk-ant-client-secret"),
    (b"proxy-authorization", b"Basic c2VjcmV0"),
    (b"cookie", b"session=abc; hs_model_version=v1"),
    (b"openai-organization", b"org-client"),
    (b"openai-project", b"proj-client"),
    (b"openai-beta", b"assistants=v2"),
    (b"anthropic-version", b"2023-06-01"),
    (b"anthropic-beta", b"prompt-caching-2024-07-31"),
    (b"anthropic-beta", b"token-efficient-tools-2025-02-19"),
    (b"x-forwarded-for", b"10.0.0.1"),
]
SECRETS = ("client-secret", "c2VjcmV0", "session=abc", "org-client", "proj-client", "10.0.0.1")


def test_upstream_headers_openai() -> None:
    out = p.upstream_headers(OPENAI_UP, CLIENT_HEADERS)
    assert out == {
        "content-type": "application/json",
        "accept": "application/json",
        "openai-beta": "assistants=v2",
        "authorization": "Bearer sk-up",
    }


def test_upstream_headers_anthropic() -> None:
    out = p.upstream_headers(ANTHROPIC_UP, CLIENT_HEADERS)
    assert out == {
        "content-type": "application/json",
        "accept": "application/json",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "prompt-caching-2024-07-31,token-efficient-tools-2025-02-19",
        "x-api-key": "sk-ant-up",
    }
    for value in out.values():
        assert not any(s in value for s in SECRETS)


def test_upstream_headers_defaults() -> None:
    up = Upstream(base_url="https://a", protocol="anthropic", api_key="k", anthropic_version="X")
    assert p.upstream_headers(up, []) == {
        "content-type": "application/json",
        "anthropic-version": "X",
        "x-api-key": "k",
    }
    keyless = Upstream(base_url="http://127.0.0.1:8000/v1", protocol="openai")
    assert p.upstream_headers(keyless, [(b"authorization", b"Bearer sk-client")]) == {
        "content-type": "application/json"
    }


def test_upstream_headers_take_str_pairs_in_any_case() -> None:
    headers = [("Authorization", "Bearer sk-client"), ("Accept", "text/event-stream")]
    headers += [("anthropic-version", "2024-01-01"), ("Cookie", "a=b")]
    assert p.upstream_headers(ANTHROPIC_UP, headers) == {
        "content-type": "application/json",
        "accept": "text/event-stream",
        "anthropic-version": "2024-01-01",
        "x-api-key": "sk-ant-up",
    }


def test_upstream_headers_from_real_sdk_requests() -> None:
    """The headers the SDKs really send: none of the client's credentials go upstream."""
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(500, json={"error": {"message": "stop"}})

    http = httpx2.Client(transport=httpx2.MockTransport(handler))
    oa = openai.OpenAI(
        api_key="sk-client-secret",
        organization="org-client",
        project="proj-client",
        base_url="http://gw.test/v1",
        http_client=http,
        max_retries=0,
    )
    with pytest.raises(openai.InternalServerError):
        oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    an = anthropic.Anthropic(
        api_key="sk-ant-client-secret", base_url="http://gw.test", http_client=http, max_retries=0
    )
    with pytest.raises(anthropic.InternalServerError):
        an.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert [r.url.path for r in seen] == ["/v1/chat/completions", "/v1/messages"]
    for request, up in zip(seen, (OPENAI_UP, ANTHROPIC_UP), strict=True):
        asgi = [(k.lower(), v) for k, v in request.headers.raw]
        out = p.upstream_headers(up, asgi)
        assert set(out) <= {
            "content-type",
            "accept",
            "authorization",
            "x-api-key",
            "anthropic-version",
            "anthropic-beta",
        }
        assert not any(s in v for v in out.values() for s in SECRETS)
    # The SDK's own anthropic-version is forwarded: it knows the API shape it speaks.
    sdk_version = seen[1].headers["anthropic-version"]
    assert p.upstream_headers(ANTHROPIC_UP, asgi)["anthropic-version"] == sdk_version


def test_response_headers() -> None:
    upstream = [
        ("content-type", "text/event-stream; charset=utf-8"),
        ("Content-Length", "42"),
        ("content-encoding", "gzip"),
        ("transfer-encoding", "chunked"),
        ("connection", "keep-alive"),
        ("keep-alive", "timeout=5"),
        ("date", "Tue, 01 Jul 2025 00:00:00 GMT"),
        ("set-cookie", "__cf_bm=abc; path=/"),
        ("x-request-id", "req_123"),
        ("request-id", "req_456"),
        ("openai-processing-ms", "321"),
        ("openai-version", "2020-10-01"),
        ("openai-organization", "org-operator"),
        ("anthropic-organization-id", "org-operator"),
        ("x-ratelimit-remaining-requests", "99"),
        ("x-ratelimit-limit-tokens", "10000"),
        ("anthropic-ratelimit-requests-remaining", "3"),
        ("Retry-After", "2"),
        ("retry-after-ms", "2000"),
        ("x-should-retry", "true"),
        ("cache-control", "no-cache"),
        ("cf-ray", "abc-SJC"),
        ("server", "cloudflare"),
    ]
    assert p.response_headers(upstream) == [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"x-request-id", b"req_123"),
        (b"request-id", b"req_456"),
        (b"openai-processing-ms", b"321"),
        (b"openai-version", b"2020-10-01"),
        (b"retry-after", b"2"),
        (b"retry-after-ms", b"2000"),
        (b"x-should-retry", b"true"),
        (b"cache-control", b"no-cache"),
    ]


def test_response_headers_same_answer_for_names_seen_before() -> None:
    # Raw bytes in Title-Case, as aiohttp hands them over; the second call hits the memo.
    raw = [
        (b"Content-Type", b"application/json"),
        (b"Date", b"x"),
        (b"Set-Cookie", b"a=b"),
        (b"X-Request-Id", b"r"),
        (b"server", b"s"),
    ]
    want = [(b"content-type", b"application/json"), (b"x-request-id", b"r")]
    assert p.response_headers(raw) == p.response_headers(raw) == want
    # An upstream inventing names does not grow the memo past its bound.
    for i in range(p._RESPONSE_NAMES_MAX + 10):
        assert p.response_headers([(f"X-Junk-{i}".encode(), b"v")]) == []
    assert len(p._RESPONSE_NAMES) <= p._RESPONSE_NAMES_MAX
    assert p.response_headers(raw) == want


# --- error bodies, read back by the official SDKs -----------------------------------------------

OPENAI_ERRORS = {
    400: (openai.BadRequestError, "invalid_request_error"),
    401: (openai.AuthenticationError, "authentication_error"),
    402: (openai.APIStatusError, "insufficient_quota"),
    403: (openai.PermissionDeniedError, "permission_error"),
    404: (openai.NotFoundError, "not_found_error"),
    409: (openai.ConflictError, "invalid_request_error"),
    413: (openai.APIStatusError, "invalid_request_error"),
    422: (openai.UnprocessableEntityError, "invalid_request_error"),
    429: (openai.RateLimitError, "rate_limit_error"),
    500: (openai.InternalServerError, "server_error"),
    502: (openai.InternalServerError, "server_error"),
    503: (openai.InternalServerError, "server_error"),
    504: (openai.InternalServerError, "server_error"),
}
ANTHROPIC_ERRORS = {
    400: (anthropic.BadRequestError, "invalid_request_error"),
    401: (anthropic.AuthenticationError, "authentication_error"),
    402: (anthropic.APIStatusError, "billing_error"),
    403: (anthropic.PermissionDeniedError, "permission_error"),
    404: (anthropic.NotFoundError, "not_found_error"),
    409: (anthropic.ConflictError, "invalid_request_error"),
    413: (anthropic.APIStatusError, "request_too_large"),
    422: (anthropic.UnprocessableEntityError, "invalid_request_error"),
    429: (anthropic.RateLimitError, "rate_limit_error"),
    500: (anthropic.InternalServerError, "api_error"),
    502: (anthropic.InternalServerError, "api_error"),
    503: (anthropic.InternalServerError, "overloaded_error"),
    504: (anthropic.InternalServerError, "timeout_error"),
    529: (anthropic.InternalServerError, "overloaded_error"),
}


def _mock_http(status: int, body: bytes) -> httpx2.Client:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, content=body, headers={"content-type": "application/json"})

    return httpx2.Client(transport=httpx2.MockTransport(handler))


@pytest.mark.parametrize("status", sorted(OPENAI_ERRORS))
def test_openai_error_bodies_read_by_the_sdk(status: int) -> None:
    cls, etype = OPENAI_ERRORS[status]
    body = p.error_body("openai", status, "Budget of route x is spent.", "budget_exceeded")
    assert orjson.loads(body) == {
        "error": {
            "message": "Budget of route x is spent.",
            "type": etype,
            "param": None,
            "code": "budget_exceeded",
        }
    }
    client = openai.OpenAI(
        api_key="k",
        base_url="http://gw.test/v1",
        http_client=_mock_http(status, body),
        max_retries=0,
    )
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    exc = info.value
    assert type(exc) is cls
    assert exc.status_code == status
    assert exc.code == "budget_exceeded"
    assert exc.type == etype
    assert "Budget of route x is spent." in exc.message
    assert isinstance(exc.body, dict)
    assert exc.body["message"] == "Budget of route x is spent."


@pytest.mark.parametrize("status", sorted(ANTHROPIC_ERRORS))
def test_anthropic_error_bodies_read_by_the_sdk(status: int) -> None:
    cls, etype = ANTHROPIC_ERRORS[status]
    body = p.error_body("anthropic", status, "Too many requests.", "rate_limited")
    assert orjson.loads(body) == {
        "type": "error",
        "error": {"type": etype, "message": "Too many requests.", "code": "rate_limited"},
    }
    client = anthropic.Anthropic(
        api_key="k", base_url="http://gw.test", http_client=_mock_http(status, body), max_retries=0
    )
    with pytest.raises(anthropic.APIStatusError) as info:
        client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    exc = info.value
    assert isinstance(exc, cls)
    assert exc.status_code == status
    assert exc.type == etype
    assert exc.api_message == "Too many requests."
    assert isinstance(exc.body, dict)
    assert exc.body["error"]["code"] == "rate_limited"
    assert "Too many requests." in exc.message


def test_error_body_without_code() -> None:
    assert orjson.loads(p.error_body("openai", 400, "bad"))["error"]["code"] is None
    assert orjson.loads(p.error_body("anthropic", 400, "bad")) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "bad"},
    }


def test_rejection_body() -> None:
    exc = RequestRejected(429, "rate_limited", "Slow down.", [("Retry-After", "3")])
    assert p.rejection_body("openai", exc) == p.error_body(
        "openai", 429, "Slow down.", "rate_limited"
    )
    out = orjson.loads(p.rejection_body("anthropic", exc))
    assert out["error"] == {
        "type": "rate_limit_error",
        "message": "Slow down.",
        "code": "rate_limited",
    }


# --- usage --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ep", "usage", "expected"),
    [
        (
            CHAT,
            {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29},
            p.Usage(19, 10),
        ),
        (
            CHAT,
            {
                "prompt_tokens": 2006,
                "completion_tokens": 300,
                "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0},
            },
            p.Usage(2006, 300, 1920),
        ),
        (
            COMPLETIONS,
            {"prompt_tokens": 5, "completion_tokens": 7, "prompt_tokens_details": None},
            p.Usage(5, 7),
        ),
        (EMBEDDINGS, {"prompt_tokens": 8, "total_tokens": 8}, p.Usage(8, 0)),
        (
            RESPONSES,
            {
                "input_tokens": 36,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 87,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 123,
            },
            p.Usage(36, 87),
        ),
        (
            RESPONSES,
            {
                "input_tokens": 3000,
                "input_tokens_details": {"cached_tokens": 2048},
                "output_tokens": 5,
            },
            p.Usage(3000, 5, 2048),
        ),
        (MESSAGES, {"input_tokens": 25, "output_tokens": 15}, p.Usage(25, 15)),
        (
            MESSAGES,
            {
                "input_tokens": 25,
                "cache_creation_input_tokens": 100,
                "cache_read_input_tokens": 2000,
                "output_tokens": 15,
            },
            p.Usage(2125, 15, 2000, 100),
        ),
        (
            MESSAGES,
            {"input_tokens": 25, "cache_creation_input_tokens": None, "output_tokens": 1},
            p.Usage(25, 1),
        ),
    ],
)
def test_usage_from_body(ep: p.Endpoint, usage: dict[str, Any], expected: p.Usage) -> None:
    assert p.usage_from_body(ep, {"id": "x", "usage": usage}) == expected
    assert expected.total_tokens == expected.prompt_tokens + expected.completion_tokens


def test_usage_from_body_without_usage() -> None:
    assert p.usage_from_body(CHAT, {"id": "x"}) is None
    assert p.usage_from_body(RESPONSES, {"usage": None}) is None
    assert p.usage_from_body(MESSAGES, {"usage": "junk"}) is None
    assert p.usage_from_body(
        CHAT, {"usage": {"prompt_tokens": "7", "completion_tokens": True}}
    ) == (p.Usage(0, 0))


def test_request_stream_usage() -> None:
    body: dict[str, Any] = {"model": "a", "stream": True}
    assert p.request_stream_usage(body, CHAT) is True
    assert body["stream_options"] == {"include_usage": True}
    body = {"stream": True, "stream_options": {"include_usage": False, "other": 1}}
    assert p.request_stream_usage(body, COMPLETIONS) is True
    assert body["stream_options"] == {"include_usage": True, "other": 1}
    body = {"stream": True, "stream_options": {"include_usage": True}}
    assert p.request_stream_usage(body, CHAT) is False
    assert body["stream_options"] == {"include_usage": True}
    for ep in (RESPONSES, MESSAGES, EMBEDDINGS):
        body = {"stream": True}
        assert p.request_stream_usage(body, ep) is False
        assert body == {"stream": True}
    body = {"model": "a"}  # not streaming: stream_options would be rejected upstream
    assert p.request_stream_usage(body, CHAT) is False
    assert body == {"model": "a"}


# --- streams ------------------------------------------------------------------------------------


def sse(*events: dict[str, Any] | str, typed: bool = False) -> bytes:
    out = b""
    for ev in events:
        data = ev.encode() if isinstance(ev, str) else orjson.dumps(ev)
        if typed and isinstance(ev, dict):
            out += b"event: " + ev["type"].encode() + b"\n"
        out += b"data: " + data + b"\n\n"
    return out


def chat_chunk(
    delta: dict[str, Any], finish: str | None = None, usage: bool = True
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1720000000,
        "model": "gpt-4.1-2025-04-14",
        "system_fingerprint": "fp_1",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage:
        chunk["usage"] = None  # with include_usage, every chunk carries "usage": null
    return chunk


CHAT_USAGE_CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1720000000,
    "model": "gpt-4.1-2025-04-14",
    "system_fingerprint": "fp_1",
    "choices": [],
    "usage": {
        "prompt_tokens": 2006,
        "completion_tokens": 12,
        "total_tokens": 2018,
        "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    },
}
# Text that looks like the markers must not confuse the observer.
TRICKY = 'Say "usage": {"x": 1} then [DONE] and data: [DONE]\n\nmessage_stop'
CHAT_HEAD = [
    chat_chunk({"role": "assistant", "content": "", "refusal": None}),
    chat_chunk({"content": "Hello"}),
    chat_chunk({"content": TRICKY}),
    chat_chunk({}, "stop"),
]
CHAT_STREAM = sse(*CHAT_HEAD, CHAT_USAGE_CHUNK, "[DONE]")
USAGE_EVENT = sse(CHAT_USAGE_CHUNK)
CHAT_STREAM_PLAIN = sse(
    *[{k: v for k, v in c.items() if k != "usage"} for c in CHAT_HEAD], "[DONE]"
)
CHAT_USAGE = p.Usage(2006, 12, 1920)

COMPLETIONS_STREAM = sse(
    *[
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1720000000,
            "model": "gpt-3.5-turbo-instruct",
            "choices": [{"text": t, "index": 0, "logprobs": None, "finish_reason": f}],
            "usage": None,
        }
        for t, f in (("Hel", None), ("lo", None), ("", "length"))
    ],
    {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1720000000,
        "model": "gpt-3.5-turbo-instruct",
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    },
    "[DONE]",
)

_RESP = {
    "id": "resp_1",
    "object": "response",
    "created_at": 1720000000,
    "status": "in_progress",
    "model": "gpt-4.1-2025-04-14",
    "output": [],
    "usage": None,
}
RESPONSES_STREAM = sse(
    {"type": "response.created", "sequence_number": 0, "response": _RESP},
    {"type": "response.in_progress", "sequence_number": 1, "response": _RESP},
    {
        "type": "response.output_text.delta",
        "sequence_number": 2,
        "item_id": "msg_1",
        "output_index": 0,
        "content_index": 0,
        "delta": "response.completed? " + TRICKY,
    },
    {
        "type": "response.completed",
        "sequence_number": 3,
        "response": {
            **_RESP,
            "status": "completed",
            "output": [{"type": "message", "content": [{"type": "output_text", "text": "Hi"}]}],
            "usage": {
                "input_tokens": 3000,
                "input_tokens_details": {"cached_tokens": 2048},
                "output_tokens": 87,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 3087,
            },
        },
    },
    typed=True,
)

ANTHROPIC_STREAM = sse(
    {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": "claude-sonnet-4-20250514",
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 25,
                "cache_creation_input_tokens": 100,
                "cache_read_input_tokens": 2000,
                "output_tokens": 1,
            },
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": TRICKY}},
    {"type": "content_block_stop", "index": 0},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 15},
    },
    {"type": "message_stop"},
    typed=True,
)

STREAMS: dict[str, tuple[p.Endpoint, bytes, p.Usage | None]] = {
    "chat": (CHAT, CHAT_STREAM, CHAT_USAGE),
    "chat-plain": (CHAT, CHAT_STREAM_PLAIN, None),
    "completions": (COMPLETIONS, COMPLETIONS_STREAM, p.Usage(5, 3)),
    "responses": (RESPONSES, RESPONSES_STREAM, p.Usage(3000, 87, 2048)),
    "anthropic": (MESSAGES, ANTHROPIC_STREAM, p.Usage(2125, 15, 2000, 100)),
}


def crlf(stream: bytes) -> bytes:
    return stream.replace(b"\n", b"\r\n")


def dropped(stream: bytes) -> bytes:
    """The stream minus exactly its usage-only event."""
    if stream.startswith(b'data: {"id":"cmpl'):
        i = stream.index(b'"choices":[]')
        start = stream.rindex(b"data: ", 0, i)
        end = stream.index(b"\n\n", i) + 2
        return stream[:start] + stream[end:]
    return stream.replace(USAGE_EVENT, b"")


def run(ep: p.Endpoint, chunks: list[bytes], drop: bool) -> tuple[bytes, p.StreamObserver]:
    obs = p.StreamObserver(ep, drop_usage_chunk=drop)
    out = []
    for chunk in chunks:
        sent = obs.feed(chunk)
        if not drop:
            assert sent is chunk  # zero-copy pass-through
        out.append(sent)
    out.append(obs.finish())
    return b"".join(out), obs


def expected(name: str, stream: bytes, drop: bool) -> bytes:
    return dropped(stream) if drop and name in ("chat", "completions") else stream


def split(stream: bytes, points: list[int]) -> list[bytes]:
    cuts = [0, *sorted(points), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(cuts)]


def test_dropped_helper_really_drops_one_event() -> None:
    assert len(dropped(CHAT_STREAM)) == len(CHAT_STREAM) - len(USAGE_EVENT)
    assert b'"choices":[]' not in dropped(COMPLETIONS_STREAM)
    assert dropped(COMPLETIONS_STREAM).endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("sep", ["lf", "crlf"])
def test_stream_split_at_every_byte(name: str, drop: bool, sep: str) -> None:
    ep, stream, usage = STREAMS[name]
    want = expected(name, stream, drop)
    if sep == "crlf":
        stream, want = crlf(stream), crlf(want)
    for i in range(len(stream) + 1):
        out, obs = run(ep, [stream[:i], stream[i:]], drop)
        assert out == want, i
        assert obs.usage == usage, i
        assert obs.done, i


@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize("drop", [False, True])
def test_stream_byte_by_byte(name: str, drop: bool) -> None:
    ep, stream, usage = STREAMS[name]
    out, obs = run(ep, [stream[i : i + 1] for i in range(len(stream))], drop)
    assert out == expected(name, stream, drop)
    assert (obs.usage, obs.done) == (usage, True)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(sorted(STREAMS)),
    drop=st.booleans(),
    use_crlf=st.booleans(),
    data=st.data(),
)
def test_stream_split_anywhere(name: str, drop: bool, use_crlf: bool, data: st.DataObject) -> None:
    ep, stream, usage = STREAMS[name]
    want = expected(name, stream, drop)
    if use_crlf:
        stream, want = crlf(stream), crlf(want)
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    out, obs = run(ep, split(stream, points), drop)
    assert out == want
    assert (obs.usage, obs.done) == (usage, True)


def test_done_only_at_the_terminator() -> None:
    for name, (ep, stream, _) in STREAMS.items():
        obs = p.StreamObserver(ep)
        last = stream.rstrip(b"\r\n").rfind(b"\n\n") + 2
        obs.feed(stream[:last])
        assert not obs.done, name
        obs.feed(stream[last:])
        assert obs.done, name


def test_anthropic_usage_is_merged_as_the_stream_goes() -> None:
    obs = p.StreamObserver(MESSAGES)
    cut = ANTHROPIC_STREAM.index(b"event: content_block_start")
    obs.feed(ANTHROPIC_STREAM[:cut])
    assert obs.usage == p.Usage(2125, 1, 2000, 100)
    obs.feed(ANTHROPIC_STREAM[cut:])
    assert obs.usage == p.Usage(2125, 15, 2000, 100)
    # Newer message_delta events also repeat the (cumulative) input counts.
    obs = p.StreamObserver(MESSAGES)
    obs.feed(
        sse(
            {
                "type": "message_start",
                "message": {"usage": {"input_tokens": 10, "output_tokens": 1}},
            },
            {"type": "message_delta", "usage": {"input_tokens": 12, "output_tokens": 40}},
            typed=True,
        )
    )
    assert obs.usage == p.Usage(12, 40)
    assert not obs.done


def test_truncated_stream_is_forwarded_as_is() -> None:
    cut = CHAT_STREAM.index(USAGE_EVENT) + 40  # inside the usage chunk
    for drop in (False, True):
        out, obs = run(CHAT, [CHAT_STREAM[:cut]], drop)
        assert out == CHAT_STREAM[:cut]
        assert obs.usage is None
        assert not obs.done
    cut = ANTHROPIC_STREAM.index(b"event: message_delta")
    out, obs = run(MESSAGES, [ANTHROPIC_STREAM[:cut]], False)
    assert obs.usage == p.Usage(2125, 1, 2000, 100)
    assert not obs.done


def test_last_event_without_blank_line_is_still_read() -> None:
    stream = CHAT_STREAM[: -len(b"\n\n")] + b"\n"  # "data: [DONE]\n" and EOF
    for drop in (False, True):
        out, obs = run(CHAT, [stream], drop)
        assert out == (dropped(stream) if drop else stream)
        assert (obs.usage, obs.done) == (CHAT_USAGE, True)


def test_drop_only_applies_to_openai_usage_chunks() -> None:
    out, obs = run(MESSAGES, [ANTHROPIC_STREAM], True)
    assert out == ANTHROPIC_STREAM
    # A usage carried on a content chunk (some compatible servers) is kept.
    chunk = {**chat_chunk({}, "stop"), "usage": CHAT_USAGE_CHUNK["usage"]}
    stream = sse(chunk, "[DONE]")
    out, obs = run(CHAT, [stream], True)
    assert (out, obs.usage) == (stream, CHAT_USAGE)


def test_quoted_done_marker_is_not_the_end() -> None:
    # "[DONE]" as text in the last content chunk of a read, the real marker in the next read.
    quoting = sse(chat_chunk({"content": "say [DONE] now"}))
    for drop in (False, True):
        obs = p.StreamObserver(CHAT, drop)
        obs.feed(quoting)
        assert not obs.done
        obs.feed(sse(CHAT_USAGE_CHUNK))
        assert not obs.done
        obs.feed(sse("[DONE]"))
        assert (obs.usage, obs.done) == (CHAT_USAGE, True)
    # Both in one read, the quoting chunk after the marker: the marker is still found.
    obs = p.StreamObserver(CHAT)
    obs.feed(sse(CHAT_USAGE_CHUNK, "[DONE]") + quoting)
    assert (obs.usage, obs.done) == (CHAT_USAGE, True)


def test_usage_null_chunks_are_not_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = orjson.loads

    def counting(data: bytes) -> Any:
        calls.append(data)
        return real(data)

    monkeypatch.setattr(orjson, "loads", counting)
    obs = p.StreamObserver(CHAT)
    obs.feed(CHAT_STREAM)
    # Only the usage chunk is parsed: a chunk quoting "[DONE]" is told from the marker
    # without parsing it.
    assert len(calls) == 1
    assert (obs.usage, obs.done) == (CHAT_USAGE, True)
    calls.clear()
    p.StreamObserver(RESPONSES).feed(RESPONSES_STREAM)
    assert len(calls) == 2  # the tricky delta and response.completed


def test_held_bytes_are_bounded_by_one_event() -> None:
    obs = p.StreamObserver(CHAT, drop_usage_chunk=True)
    first = CHAT_STREAM.index(b"\n\n") + 2
    assert obs.feed(CHAT_STREAM[: first + 10]) == CHAT_STREAM[:first]
    assert obs.feed(CHAT_STREAM[first + 10 :]) == dropped(CHAT_STREAM)[first:]


@pytest.mark.parametrize("size", [7, 100])
def test_runaway_event_passes_through(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    monkeypatch.setattr(p, "_MAX_EVENT", 64)
    junk = b"data: " + b"x" * 200 + b"\n\n"
    chunks = [junk[i : i + size] for i in range(0, len(junk), size)]
    for drop in (False, True):
        out, obs = run(CHAT, [*chunks, CHAT_STREAM], drop)
        assert out == junk + (dropped(CHAT_STREAM) if drop else CHAT_STREAM)
        assert (obs.usage, obs.done) == (CHAT_USAGE, True)


def test_big_event_in_small_chunks() -> None:
    text = "word " * 400_000  # a 2 MB response.completed, as TCP delivers it
    usage = {"input_tokens": 1, "output_tokens": 400_000}
    event = {"type": "response.completed", "response": {"output_text": text, "usage": usage}}
    stream = sse(event, typed=True)
    out, obs = run(RESPONSES, [stream[i : i + 4096] for i in range(0, len(stream), 4096)], False)
    assert out == stream
    assert (obs.usage, obs.done) == (p.Usage(1, 400_000), True)


def test_sdk_reads_the_stream_without_the_dropped_usage_chunk() -> None:
    obs = p.StreamObserver(CHAT, drop_usage_chunk=True)
    body = obs.feed(CHAT_STREAM) + obs.finish()

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"})

    client = openai.OpenAI(
        api_key="k",
        base_url="http://gw.test/v1",
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
        max_retries=0,
    )
    chunks = list(
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True
        )
    )
    assert len(chunks) == 4
    assert all(c.usage is None and c.choices for c in chunks)
    assert chunks[2].choices[0].delta.content == TRICKY


# --- the running output count and the stream cut ------------------------------------------------


def long_stream(name: str, n: int = 60) -> tuple[p.Endpoint, bytes]:
    """A FakeLLM-like stream of ``n`` one-token text deltas ("word0 ", "word1 ", ...)."""
    words = [f"word{i} " for i in range(n)]
    if name == "chat":
        head = chat_chunk({"role": "assistant", "content": "", "refusal": None})
        body = [chat_chunk({"content": w}) for w in words]
        return CHAT, sse(head, *body, chat_chunk({}, "stop"), CHAT_USAGE_CHUNK, "[DONE]")
    if name == "completions":
        env = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"}
        choices = [(w, None) for w in words] + [("", "stop")]
        chunks = [
            {**env, "choices": [{"text": t, "index": 0, "logprobs": None, "finish_reason": f}]}
            for t, f in choices
        ]
        return COMPLETIONS, sse(*chunks, "[DONE]")
    if name == "responses":
        where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
        item = {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant"}
        part = {"type": "output_text", "text": "", "annotations": []}
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": _RESP},
            {"type": "response.in_progress", "response": _RESP},
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**item, "content": []},
            },
            {"type": "response.content_part.added", **where, "part": part},
            *({"type": "response.output_text.delta", **where, "delta": w} for w in words),
            {"type": "response.completed", "response": {**_RESP, "status": "completed"}},
        ]
        numbered = [{**e, "sequence_number": i} for i, e in enumerate(events)]
        return RESPONSES, sse(*numbered, typed=True)
    start = orjson.loads(ANTHROPIC_STREAM.split(b"data: ", 1)[1].split(b"\n", 1)[0])
    deltas = [
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}
        for w in words
    ]
    block = {"type": "text", "text": ""}
    return MESSAGES, sse(
        start,
        {"type": "content_block_start", "index": 0, "content_block": block},
        {"type": "ping"},
        *deltas,
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": n},
        },
        {"type": "message_stop"},
        typed=True,
    )


CUT_NAMES = ["chat", "completions", "responses", "messages"]


def cut_run(
    ep: p.Endpoint, stream: bytes, limit: int, size: int = 37
) -> tuple[bytes, p.StreamObserver]:
    """Relay ``stream`` in ``size``-byte chunks and cut it once the count passes ``limit``."""
    obs = p.StreamObserver(ep, whole_events=True)
    out = []
    for i in range(0, len(stream), size):
        out.append(obs.feed(stream[i : i + size]))
        if obs.output_tokens > limit:
            out.append(obs.cut("fallback-model"))
            break
    else:
        out.append(obs.finish())
    return b"".join(out), obs


def _http(body: bytes) -> httpx2.Client:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"})

    return httpx2.Client(transport=httpx2.MockTransport(handler))


def _openai(body: bytes) -> openai.OpenAI:
    return openai.OpenAI(
        api_key="k", base_url="http://gw.test/v1", http_client=_http(body), max_retries=0
    )


def _anthropic(body: bytes) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key="k", base_url="http://gw.test", http_client=_http(body), max_retries=0
    )


@pytest.mark.parametrize("name", CUT_NAMES)
def test_output_tokens_is_conservative_and_independent_of_chunking(name: str) -> None:
    ep, stream = long_stream(name, 60)
    counts = set()
    for size in (1, 7, 64, len(stream)):
        obs = p.StreamObserver(ep)
        for i in range(0, len(stream), size):
            obs.feed(stream[i : i + size])
        obs.finish()
        counts.add(obs.output_tokens)
    # 60 one-token deltas of 6-7 bytes: at least 60, and ceil(bytes / 3) of the text.
    text_bytes = sum(len(f"word{i} ") for i in range(60))
    expected = max(60, -(-text_bytes // 3))
    if name == "chat":
        expected = max(expected, 12)  # the usage chunk reports 12 completion tokens
    assert counts == {expected}


def test_output_tokens_takes_the_reported_count_when_larger() -> None:
    obs = p.StreamObserver(MESSAGES)
    obs.feed(ANTHROPIC_STREAM)
    assert obs.usage is not None and obs.usage.completion_tokens == 15
    escaped = len(orjson.dumps(TRICKY)) - 2  # measured as sent: JSON-escaped
    assert obs.output_tokens == max(15, -(-escaped // 3)) == 24
    big = sse({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 5000}}, typed=True)
    obs.feed(big)
    assert obs.output_tokens == 5000


def test_output_count_measures_escaped_strings() -> None:
    text = 'a "quoted" \\ back\\slash\n"'  # escapes: \" \\ \n
    raw = orjson.dumps(text)[1:-1]
    obs = p.StreamObserver(CHAT)
    obs.feed(sse(chat_chunk({"content": text}), chat_chunk({"content": "x"}), "[DONE]"))
    assert obs._out_bytes == len(raw) + 1
    assert obs._out_events == 2
    # Keys as values, empty strings, null and non-string content are not output text.
    obs = p.StreamObserver(CHAT)
    obs.feed(sse(chat_chunk({"role": "assistant", "content": "", "refusal": None}), "[DONE]"))
    obs.feed(b'data: {"choices":[{"delta":{"content" : "abc","x":"content"}}]}\n\n')
    assert (obs._out_events, obs._out_bytes) == (1, 3)


def test_output_counting_parses_no_json(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = orjson.loads

    def counting(data: bytes) -> Any:
        calls.append(data)
        return real(data)

    monkeypatch.setattr(orjson, "loads", counting)
    for name in CUT_NAMES:
        ep, stream = long_stream(name, 200)
        obs = p.StreamObserver(ep, whole_events=True)
        for i in range(0, len(stream), 50):
            obs.feed(stream[i : i + 50])
        assert obs.output_tokens >= 200
    # Only the usage-bearing events (chat usage chunk, message_start/delta/stop,
    # response.created/in_progress/completed) are parsed, never a text delta.
    assert all(b"word1" not in c for c in calls)


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_whole_events_forwards_only_complete_events(name: str) -> None:
    ep, stream, usage = STREAMS[name]
    for size in (1, 5, 33):
        obs = p.StreamObserver(ep, whole_events=True)
        sent = b""
        for i in range(0, len(stream), size):
            out = obs.feed(stream[i : i + size])
            sent += out
            assert not sent or sent.endswith(b"\n\n"), (size, i)
        sent += obs.finish()
        assert sent == stream
        assert (obs.usage, obs.done) == (usage, True)


def test_stream_cut_tail_per_protocol() -> None:
    chat = p.stream_cut_tail(CHAT, "gpt-4.1", 7, response_id="chatcmpl-9")
    first, done = chat.split(b"\n\n", 1)
    assert done == b"data: [DONE]\n\n"
    assert orjson.loads(first[6:]) | {"created": 0} == {
        "id": "chatcmpl-9",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "gpt-4.1",
        "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}],
    }
    comp = orjson.loads(p.stream_cut_tail(COMPLETIONS, "m", 7).split(b"\n\n")[0][6:])
    assert comp["choices"] == [
        {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
    ]
    msgs = p.stream_cut_tail(MESSAGES, "claude", 42, open_block=2)
    names = [line[7:] for line in msgs.split(b"\n") if line.startswith(b"event: ")]
    assert names == [b"content_block_stop", b"message_delta", b"message_stop"]
    assert b'"index":2' in msgs
    assert b'"stop_reason":"max_tokens"' in msgs and b'"output_tokens":42' in msgs
    resp = p.stream_cut_tail(RESPONSES, "gpt-4.1", 3, response_id="resp_1", sequence_number=9)
    event = orjson.loads(resp.split(b"data: ", 1)[1])
    assert event["type"] == "response.incomplete" and event["sequence_number"] == 9
    assert event["response"]["id"] == "resp_1"
    assert event["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert p.stream_cut_tail(EMBEDDINGS, "m", 1) == b""


def test_cut_only_once_and_not_after_the_end() -> None:
    ep, stream = long_stream("chat", 5)
    obs = p.StreamObserver(ep, whole_events=True)
    obs.feed(stream)
    assert obs.done and obs.cut("m") == b""  # ended by itself: nothing to add
    obs = p.StreamObserver(ep, whole_events=True)
    obs.feed(stream[:200])
    assert obs.cut("m").endswith(b"data: [DONE]\n\n")
    assert obs.cut_short and obs.done
    assert obs.cut("m") == b"" and obs.finish() == b""


def test_cut_without_whole_events_terminates_the_partial_event() -> None:
    ep, stream = long_stream("chat", 5)
    obs = p.StreamObserver(ep)
    assert obs.feed(stream[:200]) == stream[:200]  # pass-through, partial event included
    assert obs.cut("m").startswith(b"\n\ndata: {")


def test_sdk_reads_a_cut_chat_stream() -> None:
    ep, stream = long_stream("chat", 60)
    body, obs = cut_run(ep, stream, limit=40)
    assert obs.cut_short
    chunks = list(
        _openai(body).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True
        )
    )
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].id == "chatcmpl-1" and chunks[-1].model == "gpt-4.1-2025-04-14"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.startswith("word0 word1 ") and "word59" not in text
    # The SDK's stream helper treats a stream that hit its limit as it always does.
    with (
        pytest.raises(openai.LengthFinishReasonError) as info,
        _openai(body).chat.completions.stream(
            model="m", messages=[{"role": "user", "content": "x"}]
        ) as s,
    ):
        s.get_final_completion()
    final = info.value.completion
    assert final.choices[0].finish_reason == "length"
    assert final.choices[0].message.content == text


def test_sdk_reads_a_cut_completions_stream() -> None:
    ep, stream = long_stream("completions", 60)
    body, obs = cut_run(ep, stream, limit=40)
    assert obs.cut_short
    chunks = list(_openai(body).completions.create(model="m", prompt="x", stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].id == "cmpl-1"
    assert "".join(c.choices[0].text for c in chunks).startswith("word0 word1 ")


def test_sdk_reads_a_cut_responses_stream() -> None:
    ep, stream = long_stream("responses", 60)
    body, obs = cut_run(ep, stream, limit=40)
    assert obs.cut_short
    events = list(_openai(body).responses.create(model="m", input="x", stream=True))
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.sequence_number == events[-2].sequence_number + 1
    assert last.response.id == "resp_1"
    assert last.response.incomplete_details is not None
    assert last.response.incomplete_details.reason == "max_output_tokens"
    with _openai(body).responses.stream(model="m", input="x") as s:
        streamed = list(s)
    assert streamed[-1].type == "response.incomplete"
    text = "".join(e.delta for e in streamed if e.type == "response.output_text.delta")
    assert text.startswith("word0 word1 ")
    assert streamed[-1].response.output[0].content[0].text == text  # the SDK's accumulation


def test_sdk_reads_a_cut_anthropic_stream() -> None:
    ep, stream = long_stream("messages", 60)
    body, obs = cut_run(ep, stream, limit=40)
    assert obs.cut_short
    events = list(
        _anthropic(body).messages.create(
            model="m", max_tokens=100, messages=[{"role": "user", "content": "x"}], stream=True
        )
    )
    assert [e.type for e in events[-3:]] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[-2].delta.stop_reason == "max_tokens"
    assert events[-2].usage.output_tokens == obs.output_tokens > 40
    with _anthropic(body).messages.stream(
        model="m", max_tokens=100, messages=[{"role": "user", "content": "x"}]
    ) as s:
        message = s.get_final_message()
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == obs.output_tokens
    assert message.usage.input_tokens == 25  # from message_start, kept
    assert message.content[0].text.startswith("word0 word1 ")  # type: ignore[union-attr]


def test_cut_anthropic_stream_between_blocks() -> None:
    """With no block open, the tail does not close one."""
    ep, stream = long_stream("messages", 3)
    end = stream.index(b"event: message_delta")
    obs = p.StreamObserver(ep, whole_events=True)
    obs.feed(stream[:end])
    tail = obs.cut("m")
    assert tail.startswith(b"event: message_delta")
    message = None
    with _anthropic(stream[:end] + tail).messages.stream(
        model="m", max_tokens=100, messages=[{"role": "user", "content": "x"}]
    ) as s:
        message = s.get_final_message()
    assert message.stop_reason == "max_tokens"


USAGE_JSON = (
    b'"usage":{"prompt_tokens":7,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":3}}'
)


@pytest.mark.parametrize(
    ("event", "dropped_chunk"),
    [
        (b'{"id":"c","choices":[],' + USAGE_JSON + b"}", True),  # OpenAI's order
        (b'{"id":"c",' + USAGE_JSON + b',"choices":[]}', True),  # choices after usage
        (b'{"id":"c",' + USAGE_JSON + b"}", True),  # no choices at all
        (b'{"id":"c","choices":[{"delta":{}}],' + USAGE_JSON + b"}", False),
        (b'{"id":"c",' + USAGE_JSON + b',"choices":[{"delta":{}}]}', False),
        (b'{"id":"c","choices": [],' + USAGE_JSON + b"}", True),  # other spelling: whole parse
        (b'{"x":{"choices":[]},"choices":[1],' + USAGE_JSON + b"}", False),  # whole parse
    ],
)
def test_usage_chunk_read_from_its_usage_member_on(event: bytes, dropped_chunk: bool) -> None:
    """Only the text from the top-level usage key on is parsed; the drop still follows the
    chunk's own choices, wherever they are."""
    stream = b'data: {"id":"c","choices":[{"delta":{"content":"hi"}}]}\n\ndata: ' + event
    stream += b"\n\ndata: [DONE]\n\n"
    out, obs = run(CHAT, [stream], drop=True)
    assert obs.usage == p.Usage(7, 2, 3)
    assert obs.done
    assert (b'"usage"' not in out) is dropped_chunk
    out, obs = run(CHAT, [stream], drop=False)
    assert out == stream and obs.usage == p.Usage(7, 2, 3)


@pytest.mark.parametrize(
    "event",
    [
        b'{"id":"c","meta":{' + USAGE_JSON + b"}}",  # nested: not the chunk's usage
        b'{"id":"c",' + USAGE_JSON + b',"usage":null}',  # a later member wins
    ],
)
def test_usage_only_from_the_top_level_and_last_member(event: bytes) -> None:
    out, obs = run(CHAT, [b"data: " + event + b"\n\ndata: [DONE]\n\n"], drop=True)
    assert obs.usage is None
    assert b'"usage"' in out


# --- the fast paths: per-object caches and the usual OpenAI stream end ---------------------------


def test_upstream_headers_value_memo_keeps_answers_and_rejections() -> None:
    for _ in range(2):  # the second call reads the memo
        out = p.upstream_headers(OPENAI_UP, [(b"accept", b" text/event-stream\t")])
        assert out["accept"] == "text/event-stream"
        out = p.upstream_headers(OPENAI_UP, [("Accept", "*/*"), ("accept", "*/*")])
        assert out["accept"] == "*/*,*/*"
        with pytest.raises(RequestRejected) as info:
            p.upstream_headers(OPENAI_UP, [(b"openai-beta", b"a\r\nx-evil: 1")])
        assert info.value.status == 400 and "openai-beta" in info.value.message
    # Past its bound the memo stops growing; answers stay the same.
    for i in range(p._HEADER_TEXTS_MAX + 10):
        assert (
            p.upstream_headers(OPENAI_UP, [(b"openai-beta", b"b%d" % i)])["openai-beta"] == f"b{i}"
        )
    assert len(p._HEADER_TEXTS) <= p._HEADER_TEXTS_MAX


def test_upstream_headers_follow_each_upstream_object() -> None:
    import attrs

    other = attrs.evolve(OPENAI_UP, api_key="sk-other")
    keyless = attrs.evolve(OPENAI_UP, api_key="")
    for _ in range(2):
        assert p.upstream_headers(OPENAI_UP, [])["authorization"] == "Bearer sk-up"
        assert p.upstream_headers(other, [])["authorization"] == "Bearer sk-other"
        assert "authorization" not in p.upstream_headers(keyless, [])
    # Many upstreams (config reloads) keep the cache bounded and the answers right.
    ups = [attrs.evolve(OPENAI_UP, api_key=f"k{i}") for i in range(p._UPSTREAMS_MAX + 5)]
    for i, up in enumerate(ups):
        assert p.upstream_headers(up, [])["authorization"] == f"Bearer k{i}"
    assert len(p._UPSTREAMS) <= p._UPSTREAMS_MAX


def test_rewrite_plan_per_version_and_model_per_upstream() -> None:
    v = version({"temperature": 0.3, "max_tokens": 50, "top_p": 0.9}, model="openai/gpt-x")
    renamed = Upstream(base_url="http://local/v1", protocol="openai")
    for _ in range(2):
        assert rewrite({"model": "a", "max_tokens": 80}, CHAT, v) == {
            "model": "gpt-x",
            "max_tokens": 50,
            "temperature": 0.3,
            "top_p": 0.9,
        }
        assert rewrite({"model": "a", "input": "x"}, EMBEDDINGS, v) == {
            "model": "gpt-x",
            "input": "x",
        }
        # The same version sent to an upstream that does not strip the prefix.
        other = Version("v1", "openai/gpt-x", "elsewhere", parameters={"seed": 1})
        assert p.rewrite_request({}, CHAT, other, renamed)["model"] == "gpt-x"
        anth = Version("v1", "openai/gpt-x", "elsewhere")
        assert p.rewrite_request({}, MESSAGES, anth, ANTHROPIC_UP)["model"] == "openai/gpt-x"
        assert p.rewrite_request({}, MESSAGES, anth, renamed)["model"] == "gpt-x"


# FakeLLM's and several servers' order: the usage member before "choices", all in one read.
USAGE_FIRST_CHUNK = (
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"m","usage":{"prompt_tokens":5,'
    b'"completion_tokens":3,"total_tokens":8,"prompt_tokens_details":{"cached_tokens":2}},'
    b'"choices":[]}\n\n'
)
USAGE_FIRST_HEAD = b"".join(
    b'data: {"id":"c1","model":"m","usage":null,"choices":[{"index":0,"delta":{"content":"'
    + w
    + b'"},"finish_reason":null}]}\n\n'
    for w in (b"one ", b"two ", b'data: [DONE] \\"usage\\":{}')
)
USAGE_FIRST_STREAM = USAGE_FIRST_HEAD + USAGE_FIRST_CHUNK + b"data: [DONE]\n\n"


def asgi_observer(drop: bool) -> p.StreamObserver:
    return p.StreamObserver(CHAT, drop, False, p.BYTES_PER_TOKEN, None, True)  # as asgi.py


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("use_crlf", [False, True])
def test_usage_first_stream_every_split(drop: bool, use_crlf: bool) -> None:
    stream = crlf(USAGE_FIRST_STREAM) if use_crlf else USAGE_FIRST_STREAM
    head = crlf(USAGE_FIRST_HEAD) if use_crlf else USAGE_FIRST_HEAD
    want = head + (crlf(b"data: [DONE]\n\n") if use_crlf else b"data: [DONE]\n\n")
    want = want if drop else stream
    eager = p.StreamObserver(CHAT)
    eager.feed(stream)
    for i in range(len(stream) + 1):
        obs = asgi_observer(drop)
        out = obs.feed(stream[:i]) + obs.feed(stream[i:]) + obs.finish()
        assert out == want, i
        assert obs.usage == p.Usage(5, 3, 2), i
        assert obs.done, i
        assert obs.output_tokens == eager.output_tokens, i


def test_usage_chunk_at_the_start_of_a_read() -> None:
    for drop in (False, True):
        obs = asgi_observer(drop)
        assert obs.feed(USAGE_FIRST_HEAD) == USAGE_FIRST_HEAD
        assert not obs.done and obs.usage is None
        tail = USAGE_FIRST_CHUNK + b"data: [DONE]\n\n"
        assert obs.feed(tail) == (b"data: [DONE]\n\n" if drop else tail)
        assert obs.usage == p.Usage(5, 3, 2) and obs.done


def test_done_only_in_content_text_at_the_end_is_not_the_end() -> None:
    # The last event's text ends like the terminator, escaped inside its JSON string.
    last = b'data: {"choices":[{"delta":{"content":"\\n\\ndata: [DONE]\\n\\n"}}]}\n\n'
    obs = asgi_observer(True)
    assert obs.feed(USAGE_FIRST_HEAD + last) == USAGE_FIRST_HEAD + last
    assert obs.finish() == b""
    assert not obs.done and obs.usage is None


def test_multi_line_usage_event_is_dropped_whole() -> None:
    event = b"event: chunk\n" + USAGE_FIRST_CHUNK
    stream = USAGE_FIRST_HEAD + event + b"data: [DONE]\n\n"
    obs = asgi_observer(True)
    assert obs.feed(stream) + obs.finish() == USAGE_FIRST_HEAD + b"data: [DONE]\n\n"
    assert obs.usage == p.Usage(5, 3, 2) and obs.done
    # A usage event followed by a line break inside its own text block ends where "\n\n" is.
    split_event = USAGE_FIRST_CHUNK[:-2] + b"\nid: 7\n\n"
    obs = asgi_observer(True)
    out = obs.feed(USAGE_FIRST_HEAD + split_event + b"data: [DONE]\n\n")
    assert out == USAGE_FIRST_HEAD + b"data: [DONE]\n\n"
    assert obs.usage == p.Usage(5, 3, 2) and obs.done


def test_trailing_partial_event_after_the_fast_path_is_held() -> None:
    obs = asgi_observer(True)
    part = USAGE_FIRST_CHUNK[:40]
    assert obs.feed(USAGE_FIRST_HEAD + part) == USAGE_FIRST_HEAD
    assert obs.feed(USAGE_FIRST_CHUNK[40:] + b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert obs.usage == p.Usage(5, 3, 2) and obs.done and obs.finish() == b""


def test_usage_chunk_not_last_before_done_keeps_what_follows_it() -> None:
    after = b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"late"}}]}\n\n'
    stream = USAGE_FIRST_HEAD + USAGE_FIRST_CHUNK + after + b"data: [DONE]\n\n"
    obs = asgi_observer(True)
    assert obs.feed(stream) == USAGE_FIRST_HEAD + after + b"data: [DONE]\n\n"
    assert obs.usage == p.Usage(5, 3, 2) and obs.done
