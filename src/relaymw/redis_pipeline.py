"""An asyncio Redis client for the request path: the commands of every task of an event loop
share one connection per server and leave in one write per loop turn (auto-pipelining).

Why: a command through redis-py's asyncio client costs ~50 µs of CPU (its pool, retry, timeout
and telemetry layers), and a guarded request takes six: that was most of the gateway's cost per
request. Here a command costs a few µs, and concurrent requests share each write and read.
:class:`PipelinedRedis` *is* a ``redis.asyncio.Redis``: the ``limits`` storage and redis-py's
``Script`` use it unchanged; only the way a command travels differs. Plain TCP and unix sockets
only, with hiredis (its C protocol packer and reader): :func:`pipelined_client` returns None for
TLS, URL options or without hiredis, which keep redis-py's own connections (as sentinel and
cluster URIs do).

Failures: a connection that answers nothing for ``socket_timeout`` seconds while commands wait
is dropped and they fail with ``redis.TimeoutError``; a lost or refused connection fails them
with ``redis.ConnectionError``; the next command connects again. Nothing is retried: a command
whose answer was lost may have run, and a rate-limit hit must not count twice.
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import inspect
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

import redis.asyncio
import redis.exceptions
from redis._parsers import BaseParser
from redis.commands.core import AsyncScript

__all__ = ["PipelinedRedis", "pipelined_client"]

_Endpoint = tuple[Any, ...]  # (host, port, unix path, db, username, password)


# hiredis (in the ``redis`` extra) packs and parses the protocol in C; without it, clients
# keep redis-py's own connections.
try:
    hiredis: Any = importlib.import_module("hiredis")
except ImportError:  # pragma: no cover - depends on the environment
    hiredis = None

_WORDS: dict[str, tuple[str, ...]] = {}  # command name -> its words (names are constants)


def _pack(args: tuple[Any, ...]) -> bytes:
    """One command in the Redis protocol; a name like ``"SCRIPT LOAD"`` is two words."""
    words = _WORDS.get(args[0])
    if words is None:
        words = _WORDS[args[0]] = tuple(args[0].split())
    return cast(bytes, hiredis.pack_command((*words, *args[1:]) if len(words) > 1 else args))


def _reader() -> Any:
    return hiredis.Reader(
        protocolError=redis.exceptions.InvalidResponse,
        replyError=redis.exceptions.ResponseError,
    )


# "NOSCRIPT ..." -> NoScriptError, "READONLY ..." -> ReadOnlyError, as redis-py maps them
_error_of: Callable[[str], Exception] = BaseParser.parse_error

# The text of every script a client registered, by SHA1: a restarted or flushed server
# answers NOSCRIPT to EVALSHA, and the command is sent again as EVAL (which caches the script).
_SCRIPTS: dict[str, str] = {}


def _noscript_retry(reply: Exception, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """The EVAL to send instead of an EVALSHA the server did not know, if the script is."""
    if args[0] == "EVALSHA" and str(reply.args[0]).startswith("NOSCRIPT"):
        script = _SCRIPTS.get(args[1])
        if script is not None:
            return ("EVAL", script, *args[2:])
    return None


class _Channel(asyncio.Protocol):
    """One connection: commands are queued in order, written once per loop turn, and each
    reply resolves the oldest waiting command."""

    def __init__(self, loop: asyncio.AbstractEventLoop, endpoint: _Endpoint, timeout: float):
        self.loop, self.endpoint, self.timeout = loop, endpoint, timeout
        self.transport: asyncio.Transport | None = None
        # each command's future, and the command (sent again as EVAL on NOSCRIPT)
        self.waiting: collections.deque[tuple[asyncio.Future[Any], tuple[Any, ...]]]
        self.waiting = collections.deque()
        self.outgoing: list[bytes] = []
        self.reader = _reader()
        self.closed = False
        self.users = 0
        self.progress_at = 0.0  # when the oldest waiting command started to wait, or last reply
        self.watchdog: asyncio.TimerHandle | None = None
        host, port, path, db, username, password = endpoint
        handshake = []  # first in the stream; if it fails, so does the connection
        if password is not None:
            handshake.append(("AUTH", username, password) if username else ("AUTH", password))
        if db:
            handshake.append(("SELECT", db))
        for command in handshake:
            self.send(command).add_done_callback(self._handshake_done)
        self.connecting = loop.create_task(self._connect(host, port, path))

    def _handshake_done(self, reply: asyncio.Future[Any]) -> None:
        if not reply.cancelled() and (error := reply.exception()) is not None:
            self.fail(error)  # a wrong password or database: the commands after it fail too

    async def _connect(self, host: str, port: int, path: str | None) -> None:
        where = path or f"{host}:{port}"
        try:
            if path:
                opening = self.loop.create_unix_connection(lambda: self, path)
            else:
                opening = self.loop.create_connection(lambda: self, host, port)
            await asyncio.wait_for(opening, self.timeout)
        except asyncio.TimeoutError:
            self.fail(redis.exceptions.TimeoutError(f"Timeout connecting to {where}"))
        except OSError as exc:
            self.fail(redis.exceptions.ConnectionError(f"Error connecting to {where}: {exc}"))

    def send(
        self, args: tuple[Any, ...], future: asyncio.Future[Any] | None = None
    ) -> asyncio.Future[Any]:
        """Queue one command; its reply resolves the returned future (``future`` if given)."""
        if self.closed:
            raise redis.exceptions.ConnectionError("Connection closed by server.")
        if future is None:
            future = self.loop.create_future()
        if not self.outgoing and self.transport is not None:
            self.loop.call_soon(self._flush)
        self.outgoing.append(_pack(args))
        if not self.waiting:
            self.progress_at = self.loop.time()
            if self.watchdog is None:
                self.watchdog = self.loop.call_at(self.progress_at + self.timeout, self._watch)
        self.waiting.append((future, args))
        return future

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self.closed:  # closed while connecting
            self.transport.close()
        else:
            self._flush()

    def _flush(self) -> None:
        if self.outgoing and self.transport is not None and not self.closed:
            self.transport.write(b"".join(self.outgoing))
        self.outgoing.clear()

    def data_received(self, data: bytes) -> None:
        reader, waiting = self.reader, self.waiting
        try:
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                if not waiting:
                    raise redis.exceptions.InvalidResponse("a reply nobody asked for")
                future, args = waiting.popleft()
                if future.done():  # its caller was cancelled
                    continue
                if not isinstance(reply, redis.exceptions.ResponseError):
                    future.set_result(reply)
                elif (script := _noscript_retry(reply, args)) is not None:
                    self.send(script, future)  # the same future: its caller never knows
                else:  # NOSCRIPT for an unknown script, READONLY...
                    future.set_exception(_error_of(reply.args[0]))
        except (ValueError, redis.exceptions.InvalidResponse) as exc:
            self.fail(redis.exceptions.ConnectionError(f"Protocol error: {exc}"))
            return
        self.progress_at = self.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(redis.exceptions.ConnectionError("Connection closed by server."))

    def _watch(self) -> None:
        """The watchdog: one timer at a time, re-armed while commands wait."""
        self.watchdog = None
        if self.closed or not self.waiting:
            return
        due = self.progress_at + self.timeout
        if self.loop.time() >= due:
            self.fail(redis.exceptions.TimeoutError("Timeout reading from Redis"))
        else:
            self.watchdog = self.loop.call_at(due, self._watch)

    def fail(self, error: BaseException) -> None:
        """Close the connection and fail every waiting command with ``error``."""
        if not self.closed:
            self.closed = True
            if _channels.get((self.loop, self.endpoint)) is self:
                del _channels[(self.loop, self.endpoint)]
            if self.transport is not None:
                self.transport.abort()
            if self.watchdog is not None:
                self.watchdog.cancel()
        waiting, self.waiting = self.waiting, collections.deque()
        for future, _ in waiting:
            if not future.done():
                future.set_exception(error)

    def close(self) -> None:
        self.fail(redis.exceptions.ConnectionError("Connection closed by the client."))
        if not self.connecting.done():
            self.connecting.cancel()


# Open connections, shared by every client of one server in one event loop.
_channels: dict[tuple[asyncio.AbstractEventLoop, _Endpoint], _Channel] = {}


class PipelinedRedis(redis.asyncio.Redis):
    """A ``redis.asyncio.Redis`` whose commands travel on a shared pipelined connection (one
    per event loop that uses it). Build it with :func:`pipelined_client`; :meth:`aclose`
    releases its share of its connections."""

    endpoint: _Endpoint
    timeout: float
    _pipes: dict[asyncio.AbstractEventLoop, _Channel]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        channel = self._pipes.get(asyncio.get_running_loop())
        if channel is None or channel.closed:
            channel = self._attach()
        try:
            response = await channel.send(args)
        except redis.exceptions.ResponseError:
            if "EMPTY_RESPONSE" in options:
                return options["EMPTY_RESPONSE"]
            raise
        if args[0] == "EVALSHA":  # no callback: the common case, without a lookup
            return response
        callback = self.response_callbacks.get(args[0])
        if callback is None:
            return response
        for option in ("keys", "EMPTY_RESPONSE", "NEVER_DECODE"):
            options.pop(option, None)
        result = callback(response, **options)
        return await result if inspect.isawaitable(result) else result

    def register_script(self, script: Any) -> Any:  # an AsyncScript
        return _Script(self, script)

    @property
    def channel(self) -> _Channel | None:
        """The connection this client uses in the running event loop, if any."""
        return self._pipes.get(asyncio.get_running_loop())

    def _attach(self) -> _Channel:
        loop = asyncio.get_running_loop()
        for used in [used for used in self._pipes if used is loop or used.is_closed()]:
            self._release(used)  # a lost connection, or a finished loop's
        channel = _channels.get((loop, self.endpoint))
        if channel is None:
            channel = _channels[(loop, self.endpoint)] = _Channel(loop, self.endpoint, self.timeout)
        channel.timeout = min(channel.timeout, self.timeout)
        channel.users += 1
        self._pipes[loop] = channel
        return channel

    def _release(self, loop: asyncio.AbstractEventLoop) -> None:
        channel = self._pipes.pop(loop)
        channel.users -= 1
        if channel.users > 0 or channel.closed:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is running:
            channel.close()
        elif loop.is_closed():  # nothing can run there any more: just forget the connection
            channel.closed = True
            _channels.pop((loop, self.endpoint), None)
        else:  # another thread's loop: it closes its own connection
            loop.call_soon_threadsafe(channel.close)

    def detach(self) -> None:
        """Give up this client's share of its connections (closed when no client uses them);
        safe from any thread, with or without an event loop."""
        for loop in list(self._pipes):
            self._release(loop)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        self.detach()
        await super().aclose(close_connection_pool)


class _Script(AsyncScript):
    """redis-py's ``Script`` without its per-call layers: calling it queues an EVALSHA and
    returns the future of its reply (no coroutine per call); on ``NOSCRIPT`` (a restarted or
    flushed server) the connection sends the script itself again (EVAL)."""

    def __init__(self, registered_client: Any, script: Any) -> None:
        super().__init__(registered_client, script)
        script = self.script
        _SCRIPTS[self.sha] = script if isinstance(script, str) else bytes(script).decode()

    def __call__(self, keys: Any = None, args: Any = None, client: Any = None) -> Any:
        registered = cast(PipelinedRedis, self.registered_client)
        if client is not None and client is not registered:
            return super().__call__(keys, args, client)
        keys, args = keys or (), args or ()
        channel = registered._pipes.get(asyncio.get_running_loop())
        if channel is None or channel.closed:
            channel = registered._attach()
        return channel.send(("EVALSHA", self.sha, len(keys), *keys, *args))


def pipelined_client(url: str, *, timeout: float) -> PipelinedRedis | None:
    """A :class:`PipelinedRedis` for a plain ``redis://`` or ``unix://`` URL (commands and
    connecting time out after ``timeout`` s); None for anything else (TLS, URL options) or
    when hiredis is not installed."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "unix") or parts.query or parts.fragment or hiredis is None:
        return None
    client = cast(PipelinedRedis, PipelinedRedis.from_url(url, protocol=2, socket_timeout=timeout))
    kw = client.connection_pool.connection_kwargs
    client.endpoint = (
        kw.get("host", "localhost"), kw.get("port", 6379), kw.get("path"),
        int(kw.get("db") or 0), kw.get("username"), kw.get("password"),
    )  # fmt: skip
    client.timeout, client._pipes = timeout, {}
    return client
