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
from typing import Any, Literal

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
from relaymw.cost import cost_of_usage, effective_cap, price_for
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
# (b"x-relaymw-version", tag) per version tag: the header pair every response carries. Tags
# come from configurations only, so it grows with them, not with requests.
_TAG_HEADERS: dict[str, tuple[bytes, bytes]] = {}


class Exchange:
    """One intercepted request. :meth:`finish` records it exactly once, however it ends."""

    __slots__ = (
        "admission",
        "body",
        "choice",
        "cost",
        "done",
        "endpoint",
        "first_chunk_at",
        "headers_at",
        "mode",
        "relay",
        "sent_at",
        "started",
        "stream",
        "usage",
    )

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
        self.body: dict[str, Any] | None = None  # as sent upstream, for a usage estimate
        self.usage: Usage | None = None
        self.cost = _ZERO

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
        """Record the request once. ``output_tokens`` is what was seen of the output, used to
        estimate usage when a successful upstream reported none."""
        if self.done:
            return
        self.done = True
        if usage is None and self.choice is not None and 200 <= status < 300:
            usage = self.relay._estimate_usage(self, output_tokens)
        self.usage = usage
        self.relay._record(self, status, usage, error)

    @property
    def billed(self) -> bool:
        """Whether the upstream produced something that costs money."""
        return self.usage is not None


