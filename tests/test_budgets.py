"""Budgets: atomic all-or-nothing reservations, exact settlement, alerts, periods, outages.

Every behaviour runs against both backends: memory (one lock) and a real Redis (one Lua script),
the latter through the ``redis_url`` fixture (skipped without Redis, a failure in CI).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest

from relaymw import signals
from relaymw.budgets import BudgetLedger, BudgetScopes, Reservation, identity_scope
from relaymw.config import Budget
from relaymw.errors import RequestRejected
from tests.support import Recorder, free_port

D = Decimal
# Fixed moments in the future: Redis expires a counter at the end of its period + slack.
NOW = datetime(2031, 11, 24, 15, 30, tzinfo=timezone.utc)
NEXT_MONTH = datetime(2031, 12, 2, tzinfo=timezone.utc)
CHAT = BudgetScopes(route="chat")

LedgerFactory = Callable[..., BudgetLedger]


@pytest.fixture(params=["memory", "redis"])
def make_ledger(request: pytest.FixtureRequest, redis_prefix: str) -> Iterator[LedgerFactory]:
    """Builds ledgers on the parametrized backend; Redis keys are removed afterwards."""
    made: list[BudgetLedger] = []
    url = request.getfixturevalue("redis_url") if request.param == "redis" else "memory://"

    def make(*budgets: Budget, **kwargs: Any) -> BudgetLedger:
        ledger = BudgetLedger(budgets, url, prefix=redis_prefix, **kwargs)
        made.append(ledger)
        return ledger

    yield make
    if request.param == "redis":
        import redis

        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(f"{redis_prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()
    for ledger in made:
        ledger.close()


@pytest.fixture
def events() -> Iterator[dict[str, Recorder]]:
    recorders = {
        name: Recorder() for name in ("budget_exceeded", "budget_threshold", "store_unavailable")
    }
    for name, rec in recorders.items():
        getattr(signals, name).connect(rec)
    yield recorders
    for name, rec in recorders.items():
        getattr(signals, name).disconnect(rec)


def month(limit: str, scope: str = "global", alert_at: tuple[float, ...] = ()) -> Budget:
    return Budget(scope, D(limit), "month", alert_at)


# --- reserve, reconcile, release --------------------------------------------------------------


def test_reserve_then_reconcile(make_ledger: LedgerFactory) -> None:
    ledger = make_ledger(month("1.00"))
    r = ledger.reserve(CHAT, D("0.30"), now=NOW)
    assert isinstance(r, Reservation) and r.amount == D("0.30")
    assert ledger.balance("global", now=NOW) == (0, D("0.30"))
    ledger.reconcile(r, D("0.123456789"))
    assert ledger.balance("global", now=NOW) == (D("0.123456789"), 0)
    assert ledger.spent("global", now=NOW) == D("0.123456789")
    assert r.settled and r.actual == D("0.123456789")


def test_amounts_round_up_to_the_nano_dollar(make_ledger: LedgerFactory) -> None:
    ledger = make_ledger(month("1.00"))
    r = ledger.reserve(CHAT, D("0.0000000001"), now=NOW)
    assert ledger.balance("global", now=NOW) == (0, D("0.000000001"))
    ledger.reconcile(r, D("0.0000000011"))
    assert ledger.spent("global", now=NOW) == D("0.000000002")  # never rounded down


def test_release_gives_the_reservation_back(make_ledger: LedgerFactory) -> None:
    ledger = make_ledger(month("1.00"))
    ledger.release(ledger.reserve(CHAT, D("0.70"), now=NOW))
    assert ledger.balance("global", now=NOW) == (0, 0)
    assert ledger.reserve(CHAT, D("1.00"), now=NOW) is not None  # the whole budget again


def test_a_reservation_settles_once(make_ledger: LedgerFactory) -> None:
    ledger = make_ledger(month("1.00"))
    r = ledger.reserve(CHAT, D("0.50"), now=NOW)
    ledger.reconcile(r, D("0.20"))
    ledger.reconcile(r, D("0.40"))
    ledger.release(r)
    assert ledger.balance("global", now=NOW) == (D("0.20"), 0)
    r2 = ledger.reserve(CHAT, D("0.10"), now=NOW)
    with pytest.raises(ValueError, match="negative"):
        ledger.reconcile(r2, D("-0.01"))
    assert r2 is not None and not r2.settled  # a bad amount does not consume the settlement
    ledger.reconcile(r2, D("0.10"))
    assert ledger.spent("global", now=NOW) == D("0.30")
    ledger.reconcile(None, D("1"))  # no budget applied: nothing to do
    ledger.release(None)


def test_an_actual_cost_above_the_worst_case_is_recorded(make_ledger: LedgerFactory) -> None:
    ledger = make_ledger(month("1.00"))
    ledger.reconcile(ledger.reserve(CHAT, D("0.90"), now=NOW), D("1.25"))
    assert ledger.spent("global", now=NOW) == D("1.25")
    with pytest.raises(RequestRejected):  # and it blocks further spending
        ledger.reserve(CHAT, D("0"), now=NOW)


def test_no_budget_applies(make_ledger: LedgerFactory) -> None:
    ledger = make_ledger(month("1.00", "route:other"), month("1.00", "identity"))
    assert ledger.reserve(CHAT, D("5"), now=NOW) is None  # another route, no identity
    assert make_ledger().reserve(CHAT, D("5")) is None


# --- rejection ----------------------------------------------------------------------------------


def test_402_names_scope_limit_and_reset(
    make_ledger: LedgerFactory, events: dict[str, Recorder]
) -> None:
    ledger = make_ledger(Budget("route:chat", D("1"), "day"))
    ledger.reserve(CHAT, D("0.60"), now=NOW)
    with pytest.raises(RequestRejected) as info:
        ledger.reserve(CHAT, D("0.50"), now=NOW)
    exc = info.value
    assert (exc.status, exc.code) == (402, "budget_exceeded")
    assert exc.message == (
        "the budget of route:chat ($1 per day) is spent; it resets at 2031-11-25T00:00:00Z"
    )
    assert exc.headers == [("Retry-After", str(8 * 3600 + 30 * 60))]
    assert events["budget_exceeded"].events == [
        {
            "scope": "route:chat",
            "period": "day",
            "limit_usd": D("1"),
            "resets_at": "2031-11-25T00:00:00Z",
        }
    ]
    assert ledger.balance("route:chat", now=NOW) == (0, D("0.60"))  # nothing was added


def test_a_request_bigger_than_the_whole_budget(make_ledger: LedgerFactory) -> None:
    ledger = make_ledger(month("1.00"))
    with pytest.raises(RequestRejected) as info:
        ledger.reserve(CHAT, D("1.5"), now=NOW)
    assert "is below this call's worst case, $1.5000" in info.value.message
    assert "resets at 2031-12-01T00:00:00Z" in info.value.message


def test_month_end_resets_in_the_new_year(make_ledger: LedgerFactory) -> None:
    ledger = make_ledger(month("0.10"))
    eve = datetime(2031, 12, 31, 23, 0, tzinfo=timezone.utc)
    ledger.reserve(CHAT, D("0.10"), now=eve)
    with pytest.raises(RequestRejected) as info:
        ledger.reserve(CHAT, D("0.01"), now=eve)
    assert info.value.message.endswith("it resets at 2032-01-01T00:00:00Z")
    assert info.value.headers == [("Retry-After", "3600")]


def test_all_budgets_or_none(make_ledger: LedgerFactory) -> None:
    ledger = make_ledger(month("10", "global"), month("1", "route:chat"))
    ledger.reserve(CHAT, D("0.90"), now=NOW)
    with pytest.raises(RequestRejected) as info:
        ledger.reserve(CHAT, D("0.20"), now=NOW)  # fits the global budget, not the route's
    assert "route:chat" in info.value.message
    assert ledger.balance("global", now=NOW) == (0, D("0.90"))  # the global one was not charged
    r = ledger.reserve(BudgetScopes(route="other"), D("0.20"), now=NOW)  # only the global applies
    assert r is not None
    assert ledger.balance("global", now=NOW) == (0, D("1.10"))


def test_the_lower_of_two_limits_for_one_scope_wins(make_ledger: LedgerFactory) -> None:
    ledger = make_ledger(month("5"), month("1"))
    with pytest.raises(RequestRejected):
        ledger.reserve(CHAT, D("2"), now=NOW)
    ledger.reserve(CHAT, D("1"), now=NOW)
    assert ledger.balance("global", now=NOW) == (0, D("1"))  # counted once, not twice


def test_identities_have_their_own_hashed_budgets(
    make_ledger: LedgerFactory, events: dict[str, Recorder]
) -> None:
    ledger = make_ledger(Budget("identity", D("1"), "day"))
    alice, bob = BudgetScopes("chat", "Bearer sk-alice"), BudgetScopes("chat", "Bearer sk-bob")
    ledger.reserve(alice, D("0.80"), now=NOW)
    ledger.reserve(bob, D("0.80"), now=NOW)
    with pytest.raises(RequestRejected) as info:
        ledger.reserve(alice, D("0.30"), now=NOW)
    assert "sk-alice" not in info.value.message
    assert "budget of identity ($1 per day)" in info.value.message
    scope = identity_scope("Bearer sk-alice")
    assert scope.startswith("identity:") and "alice" not in scope
    assert events["budget_exceeded"].events[0]["scope"] == scope
    assert ledger.balance(scope, now=NOW) == (0, D("0.80"))
    assert ledger.reserve(BudgetScopes("chat"), D("5"), now=NOW) is None  # unknown identity


def test_redis_keys_expire_after_the_period(redis_url: str, redis_prefix: str) -> None:
    import redis

    budgets = [month("1"), Budget("route:chat", D("1"), "day")]
    ledger = BudgetLedger(budgets, redis_url, prefix=redis_prefix)
    ledger.reserve(CHAT, D("0.1"))
    client = redis.Redis.from_url(redis_url)
    try:
        now = datetime.now(timezone.utc)
        keys = {k.decode(): client.ttl(k) for k in client.scan_iter(f"{redis_prefix}:*")}
        assert set(keys) == {
            f"{redis_prefix}:global:{now:%Y-%m}",
            f"{redis_prefix}:route:chat:{now:%Y-%m-%d}",
        }
        day_ttl = keys[f"{redis_prefix}:route:chat:{now:%Y-%m-%d}"]
        assert 2 * 86400 < day_ttl <= 3 * 86400  # the rest of today + 2 days of slack
        assert 2 * 86400 < keys[f"{redis_prefix}:global:{now:%Y-%m}"] <= 33 * 86400
        assert "sk-" not in "".join(keys)
    finally:
        client.delete(*keys)
        client.close()
        ledger.close()


# --- periods and alerts -------------------------------------------------------------------------


def test_period_rollover_gives_a_fresh_budget(
    make_ledger: LedgerFactory, events: dict[str, Recorder]
) -> None:
    ledger = make_ledger(month("1.00", alert_at=(0.5,)))
    ledger.reconcile(ledger.reserve(CHAT, D("1.00"), now=NOW), D("1.00"))
    with pytest.raises(RequestRejected):
        ledger.reserve(CHAT, D("0.01"), now=NOW)
    r = ledger.reserve(CHAT, D("0.60"), now=NEXT_MONTH)
    ledger.reconcile(r, D("0.60"))
    assert ledger.spent("global", now=NOW) == D("1.00")
    assert ledger.spent("global", now=NEXT_MONTH) == D("0.60")
    # A reservation settles in the period it was made in, even after the period ended.
    late = ledger.reserve(BudgetScopes("x"), D("0"), now=NOW)
    ledger.reconcile(late, D("0"))
    assert [(e["fraction"], e["spent_usd"]) for e in events["budget_threshold"].events] == [
        (0.5, D("1.00")),
        (0.5, D("0.60")),  # once per period: fires again in December
    ]


def test_daily_and_monthly_budgets_of_one_scope(make_ledger: LedgerFactory) -> None:
    ledger = make_ledger(Budget("global", D("1"), "day"), Budget("global", D("2"), "month"))
    ledger.reconcile(ledger.reserve(CHAT, D("1"), now=NOW), D("1"))
    tomorrow = datetime(2031, 11, 25, tzinfo=timezone.utc)
    ledger.reconcile(ledger.reserve(CHAT, D("1"), now=tomorrow), D("1"))
    with pytest.raises(RequestRejected) as info:  # a new day, but the month is spent
        ledger.reserve(CHAT, D("0.5"), now=datetime(2031, 11, 26, tzinfo=timezone.utc))
    assert "per month" in info.value.message
    assert ledger.balance("global", now=NOW, period="day") == (D("1"), 0)
    assert ledger.balance("global", now=NOW, period="month") == (D("2"), 0)


def test_thresholds_fire_once_per_fraction(
    make_ledger: LedgerFactory, events: dict[str, Recorder]
) -> None:
    ledger = make_ledger(month("1.00", alert_at=(0.5, 0.8, 1.0)))
    for _ in range(10):
        ledger.reconcile(ledger.reserve(CHAT, D("0.10"), now=NOW), D("0.10"))
    seen = [(e["fraction"], e["spent_usd"]) for e in events["budget_threshold"].events]
    assert seen == [(0.5, D("0.5")), (0.8, D("0.8")), (1.0, D("1.0"))]
    assert events["budget_threshold"].events[0] == {
        "scope": "global",
        "period": "month",
        "fraction": 0.5,
        "spent_usd": D("0.5"),
        "limit_usd": D("1.00"),
    }


# --- concurrency: the bound -----------------------------------------------------------------------


def _requests(seed: int, n: int = 200) -> list[tuple[Decimal, Decimal]]:
    """(worst case, actual <= worst case) of ``n`` requests, in whole nano-dollars. The worst
    cases add up to ~$2.50 and the actual costs to ~$1.25, so a $1.00 budget must refuse some."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        worst = rng.randint(5_000_000, 20_000_000)  # $0.005 - $0.020
        out.append((D(worst) / 10**9, D(rng.randint(worst // 10, worst)) / 10**9))
    return out


def _check_rejection(exc: RequestRejected) -> None:
    assert (exc.status, exc.code) == (402, "budget_exceeded")
    assert "resets at 2031-12-01T00:00:00Z" in exc.message
    wait = int((datetime(2031, 12, 1, tzinfo=timezone.utc) - NOW).total_seconds())
    assert exc.headers == [("Retry-After", str(wait))]


async def test_monthly_budget_under_200_concurrent_requests(make_ledger: LedgerFactory) -> None:
    """A $1.00 monthly budget under 200 concurrent requests: the total recorded spend stays
    within $1.00 and every admitted request's cost is accounted for, exactly.

    Why the bound holds: admission reads ``spent + reserved`` and adds the worst case only if
    the sum stays <= $1.00, in one indivisible step (Redis runs one Lua script at a time; the
    memory ledger holds one lock), so no two requests can both claim the same headroom. Settling
    replaces a worst case ``w`` by the actual cost ``a <= w``, which can only lower the sum.
    Hence ``spent + reserved <= $1.00`` at every instant, and once every request has settled
    (``reserved == 0``), ``spent <= $1.00``. Amounts are integer nano-dollars and each
    reservation settles exactly once, so ``spent`` equals the sum of the actual costs exactly.
    """
    ledger = make_ledger(month("1.00"))
    plans = _requests(seed=1)
    delays = random.Random(2)
    admitted: list[Decimal] = []
    rejected: list[RequestRejected] = []

    async def call(worst: Decimal, actual: Decimal) -> None:
        try:
            reservation = await ledger.areserve(CHAT, worst, now=NOW)
        except RequestRejected as exc:
            rejected.append(exc)
            return
        await asyncio.sleep(delays.random() * 0.02)  # the upstream call
        await ledger.areconcile(reservation, actual)
        admitted.append(actual)

    await asyncio.gather(*(call(w, a) for w, a in plans))
    spent, reserved = ledger.balance("global", now=NOW)
    assert reserved == 0
    assert spent == sum(admitted)  # every admitted request's cost, exactly
    assert spent <= D("1.00")
    assert len(admitted) + len(rejected) == 200
    assert admitted and rejected
    for exc in rejected:
        _check_rejection(exc)
    await ledger.aclose()


def test_monthly_budget_under_200_threads(make_ledger: LedgerFactory) -> None:
    """The same bound with the synchronous API from 200 threads (see the test above for why)."""
    ledger = make_ledger(month("1.00"))
    plans = _requests(seed=3)
    start = threading.Barrier(200)
    admitted: list[Decimal] = []
    rejected: list[RequestRejected] = []
    lock = threading.Lock()

    def call(worst: Decimal, actual: Decimal) -> None:
        start.wait()
        try:
            reservation = ledger.reserve(CHAT, worst, now=NOW)
        except RequestRejected as exc:
            with lock:
                rejected.append(exc)
            return
        time.sleep(random.random() * 0.01)
        ledger.reconcile(reservation, actual)
        with lock:
            admitted.append(actual)

    threads = [threading.Thread(target=call, args=plan) for plan in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    spent, reserved = ledger.balance("global", now=NOW)
    assert (reserved, spent) == (0, sum(admitted))
    assert spent <= D("1.00")
    assert len(admitted) + len(rejected) == 200 and admitted and rejected
    for exc in rejected:
        _check_rejection(exc)


async def test_only_one_of_200_fits(make_ledger: LedgerFactory) -> None:
    """Two $0.60 reservations cannot both pass a $1.00 budget, however they interleave."""
    ledger = make_ledger(month("1.00"), month("1.00", "route:chat"))
    results = await asyncio.gather(
        *(ledger.areserve(CHAT, D("0.60"), now=NOW) for _ in range(200)), return_exceptions=True
    )
    assert sum(isinstance(r, Reservation) for r in results) == 1
    assert all(isinstance(r, Reservation | RequestRejected) for r in results)
    assert ledger.balance("global", now=NOW) == (0, D("0.60"))
    assert ledger.balance("route:chat", now=NOW) == (0, D("0.60"))
    await ledger.aclose()


async def test_thresholds_fire_once_with_200_concurrent_spenders(
    make_ledger: LedgerFactory, events: dict[str, Recorder]
) -> None:
    ledger = make_ledger(month("1.00", alert_at=(0.5, 0.8, 1.0)))

    async def spend() -> None:
        r = await ledger.areserve(CHAT, D("0.005"), now=NOW)
        await asyncio.sleep(random.random() * 0.01)
        await ledger.areconcile(r, D("0.005"))

    await asyncio.gather(*(spend() for _ in range(200)))
    assert ledger.balance("global", now=NOW) == (D("1.00"), 0)
    fired = sorted((e["fraction"], e["spent_usd"]) for e in events["budget_threshold"].events)
    assert fired == [(0.5, D("0.5")), (0.8, D("0.8")), (1.0, D("1.0"))]

    async def spend_next_month() -> None:
        r = await ledger.areserve(CHAT, D("0.3"), now=NEXT_MONTH)
        await ledger.areconcile(r, D("0.3"))

    await asyncio.gather(spend_next_month(), spend_next_month())  # a new period alerts again
    assert [e["fraction"] for e in events["budget_threshold"].events[3:]] == [0.5]
    await ledger.aclose()


def test_thresholds_fire_once_with_200_threads(
    make_ledger: LedgerFactory, events: dict[str, Recorder]
) -> None:
    ledger = make_ledger(month("1.00", alert_at=(0.5, 0.8, 1.0)))
    start = threading.Barrier(200)

    def spend() -> None:
        start.wait()
        ledger.reconcile(ledger.reserve(CHAT, D("0.005"), now=NOW), D("0.005"))

    threads = [threading.Thread(target=spend) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    fired = sorted(e["fraction"] for e in events["budget_threshold"].events)
    assert fired == [0.5, 0.8, 1.0]


# --- storage failures -----------------------------------------------------------------------------


def _dead_redis() -> str:
    return f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"


def test_unreachable_redis_fails_open_to_memory(events: dict[str, Recorder]) -> None:
    uri = _dead_redis()
    ledger = BudgetLedger([month("1.00")], uri, probe_interval=0)
    for _ in range(3):
        r = ledger.reserve(CHAT, D("0.30"), now=NOW)
        assert r is not None and r.backend == "memory"
        ledger.reconcile(r, D("0.10"))
    assert ledger.spent("global", now=NOW) == D("0.30")  # kept in memory meanwhile
    sent = events["store_unavailable"].events
    assert len(sent) == 1  # once per outage
    assert sent[0]["component"] == "budgets"
    assert sent[0]["store"] == uri.replace(":s3cret-pw@", "@").replace("redis://@", "redis://")
    assert "s3cret" not in repr(sent)


async def test_unreachable_redis_fails_open_async(events: dict[str, Recorder]) -> None:
    ledger = BudgetLedger([month("1.00")], _dead_redis(), probe_interval=0)
    r = await ledger.areserve(CHAT, D("0.30"), now=NOW)
    assert r is not None and r.backend == "memory"
    await ledger.areconcile(r, D("0.25"))
    assert ledger.spent("global", now=NOW) == D("0.25")
    assert len(events["store_unavailable"].events) == 1


async def test_unreachable_redis_fails_closed_when_configured(
    events: dict[str, Recorder],
) -> None:
    ledger = BudgetLedger([month("1.00")], _dead_redis(), fail_open=False, probe_interval=60)
    for attempt in (ledger.reserve, ledger.areserve):  # tried, then within the probe interval
        with pytest.raises(RequestRejected) as info:
            result = attempt(CHAT, D("0.30"), now=NOW)
            if asyncio.iscoroutine(result):
                await result
        assert (info.value.status, info.value.code) == (503, "budget_store_unavailable")
        assert info.value.headers == [("Retry-After", "60")]
        assert "s3cret" not in info.value.message
    assert len(events["store_unavailable"].events) == 1


def test_a_failed_settlement_keeps_the_worst_case(
    redis_url: str, redis_prefix: str, events: dict[str, Recorder]
) -> None:
    ledger = BudgetLedger([month("1.00")], redis_url, prefix=redis_prefix, probe_interval=0)
    try:
        r = ledger.reserve(CHAT, D("0.40"), now=NOW)
        import redis

        def broken(*_: Any) -> Any:
            raise redis.ConnectionError("connection reset")

        client, reserve, _settle = ledger._clients[False]
        ledger._clients[False] = (client, reserve, broken)
        ledger.reconcile(r, D("0.10"))  # logged and signalled, never raised
        assert r is not None and r.settled
        assert len(events["store_unavailable"].events) == 1
        ledger._clients[False] = (client, reserve, _settle)
        assert ledger.balance("global", now=NOW) == (0, D("0.40"))  # conservative
        ledger.reconcile(r, D("0.10"))  # settled already: not applied twice
        assert ledger.balance("global", now=NOW) == (0, D("0.40"))
    finally:
        client.delete(f"{redis_prefix}:global:2031-11")
        ledger.close()


def test_unsupported_storage() -> None:
    with pytest.raises(ValueError, match="memory:// or redis://"):
        BudgetLedger([], "postgres://user:pw@db/x")


def test_memory_forgets_finished_periods() -> None:
    ledger = BudgetLedger([Budget("global", D("1"), "day")])
    ledger.reserve(CHAT, D("0.5"), now=datetime(2020, 1, 1, tzinfo=timezone.utc))
    assert len(ledger._memory.hashes) == 1
    ledger._memory.next_sweep = 0
    ledger.reserve(CHAT, D("0.5"), now=NOW)
    assert list(ledger._memory.hashes) == ["relaymw:budget:global:2031-11-24"]


def test_a_redis_error_that_is_not_an_outage_is_raised(redis_url: str, redis_prefix: str) -> None:
    """A wrong key type (or a cluster's CROSSSLOT) is a misconfiguration: never fail open."""
    import redis

    client = redis.Redis.from_url(redis_url)
    key = f"{redis_prefix}:global:2031-11"
    client.set(key, "not a hash")
    ledger = BudgetLedger([month("1.00")], redis_url, prefix=redis_prefix)
    try:
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            ledger.reserve(CHAT, D("0.10"), now=NOW)
    finally:
        client.delete(key)
        client.close()
        ledger.close()


def test_each_outage_is_signalled_once(
    redis_url: str, redis_prefix: str, events: dict[str, Recorder]
) -> None:
    import redis

    ledger = BudgetLedger([month("1.00")], redis_url, prefix=redis_prefix, probe_interval=0)
    client, reserve, settle = ledger._clients[False]

    def down(*_: Any) -> Any:
        raise redis.TimeoutError("timed out")

    try:
        for _ in range(2):  # two outages, each seen by several requests
            ledger._clients[False] = (client, down, settle)
            backends = [ledger.reserve(CHAT, D("0.01"), now=NOW) for _ in range(3)]
            assert {r.backend for r in backends if r} == {"memory"}
            ledger._clients[False] = (client, reserve, settle)
            r = ledger.reserve(CHAT, D("0.01"), now=NOW)
            assert r is not None and r.backend == "redis"
        assert len(events["store_unavailable"].events) == 2
    finally:
        client.delete(f"{redis_prefix}:global:2031-11")
        ledger.close()
