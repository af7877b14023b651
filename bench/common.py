"""What the end-to-end benchmarks share: the processes, the requests, one measurement loop.

A run starts FakeLLM and the apps under test (``bench/servers.py``), each its own process
pinned to CPU 0, and the closed-loop load generator (``bench/loadgen.py``) pinned to CPU 1.
A *cell* (target, mode, concurrency) gets fresh connections, a warm-up, then a measurement
window; :func:`measure` runs every cell ``reps`` times, shuffled in each repetition (the cells
a ratio compares in turns, :func:`pair_blocks`), and re-runs a window during which other
processes took one of our CPUs; :func:`paired_ratio` reads a ratio off the repetitions pair
by pair. ``bench_relay.py``,
``bench_sidebyside.py`` and ``soak.py`` are built on it; ``bench/machine.py`` reads the
machine. The ``*_instructions.py`` scripts count instructions with
:func:`callgrind_instructions` instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

from loadgen import percentile
from machine import (
    LOAD_CPU,
    SERVER_CPU,
    load_average,
    redis_pid,
    wait_quiet,
)

HERE = Path(__file__).resolve().parent
# A cell during which other processes used more than this % of one of our CPUs is re-run
# (twice at most, within a time budget).
MAX_OTHER_PCT = 10.0
# Warm-up of a slice's fresh connections when compared cells take turns (measure(slices=)):
# the servers and their upstream pools are warm already.
SLICE_WARMUP = 0.2
CHUNKS = 8  # streamed content deltas per FakeLLM answer (no delay between them)
CLIENT_KEY = "sk-bench-client"
# Request variants: each its own x-user-id (the sticky key) and API key (the rate-limit
# identity), so that limits and routing see many users, as a service does.
USERS = 1024


# --------------------------------------------------------------------------- requests


def chat_body(model: str, stream: bool) -> str:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Write a haiku about load balancers."}],
        "max_tokens": 64,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":"))


def http_request(port: int, path: str, body: str, user: int = 0) -> str:
    """One raw HTTP/1.1 POST as ``user`` (its x-user-id and API key)."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nAccept: */*\r\n"
        f"Authorization: Bearer {CLIENT_KEY}-{user}\r\nX-User-Id: user-{user}\r\n"
        f"Content-Length: {len(body.encode())}\r\n\r\n{body}"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------- targets


class Target(NamedTuple):
    name: str
    server: str  # "fakellm" or a key of servers.APPS
    path: str
    model: str
    modes: tuple[str, ...]
    relay: bool  # the measured process is a relay or an app (False: FakeLLM itself)
    through_fake: bool = True  # the load reaches FakeLLM (its CPU per request means something)
    expect_headers: tuple[str, ...] = ()  # on every answer
    forbid_headers: tuple[str, ...] = ()
    uses_redis: bool = False  # its guards use Redis: Redis's CPU per request is reported
    answer_contains: bytes = b""  # e.g. the model FakeLLM must have been asked for

    @property
    def passthrough(self) -> bool:
        return not self.through_fake


class Sample(NamedTuple):
    rps: float
    p50: float  # ms
    p99: float
    ttfb50: float
    relay_us: float | None  # CPU µs per request of the relay (or app) process
    fake_us: float | None  # CPU µs per request of FakeLLM
    redis_us: float | None  # CPU µs per request of redis-server
    gen_pct: float  # the generator's CPU use, % of its core
    errors: int
    # CPU time of other processes (or steal) on the servers' CPU and on the generator's
    other0: float
    other1: float
    n: int = 0
    elapsed: float = 0.0

    @property
    def other_pct(self) -> float:
        return max(self.other0, self.other1)


# --------------------------------------------------------------------------- processes


