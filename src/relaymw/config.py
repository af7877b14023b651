"""The configuration model: attrs snapshots, a cattrs converter, validation with field paths.

A document goes through three steps, each of which reports *every* problem it finds:
``parse_document`` (bytes → dict), ``interpolate`` (``${ENV}``), then ``build_config``
(dict → :class:`RelayConfig`, structural errors from cattrs plus the semantic rules of
SPEC §2). Errors are :class:`ConfigError` carrying a list of ``path: message`` entries.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, TypeGuard
from urllib.parse import urlsplit

import attrs
import cattrs
from cattrs.errors import ClassValidationError, IterableValidationError
from cattrs.v import format_exception as cattrs_format_exception
from cattrs.v import transform_error

from relaymw.errors import ConfigError, ConfigIssue

__all__ = [
    "Budget",
    "Budgeting",
    "Gateway",
    "HealthCheck",
    "Metrics",
    "Pinning",
    "Price",
    "RateLimiting",
    "RelayConfig",
    "Route",
    "RouteRule",
    "Sticky",
    "StickySessions",
    "Upstream",
    "Version",
    "build_config",
    "interpolate",
    "load_document",
    "normalize_weights",
    "parse_document",
    "unstructure_config",
]

TAG_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9.-]{0,62}[a-z0-9])?$")
# Deeper than any configuration is written; the recursive steps after parsing stay far from
# Python's recursion limit.
MAX_DEPTH = 64
WEIGHT_TOLERANCE = 0.01
Protocol = Literal["openai", "anthropic"]


def _frozen_dict(value: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict(value or {})


@attrs.frozen
class Upstream:
    """Where a version's requests go. ``base_url`` is what the protocol's official SDK takes."""

    base_url: str
    protocol: Protocol = "openai"
    api_key: str = attrs.field(default="", repr=False)
    timeout_seconds: float = 60.0
    connect_timeout_seconds: float = 10.0
    anthropic_version: str = "2023-06-01"
    max_connections: int = 256


@attrs.frozen
class Version:
    """An immutable snapshot of how to call a model (SPEC §1)."""

    version_tag: str
    model: str
    upstream_endpoint: str
    parameters: dict[str, Any] = attrs.field(factory=dict, converter=_frozen_dict, hash=False)
    system_prompt: str | None = None
    cost_limit_per_request: Decimal | None = None
    metadata: dict[str, Any] = attrs.field(factory=dict, converter=_frozen_dict, hash=False)
    # Limits that apply to this version's traffic on every route, per identity.
    rate_limits: tuple[str, ...] = ()
    token_limits: tuple[str, ...] = ()

    def upstream_model(self, upstream: Upstream) -> str:
        """The model name sent upstream: an ``<upstream>/`` or ``<protocol>/`` prefix is
        stripped; any other slash is part of the model's own name (``meta-llama/...``)."""
        prefix, sep, rest = self.model.partition("/")
        if sep and prefix in (self.upstream_endpoint, upstream.protocol):
            return rest
        return self.model


@attrs.frozen
class RouteRule:
    version_tag: str
    weight: float


@attrs.frozen
class StickySessions:
    enabled: bool = True
    cookie_name: str = "hs_model_version"
    ttl_seconds: int = 3600
    # header:NAME | cookie:NAME | api_key | client_ip; a callable can be given in Python.
    key: str | None = None


@attrs.frozen
class HealthCheck:
    enabled: bool = False
    error_rate_threshold: float = 0.05
    latency_p99_threshold_ms: float | None = None
    auto_rollback: bool = True
    min_requests: int = 20
    window_seconds: int = 300
    mode: Literal["threshold", "baseline"] = "threshold"


