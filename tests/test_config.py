"""Configuration documents (SPEC §2): parsing, interpolation, validation with field paths."""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
import tomli_w
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from relaymw.config import (
    RelayConfig,
    build_config,
    interpolate,
    load_document,
    normalize_weights,
    parse_document,
)
from relaymw.errors import ConfigError, ConfigIssue

# The SPEC §2 example, adapted so that every reference resolves: the route's canary
# `claude-sonnet-4.5-v2` gets a version of its own.
SPEC_TOML = """
[[versions]]
version_tag = "claude-sonnet-4.5-v1"
model = "anthropic/claude-sonnet-4-20250514"
upstream_endpoint = "anthropic"
parameters = { temperature = 0.7, max_tokens = 4096, top_p = 0.9 }
system_prompt = "You are a helpful AI assistant specialized in code review."
cost_limit_per_request = 0.05
metadata = { release_candidate = false }

[[versions]]
version_tag = "claude-sonnet-4.5-v2"
model = "anthropic/claude-sonnet-4-20250514"
upstream_endpoint = "anthropic"
parameters = { temperature = 0.3, max_tokens = 4096 }
metadata = { release_candidate = true }

[upstreams.anthropic]
base_url = "https://api.anthropic.com"
api_key = "${ANTHROPIC_API_KEY}"
protocol = "anthropic"
timeout_seconds = 60

[upstreams.openai]
base_url = "https://api.openai.com/v1"
api_key = "${OPENAI_API_KEY}"
protocol = "openai"

[[routes]]
model_alias = "code-review-production"
route_rules = [
  { version_tag = "claude-sonnet-4.5-v1", weight = 95 },
  { version_tag = "claude-sonnet-4.5-v2", weight = 5 },
]
sticky_sessions = { enabled = true, cookie_name = "hs_model_version", ttl_seconds = 3600 }
health_check.enabled = true
health_check.error_rate_threshold = 0.05
health_check.latency_p99_threshold_ms = 3000
health_check.auto_rollback = true
paths = ["/api/review"]
rate_limits = ["600/minute"]
token_limits = ["200000/minute"]
cost_policy = "clamp"

[pricing."claude-sonnet-4-20250514"]
input_per_mtok = 3.00
output_per_mtok = 15.00

[rate_limiting]
storage_uri = "memory://"
strategy = "moving-window"
identity = "header:authorization"
fail_open = true

[[budgets]]
scope = "route:code-review-production"
period = "month"
limit_usd = 1000
alert_at = [0.5, 0.8, 1.0]

[sticky]
secret = "${RELAYMW_COOKIE_SECRET:-}"
"""

ENV = {"ANTHROPIC_API_KEY": "sk-ant-test", "OPENAI_API_KEY": "sk-openai-test"}

# A small valid document as a dict, the base every fault below is injected into.
BASE: dict[str, Any] = {
    "upstreams": {
        "anthropic": {"base_url": "https://api.anthropic.com", "protocol": "anthropic"},
    },
    "versions": [
        {"version_tag": "v1", "model": "m", "upstream_endpoint": "anthropic"},
        {"version_tag": "v2", "model": "m", "upstream_endpoint": "anthropic"},
    ],
    "routes": [
        {
            "model_alias": "review",
            "route_rules": [
                {"version_tag": "v1", "weight": 95},
                {"version_tag": "v2", "weight": 5},
            ],
        }
    ],
}


def issues_of(doc: dict[str, Any], environ: dict[str, str] | None = None) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        build_config(doc, environ={} if environ is None else environ)
    assert info.value.issues, "a ConfigError must carry at least one issue"
    return info.value.issues


