"""Rate limits (SPEC §5): request and token limits per identity and route/version, on memory
and on a real Redis, with every strategy, sync and async; fail open / fail closed while a
Redis server of our own is killed and restarted."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from relaymw import signals
from relaymw.config import RateLimiting, Route, RouteRule, Version
from relaymw.errors import ConfigError, RequestRejected
from relaymw.limiting import RateLimiter, make_storage, redact_uri
from relaymw.snapshot import RequestView
from tests.support import REDIS_PASSWORD, Recorder, RedisServer

STRATEGIES = ["moving-window", "fixed-window", "sliding-window-counter"]
RAW_KEY = "sk-live-very-secret-key-42"
LIMIT_KEYS = "relaymw:limits:*"


def version(tag: str = "v1", rate: tuple[str, ...] = (), tokens: tuple[str, ...] = ()) -> Version:
    return Version(tag, "gpt-4.1", "openai", rate_limits=rate, token_limits=tokens)


def route(alias: str = "chat", rate: tuple[str, ...] = (), tokens: tuple[str, ...] = ()) -> Route:
    rules = (RouteRule("v1", 50.0), RouteRule("v2", 50.0))
    return Route(alias, rules, rate_limits=rate, token_limits=tokens)


def view(**headers: str) -> RequestView:
    return RequestView.build(
        {k.replace("_", "-"): v for k, v in headers.items()}, "10.0.0.7", "http", 0
    )


def headers_of(pairs: list[tuple[str, str]]) -> dict[str, str]:
    return dict(pairs)


def outcome(call: Callable[[], Any]) -> RequestRejected | list[tuple[str, str]]:
    try:
        result: list[tuple[str, str]] = call()
    except RequestRejected as exc:
        return exc
    return result


@pytest.fixture
def recorded() -> Iterator[dict[str, Recorder]]:
    recs = {"rate_limited": Recorder(), "store_unavailable": Recorder()}
    signals.rate_limited.connect(recs["rate_limited"])
    signals.store_unavailable.connect(recs["store_unavailable"])
    yield recs
    signals.rate_limited.disconnect(recs["rate_limited"])
    signals.store_unavailable.disconnect(recs["store_unavailable"])


@pytest.fixture(params=["memory", "redis"])
def make(request: pytest.FixtureRequest) -> Iterator[Callable[..., RateLimiter]]:
    """Builds limiters on ``memory://`` or on the shared Redis (a key prefix per test)."""
    made: list[RateLimiter] = []
    if request.param == "redis":
        uri, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
    else:
        uri, prefix = "memory://", "unused"

    def build(**settings: Any) -> RateLimiter:
        limiter = RateLimiter(
            RateLimiting(storage_uri=uri, **settings),
            storage_factory=functools.partial(make_storage, key_prefix=prefix),
        )
        made.append(limiter)
        return limiter

    yield build
    for limiter in made:
        limiter.close()


# --- requests over a limit -------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_request_over_3_per_minute_is_refused_with_a_computed_retry_after(
    make: Callable[..., RateLimiter], strategy: str, recorded: dict[str, Recorder]
) -> None:
    limiter = make(strategy=strategy, identity="api_key")
    r, v = route("code-review-production", rate=("3/minute",)), version()
    identity = limiter.identity(view(authorization=f"Bearer {RAW_KEY}"))
    assert identity.startswith("sha256:") and RAW_KEY not in identity

    for left in (2, 1, 0):
        h = headers_of(limiter.check(r, v, identity, 0))
        assert h["RateLimit-Limit"] == h["X-RateLimit-Limit"] == "3"
        assert h["RateLimit-Remaining"] == h["X-RateLimit-Remaining"] == str(left)
        assert 0 < int(h["RateLimit-Reset"]) <= 60
        assert abs(int(h["X-RateLimit-Reset"]) - time.time() - int(h["RateLimit-Reset"])) <= 1.5

    with pytest.raises(RequestRejected) as caught:
        limiter.check(r, v, identity, 0)
    exc = caught.value
    h = headers_of(exc.headers)
    retry = int(h["Retry-After"])
    assert (exc.status, exc.code) == (429, "rate_limited")
    assert 1 <= retry <= 60
    assert h["RateLimit-Reset"] == str(retry) and h["RateLimit-Remaining"] == "0"
    assert abs(int(h["X-RateLimit-Reset"]) - time.time() - retry) <= 1.5  # reset - now
    assert exc.message == (
        f"rate limit 3 per 1 minute exceeded for route code-review-production; retry in {retry} s"
    )
    [event] = recorded["rate_limited"].events
    assert event == {
        "route": "code-review-production",
        "version": "v1",
        "identity": identity,
        "limit": "3 per 1 minute",
        "retry_after": retry,
    }
    assert RAW_KEY not in repr((exc.message, exc.headers, event))