class Bench:
    """The server processes and the load generator process of one run."""

    def __init__(
        self,
        logdir: Path,
        pinned: bool = True,
        nice: int = 0,
        settings: Mapping[str, str] | None = None,
        gc_freeze: bool = False,
    ) -> None:
        self.logdir = logdir
        self.pinned = pinned
        self.nice = nice
        self.settings = dict(settings or {})
        if gc_freeze:
            self.settings["gc_freeze"] = "1"
        self.servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        self.load: subprocess.Popen[str] | None = None
        self.redis = redis_pid()

    def _child_args(self, script: str, cpu: int) -> list[str]:
        args = [sys.executable, str(HERE / script)]
        if self.pinned:
            args += ["--cpu", str(cpu)]
        if self.nice:
            args += ["--nice", str(self.nice)]
        return args

    def _spawn_server(self, name: str, upstream: str) -> None:
        port = free_port()
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        args = [*self._child_args("servers.py", SERVER_CPU), name, "--port", str(port)]
        args += ["--upstream", upstream, "--settings", json.dumps(self.settings)]
        try:
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()
        self.servers[name] = (proc, port)
        deadline = time.monotonic() + 30
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
        self.load = subprocess.Popen(
            self._child_args("loadgen.py", LOAD_CPU),
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

    def pid(self, server: str) -> int:
        return self.servers[server][0].pid

    def get(self, server: str, path: str) -> str:
        """``GET path`` from one of the servers; the body as text (raises unless 200)."""
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.servers[server][1], timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            data = resp.read().decode(errors="replace")
        finally:
            conn.close()
        if resp.status != 200:
            raise RuntimeError(f"GET {path} from {server}: {resp.status} {data[:200]}")
        return data

    def requests_for(self, target: Target, mode: str) -> list[str]:
        port = self.servers[target.server][1]
        body = chat_body(target.model, mode == "stream")
        return [http_request(port, target.path, body, user) for user in range(USERS)]

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
                {
                    "Content-Type": "application/json",
                    "Authorization": f"Bearer {CLIENT_KEY}-0",
                    "X-User-Id": "user-0",
                },
            )
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        problems = []
        if resp.status != 200:
            problems.append(f"status {resp.status}")
        if target.passthrough:
            if b'"ok":true' not in data:
                problems.append("not the app's answer")
        elif mode == "stream":
            if not (resp.getheader("content-type") or "").startswith("text/event-stream"):
                problems.append("not an event stream")
            if data.count(b"data: ") < CHUNKS or b"data: [DONE]" not in data:
                problems.append("incomplete stream")
        elif b'"choices"' not in data:
            problems.append("not a chat completion")
        if target.answer_contains not in data:
            problems.append(f"the answer lacks {target.answer_contains!r}")
        problems += [f"no {h}" for h in target.expect_headers if not resp.getheader(h)]
        problems += [f"unexpected {h}" for h in target.forbid_headers if resp.getheader(h)]
        if problems:
            raise RuntimeError(
                f"{target.name} {mode}: {', '.join(problems)}: {data[:300]!r}\n"
                f"{self.log_tail(target.server)}"
            )

    def run(
        self, target: Target, mode: str, c: int, warmup: float, duration: float
    ) -> dict[str, Any]:
        """One measured window of a cell, ``duration`` seconds after ``warmup``: the load
        generator's result (read it with :meth:`sample`), with every response's times
        (``raw``), so that several windows of a cell can be merged (:func:`merge_results`)."""
        requests = self.requests_for(target, mode)
        times = self.logdir / "times.json"
        cmd = {"warmup": warmup, "duration": duration, "raw": str(times)}
        result = self.drive(target, requests, c, cmd, timeout=warmup + duration + 60)
        result["raw"] = json.loads(times.read_text())
        times.unlink()
        return result

    def drive(
        self,
        target: Target,
        requests: Sequence[str],
        c: int,
        window: Mapping[str, Any],
        timeout: float,
    ) -> dict[str, Any]:
        """Send ``requests`` (cycled) over ``c`` connections; ``window`` is ``warmup`` +
        ``duration`` seconds, or ``count`` responses. The load generator's result: read it
        with :meth:`sample`."""
        assert self.load is not None and self.load.stdin is not None
        assert self.load.stdout is not None
        for name, (proc, _) in self.servers.items():
            if proc.poll() is not None:
                raise RuntimeError(f"server {name} died:\n{self.log_tail(name)}")
        pids = {"fake": self.pid("fakellm")}
        if target.relay:
            pids["relay"] = self.pid(target.server)
        if target.uses_redis and self.redis is not None:
            pids["redis"] = self.redis
        cmd = {
            "port": self.servers[target.server][1],
            "requests": list(requests),
            "c": c,
            "pids": pids,
            "servers": [proc.pid for proc, _ in self.servers.values()],
            **window,
        }
        self.load.stdin.write(json.dumps(cmd) + "\n")
        self.load.stdin.flush()
        ready, _, _ = select.select([self.load.stdout], [], [], timeout)
        line = self.load.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError("the load generator did not answer")
        result: dict[str, Any] = json.loads(line)
        if "failed" in result:
            raise RuntimeError(f"load generator: {result['failed']}")
        return result

    def sample(self, target: Target, result: Mapping[str, Any]) -> Sample:
        n, elapsed, cpu = result["n"], result["elapsed"], result["cpu"]
        per_request = 1e6 / n if n else float("nan")

        def us(name: str) -> float | None:
            return cpu[name] * per_request if name in cpu else None

        busy = {int(k): v for k, v in result["busy"].items()}
        other0 = other1 = 0.0
        if self.pinned:
            other0 = busy.get(SERVER_CPU, 0.0) - result["servers_cpu"]
            other1 = busy.get(LOAD_CPU, 0.0) - result["gen_cpu"]
            # Redis is not pinned: its time is ours, taken first from the generator's CPU,
            # where the scheduler finds room for it (the servers' CPU is saturated).
            redis = cpu.get("redis", 0.0)
            taken = min(redis, max(other1, 0.0))
            other1 -= taken
            other0 -= redis - taken
        return Sample(
            rps=n / elapsed,
            p50=result["latency"][0] * 1000,
            p99=result["latency"][1] * 1000,
            ttfb50=result["ttfb"][0] * 1000,
            relay_us=us("relay"),
            fake_us=us("fake") if target.through_fake else None,
            redis_us=us("redis"),
            gen_pct=100 * result["gen_cpu"] / elapsed,
            errors=sum(result["errors"].values()),
            other0=max(0.0, 100 * other0 / elapsed),
            other1=max(0.0, 100 * other1 / elapsed),
            n=n,
            elapsed=elapsed,
        )


