"""An immutable, compiled view of one configuration: everything a request needs, precomputed.

A :class:`Snapshot` is built once per accepted document (and again when health checks eject
a version); requests only read it, so swapping ``relay.snapshot`` is atomic and lock-free.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import attrs

from relaymw.config import Price, RelayConfig, Route, Upstream, Version
from relaymw.cost import PicoRates, pico_rates, price_for
from relaymw.protocols import Endpoint, gateway_paths
from relaymw.routing import CookieCodec, RouteTable, StickyCookie

__all__ = [
    "CompiledRoute",
    "HeaderSource",
    "KeyFunction",
    "RawHeaders",
    "RequestView",
    "Snapshot",
    "VersionChoice",
]

# A callable that derives a key (sticky key or identity) from a request, or None.
KeyFunction = Callable[["RequestView"], "str | None"]


@attrs.frozen
class VersionChoice:
    """The version chosen for one request; ``str()`` is the tag.

    Exposed to handlers as ``relaymw.current_version()``, ``request.state.relay`` and
    ``environ["relaymw.version"]``.
    """

    route: str
    version_tag: str
    version: Version
    upstream_name: str
    upstream: Upstream = attrs.field(repr=False)
    reason: str  # "cookie" | "key" | "weight" | "pin"
    # The version's price in this configuration, and its per-token rates in whole pico-USD
    # (None when not whole): what the call's cost is worked out with.
    tariff: tuple[Price | None, PicoRates | None] = attrs.field(
        default=(None, None), repr=False, eq=False
    )
    # (route, version_tag): the metrics series of every request that took this choice.
    metrics_key: tuple[str, str] = attrs.field(init=False, repr=False, eq=False)

    # (b"x-relaymw-version", tag): the header pair of every response this choice answers.
    version_header: tuple[bytes, bytes] = attrs.field(init=False, repr=False, eq=False)
    # The upstream URL per endpoint suffix, filled as requests need them.
    urls: dict[str, str] = attrs.field(init=False, repr=False, eq=False, factory=dict)

    @metrics_key.default
    def _metrics_key(self) -> tuple[str, str]:
        return (self.route, self.version_tag)

    @version_header.default
    def _version_header(self) -> tuple[bytes, bytes]:
        return (b"x-relaymw-version", self.version_tag.encode())

    def __str__(self) -> str:
        return self.version_tag


class RawHeaders(tuple[tuple[bytes, bytes], ...]):
    """ASGI's header list read lazily: a request usually needs two or three of its headers.

    A tuple: built in C, where a class with ``__init__`` costs a Python call per request."""

    __slots__ = ()

    def get(self, name: str, /) -> str | None:
        key = name.encode("latin-1")
        for k, v in self:
            if k == key:
                return v.decode("latin-1")
        return None

    def items(self) -> Iterable[tuple[bytes, bytes]]:
        return self


class HeaderSource(Protocol):
    def get(self, name: str, /) -> str | None: ...

    def items(self) -> Iterable[tuple[Any, Any]]: ...


@attrs.define(slots=True)
class RequestView:
    """The parts of a request the core reads, independent of ASGI or WSGI."""

    headers: HeaderSource  # looked up by lower-case name
    client_ip: str | None
    scheme: str
    _cookie_header: str | None = None  # read on the first cookie lookup

    @classmethod
    def build(
        cls, headers: HeaderSource, peer: str | None, scheme: str, trusted_proxies: int
    ) -> RequestView:
        """``X-Forwarded-For`` is believed only through ``trusted_proxies`` proxies we run."""
        if trusted_proxies and (xff := headers.get("x-forwarded-for")):
            hops = [h.strip() for h in xff.split(",") if h.strip()]
            if len(hops) >= trusted_proxies:
                peer = hops[-trusted_proxies]
        return cls(headers, peer, scheme)

    def cookie(self, name: str) -> str | None:
        header = self._cookie_header
        if header is None:
            header = self._cookie_header = self.headers.get("cookie") or ""
        return cookie_value(header, name) if header else None

    def key(self, spec: str, func: KeyFunction | None = None) -> str | None:
        """A request key by spec: ``header:NAME``, ``cookie:NAME``, ``api_key``, ``client_ip``
        or ``callable`` (``func``)."""
        kind, _, name = spec.partition(":")
        if kind == "header":
            return self.headers.get(name.lower())
        if kind == "cookie":
            return self.cookie(name)
        if spec == "api_key":
            auth = self.headers.get("authorization")
            if auth and auth[:7].lower() == "bearer ":
                return auth[7:]
            return self.headers.get("x-api-key") or auth
        if spec == "client_ip":
            return self.client_ip
        if spec == "callable" and func is not None:
            return func(self)
        return None


def cookie_value(header: str, name: str) -> str | None:
    """Cookie ``name`` of a ``Cookie`` header, the first when repeated: the jar split on
    ``;``, each part stripped and split at its first ``=``.

    Only parts that contain the name are split further: most of a jar belongs to others."""
    if name not in header:
        return None
    for part in header.split(";"):
        if name in part:
            found, sep, value = part.strip().partition("=")
            if sep and found == name:
                return value.strip('"')
    return None


@attrs.frozen
class CompiledRoute:
    route: Route
    table: RouteTable
    # Every (tag, reason) choice prebuilt, so a request allocates nothing to describe its choice.
    choices: dict[tuple[str, str], VersionChoice] = attrs.field(hash=False)
    rule_tags: frozenset[str]
    # The sticky cookie's reader and writer, built once per snapshot; None when sticky
    # sessions are off.
    sticky: StickyCookie | None = attrs.field(default=None, hash=False)
    # Lower-cased header name when the sticky key is ``header:NAME``: read directly.
    key_header: str | None = None
    # The sticky key's spec otherwise (None without one).
    key_spec: str | None = None
    # Choices by position in ``table.tags`` (weight, key) and by tag (cookie).
    by_weight: tuple[VersionChoice, ...] = ()
    by_key: tuple[VersionChoice, ...] = ()
    by_cookie: dict[str, VersionChoice] = attrs.field(factory=dict, hash=False)

    @property
    def alias(self) -> str:
        return self.route.model_alias


_REASONS = ("cookie", "key", "weight", "pin")


@attrs.frozen
class Snapshot:
    config: RelayConfig
    document: dict[str, Any] = attrs.field(hash=False, repr=False)  # as stored: ${ENV} kept
    revision: str
    source: str
    routes: dict[str, CompiledRoute] = attrs.field(hash=False)
    in_app_paths: dict[str, CompiledRoute] = attrs.field(hash=False)
    pins: dict[str, CompiledRoute] = attrs.field(hash=False)  # tag -> route, allow_client_pin
    gateway: dict[str, Endpoint] = attrs.field(hash=False)  # path -> endpoint
    cookie_codec: CookieCodec = attrs.field(hash=False, repr=False)
    ejected: dict[str, frozenset[str]] = attrs.field(hash=False)

    @classmethod
    def compile(
        cls,
        config: RelayConfig,
        document: dict[str, Any],
        revision: str = "",
        source: str = "",
        ejected: Mapping[str, Iterable[str]] | None = None,
    ) -> Snapshot:
        ejected_sets = {alias: frozenset(tags) for alias, tags in (ejected or {}).items()}
        codec = CookieCodec(config.sticky.secret)
        versions = {v.version_tag: v for v in config.versions}
        routes: dict[str, CompiledRoute] = {}
        for route in config.routes:
            out = ejected_sets.get(route.model_alias, frozenset())
            table = RouteTable.build(
                route.model_alias, ((r.version_tag, r.weight) for r in route.route_rules), out
            )
            choices = {}
            for rule in route.route_rules:
                v = versions[rule.version_tag]
                up = config.upstreams[v.upstream_endpoint]
                price = price_for(v.upstream_model(up), config.pricing)
                tariff = (price, pico_rates(price))
                for reason in _REASONS:
                    choices[(v.version_tag, reason)] = VersionChoice(
                        route.model_alias, v.version_tag, v, v.upstream_endpoint, up, reason, tariff
                    )
            sticky = route.sticky_sessions
            key_kind, _, key_name = (sticky.key or "").partition(":")
            tags = table.tags
            routes[route.model_alias] = CompiledRoute(
                route,
                table,
                choices,
                frozenset(r.version_tag for r in route.route_rules),
                sticky=StickyCookie(
                    codec, route.model_alias, sticky.cookie_name, sticky.ttl_seconds, tags
                )
                if sticky.enabled
                else None,
                key_header=key_name.lower() if key_kind == "header" else None,
                key_spec=sticky.key or None,
                by_weight=tuple(choices[(tag, "weight")] for tag in tags),
                by_key=tuple(choices[(tag, "key")] for tag in tags),
                by_cookie={tag: choices[(tag, "cookie")] for tag in tags},
            )
        in_app = {p: routes[r.model_alias] for r in config.routes for p in r.paths}
        pins = {
            tag: routes[r.model_alias]
            for r in config.routes
            if r.allow_client_pin
            for tag in routes[r.model_alias].rule_tags
        }
        gateway = gateway_paths(config.gateway.path_prefix) if config.gateway.enabled else {}
        return cls(
            config,
            document,
            revision,
            source,
            routes,
            in_app,
            pins,
            gateway,
            codec,
            ejected_sets,
        )

    def route_for_model(self, model: str) -> tuple[CompiledRoute, str | None] | None:
        """The route a gateway request's ``model`` names, and the tag when it pins one."""
        route = self.routes.get(model)
        if route is not None:
            return route, None
        route = self.pins.get(model)
        return (route, model) if route is not None else None

    def choose(
        self,
        route: CompiledRoute,
        request: RequestView,
        *,
        pinned_tag: str | None = None,
        sticky_key: KeyFunction | None = None,
        now: float | None = None,
    ) -> tuple[VersionChoice, str | None]:
        """Choose a version: operator pin, then a valid sticky cookie, then the sticky key,
        then weight. Returns the choice and a ``Set-Cookie`` value when one must be set."""
        # The hot path of every routed request: everything it reads was prebuilt per snapshot.
        if pinned_tag is None and self.config.pinning.token:
            pinned_tag = self._operator_pin(route, request)
        if pinned_tag is not None and pinned_tag in route.rule_tags:
            return route.choices[(pinned_tag, "pin")], None
        table = route.table
        cookie = route.sticky
        if cookie is None:
            return route.by_weight[table.pick_index()], None
        now = time.time() if now is None else now
        raw = request.cookie(cookie.name)
        if raw is not None:
            tag = cookie.read(raw, now)
            if tag is not None:
                return route.by_cookie[tag], None
        if route.key_header is not None:
            key = request.headers.get(route.key_header)
        else:
            spec = route.key_spec
            key = request.key(spec, sticky_key) if spec else None
        if key:
            index = table.key_index(key)
            choice = route.by_key[index]
        else:
            index = table.pick_index()
            choice = route.by_weight[index]
        return choice, cookie.header(table.tags[index], now, request.scheme == "https")

    def _operator_pin(self, route: CompiledRoute, request: RequestView) -> str | None:
        pinning = self.config.pinning
        if not pinning.token:
            return None
        tag = request.headers.get(pinning.header.lower())
        if tag is None:
            return None
        token = request.headers.get(pinning.token_header.lower()) or ""
        if hmac.compare_digest(token.encode(), pinning.token.encode()):
            return tag
        return None
