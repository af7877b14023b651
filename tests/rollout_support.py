"""Shared by the rollout tests: a route for canaries, and live traffic from the openai SDK."""

from __future__ import annotations

import threading
from collections import Counter

import openai

from tests.support import relay_document

ALIAS, STABLE, CANARY = "chat-production", "gpt-v1", "gpt-v2"
CANARY_MODEL = "gpt-4.1-mini"  # what gpt-v2 asks FakeLLM for


def rollout_document(fake_url: str) -> dict[str, object]:
    """chat-production all on gpt-v1, no stickiness (every request drawn by weight, so a 5%
    canary gets 5% of requests), one-second metric buckets for short stages."""
    doc = relay_document(
        fake_url,
        chat_production={
            "route_rules": [
                {"version_tag": STABLE, "weight": 100},
                {"version_tag": CANARY, "weight": 0},
            ],
            "sticky_sessions": {"enabled": False},
        },
    )
    doc["metrics"] = {"bucket_seconds": 1}
    return doc


class Traffic:
    """SDK clients calling the gateway in a loop from threads; counts versions answered."""

    def __init__(self, base_url: str, threads: int = 4, alias: str = ALIAS) -> None:
        self.base_url, self.alias = base_url, alias
        self.seen: Counter[tuple[str, int]] = Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def _loop(self) -> None:
        client = openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="client", max_retries=0)
        while not self.stop.is_set():
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=self.alias, messages=[{"role": "user", "content": "hi"}]
                )
                version, status = raw.headers.get("x-relaymw-version", "?"), raw.status_code
            except openai.APIStatusError as exc:
                version = exc.response.headers.get("x-relaymw-version", "?")
                status = exc.status_code
            except openai.APIConnectionError:
                version, status = "?", 0
            with self.lock:
                self.seen[(version, status)] += 1

    def snapshot(self) -> Counter[tuple[str, int]]:
        with self.lock:
            return Counter(self.seen)