# --------------------------------------------------------------------------- measurement

Cell = tuple[str, str, int]  # target, mode, concurrency


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def sample_line(sample: Sample) -> str:
    return (
        f"{sample.rps:8.0f} req/s  p50 {sample.p50:6.2f} ms  "
        f"relay {fmt(sample.relay_us, 0):>4} µs/req  gen {sample.gen_pct:3.0f}%"
        + (f"  {sample.errors} errors" if sample.errors else "")
        + (f"  other {sample.other0:.0f}%/{sample.other1:.0f}%" if sample.other_pct >= 1 else "")
    )


def measure(
    bench: Bench,
    targets: Sequence[Target],
    cells: Sequence[Cell],
    reps: int,
    warmup: float,
    duration: float,
    seed: int,
    rerun_budget: float = 0.3,
    on_ready: Callable[[Bench], None] | None = None,
    block: Callable[[Cell], Hashable] = lambda cell: cell,
    slices: int = 1,
) -> tuple[dict[Cell, list[Sample]], int]:
    """Run every cell ``reps`` times, shuffled per repetition; the servers always stop.

    Cells with the same ``block(cell)`` run back to back in each repetition (see
    :func:`repetition_order`); give the cells a ratio compares one block. With ``slices`` > 1
    a block's cells take turns instead: each gets its warm-up, then ``slices`` windows of
    ``duration / slices`` seconds (each after a short warm-up of its fresh connections),
    alternating with the other cells' (A B B A A B...), merged into one sample per cell
    (:func:`merge_results`). A spell of a slower machine then falls on both sides of a ratio.

    A window during which other processes took more than :data:`MAX_OTHER_PCT` of one of our
    CPUs is run again (twice at most) and the cleanest attempt kept; re-runs and waits for a
    quiet machine may add ``rerun_budget`` x the planned time. ``on_ready`` runs once every
    target answered its check, before the load."""
    samples: dict[Cell, list[Sample]] = {cell: [] for cell in cells}
    by_name = {t.name: t for t in targets}
    retries = 0
    previous_affinity = os.sched_getaffinity(0) if bench.pinned else None
    per_cell = warmup + duration + 0.3 + (slices * (SLICE_WARMUP + 0.1) if slices > 1 else 0.0)
    budget = len(cells) * reps * per_cell * rerun_budget

    def clean_run(cell: Cell, warm: float, seconds: float) -> tuple[dict[str, Any], int]:
        """The cleanest of up to three windows of ``cell``, and how many were run."""
        nonlocal budget, retries
        target = by_name[cell[0]]

        def once() -> tuple[dict[str, Any], float]:
            result = bench.run(target, cell[1], cell[2], warm, seconds)
            return result, bench.sample(target, result).other_pct

        tries = [once()]
        while tries[-1][1] > MAX_OTHER_PCT and len(tries) < 3 and budget > warm + seconds + 1:
            retries += 1
            spent = time.monotonic()
            wait_quiet(min(5.0, budget - warm - seconds - 1.0))
            tries.append(once())
            budget -= time.monotonic() - spent
        return min(tries, key=lambda t: t[1])[0], len(tries)

    try:
        if bench.pinned:
            os.sched_setaffinity(0, {LOAD_CPU})  # keep the orchestrator off the servers' CPU
        bench.start(sorted({t.server for t in targets} - {"fakellm"}))
        for t in targets:
            for mode in t.modes:
                bench.check(t, mode)
        if on_ready is not None:
            on_ready(bench)
        rng = random.Random(seed)
        wait_quiet(min(60.0, len(cells) * reps * per_cell * 0.1), verbose=True)
        for rep in range(reps):
            groups = repetition_order(cells, rng, block)
            done = 0
            for group in groups:
                parts: dict[Cell, list[dict[str, Any]]] = {cell: [] for cell in group}
                tries = dict.fromkeys(group, 0)
                if slices > 1 and len(group) > 1:
                    for cell in group:  # each side warm before the first window
                        bench.run(by_name[cell[0]], cell[1], cell[2], warmup, 0.05)
                    for i in range(slices):
                        for cell in group if i % 2 == 0 else group[::-1]:
                            result, n = clean_run(cell, SLICE_WARMUP, duration / slices)
                            parts[cell].append(result)
                            tries[cell] += n - 1
                else:
                    for cell in group:
                        result, n = clean_run(cell, warmup, duration)
                        parts[cell].append(result)
                        tries[cell] += n - 1
                for cell in group:
                    done += 1
                    sample = bench.sample(by_name[cell[0]], merge_results(parts[cell]))
                    samples[cell].append(sample)
                    target, mode, c = cell
                    print(
                        f"  rep {rep + 1}/{reps} [{done:2}/{len(cells)}] {target:<20} {mode:<6} "
                        f"c={c:<3} {sample_line(sample)}"
                        + (f"  ({tries[cell]} re-runs)" if tries[cell] else ""),
                        flush=True,
                    )
    finally:
        bench.stop()
        if previous_affinity is not None:
            os.sched_setaffinity(0, previous_affinity)
    return samples, retries


