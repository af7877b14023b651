"""Budgets: spend per scope (``global``, ``route:ALIAS``, each ``identity``) per UTC day or month.

A call's worst-case cost is *reserved* against every applicable budget, all or nothing, before
it is sent, and *reconciled* to its actual cost (or *released*) when it ends. A budget period is
one hash of integer nano-dollars, ``spent`` (settled) and ``reserved`` (in flight); a reservation
is admitted only if ``spent + reserved + amount <= limit`` for every applicable budget, checked
and applied in one step (a Lua script in Redis, a lock in memory). Settling swaps a reservation
``r`` for the actual cost ``a <= r``, so ``spent + reserved <= limit`` always holds: once all
calls have settled, ``spent <= limit`` and ``spent`` is exactly the sum of the actual costs.

Cost per call: the counters that apply to a (route, identity) are worked out once per period
and kept; reserving is one script call (one EVALSHA on Redis) and so is settling. The async
path talks through a :class:`~relaymw.redis_pipeline.PipelinedRedis`, shared with the rate
limits' when both use the same server, so those calls ride in the same writes as theirs.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Awaitable, Sequence
from datetime import datetime, timedelta, timezone
from decimal import ROUND_CEILING, Decimal
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import attrs

from relaymw import signals
from relaymw.config import Budget
from relaymw.errors import RequestRejected

__all__ = ["BudgetLedger", "BudgetScopes", "Reservation", "identity_scope"]

log = logging.getLogger("relaymw.budgets")

NANO = Decimal(1_000_000_000)  # counters hold integer nano-dollars: exact in Lua below $9M
EXPIRY_SLACK = timedelta(days=2)  # a counter outlives its period by this much
# Redis connections per client: a second to connect or answer; when all 100 are busy, callers
# wait for one (up to 10 s): a full pool is back-pressure, not an outage to fail open on.
_POOL = {"max_connections": 100, "timeout": 10.0, "socket_timeout": 1, "socket_connect_timeout": 1}
Period = Literal["day", "month"]

# KEYS: one hash per budget. ARGV[1]: amount; ARGV[1+i]: limit of KEYS[i]; ARGV[1+n+i]: expiry.
# Returns {0, 0} when reserved, else {i, used} for the first budget that cannot take it.
_RESERVE = """
local amount, n = tonumber(ARGV[1]), #KEYS
for i = 1, n do
  local v = redis.call('HMGET', KEYS[i], 'spent', 'reserved')
  local used = (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0)
  if used + amount > tonumber(ARGV[1 + i]) then return {i, used} end
end
for i = 1, n do
  redis.call('HINCRBY', KEYS[i], 'reserved', ARGV[1])
  redis.call('EXPIREAT', KEYS[i], ARGV[1 + n + i])
end
return {0, 0}
"""
# ARGV[1]: -reserved; ARGV[2]: actual; ARGV[2+i]: expiry; ARGV[2+n+i]: "fraction=threshold ...".
# Returns {i, fraction, spent, ...}: the alert thresholds crossed for the first time.
_SETTLE = """
local n, fired = #KEYS, {}
for i = 1, n do
  redis.call('HINCRBY', KEYS[i], 'reserved', ARGV[1])
  local spent = redis.call('HINCRBY', KEYS[i], 'spent', ARGV[2])
  redis.call('EXPIREAT', KEYS[i], ARGV[2 + i])
  for frac, at in string.gmatch(ARGV[2 + n + i], '([^%s=]+)=(%d+)') do
    if spent >= tonumber(at) and redis.call('HSETNX', KEYS[i], 'alert:' .. frac, 1) == 1 then
      table.insert(fired, i); table.insert(fired, frac); table.insert(fired, spent)
    end
  end
end
return fired
"""


def identity_scope(identity: str) -> str:
    """The scope of an identity's budget: a hash, never the raw key, in Redis and signals."""
    return "identity:" + hashlib.sha256(identity.encode()).hexdigest()[:16]


@attrs.frozen
class BudgetScopes:
    """Who a request is charged to: its route alias and its identity (None: not known)."""

    route: str | None = None
    identity: str | None = None


@attrs.frozen
class _Entry:
    """One applicable budget in one period: its counter's key, limit and alert thresholds."""

    key: str
    scope: str
    budget: Budget
    resets_at: datetime
    expire_at: int  # when the counter is dropped (unix seconds)
    limit: int  # nano-dollars
    thresholds: tuple[tuple[str, int], ...]  # (fraction, nano-dollars) for each alert

    @property
    def alerts(self) -> str:
        """The thresholds as the settle script reads them: "0.5=500000000 0.8=800000000"."""
        return " ".join(f"{fraction}={at}" for fraction, at in self.thresholds)


