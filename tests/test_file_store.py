"""FileStore and hot reload on real files: edits, bad edits, deletion, formats, save, crashes.

Everything here uses real files under ``tmp_path``, the store's own polling thread and, for
crash safety, a real process killed with SIGKILL. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import yaml

from relaymw import Relay, signals
from relaymw.config import build_config, parse_document
from relaymw.errors import ConfigError, StoreConflictError, StoreError
from relaymw.snapshot import RequestView
from relaymw.stores import FileStore, open_store, register_scheme
from relaymw.stores.file import dump_document

POLL = 0.05  # seconds between the store's stat() polls
DEADLINE = 2.0  # a change must be served within this many seconds
ALIAS = "chat"
API_KEY_REF = "${RELAYMW_TEST_OPENAI_KEY:-sk-test-default}"
TMP_GLOB = ".*.relaymw-*.tmp"  # ".relay.toml.relaymw-XXXX.tmp"


# --- documents ----------------------------------------------------------------------------


def config_doc(stable: float = 90, canary: float = 10) -> dict[str, Any]:
    """One OpenAI upstream, two versions, one route ``chat`` split ``stable``/``canary``."""
    return {
        "upstreams": {
            "openai": {
                "base_url": "http://127.0.0.1:9/v1",
                "api_key": API_KEY_REF,
                "protocol": "openai",
            }
        },
        "versions": [
            {
                "version_tag": "gpt-v1",
                "model": "openai/gpt-4.1",
                "upstream_endpoint": "openai",
                "parameters": {"temperature": 0.2},
            },
            {
                "version_tag": "gpt-v2",
                "model": "openai/gpt-4.1-mini",
                "upstream_endpoint": "openai",
            },
        ],
        "routes": [
            {
                "model_alias": ALIAS,
                "route_rules": [
                    {"version_tag": "gpt-v1", "weight": stable},
                    {"version_tag": "gpt-v2", "weight": canary},
                ],
                "sticky_sessions": {"enabled": True, "cookie_name": "relay_chat"},
            }
        ],
    }


def serialize(doc: dict[str, Any], suffix: str) -> bytes:
    """What an operator's editor or deploy script would write (not relaymw's own dumper)."""
    if suffix == ".json":
        return json.dumps(doc, indent=2).encode()
    if suffix in (".yaml", ".yml"):
        return yaml.safe_dump(doc, sort_keys=False).encode()
    return tomli_w.dumps(doc).encode()


def write_in_place(path: Path, data: bytes) -> None:
    """Overwrite the file the way ``echo >`` does: truncate, then write (same inode)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_file(path: Path, data: bytes) -> None:
    """Write a sibling file and rename it over ``path``, as deploy tools and most editors do.

    The reader sees the old or the new content, never the empty file an in-place rewrite
    passes through (see ``test_truncated_file_keeps_last_known_good``).
    """
    tmp = path.with_name(path.name + ".new")
    write_in_place(tmp, data)
    os.replace(tmp, path)


def weights(relay: Relay) -> list[float]:
    return [rule.weight for rule in relay.snapshot.routes[ALIAS].route.route_rules]


def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE) -> float:
    """Poll ``predicate`` until true; return the elapsed seconds or fail after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        elapsed = time.monotonic() - start
        if elapsed > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.005)
    return time.monotonic() - start


def serves(relay: Relay) -> str:
    """Choose a version for a cookie-less request: the relay can still serve."""
    route = relay.snapshot.routes[ALIAS]
    choice, cookie = relay.snapshot.choose(route, RequestView({}, "127.0.0.1", "http"))
    assert cookie is not None and cookie.startswith("relay_chat=")
    return choice.version_tag


# --- signals ------------------------------------------------------------------------------


class Recorder:
    """Records config signals sent by one relay (receivers are strong, disconnected after)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._handlers: list[tuple[Any, Callable[..., None]]] = []
        for name in ("config_loaded", "config_rejected", "store_unavailable"):
            sig = getattr(signals, name)

            def handler(sender: Any, _name: str = name, **kwargs: Any) -> None:
                with self._lock:
                    self.events.append((_name, sender, kwargs))

            sig.connect(handler, weak=False)
            self._handlers.append((sig, handler))

    def of(self, name: str, relay: Relay) -> list[dict[str, Any]]:
        with self._lock:
            return [kw for n, sender, kw in self.events if n == name and sender is relay]

    def close(self) -> None:
        for sig, handler in self._handlers:
            sig.disconnect(handler)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.close()