def mutated(mutate: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    mutate(doc)
    return doc


def only_issue(doc: dict[str, Any]) -> ConfigIssue:
    issues = issues_of(doc)
    assert len(issues) == 1, [str(i) for i in issues]
    return issues[0]


# --- valid documents ---------------------------------------------------------------------------


def spec_dict() -> dict[str, Any]:
    return parse_document(SPEC_TOML, "toml")


def check_spec_config(config: RelayConfig) -> None:
    assert [v.version_tag for v in config.versions] == [
        "claude-sonnet-4.5-v1",
        "claude-sonnet-4.5-v2",
    ]
    v1 = config.versions[0]
    assert v1.parameters == {"temperature": 0.7, "max_tokens": 4096, "top_p": 0.9}
    assert v1.metadata == {"release_candidate": False}
    assert v1.upstream_model(config.upstreams["anthropic"]) == "claude-sonnet-4-20250514"
    # Money is Decimal, converted from the document's text so 0.05 stays exactly 0.05.
    assert isinstance(v1.cost_limit_per_request, Decimal)
    assert v1.cost_limit_per_request == Decimal("0.05")
    assert config.versions[1].cost_limit_per_request is None
    price = config.pricing["claude-sonnet-4-20250514"]
    assert isinstance(price.input_per_mtok, Decimal)
    assert (price.input_per_mtok, price.output_per_mtok) == (Decimal("3"), Decimal("15"))
    assert isinstance(config.budgets[0].limit_usd, Decimal)
    assert config.budgets[0].limit_usd == Decimal(1000)
    assert config.budgets[0].alert_at == (0.5, 0.8, 1.0)

    assert config.upstreams["anthropic"].api_key == "sk-ant-test"
    assert config.upstreams["anthropic"].protocol == "anthropic"
    assert config.upstreams["openai"].api_key == "sk-openai-test"
    route = config.routes[0]
    assert route.model_alias == "code-review-production"
    assert [(r.version_tag, r.weight) for r in route.route_rules] == [
        ("claude-sonnet-4.5-v1", 95.0),
        ("claude-sonnet-4.5-v2", 5.0),
    ]
    assert route.paths == ("/api/review",)
    assert route.rate_limits == ("600/minute",)
    assert route.health_check.enabled
    assert route.health_check.latency_p99_threshold_ms == 3000
    assert route.health_check.auto_rollback
    # `${RELAYMW_COOKIE_SECRET:-}` with the variable unset: the empty default.
    assert config.sticky.secret == ""


def test_spec_example_toml() -> None:
    check_spec_config(build_config(spec_dict(), environ=ENV))


def test_spec_example_yaml() -> None:
    text = yaml.safe_dump(spec_dict())
    check_spec_config(build_config(parse_document(text, "yaml"), environ=ENV))


def test_spec_example_json() -> None:
    text = json.dumps(spec_dict())
    check_spec_config(build_config(parse_document(text.encode(), "json"), environ=ENV))


@pytest.mark.parametrize("suffix", ["toml", "yaml", "yml", "json"])
def test_load_document_picks_format_by_suffix(tmp_path: Any, suffix: str) -> None:
    doc = spec_dict()
    text = {
        "toml": tomli_w.dumps(doc),
        "yaml": yaml.safe_dump(doc),
        "yml": yaml.safe_dump(doc),
        "json": json.dumps(doc),
    }[suffix]
    path = tmp_path / f"relay.{suffix}"
    path.write_text(text)
    check_spec_config(build_config(load_document(path), environ=ENV))


def test_defaults() -> None:
    config = build_config(BASE, environ={})
    up = config.upstreams["anthropic"]
    assert (up.api_key, up.timeout_seconds, up.connect_timeout_seconds) == ("", 60.0, 10.0)
    assert config.upstreams["anthropic"].protocol == "anthropic"
    openai_default = build_config(
        mutated(lambda d: d["upstreams"]["anthropic"].pop("protocol")), environ={}
    )
    assert openai_default.upstreams["anthropic"].protocol == "openai"
    v = config.versions[0]
    assert (v.parameters, v.system_prompt, v.cost_limit_per_request, v.metadata) == (
        {},
        None,
        None,
        {},
    )
    route = config.routes[0]
    sticky = route.sticky_sessions
    assert (sticky.enabled, sticky.cookie_name, sticky.ttl_seconds, sticky.key) == (
        True,
        "hs_model_version",
        3600,
        None,
    )
    assert not route.health_check.enabled
    assert route.cost_policy == "clamp"
    assert not route.allow_client_pin
    assert (route.paths, route.rate_limits, route.token_limits) == ((), (), ())
    rl = config.rate_limiting
    assert (rl.storage_uri, rl.strategy, rl.identity, rl.fail_open) == (
        "memory://",
        "moving-window",
        "header:authorization",
        True,
    )
    assert config.sticky.secret == ""
    assert config.pinning.token == ""
    assert config.budgets == ()
    assert config.pricing == {}


@pytest.mark.parametrize("fmt", ["toml", "yaml", "json"])
def test_an_empty_document_is_rejected(fmt: str) -> None:
    """A file truncated mid-rewrite must not replace a config (it would drop every route)."""
    with pytest.raises(ConfigError) as info:
        parse_document(" \n", fmt)
    assert [str(i) for i in info.value.issues] == ["the document is empty"]


def test_a_document_without_routes_is_valid() -> None:
    config = build_config(parse_document("[gateway]\nenabled = true\n", "toml"), environ={})
    assert config.versions == () and config.routes == () and config.upstreams == {}


@pytest.mark.parametrize("weights", [[33.333, 66.667], [95.005, 5], [50, 50, 0]])
def test_weights_within_tolerance_are_accepted(weights: list[float]) -> None:
    doc = copy.deepcopy(BASE)
    doc["versions"].append({"version_tag": "v3", "model": "m", "upstream_endpoint": "anthropic"})
    doc["routes"][0]["route_rules"] = [
        {"version_tag": f"v{i + 1}", "weight": w} for i, w in enumerate(weights)
    ]
    config = build_config(doc, environ={})
    assert [r.weight for r in config.routes[0].route_rules] == [float(w) for w in weights]


def test_money_accepts_strings_exactly() -> None:
    doc = mutated(lambda d: d["versions"][0].update(cost_limit_per_request="0.1"))
    assert build_config(doc, environ={}).versions[0].cost_limit_per_request == Decimal("0.1")


def test_secrets_are_kept_out_of_repr() -> None:
    doc = mutated(lambda d: d["upstreams"]["anthropic"].update(api_key="sk-very-secret"))
    doc["sticky"] = {"secret": "cookie-secret"}
    doc["pinning"] = {"token": "pin-secret"}
    text = repr(build_config(doc, environ={}))
    for secret in ("sk-very-secret", "cookie-secret", "pin-secret"):
        assert secret not in text


# --- invalid documents: each with its message and its path ---------------------------------


@pytest.mark.parametrize(
    "tag",
    [
        "has space",
        "Capital",
        "under_score",
        "bang!",
        "paren(s)",
        "a" * 65,
        "-leading-dash",
        "trailing-dash-",
        ".leading-dot",
        "",
    ],
)
def test_bad_version_tag(tag: str) -> None:
    # The bad tag sits on an unreferenced third version so that it is the only issue.
    doc = copy.deepcopy(BASE)
    doc["versions"].append({"version_tag": tag, "model": "m", "upstream_endpoint": "anthropic"})
    issue = only_issue(doc)
    assert issue.path == "versions[2].version_tag"
    assert f"{tag!r} is not a valid version tag" in issue.message


@pytest.mark.parametrize("tag", ["a", "a" * 64, "claude-sonnet-4.5-v1", "0", "gpt-4.1.mini-2"])
def test_good_version_tags(tag: str) -> None:
    doc = copy.deepcopy(BASE)
    doc["versions"].append({"version_tag": tag, "model": "m", "upstream_endpoint": "anthropic"})
    assert build_config(doc, environ={}).versions[2].version_tag == tag


def test_weights_not_summing_to_100_show_normalized_weights_on_last_rule() -> None:
    doc = mutated(
        lambda d: d["routes"][0].update(
            route_rules=[{"version_tag": "v1", "weight": 60}, {"version_tag": "v2", "weight": 45}]
        )
    )
    issue = only_issue(doc)
    assert issue.path == "routes[0].route_rules[1].weight"
    assert "105" in issue.message
    assert "57.14, 42.86" in issue.message


def test_weights_all_zero() -> None:
    doc = mutated(
        lambda d: d["routes"][0].update(
            route_rules=[{"version_tag": "v1", "weight": 0}, {"version_tag": "v2", "weight": 0}]
        )
    )
    issue = only_issue(doc)
    assert issue.path == "routes[0].route_rules[1].weight"
    assert "at least one weight must be > 0" in issue.message


def test_weight_just_outside_tolerance() -> None:
    doc = mutated(lambda d: d["routes"][0]["route_rules"][0].update(weight=95.02))
    issue = only_issue(doc)
    assert issue.path == "routes[0].route_rules[1].weight"
    assert "100.02" in issue.message


def test_negative_weight() -> None:
    doc = mutated(
        lambda d: d["routes"][0].update(
            route_rules=[{"version_tag": "v1", "weight": 105}, {"version_tag": "v2", "weight": -5}]
        )
    )
    # Only the negative weight is reported: a sum over it would be a second, misleading issue.
    issue = only_issue(doc)
    assert issue.path == "routes[0].route_rules[1].weight"
    assert issue.message == "must be >= 0, got -5"


@pytest.mark.parametrize("weight", ["5", True, None, [5], {"w": 5}])
def test_weight_of_wrong_type(weight: object) -> None:
    doc = mutated(lambda d: d["routes"][0]["route_rules"][1].update(weight=weight))
    issue = only_issue(doc)
    assert issue.path == "routes[0].route_rules[1].weight"
    assert issue.message == "expected a number"


NAN_RULES = """
[[routes]]
model_alias = "review"
route_rules = [{ version_tag = "v1", weight = 100 }, { version_tag = "v2", weight = nan }]
"""


def test_nan_weight_is_rejected() -> None:
    doc = copy.deepcopy(BASE)
    doc["routes"] = parse_document(NAN_RULES, "toml")["routes"]
    issue = only_issue(doc)
    assert issue.path == "routes[0].route_rules[1].weight"


def test_infinite_weight_is_rejected() -> None:
    doc = mutated(lambda d: d["routes"][0]["route_rules"][1].update(weight=math.inf))
    issue = only_issue(doc)
    assert issue.path == "routes[0].route_rules[1].weight"


def test_infinite_weight_message_is_not_nan() -> None:
    doc = mutated(lambda d: d["routes"][0]["route_rules"][1].update(weight=math.inf))
    assert "nan" not in only_issue(doc).message


def test_unknown_version_tag_in_rule() -> None:
    doc = mutated(lambda d: d["routes"][0]["route_rules"][1].update(version_tag="v9"))
    issue = only_issue(doc)
    assert issue.path == "routes[0].route_rules[1].version_tag"
    assert issue.message == "unknown version tag 'v9'"


def test_tag_listed_twice_in_route() -> None:
    doc = mutated(lambda d: d["routes"][0]["route_rules"][1].update(version_tag="v1"))
    issue = only_issue(doc)
    assert issue.path == "routes[0].route_rules[1].version_tag"
    assert issue.message == "'v1' is listed twice"


def test_route_without_rules() -> None:
    issue = only_issue(mutated(lambda d: d["routes"][0].update(route_rules=[])))
    assert issue.path == "routes[0].route_rules"
    assert issue.message == "a route needs at least one rule"


def test_duplicate_version_tag() -> None:
    doc = copy.deepcopy(BASE)
    doc["versions"].append({"version_tag": "v1", "model": "m2", "upstream_endpoint": "anthropic"})
    issue = only_issue(doc)
    assert issue.path == "versions[2].version_tag"
    assert issue.message == "duplicate version tag 'v1'"


def test_unknown_upstream() -> None:
    issue = only_issue(mutated(lambda d: d["versions"][1].update(upstream_endpoint="openai")))
    assert issue.path == "versions[1].upstream_endpoint"
    assert issue.message == "unknown upstream 'openai' (known: anthropic)"


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda d: d.update(bogus=1), ""),
        (lambda d: d["upstreams"]["anthropic"].update(bogus=1), "upstreams.anthropic"),
        (lambda d: d["routes"][0]["route_rules"][0].update(bogus=1), "routes[0].route_rules[0]"),
        (lambda d: d["versions"][1].update(bogus=1), "versions[1]"),
        (lambda d: d["routes"][0].update(bogus=1), "routes[0]"),
        (
            lambda d: d["routes"][0].update(sticky_sessions={"bogus": 1}),
            "routes[0].sticky_sessions",
        ),
        (lambda d: d.update(sticky={"bogus": 1}), "sticky"),
        (lambda d: d.update(pinning={"bogus": 1}), "pinning"),
        (lambda d: d.update(rate_limiting={"bogus": 1}), "rate_limiting"),
    ],
    ids=["top", "upstream", "rule", "version", "route", "sticky_sessions", "sticky", "pin", "rl"],
)
def test_unknown_keys_anywhere(mutate: Callable[[dict[str, Any]], object], path: str) -> None:
    issue = only_issue(mutated(mutate))
    assert issue.path == path
    assert issue.message == "extra fields found (bogus)"


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda d: d["versions"][0].pop("model"), "versions[0].model"),
        (lambda d: d["upstreams"]["anthropic"].pop("base_url"), "upstreams.anthropic.base_url"),
        (lambda d: d["routes"][0].pop("model_alias"), "routes[0].model_alias"),
        (
            lambda d: d["routes"][0]["route_rules"][1].pop("weight"),
            "routes[0].route_rules[1].weight",
        ),
        (
            lambda d: d.update(pricing={"m": {"input_per_mtok": 1}}),
            "pricing.m.output_per_mtok",
        ),
        (lambda d: d.update(budgets=[{"scope": "global"}]), "budgets[0].limit_usd"),
    ],
)
def test_missing_required_field(mutate: Callable[[dict[str, Any]], object], path: str) -> None:
    issue = only_issue(mutated(mutate))
    assert issue.path == path
    assert issue.message == "required field missing"


