"""Request and token rate limits (SPEC §5) on the ``limits`` library, exact across workers.

Exactness: each hit is one atomic ``limits`` call (a Lua script on Redis), so one limit admits
exactly its amount whatever the number of workers. When several apply, all are tested first,
so a request refused by one consumes nothing from the others; a race remains (another worker
fills a limit between test and hit: the other limits keep that one unit).

Round trips: the algorithms yield their storage calls in batches: the tests; the hits, each
followed by its window (for the headers); at settlement the token counts. On Redis
(:mod:`relaymw.redis_pipeline`) the commands of all concurrent requests share the connection's
writes, so under load a request costs a fraction of a round trip per batch.

Unreachable storage: fail open to a per-process ``memory://`` limiter (same strategy) with one
``store_unavailable`` per outage, or fail closed with 503; the storage is probed again on a
request once a backoff elapsed (``recovery_probe_seconds``, doubling, capped at 2 s).

Each algorithm is a generator yielding lists of storage calls: the sync driver sends each list
straight back (a sync call has already run), the async one awaits the list's calls in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Generator
from typing import Any, NamedTuple, NoReturn, TypeVar

import limits.aio.strategies as aio
import limits.strategies as sync
from limits import RateLimitItem, parse_many
from limits._storage_scheme import SCHEMES
from limits.aio.storage.redis.redispy import RedispyBridge
from limits.errors import StorageError
from limits.storage import StorageTypes, storage_from_string
from limits.util import WindowStats

from relaymw import signals
from relaymw.config import RateLimiting, Route, Version
from relaymw.errors import ConfigError, ConfigIssue, RequestRejected
from relaymw.snapshot import KeyFunction, RequestView

__all__ = ["RateLimiter", "StorageFactory", "make_storage", "redact_uri"]

log = logging.getLogger("relaymw.limiting")

# Builds a ``limits`` storage from a URI: ``redis://...`` (sync) or ``async+redis://...``.
StorageFactory = Callable[[str], StorageTypes]
Headers = list[tuple[str, str]]
T = TypeVar("T")
_Steps = Generator[list[Any], list[Any], T]  # yields storage calls (sync: their results)
MAX_PROBE_DELAY = 2.0  # so the storage is used again within ~2 s of answering again
_STORE_ERRORS = (StorageError, OSError)  # OSError covers socket and asyncio timeouts
_SECRET_HEADER = re.compile(r"auth|key|token|secret|session|cookie")


def make_storage(
    uri: str, *, key_prefix: str = "relaymw:limits", timeout: float = 0.5, pool_size: int = 64
) -> Any:
    """The default :data:`StorageFactory`. Redis gets short socket timeouts and one retry (for
    a stale pooled connection) so that a dead server never stalls requests; an async client
    waits for one of ``pool_size`` connections rather than failing when all are busy. A plain
    ``async+redis://`` storage talks through a :class:`~relaymw.redis_pipeline.PipelinedRedis`
    instead (shared with the budgets' when they use the same server)."""
    scheme = uri.partition("://")[0]
    if scheme in ("async+redis", "async+redis+unix"):
        from relaymw.redis_pipeline import pipelined_client  # redis is an optional dependency

        url = uri.removeprefix("async+").replace("redis+unix", "unix", 1)
        if (client := pipelined_client(url, timeout=timeout)) is not None:
            storage = storage_from_string(
                uri, implementation="redispy", key_prefix=key_prefix, wrap_exceptions=True
            )
            bridge = getattr(storage, "bridge", None)
            if isinstance(bridge, RedispyBridge):  # limits' own client never connected
                bridge.storage = client
                bridge.register_scripts()
                return storage
    options: dict[str, Any] = {"wrap_exceptions": True}
    if "redis" in scheme or "valkey" in scheme:
        timeouts = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        options.update(key_prefix=key_prefix, **timeouts)
        if scheme.startswith("async+"):
            options["implementation"] = "redispy"
        if scheme.removeprefix("async+") in ("redis", "rediss"):
            from redis.asyncio import BlockingConnectionPool
            from redis.asyncio.retry import Retry as AsyncRetry
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            if not scheme.startswith("async+"):
                options["retry"] = Retry(NoBackoff(), 1)
            else:
                options["connection_pool"] = BlockingConnectionPool.from_url(
                    uri.removeprefix("async+"), max_connections=pool_size,
                    timeout=4 * timeout, retry=AsyncRetry(NoBackoff(), 1), **timeouts,
                )  # fmt: skip
    return storage_from_string(uri, **options)


def redact_uri(uri: str) -> str:
    """``uri`` without its password and query: safe for signals, logs and messages."""
    scheme, sep, rest = uri.partition("://")
    netloc, slash, path = rest.partition("/")
    user, at, hosts = netloc.rpartition("@")
    user = user.partition(":")[0]
    return f"{scheme}{sep}{user}{at if user else ''}{hosts}{slash}{path.partition('?')[0]}"


class _Limit(NamedTuple):
    item: RateLimitItem
    scope: str  # "route" | "version"
    name: str  # route alias or version tag
    kind: str  # "requests" | "tokens"

    def ids(self, identity: str) -> tuple[str, str, str, str]:
        return (self.kind, self.scope, self.name, identity)


class _Plan(NamedTuple):
    route: str
    version: str
    requests: list[_Limit]  # tightest first
    tokens: list[_Limit]


class _Backend(NamedTuple):
    storage: Any
    requests: Any  # a limits.strategies or limits.aio.strategies RateLimiter
    tokens: Any


class RateLimiter:
    """Request and token rate limits for one configuration snapshot (build once per snapshot;
    cheap per request). Call :meth:`close` / :meth:`aclose` when the snapshot is replaced."""

    def __init__(
        self, settings: RateLimiting, *, storage_factory: StorageFactory | None = None
    ) -> None:
        base = settings.storage_uri.removeprefix("async+")
        if base.partition("://")[0] not in SCHEMES:
            msg = f"unknown rate limit storage {redact_uri(base)!r}"
            raise ConfigError([ConfigIssue("rate_limiting.storage_uri", msg)])
        self.settings, self.store = settings, redact_uri(base)
        self._uris = {False: base, True: f"async+{base}"}
        self._factory = storage_factory or make_storage
        # A moving window stores one entry per unit, far too heavy per token: token limits
        # count with the sliding-window counter unless fixed windows are configured.
        fixed = settings.strategy == "fixed-window"
        self._strategies = settings.strategy, "fixed-window" if fixed else "sliding-window-counter"
        spec = settings.identity
        secret = spec.startswith("header:") and _SECRET_HEADER.search(spec[7:].lower())
        self._hash = bool(secret) or spec == "api_key" or spec.startswith("cookie:")
        self._items: dict[str, list[RateLimitItem]] = {}
        self._plans: dict[tuple[Any, ...], _Plan | None] = {}
        self._recent: dict[tuple[int, int], tuple[Route, Version, _Plan | None]] = {}
        # "real" and "fallback" backends: sync, and async for the event loop in self._loop.
        self._tables: dict[bool, dict[str, _Backend]] = {False: {}, True: {}}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self.degraded = False  # True while the real storage is down (failing open or closed)
        self._delay = self._first_delay = max(settings.recovery_probe_seconds, 0.05)
        self._next_probe = 0.0

    def identity(self, request: RequestView, func: KeyFunction | None = None) -> str:
        """The request's rate-limit identity; credentials are hashed, never kept raw."""
        raw = request.key(self.settings.identity, func)
        if not raw:
            return "anonymous"
        if self._hash or len(raw) > 128:
            return "sha256:" + hashlib.sha256(raw.encode()).hexdigest()[:32]
        return raw

    def check(
        self, route: Route, version: Version, identity: str, estimated_tokens: int
    ) -> Headers:
        """Admit one request (hit its request limits, test its token limits) or raise 429/503;
        returns the ``RateLimit-*`` headers of the most restrictive request limit."""
        if (plan := self._plan(route, version)) is None:  # fast path: not one storage call
            return []
        return _drive(self._execute(False, self._admit, plan, identity, estimated_tokens))

    async def acheck(
        self, route: Route, version: Version, identity: str, estimated_tokens: int
    ) -> Headers:
        """:meth:`check` inside a running event loop (``limits.aio``: never blocks)."""
        if (plan := self._plan(route, version)) is None:
            return []
        self._bind_loop()
        return await _adrive(self._execute(True, self._admit, plan, identity, estimated_tokens))

    def record_tokens(self, route: Route, version: Version, identity: str, tokens: int) -> None:
        """Count a response's actual tokens against every token limit (never raises)."""
        plan = self._plan(route, version)
        if plan and plan.tokens and tokens > 0:
            with contextlib.suppress(RequestRejected):  # failing closed: nowhere to count
                _drive(self._execute(False, self._record, plan, identity, tokens))

    async def arecord_tokens(
        self, route: Route, version: Version, identity: str, tokens: int
    ) -> None:
        """:meth:`record_tokens` inside a running event loop."""
        plan = self._plan(route, version)
        if plan and plan.tokens and tokens > 0:
            self._bind_loop()
            with contextlib.suppress(RequestRejected):
                await _adrive(self._execute(True, self._record, plan, identity, tokens))

    def close(self) -> None:
        """Close the sync storage's connections."""
        for backend in self._tables[False].values():
            if callable(close := getattr(getattr(backend.storage, "storage", 0), "close", 0)):
                close()
        self._tables[False] = {}

    async def aclose(self) -> None:
        """Close both storages' connections (from the event loop that used them)."""
        for backend in self._tables[True].values():
            client = getattr(getattr(backend.storage, "bridge", 0), "storage", 0)
            if callable(close := getattr(client, "aclose", 0)):
                await close()
            pool = getattr(client, "connection_pool", 0)  # a pool we passed: not closed above
            if callable(disconnect := getattr(pool, "disconnect", 0)):
                await disconnect()
        self._tables[True] = {}
        self.close()

    # --- the algorithms: each yields lists of storage calls and receives their results ------

    def _admit(self, b: _Backend, plan: _Plan, identity: str, est: int) -> _Steps[Headers]:
        # Test first: the token estimate (clamped to the window, so a request larger than the
        # whole limit passes an empty window) and, when several apply, each request limit.
        tests = [(lim, b.tokens, max(1, min(est, lim.item.amount))) for lim in plan.tokens]
        if len(plan.requests) > 1:  # one hit alone is atomic: no test round-trip needed
            tests += [(lim, b.requests, 1) for lim in plan.requests]
        if tests:
            passed = yield [s.test(lim.item, *lim.ids(identity), cost=n) for lim, s, n in tests]
            for (lim, strategy, _), ok in zip(tests, passed, strict=True):
                if not ok:
                    (stats,) = yield [strategy.get_window_stats(lim.item, *lim.ids(identity))]
                    self._reject(plan, lim, stats, identity, est)
        if not plan.requests:
            return []
        calls = []  # each hit, then its window: the headers' figures include this request
        for lim in plan.requests:
            ids = lim.ids(identity)
            calls += [b.requests.hit(lim.item, *ids), b.requests.get_window_stats(lim.item, *ids)]
        results = yield calls
        seen = []  # the most restrictive: fewest left, then the latest reset
        for i, lim in enumerate(plan.requests):
            hit, stats = results[2 * i], results[2 * i + 1]
            if not hit:
                self._reject(plan, lim, stats, identity, est)
            seen.append((stats.remaining, -stats.reset_time, i))
        i = min(seen)[2]
        return _headers(plan.requests[i].item, results[2 * i + 1])

    def _record(self, b: _Backend, plan: _Plan, identity: str, tokens: int) -> _Steps[None]:
        hits = yield [
            b.tokens.hit(lim.item, *lim.ids(identity), cost=min(tokens, lim.item.amount))
            for lim in plan.tokens
        ]
        for lim, counted in zip(plan.tokens, hits, strict=True):
            if not counted and self._strategies[1] != "fixed-window":
                # Moving and sliding windows refuse a cost that does not fit (a fixed window
                # counts it anyway, an overshoot): fill what is left of the window instead.
                ids = lim.ids(identity)
                (stats,) = yield [b.tokens.get_window_stats(lim.item, *ids)]
                if stats.remaining > 0:
                    yield [b.tokens.hit(lim.item, *ids, cost=stats.remaining)]

    def _reject(
        self, plan: _Plan, lim: _Limit, stats: WindowStats, identity: str, est: int
    ) -> NoReturn:
        left = 0 if lim.kind == "requests" else stats.remaining
        headers = _headers(lim.item, stats, left, rejected=True)
        retry = int(headers[0][1])
        limit, what = str(lim.item), "rate limit" if lim.kind == "requests" else "token limit"
        detail = "" if lim.kind == "requests" else f" (an estimated {est} tokens)"
        message = f"{what} {limit} exceeded for {lim.scope} {lim.name}{detail}; retry in {retry} s"
        signals.send(
            signals.rate_limited, self, route=plan.route, version=plan.version,
            identity=identity, limit=limit, retry_after=retry,
        )  # fmt: skip
        raise RequestRejected(429, "rate_limited", message, headers)

    def _plan(self, route: Route, version: Version) -> _Plan | None:
        # By identity first: hashing the settings on every request costs more than the rest of
        # this method. The entry holds route and version, so their ids cannot be reused.
        recent = self._recent.get((id(route), id(version)))
        if recent is not None and recent[0] is route and recent[1] is version:
            return recent[2]
        if len(self._recent) >= 4096:  # configurations come and go: forget the old ones
            self._recent.clear()
        plan = self._plan_for(route, version)
        self._recent[id(route), id(version)] = (route, version, plan)
        return plan

    def _plan_for(self, route: Route, version: Version) -> _Plan | None:
        key = (route.model_alias, version.version_tag, route.rate_limits, route.token_limits,
               version.rate_limits, version.token_limits)  # fmt: skip
        if key not in self._plans:
            found = [
                _Limit(item, scope, name, kind)
                for scope, name, specs, kind in (
                    ("route", route.model_alias, route.rate_limits, "requests"),
                    ("version", version.version_tag, version.rate_limits, "requests"),
                    ("route", route.model_alias, route.token_limits, "tokens"),
                    ("version", version.version_tag, version.token_limits, "tokens"),
                )
                for spec in specs
                for item in self._items.setdefault(spec, parse_many(spec))
            ]
            requests = [x for x in found if x.kind == "requests"]
            requests.sort(key=lambda x: x.item.amount / x.item.get_expiry())
            tokens = [x for x in found if x.kind == "tokens"]
            plan = _Plan(route.model_alias, version.version_tag, requests, tokens)
            self._plans[key] = plan if found else None
        return self._plans[key]

    # --- storages: the real one, the fallback, outages and probes --------------------------

    def _execute(self, is_async: bool, algo: Callable[..., _Steps[T]], *args: Any) -> _Steps[T]:
        """Run ``algo`` on the real storage, or on the fallback while that is down."""
        table = self._tables[is_async]
        backend = table.get("real")
        if backend is None or self.degraded:
            backend = yield from self._select(table, is_async)
        try:
            return (yield from algo(backend, *args))
        except _STORE_ERRORS as exc:
            if backend is table.get("fallback"):
                raise
            self._store_failed(exc)
            return (yield from algo(self._fallback(table, is_async), *args))

    def _select(self, table: dict[str, _Backend], is_async: bool) -> _Steps[_Backend]:
        real = table.get("real")
        if real is not None and not self.degraded:
            return real
        if self.degraded and not self._claim_probe():
            return self._fallback(table, is_async)
        try:
            with self._lock:
                if (real := table.get("real")) is None:
                    storage = self._factory(self._uris[is_async])
                    real = table["real"] = self._backend(storage, is_async)
            if self.degraded and not (yield [real.storage.check()])[0]:
                raise StorageError(ConnectionError("no answer to a probe"))
        except Exception as exc:  # creating or probing: any failure is an unreachable store
            self._store_failed(exc)
            return self._fallback(table, is_async)
        if self.degraded:
            self.degraded = False
            log.warning("rate limit storage %s answers again", self.store)
        return real

    def _backend(self, storage: Any, is_async: bool) -> _Backend:
        strategies: dict[str, Any] = aio.STRATEGIES if is_async else sync.STRATEGIES
        requests, tokens = self._strategies
        return _Backend(storage, strategies[requests](storage), strategies[tokens](storage))

    def _fallback(self, table: dict[str, _Backend], is_async: bool) -> _Backend:
        if not self.settings.fail_open:
            retry = str(max(1, math.ceil(self._next_probe - time.monotonic())))
            message = f"rate limit storage unavailable; retry in {retry} s"
            code = "rate_limit_storage_unavailable"
            raise RequestRejected(503, code, message, [("Retry-After", retry)])
        with self._lock:
            if (fallback := table.get("fallback")) is None:
                memory = storage_from_string("async+memory://" if is_async else "memory://")
                fallback = table["fallback"] = self._backend(memory, is_async)
        return fallback

    def _store_failed(self, exc: BaseException) -> None:
        """The real storage failed: start (or prolong) an outage, signalled once."""
        error = f"{type(exc).__name__}: {exc}"
        userinfo = self.settings.storage_uri.partition("://")[2].partition("/")[0]
        if password := userinfo.rpartition("@")[0].partition(":")[2]:
            error = error.replace(password, "***")
        with self._lock:
            started, self.degraded = not self.degraded, True
            if started:
                self._delay = self._first_delay
            self._next_probe = time.monotonic() + self._delay
        if started:
            then = "in-memory limits" if self.settings.fail_open else "answering 503"
            log.warning("rate limit storage %s unavailable (%s): %s", self.store, error, then)
            signals.send(
                signals.store_unavailable, self, store=self.store, error=error,
                component="rate_limits",
            )  # fmt: skip

    def _claim_probe(self) -> bool:
        """True for the one caller that should probe now; schedules the next probe."""
        with self._lock:
            now = time.monotonic()
            if now < self._next_probe:
                return False
            self._delay = min(self._delay * 2, max(self._first_delay, MAX_PROBE_DELAY))
            self._next_probe = now + self._delay
            return True

    def _bind_loop(self) -> None:
        if self._loop is not (loop := asyncio.get_running_loop()):  # connections are per loop
            for backend in self._tables[True].values():
                client = getattr(getattr(backend.storage, "bridge", 0), "storage", 0)
                # A PipelinedRedis (not imported here: redis is optional): its connection is
                # the old loop's.
                if callable(detach := getattr(client, "detach", None)):
                    detach()
            self._tables[True], self._loop = {}, loop


def _drive(steps: _Steps[T]) -> T:
    """Run steps on a sync storage: each yielded list holds the calls' results already."""
    try:
        results = next(steps)
        while True:
            results = steps.send(results)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def _adrive(steps: _Steps[T]) -> T:
    """Run steps on an async storage: await each yielded list's calls in order (at c=1 that is
    a round trip more than awaiting them together, but under load it is the cheapest in CPU:
    other requests fill the writes) and send back their results, or throw the first error in,
    so that the steps handle it as they do with the sync driver."""
    try:
        calls = next(steps)
        while True:
            results: list[Any] = []
            try:
                for call in calls:
                    results.append(await call)
            except Exception as exc:
                for unsent in calls[len(results) + 1 :]:  # the storage failed: not run at all
                    unsent.close()
                calls = steps.throw(exc)
            else:
                calls = steps.send(results)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


def _headers(
    item: RateLimitItem, stats: WindowStats, left: int = -1, rejected: bool = False
) -> Headers:
    """``RateLimit-*`` (reset in seconds) and ``X-RateLimit-*`` (reset as epoch seconds); on a
    rejection ``Retry-After`` first, at least 1 s, at most one window."""
    now, reset_at, left = time.time(), stats.reset_time, stats.remaining if left < 0 else left
    wait, window = math.ceil(reset_at - now), item.get_expiry()
    if wait <= 0 and left < item.amount:  # limits' sliding counter says 0 on a window's edge
        wait = window
    reset = min(max(int(rejected), wait), window)
    epoch = math.ceil(reset_at) if reset == math.ceil(reset_at - now) else math.ceil(now + reset)
    limit, remaining = str(item.amount), str(max(0, left))
    retry = [("Retry-After", str(reset))] if rejected else []
    return [
        *retry, ("RateLimit-Limit", limit), ("RateLimit-Remaining", remaining),
        ("RateLimit-Reset", str(reset)), ("X-RateLimit-Limit", limit),
        ("X-RateLimit-Remaining", remaining), ("X-RateLimit-Reset", str(epoch)),
    ]  # fmt: skip
