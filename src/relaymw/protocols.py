"""OpenAI and Anthropic wire logic: paths, request rewriting, headers, error bodies, usage, SSE.

Pure code on the hot path of every relayed call: no I/O, orjson for JSON, no regexes.
relaymw never translates between protocols; it only rewrites a request within its own.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Literal

import attrs
import orjson

from relaymw.config import Upstream, Version
from relaymw.errors import RequestRejected

__all__ = [
    "BYTES_PER_TOKEN",
    "Endpoint",
    "Family",
    "Kind",
    "StreamObserver",
    "Usage",
    "check_family",
    "error_body",
    "gateway_paths",
    "is_stream",
    "parse_body",
    "rejection_body",
    "request_stream_usage",
    "requested_model",
    "response_headers",
    "rewrite_request",
    "stream_cut_tail",
    "upstream_headers",
    "upstream_url",
    "usage_from_body",
]

Family = Literal["openai", "anthropic"]
Kind = Literal["chat", "completions", "embeddings", "responses", "messages"]


@attrs.frozen
class Endpoint:
    """One LLM API operation; ``suffix`` is the path after the API's ``/v1``."""

    family: Family
    kind: Kind
    suffix: str


_ENDPOINTS = (
    Endpoint("openai", "chat", "/chat/completions"),
    Endpoint("openai", "completions", "/completions"),
    Endpoint("openai", "embeddings", "/embeddings"),
    Endpoint("openai", "responses", "/responses"),
    Endpoint("anthropic", "messages", "/messages"),
)


def gateway_paths(prefix: str = "") -> dict[str, Endpoint]:
    """The API paths gateway mode answers, under ``prefix`` (``""`` or ``"/llm"``)."""
    prefix = prefix.strip().rstrip("/")
    if prefix and not prefix.startswith("/"):
        prefix = "/" + prefix
    return {f"{prefix}/v1{e.suffix}": e for e in _ENDPOINTS}


# --- reading the client's request -----------------------------------------------------------

_JSON_NAMES = {list: "an array", str: "a string", int: "a number", float: "a number"}


def parse_body(body: bytes) -> dict[str, Any]:
    """The request's JSON object; anything else is a 400 in the client's protocol."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        msg = "the request body is empty" if not body.strip() else f"invalid JSON body: {exc}"
        raise RequestRejected(400, "invalid_json", msg) from None
    if not isinstance(obj, dict):
        what = _JSON_NAMES.get(type(obj), "null" if obj is None else "a boolean")
        raise RequestRejected(
            400, "invalid_request", f"the request body must be a JSON object, not {what}"
        )
    return obj


def requested_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestRejected(
            400, "missing_model", 'the request body needs "model", a non-empty string'
        )
    return model


def is_stream(body: dict[str, Any]) -> bool:
    return body.get("stream") is True


def check_family(endpoint: Endpoint, upstream: Upstream, version_tag: str) -> None:
    """Reject a call whose API differs from the chosen version's upstream protocol."""
    if endpoint.family == upstream.protocol:
        return
    instead = "/v1/messages" if upstream.protocol == "anthropic" else "/v1/chat/completions"
    raise RequestRejected(
        400,
        "protocol_mismatch",
        f"version {version_tag!r} speaks the {upstream.protocol} API but this request used the "
        f"{endpoint.family} API (/v1{endpoint.suffix}); call {instead} instead "
        "(relaymw does not translate between protocols)",
    )


# --- rewriting it for the chosen version ----------------------------------------------------

_MAX_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# Wire control stays the client's and relaymw's: a version cannot switch streaming or the model.
_NEVER_OVERRIDE = frozenset({"model", "stream", "stream_options"})
# Parameters that mean nothing to (or break) an embeddings call.
_GENERATION_PARAMS = frozenset(
    {
        *_MAX_KEYS,
        *("temperature", "top_p", "top_k", "min_p", "stop", "stop_sequences", "seed", "n"),
        *("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias"),
        *("logprobs", "top_logprobs", "best_of", "echo", "suffix", "response_format"),
        *("tools", "tool_choice", "parallel_tool_calls", "reasoning", "reasoning_effort"),
        *("thinking", "text", "truncation", "service_tier", "store", "modalities", "audio"),
        *("prediction", "verbosity", "instructions", "system"),
    }
)
_DEFAULT_MAX_KEY = {"chat": "max_tokens", "completions": "max_tokens", "messages": "max_tokens"}


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Per version (by identity; a Version is frozen): what rewrite_request applies. Bounded: a
# reload makes new versions, and the entries of old ones are dropped with the rest.
_PLANS: dict[int, _Plan] = {}
_PLANS_MAX = 256


@attrs.define
class _Plan:
    version: Version
    overrides: dict[str, Any]  # parameters set as they are (none of the max-token keys)
    embedding_overrides: dict[str, Any]  # the same for an embeddings call
    cap: Any  # the lowest max-token parameter, None without one
    cap_key: str  # its name
    embedding_cap: Any
    embedding_cap_key: str
    # (upstream, its model name) of the last call: one attribute, so that threads sending the
    # version to different upstreams never pair one's upstream with the other's name.
    target: tuple[Upstream | None, str] = (None, "")


def _plan(version: Version) -> _Plan:
    plans = []
    for embeddings in (False, True):
        overrides: dict[str, Any] = {}
        cap: Any = None
        cap_key = ""
        for key, value in version.parameters.items():
            if key in _NEVER_OVERRIDE or (embeddings and key in _GENERATION_PARAMS):
                continue
            if key in _MAX_KEYS:
                if (type(value) is int or _is_number(value)) and (cap is None or value < cap):
                    cap, cap_key = value, key
            else:
                overrides[key] = value
        plans.append((overrides, cap, cap_key))
    (o, c, k), (eo, ec, ek) = plans
    plan = _Plan(version, o, eo, c, k, ec, ek)
    if len(_PLANS) >= _PLANS_MAX:
        _PLANS.clear()
    _PLANS[id(version)] = plan
    return plan


