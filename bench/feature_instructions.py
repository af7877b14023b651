"""Instructions per request of the per-request features, counted by callgrind.

The relay of ``bench_sidebyside.py``'s ``relaymw-gateway`` row (``servers.full_document``:
95/5 split sticky by header with signed cookies, request + token limits, a month budget, a
cost cap, a health check; a ``PrometheusSink`` and a ``request_finished`` receiver
connected), with the guards on ``memory://`` so no Redis round trip is counted. Each case is
one step of a request on the side-by-side body (the upstream itself is left out):

* ``request``: a whole gateway request as ``bench_guard.one`` does it (decide, admit,
  record, settle), through the ``RequestView`` the ASGI adapter would build;
* ``prepare``: ``Guard.prepare`` (token estimate + price + cost cap);
* ``estimate``: the token estimate alone; ``cost cap``: ``apply_cost_cap`` alone;
* ``cost``: ``cost_of_usage`` of the usage FakeLLM reports;
* ``record``: ``Relay._record`` (cost, metrics window, ``request_finished``);
* ``finished``: sending ``request_finished`` to the Prometheus sink and the receiver.

Run the case twice under callgrind with different counts and divide the difference in
instructions by the difference in calls, so start-up and set-up cancel out::

    python bench/feature_instructions.py --all          # every case, a table (a few minutes)
    python bench/feature_instructions.py --all request  # only the cases named
    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/feature_instructions.py request 2000
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import callgrind_instructions  # noqa: E402

RUNS = (500, 2_500)
WARMUP = 300
USERS = 1_024


def build() -> dict[str, Callable[[int], object]]:
    """Each case: a callable of the request number."""
    import orjson
    from servers import ALIAS, full_document

    from relaymw import Relay, signals
    from relaymw.cost import apply_cost_cap, cost_of_usage
    from relaymw.engine import Exchange
    from relaymw.protocols import Usage
    from relaymw.sinks import PrometheusSink
    from relaymw.snapshot import RawHeaders, RequestView

    relay = Relay(full_document("http://127.0.0.1:9", "memory://"), health=False)
    finished = {"requests": 0}

    def count(sender: Any, **event: Any) -> None:
        finished["requests"] += 1

    signals.request_finished.connect(count, weak=False)
    sinks = (PrometheusSink(), count)
    body_bytes = orjson.dumps(
        {
            "model": ALIAS,
            "messages": [{"role": "user", "content": "Write a haiku about load balancers."}],
            "max_tokens": 64,
        }
    )
    views = [
        RequestView(
            RawHeaders(
                [
                    (b"authorization", b"Bearer sk-user-%d" % i),
                    (b"x-user-id", b"user-%d" % i),
                    (b"content-type", b"application/json"),
                ]
            ),
            "127.0.0.1",
            "http",
        )
        for i in range(USERS)
    ]
    usage = Usage(prompt_tokens=18, completion_tokens=20)
    snapshot = relay.snapshot
    endpoint = snapshot.gateway["/v1/chat/completions"]
    loop = asyncio.new_event_loop()

    async def one(i: int) -> None:
        exchange = Exchange(relay, "gateway", endpoint)
        request = views[i % USERS]
        call = relay.prepare_gateway(snapshot, endpoint, body_bytes, request, exchange)
        assert call is not None
        if exchange.admission is not None:
            await relay.guard.aadmit(exchange.admission, request)
        exchange.finish(200, usage)
        await relay.asettle(exchange)

    # One decided request whose parts the other cases repeat.
    exchange = Exchange(relay, "gateway", endpoint)
    call = relay.prepare_gateway(snapshot, endpoint, body_bytes, views[0], exchange)
    assert call is not None and exchange.choice is not None and exchange.body is not None
    choice, body = exchange.choice, exchange.body
    route = snapshot.routes[choice.route].route
    admission = exchange.admission
    assert admission is not None
    estimator = relay.guard.estimator
    price, cap = admission.price, route.cost_limit_per_request
    event = dict(
        route=choice.route, version=choice.version_tag, status=200, latency_ms=12.5,
        ttft_ms=None, prompt_tokens=18, completion_tokens=20, cost_usd=Decimal("0.000196"),
        stream=False, error=None, mode="gateway", protocol="openai", usage_estimated=False,
        cached_tokens=0,
    )  # fmt: skip

    def record(i: int) -> None:
        exchange.done = False
        relay._record(exchange, 200, usage, None)

    cases: dict[str, Callable[[int], object]] = {
        "request": lambda i: loop.run_until_complete(one(i)),
        "prepare": lambda i: relay.guard.prepare(body, endpoint, choice, route, price),
        "estimate": lambda i: estimator.prompt_tokens(body, endpoint),
        "cost cap": lambda i: apply_cost_cap(
            body, endpoint, price, cap, "clamp", 18, 4096, route=ALIAS, version="gpt-v1"
        ),
        "cost": lambda i: cost_of_usage(price, usage),
        "record": record,
        "finished": lambda i: signals.send(signals.request_finished, relay, **event),
    }
    cases["_keep"] = lambda i: sinks  # the sinks stay connected while cases run
    return cases


def run_case(name: str, calls: int) -> None:
    case = build()[name]
    for i in range(WARMUP):  # caches and specialised bytecode, as in a long-running server
        case(i)
    for i in range(calls):
        case(i)


def instructions(name: str, calls: int) -> int:
    return callgrind_instructions([__file__, name, str(calls)])


def main(names: list[str]) -> None:
    low, high = RUNS
    print(f"| {'case':<10} | instructions per call |")
    print(f"|{'-' * 12}|{'-' * 22}:|")
    for name in names or [n for n in build() if not n.startswith("_")]:
        per_call = (instructions(name, high) - instructions(name, low)) / (high - low)
        print(f"| {name:<10} | {per_call:>21,.0f} |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--all"]:
        main(sys.argv[2:])
    else:
        run_case(sys.argv[1], int(sys.argv[2]))
