"""The upstream clients against a real aiohttp server on 127.0.0.1 (run in its own thread)."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import attrs
import pytest
from aiohttp import web

from relaymw.config import Upstream
from relaymw.errors import UpstreamConnectionError, UpstreamTimeout
from relaymw.upstream import (
    AiohttpUpstreamClient,
    AsyncUpstreamClient,
    AsyncUpstreamResponse,
    HttpxAsyncUpstreamClient,
    HttpxSyncUpstreamClient,
    SyncUpstreamResponse,
    UpstreamPool,
)

SECRET = "sk-test-0123456789-secret"
AUTH = {"Authorization": f"Bearer {SECRET}", "X-Api-Key": SECRET}


# --- the upstream ----------------------------------------------------------------------------


class Stream:
    """What the server saw of one /sse request."""

    def __init__(self) -> None:
        self.sent: list[float] = []
        self.disconnected = threading.Event()
        self.disconnected_at = 0.0


class FakeUpstream:
    def __init__(self) -> None:
        self.streams: dict[str, Stream] = {}
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self.runner = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_route("*", "/echo", self.echo)
        app.router.add_get("/sse", self.sse)
        app.router.add_get("/gzip", self.gzipped)
        app.router.add_get("/stall", self.stall)
        app.router.add_get("/truncate", self.truncate)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return runner

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        return web.json_response(
            {"method": request.method, "headers": headers, "body": body.decode()},
            headers={"X-Upstream-Header": "Hello"},
        )

    async def sse(self, request: web.Request) -> web.StreamResponse:
        record = self.streams.setdefault(request.query["id"], Stream())
        n, delay = int(request.query["n"]), float(request.query["delay"])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(n):
                await resp.write(f"data: {i}\n\n".encode())
                record.sent.append(time.monotonic())
                await asyncio.sleep(delay)
            await resp.write_eof()
        except (OSError, asyncio.CancelledError):
            record.disconnected_at = time.monotonic()
            record.disconnected.set()
            raise
        return resp

    async def gzipped(self, request: web.Request) -> web.Response:
        body = gzip.compress(json.dumps({"compressed": True}).encode())
        return web.Response(
            body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    async def stall(self, request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response(text="too late")

    async def truncate(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"first")
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()  # no terminating chunk: the body is incomplete
        return resp


@pytest.fixture(scope="module")
def server() -> Iterator[FakeUpstream]:
    srv = FakeUpstream()
    srv.start()
    yield srv
    srv.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed and never listened on: connecting is refused


# --- one async face for the three clients ------------------------------------------------------


class SyncResponseAdapter:
    """Drives a sync response from async tests; blocking is fine, the server has its own thread."""

    def __init__(self, resp: SyncUpstreamResponse) -> None:
        self.resp = resp
        self.status = resp.status
        self.headers = resp.headers

    async def aiter_chunks(self) -> AsyncIterator[bytes]:
        for chunk in self.resp.iter_chunks():
            yield chunk

    async def read(self) -> bytes:
        return self.resp.read()

    async def aclose(self) -> None:
        self.resp.close()


class SyncClientAdapter:
    def __init__(self, client: HttpxSyncUpstreamClient) -> None:
        self.client = client

    async def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> AsyncUpstreamResponse:
        return SyncResponseAdapter(self.client.send(method, url, headers, body))

    async def aclose(self) -> None:
        self.client.close()


MakeClient = Callable[..., AsyncUpstreamClient]


@pytest.fixture(params=["aiohttp", "httpx", "httpx-sync"])
async def make_client(
    request: pytest.FixtureRequest, server: FakeUpstream
) -> AsyncIterator[MakeClient]:
    made: list[AsyncUpstreamClient] = []

    def make(**fields: Any) -> AsyncUpstreamClient:
        upstream = Upstream(**{"base_url": server.url, "api_key": SECRET, **fields})
        client: AsyncUpstreamClient
        if request.param == "aiohttp":
            client = AiohttpUpstreamClient(upstream)
        elif request.param == "httpx":
            client = HttpxAsyncUpstreamClient(upstream)
        else:
            client = SyncClientAdapter(HttpxSyncUpstreamClient(upstream))
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


def assert_clean(exc: BaseException, port: int) -> None:
    assert f"127.0.0.1:{port}" in str(exc)
    assert SECRET not in str(exc)
    assert "Bearer" not in str(exc)
    assert exc.__cause__ is not None


# --- the clients ---------------------------------------------------------------------------


async def test_json_round_trip(make_client: MakeClient, server: FakeUpstream) -> None:
    client = make_client()
    headers = {**AUTH, "Content-Type": "application/json", "X-Custom": "Yes"}
    for _ in range(2):  # the second request reuses the pooled connection
        resp = await client.send("POST", f"{server.url}/echo", headers, b'{"a": 1}')
        assert resp.status == 200
        assert all(name == name.lower() for name, _ in resp.headers)
        assert ("x-upstream-header", "Hello") in resp.headers
        echoed = json.loads(await resp.read())
        await resp.aclose()
        assert echoed["method"] == "POST"
        assert echoed["body"] == '{"a": 1}'
        assert echoed["headers"]["x-custom"] == "Yes"
        assert echoed["headers"]["authorization"] == f"Bearer {SECRET}"


async def test_body_is_decompressed(make_client: MakeClient, server: FakeUpstream) -> None:
    resp = await make_client().send("GET", f"{server.url}/gzip", {}, b"")
    # Headers are as received: dropping content-encoding is the caller's job.
    assert ("content-encoding", "gzip") in resp.headers
    assert json.loads(await resp.read()) == {"compressed": True}
    await resp.aclose()


async def test_chunks_arrive_incrementally(make_client: MakeClient, server: FakeUpstream) -> None:
    sid = uuid.uuid4().hex
    resp = await make_client().send("GET", f"{server.url}/sse?id={sid}&n=4&delay=0.1", {}, b"")
    first_at, chunks = 0.0, []
    async for chunk in resp.aiter_chunks():
        first_at = first_at or time.monotonic()
        chunks.append(chunk)
    await resp.aclose()
    assert b"".join(chunks) == b"".join(f"data: {i}\n\n".encode() for i in range(4))
    assert first_at < server.streams[sid].sent[-1]


async def test_aclose_mid_stream_disconnects(make_client: MakeClient, server: FakeUpstream) -> None:
    sid = uuid.uuid4().hex
    resp = await make_client().send("GET", f"{server.url}/sse?id={sid}&n=200&delay=0.02", {}, b"")
    chunks = resp.aiter_chunks()
    assert await chunks.__anext__() == b"data: 0\n\n"
    await resp.aclose()
    closed_at = time.monotonic()
    await resp.aclose()  # idempotent
    record = server.streams[sid]
    assert await asyncio.to_thread(record.disconnected.wait, 1.0)
    assert record.disconnected_at - closed_at < 1.0
    assert len(record.sent) < 200


async def test_connect_refused(make_client: MakeClient) -> None:
    port = free_port()
    client = make_client(base_url=f"http://127.0.0.1:{port}")
    with pytest.raises(UpstreamConnectionError) as info:
        await client.send("POST", f"http://127.0.0.1:{port}/v1/chat?key={SECRET}", AUTH, b"{}")
    assert_clean(info.value, port)


async def test_stall_times_out(make_client: MakeClient, server: FakeUpstream) -> None:
    client = make_client(timeout_seconds=0.3)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as info:
        await client.send("GET", f"{server.url}/stall", AUTH, b"")
    assert time.monotonic() - started < 2.0
    assert_clean(info.value, int(server.url.rsplit(":", 1)[1]))


async def test_stall_mid_body_times_out(make_client: MakeClient, server: FakeUpstream) -> None:
    client = make_client(timeout_seconds=0.3)
    sid = uuid.uuid4().hex
    resp = await client.send("GET", f"{server.url}/sse?id={sid}&n=2&delay=2", AUTH, b"")
    received = []
    with pytest.raises(UpstreamTimeout) as info:
        async for chunk in resp.aiter_chunks():
            received.append(chunk)
    assert received == [b"data: 0\n\n"]
    assert_clean(info.value, int(server.url.rsplit(":", 1)[1]))
    await resp.aclose()


async def test_truncated_body_from_chunks(make_client: MakeClient, server: FakeUpstream) -> None:
    resp = await make_client().send("GET", f"{server.url}/truncate", AUTH, b"")
    assert resp.status == 200
    received = []
    with pytest.raises(UpstreamConnectionError) as info:
        async for chunk in resp.aiter_chunks():
            received.append(chunk)
    assert received == [b"first"]
    assert_clean(info.value, int(server.url.rsplit(":", 1)[1]))
    await resp.aclose()


async def test_truncated_body_from_read(make_client: MakeClient, server: FakeUpstream) -> None:
    resp = await make_client().send("GET", f"{server.url}/truncate", AUTH, b"")
    with pytest.raises(UpstreamConnectionError):
        await resp.read()
    await resp.aclose()


# --- the pool --------------------------------------------------------------------------------


def closed(client: object) -> bool:
    return bool(getattr(client, "_closed"))  # noqa: B009


async def wait_for(condition: Callable[[], bool]) -> None:
    for _ in range(100):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met within 1 s")


async def get_json(client: AsyncUpstreamClient, url: str) -> Any:
    resp = await client.send("GET", url, {}, b"")
    try:
        return json.loads(await resp.read())
    finally:
        await resp.aclose()


@pytest.mark.parametrize(
    ("impl", "cls"), [("aiohttp", AiohttpUpstreamClient), ("httpx", HttpxAsyncUpstreamClient)]
)
async def test_pool_caches_per_name_and_value(
    server: FakeUpstream, impl: Any, cls: type[object]
) -> None:
    pool = UpstreamPool(impl)
    up = Upstream(base_url=server.url)
    client = pool.get_async("a", up)
    assert isinstance(client, cls)
    assert pool.get_async("a", up) is client
    assert pool.get_async("a", attrs.evolve(up)) is client  # equal value, other object
    other = pool.get_async("b", up)
    assert other is not client
    assert (await get_json(client, f"{server.url}/echo"))["method"] == "GET"
    await pool.aclose()
    assert closed(client)
    assert closed(other)
    assert pool.get_async("a", up) is not client  # a fresh one after shutdown
    await pool.aclose()


async def test_pool_replaces_client_on_reload(server: FakeUpstream) -> None:
    pool = UpstreamPool()
    up = Upstream(base_url=server.url)
    old = pool.get_async("a", up)
    sid = uuid.uuid4().hex
    resp = await old.send("GET", f"{server.url}/sse?id={sid}&n=3&delay=0.05", {}, b"")
    new = pool.get_async("a", attrs.evolve(up, timeout_seconds=5.0))
    assert new is not old
    assert pool.get_async("a", attrs.evolve(up, timeout_seconds=5.0)) is new
    await asyncio.sleep(0.05)
    assert not closed(old)  # the in-flight stream keeps it open ...
    assert await resp.read() == b"".join(f"data: {i}\n\n".encode() for i in range(3))
    await wait_for(lambda: closed(old))  # ... and it closes once idle
    assert (await get_json(new, f"{server.url}/echo"))["method"] == "GET"
    idle = pool.get_async("a", up)  # an idle client is closed right away
    await wait_for(lambda: closed(new))
    await pool.aclose()
    assert closed(idle)


def test_pool_separates_event_loops(server: FakeUpstream) -> None:
    pool = UpstreamPool()
    up = Upstream(base_url=server.url)

    async def use(close: bool) -> AsyncUpstreamClient:
        client = pool.get_async("a", up)
        assert pool.get_async("a", up) is client
        await get_json(client, f"{server.url}/echo")
        if close:
            await client.aclose()  # the loop ends without a lifespan shutdown
        else:
            await pool.aclose()
        return client

    first = asyncio.run(use(close=True))
    second = asyncio.run(use(close=False))
    assert first is not second
    assert len(pool._async) == 0  # the closed loop's entry was dropped


def test_pool_sync(server: FakeUpstream) -> None:
    pool = UpstreamPool()
    up = Upstream(base_url=server.url)
    barrier = threading.Barrier(8)
    got: list[object] = []

    def get() -> None:
        barrier.wait()
        got.append(pool.get_sync("a", up))

    threads = [threading.Thread(target=get) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client = pool.get_sync("a", up)
    assert all(c is client for c in got)
    resp = client.send("GET", f"{server.url}/echo", {}, b"")
    new = pool.get_sync("a", attrs.evolve(up, timeout_seconds=5.0))
    assert new is not client
    assert not closed(client)  # in flight
    assert json.loads(resp.read())["method"] == "GET"
    assert closed(client)  # idle now
    pool.close()
    assert closed(new)


async def test_pool_needs_running_loop_for_async() -> None:
    pool = UpstreamPool()
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError):
        await asyncio.to_thread(pool.get_async, "a", Upstream(base_url="http://127.0.0.1:1"))


@pytest.mark.parametrize("impl", ["aiohttp", "httpx"])
async def test_read_ready_takes_what_has_arrived_without_waiting(
    impl: str, server: FakeUpstream
) -> None:
    upstream = Upstream(base_url=server.url, api_key=SECRET)
    client = (
        AiohttpUpstreamClient(upstream) if impl == "aiohttp" else HttpxAsyncUpstreamClient(upstream)
    )
    try:
        sid = uuid.uuid4().hex
        resp = await client.send("GET", f"{server.url}/sse?id={sid}&n=3&delay=0.3", {}, b"")
        got = [await resp.read_chunk()]  # the first event, sent at once
        assert resp.read_ready() is None  # the next is 0.3 s away: it would wait
        await asyncio.sleep(1.5)  # the rest and the end arrive meanwhile
        while (chunk := resp.read_ready()) is not None and chunk:
            got.append(chunk)
        if impl == "aiohttp":  # aiohttp tells what has arrived: all of it, then the end
            assert chunk == b"" and resp.closed
        else:  # httpx cannot tell: read_ready always says "wait" until the end
            assert chunk is None and not resp.closed
            while chunk := await resp.read_chunk():
                got.append(chunk)
            assert resp.closed and resp.read_ready() == b""
        assert b"".join(got) == b"".join(f"data: {i}\n\n".encode() for i in range(3))
        await resp.aclose()  # a no-op once closed
    finally:
        await client.aclose()
