"""The examples, each run as users run them: a real server in a subprocess (uvicorn, waitress or
gunicorn) on a free port, its upstreams pointed at the test's FakeLLM through the environment,
driven by the official OpenAI and Anthropic SDKs and by a cookie-keeping HTTP client."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import anthropic
import attrs
import httpx
import openai
import pytest

from relaymw import Relay
from relaymw.config import RelayConfig, build_config, load_document
from relaymw.routing import CookieCodec, RouteTable
from relaymw.testing import FakeLLM
from tests.support import Recorder, free_port

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CONFIG = EXAMPLES / "relay.toml"

# What the subprocesses get in their environment, so the test can see it arrive upstream.
OPENAI_KEY = "sk-example-openai"
ANTHROPIC_KEY = "sk-example-anthropic"
COOKIE_SECRET = "example-cookie-secret"

REVIEW_TAGS = ("claude-sonnet-4.5-v1", "claude-sonnet-4.5-v2")
CHAT_TAGS = ("gpt-4.1-v1", "gpt-4.1-mini-v1")

# name -> the command that serves it, given a port ("{port}" is filled in).
COMMANDS: dict[str, list[str]] = {
    "fastapi": [
        *(sys.executable, "-m", "uvicorn", "examples.fastapi_app:app"),
        *("--host", "127.0.0.1", "--port", "{port}"),
    ],
    "flask": [
        *(sys.executable, "-m", "waitress", "--listen=127.0.0.1:{port}", "--threads=8"),
        "examples.flask_app:app",
    ],
    "django-wsgi": [
        *(sys.executable, "-m", "gunicorn", "--bind", "127.0.0.1:{port}", "--threads", "8"),
        *("--no-control-socket", "--graceful-timeout", "2"),
        "examples.django_project.wsgi:application",
    ],
    "django-asgi": [
        *(sys.executable, "-m", "uvicorn", "examples.django_project.asgi:application"),
        *("--host", "127.0.0.1", "--port", "{port}"),
    ],
}


@attrs.define
class Server:
    name: str
    url: str
    log: Path  # the server's stdout and stderr

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def config() -> RelayConfig:
    """The example configuration as the servers see it (defaults for unset variables)."""
    return build_config(load_document(CONFIG), environ={"RELAYMW_UPSTREAM_URL": "http://x"})


def system_prompts() -> dict[str, str]:
    return {v.version_tag: v.system_prompt or "" for v in config().versions}


def route_table(alias: str) -> RouteTable:
    route = next(r for r in config().routes if r.model_alias == alias)
    return RouteTable.build(alias, ((r.version_tag, r.weight) for r in route.route_rules))


def user_on(alias: str, tag: str) -> str:
    """A user id whose sticky-key hash lands on ``tag`` of route ``alias``."""
    table = route_table(alias)
    return next(f"user-{i}" for i in range(100_000) if table.for_key(f"user-{i}") == tag)


def _wait_until_up(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server did not answer within 30 s:\n{log.read_text()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's own process group (gunicorn's workers included), then SIGKILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@contextlib.contextmanager
def serving(
    commands: dict[str, list[str]],
    fake: FakeLLM,
    tmp: Path,
    config_path: Path | None = None,
) -> Iterator[dict[str, Server]]:
    """Run each named command in a subprocess (all starting at once) until the block ends."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
        "RELAYMW_UPSTREAM_URL": fake.base_url,
        "OPENAI_API_KEY": OPENAI_KEY,
        "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
        "RELAYMW_COOKIE_SECRET": COOKIE_SECRET,
        "RELAYMW_PRINT_METRICS": "1",  # only the FastAPI example reads it
    }
    env.pop("RELAYMW_CONFIG", None)  # each example finds relay.toml beside itself...
    if config_path is not None:
        env["RELAYMW_CONFIG"] = str(config_path)  # ...unless told otherwise
    procs: list[subprocess.Popen[bytes]] = []
    servers: dict[str, Server] = {}
    try:
        for name, argv in commands.items():
            port = free_port()
            server = servers[name] = Server(name, f"http://127.0.0.1:{port}", tmp / f"{name}.log")
            with server.log.open("wb") as out:
                procs.append(_popen([a.format(port=port) for a in argv], env, out))
        for proc, server in zip(procs, servers.values(), strict=True):
            _wait_until_up(proc, server.url, server.log)
        yield servers
    finally:
        for proc in procs:
            _stop(proc)