def pairing(slices: int, duration: float) -> str:
    """How a run measures the cells a ratio compares, in words."""
    if slices <= 1:
        return "compared cells back to back"
    return f"compared cells in turns of {duration / slices:g} s, {slices} per cell"


def merge_results(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One load generator result of several windows of one cell: counts, times and CPU
    summed, percentiles over every response of every window (their ``raw`` times)."""
    if len(results) == 1:
        return dict(results[0])

    def summed(key: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for r in results:
            for k, v in r[key].items():
                out[k] = out.get(k, 0) + v
        return out

    latency = [x for r in results for x in r["raw"]["latency"]]
    ttfb = [x for r in results for x in r["raw"]["ttfb"]]
    return {
        "n": sum(r["n"] for r in results),
        "elapsed": sum(r["elapsed"] for r in results),
        "gen_cpu": sum(r["gen_cpu"] for r in results),
        "servers_cpu": sum(r["servers_cpu"] for r in results),
        "cpu": {k: v for k, v in summed("cpu").items() if all(k in r["cpu"] for r in results)},
        "busy": summed("busy"),
        "errors": summed("errors"),
        "latency": [percentile(latency, 0.5), percentile(latency, 0.99)],
        "ttfb": [percentile(ttfb, 0.5), percentile(ttfb, 0.99)],
    }


def pair_blocks(compared: Mapping[str, str]) -> Callable[[Cell], Hashable]:
    """The ``block`` of :func:`measure` for ``compared`` (measured target: its baseline): a
    cell shares its block with its baseline's cell of the same mode and concurrency."""

    def block(cell: Cell) -> Hashable:
        target, mode, c = cell
        return (compared.get(target, target), mode, c)

    return block


def repetition_order(
    cells: Sequence[Cell], rng: random.Random, block: Callable[[Cell], Hashable]
) -> list[list[Cell]]:
    """One repetition's order: blocks shuffled, the cells of each block shuffled, to run back
    to back or in turns. A virtual machine's speed can swing by half for a second or more (a
    neighbour on the host): cells a ratio compares, measured seconds apart rather than
    minutes, meet the same spell more often, and in turns of half a second more often still
    (BENCHMARKS.md, session 7: back to back, runs of the same code still differed by ±0.07)."""
    blocks: dict[Hashable, list[Cell]] = {}
    for cell in cells:
        blocks.setdefault(block(cell), []).append(cell)
    groups = list(blocks.values())
    rng.shuffle(groups)
    for group in groups:
        rng.shuffle(group)
    return groups


def paired_ratio(
    measured: Sequence[Sample], baseline: Sequence[Sample], field: str
) -> float | None:
    """The median over repetitions of ``measured / baseline`` for ``field`` (``"rps"``,
    ``"p50"``...), each repetition's pair measured in turns or back to back (:func:`measure`)."""
    ratios = [
        getattr(m, field) / getattr(b, field)
        for m, b in zip(measured, baseline, strict=True)
        if getattr(b, field)
    ]
    return statistics.median(ratios) if ratios else None


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else None


def summarize(samples: Sequence[Sample]) -> dict[str, float | None]:
    """Medians over repetitions; ``spread`` is half the req/s range, % of the median."""
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
        "redis_us": _median([s.redis_us for s in samples]),
        "gen_pct": max(s.gen_pct for s in samples),
        "errors": float(sum(s.errors for s in samples)),
        "other0": max(s.other0 for s in samples),
        "other1": max(s.other1 for s in samples),
    }


