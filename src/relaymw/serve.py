"""``relaymw serve``: a standalone gateway under uvicorn.

Without ``--config`` it serves the embedded default configuration against a FakeLLM it
starts itself, so it runs on a fresh machine with no keys and no network. Given an admin
token (``--admin-token``, ``$RELAYMW_ADMIN_TOKEN``, or named ones in
``$RELAYMW_ADMIN_TOKENS="alice=TOKEN,ci=TOKEN"``) it also serves the version-control API
under ``/admin``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

from starlette.routing import Mount, Router

from relaymw.asgi import Receive, RelayMiddleware, Scope, Send
from relaymw.engine import Relay
from relaymw.errors import RelayError
from relaymw.testing import FakeLLM

__all__ = ["ADMIN_PREFIX", "admin_tokens_from_env", "build_app", "serve"]

UPSTREAM_ENV = "RELAYMW_UPSTREAM_URL"
ADMIN_TOKEN_ENV = "RELAYMW_ADMIN_TOKEN"
ADMIN_TOKENS_ENV = "RELAYMW_ADMIN_TOKENS"
ADMIN_PREFIX = "/admin"


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    """The app behind the gateway: a health check and 404s in OpenAI's error shape."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/healthz":
        status, body = 200, b'{"status":"ok"}'
    else:
        status = 404
        body = (
            b'{"error":{"message":"not found: relaymw answers the configured LLM API paths'
            b' for route aliases only","type":"not_found_error","param":null,"code":"not_found"}}'
        )
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def build_app(
    relay: Relay,
    admin_token: str | None = None,
    admin_tokens: Mapping[str, str] | None = None,
) -> RelayMiddleware:
    """The gateway; with an admin token, the version-control API under ``/admin`` too."""
    if not admin_token and not admin_tokens:
        return RelayMiddleware(_not_found, relay=relay)
    admin = relay.admin_app(token=admin_token or None, tokens=admin_tokens or None)
    inner = Router(routes=[Mount(ADMIN_PREFIX, app=admin), Mount("/", app=_not_found)])
    return RelayMiddleware(inner, relay=relay)


def admin_tokens_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``$RELAYMW_ADMIN_TOKENS`` (``name=token,name=token``) as a mapping."""
    named: dict[str, str] = {}
    for item in environ.get(ADMIN_TOKENS_ENV, "").split(","):
        if not item.strip():
            continue
        name, sep, token = item.partition("=")
        if not sep or not name.strip() or not token.strip():
            raise RelayError(f"${ADMIN_TOKENS_ENV} must read name=token,name=token")
        named[name.strip()] = token.strip()
    return named


@contextlib.contextmanager
def local_upstream() -> Iterator[FakeLLM]:
    """A FakeLLM for the embedded config, its URL exported for ``${RELAYMW_UPSTREAM_URL}``."""
    with FakeLLM() as fake:
        previous = os.environ.get(UPSTREAM_ENV)
        os.environ[UPSTREAM_ENV] = fake.base_url
        try:
            yield fake
        finally:
            if previous is None:
                os.environ.pop(UPSTREAM_ENV, None)
            else:
                os.environ[UPSTREAM_ENV] = previous


def serve(
    config: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    admin_token: str | None = None,
) -> None:
    """Run the gateway; ``admin_token`` (else ``$RELAYMW_ADMIN_TOKEN``, plus the named
    ``$RELAYMW_ADMIN_TOKENS``) adds the admin API under ``/admin``."""
    import uvicorn

    token = admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None
    named = admin_tokens_from_env()

    with contextlib.ExitStack() as stack:
        if config is None:
            fake = stack.enter_context(local_upstream())
            print(
                f"relaymw: embedded default config, FakeLLM upstream at {fake.base_url}", flush=True
            )
            relay = Relay()
        else:
            relay = Relay.from_store(config)
        stack.callback(relay.close)
        try:
            app = build_app(relay, token, named)
        except ValueError as exc:  # an empty token, or one token under two names
            raise RelayError(f"admin API: {exc}") from None
        aliases = ", ".join(relay.snapshot.routes) or "(none)"
        print(f"relaymw: gateway on http://{host}:{port}/v1  routes: {aliases}", flush=True)
        if token or named:
            names = ", ".join(([] if not token else ["admin"]) + list(named))
            print(
                f"relaymw: admin API on http://{host}:{port}{ADMIN_PREFIX}  tokens: {names}",
                flush=True,
            )
        uvicorn.run(app, host=host, port=port, log_level="warning")
