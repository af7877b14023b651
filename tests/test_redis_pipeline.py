"""The auto-pipelined asyncio Redis client (relaymw.redis_pipeline), against real servers: the
shared Redis, a private ``redis-server`` with a password (killed and restarted), and sockets
of our own that refuse, stall or answer nonsense."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import pytest
import redis
import redis.exceptions

from relaymw import redis_pipeline
from relaymw.budgets import BudgetLedger, BudgetScopes
from relaymw.config import Budget
from relaymw.limiting import make_storage
from relaymw.redis_pipeline import PipelinedRedis, pipelined_client
from tests.support import REDIS_PASSWORD, RedisServer, free_port


def reads_served(admin: redis.Redis) -> int:
    """Reads the server has made from client sockets: about one per write that reached it
    (this INFO call is one more)."""
    return int(admin.info("stats")["total_reads_processed"])


def client_for(url: str, timeout: float = 1.0) -> PipelinedRedis:
    client = pipelined_client(url, timeout=timeout)
    assert client is not None
    return client


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[PipelinedRedis]:
    """A client of the shared Redis, closed after the test."""
    client = client_for(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def key(client: PipelinedRedis, redis_prefix: str) -> AsyncIterator[str]:
    """A key of the shared Redis that no other test uses, deleted after the test."""
    key = f"{redis_prefix}:key"
    yield key
    await client.delete(key)


async def test_commands_of_many_tasks_share_writes_and_each_gets_its_own_reply(
    own_redis: RedisServer,
) -> None:
    client = client_for(own_redis.url)
    await client.ping()  # connected: the handshake's reads are not counted below
    admin = redis.Redis.from_url(own_redis.url)
    before = reads_served(admin)
    values = await asyncio.gather(*(client.incrby(f"k{i % 7}", i) for i in range(200)))
    after = reads_served(admin)
    admin.close()
    # Each task added i to its key: the reply it got is that key's running total, so every
    # reply went to the task whose command it answers, in order.
    totals: dict[int, int] = {}
    for i, value in enumerate(values):
        totals[i % 7] = totals.get(i % 7, 0) + i
        assert value == totals[i % 7]
    # 200 commands sent in the same loop turn leave in one write (the INFO call is one more;
    # the server may take a large write in two reads).
    assert after - before <= 3
    await client.aclose()


async def test_scripts_reload_after_the_server_forgets_them(
    client: PipelinedRedis, key: str, redis_url: str
) -> None:
    script = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert await script([key], [2]) == 2
    with redis.Redis.from_url(redis_url) as admin:
        admin.script_flush()
    assert await script([key], [3]) == 5  # NOSCRIPT, then the script itself (EVAL)
    with pytest.raises(redis.exceptions.NoScriptError):
        await client.evalsha("0" * 40, 0)


async def test_error_replies_are_redis_py_exceptions_and_the_rest_goes_on(
    client: PipelinedRedis, key: str, redis_prefix: str
) -> None:
    await client.rpush(key, "a", "b")
    wrong, fine = await asyncio.gather(client.incr(key), client.lrange(key, 0, -1),
                                       return_exceptions=True)  # fmt: skip
    assert isinstance(wrong, redis.exceptions.ResponseError)
    assert "WRONGTYPE" in str(wrong)
    assert fine == [b"a", b"b"]
    assert await client.ping() is True  # redis-py's reply callbacks still apply
    assert await client.get(f"{redis_prefix}:missing") is None


async def test_password_and_database_from_the_url(own_redis: RedisServer) -> None:
    url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{own_redis.port}/3"
    client = client_for(url)
    await client.set("where", "db3")
    with redis.Redis.from_url(url) as admin:
        assert admin.get("where") == b"db3"
    with redis.Redis.from_url(url.replace("/3", "/0")) as admin:
        assert admin.get("where") is None
    await client.aclose()
    wrong = client_for(f"redis://:not-{REDIS_PASSWORD}@127.0.0.1:{own_redis.port}/0")
    with pytest.raises(redis.exceptions.AuthenticationError) as failed:
        await wrong.ping()
    assert REDIS_PASSWORD not in str(failed.value)
    await wrong.aclose()


async def test_a_refused_connection_is_a_connection_error() -> None:
    client = client_for(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(redis.exceptions.ConnectionError):
        await client.ping()
    await client.aclose()


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """Accepts connections and reads, never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


async def test_a_server_that_never_answers_times_out_every_waiting_command() -> None:
    with silent_server() as port:
        client = client_for(f"redis://127.0.0.1:{port}/0", timeout=0.3)
        started = asyncio.get_running_loop().time()
        outcomes = await asyncio.gather(client.ping(), client.get("x"), return_exceptions=True)
        waited = asyncio.get_running_loop().time() - started
        assert all(isinstance(o, redis.exceptions.TimeoutError) for o in outcomes)
        assert 0.25 <= waited < 5
        await client.aclose()


async def test_a_killed_server_fails_the_commands_and_a_restarted_one_serves_again(
    own_redis: RedisServer,
) -> None:
    client = client_for(own_redis.url)
    assert await client.set("a", 1)
    own_redis.kill()
    with pytest.raises(redis.exceptions.ConnectionError):
        await client.get("a")
    own_redis.start()
    assert await client.set("a", 2)  # a new connection, made by the next command
    assert await client.get("a") == b"2"
    await client.aclose()


