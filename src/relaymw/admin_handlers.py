"""The endpoints of the version-control API (SPEC §7); :mod:`relaymw.admin` wires them up.

Reads answer from the relay's current snapshot. Writes edit the stored document through
:meth:`relaymw.Relay.update_document` in a worker thread (stores block), so the whole
candidate document is validated and every change lands in the change log under the name of
the token that made it. Validation problems come back with paths relative to the object
that was sent (``version_tag``, ``route_rules[1].weight``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from relaymw.admin import ApiError, json_response, read_json_object
from relaymw.changelog import redact
from relaymw.config import TAG_PATTERN, Version, build_config, converter, normalize_weights
from relaymw.errors import ConfigError, StoreConflictError, StoreError, StoreReadOnlyError

if TYPE_CHECKING:
    from relaymw.engine import Relay
    from relaymw.snapshot import Snapshot

__all__ = ["METRIC_NAMES", "AdminHandlers", "version_id"]

log = logging.getLogger("relaymw.admin")

METRIC_NAMES = (
    "request_count",
    "error_count",
    "error_rate",
    "latency_p50_ms",
    "latency_p99_ms",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "prompt_tokens",
    "completion_tokens",
    "total_cost_usd",
    "cost_per_token",
)
MAX_AUDIT_LIMIT = 1000
Document = dict[str, Any]


def version_id(raw: Mapping[str, Any]) -> str:
    """``sha256:`` + 16 hex digits of the version's canonical JSON (defaults filled in, keys
    sorted), so the same content always has the same id whatever its source format."""
    text = json.dumps(_canonical(raw), sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _canonical(raw: Mapping[str, Any]) -> Any:
    try:
        return converter.unstructure(converter.structure(dict(raw), Version))
    except Exception:  # not a valid version: its content as sent is all there is to compare
        return dict(raw)


def _find(items: Any, field: str, value: Any) -> tuple[int, dict[str, Any]] | None:
    for i, item in enumerate(items if isinstance(items, list) else []):
        if isinstance(item, dict) and item.get(field) == value:
            return i, item
    return None


def _relative(path: str, scope: str | None) -> str:
    """``routes[2].route_rules[1].weight`` seen from ``routes[2]``: ``route_rules[1].weight``."""
    if scope is None:
        return path
    if path == scope:
        return ""
    return path[len(scope) + 1 :] if path.startswith(scope + ".") else path


def _invalid(exc: ConfigError, scope: str | None) -> ApiError:
    issues = [{"path": _relative(i.path, scope), "message": i.message} for i in exc.issues]
    message = "; ".join(
        f"{i['path']}: {i['message']}" if i["path"] else i["message"] for i in issues
    )
    details: dict[str, Any] = {"issues": issues}
    if any(
        i["path"].endswith("version_tag") and "valid version tag" in i["message"] for i in issues
    ):
        details["version_tag_pattern"] = TAG_PATTERN.pattern
        message += f" (version_tag must match {TAG_PATTERN.pattern})"
    return ApiError(422, "validation_error", message, details)


def _not_found(what: str, name: Any, known: Iterable[Any]) -> ApiError:
    names = ", ".join(sorted(str(k) for k in known)) or "none"
    return ApiError(404, "not_found", f"unknown {what} {name!r} (known: {names})")


def _rules(route: Mapping[str, Any]) -> list[dict[str, Any]]:
    rules = route.get("route_rules")
    return [
        {"version_tag": r.get("version_tag"), "weight": r.get("weight")}
        for r in (rules if isinstance(rules, list) else [])
        if isinstance(r, dict)
    ]


def _active_version(rules: list[dict[str, Any]], ejected: Iterable[str]) -> str | None:
    """The tag with the highest weight among those in service (the first on a tie)."""
    out = set(ejected)
    best: tuple[float, str] | None = None
    for rule in rules:
        weight, tag = rule["weight"], rule["version_tag"]
        live = tag not in out and isinstance(weight, (int, float)) and weight > 0
        if live and (best is None or weight > best[0]):
            best = (weight, tag)
    return best[1] if best else None


def _suggested_rules(rules: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The same rules with their weights scaled to sum to 100, when they can be."""
    weights = [r["weight"] for r in rules]
    numeric = all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)
    if not rules or not numeric or any(w < 0 or not math.isfinite(w) for w in weights):
        return None
    if sum(weights) == 0 or abs(sum(weights) - 100) <= 0.01:
        return None
    scaled = normalize_weights(weights)
    return [
        {"version_tag": r["version_tag"], "weight": w} for r, w in zip(rules, scaled, strict=True)
    ]