LITERALS = [
    pytest.param(
        lambda d: d["upstreams"]["anthropic"].update(protocol="grpc"),
        "upstreams.anthropic.protocol", "grpc", "openai", id="protocol",
    ),
    pytest.param(
        lambda d: d["routes"][0].update(cost_policy="maybe"),
        "routes[0].cost_policy", "maybe", "clamp", id="cost_policy",
    ),
    pytest.param(
        lambda d: d.update(rate_limiting={"strategy": "leaky"}),
        "rate_limiting.strategy", "leaky", "moving-window", id="strategy",
    ),
    pytest.param(
        lambda d: d.update(budgets=[{"scope": "global", "limit_usd": 1, "period": "week"}]),
        "budgets[0].period", "week", "month", id="period",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "path", "bad", "allowed"), LITERALS)
def test_wrong_literal(
    mutate: Callable[[dict[str, Any]], object], path: str, bad: str, allowed: str
) -> None:
    issue = only_issue(mutated(mutate))
    assert issue.path == path
    # The message must name both the offending value and what is allowed.
    assert bad in issue.message
    assert allowed in issue.message


@pytest.mark.parametrize(("mutate", "path", "bad", "allowed"), LITERALS)
def test_wrong_literal_reads_must_be_one_of(
    mutate: Callable[[dict[str, Any]], object], path: str, bad: str, allowed: str
) -> None:
    issue = only_issue(mutated(mutate))
    assert issue.message.startswith("must be one of ")
    assert "typing" not in issue.message and "unknown error" not in issue.message


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (
            lambda d: d["upstreams"]["anthropic"].update(timeout_seconds="60"),
            "upstreams.anthropic.timeout_seconds",
        ),
        (
            lambda d: d["routes"][0].update(sticky_sessions={"ttl_seconds": "1h"}),
            "routes[0].sticky_sessions.ttl_seconds",
        ),
        (
            lambda d: d["routes"][0].update(sticky_sessions={"enabled": "yes"}),
            "routes[0].sticky_sessions.enabled",
        ),
        (lambda d: d["versions"][0].update(model=3), "versions[0].model"),
    ],
)
def test_wrong_scalar_type(mutate: Callable[[dict[str, Any]], object], path: str) -> None:
    issue = only_issue(mutated(mutate))
    assert issue.path == path
    assert issue.message.startswith("expected ")