RelayFactory = Callable[[Path], Relay]


@pytest.fixture
def make_relay() -> Iterator[RelayFactory]:
    """``make_relay(path)``: a relay on a fast-polling FileStore, closed after the test."""
    relays: list[Relay] = []

    def make(path: Path) -> Relay:
        relay = Relay.from_store(FileStore(path, poll_interval=POLL))
        relays.append(relay)
        return relay

    yield make
    for relay in relays:
        relay.close()


@pytest.fixture
def toml_path(tmp_path: Path) -> Path:
    path = tmp_path / "relay.toml"
    write_in_place(path, serialize(config_doc(90, 10), ".toml"))
    return path


# --- hot reload ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".yml", ".json"])
def test_valid_edit_is_served_within_two_seconds(
    tmp_path: Path, suffix: str, make_relay: RelayFactory, recorder: Recorder
) -> None:
    path = tmp_path / f"relay{suffix}"
    write_in_place(path, serialize(config_doc(90, 10), suffix))
    relay = make_relay(path)
    assert isinstance(relay.store, FileStore) and relay.store.format == suffix.lstrip(".").replace(
        "yml", "yaml"
    )
    assert weights(relay) == [90, 10]
    first = relay.snapshot.revision
    assert first and recorder.of("config_loaded", relay)[0]["revision"] == first

    replace_file(path, serialize(config_doc(75, 25), suffix))
    new_revision = FileStore(path).load().revision
    elapsed = wait_until(lambda: weights(relay) == [75, 25])

    assert elapsed < DEADLINE
    assert relay.snapshot.revision == new_revision != first
    assert relay.snapshot.routes[ALIAS].table.shares == {"gpt-v1": 7500, "gpt-v2": 2500}
    # config_loaded is sent just after the snapshot is swapped: wait for it, don't race it.
    wait_until(lambda: len(recorder.of("config_loaded", relay)) == 2)
    loaded = recorder.of("config_loaded", relay)
    assert [e["revision"] for e in loaded] == [first, new_revision]
    assert loaded[-1]["source"] == f"file {path}"
    assert [r.weight for r in loaded[-1]["config"].routes[0].route_rules] == [75, 25]
    assert recorder.of("config_rejected", relay) == []


def _torn(path: Path) -> tuple[str, Callable[[], None]]:
    """The first half of a valid file now, the rest when the fix is due."""
    data = serialize(config_doc(60, 40), ".toml")
    half = len(data) // 2
    # Precondition: this half is not a valid document (a cut that happened to be valid would
    # be served, and that is the writer's problem, not the store's).
    with pytest.raises(ConfigError):
        build_config(parse_document(data[:half], "toml"))
    # The half appears at once (a reader polling an in-place ``open(path, "w")`` could also
    # catch the empty file first: that case is test_truncated_file_keeps_last_known_good).
    replace_file(path, data[:half])

    def finish() -> None:
        with open(path, "ab") as f:
            f.write(data[half:])
            f.flush()

    return "TOML syntax error", finish


def _syntax_error(path: Path) -> tuple[str, Callable[[], None]]:
    text = serialize(config_doc(60, 40), ".toml").decode()
    broken = text.replace("[[routes]]", "[[routes]", 1)
    assert broken != text
    replace_file(path, broken.encode())
    return "TOML syntax error", lambda: replace_file(path, text.encode())


