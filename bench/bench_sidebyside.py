"""Side by side: relaymw with everything on vs the relays a user would otherwise write.

One load, one upstream (FakeLLM, ``bench/servers.py``), every server its own uvicorn process
(one worker, uvloop + httptools when installed) pinned with FakeLLM to CPU 0, the closed-loop
load generator (``bench/loadgen.py``) pinned to CPU 1:

* ``direct``: the load sent to FakeLLM itself;
* ``bare-aiohttp``: a minimal pure-ASGI relay on one shared ``aiohttp.ClientSession`` (no
  parsing, no routing): the baseline of the ratios;
* ``bare-httpx``: the same relay on one shared ``httpx.AsyncClient`` (default transport and
  pool: 100 connections, 20 kept alive);
* ``relaymw-gateway``: ``RelayMiddleware`` in gateway mode with everything on — a 95/5 split
  sticky by the ``x-user-id`` header with signed cookies, request and token rate limits per
  API key and a month budget on Redis, a per-request cost cap, a health check, a Prometheus
  sink and a ``request_finished`` receiver;
* ``app-httpx`` and ``relaymw-in-app``: a Starlette handler (``POST /api/chat``) that makes
  the LLM call itself, with a plain ``httpx.AsyncClient``, and under ``RelayMiddleware`` with
  ``relay.async_client()`` (in-app mode, same configuration as the gateway);
* ``app`` and ``app+relaymw``: a Starlette ``POST /echo`` app alone and under
  ``RelayMiddleware`` (same configuration): the cost of passthrough requests.

At c = 1, 16 and 64, JSON and streaming, every cell ``--reps`` times (3), shuffled per
repetition; medians of req/s, latency p50/p99, TTFB (streams), the CPU time per request of
the server process, FakeLLM and Redis, and the ratios. The load cycles over 1,024 users (an
``x-user-id`` and an API key each).

    python bench/run.py sidebyside     # or: tox -e bench; about 9 minutes
    RELAYMW_BENCH_QUICK=1 python bench/run.py sidebyside   # 1 repetition, about 2 minutes

``python bench/bench_sidebyside.py --help`` lists the options (targets, levels, windows,
``--output FILE`` for the markdown). Needs Redis on 127.0.0.1:6379 (``--storage memory://``
runs the guards in memory instead). Benchmark processes only read figures; nothing fails on
a figure.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    CHUNKS,
    MAX_OTHER_PCT,
    USERS,
    Bench,
    Cell,
    Sample,
    Target,
    command_options,
    fmt,
    measure,
    pair_blocks,
    paired_ratio,
    pairing,
    parse_run_args,
    plan_cells,
    ratio,
    redis_client,
    remove_keys,
    run_benchmark,
    run_notes,
    run_options,
    summarize,
    verify_redis,
)
from machine import LOAD_CPU, SERVER_CPU, can_pin, load_average, machine_line  # noqa: E402
from servers import (  # noqa: E402
    ALIAS,
    ANSWERED,
    COST_CAP_USD,
    IN_APP_PATH,
    METRICS_PATH,
    RATE_LIMIT,
    REDIS_URL,
    TOKEN_LIMIT,
    UPSTREAM_MODEL,
    counters,
)

LEVELS = (1, 16, 64)
MIN_RPS_RATIO = 0.8  # relaymw gateway vs bare aiohttp relay, req/s (issues 3 and 7)
MAX_P50_RATIO = 1.3  # and p50 (issue 3)
TARGET_LEVELS = (16, 64)  # where those targets apply
MIN_PASSTHROUGH_RATIO = 0.97  # passthrough at most 3% slower than the app alone
RERUN_BUDGET = 0.1  # keeps a full run within ~10 minutes on a busy machine

CHAT = "/v1/chat/completions"
BOTH = ("json", "stream")
CLAIMED = ("x-relaymw-version", "set-cookie", "ratelimit-limit")
BASELINE = "bare-aiohttp"
TARGETS = (
    Target("direct", "fakellm", CHAT, UPSTREAM_MODEL, BOTH, relay=False),
    Target("bare-aiohttp", "bare-aiohttp", CHAT, UPSTREAM_MODEL, BOTH, relay=True),
    Target("bare-httpx", "bare-httpx", CHAT, UPSTREAM_MODEL, BOTH, relay=True),
    Target(
        "relaymw-gateway", "gateway-full", CHAT, ALIAS, BOTH, relay=True,
        expect_headers=CLAIMED, uses_redis=True, answer_contains=ANSWERED,
    ),
    Target("app-httpx", "app-httpx", IN_APP_PATH, UPSTREAM_MODEL, BOTH, relay=True),
    Target(
        "relaymw-in-app", "in-app", IN_APP_PATH, ALIAS, BOTH, relay=True,
        expect_headers=CLAIMED, uses_redis=True, answer_contains=ANSWERED,
    ),
    Target("app", "passthrough-app", "/echo", ALIAS, ("json",), relay=True, through_fake=False),
    Target(
        "app+relaymw", "passthrough-full", "/echo", ALIAS, ("json",), relay=True,
        through_fake=False, forbid_headers=("x-relaymw-version",),
    ),
)  # fmt: skip
# Each row's req/s and p50 are compared with its baseline's in the same mode and c.
BASELINES = {t.name: BASELINE for t in TARGETS if not t.passthrough and t.name != BASELINE}
BASELINES["app+relaymw"] = "app"
COMPARISONS = (  # (measured, baseline, what it shows)
    ("relaymw-gateway", BASELINE, "gateway, everything on / bare aiohttp relay"),
    ("relaymw-in-app", "app-httpx", "in-app handler + relaymw / same handler, plain httpx"),
    ("bare-httpx", BASELINE, "bare httpx relay / bare aiohttp relay"),
    ("app+relaymw", "app", "passthrough: app + relaymw / app alone"),
)

Results = Mapping[Cell, Mapping[str, float | None]]
Samples = Mapping[Cell, Sequence[Sample]]
COMPARED = {measured: base for measured, base, _ in COMPARISONS}


# --------------------------------------------------------------------------- report


def table(mode: str, levels: Sequence[int], names: Sequence[str], results: Results) -> list[str]:
    stream = mode == "stream"
    head = "| target | c | req/s | ± % | vs baseline | p50 ms | p99 ms |"
    head += " TTFB p50 ms |" if stream else ""
    head += (
        " server CPU µs/req | FakeLLM CPU µs/req | Redis CPU µs/req | load gen CPU % "
        "| other CPU % (0 / 1) | errors |"
    )
    lines = [head, "|" + "---|" + "--:|" * (head.count("|") - 2)]
    for c in levels:
        for name in names:
            r = results.get((name, mode, c))
            if r is None:
                continue
            base = results.get((BASELINES.get(name, ""), mode, c))
            vs = fmt(ratio(r["rps"], base["rps"]), 2) if base else "—"
            row = (
                f"| {name} | {c} | {fmt(r['rps'], 0)} | {fmt(r['spread'], 1)} | {vs} "
                f"| {fmt(r['p50'])} | {fmt(r['p99'])} |"
            )
            row += f" {fmt(r['ttfb50'])} |" if stream else ""
            row += (
                f" {fmt(r['relay_us'], 0)} | {fmt(r['fake_us'], 0)} | {fmt(r['redis_us'], 0)} "
                f"| {fmt(r['gen_pct'], 0)} | {fmt(r['other0'], 0)} / {fmt(r['other1'], 0)} "
                f"| {int(r['errors'] or 0)} |"
            )
            lines.append(row)
    return lines


def comparisons(
    modes: Sequence[str], levels: Sequence[int], results: Results, samples: Samples
) -> list[str]:
    """Paired ratios (:func:`paired_ratio`: the median of each repetition's pair), judged
    against the targets."""
    lines = [
        "| comparison | mode | c | req/s ratio (paired) | p50 ratio (paired) "
        "| server CPU µs/req added | target | verdict |",
        "|---|---|--:|--:|--:|--:|---|---|",
    ]
    for measured, base, label in COMPARISONS:
        for mode in modes:
            for c in levels:
                cell, base_cell = (measured, mode, c), (base, mode, c)
                r, b = results.get(cell), results.get(base_cell)
                if r is None or b is None:
                    continue
                rps = paired_ratio(samples[cell], samples[base_cell], "rps") or 0.0
                p50 = paired_ratio(samples[cell], samples[base_cell], "p50") or float("inf")
                cpu = None
                if r["relay_us"] is not None and b["relay_us"] is not None:
                    cpu = r["relay_us"] - b["relay_us"]
                goal, verdict = _target(measured, c, rps, p50)
                lines.append(
                    f"| {label} | {mode} | {c} | {fmt(rps, 3)} | {fmt(p50, 3)} "
                    f"| {'—' if cpu is None else f'{cpu:+.0f}'} | {goal} | {verdict} |"
                )
    return lines


def _target(measured: str, c: int, rps: float, p50: float) -> tuple[str, str]:
    if measured == "relaymw-gateway" and c in TARGET_LEVELS:
        met = rps >= MIN_RPS_RATIO and p50 <= MAX_P50_RATIO
        goal = f"req/s ≥ {MIN_RPS_RATIO}, p50 ≤ {MAX_P50_RATIO}"
        return goal, "met" if met else "NOT met"
    if measured == "app+relaymw":
        met = rps >= MIN_PASSTHROUGH_RATIO
        return f"req/s ≥ {MIN_PASSTHROUGH_RATIO}", "met" if met else "NOT met"
    return "", ""


def describe_setup(
    reps: int, cells: int, warmup: float, duration: float, seed: int, pinned: bool, storage: str,
    slices: int,
) -> str:  # fmt: skip
    return (
        f"{reps} repetition(s) of {cells} cells, shuffled in each repetition, "
        f"{pairing(slices, duration)} (seed {seed}); "
        f"{warmup:g} s warm-up + {duration:g} s measured per cell; "
        + ("servers on CPU 0, load generator on CPU 1" if pinned else "NOT pinned")
        + f"; guards' storage {storage}"
    )


def markdown(
    command: str, setup: str, modes: Sequence[str], levels: Sequence[int], results: Results,
    samples: Samples, notes: Sequence[str],
) -> str:  # fmt: skip
    names = [t.name for t in TARGETS]
    titles = {"json": "JSON", "stream": f"Streaming ({CHUNKS} SSE chunks per answer)"}
    sections = [
        f"### {titles[mode]}\n\n" + "\n".join(table(mode, levels, names, results)) for mode in modes
    ]
    return f"""## Side-by-side benchmark (`bench/bench_sidebyside.py`)

Command: `tox -e bench`, i.e. `python bench/run.py sidebyside`; this run:
`{command}`

Machine: {machine_line()}

Run: {setup}.

How to read it: closed-loop load, c keep-alive connections with one request in flight on each,
cycling over {USERS:,} users (an `x-user-id` and an API key each). FakeLLM and the measured
server share CPU 0, so a relay's req/s is that of the pair. Figures are medians over the
repetitions; "± %" is half the req/s range over them, relative to the median; "vs baseline" (a
ratio of medians) is req/s over `{BASELINE}`'s (for `app+relaymw`: over `app`'s) in the same
mode and c. CPU per request is utime + stime (`/proc/PID/stat`) over the window ÷ requests
completed in it (at c = 1 a process's background work, timers and the health check, is shared
by fewer requests); Redis is not pinned. TTFB is the time to the first response byte. "other
CPU %" is the busy time of CPU 0 not used by our servers and of CPU 1 not used by the load
generator or Redis, the worst over the repetitions (a sample over {MAX_OTHER_PCT:g}% is re-run
and the cleanest attempt kept): trust ratios where it is low.

