"""End-to-end gateway throughput: relaymw vs a bare aiohttp relay vs FakeLLM directly.

Every server is its own process on 127.0.0.1, pinned to CPU 0: FakeLLM (the upstream, on
uvloop), and uvicorn (one worker, the same loop/HTTP settings for all) serving

* ``bare-aiohttp``: a minimal pure-ASGI relay written here — read the body, POST it upstream
  with one shared ``aiohttp.ClientSession``, stream the answer back; no parsing, no routing.
  It is the baseline of the ratios.
* ``relaymw``: a Starlette app with one unrelated route wrapped in ``RelayMiddleware``, whose
  alias ``chat-production`` splits 95/5 over two versions on FakeLLM, sticky by cookie (the
  load sends no cookie: every request makes a weighted choice and gets a ``Set-Cookie``).
* ``passthrough-app`` and ``passthrough-relaymw``: a tiny Starlette app answering
  ``POST /echo``, alone and wrapped in ``RelayMiddleware`` (not LLM-bound: passthrough cost).

``direct`` sends the same load to FakeLLM itself. The load is a closed-loop generator (C
keep-alive connections, one request in flight on each) written on uvloop + httptools, in its
own process pinned to CPU 1; it reports its own CPU use so it can be shown not to be the
bottleneck. Each cell (target, mode, concurrency) gets fresh connections and a warm-up, then
a measurement window: req/s, full latency p50/p99, time to first response byte (TTFB), and
the CPU time (utime + stime from ``/proc/PID/stat``) of the relay and FakeLLM processes per
request. Cells are shuffled in each repetition; the tables show medians over repetitions.

Run: ``python bench/bench_relay.py`` (about 5 minutes; ``--quick`` about 1 minute, or
``RELAYMW_BENCH_QUICK=1`` through ``python bench/run.py relay``). The full run writes
``bench/results_relay.md``; ``--output PATH`` writes elsewhere, ``--output -`` nowhere.
Benchmark-only dependencies: ``uvloop`` and ``httptools`` (used when installed, for every
target alike; the run says which loop it used).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results_relay.md"
SERVER_CPU = 0
LOAD_CPU = 1
CHUNKS = 8  # streamed content deltas per answer (FakeLLM, no delay between them)
UPSTREAM_KEY = "sk-bench-upstream"
ALIAS = "chat-production"
UPSTREAM_MODEL = "gpt-4.1"  # what the 95% version sends; direct and bare name it themselves

# Targets of the issue: relaymw ≥ 0.8x the bare relay's req/s, p50 ≤ 1.3x its p50;
# passthrough at most 3% slower than the app alone.
MIN_RPS_RATIO = 0.8
MAX_P50_RATIO = 1.3
MIN_PASSTHROUGH_RATIO = 0.97
# A cell during which other processes used more than this % of one of our CPUs is re-run
# (twice at most); re-runs may add at most RERUN_BUDGET x the planned time to a run.
MAX_OTHER_PCT = 10.0
RERUN_BUDGET = 0.3

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# --------------------------------------------------------------------------- machine


def _have(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def loop_settings() -> tuple[str, str]:
    """uvicorn's ``loop`` and ``http``: uvloop + httptools when installed, for every target."""
    return (
        "uvloop" if _have("uvloop") else "asyncio",
        "httptools" if _have("httptools") else "h11",
    )


def pin(cpu: int | None, nice: int = 0) -> None:
    """Bind this process to ``cpu``; with ``nice`` > 0, raise its priority by that much."""
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {cpu})
    if nice > 0:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, -nice)
        except OSError as exc:  # not root
            print(f"bench_relay: cannot raise the priority ({exc})", file=sys.stderr)


def die_with_parent() -> None:
    """Children get SIGTERM if the benchmark process dies without cleaning up (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent is already gone
        raise SystemExit(0)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_busy() -> dict[int, float]:
    """Busy seconds of each CPU since boot (``/proc/stat``): all but idle and iowait; steal
    (time the hypervisor gave to someone else) counts as busy, it is lost to us too."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                ticks = [int(v) for v in values[:8]]
                out[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4]) / tick
    return out


