"""The release an operator runs from a script, against a live service (issue 6, Must show).

A FastAPI app serves its own endpoint, relays LLM calls with ``RelayMiddleware`` and mounts
the admin API at ``/relay-admin``, under uvicorn. Users keep calling it through the openai
SDK the whole time (a background thread). The operator's script, written with ``requests``
as one would by hand, registers v1 and v2, splits 95/5 with sticky sessions and a health
check, reads both versions' metrics, moves to 25% and rolls back to v1; after each change,
every response the users get carries the version the new weights give them.
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from fastapi import FastAPI

from relaymw import Relay, RelayMiddleware
from relaymw.routing import bucket
from relaymw.stores import FileStore
from relaymw.testing import FakeLLM, serve_asgi

TOKEN = "ops-token-5c1f0e9a7d3b"
ALIAS = "code-review-production"
USERS = 200


class Traffic(threading.Thread):
    """Users calling the app through the openai SDK, one after another, until stopped.

    Each record is ``(phase, user, version)``; ``phase`` is what the operator had announced
    when the request started, so requests of phase N all started after change N returned.
    """

    def __init__(self, base_url: str) -> None:
        super().__init__(daemon=True)
        # One SDK client for many users: it must not carry one user's sticky cookie to the
        # next, so its cookie jar accepts none (each user is sticky by x-user-id).
        no_cookies = http.cookiejar.CookieJar(
            http.cookiejar.DefaultCookiePolicy(allowed_domains=[])
        )
        self.client = openai.OpenAI(
            base_url=f"{base_url}/v1",
            api_key="sk-app",
            max_retries=0,
            http_client=openai.DefaultHttpxClient(cookies=no_cookies),
        )
        self.records: list[tuple[int, str, str]] = []
        self.errors: list[BaseException] = []
        self.phase = 0
        self._running = threading.Event()
        self._idle = threading.Event()
        self._stopping = threading.Event()
        self._running.set()

    def run(self) -> None:
        sent = 0
        while not self._stopping.is_set():
            if not self._running.is_set():
                self._idle.set()
                time.sleep(0.01)
                continue
            phase, user = self.phase, f"user-{sent % USERS}"
            try:
                raw = self.client.chat.completions.with_raw_response.create(
                    model=ALIAS,
                    messages=[{"role": "user", "content": "review this diff"}],
                    extra_headers={"x-user-id": user},
                )
                self.records.append((phase, user, raw.headers["x-relaymw-version"]))
            except Exception as exc:
                self.errors.append(exc)
            sent += 1

    def wait_for(self, phase: int, count: int, timeout: float = 60) -> list[tuple[str, str]]:
        deadline = time.monotonic() + timeout
        while True:
            seen = [(user, tag) for p, user, tag in self.records if p == phase]
            if len(seen) >= count or time.monotonic() > deadline or self.errors:
                assert not self.errors, self.errors
                assert len(seen) >= count, f"only {len(seen)} requests in phase {phase}"
                return seen
            time.sleep(0.02)

    @contextlib.contextmanager
    def paused(self) -> Iterator[Counter[str]]:
        """No request in flight meanwhile; yields the versions served so far."""
        self._idle.clear()
        self._running.clear()
        self._idle.wait(10)
        try:
            yield Counter(tag for _, _, tag in self.records)
        finally:
            self._running.set()

    def stop(self) -> None:
        self._stopping.set()
        self.join(10)


def expected(user: str, canary_share: float) -> str:
    """The version a sticky key gets (SPEC §4): stable first, canary last, by basis points."""
    return "review-v2" if bucket(ALIAS, user) > round((100 - canary_share) * 100) else "review-v1"


@pytest.fixture
def service(tmp_path: Path, fake_llm: FakeLLM) -> Iterator[str]:
    """The FastAPI app; its configuration starts with upstreams only."""
    path = tmp_path / "relay.toml"
    FileStore(path).save(
        {
            "upstreams": {
                "openai": {
                    "base_url": f"{fake_llm.base_url}/v1",
                    "api_key": "sk-upstream-secret",
                    "protocol": "openai",
                }
            }
        }
    )
    relay = Relay.from_store(path)
    app = FastAPI()

    @app.get("/api/status")
    def status() -> dict[str, str]:
        return {"service": "code-review"}

    app.add_middleware(RelayMiddleware, relay=relay)
    app.mount("/relay-admin", relay.admin_app(token=TOKEN))
    try:
        with serve_asgi(app) as url:
            yield url
    finally:
        relay.close()


def test_an_operator_script_drives_a_release_under_live_traffic(service: str) -> None:
    admin = f"{service}/relay-admin"
    ops = requests.Session()
    ops.headers["Authorization"] = f"Bearer {TOKEN}"

    # 1. Register the two versions.
    for tag, model, prompt in (
        ("review-v1", "openai/gpt-4.1", "You review code."),
        ("review-v2", "openai/gpt-4.1", "You review code, briefly and kindly."),
    ):
        r = ops.post(
            f"{admin}/models/versions",
            json={
                "version_tag": tag,
                "model": model,
                "upstream_endpoint": "openai",
                "parameters": {"temperature": 0.2, "max_tokens": 512},
                "system_prompt": prompt,
            },
        )
        assert r.status_code == 201, r.text
        assert r.json()["version_id"].startswith("sha256:")

    # 2. Split 95/5, sticky per user, with a health check.
    r = ops.post(
        f"{admin}/routes/traffic",
        json={
            "model_alias": ALIAS,
            "route_rules": [
                {"version_tag": "review-v1", "weight": 95},
                {"version_tag": "review-v2", "weight": 5},
            ],
            "sticky_sessions": {"enabled": True, "key": "header:x-user-id"},
            "health_check": {
                "enabled": True,
                "error_rate_threshold": 0.05,
                "latency_p99_threshold_ms": 3000,
                "auto_rollback": True,
            },
        },
    )
    assert r.status_code == 201, r.text
    assert r.json()["active_version"] == "review-v1"
    assert requests.get(f"{service}/api/status").json() == {"service": "code-review"}

    traffic = Traffic(service)
    traffic.start()
    try:
        at_5 = traffic.wait_for(0, USERS)
        assert all(tag == expected(user, 5) for user, tag in at_5)
        canary_users = {user for user, tag in at_5 if tag == "review-v2"}
        assert 0 < len(canary_users) < 0.15 * USERS

        # 3. Read both versions' metrics (traffic paused so the counts can be compared).
        with traffic.paused() as served:
            for tag in ("review-v1", "review-v2"):
                figures = read_metrics(ops, admin, tag, served[tag])
                assert figures["error_rate"] == 0 and figures["latency_p99_ms"] > 0
                assert figures["total_cost_usd"] > 0 and figures["cost_per_token"] > 0

        # 4. Move the canary to 25%.
        r = ops.patch(
            f"{admin}/routes/traffic",
            json={
                "route_id": ALIAS,
                "route_rules": [
                    {"version_tag": "review-v1", "weight": 75},
                    {"version_tag": "review-v2", "weight": 25},
                ],
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "updated" and r.json()["active_version"] == "review-v1"
        traffic.phase = 1
        at_25 = traffic.wait_for(1, USERS)
        assert all(tag == expected(user, 25) for user, tag in at_25)
        shares = Counter(tag for _, tag in at_25)
        assert 0.15 < shares["review-v2"] / len(at_25) < 0.35
        # Raising the canary kept every user who already had it.
        assert canary_users <= {user for user, tag in at_25 if tag == "review-v2"}

        # 5. Roll back to v1.
        r = ops.post(
            f"{admin}/routes/traffic/rollback", json={"route_id": ALIAS, "version_tag": "review-v1"}
        )
        assert r.status_code == 200, r.text
        assert r.json() == {
            "status": "rolled_back",
            "route_id": ALIAS,
            "active_version": "review-v1",
            "route_rules": [
                {"version_tag": "review-v1", "weight": 100},
                {"version_tag": "review-v2", "weight": 0},
            ],
        }
        traffic.phase = 2
        after = traffic.wait_for(2, USERS // 2)
        assert {tag for _, tag in after} == {"review-v1"}
    finally:
        traffic.stop()
    assert not traffic.errors, traffic.errors

    # The change log tells the story, under the token's name.
    entries = ops.get(f"{admin}/audit").json()["entries"]
    assert [(e["action"], e["target"]) for e in reversed(entries)] == [
        ("register-version", "version:review-v1"),
        ("register-version", "version:review-v2"),
        ("put-route", f"route:{ALIAS}"),
        ("set-weights", f"route:{ALIAS}"),
        ("rollback", f"route:{ALIAS}"),
    ]
    assert {e["actor"] for e in entries} == {"admin"}


def read_metrics(ops: requests.Session, admin: str, tag: str, served: int) -> dict[str, Any]:
    """The version's figures once they count every response its users got."""
    deadline = time.monotonic() + 5
    while True:
        r = ops.get(
            f"{admin}/metrics/versions",
            params={"version_tag": tag, "route_id": ALIAS, "start_time": "2020-01-01T00:00:00Z"},
        )
        assert r.status_code == 200, r.text
        (entry,) = r.json()["versions"]
        figures: dict[str, Any] = entry["metrics"]
        if figures["request_count"] == served or time.monotonic() > deadline:
            assert figures["request_count"] == served
            return figures
        time.sleep(0.05)