Targets: `direct` = load → FakeLLM; `bare-aiohttp` / `bare-httpx` = minimal pure-ASGI relay
on one shared aiohttp.ClientSession / httpx.AsyncClient (httpx's default pool: 100
connections, 20 kept alive, as `relay.async_client()` has); `relaymw-gateway` = Starlette app
under RelayMiddleware, alias `{ALIAS}` split 95/5, sticky by `x-user-id` with signed cookies,
rate limit {RATE_LIMIT} + token limit {TOKEN_LIMIT} per API key and a month budget on the
guards' storage, cost cap ${COST_CAP_USD} per request, health check, PrometheusSink and a
`request_finished` receiver; `app-httpx` / `relaymw-in-app` = a Starlette `POST {IN_APP_PATH}`
handler calling FakeLLM with a plain httpx.AsyncClient / with `relay.async_client()` under
RelayMiddleware (same configuration); `app` / `app+relaymw` = Starlette `POST /echo` alone /
under RelayMiddleware (same configuration; passthrough requests).

{(chr(10) * 2).join(sections)}

### Ratios

Each ratio is paired: in every repetition the cells it compares ran in turns of short
windows (or back to back with `--slices 1`), and the ratio is the median over repetitions of
those pairs' ratios (a virtual machine's speed can swing by half for a second or more; cells
measured in turns meet the same spell).