def run_notes(results: Mapping[Cell, Mapping[str, float | None]], retries: int) -> list[str]:
    """Whether the load generator could have been the limit; how much other work ran."""
    gen_max = max((r["gen_pct"] or 0.0) for r in results.values())
    other_max = max(max(r["other0"] or 0.0, r["other1"] or 0.0) for r in results.values())
    return [
        f"load generator CPU at most {gen_max:.0f}% of its core"
        + (" (below 90%: not the bottleneck)" if gen_max < 90 else " (≥ 90%: MAY BE THE LIMIT)"),
        f"other processes used at most {other_max:.0f}% of CPU 0 or 1 during a kept sample; "
        f"{retries} sample(s) re-run because another process took > {MAX_OTHER_PCT:g}%; "
        f"load average (1 / 5 / 15 min) at the end {load_average()}",
    ]


def ratio(a: float | None, b: float | None, missing: float = 0.0) -> float:
    return a / b if a and b else missing


def quick_requested() -> bool:
    return os.environ.get("RELAYMW_BENCH_QUICK", "") not in ("", "0")


# --------------------------------------------------------------------------- Redis


def redis_client(storage: str) -> Any:
    """A client of the guards' storage when it is Redis (pinged: raises when down), else None."""
    if not storage.startswith(("redis://", "rediss://")):
        return None
    import redis

    client = redis.Redis.from_url(storage, socket_connect_timeout=1.0)
    client.ping()
    return client


def verify_redis(storage: str, prefix: str) -> None:
    """Once requests went through: rate limits and budgets keep their state on Redis (a
    relay that fell back to memory would measure something else)."""
    client = redis_client(storage)
    if client is None:
        return
    missing = [
        what
        for what, pattern in (("budget", f"{prefix}:budget*"), ("rate limit", "relaymw:limits*"))
        if next(iter(client.scan_iter(match=pattern, count=1000)), None) is None
    ]
    if missing:
        raise RuntimeError(f"no {' or '.join(missing)} keys on {storage}: guards not on Redis?")


def remove_keys(storage: str, prefix: str) -> None:
    """Delete this run's keys (the budget's; rate-limit windows expire by themselves)."""
    client = redis_client(storage)
    if client is not None:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)


# --------------------------------------------------------------------------- callgrind


