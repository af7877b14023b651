"""``relaymw demo``: a whole gray release in under a minute, on this machine alone.

A FakeLLM plays the provider; an app with the middleware serves it on the embedded default
configuration (copied to a temp file store, so every weight change goes through the store
and its hot reload); simulated API users, each with a stable ``x-user-id``, call the gateway
while the rollout controller (:mod:`relaymw.rollout`, as ``relaymw rollout`` runs it) ramps
the canary 5 → 25 → 50 → 100 %, analysing each stage before the next. A live table shows
each version's traffic, error rate, latency and cost; the summary checks that users who had
the canary kept it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import shutil
import statistics
import tempfile
import threading
from collections import defaultdict
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import aiohttp
import attrs
from starlette.requests import Request  # here: FastAPI resolves annotations in our globals
from starlette.responses import JSONResponse, Response

from relaymw import signals
from relaymw.control import RelayControl
from relaymw.engine import Relay, default_config_path
from relaymw.rollout import Analysis, Criteria, Plan, Reporter, RolloutController, RolloutState
from relaymw.routing import BASIS_POINTS, bucket
from relaymw.serve import local_upstream
from relaymw.stores import FileStore

__all__ = ["run_demo"]

ALIAS = "chat-production"
STABLE, CANARY = "gpt-4.1-v1", "gpt-4.1-v2"
STAGES = (5.0, 25.0, 50.0, 100.0)
# A stage is judged on at least 8 canary requests: the canary fails 1% of its calls, and on
# two or three requests one such failure would read as an error rate above the limit.
DEMO_CRITERIA = Criteria(max_error_rate=0.25, min_requests=8)
MIN_USERS = 20  # users spread evenly over the hash space: 20 puts one on a 5% canary


def user_ids(count: int, alias: str = ALIAS) -> list[str]:
    """``count`` (at most 10,000) user ids whose sticky buckets fall one in each of ``count``
    equal slices, so a stage at w% reaches about w% of the users (never none of them, once
    ``count`` >= :data:`MIN_USERS`), as real users' keys would with many more of them."""
    slots: dict[int, str] = {}
    names = (f"user-{i}" for i in itertools.count())
    while len(slots) < count:
        name = next(names)
        slots.setdefault((bucket(alias, name) - 1) * count // BASIS_POINTS, name)
    return [slots[k] for k in range(count)]


@attrs.define
class VersionStats:
    requests: int = 0
    errors: int = 0
    latencies: list[float] = attrs.Factory(list)
    cost: Decimal = Decimal(0)

    def row(self) -> tuple[str, str, str, str, str]:
        lat = sorted(self.latencies) or [0.0]
        p50 = statistics.median(lat)
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        rate = self.errors / self.requests if self.requests else 0.0
        return (
            str(self.requests),
            f"{rate:.1%}",
            f"{p50:.0f} ms",
            f"{p99:.0f} ms",
            f"${self.cost:.4f}",
        )


class Collector:
    """Per-stage, per-version figures from ``request_finished``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stage = 0
        self.stats: dict[int, dict[str, VersionStats]] = defaultdict(
            lambda: defaultdict(VersionStats)
        )

    def __call__(self, sender: Any, **event: Any) -> None:
        if event["route"] != ALIAS:
            return
        with self.lock:
            s = self.stats[self.stage][event["version"]]
            s.requests += 1
            s.errors += event["error"] is not None
            s.latencies.append(event["latency_ms"])
            s.cost += event["cost_usd"]


async def _user(
    session: aiohttp.ClientSession,
    base: str,
    user: str,
    seen: dict[str, list[str]],
    stop: asyncio.Event,
) -> None:
    """Half the calls go to the gateway, half to the app's own endpoint (in-app mode)."""
    body = {"model": ALIAS, "messages": [{"role": "user", "content": f"review {user}'s diff"}]}
    paths = itertools.cycle(("/v1/chat/completions", "/api/chat"))
    while not stop.is_set():
        try:
            url = base + next(paths)
            async with session.post(url, json=body, headers={"x-user-id": user}) as r:
                await r.read()
                if "x-relaymw-version" in r.headers:
                    seen[user].append(r.headers["x-relaymw-version"])
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(random.uniform(0.05, 0.25))


def _table(collector: Collector, weights: dict[str, float], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for col in ("version", "weight", "requests", "error rate", "p50", "p99", "cost"):
        table.add_column(col, justify="right" if col != "version" else "left")
    with collector.lock:
        stats = collector.stats[collector.stage]
        for tag in (STABLE, CANARY):
            table.add_row(tag, f"{weights.get(tag, 0):g}%", *stats[tag].row())
    return table


class DemoReporter(Reporter):
    """Follows the controller: each stage's figures in the collector, one line per stage
    (with whether the users who had the canary kept it), and the table's title."""

    def __init__(self, collector: Collector, seen: dict[str, list[str]], live: bool) -> None:
        self.collector, self.seen, self.live = collector, seen, live
        self.lines: list[str] = []
        self.weights: dict[str, float] = {}
        self.title = f"relaymw demo: {ALIAS}"
        self._canary_users: set[str] = set()
        self._weight = 0.0

    def stage_started(self, state: RolloutState, weights: Mapping[str, float]) -> None:
        with self.collector.lock:
            self.collector.stage = state.stage_index
        self.weights, self._weight = dict(weights), state.weight
        self.title = f"relaymw demo: {ALIAS}, canary {CANARY} at {state.weight:g}%"

    def analysed(self, state: RolloutState, analysis: Analysis) -> None:
        if analysis.outcome == "pass":
            self._stage_line("analysis passed: " + "; ".join(analysis.reasons))
        else:
            self.title = f"{self.title.split(' (')[0]} (holding)"

    def finished(self, state: RolloutState, analysis: Analysis | None) -> None:
        if state.status != "succeeded":
            self._stage_line(f"rollout {state.status}: {state.reason}")

    def _stage_line(self, verdict: str) -> None:
        now_on_canary = {u for u, v in self.seen.items() if v and v[-1] == CANARY}
        kept = len(self._canary_users & now_on_canary)
        c = self.collector
        with c.lock:
            got = c.stats[c.stage]
            total = sum(s.requests for s in got.values()) or 1
            share = got[CANARY].requests / total
            errors = sum(s.errors for s in got.values())
            cost = sum((s.cost for s in got.values()), Decimal(0))
        self.lines.append(
            f"stage {self._weight:>3g}%: {total:5d} requests, canary share {share:6.1%}, "
            f"errors {errors}, cost ${cost:.4f}, canary users kept "
            f"{kept}/{len(self._canary_users)}; {verdict}"
        )
        if not self.live:
            print(self.lines[-1], flush=True)
        self._canary_users = now_on_canary


async def _run_rollout(controller: RolloutController) -> None:
    """The controller's steps on this event loop, so the simulated users keep going."""
    while True:
        delay = controller.step()
        if delay is None:
            return
        await asyncio.sleep(delay)


async def _drive(relay: Relay, url: str, users: int, stage_seconds: float, live: bool) -> str:
    collector = Collector()
    signals.request_finished.connect(collector)
    seen: dict[str, list[str]] = defaultdict(list)
    stop = asyncio.Event()
    session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
    tasks = [asyncio.ensure_future(_user(session, url, u, seen, stop)) for u in user_ids(users)]
    reporter = DemoReporter(collector, seen, live)
    plan = Plan(ALIAS, CANARY, STAGES, stage_seconds, DEMO_CRITERIA)
    controller = RolloutController(RelayControl(relay), plan, reporter, reset=True)
    try:
        controller.start()
        if live:
            from rich.live import Live

            def view() -> Any:
                return _table(collector, reporter.weights, reporter.title)

            with Live(get_renderable=view, refresh_per_second=4):
                await _run_rollout(controller)
        else:
            await _run_rollout(controller)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()
        signals.request_finished.disconnect(collector)
    return "\n".join(reporter.lines)


def run_demo(users: int = 40, stage_seconds: float = 10.0, live: bool | None = None) -> str:
    """Run the demo and return its summary (also printed)."""
    from relaymw.testing import serve_asgi

    if not MIN_USERS <= users <= BASIS_POINTS:
        raise ValueError(f"the demo takes {MIN_USERS} to {BASIS_POINTS} users, got {users}")
    if live is None:
        live = _rich_available() and os.isatty(1)
    with local_upstream() as fake, tempfile.TemporaryDirectory() as tmp:
        # The canary is a little slower and flakier, so the table has something to show.
        fake.set("gpt-4.1", latency_ms=20, chunk_delay_ms=2)
        fake.set("gpt-4.1-mini", latency_ms=35, chunk_delay_ms=2, error_rate=0.01, status=503)
        path = os.path.join(tmp, "relay.toml")
        shutil.copyfile(default_config_path(), path)
        with open(path, "a") as f:
            # A stage's figures are counted in whole metric buckets: short stages want
            # short buckets, or each stage's analysis would include the one before.
            f.write("\n[metrics]\nbucket_seconds = 1\n")
        relay = Relay.from_store(FileStore(path, poll_interval=0.1))
        try:
            with serve_asgi(demo_app(relay)) as url:
                print(
                    f"relaymw demo: gateway at {url}/v1, FakeLLM at {fake.base_url}, "
                    f"{users} users, config store {path}",
                    flush=True,
                )
                summary = asyncio.run(_drive(relay, url, users, stage_seconds, live))
        finally:
            relay.close()
    if live:
        print("\nSummary\n" + summary, flush=True)
    return summary


def demo_app(relay: Relay) -> Any:
    """A FastAPI app with the middleware and one in-app endpoint that calls the LLM."""
    from fastapi import FastAPI

    from relaymw import RelayMiddleware, current_version

    app = FastAPI()
    client = relay.async_client()

    @app.post("/api/chat")
    async def chat(request: Request) -> Response:
        body = await request.json()
        # The handler names the alias; the transport sends it to the version chosen for
        # this request, which the middleware picked before the handler ran.
        r = await client.post("http://llm/v1/chat/completions", json=body)
        if r.status_code != 200:  # the canary's 1% of 503s: passed on as is, unparsed
            return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))
        answer = r.json()["choices"][0]["message"]["content"]
        return JSONResponse({"version": str(current_version()), "answer": answer})

    app.add_middleware(RelayMiddleware, relay=relay)
    return app


def _rich_available() -> bool:
    try:
        import rich  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True