@pytest.mark.parametrize(
    ("value", "path"),
    [
        (-5, "budgets[0].limit_usd"),
        ("abc", "budgets[0].limit_usd"),
    ],
)
def test_bad_money(value: object, path: str) -> None:
    issue = only_issue(
        mutated(lambda d: d.update(budgets=[{"scope": "global", "limit_usd": value}]))
    )
    assert issue.path == path


@pytest.mark.parametrize("value", [-5, "abc", True])
def test_bad_money_message_is_readable(value: object) -> None:
    issue = only_issue(mutated(lambda d: d["versions"][0].update(cost_limit_per_request=value)))
    assert issue.path == "versions[0].cost_limit_per_request"
    assert "Decimal" not in issue.message


@pytest.mark.parametrize("key", ["rate_limits", "token_limits"])
@pytest.mark.parametrize("spec", ["lots", "600/fortnight", "600", "/minute"])
def test_bad_rate_limit_string(key: str, spec: str) -> None:
    doc = mutated(lambda d: d["routes"][0].update({key: ["10/second", spec]}))
    issue = only_issue(doc)
    assert issue.path == f"routes[0].{key}[1]"
    assert issue.message == f"{spec!r} is not a rate limit such as '600/minute' or '10 per second'"


@pytest.mark.parametrize("spec", ["600/minute", "10 per second", "100/hour;5/second"])
def test_good_rate_limit_strings(spec: str) -> None:
    doc = mutated(lambda d: d["routes"][0].update(rate_limits=[spec]))
    assert build_config(doc, environ={}).routes[0].rate_limits == (spec,)