def wait_quiet(limit: float, threshold: float = 0.15, verbose: bool = False) -> bool:
    """Wait (up to ``limit`` seconds) until the machine's CPUs are idle enough to measure:
    busy less than ``threshold`` of one CPU in total over half a second."""
    deadline = time.monotonic() + limit
    said = False
    while True:
        before = sum(cpu_busy().values())
        time.sleep(0.5)
        if sum(cpu_busy().values()) - before < threshold * 0.5:
            return True
        if time.monotonic() > deadline:
            if verbose:
                print("  (the machine is still busy: measuring anyway)", flush=True)
            return False
        if verbose and not said:
            print("  (waiting for other processes to leave the CPUs)", flush=True)
            said = True


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all its threads), from ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- the servers


def relay_document(fake_url: str) -> dict[str, Any]:
    """``chat-production`` over two OpenAI versions on FakeLLM, 95/5, sticky by cookie."""
    return {
        "upstreams": {
            "openai": {
                "base_url": f"{fake_url}/v1",
                "api_key": UPSTREAM_KEY,
                "protocol": "openai",
                "timeout_seconds": 30,
            }
        },
        "versions": [
            {
                "version_tag": "gpt-v1",
                "model": f"openai/{UPSTREAM_MODEL}",
                "upstream_endpoint": "openai",
                "parameters": {"temperature": 0.7, "max_tokens": 256},
                "system_prompt": "You are v1.",
            },
            {
                "version_tag": "gpt-v2",
                "model": "gpt-4.1-mini",
                "upstream_endpoint": "openai",
                "parameters": {"temperature": 0.1},
            },
        ],
        "routes": [
            {
                "model_alias": ALIAS,
                "route_rules": [
                    {"version_tag": "gpt-v1", "weight": 95},
                    {"version_tag": "gpt-v2", "weight": 5},
                ],
                "sticky_sessions": {"enabled": True, "cookie_name": "relay_chat"},
            }
        ],
    }


def bare_relay_app(upstream: str) -> ASGIApp:
    """The baseline: body in, the same bytes POSTed upstream on one shared ClientSession,
    the answer streamed back. Same connector settings as relaymw's aiohttp client."""
    import aiohttp

    session: aiohttp.ClientSession | None = None
    headers = {"content-type": "application/json", "authorization": f"Bearer {UPSTREAM_KEY}"}

    async def lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if session is not None:
                    await session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal session
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if session is None:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30.0),
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
        async with session.post(upstream + scope["path"], data=body, headers=headers) as resp:
            out = [(b"content-type", resp.headers.get("content-type", "").encode("latin-1"))]
            if resp.content_length is not None:
                data = await resp.read()
                out.append((b"content-length", str(len(data)).encode()))
                await send({"type": "http.response.start", "status": resp.status, "headers": out})
                await send({"type": "http.response.body", "body": data})
                return
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            while chunk := await resp.content.readany():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    return app


def echo_app() -> ASGIApp:
    """The app of the passthrough targets: ``POST /echo`` answers a small JSON."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse({"ok": True, "received": len(body)})

    return Starlette(routes=[Route("/echo", echo, methods=["POST"])])


def health_app() -> ASGIApp:
    """The app behind the relaymw gateway target: one route that the load never hits."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/health", health)])


def wrapped(app: ASGIApp, upstream: str) -> ASGIApp:
    from relaymw import Relay, RelayMiddleware

    return RelayMiddleware(app, relay=Relay(relay_document(upstream)))


APPS: dict[str, Callable[[str], ASGIApp]] = {
    "bare": bare_relay_app,
    "relaymw": lambda upstream: wrapped(health_app(), upstream),
    "passthrough-app": lambda upstream: echo_app(),
    "passthrough-relaymw": lambda upstream: wrapped(echo_app(), upstream),
}


def serve(name: str, port: int, upstream: str, cpu: int | None, nice: int = 0) -> None:
    """One server process (``--serve NAME``): FakeLLM or a uvicorn app."""
    pin(cpu, nice)
    die_with_parent()
    loop, http = loop_settings()
    if name == "fakellm":
        if loop == "uvloop":
            import uvloop

            # FakeLLM builds its loop with asyncio.new_event_loop(): the policy makes it uvloop.
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        from relaymw.testing import main as fakellm

        raise SystemExit(fakellm(["--port", str(port), "--chunks", str(CHUNKS)]))
    import uvicorn

    uvicorn.run(
        APPS[name](upstream),
        host="127.0.0.1",
        port=port,
        loop=loop,
        http=http,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )


