"""Baseline-mode health check at a 5% canary: detection power and false ejections.

``python bench/run.py baseline`` (figures go to ``bench/results_health.md``).

A run simulates a stream of requests: each goes to the canary with probability 0.05, else to
the stable version, and fails with its version's error probability (stable 0.02). After every
request (every look) the checker's baseline test is applied to the cumulative (requests,
errors) counts of both versions, with the checker's own rule for a hold (both versions need
``min_requests`` = 20). A run stops at the first ejection of the canary, or at its horizon.

* (a) canary at 0.10 (5x the stable's): ejected within 200 canary requests, in >= 95% of runs?
* (b) canary at 0.02 (as good as stable): ejected before 2,000 canary requests, in < 1%?
  (3,000 runs, so that the interval's upper end can show it too.)

The pure simulation calls :func:`relaymw.health.baseline_error_test` (what
``HealthChecker._baseline`` decides on); a subset of seeds is then replayed end to end,
recording every request in a :class:`MetricsRegistry` with a fake clock and calling
``HealthChecker.evaluate`` after each, and must eject at exactly the same request.
"""

from __future__ import annotations

import math
import platform
import random
import statistics
import time
from decimal import Decimal

from relaymw.config import HealthCheck, Route, RouteRule
from relaymw.health import ALPHA, TAU2, HealthChecker, baseline_error_test
from relaymw.metrics import MetricsRegistry

STABLE_P = 0.02
SHARE = 0.05
MIN_REQUESTS = 20


def simulate(
    seed: int,
    p_canary: float,
    horizon: int,
    p_stable: float = STABLE_P,
    share: float = SHARE,
    min_requests: int = MIN_REQUESTS,
) -> int | None:
    """The canary's request count when it is ejected, or None by ``horizon`` canary requests."""
    r = random.Random(seed).random
    ns = es = nc = ec = 0
    while nc < horizon:
        if r() < share:
            nc += 1
            ec += r() < p_canary
        else:
            ns += 1
            es += r() < p_stable
        if nc >= min_requests and ns >= min_requests and baseline_error_test(ns, es, nc, ec)[0]:
            return nc
    return None


def simulate_end_to_end(seed: int, p_canary: float, horizon: int) -> int | None:
    """:func:`simulate` through a MetricsRegistry and ``HealthChecker.evaluate``."""
    registry = MetricsRegistry(bucket_seconds=60, retention_seconds=600)
    checker = HealthChecker(registry)
    route = Route(
        "sim",
        (RouteRule("stable", 95.0), RouteRule("canary", 5.0)),
        health_check=HealthCheck(enabled=True, mode="baseline", window_seconds=300),
    )
    r = random.Random(seed).random
    nc, t, step = 0, 1_000_000.0, 250.0 / (horizon / SHARE)  # the run spans < 300 s
    zero = Decimal(0)
    while nc < horizon:
        t += step
        canary = r() < SHARE
        nc += canary
        failed = r() < (p_canary if canary else STABLE_P)
        tag = "canary" if canary else "stable"
        registry.record("sim", tag, 502 if failed else 200, 100.0, None, 0, 0, zero, None, t)
        if checker.evaluate(route, (), now=t).ejections:
            return nc
    return None


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score 95% interval of ``k`` successes in ``n``."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _rate(label: str, k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{label}: {k}/{n} = {100 * k / n:.2f}%  (Wilson 95%: {100 * lo:.2f}% - {100 * hi:.2f}%)"


def main(
    runs: int = 1000, null_runs: int = 3000, replay: int = 50, robustness_runs: int = 300
) -> None:
    print(f"relaymw baseline mSPRT: Python {platform.python_version()}, {platform.machine()}")
    print(
        f"alpha={ALPHA}, tau2={TAU2}, min_requests={MIN_REQUESTS}, canary share={SHARE}, "
        f"stable error rate={STABLE_P}; the test at every request (every look)"
    )
    t0 = time.perf_counter()
    a = [simulate(seed, 0.10, 200) for seed in range(runs)]
    hits = sorted(n for n in a if n is not None)
    print(_rate("(a) 10% vs 2%, ejected within 200 canary requests", len(hits), runs))
    if hits:
        q = statistics.quantiles(hits, n=20)
        print(
            f"    canary requests at ejection: median {statistics.median(hits):.0f}, "
            f"p5 {q[0]:.0f}, p95 {q[-1]:.0f}"
        )
    b = [simulate(10**6 + seed, 0.02, 2000) for seed in range(null_runs)]
    false = sorted(n for n in b if n is not None)
    print(_rate("(b) 2% vs 2%, ejected before 2,000 canary requests", len(false), null_runs))
    print(f"    at canary requests: {false}")
    print(f"    ({time.perf_counter() - t0:.0f} s)")

    t0 = time.perf_counter()
    same = sum(simulate_end_to_end(s, 0.10, 200) == a[s] for s in range(replay))
    same_b = sum(simulate_end_to_end(10**6 + s, 0.02, 2000) == b[s] for s in range(5))
    print(
        f"end to end (MetricsRegistry + HealthChecker.evaluate at every request): "
        f"{same}/{replay} (a) runs and {same_b}/5 (b) runs eject at the same request "
        f"({time.perf_counter() - t0:.0f} s)"
    )

    print(f"robustness of (b), {robustness_runs} runs each, horizon 2,000 canary requests:")
    for p, share in ((0.002, 0.05), (0.2, 0.05), (0.02, 0.5), (0.005, 0.5)):
        got = [simulate(2 * 10**6 + s, p, 2000, p, share) for s in range(robustness_runs)]
        k = sum(n is not None for n in got)
        print("    " + _rate(f"error rate {p}, canary share {share}", k, robustness_runs))


if __name__ == "__main__":
    main()
