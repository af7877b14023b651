"""RedisStore on real Redis servers: CAS, pub/sub, the poll fallback, outages, many workers.

The shared Redis comes from the ``redis_url`` fixture (one key per test); outage and password
tests start their own ``redis-server`` on a free port. The multi-process test runs four real
uvicorn workers. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from relaymw import Relay, RelayMiddleware, signals
from relaymw.errors import StoreConflictError, StoreError
from relaymw.stores import RawDocument, open_store
from relaymw.stores.file import dump_document
from relaymw.stores.redis import RedisStore
from relaymw.testing import FakeLLM
from tests.support import (
    SRC,
    RedisServer,
    forked_worker,
    free_port,
    not_found,
    recording,
    relay_document,
    serve_asgi,
    wait_until,
)


def doc(fake_url: str, v1: float, v2: float, sticky: bool = True) -> dict[str, Any]:
    rules = [{"version_tag": "gpt-v1", "weight": v1}, {"version_tag": "gpt-v2", "weight": v2}]
    route: dict[str, Any] = {"route_rules": rules}
    if not sticky:
        route["sticky_sessions"] = {"enabled": False}
    return relay_document(fake_url, chat_production=route)


def weights(relay: Relay) -> list[float]:
    rules = relay.snapshot.routes["chat-production"].route.route_rules
    return [rule.weight for rule in rules]


@pytest.fixture
def key(redis_url: str, redis_prefix: str) -> Iterator[str]:
    name = f"{redis_prefix}:config"
    yield name
    redis.Redis.from_url(redis_url).delete(name)


@pytest.fixture
def uri(redis_url: str, key: str) -> str:
    return f"{redis_url}{'&' if '?' in redis_url else '?'}key={key}"


@pytest.fixture
def store(uri: str) -> Iterator[RedisStore]:
    s = RedisStore(uri)
    yield s
    s.close()


CHAT = {"model": "chat-production", "messages": [{"role": "user", "content": "hi"}]}


def ask(base: str) -> str:
    r = httpx.post(f"{base}/v1/chat/completions", json=CHAT, timeout=5)
    assert r.status_code == 200, r.text
    return r.headers["x-relaymw-version"]


# --- the store alone ------------------------------------------------------------------------


def test_save_load_compare_and_set(store: RedisStore) -> None:
    with pytest.raises(StoreError, match=r"is empty: seed it .*seed_from"):
        store.load()
    first = store.save({"a": 1})
    raw = store.load()
    assert (raw.format, raw.revision, raw.source) == ("json", first, store.describe())
    assert json.loads(raw.data) == {"a": 1}
    second = store.save({"a": 2}, expected_revision=first)
    assert int(second) > int(first)
    with pytest.raises(StoreConflictError, match=f"changed since revision {first}"):
        store.save({"a": 3}, expected_revision=first)
    assert json.loads(store.load().data) == {"a": 2}
    third = store.save({"a": 4})  # no expected revision: unconditional
    revisions = [first, second, third]
    assert [int(r) for r in revisions] == sorted(int(r) for r in set(revisions))
    assert store.load().revision == third


def test_seed_from_a_file(store: RedisStore, tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    document = relay_document("http://127.0.0.1:9")
    path.write_bytes(dump_document(document, "toml"))
    store.seed_from(str(path))
    assert json.loads(store.load().data) == json.loads(dump_document(document, "json"))
    with pytest.raises(StoreConflictError, match="already holds a document"):
        store.seed_from(str(path))
    revision = store.seed_from(str(path), overwrite=True)
    assert store.load().revision == revision


def test_uri_options_and_password_never_shown(tmp_path: Path) -> None:
    with RedisServer(tmp_path, password="s3cret-pw") as server:
        good = RedisStore(f"redis://:s3cret-pw@127.0.0.1:{server.port}/2?key=k1&poll_interval=0.5")
        assert (good.key, good.channel, good.poll_interval) == ("k1", "k1:changes", 0.5)
        assert good.describe() == f"Redis key k1 at redis://127.0.0.1:{server.port}/2"
        good.save({"ok": True})
        assert json.loads(good.load().data) == {"ok": True}
        good.close()
        assert isinstance(open_store("rediss://:pw@h:6380/0?key=x"), RedisStore)
        bad = RedisStore(f"redis://:wrong-pw@127.0.0.1:{server.port}/2?key=k1")
        with pytest.raises(StoreError) as info:
            bad.load()
        bad.close()
        server.kill()
        gone = RedisStore(f"redis://alice:s3cret-pw@127.0.0.1:{server.port}/2?key=k1")
        with pytest.raises(StoreError) as down:
            gone.save({"x": 1})
        gone.close()
        for text in (str(info.value), str(down.value), gone.describe()):
            assert "s3cret" not in text and "wrong-pw" not in text and "alice" not in text, text


def test_publish_reaches_a_watcher_fast(store: RedisStore, uri: str) -> None:
    store.save({"n": 0})
    watcher = RedisStore(uri, poll_interval=60)  # only pub/sub can deliver in time
    got: list[tuple[float, RawDocument]] = []
    watcher.load()
    errors: list[Exception] = []
    watcher.watch(lambda raw: got.append((time.perf_counter(), raw)), errors.append)
    try:
        time.sleep(0.2)  # subscribed
        latencies = []
        for n in range(1, 21):
            start = time.perf_counter()
            revision = store.save({"n": n})
            wait_until(lambda: bool(got) and got[-1][1].revision == revision, timeout=1.0)  # noqa: B023
            latencies.append(got[-1][0] - start)
            assert json.loads(got[-1][1].data) == {"n": n}
        print(f"pub/sub delivery: median {statistics.median(latencies) * 1000:.1f} ms")
        assert statistics.median(latencies) < 0.2 and max(latencies) < 0.5
        assert errors == []
    finally:
        watcher.close()


def test_poll_fallback_without_publish(store: RedisStore, redis_url: str, key: str) -> None:
    first = store.save({"n": 1})
    got: list[tuple[float, RawDocument]] = []
    store.load()  # as a relay does before watching
    errors: list[Exception] = []
    store.watch(lambda raw: got.append((time.monotonic(), raw)), errors.append)
    time.sleep(0.3)
    assert got == []  # what load() saw is not delivered again
    # Written by hand (no PUBLISH), as another tool or a replica promotion might leave it.
    direct = redis.Redis.from_url(redis_url)
    start = time.monotonic()
    direct.hset(key, mapping={"document": '{"n": 2}', "revision": str(int(first) + 1)})
    wait_until(lambda: len(got) == 1, timeout=1.3)
    assert got[0][0] - start < 1.2 and json.loads(got[0][1].data) == {"n": 2}
    assert errors == []


def test_a_burst_of_publishes_is_read_once(store: RedisStore, uri: str) -> None:
    store.save({"n": 0})
    watcher = RedisStore(uri, poll_interval=60)
    release = threading.Event()
    got: list[RawDocument] = []

    def slow(raw: RawDocument) -> None:
        got.append(raw)
        release.wait(5)

    watcher.load()
    errors: list[Exception] = []
    watcher.watch(slow, errors.append)
    try:
        time.sleep(0.2)
        store.save({"n": 1})
        wait_until(lambda: len(got) == 1)
        last = ""
        for n in range(2, 12):  # ten messages queue while the callback is busy
            last = store.save({"n": n})
        release.set()
        wait_until(lambda: got[-1].revision == last)
        time.sleep(0.2)
        assert len(got) == 2, [json.loads(r.data) for r in got]
        assert errors == []
    finally:
        release.set()
        watcher.close()


def test_close_is_prompt_even_during_an_outage() -> None:
    port = free_port()  # nothing listens: the watcher is in its backoff loop
    s = RedisStore(f"redis://127.0.0.1:{port}/0?key=k")
    errors: list[Exception] = []
    changes: list[RawDocument] = []
    s.watch(changes.append, errors.append)
    wait_until(lambda: len(errors) == 1)
    time.sleep(1.0)
    assert len(errors) == 1
    start = time.monotonic()
    s.close()
    assert time.monotonic() - start < 1.0
    assert not any(t.name == "relaymw-redis-store" for t in threading.enumerate())
    assert changes == [] and "unreachable" in str(errors[0])


# --- a relay on the store --------------------------------------------------------------------


def test_relay_serves_and_update_document_writes_through(
    store: RedisStore, uri: str, fake_llm: FakeLLM
) -> None:
    store.save(doc(fake_llm.base_url, 100, 0))
    relay = Relay.from_store(uri)
    other = Relay.from_store(uri)  # another worker on the same key
    try:
        assert isinstance(relay.store, RedisStore)
        with serve_asgi(RelayMiddleware(not_found, relay=relay)) as base:
            assert ask(base) == "gpt-v1"

            def to_v2(document: dict[str, Any]) -> dict[str, Any]:
                document["routes"][0]["route_rules"][0]["weight"] = 0
                document["routes"][0]["route_rules"][1]["weight"] = 100
                return document

            snapshot = relay.update_document(to_v2)
            assert snapshot.revision == store.load().revision
            assert ask(base) == "gpt-v2"
        assert json.loads(store.load().data)["routes"][0]["route_rules"][1]["weight"] == 100
        wait_until(lambda: other.snapshot.revision == snapshot.revision, timeout=1.0)
        assert weights(other) == [0, 100]
    finally:
        relay.close()
        other.close()


def test_invalid_document_is_rejected_and_the_relay_keeps_serving(
    store: RedisStore, uri: str, fake_llm: FakeLLM
) -> None:
    store.save(doc(fake_llm.base_url, 100, 0))
    relay = Relay.from_store(uri)
    good = relay.snapshot.revision
    try:
        with (
            recording(signals.config_rejected, relay) as rejected,
            serve_asgi(RelayMiddleware(not_found, relay=relay)) as base,
        ):
            store.save(doc(fake_llm.base_url, 70, 10))  # the store does not validate
            wait_until(lambda: len(rejected.events) == 1)
            assert any("weight" in e for e in rejected.events[0]["errors"])
            assert rejected.events[0]["source"] == store.describe()
            assert relay.snapshot.revision == good
            assert [ask(base) for _ in range(3)] == ["gpt-v1"] * 3
            fixed = store.save(doc(fake_llm.base_url, 0, 100))
            wait_until(lambda: relay.snapshot.revision == fixed, timeout=1.0)
            assert ask(base) == "gpt-v2"
    finally:
        relay.close()


def test_outage_keeps_last_known_good_and_recovers(fake_llm: FakeLLM, tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        uri = f"redis://127.0.0.1:{server.port}/0?key=relaymw:config"
        writer = RedisStore(uri)
        before = writer.save(doc(fake_llm.base_url, 100, 0))
        relay = Relay.from_store(uri)  # default poll_interval: 1 s
        try:
            with (
                recording(signals.store_unavailable, relay) as unavailable,
                serve_asgi(RelayMiddleware(not_found, relay=relay)) as base,
            ):
                assert ask(base) == "gpt-v1"
                server.kill()
                wait_until(lambda: len(unavailable.events) == 1, timeout=2.0)
                event = unavailable.events[0]
                assert relay.store is not None and event["store"] == relay.store.describe()
                assert "unreachable" in event["error"] and event["component"] == "config"
                time.sleep(2.5)  # several reconnect attempts with backoff
                assert len(unavailable.events) == 1  # once per outage
                assert relay.snapshot.revision == before and weights(relay) == [100, 0]
                assert [ask(base) for _ in range(3)] == ["gpt-v1"] * 3
                # Redis comes back empty (no persistence); an operator re-seeds a new document.
                server.start()
                start = time.monotonic()
                after = writer.save(doc(fake_llm.base_url, 0, 100))
                assert after != before  # a re-seeded key never repeats a revision
                took = wait_until(lambda: relay.snapshot.revision == after, timeout=5.0)
                print(f"delivered {took:.2f} s after Redis came back")
                assert time.monotonic() - start < 5.0
                assert ask(base) == "gpt-v2"
                assert len(unavailable.events) == 1
        finally:
            relay.close()
            writer.close()


# --- every worker of a multi-process server -------------------------------------------------

WORKERS = 4
CHANGES = 50
PROBES = 16

APP = """
import os

