"""Hostile configuration documents: generated documents, mutations of a valid one (in TOML,
YAML and JSON, whole or corrupted as text) and raw bytes, through ``parse_document`` /
``build_config``, ``Relay.apply_document`` and ``relaymw validate``.

Each is accepted or refused with a ``ConfigError`` whose issues carry real field paths; never
another exception. Secrets (api keys, the cookie secret, the pinning token, storage
passwords, and every value an ``${ENV}`` reference brought in) never appear in a message.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import yaml
from hypothesis import given
from hypothesis import strategies as st

from relaymw import cli
from relaymw.config import RelayConfig, build_config, parse_document
from relaymw.engine import Relay
from relaymw.errors import ConfigError
from relaymw.snapshot import Snapshot
from relaymw.stores.base import RawDocument
from tests.hostile_support import Tally, examples
from tests.hostile_support import assert_no_secrets as _assert_no_secrets
from tests.support import relay_document

TALLY = Tally()

# Values only ever reached through ${ENV}: the brief of `interpolate` is that they are secret.
ENV = {
    "HOSTILE_OPENAI_KEY": "sk-env-openai-5b1e9c",
    "HOSTILE_COOKIE_SECRET": "env-cookie-secret-c4d2",
    "HOSTILE_REDIS_PASSWORD": "env-redis-pw-3e8a",
}
LITERAL_KEY = "sk-literal-anthropic-0a9f"
LITERAL_PIN = "literal-pin-token-77b1"
LITERAL_PASSWORD = "literal-redis-pw-51c0"
SECRETS = (*ENV.values(), LITERAL_KEY, LITERAL_PIN, LITERAL_PASSWORD)
ENV_REFS = [f"${{{name}}}" for name in ENV]


def assert_no_secrets(text: str, where: str, secrets: tuple[str, ...] = SECRETS) -> None:
    _assert_no_secrets(text, where, secrets)


def valid_document() -> dict[str, Any]:
    doc = relay_document("http://127.0.0.1:9")
    doc["upstreams"]["openai"]["api_key"] = "${HOSTILE_OPENAI_KEY}"
    doc["upstreams"]["anthropic"]["api_key"] = LITERAL_KEY
    doc["sticky"] = {"secret": "${HOSTILE_COOKIE_SECRET}"}
    doc["pinning"] = {"token": LITERAL_PIN}
    doc["rate_limiting"] = {"storage_uri": "redis://:${HOSTILE_REDIS_PASSWORD}@127.0.0.1:6379/0"}
    doc["budgeting"] = {"storage_uri": f"redis://:{LITERAL_PASSWORD}@127.0.0.1:6379/0"}
    doc["budgets"] = [{"scope": "route:chat-production", "limit_usd": 10, "alert_at": [0.5]}]
    doc["pricing"] = {"gpt-4.1-mini": {"input_per_mtok": 0.4, "output_per_mtok": 1.6}}
    doc["routes"][0]["rate_limits"] = ["600/minute"]
    doc["routes"][0]["health_check"] = {"enabled": False, "error_rate_threshold": 0.05}
    doc["versions"][0]["cost_limit_per_request"] = 0.05
    return doc


@pytest.fixture(scope="module", autouse=True)
def secret_environment() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in ENV.items():
            mp.setenv(name, value)
        yield


def test_the_valid_document_is_valid() -> None:
    config = build_config(valid_document())
    assert config.upstreams["openai"].api_key == ENV["HOSTILE_OPENAI_KEY"]
    assert config.sticky.secret == ENV["HOSTILE_COOKIE_SECRET"]


# --- checking an outcome -------------------------------------------------------------------------

_TOKEN = re.compile(r"\[(\d+)\]|\.?([^.\[\]]+)")


def _walk(node: Any, rest: str) -> bool:
    """Whether the path ``rest`` (``routes[0].route_rules[1].weight``) names a place in the
    document ``node``: every step but the last must exist (the last may be a missing required
    field). Dict keys may hold dots (``pricing.gpt-4.1.input_per_mtok``) or be written escaped
    (a key with a control character or a quote); an empty key leaves no trace in a path."""
    if not rest:
        return True
    if isinstance(node, dict) and "" in node and _walk(node[""], rest.removeprefix(".")):
        return True
    if rest.startswith("["):
        m = re.match(r"\[(\d+)\]", rest)
        if m is None or not isinstance(node, list):
            return _key_step(node, rest)
        index, after = int(m.group(1)), rest[m.end() :]
        return not after if index >= len(node) else _walk(node[index], after)
    # "." joins keys, and a key may itself start with one.
    return _key_step(node, rest) or (rest.startswith(".") and _key_step(node, rest[1:]))


def _key_step(node: Any, rest: str) -> bool:
    if not isinstance(node, dict):
        return False
    for k, value in node.items():
        for spelling in (str(k), repr(str(k))[1:-1], f"[{str(k)!r}]"):
            if spelling and rest.startswith(spelling):
                after = rest[len(spelling) :]
                if (not after or after[0] in ".[") and _walk(value, after):
                    return True
    head = re.match(r"[^.\[]*", rest)
    return head is not None and head.end() == len(rest)  # a missing last field


def check_outcome(
    doc: Any, environ: dict[str, str] | None = None, secrets: tuple[str, ...] = SECRETS
) -> RelayConfig | None:
    """build_config accepts (and the result compiles) or raises ConfigError with real paths
    and without secrets; any other exception fails the test."""
    try:
        config = build_config(doc, environ=ENV if environ is None else environ)
    except ConfigError as exc:
        assert exc.issues, "a ConfigError without issues"
        for issue in exc.issues:
            assert issue.message, issue
            assert _walk(doc, issue.path), f"issue path {issue.path!r} is not in the document"
        assert_no_secrets(str(exc), "a ConfigError", secrets)
        return None
    Snapshot.compile(config, dict(doc))
    return config


# --- generated documents -----------------------------------------------------------------------

_FIELD_NAMES = [
    "versions", "upstreams", "routes", "pricing", "rate_limiting", "budgets", "budgeting",
    "metrics", "sticky", "pinning", "gateway", "version_tag", "model", "upstream_endpoint",
    "parameters", "system_prompt", "cost_limit_per_request", "base_url", "protocol", "api_key",
    "timeout_seconds", "model_alias", "route_rules", "weight", "sticky_sessions", "paths",
    "rate_limits", "token_limits", "scope", "limit_usd", "period", "alert_at", "storage_uri",
    "identity", "secret", "token", "max_body_bytes", "path_prefix", "health_check", "enabled",
]  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63, max_value=10**30),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["${UNSET_HOSTILE_VAR}", "${X:-}", "${", "$${HOSTILE_OPENAI_KEY}", *ENV_REFS]),
    st.sampled_from(["openai", "anthropic", "http://x", "v1", "100/minute", "global", "-1"]),
)
keys = st.sampled_from(_FIELD_NAMES) | st.text(max_size=12)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=25,
)


@examples(800)
@given(doc=st.dictionaries(keys, values, max_size=8))
def test_generated_documents(doc: dict[str, Any]) -> None:
    TALLY.count("generated_documents")
    check_outcome(doc)


# --- mutations of the valid document -----------------------------------------------------------


def _places(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _places(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _places(v, (*path, i))


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        doc = doc[step]
    return doc


def _is_literal_secret(value: Any) -> bool:
    return isinstance(value, str) and any(s in value for s in SECRETS)


@st.composite
def mutated_documents(draw: st.DrawFn) -> dict[str, Any]:
    """The valid document after one to four edits at generated places: delete, replace with
    a value of any type, rename a key, duplicate, wrap or unwrap a list, stringify, or move an
    ``${ENV}`` reference somewhere else (a secret's reference on the wrong line)."""
    doc = valid_document()
    for _ in range(draw(st.integers(1, 4))):
        places = [p for p in _places(doc) if p]
        if not places:
            break
        path = draw(st.sampled_from(places))
        parent, step = _get(doc, path[:-1]), path[-1]
        value = parent[step]
        op = draw(st.integers(0, 7))
        if op == 0:
            del parent[step]
        elif op == 1:
            parent[step] = draw(values)
        elif op == 2 and isinstance(parent, dict):
            new_key = draw(keys)
            parent[new_key] = parent.pop(step)
        elif op == 3 and isinstance(parent, list):
            parent.append(copy.deepcopy(value))
        elif op == 4:
            parent[step] = [value]
        elif op == 5 and isinstance(value, list) and value:
            parent[step] = value[0]
        elif op == 6 and not _is_literal_secret(value):
            parent[step] = json.dumps(value) if not isinstance(value, str) else value + "x"
        elif op == 7:
            parent[step] = draw(st.sampled_from(ENV_REFS)) + draw(st.sampled_from(["", "x"]))
    return doc


@examples(1200)
@given(doc=mutated_documents())
def test_mutated_documents(doc: dict[str, Any]) -> None:
    TALLY.count("mutated_documents")
    check_outcome(doc)


# --- as text: TOML, YAML, JSON, whole or corrupted -----------------------------------------------


def _toml_ready(node: Any) -> Any:
    """TOML has no null: drop them (tomli_w refuses None)."""
    if isinstance(node, dict):
        return {str(k): _toml_ready(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [_toml_ready(v) for v in node if v is not None]
    return node


def serialize(doc: dict[str, Any], fmt: str) -> bytes | None:
    try:
        if fmt == "toml":
            text = tomli_w.dumps(_toml_ready(doc))
        elif fmt == "yaml":
            text = yaml.safe_dump(doc, allow_unicode=True)
        else:
            text = json.dumps(doc, ensure_ascii=False)
    except (TypeError, ValueError, OverflowError, yaml.YAMLError):
        return None  # not representable in this format (NaN keys, huge ints in TOML, ...)
    return text.encode("utf-8", "surrogatepass")


_SPECIALS = [*"*&!%@|>{}[]:#,'\"\n\t\\=`$-? ", "\r\n", "\x00", "\ufeff", "---\n", '"""']


@st.composite
def corrupted(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` after up to three edits, often right at a secret (where an excerpt of the
    document in an error message would show it)."""
    text = data.decode("utf-8", "surrogatepass")
    spots = [m.start() for s in SECRETS for m in re.finditer(re.escape(s), text)]
    for _ in range(draw(st.integers(0, 3))):
        near = draw(st.booleans())
        where = st.sampled_from(spots) if spots and near else st.integers(0, len(text))
        i = draw(where)
        op = draw(st.integers(0, 3))
        if op == 0:
            text = text[:i] + draw(st.sampled_from(_SPECIALS)) + text[i:]
        elif op == 1:
            text = text[:i] + text[i + draw(st.integers(1, 12)) :]
        elif op == 2:
            text = text[:i]
        else:
            line_end = text.find("\n", i)
            text = text[: line_end + 1] + text[i : line_end + 1] + text[line_end + 1 :]
    return text.encode("utf-8", "surrogatepass")


@examples(1200)
@given(doc=mutated_documents(), fmt=st.sampled_from(["toml", "yaml", "json"]), data=st.data())
def test_documents_as_text(doc: dict[str, Any], fmt: str, data: st.DataObject) -> None:
    TALLY.count("documents_as_text")
    raw = serialize(doc, fmt) or serialize(valid_document(), fmt)
    assert raw is not None
    raw = data.draw(corrupted(raw))
    try:
        parsed = parse_document(raw, fmt)
    except ConfigError as exc:
        assert exc.issues and all(i.message for i in exc.issues)
        assert_no_secrets(str(exc), f"a {fmt} syntax error")
        return
    check_outcome(parsed)


@examples(800)
@given(raw=st.binary(max_size=400), fmt=st.sampled_from(["toml", "yaml", "json", "xml"]))
def test_raw_bytes(raw: bytes, fmt: str) -> None:
    TALLY.count("raw_bytes")
    try:
        parsed = parse_document(raw, fmt)
    except ConfigError as exc:
        assert exc.issues
        return
    check_outcome(parsed)


@examples(100)
@given(
    depth=st.integers(1, 1500),
    field=st.sampled_from(["versions", "parameters", "routes", "x"]),
    fmt=st.sampled_from(["json", "yaml", "toml"]),
)
def test_deeply_nested_documents(depth: int, field: str, fmt: str) -> None:
    """Nesting is bounded by each parser (an error, never a crash) and then by relaymw."""
    TALLY.count("deeply_nested_documents")
    doc = valid_document()
    nested = "[" * depth + "]" * depth
    raw = json.dumps(doc)[:-1] + f', "{field}x": {nested}}}'
    if field == "parameters":
        raw = json.dumps(doc).replace('"parameters": {', f'"parameters": {{"deep": {nested}, ', 1)
    if fmt == "toml":
        raw = tomli_w.dumps(_toml_ready(doc)) + f"\n[extra]\ndeep = {nested}\n"
    try:
        parsed = parse_document(raw.encode(), fmt)
    except ConfigError:
        return
    check_outcome(parsed)


# --- through the relay and the command line ---------------------------------------------------


@pytest.fixture(scope="module")
def relay() -> Iterator[Relay]:
    r = Relay(valid_document_resolved())
    yield r
    r.close()


def valid_document_resolved() -> dict[str, Any]:
    doc = valid_document()
    doc["rate_limiting"] = {"storage_uri": "memory://"}
    doc["budgeting"] = {"storage_uri": "memory://"}
    return doc


@examples(300)
@given(doc=mutated_documents(), fmt=st.sampled_from(["toml", "yaml", "json"]), data=st.data())
def test_relay_keeps_its_configuration(
    relay: Relay, doc: dict[str, Any], fmt: str, data: st.DataObject
) -> None:
    """A store handing the relay any of these: applied or refused (False), never raised; a
    refused one leaves the configuration in force."""
    TALLY.count("relay_apply_document")
    raw = serialize(doc, fmt) or b"{}"
    raw = data.draw(corrupted(raw))
    before = relay.snapshot
    applied = relay.apply_document(RawDocument(raw, fmt, f"rev-{len(raw)}", "hostile"))
    assert isinstance(applied, bool)
    if not applied:
        assert relay.snapshot is before
    else:
        relay.apply_document(
            RawDocument(json.dumps(valid_document_resolved()).encode(), "json", "good", "good")
        )


@examples(250)
@given(doc=mutated_documents(), fmt=st.sampled_from(["toml", "yaml", "json"]), data=st.data())
def test_cli_validate(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    doc: dict[str, Any],
    fmt: str,
    data: st.DataObject,
) -> None:
    """``relaymw validate``: exit 0 or 2, never a traceback, never a secret in its output."""
    TALLY.count("cli_validate")
    raw = serialize(doc, fmt) or b""
    if data.draw(st.booleans()):
        raw = data.draw(corrupted(raw))
    path = tmp_path / f"relay.{fmt}"
    path.write_bytes(raw)
    capsys.readouterr()
    code = cli.main(["validate", str(path)])
    out = capsys.readouterr()
    assert code in (0, 2), (code, out.err[-2000:])
    text = out.out + out.err
    assert "Traceback" not in text, text[-2000:]
    assert_no_secrets(text, "relaymw validate's output")
    if code == 2:
        assert "invalid configuration" in out.err or "syntax error" in out.err, out.err


# --- the generated failures, pinned down as plain cases ----------------------------------------

_KEY_REF = "${HOSTILE_OPENAI_KEY}"


@pytest.mark.parametrize(
    "path",
    [
        ("versions", 0, "version_tag"),
        ("versions", 0, "upstream_endpoint"),
        ("versions", 0, "cost_limit_per_request"),
        ("routes", 0, "route_rules", 0, "version_tag"),
        ("budgets", 0, "scope"),
        ("pricing", "gpt-4.1-mini", "input_per_mtok"),
    ],
)
def test_a_secret_reference_on_the_wrong_line_is_not_echoed(path: tuple[Any, ...]) -> None:
    """``${OPENAI_API_KEY}`` pasted into the wrong field: the error names the field, and must
    not print the key it resolved to (the message goes to logs, signals and the audit file)."""
    doc = valid_document()
    _get(doc, path[:-1])[path[-1]] = _KEY_REF
    assert check_outcome(doc) is None


@pytest.mark.parametrize(
    "text",
    [
        f"upstreams:\n  openai:\n    base_url: http://x\n    api_key: *{LITERAL_KEY}\n",
        f"upstreams:\n  openai:\n    base_url: http://x\n    api_key: !{LITERAL_KEY} x\n",
        f"pinning: {{token: &{LITERAL_PIN} [*{LITERAL_PIN}x]}}\n",
    ],
)
def test_a_yaml_syntax_error_does_not_quote_the_document(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_document(text.encode(), "yaml")
    assert_no_secrets(str(caught.value), "a YAML syntax error")


@pytest.mark.parametrize(
    "text",
    [
        "~: 1\n",
        "1: x\n",
        "upstreams:\n  ~: {base_url: 'http://x'}\nversions: [{version_tag: a, model: m, "
        "upstream_endpoint: b}]\n",
        "gateway: {true: 1}\n",
    ],
)
def test_yaml_keys_that_are_not_strings(text: str) -> None:
    """YAML keys may be null, numbers or booleans; the schema's are strings."""
    doc = parse_document(text.encode(), "yaml") if _parses(text) else None
    if doc is not None:
        check_outcome(doc)


def _parses(text: str) -> bool:
    try:
        parse_document(text.encode(), "yaml")
    except ConfigError:
        return False
    return True


def test_validate_a_deeply_nested_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "deep.json"
    path.write_text('{"versions": [], "x": ' + "[" * 700 + "]" * 700 + "}")
    code = cli.main(["validate", str(path)])
    out = capsys.readouterr()
    assert code == 2, out.err[-500:]
    assert "Traceback" not in out.err


def test_nan_and_infinity_are_refused_with_paths() -> None:
    doc = valid_document()
    doc["routes"][0]["route_rules"][0]["weight"] = math.nan
    doc["upstreams"]["openai"]["timeout_seconds"] = math.inf
    with pytest.raises(ConfigError) as caught:
        build_config(doc, environ=ENV)
    paths = {i.path for i in caught.value.issues}
    assert "routes[0].route_rules[0].weight" in paths
    assert "upstreams.openai.timeout_seconds" in paths


def test_generated_case_total() -> None:
    """Runs last: every generated test ran its cases."""
    expected = {
        name
        for name, obj in globals().items()
        if name.startswith("test_") and hasattr(obj, "hypothesis")
    }
    print(f"\nhostile config cases run: {TALLY.total} {TALLY.counts}")
    assert len(TALLY.counts) == len(expected), "run the whole module to check the total"
    assert TALLY.total >= 4000, TALLY.counts