# --------------------------------------------------------------------------- load generator


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


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _sample_cpu(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        with contextlib.suppress(OSError):
            out[name] = cpu_seconds(pid)
    return out


async def run_cell(cmd: dict[str, Any]) -> dict[str, Any]:
    """Closed loop: ``c`` connections, each sending the next request when one ends."""
    loop = asyncio.get_running_loop()
    port: int = cmd["port"]
    body = cmd["body"].encode()
    request = (
        f"POST {cmd['path']} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nAccept: */*\r\n"
        f"Authorization: Bearer sk-bench-client\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    pids: dict[str, int] = cmd["pids"]
    ours: list[int] = cmd["servers"]

    async def connect() -> _Connection:
        _, conn = await loop.create_connection(lambda: _Connection(loop), "127.0.0.1", port)
        return conn

    conns = [await connect() for _ in range(cmd["c"])]
    latencies: list[float] = []
    ttfbs: list[float] = []
    errors: dict[str, int] = {}
    window = False
    stop = False

    async def worker(conn: _Connection) -> None:
        perf = time.perf_counter
        while not stop:
            start = perf()
            try:
                end = await conn.request(request)
            except Exception as exc:
                if window:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
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
        if conn.transport is not None:
            conn.transport.close()

    tasks = [asyncio.ensure_future(worker(conn)) for conn in conns]
    await asyncio.sleep(cmd["warmup"])
    cpu_before, gen_before = _sample_cpu(pids), time.process_time()
    busy_before, ours_before = (
        cpu_busy(),
        sum(_sample_cpu({str(pid): pid for pid in ours}).values()),
    )
    started = time.perf_counter()
    window = True
    await asyncio.sleep(cmd["duration"])
    window = False
    elapsed = time.perf_counter() - started
    cpu_after, gen_after = _sample_cpu(pids), time.process_time()
    busy_after, ours_after = cpu_busy(), sum(_sample_cpu({str(pid): pid for pid in ours}).values())
    stop = True
    _, pending = await asyncio.wait(tasks, timeout=10)
    for task in pending:
        task.cancel()
    for conn in conns:
        if conn.transport is not None:
            conn.transport.abort()
    return {
        "n": len(latencies),
        "elapsed": elapsed,
        "latency": [_percentile(latencies, 0.5), _percentile(latencies, 0.99)],
        "ttfb": [_percentile(ttfbs, 0.5), _percentile(ttfbs, 0.99)],
        "errors": errors,
        "cpu": {k: cpu_after[k] - cpu_before[k] for k in cpu_after if k in cpu_before},
        "gen_cpu": gen_after - gen_before,
        "busy": {k: busy_after[k] - busy_before[k] for k in busy_after if k in busy_before},
        "servers_cpu": ours_after - ours_before,
    }


def load_worker(cpu: int | None, nice: int = 0) -> None:
    """The generator process (``--load``): one JSON command per stdin line, one JSON result
    per stdout line, until stdin closes."""
    pin(cpu, nice)
    die_with_parent()
    new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if _have("uvloop"):
        import uvloop

        new_loop = uvloop.new_event_loop
    for line in sys.stdin:
        if not line.strip():
            continue
        loop = new_loop()
        try:
            result = loop.run_until_complete(run_cell(json.loads(line)))
        except Exception as exc:
            result = {"failed": f"{type(exc).__name__}: {exc}"}
        finally:
            loop.close()
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


# --------------------------------------------------------------------------- orchestration


class Target(NamedTuple):
    name: str
    server: str  # "fakellm" or a key of APPS
    path: str
    model: str
    modes: tuple[str, ...]
    relay: bool  # the measured process is a relay/app (False: FakeLLM itself)


TARGETS = (
    Target("direct", "fakellm", "/v1/chat/completions", UPSTREAM_MODEL, ("json", "stream"), False),
    Target(
        "bare-aiohttp", "bare", "/v1/chat/completions", UPSTREAM_MODEL, ("json", "stream"), True
    ),
    Target("relaymw", "relaymw", "/v1/chat/completions", ALIAS, ("json", "stream"), True),
    Target("passthrough-app", "passthrough-app", "/echo", ALIAS, ("json",), True),
    Target("passthrough-relaymw", "passthrough-relaymw", "/echo", ALIAS, ("json",), True),
)
LLM_BOUND = ("bare", "relaymw")


def chat_body(model: str, stream: bool) -> str:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Write a haiku about load balancers."}],
        "max_tokens": 64,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Sample(NamedTuple):
    rps: float
    p50: float  # ms
    p99: float
    ttfb50: float
    relay_us: float | None  # CPU µs per request of the relay (or app) process
    fake_us: float | None  # CPU µs per request of FakeLLM
    gen_pct: float  # the generator's CPU use, % of its core
    errors: int
    # CPU time of other processes (or steal) on the servers' CPU and on the generator's
    other0: float
    other1: float

    @property
    def other_pct(self) -> float:
        return max(self.other0, self.other1)


class Bench:
    """The server processes and the load generator process of one run."""

    # Not a dataclass: bench/run.py executes this module without registering it in
    # sys.modules, where dataclasses look up string annotations.
    def __init__(self, logdir: Path, pinned: bool = True, nice: int = 0) -> None:
        self.logdir = logdir
        self.pinned = pinned
        self.nice = nice
        self.servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        self.load: subprocess.Popen[str] | None = None

    def _spawn_server(self, name: str, upstream: str) -> None:
        port = free_port()
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        args = [sys.executable, str(Path(__file__).resolve()), "--serve", name, "--port", str(port)]
        args += ["--upstream", upstream]
        if self.pinned:
            args += ["--cpu", str(SERVER_CPU)]
        if self.nice:
            args += ["--nice", str(self.nice)]
        try:
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()
        self.servers[name] = (proc, port)
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server {name} exited at start:\n{self.log_tail(name)}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {name} did not listen in time:\n{self.log_tail(name)}")
            time.sleep(0.05)

    def log_tail(self, name: str) -> str:
        try:
            return (self.logdir / f"{name}.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def start(self, servers: Sequence[str]) -> None:
        self._spawn_server("fakellm", "")
        fake = f"http://127.0.0.1:{self.servers['fakellm'][1]}"
        for name in servers:
            self._spawn_server(name, fake)
        args = [sys.executable, str(Path(__file__).resolve()), "--load"]
        if self.pinned:
            args += ["--cpu", str(LOAD_CPU)]
        if self.nice:
            args += ["--nice", str(self.nice)]
        self.load = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def stop(self) -> None:
        procs: list[subprocess.Popen[Any]] = [p for p, _ in self.servers.values()]
        if self.load is not None:
            with contextlib.suppress(OSError):
                assert self.load.stdin is not None
                self.load.stdin.close()
            procs.append(self.load)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.load is not None and self.load.stdout is not None:
            self.load.stdout.close()
        self.servers.clear()
        self.load = None

    def check(self, target: Target, mode: str) -> None:
        """One request through the target, checked, before any load: a broken relay must not
        produce fast figures."""
        import http.client

        _, port = self.servers[target.server]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request(
                "POST",
                target.path,
                chat_body(target.model, mode == "stream"),
                {"Content-Type": "application/json", "Authorization": "Bearer sk-bench-client"},
            )
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        problems = []
        if resp.status != 200:
            problems.append(f"status {resp.status}")
        if target.path == "/echo":
            if b'"ok":true' not in data:
                problems.append("not the app's answer")
            if resp.getheader("x-relaymw-version"):
                problems.append("relaymw claimed a passthrough request")
        elif mode == "stream":
            if not (resp.getheader("content-type") or "").startswith("text/event-stream"):
                problems.append("not an event stream")
            if data.count(b"data: ") < CHUNKS or b"data: [DONE]" not in data:
                problems.append("incomplete stream")
        elif b'"choices"' not in data:
            problems.append("not a chat completion")
        if target.server == "relaymw" and not (
            resp.getheader("x-relaymw-version") and resp.getheader("set-cookie")
        ):
            problems.append("no x-relaymw-version / Set-Cookie")
        if problems:
            raise RuntimeError(
                f"{target.name} {mode}: {', '.join(problems)}: {data[:300]!r}\n"
                f"{self.log_tail(target.server)}"
            )

    def run(self, target: Target, mode: str, c: int, warmup: float, duration: float) -> Sample:
        assert self.load is not None and self.load.stdin is not None
        assert self.load.stdout is not None
        for name, (proc, _) in self.servers.items():
            if proc.poll() is not None:
                raise RuntimeError(f"server {name} died:\n{self.log_tail(name)}")
        server_pid = self.servers[target.server][0].pid
        fake_pid = self.servers["fakellm"][0].pid
        pids = {"fake": fake_pid}
        if target.relay:
            pids["relay"] = server_pid
        cmd = {
            "port": self.servers[target.server][1],
            "path": target.path,
            "body": chat_body(target.model, mode == "stream"),
            "c": c,
            "warmup": warmup,
            "duration": duration,
            "pids": pids,
            "servers": [proc.pid for proc, _ in self.servers.values()],
        }
        self.load.stdin.write(json.dumps(cmd) + "\n")
        self.load.stdin.flush()
        ready, _, _ = select.select([self.load.stdout], [], [], warmup + duration + 60)
        line = self.load.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError("the load generator did not answer")
        result = json.loads(line)
        if "failed" in result:
            raise RuntimeError(f"load generator: {result['failed']}")
        n = result["n"]
        per_request = 1e6 / n if n else float("nan")
        cpu = result["cpu"]
        relay_us = cpu["relay"] * per_request if "relay" in cpu else None
        # FakeLLM's CPU is only per-request meaningful when the load goes through it.
        fake_us = cpu["fake"] * per_request if target.server in ("fakellm", *LLM_BOUND) else None
        elapsed = result["elapsed"]
        busy = {int(k): v for k, v in result["busy"].items()}
        other0 = other1 = 0.0
        if self.pinned:
            other0 = busy.get(SERVER_CPU, 0.0) - result["servers_cpu"]
            other1 = busy.get(LOAD_CPU, 0.0) - result["gen_cpu"]
        return Sample(
            rps=n / result["elapsed"],
            p50=result["latency"][0] * 1000,
            p99=result["latency"][1] * 1000,
            ttfb50=result["ttfb"][0] * 1000,
            relay_us=relay_us,
            fake_us=fake_us,
            gen_pct=100 * result["gen_cpu"] / result["elapsed"],
            errors=sum(result["errors"].values()),
            other0=max(0.0, 100 * other0 / elapsed),
            other1=max(0.0, 100 * other1 / elapsed),
        )


# --------------------------------------------------------------------------- report

Cell = tuple[str, str, int]  # target, mode, concurrency


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def summarize(samples: Sequence[Sample]) -> dict[str, float | None]:
    rps = [s.rps for s in samples]
    med = statistics.median(rps)
    return {
        "rps": med,
        "spread": 100 * (max(rps) - min(rps)) / 2 / med if med else None,
        "p50": _median([s.p50 for s in samples]),
        "p99": _median([s.p99 for s in samples]),
        "ttfb50": _median([s.ttfb50 for s in samples]),
        "relay_us": _median([s.relay_us for s in samples]),
        "fake_us": _median([s.fake_us for s in samples]),
        "gen_pct": max(s.gen_pct for s in samples),
        "errors": float(sum(s.errors for s in samples)),
        "other0": max(s.other0 for s in samples),
        "other1": max(s.other1 for s in samples),
    }


def table(cells: Sequence[Cell], results: dict[Cell, dict[str, float | None]]) -> list[str]:
    lines = [
        "| target | mode | c | req/s | ± % | p50 ms | p99 ms | TTFB p50 ms "
        "| relay CPU µs/req | FakeLLM CPU µs/req | load gen CPU % | other CPU % (0 / 1) "
        "| errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for cell in cells:
        r = results[cell]
        target, mode, c = cell
        errors = r["errors"] or 0
        lines.append(
            f"| {target} | {mode} | {c} | {_fmt(r['rps'], 0)} | {_fmt(r['spread'], 1)} "
            f"| {_fmt(r['p50'])} | {_fmt(r['p99'])} | {_fmt(r['ttfb50'])} "
            f"| {_fmt(r['relay_us'], 0)} | {_fmt(r['fake_us'], 0)} | {_fmt(r['gen_pct'], 0)} "
            f"| {_fmt(r['other0'], 0)} / {_fmt(r['other1'], 0)} | {int(errors)} |"
        )
    return lines


def _ratio(a: float | None, b: float | None, missing: float = 0.0) -> float:
    return a / b if a and b else missing


def verdicts(
    modes: Sequence[str], levels: Sequence[int], results: dict[Cell, dict[str, float | None]]
) -> tuple[list[str], bool]:
    lines = [
        "| comparison | mode | c | value | target | verdict |",
        "|---|---|--:|--:|---|---|",
    ]
    all_met = True

    def row(name: str, mode: str, c: int, value: float | None, goal: str, met: bool) -> None:
        nonlocal all_met
        all_met = all_met and met
        verdict = "met" if met else "NOT met"
        lines.append(f"| {name} | {mode} | {c} | {_fmt(value, 3)} | {goal} | {verdict} |")

    for mode in modes:
        for c in levels:
            relay = results.get(("relaymw", mode, c))
            bare = results.get(("bare-aiohttp", mode, c))
            if relay is None or bare is None:
                continue
            rps = _ratio(relay["rps"], bare["rps"])
            p50 = _ratio(relay["p50"], bare["p50"], float("inf"))
            row("relaymw / bare req/s", mode, c, rps, f"≥ {MIN_RPS_RATIO}", rps >= MIN_RPS_RATIO)
            row("relaymw / bare p50", mode, c, p50, f"≤ {MAX_P50_RATIO}", p50 <= MAX_P50_RATIO)
    for c in levels:
        app = results.get(("passthrough-app", "json", c))
        mw = results.get(("passthrough-relaymw", "json", c))
        if app is None or mw is None:
            continue
        ratio = _ratio(mw["rps"], app["rps"])
        goal = f"≥ {MIN_PASSTHROUGH_RATIO} (≤ 3% slower)"
        row(
            "passthrough relaymw / app req/s",
            "json",
            c,
            ratio,
            goal,
            ratio >= MIN_PASSTHROUGH_RATIO,
        )
    return lines, all_met


def extra_cpu_lines(
    modes: Sequence[str], levels: Sequence[int], results: dict[Cell, dict[str, float | None]]
) -> list[str]:
    """CPU relaymw adds per request over the bare relay, and passthrough over the app."""
    out = []
    for mode in modes:
        for c in levels:
            relay = results.get(("relaymw", mode, c), {}).get("relay_us")
            bare = results.get(("bare-aiohttp", mode, c), {}).get("relay_us")
            if relay is not None and bare is not None:
                out.append(
                    f"- relaymw minus bare, {mode}, c={c}: {relay - bare:+.0f} µs CPU per request"
                )
    for c in levels:
        mw = results.get(("passthrough-relaymw", "json", c), {}).get("relay_us")
        app = results.get(("passthrough-app", "json", c), {}).get("relay_us")
        if mw is not None and app is not None:
            out.append(
                f"- passthrough relaymw minus app, c={c}: {mw - app:+.1f} µs CPU per request"
            )
    return out


def machine_line(loop: str, http: str) -> str:
    import aiohttp
    import uvicorn

    return (
        f"{cpu_model()}, nproc {os.cpu_count()}, Linux {platform.release()}, "
        f"Python {platform.python_version()}, uvicorn {uvicorn.__version__} "
        f"(loop={loop}, http={http}), aiohttp {aiohttp.__version__}"
    )


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C so that the servers are always stopped."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/bench_relay.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="1 repetition, short windows")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds per cell")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per cell")
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64]
    )
    parser.add_argument("--targets", default=",".join(t.name for t in TARGETS))
    parser.add_argument("--modes", default="json,stream")
    parser.add_argument("--seed", type=int, default=None, help="shuffle seed (default: random)")
    parser.add_argument("--output", default=None, help="markdown file; '-' for none")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        metavar="N",
        help="run the servers and the load generator N nice levels above normal priority "
        "(needs root; on a shared machine it keeps other work from skewing the figures, and "
        "slows that work down meanwhile)",
    )
    # Internal: the child processes.
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", default="", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    args, unknown = parser.parse_known_args(argv)
    # Through bench/run.py, argv holds the runner's benchmark names: ignore positionals.
    options = [u for u in unknown if u.startswith("-")]
    if options:
        parser.error(f"unrecognized arguments: {' '.join(options)}")
    args.quick = args.quick or os.environ.get("RELAYMW_BENCH_QUICK", "") not in ("", "0")
    return args


