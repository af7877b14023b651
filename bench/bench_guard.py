"""Request-path overhead of rate limits + cost cap + budget, against the same relay with them off.

One "request" is what relaymw does around the upstream call in gateway mode: decide (parse,
route, choose, rewrite, cost cap), admit (rate limits, budget reservation), record
(usage -> cost -> signal) and settle (token count, reconcile). The upstream itself is left
out, so the figures are relaymw's own CPU and storage round trips. Three configurations are
measured interleaved in the same run: guards off, on with ``memory://`` storage, and on with
Redis (skipped when no Redis answers on 127.0.0.1:6379).

    python bench/run.py guard
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from typing import Any

import orjson

from relaymw import Relay
from relaymw.engine import Exchange
from relaymw.protocols import Usage
from relaymw.snapshot import RawHeaders, RequestView

REDIS = "redis://127.0.0.1:6379/0"
BATCH, BATCHES = 200, 15
BODY = orjson.dumps(
    {"model": "chat", "messages": [{"role": "user", "content": "review this diff " * 20}]}
)
HEADERS = RawHeaders(
    [(b"authorization", b"Bearer sk-user-1"), (b"content-type", b"application/json")]
)


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


async def one(relay: Relay) -> None:
    snapshot = relay.snapshot
    endpoint = snapshot.gateway["/v1/chat/completions"]
    exchange = Exchange(relay, "gateway", endpoint)
    request = RequestView(HEADERS, "127.0.0.1", "http")
    call = relay.prepare_gateway(snapshot, endpoint, BODY, request, exchange)
    assert call is not None
    if exchange.admission is not None:
        await relay.guard.aadmit(exchange.admission, request)
    exchange.finish(200, Usage(prompt_tokens=120, completion_tokens=60))
    await relay.asettle(exchange)


async def measure(relays: dict[str, Relay]) -> dict[str, list[float]]:
    per_call: dict[str, list[float]] = {name: [] for name in relays}
    for relay in relays.values():  # warm-up: connections, caches
        for _ in range(200):
            await one(relay)
    for _ in range(BATCHES):
        for name, relay in relays.items():  # interleaved, so drift hits all alike
            start = time.perf_counter_ns()
            for _ in range(BATCH):
                await one(relay)
            per_call[name].append((time.perf_counter_ns() - start) / BATCH / 1000)
    return per_call


def redis_available() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS, socket_connect_timeout=0.5).ping())
    except Exception:
        return False


def main() -> None:
    configs: dict[str, str | None] = {"off": None, "memory": "memory://"}
    if redis_available():
        configs["redis"] = REDIS
    relays = {name: Relay(document(storage)) for name, storage in configs.items()}
    if "redis" in relays:  # a fresh key space, so earlier runs' counters don't matter
        ledger = relays["redis"].guard.ledger
        assert ledger is not None
        ledger.prefix = f"relaymw-bench:{uuid.uuid4().hex[:8]}"

    async def run() -> dict[str, list[float]]:
        try:
            return await measure(relays)
        finally:
            for relay in relays.values():
                await relay.aclose()

    results = asyncio.run(run())
    base = statistics.median(results["off"])
    print(
        f"{'configuration':<34} {'median µs/request':>18} {'p90':>8} {'ratio':>7} {'added µs':>9}"
    )
    labels = {
        "off": "guards off (routing + rewrite + record)",
        "memory": "limits + cap + budget, memory://",
        "redis": "limits + cap + budget, Redis",
    }
    for name, values in results.items():
        med = statistics.median(values)
        p90 = sorted(values)[int(len(values) * 0.9) - 1]
        print(f"{labels[name]:<34} {med:>18.1f} {p90:>8.1f} {med / base:>7.2f} {med - base:>9.1f}")
    if "redis" not in results:
        print("(no Redis on 127.0.0.1:6379: the Redis row was skipped)")
    for relay in relays.values():
        relay.close()


if __name__ == "__main__":
    main()