def rewrite_request(
    body: dict[str, Any], endpoint: Endpoint, version: Version, upstream: Upstream
) -> dict[str, Any]:
    """The body to send upstream. ``body`` itself is modified and returned (no copy).

    Version parameters override the client's, except the max-token keys, which cap it.
    Values are shared with ``version.parameters``: treat nested ones as read-only.
    """
    plan = _PLANS.get(id(version))
    if plan is None or plan.version is not version:
        plan = _plan(version)
    kind = endpoint.kind
    if kind == "embeddings":
        body.update(plan.embedding_overrides)
        cap, cap_key = plan.embedding_cap, plan.embedding_cap_key
    else:
        body.update(plan.overrides)
        cap, cap_key = plan.cap, plan.cap_key
    if cap is not None:
        capped = False
        for key in _MAX_KEYS:
            if key in body:  # null, a string or a higher number all become the cap
                capped = True
                v = body[key]
                if not (type(v) is int or _is_number(v)) or v > cap:
                    body[key] = cap
        if not capped:
            key = _DEFAULT_MAX_KEY.get(kind, "max_output_tokens")
            # A chat version that spells max_completion_tokens targets models that need it.
            if kind == "chat" and cap_key == "max_completion_tokens":
                key = cap_key
            body[key] = cap
    sp = version.system_prompt
    if sp and kind != "embeddings":
        if kind == "chat":  # _insert_system_prompt's first case, inlined
            messages = body.get("messages")
            if isinstance(messages, list):
                body["messages"] = [{"role": "system", "content": sp}, *messages]
        else:
            _insert_system_prompt(body, kind, sp)
    target = plan.target
    if target[0] is not upstream:
        target = plan.target = (upstream, version.upstream_model(upstream))
    body["model"] = target[1]
    return body


def _insert_system_prompt(body: dict[str, Any], kind: str, sp: str) -> None:
    """Put the version's system prompt before anything the client sent."""
    if kind == "chat":
        messages = body.get("messages")
        if isinstance(messages, list):
            body["messages"] = [{"role": "system", "content": sp}, *messages]
    elif kind == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            body["prompt"] = f"{sp}\n\n{prompt}"
        elif isinstance(prompt, list):  # token-id prompts (ints, lists of ints) stay as they are
            body["prompt"] = [f"{sp}\n\n{p}" if isinstance(p, str) else p for p in prompt]
    elif kind == "responses":
        own = body.get("instructions")
        body["instructions"] = f"{sp}\n\n{own}" if isinstance(own, str) and own else sp
    elif kind == "messages":
        own = body.get("system")
        if isinstance(own, str) and own:
            body["system"] = f"{sp}\n\n{own}"
        elif isinstance(own, list):
            body["system"] = [{"type": "text", "text": sp}, *own]
        else:
            body["system"] = sp


# Per upstream (by identity; an Upstream is frozen): the headers every request to it carries.
# Bounded as _PLANS is.
_UPSTREAMS: dict[int, _UpstreamFacts] = {}
_UPSTREAMS_MAX = 256


@attrs.define
class _UpstreamFacts:
    upstream: Upstream
    headers: dict[str, str]  # content-type and the upstream's own credentials
    names: dict[bytes | str, str | None]  # _FORWARD_NAMES of its protocol


def _upstream_facts(upstream: Upstream) -> _UpstreamFacts:
    headers = {"content-type": "application/json"}
    if upstream.protocol == "anthropic":
        if upstream.api_key:
            headers["x-api-key"] = upstream.api_key
    elif upstream.api_key:  # keyless local servers (vLLM, Ollama) get no Authorization at all
        headers["authorization"] = "Bearer " + upstream.api_key
    facts = _UpstreamFacts(upstream, headers, _FORWARD_NAMES[upstream.protocol])
    if len(_UPSTREAMS) >= _UPSTREAMS_MAX:
        _UPSTREAMS.clear()
    _UPSTREAMS[id(upstream)] = facts
    return facts


def upstream_url(upstream: Upstream, endpoint: Endpoint) -> str:
    """OpenAI base URLs include ``/v1``, Anthropic's do not (as each official SDK takes them)."""
    base = upstream.base_url.rstrip("/")
    if upstream.protocol == "openai" or base.endswith("/v1"):  # tolerate ".../v1" for Anthropic
        return base + endpoint.suffix
    return base + "/v1" + endpoint.suffix


# --- headers --------------------------------------------------------------------------------

# The only client headers forwarded, per protocol; everything else (credentials, cookies,
# organisation/project ids, user-agent, x-stainless-*, content-length, host) is dropped: the
# upstream call is relaymw's own, made with the upstream's key. Keys are bytes (ASGI) and str.
_FORWARD: dict[str, dict[bytes | str, str]] = {
    family: {k: n for n in names for k in (n, n.encode())}
    for family, names in (
        ("openai", ("accept", "openai-beta")),
        ("anthropic", ("accept", "anthropic-beta", "anthropic-version")),
    )
}


# Per protocol: a client header name (bytes or str, in any case) -> the lower-case name it is
# forwarded under, None when it is dropped: one lookup a header. Plain dicts: a dict
# subclass's ``[]`` goes through the generic slot path, several times slower than a dict's.
# Names are learnt as they are seen (:func:`_forward_name`), up to a bound, so a client
# inventing names cannot grow them; past the bound, names not in them are worked out each time.
_FORWARD_NAMES: dict[str, dict[bytes | str, str | None]] = {
    family: dict(names) for family, names in _FORWARD.items()
}
_FORWARD_NAMES_MAX = 1024


def _forward_name(family: str, name: bytes | str) -> str | None:
    """:data:`_FORWARD_NAMES` for a name not in it yet."""
    key = None
    if isinstance(name, str) and not name.islower():
        key = _FORWARD[family].get(name.lower())
    names = _FORWARD_NAMES[family]
    if len(names) < _FORWARD_NAMES_MAX:
        names[name] = key
    return key


# Not visible ASCII, space or tab: control characters (CR, LF, NUL) and non-ASCII text.
_UNSENDABLE = re.compile(r"[^\t\x20-\x7e]")