import relaymw.stores.redis  # registers redis://
from relaymw import Relay, RelayMiddleware

PID = str(os.getpid()).encode()


async def inner(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


relay_app = RelayMiddleware(inner, relay=Relay.from_store(os.environ["RELAYMW_STORE"]))


async def app(scope, receive, send):
    async def send_with_pid(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), (b"x-worker-pid", PID)]}
        await send(message)

    await relay_app(scope, receive, send_with_pid)
"""


class Probe:
    """``PROBES`` threads posting on a new connection per request while a round is open."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.lock = threading.Lock()
        self.active = threading.Event()
        self.stopped = False
        self.target = ""
        self.t0 = 0.0
        self.pids: set[str] = set()
        self.converged: dict[str, float] = {}  # pid -> seconds after t0 of its first new answer
        self.regressions: list[tuple[str, str]] = []
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(PROBES)]
        for t in self.threads:
            t.start()

    def _loop(self) -> None:
        headers = {"connection": "close"}  # every request on a fresh connection
        with httpx.Client(base_url=self.base, headers=headers, timeout=10) as client:
            while not self.stopped:
                if not self.active.wait(0.05):
                    continue
                sent = time.perf_counter()
                r = client.post("/v1/chat/completions", json=CHAT)
                client.cookies.clear()
                got = time.perf_counter()
                pid, version = r.headers["x-worker-pid"], r.headers["x-relaymw-version"]
                self._record(sent, got, pid, version)

    def _record(self, sent: float, got: float, pid: str, version: str) -> None:
        with self.lock:
            if not self.active.is_set():
                return
            if not self.target:  # warming up: learn the workers
                self.pids.add(pid)
                if len(self.pids) == WORKERS:
                    self.done.set()
                return
            assert pid in self.pids, f"an unknown worker {pid} answered (a worker restarted?)"
            if sent < self.t0:
                return  # sent before the change (versions alternate: it proves nothing)
            seen_at = self.converged.get(pid)
            if version == self.target:
                if seen_at is None:
                    self.converged[pid] = got - self.t0
                    if len(self.converged) == len(self.pids):
                        self.done.set()
            elif seen_at is not None and sent - self.t0 > seen_at:
                self.regressions.append((pid, version))  # a converged worker went back

    def round(self, target: str, t0: float) -> None:
        with self.lock:
            self.target, self.t0 = target, t0
            self.converged = {}
            self.done.clear()
        self.active.set()

    def finish(self, timeout: float) -> float:
        assert self.done.wait(timeout), f"workers {self.pids - set(self.converged)} never changed"
        with self.lock:
            self.active.clear()
            return max(self.converged.values())

    def stop(self) -> None:
        self.stopped = True
        self.active.clear()
        for t in self.threads:
            t.join(10)


