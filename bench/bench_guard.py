"""Request-path cost of rate limits + cost cap + budget, against the same relay with them off.

One "request" is what relaymw does around the upstream call in gateway mode: decide (parse,
route, choose, rewrite, cost cap), admit (rate limits, budget reservation), record
(usage -> cost -> signal) and settle (token count, reconcile). The upstream itself is left
out, so the figures are relaymw's own CPU and storage round trips. Three configurations —
guards off, on with ``memory://`` storage, on with Redis — are measured interleaved in the
same run, one request at a time (c=1: every round trip is waited for) and 16 at a time
(c=16, as a server under load: round trips overlap and share writes). Each request uses one
of 64 API keys, so the limits and budgets see several identities.

Redis is a private ``redis-server`` on a free port when one is on PATH (so the command and
round-trip counts are this benchmark's alone), else 127.0.0.1:6379, else skipped. Per
request it reports the scripts Redis ran (every call the guard makes is an EVALSHA) and the
reads it served (``INFO``: one per write from the client, so the round trips), counted over
a separate pass.

    python bench/run.py guard
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson

from relaymw import Relay
from relaymw.engine import Exchange
from relaymw.protocols import Usage
from relaymw.snapshot import RawHeaders, RequestView

SHARED_REDIS = "redis://127.0.0.1:6379/0"
BATCH, BATCHES, COUNTED = 320, 11, 640  # requests per timed batch, batches, counted requests
CONCURRENCY = (1, 16)
BODY = orjson.dumps(
    {"model": "chat", "messages": [{"role": "user", "content": "review this diff " * 20}]}
)
HEADERS = [
    RawHeaders([(b"authorization", b"Bearer sk-user-%d" % i), (b"content-type", b"json")])
    for i in range(64)
]


def document(storage: str | None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "upstreams": {"u": {"base_url": "http://127.0.0.1:9/v1", "api_key": "k"}},
        "versions": [
            {"version_tag": "v1", "model": "gpt-4.1", "upstream_endpoint": "u"},
            {"version_tag": "v2", "model": "gpt-4.1-mini", "upstream_endpoint": "u"},
        ],
        "routes": [
            {
                "model_alias": "chat",
                "route_rules": [
                    {"version_tag": "v1", "weight": 95},
                    {"version_tag": "v2", "weight": 5},
                ],
                "sticky_sessions": {"enabled": False},
            }
        ],
    }
    if storage is not None:
        route = doc["routes"][0]
        # Generous limits: every request is admitted, so the benchmark measures the checks.
        route.update(
            rate_limits=["1000000/minute"],
            token_limits=["1000000000/minute"],
            cost_limit_per_request=1.0,
        )
        doc["rate_limiting"] = {"storage_uri": storage, "identity": "api_key"}
        doc["budgets"] = [{"scope": "route:chat", "period": "month", "limit_usd": 1_000_000}]
        doc["budgeting"] = {"storage_uri": storage}
    return doc


async def one(relay: Relay, user: int) -> None:
    snapshot = relay.snapshot
    endpoint = snapshot.gateway["/v1/chat/completions"]
    exchange = Exchange(relay, "gateway", endpoint)
    request = RequestView(HEADERS[user % len(HEADERS)], "127.0.0.1", "http")
    call = relay.prepare_gateway(snapshot, endpoint, BODY, request, exchange)
    assert call is not None
    if exchange.admission is not None:
        await relay.guard.aadmit(exchange.admission, request)
    exchange.finish(200, Usage(prompt_tokens=120, completion_tokens=60))
    await relay.asettle(exchange)


async def run(relay: Relay, concurrency: int, count: int) -> None:
    """``count`` requests, ``concurrency`` at a time."""

    async def worker(first: int) -> None:
        for user in range(first, count, concurrency):
            await one(relay, user)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))


Results = dict[tuple[str, int], list[tuple[float, float]]]  # (wall, cpu) µs per request


async def measure(relays: dict[str, Relay]) -> Results:
    results: Results = {(name, c): [] for name in relays for c in CONCURRENCY}
    for relay in relays.values():  # warm-up: connections, caches
        for c in CONCURRENCY:
            await run(relay, c, BATCH)
    for _ in range(BATCHES):
        for c in CONCURRENCY:
            for name, relay in relays.items():  # interleaved, so drift hits all alike
                wall, cpu = time.perf_counter(), time.process_time()
                await run(relay, c, BATCH)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                results[name, c].append((wall / BATCH * 1e6, cpu / BATCH * 1e6))
    return results


def redis_stats(client: Any) -> tuple[int, int]:
    """(scripts run, reads served) so far; each call is one more read."""
    commands: dict[str, Any] = client.info("commandstats")
    scripts = sum(
        commands.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval")
    )
    return scripts, int(client.info("stats")["total_reads_processed"])


async def count_round_trips(relay: Relay, url: str) -> dict[int, tuple[float, float]]:
    """Scripts and reads (round trips) per request at each concurrency."""
    import redis

    counts = {}
    with redis.Redis.from_url(url) as client:
        for c in CONCURRENCY:
            before = redis_stats(client)
            await run(relay, c, COUNTED)
            after = redis_stats(client)
            scripts, reads = after[0] - before[0], after[1] - before[1] - 2  # 2 INFO calls
            counts[c] = (scripts / COUNTED, reads / COUNTED)
    return counts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def redis_server() -> Iterator[str | None]:
    """A private redis-server's URL, else the shared one's if it answers, else None."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        try:
            redis.Redis.from_url(SHARED_REDIS, socket_connect_timeout=0.5).ping()
        except redis.RedisError:
            yield None
        else:
            yield SHARED_REDIS
        return
    port = _free_port()
    with tempfile.TemporaryDirectory() as workdir:
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", workdir]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    redis.Redis.from_url(url).ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            yield url
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    with redis_server() as url:
        configs: dict[str, str | None] = {"off": None, "memory": "memory://"}
        if url is not None:
            configs["redis"] = url
        relays = {name: Relay(document(storage)) for name, storage in configs.items()}
        if "redis" in relays:  # a fresh key space, so earlier runs' counters don't matter
            ledger = relays["redis"].guard.ledger
            assert ledger is not None
            ledger.prefix = f"relaymw-bench:{uuid.uuid4().hex[:8]}"

        async def session() -> tuple[Results, dict[int, tuple[float, float]]]:
            try:
                results = await measure(relays)
                counts = await count_round_trips(relays["redis"], url) if url else {}
                return results, counts
            finally:
                for relay in relays.values():
                    await relay.aclose()

        results, counts = asyncio.run(session())
        for relay in relays.values():
            relay.close()
    report(results, counts)