# Forwarded header values (bytes or str) -> their sendable text: clients send few distinct ones
# (accept: "*/*", "application/json"; API versions and betas). Bounded, short values only.
_HEADER_TEXTS: dict[bytes | str, str] = {}
_HEADER_TEXTS_MAX = 1024


def _header_text(key: str, value: bytes | str) -> str:
    text = (value.decode("latin-1") if isinstance(value, bytes) else value).strip(" \t")
    # An HTTP client refuses to send what the regex finds: say so, not 502. Printable
    # ASCII is always sendable: the regex runs only for tabs and anything else.
    if not (text.isascii() and text.isprintable()) and _UNSENDABLE.search(text):
        raise RequestRejected(
            400, "invalid_request", f"the {key} header holds characters it may not hold"
        )
    if len(value) <= 256 and len(_HEADER_TEXTS) < _HEADER_TEXTS_MAX:
        _HEADER_TEXTS[value] = text
    return text


def upstream_headers(
    upstream: Upstream,
    client_headers: Iterable[tuple[bytes, bytes]] | Iterable[tuple[str, str]],
) -> dict[str, str]:
    """Headers for the upstream request: the allow-list above plus the upstream's own auth."""
    facts = _UPSTREAMS.get(id(upstream))
    if facts is None or facts.upstream is not upstream:
        facts = _upstream_facts(upstream)
    names = facts.names
    # Never a forwarded name: content-type and the credentials are the upstream's own.
    out = facts.headers.copy()
    texts = _HEADER_TEXTS
    for name, value in client_headers:
        try:
            key = names[name]
        except KeyError:
            key = _forward_name(upstream.protocol, name)
        if key is None:
            continue
        text = texts.get(value)
        if text is None:
            text = _header_text(key, value)
        out[key] = f"{out[key]},{text}" if key in out else text
    if upstream.protocol == "anthropic" and "anthropic-version" not in out:
        out["anthropic-version"] = upstream.anthropic_version
    return out


# Upstream response headers passed to the client. Never hop-by-hop, length/encoding (relaymw
# re-frames the body), set-cookie, the account's rate-limit headers (relaymw sets its own) or
# the account's organisation ids. Keys are str and bytes (raw, as an upstream client received
# them; Title-Case too, as many HTTP/1.1 servers send them), values the lower-case bytes ASGI
# wants.
_RESPONSE_HEADERS: dict[str | bytes, bytes] = {
    k: n.encode()
    for n in (
        "content-type",
        "cache-control",
        "retry-after",
        "retry-after-ms",
        "x-should-retry",
        "x-request-id",
        "request-id",
        "openai-processing-ms",
        "openai-version",
    )
    for k in (n, n.encode(), n.title().encode())
}


# Every upstream response header name seen so far -> its lower-case bytes when passed, None
# when dropped: one lookup a header (a plain dict, as _FORWARD_NAMES). Bounded, so an upstream
# inventing names cannot grow it; past the bound, names not in it are worked out each time.
_RESPONSE_NAMES: dict[str | bytes, bytes | None] = dict(_RESPONSE_HEADERS)
_RESPONSE_NAMES_MAX = 1024


def _response_name(name: str | bytes) -> bytes | None:
    """:data:`_RESPONSE_NAMES` for a name not in it yet."""
    raw = None if name.islower() else _RESPONSE_HEADERS.get(name.lower())
    if len(_RESPONSE_NAMES) < _RESPONSE_NAMES_MAX:
        _RESPONSE_NAMES[name] = raw
    return raw


def response_headers(
    headers: Iterable[tuple[bytes, bytes]] | Iterable[tuple[str, str]],
) -> list[tuple[bytes, bytes]]:
    """The upstream headers passed to the client, as ASGI header pairs; names in any case."""
    out = []
    names = _RESPONSE_NAMES
    for name, value in headers:
        try:
            raw = names[name]
        except KeyError:
            raw = _response_name(name)
        if raw is not None:
            out.append((raw, value if isinstance(value, bytes) else value.encode("latin-1")))
    return out


# --- error bodies ---------------------------------------------------------------------------

