"""Instructions per version choice, counted by callgrind (deterministic, unlike wall time).

Runs one of ``bench_routing``'s cases ``N`` times after its warm-up; run it twice under
callgrind with different ``N`` and divide the difference in total instructions by the
difference in calls, so start-up and set-up cancel out::

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/routing_instructions.py "key + signed Set-Cookie" e2e 2000

``python bench/routing_instructions.py --all`` does both runs for every case and prints the
table (it needs valgrind on PATH and takes a few minutes).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import callgrind_instructions  # noqa: E402

RUNS = (1_000, 3_000)


def bench_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_routing", HERE / "bench_routing.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_case(label: str, group: str, calls: int, call: bool = True) -> None:
    """``call=False`` runs only the untimed ``prepare()`` steps, to subtract them."""
    bench = bench_module()
    case = next(c for c in bench.cases() if c.label == label and c.group == group)
    args = case.prepare()
    for arg in args:  # warm-up: caches and specialised bytecode, as in the timed run
        case.call(arg)
    done = 0
    while done < calls:
        args = case.prepare()
        if call:
            for arg in args[: calls - done]:
                case.call(arg)
        done += min(len(args), calls - done)


def instructions(label: str, group: str, calls: int, call: bool = True) -> int:
    prepare_only = [] if call else ["--prepare-only"]
    return callgrind_instructions([__file__, label, group, str(calls), *prepare_only])


def main() -> None:
    cases = [(c.label, c.group) for c in bench_module().cases()]
    print(f"| {'path':<50} | {'group':<6} | instructions per call |")
    print(f"|{'-' * 52}|{'-' * 8}|{'-' * 22}:|")
    low, high = RUNS
    for label, group in cases:
        total = instructions(label, group, high) - instructions(label, group, low)
        if group == "choose":  # fresh views are built per batch, outside the timed calls
            total -= instructions(label, group, high, False) - instructions(
                label, group, low, False
            )
        per_call = total / (high - low)
        print(f"| {label:<50} | {group:<6} | {per_call:>21,.0f} |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--all"]:
        main()
    else:
        run_case(sys.argv[1], sys.argv[2], int(sys.argv[3]), "--prepare-only" not in sys.argv)
