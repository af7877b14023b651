"""FakeLLM: a real local LLM server for tests, demos and benchmarks.

FakeLLM speaks the OpenAI and Anthropic wire formats closely enough that the official
``openai`` and ``anthropic`` SDKs parse its answers, streamed or not. It runs an
``aiohttp`` server on its own event loop in a daemon thread, so synchronous and
asynchronous tests can use it alike::

    from relaymw.testing import FakeLLM

    with FakeLLM() as fake:                       # a free port on 127.0.0.1
        client = openai.OpenAI(base_url=fake.base_url + "/v1", api_key="x")
        anthropic_client = anthropic.Anthropic(base_url=fake.base_url, api_key="x")
        fake.set("*", latency_ms=5)               # the default for every model
        fake.set("claude-sonnet-4-20250514", error_rate=0.2, status=503)
        ...
        fake.requests                             # what it received, for assertions

Endpoints: ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` and
``/v1/responses`` (OpenAI) and ``POST /v1/messages`` (Anthropic). Every answer echoes the
request's ``model``.

Deterministic content and accounting, so that tests can predict every number:

* The reply is ``chunks`` words, ``"[<model>] word0 word1 ... word<chunks-1>"``; a stream
  sends one content delta per word (see :meth:`FakeLLM.reply_chunks`).
* ``completion_tokens`` (``output_tokens``) is ``chunks``.
* ``prompt_tokens`` (``input_tokens``) follows :meth:`FakeLLM.count_prompt_tokens`.
* ``cached_tokens`` is part of the prompt (capped at it): OpenAI reports it inside
  ``prompt_tokens``; Anthropic reports ``input_tokens = prompt - cached`` and
  ``cache_read_input_tokens = cached``, as the real APIs do.
* Embeddings come from :meth:`FakeLLM.embedding_vector`.

Behaviour per model (:class:`Behaviour`, changed at run time with :meth:`FakeLLM.set`) adds
latency, stream pacing, random or constant errors, and transport faults. Streams are
tracked (:class:`RecordedStream`) so relay tests can check pacing and prompt detection of
a client that goes away.

For benchmarks it also runs as a process::

    python -m relaymw.testing --port 8089 [--host 127.0.0.1]

which prints ``FakeLLM listening on http://HOST:PORT`` once ready and serves until SIGINT
or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import itertools
import random
import signal
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import FrameType, TracebackType
from typing import Any, Literal

import attrs
import orjson
from aiohttp import web

__all__ = [
    "Behaviour",
    "FakeLLM",
    "Fault",
    "RecordedRequest",
    "RecordedStream",
    "main",
    "serve_asgi",
]

Fault = Literal["reset", "stall", "malformed", "truncate"]
_FAULTS: frozenset[str] = frozenset(("reset", "stall", "malformed", "truncate"))

_Protocol = Literal["openai", "anthropic"]
_Endpoint = Literal["chat", "completions", "embeddings", "responses", "messages"]

_ROUTES: dict[str, tuple[_Protocol, _Endpoint]] = {
    "/v1/chat/completions": ("openai", "chat"),
    "/v1/completions": ("openai", "completions"),
    "/v1/embeddings": ("openai", "embeddings"),
    "/v1/responses": ("openai", "responses"),
    "/v1/messages": ("anthropic", "messages"),
}

_JSON = "application/json"
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_DEFAULT_EMBEDDING_DIMENSIONS = 8
_MAX_EMBEDDING_DIMENSIONS = 4096  # a bound on the vector a request makes FakeLLM build
# How long stop() lets in-flight requests finish before cancelling them: a test server
# has nothing worth waiting for, but a few ms lets a just-finished write reach the client.
_SHUTDOWN_GRACE_S = 0.05


def _check_non_negative(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def _check_chunks(_inst: object, _attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 1:
        raise ValueError(f"chunks must be >= 1, got {value!r}")


def _check_error_rate(_inst: object, _attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"error_rate must be within 0..1, got {value!r}")


def _check_status(_inst: object, _attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and not 400 <= value <= 599:
        raise ValueError(f"status must be an HTTP error status (400..599) or None, got {value!r}")


def _check_fault(_inst: object, _attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and value not in _FAULTS:
        raise ValueError(f"fault must be one of {sorted(_FAULTS)} or None, got {value!r}")


@attrs.frozen
class Behaviour:
    """How FakeLLM answers for one model; every field is optional.

    ``latency_ms`` delays the response (a stream's headers and first chunk);
    ``chunk_delay_ms`` paces a stream's content chunks, of which there are ``chunks`` (also
    the completion token count). ``usage=False`` leaves usage out everywhere, streams
    included. ``cached_tokens`` is reported as the prompt's cached part.

    ``status`` is the status of injected errors (500 when unset). With ``error_rate`` 0 a
    set ``status`` makes *every* request fail with it; with ``error_rate`` > 0 requests fail
    with that probability. ``fault`` breaks the transport instead: ``"reset"`` drops the
    connection with no response, ``"stall"`` never answers (until the client leaves or the
    server stops), ``"malformed"`` answers 200 with a body that is not JSON, ``"truncate"``
    sends half the chunks of a stream (half the body otherwise) and closes the connection.
    """

    latency_ms: float = attrs.field(default=0.0, validator=_check_non_negative)
    chunk_delay_ms: float = attrs.field(default=0.0, validator=_check_non_negative)
    chunks: int = attrs.field(default=8, validator=_check_chunks)
    error_rate: float = attrs.field(default=0.0, validator=_check_error_rate)
    status: int | None = attrs.field(default=None, validator=_check_status)
    usage: bool = True
    cached_tokens: int = attrs.field(default=0, validator=_check_non_negative)
    fault: Fault | None = attrs.field(default=None, validator=_check_fault)


_BEHAVIOUR_FIELDS: frozenset[str] = frozenset(attrs.fields_dict(Behaviour))


@attrs.frozen
class RecordedRequest:
    """One request FakeLLM received. ``received_at`` is ``time.monotonic()``."""

    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: dict[str, Any] | None  # None when the body was not a JSON object
    received_at: float


@attrs.define(eq=False)
class RecordedStream:
    """One streamed answer, updated live by the server thread.

    Times are ``time.monotonic()``. ``first_chunk_at`` / ``last_chunk_at`` are when the first
    and the last content chunk were written; ``disconnected`` means the client went away
    before the end; ``truncated`` means the ``"truncate"`` fault cut it on purpose. ``body``
    is the request's JSON body, so that a test can tell its streams apart by their prompts.
    """

    path: str
    model: str
    started_at: float
    chunks_total: int
    body: dict[str, Any] | None = attrs.field(default=None, repr=False)
    chunks_sent: int = 0
    first_chunk_at: float | None = None
    last_chunk_at: float | None = None
    completed: bool = False
    disconnected: bool = False
    disconnected_at: float | None = None
    truncated: bool = False


# --------------------------------------------------------------------------- content


@functools.lru_cache(maxsize=1024)
def _reply_chunks(model: str, chunks: int) -> tuple[str, ...]:
    last = chunks - 1
    return tuple(
        ("[" + model + "] " if i == 0 else "") + f"word{i}" + ("" if i == last else " ")
        for i in range(chunks)
    )


@functools.lru_cache(maxsize=1024)
def _reply_text(model: str, chunks: int) -> str:
    return "".join(_reply_chunks(model, chunks))


def _content_chars(item: Mapping[str, Any]) -> int:
    text = item.get("text")
    if isinstance(text, str):
        return len(text)
    content = item.get("content")
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, str):
                total += len(part)
            elif isinstance(part, dict):
                total += _content_chars(part)
        return total
    return 0


def _count_field(value: Any) -> tuple[int, int]:
    """(characters of text, tokens counted directly) for one prompt-bearing field."""
    if isinstance(value, str):
        return len(value), 1
    if not isinstance(value, list):
        return 0, 0
    if value and all(isinstance(v, int) for v in value):
        return 0, len(value) + 1  # a single token-id array
    chars = tokens = 0
    for item in value:
        if isinstance(item, str):
            chars += len(item)
            tokens += 1
        elif isinstance(item, list):
            tokens += len(item) + 1
        elif isinstance(item, dict):
            chars += _content_chars(item)
            tokens += 1
    return chars, tokens


_PROMPT_FIELDS = ("system", "instructions", "messages", "prompt", "input")


def _embedding_inputs(value: Any) -> list[str]:
    """The texts to embed: a string, or each item of a list (a token-id array keyed by its
    comma-joined ids). A fake embeds whatever it is sent, so any other item is keyed by its
    ``str()``; an ``input`` that is neither gives no embeddings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return [",".join(map(str, value))]
        return [
            v if isinstance(v, str) else ",".join(map(str, v)) if isinstance(v, list) else str(v)
            for v in value
        ]
    return []


