"""Per-version metrics (SPEC §6, §7): buckets, windows, quantiles, cost, threads, Redis."""

from __future__ import annotations

import math
import threading
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaymw import signals
from relaymw.metrics import (
    _THRESHOLDS,
    GAMMA,
    MAX_MS,
    MIN_MS,
    N_BINS,
    MetricsRegistry,
    RedisMetricsPublisher,
    bin_of,
    bin_value,
    is_version_error,
)

T0 = 1_700_000_000.0  # a multiple of 10: bucket boundaries fall on round numbers
ZERO = Decimal(0)
BOUND = (GAMMA - 1) / (GAMMA + 1)  # the worst relative error of a reported quantile


def rec(
    reg: MetricsRegistry,
    t: float,
    *,
    route: str = "r",
    version: str = "v1",
    status: int = 200,
    latency: float = 100.0,
    ttft: float | None = None,
    prompt: int = 0,
    completion: int = 0,
    cost: Decimal = ZERO,
    error: str | None = None,
) -> None:
    reg.record(route, version, status, latency, ttft, prompt, completion, cost, error, now=t)


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        (200, None, False),
        (404, None, False),
        (429, None, False),
        (500, None, True),
        (503, None, True),
        (502, "upstream_error", True),
        (504, "upstream_timeout", True),
        (502, "upstream_unreachable", True),
        (200, "upstream_truncated", True),
        (499, "client_disconnected", False),
        (429, "rate_limited", False),
        (402, "budget_exceeded", False),
        (400, "cost_limit_exceeded", False),
        (400, "bad_request", False),
        (500, "client_disconnected", False),
        (500, "something_new", True),
        (400, "something_new", False),
    ],
)
def test_is_version_error(status: int, error: str | None, expected: bool) -> None:
    assert is_version_error(status, error) is expected


def test_record_counts_version_errors_and_skips_refusals() -> None:
    reg = MetricsRegistry()
    rec(reg, T0)
    rec(reg, T0, status=503)
    rec(reg, T0, status=504, error="upstream_timeout")
    rec(reg, T0, status=200, error="upstream_truncated")
    rec(reg, T0, status=404)
    rec(reg, T0, status=499, error="client_disconnected")
    for code, status in [("rate_limited", 429), ("budget_exceeded", 402), ("bad_request", 400)]:
        rec(reg, T0, status=status, error=code)  # refused before the upstream: not counted
    m = reg.window("r", "v1", 60, now=T0)
    assert (m.request_count, m.error_count) == (6, 3)
    assert m.error_rate == pytest.approx(0.5)


# --- quantiles --------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.floats(min_value=0.1, max_value=599_999.0, allow_nan=False), min_size=1, max_size=400
    )
)
def test_quantiles_within_relative_error_bound(values: list[float]) -> None:
    reg = MetricsRegistry()
    for v in values:
        rec(reg, T0, latency=v, ttft=v)
    m = reg.window("r", "v1", 10, now=T0)
    for q, got in [(0.5, m.latency_p50_ms), (0.99, m.latency_p99_ms), (0.5, m.ttft_p50_ms)]:
        exact = nearest_rank(values, q)
        assert got is not None
        assert abs(got - exact) <= (BOUND + 1e-9) * exact, (q, got, exact)


def test_bin_values_and_extremes() -> None:
    reg = MetricsRegistry()
    rec(reg, T0 + 5, latency=0.0)  # below the range: the first bin
    rec(reg, T0 + 15, latency=10_000_000.0)  # above: the last bin
    rec(reg, T0 + 25, latency=float("nan"))  # never raises
    assert reg.window("r", "v1", 1, now=T0 + 5).latency_p99_ms == bin_value(0)
    top = reg.window("r", "v1", 1, now=T0 + 15).latency_p99_ms
    assert top == pytest.approx(600_000, rel=2 * BOUND)
    assert reg.window("r", "v1", 1, now=T0 + 25).request_count == 1


def test_ttft_only_for_streams() -> None:
    reg = MetricsRegistry()
    rec(reg, T0, latency=900, ttft=None)
    m = reg.window("r", "v1", 10, now=T0)
    assert m.ttft_p50_ms is None and m.latency_p50_ms == pytest.approx(900, rel=BOUND)
    rec(reg, T0, latency=900, ttft=120)
    assert reg.window("r", "v1", 10, now=T0).ttft_p99_ms == pytest.approx(120, rel=BOUND)


