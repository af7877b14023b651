"""The servers the end-to-end benchmarks measure, each run as its own process.

``python bench/servers.py NAME --port P --upstream URL [--cpu N] [--nice N] [--settings JSON]``
serves one of :data:`APPS` under uvicorn (the same loop and HTTP settings for every app), or
FakeLLM itself for ``NAME = fakellm``. The orchestrator in ``bench/common.py`` starts them.

The relays written here are the baselines: the least code that relays a request with each
HTTP client, no parsing, no routing. The relaymw apps wrap small Starlette apps in
``RelayMiddleware`` with one of two configurations: :func:`routing_document` (a 95/5 split,
sticky by cookie: ``bench_relay.py``) or :func:`full_document` (every feature on:
``bench_sidebyside.py`` and ``soak.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a script from anywhere: ``import common`` must work
    sys.path.insert(0, str(HERE))

import machine  # noqa: E402
from common import CHUNKS  # noqa: E402

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Settings = Mapping[str, str]

UPSTREAM_KEY = "sk-bench-upstream"
ALIAS = "chat-production"
UPSTREAM_MODEL = "gpt-4.1"  # what the 95% version sends; direct and the baselines name it
# FakeLLM names the model it was asked for: an alias that reached it was not rewritten.
ANSWERED = f'"model":"{UPSTREAM_MODEL}'.encode()  # gpt-4.1 or gpt-4.1-mini
IN_APP_PATH = "/api/chat"
METRICS_PATH = "/bench/metrics"  # Prometheus text + what the signal receiver counted
FINISHED = "bench_request_finished_received"
REDIS_URL = "redis://127.0.0.1:6379/0"
# Per identity (API key): the load cycles over common.USERS keys, so even 20,000 req/s stay
# below these. A moving window keeps one entry per hit, up to the limit: a realistic per-user
# limit keeps Redis's per-request work realistic (and steady during a run).
RATE_LIMIT = "1200/minute"
TOKEN_LIMIT = "1000000/minute"
HUGE_BUDGET_USD = 1_000_000_000
COST_CAP_USD = 0.05  # ~0.003 $ worst case per request here: checked, never clamps
_KEPT_ALIVE: list[object] = []  # the signal receivers of the apps built in this process

# --------------------------------------------------------------------------- configurations


def _upstreams(fake_url: str) -> dict[str, Any]:
    return {
        "openai": {
            "base_url": f"{fake_url}/v1",
            "api_key": UPSTREAM_KEY,
            "protocol": "openai",
            "timeout_seconds": 30,
        }
    }


def _versions() -> list[dict[str, Any]]:
    return [
        {
            "version_tag": "gpt-v1",
            "model": f"openai/{UPSTREAM_MODEL}",
            "upstream_endpoint": "openai",
            "parameters": {"temperature": 0.7, "max_tokens": 256},
            "system_prompt": "You are v1.",
        },
        {
            "version_tag": "gpt-v2",
            "model": "gpt-4.1-mini",
            "upstream_endpoint": "openai",
            "parameters": {"temperature": 0.1},
        },
    ]


def routing_document(fake_url: str) -> dict[str, Any]:
    """``chat-production`` over two OpenAI versions on FakeLLM, 95/5, sticky by cookie."""
    return {
        "upstreams": _upstreams(fake_url),
        "versions": _versions(),
        "routes": [
            {
                "model_alias": ALIAS,
                "route_rules": [
                    {"version_tag": "gpt-v1", "weight": 95},
                    {"version_tag": "gpt-v2", "weight": 5},
                ],
                "sticky_sessions": {"enabled": True, "cookie_name": "relay_chat"},
            }
        ],
    }


def full_document(
    fake_url: str,
    storage: str = REDIS_URL,
    rate_limit: str = RATE_LIMIT,
    metrics_retention: int | None = None,
) -> dict[str, Any]:
    """Every feature on: the routing document, sticky by the ``x-user-id`` header with signed
    cookies, request and token rate limits and a month budget on ``storage``, a per-request
    cost cap, a health check, and :data:`IN_APP_PATH` as the route's in-app path."""
    doc = routing_document(fake_url)
    doc["routes"][0].update(
        sticky_sessions={
            "enabled": True,
            "cookie_name": "relay_chat",
            "key": "header:x-user-id",
        },
        paths=[IN_APP_PATH],
        rate_limits=[rate_limit],
        token_limits=[TOKEN_LIMIT],
        cost_limit_per_request=COST_CAP_USD,
        # Thresholds FakeLLM never crosses: the checker runs, nothing is ejected.
        health_check={"enabled": True, "error_rate_threshold": 0.5, "auto_rollback": False},
    )
    doc["sticky"] = {"secret": "bench-sticky-secret"}
    doc["pricing"] = {"gpt-4.1-mini": {"input_per_mtok": 0.4, "output_per_mtok": 1.6}}
    doc["rate_limiting"] = {"storage_uri": storage, "identity": "api_key"}
    doc["budgets"] = [{"scope": f"route:{ALIAS}", "period": "month", "limit_usd": HUGE_BUDGET_USD}]
    doc["budgeting"] = {"storage_uri": storage}
    if metrics_retention is not None:  # shorter than the default hour: memory steady sooner
        doc["metrics"] = {"retention_seconds": metrics_retention}
        doc["routes"][0]["health_check"]["window_seconds"] = metrics_retention
    return doc