KEY_SPEC_MESSAGE = "must be header:NAME, cookie:NAME, api_key, client_ip or callable"


@pytest.mark.parametrize("spec", ["body:user", "header:", "cookie:", "ip", "", "API_KEY"])
def test_bad_sticky_key_spec(spec: str) -> None:
    issue = only_issue(mutated(lambda d: d["routes"][0].update(sticky_sessions={"key": spec})))
    assert issue.path == "routes[0].sticky_sessions.key"
    assert issue.message == KEY_SPEC_MESSAGE


@pytest.mark.parametrize(
    "spec", ["header:x-user-id", "cookie:session", "api_key", "client_ip", "callable"]
)
def test_good_sticky_key_spec(spec: str) -> None:
    doc = mutated(lambda d: d["routes"][0].update(sticky_sessions={"key": spec}))
    assert build_config(doc, environ={}).routes[0].sticky_sessions.key == spec


def test_bad_identity_spec() -> None:
    issue = only_issue(mutated(lambda d: d.update(rate_limiting={"identity": "user"})))
    assert issue.path == "rate_limiting.identity"
    assert issue.message == KEY_SPEC_MESSAGE


@pytest.mark.parametrize(
    ("scope", "message"),
    [
        ("team", "must be 'global', 'identity' or 'route:ALIAS'"),
        ("Global", "must be 'global', 'identity' or 'route:ALIAS'"),
        ("route:nope", "unknown route 'nope'"),
    ],
)
def test_bad_budget_scope(scope: str, message: str) -> None:
    doc = mutated(lambda d: d.update(budgets=[{"scope": scope, "limit_usd": 10}]))
    issue = only_issue(doc)
    assert issue.path == "budgets[0].scope"
    assert issue.message == message


def test_duplicate_alias() -> None:
    doc = mutated(lambda d: d["routes"].append(copy.deepcopy(d["routes"][0])))
    issue = only_issue(doc)
    assert issue.path == "routes[1].model_alias"
    assert issue.message == "duplicate alias 'review'"


def test_duplicate_in_app_path() -> None:
    doc = copy.deepcopy(BASE)
    doc["routes"][0]["paths"] = ["/api/review", "/api/other"]
    second = copy.deepcopy(doc["routes"][0])
    second["model_alias"] = "chat"
    second["paths"] = ["/api/chat", "/api/review"]
    doc["routes"].append(second)
    issue = only_issue(doc)
    assert issue.path == "routes[1].paths[1]"
    assert issue.message == "'/api/review' already belongs to 'review'"


def test_relative_in_app_path() -> None:
    issue = only_issue(mutated(lambda d: d["routes"][0].update(paths=["api/review"])))
    assert (issue.path, issue.message) == ("routes[0].paths[0]", "must start with '/'")


def test_base_url_scheme() -> None:
    issue = only_issue(mutated(lambda d: d["upstreams"]["anthropic"].update(base_url="ftp://x")))
    assert (issue.path, issue.message) == (
        "upstreams.anthropic.base_url",
        "must start with http(s)://",
    )


def test_error_rate_threshold_range() -> None:
    doc = mutated(lambda d: d["routes"][0].update(health_check={"error_rate_threshold": 1.5}))
    issue = only_issue(doc)
    assert issue.path == "routes[0].health_check.error_rate_threshold"
    assert issue.message == "must be in [0, 1]"


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda d: d["routes"][0].update(paths="/api"), "routes[0].paths"),
        (lambda d: d["routes"][0].update(rate_limits="600/minute"), "routes[0].rate_limits"),
        (lambda d: d.update(routes={"review": {}}), "routes"),
        (lambda d: d["routes"][0].update(route_rules="v1"), "routes[0].route_rules"),
    ],
    ids=["paths-str", "rate_limits-str", "routes-mapping", "route_rules-str"],
)
def test_string_or_mapping_where_list_expected(
    mutate: Callable[[dict[str, Any]], object], path: str
) -> None:
    issue = only_issue(mutated(mutate))
    assert issue.path == path


