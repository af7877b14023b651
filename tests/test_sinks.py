"""The built-in sinks on real traffic: a Relay under uvicorn, FakeLLM upstream, the OpenAI SDK.

Nothing is mocked: requests go through the middleware, the relay sends its signals, and the
sinks are read the way an operator would read them (a Prometheus scrape, the audit file, the
log records).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import tomli_w
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from relaymw import Relay, RelayMiddleware, signals
from relaymw.sinks import JsonlAuditSink, LoggingSink, PrometheusSink, install, scrub
from relaymw.stores import FileStore
from relaymw.testing import FakeLLM, serve_asgi
from tests.support import UPSTREAM_KEY, Recorder, relay_document

ROUTE, VERSION = "chat-production", "gpt-v1"
STICKY_SECRET = "sticky-cookie-secret-456"
PIN_TOKEN = "pin-token-789"
CLIENT_KEY = "client-key-abc"
REQUEST_FIELDS = {
    "time", "event", "route", "version", "status", "latency_ms", "ttft_ms", "prompt_tokens",
    "completion_tokens", "cached_tokens", "cost_usd", "stream", "error", "mode", "protocol",
    "usage_estimated",
}  # fmt: skip


async def _not_found(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def one_version_doc(fake: FakeLLM) -> dict[str, Any]:
    """The support document with ``chat-production`` sending everything to ``gpt-v1``."""
    rules = [{"version_tag": VERSION, "weight": 100}]
    return relay_document(fake.base_url, chat_production={"route_rules": rules})


@contextlib.contextmanager
def serving(relay: Relay) -> Iterator[openai.OpenAI]:
    """The relay as gateway middleware under uvicorn; an OpenAI client pointed at it."""
    try:
        with serve_asgi(RelayMiddleware(_not_found, relay=relay)) as url:
            yield openai.OpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0)
    finally:
        relay.close()


def chat(client: openai.OpenAI, stream: bool = False) -> None:
    messages: Any = [{"role": "user", "content": "hello"}]
    if stream:
        assert list(client.chat.completions.create(model=ROUTE, messages=messages, stream=True))
    else:
        assert client.chat.completions.create(model=ROUTE, messages=messages).choices


def failing_chat(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError):
        chat(client)


def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """request_finished may be sent just after the client has its answer: poll for it."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.01)