def report(results: Results, counts: dict[int, tuple[float, float]]) -> None:
    labels = {
        "off": "guards off (routing + rewrite + record)",
        "memory": "limits + cap + budget, memory://",
        "redis": "limits + cap + budget, Redis",
    }
    print(
        f"{'configuration':<40} {'c':>3} {'wall µs':>8} {'CPU µs':>7} {'CPU ratio':>9} "
        f"{'+CPU µs':>8} {'scripts':>7} {'trips':>6}"
    )
    for c in CONCURRENCY:
        base = statistics.median(cpu for _, cpu in results["off", c])
        for name, label in labels.items():
            if (name, c) not in results:
                continue
            wall = statistics.median(w for w, _ in results[name, c])
            cpu = statistics.median(u for _, u in results[name, c])
            scripts, trips = ("", "")
            if name == "redis" and c in counts:
                scripts, trips = (f"{n:.2f}" for n in counts[c])
            print(
                f"{label:<40} {c:>3} {wall:>8.1f} {cpu:>7.1f} {cpu / base:>9.2f} "
                f"{cpu - base:>8.1f} {scripts:>7} {trips:>6}"
            )
    if not any(name == "redis" for name, _ in results):
        print("(no Redis: the Redis rows were skipped)")
    print("scripts, trips: EVALSHA calls and reads Redis served (round trips) per request")


if __name__ == "__main__":
    main()
