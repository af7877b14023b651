"""Health checks (SPEC §6): threshold and baseline modes, share_out, the sequential test."""

from __future__ import annotations

import math
import random
import threading
from decimal import Decimal
from typing import Any

import pytest

from relaymw.config import HealthCheck, Route, RouteRule
from relaymw.health import (
    Evaluation,
    HealthChecker,
    baseline_error_test,
    msprt_log_lambda,
    share_out,
)
from relaymw.metrics import MetricsRegistry, RedisMetricsPublisher

T0 = 1_700_000_000.0
ZERO = Decimal(0)


def route(weights: dict[str, float] | None = None, alias: str = "chat", **health: Any) -> Route:
    rules = tuple(RouteRule(t, w) for t, w in (weights or {"stable": 95, "canary": 5}).items())
    return Route(alias, rules, health_check=HealthCheck(**({"enabled": True} | health)))


def feed(
    reg: MetricsRegistry,
    version: str,
    n: int,
    errors: int = 0,
    latency: float = 100.0,
    alias: str = "chat",
    t: float = T0,
) -> None:
    for i in range(n):
        status = 502 if i < errors else 200
        reg.record(alias, version, status, latency, None, 0, 0, ZERO, None, now=t)


def ejected(ev: Evaluation) -> dict[str, str]:
    return {e.version: e.reason for e in ev.ejections}


def notes(ev: Evaluation) -> dict[str, str]:
    return {n.version: n.kind for n in ev.notes}


# --- share_out --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "eject", "expected"),
    [
        ({"a": 95, "b": 5}, "b", {"a": 100.0, "b": 0.0}),
        ({"a": 95, "b": 5}, "a", {"a": 0.0, "b": 100.0}),
        ({"a": 90, "b": 5, "c": 5}, "c", {"a": 94.74, "b": 5.26, "c": 0.0}),
        ({"a": 50, "b": 25, "c": 25}, "a", {"a": 0.0, "b": 50.0, "c": 50.0}),
        ({"a": 33.33, "b": 33.33, "c": 33.34}, "a", {"a": 0.0, "b": 49.99, "c": 50.01}),
        ({"a": 60, "b": 40, "c": 0}, "b", {"a": 100.0, "b": 0.0, "c": 0.0}),
    ],
)
def test_share_out(weights: dict[str, float], eject: str, expected: dict[str, float]) -> None:
    got = share_out(weights, eject)
    assert got == expected and list(got) == list(weights)
    assert round(sum(got.values()), 2) == 100


def test_share_out_is_proportional_and_sums_to_100() -> None:
    rng = random.Random(3)
    for _ in range(500):
        tags = [f"v{i}" for i in range(rng.randint(2, 6))]
        raw = [rng.random() for _ in tags]
        weights = {t: round(100 * w / sum(raw), 2) for t, w in zip(tags, raw, strict=True)}
        gone = rng.choice(tags)
        got = share_out(weights, gone)
        assert got[gone] == 0 and round(sum(got.values()), 2) == 100
        rest = sum(w for t, w in weights.items() if t != gone)
        for t in tags:
            if t != gone:
                assert got[t] == pytest.approx(100 * weights[t] / rest, abs=0.02)


def test_share_out_refuses_the_last_version() -> None:
    with pytest.raises(ValueError):
        share_out({"a": 100, "b": 0}, "a")
    with pytest.raises(KeyError):
        share_out({"a": 100}, "zzz")


# --- threshold mode ---------------------------------------------------------------------------


def test_error_rate_ejects_exactly_when_crossing() -> None:
    reg = MetricsRegistry()
    checker = HealthChecker(reg)
    r = route(error_rate_threshold=0.05)
    feed(reg, "stable", 1000, errors=10)
    feed(reg, "canary", 100, errors=5)  # 0.05: at the threshold, not above it
    assert checker.evaluate(r, now=T0).ejections == ()
    feed(reg, "canary", 1, errors=1)  # 6/101 > 0.05
    ev = checker.evaluate(r, now=T0)
    assert ejected(ev) == {"canary": "error_rate"}
    e = ev.ejections[0]
    assert (e.route, e.version) == ("chat", "canary")
    assert e.evidence == {
        "request_count": 101,
        "error_count": 6,
        "error_rate": pytest.approx(6 / 101),
        "latency_p50_ms": pytest.approx(100, rel=0.025),
        "latency_p99_ms": pytest.approx(100, rel=0.025),
        "mode": "threshold",
        "error_rate_threshold": 0.05,
        "latency_p99_threshold_ms": None,
        "min_requests": 20,
        "window_seconds": 300,
    }