@attrs.define(eq=False)
class Reservation:
    """A worst case held against budgets; settled once, by reconcile or release."""

    amount: Decimal
    counters: _Counters = attrs.field(repr=False)
    nano: int = attrs.field(repr=False)
    backend: Literal["redis", "memory"]
    settled: bool = False
    actual: Decimal | None = None
    actual_nano: int = attrs.field(default=0, repr=False)


@attrs.frozen
class _Counters:
    """The budgets that apply to one (route, identity) in the current periods, and the parts
    of the scripts' arguments that do not depend on the call (kept until ``until``)."""

    entries: tuple[_Entry, ...]
    keys: list[str]
    limits_and_expiry: list[int]  # the reserve script's ARGV after the amount
    expiry_and_alerts: list[Any]  # the settle script's ARGV after the two amounts
    until: float  # unix time of the first period end

    @classmethod
    def of(cls, entries: tuple[_Entry, ...]) -> _Counters:
        expiry = [e.expire_at for e in entries]
        until = min(e.resets_at for e in entries).timestamp()
        keys = [e.key for e in entries]
        return cls(entries, keys, [*(e.limit for e in entries), *expiry],
                   [*expiry, *(e.alerts for e in entries)], until)  # fmt: skip


# the counters, the amount and in nano-dollars, and "now" when the caller gave it
_Plan = tuple[_Counters, Decimal, int, datetime | None]
MAX_CACHED_SCOPES = 10_000  # (route, identity) pairs whose counters are kept
_UNKNOWN: Any = object()


def _to_nano(amount: Decimal) -> int:
    if amount < 0:
        raise ValueError(f"a cost cannot be negative: {amount}")
    return int((amount * NANO).to_integral_value(ROUND_CEILING))


def _period(period: Period, now: datetime) -> tuple[str, datetime]:
    """The period's key (``2026-11`` or ``2026-11-24``) and when it resets."""
    if period == "day":
        day = datetime(now.year, now.month, now.day, tzinfo=timezone.utc)
        return f"{now:%Y-%m-%d}", day + timedelta(days=1)
    nxt = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=timezone.utc)
    return f"{now:%Y-%m}", nxt


def _utc(now: datetime | None) -> datetime:
    now = now or datetime.now(timezone.utc)
    return now.replace(tzinfo=timezone.utc) if now.tzinfo is None else now.astimezone(timezone.utc)


