"""1,000 streams through a uvicorn gateway (a process of its own), each client leaving at a
random point: before the response, after the headers, after some events (closing with FIN or
with RST), or at the end. FakeLLM streams with a small delay between chunks.

What must hold: every upstream stream is closed (FakeLLM: started = completed + disconnected),
and a client leaving early ends its upstream stream promptly; every request is recorded
exactly once (``request_finished`` and the metrics count 1,000); and nothing is left behind in
the gateway: its asyncio tasks are those it had before, and it holds no socket of a client
that left and no upstream connection beyond its keep-alive pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from relaymw.testing import FakeLLM
from tests.faults.harness import (
    CONFIG_ENV,
    PROTOCOLS,
    STATS_PATH,
    gateway_document,
    request_body,
    wait_until,
)
from tests.support import free_port

STREAMS = 1000
CONCURRENCY = 32
CHUNKS = 20  # content chunks per stream
CHUNK_DELAY_MS = 20
SEED = 20240611
MID_BODY = -2  # leave halfway through sending the request body
BEFORE_RESPONSE = -1  # leave right after sending the request
TO_THE_END = 10_000  # read until the response ends
ROOT = Path(__file__).resolve().parents[2]
MARK = re.compile(r"stream-(\d{4})")


class Gateway:
    """``uvicorn tests.faults.stream_gateway_app:app`` in its own process."""

    def __init__(self, config: dict[str, Any], workdir: Path, stack: tuple[str, str]) -> None:
        path = workdir / "relay.json"
        path.write_text(json.dumps(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, CONFIG_ENV: str(path), "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "uvicorn", "tests.faults.stream_gateway_app:app"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        cmd += ["--loop", stack[0], "--http", stack[1]]
        self.log = open(workdir / "uvicorn.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=self.log, stderr=self.log, start_new_session=True
        )
        self.process = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(self.url + STATS_PATH, timeout=1).raise_for_status()
                return
            except httpx.TransportError:
                assert self.proc.poll() is None, (workdir / "uvicorn.log").read_text()
                assert time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.1)

    def stats(self) -> dict[str, Any]:
        with httpx.Client(timeout=5, headers={"connection": "close"}) as client:
            answer: dict[str, Any] = client.get(self.url + STATS_PATH).json()
            return answer

    def sockets(self) -> list[Any]:
        return list(self.process.net_connections(kind="tcp"))

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.log.close()


@pytest.fixture(params=[("asyncio", "h11"), ("uvloop", "httptools")], ids=["h11", "httptools"])
def gateway(fake_llm: FakeLLM, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Gateway]:
    """The gateway on uvicorn's pure-Python stack and on the one ``uvicorn[standard]`` uses."""
    server = Gateway(gateway_document(fake_llm.base_url), tmp_path, request.param)
    yield server
    server.stop()


class Plan:
    """One client: which stream, where it leaves, and how it closes."""

    def __init__(self, n: int, rng: random.Random) -> None:
        self.n = n
        self.protocol = "openai" if n % 2 else "anthropic"
        roll = rng.random()
        if roll < 0.05:
            self.leave_after = MID_BODY
        elif roll < 0.15:
            self.leave_after = BEFORE_RESPONSE
        elif roll < 0.3:
            self.leave_after = TO_THE_END
        else:
            self.leave_after = rng.randint(0, CHUNKS + 2)  # events read, headers first
        # A reset only once the request was read: before that it may discard the request.
        self.reset = self.leave_after >= 0 and rng.random() < 0.5
        self.status = 0
        self.events = 0
        self.complete = False
        self.closed_at = 0.0


