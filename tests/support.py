"""Test support: real servers on 127.0.0.1 (uvicorn for ASGI, waitress for WSGI), configuration
documents pointed at a FakeLLM, and a signal recorder."""

from __future__ import annotations

import contextlib
import copy
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from relaymw.testing import serve_asgi


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def serve_wsgi(app: Any) -> Iterator[str]:
    from waitress.server import create_server

    server = create_server(app, host="127.0.0.1", port=0, threads=8)
    port = server.socket.getsockname()[1]  # type: ignore[union-attr]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        thread.join(10)


UPSTREAM_KEY = "sk-upstream-secret-123"


def relay_document(fake_url: str, **route_overrides: Any) -> dict[str, Any]:
    """Two routes: ``chat-production`` (OpenAI, 50/50) and ``review-production`` (Anthropic,
    90/10), both sticky by cookie; the review route covers ``/api/review`` in-app."""
    doc: dict[str, Any] = {
        "upstreams": {
            "openai": {
                "base_url": f"{fake_url}/v1",
                "api_key": UPSTREAM_KEY,
                "protocol": "openai",
                "timeout_seconds": 5,
            },
            "anthropic": {
                "base_url": fake_url,
                "api_key": UPSTREAM_KEY,
                "protocol": "anthropic",
                "timeout_seconds": 5,
            },
        },
        "versions": [
            {
                "version_tag": "gpt-v1",
                "model": "openai/gpt-4.1",
                "upstream_endpoint": "openai",
                "parameters": {"temperature": 0.7, "max_tokens": 256},
                "system_prompt": "You are v1.",
            },
            {
                "version_tag": "gpt-v2",
                "model": "gpt-4.1-mini",
                "upstream_endpoint": "openai",
                "parameters": {"temperature": 0.1},
            },
            {
                "version_tag": "claude-v1",
                "model": "anthropic/claude-sonnet-4-5",
                "upstream_endpoint": "anthropic",
                "parameters": {"max_tokens": 512},
                "system_prompt": "You review code.",
            },
            {
                "version_tag": "claude-v2",
                "model": "claude-sonnet-4-5-20250929",
                "upstream_endpoint": "anthropic",
                "parameters": {"max_tokens": 512},
            },
        ],
        "routes": [
            {
                "model_alias": "chat-production",
                "route_rules": [
                    {"version_tag": "gpt-v1", "weight": 50},
                    {"version_tag": "gpt-v2", "weight": 50},
                ],
                "sticky_sessions": {"enabled": True, "cookie_name": "relay_chat"},
            },
            {
                "model_alias": "review-production",
                "route_rules": [
                    {"version_tag": "claude-v1", "weight": 90},
                    {"version_tag": "claude-v2", "weight": 10},
                ],
                "sticky_sessions": {"enabled": True, "cookie_name": "relay_review"},
                "paths": ["/api/review"],
            },
        ],
    }
    for alias, changes in route_overrides.items():
        for route in doc["routes"]:
            if route["model_alias"] == alias.replace("_", "-"):
                route.update(copy.deepcopy(changes))
    return doc


class Recorder:
    """Collects a signal's events; connect it strongly and disconnect after the test."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, sender: Any, **event: Any) -> None:
        with self.lock:
            self.events.append(event)

    def wait_for(self, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.events) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.events)


__all__ = ["Recorder", "free_port", "relay_document", "serve_asgi", "serve_wsgi"]