class _Memory:
    """The in-process ledger (and the fallback while Redis is down): the scripts' steps."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hashes: dict[str, dict[str, int]] = {}  # key -> {spent, reserved, alert:F}
        self.expiry: dict[str, int] = {}
        self.next_sweep = 0.0

    def reserve(self, entries: Sequence[_Entry], nano: int) -> list[int]:
        with self.lock:
            if (now := time.time()) >= self.next_sweep:  # hourly, forget periods long over
                self.next_sweep = now + 3600
                for key in [k for k, at in self.expiry.items() if at <= now]:
                    del self.hashes[key], self.expiry[key]
            for i, e in enumerate(entries, 1):
                h = self.hashes.get(e.key, {})
                used = h.get("spent", 0) + h.get("reserved", 0)
                if used + nano > e.limit:
                    return [i, used]
            for e in entries:
                self.hashes.setdefault(e.key, {"spent": 0, "reserved": 0})["reserved"] += nano
                self.expiry[e.key] = e.expire_at
            return [0, 0]

    def settle(self, entries: Sequence[_Entry], reserved: int, actual: int) -> list[Any]:
        fired: list[Any] = []
        with self.lock:
            for i, e in enumerate(entries, 1):
                h = self.hashes.setdefault(e.key, {"spent": 0, "reserved": 0})
                h["reserved"], h["spent"] = h["reserved"] - reserved, h["spent"] + actual
                self.expiry[e.key] = e.expire_at
                for frac, at in e.thresholds:
                    if h["spent"] >= at and not h.get("alert:" + frac):
                        h["alert:" + frac] = 1
                        fired += [i, frac, h["spent"]]
        return fired


class BudgetLedger:
    """Budgets in memory (``memory://``, one process) or Redis (``redis://``, shared). While
    Redis is unreachable (tried again every ``probe_interval`` s) budgets are kept in memory if
    ``fail_open``, else requests get a 503; ``store_unavailable`` is sent once per outage."""

    def __init__(
        self,
        budgets: Sequence[Budget],
        storage_uri: str = "memory://",
        *,
        fail_open: bool = True,
        prefix: str = "relaymw:budget",
        sender: Any = None,
        probe_interval: float = 1.0,
    ) -> None:
        self.budgets, self.fail_open, self.prefix = tuple(budgets), fail_open, prefix
        self.probe_interval = probe_interval
        url = urlsplit(storage_uri)  # described without credentials
        host = f"{url.hostname}:{url.port}" if url.port else url.hostname or ""
        self.store, self._uri = urlunsplit((url.scheme, host, url.path, "", "")), storage_uri
        self._redis = storage_uri.startswith(("redis://", "rediss://", "unix://"))
        if not self._redis and not storage_uri.startswith("memory://"):
            raise ValueError(f"unsupported budget storage {self.store!r}: memory:// or redis://")
        self._sender = self if sender is None else sender
        self._memory = _Memory()
        self._errors: tuple[type[Exception], ...] = (OSError,)
        self._clients: dict[bool, tuple[Any, Any, Any]] = {}  # async? -> client, scripts
        self._counters: dict[tuple[str, str | None, str | None], Any] = {}  # _Counters | None
        if self._redis:  # no connection is made yet
            import redis.asyncio  # an optional dependency: imported for redis:// storage only

            from relaymw.redis_pipeline import pipelined_client

            # Unreachable (fail open or closed); any other error is a bug or misconfiguration.
            self._errors = (OSError, redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError)
            for lib in (redis, redis.asyncio):
                client = pipelined_client(storage_uri, timeout=_POOL["socket_timeout"])
                if lib is redis or client is None:
                    pool = lib.BlockingConnectionPool.from_url(storage_uri, **_POOL)
                    client = lib.Redis.from_pool(pool)
                scripts = client.register_script(_RESERVE), client.register_script(_SETTLE)
                self._clients[lib is redis.asyncio] = (client, *scripts)
        self._down_until, self._down = 0.0, False
        self._failed_at = 0.0  # when Redis last failed: earlier calls cannot end an outage
        # Pooled connections that died with the old server fail once more after a restart:
        # a failure this soon after recovery belongs to the same outage (one signal each).
        self._recovered_at = float("-inf")
        self._lock = threading.Lock()

    def reserve(
        self, scopes: BudgetScopes, amount: Decimal, now: datetime | None = None
    ) -> Reservation | None:
        """Reserve ``amount`` (the worst case) against every applicable budget, all or nothing;
        None when no budget applies. Over a limit: :class:`RequestRejected` 402."""
        plan = self._plan(scopes, amount, now)
        if plan is None:
            return None
        return self._admit(plan, self._run(1, *_reserve_call(plan)) if self._use_redis() else None)

    async def areserve(
        self, scopes: BudgetScopes, amount: Decimal, now: datetime | None = None
    ) -> Reservation | None:
        """:meth:`reserve` on ``redis.asyncio``."""
        plan = self._plan(scopes, amount, now)
        if plan is None:
            return None
        result = await self._asend(1, *_reserve_call(plan)) if self._use_redis() else None
        return self._admit(plan, result)

    def reconcile(self, reservation: Reservation | None, actual: Decimal) -> None:
        """Replace the reservation by the ``actual`` cost (recorded even when higher). A
        reservation settles once: later calls are ignored."""
        if reservation is not None and self._claim(reservation, actual):
            shared = reservation.backend == "redis"
            self._settled(reservation, self._run(2, *_settle_call(reservation)) if shared else None)

    async def areconcile(self, reservation: Reservation | None, actual: Decimal) -> None:
        """:meth:`reconcile` on ``redis.asyncio``."""
        await self.areconcile_soon(reservation, actual)

    def areconcile_soon(self, reservation: Reservation | None, actual: Decimal) -> Awaitable[None]:
        """:meth:`areconcile`, its Redis command queued before this returns: on a pipelined
        connection it leaves with the commands sent next (one write, one round trip for both).
        Await the result to finish it (reading the reply, sending the alerts)."""
        if reservation is None or not self._claim(reservation, actual):
            return _nothing()
        if reservation.backend != "redis":
            self._settled(reservation, None)
            return _nothing()
        return self._asettled(reservation, self._asend(2, *_settle_call(reservation)))

    async def _asettled(self, reservation: Reservation, reply: Awaitable[Any]) -> None:
        self._settled(reservation, await reply)

    def release(self, reservation: Reservation | None) -> None:
        """Give a reservation back: its call failed or was abandoned before costing anything."""
        self.reconcile(reservation, Decimal(0))

    async def arelease(self, reservation: Reservation | None) -> None:
        await self.areconcile(reservation, Decimal(0))

    def spent(self, scope: str, now: datetime | None = None) -> Decimal:
        """Settled spend of ``scope`` in the period of its budget containing ``now``."""
        return self.balance(scope, now)[0]

    def close(self) -> None:
        if self._clients:
            self._clients[False][0].close()

    async def aclose(self) -> None:
        if self._clients:
            await self._clients[True][0].aclose()

    def _plan(self, scopes: BudgetScopes, amount: Decimal, now: datetime | None) -> _Plan | None:
        """The counters a request is checked against in this period, and its amount."""
        key = (self.prefix, scopes.route, scopes.identity)
        counters = self._counters.get(key, _UNKNOWN) if now is None else _UNKNOWN
        if counters is _UNKNOWN or (counters is not None and time.time() >= counters.until):
            counters = self._find_counters(scopes, _utc(now))
            if now is None:  # "no budget applies" holds in every period
                if len(self._counters) >= MAX_CACHED_SCOPES:
                    self._counters.clear()
                self._counters[key] = counters
        if counters is None:
            return None
        return counters, amount, _to_nano(amount), now

    def _find_counters(self, scopes: BudgetScopes, moment: datetime) -> _Counters | None:
        entries = dict[str, _Entry]()
        ident = None if scopes.identity is None else identity_scope(scopes.identity)
        applicable = {"global": "global", "identity": ident}  # configured scope -> counted as
        if scopes.route is not None:
            applicable[f"route:{scopes.route}"] = f"route:{scopes.route}"
        for b in self.budgets:
            scope = applicable.get(b.scope)
            if scope is None:
                continue
            period_key, resets_at = _period(b.period, moment)
            key, limit = f"{self.prefix}:{scope}:{period_key}", _to_nano(b.limit_usd)
            if key in entries and entries[key].limit <= limit:
                continue  # one scope and period configured twice: the lower limit wins
            expire_at = int((resets_at + EXPIRY_SLACK).timestamp())
            alerts = tuple((repr(f), _to_nano(b.limit_usd * Decimal(repr(f)))) for f in b.alert_at)
            entries[key] = _Entry(key, scope, b, resets_at, expire_at, limit, alerts)
        return _Counters.of(tuple(entries.values())) if entries else None

    def _admit(self, plan: _Plan, result: Sequence[Any] | None) -> Reservation:
        """A reservation from the script's answer (None: reserve in memory), or a 402."""
        counters, amount, nano, now = plan
        entries = counters.entries
        backend: Literal["redis", "memory"] = "redis"
        if result is None:
            if self._redis and not self.fail_open:  # Redis is down and budgets fail closed
                retry = [("Retry-After", str(max(1, math.ceil(self.probe_interval))))]
                message = "budgets cannot be checked right now; try again shortly"
                raise RequestRejected(503, "budget_store_unavailable", message, retry)
            backend, result = "memory", self._memory.reserve(entries, nano)
        if not int(result[0]):
            return Reservation(amount, counters, nano, backend)
        e = entries[int(result[0]) - 1]
        b, resets = e.budget, e.resets_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {"scope": e.scope, "period": b.period, "limit_usd": b.limit_usd}
        signals.send(signals.budget_exceeded, self._sender, **event, resets_at=resets)
        label = "identity" if e.scope.startswith("identity:") else e.scope
        why = "is spent" if nano <= e.limit else f"is below this call's worst case, ${amount:.4f}"
        message = f"the budget of {label} (${b.limit_usd} per {b.period}) {why};"
        wait = math.ceil((e.resets_at - _utc(now)).total_seconds())
        raise RequestRejected(
            402,
            "budget_exceeded",
            f"{message} it resets at {resets}",
            [("Retry-After", str(max(1, wait)))],
        )

    def _claim(self, reservation: Reservation, actual: Decimal) -> bool:
        nano = _to_nano(actual)  # validated before the reservation is marked settled
        with self._lock:
            claimed, reservation.settled = not reservation.settled, True
        if claimed:
            reservation.actual, reservation.actual_nano = Decimal(nano) / NANO, nano
        return claimed

    def _settled(self, r: Reservation, fired: Sequence[Any] | None) -> None:
        """Send the alert thresholds crossed (``fired`` None: settle in memory first)."""
        if fired is None:
            fired = self._memory.settle(r.counters.entries, r.nano, r.actual_nano)
        for i in range(0, len(fired), 3):
            e, frac = r.counters.entries[int(fired[i]) - 1], fired[i + 1]
            fraction = float(frac.decode() if isinstance(frac, bytes) else frac)
            event = {"scope": e.scope, "period": e.budget.period, "fraction": fraction}
            event.update(spent_usd=Decimal(int(fired[i + 2])) / NANO, limit_usd=e.budget.limit_usd)
            signals.send(signals.budget_threshold, self._sender, **event)

    def balance(
        self, scope: str, now: datetime | None = None, period: Period | None = None
    ) -> tuple[Decimal, Decimal]:
        """(settled, reserved in flight) of a ``scope`` in the period containing ``now``."""
        if period is None:
            kind = "identity" if scope.startswith("identity:") else scope
            periods: list[Period] = [b.period for b in self.budgets if b.scope == kind]
            period = periods[0] if periods else "month"
        key = f"{self.prefix}:{scope}:{_period(period, _utc(now))[0]}"
        with self._memory.lock:
            h = self._memory.hashes.get(key, {})
            values: list[Any] = [h.get("spent", 0), h.get("reserved", 0)]
        if self._use_redis():
            try:
                values = self._clients[False][0].hmget(key, "spent", "reserved")
            except self._errors as exc:
                self._failed(exc, 0)
        return Decimal(int(values[0] or 0)) / NANO, Decimal(int(values[1] or 0)) / NANO

    def _run(self, script: int, keys: list[str], args: list[Any]) -> Any:
        """Run script 1 (reserve) or 2 (settle) in Redis; see :meth:`_failed` for failures."""
        sent = time.monotonic()
        try:
            result = self._clients[False][script](keys, args)
        except self._errors as exc:
            return self._failed(exc, script)
        if sent > self._failed_at:  # a call sent before the last failure cannot end it
            self._recovered()
        return result

    def _asend(self, script: int, keys: list[str], args: list[Any]) -> Awaitable[Any]:
        """:meth:`_run` on ``redis.asyncio``: a pipelined client queues the command now; the
        result awaits its reply."""
        sent = time.monotonic()
        try:
            reply: Awaitable[Any] | Exception = self._clients[True][script](keys, args)
        except self._errors as exc:  # a closed connection refuses it at once
            reply = exc
        return self._areply(script, reply, sent)

    async def _areply(self, script: int, reply: Awaitable[Any] | Exception, sent: float) -> Any:
        try:
            if isinstance(reply, Exception):
                raise reply
            result = await reply
        except self._errors as exc:
            return self._failed(exc, script)
        if sent > self._failed_at:  # a call sent before the last failure cannot end it
            self._recovered()
        return result

    def _recovered(self) -> None:
        if self._down:
            self._down, self._recovered_at = False, time.monotonic()

    def _use_redis(self) -> bool:
        return self._redis and time.monotonic() >= self._down_until

    def _failed(self, exc: Exception, script: int) -> list[Any] | None:
        """Redis failed: note the outage (one signal). A reservation is then made in memory or
        refused (None, see _admit); a settlement is lost ([]: the worst case stays reserved)."""
        self._failed_at = time.monotonic()
        self._down_until = self._failed_at + self.probe_interval
        error, password = f"{type(exc).__name__}: {exc}", urlsplit(self._uri).password
        if password:
            error = error.replace(password, "***")
        with self._lock:
            settling = self._failed_at - self._recovered_at < self.probe_interval
            first, self._down = not self._down and not settling, True
        if first:
            log.warning("relaymw: budget storage %s unavailable: %s", self.store, error)
            event = {"store": self.store, "error": error, "component": "budgets"}
            signals.send(signals.store_unavailable, self._sender, **event)
        if script == 2:
            log.warning("relaymw: a budget reservation stays reserved: settling it failed")
        return [] if script == 2 else None


async def _nothing() -> None:
    pass


def _reserve_call(plan: _Plan) -> tuple[list[str], list[Any]]:
    counters, _, nano, _ = plan
    return counters.keys, [nano, *counters.limits_and_expiry]


def _settle_call(r: Reservation) -> tuple[list[str], list[Any]]:
    return r.counters.keys, [-r.nano, r.actual_nano, *r.counters.expiry_and_alerts]
