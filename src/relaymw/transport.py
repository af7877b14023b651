"""httpx transports for in-app mode: ``relay.client()`` and ``relay.async_client()``.

The transports are built for ``httpx`` (``relay.client()``) and, on request, for its fork
``httpx2`` (``relay.client(flavor="httpx2")``), which the Anthropic SDK requires.

A handler's plain OpenAI- or Anthropic-style request whose ``model`` is a route alias is
rewritten to the version chosen for the current request (``current_version()``; a fresh
weighted choice outside a request), sent to that version's upstream with its credentials,
and metered when the response is closed. Anything else goes through untouched. The official
SDKs take these clients as ``http_client=``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import httpx

from relaymw import protocols
from relaymw.context import _current_request, current_version
from relaymw.engine import Exchange, GatewayCall, is_event_stream, usage_of_body
from relaymw.errors import RequestRejected
from relaymw.protocols import Endpoint, StreamObserver
from relaymw.snapshot import RequestView, VersionChoice

if TYPE_CHECKING:
    from relaymw.engine import Relay

__all__ = ["AsyncRelayTransport", "RelayTransport", "transports_for"]

# "/chat/completions" -> endpoint: matched on the path's end, whatever base URL the SDK has.
_SUFFIXES = {ep.suffix: ep for ep in protocols.gateway_paths("").values()}
_NO_HEADERS: dict[str, str] = {}
_NO_REQUEST = RequestView(_NO_HEADERS, None, "http")


def _endpoint_for(path: str) -> Endpoint | None:
    for suffix, endpoint in _SUFFIXES.items():
        if path.endswith(suffix):
            return endpoint
    return None


class _Refused(Exception):
    """relaymw answers this call itself (cost cap, rate limit or budget)."""

    def __init__(self, exchange: Exchange, rejection: RequestRejected) -> None:
        self.exchange = exchange
        self.rejection = rejection

    def content(self) -> tuple[int, list[tuple[str, str]], bytes]:
        exc, endpoint = self.rejection, self.exchange.endpoint
        body = protocols.rejection_body(endpoint.family if endpoint else "openai", exc)
        return exc.status, [("content-type", "application/json"), *exc.headers], body


def _claim(relay: Relay, request: Any) -> GatewayCall | None:
    """The rewritten call when this request is for one of our aliases, else None.

    Raises :class:`_Refused` when the cost cap refuses it."""
    endpoint = _endpoint_for(request.url.path)
    if endpoint is None or request.method != "POST":
        return None
    try:
        body = protocols.parse_body(request.content)
        model = protocols.requested_model(body)
    except RequestRejected:
        return None  # not ours to judge: the upstream answers it as usual
    snapshot = relay.snapshot
    found = snapshot.route_for_model(model)
    if found is None:
        return None
    route, pinned = found
    current = current_version()
    choice: VersionChoice
    if pinned is not None:
        choice = route.choices[(pinned, "pin")]
    elif current is not None and current.route == route.alias:
        choice = current
    else:
        choice = snapshot.choose(route, _NO_REQUEST, sticky_key=None)[0]
    exchange = Exchange(relay, "in_app", endpoint)
    headers = {k.lower(): v for k, v in request.headers.items()}
    try:
        return relay.build_call(
            endpoint, body, choice, headers, exchange, route=route.route, in_app=True
        )
    except RequestRejected as exc:
        raise _refuse(exchange, exc) from None


def _refuse(exchange: Exchange, exc: RequestRejected) -> _Refused:
    """Record a refused call (once) and wrap it for the transport to answer."""
    exchange.finish(exc.status, error=exc.code)
    return _Refused(exchange, exc)


def _page_request() -> RequestView:
    return _current_request.get() or _NO_REQUEST


class _Meter:
    """Observes a response body as it is read; records the call once when it is closed."""

    def __init__(self, call: GatewayCall, status: int, streaming: bool) -> None:
        self.call = call
        self.status = status
        self.observer = StreamObserver(call.endpoint, call.drop_usage_chunk) if streaming else None
        self.body: list[bytes] = []
        self.complete = False

    def feed(self, chunk: bytes) -> bytes:
        self.call.exchange.mark_first_chunk()
        if self.observer is not None:
            return self.observer.feed(chunk)
        self.body.append(chunk)
        return chunk

    def tail(self) -> bytes:
        self.complete = True
        return self.observer.finish() if self.observer is not None else b""

    def close(self) -> None:
        call, usage, error = self.call, None, None
        if self.observer is not None:
            usage = self.observer.usage
            # SDKs stop reading at the protocol's terminator and close: that is a whole stream.
            if not (self.complete or self.observer.done):
                error = "client_disconnected"
        elif self.complete and 200 <= self.status < 300:
            usage = usage_of_body(call.endpoint, b"".join(self.body))
        output = self.observer.output_tokens if self.observer is not None else 0
        call.exchange.finish(self.status, usage, error, output)


@functools.cache
def transports_for(hx: Any) -> tuple[type[Any], type[Any]]:
    """``(RelayTransport, AsyncRelayTransport)`` built on the module ``hx`` (httpx or httpx2)."""

    def _upstream_request(call: GatewayCall, original: Any) -> Any:
        return hx.Request(
            "POST",
            call.url,
            headers=call.headers,
            content=call.body,
            extensions=original.extensions,
        )

    def _response(call: GatewayCall, upstream: Any, stream: Any) -> Any:
        headers = [
            (k.decode(), v.decode("latin-1"))
            for k, v in call.response_headers(upstream.headers.multi_items())
        ]
        return hx.Response(
            upstream.status_code, headers=headers, stream=stream, extensions=upstream.extensions
        )

    def _failed(relay: Relay, call: GatewayCall, exc: Any) -> None:
        error = (
            "upstream_timeout" if isinstance(exc, hx.TimeoutException) else "upstream_unreachable"
        )
        relay.upstream_failed(call.choice, None, error)
        call.exchange.finish(504 if error == "upstream_timeout" else 502, error=error)

    def _refusal(refused: _Refused) -> Any:
        status, headers, body = refused.content()
        return hx.Response(status, headers=headers, content=body)

    class _SyncMeteredStream(hx.SyncByteStream):  # type: ignore[misc]
        def __init__(self, inner: Any, meter: _Meter, relay: Relay) -> None:
            self.inner, self.meter, self.relay = inner, meter, relay

        def __iter__(self) -> Iterator[bytes]:
            for chunk in self.inner.iter_raw():
                out = self.meter.feed(chunk)
                if out:
                    yield out
            tail = self.meter.tail()
            if tail:
                yield tail

        def close(self) -> None:
            try:
                self.inner.close()
            finally:
                self.meter.close()
                self.relay.settle(self.meter.call.exchange)

    class _AsyncMeteredStream(hx.AsyncByteStream):  # type: ignore[misc]
        def __init__(self, inner: Any, meter: _Meter, relay: Relay) -> None:
            self.inner, self.meter, self.relay = inner, meter, relay

        async def __aiter__(self) -> AsyncIterator[bytes]:
            async for chunk in self.inner.aiter_raw():
                out = self.meter.feed(chunk)
                if out:
                    yield out
            tail = self.meter.tail()
            if tail:
                yield tail

        async def aclose(self) -> None:
            try:
                await self.inner.aclose()
            finally:
                self.meter.close()
                await self.relay.asettle(self.meter.call.exchange)

    class RelayTransport(hx.BaseTransport):  # type: ignore[misc]
        """Sync transport: rewrites and meters requests for route aliases."""

        def __init__(self, relay: Relay, inner: Any = None) -> None:
            self.relay = relay
            self.inner = inner or hx.HTTPTransport()

        def handle_request(self, request: Any) -> Any:
            relay = self.relay
            if request.method == "POST":
                request.read()
            try:
                call = _claim(relay, request)
                if call is not None and call.exchange.admission is not None:
                    try:
                        relay.guard.admit(call.exchange.admission, _page_request())
                    except RequestRejected as exc:
                        raise _refuse(call.exchange, exc) from None
            except _Refused as refused:
                relay.settle(refused.exchange)
                return _refusal(refused)
            if call is None:
                return self.inner.handle_request(request)
            call.exchange.sent_at = time.perf_counter()
            try:
                upstream = self.inner.handle_request(_upstream_request(call, request))
            except hx.TransportError as exc:
                _failed(relay, call, exc)
                relay.settle(call.exchange)
                raise
            call.exchange.headers_at = time.perf_counter()
            streaming = call.stream and is_event_stream(list(upstream.headers.items()))
            upstream_response = hx.Response(upstream.status_code, stream=upstream.stream)
            meter = _Meter(call, upstream.status_code, streaming)
            stream = _SyncMeteredStream(upstream_response, meter, relay)
            return _response(call, upstream, stream)

        def close(self) -> None:
            self.inner.close()

    class AsyncRelayTransport(hx.AsyncBaseTransport):  # type: ignore[misc]
        """Async transport: rewrites and meters requests for route aliases."""

        def __init__(self, relay: Relay, inner: Any = None) -> None:
            self.relay = relay
            self.inner = inner or hx.AsyncHTTPTransport()

        async def handle_async_request(self, request: Any) -> Any:
            relay = self.relay
            if request.method == "POST":
                await request.aread()
            try:
                call = _claim(relay, request)
                if call is not None and call.exchange.admission is not None:
                    try:
                        await relay.guard.aadmit(call.exchange.admission, _page_request())
                    except RequestRejected as exc:
                        raise _refuse(call.exchange, exc) from None
            except _Refused as refused:
                await relay.asettle(refused.exchange)
                return _refusal(refused)
            if call is None:
                return await self.inner.handle_async_request(request)
            call.exchange.sent_at = time.perf_counter()
            try:
                upstream = await self.inner.handle_async_request(_upstream_request(call, request))
            except hx.TransportError as exc:
                _failed(relay, call, exc)
                await relay.asettle(call.exchange)
                raise
            call.exchange.headers_at = time.perf_counter()
            streaming = call.stream and is_event_stream(list(upstream.headers.items()))
            upstream_response = hx.Response(upstream.status_code, stream=upstream.stream)
            meter = _Meter(call, upstream.status_code, streaming)
            stream = _AsyncMeteredStream(upstream_response, meter, relay)
            return _response(call, upstream, stream)

        async def aclose(self) -> None:
            await self.inner.aclose()

    return RelayTransport, AsyncRelayTransport


RelayTransport, AsyncRelayTransport = transports_for(httpx)
