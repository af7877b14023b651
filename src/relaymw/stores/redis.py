"""A configuration document in Redis, pushed to every worker by pub/sub and polled as a fallback.

URI: ``redis://[:password@]host:6379/0?key=relaymw:config`` (``rediss://`` for TLS; optional
``poll_interval=`` seconds). The key is a hash: ``document`` (JSON text) and ``revision``, a
strictly increasing integer, ``max(previous + 1, server clock in ms)``, so a key re-seeded after
Redis lost its data never repeats a revision a worker holds (a relay skips its own revision).

``save`` is one Lua script: compare the revision, write, bump it and ``PUBLISH`` it on
``{key}:changes``. ``watch`` runs a daemon thread with its own pub/sub connection: a message (a
burst costs one read) or the ``HGET`` of the revision every ``poll_interval`` s delivers a new
document, so a lost message delays a change by a poll at most. When Redis is unreachable
``on_error`` is called once per outage; the thread reconnects with exponential backoff (0.1 s
doubling to 2 s) and delivers what changed meanwhile. Commands share one more connection;
nothing here runs on the request path. A forked worker (``--preload``) gets its own thread.

Beside the document: the change log, a list ``{key}:audit`` (newest first, the last 10,000
kept), and named states such as a rollout's, ``{key}:state:{name}``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.client import PubSub
from redis.retry import Retry

from relaymw.config import parse_document
from relaymw.errors import StoreConflictError, StoreError
from relaymw.stores.base import (
    RawDocument,
    call_safely,
    forget_after_fork,
    open_store,
    register_scheme,
    rewatch_after_fork,
)
from relaymw.stores.file import dump_document

__all__ = ["DEFAULT_KEY", "RedisStore"]

log = logging.getLogger("relaymw")

DEFAULT_KEY = "relaymw:config"
_OWN_PARAMS = frozenset(("key", "poll_interval"))
_CHANGES_KEPT = 10_000
_TICK = 0.1  # longest wait on the pub/sub socket, so close() is prompt
_BACKOFF_START = 0.1
_BACKOFF_CAP = 2.0
_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OSError)
OnChange = Callable[[RawDocument], None]
OnError = Callable[[Exception], None]

# KEYS[1] the hash; ARGV: document, check ("1"/"0"), expected revision, channel.
_SAVE_SCRIPT = """
redis.replicate_commands() -- TIME before a write: Redis < 5 needs it, later ones ignore it
local cur = redis.call('HGET', KEYS[1], 'revision')
if ARGV[2] == '1' and (cur or '') ~= ARGV[3] then
  return {0, cur or ''}