def _popen(argv: list[str], env: dict[str, str], out: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


@pytest.fixture(scope="module")
def servers(
    fake_llm_session: FakeLLM, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Server]]:
    """Every example under its server, started once for the module."""
    with serving(COMMANDS, fake_llm_session, tmp_path_factory.mktemp("examples")) as running:
        yield running


@pytest.fixture(params=list(COMMANDS))
def server(request: pytest.FixtureRequest, servers: dict[str, Server], fake_llm: FakeLLM) -> Server:
    """Each example in turn, with the FakeLLM reset for the test."""
    return servers[request.param]


@pytest.fixture
def fastapi_server(servers: dict[str, Server]) -> Server:
    return servers["fastapi"]


# --- the configuration ------------------------------------------------------------------------


def test_relay_toml_is_valid_with_defaults() -> None:
    cfg = build_config(load_document(CONFIG), environ={})
    assert cfg.upstreams["openai"].base_url == "http://127.0.0.1:8089/v1"
    assert cfg.upstreams["anthropic"].base_url == "http://127.0.0.1:8089"
    assert cfg.upstreams["openai"].api_key == cfg.upstreams["anthropic"].api_key == "sk-fake"
    routes = {r.model_alias: r for r in cfg.routes}
    review, chat = routes["code-review-production"], routes["chat-production"]
    assert [(r.version_tag, r.weight) for r in review.route_rules] == list(
        zip(REVIEW_TAGS, (95, 5), strict=True)
    )
    assert review.paths == ("/api/review",) and review.sticky_sessions.enabled
    assert review.sticky_sessions.cookie_name == "hs_model_version"
    assert [(r.version_tag, r.weight) for r in chat.route_rules] == list(
        zip(CHAT_TAGS, (90, 10), strict=True)
    )
    assert chat.sticky_sessions.key == "header:x-user-id"
    assert "gpt-4.1-mini" in cfg.pricing
    assert cfg.sticky.secret == ""


def test_relay_toml_takes_urls_and_keys_from_the_environment() -> None:
    env = {
        "RELAYMW_UPSTREAM_URL": "https://llm.internal",
        "OPENAI_API_KEY": "sk-o",
        "ANTHROPIC_API_KEY": "sk-a",
    }
    cfg = build_config(load_document(CONFIG), environ=env)
    assert cfg.upstreams["openai"].base_url == "https://llm.internal/v1"
    assert cfg.upstreams["anthropic"].base_url == "https://llm.internal"
    assert cfg.upstreams["openai"].api_key == "sk-o"
    assert cfg.upstreams["anthropic"].api_key == "sk-a"


def test_relay_toml_passes_relaymw_validate(tmp_path: Path) -> None:
    pytest.importorskip("relaymw.cli", reason="the relaymw CLI is not written yet")

    def validate(path: Path) -> subprocess.CompletedProcess[str]:
        script = "import sys; from relaymw.cli import main; sys.exit(main(sys.argv[1:]))"
        return subprocess.run(
            [sys.executable, "-c", script, "validate", str(path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = validate(CONFIG)
    assert done.returncode == 0, done.stdout + done.stderr
    # The same file with the canary's weight bumped no longer sums to 100: rejected.
    broken = tmp_path / "relay.toml"
    broken.write_text(CONFIG.read_text().replace("weight = 5 }", "weight = 50 }"))
    assert validate(broken).returncode != 0


# --- gateway mode through the official SDKs ---------------------------------------------------


def test_openai_sdk_through_the_gateway(server: Server, fake_llm: FakeLLM) -> None:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="chat-production",
            messages=[{"role": "user", "content": "hello"}],
            extra_headers={"x-user-id": "alice"},
        )
    completion = raw.parse()
    version = raw.headers["x-relaymw-version"]
    assert version == route_table("chat-production").for_key("alice")
    model = "gpt-4.1" if version == "gpt-4.1-v1" else "gpt-4.1-mini"
    assert completion.model == model
    assert completion.choices[0].message.content == FakeLLM.reply_text(model)
    sent = fake_llm.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {OPENAI_KEY}"  # from the environment
    assert sent.body is not None
    assert sent.body["messages"][0] == {"role": "system", "content": system_prompts()[version]}


def test_openai_sticky_key_picks_the_same_version_as_any_other_process(server: Server) -> None:
    # The x-user-id hash is computed here, in the test process, for a user on the 10% canary
    # and one on the stable version: the server must agree.
    for tag in CHAT_TAGS:
        user = user_on("chat-production", tag)
        for _ in range(3):  # a fresh client each time: no cookie, only the header
            with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as c:
                raw = c.chat.completions.with_raw_response.create(
                    model="chat-production",
                    messages=[{"role": "user", "content": "hi"}],
                    extra_headers={"x-user-id": user},
                )
            assert raw.headers["x-relaymw-version"] == tag


def test_anthropic_sdk_through_the_gateway(server: Server, fake_llm: FakeLLM) -> None:
    with anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0) as client:
        raw = client.messages.with_raw_response.create(
            model="code-review-production",
            max_tokens=200,
            messages=[{"role": "user", "content": "def f(): pass"}],
        )
    message = raw.parse()
    version = raw.headers["x-relaymw-version"]
    assert version in REVIEW_TAGS
    assert message.model == "claude-sonnet-4-5"  # the "anthropic/" prefix stripped
    assert message.content[0].type == "text"
    assert message.content[0].text == FakeLLM.reply_text("claude-sonnet-4-5")
    sent = fake_llm.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == ANTHROPIC_KEY  # from the environment
    assert sent.body is not None and sent.body["system"] == system_prompts()[version]
    assert "hs_model_version=" in raw.headers["set-cookie"]


def test_anthropic_sdk_streams_through_the_gateway(server: Server) -> None:
    with (
        anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0) as client,
        client.messages.stream(
            model="code-review-production",
            max_tokens=200,
            messages=[{"role": "user", "content": "hi"}],
        ) as stream,
    ):
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == FakeLLM.reply_text("claude-sonnet-4-5")
    assert final.usage.output_tokens == len(FakeLLM.reply_chunks("claude-sonnet-4-5"))


