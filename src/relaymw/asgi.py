"""``RelayMiddleware``: the pure-ASGI adapter (never ``BaseHTTPMiddleware``: it buffers
streams and breaks contextvars).

Requests that are not LLM-bound cost a dict lookup and go straight to the app, body unread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from relaymw import protocols
from relaymw.context import _current, _current_request
from relaymw.engine import (
    PAGE_ERRORS,
    Exchange,
    Relay,
    invalid_body,
    is_event_stream,
    too_large,
    upstream_rejection,
    usage_of_body,
)
from relaymw.errors import RequestRejected, UpstreamConnectionError, UpstreamError
from relaymw.protocols import BYTES_PER_TOKEN, Endpoint, StreamObserver, Usage
from relaymw.snapshot import CompiledRoute, RawHeaders, RequestView, Snapshot
from relaymw.stores import Store
from relaymw.tokens import estimate_completion_tokens
from relaymw.upstream import AsyncUpstreamResponse

__all__ = ["RelayMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_JSON = (b"content-type", b"application/json")
_perf = time.perf_counter


class ClientDisconnected(Exception):
    """The client went away before relaymw finished reading or answering."""


class RelayMiddleware:
    """Wrap an ASGI app: ``app.add_middleware(RelayMiddleware, relay=relay)``, or
    ``RelayMiddleware(app, config="relay.toml")`` for the one-line form."""

    def __init__(
        self,
        app: ASGIApp,
        relay: Relay | None = None,
        config: str | os.PathLike[str] | Store | None = None,
    ) -> None:
        self.app = app
        self.relay = Relay.given(relay, config)
        self._paths = self.relay.claimed_paths  # the relay keeps it current

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope["path"] in self._paths:  # one lookup for every request not for us
                snapshot = self.relay.snapshot
                path = scope["path"]
                endpoint = snapshot.gateway.get(path)
                if endpoint is not None and scope["method"] == "POST":
                    await self._gateway(scope, receive, send, snapshot, endpoint)
                    return
                route = snapshot.in_app_paths.get(path)
                if route is not None:
                    await self._in_app(scope, receive, send, snapshot, route)
                    return
        elif scope["type"] == "lifespan":
            await self.app(scope, self._lifespan_receive(receive), send)
            return
        await self.app(scope, receive, send)

    def _lifespan_receive(self, receive: Receive) -> Receive:
        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.relay.aclose()
            return message

        return wrapped

    # --- in-app mode ------------------------------------------------------------------------

    async def _in_app(
        self, scope: Scope, receive: Receive, send: Send, snapshot: Snapshot, route: CompiledRoute
    ) -> None:
        request = _request_view(scope, snapshot)
        choice, cookie = self.relay.choose_in_app(snapshot, route, request)
        try:
            limits = await self.relay.guard.acheck_page(route.route, choice.version, request)
        except RequestRejected as exc:
            await _send_rejection(send, PAGE_ERRORS, exc, cookie)
            return
        scope.setdefault("state", {})["relay"] = choice
        extra = [(b"x-relaymw-version", choice.version_tag.encode())]
        extra += [(k.lower().encode(), v.encode()) for k, v in limits]
        if cookie:
            extra.append((b"set-cookie", cookie.encode("latin-1")))

        async def send_with_version(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        token, request_token = _current.set(choice), _current_request.set(request)
        try:
            await self.app(scope, receive, send_with_version)
        finally:
            _current.reset(token)
            _current_request.reset(request_token)

    # --- gateway mode -----------------------------------------------------------------------

    async def _gateway(
        self, scope: Scope, receive: Receive, send: Send, snapshot: Snapshot, endpoint: Endpoint
    ) -> None:
        relay = self.relay
        exchange = Exchange(relay, "gateway", endpoint)
        try:
            limit = snapshot.config.gateway.max_body_bytes
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body = message.get("body", b"")  # the usual case: the whole body at once
                if len(body) > limit:
                    raise too_large(limit)
            else:
                body = await _read_body(scope, receive, message, limit)
            request = _request_view(scope, snapshot)
            call = relay.prepare_gateway(snapshot, endpoint, body, request, exchange)
            if call is not None and exchange.admission is not None:
                await relay.guard.aadmit(exchange.admission, request)
        except RequestRejected as exc:
            await _send_rejection(send, endpoint, exc)
            exchange.finish(exc.status, error=exc.code)
            await relay.asettle(exchange)
            return
        except ClientDisconnected:
            exchange.finish(499, error="client_disconnected")
            return
        if call is None:  # a model we don't route: the app may serve this path itself
            exchange.done = True
            await self.app(scope, _replay(body, receive), send)
            return
        # The call upstream, here rather than in a method of its own: every suspension of the
        # request passes through each coroutine frame, and this one is there anyway.
        choice = call.choice
        client = relay.pool.get_async(choice.upstream_name, choice.upstream)
        exchange.sent_at = _perf()
        try:
            response = await client.send("POST", exchange.url, exchange.headers, exchange.body)
        except UpstreamError as exc:
            rejected = upstream_rejection(exc)
            relay.upstream_failed(choice, None, rejected.code)
            await _send_rejection(send, endpoint, rejected, exchange.set_cookie)
            exchange.finish(rejected.status, error=rejected.code)
            await relay.asettle(exchange)
            return
        exchange.headers_at = _perf()
        status = response.status
        usage: Usage | None = None
        error: str | None = None
        output = 0
        # The cleanup below is no `finally`: compiled with mypyc, a `finally` that awaits
        # re-raises whatever sys.exc_info() holds as it ends, and a compiled caller's `await`
        # holds there each exception thrown into this coroutine, even one handled here.
        failed: BaseException | None = None
        try:
            headers = exchange.response_headers(response.raw_headers)
            if exchange.stream and status == 200 and is_event_stream(headers):
                adm = exchange.admission
                # whole_events=False, bytes_per_token, output_limit, defer_count=True (by
                # position: keywords would cost a dict per stream).
                observer = StreamObserver(
                    endpoint,
                    exchange.drop_usage_chunk,
                    False,
                    BYTES_PER_TOKEN,
                    adm.output_token_limit if adm is not None else None,
                    True,
                )
                error = await _stream(exchange, observer, response, headers, receive, send)
                usage = observer.usage
                # Output tokens seen only when the upstream reported no usage: counting them
                # costs, and the record needs them only to estimate it.
                if usage is None:
                    output = observer.output_tokens
                if error == "upstream_truncated":
                    relay.upstream_failed(choice, status, error)
            else:
                # No `return` once answered: the cleanup below has to run.
                rejection: RequestRejected | None = None
                try:
                    data = await response.read()
                except UpstreamError as exc:  # nothing sent yet: answer as for a failed call
                    rejection = upstream_rejection(exc)
                    status, error = rejection.status, rejection.code
                    relay.upstream_failed(choice, None, error)
                else:
                    if 200 <= status < 300:
                        usage = usage_of_body(endpoint, data)
                        if usage is None and (rejection := invalid_body(data)) is not None:
                            relay.upstream_failed(choice, status, rejection.code)
                            status, error = rejection.status, rejection.code
                        else:
                            output = estimate_completion_tokens(data) if usage is None else 0
                    else:
                        relay.upstream_failed(choice, status, "upstream_error")
                if rejection is not None:
                    await _send_rejection(send, endpoint, rejection, exchange.set_cookie)
                else:
                    headers.append((b"content-length", str(len(data)).encode()))
                    await send(
                        {"type": "http.response.start", "status": status, "headers": headers}
                    )
                    await send({"type": "http.response.body", "body": data})
        except UpstreamError as exc:  # a stream broke after it started
            error = upstream_rejection(exc).code
            status = 502 if isinstance(exc, UpstreamConnectionError) else 504
            relay.upstream_failed(choice, None, error)
        except OSError:  # uvicorn raises ClientDisconnected (an OSError) on send
            error = "client_disconnected"
        except BaseException as exc:  # re-raised after the cleanup
            failed = exc
        if not response.closed:  # read to the end, it is: no coroutine to close it
            await response.aclose()
        exchange.finish(status, usage, error, output)
        if exchange.admission is not None:  # nothing to settle otherwise
            await relay.asettle(exchange)
        if failed is not None:
            raise failed


async def _stream(
    exchange: Exchange,
    observer: StreamObserver,
    response: AsyncUpstreamResponse,
    headers: list[tuple[bytes, bytes]],
    receive: Receive,
    send: Send,
) -> str | None:
    """Pump SSE chunk by chunk through ``observer``; once the pump has to wait for the
    upstream, a watcher closes the upstream stream as soon as the client disconnects.

    Returns the error: None for a whole stream (or one cut at the cost cap)."""
    # Started only once the pump has to wait: a stream that has arrived whole (the usual
    # short answer) is forwarded before a watcher could even run.
    watch: _DisconnectWatch | None = None
    ready, read = response.read_ready, response.read_chunk
    try:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        # A broken upstream is re-raised after the last await, out of the handler: compiled
        # with mypyc, a bare `raise` after an await in a handler can raise another task's error.
        failed: UpstreamError | None = None
        try:
            while True:
                chunk = ready()  # no coroutine for what has already arrived
                if chunk is None:
                    if watch is None:
                        watch = _DisconnectWatch(receive, response)
                    chunk = await read(watch.start)
                if not chunk:
                    break
                if exchange.first_chunk_at is None:
                    exchange.first_chunk_at = _perf()
                out = observer.feed(chunk)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                if observer.limit_reached:
                    # The cap paid for this much output: end the stream cleanly here.
                    choice = exchange.choice
                    assert choice is not None
                    tail = observer.cut(choice.version.upstream_model(choice.upstream))
                    await send({"type": "http.response.body", "body": tail})
                    exchange.relay.stream_cut(choice, exchange)
                    return None
        except UpstreamError as exc:
            failed = exc
        if watch is not None and watch.disconnected:
            return "client_disconnected"
        await send({"type": "http.response.body", "body": observer.finish()})
        if failed is not None:
            raise failed
        return None if observer.done else "upstream_truncated"
    finally:
        if watch is not None:
            watch.stop()


class _DisconnectWatch:
    """Closes the upstream response as soon as the client disconnects (uvicorn drops the
    sends after a disconnect, so the pump itself would never notice)."""

    __slots__ = ("_receive", "_response", "_task", "disconnected")

    def __init__(self, receive: Receive, response: AsyncUpstreamResponse) -> None:
        self._receive = receive
        self._response = response
        self._task: asyncio.Task[None] | None = None
        self.disconnected = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        try:
            while (await self._receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a server whose channel broke: the pump's sends will tell
            return
        self.disconnected = True
        await self._response.aclose()  # ends the pump's read

    def stop(self) -> None:
        # Not awaited: a cancelled watcher has nothing left to do, and waiting for it to
        # unwind would cost the request another trip through the event loop.
        # Dropping the reference too: the cancelled task keeps its CancelledError, whose
        # traceback holds _watch's frame and so this watcher; a watcher still holding the task
        # would make a reference cycle, left for the garbage collector on every such stream.
        task, self._task = self._task, None
        if task is not None:
            task.cancel()


def _request_view(scope: Scope, snapshot: Snapshot) -> RequestView:
    client = scope.get("client")
    peer = client[0] if client else None
    trusted = snapshot.config.rate_limiting.trusted_proxy_count
    headers = RawHeaders(scope["headers"])
    if trusted:  # X-Forwarded-For is read only then: the usual request skips build()
        return RequestView.build(headers, peer, scope.get("scheme", "http"), trusted)
    return RequestView(headers, peer, scope.get("scheme", "http"))


async def _read_body(scope: Scope, receive: Receive, message: Message, limit: int) -> bytes:
    """The body from its first ``message`` on, when more is to come: a declared length over
    the limit is refused before reading any further."""
    for name, value in scope["headers"]:
        # More digits than any body could have: int() would refuse past 4300 of them.
        if (
            name == b"content-length"
            and value.isdigit()
            and (len(value.lstrip(b"0")) > 15 or int(value) > limit)
        ):
            raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
        message = await receive()


def _replay(body: bytes, receive: Receive) -> Receive:
    """Give the inner app the body we already read, then the real channel (for disconnects)."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _send_rejection(
    send: Send, endpoint: Endpoint, exc: RequestRejected, set_cookie: str | None = None
) -> None:
    body = protocols.rejection_body(endpoint.family, exc)
    headers = [_JSON, (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode("latin-1")) for k, v in exc.headers]
    if set_cookie:
        headers.append((b"set-cookie", set_cookie.encode("latin-1")))
    with contextlib.suppress(OSError):
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