end
local t = redis.call('TIME')
local rev = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local old = tonumber(cur or '')
if old and old >= rev then rev = old + 1 end
rev = string.format('%d', rev)
redis.call('HSET', KEYS[1], 'document', ARGV[1], 'revision', rev)
redis.call('PUBLISH', ARGV[4], rev)
return {1, rev}
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStore:
    """A hash in Redis holding the JSON document and its revision (see the module docs)."""

    writable = True

    def __init__(
        self,
        url: str,
        key: str | None = None,
        poll_interval: float | None = None,
        connect_timeout: float = 1.0,
        socket_timeout: float = 2.0,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("redis", "rediss"):
            raise StoreError(f"a Redis store needs a redis:// or rediss:// URI, not {parts.scheme}")
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        own = {k: v for k, v in query if k in _OWN_PARAMS}
        self.key = key or own.get("key") or DEFAULT_KEY
        self.channel = f"{self.key}:changes"
        where = parts.netloc.rpartition("@")[2] or "localhost"  # never the password
        self._description = f"Redis key {self.key} at {parts.scheme}://{where}{parts.path or '/0'}"
        try:
            interval = own.get("poll_interval", 1.0) if poll_interval is None else poll_interval
            self.poll_interval = float(interval)
        except ValueError:
            raise StoreError(f"poll_interval must be seconds, in {self._description}") from None
        rest = urllib.parse.urlencode([(k, v) for k, v in query if k not in _OWN_PARAMS])
        self._target = urllib.parse.urlunsplit(parts._replace(query=rest))
        self._timeouts = (connect_timeout, socket_timeout)
        self._connect()
        self._seen: str | None = None  # the revision of the last load() or delivery
        self._callbacks: tuple[OnChange, OnError] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _connect(self) -> None:
        connect, read = self._timeouts
        options: dict[str, Any] = {
            "socket_connect_timeout": connect,
            "socket_timeout": read,
            "retry": Retry(NoBackoff(), 0),  # we back off ourselves; never hang a caller
        }
        # One connection for commands (callers queue for it), one for pub/sub.
        self._pool = redis.BlockingConnectionPool.from_url(
            self._target, max_connections=1, timeout=connect + 2 * read, **options
        )
        self._redis = redis.Redis(connection_pool=self._pool)
        self._subscriber = redis.ConnectionPool.from_url(self._target, **options)
        self._save_script = self._redis.register_script(_SAVE_SCRIPT)
        self._pid = os.getpid()

    def describe(self) -> str:
        return self._description

    def load(self) -> RawDocument:
        try:
            document, revision = self._redis.hmget(self.key, ["document", "revision"])
        except redis.RedisError as exc:
            raise StoreError(f"cannot read {self._description}: {exc}") from exc
        if document is None:
            raise StoreError(
                f"{self._description} is empty: seed it from a file with "
                f"RedisStore(uri).seed_from('relay.toml'), or write a document with save()"
            )
        data = document if isinstance(document, bytes) else document.encode()
        rev = "" if revision is None else _text(revision)
        if self._thread is None:
            self._seen = rev  # where watch() starts from: only later changes are delivered
        return RawDocument(data, "json", rev, self._description)

    def save(self, document: dict[str, Any], expected_revision: str | None = None) -> str:
        data = dump_document(document, "json")
        check = "0" if expected_revision is None else "1"
        args: list[str | bytes] = [data, check, expected_revision or "", self.channel]
        try:
            written, revision = self._save_script(keys=[self.key], args=args)
        except redis.RedisError as exc:
            raise StoreError(f"cannot write {self._description}: {exc}") from exc
        if not int(written):
            current = _text(revision) or "(none)"
            raise StoreConflictError(
                f"{self._description} changed since revision {expected_revision} "
                f"(it is now at revision {current}); reload and retry"
            )
        return _text(revision)

    def seed_from(self, source: str, overwrite: bool = False) -> str:
        """Copy another store's document (a path: ``relay.toml``) here; returns the revision.

        Raises :class:`StoreConflictError` if the key holds a document, unless ``overwrite``.
        """
        origin = open_store(source)
        raw = origin.load()
        origin.close()
        document = parse_document(raw.data, raw.format)
        try:
            return self.save(document, expected_revision=None if overwrite else "")
        except StoreConflictError:
            raise StoreConflictError(
                f"{self._description} already holds a document; pass overwrite=True to replace it"
            ) from None

    def watch(self, on_change: OnChange, on_error: OnError) -> None:
        """Start the watcher; a no-op while it runs. In a forked child (``gunicorn --preload``;
        the relay and this module's fork hook both call it) fresh connections and thread."""
        if self._pid != os.getpid():
            self._connect()
            self._stop = threading.Event()
            self._thread = None
        if self._thread is not None and self._thread.is_alive():
            return
        self._callbacks = (on_change, on_error)
        rewatch_after_fork(self, on_change, on_error)
        self._thread = threading.Thread(
            target=self._run, args=self._callbacks, name="relaymw-redis-store", daemon=True
        )
        self._thread.start()

    def _subscribe(self) -> PubSub:
        pubsub = PubSub(self._subscriber)
        try:
            pubsub.subscribe(self.channel)
            # Wait for the confirmation: from here on no publish is missed.
            deadline = time.monotonic() + sum(self._timeouts)
            while time.monotonic() < deadline:
                message = pubsub.get_message(timeout=_TICK)
                if message is not None and message["type"] == "subscribe":
                    return pubsub
            raise redis.TimeoutError("no confirmation of SUBSCRIBE")
        except BaseException:
            pubsub.close()
            raise

    def _next(self, pubsub: PubSub, poll_at: float) -> RawDocument | None:
        """Wait for a message (a burst costs one read) until ``poll_at``; None if none came."""
        message = pubsub.get_message(timeout=max(0.0, min(_TICK, poll_at - time.monotonic())))
        if message is None or message["type"] != "message":
            return None
        while pubsub.get_message(timeout=0.0) is not None:
            pass
        return self.load()

    def _run(self, on_change: OnChange, on_error: OnError) -> None:
        pubsub: PubSub | None = None
        failing = False
        delay = _BACKOFF_START
        next_poll = 0.0
        stop, name = self._stop, self._description
        while not stop.is_set():
            error: Exception | None = None
            try:
                if pubsub is None:
                    pubsub = self._subscribe()
                    next_poll = 0.0  # (re)connected: look at once
                if time.monotonic() < next_poll:
                    raw = self._next(pubsub, next_poll)
                    if raw is None:
                        continue
                else:  # the poll: one small read, the document only when it moved
                    next_poll = time.monotonic() + self.poll_interval
                    revision = self._redis.hget(self.key, "revision")
                    unchanged = revision is not None and _text(revision) == self._seen
                    raw = None if unchanged else self.load()
            except (StoreError, redis.RedisError, OSError) as exc:
                cause = exc.__cause__ if isinstance(exc, StoreError) else exc
                next_poll = time.monotonic() + self.poll_interval
                if isinstance(cause, _UNREACHABLE):
                    if pubsub is not None:
                        pubsub.close()
                        pubsub = None
                    error = StoreError(f"{name} is unreachable: {cause}")
                else:  # reachable, but no (readable) document
                    error = exc if isinstance(exc, StoreError) else StoreError(f"{name}: {exc}")
            if stop.is_set():
                break
            if error is not None:
                if not failing:  # once per outage
                    failing = True
                    call_safely(on_error, error)
                if pubsub is None:
                    stop.wait(delay)
                    delay = min(delay * 2, _BACKOFF_CAP)
                continue
            if failing:
                failing = False
                log.info("relaymw: %s is readable again", name)
            delay = _BACKOFF_START
            if raw is not None and raw.revision != self._seen:
                self._seen = raw.revision
                call_safely(on_change, raw)
        if pubsub is not None:
            pubsub.close()

    # --- the journal: change log and named states, in keys beside the document -------------

    def append_change(self, entry: dict[str, Any]) -> None:
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.lpush(f"{self.key}:audit", json.dumps(entry, sort_keys=True))
            pipe.ltrim(f"{self.key}:audit", 0, _CHANGES_KEPT - 1)
            pipe.execute()
        except redis.RedisError as exc:
            raise StoreError(f"cannot write the change log of {self._description}: {exc}") from exc

    def changes(self, limit: int = 100) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        try:
            items = self._redis.lrange(f"{self.key}:audit", 0, limit - 1)
        except redis.RedisError as exc:
            raise StoreError(f"cannot read the change log of {self._description}: {exc}") from exc
        return [json.loads(item) for item in items]

    def read_state(self, name: str) -> dict[str, Any] | None:
        try:
            data = self._redis.get(f"{self.key}:state:{name}")
        except redis.RedisError as exc:
            raise StoreError(f"cannot read state {name!r} of {self._description}: {exc}") from exc
        value = None if data is None else json.loads(data)
        return value if isinstance(value, dict) else None

    def write_state(self, name: str, value: dict[str, Any] | None) -> None:
        key = f"{self.key}:state:{name}"
        try:
            if value is None:
                self._redis.delete(key)
            else:
                self._redis.set(key, json.dumps(value, sort_keys=True))
        except redis.RedisError as exc:
            raise StoreError(f"cannot write state {name!r} of {self._description}: {exc}") from exc

    def close(self) -> None:
        self._stop.set()
        self._callbacks = None
        forget_after_fork(self)
        if self._thread is not None:
            self._thread.join(2)
            self._thread = None
        self._subscriber.disconnect()
        self._pool.disconnect()


register_scheme("redis", RedisStore)
register_scheme("rediss", RedisStore)
