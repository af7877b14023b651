"""`relaymw serve` as a real process, and the demo end to end (short stages)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from relaymw import signals
from relaymw.demo import ALIAS, run_demo, user_ids
from relaymw.routing import bucket
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


def test_demo_ramps_the_canary_and_keeps_its_users(capfd: pytest.CaptureFixture[str]) -> None:
    answered: Counter[tuple[str, int]] = Counter()

    def record(sender: object, **event: Any) -> None:
        answered[event["mode"], event["status"]] += 1

    signals.request_finished.connect(record)
    try:
        summary = run_demo(users=20, stage_seconds=1.0, live=False)
    finally:
        signals.request_finished.disconnect(record)
    # Half the users' calls go through the app's own endpoint (in-app mode), half through
    # the gateway; both answer (the canary's 1% of 503s aside).
    for mode in ("gateway", "in_app"):
        ok = answered[mode, 200]
        assert ok > 50 and ok >= 0.9 * sum(n for (m, _), n in answered.items() if m == mode)
    stages = re.findall(
        r"stage +(\d+)%: +(\d+) requests, canary share +([\d.]+)%.*kept (\d+)/(\d+); "
        r"analysis passed: error rate [\d.]+% \(\d+/(\d+)\)",
        summary,
    )
    assert [int(s[0]) for s in stages] == [5, 25, 50, 100]
    assert all(int(s[1]) > 0 for s in stages)
    assert all(int(s[5]) >= 8 for s in stages)  # each stage judged on its request minimum
    assert float(stages[-1][2]) > 90  # at 100% nearly everything reaches the canary
    for _, _, _, kept, had, _ in stages:
        assert kept == had  # raising the canary never takes it away from a user who had it
    # The canary's 503s reach the in-app endpoint too: passed on, never a traceback.
    assert "Traceback" not in capfd.readouterr().err


def test_demo_users_spread_evenly_so_a_5_percent_canary_has_one() -> None:
    for count in (20, 40, 137):
        ids = user_ids(count)
        assert len(set(ids)) == count
        slices = sorted((bucket(ALIAS, u) - 1) * count // 10_000 for u in ids)
        assert slices == list(range(count))
    top = [u for u in user_ids(20) if bucket(ALIAS, u) > 9_500]
    assert len(top) == 1  # the one user a 5% canary reaches
    with pytest.raises(ValueError, match="20 to"):
        run_demo(users=19)