async def test_a_cancelled_caller_leaves_the_others_replies_in_place(
    client: PipelinedRedis, key: str
) -> None:
    await client.set(key, "value")
    first = asyncio.ensure_future(client.get(key))
    second = asyncio.ensure_future(client.echo("second"))
    await asyncio.sleep(0)  # both sent
    first.cancel()
    assert await second == b"second"
    assert await client.get(key) == b"value"
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_clients_of_one_server_share_one_connection_until_the_last_closes(
    redis_url: str,
) -> None:
    one, two = client_for(redis_url), client_for(redis_url)
    await one.ping()
    await two.ping()
    assert one.channel is two.channel and one.channel is not None
    channel = one.channel
    await one.aclose()
    assert not channel.closed
    await two.aclose()
    assert channel.closed


def test_a_client_follows_a_new_event_loop(redis_url: str, redis_prefix: str) -> None:
    client = client_for(redis_url)
    key = f"{redis_prefix}:loops"
    for n in (1, 2):
        assert asyncio.run(client.incr(key)) == n  # each run is a new loop
    assert asyncio.run(client.delete(key)) == 1
    asyncio.run(client.aclose())


def test_one_client_serves_the_event_loops_of_two_threads_at_once(
    redis_url: str, redis_prefix: str
) -> None:
    client = client_for(redis_url)
    loops: list[asyncio.AbstractEventLoop] = []

    async def count(key: str) -> Any:
        loops.append(asyncio.get_running_loop())
        for _ in range(300):
            await client.incr(key)
        value = await client.get(key)
        await client.delete(key)
        return value

    keys = [f"{redis_prefix}:a", f"{redis_prefix}:b"]
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(lambda key: asyncio.run(count(key)), keys)) == [b"300", b"300"]
    asyncio.run(client.aclose())
    assert not any(loop in loops for loop, _ in redis_pipeline._channels)  # all forgotten


def test_only_plain_urls_are_pipelined() -> None:
    assert pipelined_client("redis://127.0.0.1:6379/0", timeout=1) is not None
    assert pipelined_client("unix:///tmp/redis.sock", timeout=1) is not None
    for url in ("rediss://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0?protocol=3"):
        assert pipelined_client(url, timeout=1) is None


async def test_the_limits_storage_and_the_budgets_talk_through_one_shared_connection(
    redis_url: str, redis_prefix: str
) -> None:
    storage = make_storage(f"async+{redis_url}", key_prefix=redis_prefix)
    limits_client = storage.bridge.storage
    assert isinstance(limits_client, PipelinedRedis)
    ledger = BudgetLedger([Budget(scope="global", period="day", limit_usd=1)], redis_url)
    ledger.prefix = redis_prefix
    budgets_client = ledger._clients[True][0]
    assert isinstance(budgets_client, PipelinedRedis)
    assert await storage.check()
    await ledger.areserve(BudgetScopes(), Decimal("0.1"))
    assert limits_client.channel is budgets_client.channel
    await limits_client.aclose()
    await ledger.aclose()
    ledger.close()


# --- the protocol (hiredis) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "wire"),
    [
        (("GET", "k"), b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"),
        (("SCRIPT LOAD", "return 1"), b"*3\r\n$6\r\nSCRIPT\r\n$4\r\nLOAD\r\n$8\r\nreturn 1\r\n"),
        (("SET", b"\x00\xff", 1.5, -2, "é"),
         b"*5\r\n$3\r\nSET\r\n$2\r\n\x00\xff\r\n$3\r\n1.5\r\n$2\r\n-2\r\n$2\r\n\xc3\xa9\r\n"),
    ],
)  # fmt: skip
def test_commands_are_packed_as_redis_py_packs_them(args: tuple[Any, ...], wire: bytes) -> None:
    assert redis_pipeline._pack(args) == wire


def test_replies_are_read_whatever_the_chunks() -> None:
    wire = b"*3\r\n$3\r\nabc\r\n:-5\r\n*-1\r\n+OK\r\n$-1\r\n-NOSCRIPT gone\r\n$0\r\n\r\n"
    for size in (1, 2, 7, len(wire)):
        reader = redis_pipeline._reader()
        replies: list[Any] = []
        for start in range(0, len(wire), size):
            reader.feed(wire[start : start + size])
            while (reply := reader.gets()) is not False:
                replies.append(reply)
        assert replies[:3] == [[b"abc", -5, None], b"OK", None]
        assert isinstance(replies[3], redis.exceptions.ResponseError)
        assert replies[3].args[0] == "NOSCRIPT gone"
        assert replies[4] == b""


def test_without_hiredis_clients_keep_redis_py_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(redis_pipeline, "hiredis", None)
    assert pipelined_client("redis://127.0.0.1:6379/0", timeout=1) is None
    storage = make_storage("async+redis://127.0.0.1:6379/0")
    assert not isinstance(storage.bridge.storage, PipelinedRedis)


async def test_a_reply_nobody_asked_for_drops_the_connection() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def rogue() -> None:
        conn, _ = listener.accept()
        conn.recv(100)
        conn.sendall(b"+PONG\r\n+EXTRA\r\n")
        with contextlib.suppress(OSError):
            conn.recv(100)
        conn.close()

    thread = threading.Thread(target=rogue, daemon=True)
    thread.start()
    client = client_for(f"redis://127.0.0.1:{listener.getsockname()[1]}/0")
    try:
        await client.ping()  # answered; then the stray reply closes the connection
        await asyncio.sleep(0.05)
        assert client.channel is not None and client.channel.closed
    finally:
        await client.aclose()
        thread.join(5)
        listener.close()
