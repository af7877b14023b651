"""FakeLLM driven by the official openai and anthropic SDKs over real sockets."""

from __future__ import annotations

import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from relaymw.testing import Behaviour, FakeLLM, RecordedRequest

GPT = "gpt-4.1"
# Not a real model name: the anthropic SDK warns about deprecated ones.
CLAUDE = "claude-fake-1"
PROMPT = "Review this function for off-by-one errors, please."  # 51 characters
MESSAGES: list[Any] = [{"role": "user", "content": PROMPT}]
PROMPT_TOKENS = 51 // 4 + 1


@pytest.fixture
def fake() -> Iterator[FakeLLM]:
    with FakeLLM(seed=1234) as server:
        yield server


@pytest.fixture
def oai(fake: FakeLLM) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fake.base_url + "/v1", api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture
def claude(fake: FakeLLM) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=fake.base_url, api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture
def raw(fake: FakeLLM) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.base_url, timeout=5) as client:
        yield client


def wait_for(condition: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def last_body(fake: FakeLLM) -> dict[str, Any]:
    body = fake.requests[-1].body
    assert body is not None
    return body


# --------------------------------------------------------------------------- rules


def test_count_prompt_tokens_rule() -> None:
    count = FakeLLM.count_prompt_tokens
    assert count({}) == 1
    assert count({"messages": MESSAGES}) == PROMPT_TOKENS
    # content parts, an Anthropic system string: 4+4 chars of text, 2 items
    parts = [{"type": "text", "text": "abcd"}, {"type": "image_url", "image_url": {}}]
    assert count({"system": "wxyz", "messages": [{"role": "user", "content": parts}]}) == 4
    # Responses: instructions + input items with input_text parts
    items = [{"role": "user", "content": [{"type": "input_text", "text": "x" * 16}]}]
    assert count({"instructions": "abcd", "input": items}) == 20 // 4 + 2
    # prompt lists and token arrays: 1 per string, 1 per array plus 1 per token id
    assert count({"prompt": ["abcd", "efgh"]}) == 2 + 2
    assert count({"input": [1, 2, 3]}) == 4
    assert count({"input": [[1, 2], [3]]}) == 5


def test_reply_text_names_the_model() -> None:
    assert FakeLLM.reply_chunks("m", 3) == ("[m] word0 ", "word1 ", "word2")
    assert FakeLLM.reply_text("m", 3) == "[m] word0 word1 word2"


def test_set_validates_merges_and_inherits(fake: FakeLLM) -> None:
    fake.set("*", chunks=3, latency_ms=1)
    assert fake.set("a", error_rate=0.5) == Behaviour(chunks=3, latency_ms=1, error_rate=0.5)
    fake.set("a", status=503)
    assert fake.behaviour("a").error_rate == 0.5  # fields accumulate
    assert fake.behaviour("a").status == 503
    assert fake.behaviour("other") == Behaviour(chunks=3, latency_ms=1)
    with pytest.raises(TypeError):
        fake.set("a", nonsense=1)
    for bad in ({"error_rate": 1.5}, {"status": 200}, {"fault": "boom"}, {"chunks": 0}):
        with pytest.raises(ValueError):
            fake.set("a", **bad)
    assert fake.behaviour("a").status == 503  # a rejected change keeps the old one
    fake.reset()
    assert fake.behaviour("a") == Behaviour()


# --------------------------------------------------------------------------- openai


def test_chat_completion(fake: FakeLLM, oai: openai.OpenAI) -> None:
    result = oai.chat.completions.create(model=GPT, messages=MESSAGES)
    assert result.model == GPT
    assert result.choices[0].message.content == FakeLLM.reply_text(GPT)
    assert result.choices[0].finish_reason == "stop"
    assert result.usage is not None
    assert (
        result.usage.prompt_tokens == PROMPT_TOKENS == FakeLLM.count_prompt_tokens(last_body(fake))
    )
    assert result.usage.completion_tokens == 8
    assert result.usage.total_tokens == PROMPT_TOKENS + 8
    assert result.usage.prompt_tokens_details is not None
    assert result.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_stream_without_usage(fake: FakeLLM, oai: openai.OpenAI) -> None:
    fake.set(GPT, chunks=4)
    chunks = list(oai.chat.completions.create(model=GPT, messages=MESSAGES, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == FakeLLM.reply_text(GPT, 4)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)
    assert fake.streams_started == fake.streams_completed == 1


def test_chat_stream_with_usage(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(
            model=GPT, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (PROMPT_TOKENS, 8)
    assert all(c.usage is None for c in chunks[:-1])


def test_legacy_completions(oai: openai.OpenAI) -> None:
    result = oai.completions.create(model="davinci-002", prompt=PROMPT)
    assert result.choices[0].text == FakeLLM.reply_text("davinci-002")
    assert result.usage is not None
    assert result.usage.prompt_tokens == PROMPT_TOKENS
    stream = oai.completions.create(
        model="davinci-002", prompt=PROMPT, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == result.choices[0].text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8


def test_embeddings(fake: FakeLLM, oai: openai.OpenAI) -> None:
    # The SDK asks for base64 unless told otherwise and decodes float32 itself.
    result = oai.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"])
    assert [d.embedding for d in result.data] == [
        FakeLLM.embedding_vector("alpha"),
        FakeLLM.embedding_vector("beta"),
    ]
    assert last_body(fake)["encoding_format"] == "base64"
    assert result.usage.prompt_tokens == FakeLLM.count_prompt_tokens(last_body(fake)) == 4
    floats = oai.embeddings.create(
        model="text-embedding-3-small", input="alpha", dimensions=3, encoding_format="float"
    )
    assert floats.data[0].embedding == FakeLLM.embedding_vector("alpha", 3)
    tokens = oai.embeddings.create(model="text-embedding-3-small", input=[1, 2, 3])
    assert tokens.data[0].embedding == FakeLLM.embedding_vector("1,2,3")


def test_responses(oai: openai.OpenAI) -> None:
    result = oai.responses.create(model=GPT, input=PROMPT)
    assert result.output_text == FakeLLM.reply_text(GPT)
    assert result.model == GPT
    assert result.usage is not None
    assert (result.usage.input_tokens, result.usage.output_tokens) == (PROMPT_TOKENS, 8)
    assert result.usage.input_tokens_details.cached_tokens == 0

    events = list(oai.responses.create(model=GPT, input=PROMPT, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == FakeLLM.reply_text(GPT)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.usage is not None
    assert completed.response.usage.total_tokens == PROMPT_TOKENS + 8

    with oai.responses.stream(model=GPT, input=PROMPT) as stream:
        final = stream.get_final_response()
    assert final.output_text == FakeLLM.reply_text(GPT)


# --------------------------------------------------------------------------- anthropic


def test_anthropic_messages(fake: FakeLLM, claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=CLAUDE, max_tokens=100, system="Be brief.", messages=MESSAGES
    )
    assert message.model == CLAUDE
    assert message.content[0].type == "text"
    assert message.content[0].text == FakeLLM.reply_text(CLAUDE)
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == FakeLLM.count_prompt_tokens(last_body(fake))
    assert message.usage.input_tokens == (51 + 9) // 4 + 2
    assert message.usage.output_tokens == 8
    assert message.usage.cache_read_input_tokens == 0


def test_anthropic_stream_events(claude: anthropic.Anthropic) -> None:
    events = list(
        claude.messages.create(model=CLAUDE, max_tokens=100, messages=MESSAGES, stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start"
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    text = "".join(
        e.delta.text
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert text == FakeLLM.reply_text(CLAUDE)
    start, delta = events[0], events[-2]
    assert start.type == "message_start"
    assert (start.message.usage.input_tokens, start.message.usage.output_tokens) == (
        PROMPT_TOKENS,
        1,
    )
    assert delta.type == "message_delta"
    assert delta.delta.stop_reason == "end_turn"
    assert delta.usage.output_tokens == 8


def test_anthropic_stream_helper(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model=CLAUDE, max_tokens=100, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == FakeLLM.reply_text(CLAUDE)  # type: ignore[union-attr]
    assert (final.usage.input_tokens, final.usage.output_tokens) == (PROMPT_TOKENS, 8)


async def test_async_clients(fake: FakeLLM) -> None:
    async with openai.AsyncOpenAI(
        base_url=fake.base_url + "/v1", api_key="x", max_retries=0
    ) as client:
        stream = await client.chat.completions.create(model=GPT, messages=MESSAGES, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == FakeLLM.reply_text(GPT)
    async with (
        anthropic.AsyncAnthropic(base_url=fake.base_url, api_key="x", max_retries=0) as aclient,
        aclient.messages.stream(model=CLAUDE, max_tokens=10, messages=MESSAGES) as astream,
    ):
        final = await astream.get_final_message()
    assert final.usage.output_tokens == 8


# --------------------------------------------------------------------------- usage options


def test_cached_tokens_reported(
    fake: FakeLLM, oai: openai.OpenAI, claude: anthropic.Anthropic
) -> None:
    fake.set("*", cached_tokens=5)
    chat = oai.chat.completions.create(model=GPT, messages=MESSAGES)
    assert chat.usage is not None
    assert chat.usage.prompt_tokens == PROMPT_TOKENS
    assert chat.usage.prompt_tokens_details is not None
    assert chat.usage.prompt_tokens_details.cached_tokens == 5
    response = oai.responses.create(model=GPT, input=PROMPT)
    assert response.usage is not None
    assert response.usage.input_tokens_details.cached_tokens == 5
    message = claude.messages.create(model=CLAUDE, max_tokens=10, messages=MESSAGES)
    # Anthropic counts cached tokens outside input_tokens
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (
        PROMPT_TOKENS - 5,
        5,
    )
    fake.set("*", cached_tokens=1000)  # never more than the prompt
    capped = oai.chat.completions.create(model=GPT, messages=MESSAGES)
    assert capped.usage is not None
    assert capped.usage.prompt_tokens_details is not None
    assert capped.usage.prompt_tokens_details.cached_tokens == PROMPT_TOKENS


def test_usage_false_omits_usage(fake: FakeLLM, oai: openai.OpenAI, raw: httpx.Client) -> None:
    fake.set("*", usage=False)
    assert oai.chat.completions.create(model=GPT, messages=MESSAGES).usage is None
    chunks = oai.chat.completions.create(
        model=GPT, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    assert all(c.usage is None and c.choices for c in chunks)
    assert oai.responses.create(model=GPT, input=PROMPT).usage is None
    embeddings = raw.post("/v1/embeddings", json={"model": "e", "input": "x"}).json()
    assert "usage" not in embeddings
    message = raw.post("/v1/messages", json={"model": CLAUDE, "messages": MESSAGES}).json()
    assert "usage" not in message
    streamed = raw.post(
        "/v1/messages", json={"model": CLAUDE, "messages": MESSAGES, "stream": True}
    )
    assert "message_stop" in streamed.text
    assert "usage" not in streamed.text


# --------------------------------------------------------------------------- errors


def test_status_always_fails_with_protocol_shapes(
    fake: FakeLLM, oai: openai.OpenAI, claude: anthropic.Anthropic
) -> None:
    fake.set(GPT, status=503)
    fake.set(CLAUDE, status=529)
    with pytest.raises(openai.InternalServerError) as openai_error:
        oai.chat.completions.create(model=GPT, messages=MESSAGES)
    assert openai_error.value.status_code == 503
    assert isinstance(openai_error.value.body, dict)
    assert set(openai_error.value.body) == {"message", "type", "param", "code"}
    with pytest.raises(openai.InternalServerError):
        oai.chat.completions.create(model=GPT, messages=MESSAGES, stream=True)
    with pytest.raises(anthropic.OverloadedError) as anthropic_error:
        claude.messages.create(model=CLAUDE, max_tokens=10, messages=MESSAGES)
    assert anthropic_error.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "FakeLLM injected error (529)"},
    }
    # other models are unaffected
    assert oai.chat.completions.create(model="gpt-other", messages=MESSAGES).choices
    fake.set(GPT, status=429)
    with pytest.raises(openai.RateLimitError):
        oai.chat.completions.create(model=GPT, messages=MESSAGES)


def test_error_rate_is_seeded(fake: FakeLLM, raw: httpx.Client) -> None:
    body = {"model": GPT, "messages": MESSAGES}

    def statuses() -> list[int]:
        return [raw.post("/v1/chat/completions", json=body).status_code for _ in range(40)]

    fake.set(GPT, error_rate=0.5)
    first = statuses()
    assert set(first) == {200, 500}
    fake.reset()  # re-seeds
    fake.set(GPT, error_rate=0.5, status=503)
    assert [503 if s == 500 else s for s in first] == statuses()
    fake.set(GPT, error_rate=1.0)
    assert raw.post("/v1/chat/completions", json=body).status_code == 503


def test_bad_requests(raw: httpx.Client) -> None:
    bad = raw.post("/v1/chat/completions", content=b"{not json")
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"
    bad_anthropic = raw.post("/v1/messages", content=b"[1, 2")
    assert bad_anthropic.status_code == 400
    assert bad_anthropic.json()["type"] == "error"
    assert bad_anthropic.json()["error"]["type"] == "invalid_request_error"
    assert raw.post("/v1/chat/completions", json={"messages": []}).status_code == 400
    missing = raw.get("/v1/nothing-here")
    assert missing.status_code == 404
    assert "error" in missing.json()


def test_api_key() -> None:
    with FakeLLM(api_key="sekret") as fake:
        url = fake.base_url
        with openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError) as error:
                bad.chat.completions.create(model=GPT, messages=MESSAGES)
            assert isinstance(error.value.body, dict)
            assert error.value.body["code"] == "invalid_api_key"
        with anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0) as bad_claude:
            with pytest.raises(anthropic.AuthenticationError) as claude_error:
                bad_claude.messages.create(model=CLAUDE, max_tokens=10, messages=MESSAGES)
            assert claude_error.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
        with openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0) as good:
            assert good.chat.completions.create(model=GPT, messages=MESSAGES).choices
        with anthropic.Anthropic(base_url=url, api_key="sekret", max_retries=0) as good_claude:
            assert good_claude.messages.create(model=CLAUDE, max_tokens=10, messages=MESSAGES)


def test_latency(fake: FakeLLM, oai: openai.OpenAI) -> None:
    fake.set(GPT, latency_ms=150)
    started = time.monotonic()
    oai.chat.completions.create(model=GPT, messages=MESSAGES)
    assert time.monotonic() - started >= 0.15


# --------------------------------------------------------------------------- faults


def test_fault_reset(fake: FakeLLM, oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    fake.set("*", fault="reset")
    with pytest.raises(openai.APIConnectionError):
        oai.chat.completions.create(model=GPT, messages=MESSAGES)
    with pytest.raises(anthropic.APIConnectionError):
        claude.messages.create(model=CLAUDE, max_tokens=10, messages=MESSAGES)


def test_fault_stall_times_out_and_sees_the_client_leave(fake: FakeLLM, oai: openai.OpenAI) -> None:
    fake.set(GPT, fault="stall")
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        oai.with_options(timeout=0.3).chat.completions.create(model=GPT, messages=MESSAGES)
    gave_up = time.monotonic()
    assert gave_up - started < 1.0
    assert wait_for(lambda: len(fake.disconnect_times) == 1)
    assert fake.disconnect_times[0] - gave_up < 1.0


def test_fault_malformed(fake: FakeLLM, oai: openai.OpenAI, raw: httpx.Client) -> None:
    fake.set("*", fault="malformed")
    response = raw.post("/v1/chat/completions", json={"model": GPT, "messages": MESSAGES})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    with pytest.raises(ValueError):
        orjson.loads(response.content)
    with pytest.raises((ValueError, openai.APIError)):
        oai.chat.completions.create(model=GPT, messages=MESSAGES)


def test_fault_truncate(fake: FakeLLM, oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    fake.set("*", fault="truncate", chunks=8)
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in oai.chat.completions.create(model=GPT, messages=MESSAGES, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert received == list(FakeLLM.reply_chunks(GPT)[:4])
    stream = fake.streams[-1]
    assert (stream.truncated, stream.completed, stream.chunks_sent) == (True, False, 4)
    # The anthropic stream helper lets the transport's own error through, unwrapped.
    with (
        pytest.raises(Exception) as broken,
        claude.messages.stream(model=CLAUDE, max_tokens=10, messages=MESSAGES) as partial,
    ):
        partial.get_final_message()
    assert isinstance(broken.value, anthropic.APIConnectionError) or (
        "RemoteProtocolError" in type(broken.value).__name__
    )
    with pytest.raises(openai.APIConnectionError):  # non-stream: half a body
        oai.chat.completions.create(model=GPT, messages=MESSAGES)


# --------------------------------------------------------------------------- streams


def test_stream_pacing_is_observable(fake: FakeLLM, raw: httpx.Client) -> None:
    fake.set(GPT, chunks=5, chunk_delay_ms=30)
    body = {"model": GPT, "messages": MESSAGES, "stream": True}
    first_seen: float | None = None
    with raw.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if first_seen is None and "word0" in line:
                first_seen = time.monotonic()
    (stream,) = fake.streams
    assert stream.completed and not stream.disconnected
    assert stream.chunks_sent == 5
    assert stream.first_chunk_at is not None and stream.last_chunk_at is not None
    assert first_seen is not None
    assert stream.first_chunk_at <= first_seen < stream.last_chunk_at
    assert (fake.streams_started, fake.streams_completed, fake.streams_disconnected) == (1, 1, 0)


def test_client_disconnect_mid_stream_is_seen_within_a_second(
    fake: FakeLLM, raw: httpx.Client
) -> None:
    fake.set(GPT, chunks=200, chunk_delay_ms=50)
    body = {"model": GPT, "messages": MESSAGES, "stream": True}
    with raw.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if "word1" in line:
                break
    closed_at = time.monotonic()
    assert wait_for(lambda: fake.streams_disconnected == 1)
    (stream,) = fake.streams
    assert stream.disconnected and not stream.completed
    assert stream.disconnected_at is not None
    assert stream.disconnected_at - closed_at < 1.0
    assert fake.disconnect_times == [stream.disconnected_at]
    assert stream.chunks_sent < 200


# --------------------------------------------------------------------------- bookkeeping


def test_requests_are_recorded(fake: FakeLLM, oai: openai.OpenAI) -> None:
    before = time.monotonic()
    oai.chat.completions.create(model=GPT, messages=MESSAGES, temperature=0.5)
    (request,) = fake.requests
    assert isinstance(request, RecordedRequest)
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.headers["authorization"] == "Bearer x"
    assert all(name == name.lower() for name in request.headers)
    assert request.body == {"model": GPT, "messages": MESSAGES, "temperature": 0.5}
    assert before <= request.received_at <= time.monotonic()
    fake.reset()
    assert fake.requests == []


def test_stop_ends_stalled_requests_and_the_thread() -> None:
    threads_before = set(threading.enumerate())
    fake = FakeLLM().start()
    fake.set("*", fault="stall")
    url = fake.base_url
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            httpx.post(url + "/v1/chat/completions", json={"model": GPT}, timeout=10)
        except httpx.HTTPError as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    assert wait_for(lambda: fake.request_count == 1)
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 1.0
    caller.join(timeout=5)
    assert outcome and isinstance(outcome[0], httpx.TransportError)
    assert fake.disconnect_times == []  # stop() is not a client going away
    assert set(threading.enumerate()) <= threads_before
    with pytest.raises(httpx.ConnectError):
        httpx.post(url + "/v1/chat/completions", json={"model": GPT}, timeout=2)
    fake.stop()  # idempotent


def test_command_line_server() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaymw.testing", "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            assert selector.select(timeout=10), "FakeLLM did not report ready"
        assert proc.stdout.readline().strip() == f"FakeLLM listening on http://127.0.0.1:{port}"
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/messages",
            json={"model": CLAUDE, "max_tokens": 5, "messages": MESSAGES},
            timeout=5,
        )
        assert response.json()["content"][0]["text"] == FakeLLM.reply_text(CLAUDE)
        proc.terminate()
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