def _instant(text: str) -> datetime:
    """ISO 8601; ``Z`` accepted; a time without an offset is UTC."""
    value = text.strip()
    if value[-1:] in ("Z", "z"):
        value = value[:-1] + "+00:00"
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


class AdminHandlers:
    def __init__(self, relay: Relay, max_body_bytes: int) -> None:
        self.relay = relay
        self.max_body_bytes = max_body_bytes

    async def _body(self, request: Request) -> dict[str, Any]:
        return await read_json_object(request, self.max_body_bytes)

    @property
    def _document(self) -> Document:
        return self.relay.snapshot.document

    # --- writing --------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        store = self.relay.store
        if store is None:
            raise ApiError(
                409,
                "no_store",
                "this relay was built from a mapping and has no store to write to: build it "
                "with Relay.from_store('relay.toml' or 'redis://...') to change it here",
            )
        if not store.writable:
            raise self._read_only()

    def _read_only(self) -> ApiError:
        where = self.relay.store.describe() if self.relay.store is not None else "its source"
        return ApiError(
            409,
            "read_only_store",
            f"the configuration comes from {where}, a read-only store: change the document "
            "there (every relay polling it follows), or serve the relay from a file or Redis "
            "store to change it through this API",
        )

    async def _write(
        self,
        change: Callable[[Document], Document],
        actor: str,
        action: str,
        scope: Callable[[], str | None] = lambda: None,
    ) -> Snapshot:
        """Run ``change`` through ``update_document``; ``scope()`` names the object it edits
        (``versions[3]``), to which validation paths are made relative."""
        self._check_writable()
        try:
            snapshot = await run_in_threadpool(
                self.relay.update_document, change, actor=actor, action=action
            )
        except ConfigError as exc:
            raise _invalid(exc, scope()) from None
        except StoreReadOnlyError:
            raise self._read_only() from None
        except StoreConflictError as exc:
            raise ApiError(409, "conflict", f"{exc}; send the change again") from None
        except StoreError as exc:
            raise ApiError(
                503,
                "store_unavailable",
                f"the configuration store could not be written, nothing changed: {exc}",
                headers=[("Retry-After", "1")],
            ) from None
        log.info("relaymw admin: %s by %s (revision %s)", action, actor, snapshot.revision)
        return snapshot

    # --- versions -------------------------------------------------------------------------------

    def _version_out(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        return {"version_id": version_id(raw), **redact(raw)}

    async def list_versions(self, request: Request, actor: str) -> Response:
        versions = self._document.get("versions", [])
        return json_response({"versions": [self._version_out(v) for v in versions]})

    async def show_version(self, request: Request, actor: str) -> Response:
        tag = request.path_params["tag"]
        found = _find(self._document.get("versions"), "version_tag", tag)
        if found is None:
            raise _not_found("version tag", tag, self._tags())
        return json_response(self._version_out(found[1]))

    def _tags(self) -> list[str]:
        return [v.get("version_tag") for v in self._document.get("versions", [])]

    def _registered(self, existing: Mapping[str, Any], body: Mapping[str, Any]) -> Response:
        """200 for the same content again, 409 for other content under a registered tag."""
        if _canonical(existing) != _canonical(body):
            raise ApiError(
                409,
                "conflict",
                f"version {body['version_tag']!r} is already registered with other content "
                f"({version_id(existing)}); versions are immutable: register the change under "
                "a new version_tag",
                {"version_id": version_id(existing), "version": redact(existing)},
            )
        answer = {"version_id": version_id(existing), "version_tag": existing["version_tag"]}
        return json_response({**answer, "version": redact(existing)})

    def _validate_version(self, body: dict[str, Any]) -> None:
        """Build the document the version would join (in its tag's place if registered), so
        each problem is reported, relative to the version, before anything is compared."""
        doc = copy.deepcopy(self._document)
        versions = doc.setdefault("versions", [])
        found = _find(versions, "version_tag", body.get("version_tag"))
        index = found[0] if found is not None else len(versions)
        versions[index : index + 1] = [body]
        try:
            build_config(doc)
        except ConfigError as exc:
            raise _invalid(exc, f"versions[{index}]") from None

    async def register_version(self, request: Request, actor: str) -> Response:
        body = await self._body(request)
        body.pop("version_id", None)  # what GET answers can be sent back as is
        self._validate_version(body)
        tag = body["version_tag"]
        found = _find(self._document.get("versions"), "version_tag", tag)
        if found is not None:
            return self._registered(found[1], body)
        where: list[str] = []

        class Registered(Exception):  # another writer got there first
            def __init__(self, existing: dict[str, Any]) -> None:
                self.existing = existing

        def change(doc: Document) -> Document:
            versions = doc.setdefault("versions", [])
            hit = _find(versions, "version_tag", tag)
            if hit is not None:
                raise Registered(hit[1])
            where[:] = [f"versions[{len(versions)}]"]
            versions.append(body)
            return doc

        try:
            await self._write(
                change, actor, "register-version", lambda: where[0] if where else None
            )
        except Registered as exc:
            return self._registered(exc.existing, body)
        answer = {"version_id": version_id(body), "version_tag": tag, "version": redact(body)}
        return json_response(answer, 201)

    # --- routes ---------------------------------------------------------------------------------

    def _route(self, alias: Any, snapshot: Snapshot | None = None) -> dict[str, Any]:
        snap = snapshot or self.relay.snapshot
        found = _find(snap.document.get("routes"), "model_alias", alias)
        if found is None:
            raise _not_found("route", alias, snap.routes)
        return self._route_out(found[1], snap)

    def _route_out(self, raw: Mapping[str, Any], snapshot: Snapshot) -> dict[str, Any]:
        alias = raw.get("model_alias")
        ejected = sorted(snapshot.ejected.get(str(alias), ()))
        return {
            "route_id": alias,
            **redact(raw),
            "ejected": ejected,
            "active_version": _active_version(_rules(raw), ejected),
        }

    async def list_routes(self, request: Request, actor: str) -> Response:
        snap = self.relay.snapshot
        routes = [self._route_out(r, snap) for r in snap.document.get("routes", [])]
        return json_response({"routes": routes})

    async def show_route(self, request: Request, actor: str) -> Response:
        return json_response(self._route(request.path_params["alias"]))

    async def put_route(self, request: Request, actor: str) -> Response:
        body = await self._body(request)
        for computed in ("route_id", "ejected", "active_version"):  # GET's answer sent back
            body.pop(computed, None)
        alias = body.get("model_alias")
        where: list[str] = []
        replaced: list[bool] = []

        def change(doc: Document) -> Document:
            routes = doc.setdefault("routes", [])
            hit = _find(routes, "model_alias", alias)
            index = hit[0] if hit is not None else len(routes)
            where[:], replaced[:] = [f"routes[{index}]"], [hit is not None]
            if hit is None:
                routes.append(body)
            else:
                routes[index] = body
            return doc

        try:
            snap = await self._write(
                change, actor, "put-route", lambda: where[0] if where else None
            )
        except ApiError as exc:
            raise _with_suggestion(exc, _rules(body)) from None
        return json_response(self._route(alias, snap), 200 if replaced[0] else 201)

    async def set_weights(self, request: Request, actor: str) -> Response:
        body = await self._body(request)
        alias, rules = _weights_request(body, {"route_id", "route_rules"})
        return await self._reweigh(alias, rules, actor, "set-weights", "updated")

    async def rollback(self, request: Request, actor: str) -> Response:
        body = await self._body(request)
        issues = [(k, "unknown field") for k in body if k not in ("route_id", "version_tag")]
        alias, tag = body.get("route_id"), body.get("version_tag")
        if not isinstance(alias, str) or not alias:
            issues.append(("route_id", "a route alias (non-empty string) is required"))
        if not isinstance(tag, str) or not tag:
            issues.append(("version_tag", "a version tag (non-empty string) is required"))
        if issues or not isinstance(alias, str):
            raise _invalid_fields(issues)
        route = self._route(alias)
        in_route = [r["version_tag"] for r in _rules(route)]
        if tag not in in_route:
            raise _not_found(f"version tag in route {alias!r}:", tag, in_route)
        weights = [{"version_tag": t, "weight": 100 if t == tag else 0} for t in in_route]
        return await self._reweigh(alias, weights, actor, "rollback", "rolled_back")

    async def _reweigh(
        self, alias: str, weights: list[dict[str, Any]], actor: str, action: str, status: str
    ) -> Response:
        """Set the named rules' weights in place (rule order, and with it every user's bucket,
        is kept); tags the route lacks are appended, as a canary goes last."""
        self._route(alias)
        tags = self._tags()
        for i, rule in enumerate(weights):
            if rule["version_tag"] not in tags:
                raise _not_found(
                    f"version tag (route_rules[{i}].version_tag)", rule["version_tag"], tags
                )
        where: list[str] = []
        merged: list[dict[str, Any]] = []

        def change(doc: Document) -> Document:
            hit = _find(doc.get("routes"), "model_alias", alias)
            if hit is None:
                raise _not_found("route", alias, [])
            index, route = hit
            new = {r["version_tag"]: r["weight"] for r in weights}
            rules = [
                {**r, "weight": new.pop(r.get("version_tag"), r.get("weight"))}
                for r in route.get("route_rules", [])
            ]
            rules += [{"version_tag": t, "weight": w} for t, w in new.items()]
            route["route_rules"] = rules
            where[:], merged[:] = [f"routes[{index}]"], _rules(route)
            return doc

        try:
            snap = await self._write(change, actor, action, lambda: where[0] if where else None)
        except ApiError as exc:
            raise _with_suggestion(exc, merged) from None
        route = self._route(alias, snap)
        return json_response(
            {
                "status": status,
                "route_id": alias,
                "active_version": route["active_version"],
                "route_rules": _rules(route),
            }
        )

    # --- metrics, audit, rollouts ---------------------------------------------------------------

    async def metrics(self, request: Request, actor: str) -> Response:
        q = request.query_params
        snap = self.relay.snapshot
        issues: list[tuple[str, str]] = []
        moments: dict[str, datetime] = {}
        for field in ("start_time", "end_time"):
            if q.get(field):
                try:
                    moments[field] = _instant(q[field])
                except ValueError:
                    issues.append((field, f"{q[field]!r} is not an ISO 8601 time"))
        wanted = [m.strip() for m in q.get("metrics", "").split(",") if m.strip()]
        unknown = [m for m in wanted if m not in METRIC_NAMES]
        if unknown:
            issues.append(
                ("metrics", f"unknown {', '.join(unknown)} (known: {', '.join(METRIC_NAMES)})")
            )
        end = moments.get("end_time") or datetime.now(timezone.utc)
        try:
            start = moments.get("start_time") or end - timedelta(hours=1)
        except OverflowError:
            start, issues = end, [*issues, ("end_time", "too early to look an hour back from")]
        if not issues and start > end:
            issues.append(("start_time", "must not be after end_time"))
        if issues:
            raise _invalid_fields(issues)
        route = q.get("route_id") or None
        tags = self._tags()
        if route is not None:
            if route not in snap.routes:
                raise _not_found("route", route, snap.routes)
            tags = [r.version_tag for r in snap.routes[route].route.route_rules]
        tag = q.get("version_tag") or None
        if tag is not None:
            if tag not in tags:
                raise _not_found("version tag", tag, tags)
            tags = [tag]
        names = wanted or list(METRIC_NAMES)

        def query() -> list[dict[str, Any]]:
            out = []
            for t in tags:
                figures = self.relay.metrics(t, start, end, route)
                metrics = {n: getattr(figures, n) for n in names}
                out.append({"version_tag": t, "route_id": route, "metrics": metrics})
            return out

        versions = await run_in_threadpool(query)
        return json_response(
            {
                "start_time": start.isoformat(),
                "end_time": end.isoformat(),
                "bucket_seconds": self.relay.metrics_bucket_seconds,
                "versions": versions,
            }
        )

    async def audit(self, request: Request, actor: str) -> Response:
        text = request.query_params.get("limit", "100")
        try:
            limit = int(text)
        except ValueError:
            limit = -1
        if not 1 <= limit <= MAX_AUDIT_LIMIT:
            raise _invalid_fields([("limit", f"must be an integer from 1 to {MAX_AUDIT_LIMIT}")])
        entries = await run_in_threadpool(self.relay.changes, limit)
        return json_response({"entries": entries})

    async def read_rollout(self, request: Request, actor: str) -> Response:
        alias = request.path_params["alias"]
        state = await run_in_threadpool(self.relay.read_state, f"rollout:{alias}")
        if state is None:
            self._route(alias)  # an unknown route says so
            raise ApiError(404, "not_found", f"no rollout state for route {alias!r}")
        return json_response(state)

    async def write_rollout(self, request: Request, actor: str) -> Response:
        alias = request.path_params["alias"]
        body = await self._body(request)
        self._route(alias)
        await self._save_state(f"rollout:{alias}", body)
        log.info("relaymw admin: rollout state of %s written by %s", alias, actor)
        return json_response(body)

    async def delete_rollout(self, request: Request, actor: str) -> Response:
        alias = request.path_params["alias"]
        await self._save_state(f"rollout:{alias}", None)
        log.info("relaymw admin: rollout state of %s deleted by %s", alias, actor)
        return Response(status_code=204)

    async def _save_state(self, name: str, value: dict[str, Any] | None) -> None:
        self._check_writable()
        try:
            await run_in_threadpool(self.relay.write_state, name, value)
        except StoreReadOnlyError:
            raise self._read_only() from None


def _invalid_fields(issues: list[tuple[str, str]]) -> ApiError:
    return ApiError(
        422,
        "validation_error",
        "; ".join(f"{p}: {m}" for p, m in issues),
        {"issues": [{"path": p, "message": m} for p, m in issues]},
    )


def _weights_request(body: Mapping[str, Any], fields: set[str]) -> tuple[str, list[dict[str, Any]]]:
    """``route_id`` and well-formed ``route_rules`` of a PATCH or rollback body, or a 422
    listing every problem."""
    issues = [(k, "unknown field") for k in body if k not in fields]
    alias = body.get("route_id")
    if not isinstance(alias, str) or not alias:
        issues.append(("route_id", "a route alias (non-empty string) is required"))
    rules = body.get("route_rules")
    if not isinstance(rules, list) or ("route_rules" in fields and not rules):
        issues.append(("route_rules", "a non-empty list of {version_tag, weight} is required"))
        rules = []
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        path = f"route_rules[{i}]"
        if not isinstance(rule, dict):
            issues.append((path, "expected an object {version_tag, weight}"))
            continue
        issues += [
            (f"{path}.{k}", "unknown field") for k in rule if k not in ("version_tag", "weight")
        ]
        tag, weight = rule.get("version_tag"), rule.get("weight")
        if not isinstance(tag, str):
            issues.append((f"{path}.version_tag", "a version tag (string) is required"))
        elif tag in seen:
            issues.append((f"{path}.version_tag", f"{tag!r} is listed twice"))
        else:
            seen.add(tag)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            issues.append((f"{path}.weight", "a number >= 0 is required"))
    if issues:
        raise _invalid_fields(issues)
    return str(alias), [dict(r) for r in rules]


def _with_suggestion(exc: ApiError, rules: list[dict[str, Any]]) -> ApiError:
    """A weights problem answered with the same weights scaled to sum to 100."""
    suggestion = _suggested_rules(rules) if exc.status == 422 else None
    if suggestion is None:
        return exc
    shown = ", ".join(f"{r['version_tag']}={r['weight']:g}" for r in suggestion)
    exc.message += f"; to keep these proportions send {shown}"
    exc.details = {**(exc.details or {}), "suggested_route_rules": suggestion}
    return exc