def test_every_worker_follows_a_change_within_a_second(
    store: RedisStore, uri: str, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    revision = store.save(doc(fake_llm.base_url, 100, 0, sticky=False))
    (tmp_path / "relay_app.py").write_text(APP)
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), SRC]),
        "RELAYMW_STORE": uri,
    }
    cmd = [sys.executable, "-m", "uvicorn", "relay_app:app", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", str(WORKERS), "--log-level", "warning"]
    cmd += ["--timeout-keep-alive", "120"]  # no keep-alive close racing a reused connection
    log = open(tmp_path / "uvicorn.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
    probe: Probe | None = None
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:  # wait until the port answers
            try:
                httpx.get(base, timeout=1)
                break
            except httpx.TransportError:
                assert server.poll() is None, (tmp_path / "uvicorn.log").read_text()
                assert time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.1)
        probe = Probe(base)
        probe.active.set()
        assert probe.done.wait(30), f"only workers {probe.pids} answered"
        probe.active.clear()

        times = []
        for n in range(CHANGES):
            # Even changes move all traffic to gpt-v2, odd ones roll it back to gpt-v1.
            target, weights_ = ("gpt-v2", (0, 100)) if n % 2 == 0 else ("gpt-v1", (100, 0))
            document = doc(fake_llm.base_url, *weights_, sticky=False)
            t0 = time.perf_counter()
            revision = store.save(document, expected_revision=revision)
            probe.round(target, t0)
            times.append(probe.finish(timeout=5.0))
        assert probe.regressions == []
        times.sort()
        p50 = statistics.median(times)
        p99 = times[math.ceil(0.99 * len(times)) - 1]
        print(
            f"\n{WORKERS} workers, {CHANGES} changes: propagation to the last worker "
            f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {times[-1] * 1000:.1f} ms, "
            f"min {times[0] * 1000:.1f} ms"
        )
        assert p99 < 1.0
    finally:
        if probe is not None:
            probe.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(5)
        log.close()


FORKED = """
import relaymw.stores.redis
from relaymw import Relay

relay = Relay.from_store(sys.argv[1])  # the watcher thread starts in the parent
"""


def test_a_forked_worker_keeps_following(
    store: RedisStore, uri: str, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    store.save(doc(fake_llm.base_url, 100, 0))
    out = forked_worker(tmp_path, FORKED, uri, lambda: store.save(doc(fake_llm.base_url, 0, 100)))
    assert "child exit 0" in out, out
