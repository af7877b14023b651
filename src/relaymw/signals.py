"""Signals (SPEC §9): one blinker :class:`~blinker.Namespace`; the sender is the emitter.

Connect a receiver the way Flask users do::

    from relaymw import signals

    @signals.request_finished.connect
    def record(sender, **event):
        print(event["route"], event["version"], event["latency_ms"])

Receivers are held weakly by default (pass ``weak=False`` to keep a lambda alive). relaymw
sends through :func:`send`, which logs and swallows a receiver's exception so a broken sink
never breaks a request. Receivers that do I/O should wrap themselves in
:class:`BackgroundReceiver` so the request path never waits on them.

Keyword arguments of each signal:

``version_selected``
    ``route``, ``version``, ``reason`` (``"cookie"``, ``"key"``, ``"weight"`` or ``"pin"``),
    ``mode`` (``"gateway"`` or ``"in_app"``).
``request_finished``
    exactly once per intercepted request, whatever its end: ``route``, ``version``, ``status``,
    ``latency_ms``, ``ttft_ms`` (None unless streamed), ``prompt_tokens``,
    ``completion_tokens``, ``cost_usd`` (``Decimal``), ``stream``, ``error`` (None or a short
    code: ``"upstream_error"``, ``"upstream_timeout"``, ``"upstream_unreachable"``,
    ``"upstream_truncated"``, ``"client_disconnected"``, ``"rate_limited"``, ``"budget_exceeded"``,
    ``"cost_limit_exceeded"``, ``"bad_request"``), plus ``mode``, ``protocol``,
    ``usage_estimated`` and ``cached_tokens``.
``rate_limited``
    ``route``, ``version``, ``identity`` (hashed), ``limit`` (e.g. ``"600 per 1 minute"``),
    ``retry_after`` (seconds).
``cost_limit_exceeded``
    ``route``, ``version``, ``limit_usd``, ``worst_case_usd``, ``action`` (``"clamp"``,
    ``"reject"`` or ``"cut_stream"``).
``budget_threshold``
    ``scope``, ``period``, ``fraction``, ``spent_usd``, ``limit_usd``.
``budget_exceeded``
    ``scope``, ``period``, ``limit_usd``, ``resets_at`` (ISO 8601).
``upstream_error``
    ``route``, ``version``, ``upstream``, ``status`` (None when unreachable), ``error``.
``version_ejected``
    ``route``, ``version``, ``reason``, ``evidence`` (dict of the window's figures),
    ``new_weights`` (dict tag → weight).
``weights_changed``
    ``route``, ``before`` and ``after`` (dicts tag → weight), ``actor``.
``config_loaded``
    ``config`` (:class:`~relaymw.config.RelayConfig`), ``revision``, ``source``.
``config_rejected``
    ``errors`` (list of ``"path: message"`` strings), ``source``.
``store_unavailable``
    ``store`` (a description without credentials), ``error``, ``component``
    (``"config"``, ``"rate_limits"`` or ``"budgets"``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from blinker import Namespace, Signal

__all__ = [
    "BackgroundReceiver",
    "budget_exceeded",
    "budget_threshold",
    "config_loaded",
    "config_rejected",
    "cost_limit_exceeded",
    "rate_limited",
    "request_finished",
    "send",
    "store_unavailable",
    "upstream_error",
    "version_ejected",
    "version_selected",
    "weights_changed",
]

log = logging.getLogger("relaymw.signals")

relaymw_signals = Namespace()

version_selected = relaymw_signals.signal("version-selected")
request_finished = relaymw_signals.signal("request-finished")
rate_limited = relaymw_signals.signal("rate-limited")
cost_limit_exceeded = relaymw_signals.signal("cost-limit-exceeded")
budget_threshold = relaymw_signals.signal("budget-threshold")
budget_exceeded = relaymw_signals.signal("budget-exceeded")
upstream_error = relaymw_signals.signal("upstream-error")
version_ejected = relaymw_signals.signal("version-ejected")
weights_changed = relaymw_signals.signal("weights-changed")
config_loaded = relaymw_signals.signal("config-loaded")
config_rejected = relaymw_signals.signal("config-rejected")
store_unavailable = relaymw_signals.signal("store-unavailable")


def send(signal: Signal, sender: Any, **kwargs: Any) -> None:
    """Send ``signal``; a receiver that raises is logged, never propagated."""
    if not signal.receivers:  # the common case on the hot path: nobody listens
        return
    for receiver in signal.receivers_for(sender):
        try:
            receiver(sender, **kwargs)
        except Exception:
            log.exception("relaymw signal receiver %r failed", receiver)


class BackgroundReceiver:
    """Hands events to one daemon thread through a bounded queue.

    ``__call__`` never blocks: when the queue is full the event is dropped and counted in
    ``dropped``. Keep a reference to the instance (signals hold receivers weakly)::

        sink = BackgroundReceiver(write_to_database, maxsize=10_000)
        signals.request_finished.connect(sink)
    """

    def __init__(self, func: Callable[..., Any], maxsize: int = 10_000) -> None:
        self.func = func
        self.dropped = 0
        self._closed = False
        self._queue: queue.Queue[tuple[Any, dict[str, Any]] | None] = queue.Queue(maxsize)
        self._thread = threading.Thread(target=self._run, name="relaymw-sink", daemon=True)
        self._thread.start()

    def __call__(self, sender: Any, **kwargs: Any) -> None:
        if self._closed:
            self.dropped += 1
            return
        try:
            self._queue.put_nowait((sender, kwargs))
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self.func(item[0], **item[1])
            except Exception:
                log.exception("relaymw background receiver %r failed", self.func)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued event has been handled."""
        self._queue.join() if timeout is None else _join_with_timeout(self._queue, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop after handling what is queued (at most ``timeout`` seconds)."""
        self._closed = True
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)


def _join_with_timeout(q: queue.Queue[Any], timeout: float) -> None:
    with q.all_tasks_done:
        q.all_tasks_done.wait_for(lambda: q.unfinished_tasks == 0, timeout)