# --- windows, buckets, queries ----------------------------------------------------------------


def test_window_covers_the_buckets_from_now_minus_seconds_to_now() -> None:
    reg = MetricsRegistry(bucket_seconds=10, retention_seconds=600)
    for i in range(60):  # one request per second for a minute
        rec(reg, T0 + i)
    now = T0 + 59.5
    assert reg.window("r", "v1", 60, now=now).request_count == 60
    # now - 30 = T0 + 29.5 lies in the bucket [T0 + 20, T0 + 30): it is merged whole
    assert reg.window("r", "v1", 30, now=now).request_count == 40
    assert reg.window("r", "v1", 0, now=now).request_count == 10
    assert reg.window("r", "v1", 60, now=T0 + 600).request_count == 0


def test_query_merges_buckets_overlapping_start_end() -> None:
    reg = MetricsRegistry(bucket_seconds=10, retention_seconds=600)
    for i in range(60):
        rec(reg, T0 + i)
    assert reg.query("v1", T0, T0 + 60).request_count == 60
    assert reg.query("v1", T0 + 10, T0 + 20).request_count == 10  # exactly one bucket
    assert reg.query("v1", T0 + 15, T0 + 25).request_count == 20  # overlaps two buckets
    assert reg.query("v1", T0 + 20, T0 + 20.001).request_count == 10
    assert reg.query("v1", T0 + 60, T0 + 70).request_count == 0  # end is exclusive
    m = reg.query("v1", T0 + 15, T0 + 25)
    assert (m.start, m.end, m.version, m.route) == (T0 + 15, T0 + 25, "v1", None)


def test_ring_reuses_buckets_and_drops_records_older_than_retention() -> None:
    reg = MetricsRegistry(bucket_seconds=10, retention_seconds=100)  # 11 slots
    rec(reg, T0, status=500)
    rec(reg, T0 + 110)  # same slot, 11 buckets later: the old bucket is reused
    assert reg.query("v1", T0, T0 + 10).request_count == 0
    m = reg.window("r", "v1", 10, now=T0 + 110)
    assert (m.request_count, m.error_count) == (1, 0)
    rec(reg, T0)  # older than the retention: ignored
    assert reg.query("v1", T0, T0 + 200).request_count == 1
    ring = reg._series[("r", "v1")]
    for i in range(5000):  # a long run keeps the same, fixed number of buckets
        rec(reg, T0 + 200 + i * 3.7)
    assert reg._series[("r", "v1")] is ring and len(ring) == reg.slots == 11


def test_series_of_versions_no_longer_seen_are_forgotten() -> None:
    reg = MetricsRegistry(bucket_seconds=10, retention_seconds=100)
    rec(reg, T0, version="old")
    rec(reg, T0 + 50, version="v1")
    assert ("r", "old") in reg._series
    rec(reg, T0 + 200, version="v1")
    assert ("r", "old") not in reg._series and ("r", "v1") in reg._series


def test_query_merges_routes_or_filters_one() -> None:
    reg = MetricsRegistry()
    rec(reg, T0, route="a", prompt=10, completion=5)
    rec(reg, T0, route="b", status=500, prompt=1, completion=1)
    rec(reg, T0, route="b", version="v2")
    both = reg.query("v1", T0, T0 + 10)
    assert (both.request_count, both.error_count, both.prompt_tokens) == (2, 1, 11)
    only_b = reg.query("v1", T0, T0 + 10, route="b")
    assert (only_b.request_count, only_b.error_count, only_b.route) == (1, 1, "b")
    assert reg.query("v2", T0, T0 + 10).request_count == 1
    assert reg.query("nope", T0, T0 + 10).request_count == 0


