"""What ``relaymw rollout`` shows while it runs: a rich live view on a terminal, lines
otherwise. Both are :class:`~relaymw.rollout.Reporter` s and context managers."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, TextIO

from relaymw.cli import _fmt_weight
from relaymw.control import Figures
from relaymw.rollout import Analysis, Criteria, Reporter, RolloutState

__all__ = ["LiveReporter", "PlainReporter", "clock_text", "describe_criteria"]

HOLD_REPEAT_SECONDS = 10.0  # a hold is said again this often, so a log shows it goes on


def clock_text(seconds: float) -> str:
    """``4.2s``, ``3m05s``, ``10m``, ``1h02m``, ``1h``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    if h:
        return f"{h}h{m:02d}m" if m or s else f"{h}h"
    return f"{m}m{s:02d}s" if s else f"{m}m"


def describe_criteria(c: Criteria) -> str:
    parts = []
    if c.max_error_rate is not None:
        parts.append(f"error rate <= {c.max_error_rate:.1%}")
    if c.max_p99_ms is not None:
        parts.append(f"p99 <= {c.max_p99_ms:g} ms")
    if c.baseline:
        parts.append("no worse than the stable version")
    rules = ", ".join(parts) or "no limits"
    return f"{rules}; at least {c.min_requests} requests per stage"


def _stage(state: RolloutState) -> str:
    return f"stage {state.stage_index + 1}/{len(state.stages)} ({_fmt_weight(state.weight)}%)"


def _started_text(state: RolloutState, resumed: bool) -> str:
    stages = ", ".join(_fmt_weight(s) for s in state.stages)
    plan = (
        f"stages {stages} %, {clock_text(state.interval_seconds)} each; passes with "
        f"{describe_criteria(state.criteria)}; falls back to {state.stable}"
    )
    if resumed:
        where = _stage(state)
        if state.stage_started_at is not None:
            where += f", {clock_text(time.time() - state.stage_started_at)} into it"
        return f"resuming the rollout of {state.alias} to {state.to} at {where} ({plan})"
    return f"rollout of {state.alias} to {state.to}: {plan}"


def _finished_text(state: RolloutState) -> str:
    head = {"succeeded": "rollout succeeded", "rolled_back": "rollout ROLLED BACK"}
    return f"{head.get(state.status, 'rollout stopped')}: {state.reason}"


def _same_terminal(out: TextIO) -> bool:
    """Whether ``out`` and stderr both show on a terminal (say the failure only once)."""
    return out is sys.stderr or (out.isatty() and sys.stderr.isatty())


class PlainReporter(Reporter):
    """One line per event on ``out`` (the failure's reason also on stderr)."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self._last_hold = 0.0

    def __enter__(self) -> PlainReporter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pass

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def started(self, state: RolloutState, resumed: bool) -> None:
        self._say(_started_text(state, resumed))

    def stage_started(self, state: RolloutState, weights: Mapping[str, float]) -> None:
        shown = ", ".join(f"{t}={_fmt_weight(w)}" for t, w in weights.items())
        self._say(f"{_stage(state)}: {state.to} at {_fmt_weight(state.weight)}% ({shown})")
        self._last_hold = 0.0

    def analysed(self, state: RolloutState, analysis: Analysis) -> None:
        if analysis.outcome == "pass":
            self._say(f"{_stage(state)} passed: " + "; ".join(analysis.reasons))
            return
        now = time.monotonic()
        if now - self._last_hold >= HOLD_REPEAT_SECONDS:
            self._last_hold = now
            self._say(f"{_stage(state)} holding: " + "; ".join(analysis.reasons))

    def finished(self, state: RolloutState, analysis: Analysis | None) -> None:
        text = _finished_text(state)
        self._say(text)
        if state.status != "succeeded" and not _same_terminal(self.out):
            print(text, file=sys.stderr, flush=True)


class LiveReporter(Reporter):
    """A rich live view (stage, elapsed time, the canary's figures against the limits),
    with each event printed above it."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console()
        self.state: RolloutState | None = None
        self.figures: Figures | None = None
        self.note = ""
        self._live: Any = None

    def __enter__(self) -> LiveReporter:
        from rich.live import Live

        self._live = Live(
            get_renderable=self._render,
            console=self.console,
            refresh_per_second=4,
            redirect_stderr=False,  # the failure's reason goes to stderr as is, for logs
        )
        self._live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.__exit__(exc_type, exc, tb)
            self._live = None

    def _print(self, text: str, style: str = "") -> None:
        from rich.text import Text

        # A Text carries its own style: a print(style=...) would also colour the live view
        # that rich redraws below it, and plain strings would be read as markup.
        self.console.print(Text(text, style=style))

    def started(self, state: RolloutState, resumed: bool) -> None:
        self.state = state
        self._print(_started_text(state, resumed))

    def stage_started(self, state: RolloutState, weights: Mapping[str, float]) -> None:
        self.figures, self.note = None, "running"
        shown = ", ".join(f"{t}={_fmt_weight(w)}" for t, w in weights.items())
        self._print(
            f"{_stage(state)}: {state.to} at {_fmt_weight(state.weight)}% ({shown})", "bold"
        )

    def progress(self, state: RolloutState, elapsed: float, figures: Figures | None) -> None:
        if figures is not None:
            self.figures = figures

    def analysed(self, state: RolloutState, analysis: Analysis) -> None:
        self.figures = analysis.canary
        if analysis.outcome == "pass":
            self._print(f"{_stage(state)} passed: " + "; ".join(analysis.reasons), "green")
        else:
            self.note = "holding: " + "; ".join(analysis.reasons)

    def finished(self, state: RolloutState, analysis: Analysis | None) -> None:
        if analysis is not None:
            self.figures = analysis.canary
        self.note = state.status
        style = "green" if state.status == "succeeded" else "bold red"
        self._print(_finished_text(state), style)
        if state.status != "succeeded" and not _same_terminal(sys.stdout):
            print(_finished_text(state), file=sys.stderr, flush=True)

    def _render(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        s = self.state
        if s is None:
            return Text("starting the rollout ...")
        elapsed = time.time() - s.stage_started_at if s.stage_started_at else 0.0
        head = Text.assemble(
            (f"{s.alias} → {s.to}  ", "bold"),
            f"{_stage(s)}  {clock_text(elapsed)} / {clock_text(s.interval_seconds)}  ",
            (self.note, "yellow" if self.note.startswith("holding") else "cyan"),
        )
        c, f = s.criteria, self.figures or Figures()
        table = Table(box=None, pad_edge=False)
        for col in ("canary, this stage", "now", "limit"):
            table.add_column(col, justify="left" if col.startswith("canary") else "right")
        table.add_row("requests", str(f.request_count), f">= {c.min_requests}")
        table.add_row(
            "error rate",
            f"{f.error_rate:.1%}",
            "-" if c.max_error_rate is None else f"<= {c.max_error_rate:.1%}",
        )
        p99 = "-" if f.latency_p99_ms is None else f"{f.latency_p99_ms:.0f} ms"
        table.add_row("p99", p99, "-" if c.max_p99_ms is None else f"<= {c.max_p99_ms:g} ms")
        p50 = "-" if f.latency_p50_ms is None else f"{f.latency_p50_ms:.0f} ms"
        table.add_row("p50", p50, "")
        table.add_row("cost / Mtok", f"${float(f.cost_per_token) * 1e6:.2f}", "")
        if c.baseline:
            table.add_row("baseline", "", f"vs {s.stable}")
        return Group(head, table)
