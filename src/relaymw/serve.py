"""``relaymw serve``: a standalone gateway under uvicorn.

Without ``--config`` it serves the embedded default configuration against a FakeLLM it
starts itself, so it runs on a fresh machine with no keys and no network.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from relaymw.asgi import Receive, RelayMiddleware, Scope, Send
from relaymw.engine import Relay
from relaymw.testing import FakeLLM

__all__ = ["build_app", "serve"]

UPSTREAM_ENV = "RELAYMW_UPSTREAM_URL"


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


def build_app(relay: Relay) -> RelayMiddleware:
    return RelayMiddleware(_not_found, relay=relay)


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


def serve(config: str | None = None, host: str = "127.0.0.1", port: int = 8080) -> None:
    import uvicorn

    with contextlib.ExitStack() as stack:
        if config is None:
            fake = stack.enter_context(local_upstream())
            print(f"relaymw: embedded default config, FakeLLM upstream at {fake.base_url}")
            relay = Relay()
        else:
            relay = Relay.from_store(config)
        stack.callback(relay.close)
        aliases = ", ".join(relay.snapshot.routes) or "(none)"
        print(f"relaymw: gateway on http://{host}:{port}/v1  routes: {aliases}")
        uvicorn.run(build_app(relay), host=host, port=port, log_level="warning")