{chr(10).join(comparisons(modes, levels, results, samples))}

{chr(10).join(f"- {note}" for note in notes)}
"""


# --------------------------------------------------------------------------- checks


def verify_everything_on(bench: Bench, storage: str, prefix: str) -> None:
    """After the checks, before the load: the guards keep their state on Redis (not in a
    fallback), and the Prometheus sink and the signal receiver saw each check exactly once."""
    verify_redis(storage, prefix)
    for target in TARGETS:
        if target.server not in ("gateway-full", "in-app") or target.server not in bench.servers:
            continue
        seen = counters(bench.get(target.server, METRICS_PATH))
        counted, received = seen["counted"], seen["received"]
        checks = len(target.modes)
        if counted != checks or received != checks:
            raise RuntimeError(
                f"{target.name}: after {checks} checked requests the Prometheus sink counted "
                f"{counted:g} and the request_finished receiver got {received:g}"
            )


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = run_options(
        "python bench/bench_sidebyside.py", __doc__.split("\n\n")[0], LEVELS, TARGETS
    )
    parser.add_argument(
        "--storage", default=REDIS_URL, help="the guards' storage (default: %(default)s)"
    )
    return parse_run_args(parser, argv)


def benchmark(args: argparse.Namespace) -> None:
    quick = args.quick
    reps = args.reps or (1 if quick else 3)
    warmup = args.warmup if args.warmup is not None else (0.5 if quick else 1.0)
    duration = args.duration if args.duration is not None else (1.5 if quick else 2.5)
    levels: list[int] = args.concurrency
    modes = [m for m in args.modes.split(",") if m]
    wanted = set(args.targets.split(","))
    on_redis = args.storage.startswith(("redis://", "rediss://"))
    # Without Redis, Redis's CPU (other processes' use of it) is none of these targets' doing.
    targets = [t._replace(uses_redis=t.uses_redis and on_redis) for t in TARGETS]
    targets = [t for t in targets if t.name in wanted]
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    pinned = can_pin() and not args.no_pin
    cells = plan_cells(targets, modes, levels)
    command = " ".join(["python bench/bench_sidebyside.py", *command_options(args)])
    if args.storage != REDIS_URL:
        command += f" --storage {args.storage}"
    setup = describe_setup(
        reps, len(cells), warmup, duration, seed, pinned, args.storage, args.slices
    )
    setup += f"; load average (1 / 5 / 15 min) at the start {load_average()}"
    planned = len(cells) * reps * (warmup + duration + 0.3 + args.slices * 0.3) / 60
    print(f"side-by-side benchmark: {machine_line()}")
    print(
        f"servers pinned to CPU {SERVER_CPU}, load generator to CPU {LOAD_CPU}"
        if pinned
        else "WARNING: processes not pinned (fewer than 2 CPUs or --no-pin)"
    )
    print(f"{setup}; about {planned:.1f} min of load", flush=True)
    try:
        redis_client(args.storage)
    except Exception as exc:
        raise SystemExit(
            f"no Redis at {args.storage} ({exc}): start one, or pass --storage memory://"
        ) from None
    prefix = f"relaymw-bench:{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="relaymw-bench-") as logdir:
            bench = Bench(
                Path(logdir),
                pinned=pinned,
                nice=args.nice,
                settings={"storage": args.storage, "prefix": prefix},
                gc_freeze=args.gc_freeze,
            )
            samples, retries = measure(
                bench, targets, cells, reps, warmup, duration, seed, RERUN_BUDGET,
                on_ready=lambda bench: verify_everything_on(bench, args.storage, prefix),
                block=pair_blocks(COMPARED), slices=args.slices,
            )  # fmt: skip
    finally:
        remove_keys(args.storage, prefix)
    results = {cell: summarize(samples[cell]) for cell in cells}
    notes = [
        *run_notes(results, retries),
        f"wall time {(time.monotonic() - started) / 60:.1f} min",
    ]
    shown = [m for m in ("json", "stream") if any(cell[1] == m for cell in cells)]
    text = markdown(command, setup, shown, levels, results, samples, notes)
    print()
    print(text)
    if args.output not in (None, "-"):
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")


def main() -> None:
    args = parse_args(sys.argv[1:])
    run_benchmark(lambda: benchmark(args))


if __name__ == "__main__":
    main()
