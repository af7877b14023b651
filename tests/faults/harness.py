"""What the fault tests share: a load generator, gateway documents and checks of the error
shapes each protocol uses. The ``redis-server`` and the document server of the test's own are
in ``tests/support.py``."""

from __future__ import annotations

import copy
import itertools
import threading
import time
from typing import Any

import httpx

from tests.support import DocumentServer, not_found, relay_document, wait_until

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
# Each protocol's route: (path, alias).
PROTOCOLS = {"openai": (CHAT, "chat-production"), "anthropic": (MESSAGES, "review-production")}
# The disconnect test's gateway process (stream_gateway_app.py): its config file, its stats.
CONFIG_ENV = "RELAYMW_FAULTS_CONFIG"
STATS_PATH = "/_faults/stats"


def gateway_document(
    fake_url: str, chat: tuple[float, float] = (100, 0), timeout: float = 5.0
) -> dict[str, Any]:
    """:func:`relay_document` without stickiness (so weights alone decide), the review route
    on claude-v1 only, the chat route at ``chat`` (gpt-v1, gpt-v2) and short upstream
    timeouts."""
    doc = relay_document(fake_url)
    for upstream in doc["upstreams"].values():
        upstream["timeout_seconds"] = timeout
        upstream["connect_timeout_seconds"] = 1
    weights = {"chat-production": chat, "review-production": (100, 0)}
    for route in doc["routes"]:
        first, second = route["route_rules"]
        first["weight"], second["weight"] = weights[route["model_alias"]]
        route["sticky_sessions"] = {"enabled": False}
    return doc


def with_chat_weights(doc: dict[str, Any], v1: float, v2: float) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    rules = doc["routes"][0]["route_rules"]
    rules[0]["weight"], rules[1]["weight"] = v1, v2
    return doc


def request_body(protocol: str, text: str = "hello", stream: bool = False) -> dict[str, Any]:
    alias = PROTOCOLS[protocol][1]
    body: dict[str, Any] = {"model": alias, "messages": [{"role": "user", "content": text}]}
    if protocol == "anthropic":
        body["max_tokens"] = 64
    if stream:
        body["stream"] = True
    return body


# --- error shapes ---------------------------------------------------------------------------

_ANTHROPIC_TYPE = {502: "api_error", 503: "overloaded_error", 504: "timeout_error"}


def assert_error_shape(protocol: str, status: int, body: Any, code: str) -> None:
    """``body`` is the exact error document the protocol's clients expect, with ``code``."""
    if protocol == "anthropic":
        assert isinstance(body, dict) and set(body) == {"type", "error"}, body
        assert body["type"] == "error", body
        err = body["error"]
        assert set(err) == {"type", "message", "code"}, body
        assert err["type"] == _ANTHROPIC_TYPE[status], body
    else:
        assert isinstance(body, dict) and set(body) == {"error"}, body
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}, body
        assert err["type"] == "server_error" and err["param"] is None, body
    assert err["code"] == code, body
    assert isinstance(err["message"], str) and err["message"], body
    assert "Traceback" not in err["message"], body


# --- load --------------------------------------------------------------------------------------


class Outcome:
    __slots__ = ("body", "done", "identity", "path", "sent", "status", "version")

    def __init__(self, path: str, identity: str, sent: float) -> None:
        self.path, self.identity, self.sent = path, identity, sent
        self.done = 0.0
        self.status = 0  # 0: no HTTP answer at all (a transport error)
        self.body: Any = None
        self.version: str | None = None

    @property
    def protocol(self) -> str:
        return "anthropic" if self.path == MESSAGES else "openai"


class Load:
    """``threads`` clients sending requests back to back, alternating OpenAI chat and
    Anthropic messages, each with a new ``x-user-id``; every outcome is kept."""

    def __init__(self, base_url: str, threads: int = 4) -> None:
        self.base_url = base_url
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ids = itertools.count()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(15)
        return self.outcomes

    def _run(self, worker: int) -> None:
        # Odd workers start with Anthropic, so both protocols are in flight at every moment.
        protocols = itertools.cycle(
            ["anthropic", "openai"] if worker % 2 else ["openai", "anthropic"]
        )
        with httpx.Client(base_url=self.base_url, timeout=10) as client:
            while not self._stop.is_set():
                protocol = next(protocols)
                path = PROTOCOLS[protocol][0]
                identity = f"load-{next(self._ids)}"
                outcome = Outcome(path, identity, time.monotonic())
                try:
                    r = client.post(
                        path, json=request_body(protocol), headers={"x-user-id": identity}
                    )
                    outcome.status = r.status_code
                    outcome.version = r.headers.get("x-relaymw-version")
                    try:
                        outcome.body = r.json()
                    except ValueError:
                        outcome.body = r.text
                except httpx.TransportError as exc:
                    outcome.body = repr(exc)
                outcome.done = time.monotonic()
                with self._lock:
                    self.outcomes.append(outcome)

    def between(self, start: float, end: float) -> list[Outcome]:
        """Outcomes sent and answered within ``[start, end]``."""
        with self._lock:
            return [o for o in self.outcomes if o.sent >= start and o.done <= end]

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)


# The fault tests import the shared helpers from here too, with the fault-only ones.
__all__ = [
    "CHAT",
    "CONFIG_ENV",
    "MESSAGES",
    "PROTOCOLS",
    "STATS_PATH",
    "DocumentServer",
    "Load",
    "Outcome",
    "assert_error_shape",
    "gateway_document",
    "not_found",
    "request_body",
    "wait_until",
    "with_chat_weights",
]