def _weights_sum_105(path: Path) -> tuple[str, Callable[[], None]]:
    replace_file(path, serialize(config_doc(95, 10), ".toml"))
    return (
        "routes[0].route_rules[1].weight: weights sum to 105, not 100",
        lambda: replace_file(path, serialize(config_doc(60, 40), ".toml")),
    )


@pytest.mark.parametrize(
    "breakage", [_torn, _syntax_error, _weights_sum_105], ids=["torn", "syntax", "weight-105"]
)
def test_bad_edit_keeps_last_known_good_then_fix_is_served(
    toml_path: Path,
    breakage: Callable[[Path], tuple[str, Callable[[], None]]],
    make_relay: RelayFactory,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="relaymw")
    relay = make_relay(toml_path)
    good = relay.snapshot
    assert weights(relay) == [90, 10]

    expected_error, fix = breakage(toml_path)
    wait_until(lambda: len(recorder.of("config_rejected", relay)) >= 1)
    time.sleep(3 * POLL)  # a few more polls: nothing else happens to the served config

    assert relay.snapshot is good
    assert relay.snapshot.revision == good.revision
    assert weights(relay) == [90, 10]
    assert serves(relay) in ("gpt-v1", "gpt-v2")
    rejected = recorder.of("config_rejected", relay)
    assert len(rejected) == 1, rejected  # one bad file, one signal (not one per poll)
    assert rejected[0]["source"] == f"file {toml_path}"
    assert any(expected_error in e for e in rejected[0]["errors"]), rejected[0]["errors"]
    assert any(
        "rejected configuration" in r.getMessage() and good.revision in r.getMessage()
        for r in caplog.records
    )
    assert len(recorder.of("config_loaded", relay)) == 1  # only the initial load

    fix()
    wait_until(lambda: weights(relay) == [60, 40])
    assert relay.snapshot.revision == FileStore(toml_path).load().revision != good.revision
    assert recorder.of("config_loaded", relay)[-1]["revision"] == relay.snapshot.revision


def test_deleted_file_keeps_last_known_good_and_signals_once(
    toml_path: Path,
    make_relay: RelayFactory,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="relaymw")
    relay = make_relay(toml_path)
    good = relay.snapshot

    toml_path.unlink()
    wait_until(lambda: len(recorder.of("store_unavailable", relay)) >= 1)
    time.sleep(4 * POLL)

    unavailable = recorder.of("store_unavailable", relay)
    assert len(unavailable) == 1, unavailable  # signalled on the change, not on every poll
    assert unavailable[0]["component"] == "config"
    assert unavailable[0]["store"] == f"file {toml_path}"
    assert "cannot read" in unavailable[0]["error"] and str(toml_path) in unavailable[0]["error"]
    assert any(
        "unavailable, keeping the current configuration" in r.getMessage() for r in caplog.records
    )
    assert recorder.of("config_rejected", relay) == []  # a missing file is not a bad document
    assert relay.snapshot is good
    assert serves(relay) in ("gpt-v1", "gpt-v2")

    # The file comes back (a deploy that deletes then writes): served again.
    replace_file(toml_path, serialize(config_doc(50, 50), ".toml"))
    wait_until(lambda: weights(relay) == [50, 50])
    assert relay.snapshot.revision != good.revision


@pytest.mark.parametrize(
    "suffix",
    [
        ".toml",
        ".yaml",
        ".json",
    ],
)
def test_truncated_file_keeps_last_known_good(
    tmp_path: Path, suffix: str, make_relay: RelayFactory, recorder: Recorder
) -> None:
    """``open(path, "w")`` truncates before it writes: a poll can land in between (observed
    with 50 ms polling in this suite). The empty file must not replace a valid config."""
    path = tmp_path / f"relay{suffix}"
    write_in_place(path, serialize(config_doc(90, 10), suffix))
    relay = make_relay(path)
    good = relay.snapshot

    write_in_place(path, b"")
    wait_until(
        lambda: (
            len(recorder.of("config_loaded", relay)) > 1
            or bool(recorder.of("config_rejected", relay))
        )
    )

    assert ALIAS in relay.snapshot.routes, "an empty document replaced the configuration"
    assert relay.snapshot is good
    assert len(recorder.of("config_rejected", relay)) == 1