def measure(
    bench: Bench,
    targets: Sequence[Target],
    cells: Sequence[Cell],
    reps: int,
    warmup: float,
    duration: float,
    seed: int,
) -> tuple[dict[Cell, list[Sample]], int]:
    """Run every cell ``reps`` times, shuffled per repetition; the servers always stop."""
    samples: dict[Cell, list[Sample]] = {cell: [] for cell in cells}
    by_name = {t.name: t for t in TARGETS}
    retries = 0
    previous_affinity = os.sched_getaffinity(0) if bench.pinned else None
    try:
        if bench.pinned:
            os.sched_setaffinity(0, {LOAD_CPU})  # keep the orchestrator off the servers' CPU
        bench.start(sorted({t.server for t in targets} - {"fakellm"}))
        for t in targets:
            for mode in t.modes:
                bench.check(t, mode)
        rng = random.Random(seed)
        per_cell = warmup + duration + 0.3
        wait_quiet(min(60.0, len(cells) * reps * per_cell * 0.1), verbose=True)
        # Re-runs (and waits for a quiet machine) may add RERUN_BUDGET x the planned time.
        budget = len(cells) * reps * per_cell * RERUN_BUDGET
        for rep in range(reps):
            order = list(cells)
            rng.shuffle(order)
            for i, cell in enumerate(order, 1):
                target, mode, c = cell
                # Another process on our CPUs (a shared machine) spoils a cell: run it again.
                tries = [bench.run(by_name[target], mode, c, warmup, duration)]
                while (
                    tries[-1].other_pct > MAX_OTHER_PCT
                    and len(tries) < 3
                    and budget > per_cell + 1.0
                ):
                    retries += 1
                    spent = time.monotonic()
                    wait_quiet(min(5.0, budget - per_cell - 1.0))
                    tries.append(bench.run(by_name[target], mode, c, warmup, duration))
                    budget -= time.monotonic() - spent
                sample = min(tries, key=lambda s: s.other_pct)
                samples[cell].append(sample)
                print(
                    f"  rep {rep + 1}/{reps} [{i:2}/{len(order)}] {target:<20} {mode:<6} "
                    f"c={c:<3} {sample.rps:8.0f} req/s  p50 {sample.p50:6.2f} ms  "
                    f"relay {_fmt(sample.relay_us, 0):>4} µs/req  gen {sample.gen_pct:3.0f}%"
                    + (f"  {sample.errors} errors" if sample.errors else "")
                    + (
                        f"  other {sample.other0:.0f}%/{sample.other1:.0f}%"
                        if sample.other_pct >= 1
                        else ""
                    )
                    + (f"  ({len(tries)} tries)" if len(tries) > 1 else ""),
                    flush=True,
                )
    finally:
        bench.stop()
        if previous_affinity is not None:
            os.sched_setaffinity(0, previous_affinity)
    return samples, retries