class GatewayCall:
    """A gateway request ready to send upstream."""

    __slots__ = (
        "body",
        "choice",
        "drop_usage_chunk",
        "endpoint",
        "exchange",
        "headers",
        "set_cookie",
        "stream",
        "url",
    )

    def __init__(
        self,
        choice: VersionChoice,
        endpoint: Endpoint,
        url: str,
        headers: dict[str, str],
        body: bytes,
        stream: bool,
        drop_usage_chunk: bool,
        set_cookie: str | None,
        exchange: Exchange,
    ) -> None:
        self.choice = choice
        self.endpoint = endpoint
        self.url = url
        self.headers = headers
        self.body = body
        self.stream = stream
        self.drop_usage_chunk = drop_usage_chunk
        self.set_cookie = set_cookie
        self.exchange = exchange

    def response_headers(
        self, upstream_headers: Iterable[tuple[bytes, bytes]] | Iterable[tuple[str, str]]
    ) -> list[tuple[bytes, bytes]]:
        """Safe upstream headers (raw or decoded, names in any case) plus relaymw's own,
        computed when the response starts."""
        ex = self.exchange
        now = _perf()
        # Time relaymw itself spent: before the upstream call and after its headers arrived.
        overhead = (ex.sent_at - ex.started) + (now - (ex.headers_at or now))
        out = protocols.response_headers(upstream_headers)
        tag = self.choice.version_tag
        raw = _TAG_HEADERS.get(tag)
        if raw is None:
            raw = _TAG_HEADERS[tag] = (b"x-relaymw-version", tag.encode())
        out.append(raw)
        if ex.admission is not None:
            out += [(k.lower().encode(), v.encode()) for k, v in ex.admission.headers]
        out.append((b"x-relaymw-overhead-ms", b"%.3f" % (overhead * 1000)))
        if self.set_cookie:
            out.append((b"set-cookie", self.set_cookie.encode("latin-1")))
        return out


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
        self._snapshot = snapshot
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
            self._snapshot = Snapshot.compile(config, document, raw.revision, raw.source, ejected)
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
            try:
                revision = self.store.save(document, expected_revision=raw.revision)
            except StoreConflictError:
                continue
            entries = changes_between(
                before, document, actor=actor, action=action, revision=revision
            )
            for entry in entries:
                try:
                    self.journal.append_change(entry)
                except StoreError as exc:  # the change stands; say that its record is missing
                    log.warning("relaymw: could not record a change in the change log: %s", exc)
            # Read back rather than trust our copy: another writer may already have followed.
            self.apply_document(self.store.load(), actor)
            return self._snapshot
        raise StoreConflictError("the configuration kept changing while writing; try again")

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
        found = snapshot.route_for_model(protocols.requested_model(body))
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
        and apply its cost cap. Raises ``RequestRejected``."""
        exchange.choice = choice
        if endpoint.family != choice.upstream.protocol:
            protocols.check_family(endpoint, choice.upstream, choice.version_tag)
        body = protocols.rewrite_request(body, endpoint, choice.version, choice.upstream)
        exchange.body = body
        if route is None:
            route = self._snapshot.routes[choice.route].route
        exchange.admission = self.guard.prepare(
            body, endpoint, choice, route, self._price(choice), in_app
        )
        stream = body.get("stream") is True  # protocols.is_stream, inlined
        exchange.stream = stream
        drop = protocols.request_stream_usage(body, endpoint) if stream else False
        try:
            data = orjson.dumps(body)
        except orjson.JSONEncodeError:  # orjson writes at most 254 levels; it reads 1024
            raise RequestRejected(
                400, "invalid_request", "the request body nests too deeply to be relayed"
            ) from None
        return GatewayCall(
            choice,
            endpoint,
            protocols.upstream_url(choice.upstream, endpoint),
            protocols.upstream_headers(choice.upstream, client_headers.items()),
            data,
            stream,
            drop,
            set_cookie,
            exchange,
        )

    def choose_in_app(
        self, snapshot: Snapshot, route: CompiledRoute, request: RequestView
    ) -> tuple[VersionChoice, str | None]:
        choice, cookie = snapshot.choose(route, request, sticky_key=self.sticky_key)
        self._selected(choice, "in_app")
        return choice, cookie

    # The price of each version tag, for the configuration it was looked up in.
    _prices: tuple[RelayConfig | None, dict[str, Price | None]] = (None, {})

    def _price(self, choice: VersionChoice) -> Price | None:
        config = self._snapshot.config
        known = self._prices
        if known[0] is not config:  # another configuration: other models or prices
            known = self._prices = (config, {})
        tag = choice.version_tag
        if tag in known[1]:
            return known[1][tag]
        price = price_for(choice.version.upstream_model(choice.upstream), config.pricing)
        known[1][tag] = price
        return price

    def _estimate_usage(self, exchange: Exchange, output_tokens: int) -> Usage:
        """Usage for an upstream that reported none; the record says it is estimated."""
        adm, body, endpoint = exchange.admission, exchange.body, exchange.endpoint
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

    def _record(
        self, exchange: Exchange, status: int, usage: Usage | None, error: str | None
    ) -> None:
        choice = exchange.choice
        latency_ms = (_perf() - exchange.started) * 1000
        ttft_ms = None
        if exchange.stream and exchange.first_chunk_at is not None:
            ttft_ms = (exchange.first_chunk_at - exchange.started) * 1000
        prompt = usage.prompt_tokens if usage else 0
        completion = usage.completion_tokens if usage else 0
        cached = usage.cached_tokens if usage else 0
        cost = _ZERO
        if choice is not None and usage is not None:
            adm = exchange.admission
            price = adm.price if adm is not None else self._price(choice)
            cost = cost_of_usage(price, usage)
        exchange.cost = cost
        if error is None and status >= 500:
            error = "upstream_error"
        if choice is not None:
            self._metrics.record(
                choice.route,
                choice.version_tag,
                status,
                latency_ms,
                ttft_ms,
                prompt,
                completion,
                cost,
                error,
            )
        if not signals.request_finished.receivers:  # the common case: skip building the event
            return
        signals.send(
            signals.request_finished,
            self,
            route=choice.route if choice else None,
            version=choice.version_tag if choice else None,
            status=status,
            latency_ms=latency_ms,
            ttft_ms=ttft_ms,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost_usd=cost,
            stream=exchange.stream,
            error=error,
            mode=exchange.mode,
            protocol=exchange.endpoint.family if exchange.endpoint else None,
            usage_estimated=usage.estimated if usage else False,
            cached_tokens=cached,
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
            self._snapshot = Snapshot.compile(
                snap.config, snap.document, snap.revision, snap.source, ejected
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