# --- save ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
def test_save_writes_atomically_and_compare_and_set(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"relay{suffix}"
    write_in_place(path, serialize(config_doc(90, 10), suffix))
    path.chmod(0o640)
    store = FileStore(path)
    before = store.load()

    changed = config_doc(80, 20)
    revision = store.save(changed, expected_revision=before.revision)

    assert revision != before.revision
    after = store.load()
    assert after.revision == revision
    assert after.format == before.format
    assert parse_document(path.read_bytes(), after.format) == changed
    assert API_KEY_REF.encode() in path.read_bytes()  # ${ENV} references stay references
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # the file keeps its permissions
    assert list(tmp_path.glob(TMP_GLOB)) == []

    # A writer holding the old revision loses, and the file is left as the winner wrote it.
    content = path.read_bytes()
    with pytest.raises(StoreConflictError, match="changed since revision"):
        store.save(config_doc(10, 90), expected_revision=before.revision)
    assert path.read_bytes() == content
    assert list(tmp_path.glob(TMP_GLOB)) == []

    # Without expected_revision it is a plain overwrite.
    last = store.save(config_doc(10, 90))
    assert parse_document(path.read_bytes(), after.format) == config_doc(10, 90)
    assert store.load().revision == last != revision


def test_update_document_writes_through_and_is_served(
    toml_path: Path,
    make_relay: RelayFactory,
    recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RELAYMW_TEST_OPENAI_KEY", "sk-live-secret-4242")
    relay = make_relay(toml_path)
    assert relay.config.upstreams["openai"].api_key == "sk-live-secret-4242"
    first = relay.snapshot.revision

    def to_50_50(doc: dict[str, Any]) -> dict[str, Any]:
        assert doc["upstreams"]["openai"]["api_key"] == API_KEY_REF  # the stored form
        for rule in doc["routes"][0]["route_rules"]:
            rule["weight"] = 50
        return doc

    snapshot = relay.update_document(to_50_50)

    assert relay.snapshot is snapshot
    assert weights(relay) == [50, 50]
    on_disk = toml_path.read_bytes()
    assert parse_document(on_disk, "toml") == config_doc(50, 50)
    assert API_KEY_REF.encode() in on_disk and b"sk-live-secret-4242" not in on_disk
    assert snapshot.revision == FileStore(toml_path).load().revision != first
    assert snapshot.revision in [e["revision"] for e in recorder.of("config_loaded", relay)]
    # The watcher sees the same file afterwards and leaves the snapshot alone.
    time.sleep(4 * POLL)
    assert relay.snapshot is snapshot
    assert list(toml_path.parent.glob(TMP_GLOB)) == []


def test_update_document_rejects_an_invalid_change_and_leaves_the_file(
    toml_path: Path, make_relay: RelayFactory
) -> None:
    relay = make_relay(toml_path)
    good = relay.snapshot
    content = toml_path.read_bytes()
    mtime = toml_path.stat().st_mtime_ns

    def to_105(doc: dict[str, Any]) -> dict[str, Any]:
        doc["routes"][0]["route_rules"][0]["weight"] = 95
        return doc

    with pytest.raises(ConfigError) as info:
        relay.update_document(to_105)

    assert [str(i) for i in info.value.issues] == [
        "routes[0].route_rules[1].weight: weights sum to 105, not 100 (normalized: 90.48, 9.52)"
    ]
    assert toml_path.read_bytes() == content
    assert toml_path.stat().st_mtime_ns == mtime
    assert relay.snapshot is good
    assert list(toml_path.parent.glob(TMP_GLOB)) == []


# --- crash safety -------------------------------------------------------------------------

# A launcher process imports relaymw once, then forks one writer per round on request; the
# writer saves the variants in a loop until the test kills it with SIGKILL. The launcher
# reaps it and reports the wait status, so the test knows the writer died by the kill and not
# by an error of its own.
_LAUNCHER = """
import json, os, sys
from relaymw.stores import FileStore
path = sys.argv[1]
with open(sys.argv[2]) as f:
    variants = json.load(f)
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() != "fork":
        break
    pid = os.fork()
    if pid == 0:
        try:
            k = 1
            while True:
                FileStore(path).save(variants[k % len(variants)])
                k += 1
        finally:
            os._exit(3)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
"""


class Launcher:
    def __init__(self, path: Path, variants: list[dict[str, Any]], workdir: Path) -> None:
        spec = workdir / "variants.json"
        spec.write_text(json.dumps(variants))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, str(path), str(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self._out = self.proc.stdout.fileno()
        self._buffer = b""
        self.child: int | None = None
        assert self.readline(10) == "ready"

    def readline(self, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self._out], [], [], deadline - time.monotonic())
            chunk = os.read(self._out, 4096) if ready else b""
            if not chunk:
                pytest.fail(f"the launcher did not answer (exit code {self.proc.poll()})")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode().strip()

    def fork(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"fork\n")
        self.proc.stdin.flush()
        self.child = int(self.readline())
        return self.child

    def reaped_status(self) -> int:
        status = int(self.readline())
        self.child = None
        return status

    def close(self) -> None:
        if self.child is not None:  # a failed round: do not leave a writer running
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signal.SIGKILL)
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(5)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            assert self.proc.stdout is not None
            self.proc.stdout.close()


def _assert_killed(status: int) -> None:
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
        f"the writer ended by itself (wait status {status}), not by the kill"
    )


