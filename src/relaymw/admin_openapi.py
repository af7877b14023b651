"""The OpenAPI 3.1 document of the version-control API, served at ``GET /openapi.json``."""

from __future__ import annotations

from typing import Any

from relaymw.config import TAG_PATTERN

__all__ = ["openapi_document"]

_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF + name}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _nullable(kind: str | list[str], **extra: Any) -> dict[str, Any]:
    kinds = [kind] if isinstance(kind, str) else kind
    return {"type": [*kinds, "null"], **extra}


_STRINGS = {"type": "array", "items": {"type": "string"}}
_MONEY = {"type": ["number", "string"], "description": "USD"}

_VERSION_FIELDS: dict[str, Any] = {
    "version_tag": {
        "type": "string",
        "pattern": TAG_PATTERN.pattern,
        "description": "1-64 lowercase letters, digits, '-' and '.'",
        "examples": ["claude-sonnet-4.5-v2"],
    },
    "model": {"type": "string", "examples": ["anthropic/claude-sonnet-4-20250514"]},
    "upstream_endpoint": {"type": "string", "description": "a key of the upstreams table"},
    "parameters": {"type": "object", "description": "merged into every request body"},
    "system_prompt": _nullable("string"),
    "cost_limit_per_request": {**_nullable(["number", "string"]), "description": "USD"},
    "metadata": {"type": "object"},
    "rate_limits": _STRINGS,
    "token_limits": _STRINGS,
}

_RULE = {
    "type": "object",
    "required": ["version_tag", "weight"],
    "additionalProperties": False,
    "properties": {
        "version_tag": {"type": "string"},
        "weight": {"type": "number", "minimum": 0, "description": "weights sum to 100"},
    },
}

_ROUTE_FIELDS: dict[str, Any] = {
    "model_alias": {"type": "string", "minLength": 1, "examples": ["code-review-production"]},
    "route_rules": {"type": "array", "minItems": 1, "items": _ref("RouteRule")},
    "sticky_sessions": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "enabled": {"type": "boolean"},
            "cookie_name": {"type": "string"},
            "ttl_seconds": {"type": "integer"},
            "key": {
                **_nullable("string"),
                "description": "header:NAME | cookie:NAME | api_key | client_ip | callable",
            },
        },
    },
    "health_check": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "enabled": {"type": "boolean"},
            "error_rate_threshold": {"type": "number", "minimum": 0, "maximum": 1},
            "latency_p99_threshold_ms": _nullable("number"),
            "auto_rollback": {"type": "boolean"},
            "min_requests": {"type": "integer"},
            "window_seconds": {"type": "integer"},
            "mode": {"enum": ["threshold", "baseline"]},
        },
    },
    "paths": {**_STRINGS, "description": "in-app mode: the app paths the route covers"},
    "rate_limits": _STRINGS,
    "token_limits": _STRINGS,
    "cost_policy": {"enum": ["clamp", "reject"]},
    "cost_limit_per_request": {**_nullable(["number", "string"]), "description": "USD"},
    "allow_client_pin": {"type": "boolean"},
}

