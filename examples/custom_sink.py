"""A tiny custom metric sink: relaymw's ``request_finished`` signal, totalled per version.

::

    from relaymw import signals
    from examples.custom_sink import VersionTotals

    totals = VersionTotals()
    signals.request_finished.connect(totals)  # keep `totals` referenced: receivers are weak

The FastAPI example installs one when ``RELAYMW_PRINT_METRICS=1``. It prints a line per LLM
call (wrapped here)::

    relaymw: chat-production/gpt-4.1-v1 200 in 12.5 ms, 31+8 tokens, $0.000126
    (3 calls, 0 errors, $0.000378)

A sink that does I/O (a database, a metrics backend) should be wrapped in
``relaymw.signals.BackgroundReceiver`` so that requests never wait on it.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from decimal import Decimal
from typing import Any

from relaymw import signals


class Totals:
    """Running figures for one (route, version)."""

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.tokens = 0
        self.cost_usd = Decimal(0)


class VersionTotals:
    """A ``request_finished`` receiver; ``totals[(route, version)]`` holds the figures."""

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.totals: defaultdict[tuple[str | None, str | None], Totals] = defaultdict(Totals)
        self._lock = threading.Lock()  # WSGI servers call receivers from many threads

    def __call__(self, sender: Any, **event: Any) -> None:
        key = (event["route"], event["version"])
        with self._lock:
            t = self.totals[key]
            t.calls += 1
            t.errors += event["error"] is not None
            t.tokens += event["prompt_tokens"] + event["completion_tokens"]
            t.cost_usd += event["cost_usd"]
            line = (
                f"relaymw: {key[0]}/{key[1]} {event['status']} in {event['latency_ms']:.1f} ms,"
                f" {event['prompt_tokens']}+{event['completion_tokens']} tokens,"
                f" ${event['cost_usd']:.6f} ({t.calls} calls, {t.errors} errors,"
                f" ${t.cost_usd:.6f})"
            )
        if self.echo:
            print(line, flush=True)


def install(echo: bool = True) -> VersionTotals:
    """Connect a new :class:`VersionTotals` (held strongly) and return it."""
    totals = VersionTotals(echo)
    signals.request_finished.connect(totals, weak=False)
    return totals