def large_variant(i: int, n_versions: int = 2000) -> dict[str, Any]:
    """A valid document of ``n_versions`` versions (about 0.5 MB of TOML), variant ``i``."""
    doc = config_doc(100 - 10 * i, 10 * i)
    doc["versions"] += [
        {
            "version_tag": f"bulk-{j}",
            "model": "openai/gpt-4.1",
            "upstream_endpoint": "openai",
            "parameters": {"temperature": 0.5, "max_tokens": 100 + j},
            "system_prompt": f"variant {i}, version {j}: " + "lorem ipsum " * 12,
        }
        for j in range(n_versions)
    ]
    return doc


def test_killed_writer_never_leaves_a_partial_file(tmp_path: Path) -> None:
    """SIGKILL at random moments of a save loop: the file is always one complete variant.

    A kill between creating the temp file and renaming it leaves that one
    ``.relaymw-*.tmp`` behind (nothing can clean up after SIGKILL); each kill adds at most one,
    and the file itself is never touched until the rename.
    """
    confdir = tmp_path / "conf"
    confdir.mkdir()
    path = confdir / "relay.toml"
    variants = [large_variant(i) for i in range(4)]
    dumps = {dump_document(v, "toml"): i for i, v in enumerate(variants)}
    assert len(dumps) == len(variants)
    for data, i in dumps.items():  # each variant is valid and round-trips
        assert parse_document(data, "toml") == variants[i]
    build_config(variants[0])
    started = time.monotonic()
    FileStore(path).save(variants[0])
    # Kills spread over a few saves' time, so some land after a rename even on a busy machine.
    window = max(0.25, 4 * (time.monotonic() - started))

    rng = random.Random(20240611)
    launcher = Launcher(path, variants, tmp_path)
    seen: set[int] = set()
    try:
        for _ in range(20):
            tmps_before = set(confdir.glob(TMP_GLOB))
            pid = launcher.fork()
            time.sleep(rng.uniform(0.0, window))
            os.kill(pid, signal.SIGKILL)
            _assert_killed(launcher.reaped_status())

            data = path.read_bytes()
            assert data in dumps, f"partial or foreign file after a kill ({len(data)} bytes)"
            seen.add(dumps[data])
            tmps_after = set(confdir.glob(TMP_GLOB))
            new = tmps_after - tmps_before
            assert len(new) <= 1, new
            assert {p.name for p in confdir.iterdir()} - {p.name for p in tmps_after} == {
                "relay.toml",
                "relay.toml.lock",  # the compare-and-set lock, kept on purpose
            }
    finally:
        launcher.close()

    assert len(seen) >= 2, "the writer never completed a save: the kills tested nothing"
    # The last-known-good state is usable: a new store reads and writes it.
    store = FileStore(path)
    assert store.load().data in dumps
    store.save(variants[1], expected_revision=store.load().revision)
    assert parse_document(path.read_bytes(), "toml") == variants[1]


