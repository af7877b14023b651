"""The version-control API (SPEC §7) on real servers: every endpoint and every error.

The admin app is mounted under ``/admin`` in a Starlette app behind ``RelayMiddleware`` and
served by uvicorn; the relay sits on a TOML file in ``tmp_path`` or on Redis, its upstream
is the FakeLLM. Clients are plain HTTP (httpx) and the openai SDK for traffic.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from relaymw import Relay, RelayMiddleware
from relaymw.admin import create_admin_app
from relaymw.config import TAG_PATTERN, parse_document
from relaymw.stores import FileStore, RedisStore
from relaymw.stores.http import HttpStore
from relaymw.testing import FakeLLM
from tests.support import UPSTREAM_KEY, free_port, relay_document, serve_asgi, serve_wsgi

ALICE = "alice-token-7f3a9c1e5b2d"
CI_TOKEN = "ci-token-2d4e6f8a0b1c3e"
TOKENS = {"alice": ALICE, "ci": CI_TOKEN}
V3 = {
    "version_tag": "gpt-v3",
    "model": "openai/gpt-4.1-mini",
    "upstream_endpoint": "openai",
    "parameters": {"temperature": 0.2, "max_tokens": 128},
    "system_prompt": "You are v3.",
    "cost_limit_per_request": 0.02,
    "metadata": {"release_candidate": True},
}
BAD_TAG = "Claude Sonnet 4.5 v2.0 (production)!"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(params=["file", "redis"])
def relay(request: pytest.FixtureRequest, tmp_path: Path, fake_llm: FakeLLM) -> Iterator[Relay]:
    document = relay_document(fake_llm.base_url)
    if request.param == "file":
        store: Any = FileStore(tmp_path / "relay.toml")
    else:
        key = request.getfixturevalue("redis_prefix") + ":config"
        store = RedisStore(request.getfixturevalue("redis_url"), key=key)
    store.save(document)
    relay = Relay.from_store(store)
    yield relay
    relay.close()


@contextlib.contextmanager
def serve_admin(relay: Relay, **kwargs: Any) -> Iterator[str]:
    """The admin app at ``/admin`` of an app behind RelayMiddleware; yields the base URL."""
    kwargs.setdefault("tokens", TOKENS)
    kwargs.setdefault("rate_limit", "1000/second")
    app = Starlette(routes=[Mount("/admin", app=relay.admin_app(**kwargs))])
    with serve_asgi(RelayMiddleware(app, relay=relay)) as url:
        yield url


@pytest.fixture
def base(relay: Relay) -> Iterator[str]:
    with serve_admin(relay) as url:
        yield url


@pytest.fixture
def api(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{base}/admin", headers=bearer(ALICE), timeout=10) as client:
        yield client


def stored(relay: Relay) -> dict[str, Any]:
    assert relay.store is not None
    raw = relay.store.load()
    return parse_document(raw.data, raw.format)


def stored_weights(relay: Relay, alias: str) -> dict[str, float]:
    (route,) = [r for r in stored(relay)["routes"] if r["model_alias"] == alias]
    return {r["version_tag"]: r["weight"] for r in route["route_rules"]}


def error_of(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == kind and error["message"]
    return error


# --- versions ------------------------------------------------------------------------------------


def test_register_list_and_show_versions(api: httpx.Client, relay: Relay) -> None:
    created = api.post("/models/versions", json=V3)
    assert created.status_code == 201, created.text
    body = created.json()
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", body["version_id"])
    assert body["version_tag"] == "gpt-v3" and body["version"]["model"] == V3["model"]
    assert [v for v in stored(relay)["versions"] if v["version_tag"] == "gpt-v3"]
    assert "gpt-v3" in {v.version_tag for v in relay.config.versions}

    again = api.post("/models/versions", json=V3)
    assert again.status_code == 200 and again.json() == body

    listed = api.get("/models/versions").json()["versions"]
    assert [v["version_tag"] for v in listed] == [
        "gpt-v1",
        "gpt-v2",
        "claude-v1",
        "claude-v2",
        "gpt-v3",
    ]
    assert all(re.fullmatch(r"sha256:[0-9a-f]{16}", v["version_id"]) for v in listed)
    shown = api.get("/models/versions/gpt-v3").json()
    assert shown["version_id"] == body["version_id"] and shown["system_prompt"] == "You are v3."
    # What GET answers can be sent back as is: the same content, so 200.
    assert api.post("/models/versions", json=shown).status_code == 200


def test_version_id_is_the_content_not_its_spelling(api: httpx.Client) -> None:
    first = api.post("/models/versions", json=V3).json()["version_id"]
    reordered = dict(reversed(list(V3.items())))
    assert api.post("/models/versions", json=reordered).json()["version_id"] == first
    other = api.post("/models/versions", json={**V3, "version_tag": "gpt-v4"}).json()
    assert other["version_id"] != first


def test_a_tag_registered_with_other_content_is_a_conflict(api: httpx.Client, relay: Relay) -> None:
    before = stored(relay)
    error = error_of(
        api.post("/models/versions", json={**V3, "version_tag": "gpt-v1"}), 409, "conflict"
    )
    assert "gpt-v1" in error["message"] and "new version_tag" in error["message"]
    assert error["details"]["version"]["system_prompt"] == "You are v1."
    assert stored(relay) == before


def test_unknown_version_is_404(api: httpx.Client) -> None:
    error = error_of(api.get("/models/versions/gpt-v9"), 404, "not_found")
    assert "gpt-v9" in error["message"] and "gpt-v1" in error["message"]


def test_bad_tag_is_422_naming_the_field_and_the_pattern(api: httpx.Client, relay: Relay) -> None:
    error = error_of(
        api.post("/models/versions", json={**V3, "version_tag": BAD_TAG}), 422, "validation_error"
    )
    assert error["details"]["issues"][0]["path"] == "version_tag"
    assert error["message"].startswith("version_tag: ")
    assert TAG_PATTERN.pattern in error["message"]
    assert error["details"]["version_tag_pattern"] == TAG_PATTERN.pattern
    assert BAD_TAG not in json.dumps(stored(relay))


def test_every_validation_problem_is_listed_with_its_path(api: httpx.Client) -> None:
    bad = {
        "version_tag": "Bad_Tag",
        "upstream_endpoint": "nowhere",
        "parameters": [1, 2],
        "rate_limits": ["often"],
        "colour": "blue",
    }
    error = error_of(api.post("/models/versions", json=bad), 422, "validation_error")
    paths = {i["path"] for i in error["details"]["issues"]}
    assert {"version_tag", "upstream_endpoint", "rate_limits[0]", "parameters", "model"} <= paths
    issues = {i["path"]: i["message"] for i in error["details"]["issues"]}
    assert issues["model"] == "required field missing"
    assert "colour" in issues[""]  # the version itself: an unknown field


# --- routes ------------------------------------------------------------------------------------


def test_routes_list_and_show(api: httpx.Client) -> None:
    routes = api.get("/routes/traffic").json()["routes"]
    assert [r["route_id"] for r in routes] == ["chat-production", "review-production"]
    review = api.get("/routes/traffic/review-production").json()
    assert review["model_alias"] == "review-production"
    assert review["active_version"] == "claude-v1" and review["ejected"] == []
    assert review["route_rules"] == [
        {"version_tag": "claude-v1", "weight": 90},
        {"version_tag": "claude-v2", "weight": 10},
    ]
    error = error_of(api.get("/routes/traffic/no-such-route"), 404, "not_found")
    assert "no-such-route" in error["message"] and "chat-production" in error["message"]


def test_create_then_replace_a_route(api: httpx.Client, relay: Relay) -> None:
    route = {
        "model_alias": "summaries",
        "route_rules": [
            {"version_tag": "gpt-v1", "weight": 95},
            {"version_tag": "gpt-v2", "weight": 5},
        ],
        "sticky_sessions": {"enabled": True, "key": "header:x-user-id"},
        "health_check": {"enabled": True, "error_rate_threshold": 0.1, "auto_rollback": True},
    }
    created = api.post("/routes/traffic", json=route)
    assert created.status_code == 201, created.text
    assert created.json()["active_version"] == "gpt-v1"
    assert "summaries" in relay.snapshot.routes
    only_v2 = [{"version_tag": "gpt-v2", "weight": 100}]
    replaced = api.post("/routes/traffic", json={**created.json(), "route_rules": only_v2})
    assert replaced.status_code == 200, replaced.text  # GET's answer, edited and sent back
    assert replaced.json()["active_version"] == "gpt-v2"
    assert [r["model_alias"] for r in stored(relay)["routes"]].count("summaries") == 1
    assert stored_weights(relay, "summaries") == {"gpt-v2": 100}
    assert api.get("/routes/traffic/summaries").json()["health_check"]["enabled"] is True


def test_a_route_with_bad_weights_is_refused_with_the_normalised_ones(
    api: httpx.Client, relay: Relay
) -> None:
    route = {
        "model_alias": "summaries",
        "route_rules": [
            {"version_tag": "gpt-v1", "weight": 60},
            {"version_tag": "gpt-v2", "weight": 45},
        ],
    }
    error = error_of(api.post("/routes/traffic", json=route), 422, "validation_error")
    assert error["details"]["issues"][0]["path"] == "route_rules[1].weight"
    assert "57.14" in error["message"] and "42.86" in error["message"]
    assert "summaries" not in relay.snapshot.routes


def test_set_weights(api: httpx.Client, relay: Relay) -> None:
    answer = api.patch(
        "/routes/traffic",
        json={
            "route_id": "chat-production",
            "route_rules": [
                {"version_tag": "gpt-v1", "weight": 25},
                {"version_tag": "gpt-v2", "weight": 75},
            ],
        },
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "status": "updated",
        "route_id": "chat-production",
        "active_version": "gpt-v2",
        "route_rules": [
            {"version_tag": "gpt-v1", "weight": 25},
            {"version_tag": "gpt-v2", "weight": 75},
        ],
    }
    assert stored_weights(relay, "chat-production") == {"gpt-v1": 25, "gpt-v2": 75}
    assert relay.snapshot.routes["chat-production"].route.route_rules[1].weight == 75


def test_a_new_tag_joins_last_and_named_rules_keep_their_place(api: httpx.Client) -> None:
    assert api.post("/models/versions", json=V3).status_code == 201
    answer = api.patch(
        "/routes/traffic",
        json={
            "route_id": "chat-production",
            "route_rules": [
                {"version_tag": "gpt-v3", "weight": 10},
                {"version_tag": "gpt-v2", "weight": 0},
                {"version_tag": "gpt-v1", "weight": 90},
            ],
        },
    )
    assert answer.status_code == 200, answer.text
    assert [r["version_tag"] for r in answer.json()["route_rules"]] == [
        "gpt-v1",
        "gpt-v2",
        "gpt-v3",
    ]


def test_weights_60_and_45_are_422_with_the_normalised_weights(
    api: httpx.Client, relay: Relay
) -> None:
    revision = relay.snapshot.revision
    error = error_of(
        api.patch(
            "/routes/traffic",
            json={
                "route_id": "chat-production",
                "route_rules": [
                    {"version_tag": "gpt-v1", "weight": 60},
                    {"version_tag": "gpt-v2", "weight": 45},
                ],
            },
        ),
        422,
        "validation_error",
    )
    assert "sum to 105" in error["message"]
    assert "gpt-v1=57.14, gpt-v2=42.86" in error["message"]
    assert error["details"]["suggested_route_rules"] == [
        {"version_tag": "gpt-v1", "weight": 57.14},
        {"version_tag": "gpt-v2", "weight": 42.86},
    ]
    assert relay.snapshot.revision == revision
    assert stored_weights(relay, "chat-production") == {"gpt-v1": 50, "gpt-v2": 50}
    assert api.get("/audit").json()["entries"] == []


def test_set_weights_refuses_unknown_routes_tags_and_malformed_rules(api: httpx.Client) -> None:
    rules = [{"version_tag": "gpt-v1", "weight": 100}]
    error = error_of(
        api.patch("/routes/traffic", json={"route_id": "nope", "route_rules": rules}),
        404,
        "not_found",
    )
    assert "'nope'" in error["message"]
    error = error_of(
        api.patch(
            "/routes/traffic",
            json={
                "route_id": "chat-production",
                "route_rules": [{"version_tag": "gpt-v9", "weight": 100}],
            },
        ),
        404,
        "not_found",
    )
    assert "gpt-v9" in error["message"]
    error = error_of(
        api.patch(
            "/routes/traffic",
            json={
                "route_id": "chat-production",
                "route_rules": [{"version_tag": "gpt-v1", "weight": -5}, {"weight": "x"}],
                "extra": 1,
            },
        ),
        422,
        "validation_error",
    )
    paths = [i["path"] for i in error["details"]["issues"]]
    assert paths == [
        "extra",
        "route_rules[0].weight",
        "route_rules[1].version_tag",
        "route_rules[1].weight",
    ]


def test_rollback(api: httpx.Client, relay: Relay) -> None:
    answer = api.post(
        "/routes/traffic/rollback",
        json={"route_id": "review-production", "version_tag": "claude-v2"},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "status": "rolled_back",
        "route_id": "review-production",
        "active_version": "claude-v2",
        "route_rules": [
            {"version_tag": "claude-v1", "weight": 0},
            {"version_tag": "claude-v2", "weight": 100},
        ],
    }
    assert stored_weights(relay, "review-production") == {"claude-v1": 0, "claude-v2": 100}
    error = error_of(
        api.post(
            "/routes/traffic/rollback",
            json={"route_id": "review-production", "version_tag": "gpt-v1"},
        ),
        404,
        "not_found",
    )
    assert "gpt-v1" in error["message"] and "review-production" in error["message"]
    error_of(
        api.post("/routes/traffic/rollback", json={"route_id": "nope", "version_tag": "gpt-v1"}),
        404,
        "not_found",
    )
    error_of(api.post("/routes/traffic/rollback", json={"route_id": "x"}), 422, "validation_error")


# --- metrics -------------------------------------------------------------------------------------


def test_metrics_count_the_traffic_of_each_version(base: str, api: httpx.Client) -> None:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-client", max_retries=0)
    seen: dict[str, int] = {}
    for i in range(12):
        raw = client.chat.completions.with_raw_response.create(
            model="chat-production",
            messages=[{"role": "user", "content": f"hello {i}"}],
        )
        tag = raw.headers["x-relaymw-version"]
        seen[tag] = seen.get(tag, 0) + 1
    answer = api.get("/metrics/versions", params={"route_id": "chat-production"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["bucket_seconds"] == 10  # the default granularity of the figures
    counts = {v["version_tag"]: v["metrics"]["request_count"] for v in body["versions"]}
    assert counts == {"gpt-v1": seen.get("gpt-v1", 0), "gpt-v2": seen.get("gpt-v2", 0)}
    one = next(v for v in body["versions"] if v["metrics"]["request_count"])
    figures = one["metrics"]
    assert {
        "error_rate",
        "latency_p50_ms",
        "latency_p99_ms",
        "cost_per_token",
        "total_cost_usd",
    } <= set(figures)
    assert figures["error_rate"] == 0 and figures["latency_p99_ms"] > 0
    assert isinstance(figures["total_cost_usd"], float) and figures["total_cost_usd"] > 0

    everything = api.get("/metrics/versions").json()["versions"]
    assert [v["version_tag"] for v in everything] == ["gpt-v1", "gpt-v2", "claude-v1", "claude-v2"]
    assert all(v["route_id"] is None for v in everything)

    picked = api.get(
        "/metrics/versions", params={"version_tag": "gpt-v1", "metrics": "request_count,error_rate"}
    ).json()["versions"]
    assert picked == [
        {
            "version_tag": "gpt-v1",
            "route_id": None,
            "metrics": {"request_count": seen.get("gpt-v1", 0), "error_rate": 0.0},
        }
    ]
    past = api.get(
        "/metrics/versions",
        params={"start_time": "2020-01-01T00:00:00Z", "end_time": "2020-01-01T01:00:00+00:00"},
    ).json()
    assert past["start_time"] == "2020-01-01T00:00:00+00:00"
    assert all(v["metrics"]["request_count"] == 0 for v in past["versions"])


def test_metrics_parameters_are_checked(api: httpx.Client) -> None:
    error = error_of(
        api.get("/metrics/versions", params={"start_time": "yesterday", "metrics": "qps"}),
        422,
        "validation_error",
    )
    assert [i["path"] for i in error["details"]["issues"]] == ["start_time", "metrics"]
    assert "latency_p99_ms" in error["message"]  # the known names are listed
    error = error_of(
        api.get(
            "/metrics/versions",
            params={"start_time": "2026-01-02T00:00:00Z", "end_time": "2026-01-01T00:00:00Z"},
        ),
        422,
        "validation_error",
    )
    assert "start_time" in error["message"]
    error_of(api.get("/metrics/versions", params={"version_tag": "gpt-v9"}), 404, "not_found")
    error_of(api.get("/metrics/versions", params={"route_id": "nope"}), 404, "not_found")
    # A tag outside the route asked for is unknown there.
    error_of(
        api.get(
            "/metrics/versions", params={"route_id": "chat-production", "version_tag": "claude-v1"}
        ),
        404,
        "not_found",
    )


# --- audit, rollouts ------------------------------------------------------------------------------


def test_the_audit_log_names_the_token_never_its_value(
    base: str, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    rules = {
        "route_id": "chat-production",
        "route_rules": [
            {"version_tag": "gpt-v1", "weight": 80},
            {"version_tag": "gpt-v2", "weight": 20},
        ],
    }
    alice = httpx.Client(base_url=f"{base}/admin", headers=bearer(ALICE))
    ci = httpx.Client(base_url=f"{base}/admin", headers=bearer(CI_TOKEN))
    assert ci.post("/models/versions", json=V3).status_code == 201
    assert alice.patch("/routes/traffic", json=rules).status_code == 200
    httpx.get(f"{base}/admin/audit", headers=bearer("a-wrong-token-123456"))

    answer = alice.get("/audit")
    assert answer.status_code == 200
    entries = answer.json()["entries"]
    assert [(e["actor"], e["action"], e["target"]) for e in entries] == [
        ("alice", "set-weights", "route:chat-production"),
        ("ci", "register-version", "version:gpt-v3"),
    ]
    weights = entries[0]
    assert [r["weight"] for r in weights["before"]["route_rules"]] == [50, 50]
    assert [r["weight"] for r in weights["after"]["route_rules"]] == [80, 20]
    assert entries[1]["before"] is None and entries[1]["after"]["model"] == V3["model"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT.*\+00:00", weights["at"])
    assert alice.get("/audit", params={"limit": 1}).json()["entries"] == entries[:1]
    error_of(alice.get("/audit", params={"limit": 0}), 422, "validation_error")
    error_of(alice.get("/audit", params={"limit": "many"}), 422, "validation_error")

    secrets = (ALICE, CI_TOKEN, "a-wrong-token-123456", UPSTREAM_KEY)
    for text in (answer.text, caplog.text, json.dumps(relay.changes())):
        assert not any(s in text for s in secrets)
    assert "set-weights by alice" in caplog.text
    # The journal in the store itself: the file beside the document, or the Redis list.
    if isinstance(relay.store, FileStore):
        journal = Path(relay.store.changes_path).read_text()
        assert "alice" in journal and not any(s in journal for s in secrets)
    alice.close()
    ci.close()


def test_rollout_state_is_kept_in_the_store(api: httpx.Client, relay: Relay) -> None:
    error_of(api.get("/rollouts/chat-production"), 404, "not_found")
    state = {"to": "gpt-v2", "stage": 1, "stages": [5, 25, 50, 100], "status": "running"}
    put = api.put("/rollouts/chat-production", json=state)
    assert put.status_code == 200 and put.json() == state
    assert relay.read_state("rollout:chat-production") == state
    assert api.get("/rollouts/chat-production").json() == state
    deleted = api.delete("/rollouts/chat-production")
    assert deleted.status_code == 204 and deleted.content == b""
    assert relay.read_state("rollout:chat-production") is None
    error_of(api.get("/rollouts/chat-production"), 404, "not_found")
    assert api.delete("/rollouts/chat-production").status_code == 204
    error = error_of(api.put("/rollouts/nope", json=state), 404, "not_found")
    assert "'nope'" in error["message"]
    error_of(api.get("/rollouts/nope"), 404, "not_found")


# --- protocol errors -----------------------------------------------------------------------------


def test_missing_or_wrong_tokens_are_401(base: str) -> None:
    url = f"{base}/admin/routes/traffic"
    for headers, says in (
        ({}, "no bearer token"),
        (bearer("not-the-token-0000000"), "not one of"),
        ({"Authorization": f"Basic {ALICE}"}, "not one of"),
        (bearer(ALICE + "x"), "not one of"),
        (bearer(ALICE[:-1]), "not one of"),
    ):
        answer = httpx.get(url, headers=headers)
        error = error_of(answer, 401, "authentication_error")
        assert says in error["message"] and "Bearer" in error["message"]
        assert answer.headers["www-authenticate"].startswith("Bearer")
    posted = httpx.post(f"{base}/admin/models/versions", json=V3, headers=bearer("nope-nope-nope"))
    error_of(posted, 401, "authentication_error")
    assert httpx.get(url, headers=bearer(CI_TOKEN)).status_code == 200
    spec = httpx.get(f"{base}/admin/openapi.json")
    assert spec.status_code == 200 and spec.json()["openapi"].startswith("3.1")


def test_unknown_paths_and_methods_are_json(api: httpx.Client) -> None:
    error_of(api.get("/models"), 404, "not_found")
    answer = api.delete("/audit")
    error_of(answer, 405, "method_not_allowed")
    assert "GET" in answer.headers["allow"]


def test_bodies_must_be_json_objects(api: httpx.Client) -> None:
    as_text = api.post(
        "/models/versions", content=json.dumps(V3), headers={"content-type": "text/plain"}
    )
    assert "application/json" in error_of(as_text, 415, "unsupported_media_type")["message"]
    no_type = api.post("/models/versions", content=json.dumps(V3))
    error_of(no_type, 415, "unsupported_media_type")
    broken = api.post(
        "/models/versions",
        content=b'{"version_tag": ',
        headers={"content-type": "application/json"},
    )
    error_of(broken, 400, "invalid_json")
    error_of(api.post("/models/versions", json=[V3]), 422, "validation_error")
    nested: Any = 1
    for _ in range(40):
        nested = {"a": nested}
    deep = error_of(
        api.post("/models/versions", json={**V3, "metadata": nested}), 422, "validation_error"
    )
    assert "nested deeper" in deep["message"]
    nulls = error_of(
        api.patch("/routes/traffic", json={"route_id": "chat-production", "route_rules": [None]}),
        422,
        "validation_error",
    )
    assert nulls["details"]["issues"][0]["path"] == "route_rules[0]"
    big = api.put(
        "/rollouts/chat-production",
        content=b'{"x": "' + b"y" * (1024 * 1024) + b'"}',
        headers={"content-type": "application/json"},
    )
    error_of(big, 413, "request_too_large")


def test_too_many_calls_are_429_with_retry_after_per_token(relay: Relay) -> None:
    with serve_admin(relay, rate_limit="3/minute") as base:
        url = f"{base}/admin/routes/traffic"
        assert [httpx.get(url, headers=bearer(ALICE)).status_code for _ in range(3)] == [200] * 3
        limited = httpx.get(url, headers=bearer(ALICE))
        error = error_of(limited, 429, "rate_limited")
        wait = int(limited.headers["retry-after"])
        assert 1 <= wait <= 60 and f"retry after {wait} s" in error["message"]
        assert limited.headers["ratelimit-limit"] == "3"
        # Another token has its own allowance; calls without a valid token share one per address.
        assert httpx.get(url, headers=bearer(CI_TOKEN)).status_code == 200
        assert [httpx.get(url).status_code for _ in range(4)] == [401, 401, 401, 429]


def test_writes_to_a_read_only_http_store_are_409(
    fake_llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    document = relay_document(fake_llm.base_url)

    async def serve_document(request: Request) -> JSONResponse:
        return JSONResponse(document)

    docs = Starlette(routes=[Route("/relay.json", serve_document)])
    with serve_asgi(docs) as docs_url:
        relay = Relay.from_store(HttpStore(f"{docs_url}/relay.json", poll_interval=60))
        try:
            with serve_admin(relay) as base:
                api = httpx.Client(base_url=f"{base}/admin", headers=bearer(ALICE))
                for answer in (
                    api.post("/models/versions", json=V3),
                    api.patch(
                        "/routes/traffic",
                        json={
                            "route_id": "chat-production",
                            "route_rules": [{"version_tag": "gpt-v1", "weight": 100}],
                        },
                    ),
                    api.post(
                        "/routes/traffic/rollback",
                        json={"route_id": "chat-production", "version_tag": "gpt-v1"},
                    ),
                    api.put("/rollouts/chat-production", json={"stage": 1}),
                ):
                    error = error_of(answer, 409, "read_only_store")
                    assert (
                        "read-only" in error["message"]
                        and f"{docs_url}/relay.json" in error["message"]
                    )
                    assert "change the document there" in error["message"]
                # Reads work as usual.
                assert (
                    api.get("/routes/traffic/chat-production").json()["active_version"] == "gpt-v1"
                )
                api.close()
        finally:
            relay.close()


def test_a_relay_without_a_store_says_it_cannot_be_written(fake_llm: FakeLLM) -> None:
    relay = Relay(relay_document(fake_llm.base_url))
    try:
        with serve_admin(relay) as base:
            answer = httpx.post(f"{base}/admin/models/versions", json=V3, headers=bearer(ALICE))
            assert "Relay.from_store" in error_of(answer, 409, "no_store")["message"]
    finally:
        relay.close()


# --- stores, mounting, construction --------------------------------------------------------


def test_a_redis_write_reaches_every_worker(
    fake_llm: FakeLLM, redis_url: str, redis_prefix: str
) -> None:
    key = f"{redis_prefix}:config"
    RedisStore(redis_url, key=key).save(relay_document(fake_llm.base_url))
    writer = Relay.from_store(RedisStore(redis_url, key=key))
    other = Relay.from_store(RedisStore(redis_url, key=key))  # another worker, watching
    try:
        with serve_admin(writer) as base:
            answer = httpx.post(
                f"{base}/admin/routes/traffic/rollback",
                json={"route_id": "chat-production", "version_tag": "gpt-v2"},
                headers=bearer(ALICE),
            )
            assert answer.status_code == 200, answer.text
        deadline = time.monotonic() + 5
        rules = other.snapshot.routes["chat-production"].route.route_rules
        while rules[1].weight != 100 and time.monotonic() < deadline:
            time.sleep(0.02)
            rules = other.snapshot.routes["chat-production"].route.route_rules
        assert [r.weight for r in rules] == [0, 100]
        assert other.changes()[0]["actor"] == "alice"  # the same change log, from the store
    finally:
        writer.close()
        other.close()


def test_the_wsgi_form_mounted_in_flask_under_waitress(relay: Relay) -> None:
    from flask import Flask
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    from relaymw.admin import admin_wsgi_app

    flask_app = Flask(__name__)

    @flask_app.get("/hello")
    def hello() -> str:
        return "flask here"

    flask_app.wsgi_app = DispatcherMiddleware(  # type: ignore[method-assign]
        flask_app.wsgi_app, {"/relay-admin": admin_wsgi_app(relay, token=ALICE)}
    )
    with serve_wsgi(flask_app) as base:
        assert httpx.get(f"{base}/hello").text == "flask here"
        api = httpx.Client(base_url=f"{base}/relay-admin", headers=bearer(ALICE))
        answer = api.patch(
            "/routes/traffic",
            json={
                "route_id": "chat-production",
                "route_rules": [
                    {"version_tag": "gpt-v1", "weight": 10},
                    {"version_tag": "gpt-v2", "weight": 90},
                ],
            },
        )
        assert answer.status_code == 200, answer.text
        assert stored_weights(relay, "chat-production") == {"gpt-v1": 10, "gpt-v2": 90}
        assert relay.changes()[0]["actor"] == "admin"  # token= is the token named "admin"
        error_of(httpx.get(f"{base}/relay-admin/audit"), 401, "authentication_error")
        error_of(api.get("/routes/traffic/nope"), 404, "not_found")
        spec = httpx.get(f"{base}/relay-admin/openapi.json").json()
        assert spec["servers"] == [{"url": "/relay-admin"}]
        api.close()


def test_the_app_needs_a_token_and_distinct_ones(relay: Relay) -> None:
    with pytest.raises(ValueError, match="needs a token"):
        create_admin_app(relay)
    with pytest.raises(ValueError, match="empty"):
        create_admin_app(relay, tokens={"alice": ""})
    with pytest.raises(ValueError, match="another name"):
        create_admin_app(relay, tokens={"alice": ALICE, "bob": ALICE})
    with pytest.raises(ValueError, match="names it too"):
        create_admin_app(relay, token=ALICE, tokens={"admin": CI_TOKEN})
    with pytest.raises(ValueError):
        create_admin_app(relay, token=ALICE, rate_limit="lots")


def test_relaymw_serve_serves_the_admin_api_under_admin(tmp_path: Path, fake_llm: FakeLLM) -> None:
    path = tmp_path / "relay.toml"
    FileStore(path).save(relay_document(fake_llm.base_url))
    port = free_port()
    env = {**os.environ, "RELAYMW_ADMIN_TOKEN": ALICE, "RELAYMW_ADMIN_TOKENS": f"ci={CI_TOKEN}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaymw", "serve", "--config", str(path), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, (
                "relaymw serve did not start"
            )
            time.sleep(0.1)
        answer = httpx.post(
            f"{base}/admin/routes/traffic/rollback",
            json={"route_id": "chat-production", "version_tag": "gpt-v2"},
            headers=bearer(CI_TOKEN),
        )
        assert answer.status_code == 200, answer.text
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-client", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="chat-production", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-relaymw-version"] == "gpt-v2"
        audit = httpx.get(f"{base}/admin/audit", headers=bearer(ALICE)).json()["entries"]
        assert audit[0]["actor"] == "ci"
        error_of(httpx.get(f"{base}/admin/audit"), 401, "authentication_error")
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=10)
    assert "admin API on" in output and "tokens: admin, ci" in output
    assert ALICE not in output and CI_TOKEN not in output
