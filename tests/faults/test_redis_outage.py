"""Redis stopped and restarted under load: the configuration (a RedisStore), the rate limits
and the budgets all live in a private ``redis-server`` that the test kills and starts again
while four clients keep sending OpenAI and Anthropic requests through a uvicorn gateway.

What must hold: limits fail open (every request served) or closed (503
``rate_limit_storage_unavailable`` in the client's protocol shape) as configured, and nothing
else fails; the relay keeps its last-known-good configuration; within 5 s of Redis coming
back the limits, the budgets and the configuration are in Redis again (seen in Redis itself).
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from relaymw import Relay, RelayMiddleware
from relaymw.stores.redis import RedisStore
from relaymw.testing import FakeLLM, serve_asgi
from tests.faults.harness import (
    PROTOCOLS,
    Load,
    assert_error_shape,
    gateway_document,
    not_found,
    request_body,
    wait_until,
    with_chat_weights,
)
from tests.support import Recorder, RedisServer

OUTAGE_S = 2.0
RECOVERY_S = 5.0
PER_IDENTITY = 5  # requests per minute per identity: only the probe identity ever reaches it
KEY = "relaymw:config"


def outage_document(fake_url: str, redis_url: str, fail_open: bool) -> dict[str, Any]:
    doc = gateway_document(fake_url, chat=(50, 50))
    for route in doc["routes"]:
        route["rate_limits"] = [f"{PER_IDENTITY}/minute"]
    doc["rate_limiting"] = {
        "storage_uri": redis_url,
        "identity": "header:x-user-id",
        "fail_open": fail_open,
        "recovery_probe_seconds": 0.25,
    }
    doc["budgets"] = [{"scope": "global", "period": "month", "limit_usd": 1000}]
    doc["budgeting"] = {"storage_uri": redis_url, "fail_open": True}
    return doc


def post(url: str, protocol: str, identity: str) -> httpx.Response:
    path = PROTOCOLS[protocol][0]
    return httpx.post(
        url + path, json=request_body(protocol), headers={"x-user-id": identity}, timeout=10
    )


def budget_spent(redis_server: RedisServer) -> int:
    with redis_server.client() as client:
        return sum(int(client.hget(k, "spent") or 0) for k in client.keys("relaymw:budget:*"))


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
def test_redis_stopped_and_restarted_under_load(
    fail_open: bool,
    private_redis: RedisServer,
    fake_llm: FakeLLM,
    events: dict[str, Recorder],
) -> None:
    store_uri = f"{private_redis.url}?key={KEY}&poll_interval=0.5"
    doc = outage_document(fake_llm.base_url, private_redis.url, fail_open)
    seeding = RedisStore(store_uri)
    seeding.save(doc)
    seeding.close()
    relay = Relay.from_store(store_uri)
    known_good = relay.snapshot.revision
    try:
        with serve_asgi(RelayMiddleware(not_found, relay=relay)) as url, Load(url) as load:
            wait_until(lambda: load.count() >= 40, 20, "warm-up traffic")
            assert private_redis.keys("relaymw:limits*load-*"), "limits are not kept in Redis"
            spent_before = budget_spent(private_redis)
            assert spent_before > 0, "budgets are not kept in Redis"

            killed_at = time.monotonic()
            private_redis.kill()
            time.sleep(OUTAGE_S)
            probes = [post(url, "openai", "probe-identity") for _ in range(PER_IDENTITY + 2)]
            assert relay.snapshot.revision == known_good  # the last-known-good stays

            back_at = time.monotonic()
            private_redis.start()
            # Limits return to Redis: a new identity's counter shows up there.
            n = 0

            def limits_in_redis() -> bool:
                nonlocal n
                n += 1
                post(url, "openai", f"recovery-{n}")
                return bool(private_redis.keys("relaymw:limits*recovery-*"))

            limits_back = wait_until(limits_in_redis, RECOVERY_S, "limits in Redis again")
            budgets_back = wait_until(
                lambda: budget_spent(private_redis) > spent_before,
                RECOVERY_S - (time.monotonic() - back_at),
                "budgets in Redis again",
            )
            # A change written after the restart reaches the relay: its store is back too.
            writer = RedisStore(store_uri)
            revision = writer.save(with_chat_weights(doc, 0, 100))
            writer.close()
            config_back = wait_until(
                lambda: relay.snapshot.revision == revision,
                RECOVERY_S - (time.monotonic() - back_at),
                "the configuration store in use again",
            )
            recovered_at = time.monotonic()
            served = post(url, "openai", "after-recovery")
            assert served.status_code == 200 and served.headers["x-relaymw-version"] == "gpt-v2"
            time.sleep(0.3)
        outcomes = load.stop()
    finally:
        relay.close()
    print(
        f"\n{len(outcomes)} requests; after Redis came back: limits in Redis in "
        f"{limits_back:.2f} s, then budgets in {budgets_back:.2f} s, then a config change "
        f"served {config_back:.2f} s after it was written ({recovered_at - back_at:.2f} s "
        "after the restart)"
    )

    statuses = {o.status for o in outcomes}
    during = [o for o in outcomes if o.sent >= killed_at + 0.1 and o.done <= back_at]
    assert len(during) >= 10, "the load did not run through the outage"
    assert {o.protocol for o in during} == {"openai", "anthropic"}
    after = [o for o in outcomes if o.sent >= recovered_at]
    assert after and all(o.status == 200 for o in after)

    unavailable = [e["component"] for e in events["store_unavailable"].events]
    assert len(unavailable) == len(set(unavailable))  # once per outage each
    if fail_open:
        assert set(unavailable) == {"budgets", "config", "rate_limits"}
    else:  # refused by the limits first, a request may never ask the budget store in time
        assert {"config", "rate_limits"} <= set(unavailable) <= {"budgets", "config", "rate_limits"}
    assert events["config_rejected"].events == []

    if fail_open:
        assert statuses == {200}, [(o.status, o.body) for o in outcomes if o.status != 200]
        # The in-memory fallback still limits: the probe identity got its 5, then 429s.
        assert [r.status_code for r in probes] == [200] * PER_IDENTITY + [429] * 2
        assert probes[-1].json()["error"]["code"] == "rate_limited"
    else:
        assert statuses <= {200, 503}, [(o.status, o.body) for o in outcomes]
        assert all(o.status == 503 for o in during)
        for o in outcomes:
            if o.status == 503:
                assert_error_shape(o.protocol, 503, o.body, "rate_limit_storage_unavailable")
                assert o.sent >= killed_at - 0.1 and o.done <= recovered_at
        assert {r.status_code for r in probes} == {503}
        assert 1 <= int(probes[0].headers["retry-after"]) <= 2
        assert_error_shape("openai", 503, probes[0].json(), "rate_limit_storage_unavailable")


def test_fail_closed_refusals_are_not_errors_of_a_version(
    private_redis: RedisServer, fake_llm: FakeLLM, events: dict[str, Recorder]
) -> None:
    """A 503 because the limit storage is down is relaymw refusing, not the version failing:
    it must neither count in the version's error rate nor get a healthy version ejected."""
    doc = outage_document(fake_llm.base_url, private_redis.url, fail_open=False)
    doc["routes"][0]["health_check"] = {
        "enabled": True,
        "error_rate_threshold": 0.2,
        "min_requests": 5,
        "window_seconds": 60,
    }
    relay = Relay(doc)
    try:
        with serve_asgi(RelayMiddleware(not_found, relay=relay)) as url:
            assert {post(url, "openai", f"ok-{i}").status_code for i in range(4)} == {200}
            private_redis.kill()
            refused = [post(url, "openai", f"down-{i}").status_code for i in range(20)]
            assert set(refused) == {503}
            time.sleep(1.5)  # three health evaluations (every 0.5 s)
        for tag in ("gpt-v1", "gpt-v2"):
            assert relay.metrics(tag, route="chat-production").error_count == 0, tag
        assert events["version_ejected"].events == []
        assert relay.snapshot.ejected == {}
    finally:
        relay.close()