def test_temp_files_of_killed_writers_do_not_accumulate(tmp_path: Path) -> None:
    """Two writers killed mid-write (after the temp file exists, before the rename): at most
    one temp file may remain, the one of the last killed write."""
    confdir = tmp_path / "conf"
    confdir.mkdir()
    path = confdir / "relay.json"
    # Large JSON documents: the write + fsync of the temp file takes a few milliseconds.
    variants = []
    for i in range(2):
        doc = config_doc(90, 10)
        doc["versions"][0]["system_prompt"] = f"{i} " + "x" * 4_000_000
        variants.append(doc)
    FileStore(path).save(variants[0])

    launcher = Launcher(path, variants, tmp_path)
    killed_mid_write = 0
    try:
        for _ in range(30):
            before = set(confdir.glob(TMP_GLOB))
            pid = launcher.fork()
            deadline = time.monotonic() + 2
            while not (set(confdir.glob(TMP_GLOB)) - before) and time.monotonic() < deadline:
                pass
            os.kill(pid, signal.SIGKILL)
            _assert_killed(launcher.reaped_status())
            if set(confdir.glob(TMP_GLOB)) - before:
                killed_mid_write += 1
                if killed_mid_write == 2:
                    break
    finally:
        launcher.close()
    assert killed_mid_write == 2, "could not kill a writer between its temp file and rename"

    assert parse_document(path.read_bytes(), "json") in variants
    leftovers = sorted(p.name for p in confdir.glob(TMP_GLOB))
    assert len(leftovers) <= 1, leftovers


# --- open_store ---------------------------------------------------------------------------


def test_open_store_by_path_and_file_uri(toml_path: Path) -> None:
    for source in (str(toml_path), toml_path, f"file://{toml_path}", f"FILE://{toml_path}"):
        store = open_store(source)
        assert isinstance(store, FileStore), source
        assert store.path == str(toml_path)
        assert store.format == "toml"
        assert parse_document(store.load().data, "toml") == config_doc(90, 10)
    given = FileStore(toml_path)
    assert open_store(given) is given


def test_open_store_relative_path_is_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("relay.yaml")
    assert isinstance(store, FileStore)
    assert store.path == str(tmp_path / "relay.yaml") and store.format == "yaml"


def test_open_store_unknown_scheme_names_the_registered_ones() -> None:
    with pytest.raises(StoreError) as info:
        open_store("foo://x")
    message = str(info.value)
    assert "foo://" in message
    assert "registered schemes" in message and "file" in message


def test_register_scheme_plugs_in_a_store(toml_path: Path) -> None:
    seen: list[str] = []

    def factory(uri: str) -> FileStore:
        seen.append(uri)
        return FileStore(toml_path)

    register_scheme("relaymw-test-files", factory)
    store = open_store("relaymw-test-files://anything")
    assert isinstance(store, FileStore) and seen == ["relaymw-test-files://anything"]
    with pytest.raises(StoreError, match="relaymw-test-files"):
        open_store("nope://x")


def test_file_uri_is_percent_decoded(tmp_path: Path) -> None:
    path = tmp_path / "my relay.toml"
    write_in_place(path, serialize(config_doc(), ".toml"))
    uri = path.as_uri()  # file:///.../my%20relay.toml
    assert "%20" in uri
    store = open_store(uri)
    assert isinstance(store, FileStore)
    assert store.path == str(path)