_METRICS = {
    "type": "object",
    "description": "the fields asked for with ?metrics= (all by default); money in USD as "
    "JSON numbers; latencies null without requests",
    "properties": {
        "request_count": {"type": "integer"},
        "error_count": {"type": "integer"},
        "error_rate": {"type": "number"},
        "latency_p50_ms": _nullable("number"),
        "latency_p99_ms": _nullable("number"),
        "ttft_p50_ms": _nullable("number"),
        "ttft_p99_ms": _nullable("number"),
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_cost_usd": {"type": "number"},
        "cost_per_token": {"type": "number"},
    },
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {
                    "type": {"type": "string", "examples": ["validation_error"]},
                    "message": {"type": "string", "description": "what happened, what to do"},
                    "details": {
                        "description": "validation_error: issues [{path, message}], and "
                        "suggested_route_rules or version_tag_pattern where they help",
                    },
                },
            }
        },
    },
    "Version": {
        "type": "object",
        "required": ["version_tag", "model", "upstream_endpoint"],
        "additionalProperties": False,
        "properties": {
            **_VERSION_FIELDS,
            "version_id": {"type": "string", "description": "ignored (GET answers resent)"},
        },
    },
    "RegisteredVersion": {
        "type": "object",
        "required": ["version_id", "version_tag", "version"],
        "properties": {
            "version_id": {"type": "string", "pattern": "^sha256:[0-9a-f]{16}$"},
            "version_tag": {"type": "string"},
            "version": {"type": "object", "properties": _VERSION_FIELDS},
        },
    },
    "VersionInfo": {
        "type": "object",
        "required": ["version_id", "version_tag"],
        "properties": {"version_id": {"type": "string"}, **_VERSION_FIELDS},
    },
    "RouteRule": _RULE,
    "Route": {
        "type": "object",
        "required": ["model_alias", "route_rules"],
        "additionalProperties": False,
        "properties": {
            **_ROUTE_FIELDS,
            "route_id": {"type": "string", "description": "ignored (GET answers resent)"},
            "ejected": {**_STRINGS, "description": "ignored (GET answers resent)"},
            "active_version": _nullable("string", description="ignored (GET answers resent)"),
        },
    },
    "RouteInfo": {
        "type": "object",
        "required": ["route_id", "model_alias", "route_rules", "ejected", "active_version"],
        "properties": {
            "route_id": {"type": "string", "description": "the model_alias"},
            **_ROUTE_FIELDS,
            "ejected": {**_STRINGS, "description": "versions taken out by health checks"},
            "active_version": _nullable("string", description="the highest weight in service"),
        },
    },
    "WeightsChange": {
        "type": "object",
        "required": ["route_id", "route_rules"],
        "additionalProperties": False,
        "properties": {
            "route_id": {"type": "string", "minLength": 1},
            "route_rules": {"type": "array", "minItems": 1, "items": _ref("RouteRule")},
        },
    },
    "Rollback": {
        "type": "object",
        "required": ["route_id", "version_tag"],
        "additionalProperties": False,
        "properties": {
            "route_id": {"type": "string", "minLength": 1},
            "version_tag": {"type": "string", "minLength": 1},
        },
    },
    "WeightsAnswer": {
        "type": "object",
        "required": ["status", "route_id", "active_version", "route_rules"],
        "properties": {
            "status": {"enum": ["updated", "rolled_back"]},
            "route_id": {"type": "string"},
            "active_version": _nullable("string"),
            "route_rules": {"type": "array", "items": _ref("RouteRule")},
        },
    },
    "VersionMetrics": {
        "type": "object",
        "required": ["start_time", "end_time", "bucket_seconds", "versions"],
        "properties": {
            "start_time": {"type": "string", "format": "date-time"},
            "end_time": {"type": "string", "format": "date-time"},
            "bucket_seconds": {
                "type": "integer",
                "minimum": 1,
                "description": "the figures sum the whole buckets of this many seconds that "
                "overlap [start_time, end_time)",
            },
            "versions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["version_tag", "route_id", "metrics"],
                    "properties": {
                        "version_tag": {"type": "string"},
                        "route_id": _nullable("string", description="null: every route"),
                        "metrics": _METRICS,
                    },
                },
            },
        },
    },
    "AuditEntry": {
        "type": "object",
        "required": ["id", "at", "actor", "action", "target", "before", "after", "revision"],
        "properties": {
            "id": {"type": "string"},
            "at": {"type": "string", "format": "date-time"},
            "actor": {"type": "string", "description": "the name of the token used"},
            "action": {"type": "string", "examples": ["set-weights"]},
            "target": {"type": "string", "examples": ["route:code-review-production"]},
            "before": {"description": "the object before (null: created); secrets ***"},
            "after": {"description": "the object after (null: removed); secrets ***"},
            "revision": {"type": "string"},
        },
    },
    "RolloutState": {"type": "object", "description": "the rollout controller's own state"},
}

_ERRORS = {
    "401": "missing or wrong bearer token",
    "429": "too many admin calls; see Retry-After",
    "503": "the store could not be used (Redis down ...); nothing changed; see Retry-After",
}
_BODY_ERRORS = {
    "400": "the body is not valid JSON",
    "413": "the body is too large",
    "415": "the body is not sent as application/json",
    "422": "the body or a parameter is invalid; details.issues lists every problem",
}


def _op(
    summary: str,
    ok: dict[str, Any],
    *,
    body: str | None = None,
    errors: dict[str, str] | None = None,
    parameters: list[dict[str, Any]] | None = None,
    writes: bool = False,
) -> dict[str, Any]:
    responses = dict(ok)
    for status, text in _ERRORS.items():
        responses[status] = _json(_ref("Error"), text)
    if body is not None:
        for status, text in _BODY_ERRORS.items():
            responses[status] = _json(_ref("Error"), text)
    if writes:
        responses["409"] = _json(
            _ref("Error"), "a conflict, or a read-only store: the message says where to change it"
        )
    for status, text in (errors or {}).items():
        responses[status] = _json(_ref("Error"), text)
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    if parameters:
        op["parameters"] = parameters
    return op


def _list_of(key: str, schema: str) -> dict[str, Any]:
    """``{key: [schema, ...]}``."""
    return {
        "type": "object",
        "required": [key],
        "properties": {key: {"type": "array", "items": _ref(schema)}},
    }


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_ALIAS = _path_param("alias", "a route's model_alias")
_UNKNOWN_ROUTE = {"404": "unknown route"}