@attrs.frozen
class Route:
    model_alias: str
    route_rules: tuple[RouteRule, ...]
    sticky_sessions: StickySessions = StickySessions()
    health_check: HealthCheck = HealthCheck()
    paths: tuple[str, ...] = ()
    rate_limits: tuple[str, ...] = ()
    token_limits: tuple[str, ...] = ()
    cost_policy: Literal["clamp", "reject"] = "clamp"
    cost_limit_per_request: Decimal | None = None
    # Lets clients name one of this route's version tags as ``model`` (a deliberate pin).
    allow_client_pin: bool = False


@attrs.frozen
class Price:
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cached_input_per_mtok: Decimal | None = None


@attrs.frozen
class RateLimiting:
    storage_uri: str = attrs.field(default="memory://", repr=False)  # may hold a password
    strategy: Literal["fixed-window", "moving-window", "sliding-window-counter"] = "moving-window"
    identity: str = "header:authorization"
    fail_open: bool = True
    # Seconds between probes of an unreachable storage while failing open or closed.
    recovery_probe_seconds: float = 1.0
    # X-Forwarded-For is only believed when this many trusted proxies sit in front.
    trusted_proxy_count: int = 0


@attrs.frozen
class Budget:
    scope: str
    limit_usd: Decimal
    period: Literal["day", "month"] = "month"
    alert_at: tuple[float, ...] = (0.5, 0.8, 1.0)


@attrs.frozen
class Budgeting:
    """Where budget spend is kept: ``memory://`` (one process) or a ``redis://`` URI."""

    storage_uri: str = attrs.field(default="memory://", repr=False)
    fail_open: bool = True


@attrs.frozen
class Metrics:
    """Per-version metric windows; with a ``redis://`` URI workers aggregate their buckets."""

    storage_uri: str = attrs.field(default="memory://", repr=False)
    bucket_seconds: int = 10
    retention_seconds: int = 3600


@attrs.frozen
class Sticky:
    secret: str = attrs.field(default="", repr=False)


@attrs.frozen
class Pinning:
    """An operator may pin a version with ``header`` when ``token`` is sent in ``token_header``."""

    header: str = "x-relaymw-pin"
    token_header: str = "x-relaymw-pin-token"
    token: str = attrs.field(default="", repr=False)


@attrs.frozen
class Gateway:
    enabled: bool = True
    path_prefix: str = ""
    max_body_bytes: int = 10 * 1024 * 1024


@attrs.frozen
class RelayConfig:
    versions: tuple[Version, ...] = ()
    upstreams: dict[str, Upstream] = attrs.field(factory=dict, hash=False)
    routes: tuple[Route, ...] = ()
    pricing: dict[str, Price] = attrs.field(factory=dict, hash=False)
    rate_limiting: RateLimiting = RateLimiting()
    budgets: tuple[Budget, ...] = ()
    budgeting: Budgeting = Budgeting()
    metrics: Metrics = Metrics()
    sticky: Sticky = Sticky()
    pinning: Pinning = Pinning()
    gateway: Gateway = Gateway()


# --- weights -------------------------------------------------------------------------------


def normalize_weights(weights: Sequence[float], total: float = 100.0) -> list[float]:
    """Scale ``weights`` proportionally so they sum to ``total`` (rounded to 2 places).

    All-zero weights stay zero. Negative weights are a ``ValueError``.
    """
    if any(w < 0 for w in weights):
        raise ValueError("weights must be >= 0")
    s = float(sum(weights))
    if s == 0:
        return [0.0 for _ in weights]
    scaled = [round(w * total / s, 2) for w in weights]
    # Put the rounding residue on the largest weight so the result sums to ``total``.
    residue = round(total - sum(scaled), 2)
    if residue and scaled:
        i = max(range(len(scaled)), key=scaled.__getitem__)
        scaled[i] = round(scaled[i] + residue, 2)
    return scaled


# --- parsing and interpolation ---------------------------------------------------------------


