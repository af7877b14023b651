"""``RelayWSGIMiddleware``: the WSGI adapter (Flask, Django, any WSGI app).

``flask_app.wsgi_app = RelayWSGIMiddleware(flask_app.wsgi_app, relay=relay)``. The gateway
relays with httpx's sync client; streams are handed to the WSGI server as an iterable whose
``close()`` (called by the server when the client goes away) closes the upstream stream and
records the request.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from typing import Any

from relaymw import protocols
from relaymw.context import _current, _current_request
from relaymw.engine import (
    PAGE_ERRORS,
    Exchange,
    GatewayCall,
    Relay,
    invalid_body,
    is_event_stream,
    too_large,
    upstream_rejection,
    usage_of_body,
)
from relaymw.errors import RequestRejected, UpstreamError
from relaymw.protocols import Endpoint, StreamObserver, Usage
from relaymw.snapshot import CompiledRoute, RequestView, Snapshot
from relaymw.stores import Store
from relaymw.tokens import estimate_completion_tokens
from relaymw.upstream import SyncUpstreamResponse

__all__ = ["RelayWSGIMiddleware"]


Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


class RelayWSGIMiddleware:
    def __init__(
        self,
        app: WSGIApp,
        relay: Relay | None = None,
        config: str | os.PathLike[str] | Store | None = None,
    ) -> None:
        self.app = app
        self.relay = Relay.given(relay, config)
        self._paths = self.relay.claimed_paths  # the relay keeps it current

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in self._paths:  # one lookup for every request not for us
            snapshot = self.relay.snapshot
            endpoint = snapshot.gateway.get(path)
            if endpoint is not None and environ.get("REQUEST_METHOD") == "POST":
                return self._gateway(environ, start_response, snapshot, endpoint)
            route = snapshot.in_app_paths.get(path)
            if route is not None:
                return self._in_app(environ, start_response, snapshot, route)
        return self.app(environ, start_response)

    # --- in-app mode ------------------------------------------------------------------------

    def _in_app(
        self,
        environ: Environ,
        start_response: StartResponse,
        snapshot: Snapshot,
        route: CompiledRoute,
    ) -> Iterable[bytes]:
        request = _request_view(environ, snapshot)
        choice, cookie = self.relay.choose_in_app(snapshot, route, request)
        try:
            limits = self.relay.guard.check_page(route.route, choice.version, request)
        except RequestRejected as exc:
            return _rejection(start_response, PAGE_ERRORS, exc, cookie)
        environ["relaymw.version"] = choice
        extra = [("x-relaymw-version", choice.version_tag), *limits]
        if cookie:
            extra.append(("Set-Cookie", cookie))

        def start_with_version(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
            return start_response(status, [*headers, *extra], *exc)

        token, request_token = _current.set(choice), _current_request.set(request)

        def reset() -> None:
            _current.reset(token)
            _current_request.reset(request_token)

        try:
            result = self.app(environ, start_with_version)
        except BaseException:
            reset()
            raise
        return _Closing(result, reset)

    # --- gateway mode -----------------------------------------------------------------------

    def _gateway(
        self,
        environ: Environ,
        start_response: StartResponse,
        snapshot: Snapshot,
        endpoint: Endpoint,
    ) -> Iterable[bytes]:
        relay = self.relay
        exchange = Exchange(relay, "gateway", endpoint)
        try:
            body = _read_body(environ, snapshot.config.gateway.max_body_bytes)
            request = _request_view(environ, snapshot)
            call = relay.prepare_gateway(snapshot, endpoint, body, request, exchange)
            if call is not None and exchange.admission is not None:
                relay.guard.admit(exchange.admission, request)
        except RequestRejected as exc:
            exchange.finish(exc.status, error=exc.code)
            relay.settle(exchange)
            return _rejection(start_response, endpoint, exc)
        if call is None:
            exchange.done = True
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))
            return self.app(environ, start_response)
        return self._relay(call, start_response)

    def _relay(self, call: GatewayCall, start_response: StartResponse) -> Iterable[bytes]:
        exchange = call.exchange
        client = self.relay.pool.get_sync(call.choice.upstream_name, call.choice.upstream)
        exchange.sent_at = time.perf_counter()
        try:
            response = client.send("POST", call.url, call.headers, call.body)
        except UpstreamError as exc:
            rejected = upstream_rejection(exc)
            self.relay.upstream_failed(call.choice, None, rejected.code)
            exchange.finish(rejected.status, error=rejected.code)
            self.relay.settle(exchange)
            return _rejection(start_response, call.endpoint, rejected, call.set_cookie)
        exchange.headers_at = time.perf_counter()
        status = response.status
        headers = [
            (k.decode(), v.decode("latin-1")) for k, v in call.response_headers(response.headers)
        ]
        if call.stream and status == 200 and is_event_stream(response.headers):
            start_response(_status_line(status), headers)
            return _Stream(self.relay, call, response)
        usage: Usage | None = None
        try:
            data = response.read()
        except UpstreamError as exc:
            rejected = upstream_rejection(exc)
            self.relay.upstream_failed(call.choice, None, rejected.code)
            exchange.finish(rejected.status, error=rejected.code)
            self.relay.settle(exchange)
            return _rejection(start_response, call.endpoint, rejected, call.set_cookie)
        finally:
            response.close()
        output = 0
        if 200 <= status < 300:
            usage = usage_of_body(call.endpoint, data)
            if usage is None and (invalid := invalid_body(data)) is not None:
                self.relay.upstream_failed(call.choice, status, invalid.code)
                exchange.finish(invalid.status, error=invalid.code)
                self.relay.settle(exchange)
                return _rejection(start_response, call.endpoint, invalid, call.set_cookie)
            output = estimate_completion_tokens(data) if usage is None else 0
        else:
            self.relay.upstream_failed(call.choice, status, "upstream_error")
        headers.append(("Content-Length", str(len(data))))
        start_response(_status_line(status), headers)
        exchange.finish(status, usage, None, output)
        self.relay.settle(exchange)
        return [data]


class _Stream:
    """The SSE body as a WSGI iterable; ``close()`` ends the upstream stream and records once."""

    def __init__(self, relay: Relay, call: GatewayCall, response: SyncUpstreamResponse) -> None:
        self.relay = relay
        self.call = call
        self.response = response
        adm = call.exchange.admission
        self.limit = adm.output_token_limit if adm is not None else None
        self.observer = StreamObserver(
            call.endpoint, call.drop_usage_chunk, output_limit=self.limit
        )
        self.error: str | None = "client_disconnected"  # unless iteration reaches the end
        self.status = 200

    def __iter__(self) -> Iterator[bytes]:
        observer, call = self.observer, self.call
        try:
            exchange = call.exchange
            for chunk in self.response.iter_chunks():
                exchange.mark_first_chunk()
                out = observer.feed(chunk)
                if out:
                    yield out
                if observer.limit_reached:
                    # The cap paid for this much output: end the stream cleanly here.
                    self.error = None
                    self.relay.stream_cut(call.choice, exchange)
                    yield observer.cut(call.choice.version.upstream_model(call.choice.upstream))
                    return
        except UpstreamError as exc:
            rejected = upstream_rejection(exc)
            self.error, self.status = rejected.code, rejected.status
            self.relay.upstream_failed(call.choice, None, rejected.code)
            tail = observer.finish()
            if tail:
                yield tail
            return
        tail = observer.finish()
        if tail:
            yield tail
        self.error = None if observer.done else "upstream_truncated"
        if self.error is not None:
            self.relay.upstream_failed(call.choice, 200, self.error)

    def close(self) -> None:
        try:
            self.response.close()
        finally:
            observer, exchange = self.observer, self.call.exchange
            exchange.finish(self.status, observer.usage, self.error, observer.output_tokens)
            self.relay.settle(exchange)


class _Closing:
    """Wraps an app's iterable: forwards ``close()`` and then runs ``on_close``."""

    def __init__(self, result: Iterable[bytes], on_close: Callable[[], None]) -> None:
        self.result = result
        self.on_close = on_close

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.result)

    def close(self) -> None:
        try:
            close = getattr(self.result, "close", None)
            if close is not None:
                close()
        finally:
            self.on_close()


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