# --- in-app mode: the example's own /api/review -----------------------------------------------


def review(browser: httpx.Client, code: str = "def add(a, b): return a - b") -> httpx.Response:
    r = browser.post("/api/review", json={"code": code})
    assert r.status_code == 200, r.text
    return r


def test_in_app_review_is_sticky_by_cookie(server: Server, fake_llm: FakeLLM) -> None:
    prompts = system_prompts()
    with httpx.Client(base_url=server.url, timeout=30) as browser:
        seen = []
        for i in range(5):
            r = review(browser, f"x = {i}")
            body = r.json()
            assert body["version"] == r.headers["x-relaymw-version"]
            assert body["review"] == FakeLLM.reply_text("claude-sonnet-4-5")
            seen.append(body["version"])
            # The handler's SDK call went out rewritten for the version the middleware chose.
            sent = fake_llm.requests[-1]
            assert sent.headers["x-api-key"] == ANTHROPIC_KEY
            assert sent.body is not None and sent.body["system"] == prompts[body["version"]]
            if i == 0:
                assert "hs_model_version=" in r.headers["set-cookie"]
            else:  # the cookie is honoured, not set again
                assert "set-cookie" not in r.headers
        assert len(set(seen)) == 1 and seen[0] in REVIEW_TAGS
        assert browser.cookies["hs_model_version"].startswith(f"{seen[0]}~")


def test_in_app_review_keeps_a_canary_user_on_the_canary(server: Server) -> None:
    # A browser that was given the 5% canary (a cookie signed with the configured secret).
    value = CookieCodec(COOKIE_SECRET).encode(
        "code-review-production", "claude-sonnet-4.5-v2", int(time.time()) + 3600
    )
    cookies = {"hs_model_version": value}
    with httpx.Client(base_url=server.url, cookies=cookies, timeout=30) as browser:
        for _ in range(5):
            r = review(browser)
            assert r.json()["version"] == r.headers["x-relaymw-version"] == "claude-sonnet-4.5-v2"
    # A forged cookie (no valid signature) is ignored: the browser gets a fresh, signed one.
    forged = {"hs_model_version": f"claude-sonnet-4.5-v2~{int(time.time()) + 3600}~forged"}
    r = httpx.post(f"{server.url}/api/review", json={"code": "x"}, cookies=forged, timeout=30)
    assert r.status_code == 200
    assert r.headers["set-cookie"].startswith("hs_model_version=")


