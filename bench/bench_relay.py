"""End-to-end gateway throughput: relaymw vs a bare aiohttp relay vs FakeLLM directly.

Every server is its own process on 127.0.0.1, pinned to CPU 0: FakeLLM (the upstream, on
uvloop), and uvicorn (one worker, the same loop/HTTP settings for all) serving

* ``bare-aiohttp``: a minimal pure-ASGI relay (``bench/servers.py``) — read the body, POST it
  upstream with one shared ``aiohttp.ClientSession``, stream the answer back; no parsing, no
  routing. It is the baseline of the ratios.
* ``relaymw``: a Starlette app with one unrelated route wrapped in ``RelayMiddleware``, whose
  alias ``chat-production`` splits 95/5 over two versions on FakeLLM, sticky by cookie (the
  load sends no cookie: every request makes a weighted choice and gets a ``Set-Cookie``).
* ``passthrough-app`` and ``passthrough-relaymw``: a tiny Starlette app answering
  ``POST /echo``, alone and wrapped in ``RelayMiddleware`` (not LLM-bound: passthrough cost).

``direct`` sends the same load to FakeLLM itself. The load is a closed-loop generator
(``bench/loadgen.py``: C keep-alive connections, one request in flight on each) on uvloop +
httptools, in its own process pinned to CPU 1; it reports its own CPU use so it can be shown
not to be the bottleneck. Each cell (target, mode, concurrency) gets fresh connections and a
warm-up, then a measurement window: req/s, full latency p50/p99, time to first response byte
(TTFB), and the CPU time (utime + stime from ``/proc/PID/stat``) of the relay and FakeLLM
processes per request. Cells are shuffled in each repetition, but the two cells a target
compares (relaymw and the bare relay, the passthrough app with and without relaymw) take
turns: after a warm-up each, four windows of 0.5 s each, A B B A A B B A (``--slices``; 1 runs
them back to back), merged into one sample per cell; the tables show medians over
repetitions, and the targets are judged on paired ratios: the median over repetitions of each
pair's ratio. Seven repetitions of short windows, rather than three long ones, give the
medians more pairs to work with. The machinery is ``bench/common.py``, shared with
``bench_sidebyside.py``.

Run: ``python bench/bench_relay.py`` (about 5 minutes; ``--quick`` about 1 minute, or
``RELAYMW_BENCH_QUICK=1`` through ``python bench/run.py relay``). The full run writes
``bench/results_relay.md``; ``--output PATH`` writes elsewhere, ``--output -`` nowhere.
Benchmark-only dependencies: ``uvloop`` and ``httptools`` (used when installed, for every
target alike; the run says which loop it used).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    CHUNKS,
    MAX_OTHER_PCT,
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
    run_benchmark,
    run_notes,
    run_options,
    summarize,
)
from machine import LOAD_CPU, SERVER_CPU, can_pin, machine_line  # noqa: E402
from servers import ALIAS, ANSWERED, UPSTREAM_MODEL  # noqa: E402

RESULTS = HERE / "results_relay.md"

# Targets of the issue: relaymw ≥ 0.8x the bare relay's req/s, p50 ≤ 1.3x its p50;
# passthrough at most 3% slower than the app alone.
MIN_RPS_RATIO = 0.8
MAX_P50_RATIO = 1.3
MIN_PASSTHROUGH_RATIO = 0.97
RERUN_BUDGET = 0.3
REPS = 7  # short windows, many pairs: see the module's docstring

CHAT = "/v1/chat/completions"
BOTH = ("json", "stream")
RELAYMW_HEADERS = ("x-relaymw-version", "set-cookie")
TARGETS = (
    Target("direct", "fakellm", CHAT, UPSTREAM_MODEL, BOTH, relay=False),
    Target("bare-aiohttp", "bare-aiohttp", CHAT, UPSTREAM_MODEL, BOTH, relay=True),
    Target(
        "relaymw", "relaymw-routing", CHAT, ALIAS, BOTH, relay=True,
        expect_headers=RELAYMW_HEADERS, answer_contains=ANSWERED,
    ),
    Target(
        "passthrough-app", "passthrough-app", "/echo", ALIAS, ("json",), relay=True,
        through_fake=False,
    ),
    Target(
        "passthrough-relaymw", "passthrough-routing", "/echo", ALIAS, ("json",), relay=True,
        through_fake=False, forbid_headers=("x-relaymw-version",),
    ),
)  # fmt: skip


# --------------------------------------------------------------------------- report


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
            f"| {target} | {mode} | {c} | {fmt(r['rps'], 0)} | {fmt(r['spread'], 1)} "
            f"| {fmt(r['p50'])} | {fmt(r['p99'])} | {fmt(r['ttfb50'])} "
            f"| {fmt(r['relay_us'], 0)} | {fmt(r['fake_us'], 0)} | {fmt(r['gen_pct'], 0)} "
            f"| {fmt(r['other0'], 0)} / {fmt(r['other1'], 0)} | {int(errors)} |"
        )
    return lines


COMPARED = {"relaymw": "bare-aiohttp", "passthrough-relaymw": "passthrough-app"}


def verdicts(
    modes: Sequence[str],
    levels: Sequence[int],
    results: dict[Cell, dict[str, float | None]],
    samples: dict[Cell, list[Sample]],
) -> tuple[list[str], bool]:
    """The targets, judged on paired ratios (:func:`paired_ratio`); the ratio of the medians
    is shown beside them."""
    lines = [
        "| comparison | mode | c | paired ratio | ratio of medians | target | verdict |",
        "|---|---|--:|--:|--:|---|---|",
    ]
    all_met = True

    def row(
        name: str, cells: tuple[Cell, Cell], field: str, goal: float, higher: bool, note: str = ""
    ) -> None:
        nonlocal all_met
        measured, base = cells
        if measured not in samples or base not in samples:
            return
        value = paired_ratio(samples[measured], samples[base], field)
        missing = 0.0 if higher else float("inf")
        plain = ratio(results[measured][field], results[base][field], missing)
        met = value is not None and (value >= goal if higher else value <= goal)
        all_met = all_met and met
        _, mode, c = measured
        lines.append(
            f"| {name} | {mode} | {c} | {fmt(value, 3)} | {fmt(plain, 3)} "
            f"| {'≥' if higher else '≤'} {goal}{note} | {'met' if met else 'NOT met'} |"
        )

    for mode in modes:
        for c in levels:
            pair = (("relaymw", mode, c), ("bare-aiohttp", mode, c))
            row("relaymw / bare req/s", pair, "rps", MIN_RPS_RATIO, higher=True)
            row("relaymw / bare p50", pair, "p50", MAX_P50_RATIO, higher=False)
    for c in levels:
        pair = (("passthrough-relaymw", "json", c), ("passthrough-app", "json", c))
        row(
            "passthrough relaymw / app req/s", pair, "rps", MIN_PASSTHROUGH_RATIO, higher=True,
            note=" (≤ 3% slower)",
        )  # fmt: skip
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


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = run_options(
        "python bench/bench_relay.py", __doc__.split("\n\n")[0], [16, 64], TARGETS, reps=REPS
    )
    return parse_run_args(parser, argv)


def benchmark(args: argparse.Namespace) -> bool:
    quick = args.quick
    reps = args.reps or (1 if quick else REPS)
    warmup = args.warmup if args.warmup is not None else 0.5
    duration = args.duration if args.duration is not None else 2.0
    levels: list[int] = args.concurrency
    modes = [m for m in args.modes.split(",") if m]
    wanted = set(args.targets.split(","))
    targets = [t for t in TARGETS if t.name in wanted]
    output = args.output if args.output is not None else ("-" if quick else str(RESULTS))
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    pinned = can_pin() and not args.no_pin

    cells = plan_cells(targets, modes, levels)
    command = " ".join(["python bench/bench_relay.py", *command_options(args)])
    print(f"relaymw gateway benchmark: {machine_line()}")
    print(
        f"servers pinned to CPU {SERVER_CPU}, load generator to CPU {LOAD_CPU}"
        if pinned
        else "WARNING: processes not pinned (fewer than 2 CPUs or --no-pin)"
    )
    print(
        f"{len(cells)} cells x {reps} repetition(s), {warmup:g} s warm-up + {duration:g} s "
        f"measured each, cells shuffled per repetition, {pairing(args.slices, duration)} "
        f"(seed {seed}); medians and paired ratios reported"
    )
    with tempfile.TemporaryDirectory(prefix="relaymw-bench-") as logdir:
        samples, retries = measure(
            Bench(Path(logdir), pinned=pinned, nice=args.nice, gc_freeze=args.gc_freeze),
            targets,
            cells,
            reps,
            warmup,
            duration,
            seed,
            RERUN_BUDGET,
            block=pair_blocks(COMPARED),
            slices=args.slices,
        )

    results = {cell: summarize(samples[cell]) for cell in cells}
    ordered = sorted(cells, key=lambda cl: (cl[1], cl[2], [t.name for t in TARGETS].index(cl[0])))
    rows = table(ordered, results)
    checks, all_met = verdicts(modes, levels, results, samples)
    extra = extra_cpu_lines(modes, levels, results)
    notes = run_notes(results, retries)
    print()
    print("\n".join(rows))
    print()
    print("\n".join(checks))
    print()
    print("\n".join([*extra, *notes]))

    if output != "-":
        write_markdown(
            Path(output),
            command=command,
            machine=machine_line(),
            setup=(
                f"{reps} repetition(s) of {len(cells)} shuffled cells "
                f"({pairing(args.slices, duration)}), {warmup:g} s warm-up + {duration:g} s "
                f"measured per cell, seed {seed}"
                + ("; servers on CPU 0, load generator on CPU 1" if pinned else "; NOT pinned")
                + (f"; benchmark processes at nice -{args.nice}" if args.nice else "")
            ),
            rows=rows,
            checks=checks,
            extra=[*extra, *(f"- {note}" for note in notes)],
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
repetitions relative to the median. A virtual machine's speed can swing by half for a second
or more, so the verdicts use paired ratios: in each repetition the two cells a ratio compares
take turns in short windows (back to back with `--slices 1`), so that a spell falls on both,
and the ratio is the median over repetitions of each pair's ratio (the ratio of the medians
is shown beside it). CPU per request is utime + stime of the process
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
    run_benchmark(lambda: benchmark(args))


if __name__ == "__main__":
    main()