async def run_client(port: int, plan: Plan) -> None:
    body = request_body(plan.protocol, text=f"stream-{plan.n:04d}", stream=True)
    payload = json.dumps(body).encode()
    path = PROTOCOLS[plan.protocol][0]
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if plan.leave_after == MID_BODY:
            writer.write(head.encode() + payload[: len(payload) // 2])
            await writer.drain()
            return
        writer.write(head.encode() + payload)
        await writer.drain()
        if plan.leave_after == BEFORE_RESPONSE:
            return
        status_line, _, _ = (await reader.readuntil(b"\r\n\r\n")).partition(b"\r\n")
        plan.status = int(status_line.split()[1])
        pending = b""
        while plan.events < plan.leave_after:
            size = int((await reader.readline()).split(b";")[0], 16)  # chunked encoding
            if size == 0:
                await reader.readline()
                plan.complete = True
                return
            pending += (await reader.readexactly(size + 2))[:-2]
            plan.events += pending.count(b"\n\n")
            pending = pending[pending.rfind(b"\n\n") + 2 :] if b"\n\n" in pending else pending
    finally:
        if plan.reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        plan.closed_at = time.monotonic()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def run_all(port: int, plans: list[Plan]) -> None:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(plan: Plan) -> None:
        async with gate:
            await run_client(port, plan)

    await asyncio.gather(*(one(p) for p in plans))


def settled(fake: FakeLLM) -> bool:
    return fake.streams_started == fake.streams_completed + fake.streams_disconnected


def test_clients_leaving_1000_streams_at_random_points(fake_llm: FakeLLM, gateway: Gateway) -> None:
    fake_llm.set("*", chunks=CHUNKS, chunk_delay_ms=CHUNK_DELAY_MS)
    # Warm up: the gateway's upstream pool and lazily built parts exist before the baseline.
    warm = [Plan(n, random.Random(n)) for n in range(CONCURRENCY * 2)]
    for plan in warm:
        plan.leave_after, plan.reset = TO_THE_END, False
    asyncio.run(run_all(gateway.port, warm))
    assert all(p.complete for p in warm)
    wait_until(lambda: settled(fake_llm), 5, "warm-up streams closed")
    time.sleep(0.2)
    before = gateway.stats()
    fake_llm.reset()
    fake_llm.set("*", chunks=CHUNKS, chunk_delay_ms=CHUNK_DELAY_MS)

    rng = random.Random(SEED)
    plans = [Plan(n, rng) for n in range(STREAMS)]
    started = time.monotonic()
    asyncio.run(run_all(gateway.port, plans))
    took = time.monotonic() - started

    # Every upstream stream ends (FakeLLM sees each one completed or disconnected) ...
    wait_until(lambda: settled(fake_llm), 10, "every upstream stream closed")
    streams = {int(MARK.findall(json.dumps(s.body))[0]): s for s in fake_llm.streams}
    assert len(streams) == fake_llm.streams_started == fake_llm.request_count
    assert all(s.completed != s.disconnected for s in streams.values())
    assert len(fake_llm.disconnect_times) == fake_llm.streams_disconnected
    # ... and every request is recorded exactly once.
    finished: Counter[str] = Counter()

    def all_recorded() -> bool:
        now = gateway.stats()["finished"]
        finished.clear()
        finished.update({k: v - before["finished"].get(k, 0) for k, v in now.items()})
        return sum(finished.values()) >= STREAMS

    wait_until(all_recorded, 10, "every request recorded")
    time.sleep(0.3)
    after = gateway.stats()
    assert sum(finished.values()) == STREAMS, finished
    assert set(finished) <= {"200 None", "200 client_disconnected", "499 client_disconnected"}
    never_sent = finished["499 client_disconnected"]  # left before the gateway read the body
    assert fake_llm.request_count + never_sent == STREAMS
    requests = sum(v["requests"] for v in after["metrics"].values())
    requests -= sum(v["requests"] for v in before["metrics"].values())
    assert requests == STREAMS - never_sent  # those never had a version to count against
    assert sum(v["errors"] for v in after["metrics"].values()) == 0

    # What the clients saw, and how their streams ended upstream.
    assert never_sent == sum(p.leave_after == MID_BODY for p in plans)
    answered = [p for p in plans if p.leave_after >= 0]
    assert {p.status for p in answered} == {200}
    complete = [p for p in plans if p.complete]
    assert all(streams[p.n].completed for p in complete)
    assert finished["200 None"] >= len(complete)
    assert finished["200 client_disconnected"] >= fake_llm.streams_disconnected
    early = [p for p in plans if not p.complete and p.n in streams and p.events <= CHUNKS // 2]
    assert len(early) >= STREAMS // 3
    ran_on = [p.n for p in early if streams[p.n].completed]
    assert ran_on == [], f"upstream streams not closed after their client left: {ran_on}"
    delays = sorted(
        streams[p.n].disconnected_at - p.closed_at  # type: ignore[operator]
        for p in early
    )
    assert delays[0] > -0.05  # an upstream close follows its client's (same clock)

    # Nothing left behind in the gateway process.
    wait_until(lambda: gateway.stats()["tasks"] == before["tasks"], 5, "tasks back to baseline")

    def client_side_left() -> list[Any]:  # a client's close reaches the server a moment later
        return [c for c in gateway.sockets() if c.status == "CLOSE_WAIT"
                or (c.laddr.port == gateway.port and c.status != "LISTEN")]  # fmt: skip

    wait_until(lambda: not client_side_left(), 5, "client connections closed by the gateway")
    sockets = gateway.sockets()
    leftover = [c for c in sockets if c.laddr.port == gateway.port and c.status != "LISTEN"]
    assert leftover == [], leftover
    assert [c for c in sockets if c.status == "CLOSE_WAIT"] == []
    upstream = [c for c in sockets if c.raddr and c.raddr.port == fake_llm.port]
    assert len(upstream) <= CONCURRENCY and {c.status for c in upstream} <= {"ESTABLISHED"}
    ours = psutil.Process().net_connections(kind="tcp")
    assert [c for c in ours if c.raddr and c.raddr.port == gateway.port] == []
    served = [c for c in ours if c.laddr.port == fake_llm.port and c.status != "LISTEN"]
    assert len(served) == len(upstream), (served, upstream)  # FakeLLM holds only the pool's

    p50, p99 = statistics.median(delays), delays[int(0.99 * len(delays)) - 1]
    print(
        f"\n{STREAMS} streams in {took:.1f} s at concurrency {CONCURRENCY}: "
        f"{len(complete)} read to the end, {len(early)} left in the first half, "
        f"{never_sent} before the body was read; upstream closed after the client "
        f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {delays[-1] * 1000:.1f} ms; "
        f"{len(upstream)} pooled upstream connections; tasks {after['tasks']}"
    )
