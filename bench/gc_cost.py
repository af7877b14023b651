"""What the cyclic garbage collector costs each relay under uvicorn, per request.

Each server of ``bench_relay.py`` runs with a probe (``servers.py``, setting ``gc_report``)
that times every collection by generation; the load generator sends a fixed number of
requests (c=16, the same load as ``bench_relay.py``) after a warm-up, and the probe's totals
before and after give, per 10,000 requests, the collections of each generation, the time they
took, and the objects the GC tracks in the server. The counts are what to compare: they
hardly depend on what else the machine does; the times do, like any timing.

Why: in session 9, the relay benchmark with every server calling ``gc.freeze()`` once its
app was built (``bench_relay.py --gc-freeze``) read relaymw 0.78-0.91x the bare relay
instead of 0.73-0.82x (BENCHMARKS.md, "Session 9"). This shows where part of that goes::

    python bench/gc_cost.py                    # bare relay, relaymw; JSON and streams
    python bench/gc_cost.py --gc-freeze        # the same, every server frozen
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_relay import TARGETS  # noqa: E402
from common import Bench  # noqa: E402
from machine import can_pin, machine_line  # noqa: E402

APPS = ("bare-aiohttp", "relaymw")
CONCURRENCY = 16


def probe(bench: Bench, server: str, reports: Path) -> dict[str, Any]:
    """The server's GC totals so far (it writes them on SIGUSR1)."""
    path = reports / f"{server}.json"
    path.unlink(missing_ok=True)
    os.kill(bench.pid(server), signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server} wrote no GC report:\n{bench.log_tail(server)}")
        time.sleep(0.05)
    report: dict[str, Any] = json.loads(path.read_text())
    return report


def measure(args: argparse.Namespace) -> list[str]:
    targets = [t for t in TARGETS if t.name in APPS]
    rows = [
        "| app | mode | gen0 / gen1 / gen2 collections per 10k requests | ms per collection "
        "(gen0 / gen1 / gen2) | GC µs per request | relay CPU µs per request | objects tracked |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    with tempfile.TemporaryDirectory(prefix="relaymw-gc-") as tmp:
        reports = Path(tmp)
        settings = {"gc_report": str(reports)}
        bench = Bench(reports, pinned=can_pin(), settings=settings, gc_freeze=args.gc_freeze)
        try:
            bench.start([t.server for t in targets])
            for mode in args.modes.split(","):
                for target in targets:
                    bench.check(target, mode)
                    requests = bench.requests_for(target, mode)
                    window = {"count": args.warmup}
                    bench.drive(target, requests, CONCURRENCY, window, timeout=600)
                    before = probe(bench, target.server, reports)
                    window = {"count": args.requests}
                    result = bench.drive(target, requests, CONCURRENCY, window, timeout=600)
                    after = probe(bench, target.server, reports)
                    cpu = bench.sample(target, result).relay_us
                    rows.append(row(target.name, mode, before, after, args.requests, cpu))
        finally:
            bench.stop()
    return rows


def row(
    name: str, mode: str, before: dict[str, Any], after: dict[str, Any], n: int, cpu: float | None
) -> str:
    counts = [after["collections"][g] - before["collections"][g] for g in range(3)]
    seconds = [after["seconds"][g] - before["seconds"][g] for g in range(3)]
    pairs = zip(seconds, counts, strict=True)
    per_collection = [f"{s / c * 1e3:.2f}" if c else "-" for s, c in pairs]
    return (
        f"| {name} | {mode} | {' / '.join(f'{c * 10_000 / n:.0f}' for c in counts)} | "
        f"{' / '.join(per_collection)} | {sum(seconds) / n * 1e6:.1f} | {cpu or 0:.0f} | "
        f"{after['tracked']} |"
    )


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python bench/gc_cost.py", description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000, help="measured, per cell")
    parser.add_argument("--warmup", type=int, default=3_000, help="requests before, per cell")
    parser.add_argument("--modes", default="json,stream")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() in every server")
    args = parser.parse_args(argv)
    print(f"GC cost per request, c={CONCURRENCY}: {machine_line()}")
    print(f"python bench/gc_cost.py {' '.join(argv)}".rstrip())
    print("\n".join(measure(args)))


if __name__ == "__main__":
    main(sys.argv[1:])
