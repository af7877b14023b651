"""Test support: real servers on 127.0.0.1 (uvicorn for ASGI, waitress for WSGI), a
``redis-server`` and a document server of the test's own, configuration documents pointed at a
FakeLLM, signal recorders, and a worker forked from a process that follows a store."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import uvicorn
from blinker import ANY, Signal
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import relaymw
from relaymw.testing import serve_asgi

# The tree relaymw is imported from, for the PYTHONPATH of the processes tests start.
SRC = str(Path(relaymw.__file__).resolve().parents[1])


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


async def not_found(scope: Any, receive: Any, send: Any) -> None:
    """The app behind the middleware: every request a test sends is relaymw's to answer."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def wait_until(
    predicate: Callable[[], bool], timeout: float = 3.0, what: str = "condition"
) -> float:
    """Seconds until ``predicate()`` held; fails the test after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - start


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


@contextlib.contextmanager
def recording(signal: Signal, sender: Any = ANY) -> Iterator[Recorder]:
    """A :class:`Recorder` of ``signal`` (sent by ``sender``) for the ``with`` block."""
    rec = Recorder()
    signal.connect(rec, sender=sender)
    try:
        yield rec
    finally:
        signal.disconnect(rec, sender=sender)


# --- a redis-server of the test's own --------------------------------------------------------

REDIS_PASSWORD = "hunter2-redis-pw"


class RedisServer:
    """A ``redis-server`` on a free port (never the shared one), killed and started again by
    the test; ``with`` starts it and kills it at the end. Without ``persistent`` a restart
    comes back empty; with it the data is kept in an append-only file fsynced on every write,
    so a restart finds what it had, as a production Redis with AOF would."""

    def __init__(
        self, workdir: Path, *, password: str | None = None, persistent: bool = False
    ) -> None:
        self.port, self.workdir = free_port(), workdir
        self.password, self.persistent = password, persistent
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("CI needs redis-server on PATH")
            pytest.skip("redis-server is not installed")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--dir", str(self.workdir), "--daemonize", "no"]  # fmt: skip
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with self.client() as client:
                    client.ping()
                return
            except redis.ConnectionError:
                assert self.proc.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)

    def kill(self) -> None:
        """Stop it abruptly (SIGKILL): clients see their connections drop."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=1)

    def keys(self, pattern: str) -> list[str]:
        with self.client() as client:
            return [k.decode() for k in client.keys(pattern)]


# --- a document server for the HTTP store ----------------------------------------------------


class DocumentServer:
    """Serves ``body`` at ``/relay.json`` (and ``/relay.toml``) from uvicorn on a fixed port,
    so it can be stopped and started again at the same URL; ``with`` starts and stops it.

    Setting ``body`` gives it a new ETag, as a real server would (set ``etag`` to None after
    it to serve none); a matching ``If-None-Match`` gets a 304. ``mode`` picks how it answers:
    ``ok``, ``error`` (500), ``slow`` (``ok`` after ``delay`` seconds) or ``binary`` (a PNG).
    Every request's headers and every answer's status are kept."""

    def __init__(self, delay: float = 1.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/relay.json"
        self.mode = "ok"
        self.delay = delay
        self.etag: str | None = None
        self.body = b"{}"
        self.content_type = "application/json"
        self.requests: list[dict[str, str]] = []
        self.answers: list[int] = []
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def body(self) -> bytes:
        return self._body

    @body.setter
    def body(self, body: bytes) -> None:
        self._body = body
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'

    def publish(self, document: dict[str, Any]) -> None:
        self.body = json.dumps(document).encode()

    async def _serve(self, request: Request) -> Response:
        self.requests.append(dict(request.headers))
        response = await self._answer(request)
        self.answers.append(response.status_code)
        return response

    async def _answer(self, request: Request) -> Response:
        if self.mode == "error":
            return Response(b"boom", 500)
        if self.mode == "binary":
            return Response(b"\x89PNG\r\n\x1a\n\xff\xfe", 200, media_type="image/png")
        if self.mode == "slow":
            await asyncio.sleep(self.delay)
        headers = {"ETag": self.etag} if self.etag else {}
        if self.etag and request.headers.get("if-none-match") == self.etag:
            return Response(status_code=304, headers=headers)
        return Response(self.body, 200, headers=headers, media_type=self.content_type)

    def start(self) -> None:
        app = Starlette(
            routes=[Route("/relay.json", self._serve), Route("/relay.toml", self._serve)]
        )
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "the document server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
            self._server = None

    def __enter__(self) -> DocumentServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- a worker forked after the store is followed --------------------------------------------

FORKED_WORKER = """
import os, sys, time
{setup}
first = relay.snapshot.revision
pid = os.fork()  # as gunicorn --preload forks its workers
if pid == 0:
    print("ready", flush=True)
    deadline = time.monotonic() + 3
    while relay.snapshot.revision == first and time.monotonic() < deadline:
        time.sleep(0.01)
    os._exit(0 if relay.snapshot.revision != first else 1)
_, status = os.waitpid(pid, 0)
print("child exit", os.waitstatus_to_exitcode(status), flush=True)
relay.close()
"""


def forked_worker(tmp_path: Path, setup: str, source: str, change: Callable[[], object]) -> str:
    """Runs a process whose ``setup`` lines make ``relay`` follow the store at ``sys.argv[1]``
    (``source``), then fork; calls ``change()`` once the child is up and returns the parent's
    output: ``child exit 0`` when the child saw the change within 3 s, ``child exit 1`` when
    what follows the store did not survive the fork."""
    script = tmp_path / "forked.py"
    script.write_text(FORKED_WORKER.replace("{setup}", setup))
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(
        [sys.executable, str(script), source], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        change()
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    return out


__all__ = [
    "REDIS_PASSWORD",
    "SRC",
    "DocumentServer",
    "Recorder",
    "RedisServer",
    "forked_worker",
    "free_port",
    "not_found",
    "recording",
    "relay_document",
    "serve_asgi",
    "serve_wsgi",
    "wait_until",
]