# --------------------------------------------------------------------------- baselines


def _lifespan(on_shutdown: Callable[[], Awaitable[None]]) -> ASGIApp:
    async def lifespan(scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await on_shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    return lifespan


async def _read_body(receive: Receive) -> bytes | None:
    """The request body, or None when the client left."""
    body, more = b"", True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


_UPSTREAM_HEADERS = {"content-type": "application/json", "authorization": f"Bearer {UPSTREAM_KEY}"}


def bare_aiohttp_app(upstream: str, settings: Settings) -> ASGIApp:
    """The baseline of the ratios: body in, the same bytes POSTed upstream on one shared
    ``aiohttp.ClientSession``, the answer streamed back. Same connector settings as
    relaymw's aiohttp client."""
    import aiohttp

    session: aiohttp.ClientSession | None = None

    async def close() -> None:
        if session is not None:
            await session.close()

    lifespan = _lifespan(close)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal session
        if scope["type"] == "lifespan":
            await lifespan(scope, receive, send)
            return
        if scope["type"] != "http" or (body := await _read_body(receive)) is None:
            return
        if session is None:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30.0),
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
        url = upstream + scope["path"]
        async with session.post(url, data=body, headers=_UPSTREAM_HEADERS) as resp:
            out = [(b"content-type", resp.headers.get("content-type", "").encode("latin-1"))]
            if resp.content_length is not None:
                data = await resp.read()
                out.append((b"content-length", str(len(data)).encode()))
                await send({"type": "http.response.start", "status": resp.status, "headers": out})
                await send({"type": "http.response.body", "body": data})
                return
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            while chunk := await resp.content.readany():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    return app


def _httpx_client() -> Any:
    """A plain ``httpx.AsyncClient`` as an app would build it: its default transport and pool
    (100 connections, 20 kept alive), the pool ``relay.async_client()`` wraps too."""
    import httpx

    return httpx.AsyncClient(timeout=30.0, trust_env=False)


def bare_httpx_app(upstream: str, settings: Settings) -> ASGIApp:
    """:func:`bare_aiohttp_app` on one shared ``httpx.AsyncClient`` instead."""
    client = _httpx_client()
    lifespan = _lifespan(client.aclose)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(scope, receive, send)
            return
        if scope["type"] != "http" or (body := await _read_body(receive)) is None:
            return
        request = client.build_request(
            "POST", upstream + scope["path"], content=body, headers=_UPSTREAM_HEADERS
        )
        resp = await client.send(request, stream=True)
        try:
            out = [(b"content-type", resp.headers.get("content-type", "").encode("latin-1"))]
            if "content-length" in resp.headers:
                data = await resp.aread()
                out.append((b"content-length", str(len(data)).encode()))
                await send(
                    {"type": "http.response.start", "status": resp.status_code, "headers": out}
                )
                await send({"type": "http.response.body", "body": data})
                return
            await send({"type": "http.response.start", "status": resp.status_code, "headers": out})
            async for chunk in resp.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await resp.aclose()

    return app


