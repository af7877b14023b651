"""Rate limits hold exactly across worker processes: 4 uvicorn workers behind one port, one
Redis, 2,000 concurrent requests at ``100/minute`` → exactly 100 admitted, 1,900 refused."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import free_port

WORKERS = 4
REQUESTS = 2000
LIMIT = 100
CONNECTIONS = 200
API_KEY = "sk-one-client-for-all-2000"

# A pure-ASGI app: each request builds its identity and asks the limiter; 200 or the
# RequestRejected status with its headers. Each response names the worker that served it.
APP = textwrap.dedent(
    """
    import functools
    import os

    from relaymw.config import RateLimiting, Route, RouteRule, Version
    from relaymw.errors import RequestRejected
    from relaymw.limiting import RateLimiter, make_storage
    from relaymw.snapshot import RequestView

    SETTINGS = RateLimiting(storage_uri=os.environ["LIMIT_REDIS_URL"], identity="api_key")
    LIMITER = RateLimiter(
        SETTINGS,
        storage_factory=functools.partial(make_storage, key_prefix=os.environ["LIMIT_PREFIX"]),
    )
    VERSION = Version("review-v1", "claude-sonnet-4-5", "anthropic")
    ROUTE = Route(
        "code-review-production",
        (RouteRule("review-v1", 100.0),),
        rate_limits=(os.environ["LIMIT_SPEC"],),
    )
    PID = str(os.getpid()).encode()


    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await LIMITER.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        headers = [(b"x-worker-pid", PID)]
        if scope["path"] == "/ready":
            status = 200
        else:
            names = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            request = RequestView.build(names, scope["client"][0], scope["scheme"], 0)
            try:
                out = await LIMITER.acheck(ROUTE, VERSION, LIMITER.identity(request), 0)
                status = 200
            except RequestRejected as exc:
                status, out = exc.status, exc.headers
            headers += [(k.encode(), v.encode()) for k, v in out]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
    """
)


@pytest.fixture
def workers(tmp_path: Path, redis_url: str, redis_prefix: str) -> Iterator[str]:
    """``uvicorn --workers 4`` on one port; every process is killed afterwards."""
    (tmp_path / "limit_app.py").write_text(APP)
    port = free_port()
    env = {
        **os.environ,
        "LIMIT_REDIS_URL": redis_url,
        "LIMIT_PREFIX": redis_prefix,
        "LIMIT_SPEC": f"{LIMIT}/minute",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "uvicorn", "--workers", str(WORKERS), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
    # A busy worker on a loaded machine must not be mistaken for a hung one and restarted,
    # and must not close a pooled connection (5 s keep-alive) just as the client reuses it.
    cmd += ["--timeout-worker-healthcheck", "30", "--timeout-keep-alive", "120", "limit_app:app"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, base)
        yield base
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """The supervisor and its workers share the session we started: end that group only."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the supervisor; its workers are reaped by it (or by init)
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
    raise AssertionError("uvicorn processes survived SIGKILL")


def _wait_ready(proc: subprocess.Popen[bytes], base: str) -> None:
    """Ready once a worker answers; then give the others up to 5 s to be seen answering too
    (they all accept on the shared socket, so a fresh connection may reach any of them)."""
    seen: set[str] = set()
    deadline = time.monotonic() + 20
    with httpx.Client(base_url=base, timeout=2, headers={"connection": "close"}) as client:
        while len(seen) < WORKERS and time.monotonic() < deadline:
            assert proc.poll() is None, "uvicorn exited"
            try:
                seen.add(client.get("/ready").headers["x-worker-pid"])
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            deadline = min(deadline, time.monotonic() + 5) if len(seen) == 1 else deadline
    assert seen, "uvicorn never answered"


Timed = tuple[float, float, httpx.Response]  # sent, received, response


async def _fire(base: str) -> list[Timed]:
    """Every request is a task at once; the client keeps 200 of them on the wire (httpx's
    pool slows down badly when thousands queue inside it, so the queue is a semaphore)."""
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    gate = asyncio.Semaphore(CONNECTIONS)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:

        async def one() -> Timed:
            async with gate:
                sent = time.time()
                response = await client.post("/v1/messages", headers={"x-api-key": API_KEY})
                return sent, time.time(), response

        return await asyncio.gather(*(one() for _ in range(REQUESTS)))


def test_four_workers_admit_exactly_100_of_2000_concurrent_requests(workers: str) -> None:
    started = time.time()
    timed = asyncio.run(_fire(workers))
    elapsed = time.time() - started
    responses = [r for _, _, r in timed]

    statuses = collections.Counter(r.status_code for r in responses)
    pids = collections.Counter(r.headers["x-worker-pid"] for r in responses)
    print(f"\n{REQUESTS} requests in {elapsed:.2f} s: {dict(statuses)}; per worker {dict(pids)}")
    assert statuses == {200: LIMIT, 429: REQUESTS - LIMIT}
    assert len(pids) > 1, "the requests must have been served by several worker processes"

    for r in responses:
        assert r.headers["RateLimit-Limit"] == r.headers["X-RateLimit-Limit"] == str(LIMIT)
    # Admitted: what is left is read after the hit (others may hit in between), so it lies in
    # 0..99, and the request that took the last unit can only have seen 0.
    remaining = [int(r.headers["RateLimit-Remaining"]) for r in responses if r.is_success]
    assert all(0 <= n < LIMIT for n in remaining) and min(remaining) == 0
    # Refused: the moving window frees its first slot 60 s after the first admitted hit, the
    # same instant for every refusal of the burst; Retry-After counts down to it.
    refused = [(sent, received, r) for sent, received, r in timed if r.status_code == 429]
    resets = {int(r.headers["X-RateLimit-Reset"]) for _, _, r in refused}
    assert max(resets) - min(resets) <= 1
    assert started + 60 - 1 <= min(resets) <= max(resets) <= started + elapsed + 60 + 1
    for sent, received, r in refused:
        retry = int(r.headers["Retry-After"])
        assert 1 <= retry <= 60 and retry >= 60 - elapsed - 1
        # Retry-After = ceil(reset - now), "now" being between sending and receiving.
        reset_at = int(r.headers["X-RateLimit-Reset"])
        assert reset_at - 1 - received <= retry <= reset_at - sent + 1
        assert r.headers["RateLimit-Reset"] == str(retry)
        assert r.headers["RateLimit-Remaining"] == r.headers["X-RateLimit-Remaining"] == "0"
        assert API_KEY not in str(r.headers)