def test_never_ejects_below_min_requests() -> None:
    reg = MetricsRegistry()
    checker = HealthChecker(reg)
    r = route(min_requests=20)
    feed(reg, "stable", 500)
    feed(reg, "canary", 19, errors=19)
    ev = checker.evaluate(r, now=T0)
    assert ev.ejections == () and notes(ev) == {"canary": "insufficient_data"}
    feed(reg, "canary", 1, errors=1)
    assert ejected(checker.evaluate(r, now=T0)) == {"canary": "error_rate"}


def test_window_slides_past_old_errors() -> None:
    reg = MetricsRegistry()
    checker = HealthChecker(reg)
    r = route(window_seconds=60)
    feed(reg, "stable", 100)
    feed(reg, "canary", 50, errors=50)
    assert ejected(checker.evaluate(r, now=T0 + 30)) == {"canary": "error_rate"}
    feed(reg, "stable", 100, t=T0 + 100)
    feed(reg, "canary", 50, t=T0 + 100)
    assert checker.evaluate(r, now=T0 + 100).ejections == ()


def test_last_eligible_version_is_never_ejected() -> None:
    reg = MetricsRegistry()
    checker = HealthChecker(reg)
    feed(reg, "stable", 100, errors=100)
    feed(reg, "canary", 100, errors=100)
    ev = checker.evaluate(route(), now=T0)  # both cross: the highest weight stays
    assert ejected(ev) == {"canary": "error_rate"}
    assert notes(ev) == {"stable": "last_version"}
    assert ev.notes[0].evidence["reason"] == "error_rate"
    ev = checker.evaluate(route(), ["canary"], now=T0)  # canary already ejected
    assert ev.ejections == () and notes(ev) == {"stable": "last_version"}
    only = route({"stable": 100, "canary": 0})  # weight 0: not eligible
    assert checker.evaluate(only, now=T0).ejections == ()
    single = route({"stable": 100})
    assert notes(checker.evaluate(single, now=T0)) == {"stable": "last_version"}


def test_bad_stable_is_ejected_while_a_canary_remains() -> None:
    reg = MetricsRegistry()
    checker = HealthChecker(reg)
    feed(reg, "stable", 100, errors=50)
    feed(reg, "canary", 100)
    assert ejected(checker.evaluate(route(), now=T0)) == {"stable": "error_rate"}


def test_latency_threshold() -> None:
    reg = MetricsRegistry()
    checker = HealthChecker(reg)
    feed(reg, "stable", 100, latency=200)
    feed(reg, "canary", 98, latency=200)
    feed(reg, "canary", 2, latency=5000)  # the p99 of 100 requests is the 99th: 5000 ms
    p99 = reg.window("chat", "canary", 300, now=T0).latency_p99_ms
    assert p99 == pytest.approx(5000, rel=0.025)
    assert checker.evaluate(route(latency_p99_threshold_ms=p99), now=T0).ejections == ()
    ev = checker.evaluate(route(latency_p99_threshold_ms=p99 - 0.001), now=T0)
    assert ejected(ev) == {"canary": "latency_p99"}
    assert ev.ejections[0].evidence["latency_p99_threshold_ms"] == p99 - 0.001
    assert checker.evaluate(route(latency_p99_threshold_ms=None), now=T0).ejections == ()


def test_disabled_health_check_decides_nothing() -> None:
    reg = MetricsRegistry()
    feed(reg, "canary", 100, errors=100)
    ev = HealthChecker(reg).evaluate(route(enabled=False), now=T0)
    assert ev == Evaluation("chat")


def test_maybe_evaluate_runs_at_most_once_per_interval() -> None:
    reg = MetricsRegistry()
    checker = HealthChecker(reg, interval_seconds=0.5)
    feed(reg, "canary", 100, errors=100)
    r = route()
    assert checker.maybe_evaluate(r, now=T0) is not None
    assert checker.maybe_evaluate(r, now=T0 + 0.4) is None
    assert checker.maybe_evaluate(route(alias="other"), now=T0 + 0.4) is not None
    ev = checker.maybe_evaluate(r, now=T0 + 0.5)
    assert ev is not None and ejected(ev) == {"canary": "error_rate"}


