"""Choosing a version per request (SPEC §4): weight, cookie and key paths.

Each measured call does what a request costs the middleware before anything is sent
upstream: build the ``RequestView`` from an ASGI scope's headers (with the ASGI adapter's own
function) and call ``Snapshot.choose(route, view)``, including the ``Set-Cookie`` value where
one is due. Calls are timed with ``time.perf_counter_ns`` in batches of ``BATCH`` over
prebuilt requests (distinct users, cookies and keys); figures are per call, and the
percentiles are over batch means. The garbage collector is off while timing, as in
``timeit``. A bare weighted choice (``random`` + ``bisect``) timed the same way in the same
run is the baseline the ratios are taken against.

The cases take turns batch by batch, so on a shared machine every case sees the same load
and the ratios stay comparable. Each batch is also timed with ``time.thread_time_ns`` (CPU
time of this thread: time spent descheduled by other processes is not counted), printed as
the last column.

A ``Set-Cookie`` value is signed once per second and tag (every request in that second gets
the same value); the *afresh* rows give every call a new second, so they pay for the
signature each time: the cost when requests are rarer than one per second per version.

Run: ``python bench/run.py routing`` (or ``tox -e bench -- routing``). Instruction counts of
the same cases, which no other load disturbs: ``python bench/routing_instructions.py --all``.
"""

from __future__ import annotations

import gc
import os
import platform
import random
import statistics
import sys
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Any

from relaymw.asgi import _request_view  # the adapter's own header → RequestView step
from relaymw.config import build_config
from relaymw.routing import bucket
from relaymw.snapshot import CompiledRoute, Snapshot

BATCH = 1_000
BATCHES = 200
WARMUP = 20
TARGET_US = 5.0
SECRET = "bench-cookie-secret-0123456789abcdef"

Call = Callable[[Any], object]
Prepare = Callable[[], Sequence[Any]]


class Case:
    """One timed row. ``prepare()`` (untimed, before each batch) gives the ``BATCH`` arguments
    ``call`` is timed over; ``group`` is ``"base"``, ``"part"``, ``"e2e"`` or ``"choose"``."""

    def __init__(self, label: str, group: str, call: Call, prepare: Prepare) -> None:
        self.label = label
        self.group = group
        self.call = call
        self.prepare = prepare


def document() -> dict[str, Any]:
    upstream = {"base_url": "http://127.0.0.1:9/v1", "api_key": "sk-bench", "protocol": "openai"}
    versions = [
        {"version_tag": tag, "model": "openai/gpt-4.1", "upstream_endpoint": "openai"}
        for tag in ("gpt-v1", "gpt-v2", "gpt-v3")
    ]
    rules = [
        {"version_tag": "gpt-v1", "weight": 90},
        {"version_tag": "gpt-v2", "weight": 5},
        {"version_tag": "gpt-v3", "weight": 5},
    ]

    def route(alias: str, **sticky: Any) -> dict[str, Any]:
        return {
            "model_alias": alias,
            "route_rules": rules,
            "sticky_sessions": {"cookie_name": "hs_model_version", "ttl_seconds": 3600, **sticky},
        }

    return {
        "upstreams": {"openai": upstream},
        "versions": versions,
        "routes": [
            route("plain", enabled=False),
            route("cookie"),
            route("keyed", key="header:x-user-id"),
        ],
        "sticky": {"secret": SECRET},
    }