def callgrind_instructions(argv: Sequence[str]) -> int:
    """Instructions callgrind counts for ``python argv...`` (this interpreter), start-up
    included: callers run a case at two counts and divide the difference.

    ``PYTHONHASHSEED=0`` because set and dict orders (and so the work done) would otherwise
    change from run to run."""
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
        check=False,
    )
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(
            f"callgrind of {' '.join(argv)}: exit status {proc.returncode}, "
            f"{'no instruction count' if found is None else 'the script failed'}; "
            f"stderr ends:\n{proc.stderr[-2000:]}"
        )
    return int(found.group(1))


# --------------------------------------------------------------------------- command line


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def run_options(
    prog: str,
    description: str,
    levels: Sequence[int],
    targets: Sequence[Target],
    reps: int = 3,
    slices: int = 4,
) -> argparse.ArgumentParser:
    """The options every end-to-end benchmark takes."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--quick", action="store_true", help="1 repetition, short windows")
    parser.add_argument("--reps", type=int, default=None, help=f"repetitions (default {reps})")
    parser.add_argument(
        "--slices",
        type=int,
        default=slices,
        help="windows per cell, taken in turns with the cells it is compared with "
        "(default %(default)s; 1: back to back)",
    )
    parser.add_argument("--warmup", type=float, default=None, help="seconds per cell")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per cell")
    parser.add_argument(
        "--concurrency", type=_ints, default=list(levels), help="levels, e.g. 1,16,64"
    )
    parser.add_argument(
        "--targets", default=",".join(t.name for t in targets), help="(default: %(default)s)"
    )
    parser.add_argument("--modes", default="json,stream", help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="shuffle seed (default: random)")
    parser.add_argument("--output", default=None, help="markdown file; '-' for none")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="every server calls gc.freeze() once its app is built (an experiment: see "
        "bench/gc_cost.py)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        metavar="N",
        help="run the servers and the load generator N nice levels above normal priority "
        "(needs root; on a shared machine it keeps other work from skewing the figures, and "
        "slows that work down meanwhile)",
    )
    parser.set_defaults(
        default_levels=list(levels),
        default_targets=[t.name for t in targets],
        default_slices=slices,
    )
    return parser


def parse_run_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    args, unknown = parser.parse_known_args(argv)
    # Through bench/run.py, argv holds the runner's benchmark names: ignore positionals.
    options = [u for u in unknown if u.startswith("-")]
    if options:
        parser.error(f"unrecognized arguments: {' '.join(options)}")
    args.quick = args.quick or quick_requested()
    unknown_targets = set(args.targets.split(",")) - set(args.default_targets)
    if unknown_targets:
        parser.error(f"unknown target(s) {', '.join(sorted(unknown_targets))}")
    return args


def command_options(args: argparse.Namespace) -> list[str]:
    """The options of this run, to print with its results."""
    out = ["--quick"] if args.quick else []
    for name in ("reps", "warmup", "duration", "seed"):
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name}", str(value)]
    if args.slices != args.default_slices:
        out += ["--slices", str(args.slices)]
    if args.concurrency != args.default_levels:
        out += ["--concurrency", ",".join(map(str, args.concurrency))]
    if args.targets != ",".join(args.default_targets):
        out += ["--targets", args.targets]
    if args.modes != "json,stream":
        out += ["--modes", args.modes]
    if args.nice:
        out += ["--nice", str(args.nice)]
    if args.no_pin:
        out.append("--no-pin")
    if args.gc_freeze:
        out.append("--gc-freeze")
    return out


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
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


def run_benchmark(benchmark: Callable[[], object]) -> None:
    """Runs ``benchmark()`` so that SIGTERM and Ctrl-C stop every benchmark process on the way
    out; Ctrl-C exits with 130, as a shell would."""
    try:
        with sigterm_as_exit():
            benchmark()
    except KeyboardInterrupt:
        print("\ninterrupted (all benchmark processes stopped)")
        raise SystemExit(130) from None


def plan_cells(
    targets: Sequence[Target], modes: Sequence[str], levels: Sequence[int]
) -> list[Cell]:
    """The cells of a run: each target in each of its modes that ``modes`` asks for (a
    passthrough target in its one mode whatever ``modes`` says), at every level."""
    return [
        (t.name, mode, c)
        for t in targets
        for mode in t.modes
        if mode in modes or t.passthrough
        for c in levels
    ]
