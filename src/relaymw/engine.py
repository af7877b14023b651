"""The framework-free core: :class:`Relay` holds the current snapshot and turns one request
into a decision (route → choice → rewrite) and, when it ends, into one record (usage → cost →
signals). The ASGI and WSGI adapters only move bytes around it.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from decimal import Decimal
from importlib import resources
from typing import Any, Literal, Protocol

import httpx
import orjson

from relaymw import protocols, signals
from relaymw.changelog import MemoryJournal, changes_between
from relaymw.config import (
    Price,
    RelayConfig,
    Route,
    build_config,
    parse_document,
    unstructure_config,
)
from relaymw.cost import PicoRates, cost_of_usage, cost_pico, effective_cap
from relaymw.errors import (
    ConfigError,
    RequestRejected,
    StoreConflictError,
    StoreError,
    UpstreamError,
    UpstreamTimeout,
)
from relaymw.guard import Admission, Guard
from relaymw.health import Evaluation, HealthChecker, share_out
from relaymw.metrics import MetricsRegistry, RedisMetricsPublisher, VersionMetrics
from relaymw.protocols import Endpoint, Usage
from relaymw.snapshot import (
    CompiledRoute,
    HeaderSource,
    KeyFunction,
    RequestView,
    Snapshot,
    VersionChoice,
)
from relaymw.stores import RawDocument, Store, open_store
from relaymw.stores.base import Journal
from relaymw.upstream import UpstreamPool

__all__ = [
    "PAGE_ERRORS",
    "Exchange",
    "GatewayCall",
    "Relay",
    "is_event_stream",
    "too_large",
    "upstream_rejection",
    "usage_of_body",
]

log = logging.getLogger("relaymw")

# An app's own endpoints (in-app mode) answer relaymw's refusals in OpenAI's error shape.
PAGE_ERRORS = Endpoint("openai", "chat", "/chat/completions")
_perf = time.perf_counter
_ZERO = Decimal(0)


class Exchange:
    """One intercepted request and, once :meth:`Relay.build_call` has claimed it, the call
    relaymw makes upstream for it (one object per request: the hot path allocates no other).
    :meth:`finish` records it exactly once, however it ends."""

    __slots__ = (
        "_cost",
        "admission",
        "body",
        "choice",
        "done",
        "drop_usage_chunk",
        "endpoint",
        "first_chunk_at",
        "headers",
        "headers_at",
        "mode",
        "relay",
        "request_body",
        "sent_at",
        "set_cookie",
        "started",
        "stream",
        "tariff",
        "url",
        "usage",
    )

    # The call, set by Relay.build_call (read only after it).
    url: str
    headers: dict[str, str]
    body: bytes  # as sent upstream
    drop_usage_chunk: bool
    set_cookie: str | None

    def __init__(self, relay: Relay, mode: str, endpoint: Endpoint | None) -> None:
        self.relay = relay
        self.mode = mode
        self.endpoint = endpoint
        self.started = _perf()
        self.choice: VersionChoice | None = None
        self.stream = False
        self.sent_at = 0.0
        self.headers_at: float | None = None  # upstream response headers arrived
        self.first_chunk_at: float | None = None  # first streamed body chunk: time to first token
        self.done = False
        self.admission: Admission | None = None
        self.request_body: dict[str, Any] | None = None  # as sent upstream, for a usage estimate
        self.usage: Usage | None = None
        # The chosen version's price, and its per-token rates in whole pico-USD (None when
        # not whole): set with the choice.
        self.tariff: tuple[Price | None, PicoRates | None] = _NO_TARIFF
        self._cost: Decimal | None = None

    @property
    def exchange(self) -> Exchange:
        """The exchange of this call: itself (the call and its record are one object)."""
        return self

    def mark_first_chunk(self) -> None:
        if self.first_chunk_at is None:
            self.first_chunk_at = _perf()

    def finish(
        self,
        status: int,
        usage: Usage | None = None,
        error: str | None = None,
        output_tokens: int = 0,
    ) -> None:
        """Record the request once: its version's metrics and ``request_finished``.
        ``output_tokens`` is what was seen of the output, used to estimate usage when a
        successful upstream reported none."""
        if self.done:
            return
        self.done = True
        relay, choice = self.relay, self.choice
        if usage is None and choice is not None and 200 <= status < 300:
            usage = relay._estimate_usage(self, output_tokens)
        self.usage = usage
        latency_ms = (_perf() - self.started) * 1000
        ttft_ms = None
        if self.stream and self.first_chunk_at is not None:
            ttft_ms = (self.first_chunk_at - self.started) * 1000
        if error is None and status >= 500:
            error = "upstream_error"
        if choice is not None:
            pico = 0
            finer: Decimal | None = None  # a cost with a part below one pico-USD
            if usage is not None:
                price, rates = self.tariff
                if rates is not None:
                    pico = cost_pico(rates, usage)
                elif price is not None:
                    finer = self.cost
                relay._metrics.record_pico(
                    choice.metrics_key,
                    status,
                    latency_ms,
                    ttft_ms,
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    pico,
                    error,
                    finer,
                )
            else:
                relay._metrics.record_pico(
                    choice.metrics_key, status, latency_ms, ttft_ms, 0, 0, 0, error
                )
        if not signals.request_finished.receivers:  # the common case: skip building the event
            return
        signals.send(
            signals.request_finished,
            relay,
            route=choice.route if choice else None,
            version=choice.version_tag if choice else None,
            status=status,
            latency_ms=latency_ms,
            ttft_ms=ttft_ms,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            cost_usd=self.cost,
            stream=self.stream,
            error=error,
            mode=self.mode,
            protocol=self.endpoint.family if self.endpoint else None,
            usage_estimated=usage.estimated if usage else False,
            cached_tokens=usage.cached_tokens if usage else 0,
        )

    @property
    def billed(self) -> bool:
        """Whether the upstream produced something that costs money."""
        return self.usage is not None

    @property
    def cost(self) -> Decimal:
        """What the call cost, in USD: zero until it is recorded, or when nothing was billed.

        Worked out when first asked (by a budget or a ``request_finished`` receiver): the
        metrics count whole pico-USD without it."""
        cost = self._cost
        if cost is None:
            usage = self.usage
            if not self.done or usage is None or self.choice is None:
                return _ZERO
            cost = self._cost = cost_of_usage(self.tariff[0], usage)
        return cost

    def response_headers(
        self, upstream_headers: Iterable[tuple[bytes, bytes]] | Iterable[tuple[str, str]]
    ) -> list[tuple[bytes, bytes]]:
        """Safe upstream headers (raw or decoded, names in any case) plus relaymw's own,
        computed when the response starts."""
        now = _perf()
        # Time relaymw itself spent: before the upstream call and after its headers arrived.
        overhead = (self.sent_at - self.started) + (now - (self.headers_at or now))
        out = protocols.response_headers(upstream_headers)
        out.append(self.choice.version_header)  # type: ignore[union-attr]
        adm = self.admission
        if adm is not None and adm.headers:
            out += [(k.lower().encode(), v.encode()) for k, v in adm.headers]
        out.append((b"x-relaymw-overhead-ms", b"%.3f" % (overhead * 1000)))
        if self.set_cookie:
            out.append((b"set-cookie", self.set_cookie.encode("latin-1")))
        return out


class GatewayCall(Protocol):
    """An :class:`Exchange` that :meth:`Relay.build_call` has claimed, as the adapters read
    it: by then it has a choice and a call to make (the same object, typed for that)."""

    @property
    def choice(self) -> VersionChoice: ...
    @property
    def endpoint(self) -> Endpoint: ...
    @property
    def exchange(self) -> Exchange: ...
    @property
    def url(self) -> str: ...
    @property
    def headers(self) -> dict[str, str]: ...
    @property
    def body(self) -> bytes: ...
    @property
    def stream(self) -> bool: ...
    @property
    def drop_usage_chunk(self) -> bool: ...
    @property
    def set_cookie(self) -> str | None: ...

    def response_headers(
        self, upstream_headers: Iterable[tuple[bytes, bytes]] | Iterable[tuple[str, str]]
    ) -> list[tuple[bytes, bytes]]: ...


_NO_TARIFF: tuple[Price | None, PicoRates | None] = (None, None)


def default_config_path() -> str:
    return str(resources.files("relaymw").joinpath("default.toml"))


class Relay:
    """The relay: configuration, choice, and the record of every request.

    Build it from a store (``Relay.from_store("relay.toml")``), from a config mapping or
    :class:`RelayConfig`, or with no argument for the embedded default configuration.
    ``sticky_key`` and ``identity`` are callables used where the config says ``"callable"``.
    ``watch=False`` does not follow the store's changes; ``health=False`` runs no health
    checks, for a process that only reads and edits the configuration (the CLI).
    """

    def __init__(
        self,
        config: RelayConfig | Mapping[str, Any] | None = None,
        *,
        store: Store | None = None,
        sticky_key: KeyFunction | None = None,
        identity: KeyFunction | None = None,
        upstream_client: Literal["aiohttp", "httpx"] = "aiohttp",
        watch: bool = True,
        health: bool = True,
    ) -> None:
        self.store = store
        self.journal: Journal = (
            store
            if isinstance(store, Journal)
            else MemoryJournal(writable=store is None or store.writable)
        )
        self.sticky_key = sticky_key
        self.identity = identity
        self.pool = UpstreamPool(upstream_client)
        self._lock = threading.Lock()
        # Held by a writer from its save until it has applied what it saved, and by the store's
        # watcher while it applies: the watcher then finds that revision current and leaves it
        # alone, so weights_changed names the writer (a health check, the API), not "store".
        self._write_lock = threading.RLock()
        if store is not None:
            raw = store.load()
            document = parse_document(raw.data, raw.format)
            snapshot = Snapshot.compile(build_config(document), document, raw.revision, raw.source)
        elif isinstance(config, RelayConfig):
            snapshot = Snapshot.compile(config, unstructure_config(config), "", "object")
        elif config is not None:
            document = dict(config)
            snapshot = Snapshot.compile(build_config(document), document, "", "mapping")
        else:
            path = default_config_path()
            with open(path, "rb") as f:
                document = parse_document(f.read(), "toml")
            snapshot = Snapshot.compile(build_config(document), document, "", "embedded default")
        # Every path a request may be claimed on (gateway and in-app), kept current on every
        # swap: the adapters hold this very dict, so a request not for us costs one lookup.
        self.claimed_paths: dict[str, bool] = {}
        self._swap(snapshot)
        self.guard = Guard(snapshot.config, self, identity=identity)
        self._metrics = _metrics_registry(snapshot.config)
        # When each route's weights last changed: baseline health tests count from there.
        self._stage_started = dict.fromkeys(snapshot.routes, time.time())
        self._health = HealthChecker(self._metrics)
        self._stop_health: Callable[[], None] | None = None
        self._run_health = health
        self._start_health(snapshot)
        signals.send(
            signals.config_loaded,
            self,
            config=snapshot.config,
            revision=snapshot.revision,
            source=snapshot.source,
        )
        if store is not None and watch:
            store.watch(self._on_document, self._on_store_error)

    @classmethod
    def given(cls, relay: Relay | None, config: str | os.PathLike[str] | Store | None) -> Relay:
        """The adapters' ``relay=`` / ``config=`` arguments as one relay (the embedded default
        configuration when neither is given)."""
        if relay is not None:
            return relay
        return cls.from_store(config) if config is not None else cls()

    @classmethod
    def from_store(cls, source: str | os.PathLike[str] | Store, **kwargs: Any) -> Relay:
        """A relay on a store: a path, ``redis://...``, ``https://...`` or a :class:`Store`."""
        return cls(store=open_store(source), **kwargs)

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def config(self) -> RelayConfig:
        return self._snapshot.config

    def _swap(self, snapshot: Snapshot) -> None:
        """Make ``snapshot`` current (the caller holds the lock, or nothing runs yet)."""
        self._snapshot = snapshot
        paths = self.claimed_paths
        wanted = dict.fromkeys(snapshot.gateway, True)
        wanted.update(dict.fromkeys(snapshot.in_app_paths, True))
        # Updated in place, new paths first: a path in both configurations is never missing
        # for a request reading the dict meanwhile (from another thread).
        paths.update(wanted)
        for path in [p for p in paths if p not in wanted]:
            del paths[path]

    # --- configuration changes --------------------------------------------------------------

    def apply_document(self, raw: RawDocument, actor: str = "store") -> bool:
        """Validate a new document and swap it in; an invalid one leaves the current config.

        ``actor`` names who made the change, for ``weights_changed``."""
        current = self._snapshot
        if raw.revision and raw.revision == current.revision and raw.source == current.source:
            return True
        try:
            document = parse_document(raw.data, raw.format)
            config = build_config(document)
        except ConfigError as exc:
            errors = [str(i) for i in exc.issues]
            log.warning(
                "relaymw: rejected configuration from %s, keeping revision %s: %s",
                raw.source,
                self._snapshot.revision or "(initial)",
                "; ".join(errors),
            )
            signals.send(signals.config_rejected, self, errors=errors, source=raw.source)
            return False
        with self._lock:
            current = self._snapshot
            changes = _weight_changes(current.config, config)
            # An ejection stands until someone sets that route's weights (a health write-back
            # itself sets the ejected version to 0, so it stays out either way).
            changed = {alias for alias, _, _ in changes}
            ejected = {a: t for a, t in current.ejected.items() if a not in changed}
            self._swap(Snapshot.compile(config, document, raw.revision, raw.source, ejected))
            guard = Guard(config, self, identity=self.identity, previous=self.guard)
            self.guard = guard
        for retired in guard.retired:
            retired.close()
        self._start_health(self._snapshot)
        now = time.time()
        for alias in self._snapshot.routes:
            self._stage_started.setdefault(alias, now)
        for alias, _, _ in changes:
            self._stage_started[alias] = now
        for alias, before, after in changes:
            signals.send(
                signals.weights_changed, self, route=alias, before=before, after=after, actor=actor
            )
        log.info("relaymw: loaded configuration revision %s from %s", raw.revision, raw.source)
        signals.send(
            signals.config_loaded, self, config=config, revision=raw.revision, source=raw.source
        )
        return True

    def _on_document(self, raw: RawDocument) -> None:
        with self._write_lock:
            self.apply_document(raw)

    def _on_store_error(self, exc: Exception) -> None:
        store = self.store.describe() if self.store is not None else "store"
        log.warning("relaymw: %s unavailable, keeping the current configuration: %s", store, exc)
        signals.send(
            signals.store_unavailable, self, store=store, error=str(exc), component="config"
        )

    def update_document(
        self,
        change: Callable[[dict[str, Any]], dict[str, Any]],
        retries: int = 5,
        actor: str = "api",
        action: str = "update",
    ) -> Snapshot:
        """Apply ``change`` to the stored document, validate, save (compare-and-set) and swap.

        Each changed object lands in the change log (:meth:`changes`) under ``actor`` and
        ``action``. Raises :class:`ConfigError` when the result is invalid and ``StoreError``
        when the store is read-only or keeps changing under us.
        """
        if self.store is None:
            raise StoreError("this relay has no store to write to")
        for _ in range(retries):
            raw = self.store.load()
            before = parse_document(raw.data, raw.format)
            document = change(copy.deepcopy(before))
            build_config(document)  # raises ConfigError before anything is written
            with self._write_lock:
                revision = self._save_unless_conflict(document, raw.revision)
                if revision is not None:
                    entries = changes_between(
                        before, document, actor=actor, action=action, revision=revision
                    )
                    for entry in entries:
                        try:
                            self.journal.append_change(entry)
                        except StoreError as exc:  # the change stands; say its record is missing
                            log.warning(
                                "relaymw: could not record a change in the change log: %s", exc
                            )
                    # Read back rather than trust our copy: another writer may have followed.
                    self.apply_document(self.store.load(), actor)
            if revision is not None:
                return self._snapshot
        raise StoreConflictError("the configuration kept changing while writing; try again")

    def _save_unless_conflict(self, document: dict[str, Any], expected: str) -> str | None:
        """The new revision, or None when another writer saved first (the caller retries;
        not a ``continue`` inside the lock's ``with``, which mypyc cannot compile)."""
        assert self.store is not None
        try:
            return self.store.save(document, expected_revision=expected)
        except StoreConflictError:
            return None

    def changes(self, limit: int = 100) -> list[dict[str, Any]]:
        """The change log, newest first: who changed what, when, before and after."""
        return self.journal.changes(limit)

    def read_state(self, name: str) -> dict[str, Any] | None:
        """A small named state kept in the store beside the document (e.g. a rollout's)."""
        return self.journal.read_state(name)

    def write_state(self, name: str, value: dict[str, Any] | None) -> None:
        """Keep (or, with ``None``, delete) a named state in the store."""
        self.journal.write_state(name, value)

    def admin_app(
        self, token: str | None = None, tokens: Mapping[str, str] | None = None, **kwargs: Any
    ) -> Any:
        """The version-control API (SPEC §7) as a Starlette app to mount in your service."""
        from relaymw.admin import create_admin_app

        return create_admin_app(self, token=token, tokens=tokens, **kwargs)

    # --- one request ------------------------------------------------------------------------

    def prepare_gateway(
        self,
        snapshot: Snapshot,
        endpoint: Endpoint,
        raw_body: bytes,
        request: RequestView,
        exchange: Exchange,
    ) -> GatewayCall | None:
        """Decide a gateway request; None when its ``model`` is not ours (pass it through).

        Raises :class:`RequestRejected` for a request relaymw answers itself.
        """
        body = protocols.parse_body(raw_body)
        model = protocols.requested_model(body)
        route = snapshot.routes.get(model)  # route_for_model's usual case, inlined
        pinned = None
        if route is None:
            found = snapshot.route_for_model(model)
            if found is None:
                return None
            route, pinned = found
        choice, set_cookie = snapshot.choose(
            route, request, pinned_tag=pinned, sticky_key=self.sticky_key
        )
        if signals.version_selected.receivers:
            self._selected(choice, "gateway")
        return self.build_call(
            endpoint, body, choice, request.headers, exchange, set_cookie, route.route
        )

    def build_call(
        self,
        endpoint: Endpoint,
        body: dict[str, Any],
        choice: VersionChoice,
        client_headers: HeaderSource,
        exchange: Exchange,
        set_cookie: str | None = None,
        route: Route | None = None,
        in_app: bool = False,
    ) -> GatewayCall:
        """Rewrite a claimed request for the chosen version (``body`` is modified in place)
        and apply its cost cap; ``exchange``, now holding the call, is returned. Raises
        ``RequestRejected``."""
        exchange.choice = choice
        upstream = choice.upstream
        tariff = exchange.tariff = choice.tariff
        if endpoint.family != upstream.protocol:
            protocols.check_family(endpoint, upstream, choice.version_tag)
        body = protocols.rewrite_request(body, endpoint, choice.version, upstream)
        exchange.request_body = body
        if route is None:
            route = self._snapshot.routes[choice.route].route
        exchange.admission = self.guard.prepare(body, endpoint, choice, route, tariff[0], in_app)
        stream = body.get("stream") is True  # protocols.is_stream, inlined
        exchange.stream = stream
        exchange.drop_usage_chunk = (
            protocols.request_stream_usage(body, endpoint) if stream else False
        )
        try:
            exchange.body = orjson.dumps(body)
        except orjson.JSONEncodeError:  # orjson writes at most 254 levels; it reads 1024
            raise RequestRejected(
                400, "invalid_request", "the request body nests too deeply to be relayed"
            ) from None
        urls = choice.urls
        url = urls.get(endpoint.suffix)
        if url is None:
            url = urls[endpoint.suffix] = protocols.upstream_url(upstream, endpoint)
        exchange.url = url
        exchange.headers = protocols.upstream_headers(upstream, client_headers.items())
        exchange.set_cookie = set_cookie
        return exchange  # type: ignore[return-value]  # now with a choice: a GatewayCall

    def choose_in_app(
        self, snapshot: Snapshot, route: CompiledRoute, request: RequestView
    ) -> tuple[VersionChoice, str | None]:
        choice, cookie = snapshot.choose(route, request, sticky_key=self.sticky_key)
        self._selected(choice, "in_app")
        return choice, cookie

    def _estimate_usage(self, exchange: Exchange, output_tokens: int) -> Usage:
        """Usage for an upstream that reported none; the record says it is estimated."""
        adm, body, endpoint = exchange.admission, exchange.request_body, exchange.endpoint
        if adm is not None:
            prompt = adm.prompt_tokens
        elif body is not None and endpoint is not None:
            prompt = self.guard.estimator.prompt_tokens(body, endpoint)
        else:
            prompt = 0
        return Usage(prompt_tokens=prompt, completion_tokens=output_tokens, estimated=True)

    def settle(self, exchange: Exchange) -> None:
        """Count actual tokens against token limits and reconcile the budget, once."""
        adm = exchange.admission
        if adm is not None:
            tokens = exchange.usage.total_tokens if exchange.usage else 0
            self.guard.settle(adm, tokens, exchange.cost, exchange.billed)

    async def asettle(self, exchange: Exchange) -> None:
        adm = exchange.admission
        if adm is not None:
            tokens = exchange.usage.total_tokens if exchange.usage else 0
            await self.guard.asettle(adm, tokens, exchange.cost, exchange.billed)

    def stream_cut(self, choice: VersionChoice, exchange: Exchange) -> None:
        adm = exchange.admission
        signals.send(
            signals.cost_limit_exceeded,
            self,
            route=choice.route,
            version=choice.version_tag,
            limit_usd=effective_cap(adm.route if adm else None, choice.version),
            worst_case_usd=adm.worst_case if adm else None,
            action="cut_stream",
        )

    def upstream_failed(self, choice: VersionChoice, status: int | None, error: str) -> None:
        signals.send(
            signals.upstream_error,
            self,
            route=choice.route,
            version=choice.version_tag,
            upstream=choice.upstream_name,
            status=status,
            error=error,
        )

    def _selected(self, choice: VersionChoice, mode: str) -> None:
        if not signals.version_selected.receivers:  # the common case: skip building the event
            return
        signals.send(
            signals.version_selected,
            self,
            route=choice.route,
            version=choice.version_tag,
            reason=choice.reason,
            mode=mode,
        )

    # --- metrics and health -----------------------------------------------------------------

    def metrics(
        self,
        version_tag: str,
        start: float | datetime | None = None,
        end: float | datetime | None = None,
        route: str | None = None,
    ) -> VersionMetrics:
        """A version's figures between ``start`` and ``end`` (epoch seconds or datetimes; the
        last hour by default), over every worker when metrics go to Redis."""
        stop = _epoch(end) if end is not None else time.time()
        begin = _epoch(start) if start is not None else stop - 3600
        return self._metrics.query(version_tag, begin, stop, route)

    @property
    def metrics_bucket_seconds(self) -> int:
        """The granularity of :meth:`metrics`: it sums whole buckets of this many seconds."""
        return self._metrics.bucket_seconds

    def _start_health(self, snapshot: Snapshot) -> None:
        """Evaluate health checks in a thread, so no request waits on a window query."""
        # A relay that only reads and writes the configuration (the CLI) must not eject.
        wanted = self._run_health and any(
            r.route.health_check.enabled for r in snapshot.routes.values()
        )
        if wanted and self._stop_health is None:
            self._stop_health = self._health.run_in_background(self._health_routes, self._on_health)
        elif not wanted and self._stop_health is not None:
            self._stop_health()
            self._stop_health = None

    def _health_routes(self) -> list[tuple[Route, frozenset[str], float]]:
        snap = self._snapshot
        return [
            (r.route, snap.ejected.get(alias, frozenset()), self._stage_started.get(alias, 0.0))
            for alias, r in snap.routes.items()
            if r.route.health_check.enabled
        ]

    def _on_health(self, evaluation: Evaluation) -> None:
        for ejection in evaluation.ejections:
            self.eject(ejection.route, ejection.version, ejection.reason, ejection.evidence)

    def eject(
        self, alias: str, tag: str, reason: str, evidence: dict[str, Any] | None = None
    ) -> dict[str, float]:
        """Take ``tag`` out of ``alias`` now and share its weight out among the rest; where the
        store is writable, write the new weights back so every worker and restart sees it."""
        route = self._snapshot.routes[alias].route
        if not route.health_check.auto_rollback:
            log.warning(
                "relaymw: %s/%s is unhealthy (%s); auto_rollback is off", alias, tag, reason
            )
            return {}
        out = self._snapshot.ejected.get(alias, frozenset())
        current = {
            r.version_tag: 0.0 if r.version_tag in out else r.weight for r in route.route_rules
        }
        weights = share_out(current, tag)
        with self._lock:
            snap = self._snapshot
            ejected = {**snap.ejected, alias: snap.ejected.get(alias, frozenset()) | {tag}}
            self._swap(
                Snapshot.compile(snap.config, snap.document, snap.revision, snap.source, ejected)
            )
        log.warning("relaymw: ejected %s from %s (%s): %s", tag, alias, reason, evidence)
        signals.send(
            signals.version_ejected,
            self,
            route=alias,
            version=tag,
            reason=reason,
            evidence=evidence or {},
            new_weights=weights,
        )
        if self.store is not None and self.store.writable:
            try:
                self.update_document(
                    lambda doc: set_route_weights(doc, alias, weights),
                    actor=f"health-check: {reason}",
                )
            except Exception as exc:  # the ejection stands in this process regardless
                log.warning(
                    "relaymw: could not write the rollback of %s to the store: %s", tag, exc
                )
        return weights

    # --- in-app clients ----------------------------------------------------------------------

    def client(self, flavor: Literal["httpx", "httpx2"] = "httpx", **kwargs: Any) -> Any:
        """An httpx client whose requests for a route alias go to the chosen version.

        ``flavor="httpx2"`` builds it on httpx's fork, which the Anthropic SDK requires.
        """
        from relaymw.transport import transports_for

        hx = _httpx_module(flavor)
        return hx.Client(transport=transports_for(hx)[0](self), **kwargs)

    def async_client(self, flavor: Literal["httpx", "httpx2"] = "httpx", **kwargs: Any) -> Any:
        """The async form of :meth:`client`: ``openai.AsyncOpenAI(http_client=...)``."""
        from relaymw.transport import transports_for

        hx = _httpx_module(flavor)
        return hx.AsyncClient(transport=transports_for(hx)[1](self), **kwargs)

    # --- lifecycle --------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the upstream clients of the running event loop (lifespan shutdown)."""
        await self.pool.aclose()
        await self.guard.aclose()

    def close(self) -> None:
        if self._stop_health is not None:
            self._stop_health()
            self._stop_health = None
        if self._metrics.publisher is not None:
            self._metrics.publisher.stop()
        if self.store is not None:
            self.store.close()
        self.pool.close()
        self.guard.close()