_OPENAI_TYPES = {
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
_ANTHROPIC_TYPES = {
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_body(family: Family, status: int, message: str, code: str | None = None) -> bytes:
    """An error body the protocol's official SDK reads (``type`` follows the status)."""
    if family == "anthropic":
        default = "api_error" if status >= 500 else "invalid_request_error"
        err: dict[str, Any] = {"type": _ANTHROPIC_TYPES.get(status, default), "message": message}
        if code is not None:
            err["code"] = code
        return orjson.dumps({"type": "error", "error": err})
    default = "server_error" if status >= 500 else "invalid_request_error"
    etype = _OPENAI_TYPES.get(status, default)
    return orjson.dumps({"error": {"message": message, "type": etype, "param": None, "code": code}})


def rejection_body(family: Family, exc: RequestRejected) -> bytes:
    return error_body(family, exc.status, exc.message, exc.code)


# --- usage ----------------------------------------------------------------------------------


@attrs.define
class Usage:
    """Tokens of one call. ``prompt_tokens`` counts everything billed as input."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # the part of prompt_tokens read from cache
    cache_creation_tokens: int = 0  # anthropic cache_creation_input_tokens
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _int(v: object) -> int:
    return v if type(v) is int else 0  # not a bool (JSON parsers give exact ints)


def _detail(u: dict[str, Any], key: str) -> int:
    d = u.get(key)
    return _int(d.get("cached_tokens")) if isinstance(d, dict) else 0


def _usage(kind: str, u: dict[str, Any]) -> Usage:
    if kind == "messages":
        created = _int(u.get("cache_creation_input_tokens"))
        read = _int(u.get("cache_read_input_tokens"))
        return Usage(
            _int(u.get("input_tokens")) + created + read,
            _int(u.get("output_tokens")),
            read,
            created,
        )
    if kind == "responses":
        return Usage(
            _int(u.get("input_tokens")),
            _int(u.get("output_tokens")),
            _detail(u, "input_tokens_details"),
        )
    return _openai_usage(u)


def _openai_usage(u: dict[str, Any]) -> Usage:
    """An OpenAI ``usage`` object (chat, completions, embeddings): the stream observer calls
    it directly, as every OpenAI call reads its usage so. _int/_detail inlined."""
    p, c, d = u.get("prompt_tokens"), u.get("completion_tokens"), u.get("prompt_tokens_details")
    cached = d.get("cached_tokens") if isinstance(d, dict) else 0
    return Usage(
        p if type(p) is int else 0,
        c if type(c) is int else 0,
        cached if type(cached) is int else 0,
    )


def usage_from_body(endpoint: Endpoint, obj: dict[str, Any]) -> Usage | None:
    """Usage of a non-streamed response body; None when it has none."""
    u = obj.get("usage")
    if not isinstance(u, dict):
        return None
    kind = endpoint.kind
    if kind in ("messages", "responses"):
        return _usage(kind, u)
    return _openai_usage(u)


def request_stream_usage(body: dict[str, Any], endpoint: Endpoint) -> bool:
    """Make an OpenAI chat/completions stream report usage.

    Returns True when the client did not ask for it, so its usage chunk must be dropped.
    """
    kind = endpoint.kind
    if kind not in ("chat", "completions") or body.get("stream") is not True:
        return False
    opts = body.get("stream_options")
    if isinstance(opts, dict):
        if opts.get("include_usage") is True:
            return False
        opts["include_usage"] = True
    else:
        body["stream_options"] = {"include_usage": True}
    return True


# --- streams --------------------------------------------------------------------------------

BYTES_PER_TOKEN = 3
"""Bytes of UTF-8 text per token in relaymw's conservative estimates."""

# Keys whose string values are generated text, per endpoint kind (quoted: a key can never
# match inside a JSON string, where every quote is escaped).
_OUTPUT_KEYS: dict[str, tuple[bytes, ...]] = {
    "chat": (b'"content"', b'"arguments"', b'"refusal"', b'"reasoning_content"', b'"reasoning"'),
    "completions": (b'"text"',),
    "responses": (b'"delta"',),
    "messages": (b'"text"', b'"partial_json"', b'"thinking"'),
}
_MAX_EVENT = 16 << 20  # a runaway "event" larger than this is passed through unscanned
# With defer_count, events wait uncounted up to this many bytes: a stream that ends with its
# usage (the common case) is never counted at all, and memory stays bounded.
_DEFER_BYTES = 64 << 10
_TRIGGERS: dict[str, tuple[bytes, ...]] = {
    "responses": (b"response.completed", b"response.incomplete", b"response.failed"),
    "messages": (b"message_start", b"message_delta", b"message_stop"),
}
# What ends an OpenAI-style stream (any kind not in _TRIGGERS).
_OPENAI_TRIGGERS = (b"[DONE]",)
_DONE_EVENT = b"data: [DONE]\n\n"
_DONE_TAIL = b"\n\n" + _DONE_EVENT  # a stream's last event after the one before it
# An event whose one line is a JSON object. Compared with a slice, not startswith(): a bytes
# method with offsets costs several times as much as a short slice and ==.
_DATA_OBJECT = b"data: {"
_RESPONSES_END = frozenset({"response.completed", "response.incomplete", "response.failed"})
_ANTHROPIC_KEYS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


# A CRLF separator has no "\n\n" in it, so it is searched for too, but only in data that has
# a "\r" at all (one memchr): most streams use "\n" alone, and a failed rfind reads every byte.
# Single bytes are tested as ints: ``b"\r" in data`` first tries the bytes object as an int
# and pays for a formatted TypeError on every call.
_CR, _LF, _BACKSLASH = 0x0D, 0x0A, 0x5C


def _last_boundary(data: bytes | bytearray, start: int, end: int | None = None) -> int:
    """The offset just past the last event separator in ``data[start:end]``, else ``start``."""
    i = data.rfind(b"\n\n", start, end)
    i = i + 2 if i >= 0 else start
    if _CR in data:
        j = data.rfind(b"\r\n\r\n", start, end)
        if j >= 0 and j + 4 > i:
            return j + 4
    return i


def _event_end(data: bytes, at: int, end: int) -> tuple[int, int]:
    """(end of text, end with separator) of the event holding offset ``at``."""
    nn = data.find(b"\n\n", at, end)
    rr = data.find(b"\r\n\r\n", at, end) if _CR in data else -1
    if nn >= 0 and (rr < 0 or nn < rr):
        return nn, nn + 2
    if rr >= 0:
        return rr, rr + 4
    return end, end


def _event_bounds(data: bytes, start: int, end: int, at: int, crlf: bool) -> tuple[int, int, int]:
    """(start, end of text, end with separator) of the event of ``data[start:end]`` holding
    offset ``at``; ``crlf``: whether ``data`` has a "\r" at all."""
    if crlf:
        s = _last_boundary(data, start, at)
        text_end, e = _event_end(data, at, end)
        return s, text_end, e
    s = data.rfind(b"\n\n", start, at)
    s = s + 2 if s >= 0 else start
    text_end = data.find(b"\n\n", at, end)
    if text_end < 0:
        return s, end, end
    return s, text_end, text_end + 2


def _first_boundary(data: bytes) -> int:
    i = data.find(b"\n\n")
    j = data.find(b"\r\n\r\n")
    if i < 0:
        return j + 4 if j >= 0 else -1
    return i + 2 if j < 0 or i < j else j + 4


def _events(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(start, end of text, end with separator) of each event in ``data[start:end]``."""
    pos = start
    nn = data.find(b"\n\n", pos, end)
    rr = data.find(b"\r\n\r\n", pos, end) if _CR in data else -1
    while pos < end:
        # Re-search only a separator kind already passed: keeps a chunk's split linear.
        if 0 <= nn < pos:
            nn = data.find(b"\n\n", pos, end)
        if 0 <= rr < pos:
            rr = data.find(b"\r\n\r\n", pos, end)
        if nn >= 0 and (rr < 0 or nn < rr):
            yield pos, nn, nn + 2
            pos = nn + 2
        elif rr >= 0:
            yield pos, rr, rr + 4
            pos = rr + 4
        else:
            yield pos, end, end
            return


def _last_usage_object(data: bytes, start: int, end: int) -> int:
    """The offset of the last ``"usage"`` key in ``data[start:end]`` whose value is an object,
    -1 if none. (A key never matches inside a string, where quotes are escaped.)

    Only a region's last report is read: usage is cumulative, so it supersedes any before it.
    The search runs from the end, where OpenAI puts a stream's one usage chunk; every other
    chunk carries ``"usage":null``, which costs one look per chunk.
    """
    i = data.rfind(b'"usage"', start, end)
    while i >= 0:
        j = i + 7
        while j < end and data[j] in b" \t:":
            j += 1
        if j < end and data[j] == 0x7B:  # "{"
            return i
        i = data.rfind(b'"usage"', start, i)
    return -1


def _event_data(event: bytes) -> bytes | None:
    if event.startswith(b"data: ") and _LF not in event and _CR not in event:
        return event[6:]  # the usual event: one data line
    parts = [
        line[6:] if line.startswith(b"data: ") else line[5:]
        for line in event.splitlines()
        if line.startswith(b"data:")
    ]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else b"\n".join(parts)


class StreamObserver:
    """Watches an SSE response chunk by chunk: extracts usage and, when asked, drops the
    usage-only chunk relaymw requested for an OpenAI stream whose client did not.

    It also keeps a running, conservative count of the output so far (:attr:`output_tokens`)
    and can end the stream cleanly (:meth:`cut`). With ``whole_events`` (implied by
    ``drop_usage_chunk``) :meth:`feed` forwards only complete events and holds back a partial
    one, so that a cut never leaves the client half an event.

    With ``defer_count`` (ignored when there is an ``output_limit``) the output is counted
    only when :attr:`output_tokens` or :meth:`cut` is read, from the complete events kept
    meanwhile (at most 64 KiB of them; beyond that they are counted as they come): a caller
    that needs the count only when the upstream reported no usage pays for it only then.
    """

    # No __slots__: what most streams never change stays a class attribute, so a stream sets
    # only a few attributes in __init__ (and the rest when it first changes them).
    usage: Usage | None = None
    done = False
    cut_short = False
    limit_reached = False
    _skip = False  # inside a runaway event: pass bytes through until it ends
    _bytes_per_token = BYTES_PER_TOKEN
    _out_events = 0  # string values of generated text seen (non-empty)
    _out_bytes = 0  # their raw (JSON-escaped) length
    _uncounted_bytes = 0
    _ident: Mapping[str, str] = MappingProxyType({})  # the stream's "id" and "model"
    _ident_tries = 0
    _blocks = (0, 0)  # anthropic content_block_start / content_block_stop events
    _sequence = -1  # the last responses sequence_number
    _anthropic: dict[str, int]  # the usage reported so far (messages only)

    def __init__(
        self,
        endpoint: Endpoint,
        drop_usage_chunk: bool = False,
        # Positional too: a class called with keywords builds a dict of them per stream.
        whole_events: bool = False,
        bytes_per_token: int = BYTES_PER_TOKEN,
        output_limit: int | None = None,
        defer_count: bool = False,
    ) -> None:
        kind = endpoint.kind
        self._endpoint = endpoint
        self._kind = kind
        self._drop = drop = drop_usage_chunk and kind in ("chat", "completions")
        # With an output limit, feed() stops after the event that passes it (limit_reached):
        # one socket read may carry the whole rest of the stream.
        self._limit = output_limit
        self._whole = drop or whole_events or output_limit is not None
        # OpenAI-style usage in a "usage" member, and "[DONE]" at the end.
        self._openai = openai = kind not in _TRIGGERS
        self._plain = openai and output_limit is None  # feed()'s fast path applies
        if bytes_per_token != BYTES_PER_TOKEN:
            self._bytes_per_token = bytes_per_token
        self._defer = defer_count and output_limit is None
        self._uncounted: list[tuple[bytes, int, int]] = []  # complete events not counted yet
        self._held = bytearray()  # the trailing partial event (held back in whole-events mode)
        # Read on every feed: instance attributes are found faster than class ones.
        self._skip = self.done = False
        if kind == "messages":
            self._anthropic = {}

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to forward now: ``chunk`` itself unless dropping the usage chunk."""
        if self._plain and not self._held and not self._skip:
            # The usual read of an OpenAI stream without an output limit, nothing held: the
            # general path below inlined, with the end of such a stream (its usage chunk, then
            # "data: [DONE]") read from the end. A "\r" anywhere takes the general path.
            end = chunk.rfind(b"\n\n")
            if end >= 0 and _CR not in chunk:
                end += 2
                if self._defer:
                    self._uncounted.append((chunk, 0, end))
                    self._uncounted_bytes += end
                    if self._uncounted_bytes > _DEFER_BYTES:
                        self._count_deferred()
                else:
                    self._count(chunk, 0, end)
                s = e = 0
                at = chunk.rfind(b'"usage"', 0, end)
                # The region ends with "\n\n": the two bytes after a key in it exist.
                if at >= 0 and chunk[at + 7] == 0x3A and chunk[at + 8] == 0x7B:  # ':{'
                    # The event's bounds, found by memchr: a one-line event has "\n" only in
                    # the "\n\n" around it.
                    s = chunk.rfind(b"\n", 0, at)
                    if s > 0 and chunk[s - 1] == 0x0A:
                        s += 1
                    else:
                        s = chunk.rfind(b"\n\n", 0, at)
                        s = s + 2 if s >= 0 else 0
                    text_end = chunk.find(b"\n", at)
                    if chunk[text_end + 1] != 0x0A:
                        text_end = chunk.find(b"\n\n", text_end)
                    obj = None
                    if chunk[s : s + 7] == _DATA_OBJECT:
                        try:
                            obj = orjson.loads(b"{" + chunk[at:text_end])
                        except orjson.JSONDecodeError:
                            obj = None
                    # _handle_usage inlined for its usual case: a chunk whose "choices" come
                    # after its usage, or none asked to drop it.
                    if (
                        obj is not None
                        and (not self._drop or "choices" in obj)
                        and isinstance(u := obj["usage"], dict)
                    ):
                        self.usage = _openai_usage(u)
                        if self._drop and not obj["choices"]:
                            e = text_end + 2
                    elif self._handle_usage(chunk, s, text_end, at):
                        e = text_end + 2
                elif at >= 0:
                    drops = self._scan_usage(chunk, 0, end, False)
                    if drops:
                        s, e = drops[0]
                # Shorter than the tail when end < 16: never equal, wherever the slice starts.
                last_done = chunk[end - 16 : end] == _DONE_TAIL
                if last_done:
                    self.done = True
                elif not self.done:
                    self._scan_done(chunk, 0, end, False)
                if end < len(chunk):
                    if len(chunk) - end > _MAX_EVENT:
                        self._skip, end = True, len(chunk)
                    else:
                        self._held += memoryview(chunk)[end:]
                if not self._whole:
                    return chunk
                if e:
                    # The usage chunk just before [DONE]: one slice fewer.
                    if last_done and e == end - 14:
                        return chunk[:s] + _DONE_EVENT
                    return chunk[:s] + chunk[e:end]
                return chunk if end == len(chunk) else chunk[:end]
        if self.limit_reached:
            return b""
        held, start = self._held, 0
        if held:
            # Only the new bytes (and the 3 before them) can complete the held event: a big
            # event arriving in many chunks costs linear time, not quadratic.
            seen = max(len(held) - 3, 0)
            held += chunk
            if _last_boundary(held, seen) == seen:
                if len(held) <= _MAX_EVENT:
                    return b"" if self._whole else chunk
                self._skip = True  # a runaway event: forward it unscanned
                data = bytes(held)
                held.clear()
                return data if self._whole else chunk
            data = bytes(held)
            held.clear()
        elif self._skip:
            data, start = chunk, _first_boundary(chunk)
            if start < 0:
                return chunk
            self._skip = False
        else:
            data = chunk
        end = _last_boundary(data, start)
        drops = None
        if end > start:
            if self._limit is None:
                self._note_output(data, start, end)
            else:
                end = self._count_to_limit(data, start, end, self._limit)
            if self._openai:  # _scan's first test, saving a call on every read
                drops = self._scan_openai(data, start, end)
            else:
                drops = self._scan(data, start, end)
        if self.limit_reached:
            held.clear()
        elif end < len(data):
            if len(data) - end > _MAX_EVENT:
                self._skip, end = True, len(data)
            else:
                held += memoryview(data)[end:]
        if not self._whole:
            return chunk
        if not drops:
            return data if end == len(data) else data[:end]
        parts, pos = [], 0
        for s, e in drops:
            parts.append(data[pos:s])
            pos = e
        parts.append(data[pos:end])
        return b"".join(parts)

    def finish(self) -> bytes:
        """Whatever is still held, forwarded as is (a last event without its blank line)."""
        if not self._held:  # the usual end: the stream closed on an event boundary
            if self._skip:
                self._skip = False
            return b""
        held = bytes(self._held)
        self._held.clear()
        if held and not self._skip:
            self._note_output(held, 0, len(held))
            if self._marks(held, 0, len(held)):
                self._handle(held)
        self._skip = False
        return held if self._whole else b""

    def _marks(self, data: bytes, start: int, end: int) -> list[int]:
        """Offsets, in order, that put an event of ``data[start:end]`` worth reading: usage
        or an end marker. Each kind costs one C-speed pass over the region."""
        marks = []
        if self._openai:
            usage = _last_usage_object(data, start, end)
            if usage >= 0:
                marks.append(usage)
        for t in _TRIGGERS.get(self._kind, _OPENAI_TRIGGERS):
            i = data.find(t, start, end)
            while i >= 0:
                marks.append(i)
                i = data.find(t, i + len(t), end)
        if len(marks) > 1:
            marks.sort()
        return marks

    def _scan(self, data: bytes, start: int, end: int) -> list[tuple[int, int]] | None:
        """Read the complete events in ``data[start:end]``; return the spans to drop.

        Only the marked events are looked at: the content events in between cost nothing."""
        if self._openai:
            return self._scan_openai(data, start, end)
        drops = None
        e = start
        crlf = _CR in data
        for at in self._marks(data, start, end):
            if at < e:
                continue  # in the event just read
            # The event around ``at``: from just past the separator before it, to the next.
            if crlf:
                s = _last_boundary(data, e, at)
                text_end, e = _event_end(data, at, end)
            else:  # "\n\n" alone, inline: this runs for every event read
                s = data.rfind(b"\n\n", e, at)
                s = s + 2 if s >= 0 else e
                text_end = data.find(b"\n\n", at, end)
                if text_end < 0:
                    text_end = e = end
                else:
                    e = text_end + 2
            if self._handle(data[s:text_end]):
                if drops is None:
                    drops = []
                drops.append((s, e))
        return drops

    def _scan_openai(self, data: bytes, start: int, end: int) -> list[tuple[int, int]] | None:
        """:meth:`_scan` for OpenAI streams: only the last usage report and the ``[DONE]``
        marker matter, and a stream puts both at its end, so both are searched from there
        (a forward search for ``[DONE]`` would read every content event first)."""
        crlf = _CR in data
        drops = self._scan_usage(data, start, end, crlf)
        if not self.done:
            self._scan_done(data, start, end, crlf)
        return drops

    def _scan_usage(
        self, data: bytes, start: int, end: int, crlf: bool
    ) -> list[tuple[int, int]] | None:
        """The usage half of :meth:`_scan_openai`."""
        at = _last_usage_object(data, start, end)
        if at >= 0:
            s, text_end, e = _event_bounds(data, start, end, at, crlf)
            if self._handle_usage(data, s, text_end, at):
                return [(s, e)]
        return None

    def _scan_done(self, data: bytes, start: int, end: int, crlf: bool) -> None:
        """The ``[DONE]`` half of :meth:`_scan_openai`."""
        at = data.rfind(b"[DONE]", start, end)
        while at >= 0:
            s, text_end, _ = _event_bounds(data, start, end, at, crlf)
            event = data[s:text_end]
            if event == b"data: [DONE]" or _event_data(event) == b"[DONE]":
                self.done = True
                return
            at = data.rfind(b"[DONE]", start, s)  # that one was text inside another event

    def _handle_usage(self, data: bytes, s: int, text_end: int, at: int) -> bool:
        """:meth:`_handle` for the OpenAI event ``data[s:text_end]`` whose last ``"usage"`` key
        holding an object is at ``at``: as :func:`relaymw.engine.usage_of_body` does, only the
        text from that key on, reopened with ``{``, is parsed when it is an object by itself
        (then the key is a member of the top-level object), not the chunk's id and model. The
        drop needs the chunk's ``choices`` empty or absent: read from that tail when it holds
        them, else from the one compact ``"choices":[]`` before the key. Anything else is
        parsed whole: other spellings, and an event with more lines after the usage (they
        leave the tail no JSON). Lines before it leave the tail as a whole parse reads it."""
        if data[s : s + 7] == _DATA_OBJECT:
            try:
                obj = orjson.loads(b"{" + data[at:text_end])
            except orjson.JSONDecodeError:
                obj = None
            # A later duplicate "usage" member (not an object) wins, as in a whole parse.
            if obj is not None and isinstance(u := obj["usage"], dict):
                choices: Any = None
                if not self._drop:
                    pass
                elif "choices" in obj:
                    choices = obj["choices"]
                else:
                    n = data.count(b'"choices"', s, at)
                    if n > 1 or (n == 1 and data.find(b'"choices":[]', s, at) < 0):
                        return self._handle(data[s:text_end])
                self.usage = _openai_usage(u)
                return self._drop and not choices
        return self._handle(data[s:text_end])

    def _handle(self, event: bytes) -> bool:
        """Take usage and the end marker from one event; True if it is the chunk to drop."""
        payload = _event_data(event)
        if payload is None:
            return False
        if payload == b"[DONE]":
            self.done = True
            return False
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(obj, dict):
            return False
        if self._openai:
            u = obj.get("usage")
            if not isinstance(u, dict):
                return False
            self.usage = _usage(self._kind, u)
            return self._drop and not obj.get("choices")
        kind = obj.get("type")
        if self._kind == "messages":
            if kind == "message_start":
                msg = obj.get("message")
                self._merge_anthropic(msg.get("usage") if isinstance(msg, dict) else None)
            elif kind == "message_delta":  # output_tokens here are cumulative
                self._merge_anthropic(obj.get("usage"))
            elif kind == "message_stop":
                self.done = True
            return False
        if self._kind == "responses" and kind in _RESPONSES_END:
            self.done = True
            resp = obj.get("response")
            if isinstance(resp, dict) and isinstance(resp.get("usage"), dict):
                self.usage = _usage("responses", resp["usage"])
        return False

    def _merge_anthropic(self, u: object) -> None:
        if not isinstance(u, dict):
            return
        for key in _ANTHROPIC_KEYS:
            v = u.get(key)
            if isinstance(v, int) and not isinstance(v, bool):
                self._anthropic[key] = v
        self.usage = _usage("messages", self._anthropic)

    # --- the running output count and the cut ------------------------------------------------

    @property
    def output_tokens(self) -> int:
        """Output tokens so far, conservatively: the larger of the upstream's own count (when
        it has reported one) and ``max(text values, ceil(text bytes / bytes_per_token))`` over
        the generated-text strings of the complete events seen (``delta.content``, tool-call
        arguments, reasoning, ``text``, ``partial_json``, ``thinking``, responses ``delta``),
        measured in their JSON-escaped form. Each text value counts at least one token (an
        OpenAI delta is one token), and 3 bytes per token over-counts English (about 4 per
        token) and code, and matches CJK (3 bytes per character). Nothing is JSON-parsed: one
        ``bytes.find`` per key and complete region. An event larger than 16 MiB is not
        counted."""
        self._count_deferred()
        size = self._out_bytes
        estimate = max(self._out_events, -(-size // self._bytes_per_token))
        reported = self.usage.completion_tokens if self.usage is not None else 0
        return max(estimate, reported)

    def _count_to_limit(self, data: bytes, start: int, end: int, limit: int) -> int:
        """Count event by event; the end of the event that passes ``limit``, else ``end``."""
        for s, _, e in _events(data, start, end):
            self._count(data, s, e)
            if self.output_tokens > limit:
                self.limit_reached = True
                return e
        return end

    def _note_output(self, data: bytes, start: int, end: int) -> None:
        """Count the complete events ``data[start:end]`` now, or keep them for later."""
        if not self._defer:
            self._count(data, start, end)
            return
        self._uncounted.append((data, start, end))
        self._uncounted_bytes += end - start
        if self._uncounted_bytes > _DEFER_BYTES:
            self._count_deferred()

    def _count_deferred(self) -> None:
        uncounted = self._uncounted
        if uncounted:
            self._uncounted, self._uncounted_bytes = [], 0
            for data, start, end in uncounted:
                self._count(data, start, end)

    def _count(self, data: bytes, start: int, end: int) -> None:
        """Count the generated text in the complete events ``data[start:end]``."""
        find = data.find
        for key in _OUTPUT_KEYS.get(self._kind, ()):
            i = find(key, start, end)
            while i >= 0:
                j = i + len(key)
                if data[j : j + 2] == b':"':  # the common, compact spelling
                    j += 2
                else:
                    j = _value_start(data, j, end)
                    if j < 0:
                        i = find(key, i + len(key), end)
                        continue
                close = find(b'"', j, end)
                if close > j and data[close - 1] == 0x5C:  # an escaped quote: scan on
                    close = _string_end(data, j, end)
                if close < 0:
                    break
                if close > j:
                    self._out_events += 1
                    self._out_bytes += close - j
                i = find(key, close + 1, end)
        if self._kind == "messages":
            started, stopped = self._blocks
            self._blocks = (
                started + data.count(b'"content_block_start"', start, end),
                stopped + data.count(b'"content_block_stop"', start, end),
            )
        elif self._kind == "responses":
            i = data.rfind(b'"sequence_number"', start, end)
            j = _value_start(data, i + 17, end, b"0123456789") if i >= 0 else -1
            if j >= 0:
                k = j
                while k < end and 0x30 <= data[k] <= 0x39:
                    k += 1
                self._sequence = int(data[j - 1 : k])
        if self._ident_tries < 8 and len(self._ident) < 2:
            self._ident_tries += 1
            ident = dict(self._ident)  # at most one entry, at most 8 times a stream
            for name in ("id", "model"):
                if name not in ident:
                    value = _string_value(data, b'"' + name.encode() + b'"', start, end)
                    if value:
                        ident[name] = value
            self._ident = ident

    def cut(self, model: str = "") -> bytes:
        """End the stream now: the bytes that close it cleanly in its protocol (see
        :func:`stream_cut_tail`), b"" if it has already ended. Send them after the output of
        the last :meth:`feed`, then close the upstream response; :meth:`finish` returns b""
        afterwards. The stream's own id and model are reused (``model`` when none was seen).

        Use ``whole_events=True`` for a stream that may be cut: otherwise the client may hold
        the start of an event, which the tail can only terminate, not complete.
        """
        if self.done:
            return b""
        self._count_deferred()  # the stream's id, model and open block come from the count
        self.done = self.cut_short = True
        partial = bool(self._held) and not self._whole
        self._held = bytearray()
        self._skip = False
        blocks = self._blocks
        tail = stream_cut_tail(
            self._endpoint,
            self._ident.get("model") or model,
            self.output_tokens,
            response_id=self._ident.get("id"),
            open_block=blocks[0] - 1 if blocks[0] > blocks[1] else None,
            sequence_number=self._sequence + 1,
        )
        return b"\n\n" + tail if partial else tail


_JSON_SPACE = b" \t\r\n"


def _value_start(data: bytes, i: int, end: int, first: bytes = b'"') -> int:
    """After a key ending at ``i``: the offset just past the value's first byte when that is
    one of ``first`` (a quote: a string), else -1."""
    while i < end and data[i] in _JSON_SPACE:
        i += 1
    if i >= end or data[i] != 0x3A:  # ":"
        return -1
    i += 1
    while i < end and data[i] in _JSON_SPACE:
        i += 1
    return i + 1 if i < end and data[i] in first else -1


def _string_end(data: bytes, i: int, end: int) -> int:
    """The offset of the quote closing the JSON string whose text starts at ``i``; -1 if none."""
    j = data.find(b'"', i, end)
    while j > i and data[j - 1] == 0x5C:  # a backslash: escaped unless itself escaped
        k = j - 1
        while k > i and data[k - 1] == 0x5C:
            k -= 1
        if (j - k) % 2 == 0:
            break
        j = data.find(b'"', j + 1, end)
    return j


def _string_value(data: bytes, key: bytes, start: int, end: int) -> str:
    """The first string value of ``key`` in ``data[start:end]``, "" when there is none."""
    i = data.find(key, start, end)
    while i >= 0:
        j = _value_start(data, i + len(key), end)
        if j >= 0:
            close = _string_end(data, j, end)
            if close >= 0:
                raw = data[j:close]
                if _BACKSLASH not in raw:  # ids and model names: no escapes, no JSON parse
                    return raw.decode("utf-8", "replace")
                try:
                    value = orjson.loads(data[j - 1 : close + 1])
                except orjson.JSONDecodeError:
                    return ""
                return value if isinstance(value, str) else ""
        i = data.find(key, i + len(key), end)
    return ""


def _sse_data(event: dict[str, Any], name: str | None = None) -> bytes:
    head = b"event: " + name.encode() + b"\n" if name else b""
    return head + b"data: " + orjson.dumps(event) + b"\n\n"


def stream_cut_tail(
    endpoint: Endpoint,
    model: str,
    output_tokens: int,
    *,
    response_id: str | None = None,
    open_block: int | None = None,
    sequence_number: int | None = None,
) -> bytes:
    """The events that end a stream cut short for cost, as the protocol ends one that reached
    its output limit, so the official SDKs finish normally:

    - chat: a chunk with an empty delta and ``finish_reason: "length"``, then ``[DONE]``;
    - completions: a choice with ``text: ""`` and ``finish_reason: "length"``, then ``[DONE]``;
    - messages: ``content_block_stop`` for ``open_block`` (when one is open), ``message_delta``
      with ``stop_reason: "max_tokens"`` and ``usage.output_tokens``, then ``message_stop``;
    - responses: ``response.incomplete`` with ``incomplete_details.reason:
      "max_output_tokens"`` (no ``output``: the SDK keeps what it accumulated).

    ``response_id`` should be the stream's own id (the OpenAI SDK checks it for responses).
    """
    created = int(time.time())
    kind = endpoint.kind
    if kind in ("chat", "completions"):
        if kind == "chat":
            obj = "chat.completion.chunk"
            choice: dict[str, Any] = {"index": 0, "delta": {}, "logprobs": None}
        else:
            obj = "text_completion"
            choice = {"index": 0, "text": "", "logprobs": None}
        choice["finish_reason"] = "length"
        chunk = {
            "id": response_id or f"relaymw-cut-{created}",
            "object": obj,
            "created": created,
            "model": model,
            "choices": [choice],
        }
        return _sse_data(chunk) + b"data: [DONE]\n\n"
    if kind == "messages":
        out = b""
        if open_block is not None:
            out += _sse_data(
                {"type": "content_block_stop", "index": open_block}, "content_block_stop"
            )
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
        }
        out += _sse_data(delta, "message_delta")
        return out + _sse_data({"type": "message_stop"}, "message_stop")
    if kind == "responses":
        event = {
            "type": "response.incomplete",
            "sequence_number": sequence_number or 0,
            "response": {
                "id": response_id or f"resp_relaymw_cut_{created}",
                "object": "response",
                "created_at": created,
                "status": "incomplete",
                "model": model,
                "error": None,
                "incomplete_details": {"reason": "max_output_tokens"},
                "usage": None,
            },
        }
        return _sse_data(event, "response.incomplete")
    return b""
