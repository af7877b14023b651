"""Metrics memory stays flat, and what one ``MetricsRegistry.record()`` costs.

``python bench/run.py metrics_memory`` (figures go to ``bench/results_health.md``).

Memory: 1,000,000 records over 2 routes x 3 versions with a fake clock advancing 20 ms per
record (about 5.6 h of traffic, so every ring of 1 h of 10 s buckets wraps round more than
five times), lognormal latencies (median 500 ms) and a time to first token on half of them.
The process's resident set (``VmRSS`` from /proc/self/status, else ``ru_maxrss``) and the
Python heap that ``tracemalloc`` traces are sampled every 100,000 records; the rings are full
after 180,000 records (1 h), so growth after the 200,000th record should be about zero.

Time: ``record()`` over 1,000 prebuilt requests per batch, 20 warm-up batches, 200 timed
batches, garbage collector off while timing; median and p90 of the batch means, in ns per
call. Also ``window(300 s)`` and ``query(1 h)`` on the full registry.
"""

from __future__ import annotations

import gc
import platform
import random
import resource
import statistics
import time
import tracemalloc
from decimal import Decimal

from relaymw.metrics import MetricsRegistry

ROUTES = ("code-review-production", "chat-production")
VERSIONS = ("v1", "v2", "v3")
TOTAL = 1_000_000
SAMPLE_EVERY = 100_000
STEP_S = 0.02


def rss_kib() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def requests(n: int, seed: int = 7) -> list[tuple[str, str, int, float, float | None, Decimal]]:
    rng = random.Random(seed)
    costs = [Decimal(f"0.000{rng.randint(100, 999)}") for _ in range(50)]
    out = []
    for _ in range(n):
        latency = rng.lognormvariate(6.2, 0.8)
        out.append(
            (
                rng.choice(ROUTES),
                rng.choice(VERSIONS),
                503 if rng.random() < 0.02 else 200,
                latency,
                latency * rng.random() if rng.random() < 0.5 else None,
                rng.choice(costs),
            )
        )
    return out


def memory() -> None:
    reg = MetricsRegistry()
    batch = requests(10_000)
    rec = reg.record
    t = 1_700_000_000.0
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    series: list[tuple[int, int, int]] = [(0, rss_kib(), 0)]
    for i in range(TOTAL):
        route, version, status, latency, ttft, cost = batch[i % 10_000]
        rec(route, version, status, latency, ttft, 300, 200, cost, None, t)
        t += STEP_S
        if (i + 1) % SAMPLE_EVERY == 0:
            series.append((i + 1, rss_kib(), (tracemalloc.get_traced_memory()[0] - base) // 1024))
    tracemalloc.stop()
    print("  records   RSS (KiB)   traced heap (KiB)")
    for n, kib, heap in series:
        print(f"{n:>9,}  {kib:>10,}  {heap:>18,}")
    rss = {n: kib for n, kib, _ in series}
    heap = {n: h for n, _, h in series}
    print(
        f"growth from 200,000 to {TOTAL:,} records: RSS {rss[TOTAL] - rss[200_000]:+,} KiB, "
        f"traced heap {heap[TOTAL] - heap[200_000]:+,} KiB; simulated {TOTAL * STEP_S / 3600:.1f} h"
    )
    for label, fn in (
        ("window(route, version, 300 s)", lambda: reg.window(ROUTES[0], "v1", 300, now=t)),
        ("query(version, last 1 h)", lambda: reg.query("v1", t - 3600, t)),
    ):
        start = time.perf_counter()
        for _ in range(200):
            fn()
        print(f"{label}: {(time.perf_counter() - start) / 200 * 1e6:.0f} µs")


def timing() -> None:
    reg = MetricsRegistry()
    batch = requests(1_000, seed=11)
    rec = reg.record
    t0 = 1_700_000_000.0
    means: list[float] = []
    gc.disable()
    try:
        for b in range(220):
            t = t0 + b
            start = time.perf_counter_ns()
            for route, version, status, latency, ttft, cost in batch:
                rec(route, version, status, latency, ttft, 300, 200, cost, None, t)
            elapsed = time.perf_counter_ns() - start
            if b >= 20:
                means.append(elapsed / len(batch))
        clock_means: list[float] = []
        for b in range(220):
            start = time.perf_counter_ns()
            for route, version, status, latency, ttft, cost in batch:
                rec(route, version, status, latency, ttft, 300, 200, cost, None)
            elapsed = time.perf_counter_ns() - start
            if b >= 20:
                clock_means.append(elapsed / len(batch))
    finally:
        gc.enable()
    for label, m in (("now given", means), ("now from time.time()", clock_means)):
        q = statistics.quantiles(m, n=10)
        print(f"record() ({label}): median {statistics.median(m):.0f} ns, p90 {q[-1]:.0f} ns")


def main() -> None:
    print(
        f"relaymw metrics: Python {platform.python_version()}, {platform.machine()}, "
        f"{len(ROUTES)} routes x {len(VERSIONS)} versions"
    )
    memory()
    timing()


if __name__ == "__main__":
    main()
