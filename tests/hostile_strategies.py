"""Hypothesis strategies for hostile HTTP input: bodies that are barely (or not) JSON, request
objects with every field of the wrong type, header and cookie values servers let through.

JSON is serialized by hand so that a body can hold what ``json.dumps`` never writes: NaN and
Infinity literals, integers of hundreds of digits, duplicate keys, lone surrogate escapes,
invalid UTF-8 inside strings, trailing garbage.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from hypothesis import strategies as st

from tests.hostile_support import ALIASES, COOKIE_SECRET, HIDDEN_TAG, PIN_TAGS


class Raw(bytes):
    """A JSON token written verbatim (possibly invalid)."""


class Obj(list):  # type: ignore[type-arg]
    """A JSON object as (key, value) pairs: keys may repeat."""


RAW_TOKENS = [
    b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1e-400", b"-0",
    b"18446744073709551616", b"-9223372036854775809", b"1" + b"0" * 400, b"0." + b"0" * 300 + b"1",
    b'"\\ud800"', b'"\\udc00x"', b'"\\u0000"', b'"\xff\xfe"', b'"\xed\xa0\x80"', b'"\xc3"',
    b"tru", b"nul", b"01", b"1.", b".5", b"+1", b"0x10", b"'single'", b"[1,]", b'{"a":1,}',
    b"", b"]", b"}", b'"unterminated', b"\x00", b"/* c */1",
]  # fmt: skip

# Text including the characters parsers and encoders trip on.
texts = st.text(
    st.characters(codec="utf-8") | st.sampled_from(["\x00", "\u2028", "\ufeff", '"', "\\", "~"]),
    max_size=24,
)
giant_strings = st.builds(
    lambda ch, n: ch * n, st.sampled_from(["x", "é", "中", "😀", '"', "\\"]), st.integers(1, 90_000)
)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=10**60),
    st.floats(),  # NaN and infinities included: written as literals
    texts,
    st.sampled_from(RAW_TOKENS).map(Raw),
)


def _children(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.lists(st.tuples(texts, inner), max_size=4).map(Obj)


junk = st.recursive(leaves, _children, max_leaves=8)


def dumps(node: Any) -> bytes:
    """Serialize ``node`` (Python values, :class:`Raw`, :class:`Obj`) as JSON-ish bytes."""
    if isinstance(node, Raw):
        return bytes(node)
    if isinstance(node, Obj):
        return b"{" + b",".join(dumps(k) + b":" + dumps(v) for k, v in node) + b"}"
    if isinstance(node, dict):
        return dumps(Obj(node.items()))
    if isinstance(node, list | tuple):
        return b"[" + b",".join(dumps(v) for v in node) + b"]"
    if isinstance(node, str):
        # Mostly escaped JSON; a lone surrogate written raw makes invalid UTF-8.
        if any("\ud800" <= c <= "\udfff" for c in node):
            return json.dumps(node, ensure_ascii=False).encode("utf-8", "surrogatepass")
        return json.dumps(node, ensure_ascii=False).encode()
    if node is None or isinstance(node, bool | int | float):
        return json.dumps(node).encode()  # floats: NaN / Infinity literals
    raise TypeError(type(node))


# --- request objects -----------------------------------------------------------------------------

models = st.one_of(
    st.sampled_from(ALIASES + PIN_TAGS),
    st.sampled_from(ALIASES + PIN_TAGS),
    st.sampled_from(
        [
            "",
            " chat-production",
            "CHAT-PRODUCTION",
            "chat-production\x00",
            HIDDEN_TAG,
            "gpt-v3",
            "gpt-4.1",
            "review-production/",
        ]
    ),
    texts,
    junk,
)
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.sampled_from(RAW_TOKENS[:12]).map(Raw),
    texts,
    junk,
)
content_blocks = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image", "image_url", "tool_use", "x"]) | junk},
    optional={"text": texts | giant_strings | junk, "cache_control": junk},
)
messages = st.one_of(
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant", "system", "tool"]) | junk},
            optional={"content": texts | giant_strings | st.lists(content_blocks, max_size=3)},
        ),
        max_size=4,
    ),
    junk,
)
_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "messages": messages,
    "prompt": texts | giant_strings | st.lists(texts | st.integers(), max_size=4) | junk,
    "input": texts | giant_strings | st.lists(texts | messages, max_size=3) | junk,
    "instructions": texts | junk,
    "system": texts | giant_strings | st.lists(content_blocks, max_size=3) | junk,
    "max_tokens": numbers,
    "max_completion_tokens": numbers,
    "max_output_tokens": numbers,
    "n": numbers,
    "best_of": numbers,
    "temperature": numbers,
    "stream": st.booleans() | st.sampled_from(["true", 1, 0, None]) | junk,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | junk}) | junk,
    "tools": st.lists(
        st.fixed_dictionaries({"type": st.just("function") | junk, "function": junk}), max_size=3
    )
    | junk,
    "tool_choice": junk,
    "metadata": junk,
}
# Never "dimensions": FakeLLM would build a vector that long.
extra_keys = texts.filter(lambda k: k not in _FIELDS and k != "dimensions")


@st.composite
def request_objects(draw: st.DrawFn) -> Obj:
    """A request object: ``model`` (often a routed alias) and any of the API's fields, each
    of any type, plus unknown keys; sometimes ``model`` twice or missing."""
    pairs: list[tuple[str, Any]] = []
    if draw(st.integers(0, 9)):  # one in ten has no model
        pairs.append(("model", draw(models)))
    names = draw(st.lists(st.sampled_from(sorted(_FIELDS)), unique=True, max_size=6))
    pairs += [(name, draw(_FIELDS[name])) for name in names]
    pairs += draw(st.lists(st.tuples(extra_keys, junk), max_size=2))
    if draw(st.integers(0, 19)) == 0:
        pairs.append(("model", draw(models)))  # a duplicate key: the last one wins
    order = draw(st.permutations(range(len(pairs))))
    return Obj(pairs[i] for i in order)


@st.composite
def request_bodies(draw: st.DrawFn) -> bytes:
    """Mostly request objects, with wrappers that break them: a BOM, trailing garbage, a
    truncation, a wrong top-level type, or bytes that are not text at all."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=300))
    if kind == 1:
        return dumps(draw(junk))
    body = dumps(draw(request_objects()))
    wrap = draw(st.integers(0, 11))
    if wrap == 0:
        body = b"\xef\xbb\xbf" + body
    elif wrap == 1:
        body += draw(st.sampled_from([b" ", b"\n", b"x", b"{}", b"\x00", b"\xff"]))
    elif wrap == 2 and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif wrap == 3:
        body = b" \t\r\n" + body + b" \n"
    return body


