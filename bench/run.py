"""Run benchmarks: ``python bench/run.py [NAME ...] [OPTION ...]`` (all of ``bench/bench_*.py``
by default).

A name is the module's name without ``bench_`` (``routing`` runs ``bench/bench_routing.py``).
Each module exposes ``main() -> None`` and prints its own figures. Everything from the first
argument that starts with ``-`` is left to the modules, which read ``sys.argv``:
``python bench/run.py sidebyside --quick``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def available() -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}


def run(name: str, path: Path) -> None:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()


def main(argv: list[str]) -> int:
    found = available()
    options = next((i for i, arg in enumerate(argv) if arg.startswith("-")), len(argv))
    names = [n.removeprefix("bench_").removesuffix(".py") for n in argv[:options]] or list(found)
    unknown = [n for n in names if n not in found]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(found)}")
        return 2
    for i, name in enumerate(names):
        if i:
            print()
        print(f"== {name} ==")
        run(name, found[name])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
