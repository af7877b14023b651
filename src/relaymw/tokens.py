"""Token estimates made before a call is sent: no network, no model download.

The per-request cost cap and budget reservations need the prompt's size before the upstream
reports it. An estimate that is too low lets a call cost more than its cap, so the default,
:class:`CharEstimator`, over-estimates on purpose: one token per ``BYTES_PER_TOKEN`` (3) bytes
of UTF-8 text (English averages about 4 per token, code about 3, CJK about 3 per character),
dictionary keys and tool schemas included, plus a per-message and a per-request overhead.
:class:`TiktokenEstimator` counts with OpenAI's ``o200k_base`` encoding when ``tiktoken`` is
installed *and* its encoding file is already cached (it is never downloaded implicitly), with
a safety margin for other tokenizers. :func:`default_estimator` picks between them.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from relaymw.protocols import BYTES_PER_TOKEN, Endpoint

__all__ = [
    "IMAGE_TOKENS",
    "CharEstimator",
    "TiktokenEstimator",
    "TokenEstimator",
    "default_estimator",
    "estimate_completion_tokens",
]

log = logging.getLogger("relaymw.tokens")

# An image costs a bounded number of tokens whatever its encoded size (OpenAI high detail and
# Anthropic's ~1.15 megapixel images stay below this); its base64 is not counted as text.
IMAGE_TOKENS = 2000
_IMAGE_TYPES = frozenset({"image", "image_url", "input_image"})
# The request fields that are billed as input.
_PROMPT_FIELDS = (
    "system",
    "messages",
    "prompt",
    "suffix",
    "input",
    "instructions",
    "tools",
    "functions",
    "tool_choice",
    "response_format",
    "text",
)
_PROMPT_SET = frozenset(_PROMPT_FIELDS)
_LIST_FIELDS = ("messages", "input")  # each item pays the per-message overhead


class TokenEstimator(Protocol):
    """Estimates how many input tokens a request body will be billed for."""

    def prompt_tokens(self, body: Mapping[str, Any], endpoint: Endpoint) -> int: ...


# Deeper than this, a subtree is walked by _collect_deep (no recursion); a request's own
# structure (messages, content parts, tool schemas) is far shallower.
_MAX_DEPTH = 32


def _collect(node: Any, parts: list[str], depth: int = 0) -> int:
    """Append every string in ``node`` (keys too) to ``parts``, in document order; return
    tokens counted directly (numbers, booleans, nulls, images). Recursive, which is the fast
    way in Python, down to ``_MAX_DEPTH``; deeper subtrees go to :func:`_collect_deep`.

    Exact types are tested first (``__class__ is``: cheaper than ``isinstance``, and what
    parsed JSON holds); subclasses take the ``isinstance`` tests after them."""
    cls = node.__class__
    if cls is str:
        parts.append(node)
        return 0
    direct = 0
    append = parts.append
    if cls is dict or (cls is not list and isinstance(node, dict)):
        kind = node.get("type")
        if kind is not None and isinstance(kind, str) and kind in _IMAGE_TYPES:
            return IMAGE_TOKENS
        if depth >= _MAX_DEPTH:
            return _collect_deep(node, parts)
        for key, value in node.items():
            append(key if key.__class__ is str else str(key))
            if value.__class__ is str:  # most values: no call for them
                append(value)
            else:
                direct += _collect(value, parts, depth + 1)
        return direct
    if cls is list or isinstance(node, (list, tuple)):
        if depth >= _MAX_DEPTH:
            return _collect_deep(node, parts)
        inner = depth + 1
        for item in node:
            if item.__class__ is str:
                append(item)
            elif item.__class__ is dict and inner < _MAX_DEPTH and item.get("type") is None:
                # A message ({"role", "content"}): the dict branch above, inlined, so a long
                # conversation costs no call per message.
                for key, value in item.items():
                    append(key if key.__class__ is str else str(key))
                    if value.__class__ is str:
                        append(value)
                    else:
                        direct += _collect(value, parts, inner + 1)
            else:
                direct += _collect(item, parts, inner)
        return direct
    if isinstance(node, str):
        parts.append(node)
        return 0
    return 1  # a number (a token id in a token-array prompt), a boolean or null


def _collect_deep(node: Any, parts: list[str]) -> int:
    """:func:`_collect` with a stack of iterators rather than recursion: a request nested
    thousands of levels deep must not exhaust Python's stack."""
    direct = 0
    stack: list[Iterator[Any]] = [iter((node,))]
    while stack:
        for item in stack[-1]:
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, dict):
                kind = item.get("type")
                if isinstance(kind, str) and kind in _IMAGE_TYPES:
                    direct += IMAGE_TOKENS
                else:
                    stack.append(_keys_and_values(item))
                    break
            elif isinstance(item, (list, tuple)):
                stack.append(iter(item))
                break
            else:
                direct += 1
        else:
            stack.pop()
    return direct


