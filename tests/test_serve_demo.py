"""`relaymw serve` as a real process, and the demo end to end (short stages)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from relaymw.demo import run_demo
from tests.support import free_port


@pytest.fixture
def served() -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaymw", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(
                    f"relaymw serve did not start: {proc.stdout.read() if proc.stdout else ''}"
                )
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_serve_answers_the_sdk_on_the_embedded_config(served: str) -> None:
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="any", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="chat-production",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-user-id": "alice"},
    )
    assert raw.headers["x-relaymw-version"] in ("gpt-4.1-v1", "gpt-4.1-v2")
    assert raw.parse().choices[0].message.content
    missing = httpx.post(f"{served}/v1/chat/completions", json={"model": "nope"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_demo_ramps_the_canary_and_keeps_its_users() -> None:
    summary = run_demo(users=12, stage_seconds=1.0, live=False)
    stages = re.findall(
        r"stage +(\d+)%: +(\d+) requests, canary share +([\d.]+)%.*kept (\d+)/(\d+)", summary
    )
    assert [int(s[0]) for s in stages] == [5, 25, 50, 100]
    assert all(int(s[1]) > 0 for s in stages)
    assert float(stages[-1][2]) > 90  # at 100% nearly everything reaches the canary
    for _, _, _, kept, had in stages:
        assert kept == had  # raising the canary never takes it away from a user who had it