# --- syntax errors and the shape of the document --------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "text", "prefix"),
    [
        ("toml", "a = [", "TOML syntax error: "),
        ("toml", "[versions\nx = 1", "TOML syntax error: "),
        ("yaml", "a: [1, 2", "YAML syntax error: "),
        ("yaml", "a: b: c", "YAML syntax error: "),
        ("json", "{", "JSON syntax error: "),
        ("json", '{"a": 1,}', "JSON syntax error: "),
    ],
)
def test_syntax_errors(fmt: str, text: str, prefix: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_document(text, fmt)
    (issue,) = info.value.issues
    assert issue.path == ""
    assert issue.message.startswith(prefix)
    assert len(issue.message) > len(prefix)  # the parser's own explanation follows


@pytest.mark.parametrize(("fmt", "text"), [("json", "[1, 2]"), ("json", '"x"'), ("yaml", "- 1")])
def test_non_mapping_top_level(fmt: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_document(text, fmt)
    (issue,) = info.value.issues
    assert (issue.path, issue.message) == ("", "the document must be a table/mapping at the top")


def test_not_utf8() -> None:
    with pytest.raises(ConfigError) as info:
        parse_document(b"a = '\xff'", "toml")
    assert info.value.issues[0].message.startswith("not UTF-8 text")


def test_unknown_format() -> None:
    with pytest.raises(ConfigError, match="unknown document format 'xml'"):
        parse_document("<a/>", "xml")


def test_config_error_is_a_value_error_listing_every_issue() -> None:
    err = ConfigError([ConfigIssue("a.b", "bad"), ConfigIssue("", "top")])
    assert isinstance(err, ValueError)
    assert "2 problem(s)" in str(err)
    assert "a.b: bad" in str(err)
    assert "  - top" in str(err)


# --- environment interpolation ----------------------------------------------------------------


def test_missing_env_names_the_variable_never_a_secret() -> None:
    secret = "sk-live-DO-NOT-LEAK-7c1f"
    doc = copy.deepcopy(BASE)
    doc["upstreams"]["anthropic"]["api_key"] = "${RELAYMW_TEST_KEY}"
    doc["upstreams"]["anthropic"]["anthropic_version"] = "${RELAYMW_TEST_MISSING}"
    doc["sticky"] = {"secret": "${RELAYMW_TEST_SECRET}-${RELAYMW_TEST_MISSING_TOO}"}
    env = {"RELAYMW_TEST_KEY": secret, "RELAYMW_TEST_SECRET": secret}
    with pytest.raises(ConfigError) as info:
        build_config(doc, environ=env)
    paths = {i.path: i.message for i in info.value.issues}
    assert paths == {
        "upstreams.anthropic.anthropic_version": (
            "environment variable RELAYMW_TEST_MISSING is not set (and no default)"
        ),
        "sticky.secret": (
            "environment variable RELAYMW_TEST_MISSING_TOO is not set (and no default)"
        ),
    }
    assert secret not in str(info.value)
    assert secret not in repr(info.value.issues)


def test_env_default_and_set_values() -> None:
    doc = copy.deepcopy(BASE)
    doc["upstreams"]["anthropic"]["api_key"] = "${RELAYMW_TEST_KEY:-fallback}"
    doc["upstreams"]["anthropic"]["base_url"] = "${RELAYMW_TEST_URL:-http://127.0.0.1:1}/v1"
    doc["sticky"] = {"secret": "${RELAYMW_TEST_EMPTY:-}"}
    config = build_config(doc, environ={})
    up = config.upstreams["anthropic"]
    assert (up.api_key, up.base_url, config.sticky.secret) == (
        "fallback",
        "http://127.0.0.1:1/v1",
        "",
    )
    config = build_config(
        doc, environ={"RELAYMW_TEST_KEY": "real", "RELAYMW_TEST_URL": "https://h"}
    )
    assert config.upstreams["anthropic"].api_key == "real"
    assert config.upstreams["anthropic"].base_url == "https://h/v1"


def test_env_set_to_empty_wins_over_default() -> None:
    # `${VAR:-default}` here follows "set" (not shell's "set and non-empty") semantics.
    resolved, issues = interpolate({"a": "${X:-d}"}, {"X": ""})
    assert (resolved, issues) == ({"a": ""}, [])


def test_interpolate_walks_lists_and_nested_tables() -> None:
    doc = {"a": ["${A}", {"b": "x-${B:-2}-${C}"}], "n": 5, "t": True}
    resolved, issues = interpolate(doc, {"A": "1"})
    assert resolved == {"a": ["1", {"b": "x-2-"}], "n": 5, "t": True}
    assert [str(i) for i in issues] == [
        "a[1].b: environment variable C is not set (and no default)"
    ]


def test_build_config_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYMW_TEST_ENV_KEY", "from-os-environ")
    doc = mutated(lambda d: d["upstreams"]["anthropic"].update(api_key="${RELAYMW_TEST_ENV_KEY}"))
    assert build_config(doc).upstreams["anthropic"].api_key == "from-os-environ"


# --- several errors at once ------------------------------------------------------------------


def test_every_error_is_reported_at_once() -> None:
    doc = copy.deepcopy(BASE)
    doc["versions"].append({"version_tag": "Bad_Tag", "model": "m", "upstream_endpoint": "nope"})
    doc["upstreams"]["anthropic"]["protocol"] = "grpc"
    doc["upstreams"]["anthropic"]["api_key"] = "${RELAYMW_TEST_UNSET}"
    doc["routes"][0]["route_rules"][0]["weight"] = 60
    doc["routes"][0]["route_rules"][1]["weight"] = 45
    doc["routes"][0]["rate_limits"] = ["often"]
    doc["budgets"] = [{"scope": "team", "limit_usd": 5}]
    doc["bogus"] = True
    issues = issues_of(doc)
    assert sorted(i.path for i in issues) == sorted(
        [
            "versions[2].version_tag",
            "versions[2].upstream_endpoint",
            "upstreams.anthropic.protocol",
            "upstreams.anthropic.api_key",
            "routes[0].route_rules[1].weight",
            "routes[0].rate_limits[0]",
            "budgets[0].scope",
            "",
        ]
    )
    assert len(issues) == 8
    messages = {i.path: i.message for i in issues}
    assert "57.14, 42.86" in messages["routes[0].route_rules[1].weight"]
    assert messages[""] == "extra fields found (bogus)"
    assert "RELAYMW_TEST_UNSET" in messages["upstreams.anthropic.api_key"]


# --- hypothesis: random valid documents with one injected fault ------------------------------

# Tags from the valid grammar but at most 12 characters, so the 20+ character "unknown"
# tags used by faults below can never collide with them.
tag_st = st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,10}[a-z0-9])?", fullmatch=True)
alias_st = st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True)
UNKNOWN_TAG = "no-such-version-tag-anywhere"
# Faults draw through ``st.data().draw``, which takes a strategy and returns a value.
Draw = Callable[[st.SearchStrategy[Any]], Any]


