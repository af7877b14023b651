"""Cost caps, rate limits and budgets through the middleware, with the official SDKs."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import pytest
import redis

from relaymw import Relay, RelayMiddleware
from relaymw.budgets import identity_scope
from relaymw.testing import FakeLLM, serve_asgi
from tests.support import Recorder, RedisServer, not_found, recording, relay_document


def serve(doc: dict[str, Any]) -> Any:
    relay = Relay(doc)
    return relay, serve_asgi(RelayMiddleware(not_found, relay=relay))


def chat_route(doc: dict[str, Any], **changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    route = doc["routes"][0]
    route["route_rules"] = [{"version_tag": "gpt-v1", "weight": 100}]
    route.update(changes)
    return doc


@pytest.fixture
def cost_events() -> Iterator[Recorder]:
    from relaymw import signals

    with recording(signals.cost_limit_exceeded) as rec:
        yield rec


def test_clamp_lowers_max_tokens_to_fit_the_cap(fake_llm: FakeLLM, cost_events: Recorder) -> None:
    # gpt-4.1: $2/M in, $8/M out. A $0.001 cap leaves room for about 120 output tokens.
    doc = chat_route(relay_document(fake_llm.base_url), cost_limit_per_request=0.001)
    relay, server = serve(doc)
    with server as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        client.chat.completions.create(
            model="chat-production", messages=[{"role": "user", "content": "hi"}], max_tokens=256
        )
    sent = fake_llm.requests[-1].body
    assert sent is not None
    assert 0 < sent["max_tokens"] < 256
    worst = Decimal(sent["max_tokens"]) * Decimal(8) / 1_000_000
    assert worst <= Decimal("0.001")
    assert cost_events.events[-1]["action"] == "clamp"
    relay.close()


def test_reject_policy_answers_400_in_each_protocol(fake_llm: FakeLLM) -> None:
    doc = relay_document(fake_llm.base_url)
    for route in doc["routes"]:
        route["cost_policy"] = "reject"
        route["cost_limit_per_request"] = 0.0001
    relay, server = serve(doc)
    with server as url:
        with pytest.raises(openai.BadRequestError) as oai_err:
            openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0).chat.completions.create(
                model="chat-production", messages=[{"role": "user", "content": "x"}]
            )
        body = oai_err.value.body
        assert isinstance(body, dict) and body["code"] == "cost_limit_exceeded"
        assert "exceeds the per-request limit $0.0001 by $" in body["message"]
        with pytest.raises(anthropic.BadRequestError) as ant_err:
            anthropic.Anthropic(base_url=url, api_key="k", max_retries=0).messages.create(
                model="review-production",
                max_tokens=100,
                messages=[{"role": "user", "content": "x"}],
            )
        assert ant_err.value.body["error"]["code"] == "cost_limit_exceeded"  # type: ignore[index]
    relay.close()


def test_a_stream_passing_the_cap_is_ended_cleanly(
    fake_llm: FakeLLM, cost_events: Recorder, finished: Recorder
) -> None:
    # The version caps max_tokens at 256, which fits the cap; FakeLLM streams far more words
    # than the cap pays for, so relaymw must end the stream itself.
    doc = chat_route(relay_document(fake_llm.base_url), cost_limit_per_request=0.0005)
    fake_llm.set("*", chunks=400)
    relay, server = serve(doc)
    with server as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        chunks = list(
            client.chat.completions.create(
                model="chat-production",
                messages=[{"role": "user", "content": "x"}],
                max_tokens=10_000,
                stream=True,
            )
        )
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    assert len(chunks) < 400
    assert cost_events.wait_for(2)[-1]["action"] == "cut_stream"
    event = finished.wait_for(1)[0]
    assert event["error"] is None and event["usage_estimated"] is True
    assert event["cost_usd"] <= Decimal("0.0005") * 2  # conservative count: cut early, not late
    relay.close()


def test_rate_limits_answer_429_with_retry_after_and_headers(fake_llm: FakeLLM) -> None:
    doc = chat_route(relay_document(fake_llm.base_url), rate_limits=["3/minute"])
    doc["rate_limiting"] = {"identity": "api_key"}
    relay, server = serve(doc)
    with server as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="user-key-1", max_retries=0)
        for remaining in (2, 1, 0):
            raw = client.chat.completions.with_raw_response.create(
                model="chat-production", messages=[{"role": "user", "content": "x"}]
            )
            assert raw.headers["ratelimit-limit"] == "3"
            assert raw.headers["ratelimit-remaining"] == str(remaining)
            assert raw.headers["x-ratelimit-remaining"] == str(remaining)
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(
                model="chat-production", messages=[{"role": "user", "content": "x"}]
            )
        retry_after = int(info.value.response.headers["retry-after"])
        assert 1 <= retry_after <= 60
        assert info.value.response.headers["ratelimit-remaining"] == "0"
        assert "user-key-1" not in info.value.response.text
        # Another identity has its own window.
        other = openai.OpenAI(base_url=f"{url}/v1", api_key="user-key-2", max_retries=0)
        other.chat.completions.create(
            model="chat-production", messages=[{"role": "user", "content": "x"}]
        )
    relay.close()


def test_budget_holds_under_200_concurrent_requests_on_redis(
    fake_llm: FakeLLM, redis_url: str, redis_prefix: str, finished: Recorder
) -> None:
    """A $0.01 monthly budget, 200 concurrent requests whose worst case is ~$0.00033 each.

    Why the bound holds: each request reserves its worst case (prompt estimate x input price +
    max_tokens x output price) in one atomic Lua step that checks spent + reserved + amount
    against the limit for every budget; the actual cost, read from the upstream's usage, is
    never above the worst case, and reconciling swaps the reservation for it. So spent +
    reserved <= limit at every moment, and spent <= limit once all have settled."""
    doc = chat_route(relay_document(fake_llm.base_url))
    doc["versions"][0]["parameters"]["max_tokens"] = 40
    doc["budgets"] = [{"scope": "route:chat-production", "period": "month", "limit_usd": 0.01}]
    doc["budgeting"] = {"storage_uri": redis_url}
    fake_llm.set("*", latency_ms=20)
    relay, server = serve(doc)
    relay.guard.ledger.prefix = redis_prefix  # type: ignore[union-attr]
    with server as url:

        async def fire() -> list[int]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:

                async def one(i: int) -> int:
                    r = await client.post(
                        "/v1/chat/completions",
                        json={
                            "model": "chat-production",
                            "messages": [{"role": "user", "content": f"q{i}"}],
                        },
                    )
                    if r.status_code == 402:
                        assert r.json()["error"]["code"] == "budget_exceeded"
                        assert int(r.headers["retry-after"]) > 0
                    return r.status_code

                return await asyncio.gather(*(one(i) for i in range(200)))

        statuses = asyncio.run(fire())
    admitted = statuses.count(200)
    assert admitted + statuses.count(402) == 200
    assert 0 < admitted < 200
    events = finished.wait_for(200)
    spent_by_records = sum((e["cost_usd"] for e in events if e["status"] == 200), Decimal(0))
    ledger = relay.guard.ledger
    assert ledger is not None
    spent = ledger.spent("route:chat-production")
    assert spent <= Decimal("0.01")
    assert abs(spent - spent_by_records) < Decimal("0.000001")  # every admitted cost accounted
    relay.close()
    assert identity_scope("x") != "x"  # identities never stored raw


def test_missing_usage_is_estimated_and_says_so(fake_llm: FakeLLM, finished: Recorder) -> None:
    fake_llm.set("*", usage=False)
    relay, server = serve(relay_document(fake_llm.base_url))
    with server as url:
        httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "chat-production", "messages": [{"role": "user", "content": "hello"}]},
        )
    event = finished.wait_for(1)[0]
    assert event["usage_estimated"] is True
    assert event["prompt_tokens"] > 0 and event["completion_tokens"] > 0
    assert event["cost_usd"] > 0
    relay.close()


def test_on_redis_a_guarded_call_takes_six_scripts_and_concurrent_calls_share_round_trips(
    fake_llm: FakeLLM, own_redis: RedisServer
) -> None:
    """A request limit, a token limit and a budget: admission tests the token estimate, hits
    the request limit and reads its window (for the headers), then reserves the budget;
    settlement counts the tokens and reconciles the budget, both in one write. So 6 scripts in
    5 round trips when calls come one at a time; concurrent calls share their round trips."""
    doc = chat_route(
        relay_document(fake_llm.base_url),
        rate_limits=["1000/minute"],
        token_limits=["10000000/minute"],
    )
    doc["rate_limiting"] = {"storage_uri": own_redis.url, "identity": "api_key"}
    doc["budgets"] = [{"scope": "route:chat-production", "period": "month", "limit_usd": 100}]
    doc["budgeting"] = {"storage_uri": own_redis.url}
    relay, app = serve(doc)
    admin = redis.Redis.from_url(own_redis.url)

    def counters() -> tuple[int, int]:
        scripts = admin.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        return int(scripts), int(admin.info("stats")["total_reads_processed"])

    def since(before: tuple[int, int], scripts: int) -> tuple[int, int]:
        """Scripts and reads since ``before`` once ``scripts`` ran (settlement comes after the
        response) and nothing more came for 0.2 s; the INFO calls' own reads taken out."""
        polls, deadline = 1, time.monotonic() + 10  # each counters() call is two reads
        now = counters()
        while now[0] - before[0] < scripts and time.monotonic() < deadline:
            time.sleep(0.02)
            now, polls = counters(), polls + 1
        time.sleep(0.2)
        now, polls = counters(), polls + 1
        return now[0] - before[0], now[1] - before[1] - 2 * polls

    body = {"model": "chat-production", "messages": [{"role": "user", "content": "hi"}]}
    try:
        with app as url, httpx.Client(base_url=url, headers={"x-api-key": "k"}) as client:
            before = counters()
            assert client.post("/v1/chat/completions", json=body).status_code == 200  # warm
            since(before, 6)
            for _ in range(3):
                before = counters()
                response = client.post("/v1/chat/completions", json=body)
                assert response.status_code == 200
                assert response.headers["ratelimit-limit"] == "1000"
                assert since(before, 6) == (6, 5)  # settlement: two scripts, one round trip

            async def burst() -> list[int]:
                async with httpx.AsyncClient(base_url=url, headers={"x-api-key": "k"}) as c:
                    sent = [c.post("/v1/chat/completions", json=body) for _ in range(32)]
                    return [r.status_code for r in await asyncio.gather(*sent)]

            before = counters()
            assert asyncio.run(burst()) == [200] * 32
            scripts, reads = since(before, 32 * 6)
            assert scripts == 32 * 6
            assert reads < 32 * 4 / 2  # waits overlap: round trips are shared
    finally:
        admin.close()
        relay.close()