# --------------------------------------------------------------------------- apps


def echo_app(extra: Sequence[Any] = ()) -> ASGIApp:
    """The app of the passthrough targets: ``POST /echo`` answers a small JSON."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse({"ok": True, "received": len(body)})

    return Starlette(routes=[Route("/echo", echo, methods=["POST"]), *extra])


def health_app(extra: Sequence[Any] = ()) -> ASGIApp:
    """The app behind the relaymw gateway: one route that the load never hits."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/health", health), *extra])


def chat_app(
    upstream: str, client: Any, headers: Mapping[str, str], extra: Sequence[Any] = ()
) -> ASGIApp:
    """An app whose ``POST /api/chat`` makes the LLM call itself: the page's JSON body is
    sent to ``/v1/chat/completions`` with ``client`` and the answer returned (streamed when
    the body asks for a stream). In-app mode runs it with ``relay.async_client()``; its
    baseline with a plain httpx client."""
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    url = f"{upstream}/v1/chat/completions"

    async def chat(request: Request) -> Response:
        payload = await request.json()
        call = client.build_request("POST", url, json=payload, headers=headers)
        resp = await client.send(call, stream=True)
        media = resp.headers.get("content-type", "application/json")
        if payload.get("stream"):
            return StreamingResponse(
                resp.aiter_raw(), resp.status_code, media_type=media,
                background=BackgroundTask(resp.aclose),
            )  # fmt: skip
        try:
            data = await resp.aread()
        finally:
            await resp.aclose()
        return Response(data, resp.status_code, media_type=media)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    routes = [Route(IN_APP_PATH, chat, methods=["POST"]), *extra]
    return Starlette(routes=routes, lifespan=lifespan)


# --------------------------------------------------------------------------- relaymw


def _full_relay(upstream: str, settings: Settings) -> tuple[Any, Any]:
    """A :class:`relaymw.Relay` on :func:`full_document` with a Prometheus sink and a
    ``request_finished`` receiver connected, and the route :data:`METRICS_PATH` that shows
    what they saw. ``settings``: ``storage`` (the guards'), ``prefix`` (of the budget keys),
    ``rate_limit`` (per API key), ``metrics_retention`` (seconds)."""
    from prometheus_client import generate_latest
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from relaymw import Relay, signals
    from relaymw.sinks import PrometheusSink

    storage = settings.get("storage", REDIS_URL)
    retention = settings.get("metrics_retention")
    relay = Relay(
        full_document(
            upstream,
            storage,
            settings.get("rate_limit", RATE_LIMIT),
            int(retention) if retention else None,
        )
    )
    if (prefix := settings.get("prefix")) and relay.guard.ledger is not None:
        relay.guard.ledger.prefix = f"{prefix}:budget"  # this run's keys, removed after it
    finished = {"requests": 0}

    def count(sender: Any, **event: Any) -> None:
        finished["requests"] += 1

    signals.request_finished.connect(count, weak=False)
    # Receivers are weak: keep them alive here (a compiled Relay takes no new attributes).
    _KEPT_ALIVE.extend((PrometheusSink(), count))

    async def metrics(request: Request) -> PlainTextResponse:
        text = generate_latest().decode()
        text += f"{FINISHED} {finished['requests']}\n"
        # Python's own view of its heap: objects a leak would keep alive show here first.
        text += f"bench_allocated_blocks {sys.getallocatedblocks()}\n"
        text += f"bench_gc_objects {len(gc.get_objects())}\n"
        return PlainTextResponse(text)

    return relay, Route(METRICS_PATH, metrics)


def counters(text: str) -> dict[str, float]:
    """From :data:`METRICS_PATH`'s page: ``counted`` (requests the Prometheus sink counted),
    ``received`` (``request_finished`` events the receiver got), ``blocks`` (memory blocks
    allocated by Python) and ``objects`` (objects the garbage collector tracks)."""
    names = {
        FINISHED: "received",
        "bench_allocated_blocks": "blocks",
        "bench_gc_objects": "objects",
    }
    out = dict.fromkeys(("counted", *names.values()), 0.0)
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("relaymw_requests_total{"):
            out["counted"] += float(value)
        elif name in names:
            out[names[name]] = float(value)
    return out


