"""Per-version metrics over sliding windows, in bounded memory (SPEC §6, §7).

Each (route, version) has a ring of time buckets (``bucket_seconds``, default 10) covering
``retention_seconds`` (default 3600), reused as the clock comes round, so memory stays flat.
A bucket holds request/error counts, token and cost sums and a sparse log-bucketed histogram
of latency and of time to first token: bin ``i`` covers ``0.1 ms * 1.05**[i, i+1)`` up to
10 minutes (320 bins) and reports ``2*lo*g/(1+g)`` (g = 1.05), within (g-1)/(g+1) = 2.44 %
of every value in it; quantiles are nearest-rank (``ceil(q*n)``-th smallest) to that precision.

Bucket granularity: ``query(tag, start, end)`` merges every bucket overlapping
``[start, end)``, ``window(route, version, seconds)`` the buckets holding ``now - seconds``
to ``now``. With a :class:`RedisMetricsPublisher`, queries read the sum over every worker
(deltas arrive every second) plus this worker's unsent delta; if Redis cannot be read, this
worker's figures alone. ``record()`` never touches Redis. A question about requests *since*
a moment (a rollout stage's start) asks from :func:`first_bucket_from` that moment: the bucket
the moment falls in also holds requests from before it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from bisect import bisect_right as _bisect
from collections.abc import Callable
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import attrs

__all__ = ["MetricsRegistry", "RedisMetricsPublisher", "VersionMetrics", "is_version_error"]

log = logging.getLogger("relaymw.metrics")

#: ``error`` codes that count against the version: its upstream failed the request.
VERSION_ERRORS = frozenset(
    {
        "upstream_error",
        "upstream_timeout",
        "upstream_unreachable",
        "upstream_truncated",
        "upstream_invalid_response",
    }
)
#: Refused by relaymw before any upstream call: not the version's traffic, not counted (a
#: limit or budget store being down says nothing about the version either).
REFUSED = frozenset(
    {
        "rate_limited",
        "budget_exceeded",
        "cost_limit_exceeded",
        "bad_request",
        "rate_limit_storage_unavailable",
        "budget_store_unavailable",
    }
)
#: Ended by the client: a request of the version, never an error of it.
CLIENT_ENDED = frozenset({"client_disconnected"})

GAMMA = 1.05
MIN_MS = 0.1
MAX_MS = 600_000.0
N_BINS = int(math.log(MAX_MS / MIN_MS) / math.log(GAMMA)) + 1  # latency bins; TTFT bins follow
_LAST = N_BINS - 1
_INV_MIN = 1.0 / MIN_MS
_INV_LG = 1.0 / math.log(GAMMA)


def bin_of(v: float) -> int:
    """The histogram bin of a value (ms): ``floor(log(v / MIN_MS) / log(GAMMA))``, as
    computed in floating point, 0 below ``MIN_MS`` and the last bin from ``MAX_MS`` on."""
    if not v > MIN_MS:  # NaN too
        return 0
    return int(math.log(v * _INV_MIN) * _INV_LG) if v < MAX_MS else _LAST


def _thresholds() -> tuple[float, ...]:
    """For bins 1 .. _LAST, the smallest float that :func:`bin_of` puts in that bin or above
    (it never decreases): ``bisect_right`` on these is :func:`bin_of` to the last ulp, at
    about half the cost of a logarithm and a float-to-int conversion."""
    out = []
    for i in range(1, N_BINS):
        v = MIN_MS * GAMMA**i
        while bin_of(v) >= i:
            v = math.nextafter(v, 0.0)
        while bin_of(v) < i:
            v = math.nextafter(v, math.inf)
        out.append(v)
    return tuple(out)


_THRESHOLDS = _thresholds()
_ZERO = Decimal(0)
_PICO = Decimal(10) ** 12


def is_version_error(status: int, error: str | None) -> bool:
    """Whether a finished request is an error of its version: yes for the upstream failure
    codes (:data:`VERSION_ERRORS`) and a 5xx without a code; no for client-caused 4xx, rate
    limits, budgets, cost caps and client disconnects, whatever the status."""
    if error is None:
        return status >= 500
    if error in VERSION_ERRORS:
        return True
    return error not in REFUSED and error not in CLIENT_ENDED and status >= 500


def bin_value(i: int) -> float:
    """The value reported for bin ``i`` (it minimises the worst relative error in the bin)."""
    return 2.0 * MIN_MS * GAMMA ** (i + 1) / (1.0 + GAMMA)


def _quantile(acc: list[int], q: float, offset: int) -> float | None:
    """Nearest-rank quantile of the histogram ``acc[offset : offset + N_BINS]``."""
    rank, seen = math.ceil(q * sum(acc[offset : offset + N_BINS])), 0
    for i in range(offset, offset + N_BINS) if rank > 0 else ():
        seen += acc[i]
        if seen >= rank:
            return bin_value(i - offset)
    return None


# Keys of a bucket's fields (as Redis hash fields, their decimal strings): histogram bins
# are 0 .. N_BINS - 1 (latency) and N_BINS .. 2 * N_BINS - 1 (TTFT); the rest are negative.
N, ERRORS, PROMPT, COMPLETION, PICO_USD = -1, -2, -3, -4, -5
_ACC = 2 * N_BINS + 5  # a sum of fields is a list: the negative keys index its end


class _Bucket:
    __slots__ = ("ct", "err", "h", "idx", "n", "pico", "pt", "rest")

    def __init__(self) -> None:
        self.h: dict[int, int] = {}  # histogram bin -> count
        self.reset(-1)

    def reset(self, idx: int) -> None:
        self.idx = idx  # the bucket's number: it starts at idx * bucket_seconds
        self.n = self.err = self.pt = self.ct = 0
        # Cost: whole pico-USD as an int (the usual price makes every cost one), plus the sum
        # of costs recorded as Decimal, rounded only when read: the sum stays exact.
        self.pico = 0
        self.rest: Decimal | None = None
        self.h.clear()

    def fields(self) -> dict[int, int]:
        out = dict(self.h)
        out[N], out[ERRORS], out[PROMPT], out[COMPLETION] = self.n, self.err, self.pt, self.ct
        rest = self.rest
        if rest is None:
            out[PICO_USD] = self.pico
        else:
            out[PICO_USD] = int((rest * _PICO + self.pico).to_integral_value(ROUND_HALF_EVEN))
        return out


def _add(acc: list[int], fields: dict[int, int], sign: int = 1) -> None:
    for k, c in fields.items():
        acc[k] += sign * c


@attrs.frozen
class VersionMetrics:
    """A version's figures over ``[start, end)``, bucket granularity; money to 1e-12 USD."""

    version: str
    route: str | None  # None: summed over every route
    start: float
    end: float
    request_count: int = 0
    error_count: int = 0
    error_rate: float = 0.0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_cost_usd: Decimal = _ZERO
    cost_per_token: Decimal = _ZERO  # total cost / (prompt + completion tokens)

    @classmethod
    def of(
        cls, acc: list[int], version: str, route: str | None, start: float, end: float
    ) -> VersionMetrics:
        n, err, pt, ct = acc[N], acc[ERRORS], acc[PROMPT], acc[COMPLETION]
        cost = Decimal(acc[PICO_USD]).scaleb(-12) if acc[PICO_USD] else _ZERO
        return cls(
            version, route, start, end, n, err, err / n if n else 0.0,
            _quantile(acc, 0.50, 0), _quantile(acc, 0.99, 0),
            _quantile(acc, 0.50, N_BINS), _quantile(acc, 0.99, N_BINS),
            pt, ct, cost, cost / (pt + ct) if pt + ct else _ZERO,
        )  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: money as decimal strings, never floats."""
        out = attrs.asdict(self)
        return out | {k: f"{out[k]:f}" for k in ("total_cost_usd", "cost_per_token")}


def first_bucket_from(moment: float, bucket_seconds: int) -> float:
    """The start of the first bucket that begins at or after ``moment`` (epoch seconds)."""
    return float(math.ceil(moment / bucket_seconds) * bucket_seconds)


class MetricsRegistry:
    """Bucket rings per (route, version). ``record()`` is the hot path; thread-safe."""

    def __init__(
        self,
        bucket_seconds: int = 10,
        retention_seconds: int = 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 1 <= bucket_seconds <= retention_seconds:
            raise ValueError("need 1 <= bucket_seconds <= retention_seconds")
        self.bucket_seconds, self.retention_seconds = int(bucket_seconds), int(retention_seconds)
        self.slots = -(-self.retention_seconds // self.bucket_seconds) + 1
        self.publisher: RedisMetricsPublisher | None = None
        self.clock, self.newest = clock, -1  # newest: the newest bucket number seen
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str], list[_Bucket]] = {}

    def record(
        self,
        route: str,
        version: str,
        status: int,
        latency_ms: float,
        ttft_ms: float | None,
        prompt_tokens: int,
        completion_tokens: int,
        cost_usd: Decimal,
        error: str | None,
        now: float | None = None,
    ) -> None:
        """Count one finished request; ``now`` (epoch seconds) defaults to the clock."""
        self.record_pico(
            (route, version),
            status,
            latency_ms,
            ttft_ms,
            prompt_tokens,
            completion_tokens,
            0,
            error,
            cost_usd if cost_usd else None,
            now,
        )

    def record_pico(
        self,
        key: tuple[str, str],
        status: int,
        latency_ms: float,
        ttft_ms: float | None,
        prompt_tokens: int,
        completion_tokens: int,
        pico_usd: int,
        error: str | None,
        cost_usd: Decimal | None = None,
        now: float | None = None,
    ) -> None:
        """:meth:`record` for the relay's hot path: ``key`` is ``(route, version)`` and the
        cost is ``pico_usd`` (whole pico-USD) plus ``cost_usd`` (a Decimal, when the cost has
        a part finer than that)."""
        if error is None:
            bad = status >= 500
        elif error in REFUSED:
            return
        else:
            bad = is_version_error(status, error)
        # bin_of(v), inlined: this runs for every request.
        lb = _bisect(_THRESHOLDS, latency_ms) if latency_ms > MIN_MS else 0
        if ttft_ms is not None:
            tb = (_bisect(_THRESHOLDS, ttft_ms) if ttft_ms > MIN_MS else 0) + N_BINS
        idx = int((self.clock() if now is None else now) // self.bucket_seconds)
        lock = self._lock
        lock.acquire()  # half the cost of "with"; try/finally costs nothing until it raises
        try:
            ring = self._series.get(key)
            if ring is None:
                ring = self._series[key] = [_Bucket() for _ in range(self.slots)]
            b = ring[idx % self.slots]
            if b.idx != idx:
                if b.idx > idx:
                    return  # older than the retention
                b.reset(idx)
                if idx > self.newest:
                    self._prune(idx)
            b.n += 1
            if bad:
                b.err += 1
            h = b.h
            h[lb] = h.get(lb, 0) + 1
            if ttft_ms is not None:
                h[tb] = h.get(tb, 0) + 1
            b.pt += prompt_tokens
            b.ct += completion_tokens
            b.pico += pico_usd
            if cost_usd is not None:
                b.rest = cost_usd if b.rest is None else b.rest + cost_usd
        finally:
            lock.release()

    def record_signal(self, sender: object, **event: Any) -> None:
        """A ``signals.request_finished`` receiver; events without a version are skipped.

        Connect it with ``weak=False`` and keep the object you connected to disconnect it: in
        the compiled build each ``registry.record_signal`` is a new builtin method, which
        blinker's weak reference would let go of at once and cannot find again by identity."""
        if event.get("route") is not None and event.get("version") is not None:
            self.record(
                event["route"], event["version"], event["status"], event["latency_ms"],
                event.get("ttft_ms"), event.get("prompt_tokens") or 0,
                event.get("completion_tokens") or 0, event.get("cost_usd") or _ZERO,
                event.get("error"),
            )  # fmt: skip

    def _prune(self, idx: int) -> None:
        """Forget series with nothing left in the retention (versions no longer routed); once
        per retention period, so a stale series goes within two retentions."""
        self.newest, before = idx, self.newest
        if idx // self.slots != before // self.slots:
            stale = idx - self.slots
            for key in [k for k, g in self._series.items() if max(b.idx for b in g) <= stale]:
                del self._series[key]

    def query(
        self, version_tag: str, start: float, end: float, route: str | None = None
    ) -> VersionMetrics:
        """``version_tag``'s figures on ``route`` (None: summed over every route) from the
        buckets that overlap ``[start, end)`` (epoch seconds)."""
        bs = self.bucket_seconds
        acc = self._merge(version_tag, route, math.floor(start / bs), math.ceil(end / bs) - 1)
        return VersionMetrics.of(acc, version_tag, route, start, end)

    def window(
        self, route: str, version: str, seconds: float, now: float | None = None
    ) -> VersionMetrics:
        """The last ``seconds`` to ``now``: the buckets holding ``now - seconds`` .. ``now``."""
        t, bs = self.clock() if now is None else now, self.bucket_seconds
        acc = self._merge(version, route, math.floor((t - seconds) / bs), math.floor(t / bs))
        return VersionMetrics.of(acc, version, route, t - seconds, t)

    def _merge(self, version: str, route: str | None, first: int, last: int) -> list[int]:
        if self.publisher is not None:
            return self.publisher.merge(version, route, first, last)
        return self.local(version, route, first, last)

    def local(self, version: str, route: str | None, first: int, last: int) -> list[int]:
        """This worker's buckets ``first .. last`` of ``version``, summed as fields."""
        acc = [0] * _ACC
        with self._lock:
            for _, b in self._buckets(version, route, first, last):
                _add(acc, b.fields())
        return acc

    def _buckets(
        self, version: str, route: str | None, first: int, last: int
    ) -> list[tuple[str, _Bucket]]:
        """``(route, bucket)`` for the local buckets ``first .. last`` (lock held)."""
        sel = [(r, g) for (r, v), g in self._series.items() if v == version and route in (None, r)]
        return [(r, b) for r, ring in sel for b in ring if first <= b.idx <= last]