def test_cost_and_cost_per_token_are_exact_decimals() -> None:
    reg = MetricsRegistry()
    rec(reg, T0, prompt=1000, completion=500, cost=Decimal("0.0105"))
    rec(reg, T0 + 1, prompt=2000, completion=0, cost=Decimal("0.006"))
    rec(reg, T0 + 12, prompt=7, completion=3, cost=Decimal("0.00000042"))
    m = reg.query("v1", T0, T0 + 20)
    assert isinstance(m.total_cost_usd, Decimal) and isinstance(m.cost_per_token, Decimal)
    assert m.total_cost_usd == Decimal("0.01650042")
    assert (m.prompt_tokens, m.completion_tokens) == (3007, 503)
    assert m.cost_per_token == Decimal("0.01650042") / 3510
    empty = reg.query("v1", T0 + 100, T0 + 200)
    assert empty.total_cost_usd == 0 and empty.cost_per_token == 0
    assert empty.latency_p50_ms is None and empty.error_rate == 0.0
    d = m.as_dict()
    assert d["total_cost_usd"] == "0.016500420000" and isinstance(d["cost_per_token"], str)
    assert d["request_count"] == 3 and "E" not in d["cost_per_token"]


def test_pico_and_decimal_costs_sum_exactly() -> None:
    """The relay records whole pico-USD as ints, finer costs as Decimals: one exact sum."""
    reg = MetricsRegistry()
    reg.record_pico(("r", "v1"), 200, 5.0, None, 10, 5, 1_500_000_000, None, now=T0)
    reg.record_pico(("r", "v1"), 200, 5.0, None, 1, 0, 7, None, Decimal("1E-13"), now=T0)
    rec(reg, T0 + 1, cost=Decimal("0.00000000000045"))  # 0.45 pico-USD
    m = reg.query("v1", T0, T0 + 10)
    # 0.0015 + 7e-12 + 1e-13 + 4.5e-13 = 0.00150000000755, rounded to 1e-12 (not 0.001500000007)
    assert m.total_cost_usd == Decimal("0.001500000008")
    assert m.request_count == 3 and m.prompt_tokens == 11 and m.completion_tokens == 5


def test_bins_by_thresholds_are_the_logarithm_to_the_last_ulp() -> None:
    assert len(_THRESHOLDS) == N_BINS - 1
    values = [0.0, -1.0, MIN_MS, MAX_MS, math.inf, math.nan, 1e300, 100.0, 0.1000000001]
    for t in _THRESHOLDS:
        values += [t, math.nextafter(t, 0.0), math.nextafter(t, math.inf)]
    reg = MetricsRegistry()
    for i, v in enumerate(values):
        reg.record_pico(("r", f"v{i}"), 200, v, None, 0, 0, 0, None, now=T0)
        m = reg.query(f"v{i}", T0, T0 + 10)
        assert m.latency_p50_ms == bin_value(bin_of(v)), v


@settings(max_examples=300)
@given(st.floats(min_value=0.0, max_value=2 * MAX_MS))
def test_recorded_bin_is_bin_of(v: float) -> None:
    reg = MetricsRegistry()
    reg.record_pico(("r", "v"), 200, 1.0, v, 0, 0, 0, None, now=T0)
    assert reg.query("v", T0, T0 + 10).ttft_p50_ms == bin_value(bin_of(v))


def test_record_signal_receives_request_finished() -> None:
    reg = MetricsRegistry()
    # One bound method, kept: in the compiled build each reg.record_signal is a new builtin
    # method, which blinker can neither hold weakly nor find again to disconnect.
    receiver = reg.record_signal
    signals.request_finished.connect(receiver, weak=False)
    try:
        event: dict[str, Any] = dict(
            route="r", version="v1", status=502, latency_ms=12.0, ttft_ms=None,
            prompt_tokens=3, completion_tokens=4, cost_usd=Decimal("0.001"), stream=False,
            error="upstream_error", mode="gateway", protocol="openai",
            usage_estimated=False, cached_tokens=0,
        )  # fmt: skip
        signals.send(signals.request_finished, object(), **event)
        signals.send(signals.request_finished, object(), **(event | {"version": None}))
    finally:
        signals.request_finished.disconnect(receiver)
    m = reg.query("v1", 0, 1e12)
    assert (m.request_count, m.error_count, m.prompt_tokens) == (1, 1, 3)


def test_record_is_thread_safe() -> None:
    reg = MetricsRegistry()
    start = threading.Barrier(8)

    def worker(k: int) -> None:
        start.wait()
        for i in range(10_000):
            rec(reg, T0 + (i % 50), version=f"v{k % 2}", status=500 if i % 10 == 0 else 200)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for v in ("v0", "v1"):
        m = reg.query(v, T0, T0 + 60)
        assert (m.request_count, m.error_count) == (40_000, 4_000)


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError):
        MetricsRegistry(bucket_seconds=0)
    with pytest.raises(ValueError):
        MetricsRegistry(bucket_seconds=60, retention_seconds=30)