def _metrics_registry(config: RelayConfig) -> MetricsRegistry:
    settings = config.metrics
    registry = MetricsRegistry(settings.bucket_seconds, settings.retention_seconds)
    if settings.storage_uri.startswith(("redis://", "rediss://")):
        RedisMetricsPublisher(registry, settings.storage_uri).start()
    return registry


def _epoch(value: float | datetime) -> float:
    return value.timestamp() if isinstance(value, datetime) else float(value)


def set_route_weights(doc: dict[str, Any], alias: str, weights: dict[str, float]) -> dict[str, Any]:
    """Set the weights of ``alias``'s rules in a stored document (tags not named keep theirs)."""
    for route in doc.get("routes", []):
        if route.get("model_alias") == alias:
            route["route_rules"] = [
                {**rule, "weight": weights.get(rule["version_tag"], rule["weight"])}
                for rule in route["route_rules"]
            ]
    return doc


def _weight_changes(
    old: RelayConfig, new: RelayConfig
) -> list[tuple[str, dict[str, float], dict[str, float]]]:
    before = {r.model_alias: {x.version_tag: x.weight for x in r.route_rules} for r in old.routes}
    changes = []
    for route in new.routes:
        after = {x.version_tag: x.weight for x in route.route_rules}
        previous = before.get(route.model_alias)
        if previous is not None and previous != after:
            changes.append((route.model_alias, previous, after))
    return changes


