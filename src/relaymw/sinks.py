"""Built-in sinks (SPEC §9): Prometheus metrics, a JSON-lines audit log and log lines.

Each sink connects its receivers to :mod:`relaymw.signals` strongly when built (or by
``connect()``), so it works until ``close()`` even if unreferenced; each is a context manager.
relaymw's guarded send logs a sink that raises, and the request goes on. ::

    PrometheusSink()  # prometheus_client's default registry; metrics named relaymw_*
    audit = JsonlAuditSink("/var/log/relaymw/audit.jsonl")  # audit.close() drains it
    LoggingSink()  # logger "relaymw.requests" at INFO; a rejection or ejection at WARNING
    with install(PrometheusSink(), JsonlAuditSink("a.jsonl"), LoggingSink()): ...  # closes all

``PrometheusSink`` twice on one ``(registry, namespace)`` is safe: its collectors live in a
module-level cache keyed by that pair (weak on the registry), so nothing is registered twice,
and such sinks share one set of receivers, connected while any is open: each event counts once.

``JsonlAuditSink`` appends and flushes each line on a background thread (``background=False``:
the caller's). It writes only ``AUDIT_FIELDS``, never a ``RelayConfig`` (it holds api keys) nor
a body (no signal carries one: no option for them); values under secret-looking keys, URL
credentials and ``key: value`` text (a YAML error's excerpt) become ``"[redacted]"``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from decimal import Decimal
from functools import partial
from os import PathLike, fspath
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

from blinker import Signal

from relaymw import signals

__all__ = ["JsonlAuditSink", "LoggingSink", "PrometheusSink", "Sink", "install", "scrub"]

_S = TypeVar("_S", bound="Sink")


class Sink:
    """Base of the sinks: ``handlers`` maps each signal to the callable that hears it."""

    handlers: dict[Signal, Callable[..., None]]

    def connect(self) -> None:
        """Connect every receiver strongly; connecting again changes nothing."""
        for signal, receiver in self.handlers.items():
            signal.connect(receiver, weak=False)

    def disconnect(self) -> None:
        for signal, receiver in self.handlers.items():
            signal.disconnect(receiver)

    def close(self) -> None:
        self.disconnect()

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def install(*sinks: Sink) -> contextlib.ExitStack:
    """Connect ``sinks``; closing the returned stack (or leaving its ``with``) closes them."""
    stack = contextlib.ExitStack()
    for sink in sinks:
        sink.connect()
        stack.callback(sink.close)
    return stack


LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 90.0, 120.0)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_RV = ("route", "version")
_COUNTED = {  # signal and metric name: (help, the event's keys giving the labels)
    "rate_limited": ("Requests over a rate limit", _RV),
    "budget_exceeded": ("Budgets hit (identity budgets as one scope)", ("scope", "period")),
    "cost_limit_exceeded": ("Per-request cost caps applied", (*_RV, "action")),
    "version_ejected": ("Versions ejected by health checks", _RV),
    "config_rejected": ("Configurations rejected", ()),
    "store_unavailable": ("Store failures", ("component",)),
}


class PrometheusMetrics(Sink):
    """The collectors of one ``(registry, namespace)`` and the receivers feeding them."""

    def __init__(self, registry: Any, namespace: str) -> None:
        from prometheus_client import Counter, Histogram

        def make(kind: Any, name: str, doc: str, labels: tuple[str, ...], **kw: Any) -> Any:
            return kind(name, doc, labels, namespace=namespace, registry=registry, **kw)

        self.requests = make(Counter, "requests", "Requests relayed", (*_RV, "status"))
        self.errors = make(Counter, "errors", "Requests ended by an error", (*_RV, "error"))
        self.latency = make(Histogram, "latency_seconds", "Latency", _RV, buckets=LATENCY_BUCKETS)
        self.ttft = make(Histogram, "ttft_seconds", "First chunk", _RV, buckets=TTFT_BUCKETS)
        self.tokens = make(Counter, "tokens", "Tokens by kind", (*_RV, "kind"))
        self.cost = make(Counter, "cost_usd", "Cost in US dollars", _RV)
        self.counters = {n: make(Counter, n, doc, keys) for n, (doc, keys) in _COUNTED.items()}
        self.handlers = {signals.request_finished: self.on_request}
        for name, (_, keys) in _COUNTED.items():
            self.handlers[getattr(signals, name)] = partial(self._count, self.counters[name], keys)
        self._children: dict[tuple[object, ...], Any] = {}
        self._series: dict[tuple[Any, Any], _Series] = {}
        self.users = 0  # the PrometheusSinks connected: receivers are connected while > 0

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)  # one dict lookup once the child exists
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels) if labels else metric
        return child

    def _series_for(self, route: Any, version: Any) -> _Series:
        rv = (str(route or ""), str(version or ""))
        try:
            return self._series.setdefault((route, version), _Series(self, rv))
        except TypeError:  # an unhashable label value from a foreign sender: not cached
            return _Series(self, rv)

    def on_request(
        self,
        _sender: Any,
        *,
        route: Any = None,
        version: Any = None,
        status: Any = None,
        latency_ms: Any = None,  # required: a missing one fails below, as e["latency_ms"] did
        ttft_ms: float | None = None,
        prompt_tokens: Any = None,
        completion_tokens: Any = None,
        cost_usd: Any = None,
        error: Any = None,
        # Named, though unused: binding a keyword costs less than putting it in a ** dict.
        stream: Any = None,
        mode: Any = None,
        protocol: Any = None,
        usage_estimated: Any = None,
        cached_tokens: Any = None,
        **_rest: Any,
    ) -> None:
        # Once per request: every bound child comes from the (route, version) entry, so a
        # request costs one dict lookup instead of a labels() call (and its str()s) per metric.
        # Children are made on first use only: a series appears when it first has a value.
        try:
            series = self._series[route, version]
        except (KeyError, TypeError):
            series = self._series_for(route, version)
        # Cached by int status only: 200.0 or Decimal(200) hash like 200 but count as "none".
        requests = series.by_status.get(status) if status.__class__ is int else None
        (requests or series.requests_for(status)).inc()
        if error:
            self._child(self.errors, *series.rv, str(error)).inc()
        (series.latency or series.child("latency", self.latency)).observe(latency_ms / 1000)
        if ttft_ms is not None:
            (series.ttft or series.child("ttft", self.ttft)).observe(ttft_ms / 1000)
        if prompt_tokens:
            (series.prompt or series.child("prompt", self.tokens, "prompt")).inc(prompt_tokens)
        if completion_tokens:
            child = series.completion or series.child("completion", self.tokens, "completion")
            child.inc(completion_tokens)
        if cost_usd:
            (series.cost or series.child("cost", self.cost)).inc(float(cost_usd))  # only here

    def _count(self, metric: Any, keys: tuple[str, ...], _sender: Any, **e: Any) -> None:
        labels = [str(e.get(k) or "") for k in keys]
        if keys and keys[0] == "scope" and labels[0].startswith("identity:"):
            labels[0] = "identity"  # one series for every identity, not one per hash
        self._child(metric, *labels).inc()


class _Series:
    """The bound children of one ``(route, version)``, each made on first use."""

    __slots__ = ("by_status", "completion", "cost", "latency", "metrics", "prompt", "rv", "ttft")

    def __init__(self, metrics: PrometheusMetrics, rv: tuple[str, str]) -> None:
        self.metrics, self.rv = metrics, rv
        self.by_status: dict[Any, Any] = {}
        self.latency: Any = None
        self.ttft: Any = None
        self.prompt: Any = None
        self.completion: Any = None
        self.cost: Any = None

    def requests_for(self, status: Any) -> Any:
        klass = f"{status // 100}xx" if isinstance(status, int) and status >= 100 else "none"
        child = self.metrics._child(self.metrics.requests, *self.rv, klass)
        if status.__class__ is int:  # a few statuses per series: kept
            self.by_status[status] = child
        return child

    def child(self, slot: str, metric: Any, *labels: str) -> Any:
        child = self.metrics._child(metric, *self.rv, *labels)
        setattr(self, slot, child)
        return child


_shared: WeakKeyDictionary[Any, dict[str, PrometheusMetrics]] = WeakKeyDictionary()
_shared_lock = threading.Lock()


class PrometheusSink(Sink):
    """Prometheus metrics; an unknown route or version (refused before routing) is ``""``."""

    def __init__(self, registry: Any = None, namespace: str = "relaymw", *,
                 connect: bool = True) -> None:  # fmt: skip
        from prometheus_client import REGISTRY

        registry = REGISTRY if registry is None else registry
        with _shared_lock:
            per_registry = _shared.setdefault(registry, {})
            if namespace not in per_registry:
                per_registry[namespace] = PrometheusMetrics(registry, namespace)
            self.metrics, self._connected = per_registry[namespace], False
        if connect:
            self.connect()

    def connect(self) -> None:
        self._switch(True)

    def disconnect(self) -> None:
        self._switch(False)

    def _switch(self, on: bool) -> None:
        with _shared_lock:
            if self._connected != on:
                self._connected, m = on, self.metrics
                m.users += 1 if on else -1
                if m.users == int(on):  # the first sink in or the last one out
                    m.connect() if on else m.disconnect()


REDACTED = "[redacted]"
_SECRET = r"api[_-]?key|secret|passw(?:or)?d|authorization|credential"
_SECRET_KEY = re.compile(rf"{_SECRET}|(?:^|[_-])token$", re.IGNORECASE)
_SECRET_TEXT = re.compile(  # "api_key: sk-..." but not the path "upstreams.x.api_key: ..."
    rf"(?<![.\w])((?:{_SECRET}|token)[\"']?\s*[:=]\s*)[\"']?[^\s\"',}}]+[\"']?", re.IGNORECASE
)
_BEARER = re.compile(r"(bearer\s+)\S+", re.IGNORECASE)
_USERINFO = re.compile(r"://[^/@\s]+@")


def scrub(value: Any) -> Any:
    """A JSON-ready copy of ``value``, secrets redacted; other objects become their type name."""
    if isinstance(value, Mapping):
        return {
            str(k): REDACTED if _SECRET_KEY.search(str(k)) else scrub(v) for k, v in value.items()
        }
    if isinstance(value, (list, tuple, set, frozenset)):
        return [scrub(v) for v in value]
    if isinstance(value, str):
        value = _BEARER.sub(rf"\1{REDACTED}", _SECRET_TEXT.sub(rf"\1{REDACTED}", value))
        return _USERINFO.sub(f"://{REDACTED}@", value)
    if isinstance(value, Decimal):
        return format(value, "f")
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return f"<{type(value).__name__}>"  # never str() an unknown object: it may hold a key


AUDIT_FIELDS: dict[str, tuple[str, ...]] = {
    "request_finished": ("route", "version", "status", "latency_ms", "ttft_ms", "prompt_tokens",
        "completion_tokens", "cached_tokens", "cost_usd", "stream", "error", "mode", "protocol",
        "usage_estimated"),
    "config_loaded": ("revision", "source"),  # never "config": it holds the api keys
    "config_rejected": ("errors", "source"),
    "weights_changed": ("route", "before", "after", "actor"),
    "version_ejected": ("route", "version", "reason", "evidence", "new_weights"),
}  # fmt: skip


class JsonlAuditSink(Sink):
    """Appends ``{"time", "event", <AUDIT_FIELDS[event]>}`` as one JSON line per event."""

    def __init__(self, path: str | PathLike[str], *, background: bool = True,
                 maxsize: int = 10_000, connect: bool = True) -> None:  # fmt: skip
        self.path = fspath(path)
        self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._lock = threading.Lock()
        self._queue = signals.BackgroundReceiver(self._write, maxsize) if background else None
        self.handlers = {getattr(signals, n): partial(self._submit, n) for n in AUDIT_FIELDS}
        if connect:
            self.connect()

    def _submit(self, event: str, sender: Any, **kwargs: Any) -> None:
        record = {"time": time.time(), "event": event}  # stamped now, written later
        record.update((k, kwargs.get(k)) for k in AUDIT_FIELDS[event])
        (self._queue or self._write)(sender, record=record)

    def _write(self, _sender: Any, record: dict[str, Any]) -> None:
        t = record["time"]
        ms = int(t % 1 * 1000)  # truncated: rounding could show the next second's .000
        record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{ms:03d}Z"
        line = json.dumps(scrub(record), ensure_ascii=False, separators=(",", ":"))
        with self._lock:
            if not self._file.closed:
                self._file.write(line + "\n")
                self._file.flush()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every event received so far is written (each line is flushed)."""
        if self._queue is not None:
            self._queue.flush(timeout)

    def close(self) -> None:
        self.disconnect()
        queue, self._queue = self._queue, None
        if queue is not None:
            queue.close()  # its thread writes what is queued, then stops
        with self._lock:
            self._file.close()