class RedisMetricsPublisher:
    """Adds a registry's bucket deltas to Redis (``HINCRBY``) every ``interval_seconds`` and
    makes the registry's queries read the sum over every worker (same ``bucket_seconds``).

    A bucket is a hash ``{prefix}:{route}:{version}:{bucket_start}`` (TTL: the retention) of
    integer fields: histogram bins ``0``..``319`` (latency) and ``320``..``639`` (TTFT), ``-1``
    requests, ``-2`` errors, ``-3``/``-4`` prompt/completion tokens, ``-5`` cost in pico-USD;
    ``{prefix}:series`` is the set of ``[route, version]`` JSON pairs."""

    def __init__(
        self,
        registry: MetricsRegistry,
        url: str | None = None,
        *,
        client: Any = None,
        prefix: str = "relaymw:metrics",
        interval_seconds: float = 1.0,
    ) -> None:
        if client is None:
            import redis

            client = redis.Redis.from_url(url or "", socket_timeout=1, socket_connect_timeout=1)
        self.registry, self.client, self.prefix = registry, client, prefix
        self.failures = 0  # consecutive failed publishes
        self._sent: dict[tuple[str, str, int], dict[int, int]] = {}  # what Redis has from us
        self._lock = threading.Lock()  # one publish or merge at a time
        self._stop, self.interval_seconds = threading.Event(), interval_seconds
        # Not "_thread": mypyc would name the C field after it, and __thread is a C keyword.
        self._worker: threading.Thread | None = None
        registry.publisher = self

    def start(self) -> RedisMetricsPublisher:
        """Publish every ``interval_seconds`` from a daemon thread."""
        self._worker = threading.Thread(target=self._run, name="relaymw-metrics", daemon=True)
        self._worker.start()
        return self

    def stop(self) -> None:
        """Stop the thread and publish what is left (best effort)."""
        self._stop.set()
        if self._worker is not None:
            self._worker.join(5)
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            self.flush()

    def key(self, route: str, version: str, idx: int) -> str:
        return f"{self.prefix}:{route}:{version}:{idx * self.registry.bucket_seconds}"

    def flush(self) -> bool:
        """Publish every unsent delta now; False (kept for the next try) when Redis fails."""
        reg = self.registry
        with self._lock:
            with reg._lock:
                changed = [
                    ((r, v, b.idx), b.fields())
                    for (r, v), ring in reg._series.items()
                    for b in ring
                    if b.idx >= 0 and b.n != self._sent.get((r, v, b.idx), {}).get(N, 0)
                ]
            if changed:
                try:
                    self._send(changed, reg.retention_seconds + reg.bucket_seconds)
                except Exception as exc:  # any client or network error: keep the delta
                    self.failures += 1
                    if self.failures == 1:
                        log.warning("relaymw: cannot publish metrics to Redis: %r", exc)
                    return False
                self.failures = 0
                self._sent.update(changed)
            for k in [k for k in self._sent if k[2] <= reg.newest - reg.slots]:
                del self._sent[k]
        return True

    def _send(self, changed: list[tuple[tuple[str, str, int], dict[int, int]]], ttl: int) -> None:
        pipe = self.client.pipeline(transaction=True)  # all or nothing: no double counts
        index = f"{self.prefix}:series"
        for (r, v, idx), fields in changed:
            sent, key = self._sent.get((r, v, idx), {}), self.key(r, v, idx)
            for k, c in fields.items():
                if c != sent.get(k, 0):
                    pipe.hincrby(key, str(k), c - sent.get(k, 0))
            pipe.expire(key, ttl)
            pipe.sadd(index, json.dumps([r, v]))
        pipe.expire(index, ttl)
        pipe.execute()

    def merge(self, version: str, route: str | None, first: int, last: int) -> list[int]:
        """Every worker's sum from Redis + this worker's unsent delta (or, when Redis cannot
        be read, this worker's figures alone)."""
        reg = self.registry
        with self._lock:
            try:
                routes = {route} if route is not None else self._routes(version)
                if last - first >= reg.slots:  # older buckets have expired: read the retention
                    now = math.floor(reg.clock() / reg.bucket_seconds)
                    last = min(last, max(reg.newest, now))
                    first = max(first, last - reg.slots + 1)
                pipe = self.client.pipeline(transaction=False)
                for r in routes:
                    for idx in range(first, last + 1):
                        pipe.hgetall(self.key(r, version, idx))
                remote = pipe.execute()
            except Exception as exc:
                log.debug("relaymw: cannot read metrics from Redis: %r", exc)
                return reg.local(version, route, first, last)
            acc = [0] * _ACC
            for h in remote:
                _add(acc, {int(k): int(c) for k, c in h.items()})
            with reg._lock:
                for r, b in reg._buckets(version, route, first, last):
                    _add(acc, b.fields())
                    _add(acc, self._sent.get((r, version, b.idx), {}), -1)
            return acc

    def _routes(self, version: str) -> set[str]:
        """The routes holding figures of ``version``, here or in Redis."""
        with self.registry._lock:
            found = {r for r, v in self.registry._series if v == version}
        for member in self.client.smembers(f"{self.prefix}:series"):
            r, v = json.loads(member)
            if v == version:
                found.add(r)
        return found