@st.composite
def weights_st(draw: st.DrawFn, n: int) -> list[int]:
    """``n`` non-negative integers summing to 100, the last one > 0."""
    cuts = sorted(draw(st.lists(st.integers(0, 99), min_size=n - 1, max_size=n - 1)))
    bounds = [0, *cuts, 100]
    return [b - a for a, b in itertools.pairwise(bounds)]


@st.composite
def valid_doc_st(draw: st.DrawFn) -> dict[str, Any]:
    upstream_names = draw(st.lists(alias_st, min_size=1, max_size=3, unique=True))
    upstreams = {
        name: {
            "base_url": draw(st.sampled_from(["https://api.example.com/v1", "http://127.0.0.1:9"])),
            "protocol": draw(st.sampled_from(["openai", "anthropic"])),
        }
        for name in upstream_names
    }
    tags = draw(st.lists(tag_st, min_size=1, max_size=5, unique=True))
    versions = [
        {
            "version_tag": t,
            "model": f"model-{i}",
            "upstream_endpoint": draw(st.sampled_from(upstream_names)),
        }
        for i, t in enumerate(tags)
    ]
    routes = []
    for alias in draw(st.lists(alias_st, min_size=1, max_size=3, unique=True)):
        chosen = draw(st.lists(st.sampled_from(tags), min_size=1, max_size=len(tags), unique=True))
        weights = draw(weights_st(len(chosen)))
        routes.append(
            {
                "model_alias": alias,
                "route_rules": [
                    {"version_tag": t, "weight": w} for t, w in zip(chosen, weights, strict=True)
                ],
            }
        )
    return {"upstreams": upstreams, "versions": versions, "routes": routes}


def _pick(draw: Draw, items: list[Any]) -> int:
    index: int = draw(st.integers(0, len(items) - 1))
    return index


def fault_bad_tag(doc: dict[str, Any], draw: Draw) -> str:
    i = _pick(draw, doc["versions"])
    doc["versions"][i]["version_tag"] = draw(
        st.sampled_from(["Upper", "has space", "under_score", "x!", "(p)", "a" * 65, "-x"])
    )
    return f"versions[{i}].version_tag"


def fault_weight_sum(doc: dict[str, Any], draw: Draw) -> str:
    r = _pick(draw, doc["routes"])
    rules = doc["routes"][r]["route_rules"]
    rules[-1]["weight"] += draw(st.sampled_from([-0.5, 0.02, 1, 7, 50]))
    assume(rules[-1]["weight"] >= 0)
    return f"routes[{r}].route_rules[{len(rules) - 1}].weight"


def fault_negative_weight(doc: dict[str, Any], draw: Draw) -> str:
    r = _pick(draw, doc["routes"])
    j = _pick(draw, doc["routes"][r]["route_rules"])
    doc["routes"][r]["route_rules"][j]["weight"] = -draw(st.integers(1, 100))
    return f"routes[{r}].route_rules[{j}].weight"


def fault_weight_type(doc: dict[str, Any], draw: Draw) -> str:
    r = _pick(draw, doc["routes"])
    j = _pick(draw, doc["routes"][r]["route_rules"])
    doc["routes"][r]["route_rules"][j]["weight"] = draw(st.sampled_from(["10", None, True, []]))
    return f"routes[{r}].route_rules[{j}].weight"


def fault_unknown_rule_tag(doc: dict[str, Any], draw: Draw) -> str:
    r = _pick(draw, doc["routes"])
    j = _pick(draw, doc["routes"][r]["route_rules"])
    doc["routes"][r]["route_rules"][j]["version_tag"] = UNKNOWN_TAG
    return f"routes[{r}].route_rules[{j}].version_tag"


def fault_unknown_upstream(doc: dict[str, Any], draw: Draw) -> str:
    i = _pick(draw, doc["versions"])
    doc["versions"][i]["upstream_endpoint"] = "No Such Upstream"
    return f"versions[{i}].upstream_endpoint"


def fault_extra_key(doc: dict[str, Any], draw: Draw) -> str:
    where = draw(st.sampled_from(["top", "version", "rule", "upstream", "route"]))
    if where == "top":
        doc["unexpected"] = 1
        return ""
    if where == "version":
        i = _pick(draw, doc["versions"])
        doc["versions"][i]["unexpected"] = 1
        return f"versions[{i}]"
    if where == "upstream":
        name = draw(st.sampled_from(sorted(doc["upstreams"])))
        doc["upstreams"][name]["unexpected"] = 1
        return f"upstreams.{name}"
    r = _pick(draw, doc["routes"])
    if where == "route":
        doc["routes"][r]["unexpected"] = 1
        return f"routes[{r}]"
    j = _pick(draw, doc["routes"][r]["route_rules"])
    doc["routes"][r]["route_rules"][j]["unexpected"] = 1
    return f"routes[{r}].route_rules[{j}]"


