"""One seam for operating a release: read routes and metrics, change weights, keep state.

The operator commands and the rollout controller talk to a :class:`ReleaseControl`, which is
either a :class:`RelayControl` (a :class:`~relaymw.engine.Relay` and its store, in this
process) or an :class:`AdminControl` (a running admin API, over HTTP). Both answer the same
small value types, so nothing above this module knows which one it drives.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

import attrs
import httpx

from relaymw.config import normalize_weights
from relaymw.engine import Relay
from relaymw.errors import ConfigError, RelayError, StoreError, StoreReadOnlyError
from relaymw.metrics import VersionMetrics, first_bucket_from

__all__ = [
    "AdminControl",
    "ControlError",
    "Figures",
    "RelayControl",
    "ReleaseControl",
    "RouteView",
    "rule_weights",
]

_ZERO = Decimal(0)


class ControlError(RelayError):
    """An operation was refused or could not be done; the message says what to do.

    ``status`` is HTTP-like: 404/409/422 for a request that cannot work as given (an unknown
    route, bad weights), 5xx when the store or the admin API failed."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status

    @property
    def usage(self) -> bool:
        """Whether the caller asked for something impossible (rather than something failed)."""
        return 400 <= self.status < 500 and self.status not in (401, 403, 429)


@attrs.frozen
class Figures:
    """A version's metrics over a time range, whichever side computed them."""

    request_count: int = 0
    error_count: int = 0
    error_rate: float = 0.0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    cost_per_token: Decimal = _ZERO
    total_cost_usd: Decimal = _ZERO

    @classmethod
    def of(cls, m: VersionMetrics) -> Figures:
        return cls(
            m.request_count,
            m.error_count,
            m.error_rate,
            m.latency_p50_ms,
            m.latency_p99_ms,
            m.cost_per_token,
            m.total_cost_usd,
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Figures:
        n = int(data.get("request_count") or 0)
        rate = float(data.get("error_rate") or 0.0)
        errors = data.get("error_count")
        return cls(
            n,
            # Older servers may leave the count out; the rate times n gives it back exactly.
            int(errors) if errors is not None else round(rate * n),
            rate,
            _float_or_none(data.get("latency_p50_ms")),
            _float_or_none(data.get("latency_p99_ms")),
            _decimal(data.get("cost_per_token")),
            _decimal(data.get("total_cost_usd")),
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready; money as decimal strings."""
        out = attrs.asdict(self)
        return out | {k: f"{out[k]:f}" for k in ("cost_per_token", "total_cost_usd")}


@attrs.frozen
class RouteView:
    """A route as an operator sees it: its rules in order, ejected tags, health check."""

    alias: str
    rules: tuple[tuple[str, float], ...]
    ejected: frozenset[str] = frozenset()
    health_check: dict[str, Any] = attrs.field(factory=dict, hash=False)

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.rules)

    @property
    def active_version(self) -> str | None:
        """The highest weight (the first listed on a tie), as the admin API names it."""
        return max(self.rules, key=lambda r: r[1])[0] if self.rules else None


class ReleaseControl(Protocol):
    """What the operator commands and the rollout controller need from a relay."""

    def describe(self) -> str:
        """Where this acts, for messages (never a secret)."""
        ...

    @property
    def metrics_note(self) -> str | None:
        """Why the figures may be partial (process-local metrics), or None."""
        ...

    def versions(self) -> list[str]:
        """Every registered version tag."""
        ...

    def routes(self) -> list[RouteView]: ...

    def route(self, alias: str) -> RouteView: ...

    def set_weights(
        self, alias: str, weights: Mapping[str, float], actor: str, action: str
    ) -> RouteView:
        """Set the named tags' weights (a tag not in the route is added last, the canary's
        place); the others keep theirs. The result must sum to 100."""
        ...

    def rollback(self, alias: str, tag: str, actor: str) -> RouteView:
        """``tag`` to 100 and every other rule to 0."""
        ...

    def figures(
        self, tag: str, start: float, end: float, route: str | None, *, since: bool = False
    ) -> Figures:
        """``tag``'s figures from ``start`` to ``end`` (epoch seconds): the metric buckets
        that overlap them, or with ``since`` only those that begin at or after ``start``
        (no request from before it: how a rollout stage is judged)."""
        ...

    def read_state(self, name: str) -> dict[str, Any] | None: ...

    def write_state(self, name: str, value: dict[str, Any] | None) -> None: ...

    def close(self) -> None: ...


def rule_weights(
    rules: Sequence[tuple[str, float]], weights: Mapping[str, float]
) -> list[tuple[str, float]]:
    """``rules`` with ``weights`` applied: named tags get their weight, tags not yet in the
    rules are appended (last: the canary's place, which keeps stickiness)."""
    out = [(tag, float(weights.get(tag, w))) for tag, w in rules]
    known = {tag for tag, _ in rules}
    out += [(tag, float(w)) for tag, w in weights.items() if tag not in known]
    return out


def check_sum(alias: str, rules: Sequence[tuple[str, float]]) -> None:
    """Refuse weights that do not sum to 100, showing the normalised ones."""
    total = sum(w for _, w in rules)
    if abs(total - 100) > 0.01:
        shown = ", ".join(
            f"{t}={w:g}"
            for (t, _), w in zip(rules, normalize_weights([w for _, w in rules]), strict=True)
        )
        raise ControlError(f"{alias}: the weights sum to {total:g}, not 100 (normalised: {shown})")


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _decimal(value: Any) -> Decimal:
    if value is None:
        return _ZERO
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return _ZERO


# --- in this process -------------------------------------------------------------------------


class RelayControl:
    """Acts on a relay and its store directly (``relaymw ... --config FILE|URI``, or the
    serving process itself). Weight changes go through ``relay.update_document``, so they
    are validated, saved with compare-and-set and written to the change log."""

    def __init__(self, relay: Relay, *, owned: bool = False) -> None:
        self.relay = relay
        self._owned = owned  # close the relay with this control

    @classmethod
    def open(cls, source: str) -> RelayControl:
        """A control on its own relay over the store ``source`` (not watching it: every read
        reloads the document instead, so changes by others are seen)."""
        return cls(Relay.from_store(source, watch=False, health=False), owned=True)

    def describe(self) -> str:
        store = self.relay.store
        return store.describe() if store is not None else "this process"

    @property
    def metrics_note(self) -> str | None:
        uri = self.relay.config.metrics.storage_uri
        if uri.startswith(("redis://", "rediss://")):
            return None
        return (
            "metrics are this process's only ([metrics] storage_uri is not redis): figures "
            'from the serving workers need storage_uri = "redis://..." or --admin'
        )

    def _refresh(self) -> None:
        # A relay that does not watch its store would otherwise show a stale document.
        store = self.relay.store
        if store is not None and self._owned:
            try:
                self.relay.apply_document(store.load(), actor="cli")
            except StoreError as exc:
                raise ControlError(f"cannot read {store.describe()}: {exc}", 503) from exc

    def versions(self) -> list[str]:
        self._refresh()
        return [v.version_tag for v in self.relay.config.versions]

    def routes(self) -> list[RouteView]:
        self._refresh()
        snap = self.relay.snapshot
        return [
            RouteView(
                r.model_alias,
                tuple((x.version_tag, x.weight) for x in r.route_rules),
                snap.ejected.get(r.model_alias, frozenset()),
                attrs.asdict(r.health_check),
            )
            for r in snap.config.routes
        ]

    def route(self, alias: str) -> RouteView:
        for view in self.routes():
            if view.alias == alias:
                return view
        known = ", ".join(sorted(self.relay.snapshot.routes)) or "none"
        raise ControlError(f"unknown route {alias!r} (known: {known})", 404)

    def set_weights(
        self, alias: str, weights: Mapping[str, float], actor: str, action: str
    ) -> RouteView:
        current = self.route(alias)
        unknown = sorted(set(weights) - set(self.versions()))
        if unknown:
            raise ControlError(f"{alias}: unknown version tag(s): {', '.join(unknown)}")
        check_sum(alias, rule_weights(current.rules, weights))

        def change(doc: dict[str, Any]) -> dict[str, Any]:
            for route in doc.get("routes", []):
                if route.get("model_alias") == alias:
                    rules = [(r["version_tag"], float(r["weight"])) for r in route["route_rules"]]
                    extra = {r["version_tag"]: r for r in route["route_rules"]}
                    route["route_rules"] = [
                        {**extra.get(tag, {}), "version_tag": tag, "weight": w}
                        for tag, w in rule_weights(rules, weights)
                    ]
            return doc

        try:
            self.relay.update_document(change, actor=actor, action=action)
        except ConfigError as exc:
            raise ControlError("; ".join(str(i) for i in exc.issues)) from exc
        except StoreReadOnlyError as exc:
            raise ControlError(f"{self.describe()} is read-only: {exc}", 409) from exc
        except StoreError as exc:
            raise ControlError(f"cannot write {self.describe()}: {exc}", 503) from exc
        return self.route(alias)

    def rollback(self, alias: str, tag: str, actor: str) -> RouteView:
        current = self.route(alias)
        if tag not in current.weights:
            raise ControlError(f"{alias}: {tag!r} is not one of its rules")
        weights = {t: 100.0 if t == tag else 0.0 for t, _ in current.rules}
        return self.set_weights(alias, weights, actor=actor, action="rollback")

    def figures(
        self, tag: str, start: float, end: float, route: str | None, *, since: bool = False
    ) -> Figures:
        if since:
            start = first_bucket_from(start, self.relay.metrics_bucket_seconds)
            if start >= end:
                return Figures()
        return Figures.of(self.relay.metrics(tag, start, end, route))

    def read_state(self, name: str) -> dict[str, Any] | None:
        try:
            return self.relay.read_state(name)
        except StoreError as exc:
            raise ControlError(f"cannot read state {name!r}: {exc}", 503) from exc

    def write_state(self, name: str, value: dict[str, Any] | None) -> None:
        try:
            self.relay.write_state(name, value)
        except StoreReadOnlyError as exc:
            raise ControlError(f"{self.describe()} is read-only: {exc}", 409) from exc
        except StoreError as exc:
            raise ControlError(f"cannot write state {name!r}: {exc}", 503) from exc

    def close(self) -> None:
        if self._owned:
            self.relay.close()


# --- over the admin API ----------------------------------------------------------------------


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat()


class AdminControl:
    """Acts on a running admin API (``relaymw ... --admin URL --token TOKEN``).

    Answers of 429 are waited out (``Retry-After``) a few times before giving up. The token
    only ever goes into the ``Authorization`` header: it is in no message."""

    RETRIES_ON_429 = 5

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.base_url,
            headers={"authorization": f"Bearer {token}"},
            timeout=timeout,
            transport=transport,
        )
        self._bucket_seconds: int | None = None  # the server's metric buckets, once known

    def describe(self) -> str:
        return f"admin API {self.base_url}"

    @property
    def metrics_note(self) -> str | None:
        return None  # the serving process's figures (all workers' when its metrics use Redis)

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.RETRIES_ON_429 + 1):
            try:
                response = self._client.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                raise ControlError(f"cannot reach {self.describe()}: {exc}", 503) from exc
            if response.status_code != 429 or attempt == self.RETRIES_ON_429:
                return response
            time.sleep(min(_retry_after(response), 10.0))
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, ok: Sequence[int] = (200,), **kwargs: Any) -> Any:
        response = self._call(method, path, **kwargs)
        if response.status_code not in ok:
            raise ControlError(self._error(response), response.status_code)
        return response.json() if response.content else None

    def _error(self, response: httpx.Response) -> str:
        status = response.status_code
        try:
            error = response.json().get("error", {})
            message = str(error.get("message") or error)
        except (ValueError, AttributeError):
            message = response.text[:200] or response.reason_phrase
        if status == 401:
            return f"{self.describe()} refused the token (401): {message}"
        return f"{self.describe()}: {status}: {message}"

    def versions(self) -> list[str]:
        data = self._json("GET", "/models/versions")
        return [str(v["version_tag"]) for v in data.get("versions", [])]

    def routes(self) -> list[RouteView]:
        data = self._json("GET", "/routes/traffic")
        return [_route_view(r) for r in data.get("routes", [])]

    def route(self, alias: str) -> RouteView:
        return _route_view(self._route_object(alias))

    def _route_object(self, alias: str) -> dict[str, Any]:
        response = self._call("GET", f"/routes/traffic/{alias}")
        if response.status_code == 404:
            raise ControlError(f"unknown route {alias!r} at {self.describe()}", 404)
        if response.status_code != 200:
            raise ControlError(self._error(response), response.status_code)
        data: dict[str, Any] = response.json()
        return data

    def set_weights(
        self, alias: str, weights: Mapping[str, float], actor: str, action: str
    ) -> RouteView:
        # actor/action: the server records the token's name as the actor. PATCH appends a
        # tag the route lacks, as this module's rule_weights does.
        route = self.route(alias)
        new_rules = rule_weights(route.rules, weights)
        check_sum(alias, new_rules)
        body = {"route_id": alias, "route_rules": [
            {"version_tag": t, "weight": w} for t, w in new_rules
        ]}  # fmt: skip
        self._json("PATCH", "/routes/traffic", json=body)
        return self.route(alias)

    def rollback(self, alias: str, tag: str, actor: str) -> RouteView:
        self._json("POST", "/routes/traffic/rollback", json={"route_id": alias, "version_tag": tag})
        return self.route(alias)

    def figures(
        self, tag: str, start: float, end: float, route: str | None, *, since: bool = False
    ) -> Figures:
        # The server's bucket size comes with its first answer; until then, ``since`` asks
        # from ``start`` and asks again from the first whole bucket if that differs.
        asked = self._since(start) if since and self._bucket_seconds else start
        if asked >= end:
            return Figures()
        data = self._metrics(tag, asked, end, route)
        if self._bucket_seconds is None:
            self._bucket_seconds = int(data.get("bucket_seconds") or 1)
            if since and self._since(start) != asked:
                return self.figures(tag, start, end, route, since=True)
        for entry in data.get("versions", []):
            if entry.get("version_tag") == tag and entry.get("route_id") in (route, None):
                return Figures.from_json(entry.get("metrics", {}))
        return Figures()

    def _since(self, start: float) -> float:
        return first_bucket_from(start, self._bucket_seconds or 1)

    def _metrics(self, tag: str, start: float, end: float, route: str | None) -> Any:
        params = {"version_tag": tag, "start_time": _iso(start), "end_time": _iso(end)}
        if route is not None:
            params["route_id"] = route
        return self._json("GET", "/metrics/versions", params=params)

    def read_state(self, name: str) -> dict[str, Any] | None:
        response = self._call("GET", f"/rollouts/{_rollout_alias(name)}")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise ControlError(self._error(response), response.status_code)
        data: dict[str, Any] = response.json()
        return data

    def write_state(self, name: str, value: dict[str, Any] | None) -> None:
        path = f"/rollouts/{_rollout_alias(name)}"
        if value is None:
            self._json("DELETE", path, ok=(200, 204, 404))
        else:
            self._json("PUT", path, json=value)

    def close(self) -> None:
        self._client.close()


def _rollout_alias(name: str) -> str:
    prefix, sep, alias = name.partition(":")
    if prefix != "rollout" or not sep:
        raise ControlError(f"the admin API keeps rollout state only, not {name!r}")
    return alias


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.05, float(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


def _route_view(data: Mapping[str, Any]) -> RouteView:
    return RouteView(
        str(data.get("model_alias") or data.get("route_id")),
        tuple((str(r["version_tag"]), float(r["weight"])) for r in data.get("route_rules", [])),
        frozenset(data.get("ejected") or ()),
        dict(data.get("health_check") or {}),
    )