def test_run_in_background_hands_over_ejections() -> None:
    reg = MetricsRegistry()
    feed(reg, "stable", 100)
    feed(reg, "canary", 100, errors=100)
    checker = HealthChecker(reg, interval_seconds=0.01, clock=lambda: T0)
    got: list[Evaluation] = []
    done = threading.Event()

    def on_evaluation(ev: Evaluation) -> None:
        got.append(ev)
        done.set()

    stop = checker.run_in_background(lambda: [(route(), (), None)], on_evaluation)
    try:
        assert done.wait(5)
    finally:
        stop()
    assert ejected(got[0]) == {"canary": "error_rate"}


# --- baseline mode ----------------------------------------------------------------------------


def test_msprt_statistic() -> None:
    assert msprt_log_lambda(1000, 20, 100, 1) == -math.inf  # the canary looks better
    assert msprt_log_lambda(1000, 20, 100, 2) == -math.inf  # the same rate
    assert msprt_log_lambda(0, 0, 100, 2) == -math.inf
    grows = [msprt_log_lambda(20 * n, n // 5, n, n // 10) for n in (50, 100, 200, 400, 800)]
    assert grows == sorted(grows) and grows[-1] > math.log(100)
    reject, log_lambda = baseline_error_test(3800, 76, 200, 30)
    assert reject and log_lambda >= -math.log(0.01)
    assert not baseline_error_test(3800, 76, 200, 5)[0]
    assert not baseline_error_test(3800, 76, 200, 30, alpha=1e-30)[0]
    assert msprt_log_lambda(4000, 0, 200, 10) > msprt_log_lambda(4000, 40, 200, 10)


def test_baseline_holds_then_ejects_a_worse_canary() -> None:
    reg = MetricsRegistry()
    checker = HealthChecker(reg)
    r = route(mode="baseline", error_rate_threshold=1.0)
    feed(reg, "stable", 19)
    feed(reg, "canary", 19, errors=10)
    ev = checker.evaluate(r, now=T0)
    assert ev.ejections == () and notes(ev) == {"canary": "insufficient_data"}
    feed(reg, "stable", 2000, errors=40)
    feed(reg, "canary", 1)
    ev = checker.evaluate(r, now=T0)
    assert ejected(ev) == {"canary": "baseline_error_rate"}
    evidence = ev.ejections[0].evidence
    assert evidence["stable_version"] == "stable" and evidence["stable_request_count"] == 2019
    assert evidence["request_count"] == 20 and evidence["error_count"] == 10
    assert evidence["log_lambda"] >= evidence["log_threshold"] == pytest.approx(math.log(100))
    assert {"alpha", "tau2", "latency_tolerance", "stable_error_rate", "mode"} <= set(evidence)


def test_baseline_never_ejects_the_stable_and_waits_on_equal_rates() -> None:
    reg = MetricsRegistry()
    checker = HealthChecker(reg)
    r = route(mode="baseline")
    feed(reg, "stable", 2000, errors=400)  # a bad stable is the baseline, not a suspect
    feed(reg, "canary", 100, errors=20)
    ev = checker.evaluate(r, now=T0)
    assert ev.ejections == () and notes(ev) == {"canary": "inconclusive"}
    assert checker.evaluate(route({"stable": 100}, mode="baseline"), now=T0) == Evaluation("chat")


def test_baseline_compares_every_canary_with_the_highest_weight() -> None:
    reg = MetricsRegistry()
    checker = HealthChecker(reg)
    r = route({"a": 10, "b": 80, "c": 10}, mode="baseline")
    feed(reg, "b", 4000, errors=40)
    feed(reg, "a", 500, errors=5)
    feed(reg, "c", 500, errors=60)
    ev = checker.evaluate(r, now=T0)
    assert ejected(ev) == {"c": "baseline_error_rate"} and notes(ev) == {"a": "inconclusive"}


def test_baseline_latency_with_tolerance() -> None:
    reg = MetricsRegistry()
    checker = HealthChecker(reg, latency_tolerance=0.5)
    r = route(mode="baseline")
    feed(reg, "stable", 1000, latency=1000)
    feed(reg, "canary", 99, latency=1400)  # 1.4x: within the 50% tolerance
    assert checker.evaluate(r, now=T0).ejections == ()  # and 99 < 100 requests anyway
    feed(reg, "canary", 1, latency=1400)
    assert notes(checker.evaluate(r, now=T0)) == {"canary": "inconclusive"}
    feed(reg, "canary", 100, latency=1600)  # p99 1.6x > 1.5x
    ev = checker.evaluate(r, now=T0)
    assert ejected(ev) == {"canary": "baseline_latency_p99"}
    assert ev.ejections[0].evidence["stable_latency_p99_ms"] == pytest.approx(1000, rel=0.025)
    strict = HealthChecker(reg, latency_tolerance=1.0)
    assert strict.evaluate(r, now=T0).ejections == ()


def test_baseline_works_on_counts_aggregated_in_redis(redis_url: str, redis_prefix: str) -> None:
    workers = [MetricsRegistry(clock=lambda: T0), MetricsRegistry(clock=lambda: T0)]
    publishers = [RedisMetricsPublisher(w, redis_url, prefix=redis_prefix) for w in workers]
    r = route(mode="baseline")
    for w in workers:  # each worker alone has too few canary requests
        feed(w, "stable", 1000, errors=10)
        feed(w, "canary", 15, errors=6)
    assert notes(HealthChecker(workers[0]).evaluate(r, now=T0)) == {"canary": "insufficient_data"}
    assert all(p.flush() for p in publishers)
    assert ejected(HealthChecker(workers[0]).evaluate(r, now=T0)) == {
        "canary": "baseline_error_rate"
    }
    import redis

    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{redis_prefix}*"):
        client.delete(key)
    client.close()


def test_baseline_since_the_stage_began() -> None:
    reg = MetricsRegistry()
    checker = HealthChecker(reg)
    r = route(mode="baseline", window_seconds=60)
    feed(reg, "stable", 4000, errors=80, t=T0)
    feed(reg, "canary", 200, errors=25, t=T0)
    feed(reg, "stable", 100, t=T0 + 100)
    feed(reg, "canary", 5, t=T0 + 100)
    assert notes(checker.evaluate(r, now=T0 + 100)) == {"canary": "insufficient_data"}
    ev = checker.evaluate(r, now=T0 + 100, since=T0)
    assert ejected(ev) == {"canary": "baseline_error_rate"}
    assert ev.ejections[0].evidence["window_seconds"] == 100
    assert ev.ejections[0].evidence["request_count"] == 205
    assert reg.window("chat", "canary", 3600, now=T0 + 100).request_count == 205
    capped = checker.evaluate(r, now=T0 + 100, since=T0 - 10**6)  # capped at the retention
    assert capped.ejections[0].evidence["window_seconds"] == reg.retention_seconds


# --- the sequential test's error rates (a smaller bench/bench_baseline.py) ---------------------


def simulate(seed: int, p_canary: float, horizon: int) -> int | None:
    """Canary requests at ejection, testing after every request (5% canary, stable 2%)."""
    r = random.Random(seed).random
    ns = es = nc = ec = 0
    while nc < horizon:
        if r() < 0.05:
            nc += 1
            ec += r() < p_canary
        else:
            ns += 1
            es += r() < 0.02
        if nc >= 20 and ns >= 20 and baseline_error_test(ns, es, nc, ec)[0]:
            return nc
    return None


def test_a_5x_worse_canary_is_ejected_within_200_canary_requests() -> None:
    runs = [simulate(seed, 0.10, 200) for seed in range(300)]
    assert sum(n is not None for n in runs) / len(runs) >= 0.93


def test_an_equally_good_canary_is_rarely_ejected() -> None:
    runs = [simulate(10_000 + seed, 0.02, 800) for seed in range(300)]
    assert sum(n is not None for n in runs) / len(runs) <= 0.02


def test_the_checker_decides_like_the_test_at_every_look() -> None:
    r = route(mode="baseline", window_seconds=300)
    for seed in range(3):
        reg = MetricsRegistry(bucket_seconds=60, retention_seconds=600)
        checker = HealthChecker(reg)
        rnd = random.Random(seed).random
        nc, t, got = 0, T0, None
        while nc < 200 and got is None:
            t += 0.05
            canary = rnd() < 0.05
            nc += canary
            failed = rnd() < (0.10 if canary else 0.02)
            feed(reg, "canary" if canary else "stable", 1, errors=int(failed), t=t)
            if checker.evaluate(r, now=t).ejections:
                got = nc
        assert got == simulate(seed, 0.10, 200)
