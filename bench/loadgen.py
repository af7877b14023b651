"""The closed-loop load generator of the end-to-end benchmarks (uvloop + httptools).

``python bench/loadgen.py [--cpu N] [--nice N]`` reads one JSON command per stdin line and
answers one JSON result per stdout line, until stdin closes (``common.Bench`` drives it). A
command runs one cell: ``c`` keep-alive connections, one request in flight on each, the next
sent when one ends, cycling over the command's prebuilt ``requests``. It measures either a
window of ``duration`` seconds after ``warmup`` seconds, or (``count``) the time ``count``
responses take from the start. Results: completed responses, latency and time to first
response byte percentiles of the 200 answers (with ``raw``, every one of those times too,
written to the file ``raw`` names), errors by kind, the CPU time of the processes
named in ``pids`` over the window, this generator's own CPU time, and every CPU's busy time
(so that the orchestrator can tell when other work shared our CPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import machine  # noqa: E402


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with one request in flight (httptools parser)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        import httptools

        self.loop = loop
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[float] | None = None
        self.first_byte = 0.0
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self.first_byte:
            self.first_byte = time.perf_counter()
        try:
            self.parser.feed_data(data)
        except Exception as exc:
            self._fail(exc)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(time.perf_counter())

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionResetError("closed by the server"))

    def _fail(self, exc: BaseException) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def request(self, data: bytes) -> asyncio.Future[float]:
        """Send one request; the future gives the time its response ended."""
        assert self.transport is not None
        if self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        self.first_byte = 0.0
        self.status = 0
        self.waiter = self.loop.create_future()
        self.transport.write(data)
        return self.waiter


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _sample_cpu(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        with contextlib.suppress(OSError):
            out[name] = machine.cpu_seconds(pid)
    return out


class _Probe:
    """CPU counters at one instant: the named processes, ours, this one, every CPU."""

    def __init__(self, pids: dict[str, int], servers: list[int]) -> None:
        self.cpu = _sample_cpu(pids)
        self.servers = sum(_sample_cpu({str(pid): pid for pid in servers}).values())
        self.gen = time.process_time()
        self.busy = machine.cpu_busy()
        self.at = time.perf_counter()

    def since(self, before: _Probe) -> dict[str, Any]:
        return {
            "elapsed": self.at - before.at,
            "cpu": {k: v - before.cpu[k] for k, v in self.cpu.items() if k in before.cpu},
            "gen_cpu": self.gen - before.gen,
            "busy": {k: v - before.busy[k] for k, v in self.busy.items() if k in before.busy},
            "servers_cpu": self.servers - before.servers,
        }


async def run_cell(cmd: dict[str, Any]) -> dict[str, Any]:
    """Closed loop: ``c`` connections, each sending the next request when one ends."""
    loop = asyncio.get_running_loop()
    port: int = cmd["port"]
    variants = [r.encode("latin-1") for r in cmd["requests"]]
    count: int | None = cmd.get("count")
    pids: dict[str, int] = cmd["pids"]
    servers: list[int] = cmd["servers"]

    async def connect() -> _Connection:
        _, conn = await loop.create_connection(lambda: _Connection(loop), "127.0.0.1", port)
        return conn

    conns = [await connect() for _ in range(cmd["c"])]
    latencies: list[float] = []
    ttfbs: list[float] = []
    errors: dict[str, int] = {}
    window = count is not None
    stop = False
    sent = completed = 0
    done = asyncio.Event()

    def finished() -> None:
        nonlocal completed
        completed += 1
        if count is not None and completed >= count:
            done.set()

    async def worker(conn: _Connection) -> None:
        nonlocal sent
        perf = time.perf_counter
        while not stop and (count is None or sent < count):
            request = variants[sent % len(variants)]
            sent += 1
            start = perf()
            try:
                end = await conn.request(request)
            except Exception as exc:
                if window:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                finished()
                if stop:
                    return
                await asyncio.sleep(0.01)
                with contextlib.suppress(OSError):
                    conn = await connect()
                continue
            if window:
                if conn.status == 200:
                    latencies.append(end - start)
                    ttfbs.append(conn.first_byte - start)
                else:
                    errors[f"HTTP {conn.status}"] = errors.get(f"HTTP {conn.status}", 0) + 1
            finished()

    before = _Probe(pids, servers)
    tasks = [asyncio.ensure_future(worker(conn)) for conn in conns]
    if count is None:
        await asyncio.sleep(cmd["warmup"])
        before = _Probe(pids, servers)
        window = True
        await asyncio.sleep(cmd["duration"])
        window = False
    else:
        await done.wait()
    after = _Probe(pids, servers)
    stop = True
    _, pending = await asyncio.wait(tasks, timeout=10)
    for task in pending:
        task.cancel()
    for conn in conns:
        if conn.transport is not None:
            conn.transport.abort()
    result = {
        "n": len(latencies),
        "latency": [percentile(latencies, 0.5), percentile(latencies, 0.99)],
        "ttfb": [percentile(ttfbs, 0.5), percentile(ttfbs, 0.99)],
        "errors": errors,
        **after.since(before),
    }
    if cmd.get("raw"):  # every response's times, for percentiles over several windows
        result["raw"] = {
            "latency": [round(x, 6) for x in latencies],
            "ttfb": [round(x, 6) for x in ttfbs],
        }
    return result


def load_worker(cpu: int | None, nice: int = 0) -> None:
    """One command per stdin line, one result per stdout line, until stdin closes."""
    machine.pin(cpu, nice)
    machine.die_with_parent()
    new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if machine.have("uvloop"):
        import uvloop

        new_loop = uvloop.new_event_loop
    for line in sys.stdin:
        if not line.strip():
            continue
        loop = new_loop()
        cmd = json.loads(line)
        try:
            result = loop.run_until_complete(run_cell(cmd))
        except Exception as exc:
            result = {"failed": f"{type(exc).__name__}: {exc}"}
        finally:
            loop.close()
        # To a file: with answer lines of ~500 kB a run once hung, each side waiting on the other.
        if "raw" in result:
            Path(cmd["raw"]).write_text(json.dumps(result.pop("raw")))
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python bench/loadgen.py")
    parser.add_argument("--cpu", type=int, default=None)
    parser.add_argument("--nice", type=int, default=0)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        load_worker(args.cpu, args.nice)


if __name__ == "__main__":
    main(sys.argv[1:])