def _wrapped(app: ASGIApp, relay: Any) -> ASGIApp:
    from relaymw import RelayMiddleware

    return RelayMiddleware(app, relay=relay)


def _gateway_full(upstream: str, settings: Settings) -> ASGIApp:
    relay, metrics = _full_relay(upstream, settings)
    return _wrapped(health_app([metrics]), relay)


def _passthrough_full(upstream: str, settings: Settings) -> ASGIApp:
    relay, metrics = _full_relay(upstream, settings)
    return _wrapped(echo_app([metrics]), relay)


def _in_app(upstream: str, settings: Settings) -> ASGIApp:
    relay, metrics = _full_relay(upstream, settings)
    client = relay.async_client(timeout=30.0, trust_env=False)
    return _wrapped(chat_app(upstream, client, {}, [metrics]), relay)


def _app_httpx(upstream: str, settings: Settings) -> ASGIApp:
    auth = {"authorization": f"Bearer {UPSTREAM_KEY}"}
    return chat_app(upstream, _httpx_client(), auth)


def _routing_relay(upstream: str) -> Any:
    from relaymw import Relay

    return Relay(routing_document(upstream))


# name -> factory(upstream URL, settings): every app a benchmark can start.
APPS: dict[str, Callable[[str, Settings], ASGIApp]] = {
    "bare-aiohttp": bare_aiohttp_app,
    "bare-httpx": bare_httpx_app,
    "relaymw-routing": lambda up, s: _wrapped(health_app(), _routing_relay(up)),
    "passthrough-app": lambda up, s: echo_app(),
    "passthrough-routing": lambda up, s: _wrapped(echo_app(), _routing_relay(up)),
    "gateway-full": _gateway_full,
    "passthrough-full": _passthrough_full,
    "in-app": _in_app,
    "app-httpx": _app_httpx,
}


def _report_gc(path: Path) -> None:
    """Time every collection by generation; on SIGUSR1 write the totals (JSON) to ``path``."""
    totals = {"collections": [0, 0, 0], "seconds": [0.0, 0.0, 0.0]}
    started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            generation = info["generation"]
            totals["collections"][generation] += 1
            totals["seconds"][generation] += time.perf_counter() - started[0]

    def report(signum: int, frame: Any) -> None:
        partial = path.with_suffix(".partial")  # renamed whole: the reader never sees half
        partial.write_text(json.dumps({**totals, "tracked": len(gc.get_objects())}))
        partial.replace(path)

    gc.callbacks.append(on_gc)
    signal.signal(signal.SIGUSR1, report)


def serve(name: str, port: int, upstream: str, settings: Settings) -> None:
    """Serve FakeLLM (``fakellm``) or one of :data:`APPS` until terminated."""
    loop, http = machine.loop_settings()
    if name == "fakellm":
        if loop == "uvloop":
            import uvloop

            # FakeLLM builds its loop with asyncio.new_event_loop(): the policy makes it uvloop.
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        from relaymw.testing import main as fakellm

        raise SystemExit(fakellm(["--port", str(port), "--chunks", str(CHUNKS)]))
    import uvicorn

    app = APPS[name](upstream, settings)
    if settings.get("gc_freeze"):
        # What a prefork server's user may do: what is loaded by now is never traversed by
        # the cyclic GC again (bench/gc_cost.py measures what a full collection costs).
        gc.collect()
        gc.freeze()
    if settings.get("gc_report"):
        _report_gc(Path(settings["gc_report"]) / f"{name}.json")
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop=loop,
        http=http,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python bench/servers.py")
    parser.add_argument("name", choices=["fakellm", *APPS])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", default="")
    parser.add_argument("--cpu", type=int, default=None)
    parser.add_argument("--nice", type=int, default=0)
    parser.add_argument("--settings", type=json.loads, default={})
    args = parser.parse_args(argv)
    machine.pin(args.cpu, args.nice)
    machine.die_with_parent()
    serve(args.name, args.port, args.upstream, args.settings)


if __name__ == "__main__":
    main(sys.argv[1:])