def parse_document(text: bytes | str, fmt: str) -> dict[str, Any]:
    """Parse TOML, YAML or JSON text into a dict; any syntax error is a :class:`ConfigError`."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError([ConfigIssue("", f"not UTF-8 text ({exc.reason})")]) from None
    if not text.strip():
        # A file truncated for rewriting looks like this; serving it would drop every route.
        raise ConfigError([ConfigIssue("", "the document is empty")])
    try:
        if fmt == "toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:
                import tomli as tomllib
            doc: object = tomllib.loads(text)
        elif fmt in ("yaml", "yml"):
            try:
                import yaml
            except ModuleNotFoundError:
                raise ConfigError(
                    [ConfigIssue("", "YAML needs PyYAML: pip install 'relaymw[yaml]'")]
                ) from None
            doc = yaml.safe_load(text)
        elif fmt == "json":
            doc = json.loads(text)
        else:
            raise ConfigError([ConfigIssue("", f"unknown document format {fmt!r}")])
    except ConfigError:
        raise
    except Exception as exc:  # each parser has its own error type
        raise ConfigError(
            [ConfigIssue("", f"{fmt.upper()} syntax error: {_syntax(exc, fmt)}")]
        ) from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError([ConfigIssue("", "the document must be a table/mapping at the top")])
    if issues := _document_issues(doc):
        raise ConfigError(issues)
    return doc


# From the first quote to the last (or to the end when there is only one).
_QUOTED = re.compile(r"['\"](?:.*['\"]|.*)", re.DOTALL)


def _syntax(exc: Exception, fmt: str) -> str:
    """A parser's message without the document's text: PyYAML quotes the offending line,
    and its messages the offending token (an alias, a tag, a scalar), which may be a secret."""
    problem = getattr(exc, "problem", None)
    if problem is None:
        text = str(exc)
    else:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        text = f"{problem}{where}"
    return _QUOTED.sub("'...'", text) if fmt in ("yaml", "yml") else text


def _document_issues(doc: Mapping[Any, Any]) -> list[ConfigIssue]:
    """Keys that are not strings (YAML's may be null, numbers, booleans or dates) and nesting
    deeper than :data:`MAX_DEPTH`, found without recursion: a JSON document may nest a
    thousand levels deep."""
    issues: list[ConfigIssue] = []
    stack: list[tuple[Any, str, int]] = [(doc, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            issues.append(ConfigIssue(path, f"nested deeper than {MAX_DEPTH} levels"))
        elif isinstance(node, dict):
            children = []
            for key, value in node.items():
                child = _join(path, str(key))
                if not isinstance(key, str):
                    issues.append(ConfigIssue(child, "a key must be a string"))
                children.append((value, child, depth + 1))
            stack.extend(reversed(children))  # reported in document order
        elif isinstance(node, list):
            stack.extend(reversed([(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(node)]))
    return issues


def load_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and parse a config file, its format chosen by suffix."""
    p = os.fspath(path)
    with open(p, "rb") as f:
        return parse_document(f.read(), format_for_path(p))


def format_for_path(path: str) -> str:
    suffix = path.rsplit(".", 1)[-1].lower() if "." in path else "toml"
    return {"yml": "yaml", "yaml": "yaml", "json": "json"}.get(suffix, "toml")


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(
    doc: Any,
    environ: Mapping[str, str] | None = None,
    _path: str = "",
    *,
    substituted: dict[str, str] | None = None,
) -> tuple[Any, list[ConfigIssue]]:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of ``doc``.

    Returns the new document and the issues (a missing variable without a default names the
    variable, never a value). ``substituted``, when given, receives each value taken from
    the environment, mapped to its variable's name.
    """
    env = os.environ if environ is None else environ
    issues: list[ConfigIssue] = []

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, str):
            if "${" not in node:
                return node

            def sub(m: re.Match[str]) -> str:
                name, default = m.group(1), m.group(2)
                if name in env:
                    if substituted is not None:
                        substituted[env[name]] = name
                    return env[name]
                if default is not None:
                    return default
                issues.append(
                    ConfigIssue(path, f"environment variable {name} is not set (and no default)")
                )
                return ""

            return _ENV_REF.sub(sub, node)
        if isinstance(node, dict):
            return {k: walk(v, _join(path, str(k))) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(node)]
        return node

    return walk(doc, _path), issues


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --- structuring ----------------------------------------------------------------------------


class FieldError(ValueError):
    """Raised by our structuring hooks; its text is the message shown for the field."""


def _structure_decimal(value: Any, _: type) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise FieldError("expected a number")
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        raise FieldError(f"expected a number, got {value!r}") from None
    if not d.is_finite() or d < 0:
        raise FieldError("expected a finite number >= 0")
    return d


def _structure_float(value: Any, _: type) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError("expected a number")
    if not math.isfinite(value):
        raise FieldError("expected a finite number")
    return float(value)


def _structure_int(value: Any, _: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError("expected an integer")
    return value


def _structure_str(value: Any, _: type) -> str:
    if not isinstance(value, str):
        raise FieldError("expected a string")
    return value


def _structure_bool(value: Any, _: type) -> bool:
    if not isinstance(value, bool):
        raise FieldError("expected true or false")
    return value


_LITERAL = re.compile(r"^(?P<got>.*) not in literal typing\.Literal\[(?P<allowed>.*)\]$")


def _format_exception(exc: BaseException, type_: type | None) -> str:
    if isinstance(exc, FieldError):
        return str(exc)
    text = str(exc)
    if m := _LITERAL.match(text.strip("()'\"")):
        return f"must be one of {m.group('allowed')} (got {m.group('got')!r})"
    return cattrs_format_exception(exc, type_)


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(Decimal, _structure_decimal)
    conv.register_structure_hook(float, _structure_float)
    conv.register_structure_hook(int, _structure_int)
    conv.register_structure_hook(str, _structure_str)
    conv.register_structure_hook(bool, _structure_bool)
    conv.register_unstructure_hook(Decimal, lambda d: float(d) if d == d.to_integral() else str(d))
    return conv


converter = _make_converter()

_DICT_KEY = re.compile(r"\['([^']*)'\]")
_CATTRS_MESSAGE = re.compile(r"^(?P<msg>.*) @ \$(?P<path>.*)$", re.DOTALL)


def _cattrs_issues(exc: Exception) -> list[ConfigIssue]:
    out = []
    for line in transform_error(exc, path="$", format_exception=_format_exception):
        m = _CATTRS_MESSAGE.match(line)
        if not m:
            out.append(ConfigIssue("", line))
            continue
        path = _DICT_KEY.sub(r".\1", m.group("path")).lstrip(".")
        msg = m.group("msg")
        out.append(ConfigIssue(path, msg))
    return out


def build_config(doc: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> RelayConfig:
    """Turn a parsed document into a validated :class:`RelayConfig`.

    Every problem is collected and raised together as one :class:`ConfigError`.
    """
    if structure := _document_issues(doc):
        raise ConfigError(structure)  # the steps below would fail on it
    substituted: dict[str, str] = {}
    resolved, issues = interpolate(dict(doc), environ, substituted=substituted)
    shape = _shape_issues(resolved)
    issues.extend(shape)
    issues.extend(_semantic_issues(resolved))
    config: RelayConfig | None = None
    try:
        config = converter.structure(resolved, RelayConfig)
    except (ClassValidationError, IterableValidationError) as exc:
        # A string where a list belongs would otherwise be reported once per character.
        bad = tuple(i.path for i in shape)
        issues.extend(i for i in _cattrs_issues(exc) if not any(_under(i.path, p) for p in bad))
    except Exception as exc:  # a hook's own error outside detailed validation
        issues.append(ConfigIssue("", str(exc)))
    if issues or config is None:
        # Messages reach logs, signals and the audit file: no secret may be echoed in them.
        hidden = {v: "***" for v in _literal_secrets(resolved) if len(v) >= 8}
        hidden.update({v: f"${{{name}}}" for v, name in substituted.items() if len(v) >= 4})
        raise ConfigError(_dedupe(_redacted(issues, hidden)))
    return config


def _literal_secrets(doc: Mapping[str, Any]) -> list[str]:
    """The values of the fields that hold secrets (a copy elsewhere, a key say, is echoed)."""
    found: list[Any] = []
    upstreams = doc.get("upstreams")
    if isinstance(upstreams, dict):
        found += [up.get("api_key") for up in upstreams.values() if isinstance(up, dict)]
    for section, key in _SECRET_FIELDS:
        node = doc.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        found.append(_password(value) if key == "storage_uri" else value)
    return [v for v in found if isinstance(v, str)]


_SECRET_FIELDS = (
    ("sticky", "secret"),
    ("pinning", "token"),
    ("rate_limiting", "storage_uri"),
    ("budgeting", "storage_uri"),
    ("metrics", "storage_uri"),
)


def _password(uri: Any) -> str | None:
    try:
        return urlsplit(uri).password if isinstance(uri, str) else None
    except ValueError:  # an unbalanced IPv6 bracket
        return None


def _redacted(issues: list[ConfigIssue], hidden: Mapping[str, str]) -> list[ConfigIssue]:
    """``issues`` with each secret in ``hidden`` written as its replacement (an ``${ENV}``
    value as its ``${NAME}``). Short values are not passed in: they would garble every
    message."""
    spellings = {  # a value as it is, and as repr() writes it into a message
        text: replacement
        for value, replacement in hidden.items()
        for text in (value, repr(value)[1:-1])
    }
    if not spellings:
        return issues
    out = []
    for issue in issues:
        message = issue.message
        for text in sorted(spellings, key=len, reverse=True):  # a value before its parts
            message = message.replace(text, spellings[text])
        out.append(ConfigIssue(issue.path, message))
    return out


_LIST_FIELDS = {
    "": ("versions", "routes", "budgets"),
    "versions": ("rate_limits", "token_limits"),
    "routes": ("route_rules", "paths", "rate_limits", "token_limits"),
    "budgets": ("alert_at",),
}
_TABLE_FIELDS = (
    "upstreams",
    "pricing",
    "rate_limiting",
    "budgeting",
    "sticky",
    "pinning",
    "gateway",
)


def _shape_issues(doc: Mapping[str, Any]) -> list[ConfigIssue]:
    """Lists that are not lists and tables that are not tables, named once at their path."""
    issues = [
        ConfigIssue(key, "expected a table")
        for key in _TABLE_FIELDS
        if key in doc and not isinstance(doc[key], dict)
    ]

    def check(node: Mapping[str, Any], path: str, keys: tuple[str, ...]) -> None:
        for key in keys:
            if key in node and not isinstance(node[key], list):
                issues.append(ConfigIssue(_join(path, key), "expected a list"))

    check(doc, "", _LIST_FIELDS[""])
    for section in ("versions", "routes", "budgets"):
        items = doc.get(section)
        if isinstance(items, list):
            for i, item in enumerate(items):
                if isinstance(item, dict):
                    check(item, f"{section}[{i}]", _LIST_FIELDS[section])
                else:
                    issues.append(ConfigIssue(f"{section}[{i}]", "expected a table"))
    return issues


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith((parent + "[", parent + "."))


def unstructure_config(config: RelayConfig) -> dict[str, Any]:
    out: dict[str, Any] = converter.unstructure(config)
    return out


def _dedupe(issues: list[ConfigIssue]) -> list[ConfigIssue]:
    seen: set[tuple[str, str]] = set()
    out = []
    for i in issues:
        if (i.path, i.message) not in seen:
            seen.add((i.path, i.message))
            out.append(i)
    return out


# --- semantic rules (SPEC §2), run on the raw dict so that they report alongside cattrs -------


def _items(node: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, list):
        for i, item in enumerate(node):
            if isinstance(item, dict):
                yield f"{path}[{i}]", item


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _is_number(v: Any) -> TypeGuard[int | float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _semantic_issues(doc: Mapping[str, Any]) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    upstreams = doc.get("upstreams")
    upstream_names = set(upstreams) if isinstance(upstreams, dict) else set()
    if isinstance(upstreams, dict):
        for name, up in upstreams.items():
            if isinstance(up, dict) and isinstance(up.get("base_url"), str):
                url = up["base_url"]
                if not url.startswith(("http://", "https://")):
                    issues.append(
                        ConfigIssue(f"upstreams.{name}.base_url", "must start with http(s)://")
                    )
                elif "@" in _netloc(url):  # named, never echoed: it holds a password
                    issues.append(
                        ConfigIssue(
                            f"upstreams.{name}.base_url",
                            "must not hold a user name or password: put the key in api_key",
                        )
                    )

    tags: set[str] = set()
    for path, v in _items(doc.get("versions"), "versions"):
        tag = v.get("version_tag")
        if isinstance(tag, str):
            if not TAG_PATTERN.match(tag):
                issues.append(
                    ConfigIssue(
                        f"{path}.version_tag",
                        f"{tag!r} is not a valid version tag: use 1-64 lowercase letters, digits,"
                        " '-' and '.', starting and ending with a letter or digit",
                    )
                )
            if tag in tags:
                issues.append(ConfigIssue(f"{path}.version_tag", f"duplicate version tag {tag!r}"))
            tags.add(tag)
        issues.extend(_limit_issues(v, path))
        up = v.get("upstream_endpoint")
        if isinstance(up, str) and up not in upstream_names:
            known = ", ".join(sorted(map(str, upstream_names))) or "none defined"
            issues.append(
                ConfigIssue(
                    f"{path}.upstream_endpoint",
                    f"unknown upstream {up!r} (known: {known})",
                )
            )

    aliases: set[str] = set()
    claimed_paths: dict[str, str] = {}
    for path, r in _items(doc.get("routes"), "routes"):
        alias = r.get("model_alias")
        if isinstance(alias, str):
            if not alias:
                issues.append(ConfigIssue(f"{path}.model_alias", "must not be empty"))
            if alias in aliases:
                issues.append(ConfigIssue(f"{path}.model_alias", f"duplicate alias {alias!r}"))
            aliases.add(alias)
        issues.extend(_route_rule_issues(r.get("route_rules"), f"{path}.route_rules", tags))
        for i, p in enumerate(_list(r.get("paths"))):
            if isinstance(p, str):
                if not p.startswith("/"):
                    issues.append(ConfigIssue(f"{path}.paths[{i}]", "must start with '/'"))
                elif p in claimed_paths:
                    issues.append(
                        ConfigIssue(
                            f"{path}.paths[{i}]", f"{p!r} already belongs to {claimed_paths[p]!r}"
                        )
                    )
                else:
                    claimed_paths[p] = str(alias)
        issues.extend(_limit_issues(r, path))
        sticky = r.get("sticky_sessions")
        if isinstance(sticky, dict):
            sticky_key = sticky.get("key")
            if isinstance(sticky_key, str) and not _valid_key_spec(sticky_key):
                issues.append(
                    ConfigIssue(
                        f"{path}.sticky_sessions.key",
                        "must be header:NAME, cookie:NAME, api_key, client_ip or callable",
                    )
                )
        hc = r.get("health_check")
        if isinstance(hc, dict):
            rate = hc.get("error_rate_threshold")
            if _is_number(rate) and not 0 <= rate <= 1:
                issues.append(
                    ConfigIssue(f"{path}.health_check.error_rate_threshold", "must be in [0, 1]")
                )
    for path, b in _items(doc.get("budgets"), "budgets"):
        scope = b.get("scope")
        if isinstance(scope, str) and not (
            scope in ("global", "identity") or scope.startswith("route:")
        ):
            issues.append(
                ConfigIssue(f"{path}.scope", "must be 'global', 'identity' or 'route:ALIAS'")
            )
        elif isinstance(scope, str) and scope.startswith("route:") and scope[6:] not in aliases:
            issues.append(ConfigIssue(f"{path}.scope", f"unknown route {scope[6:]!r}"))
    rl = doc.get("rate_limiting")
    if isinstance(rl, dict):
        ident = rl.get("identity")
        if isinstance(ident, str) and not _valid_key_spec(ident):
            issues.append(
                ConfigIssue(
                    "rate_limiting.identity",
                    "must be header:NAME, cookie:NAME, api_key, client_ip or callable",
                )
            )
        uri = rl.get("storage_uri")
        if isinstance(uri, str) and "://" not in uri:
            issues.append(ConfigIssue("rate_limiting.storage_uri", "must be a URI (memory://)"))
    budgeting = doc.get("budgeting")
    uri = budgeting.get("storage_uri") if isinstance(budgeting, dict) else None
    if isinstance(uri, str) and not uri.startswith(_BUDGET_STORES):
        issues.append(ConfigIssue("budgeting.storage_uri", _BUDGET_STORES_HINT))
    return issues


# What BudgetLedger accepts; checked here so that a wrong URI is a ConfigError, not echoed.
_BUDGET_STORES = ("memory://", "redis://", "rediss://", "unix://")
_BUDGET_STORES_HINT = "must start with memory://, redis://, rediss:// or unix://"


def _netloc(url: str) -> str:
    try:
        return urlsplit(url).netloc
    except ValueError:  # an unbalanced IPv6 bracket: no credentials to find
        return ""


def _route_rule_issues(rules: Any, path: str, tags: set[str]) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    if not isinstance(rules, list):
        return issues
    if not rules:
        return [ConfigIssue(path, "a route needs at least one rule")]
    weights: list[float] = []
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict):
            continue
        tag = rule.get("version_tag")
        if isinstance(tag, str):
            if tag not in tags:
                issues.append(
                    ConfigIssue(f"{path}[{i}].version_tag", f"unknown version tag {tag!r}")
                )
            if tag in seen:
                issues.append(ConfigIssue(f"{path}[{i}].version_tag", f"{tag!r} is listed twice"))
            seen.add(tag)
        w = rule.get("weight")
        if _is_number(w) and not math.isfinite(w):
            weights = []  # the structuring hook reports it; a sum with NaN would pass
            break
        if _is_number(w):
            if w < 0:
                issues.append(ConfigIssue(f"{path}[{i}].weight", f"must be >= 0, got {w}"))
            weights.append(float(w))
        else:
            weights = []  # cattrs reports the type; a sum over a partial list would mislead
            break
    if weights and len(weights) == len(rules) and all(w >= 0 for w in weights):
        total = sum(weights)
        if abs(total - 100) > WEIGHT_TOLERANCE:
            if total == 0:
                hint = "at least one weight must be > 0"
            else:
                hint = "normalized: " + ", ".join(_fmt(w) for w in normalize_weights(weights))
            last = f"{path}[{len(rules) - 1}].weight"
            issues.append(ConfigIssue(last, f"weights sum to {_fmt(total)}, not 100 ({hint})"))
    return issues


def _fmt(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _valid_key_spec(spec: str) -> bool:
    kind, _, name = spec.partition(":")
    if kind in ("header", "cookie"):
        return bool(name)
    return spec in ("api_key", "client_ip", "callable")


def _limit_issues(node: dict[str, Any], path: str) -> list[ConfigIssue]:
    return [
        ConfigIssue(
            f"{path}.{key}[{i}]",
            f"{spec!r} is not a rate limit such as '600/minute' or '10 per second'",
        )
        for key in ("rate_limits", "token_limits")
        for i, spec in enumerate(_list(node.get(key)))
        if isinstance(spec, str) and not _valid_limit(spec)
    ]


def _valid_limit(spec: str) -> bool:
    from limits import parse_many

    try:
        return bool(parse_many(spec))
    except ValueError:
        return False
