"""The operator commands as real processes (`python -m relaymw ...`): against a file store,
against a served admin API, and rollouts driven from the command line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from relaymw import Relay, RelayMiddleware
from relaymw.config import load_document
from relaymw.stores import FileStore
from relaymw.stores.file import dump_document
from relaymw.testing import FakeLLM, serve_asgi
from tests.rollout_support import CANARY, CANARY_MODEL, STABLE, Traffic, rollout_document

TOKEN = "cli-admin-token-0123456789"
ALIAS = "chat-production"


def relaymw(
    *args: str, timeout: float = 90, token: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RELAYMW_ADMIN_TOKEN", None)
    if token is not None:
        env["RELAYMW_ADMIN_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "relaymw", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def route_weights(path: Path, alias: str = ALIAS) -> dict[str, float]:
    doc = load_document(str(path))
    route = next(r for r in doc["routes"] if r["model_alias"] == alias)
    return {r["version_tag"]: r["weight"] for r in route["route_rules"]}


def write_config(path: Path, doc: dict[str, Any]) -> Path:
    path.write_bytes(dump_document(doc, "toml"))
    return path


@pytest.fixture
def config(tmp_path: Path, fake_llm: FakeLLM) -> Path:
    return write_config(tmp_path / "relay.toml", rollout_document(fake_llm.base_url))


@pytest.fixture
def served(config: Path) -> Iterator[tuple[Relay, str]]:
    """A served app on ``config``: the gateway, and the admin API under /relay-admin."""
    relay = Relay.from_store(FileStore(config, poll_interval=0.1))
    app = Starlette(routes=[Mount("/relay-admin", app=relay.admin_app(token=TOKEN))])
    app.add_middleware(RelayMiddleware, relay=relay)
    try:
        with serve_asgi(app) as url:
            yield relay, url
    finally:
        relay.close()


def test_set_weights_rollback_and_status_on_a_file_store(config: Path) -> None:
    done = relaymw("set-weights", ALIAS, f"{STABLE}=75", f"{CANARY}=25", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"{ALIAS}: {STABLE}=75 {CANARY}=25 (was {STABLE}=100 {CANARY}=0; active: {STABLE})"
    )
    assert route_weights(config) == {STABLE: 75, CANARY: 25}

    status = relaymw("status", ALIAS, "--config", str(config))
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == f"route {ALIAS} (active: {STABLE})"
    assert lines[2].split()[:3] == [STABLE, "75%", "0"]
    assert lines[3].split()[:3] == [CANARY, "25%", "0"]
    assert "review-production" not in status.stdout  # only the route asked for
    assert "note: metrics are this process's only" in status.stdout

    back = relaymw("rollback", ALIAS, STABLE, "--config", str(config))
    assert back.returncode == 0, back.stderr
    assert back.stdout.strip() == f"{ALIAS}: rolled back to {STABLE}: {STABLE}=100 {CANARY}=0"
    assert route_weights(config) == {STABLE: 100, CANARY: 0}

    # The change log says who did what.
    log = [json.loads(line) for line in Path(f"{config}.changes.jsonl").read_text().splitlines()]
    assert [e["action"] for e in log] == ["set-weights", "rollback"]
    assert all(e["actor"].startswith("cli") for e in log)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["set-weights", ALIAS, "gpt-v1=60", "gpt-v2=45"],
            "sum to 105, not 100 (normalised: gpt-v1=57.14, gpt-v2=42.86)",
        ),
        (["set-weights", "nope", "gpt-v1=100"], "unknown route 'nope'"),
        (["set-weights", ALIAS, "gpt-v9=100"], "unknown version tag(s): gpt-v9"),
        (["set-weights", ALIAS, "gpt-v1:100"], "expected TAG=WEIGHT"),
        (["rollback", ALIAS, "claude-v1"], "'claude-v1' is not one of its rules"),
        (["rollout", ALIAS, "--to", "gpt-v9"], "unknown version tag 'gpt-v9'"),
        (["rollout", ALIAS, "--to", CANARY, "--stages", "50,25"], "stages must increase"),
        (["rollout", ALIAS, "--to", CANARY, "--interval", "soon"], "not a duration: 'soon'"),
    ],
)
def test_refusals_on_a_file_store_change_nothing(
    config: Path, args: list[str], message: str
) -> None:
    before = config.read_bytes()
    done = relaymw(*args, "--config", str(config))
    assert done.returncode == 2
    assert message in done.stderr
    assert config.read_bytes() == before
    reader = Relay.from_store(str(config), watch=False)
    assert reader.read_state(f"rollout:{ALIAS}") is None
    reader.close()


def test_a_target_is_required_and_admin_needs_a_token(config: Path) -> None:
    neither = relaymw("status")
    assert (
        neither.returncode == 2 and "give either --config FILE|URI or --admin URL" in neither.stderr
    )
    no_token = relaymw("status", "--admin", "http://127.0.0.1:9")
    assert no_token.returncode == 2 and "RELAYMW_ADMIN_TOKEN" in no_token.stderr
    missing = relaymw("status", "--config", str(config.with_name("missing.toml")))
    assert missing.returncode == 2 and "cannot open" in missing.stderr


def test_commands_against_a_served_admin_api(served: tuple[Relay, str]) -> None:
    relay, url = served
    admin = f"{url}/relay-admin"
    with Traffic(url):
        time.sleep(0.5)
    status = relaymw("status", "--admin", admin, "--json", token=TOKEN)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    chat = next(r for r in report["routes"] if r["model_alias"] == ALIAS)
    stable = next(v for v in chat["versions"] if v["version_tag"] == STABLE)
    assert stable["weight"] == 100 and stable["metrics"]["request_count"] > 0
    assert stable["metrics"]["error_rate"] == 0 and stable["metrics"]["latency_p99_ms"] > 0
    assert report["metrics_note"] is None
    plain = relaymw("status", ALIAS, "--admin", admin, token=TOKEN)
    assert plain.returncode == 0 and f"route {ALIAS} (active: {STABLE})" in plain.stdout

    moved = relaymw(
        "set-weights", ALIAS, f"{STABLE}=90", f"{CANARY}=10", "--admin", admin, "--token", TOKEN
    )
    assert moved.returncode == 0, moved.stderr
    weights = {r.version_tag: r.weight for r in relay.snapshot.routes[ALIAS].route.route_rules}
    assert weights == {STABLE: 90, CANARY: 10}
    back = relaymw("rollback", ALIAS, STABLE, "--admin", admin, token=TOKEN)
    assert back.returncode == 0, back.stderr
    weights = {r.version_tag: r.weight for r in relay.snapshot.routes[ALIAS].route.route_rules}
    assert weights == {STABLE: 100, CANARY: 0}
    assert [e["actor"] for e in relay.changes()[:2]] == ["admin", "admin"]

    wrong = relaymw("status", "--admin", admin, token="not-the-token")
    assert wrong.returncode == 1 and "refused the token (401)" in wrong.stderr
    for done in (status, plain, moved, back, wrong):
        assert TOKEN not in done.stdout + done.stderr
        assert "not-the-token" not in done.stdout + done.stderr


ROLLOUT = (
    "--stages",
    "5,25,50,100",
    "--interval",
    "0.7",
    "--min-requests",
    "5",
    "--max-error-rate",
    "20%",
)


def test_rollout_from_the_command_line_goes_to_100_then_rolls_back_a_failing_canary(
    served: tuple[Relay, str], fake_llm: FakeLLM
) -> None:
    relay, url = served
    admin = f"{url}/relay-admin"
    with Traffic(url):
        good = relaymw("rollout", ALIAS, "--to", CANARY, *ROLLOUT, "--admin", admin, token=TOKEN)
    assert good.returncode == 0, good.stdout + good.stderr
    out = good.stdout
    assert out.splitlines()[0].startswith(
        f"rollout of {ALIAS} to {CANARY}: stages 5, 25, 50, 100 %"
    )
    for n, weight in enumerate((5, 25, 50, 100), 1):
        assert f"stage {n}/4 ({weight}%): {CANARY} at {weight}%" in out
        assert f"stage {n}/4 ({weight}%) passed: error rate 0.0%" in out
    assert "rollout succeeded: all 4 stages passed; gpt-v2 at 100%" in out
    assert relay.read_state(f"rollout:{ALIAS}")["status"] == "succeeded"  # type: ignore[index]

    # The next release of the same canary fails: it is rolled back and the CLI says why.
    relaymw("set-weights", ALIAS, f"{STABLE}=100", f"{CANARY}=0", "--admin", admin, token=TOKEN)
    fake_llm.set(CANARY_MODEL, status=503, error_rate=1.0)
    with Traffic(url):
        bad = relaymw("rollout", ALIAS, "--to", CANARY, *ROLLOUT, "--admin", admin, token=TOKEN)
    assert bad.returncode == 3, bad.stdout + bad.stderr
    assert "rollout ROLLED BACK: stage 1/4 (5%) failed: error rate 100.0%" in bad.stderr
    assert "is above the limit of 20.0%; rolled back to gpt-v1=100, gpt-v2=0" in bad.stderr
    weights = {r.version_tag: r.weight for r in relay.snapshot.routes[ALIAS].route.route_rules}
    assert weights == {STABLE: 100, CANARY: 0}
    status = relaymw("status", ALIAS, "--admin", admin, token=TOKEN)
    assert f"rollout to {CANARY} (rolled_back): stage 1/4 (5%) failed" in status.stdout


@contextlib.contextmanager
def _ctrl_c_as_in_a_terminal() -> Iterator[None]:
    """Children started here do not inherit an ignored SIGINT. A shell without job control
    starts a background job (`.ci/run ... &`) with SIGINT ignored, every child inherits that,
    and Python then installs no KeyboardInterrupt handler: the rollout under test would never
    see the Ctrl-C the test sends. A handled signal is reset to its default by exec."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_rollout_interrupted_with_ctrl_c_resumes_with_the_same_command(config: Path) -> None:
    # No traffic and no minimum: each stage passes on time, on the file store alone.
    args = [
        sys.executable, "-m", "relaymw", "rollout", ALIAS, "--to", CANARY, "--interval", "1",
        "--min-requests", "0", "--config", str(config),
    ]  # fmt: skip
    with _ctrl_c_as_in_a_terminal():
        proc = subprocess.Popen(
            args,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("stage 2/4 (25%): "):
            break
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, "".join(lines) + out + err
    assert "interrupted at stage 2/4" in err and "run the same command again to resume" in err
    reader = Relay.from_store(str(config), watch=False)
    state = reader.read_state(f"rollout:{ALIAS}")
    reader.close()
    assert state is not None and state["status"] == "running" and state["stage_index"] == 1
    assert route_weights(config) == {STABLE: 75, CANARY: 25}

    status = relaymw("status", ALIAS, "--config", str(config))
    assert f"rollout to {CANARY} (running): stage 2/4 at 25%" in status.stdout

    again = relaymw(*args[3:])
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.startswith(
        f"resuming the rollout of {ALIAS} to {CANARY} at stage 2/4 (25%)"
    )
    assert "stage 1/4" not in again.stdout
    assert "stage 2/4 (25%) passed" in again.stdout and "stage 4/4 (100%) passed" in again.stdout
    assert route_weights(config) == {STABLE: 0, CANARY: 100}


def test_rollout_on_the_store_reads_the_serving_metrics_through_redis(
    tmp_path: Path, fake_llm: FakeLLM, redis_url: str
) -> None:
    # --config acts from another process: it sees the serving process's figures only
    # because [metrics] storage_uri is Redis. A fresh alias keeps other tests' series apart.
    alias = f"chat-{uuid.uuid4().hex[:8]}"
    doc = rollout_document(fake_llm.base_url)
    doc["routes"][0]["model_alias"] = alias  # type: ignore[index]
    doc["metrics"] = {"bucket_seconds": 1, "storage_uri": redis_url}
    config = write_config(tmp_path / "relay.toml", doc)
    relay = Relay.from_store(FileStore(config, poll_interval=0.1))
    app = RelayMiddleware(Starlette(), relay=relay)
    try:
        with serve_asgi(app) as url, Traffic(url, alias=alias):
            done = relaymw(
                "rollout", alias, "--to", CANARY, "--stages", "50,100", "--interval", "2",
                "--min-requests", "5", "--config", str(config),
            )  # fmt: skip
    finally:
        relay.close()
    assert done.returncode == 0, done.stdout + done.stderr
    passed = [line for line in done.stdout.splitlines() if " passed: " in line]
    assert len(passed) == 2 and all("error rate 0.0% (0/" in line for line in passed)
    counts = [int(line.split("(0/")[1].split(")")[0]) for line in passed]
    assert all(n >= 5 for n in counts)
    assert route_weights(config, alias) == {STABLE: 0, CANARY: 100}