def fault_missing_field(doc: dict[str, Any], draw: Draw) -> str:
    i = _pick(draw, doc["versions"])
    doc["versions"][i].pop("model")
    return f"versions[{i}].model"


def fault_protocol(doc: dict[str, Any], draw: Draw) -> str:
    name = draw(st.sampled_from(sorted(doc["upstreams"])))
    doc["upstreams"][name]["protocol"] = "grpc"
    return f"upstreams.{name}.protocol"


def fault_rate_limit(doc: dict[str, Any], draw: Draw) -> str:
    r = _pick(draw, doc["routes"])
    doc["routes"][r]["rate_limits"] = ["600/minute", "whenever"]
    return f"routes[{r}].rate_limits[1]"


def fault_sticky_key(doc: dict[str, Any], draw: Draw) -> str:
    r = _pick(draw, doc["routes"])
    doc["routes"][r]["sticky_sessions"] = {"key": "query:user"}
    return f"routes[{r}].sticky_sessions.key"


def fault_duplicate_alias(doc: dict[str, Any], draw: Draw) -> str:
    r = _pick(draw, doc["routes"])
    doc["routes"].append(copy.deepcopy(doc["routes"][r]))
    return f"routes[{len(doc['routes']) - 1}].model_alias"


def fault_missing_env(doc: dict[str, Any], draw: Draw) -> str:
    name = draw(st.sampled_from(sorted(doc["upstreams"])))
    doc["upstreams"][name]["api_key"] = "${RELAYMW_HYPOTHESIS_UNSET}"
    return f"upstreams.{name}.api_key"


def fault_budget_scope(doc: dict[str, Any], draw: Draw) -> str:
    doc["budgets"] = [{"scope": "global", "limit_usd": 1}, {"scope": "everyone", "limit_usd": 1}]
    return "budgets[1].scope"


FAULTS = [
    fault_bad_tag,
    fault_weight_sum,
    fault_negative_weight,
    fault_weight_type,
    fault_unknown_rule_tag,
    fault_unknown_upstream,
    fault_extra_key,
    fault_missing_field,
    fault_protocol,
    fault_rate_limit,
    fault_sticky_key,
    fault_duplicate_alias,
    fault_missing_env,
    fault_budget_scope,
]


@given(valid_doc_st())
@settings(max_examples=60, deadline=None)
def test_generated_valid_documents_build(doc: dict[str, Any]) -> None:
    config = build_config(doc, environ={})
    assert len(config.versions) == len(doc["versions"])
    assert [r.model_alias for r in config.routes] == [r["model_alias"] for r in doc["routes"]]


@given(valid_doc_st(), st.sampled_from(FAULTS), st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_one_injected_fault_is_named_by_its_path(
    doc: dict[str, Any], fault: Callable[[dict[str, Any], Draw], str], data: st.DataObject
) -> None:
    path = fault(doc, data.draw)
    issues = issues_of(doc)
    paths = {i.path for i in issues}
    assert path in paths, (path, [str(i) for i in issues])
    if fault is not fault_bad_tag:
        # Apart from a renamed version (whose rules now name an unknown tag), a single fault
        # produces a single issue.
        assert paths == {path}, [str(i) for i in issues]


# --- normalize_weights -------------------------------------------------------------------------

weight_vectors = st.lists(
    st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_subnormal=False),
    min_size=1,
    max_size=8,
).filter(lambda ws: sum(ws) > 1e-6)


@given(weight_vectors)
def test_normalize_weights_sums_to_100(weights: list[float]) -> None:
    out = normalize_weights(weights)
    assert len(out) == len(weights)
    assert abs(sum(out) - 100) <= 0.01
    assert all(w >= 0 for w in out)


@given(weight_vectors)
def test_normalize_weights_is_proportional(weights: list[float]) -> None:
    out = normalize_weights(weights)
    total = sum(weights)
    # Each value is its exact share rounded to 2 places; the largest also absorbs the
    # rounding residue (at most 0.005 per entry).
    for w, n in zip(weights, out, strict=True):
        assert abs(n - w * 100 / total) <= 0.005 * len(weights) + 1e-9
        if w == 0:
            assert n == 0


@given(weight_vectors, st.floats(min_value=0.001, max_value=1000))
def test_normalize_weights_is_scale_invariant(weights: list[float], k: float) -> None:
    scaled = [w * k for w in weights]
    assume(sum(scaled) > 1e-6)
    a, b = normalize_weights(weights), normalize_weights(scaled)
    assert all(abs(x - y) <= 0.011 * len(weights) for x, y in zip(a, b, strict=True))


def test_normalize_weights_examples() -> None:
    assert normalize_weights([60, 45]) == [57.14, 42.86]
    assert normalize_weights([1, 1, 1]) == pytest.approx([33.34, 33.33, 33.33])
    assert normalize_weights([95, 5]) == [95.0, 5.0]
    assert normalize_weights([3, 1], total=1) == [0.75, 0.25]
    assert normalize_weights([0, 0]) == [0.0, 0.0]
    assert normalize_weights([]) == []
    with pytest.raises(ValueError, match=">= 0"):
        normalize_weights([50, -1])


def test_normalize_weights_is_public() -> None:
    import relaymw

    assert relaymw.normalize_weights is normalize_weights
