"""Soak: a million requests through the relaymw gateway; its memory must stay flat.

The gateway of ``bench_sidebyside.py`` with everything on (routing sticky by key, signed
cookies, rate and token limits, a budget, a cost cap, a health check, a Prometheus sink, a
signal receiver) runs under uvicorn on CPU 0 with FakeLLM; the closed-loop load generator
(c = 16, 1,024 users, one request in 8 streamed) runs on CPU 1. After every 1/50 of the
requests the relay process's RSS and open file descriptors are read from ``/proc``.

Verdict: no request may fail; the Prometheus sink and a ``request_finished`` receiver must
each have recorded every request exactly once; after the warm-up, RSS may grow by at most
``MAX_GROWTH_MIB`` until the end, Python's heap (objects the garbage collector tracks, memory
blocks allocated: read by the relay process itself between segments, when nothing is in
flight) by at most ``MAX_OBJECT_GROWTH`` / ``MAX_BLOCK_GROWTH`` (medians of five samples),
and the open descriptors by at most ``MAX_FD_GROWTH``.

Two settings differ from the side-by-side's, so that what the relay legitimately holds is
steady after a short warm-up and whatever still grows is a leak: the request rate limit is
``SOAK_RATE_LIMIT`` (per second, not per minute: a moving window keeps one entry per request
of its period, ~120 bytes each with ``memory://`` storage, so over a minute it would follow
the throughput, about 11 MiB at 1,000 req/s, and a run whose speed changes would look like a
leak), and the per-version metrics keep ``METRICS_RETENTION`` seconds instead of an hour (the
ring of 10 s buckets would otherwise grow for the first hour, by ~10 KiB per bucket and
version at these rates; ``bench_metrics_memory.py`` shows it flat once full). The warm-up
ends at the first sample past both 20% of the requests and ``WARMUP_SECONDS``.

Why 4 MiB: over the 800,000 requests after the warm-up a leak of 5 bytes per request would
add 4 MiB, and anything a request leaves behind in Python (an exchange, a dict, a task: each
hundreds of bytes) would add hundreds of MiB, and show in the heap counts first. What may
still move RSS after the warm-up is the allocator settling (arenas kept, fragmentation):
measured here over 600,000 requests (~900 req/s, 2 busy vCPUs), RSS stayed within 58.99 and
59.34 MiB after the warm-up, the gc-tracked objects within 62,900 and 64,600.

    tox -e soak                                        # 1,000,000 requests (~900 req/s
                                                       # on 2 busy vCPUs: ~20 minutes)
    RELAYMW_SOAK_REQUESTS=100000 python bench/soak.py  # shorter (memory judged when the
                                                       # warm-up ends before 60% of the run)
    RELAYMW_SOAK_GUARD=redis python bench/soak.py      # limits and budget on Redis

Exit status 1 when the verdict fails, so ``tox -e soak`` fails with it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    USERS,
    Bench,
    Sample,
    Target,
    chat_body,
    http_request,
    remove_keys,
    sigterm_as_exit,
    verify_redis,
)
from machine import LOAD_CPU, can_pin, machine_line, open_fds, rss_kib  # noqa: E402
from servers import ALIAS, ANSWERED, METRICS_PATH, REDIS_URL, counters  # noqa: E402

REQUESTS = 1_000_000
SAMPLES = 50
CONCURRENCY = 16
STREAM_EVERY = 8  # one user in 8 asks for a stream
WARMUP_SHARE = 0.2
SOAK_RATE_LIMIT = "50/second"  # per API key: 1,024 keys allow 51,200 req/s
METRICS_RETENTION = 30  # seconds of per-version metric buckets (10 s each)
WARMUP_SECONDS = 45.0  # the metric rings full, every window and pool filled
MAX_JUDGED_START = 0.6  # shorter runs, whose warm-up ends later than this, are not judged
MAX_GROWTH_MIB = 4.0
MAX_FD_GROWTH = 64  # connections in flight or closing when a sample is taken
HEAP_SAMPLES = 5
MAX_OBJECT_GROWTH = 5_000  # reached by one object kept per 160 requests over 800,000
MAX_BLOCK_GROWTH = 20_000
GUARDS = {"memory": "memory://", "redis": REDIS_URL}


class Point(NamedTuple):
    requests: int
    elapsed: float  # s since the first request
    rps: float  # of the segment that ended here
    rss_kib: int
    fds: int
    blocks: float  # memory blocks Python has allocated
    objects: float  # objects the garbage collector tracks
    p50: float
    p99: float
    errors: int


def soak_requests(port: int) -> list[str]:
    return [
        http_request(port, "/v1/chat/completions", chat_body(ALIAS, user % STREAM_EVERY == 0), user)
        for user in range(USERS)
    ]


def warmup_end(points: Sequence[Point], total: int) -> int | None:
    """Index of the first sample past the warm-up, or None when the run ended first."""
    for i, p in enumerate(points):
        if p.requests >= WARMUP_SHARE * total and p.elapsed >= WARMUP_SECONDS:
            return i
    return None


class Soak(NamedTuple):
    points: list[Point]
    counted: float  # requests the Prometheus sink counted during the load
    received: float  # request_finished events the receiver got during the load


def run(total: int, guard: str) -> Soak:
    storage = GUARDS[guard]
    target = Target(
        "relaymw-gateway", "gateway-full", "/v1/chat/completions", ALIAS, ("json", "stream"),
        relay=True, expect_headers=("x-relaymw-version", "ratelimit-limit"),
        uses_redis=guard == "redis", answer_contains=ANSWERED,
    )  # fmt: skip
    segment = max(1, total // SAMPLES)
    prefix = f"relaymw-soak:{uuid.uuid4().hex[:8]}"
    points: list[Point] = []
    pinned = can_pin()
    previous_affinity = os.sched_getaffinity(0) if pinned else None
    with tempfile.TemporaryDirectory(prefix="relaymw-soak-") as logdir:
        settings = {
            "storage": storage,
            "prefix": prefix,
            "rate_limit": SOAK_RATE_LIMIT,
            "metrics_retention": str(METRICS_RETENTION),
        }
        bench = Bench(Path(logdir), pinned=pinned, settings=settings)
        try:
            if pinned:
                os.sched_setaffinity(0, {LOAD_CPU})
            bench.start([target.server])
            for mode in target.modes:
                bench.check(target, mode)
            verify_redis(storage, prefix)
            pid, server = bench.pid(target.server), target.server
            before = counters(bench.get(server, METRICS_PATH))
            requests = soak_requests(bench.servers[server][1])
            points.append(_point(0, 0.0, pid, before))
            print(_header())
            print(_row(points[-1]))
            done, elapsed = 0, 0.0
            while done < total:
                n = min(segment, total - done)
                # Each segment starts at a different user, so all of them keep being used.
                offset = done % len(requests)
                window = {"count": n}
                result = bench.drive(
                    target, requests[offset:] + requests[:offset], CONCURRENCY, window,
                    timeout=600,
                )  # fmt: skip
                sample = bench.sample(target, result)
                done += n
                elapsed += sample.elapsed
                time.sleep(0.2)  # let the server close the generator's connections
                after = counters(bench.get(server, METRICS_PATH))
                points.append(_point(done, elapsed, pid, after, sample))
                print(_row(points[-1]), flush=True)
        finally:
            bench.stop()
            if previous_affinity is not None:
                os.sched_setaffinity(0, previous_affinity)
            with contextlib.suppress(Exception):
                remove_keys(storage, prefix)
    return Soak(
        points, after["counted"] - before["counted"], after["received"] - before["received"]
    )


def _point(
    done: int, elapsed: float, pid: int, seen: dict[str, float], sample: Sample | None = None
) -> Point:
    return Point(
        done, elapsed, sample.rps if sample else 0.0, rss_kib(pid), open_fds(pid),
        seen["blocks"], seen["objects"], sample.p50 if sample else 0.0,
        sample.p99 if sample else 0.0, sample.errors if sample else 0,
    )  # fmt: skip


def _header() -> str:
    return (
        f"{'requests':>10} {'elapsed s':>9} {'req/s':>7} {'RSS MiB':>8} {'fds':>5} "
        f"{'py blocks':>10} {'gc objects':>10} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}"
    )


def _row(p: Point) -> str:
    return (
        f"{p.requests:>10,} {p.elapsed:>9.1f} {p.rps:>7.0f} {p.rss_kib / 1024:>8.2f} {p.fds:>5} "
        f"{p.blocks:>10,.0f} {p.objects:>10,.0f} {p.p50:>7.2f} {p.p99:>7.2f} {p.errors:>6}"
    )


def verdict(soak: Soak, total: int) -> tuple[bool, list[str]]:
    """Whether every request succeeded and was recorded once and memory stayed flat after the
    warm-up, with the lines that say so."""
    points = soak.points
    last = points[-1]
    errors = sum(p.errors for p in points)
    recorded = soak.counted == soak.received == last.requests
    lines = [
        f"throughput: {last.requests / last.elapsed:,.0f} req/s over {last.requests:,} requests "
        f"in {last.elapsed:.0f} s; {errors} failed",
        f"recorded: Prometheus sink {soak.counted:,.0f}, request_finished receiver "
        f"{soak.received:,.0f} (each must be {last.requests:,}): "
        + ("exactly once" if recorded else "MISMATCH"),
    ]
    ok = errors == 0 and recorded
    start = warmup_end(points, total)
    if start is None or points[start].requests > MAX_JUDGED_START * total:
        lines.append(
            f"memory NOT JUDGED: the warm-up (≥ {WARMUP_SHARE:.0%} of the requests and "
            f"≥ {WARMUP_SECONDS:g} s) did not end before {MAX_JUDGED_START:.0%} of the run; "
            "run more requests (RELAYMW_SOAK_REQUESTS)"
        )
        return ok, lines
    base = points[start]
    growth = (last.rss_kib - base.rss_kib) / 1024
    peak = max(p.rss_kib for p in points[start:]) / 1024
    per_request = growth * 1024 * 1024 / max(1, last.requests - base.requests)
    # The heap counts move by a few thousand with what is in flight: compare medians.
    head, tail = points[start : start + HEAP_SAMPLES], points[-HEAP_SAMPLES:]
    objects = statistics.median(p.objects for p in tail) - statistics.median(
        p.objects for p in head
    )
    blocks = statistics.median(p.blocks for p in tail) - statistics.median(p.blocks for p in head)
    checks = {
        "RSS": growth <= MAX_GROWTH_MIB,
        "heap": objects <= MAX_OBJECT_GROWTH and blocks <= MAX_BLOCK_GROWTH,
        "descriptors": last.fds - base.fds <= MAX_FD_GROWTH,
    }
    word = {True: "flat", False: "GROWING"}
    lines += [
        f"warm-up ended at {base.requests:,} requests ({base.elapsed:.0f} s): "
        f"RSS {base.rss_kib / 1024:.2f} MiB",
        f"RSS from there to the end: {growth:+.2f} MiB (peak {peak:.2f} MiB), "
        f"{per_request:+.2f} bytes per request; limit +{MAX_GROWTH_MIB:g} MiB: "
        + word[checks["RSS"]],
        f"Python heap, median of the last {HEAP_SAMPLES} samples vs the first {HEAP_SAMPLES} "
        f"after the warm-up: {objects:+,.0f} gc-tracked objects (limit +{MAX_OBJECT_GROWTH:,}), "
        f"{blocks:+,.0f} allocated blocks (limit +{MAX_BLOCK_GROWTH:,}): " + word[checks["heap"]],
        f"open descriptors {base.fds} -> {last.fds} (limit +{MAX_FD_GROWTH}): "
        + word[checks["descriptors"]],
    ]
    return ok and all(checks.values()), lines


def main() -> None:
    # No options: the environment variables above set the run; --help shows this docstring.
    argparse.ArgumentParser(
        prog="python bench/soak.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).parse_args()
    total = int(os.environ.get("RELAYMW_SOAK_REQUESTS", REQUESTS))
    guard = os.environ.get("RELAYMW_SOAK_GUARD", "memory")
    if guard not in GUARDS:
        raise SystemExit(f"RELAYMW_SOAK_GUARD must be one of {', '.join(GUARDS)}, not {guard!r}")
    print(
        f"relaymw soak: {total:,} requests through the gateway (everything on, guards on "
        f"{GUARDS[guard]}, rate limit {SOAK_RATE_LIMIT} per API key, metrics kept "
        f"{METRICS_RETENTION} s), c={CONCURRENCY}, "
        f"{USERS:,} users, 1 request in {STREAM_EVERY} "
        f"streamed; RSS of the relay process every {max(1, total // SAMPLES):,} requests"
    )
    print(f"machine: {machine_line()}")
    try:
        with sigterm_as_exit():
            soak = run(total, guard)
    except KeyboardInterrupt:
        print("\ninterrupted (all soak processes stopped)")
        raise SystemExit(130) from None
    ok, lines = verdict(soak, total)
    print("\n".join(lines))
    print("soak: PASSED" if ok else "soak: FAILED")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