def command_options(args: argparse.Namespace) -> list[str]:
    """The options of this run, to print with its results."""
    out = ["--quick"] if args.quick else []
    for name in ("reps", "warmup", "duration", "seed"):
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name}", str(value)]
    if args.concurrency != [16, 64]:
        out += ["--concurrency", ",".join(map(str, args.concurrency))]
    if args.targets != ",".join(t.name for t in TARGETS):
        out += ["--targets", args.targets]
    if args.modes != "json,stream":
        out += ["--modes", args.modes]
    if args.nice:
        out += ["--nice", str(args.nice)]
    if args.no_pin:
        out.append("--no-pin")
    return out


def benchmark(args: argparse.Namespace) -> bool:
    quick = args.quick
    reps = args.reps or (1 if quick else 3)
    warmup = args.warmup if args.warmup is not None else (0.5 if quick else 1.0)
    duration = args.duration if args.duration is not None else (2.0 if quick else 4.0)
    levels: list[int] = args.concurrency
    modes = [m for m in args.modes.split(",") if m]
    wanted = set(args.targets.split(","))
    targets = [t for t in TARGETS if t.name in wanted]
    output = args.output if args.output is not None else ("-" if quick else str(RESULTS))
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    loop, http = loop_settings()
    can_pin = hasattr(os, "sched_getaffinity") and {SERVER_CPU, LOAD_CPU} <= os.sched_getaffinity(0)
    pinned = can_pin and not args.no_pin

    cells: list[Cell] = [
        (t.name, mode, c)
        for t in targets
        for mode in t.modes
        if mode in modes or t.path == "/echo"
        for c in levels
    ]
    command = " ".join(["python bench/bench_relay.py", *command_options(args)])
    print(f"relaymw gateway benchmark: {machine_line(loop, http)}")
    print(
        f"servers pinned to CPU {SERVER_CPU}, load generator to CPU {LOAD_CPU}"
        if pinned
        else "WARNING: processes not pinned (fewer than 2 CPUs or --no-pin)"
    )
    print(
        f"{len(cells)} cells x {reps} repetition(s), {warmup:g} s warm-up + {duration:g} s "
        f"measured each, cells shuffled per repetition (seed {seed}); medians reported"
    )
    with tempfile.TemporaryDirectory(prefix="relaymw-bench-") as logdir:
        samples, retries = measure(
            Bench(Path(logdir), pinned=pinned, nice=args.nice),
            targets,
            cells,
            reps,
            warmup,
            duration,
            seed,
        )

    results = {cell: summarize(samples[cell]) for cell in cells}
    ordered = sorted(cells, key=lambda cl: (cl[1], cl[2], [t.name for t in TARGETS].index(cl[0])))
    rows = table(ordered, results)
    checks, all_met = verdicts(modes, levels, results)
    extra = extra_cpu_lines(modes, levels, results)
    gen_max = max((r["gen_pct"] or 0.0) for r in results.values())
    gen_note = f"load generator CPU at most {gen_max:.0f}% of its core" + (
        " (below 90%: not the bottleneck)" if gen_max < 90 else " (≥ 90%: MAY BE THE LIMIT)"
    )
    print()
    print("\n".join(rows))
    print()
    print("\n".join(checks))
    print()
    print("\n".join(extra))
    print(gen_note)
    other_max = max(max(r["other0"] or 0.0, r["other1"] or 0.0) for r in results.values())
    other_note = (
        f"other processes used at most {other_max:.0f}% of CPU 0 or 1 during a kept sample; "
        f"{retries} sample(s) re-run because another process took > {MAX_OTHER_PCT:g}%"
    )
    print(other_note)

    if output != "-":
        write_markdown(
            Path(output),
            command=command,
            machine=machine_line(loop, http),
            setup=(
                f"{reps} repetition(s) of {len(cells)} shuffled cells, {warmup:g} s warm-up + "
                f"{duration:g} s measured per cell, seed {seed}"
                + ("; servers on CPU 0, load generator on CPU 1" if pinned else "; NOT pinned")
                + (f"; benchmark processes at nice -{args.nice}" if args.nice else "")
            ),
            rows=rows,
            checks=checks,
            extra=[*extra, f"- {gen_note}", f"- {other_note}"],
        )
        print(f"\nwrote {output}")
    return all_met