def split_body(body: bytes, cuts: list[int]) -> list[bytes]:
    """The body as the ASGI receive messages a server might deliver (empty chunks included)."""
    points = sorted({c % (len(body) + 1) for c in cuts})
    parts, last = [], 0
    for p in points:
        parts.append(body[last:p])
        last = p
    parts.append(body[last:])
    return parts


# RFC 9110 token characters (header and cookie names), lower case as servers deliver them.
_TCHAR = "abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+.^_`|~-"

# --- headers -------------------------------------------------------------------------------------

# What an HTTP/1.1 server hands to the app: any byte but NUL, CR and LF (obs-text included).
_VALUE_FIX = bytes.maketrans(b"\x00\r\n", b"\x01\t ")
header_values = st.one_of(
    st.binary(max_size=40).map(lambda b: b.translate(_VALUE_FIX)),
    st.builds(
        lambda b, n: (b or b"v").translate(_VALUE_FIX) * n,
        st.binary(min_size=1, max_size=8),
        st.integers(1, 4_000),
    ),
)
header_names = st.one_of(
    st.sampled_from(
        [
            b"content-type",
            b"content-length",
            b"cookie",
            b"authorization",
            b"x-api-key",
            b"accept",
            b"anthropic-version",
            b"anthropic-beta",
            b"openai-beta",
            b"x-forwarded-for",
            b"x-user-id",
            b"transfer-encoding",
            b"host",
            b"openai-organization",
            b"x-relaymw-pin",
            b"x-relaymw-pin-token",
            b"accept-encoding",
            b"expect",
        ]
    ),
    st.text(_TCHAR, min_size=1, max_size=24).map(str.encode),
)
content_lengths = st.one_of(
    st.integers(0, 200).map(lambda n: str(n).encode()),
    st.integers(0, 10**20 - 1).map(lambda n: str(n).encode()),  # h11 allows up to 20 digits
    st.sampled_from([b"-1", b"1.5", b"0x10", b" 5", b"\xb2", b"", b"1,1", b"+3"]),
)


def signed_cookie(alias: str, tag: str, expires: int, secret: str = COOKIE_SECRET) -> str:
    """A sticky cookie value as documented: ``tag~expires~hex(HMAC-SHA256)[:24]`` over
    ``alias~tag~expires`` (computed here independently of relaymw's codec)."""
    mac = hmac.new(secret.encode(), f"{alias}~{tag}~{expires}".encode(), hashlib.sha256)
    return f"{tag}~{expires}~{mac.hexdigest()[:24]}"


def cookie_triple(value: str) -> tuple[str, int, str] | None:
    """What a cookie value says once parsed as documented (quotes and spaces around it ignored,
    the expiry an ASCII number): ``(tag, expires, signature)``; None when malformed."""
    parts = value.strip().strip('"').split("~")
    if len(parts) != 3:
        return None
    tag, exp, sig = parts
    if not (exp.isascii() and exp.isdigit()) or len(exp) > 12:
        return None
    return tag, int(exp), sig


cookie_names = st.text(_TCHAR + "ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=16)
# Cookie values: anything a browser or a forger can put between "=" and ";".
cookie_values = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters=";"),
            max_size=40),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "~", "é", "\xff", "0"]),
              st.integers(1, 8_000)),
)  # fmt: skip


@st.composite
def tampered(draw: st.DrawFn, value: str) -> str:
    """``value`` after one to three edits: flip, insert, delete, truncate, swap a part."""
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.integers(0, 6))
        i = draw(st.integers(0, max(len(value) - 1, 0)))
        if op == 0 and value:  # change one character
            ch = draw(st.sampled_from("0123456789abcdefABCDEF~-.é\xff"))
            value = value[:i] + ch + value[i + 1 :]
        elif op == 1:
            value = value[:i] + draw(st.sampled_from("0a~-é \t")) + value[i:]
        elif op == 2 and value:
            value = value[:i] + value[i + 1 :]
        elif op == 3:
            value = value[:i]
        elif op == 4:
            parts = value.split("~")
            j = draw(st.integers(0, len(parts) - 1))
            parts[j] = draw(
                st.sampled_from(["claude-v1", "claude-v2", HIDDEN_TAG, "gpt-v1", "9999999999",
                                 "0", "", "0" * 24, "²", "1" * 13])
            )  # fmt: skip
            value = "~".join(parts)
        elif op == 5:
            value += "~" + draw(st.sampled_from(["", "x", "0" * 24]))
        else:
            value = value.upper()
    return value