_CONFIG_LINES = {  # signal: (message, least level)
    signals.config_loaded: ("config loaded: revision %(revision)s from %(source)s", 0),
    signals.config_rejected: ("config rejected from %(source)s: %(errors)s", logging.WARNING),
    signals.weights_changed: ("weights of %(route)s: %(before)s -> %(after)s by %(actor)s", 0),
    signals.version_ejected: ("version %(route)s/%(version)s ejected: %(reason)s", logging.WARNING),
}


class LoggingSink(Sink):
    """A concise log line per request and configuration event (secrets scrubbed)."""

    def __init__(self, logger: str | logging.Logger = "relaymw.requests",
                 level: int = logging.INFO, *, connect: bool = True) -> None:  # fmt: skip
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.level = level
        self.handlers = {signals.request_finished: self.on_request}
        for signal, (msg, least) in _CONFIG_LINES.items():
            self.handlers[signal] = partial(self.on_config, msg, max(level, least))
        if connect:
            self.connect()

    def on_request(self, _sender: Any, **e: Any) -> None:
        if not self.logger.isEnabledFor(self.level):
            return
        ttft = "" if (t := e.get("ttft_ms")) is None else f" (first chunk {t:.1f} ms)"
        self.logger.log(
            self.level, "%s/%s %s in %.1f ms%s, %s+%s tokens%s, $%s%s", e.get("route"),
            e.get("version"), e.get("status"), e.get("latency_ms", 0.0), ttft,
            e.get("prompt_tokens"), e.get("completion_tokens"),
            " (estimated)" if e.get("usage_estimated") else "", scrub(e.get("cost_usd", 0)),
            f", error {e['error']}" if e.get("error") else "",
        )  # fmt: skip

    def on_config(self, msg: str, level: int, _sender: Any, **e: Any) -> None:
        fields = defaultdict(lambda: None, scrub({k: e[k] for k in e if k != "config"}))
        if isinstance(fields["errors"], list):
            fields["errors"] = "; ".join(map(str, fields["errors"]))
        self.logger.log(level, msg, fields)  # never the RelayConfig: it holds the api keys