def _request_view(environ: Environ, snapshot: Snapshot) -> RequestView:
    headers: dict[str, str] = {
        key[5:].replace("_", "-").lower(): value
        for key, value in environ.items()
        if key.startswith("HTTP_")
    }
    if "CONTENT_TYPE" in environ:
        headers["content-type"] = environ["CONTENT_TYPE"]
    return RequestView.build(
        headers,
        environ.get("REMOTE_ADDR"),
        environ.get("wsgi.url_scheme", "http"),
        snapshot.config.rate_limiting.trusted_proxy_count,
    )


def _read_body(environ: Environ, limit: int) -> bytes:
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH") or ""
    if length.isascii() and length.isdigit():
        # More digits than any body could have: int() would refuse past 4300 of them.
        if len(length.lstrip("0")) > 15 or int(length) > limit:
            raise too_large(limit)
        size = int(length)
        data: bytes = stream.read(size) if size else b""
        return data
    # No length: chunked input, which servers that set wsgi.input_terminated end for us.
    data = stream.read(limit + 1) if environ.get("wsgi.input_terminated") else b""
    if len(data) > limit:
        raise too_large(limit)
    return data


def _rejection(
    start_response: StartResponse,
    endpoint: Endpoint,
    exc: RequestRejected,
    set_cookie: str | None = None,
) -> list[bytes]:
    body = protocols.rejection_body(endpoint.family, exc)
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    headers += list(exc.headers)
    if set_cookie:
        headers.append(("Set-Cookie", set_cookie))
    start_response(_status_line(exc.status), headers)
    return [body]