def test_retry_after_counts_down_to_the_moving_windows_reset(
    make: Callable[..., RateLimiter],
) -> None:
    limiter = make()
    r, v = route(rate=("2/10 seconds",)), version()
    limiter.check(r, v, "alice", 0)
    time.sleep(1.2)
    limiter.check(r, v, "alice", 0)
    first = outcome(lambda: limiter.check(r, v, "alice", 0))
    time.sleep(2.1)
    second = outcome(lambda: limiter.check(r, v, "alice", 0))
    assert isinstance(first, RequestRejected) and isinstance(second, RequestRejected)
    # The oldest hit frees its slot 10 s after it was made: 1.2 s ago, then 3.3 s ago.
    assert headers_of(first.headers)["Retry-After"] in ("8", "9")
    assert headers_of(second.headers)["Retry-After"] in ("6", "7")
    assert headers_of(first.headers)["X-RateLimit-Reset"] in {
        headers_of(second.headers)["X-RateLimit-Reset"],
        str(int(headers_of(second.headers)["X-RateLimit-Reset"]) - 1),
    }


def test_identities_are_counted_apart(make: Callable[..., RateLimiter]) -> None:
    limiter = make(identity="header:x-user-id")
    r, v = route(rate=("1/minute",)), version()
    alice, bob = limiter.identity(view(x_user_id="alice")), limiter.identity(view(x_user_id="bob"))
    assert (alice, bob) == ("alice", "bob")  # not a credential: kept readable
    limiter.check(r, v, alice, 0)
    limiter.check(r, v, bob, 0)
    assert isinstance(outcome(lambda: limiter.check(r, v, alice, 0)), RequestRejected)
    assert limiter.identity(view()) == "anonymous"


def test_route_and_version_limits_both_apply_and_a_refusal_consumes_neither(
    make: Callable[..., RateLimiter],
) -> None:
    limiter = make()
    r = route("chat", rate=("3/minute",))
    tight, free = version("v1", rate=("2/minute",)), version("v2")
    limiter.check(r, tight, "alice", 0)
    h = headers_of(limiter.check(r, tight, "alice", 0))
    assert (h["RateLimit-Limit"], h["RateLimit-Remaining"]) == ("2", "0")  # the tighter one
    refused = outcome(lambda: limiter.check(r, tight, "alice", 0))
    assert isinstance(refused, RequestRejected)
    assert "rate limit 2 per 1 minute exceeded for version v1" in refused.message
    # The refusal did not take the route's third unit: v2 still gets it, then the route refuses.
    assert headers_of(limiter.check(r, free, "alice", 0))["RateLimit-Remaining"] == "0"
    refused = outcome(lambda: limiter.check(r, free, "alice", 0))
    assert isinstance(refused, RequestRejected)
    assert "rate limit 3 per 1 minute exceeded for route chat" in refused.message
    # A version's limit holds on every route that uses it.
    other = route("other-route")
    assert isinstance(outcome(lambda: limiter.check(other, tight, "alice", 0)), RequestRejected)
    assert limiter.check(other, free, "alice", 0) == []


def test_no_limits_is_a_fast_path_without_storage() -> None:
    def factory(uri: str) -> Any:
        raise AssertionError("no storage may be created")

    limiter = RateLimiter(RateLimiting(storage_uri="redis://nowhere:1"), storage_factory=factory)
    assert limiter.check(route(), version(), "alice", 10_000) == []
    limiter.record_tokens(route(), version(), "alice", 10_000)
    assert asyncio.run(limiter.acheck(route(), version(), "alice", 10_000)) == []


# --- tokens ----------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_token_precheck_tests_the_estimate_and_record_tokens_consumes(
    make: Callable[..., RateLimiter], strategy: str
) -> None:
    limiter = make(strategy=strategy)
    r, v = route(tokens=("100/minute",)), version()
    assert limiter.check(r, v, "alice", 60) == []  # only a test: nothing consumed
    assert limiter.check(r, v, "alice", 60) == []
    limiter.record_tokens(r, v, "alice", 60)
    refused = outcome(lambda: limiter.check(r, v, "alice", 60))
    assert isinstance(refused, RequestRejected) and refused.status == 429
    assert refused.message.startswith(
        "token limit 100 per 1 minute exceeded for route chat (an estimated 60 tokens)"
    )
    h = headers_of(refused.headers)
    assert h["RateLimit-Limit"] == "100" and 1 <= int(h["Retry-After"]) <= 60
    assert limiter.check(r, v, "alice", 30) == []  # 40 left: 30 fits
    assert limiter.check(r, v, "bob", 60) == []  # per identity
    # A response larger than what is left exhausts the window (an overshoot is not forgotten).
    limiter.record_tokens(r, v, "alice", 500)
    assert isinstance(outcome(lambda: limiter.check(r, v, "alice", 1)), RequestRejected)