def scope(user: int, cookie: str | None) -> dict[str, Any]:
    """An ASGI scope as uvicorn hands it over: a typical browser/SDK request's headers."""
    headers = [
        (b"host", b"api.example.com"),
        (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0"),
        (b"accept", b"application/json"),
        (b"accept-encoding", b"gzip, deflate, br"),
        (b"accept-language", b"en-US,en;q=0.9"),
        (b"content-type", b"application/json"),
        (b"content-length", b"412"),
        (b"authorization", f"Bearer sk-user-{user:08d}-abcdefghijklmnop".encode()),
        (b"x-user-id", f"user-{user:08d}".encode()),
        (b"x-request-id", f"req-{user:012x}".encode()),
        (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        (b"x-forwarded-for", b"203.0.113.7, 10.0.0.2"),
    ]
    jar = f"_ga=GA1.2.{user}.1700000000; theme=dark"
    if cookie is not None:
        jar += f"; hs_model_version={cookie}"
    headers.append((b"cookie", jar.encode()))
    return {
        "type": "http",
        "method": "POST",
        "path": "/api/review",
        "scheme": "https",
        "headers": headers,
        "client": ("10.0.0.2", 51234),
    }


def measure(cases: Sequence[Case]) -> list[tuple[list[float], list[float]]]:
    """Per-call wall and CPU µs of each batch of ``BATCH`` calls, for every case: ``BATCHES``
    rounds after warm-up, each round one batch of every case in turn."""
    perf, cpu = time.perf_counter_ns, time.thread_time_ns
    for case in cases:
        for _ in range(WARMUP):
            for arg in case.prepare():
                case.call(arg)
    out: list[tuple[list[float], list[float]]] = [([], []) for _ in cases]
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(BATCHES):
            for case, (wall, used) in zip(cases, out, strict=True):
                call, args = case.call, case.prepare()
                start, start_cpu = perf(), cpu()
                for arg in args:
                    call(arg)
                end_cpu, end = cpu(), perf()
                wall.append((end - start) / len(args) / 1000)
                used.append((end_cpu - start_cpu) / len(args) / 1000)
    finally:
        if enabled:
            gc.enable()
    return out


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cases() -> list[Case]:
    doc = document()
    snap = Snapshot.compile(build_config(doc), doc, "bench", "bench")
    plain, cookie_route, keyed = (snap.routes[a] for a in ("plain", "cookie", "keyed"))
    expires = int(time.time()) + 3600
    no_cookie = [scope(u, None) for u in range(BATCH)]
    with_cookie = []
    for u in range(BATCH):
        tag = cookie_route.table.for_key(f"user-{u:08d}")
        with_cookie.append(scope(u, snap.cookie_codec.encode("cookie", tag, expires)))

    # Sanity: each path takes the branch it is named after.
    assert snap.choose(plain, _request_view(no_cookie[0], snap))[0].reason == "weight"
    first_visit = snap.choose(cookie_route, _request_view(no_cookie[0], snap))
    assert first_visit[0].reason == "weight" and first_visit[1] is not None
    assert snap.choose(cookie_route, _request_view(with_cookie[0], snap))[0].reason == "cookie"
    assert snap.choose(keyed, _request_view(no_cookie[0], snap))[0].reason == "key"

    tags, ends = plain.table.tags, plain.table.ends
    rand = random.Random(1).random
    keys = [f"user-{u:08d}" for u in range(BATCH)]
    indices = list(range(BATCH))

    def same(items: Sequence[Any]) -> Prepare:
        return lambda: items

    def fresh_views(scopes: list[dict[str, Any]]) -> Prepare:
        # New views each batch: a view caches its parsed cookies.
        return lambda: [_request_view(sc, snap) for sc in scopes]

    def e2e(route: CompiledRoute) -> Call:
        return lambda sc: snap.choose(route, _request_view(sc, snap))

    def choose(route: CompiledRoute) -> Call:
        return lambda view: snap.choose(route, view)

    sticky = keyed.sticky
    assert sticky is not None
    second = iter(range(expires, 1 << 62))  # a new second for every call: no reuse

    def afresh(route: CompiledRoute) -> Call:
        return lambda sc: snap.choose(route, _request_view(sc, snap), now=next(second))

    return [
        Case(
            "baseline: random + bisect",
            "base",
            lambda i: tags[bisect_left(ends, int(rand() * 10_000) + 1)],
            same(indices),
        ),
        Case("no-op call", "part", lambda i: i, same(indices)),
        Case("bucket() alone", "part", lambda k: bucket("keyed", k), same(keys)),
        Case(
            "RequestView from 13 headers",
            "part",
            lambda sc: _request_view(sc, snap),
            same(no_cookie),
        ),
        Case(
            "signed Set-Cookie value, afresh",
            "part",
            lambda i: sticky.header("gpt-v1", next(second), True),
            same(indices),
        ),
        Case("weight, sticky off", "e2e", e2e(plain), same(no_cookie)),
        Case("weight + signed Set-Cookie", "e2e", e2e(cookie_route), same(no_cookie)),
        Case("cookie (HMAC-verified)", "e2e", e2e(cookie_route), same(with_cookie)),
        Case("key + signed Set-Cookie", "e2e", e2e(keyed), same(no_cookie)),
        Case("key + signed Set-Cookie, signed afresh", "e2e", afresh(keyed), same(no_cookie)),
        Case("weight, sticky off", "choose", choose(plain), fresh_views(no_cookie)),
        Case("weight + signed Set-Cookie", "choose", choose(cookie_route), fresh_views(no_cookie)),
        Case("cookie (HMAC-verified)", "choose", choose(cookie_route), fresh_views(with_cookie)),
        Case("key + signed Set-Cookie", "choose", choose(keyed), fresh_views(no_cookie)),
    ]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


GROUP_TITLES = {
    "base": "baseline",
    "part": "parts",
    "e2e": "per request: RequestView from headers + choose()",
    "choose": "choose() alone, on a prebuilt RequestView",
}


def _row(label: str, med: str, p90: str, p99: str, ratio: str, cpu: str) -> str:
    return f"| {label:<50} | {med:>9} | {p90:>6} | {p99:>6} | {ratio:>10} | {cpu:>13} |"


def main() -> None:
    print(
        f"relaymw routing: Python {platform.python_version()}, {os.cpu_count()} CPU(s), "
        f"{cpu_model()}, {sys.platform}"
    )
    print(
        f"{BATCH} calls per batch, {BATCHES} batches after {WARMUP} warm-up; µs per call, "
        "percentiles over batch means; gc off while timing"
    )
    all_cases = cases()
    rows = list(zip(all_cases, measure(all_cases), strict=True))
    base = statistics.median(rows[0][1][0])
    print()
    print(_row("path", "median µs", "p90 µs", "p99 µs", "x baseline", "CPU median µs"))
    print(f"|{'-' * 52}|{'-' * 10}:|{'-' * 7}:|{'-' * 7}:|{'-' * 11}:|{'-' * 14}:|")
    worst: dict[str, float] = {}
    group = ""
    for case, (per_call, cpu) in rows:
        if case.group != group:
            group = case.group
            print(_row(f"*{GROUP_TITLES[group]}*", "", "", "", "", ""))
        med = statistics.median(per_call)
        worst[group] = max(worst.get(group, 0.0), med)
        p90, p99 = percentile(per_call, 0.9), percentile(per_call, 0.99)
        print(
            _row(
                case.label,
                f"{med:.3f}",
                f"{p90:.3f}",
                f"{p99:.3f}",
                f"{med / base:.1f}",
                f"{statistics.median(cpu):.3f}",
            )
        )
    print()
    for g in ("e2e", "choose"):
        verdict = "met" if worst[g] <= TARGET_US else "NOT met"
        print(
            f"target ≤ {TARGET_US:g} µs median, {GROUP_TITLES[g]}: {verdict} "
            f"(slowest path {worst[g]:.3f} µs)"
        )
    print(f"load average during the run: {os.getloadavg()[0]:.1f} (1 min)")


if __name__ == "__main__":
    main()