def _keys_and_values(node: dict[Any, Any]) -> Iterator[Any]:
    for key, value in node.items():
        yield str(key)
        yield value


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class _Walker:
    """Shared by the estimators: the request's text, its direct tokens and its overheads."""

    def __init__(self, message_overhead: int, request_overhead: int) -> None:
        self.message_overhead = message_overhead
        self.request_overhead = request_overhead

    def walk(self, body: Mapping[str, Any]) -> tuple[list[str], int]:
        parts: list[str] = []
        direct = self.request_overhead
        for field in _PROMPT_FIELDS:
            value = body.get(field)
            if value is None:
                continue
            direct += _collect(value, parts)
            if field in _LIST_FIELDS and isinstance(value, list):
                direct += self.message_overhead * len(value)
        return parts, direct


class CharEstimator(_Walker):
    """``ceil(UTF-8 bytes / bytes_per_token)`` of every string in the prompt fields, plus
    ``message_overhead`` per message and ``request_overhead`` per request. Fast (one pass, no
    encoding of ASCII text) and conservative for English, code and CJK text."""

    def __init__(
        self,
        bytes_per_token: int = BYTES_PER_TOKEN,
        message_overhead: int = 4,
        request_overhead: int = 8,
    ) -> None:
        super().__init__(message_overhead, request_overhead)
        self.bytes_per_token = bytes_per_token

    def prompt_tokens(self, body: Mapping[str, Any], endpoint: Endpoint) -> int:
        # walk()'s sum in the body's own order (a sum needs no other): no lookup per field.
        parts: list[str] = []
        direct = self.request_overhead
        for field, value in body.items():
            if value is not None and field in _PROMPT_SET:
                direct += _collect(value, parts)
                if field in _LIST_FIELDS and isinstance(value, list):
                    direct += self.message_overhead * len(value)
        # UTF-8 sizes add up over a concatenation: one size for the whole text is the sum.
        size = _utf8_len("".join(parts))
        return direct + -(-size // self.bytes_per_token)


class TiktokenEstimator(_Walker):
    """Counts with a tiktoken encoding, times ``margin`` (``anthropic_margin`` for the
    Anthropic API, whose tokenizer yields more tokens than ``o200k_base`` for the same text)."""

    def __init__(
        self,
        encoding: Any,
        margin: float = 1.1,
        anthropic_margin: float = 1.35,
        message_overhead: int = 4,
        request_overhead: int = 8,
    ) -> None:
        super().__init__(message_overhead, request_overhead)
        self.encoding = encoding
        self.margin = margin
        self.anthropic_margin = anthropic_margin

    @classmethod
    def load(
        cls, name: str = "o200k_base", allow_download: bool = False
    ) -> TiktokenEstimator | None:
        """An estimator on encoding ``name``, or None when tiktoken or (unless
        ``allow_download``) the cached encoding file is missing."""
        encoding = _tiktoken_encoding(name, allow_download)
        return None if encoding is None else cls(encoding)

    def prompt_tokens(self, body: Mapping[str, Any], endpoint: Endpoint) -> int:
        parts, direct = self.walk(body)
        counted = len(self.encoding.encode_ordinary("\n".join(parts))) + len(parts)
        margin = self.anthropic_margin if endpoint.family == "anthropic" else self.margin
        return direct + math.ceil(counted * margin)


def _tiktoken_encoding(name: str, allow_download: bool) -> Any:
    """tiktoken's encoding ``name``; None when unavailable. Unless ``allow_download``, the
    loader's network fetch is replaced by an error for the duration of the call, so only an
    encoding already in tiktoken's cache (or a local file) loads."""
    try:  # imported by name: tiktoken is optional and has no type information
        tiktoken: Any = importlib.import_module("tiktoken")
        tiktoken_load: Any = importlib.import_module("tiktoken.load")
    except Exception:
        return None
    real: Any = getattr(tiktoken_load, "read_file", None)
    if not allow_download and real is None:
        return None  # an unknown tiktoken layout: do not risk a download

    def offline(blobpath: str) -> Any:
        if "://" in blobpath:
            raise OSError(f"relaymw does not download {blobpath}")
        return real(blobpath)

    try:
        if not allow_download:
            tiktoken_load.read_file = offline
        try:
            return tiktoken.get_encoding(name)
        finally:
            if not allow_download:
                tiktoken_load.read_file = real
    except Exception as exc:
        log.debug("relaymw: tiktoken encoding %s unavailable: %s", name, exc)
        return None


@functools.cache
def default_estimator() -> TokenEstimator:
    """A :class:`TiktokenEstimator` when tiktoken's ``o200k_base`` loads offline, else a
    :class:`CharEstimator`. Decided once per process."""
    estimator: TokenEstimator | None = TiktokenEstimator.load()
    return estimator if estimator is not None else CharEstimator()


def estimate_completion_tokens(output: str | bytes | int) -> int:
    """Output tokens of a reply whose upstream reported no usage, from its generated text (or
    its UTF-8 size in bytes): ``ceil(bytes / BYTES_PER_TOKEN)``, conservative like the prompt
    estimate. A whole JSON response body may be passed too: it over-counts by its framing."""
    if isinstance(output, str):
        size = _utf8_len(output)
    elif isinstance(output, (bytes, bytearray)):
        size = len(output)
    else:
        size = max(int(output), 0)
    return -(-size // BYTES_PER_TOKEN)
