"""HTTP clients that carry relayed requests to upstream providers.

The ASGI hot path talks to a small seam, :class:`AsyncUpstreamClient`. Its default
implementation is aiohttp (measured ~2.6x the throughput of httpx on one core); an httpx
implementation sits behind the same seam. The WSGI path uses :class:`HttpxSyncUpstreamClient`.

The clients add no credentials: the caller passes the complete header set (including auth)
and should leave out hop-by-hop headers, ``host`` and ``content-length``. Redirects are not
followed and proxy settings from the environment are ignored, so every implementation behaves
the same. Response bodies are already decompressed; ``headers`` are as received (names
lower-cased), so dropping ``content-encoding``/``content-length`` is the caller's job.

Transport failures become :class:`~relaymw.errors.UpstreamTimeout` or
:class:`~relaymw.errors.UpstreamConnectionError`, raised from ``send`` and from body reads;
messages name ``host:port`` only (never headers or URLs), the original error is ``__cause__``.
Every client maps them in one place, :class:`_Translated`.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Literal, Protocol
from urllib.parse import urlsplit

import aiohttp
import httpx

from relaymw.config import Upstream
from relaymw.errors import UpstreamConnectionError, UpstreamError, UpstreamTimeout

__all__ = [
    "AiohttpUpstreamClient",
    "AsyncUpstreamClient",
    "AsyncUpstreamResponse",
    "HttpxAsyncUpstreamClient",
    "HttpxSyncUpstreamClient",
    "SyncUpstreamClient",
    "SyncUpstreamResponse",
    "UpstreamPool",
]


class AsyncUpstreamResponse(Protocol):
    """A response whose body has not been read yet. Always ``aclose()`` it (a no-op once
    ``closed``: its body was read to the end, or it was closed)."""

    status: int
    closed: bool

    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]:
        """As received, names in their own case (nothing decoded: the cheap form)."""
        ...

    @property
    def headers(self) -> list[tuple[str, str]]:
        """Names lower-cased, values decoded as latin-1."""
        ...

    async def read_chunk(self, on_wait: Callable[[], object] | None = None) -> bytes:
        """The next decompressed body chunk: whatever has arrived, as it arrives (no line
        splitting); ``b""`` at the end, when the response is closed.

        ``on_wait`` is called before a read that has to wait for the network, never when the
        data is already there (an implementation that cannot tell calls it every time)."""
        ...

    def read_ready(self) -> bytes | None:
        """The next chunk of :meth:`read_chunk` when it is there without waiting (``b""`` at
        the end); None when :meth:`read_chunk` would have to wait for it. A pump calls this
        first: no coroutine for data that has arrived."""
        ...

    def aiter_chunks(self) -> AsyncIterator[bytes]:
        """The chunks of :meth:`read_chunk` as an iterator."""
        ...

    async def read(self) -> bytes: ...

    async def aclose(self) -> None:
        """Idempotent. A body that was not read to the end closes the connection, so the
        upstream sees the disconnect (and stops generating) at once."""
        ...


class AsyncUpstreamClient(Protocol):
    async def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> AsyncUpstreamResponse: ...

    async def aclose(self) -> None: ...


class SyncUpstreamResponse(Protocol):
    status: int

    @property
    def headers(self) -> list[tuple[str, str]]: ...

    def iter_chunks(self) -> Iterator[bytes]: ...

    def read(self) -> bytes: ...

    def close(self) -> None: ...


class SyncUpstreamClient(Protocol):
    def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> SyncUpstreamResponse: ...

    def close(self) -> None: ...


# Errors of the transport layer. asyncio.TimeoutError is not the builtin one on Python 3.10.
_TIMEOUTS = (TimeoutError, asyncio.TimeoutError, httpx.TimeoutException)
_TRANSPORT_ERRORS = (aiohttp.ClientError, httpx.RequestError, OSError, asyncio.TimeoutError)


def _where(base_url: str) -> str:
    parts = urlsplit(base_url)
    host = parts.hostname or "?"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Translated:
    """``with`` block whose transport errors leave as the seam's :class:`UpstreamError`: the
    one place where every client maps them, before the headers and while reading the body."""

    __slots__ = ("_phase", "_where")

    def __init__(self, where: str, phase: str) -> None:
        self._where = where
        self._phase = phase

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, _TRANSPORT_ERRORS):
            raise self.error(exc) from exc

    def error(self, exc: BaseException) -> UpstreamError:
        """The seam's error for a transport error ``exc`` (raise it ``from exc``). The hot
        path calls it from an ``except`` clause: a ``with`` block costs two calls a read."""
        # Only host:port and the error's type: str(exc) may carry a URL with a query.
        timed_out = isinstance(exc, _TIMEOUTS)
        cls = UpstreamTimeout if timed_out else UpstreamConnectionError
        what = "timed out" if timed_out else "failed"
        error = cls(f"upstream {self._where} {what} {self._phase} ({type(exc).__name__})")
        error.__cause__ = exc  # compiled with mypyc, `raise ... from exc` does not set it
        return error


class _ClientBase:
    """Where a client connects, and its error mapping for each phase of a call."""

    def __init__(self, upstream: Upstream) -> None:
        where = _where(upstream.base_url)
        self._connecting = _Translated(where, "before the response headers")
        self._reading = _Translated(where, "reading the response body")
        self._inflight = 0
        self._retired = self._closed = False


class _ResponseBase:
    """Headers kept raw as received; decoded only if someone asks for :attr:`headers`."""

    __slots__ = ("_decoded", "closed", "raw_headers", "status")

    def __init__(self, status: int, raw_headers: Sequence[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.raw_headers = raw_headers
        self._decoded: list[tuple[str, str]] | None = None
        self.closed = False

    @property
    def headers(self) -> list[tuple[str, str]]:
        if self._decoded is None:
            # latin-1 keeps every byte, so the caller can re-encode the values losslessly.
            self._decoded = [
                (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in self.raw_headers
            ]
        return self._decoded


class _AsyncResponseBase(_ResponseBase):
    __slots__ = ()

    def read_ready(self) -> bytes | None:
        raise NotImplementedError

    async def read_chunk(self, on_wait: Callable[[], object] | None = None) -> bytes:
        raise NotImplementedError

    def aiter_chunks(self) -> AsyncIterator[bytes]:
        # The relay itself calls read_chunk: an async generator costs more per response
        # (the event loop registers and finalizes each one).
        return _Chunks(self)


class _Chunks:
    """The iterator of :meth:`_AsyncResponseBase.aiter_chunks`: a class, not an async
    generator, because mypyc does not compile async generators."""

    __slots__ = ("_response",)

    def __init__(self, response: _AsyncResponseBase) -> None:
        self._response = response

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._response.read_chunk()
        if not chunk:
            raise StopAsyncIteration
        return chunk


# Background close tasks must be referenced until done, or they can be garbage-collected.
_closing: set[asyncio.Task[None]] = set()


class _AsyncClientBase(_ClientBase):
    """Counts open responses so that a client replaced on reload closes only once idle."""

    def _retire(self) -> None:
        self._retired = True
        if not self._inflight:
            self._close_soon()

    def _release(self) -> None:
        self._inflight -= 1
        if self._retired and not self._inflight:
            self._close_soon()

    def _close_soon(self) -> None:
        task = asyncio.get_running_loop().create_task(self.aclose())
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    async def aclose(self) -> None:
        raise NotImplementedError


class _AiohttpResponse(_AsyncResponseBase):
    __slots__ = ("_owner", "_resp")

    def __init__(self, owner: AiohttpUpstreamClient, resp: aiohttp.ClientResponse) -> None:
        # The base's fields, set here: super().__init__ costs another call per response.
        self.status = resp.status
        self.raw_headers = resp.raw_headers
        self._decoded = None
        self.closed = False
        self._owner = owner
        self._resp = resp

    def read_ready(self) -> bytes | None:
        if self.closed:
            return b""
        content = self._resp.content
        try:
            chunk = content.read_nowait()  # whatever has arrived, in one piece
        except _TRANSPORT_ERRORS as exc:
            self._close()
            raise self._owner._reading.error(exc) from exc
        if chunk:
            return chunk
        if content.at_eof():
            self._close()
            return b""
        return None

    async def read_chunk(self, on_wait: Callable[[], object] | None = None) -> bytes:
        chunk = self.read_ready()
        if chunk is not None:
            return chunk
        if on_wait is not None:
            on_wait()
        try:
            chunk = await self._resp.content.readany()
        except _TRANSPORT_ERRORS as exc:
            self._close()
            raise self._owner._reading.error(exc) from exc
        if not chunk:
            self._close()
        return chunk

    async def read(self) -> bytes:
        try:
            with self._owner._reading:
                return await self._resp.read()
        finally:
            self._close()

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:  # nothing in it waits: no coroutine on the hot path
        if self.closed:
            return
        self.closed = True
        if self._resp.content.at_eof():
            self._resp.release()  # back to the pool
        else:
            self._resp.close()  # drop the connection: the upstream must see the disconnect
        self._owner._release()


class AiohttpUpstreamClient(_AsyncClientBase):
    """The default :class:`AsyncUpstreamClient`. The session is created on the first ``send``
    (inside the running loop it will be bound to)."""

    def __init__(self, upstream: Upstream) -> None:
        super().__init__(upstream)
        self._max_connections = upstream.max_connections
        self._session: aiohttp.ClientSession | None = None
        # Built once: sock_read bounds the wait for each chunk, not the whole (streamed) body.
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=upstream.connect_timeout_seconds,
            sock_read=upstream.timeout_seconds,
        )

    def _new_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=30.0),
            timeout=self._timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=True,
            trust_env=False,
            # No skip_auto_headers: it costs ~15 us per request (a header copy), and the caller's
            # own user-agent/content-type already suppress aiohttp's defaults.
        )

    async def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> AsyncUpstreamResponse:
        session = self._session
        if session is None:
            session = self._session = self._new_session()
        self._inflight += 1  # before the await: a reload must not close a request in progress
        try:
            resp = await session.request(
                method, url, headers=headers, data=body or None, allow_redirects=False
            )
        except BaseException as exc:
            self._release()
            if isinstance(exc, _TRANSPORT_ERRORS):
                raise self._connecting.error(exc) from exc
            raise
        return _AiohttpResponse(self, resp)

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()


class _HttpxAsyncResponse(_AsyncResponseBase):
    __slots__ = ("_chunks", "_owner", "_resp")

    def __init__(self, owner: HttpxAsyncUpstreamClient, resp: httpx.Response) -> None:
        super().__init__(resp.status_code, resp.headers.raw)
        self._owner = owner
        self._resp = resp
        self._chunks: AsyncIterator[bytes] | None = None

    def read_ready(self) -> bytes | None:
        # httpx cannot tell whether the next chunk has arrived: always "wait".
        return b"" if self.closed else None

    async def read_chunk(self, on_wait: Callable[[], object] | None = None) -> bytes:
        if self.closed:
            return b""
        if on_wait is not None:  # httpx cannot tell whether the next chunk has arrived
            on_wait()
        if self._chunks is None:
            self._chunks = self._resp.aiter_bytes()
        # The error is raised after the await, out of the handler: compiled with mypyc, a bare
        # `raise` after an await in a handler can raise another task's exception.
        chunk = b""
        failed: UpstreamError | None = None
        try:
            with self._owner._reading:
                chunk = await self._chunks.__anext__()  # never b"": httpx skips empty ones
        except StopAsyncIteration:
            pass
        except UpstreamError as exc:
            failed = exc
        if not chunk:
            await self.aclose()
        if failed is not None:
            raise failed
        return chunk

    async def read(self) -> bytes:
        # Not `finally: await ...`: compiled with mypyc, such a `finally` re-raises whatever
        # exception sys.exc_info() holds when it ends (one this coroutine handled, even).
        data = b""
        failed: BaseException | None = None
        try:
            with self._owner._reading:
                data = await self._resp.aread()
        except BaseException as exc:
            failed = exc
        await self.aclose()
        if failed is not None:
            raise failed
        return data

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            # httpcore pools the connection only if the body was read to the end.
            await self._resp.aclose()
            self._owner._release()


def _httpx_options(upstream: Upstream) -> tuple[httpx.Timeout, httpx.Limits]:
    # Waiting for a pooled connection counts as connecting, as it does in aiohttp.
    c, t, n = upstream.connect_timeout_seconds, upstream.timeout_seconds, upstream.max_connections
    timeout = httpx.Timeout(connect=c, read=t, write=t, pool=c)
    return timeout, httpx.Limits(max_connections=n, max_keepalive_connections=n)


class HttpxAsyncUpstreamClient(_AsyncClientBase):
    """:class:`AsyncUpstreamClient` on ``httpx.AsyncClient``."""

    def __init__(self, upstream: Upstream) -> None:
        super().__init__(upstream)
        timeout, limits = _httpx_options(upstream)
        self._client = httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)

    async def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> AsyncUpstreamResponse:
        self._inflight += 1
        try:
            with self._connecting:
                request = self._client.build_request(method, url, headers=headers, content=body)
                # Not client.stream(): its context manager would close the body on return.
                resp = await self._client.send(request, stream=True)
        except BaseException:
            self._release()
            raise
        return _HttpxAsyncResponse(self, resp)

    async def aclose(self) -> None:
        self._closed = True
        await self._client.aclose()


class _HttpxSyncResponse(_ResponseBase):
    __slots__ = ("_owner", "_resp")

    def __init__(self, owner: HttpxSyncUpstreamClient, resp: httpx.Response) -> None:
        super().__init__(resp.status_code, resp.headers.raw)
        self._owner = owner
        self._resp = resp

    def iter_chunks(self) -> Iterator[bytes]:
        try:
            with self._owner._reading:
                yield from self._resp.iter_bytes()
        except UpstreamError:
            self.close()
            raise
        self.close()

    def read(self) -> bytes:
        try:
            with self._owner._reading:
                return self._resp.read()
        finally:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._resp.close()
            self._owner._add_inflight(-1)


class HttpxSyncUpstreamClient(_ClientBase):
    """:class:`SyncUpstreamClient` on ``httpx.Client``; safe to share between threads."""

    def __init__(self, upstream: Upstream) -> None:
        super().__init__(upstream)
        timeout, limits = _httpx_options(upstream)
        self._client = httpx.Client(timeout=timeout, limits=limits, trust_env=False)
        self._lock = threading.Lock()

    def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> SyncUpstreamResponse:
        self._add_inflight(1)
        try:
            with self._connecting:
                request = self._client.build_request(method, url, headers=headers, content=body)
                resp = self._client.send(request, stream=True)
        except BaseException:
            self._add_inflight(-1)
            raise
        return _HttpxSyncResponse(self, resp)

    def _add_inflight(self, delta: int, retire: bool = False) -> None:
        with self._lock:
            self._inflight += delta
            self._retired = self._retired or retire
            idle = self._retired and not self._inflight
        if idle:
            self.close()

    def _retire(self) -> None:
        self._add_inflight(0, retire=True)

    def close(self) -> None:
        self._closed = True
        self._client.close()


class _LoopClients:
    __slots__ = ("clients", "retired")

    def __init__(self) -> None:
        self.clients: dict[str, tuple[Upstream, AsyncUpstreamClient]] = {}
        self.retired: list[_AsyncClientBase] = []


class UpstreamPool:
    """One pooled client per upstream, created lazily (middleware may be instantiated more
    than once; clients must be created inside the running event loop)."""

    def __init__(self, async_impl: Literal["aiohttp", "httpx"] = "aiohttp") -> None:
        self._async_factory: type[AiohttpUpstreamClient | HttpxAsyncUpstreamClient] = (
            AiohttpUpstreamClient if async_impl == "aiohttp" else HttpxAsyncUpstreamClient
        )
        # A client holds its loop strongly, so entries of closed loops are also purged by hand.
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClients] = (
            weakref.WeakKeyDictionary()
        )
        # The last loop's state, one tuple so that threads running other loops swap it whole:
        # WeakKeyDictionary.get makes a weak reference per call. (Its clients hold that loop
        # strongly anyway.)
        self._hot: tuple[asyncio.AbstractEventLoop | None, _LoopClients | None] = (None, None)
        self._sync: dict[str, tuple[Upstream, HttpxSyncUpstreamClient]] = {}
        self._sync_lock = threading.Lock()

    def get_async(self, name: str, upstream: Upstream) -> AsyncUpstreamClient:
        """The client for ``name`` in the running loop (no lock: one loop is one thread)."""
        loop = asyncio.get_running_loop()
        hot_loop, state = self._hot
        if hot_loop is not loop:
            state = self._async.get(loop)
            if state is not None:
                self._hot = (loop, state)
        if state is not None:
            entry = state.clients.get(name)
            if entry is not None and (entry[0] is upstream or entry[0] == upstream):
                return entry[1]
        return self._async_miss(loop, name, upstream)

    def _async_miss(
        self, loop: asyncio.AbstractEventLoop, name: str, upstream: Upstream
    ) -> AsyncUpstreamClient:
        for other in [lp for lp in self._async if lp.is_closed()]:
            del self._async[other]
        state = self._async.get(loop)
        if state is None:
            state = self._async[loop] = _LoopClients()
        self._hot = (loop, state)
        client = self._async_factory(upstream)
        old = state.clients.get(name)
        state.clients[name] = (upstream, client)
        if old is not None:
            # Config reload: in-flight responses keep the old client until they close.
            retiring = old[1]
            assert isinstance(retiring, _AsyncClientBase)
            state.retired = [c for c in state.retired if not c._closed]
            state.retired.append(retiring)
            retiring._retire()
        return client

    def get_sync(self, name: str, upstream: Upstream) -> SyncUpstreamClient:
        entry = self._sync.get(name)
        if entry is not None and (entry[0] is upstream or entry[0] == upstream):
            return entry[1]
        with self._sync_lock:
            entry = self._sync.get(name)
            if entry is not None and entry[0] == upstream:
                return entry[1]
            client = HttpxSyncUpstreamClient(upstream)
            self._sync[name] = (upstream, client)
        if entry is not None:
            entry[1]._retire()
        return client

    async def aclose(self) -> None:
        """Close the async clients of the running loop (lifespan shutdown)."""
        loop = asyncio.get_running_loop()
        if self._hot[0] is loop:
            self._hot = (None, None)
        state = self._async.pop(loop, None)
        if state is not None:
            for _, client in state.clients.values():
                await client.aclose()
            for retired in state.retired:
                if not retired._closed:
                    await retired.aclose()

    def close(self) -> None:
        """Close the sync clients."""
        with self._sync_lock:
            entries, self._sync = list(self._sync.values()), {}
        for _, client in entries:
            client.close()