def _embeddings_problem(body: Mapping[str, Any]) -> str | None:
    """Why OpenAI would answer 400 to this embeddings request, as far as FakeLLM checks."""
    dimensions = body.get("dimensions")
    if isinstance(dimensions, int) and dimensions > _MAX_EMBEDDING_DIMENSIONS:
        return (
            f"Invalid value for 'dimensions' = {dimensions}. Must be less than or equal to"
            f" {_MAX_EMBEDDING_DIMENSIONS}."
        )
    return None


def _embedding_vector(text: str, dimensions: int) -> list[float]:
    seed = zlib.crc32(text.encode())
    # Multiples of 1/1024 in [-1, 1] survive the float32 round trip of base64 exactly.
    return [((((seed >> (j % 16)) + 97 * j) % 2049) - 1024) / 1024 for j in range(dimensions)]


# --------------------------------------------------------------------------- wire shapes


def _sse(data: Mapping[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _sse_event(event: str, data: Mapping[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


_SSE_DONE = b"data: [DONE]\n\n"

_OPENAI_ERRORS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    429: ("requests", "rate_limit_exceeded"),
}
_ANTHROPIC_ERRORS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def _error_response(protocol: _Protocol, status: int, message: str) -> web.Response:
    body: dict[str, Any]
    if protocol == "anthropic":
        kind = _ANTHROPIC_ERRORS.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        body = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        kind, code = _OPENAI_ERRORS.get(
            status, ("server_error" if status >= 500 else "invalid_request_error", None)
        )
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type=_JSON)


@attrs.define(eq=False)
class _Answer:
    """What one request is answered with: the parts a stream is written in, or a body."""

    body: bytes = b""
    preamble: bytes = b""
    chunks: list[bytes] = attrs.Factory(list)
    closing: bytes = b""


# --------------------------------------------------------------------------- server


class FakeLLM:
    """A real local LLM server (OpenAI and Anthropic protocols) in a background thread.

    Use it as a context manager or call :meth:`start` / :meth:`stop`. All public methods and
    properties are safe to call from any thread while the server runs.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        seed: int | None = None,
        *,
        record_requests: bool = True,
    ) -> None:
        """``record_requests=False`` keeps only counters, for long benchmark runs."""
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self.api_key = api_key
        self._seed = seed
        self._record = record_requests
        self._rng = random.Random(seed)
        self._ids = itertools.count(1)

        self._lock = threading.Lock()
        self._overrides: dict[str, dict[str, Any]] = {}
        # Swapped as one tuple so the server thread never sees a half-applied set().
        self._behaviours: tuple[dict[str, Behaviour], Behaviour] = ({}, Behaviour())
        self._requests: list[RecordedRequest] = []
        self._streams: list[RecordedStream] = []
        self._disconnect_times: list[float] = []
        # Plain counters too, so that they work when record_requests is off.
        self._request_count = 0
        self._streams_started = 0
        self._streams_completed = 0
        self._streams_disconnected = 0

        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.ServerRunner | None = None
        self._stop_event: asyncio.Event | None = None
        self._stopping = False

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> FakeLLM:
        """Start serving; returns self once the port is bound."""
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []
        self._stopping = False
        self._loop = loop
        self._thread = threading.Thread(
            target=self._run, args=(loop, ready, failure), name="FakeLLM", daemon=True
        )
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = self._loop = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close the server and every connection, and end its thread. Idempotent."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        self._stopping = True
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            self._thread = self._loop = None
            self._port = None

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(
        self, loop: asyncio.AbstractEventLoop, ready: threading.Event, failure: list[BaseException]
    ) -> None:
        asyncio.set_event_loop(loop)
        try:
            try:
                loop.run_until_complete(self._startup())
            except BaseException as exc:  # reported to start() in the caller's thread
                failure.append(exc)
                return
            finally:
                ready.set()
            loop.run_forever()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    async def _startup(self) -> None:
        self._stop_event = asyncio.Event()
        server = web.Server(self._handle, handler_cancellation=True, access_log=None)
        runner = web.ServerRunner(server, shutdown_timeout=_SHUTDOWN_GRACE_S)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self._requested_port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def _shutdown(self) -> None:
        if self._stop_event is not None:
            self._stop_event.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ----------------------------------------------------------------- public state

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeLLM is not running; call start() or use it as a context")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT``; OpenAI paths are under ``/v1/...``."""
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literal
        return f"http://{host}:{self.port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the requests received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        """Requests received, counted even when ``record_requests`` is off."""
        return self._request_count

    @property
    def streams(self) -> list[RecordedStream]:
        """A snapshot of the streamed answers begun so far (the objects keep updating)."""
        with self._lock:
            return list(self._streams)

    @property
    def streams_started(self) -> int:
        return self._streams_started

    @property
    def streams_completed(self) -> int:
        """Streams sent to the end, terminator included."""
        return self._streams_completed

    @property
    def streams_disconnected(self) -> int:
        """Streams whose client went away before the end."""
        return self._streams_disconnected

    @property
    def disconnect_times(self) -> list[float]:
        """``time.monotonic()`` of each client that went away before its answer ended."""
        with self._lock:
            return list(self._disconnect_times)

    def set(self, model: str, **behaviour: Any) -> Behaviour:
        """Change how ``model`` (``"*"``: every model) is answered; returns its behaviour.

        Fields accumulate across calls; a model's unset fields come from ``"*"``, then from
        :class:`Behaviour`'s defaults. Takes effect for the next request.
        """
        unknown = set(behaviour) - _BEHAVIOUR_FIELDS
        if unknown:
            raise TypeError(f"unknown behaviour field(s): {', '.join(sorted(unknown))}")
        with self._lock:
            overrides = {m: dict(o) for m, o in self._overrides.items()}
            overrides.setdefault(model, {}).update(behaviour)
            # Building every Behaviour first validates the change before any of it is kept.
            self._behaviours = self._resolve(overrides)
            self._overrides = overrides
        return self.behaviour(model)

    def behaviour(self, model: str) -> Behaviour:
        """The behaviour a request for ``model`` gets now."""
        table, default = self._behaviours
        return table.get(model, default)

    def reset(self) -> None:
        """Forget behaviours, recorded requests and streams; re-seed the random source."""
        with self._lock:
            self._overrides = {}
            self._behaviours = ({}, Behaviour())
            self._requests.clear()
            self._streams.clear()
            self._disconnect_times.clear()
            self._request_count = self._streams_started = 0
            self._streams_completed = self._streams_disconnected = 0
            self._rng = random.Random(self._seed)

    @staticmethod
    def _resolve(
        overrides: Mapping[str, Mapping[str, Any]],
    ) -> tuple[dict[str, Behaviour], Behaviour]:
        base = overrides.get("*", {})
        table = {m: Behaviour(**{**base, **o}) for m, o in overrides.items() if m != "*"}
        return table, Behaviour(**base)

    # ----------------------------------------------------------------- deterministic rules

    @staticmethod
    def count_prompt_tokens(body: Mapping[str, Any]) -> int:
        """The prompt token count FakeLLM reports for a request body.

        Rule: over the fields ``system``, ``instructions``, ``messages``, ``prompt`` and
        ``input``, add up the characters of all text (plain strings, a message's or item's
        ``content`` string, and the ``text`` of content parts/blocks) and take ``// 4``;
        then add 1 per item (each message, each prompt/input string or item, each system
        block, a string ``system`` or ``instructions``) and 1 per token id in token-array
        inputs. The result is at least 1.
        """
        chars = tokens = 0
        for name in _PROMPT_FIELDS:
            value = body.get(name)
            if value is not None:
                c, t = _count_field(value)
                chars += c
                tokens += t
        return max(1, chars // 4 + tokens)

    @staticmethod
    def reply_chunks(model: str, chunks: int = 8) -> tuple[str, ...]:
        """The content deltas of an answer: ``("[model] word0 ", "word1 ", ..., "wordN")``."""
        return _reply_chunks(model, chunks)

    @staticmethod
    def reply_text(model: str, chunks: int = 8) -> str:
        """The full answer text for ``model``: ``"[model] word0 word1 ... word<chunks-1>"``."""
        return _reply_text(model, chunks)

    @staticmethod
    def embedding_vector(text: str, dimensions: int = _DEFAULT_EMBEDDING_DIMENSIONS) -> list[float]:
        """The embedding of ``text`` (token arrays are keyed by their comma-joined ids)."""
        return _embedding_vector(text, dimensions)

    # ----------------------------------------------------------------- request handling

    def _note_disconnect(self, stream: RecordedStream | None) -> None:
        if self._stopping:
            return  # stop() cancelling handlers is not a client going away
        now = time.monotonic()
        with self._lock:
            self._disconnect_times.append(now)
            if stream is not None:
                self._streams_disconnected += 1
                stream.disconnected = True
                stream.disconnected_at = now
                if stream.completed:  # marked just before the write that failed
                    stream.completed = False
                    self._streams_completed -= 1

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self._note_disconnect(None)
            raise

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw = await request.content.read()
        try:
            parsed = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            parsed = None
        body: dict[str, Any] | None = parsed if isinstance(parsed, dict) else None
        path = request.path
        if self._record:
            recorded = RecordedRequest(
                method=request.method,
                path=path,
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
                received_at=time.monotonic(),
            )
            with self._lock:
                self._requests.append(recorded)
        self._request_count += 1

        route = _ROUTES.get(path)
        if route is None or request.method != "POST":
            return _error_response("openai", 404, f"Invalid URL ({request.method} {path})")
        protocol, endpoint = route
        if self.api_key is not None and not self._authorized(request, protocol):
            message = "invalid x-api-key" if protocol == "anthropic" else "Incorrect API key"
            return _error_response(protocol, 401, message)
        if body is None:
            return _error_response(protocol, 400, "The request body is not a valid JSON object.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return _error_response(protocol, 400, "model: a model name is required")
        if endpoint == "embeddings" and (problem := _embeddings_problem(body)) is not None:
            return _error_response(protocol, 400, problem)

        table, default = self._behaviours
        behaviour = table.get(model, default)
        if behaviour.latency_ms:
            await self._pause(behaviour.latency_ms / 1000)

        fault = behaviour.fault
        if fault == "reset":
            return self._reset(request)
        if fault == "stall":
            return await self._stall(request)
        if fault == "malformed":
            return web.Response(body=b'{"id": "malformed", "choices": [', content_type=_JSON)

        status = behaviour.status
        if behaviour.error_rate:
            if self._rng.random() < behaviour.error_rate:
                code = status or 500
                return _error_response(protocol, code, f"FakeLLM injected error ({code})")
        elif status is not None:
            return _error_response(protocol, status, f"FakeLLM injected error ({status})")

        answer = self._answer(endpoint, body, model, behaviour)
        if answer.chunks:
            return await self._stream(request, answer, model, behaviour, body)
        if fault == "truncate":
            return await self._truncate_body(request, answer.body)
        return web.Response(body=answer.body, content_type=_JSON)

    def _authorized(self, request: web.BaseRequest, protocol: _Protocol) -> bool:
        bearer = request.headers.get("Authorization") == f"Bearer {self.api_key}"
        if protocol == "anthropic":
            return bearer or request.headers.get("x-api-key") == self.api_key
        return bearer

    def _reset(self, request: web.BaseRequest) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # Linger 0 makes close() send RST, a real "connection reset by peer".
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        # Writing this to the aborted transport fails quietly inside aiohttp.
        return web.Response(status=204)

    async def _stall(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self._stop_event is not None
        try:
            await self._stop_event.wait()
        except asyncio.CancelledError:
            self._note_disconnect(None)
            raise
        return self._reset(request)

    async def _truncate_body(self, request: web.BaseRequest, body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": _JSON})
        response.content_length = len(body)
        try:
            await response.prepare(request)
            await response.write(body[: len(body) // 2])
        except ConnectionError:
            return response  # the client left first: nothing left to break
        if request.transport is not None:
            request.transport.close()  # close() still flushes what was written
        return response

    async def _stream(
        self,
        request: web.BaseRequest,
        answer: _Answer,
        model: str,
        behaviour: Behaviour,
        body: dict[str, Any],
    ) -> web.StreamResponse:
        chunks = answer.chunks
        truncate = behaviour.fault == "truncate"
        send = len(chunks) // 2 if truncate else len(chunks)
        record = RecordedStream(
            path=request.path,
            model=model,
            started_at=time.monotonic(),
            chunks_total=len(chunks),
            body=body if self._record else None,
        )
        self._streams_started += 1
        if self._record:
            with self._lock:
                self._streams.append(record)
        response = web.StreamResponse(headers=_SSE_HEADERS)
        delay = behaviour.chunk_delay_ms / 1000
        # Progress is recorded *before* each write: once bytes are written the client
        # (in another thread) may act on them, and must find the record already updated.
        try:
            await response.prepare(request)
            if not delay:
                # Nothing to pace: one write is much cheaper than one per event.
                data = answer.preamble + b"".join(chunks[:send])
                self._progress(record, send)
                if not truncate:
                    data += answer.closing
                    self._finish(record)
                await response.write(data)
            else:
                for i in range(send):
                    if i:
                        await asyncio.sleep(delay)
                    self._progress(record, i + 1)
                    await response.write(answer.preamble + chunks[i] if i == 0 else chunks[i])
                if not send:
                    await response.write(answer.preamble)
                if not truncate:
                    self._finish(record)
                    await response.write(answer.closing)
        except ConnectionError:
            # The client left between two writes; aiohttp ignores the unsent rest.
            self._note_disconnect(record)
            return response
        except asyncio.CancelledError:
            self._note_disconnect(record)
            raise
        if truncate:
            record.truncated = True
            if request.transport is not None:
                request.transport.close()  # close() still flushes what was written
        return response

    @staticmethod
    def _progress(record: RecordedStream, sent: int) -> None:
        if sent:
            now = time.monotonic()
            if record.first_chunk_at is None:
                record.first_chunk_at = now
            record.last_chunk_at = now
        record.chunks_sent = sent

    def _finish(self, record: RecordedStream) -> None:
        record.completed = True
        self._streams_completed += 1

    # ----------------------------------------------------------------- answers

    def _answer(
        self, endpoint: _Endpoint, body: dict[str, Any], model: str, behaviour: Behaviour
    ) -> _Answer:
        prompt = self.count_prompt_tokens(body)
        if endpoint == "embeddings":
            return _embeddings(body, model, prompt if behaviour.usage else None)
        reply = _Reply(
            body=body,
            model=model,
            stream=body.get("stream") is True,
            usage=behaviour.usage,
            parts=_reply_chunks(model, behaviour.chunks),
            n=next(self._ids),
            created=int(time.time()),
            prompt=prompt,
            cached=min(behaviour.cached_tokens, prompt),
        )
        return _BUILDERS[endpoint](reply)


# --------------------------------------------------------------------------- answers


@attrs.frozen
class _Reply:
    """Everything an answer builder needs about one request."""

    body: dict[str, Any]
    model: str
    stream: bool
    usage: bool
    parts: tuple[str, ...]
    n: int  # makes ids unique
    created: int
    prompt: int
    cached: int


def _embeddings(body: dict[str, Any], model: str, prompt: int | None) -> _Answer:
    dimensions = body.get("dimensions")
    if not isinstance(dimensions, int) or dimensions < 1:
        dimensions = _DEFAULT_EMBEDDING_DIMENSIONS
    as_base64 = body.get("encoding_format") == "base64"
    data: list[dict[str, Any]] = []
    for index, text in enumerate(_embedding_inputs(body.get("input"))):
        vector = _embedding_vector(text, dimensions)
        embedding: Any = (
            base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            if as_base64
            else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    result: dict[str, Any] = {"object": "list", "data": data, "model": model}
    if prompt is not None:
        result["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
    return _Answer(body=orjson.dumps(result))


def _openai_usage(r: _Reply) -> dict[str, Any]:
    return {
        "prompt_tokens": r.prompt,
        "completion_tokens": len(r.parts),
        "total_tokens": r.prompt + len(r.parts),
        "prompt_tokens_details": {"cached_tokens": r.cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _openai_stream(
    r: _Reply, envelope: dict[str, Any], first: dict[str, Any] | None, key: str
) -> _Answer:
    """Shared by chat and legacy completions: ``key`` is the choice field carrying text."""
    include_usage = _include_usage(r.body)
    if include_usage:
        envelope = {**envelope, "usage": None}  # as the real API sends on all but the last

    def chunk(value: Any, finish: str | None) -> bytes:
        choice = {"index": 0, key: value, "logprobs": None, "finish_reason": finish}
        return _sse({**envelope, "choices": [choice]})

    wrap = (lambda p: {"content": p}) if key == "delta" else (lambda p: p)
    closing = chunk({} if key == "delta" else "", "stop")
    if include_usage and r.usage:
        closing += _sse({**envelope, "choices": [], "usage": _openai_usage(r)})
    return _Answer(
        preamble=chunk(first, None) if first is not None else b"",
        chunks=[chunk(wrap(p), None) for p in r.parts],
        closing=closing + _SSE_DONE,
    )


def _chat(r: _Reply) -> _Answer:
    envelope: dict[str, Any] = {
        "id": f"chatcmpl-fake{r.n}",
        "object": "chat.completion.chunk" if r.stream else "chat.completion",
        "created": r.created,
        "model": r.model,
        "system_fingerprint": None,
    }
    if r.stream:
        first = {"role": "assistant", "content": "", "refusal": None}
        return _openai_stream(r, envelope, first, "delta")
    message = {"role": "assistant", "content": "".join(r.parts), "refusal": None}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    result = {**envelope, "choices": [choice]}
    if r.usage:
        result["usage"] = _openai_usage(r)
    return _Answer(body=orjson.dumps(result))


def _completions(r: _Reply) -> _Answer:
    envelope: dict[str, Any] = {
        "id": f"cmpl-fake{r.n}",
        "object": "text_completion",
        "created": r.created,
        "model": r.model,
        "system_fingerprint": None,
    }
    if r.stream:
        return _openai_stream(r, envelope, None, "text")
    choice = {"index": 0, "text": "".join(r.parts), "logprobs": None, "finish_reason": "stop"}
    result = {**envelope, "choices": [choice]}
    if r.usage:
        result["usage"] = _openai_usage(r)
    return _Answer(body=orjson.dumps(result))


def _responses(r: _Reply) -> _Answer:
    item_id = f"msg_fake{r.n}"
    text = "".join(r.parts)
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item: dict[str, Any] = {
        "id": item_id,
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [part],
    }

    def response(final: bool) -> dict[str, Any]:
        result: dict[str, Any] = {
            "id": f"resp_fake{r.n}",
            "object": "response",
            "created_at": r.created,
            "status": "completed" if final else "in_progress",
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "max_output_tokens": None,
            "model": r.model,
            "output": [item] if final else [],
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": True,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "metadata": {},
        }
        if final and r.usage:
            result["usage"] = {
                "input_tokens": r.prompt,
                "input_tokens_details": {"cached_tokens": r.cached},
                "output_tokens": len(r.parts),
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": r.prompt + len(r.parts),
            }
        return result

    if not r.stream:
        return _Answer(body=orjson.dumps(response(final=True)))

    seq = itertools.count()
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}

    def event(kind: str, **fields: Any) -> bytes:
        return _sse_event(kind, {"type": kind, "sequence_number": next(seq), **fields})

    started = {**item, "status": "in_progress", "content": []}
    preamble = (
        event("response.created", response=response(final=False))
        + event("response.in_progress", response=response(final=False))
        + event("response.output_item.added", output_index=0, item=started)
        + event("response.content_part.added", **where, part={**part, "text": ""})
    )
    chunks = [event("response.output_text.delta", **where, delta=p, logprobs=[]) for p in r.parts]
    closing = (
        event("response.output_text.done", **where, text=text, logprobs=[])
        + event("response.content_part.done", **where, part=part)
        + event("response.output_item.done", output_index=0, item=item)
        + event("response.completed", response=response(final=True))
    )
    return _Answer(preamble=preamble, chunks=chunks, closing=closing)


def _anthropic_usage(r: _Reply, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": r.prompt - r.cached,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": r.cached,
    }


def _messages(r: _Reply) -> _Answer:
    message: dict[str, Any] = {
        "id": f"msg_fake{r.n}",
        "type": "message",
        "role": "assistant",
        "model": r.model,
        "content": [{"type": "text", "text": "".join(r.parts)}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
    }
    if not r.stream:
        if r.usage:
            message["usage"] = _anthropic_usage(r, len(r.parts))
        return _Answer(body=orjson.dumps(message))

    start = {**message, "content": [], "stop_reason": None}
    stop: dict[str, Any] = {"stop_reason": "end_turn", "stop_sequence": None}
    delta: dict[str, Any] = {"type": "message_delta", "delta": stop}
    if r.usage:
        # The real API reports output_tokens 1 up front and the cumulative total last.
        start["usage"] = _anthropic_usage(r, 1)
        delta["usage"] = {"output_tokens": len(r.parts)}
    block = {"type": "text", "text": ""}
    preamble = (
        _sse_event("message_start", {"type": "message_start", "message": start})
        + _sse_event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": block},
        )
        + _sse_event("ping", {"type": "ping"})
    )
    chunks = [
        _sse_event(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}},
        )
        for p in r.parts
    ]
    closing = (
        _sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
        + _sse_event("message_delta", delta)
        + _sse_event("message_stop", {"type": "message_stop"})
    )
    return _Answer(preamble=preamble, chunks=chunks, closing=closing)


_BUILDERS: dict[str, Callable[[_Reply], _Answer]] = {
    "chat": _chat,
    "completions": _completions,
    "responses": _responses,
    "messages": _messages,
}


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """Serve FakeLLM until SIGINT or SIGTERM (``python -m relaymw.testing``)."""
    parser = argparse.ArgumentParser(
        prog="python -m relaymw.testing", description="Run FakeLLM, a local fake LLM API server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089, help="0 picks a free port")
    parser.add_argument("--api-key", default=None, help="require this key")
    parser.add_argument("--seed", type=int, default=None, help="seed for error_rate")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    parser.add_argument("--chunks", type=int, default=8)
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous: dict[int, Any] = {
        sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    # Nobody can read recorded requests from outside the process: don't grow memory.
    fake = FakeLLM(args.host, args.port, args.api_key, args.seed, record_requests=False)
    try:
        fake.set(
            "*", latency_ms=args.latency_ms, chunk_delay_ms=args.chunk_delay_ms, chunks=args.chunks
        )
        with fake:
            print(f"FakeLLM listening on {fake.base_url}", flush=True)
            stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


@contextlib.contextmanager
def serve_asgi(app: Any, host: str = "127.0.0.1", **config: Any) -> Iterator[str]:
    """Run an ASGI app under uvicorn in a background thread; yields its base URL.

    The socket is bound before uvicorn starts, so the port is known and never raced for.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config.setdefault("log_level", "warning")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            sock.close()
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