# --- Redis aggregation ------------------------------------------------------------------------


@pytest.fixture
def redis_client(redis_url: str, redis_prefix: str) -> Any:
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    for key in client.scan_iter(f"{redis_prefix}*"):
        client.delete(key)
    client.close()


def test_two_workers_aggregate_through_redis(
    redis_url: str, redis_prefix: str, redis_client: Any
) -> None:
    now = [T0 + 5]
    a, b = MetricsRegistry(clock=lambda: now[0]), MetricsRegistry(clock=lambda: now[0])
    pa = RedisMetricsPublisher(a, redis_url, prefix=redis_prefix)
    pb = RedisMetricsPublisher(b, redis_url, prefix=redis_prefix)
    for i in range(30):
        rec(a, T0 + i, latency=100, prompt=10, cost=Decimal("0.001"))
        rec(b, T0 + i, latency=300, status=500 if i < 6 else 200, route="other")
    assert pa.flush() and pb.flush()
    key = f"{redis_prefix}:r:v1:{int(T0)}"
    assert int(redis_client.hget(key, "-1")) == 10 and redis_client.ttl(key) > 3000
    rec(a, T0 + 29, status=503)  # unsent yet: a sees it, b does not
    now[0] = T0 + 30
    for reg, own_extra in ((a, 1), (b, 0)):
        m = reg.query("v1", T0, T0 + 30)
        assert m.request_count == 60 + own_extra
        assert m.error_count == 6 + own_extra
        assert m.total_cost_usd == Decimal("0.030")
        assert m.latency_p50_ms == pytest.approx(100, rel=BOUND)
        assert m.latency_p99_ms == pytest.approx(300, rel=BOUND)
    assert b.window("other", "v1", 30).request_count == 30
    assert b.window("r", "v1", 30).request_count == 30
    assert pa.flush()
    assert b.query("v1", T0, T0 + 30).request_count == 61
    assert pa.flush() and b.query("v1", T0, T0 + 30).request_count == 61  # nothing sent twice


def test_publisher_thread_publishes_every_interval(redis_url: str, redis_prefix: str) -> None:
    a, b = MetricsRegistry(), MetricsRegistry()
    pa = RedisMetricsPublisher(a, redis_url, prefix=redis_prefix, interval_seconds=0.05).start()
    RedisMetricsPublisher(b, redis_url, prefix=redis_prefix)
    try:
        a.record("r", "v1", 200, 5.0, None, 0, 0, ZERO, None)
        for _ in range(100):
            if b.window("r", "v1", 60).request_count == 1:
                break
            threading.Event().wait(0.02)
        assert b.window("r", "v1", 60).request_count == 1
    finally:
        pa.stop()


class BrokenClient:
    def pipeline(self, transaction: bool = True) -> Any:
        raise ConnectionError("redis is down")

    def smembers(self, key: str) -> Any:
        raise ConnectionError("redis is down")


def test_unreachable_redis_never_raises_and_retries(redis_url: str, redis_prefix: str) -> None:
    import redis

    reg = MetricsRegistry()
    pub = RedisMetricsPublisher(reg, client=BrokenClient(), prefix=redis_prefix)
    rec(reg, T0, status=500)
    assert pub.flush() is False and pub.failures == 1
    m = reg.query("v1", T0, T0 + 10)  # falls back to this worker's own figures
    assert (m.request_count, m.error_count) == (1, 1)
    rec(reg, T0 + 1)
    assert pub.flush() is False and pub.failures == 2
    pub.client = redis.Redis.from_url(redis_url)  # Redis is back: the whole delta goes once
    assert pub.flush() is True and pub.failures == 0
    other = MetricsRegistry()
    RedisMetricsPublisher(other, redis_url, prefix=redis_prefix)
    assert other.query("v1", T0, T0 + 10).request_count == 2
    assert pub.flush() and other.query("v1", T0, T0 + 10).request_count == 2
    # a server that does not answer at all
    dead = MetricsRegistry()
    RedisMetricsPublisher(dead, "redis://127.0.0.1:1/0", prefix=redis_prefix)
    rec(dead, T0)
    assert dead.publisher is not None and dead.publisher.flush() is False
    assert dead.query("v1", T0, T0 + 10).request_count == 1