def test_health_passes_through_untouched(server: Server) -> None:
    r = httpx.get(f"{server.url}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert "x-relaymw-version" not in r.headers and "set-cookie" not in r.headers


# --- the custom metric sink -------------------------------------------------------------------


def test_fastapi_example_prints_metrics_per_version(fastapi_server: Server) -> None:
    with httpx.Client(base_url=fastapi_server.url, timeout=30) as browser:
        version = review(browser).json()["version"]
        review(browser)
    prefix = f"relaymw: code-review-production/{version} 200 in "
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [ln for ln in fastapi_server.output().splitlines() if ln.startswith(prefix)]
        if len(lines) >= 2:
            break
        time.sleep(0.05)
    assert len(lines) >= 2, fastapi_server.output()
    assert ", 0 errors, $" in lines[-1] and "tokens" in lines[-1]


# --- operating the examples -------------------------------------------------------------------


def with_weights(stable: int, canary: int) -> str:
    """relay.toml with the code-review route's weights changed."""
    text = CONFIG.read_text()
    for tag, old_weight, weight in (("v1", 95, stable), ("v2", 5, canary)):
        rule = f'version_tag = "claude-sonnet-4.5-{tag}", weight = '
        assert f"{rule}{old_weight} }}" in text
        text = text.replace(f"{rule}{old_weight} }}", f"{rule}{weight} }}")
    return text


def _replace_file(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic, as editors and `relaymw set-weights` write it


def test_editing_the_config_moves_running_sticky_users(
    fake_llm_session: FakeLLM, tmp_path: Path
) -> None:
    """RELAYMW_CONFIG points a running example at a file; saving new weights takes effect at
    once, even for users whose cookie names the version taken out; a broken edit is ignored."""
    config_path = tmp_path / "relay.toml"
    config_path.write_text(CONFIG.read_text())

    flask = {"flask": COMMANDS["flask"]}
    with (
        serving(flask, fake_llm_session, tmp_path, config_path) as running,
        httpx.Client(base_url=running["flask"].url, timeout=30) as browser,
    ):
        server = running["flask"]
        browser.cookies.set(
            "hs_model_version",
            CookieCodec(COOKIE_SECRET).encode(
                "code-review-production", "claude-sonnet-4.5-v1", int(time.time()) + 3600
            ),
        )
        assert review(browser).json()["version"] == "claude-sonnet-4.5-v1"
        # Roll forward: the canary takes all the traffic.
        _replace_file(config_path, with_weights(0, 100))
        deadline = time.monotonic() + 20
        while review(browser).json()["version"] != "claude-sonnet-4.5-v2":
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)
        # A document that does not validate (it is logged) leaves the last good one in force.
        _replace_file(config_path, with_weights(95, 50))  # sums to 145
        while "rejected configuration" not in server.output():
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)
        for _ in range(5):
            assert review(browser).json()["version"] == "claude-sonnet-4.5-v2"


def test_gunicorn_preload_workers_see_config_edits(
    fake_llm_session: FakeLLM, tmp_path: Path
) -> None:
    config_path = tmp_path / "relay.toml"
    config_path.write_text(CONFIG.read_text())
    argv = [
        *(sys.executable, "-m", "gunicorn", "--bind", "127.0.0.1:{port}", "--workers", "2"),
        *("--preload", "--no-control-socket", "--graceful-timeout", "2", "examples.flask_app:app"),
    ]
    with serving({"flask-preload": argv}, fake_llm_session, tmp_path, config_path) as running:
        server = running["flask-preload"]
        _replace_file(config_path, with_weights(0, 100))
        deadline = time.monotonic() + 3  # the file is polled every 0.25 s
        while True:  # six new browsers in a row on the new version: both workers have it
            versions = {
                httpx.post(f"{server.url}/api/review", json={"code": "x"}).json()["version"]
                for _ in range(6)
            }
            if versions == {"claude-sonnet-4.5-v2"}:
                break
            assert time.monotonic() < deadline, f"workers still serve {versions}"
            time.sleep(0.2)


# --- in-app calls made with the OpenAI SDK ----------------------------------------------------


def test_in_app_openai_stream_read_to_the_end_is_recorded_as_complete(
    fake_llm: FakeLLM, finished: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELAYMW_UPSTREAM_URL", fake_llm.base_url)
    relay = Relay.from_store(CONFIG, watch=False)
    client = openai.OpenAI(api_key="x", http_client=relay.client(), max_retries=0)
    try:
        stream = client.chat.completions.create(
            model="chat-production", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text.startswith("[gpt-4.1")
        (event,) = finished.wait_for(1)
        assert event["stream"] and event["status"] == 200 and event["completion_tokens"] == 8
        assert event["error"] is None
    finally:
        client.close()
        relay.close()
