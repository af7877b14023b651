"""The gateway of the disconnect test, run by uvicorn in a process of its own:
``uvicorn tests.faults.stream_gateway_app:app`` with ``RELAYMW_FAULTS_CONFIG`` naming a JSON
configuration file.

``GET /_faults/stats`` answers what only this process can see: the ``request_finished``
events so far (by status and error), the versions' request and error counts, and the asyncio
tasks alive besides the one answering."""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from relaymw import Relay, RelayMiddleware, signals
from tests.faults.harness import CONFIG_ENV, STATS_PATH

relay = Relay(json.loads(Path(os.environ[CONFIG_ENV]).read_text()))
finished: Counter[str] = Counter()


def _count(sender: Any, **event: Any) -> None:
    finished[f"{event['status']} {event['error']}"] += 1


signals.request_finished.connect(_count, weak=False)


def _describe(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    return getattr(coro, "__qualname__", None) or repr(coro)


def stats() -> dict[str, Any]:
    current = asyncio.current_task()
    metrics = {}
    for route in relay.snapshot.routes.values():
        for rule in route.route.route_rules:
            m = relay.metrics(rule.version_tag, route=route.route.model_alias)
            metrics[rule.version_tag] = {"requests": m.request_count, "errors": m.error_count}
    return {
        "finished": dict(finished),
        "metrics": metrics,
        "tasks": sorted(_describe(t) for t in asyncio.all_tasks() if t is not current),
    }


async def inner(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == STATS_PATH:
        body = json.dumps(stats()).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


app = RelayMiddleware(inner, relay=relay)
