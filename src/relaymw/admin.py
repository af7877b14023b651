"""The version-control API (SPEC §7) as a Starlette app: ``relay.admin_app(token=...)``.

Mount it anywhere in a Starlette/FastAPI service (``app.mount("/relay-admin", ...)``), or
in a WSGI service through :func:`admin_wsgi_app`. Every call but ``GET /openapi.json``
needs ``Authorization: Bearer <token>``; each configured token has a name, and that name
(never the token) is who the change log says made a change. Writes go through
:meth:`relaymw.Relay.update_document`: validated as a whole document, saved with
compare-and-set, then swapped in. Errors are ``{"error": {"type", "message", "details"?}}``.

The handlers live in :mod:`relaymw.admin_handlers`; this module is the plumbing around them:
authentication, rate limiting, JSON bodies and error answers.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson
from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relaymw.errors import StoreError
from relaymw.limiting import _headers as rate_limit_headers

if TYPE_CHECKING:
    from relaymw.engine import Relay

__all__ = ["ApiError", "admin_wsgi_app", "create_admin_app", "json_response"]

log = logging.getLogger("relaymw.admin")

DEFAULT_TOKEN_NAME = "admin"
MAX_BODY_BYTES = 1024 * 1024
# Deeper bodies are no configuration anyone writes, and would only exhaust the recursion of
# the validators and serialisers downstream.
MAX_BODY_DEPTH = 32


class ApiError(Exception):
    """An answer other than success: ``{"error": {"type", "message", "details"?}}``."""

    def __init__(
        self,
        status: int,
        kind: str,
        message: str,
        details: Any = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.details = details
        self.headers = list(headers)

    def response(self) -> Response:
        error: dict[str, Any] = {"type": self.kind, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return json_response({"error": error}, self.status, dict(self.headers))


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(_dumps(body), status, headers, media_type="application/json")


def _dumps(body: Any) -> bytes:
    try:
        return orjson.dumps(body, default=_jsonable)
    except TypeError:  # an integer beyond 64 bits in a hand-written TOML document
        return json.dumps(body, default=_jsonable, ensure_ascii=False).encode()


def _jsonable(value: Any) -> Any:
    from decimal import Decimal

    return float(value) if isinstance(value, Decimal) else str(value)


# --- tokens ------------------------------------------------------------------------------------


def _token_table(token: str | None, tokens: Mapping[str, str] | None) -> list[tuple[str, bytes]]:
    """``[(name, sha256(token))]``; a ``ValueError`` rather than an admin API open to anyone."""
    named = dict(tokens or {})
    if token is not None:
        if DEFAULT_TOKEN_NAME in named:
            raise ValueError(f"token= is named {DEFAULT_TOKEN_NAME!r} and tokens= names it too")
        named[DEFAULT_TOKEN_NAME] = token
    if not named:
        raise ValueError(
            "the admin API needs a token: relay.admin_app(token=...) or tokens={name: token}"
        )
    table: list[tuple[str, bytes]] = []
    for name, secret in named.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError("admin token names must be non-empty strings")
        if not isinstance(secret, str) or not secret.strip():
            raise ValueError(f"the admin token named {name!r} is empty")
        digest = hashlib.sha256(secret.encode()).digest()
        if any(hmac.compare_digest(digest, d) for _, d in table):
            raise ValueError(f"the admin token named {name!r} is also another name's token")
        table.append((name, digest))
    return table


# --- the app -----------------------------------------------------------------------------------

Handler = Callable[[Request, str], Awaitable[Response]]


class AdminGate:
    """Authentication and rate limiting in front of every handler."""

    def __init__(
        self, tokens: list[tuple[str, bytes]], rate_limit: str, max_body_bytes: int
    ) -> None:
        self.tokens = tokens
        self.limit: RateLimitItem = parse(rate_limit)
        self.limiter = MovingWindowRateLimiter(MemoryStorage())
        self.max_body_bytes = max_body_bytes

    def actor(self, request: Request) -> str | None:
        """The name of the token the request carries, or None. Every configured token is
        compared, in constant time, whichever matches, so timing tells nothing."""
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            return None
        # Header values arrive decoded as latin-1: this gives back the bytes the client sent.
        given = hashlib.sha256(credential.encode("latin-1")).digest()
        found = None
        for name, digest in self.tokens:
            if hmac.compare_digest(given, digest):
                found = name
        return found

    def admit(self, key: str, per: str) -> None:
        """Count a call against ``key``'s allowance; ``per`` says whose it is, for the 429."""
        if self.limiter.hit(self.limit, "relaymw-admin", key):
            return
        stats = self.limiter.get_window_stats(self.limit, "relaymw-admin", key)
        headers = rate_limit_headers(self.limit, stats, rejected=True)
        wait = dict(headers)["Retry-After"]
        raise ApiError(
            429,
            "rate_limited",
            f"too many admin calls (at most {self.limit} {per}); retry after {wait} s",
            headers=headers,
        )

    def refuse(self, request: Request) -> ApiError:
        """The 401 for a call without a valid token (or a 429 for too many of them)."""
        client = request.client.host if request.client else "unknown"
        self.admit(f"ip:{client}", "per client without a valid token")  # slows guessing
        sent = request.headers.get("authorization", "").strip()
        if sent:
            reason = "the bearer token is not one of this relay's admin tokens"
        else:
            reason = "no bearer token"
        log.warning("relaymw admin: refused a call from %s: %s", client, reason)
        return ApiError(
            401,
            "authentication_error",
            f"{reason}: send 'Authorization: Bearer <token>' with a token the admin app was "
            "given (token= or tokens= of relay.admin_app)",
            headers=[("WWW-Authenticate", 'Bearer realm="relaymw-admin"')],
        )

    def guard(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                actor = self.actor(request)
                if actor is None:
                    raise self.refuse(request)
                self.admit(f"token:{actor}", "per token")
                return await handler(request, actor)
            except ApiError as exc:
                return exc.response()
            except StoreError as exc:  # Redis down while reading the change log or a state
                log.warning("relaymw admin: the store failed: %s", exc)
                return ApiError(
                    503,
                    "store_unavailable",
                    f"the configuration store could not be used, nothing changed: {exc}",
                    headers=[("Retry-After", "1")],
                ).response()

        return endpoint


async def read_json_object(request: Request, max_bytes: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The request body as a JSON object, or the 415 / 413 / 400 / 422 saying what is wrong."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"the body must be JSON sent as 'Content-Type: application/json', "
            f"not {media or 'no content type'!r}",
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, "request_too_large", f"the body is larger than {max_bytes} bytes")
        chunks.append(chunk)
    try:
        body = orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(422, "validation_error", "the body must be a JSON object")
    problems = _storable_problems(body, "", 0)
    if problems:
        raise ApiError(
            422,
            "validation_error",
            "; ".join(f"{p}: {m}" if p else m for p, m in problems),
            {"issues": [{"path": p, "message": m} for p, m in problems]},
        )
    return body


def _storable_problems(node: Any, path: str, depth: int) -> list[tuple[str, str]]:
    """What no store can keep: nesting beyond :data:`MAX_BODY_DEPTH`, and ``null`` inside an
    array (TOML, the default file format, has no null)."""
    if depth > MAX_BODY_DEPTH:
        return [(path, f"nested deeper than {MAX_BODY_DEPTH} levels")]
    out: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _storable_problems(value, f"{path}.{key}" if path else str(key), depth + 1)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            if value is None:
                out.append((f"{path}[{i}]", "null is not allowed in an array"))
            else:
                out += _storable_problems(value, f"{path}[{i}]", depth + 1)
    return out


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 (no such path) and 405 (method) as JSON errors."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        kind = "method_not_allowed"
        message = f"{request.method} is not allowed on {request.url.path}"
    elif exc.status_code == 404:
        kind, message = "not_found", f"no admin endpoint at {request.url.path}; see /openapi.json"
    else:
        kind, message = "bad_request", str(exc.detail)
    return ApiError(
        exc.status_code, kind, message, headers=list((exc.headers or {}).items())
    ).response()


def create_admin_app(
    relay: Relay,
    *,
    token: str | None = None,
    tokens: Mapping[str, str] | None = None,
    rate_limit: str = "20/second",
    max_body_bytes: int = MAX_BODY_BYTES,
) -> Starlette:
    """The version-control API of ``relay`` as a Starlette app.

    ``token`` is one bearer token, named ``"admin"``; ``tokens`` maps names to tokens (an
    operator each, CI ...). At least one is required. ``rate_limit`` (a ``limits`` string)
    applies per token name, and per client address to calls without a valid token.
    """
    from relaymw.admin_handlers import AdminHandlers
    from relaymw.admin_openapi import openapi_document

    gate = AdminGate(_token_table(token, tokens), rate_limit, max_body_bytes)
    h = AdminHandlers(relay, max_body_bytes)

    async def openapi(request: Request) -> Response:
        return json_response(openapi_document(request.scope.get("root_path", "")))

    g = gate.guard
    routes = [
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/models/versions", g(h.list_versions), methods=["GET"]),
        Route("/models/versions", g(h.register_version), methods=["POST"]),
        Route("/models/versions/{tag}", g(h.show_version), methods=["GET"]),
        Route("/routes/traffic", g(h.list_routes), methods=["GET"]),
        Route("/routes/traffic", g(h.put_route), methods=["POST"]),
        Route("/routes/traffic", g(h.set_weights), methods=["PATCH"]),
        Route("/routes/traffic/rollback", g(h.rollback), methods=["POST"]),
        Route("/routes/traffic/{alias:path}", g(h.show_route), methods=["GET"]),
        Route("/metrics/versions", g(h.metrics), methods=["GET"]),
        Route("/audit", g(h.audit), methods=["GET"]),
        Route("/rollouts/{alias:path}", g(h.read_rollout), methods=["GET"]),
        Route("/rollouts/{alias:path}", g(h.write_rollout), methods=["PUT"]),
        Route("/rollouts/{alias:path}", g(h.delete_rollout), methods=["DELETE"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})


def admin_wsgi_app(relay: Relay, **kwargs: Any) -> Any:
    """:func:`create_admin_app` as a WSGI app (needs ``a2wsgi``), for Flask and friends::

    from werkzeug.middleware.dispatcher import DispatcherMiddleware
    flask_app.wsgi_app = DispatcherMiddleware(
        flask_app.wsgi_app, {"/relay-admin": admin_wsgi_app(relay, token=TOKEN)}
    )
    """
    try:
        from a2wsgi import ASGIMiddleware
    except ModuleNotFoundError:
        raise ImportError(
            "admin_wsgi_app needs the a2wsgi package: pip install 'relaymw[admin-wsgi]'"
        ) from None
    app: Any = create_admin_app(relay, **kwargs)
    return ASGIMiddleware(app)