def test_a_request_larger_than_the_whole_token_limit_passes_an_empty_window(
    make: Callable[..., RateLimiter],
) -> None:
    limiter = make()
    r, v = route(), version(tokens=("1000/hour",))
    assert limiter.check(r, v, "alice", 5000) == []
    limiter.record_tokens(r, v, "alice", 5000)
    refused = outcome(lambda: limiter.check(r, v, "alice", 5000))
    assert isinstance(refused, RequestRejected) and "for version v1" in refused.message


# --- async -----------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_async_paths_enforce_the_same_limits(
    make: Callable[..., RateLimiter], strategy: str, recorded: dict[str, Recorder]
) -> None:
    limiter = make(strategy=strategy)
    r, v = route(rate=("3/minute",), tokens=("100/minute",)), version(rate=("5/minute",))
    results = await asyncio.gather(
        *(_aoutcome(limiter.acheck(r, v, "alice", 10)) for _ in range(6))
    )
    admitted = [x for x in results if isinstance(x, list)]
    refused = [x for x in results if isinstance(x, RequestRejected)]
    assert (len(admitted), len(refused)) == (3, 3)
    assert all(1 <= int(headers_of(x.headers)["Retry-After"]) <= 60 for x in refused)
    assert len(recorded["rate_limited"].events) == 3
    await limiter.arecord_tokens(r, v, "bob", 95)
    refused_tokens = await _aoutcome(limiter.acheck(r, v, "bob", 10))
    assert isinstance(refused_tokens, RequestRejected) and "token limit" in refused_tokens.message
    assert isinstance(await limiter.acheck(r, v, "bob", 5), list)
    await limiter.aclose()


async def _aoutcome(awaitable: Any) -> RequestRejected | list[tuple[str, str]]:
    try:
        result: list[tuple[str, str]] = await awaitable
    except RequestRejected as exc:
        return exc
    return result


def test_the_limiter_follows_a_new_event_loop(redis_url: str, redis_prefix: str) -> None:
    """Connections belong to one loop: a new loop gets new ones, and Redis keeps the counts."""
    factory = functools.partial(make_storage, key_prefix=redis_prefix)
    limiter = RateLimiter(RateLimiting(storage_uri=redis_url), storage_factory=factory)
    r, v = route(rate=("2/minute",)), version()

    async def check_and_close() -> RequestRejected | list[tuple[str, str]]:
        try:
            return await _aoutcome(limiter.acheck(r, v, "alice", 0))
        finally:
            await limiter.aclose()

    assert isinstance(asyncio.run(check_and_close()), list)
    assert isinstance(asyncio.run(check_and_close()), list)
    assert isinstance(asyncio.run(check_and_close()), RequestRejected)


# --- configuration and secrets ---------------------------------------------------------------


