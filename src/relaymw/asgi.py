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
    GatewayCall,
    Relay,
    is_event_stream,
    too_large,
    upstream_rejection,
    usage_of_body,
)
from relaymw.errors import RequestRejected, UpstreamConnectionError, UpstreamError
from relaymw.protocols import Endpoint, StreamObserver, Usage
from relaymw.snapshot import CompiledRoute, RawHeaders, RequestView, Snapshot
from relaymw.stores import Store
from relaymw.tokens import estimate_completion_tokens

__all__ = ["RelayMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_JSON = (b"content-type", b"application/json")


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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
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
            body = await _read_body(scope, receive, snapshot.config.gateway.max_body_bytes)
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
        await self._relay(call, receive, send)

    async def _relay(self, call: GatewayCall, receive: Receive, send: Send) -> None:
        exchange = call.exchange
        client = self.relay.pool.get_async(call.choice.upstream_name, call.choice.upstream)
        exchange.sent_at = time.perf_counter()
        try:
            response = await client.send("POST", call.url, call.headers, call.body)
        except UpstreamError as exc:
            rejected = upstream_rejection(exc)
            self.relay.upstream_failed(call.choice, None, rejected.code)
            await _send_rejection(send, call.endpoint, rejected, call.set_cookie)
            exchange.finish(rejected.status, error=rejected.code)
            await self.relay.asettle(exchange)
            return
        exchange.headers_at = time.perf_counter()
        status = response.status
        usage: Usage | None = None
        error: str | None = None
        output = 0
        try:
            headers = call.response_headers(response.headers)
            if call.stream and status == 200 and is_event_stream(response.headers):
                usage, error, output = await self._stream(call, response, headers, receive, send)
            else:
                data = await response.read()
                if 200 <= status < 300:
                    usage = usage_of_body(call.endpoint, data)
                    output = estimate_completion_tokens(data) if usage is None else 0
                else:
                    self.relay.upstream_failed(call.choice, status, "upstream_error")
                headers.append((b"content-length", str(len(data)).encode()))
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": data})
        except UpstreamError as exc:
            error = upstream_rejection(exc).code
            status = 502 if isinstance(exc, UpstreamConnectionError) else 504
        except OSError:  # uvicorn raises ClientDisconnected (an OSError) on send
            error = "client_disconnected"
        finally:
            await response.aclose()
            exchange.finish(status, usage, error, output)
            await self.relay.asettle(exchange)

    async def _stream(
        self,
        call: GatewayCall,
        response: Any,
        headers: list[tuple[bytes, bytes]],
        receive: Receive,
        send: Send,
    ) -> tuple[Usage | None, str | None, int]:
        """Pump SSE chunk by chunk; a disconnect watcher closes the upstream stream at once.

        Returns the usage, the error (None for a whole stream) and the output tokens seen."""
        limit = call.exchange.admission.output_token_limit if call.exchange.admission else None
        observer = StreamObserver(call.endpoint, call.drop_usage_chunk, output_limit=limit)
        disconnected = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()
            await response.aclose()  # ends the pump's iteration below

        watcher = asyncio.ensure_future(watch())
        exchange = call.exchange
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            try:
                async for chunk in response.aiter_chunks():
                    if exchange.first_chunk_at is None:
                        exchange.first_chunk_at = time.perf_counter()
                    out = observer.feed(chunk)
                    if out:
                        await send({"type": "http.response.body", "body": out, "more_body": True})
                    if observer.limit_reached:
                        # The cap paid for this much output: end the stream cleanly here.
                        tail = observer.cut(
                            call.choice.version.upstream_model(call.choice.upstream)
                        )
                        await send({"type": "http.response.body", "body": tail})
                        self.relay.stream_cut(call.choice, exchange)
                        return observer.usage, None, observer.output_tokens
            except UpstreamError:
                if disconnected.is_set():
                    return observer.usage, "client_disconnected", observer.output_tokens
                await send({"type": "http.response.body", "body": observer.finish()})
                raise
            if disconnected.is_set():
                return observer.usage, "client_disconnected", observer.output_tokens
            await send({"type": "http.response.body", "body": observer.finish()})
            error = None if observer.done else "upstream_truncated"
            return observer.usage, error, observer.output_tokens
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


def _request_view(scope: Scope, snapshot: Snapshot) -> RequestView:
    client = scope.get("client")
    return RequestView.build(
        RawHeaders(scope["headers"]),
        client[0] if client else None,
        scope.get("scheme", "http"),
        snapshot.config.rate_limiting.trusted_proxy_count,
    )


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


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