def _httpx_module(flavor: str) -> Any:
    if flavor == "httpx2":
        try:
            import httpx2
        except ModuleNotFoundError:
            raise ImportError("flavor='httpx2' needs the httpx2 package installed") from None
        return httpx2
    if flavor != "httpx":
        raise ValueError(f"flavor must be 'httpx' or 'httpx2', not {flavor!r}")
    return httpx


# --- helpers both adapters use ----------------------------------------------------------------


def is_event_stream(headers: Iterable[tuple[bytes, bytes]] | Iterable[tuple[str, str]]) -> bool:
    """Whether lower-case-named headers (str or bytes pairs) say ``text/event-stream``."""
    for k, v in headers:
        if isinstance(v, bytes):
            if k == b"content-type" and v.startswith(b"text/event-stream"):
                return True
        elif k == "content-type" and v.startswith("text/event-stream"):
            return True
    return False


def usage_of_body(endpoint: Endpoint, data: bytes) -> Usage | None:
    """The usage a JSON response body reports; None when it has none or is no JSON object.

    Usage is a member of the top-level object, near its end. The last ``"usage"`` key is one
    exactly when the text from that key on, reopened with ``{``, is an object by itself (a
    nested key would leave closing brackets over): then only that tail is parsed, never the
    answer's text. Otherwise the whole body is."""
    at = data.rfind(b'"usage"')
    if at < 0:
        return None
    try:
        obj = orjson.loads(b"{" + data[at:])
    except orjson.JSONDecodeError:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
    return protocols.usage_from_body(endpoint, obj) if isinstance(obj, dict) else None


def upstream_rejection(exc: UpstreamError) -> RequestRejected:
    if isinstance(exc, UpstreamTimeout):
        return RequestRejected(504, "upstream_timeout", f"the upstream timed out: {exc}")
    return RequestRejected(502, "upstream_unreachable", f"the upstream failed: {exc}")


def too_large(limit: int) -> RequestRejected:
    return RequestRejected(
        413, "request_too_large", f"the request body is larger than the limit of {limit} bytes"
    )


def invalid_body(data: bytes) -> RequestRejected | None:
    """A 502 for a successful answer whose body is not a JSON object; None when it is one.
    Call it only when :func:`usage_of_body` found no usage: a whole parse is its cost."""
    try:
        if isinstance(orjson.loads(data), dict):
            return None
    except orjson.JSONDecodeError:
        pass
    message = "the upstream answered with a body that is not a JSON object"
    return RequestRejected(502, "upstream_invalid_response", message)