def test_an_unknown_storage_scheme_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError) as caught:
        RateLimiter(RateLimiting(storage_uri="postgres://user:pw@db/limits"))
    assert "rate_limiting.storage_uri" in str(caught.value) and "pw" not in str(caught.value)


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("redis://:pw@host:6379/0", "redis://host:6379/0"),
        ("redis://user:pw@host:6379/0?password=x", "redis://user@host:6379/0"),
        (
            "redis+sentinel://:pw@a:26379,b:26379/mymaster",
            "redis+sentinel://a:26379,b:26379/mymaster",
        ),
        ("memory://", "memory://"),
    ],
)
def test_redact_uri(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown


@pytest.mark.parametrize(
    ("spec", "hashed"),
    [
        ("api_key", True),
        ("header:authorization", True),
        ("header:x-api-key", True),
        ("cookie:session", True),
        ("header:x-user-id", False),
        ("client_ip", False),
    ],
)
def test_credentials_are_hashed_identities(spec: str, hashed: bool) -> None:
    limiter = RateLimiter(RateLimiting(identity=spec))
    request = view(
        authorization=RAW_KEY, x_api_key=RAW_KEY, cookie=f"session={RAW_KEY}", x_user_id=RAW_KEY
    )
    identity = limiter.identity(request)
    assert identity.startswith("sha256:") is hashed
    if hashed:
        assert RAW_KEY not in identity and len(identity) == len("sha256:") + 32


# --- a Redis of our own, killed and restarted ------------------------------------------------


@pytest.fixture(params=["sync", "async"])
def checker(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """``checker(limiter)`` → ``check(route, version, identity)`` through ``check`` or, on an
    event loop of the test's own, ``acheck``; the outcome is the headers or the rejection."""
    loop = asyncio.new_event_loop()
    used: list[RateLimiter] = []

    def bind(limiter: RateLimiter) -> Callable[[Route, Version, str], Any]:
        used.append(limiter)
        if request.param == "sync":
            return lambda r, v, who: outcome(lambda: limiter.check(r, v, who, 0))
        return lambda r, v, who: loop.run_until_complete(_aoutcome(limiter.acheck(r, v, who, 0)))

    yield bind
    for limiter in used:
        loop.run_until_complete(limiter.aclose())
    loop.close()


def test_fail_open_limits_in_memory_then_returns_to_redis(
    own_redis: RedisServer,
    checker: Callable[..., Any],
    recorded: dict[str, Recorder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    limiter = RateLimiter(RateLimiting(storage_uri=own_redis.url, fail_open=True))
    check = checker(limiter)
    r, v = route(rate=("3/minute",)), version()
    assert isinstance(check(r, v, "alice"), list)
    assert own_redis.keys(LIMIT_KEYS)

    own_redis.kill()
    started = time.monotonic()
    results = [check(r, v, "alice") for _ in range(5)]
    assert time.monotonic() - started < 3, "a dead Redis must not stall requests"
    assert limiter.degraded
    # The in-memory fallback starts empty and still limits: 3 admitted, then refused.
    assert [isinstance(x, list) for x in results] == [True, True, True, False, False]
    assert all(r.status == 429 for r in results[3:] if isinstance(r, RequestRejected))
    [event] = recorded["store_unavailable"].events  # once per outage
    assert event["component"] == "rate_limits"
    assert event["store"] == f"redis://127.0.0.1:{own_redis.port}/0"

    own_redis.start()
    started = time.monotonic()
    while not own_redis.keys(LIMIT_KEYS):  # the first request that reaches Redis again writes a key
        assert time.monotonic() - started < 5, "Redis not used again within 5 s"
        check(r, v, "bob")
        time.sleep(0.05)
    assert not limiter.degraded
    assert isinstance(check(r, v, "alice"), list)  # counted in Redis again (it lost its data)
    assert len(recorded["store_unavailable"].events) == 1
    assert REDIS_PASSWORD not in repr(recorded["store_unavailable"].events) + caplog.text


def test_fail_closed_answers_503_with_retry_after_until_redis_is_back(
    own_redis: RedisServer, checker: Callable[..., Any], recorded: dict[str, Recorder]
) -> None:
    limiter = RateLimiter(RateLimiting(storage_uri=own_redis.url, fail_open=False))
    check = checker(limiter)
    r, v = route(rate=("3/minute",)), version()
    assert isinstance(check(r, v, "alice"), list)

    own_redis.kill()
    for _ in range(3):
        refused = check(r, v, "alice")
        assert isinstance(refused, RequestRejected)
        assert (refused.status, refused.code) == (503, "rate_limit_storage_unavailable")
        assert 1 <= int(headers_of(refused.headers)["Retry-After"]) <= 2
        assert REDIS_PASSWORD not in refused.message + repr(refused.headers)
    assert len(recorded["store_unavailable"].events) == 1

    own_redis.start()
    started = time.monotonic()
    while isinstance(result := check(r, v, "alice"), RequestRejected):
        assert result.status == 503
        assert time.monotonic() - started < 5, "Redis not used again within 5 s"
        time.sleep(0.05)
    assert headers_of(result)["RateLimit-Remaining"] == "2"  # a fresh Redis: a fresh count
    assert own_redis.keys(LIMIT_KEYS) and not limiter.degraded


def test_record_tokens_never_raises_while_redis_is_down(own_redis: RedisServer) -> None:
    for fail_open in (True, False):
        limiter = RateLimiter(RateLimiting(storage_uri=own_redis.url, fail_open=fail_open))
        r, v = route(tokens=("100/minute",)), version()
        limiter.record_tokens(r, v, "alice", 10)
        own_redis.kill()
        limiter.record_tokens(r, v, "alice", 10)
        asyncio.run(limiter.arecord_tokens(r, v, "alice", 10))
        own_redis.start()
