"""A configuration file (TOML, YAML or JSON by suffix), reloaded when it changes.

Changes are noticed by polling the file's mtime, size and inode from one daemon thread; a
poll costs one ``stat``. ``save`` writes a temp file in the same directory, fsyncs it and
renames it over the original, so a reader (or a crash) never sees a partial file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

from relaymw.config import format_for_path
from relaymw.errors import StoreConflictError, StoreError
from relaymw.stores.base import (
    RawDocument,
    call_safely,
    forget_after_fork,
    register_scheme,
    rewatch_after_fork,
)

__all__ = ["FileStore", "dump_document"]


def _revision(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _drop_none(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop_none(v) for k, v in node.items() if v is not None}
    if isinstance(node, (list, tuple)):
        return [_drop_none(v) for v in node]
    return node


def dump_document(document: dict[str, Any], fmt: str) -> bytes:
    """Serialise a document in ``fmt`` (TOML has no null, so unset fields are left out)."""
    if fmt == "json":
        return json.dumps(document, indent=2, sort_keys=False).encode() + b"\n"
    if fmt == "yaml":
        import yaml

        return yaml.safe_dump(_drop_none(document), sort_keys=False).encode()
    import tomli_w

    return tomli_w.dumps(_drop_none(document)).encode()


class FileStore:
    """A file on disk. ``poll_interval`` is in seconds."""

    writable = True

    def __init__(self, path: str | os.PathLike[str], poll_interval: float = 0.25) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.format = format_for_path(self.path)
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: tuple[int, int, int] | None = None

    def describe(self) -> str:
        return f"file {self.path}"

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self) -> RawDocument:
        # The stat taken before reading is what watch() compares against, so a change
        # landing between this load and watch() starting is still noticed.
        self._seen = self._stat()
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise StoreError(f"cannot read {self.path}: {exc.strerror}") from exc
        return RawDocument(data, self.format, _revision(data), self.describe())

    def watch(
        self,
        on_change: Callable[[RawDocument], None],
        on_error: Callable[[Exception], None],
    ) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        rewatch_after_fork(self, on_change, on_error)

        def run() -> None:
            while not self._stop.wait(self.poll_interval):
                current = self._stat()
                if current == self._seen:
                    continue
                self._seen = current
                try:
                    raw = self.load()
                except Exception as exc:  # the callback keeps its last-known-good
                    call_safely(on_error, exc)
                else:
                    call_safely(on_change, raw)

        self._thread = threading.Thread(target=run, name="relaymw-file-store", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # A sidecar lock makes compare-and-set hold across processes on one host.
        fd = os.open(self.path + ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def save(self, document: dict[str, Any], expected_revision: str | None = None) -> str:
        data = dump_document(document, self.format)
        directory = os.path.dirname(self.path)
        with self._locked():
            if expected_revision is not None:
                try:
                    current = self.load().revision
                except StoreError:
                    current = None
                if current != expected_revision:
                    raise StoreConflictError(
                        f"{self.path} changed since revision {expected_revision}; reload and retry"
                    )
            self._remove_stale_temp_files()
            fd, tmp = tempfile.mkstemp(prefix=self._temp_prefix, suffix=".tmp", dir=directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(tmp, os.stat(self.path).st_mode & 0o777)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself survives a power cut
            finally:
                os.close(dir_fd)
        return _revision(data)

    @property
    def _temp_prefix(self) -> str:
        return f".{os.path.basename(self.path)}.relaymw-"

    def _remove_stale_temp_files(self) -> None:
        """Temp files of writers killed mid-save; safe under the lock, which every writer holds."""
        directory = os.path.dirname(self.path)
        for name in os.listdir(directory):
            if name.startswith(self._temp_prefix) and name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))

    # --- the journal: change log and named states, in files beside the document ------------

    @property
    def changes_path(self) -> str:
        return self.path + ".changes.jsonl"

    def _state_path(self, name: str) -> str:
        return os.path.join(self.path + ".state", urllib.parse.quote(name, safe="") + ".json")

    def append_change(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, sort_keys=True).encode() + b"\n"
        with self._locked():
            fd = os.open(self.changes_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def changes(self, limit: int = 100) -> list[dict[str, Any]]:
        try:
            with open(self.changes_path, "rb") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        newest = [json.loads(line) for line in reversed(lines) if line.strip()]
        return newest[: max(0, limit)]

    def read_state(self, name: str) -> dict[str, Any] | None:
        try:
            with open(self._state_path(name), "rb") as f:
                value = json.loads(f.read())
        except FileNotFoundError:
            return None
        return value if isinstance(value, dict) else None

    def write_state(self, name: str, value: dict[str, Any] | None) -> None:
        path = self._state_path(name)
        if value is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(value, sort_keys=True).encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def close(self) -> None:
        forget_after_fork(self)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
            self._thread = None


def _from_file_uri(uri: str) -> FileStore:
    return FileStore(urllib.parse.unquote(urllib.parse.urlsplit(uri).path))


register_scheme("file", _from_file_uri)