def scraped(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The sum of the scraped samples called ``name`` whose labels include ``labels``."""
    text = generate_latest(registry).decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def connected(owner: object) -> bool:
    """Whether a method of ``owner`` (or a partial of one) hears ``request_finished``."""
    for receiver in signals.request_finished.receivers.values():
        target = getattr(receiver, "func", receiver)
        if getattr(target, "__self__", None) is owner:
            return True
    return False


def requests_total(registry: CollectorRegistry, namespace: str = "relaymw") -> float:
    return scraped(registry, f"{namespace}_requests_total", route=ROUTE, version=VERSION)


# --- Prometheus ----------------------------------------------------------------------------


def test_prometheus_counts_requests_errors_latency_tokens_and_cost(
    fake_llm: FakeLLM, finished: Recorder
) -> None:
    registry = CollectorRegistry()
    successes, failures = 3, 2
    with PrometheusSink(registry), serving(Relay(one_version_doc(fake_llm))) as client:
        chat(client)
        chat(client)
        chat(client, stream=True)
        fake_llm.set("*", status=503, error_rate=1.0)
        for _ in range(failures):
            failing_chat(client)
        eventually(lambda: requests_total(registry) == successes + failures)

    rv = {"route": ROUTE, "version": VERSION}
    assert scraped(registry, "relaymw_requests_total", status="2xx", **rv) == successes
    assert scraped(registry, "relaymw_requests_total", status="5xx", **rv) == failures
    assert scraped(registry, "relaymw_errors_total", error="upstream_error", **rv) == failures
    assert scraped(registry, "relaymw_latency_seconds_count", **rv) == successes + failures
    assert scraped(registry, "relaymw_latency_seconds_bucket", le="120.0", **rv) == 5
    assert scraped(registry, "relaymw_ttft_seconds_count", **rv) == 1  # the one stream
    assert scraped(registry, "relaymw_tokens_total", kind="prompt", **rv) > 0
    assert scraped(registry, "relaymw_tokens_total", kind="completion", **rv) > 0
    cost = scraped(registry, "relaymw_cost_usd_total", **rv)
    events = finished.wait_for(successes + failures)
    assert cost > 0
    assert cost == pytest.approx(float(sum((e["cost_usd"] for e in events), Decimal(0))))


def test_prometheus_sink_built_twice_counts_each_request_once(fake_llm: FakeLLM) -> None:
    registry = CollectorRegistry()
    first = PrometheusSink(registry)
    second = PrometheusSink(registry)  # no "Duplicated timeseries": the collectors are reused
    other = PrometheusSink(registry, namespace="relaymw_other")  # its own collectors
    assert second.metrics is first.metrics and other.metrics is not first.metrics
    try:
        with serving(Relay(one_version_doc(fake_llm))) as client:
            chat(client)
            chat(client)
            eventually(lambda: requests_total(registry, "relaymw_other") == 2)
            eventually(lambda: requests_total(registry) == 2)
            second.close()  # the first one still counts
            chat(client)
            eventually(lambda: requests_total(registry, "relaymw_other") == 3)
            eventually(lambda: requests_total(registry) == 3)
            first.close()  # the last one out: nothing counts in this namespace any more
            first.close()  # closing again is harmless
            chat(client)
            eventually(lambda: requests_total(registry, "relaymw_other") == 4)
        assert requests_total(registry) == 3
    finally:
        for sink in (first, second, other):
            sink.close()


def test_prometheus_sink_twice_on_the_default_registry() -> None:
    namespace = "relaymw_sinks_test"
    with PrometheusSink(namespace=namespace) as a, PrometheusSink(namespace=namespace) as b:
        assert a.metrics is b.metrics and connected(a.metrics)
        a.close()
        assert connected(a.metrics)  # b is still open
    assert not connected(a.metrics)


def test_a_sink_keeps_counting_after_its_last_reference_is_dropped(fake_llm: FakeLLM) -> None:
    registry = CollectorRegistry()
    sink = PrometheusSink(registry)
    metrics, handle = sink.metrics, weakref.ref(sink)
    del sink
    gc.collect()
    assert handle() is None  # blinker holds receivers weakly by default: these are strong
    try:
        with serving(Relay(one_version_doc(fake_llm))) as client:
            chat(client)
            eventually(lambda: requests_total(registry) == 1)
    finally:
        metrics.disconnect()


def test_prometheus_series_follow_each_event_whatever_was_counted_before() -> None:
    """The sink keeps each (route, version)'s bound series: later events with other statuses,
    errors, streams, tokens or labels still land in their own series, and a series appears
    only once it has a value."""
    registry = CollectorRegistry()
    base = {"route": "r", "version": "v", "latency_ms": 10.0, "cost_usd": Decimal(0)}
    with PrometheusSink(registry):
        send = signals.request_finished.send
        send(None, **base, status=200, prompt_tokens=0, completion_tokens=0)
        text = generate_latest(registry).decode()
        for absent in ("relaymw_ttft_seconds_count{", "relaymw_tokens_total{", "cost_usd_total{"):
            assert absent not in text  # no value yet: no series
        send(None, **base, status=200, prompt_tokens=5, completion_tokens=7, ttft_ms=3.0)
        send(None, **base, status=503, error="upstream_error")
        send(None, **{**base, "status": 200.0})  # not an int status: "none", as before
        send(None, **{**base, "route": None, "version": None, "status": None})
        send(None, **{**base, "route": ["odd"], "status": 429, "cost_usd": Decimal("0.25")})
        send(None, **base, status=204, mode="gateway", extra_field="ignored")
    rv = {"route": "r", "version": "v"}
    assert scraped(registry, "relaymw_requests_total", status="2xx", **rv) == 3
    assert scraped(registry, "relaymw_requests_total", status="5xx", **rv) == 1
    assert scraped(registry, "relaymw_requests_total", status="none", **rv) == 1
    assert scraped(registry, "relaymw_requests_total", route="", version="", status="none") == 1
    odd = {"route": "['odd']", "version": "v"}
    assert scraped(registry, "relaymw_requests_total", status="4xx", **odd) == 1
    assert scraped(registry, "relaymw_cost_usd_total", **odd) == 0.25
    assert scraped(registry, "relaymw_errors_total", error="upstream_error", **rv) == 1
    assert scraped(registry, "relaymw_latency_seconds_count", **rv) == 5
    assert scraped(registry, "relaymw_ttft_seconds_count", **rv) == 1
    assert scraped(registry, "relaymw_tokens_total", kind="prompt", **rv) == 5
    assert scraped(registry, "relaymw_tokens_total", kind="completion", **rv) == 7


# --- JSON-lines audit log ------------------------------------------------------------------


def write_document(path: Path, doc: dict[str, Any]) -> None:
    """Write beside ``path`` and rename over it, as deploy tools do (no half-read files)."""
    tmp = path.with_name(path.name + ".new")
    if path.suffix == ".toml":
        tmp.write_bytes(tomli_w.dumps(doc).encode())
    else:
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, path)


def audit_lines(sink: JsonlAuditSink, event: str | None = None) -> list[dict[str, Any]]:
    sink.flush()
    lines = [json.loads(line) for line in Path(sink.path).read_text().splitlines()]
    return [r for r in lines if event is None or r["event"] == event]


def secret_doc(fake: FakeLLM) -> dict[str, Any]:
    doc = one_version_doc(fake)
    doc["sticky"] = {"secret": STICKY_SECRET}
    doc["pinning"] = {"token": PIN_TOKEN}
    return doc


def test_jsonl_audit_records_requests_and_config_changes_without_secrets(
    fake_llm: FakeLLM, tmp_path: Path
) -> None:
    config_path, audit_path = tmp_path / "relay.toml", tmp_path / "audit.jsonl"
    doc = secret_doc(fake_llm)
    write_document(config_path, doc)
    with JsonlAuditSink(audit_path) as audit:
        relay = Relay(store=FileStore(config_path, poll_interval=0.05))
        first = relay.snapshot.revision
        with serving(relay) as client:
            chat(client)
            chat(client, stream=True)
            eventually(lambda: len(audit_lines(audit, "request_finished")) == 2)

            doc["routes"][1]["route_rules"][0]["weight"] = 70  # review-production: 70/30
            doc["routes"][1]["route_rules"][1]["weight"] = 30
            write_document(config_path, doc)
            eventually(lambda: relay.snapshot.revision != first)
            doc["routes"][1]["route_rules"][0]["weight"] = 95  # 95 + 30: rejected
            write_document(config_path, doc)
            eventually(lambda: len(audit_lines(audit, "config_rejected")) == 1)
            second = relay.snapshot.revision

        # Read while the sink is still open: flush() has put every line in the file.
        records = audit_lines(audit)
        text = audit_path.read_text()

    requests = [r for r in records if r["event"] == "request_finished"]
    assert len(requests) == 2  # one line per request
    for r in requests:
        assert set(r) == REQUEST_FIELDS
        assert (r["route"], r["version"], r["status"], r["error"]) == (ROUTE, VERSION, 200, None)
        assert r["mode"] == "gateway" and r["protocol"] == "openai"
        assert r["prompt_tokens"] > 0 and r["completion_tokens"] > 0 and r["latency_ms"] > 0
        assert isinstance(r["cost_usd"], str) and Decimal(r["cost_usd"]) > 0
        assert r["time"].endswith("Z") and datetime.fromisoformat(r["time"][:-1])
    assert [r["stream"] for r in requests] == [False, True]
    assert requests[0]["ttft_ms"] is None and requests[1]["ttft_ms"] > 0

    loaded = [r for r in records if r["event"] == "config_loaded"]
    assert [r["revision"] for r in loaded] == [first, second]
    assert all(set(r) == {"time", "event", "revision", "source"} for r in loaded)
    assert loaded[0]["source"] == f"file {config_path}"
    [rejected] = [r for r in records if r["event"] == "config_rejected"]
    assert any("weights sum to 125, not 100" in e for e in rejected["errors"])

    for secret in (UPSTREAM_KEY, STICKY_SECRET, PIN_TOKEN, CLIENT_KEY):
        assert secret not in text


def test_jsonl_redacts_a_key_echoed_by_a_yaml_syntax_error(
    fake_llm: FakeLLM, tmp_path: Path
) -> None:
    """PyYAML quotes the offending line in its error, and this line holds the api key:
    relaymw reports only the problem and its position."""
    config_path, audit_path = tmp_path / "relay.yaml", tmp_path / "audit.jsonl"
    write_document(config_path, secret_doc(fake_llm))
    with JsonlAuditSink(str(audit_path), background=False) as audit:
        relay = Relay(store=FileStore(config_path, poll_interval=0.05))
        text = config_path.read_text()
        broken = text.replace(f"api_key: {UPSTREAM_KEY}", f"api_key: {UPSTREAM_KEY}: x", 1)
        assert broken != text
        tmp = config_path.with_name("relay.yaml.new")
        tmp.write_text(broken)
        os.replace(tmp, config_path)
        try:
            eventually(lambda: len(audit_lines(audit, "config_rejected")) == 1)
        finally:
            relay.close()
        [rejected] = audit_lines(audit, "config_rejected")
    assert "YAML syntax error" in rejected["errors"][0]
    assert "(line " in rejected["errors"][0]  # where, without quoting the line itself
    assert UPSTREAM_KEY not in audit_path.read_text()


def test_jsonl_scrubs_nested_secrets_from_weight_and_ejection_events(tmp_path: Path) -> None:
    # No component emits these two yet (see signals.py), so they are sent as an emitter would.
    with JsonlAuditSink(str(tmp_path / "audit.jsonl")) as audit:
        signals.send(
            signals.weights_changed, object(), route=ROUTE, before={"gpt-v1": 50.0},
            after={"gpt-v1": 100.0}, actor="ops https://ops:hunter2@admin.example",
        )  # fmt: skip
        evidence = {
            "error_rate": 0.4,
            "upstream": {"api_key": UPSTREAM_KEY, "headers": {"Authorization": "Bearer sk-x"}},
            "note": f"token: {PIN_TOKEN}",
            "window": [{"password": "pw-1"}],
        }
        signals.send(
            signals.version_ejected, object(), route=ROUTE, version="gpt-v2", reason="errors",
            evidence=evidence, new_weights={"gpt-v1": 100.0, "gpt-v2": 0.0},
        )  # fmt: skip
        [changed] = audit_lines(audit, "weights_changed")
        [ejected] = audit_lines(audit, "version_ejected")
        text = Path(audit.path).read_text()
    assert changed["after"] == {"gpt-v1": 100.0}
    assert changed["actor"] == "ops https://[redacted]@admin.example"
    assert ejected["evidence"]["error_rate"] == 0.4
    upstream = {"api_key": "[redacted]", "headers": {"Authorization": "[redacted]"}}
    assert ejected["evidence"]["upstream"] == upstream
    assert ejected["evidence"]["note"] == "token: [redacted]"
    assert ejected["evidence"]["window"] == [{"password": "[redacted]"}]
    assert ejected["new_weights"] == {"gpt-v1": 100.0, "gpt-v2": 0.0}
    for secret in (UPSTREAM_KEY, PIN_TOKEN, "hunter2", "pw-1", "sk-x"):
        assert secret not in text


def test_scrub_keeps_token_counts_and_hides_objects() -> None:
    cleaned = scrub({"prompt_tokens": 3, "pin_token": "t", "cost": Decimal("1E-7"), "x": object()})
    assert cleaned == {
        "prompt_tokens": 3,
        "pin_token": "[redacted]",
        "cost": "0.0000001",
        "x": "<object>",
    }
    assert scrub("upstreams.openai.api_key: expected a string") == (
        "upstreams.openai.api_key: expected a string"  # a path, not a value: kept
    )


# --- logging -------------------------------------------------------------------------------


def request_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    messages = [r.getMessage() for r in caplog.records if r.name == "relaymw.requests"]
    return [m for m in messages if m.startswith(f"{ROUTE}/{VERSION} ")]


def test_logging_sink_writes_a_line_per_request_without_keys(
    fake_llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relaymw.requests")
    with LoggingSink(), serving(Relay(secret_doc(fake_llm))) as client:
        chat(client)
        chat(client, stream=True)
        fake_llm.set("*", status=503, error_rate=1.0)
        failing_chat(client)
        eventually(lambda: len(request_lines(caplog)) == 3)
    ours = [r for r in caplog.records if r.name == "relaymw.requests"]
    lines = request_lines(caplog)
    assert lines[0].startswith(f"{ROUTE}/{VERSION} 200 in ") and "tokens, $0.0" in lines[0]
    assert "(first chunk " in lines[1]
    assert lines[2].startswith(f"{ROUTE}/{VERSION} 503 ") and "error upstream_error" in lines[2]
    assert any(r.getMessage().startswith("config loaded: revision") for r in ours)
    for r in ours:
        for secret in (UPSTREAM_KEY, CLIENT_KEY, STICKY_SECRET, PIN_TOKEN):
            assert secret not in r.getMessage()


# --- robustness ----------------------------------------------------------------------------


def test_a_failing_receiver_breaks_neither_requests_nor_sinks(
    fake_llm: FakeLLM, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(sender: Any, **event: Any) -> None:
        raise RuntimeError("this sink is broken")

    registry = CollectorRegistry()
    signals.request_finished.connect(broken, weak=False)
    signals.config_loaded.connect(broken, weak=False)
    try:
        audit = JsonlAuditSink(str(tmp_path / "audit.jsonl"), connect=False)
        sinks = (PrometheusSink(registry, connect=False), audit)
        with install(*sinks), serving(Relay(one_version_doc(fake_llm))) as client:
            for _ in range(3):
                chat(client)
            eventually(lambda: requests_total(registry) == 3)
            eventually(lambda: len(audit_lines(audit, "request_finished")) == 3)
            assert len(audit_lines(audit, "config_loaded")) == 1
    finally:
        signals.request_finished.disconnect(broken)
        signals.config_loaded.disconnect(broken)
    assert any("signal receiver" in r.getMessage() for r in caplog.records)
    assert not connected(sinks[0].metrics) and not connected(audit)  # install() closed them
