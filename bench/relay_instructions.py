"""Instructions per relayed request, counted by callgrind: relaymw against the bare relay.

The apps of ``bench_relay.py`` (``servers.APPS``) are called in this process as ASGI apps,
without a server in front of them: the load is ``C`` tasks that each send one request after
the other through the app (the scope, body and headers the load generator would send, one
user per request), and the apps relay them to a real FakeLLM in another process, over
localhost, with the same aiohttp client they use in the benchmark. What differs between two
apps is then only their own code, counted to the instruction, whatever else the machine does.

Run one case twice under callgrind with different counts and divide the difference by the
difference in requests, so start-up and set-up cancel out::

    python bench/relay_instructions.py --all            # every case, a table (a few minutes)
    python bench/relay_instructions.py --all stream     # only cases whose name has "stream"
    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/relay_instructions.py relaymw-routing stream 2000 --upstream URL

``--all`` starts FakeLLM itself; a single run needs one (``python bench/servers.py fakellm
--port P``). ``--callgrind-out-file=relay.out`` instead of ``/dev/null`` keeps the profile
for ``callgrind_annotate``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import machine  # noqa: E402
from common import CLIENT_KEY, USERS, callgrind_instructions, chat_body, free_port  # noqa: E402

RUNS = (400, 1_600)
WARMUP = 300
CONCURRENCY = 16
# (app, mode, path): mode "json"/"stream" for the gateway path, "echo" for passthrough.
CASES = (
    ("bare-aiohttp", "json"),
    ("relaymw-routing", "json"),
    ("bare-aiohttp", "stream"),
    ("relaymw-routing", "stream"),
    ("passthrough-app", "echo"),
    ("passthrough-routing", "echo"),
)
BASELINE = {"relaymw-routing": "bare-aiohttp", "passthrough-routing": "passthrough-app"}


def _scope(path: str, body: bytes, user: int) -> dict[str, Any]:
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"content-type", b"application/json"),
        (b"accept", b"*/*"),
        (b"authorization", f"Bearer {CLIENT_KEY}-{user}".encode()),
        (b"x-user-id", f"user-{user}".encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 40000 + user),
        "scheme": "http",
        "method": "POST",
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "state": {},
    }


async def _drive(app: Any, model: str, mode: str, requests: int, concurrency: int) -> None:
    if mode == "echo":
        path, body = "/echo", b'{"hello": "world"}'
    else:
        path, body = "/v1/chat/completions", chat_body(model, mode == "stream").encode()
    scopes = [_scope(path, body, user) for user in range(USERS)]
    request = {"type": "http.request", "body": body, "more_body": False}
    counter = iter(range(requests))

    async def one(n: int) -> None:
        done = asyncio.Event()
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return request
            await done.wait()  # the client stays until the answer is whole
            return {"type": "http.disconnect"}

        status = 0
        last = False

        async def send(message: dict[str, Any]) -> None:
            nonlocal status, last
            if message["type"] == "http.response.start":
                status = message["status"]
            elif not message.get("more_body", False):
                last = True

        await app(scopes[n % USERS], receive, send)
        done.set()
        if status != 200 or not last:
            raise SystemExit(f"request {n}: status {status}, complete {last}")

    async def worker() -> None:
        for n in counter:
            await one(n)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


@contextlib.asynccontextmanager
async def _lifespan(app: Any) -> AsyncIterator[None]:
    """The app's lifespan, as a server runs it: startup, then shutdown (closing its clients)."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.ensure_future(app(scope, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    await outbox.get()
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await task


def run_case(name: str, mode: str, requests: int, upstream: str, concurrency: int) -> None:
    from servers import ALIAS, APPS, UPSTREAM_MODEL

    # The bare relays name the upstream model, as in bench_relay.py; relaymw the alias.
    model = UPSTREAM_MODEL if name.startswith("bare") else ALIAS
    loop_name, _ = machine.loop_settings()
    if loop_name == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    app = APPS[name](upstream, {})

    async def main() -> None:
        async with _lifespan(app):
            await _drive(app, model, mode, WARMUP, concurrency)
            await _drive(app, model, mode, requests, concurrency)

    asyncio.run(main())


def instructions(name: str, mode: str, requests: int, upstream: str, concurrency: int) -> int:
    return callgrind_instructions(
        [__file__, name, mode, str(requests), "--upstream", upstream, "-c", str(concurrency)]
    )


@contextlib.contextmanager
def fakellm() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "servers.py"), "fakellm", "--port", str(port)],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("FakeLLM did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def table(wanted: Sequence[str], concurrency: int) -> None:
    cases = [c for c in CASES if not wanted or any(w in " ".join(c) for w in wanted)]
    per: dict[tuple[str, str], float] = {}
    print(f"| app | mode | instructions per request (c={concurrency}) | vs its baseline |")
    print("|---|---|--:|--:|")
    with fakellm() as upstream:
        for name, mode in cases:
            low, high = (instructions(name, mode, n, upstream, concurrency) for n in RUNS)
            per[name, mode] = (high - low) / (RUNS[1] - RUNS[0])
            base = per.get((BASELINE.get(name, ""), mode))
            extra = f"+{per[name, mode] - base:,.0f}" if base is not None else ""
            print(f"| {name} | {mode} | {per[name, mode]:,.0f} | {extra} |", flush=True)


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python bench/relay_instructions.py")
    parser.add_argument("--all", nargs="*", metavar="FILTER")
    parser.add_argument("name", nargs="?")
    parser.add_argument("mode", nargs="?", choices=["json", "stream", "echo"])
    parser.add_argument("requests", nargs="?", type=int, default=1_000)
    parser.add_argument("--upstream", default="")
    parser.add_argument("-c", type=int, default=CONCURRENCY, dest="concurrency")
    args = parser.parse_args(argv)
    if args.all is not None:
        table(args.all, args.concurrency)
    else:
        run_case(args.name, args.mode, args.requests, args.upstream, args.concurrency)


if __name__ == "__main__":
    main(sys.argv[1:])