def write_markdown(
    path: Path,
    *,
    command: str,
    machine: str,
    setup: str,
    rows: list[str],
    checks: list[str],
    extra: list[str],
) -> None:
    text = f"""# relaymw gateway benchmark (bench/bench_relay.py)

Command: `{command}` (or `python bench/run.py relay`)

Machine: {machine}

Setup: {setup}. FakeLLM (aiohttp server, {CHUNKS} streamed chunks, no delay) and the measured
server each run as their own process; the relay targets share CPU 0 with FakeLLM, so their
req/s is that of the pair. Closed-loop load: c keep-alive connections, one request in flight
on each. Figures are medians over repetitions; "± %" is half the req/s range over the
repetitions relative to the median. CPU per request is utime + stime of the process
(`/proc/PID/stat`) over the window ÷ requests completed in it. TTFB is the time to the first
response byte (FakeLLM sends its stream in one write, so TTFB is close to the full latency).
"other CPU % (0 / 1)" is the busy time of CPU 0 not used by our servers and of CPU 1 not used
by the load generator (other processes, kernel work charged to no process, steal), the worst
over the repetitions: a sample above {MAX_OTHER_PCT:g}% is re-run (twice at most, within a
time budget) and the cleanest attempt kept. On a shared machine, read the req/s ratios only
where both columns are low.

Targets: `direct` = load → FakeLLM; `bare-aiohttp` = minimal pure-ASGI relay (one shared
aiohttp.ClientSession, no parsing); `relaymw` = Starlette app wrapped in RelayMiddleware,
alias `{ALIAS}` split 95/5 over two versions, sticky cookie (every request: weighted choice +
Set-Cookie); `passthrough-*` = a Starlette `POST /echo` app alone / wrapped in RelayMiddleware.

{chr(10).join(rows)}

{chr(10).join(checks)}

{chr(10).join(extra)}
"""
    path.write_text(text)


def main() -> None:
    args = parse_args(sys.argv[1:])
    if args.serve:
        serve(args.serve, args.port, args.upstream, args.cpu, args.nice)
        return
    if args.load:
        with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
            load_worker(args.cpu, args.nice)
        return
    try:
        with _sigterm_as_exit():
            benchmark(args)
    except KeyboardInterrupt:
        print("\ninterrupted (all benchmark processes stopped)")
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