def _paths() -> dict[str, Any]:
    return {
        "/openapi.json": {
            "get": {
                "summary": "this document (no token needed)",
                "security": [],
                "responses": {"200": _json({"type": "object"}, "the OpenAPI document")},
            }
        },
        "/models/versions": {
            "get": _op(
                "list the registered versions",
                {
                    "200": _json(
                        _list_of("versions", "VersionInfo"), "every version, with its version_id"
                    )
                },
            ),
            "post": _op(
                "register a version (immutable: same content 200, other content 409)",
                {
                    "201": _json(_ref("RegisteredVersion"), "registered"),
                    "200": _json(_ref("RegisteredVersion"), "already registered, same content"),
                },
                body="Version",
                writes=True,
            ),
        },
        "/models/versions/{tag}": {
            "get": _op(
                "show a version",
                {"200": _json(_ref("VersionInfo"), "the version")},
                errors={"404": "unknown version tag"},
                parameters=[_path_param("tag", "a version_tag")],
            )
        },
        "/routes/traffic": {
            "get": _op(
                "list the routes with their weights, ejections and active version",
                {"200": _json(_list_of("routes", "RouteInfo"), "every route")},
            ),
            "post": _op(
                "create or replace a route",
                {
                    "201": _json(_ref("RouteInfo"), "created"),
                    "200": _json(_ref("RouteInfo"), "replaced"),
                },
                body="Route",
                writes=True,
            ),
            "patch": _op(
                "change a route's weights (named rules change in place; new tags go last)",
                {"200": _json(_ref("WeightsAnswer"), "status 'updated'")},
                body="WeightsChange",
                writes=True,
                errors={"404": "unknown route or version tag"},
            ),
        },
        "/routes/traffic/rollback": {
            "post": _op(
                "send all of a route's traffic to one of its versions",
                {"200": _json(_ref("WeightsAnswer"), "status 'rolled_back'")},
                body="Rollback",
                writes=True,
                errors={"404": "unknown route, or the tag is not in the route"},
            )
        },
        "/routes/traffic/{alias}": {
            "get": _op(
                "show a route",
                {"200": _json(_ref("RouteInfo"), "the route")},
                errors=_UNKNOWN_ROUTE,
                parameters=[_ALIAS],
            )
        },
        "/metrics/versions": {
            "get": _op(
                "per-version metrics over a time window (this process's figures unless "
                "[metrics] storage_uri is redis://)",
                {"200": _json(_ref("VersionMetrics"), "one entry per version")},
                errors={
                    "404": "unknown version tag or route",
                    "422": "a time is not ISO 8601, start is after end, or a metric is unknown",
                },
                parameters=[
                    _query("version_tag", {"type": "string"}, "one version (default: all)"),
                    _query("route_id", {"type": "string"}, "one route (default: all summed)"),
                    _query(
                        "start_time",
                        {"type": "string", "format": "date-time"},
                        "ISO 8601 (default: an hour before end_time)",
                    ),
                    _query("end_time", {"type": "string", "format": "date-time"}, "default: now"),
                    _query(
                        "metrics",
                        {"type": "string", "examples": ["request_count,error_rate"]},
                        "comma-separated metric names (default: all)",
                    ),
                ],
            )
        },
        "/audit": {
            "get": _op(
                "the change log, newest first: who (token name), when, before, after",
                {"200": _json(_list_of("entries", "AuditEntry"), "the entries")},
                errors={"422": "limit is not an integer from 1 to 1000"},
                parameters=[
                    _query(
                        "limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "default 100"
                    )
                ],
            )
        },
        "/rollouts/{alias}": {
            "parameters": [_ALIAS],
            "get": _op(
                "the rollout controller's stored state for a route",
                {"200": _json(_ref("RolloutState"), "the state")},
                errors={"404": "unknown route, or no rollout state"},
            ),
            "put": _op(
                "store the rollout controller's state for a route",
                {"200": _json(_ref("RolloutState"), "the stored state")},
                body="RolloutState",
                writes=True,
                errors=_UNKNOWN_ROUTE,
            ),
            "delete": _op(
                "forget a route's rollout state",
                {"204": {"description": "deleted (or there was none)"}},
                writes=True,
                errors={"404": "no such path (an alias cannot hold a line break)"},
            ),
        },
    }


def openapi_document(root_path: str = "") -> dict[str, Any]:
    """The document, its server URL being where the app is mounted."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "relaymw version-control API",
            "version": "1",
            "description": "Register versions, shift traffic, roll back, read metrics and the "
            "change log. Bearer-token auth on everything but this document. Errors are "
            '{"error": {"type", "message", "details"?}}.',
        },
        "servers": [{"url": root_path or "/"}],
        "security": [{"bearerAuth": []}],
        "paths": _paths(),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }
