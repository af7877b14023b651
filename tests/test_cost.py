"""Prices, the cost of a call, the per-request cap (clamp / reject) and the token estimates."""

from __future__ import annotations

import sys
import types
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaymw import signals, tokens
from relaymw.config import Price, Route, RouteRule, Version
from relaymw.cost import (
    DEFAULT_PRICING,
    CapOutcome,
    apply_cost_cap,
    cost_of,
    cost_of_usage,
    cost_pico,
    effective_cap,
    max_output_tokens,
    pico_rates,
    price_for,
    set_max_output_tokens,
    worst_case_cost,
)
from relaymw.errors import RequestRejected
from relaymw.protocols import Usage, gateway_paths
from relaymw.tokens import CharEstimator, TiktokenEstimator, estimate_completion_tokens
from tests.support import Recorder

D = Decimal
EPS = gateway_paths()
CHAT = EPS["/v1/chat/completions"]
COMPLETIONS = EPS["/v1/completions"]
EMBEDDINGS = EPS["/v1/embeddings"]
RESPONSES = EPS["/v1/responses"]
MESSAGES = EPS["/v1/messages"]
GPT41 = DEFAULT_PRICING["gpt-4.1"]  # $2 in, $8 out, $0.50 cached, per million tokens


@pytest.fixture
def cap_events() -> Any:
    rec = Recorder()
    signals.cost_limit_exceeded.connect(rec)
    yield rec
    signals.cost_limit_exceeded.disconnect(rec)


# --- prices -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "inp", "out", "cached"),
    [
        ("gpt-4.1", "2.00", "8.00", "0.50"),
        ("claude-sonnet-4-5", "3.00", "15.00", "0.30"),
        ("gemini-2.5-flash", "0.30", "2.50", "0.03"),
        ("deepseek-v3.2", "0.28", "0.42", "0.028"),
    ],
)
def test_spec_default_prices(model: str, inp: str, out: str, cached: str) -> None:
    """SPEC §2: the output prices of the four seed models, with their published input and
    cached-input prices, as Decimals."""
    assert DEFAULT_PRICING[model] == Price(D(inp), D(out), D(cached))
    for value in (DEFAULT_PRICING[model].input_per_mtok, DEFAULT_PRICING[model].output_per_mtok):
        assert isinstance(value, Decimal)


def test_price_for_overrides_and_dated_snapshots() -> None:
    mine = Price(D("1"), D("2"))
    assert price_for("gpt-4.1", {"gpt-4.1": mine}) is mine
    assert price_for("gpt-4.1", {}) is GPT41
    assert price_for("gpt-4.1-2025-04-14", {}) is GPT41
    assert price_for("claude-sonnet-4-5-20250929", {}) is DEFAULT_PRICING["claude-sonnet-4-5"]
    assert price_for("claude-sonnet-4-20250514", {"claude-sonnet-4": mine}) is mine
    assert price_for("my-local-model", {}) is None
    assert price_for("my-local-model", {"my-local-model": mine}) is mine


def test_cost_of_is_exact_decimal_with_cached_tokens() -> None:
    # 2006 prompt tokens of which 1920 cached, 12 completion tokens, on GPT-4.1:
    # 86 * 2.00 + 1920 * 0.50 + 12 * 8.00 = 172 + 960 + 96 = 1228 micro-dollars.
    assert cost_of(GPT41, 2006, 12, 1920) == D("0.001228")
    assert cost_of(GPT41, 2006, 12) == D("0.004108")  # nothing cached: all at $2
    no_cached_price = Price(D("2.00"), D("8.00"))
    assert cost_of(no_cached_price, 2006, 12, 1920) == D("0.004108")  # cached billed as input
    assert cost_of(None, 10**6, 10**6) == 0
    assert isinstance(cost_of(GPT41, 1, 1), Decimal)


def test_cache_writes_cost_one_and_a_quarter_input() -> None:
    sonnet = DEFAULT_PRICING["claude-sonnet-4-5"]
    # 25 fresh + 100 written + 2000 read, 15 out:
    # 25*3 + 100*3.75 + 2000*0.30 + 15*15 = 75 + 375 + 600 + 225 = 1275 micro-dollars
    assert cost_of(sonnet, 2125, 15, 2000, 100) == D("0.001275")
    assert cost_of_usage(sonnet, Usage(2125, 15, 2000, 100)) == D("0.001275")


def test_pico_rates_are_the_prices_per_token_in_pico_usd() -> None:
    sonnet = DEFAULT_PRICING["claude-sonnet-4-5"]
    # $3 / Mtok = 3_000_000 pico-USD a token; a cache write is 1.25 * that.
    assert pico_rates(sonnet) == (3_000_000, 15_000_000, 300_000, 3_750_000)
    assert pico_rates(Price(D("2.00"), D("8.00"))) == (2_000_000, 8_000_000, 2_000_000, 2_500_000)
    assert pico_rates(None) is None
    # Finer than a pico-USD a token (or its cache write): the Decimal path, no rates.
    assert pico_rates(Price(D("0.0000001"), D("1"))) is None
    assert pico_rates(Price(D("0.000001"), D("1"))) is None  # 1.25 pico a written token
    assert pico_rates(Price(D("0.000004"), D("1"))) == (4, 1_000_000, 4, 5)
    assert cost_pico((3_000_000, 15_000_000, 300_000, 3_750_000), Usage(2125, 15, 2000, 100)) == (
        1_275_000_000
    )


@given(
    prices=st.tuples(
        *[st.decimals(0, 100, places=6)] * 2, st.none() | st.decimals(0, 100, places=6)
    ),
    usage=st.tuples(*[st.integers(0, 10**7)] * 4),
)
def test_cost_pico_is_cost_of_usage_exactly(
    prices: tuple[Decimal, Decimal, Decimal | None], usage: tuple[int, int, int, int]
) -> None:
    price = Price(*prices)
    prompt, completion, cached, written = usage
    u = Usage(prompt + cached + written, completion, cached, written)
    rates = pico_rates(price)
    exact = cost_of_usage(price, u)
    if rates is None:  # only a cache-write rate below a whole pico-USD
        assert (price.input_per_mtok * 1_250_000) % 1 != 0
        return
    assert cost_pico(rates, u) == exact * 10**12


def test_worst_case_cost() -> None:
    assert worst_case_cost(GPT41, 1000, 4096) == D("0.034768")  # 0.002 + 0.032768
    assert worst_case_cost(GPT41, 1000, 4096, choices=2) == D("0.067536")
    sonnet = DEFAULT_PRICING["claude-sonnet-4-5"]
    assert worst_case_cost(sonnet, 1000, 0, input_multiplier=D("1.25")) == D("0.00375")


def test_effective_cap_route_overrides_version() -> None:
    v = Version("v1", "gpt-4.1", "openai", cost_limit_per_request=D("0.05"))
    rules = (RouteRule("v1", 100),)
    assert effective_cap(None, v) == D("0.05")
    assert effective_cap(Route("r", rules), v) == D("0.05")
    assert effective_cap(Route("r", rules, cost_limit_per_request=D("0.01")), v) == D("0.01")
    assert effective_cap(Route("r", rules), Version("v2", "m", "openai")) is None


# --- max-token fields -------------------------------------------------------------------------


def test_max_output_tokens_per_endpoint() -> None:
    assert max_output_tokens({"max_tokens": 100}, CHAT) == 100
    assert max_output_tokens({"max_completion_tokens": 80, "max_tokens": 100}, CHAT) == 80
    assert max_output_tokens({"max_output_tokens": 50, "max_tokens": 9}, RESPONSES) == 50
    assert max_output_tokens({"max_tokens": 7}, MESSAGES) == 7
    assert max_output_tokens({"max_tokens": 7}, COMPLETIONS) == 7
    for junk in (None, "100", True, 0, -5, float("nan"), float("inf")):
        assert max_output_tokens({"max_tokens": junk}, CHAT) is None
    assert max_output_tokens({"max_tokens": 5}, EMBEDDINGS) is None


def test_set_max_output_tokens() -> None:
    body: dict[str, Any] = {}
    set_max_output_tokens(body, CHAT, 10)
    assert body == {"max_tokens": 10}
    body = {"max_completion_tokens": 99}
    set_max_output_tokens(body, CHAT, 10)
    assert body == {"max_completion_tokens": 10}
    body = {"max_completion_tokens": 99, "max_tokens": None}
    set_max_output_tokens(body, CHAT, 10)
    assert body == {"max_completion_tokens": 10, "max_tokens": 10}
    body = {}
    set_max_output_tokens(body, RESPONSES, 10)
    assert body == {"max_output_tokens": 10}


# --- the cap: clamp ---------------------------------------------------------------------------


def test_clamp_lowers_max_tokens_to_the_exact_value(cap_events: Recorder) -> None:
    body = {"messages": [], "max_tokens": 8000}
    # 1000 prompt tokens cost $0.002; $0.048 left buys exactly 6000 output tokens at $8/M.
    out = apply_cost_cap(
        body, CHAT, GPT41, D("0.05"), "clamp", 1000, 4096, sender=None, route="r", version="v1"
    )
    assert body["max_tokens"] == 6000
    assert out == CapOutcome(D("0.05"), 6000, True, 6000)
    assert worst_case_cost(GPT41, 1000, 6001) > D("0.05")  # one more token would not fit
    assert cap_events.events == [
        {
            "route": "r",
            "version": "v1",
            "limit_usd": D("0.05"),
            "worst_case_usd": D("0.066"),  # 0.002 + 8000 * 8e-6, before clamping
            "action": "clamp",
        }
    ]


def test_clamp_rounds_down() -> None:
    body: dict[str, Any] = {"max_tokens": 10_000}
    out = apply_cost_cap(body, CHAT, GPT41, D("0.0123457"), "clamp", 333, 4096)
    # (0.0123457 - 333 * 2e-6) * 1e6 / 8 = 1459.9625 -> 1459
    assert body["max_tokens"] == out.max_output_tokens == 1459
    assert out.worst_case_usd is not None and out.worst_case_usd <= D("0.0123457")


def test_clamp_sets_the_limit_when_the_body_has_none(cap_events: Recorder) -> None:
    body: dict[str, Any] = {"messages": []}
    out = apply_cost_cap(body, CHAT, GPT41, D("0.01"), "clamp", 1000, 4096)
    assert body == {"messages": [], "max_tokens": 1000}  # (0.01 - 0.002) / 8e-6
    assert out.clamped and out.max_output_tokens == 1000
    # The default fits: it is still written, so the upstream cannot exceed it.
    body = {"input": "hi"}
    out = apply_cost_cap(body, RESPONSES, GPT41, D("1"), "clamp", 1000, 4096)
    assert body == {"input": "hi", "max_output_tokens": 4096}
    assert out == CapOutcome(D("0.034768"), 4096, False, 124750)
    body = {"messages": []}
    apply_cost_cap(body, MESSAGES, GPT41, D("1"), "reject", 1000, 2048)
    assert body["max_tokens"] == 2048
    assert len(cap_events.events) == 1  # only the clamp acted


def test_clamp_lowers_both_chat_keys() -> None:
    body = {"max_completion_tokens": 9000, "max_tokens": 8000}
    apply_cost_cap(body, CHAT, GPT41, D("0.05"), "clamp", 1000, 4096)
    assert body == {"max_completion_tokens": 6000, "max_tokens": 6000}


def test_fitting_request_is_left_alone(cap_events: Recorder) -> None:
    body = {"max_tokens": 100}
    out = apply_cost_cap(body, CHAT, GPT41, D("0.05"), "clamp", 1000, 4096)
    assert body == {"max_tokens": 100}
    assert out == CapOutcome(D("0.0028"), 100, False, 6000)
    assert cap_events.events == []


def test_n_choices_multiply_the_output() -> None:
    body = {"max_tokens": 8000, "n": 3}
    out = apply_cost_cap(body, CHAT, GPT41, D("0.05"), "clamp", 1000, 4096)
    assert body["max_tokens"] == 2000  # 0.048 / (3 * 8e-6)
    assert out.worst_case_usd == D("0.05")


def test_anthropic_cache_writes_raise_the_worst_case() -> None:
    sonnet = DEFAULT_PRICING["claude-sonnet-4-5"]
    cc: dict[str, Any] = {"type": "ephemeral"}
    body = {"system": [{"type": "text", "text": "x", "cache_control": cc}], "max_tokens": 10}
    out = apply_cost_cap(body, MESSAGES, sonnet, D("1"), "clamp", 1000, 4096)
    assert out.worst_case_usd == D("0.00375") + D("0.00015")  # 1000 * 3.75 + 10 * 15
    cc["ttl"] = "1h"
    out = apply_cost_cap(body, MESSAGES, sonnet, D("1"), "clamp", 1000, 4096)
    assert out.worst_case_usd == D("0.006") + D("0.00015")  # 1h writes: 2x input
    out = apply_cost_cap(body, CHAT, sonnet, D("1"), "clamp", 1000, 4096)  # not Anthropic
    assert out.worst_case_usd == D("0.003") + D("0.00015")


def test_clamp_rejects_when_the_prompt_alone_exceeds(cap_events: Recorder) -> None:
    body = {"max_tokens": 10}
    with pytest.raises(RequestRejected) as info:
        apply_cost_cap(body, CHAT, GPT41, D("0.01"), "clamp", 6000, 4096)
    assert (info.value.status, info.value.code) == (400, "cost_limit_exceeded")
    assert "the prompt alone, about 6000 tokens, may cost $0.0120" in info.value.message
    assert body == {"max_tokens": 10}
    assert cap_events.events[-1]["action"] == "reject"


def test_clamp_rejects_when_not_one_token_fits() -> None:
    # The prompt costs $0.009995; $0.000005 left buys 0.625 tokens at $8/M.
    with pytest.raises(RequestRejected) as info:
        apply_cost_cap({}, CHAT, GPT41, D("0.01"), "clamp", 4997, 4096)
    assert info.value.code == "cost_limit_exceeded"


def test_reject_policy_message_and_code(cap_events: Recorder) -> None:
    body = {"max_tokens": 9000}
    # 550 prompt tokens ($0.0011) + 9000 output tokens ($0.072) = $0.0731 against $0.05.
    with pytest.raises(RequestRejected) as info:
        apply_cost_cap(body, CHAT, GPT41, D("0.05"), "reject", 550, 4096, route="r", version="v")
    exc = info.value
    assert (exc.status, exc.code) == (400, "cost_limit_exceeded")
    assert exc.message == (
        "worst-case cost $0.0731 exceeds the per-request limit $0.0500 by $0.0231"
    )
    assert body == {"max_tokens": 9000}  # untouched
    assert cap_events.events == [
        {
            "route": "r",
            "version": "v",
            "limit_usd": D("0.05"),
            "worst_case_usd": D("0.0731"),
            "action": "reject",
        }
    ]


def test_reject_message_never_understates() -> None:
    # worst case $0.05000000005 against $0.05: rounded up, and the excess never "$0.0000".
    price = Price(D("0"), D("10.00000001"))
    with pytest.raises(RequestRejected) as info:
        apply_cost_cap({"max_tokens": 5000}, CHAT, price, D("0.05"), "reject", 0, 1)
    assert info.value.message == (
        "worst-case cost $0.0501 exceeds the per-request limit $0.0500 by $0.00000000005"
    )


def test_embeddings_are_capped_on_the_prompt() -> None:
    price = Price(D("0.02"), D("0"))
    body = {"input": "x"}
    out = apply_cost_cap(body, EMBEDDINGS, price, D("0.001"), "clamp", 1000, 4096)
    assert out == CapOutcome(D("0.00002"), 0, False, None)
    assert body == {"input": "x"}
    with pytest.raises(RequestRejected):
        apply_cost_cap(body, EMBEDDINGS, price, D("0.001"), "clamp", 100_000, 4096)


def test_without_a_price() -> None:
    body: dict[str, Any] = {}
    assert apply_cost_cap(body, CHAT, None, None, "clamp", 10, 4096) == CapOutcome(None, 4096)
    assert body == {}
    with pytest.raises(RequestRejected) as info:  # a cap that cannot be enforced fails closed
        apply_cost_cap(body, CHAT, None, D("0.05"), "clamp", 10, 4096, version="local")
    assert (info.value.status, info.value.code) == (500, "price_unknown")
    assert "local" in info.value.message


def test_without_a_cap_the_body_is_untouched() -> None:
    body: dict[str, Any] = {"messages": []}
    out = apply_cost_cap(body, CHAT, GPT41, None, "clamp", 1000, 4096)
    assert out == CapOutcome(D("0.034768"), 4096)
    assert body == {"messages": []}


@settings(max_examples=300, deadline=None)
@given(
    prompt=st.integers(0, 200_000),
    requested=st.one_of(st.none(), st.integers(1, 100_000)),
    cap_micro=st.integers(1, 2_000_000),
    n=st.integers(1, 4),
    out_price=st.decimals("0.01", "80", places=3),
)
def test_clamp_property(
    prompt: int, requested: int | None, cap_micro: int, n: int, out_price: Decimal
) -> None:
    """After a clamp the worst case fits the cap, and one more output token would not."""
    price = Price(D("3"), out_price, D("0.3"))
    cap = D(cap_micro) / 1_000_000
    body: dict[str, Any] = {"n": n} if requested is None else {"n": n, "max_tokens": requested}
    try:
        out = apply_cost_cap(body, CHAT, price, cap, "clamp", prompt, 4096)
    except RequestRejected:
        assert worst_case_cost(price, prompt, 1, choices=n) > cap
        return
    assert out.worst_case_usd is not None and out.worst_case_usd <= cap
    assert body["max_tokens"] == out.max_output_tokens >= 1
    assert out.worst_case_usd == worst_case_cost(price, prompt, out.max_output_tokens, choices=n)
    if out.clamped:
        assert worst_case_cost(price, prompt, out.max_output_tokens + 1, choices=n) > cap


# --- token estimates --------------------------------------------------------------------------

ENGLISH = (
    "The quick brown fox jumps over the lazy dog. Please review this pull request and explain"
    " every change you would make to the error handling, with examples. "
) * 20
CODE = "def handler(request):\n    return {'status': 200, 'items': [x for x in range(10)]}\n" * 20
CJK = "请审查这个拉取请求并解释你会如何修改错误处理。" * 20


@pytest.mark.parametrize("text", [ENGLISH, CODE, CJK])
def test_char_estimate_is_conservative(text: str) -> None:
    """o200k averages about 4 characters per English token and about one token per CJK
    character; the estimate stays above both (and above one token per word)."""
    body = {"messages": [{"role": "user", "content": text}]}
    est = CharEstimator().prompt_tokens(body, CHAT)
    assert est >= len(text.encode()) / 3
    assert est >= len(text) / 4 + 4
    assert est >= len(text.split())
    if text is CJK:
        assert est >= len(text)


def test_char_estimate_counts_every_prompt_field() -> None:
    est = CharEstimator()
    base = est.prompt_tokens({}, CHAT)
    assert base == 8  # the per-request overhead
    one = est.prompt_tokens({"messages": [{"role": "user", "content": "x" * 300}]}, CHAT)
    # 300 chars / 3 + keys and values ("role", "user", "content": 15 bytes -> 5) + 4 overhead
    assert one == base + 100 + 5 + 4
    assert est.prompt_tokens({"system": "x" * 30, "messages": []}, MESSAGES) == base + 10
    assert est.prompt_tokens({"instructions": "x" * 30, "input": "y" * 30}, RESPONSES) == base + 20
    assert est.prompt_tokens({"prompt": [1, 2, 3, 4]}, COMPLETIONS) == base + 4  # token ids
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"a": 1}}}]
    assert est.prompt_tokens({"messages": [], "tools": tools}, CHAT) > base + 10
    # The model and generation parameters are not prompt.
    assert (
        est.prompt_tokens({"model": "x" * 300, "temperature": 0.5, "max_tokens": 9}, CHAT) == base
    )


def test_images_count_a_fixed_amount_not_their_base64() -> None:
    est = CharEstimator()
    data = "data:image/png;base64," + "A" * 3_000_000
    openai_img = {"type": "image_url", "image_url": {"url": data}}
    claude_img = {"type": "image", "source": {"type": "base64", "data": "A" * 3_000_000}}
    resp_img = {"type": "input_image", "image_url": data}
    for ep, block in ((CHAT, openai_img), (MESSAGES, claude_img), (RESPONSES, resp_img)):
        body = {"messages": [{"role": "user", "content": [block]}]}
        n = est.prompt_tokens(body, ep)
        assert tokens.IMAGE_TOKENS < n < tokens.IMAGE_TOKENS + 30


def test_non_ascii_is_counted_in_utf8_bytes() -> None:
    est = CharEstimator(message_overhead=0, request_overhead=0)
    assert est.prompt_tokens({"prompt": "é" * 30}, COMPLETIONS) == 20  # 60 bytes / 3
    assert est.prompt_tokens({"prompt": "\ud800"}, COMPLETIONS) == 1  # a lone surrogate is fine


def test_estimate_completion_tokens() -> None:
    assert estimate_completion_tokens("") == 0
    assert estimate_completion_tokens("abcd") == 2
    assert estimate_completion_tokens("请" * 10) == 10
    assert estimate_completion_tokens(b"x" * 10) == 4
    assert estimate_completion_tokens(9) == 3
    assert estimate_completion_tokens(-1) == 0


def test_default_estimator_falls_back_without_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # "import tiktoken" raises
    tokens.default_estimator.cache_clear()
    try:
        assert isinstance(tokens.default_estimator(), CharEstimator)
        assert TiktokenEstimator.load() is None
    finally:
        tokens.default_estimator.cache_clear()


class _FakeEncoding:
    def encode_ordinary(self, text: str) -> list[int]:
        return [0] * len(text.split())


def _fake_tiktoken(monkeypatch: pytest.MonkeyPatch, cached: bool) -> list[str]:
    """A tiktoken whose encoding file is in its cache or must be downloaded."""
    fetched: list[str] = []
    load = types.ModuleType("tiktoken.load")

    def read_file(blobpath: str) -> bytes:
        fetched.append(blobpath)
        return b""

    load.read_file = read_file  # type: ignore[attr-defined]
    mod = types.ModuleType("tiktoken")

    def get_encoding(name: str) -> _FakeEncoding:
        if not cached:
            load.read_file("https://openaipublic.blob.core.windows.net/encodings/" + name)  # type: ignore[attr-defined]
        return _FakeEncoding()

    mod.get_encoding = get_encoding  # type: ignore[attr-defined]
    mod.load = load  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tiktoken", mod)
    monkeypatch.setitem(sys.modules, "tiktoken.load", load)
    return fetched


def test_tiktoken_is_used_only_when_its_encoding_loads_offline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fetched = _fake_tiktoken(monkeypatch, cached=False)
    assert TiktokenEstimator.load() is None  # it would have had to download
    assert fetched == []  # ... and it did not
    assert sys.modules["tiktoken.load"].read_file.__name__ == "read_file"  # restored
    assert TiktokenEstimator.load(allow_download=True) is not None
    assert len(fetched) == 1
    _fake_tiktoken(monkeypatch, cached=True)
    tokens.default_estimator.cache_clear()
    try:
        est = tokens.default_estimator()
        assert isinstance(est, TiktokenEstimator)
        body = {"messages": [{"role": "user", "content": "one two three four"}]}
        openai_count = est.prompt_tokens(body, CHAT)
        assert openai_count < est.prompt_tokens(body, MESSAGES)  # a wider margin for Claude
    finally:
        tokens.default_estimator.cache_clear()


def test_char_estimate_is_above_tiktoken_when_it_is_installed() -> None:
    estimator = TiktokenEstimator.load()
    if estimator is None:
        pytest.skip("tiktoken or its cached o200k_base encoding is not available")
    enc = estimator.encoding
    for text in (ENGLISH, CODE, CJK):
        body = {"messages": [{"role": "user", "content": text}]}
        exact = len(enc.encode_ordinary(text))
        assert CharEstimator().prompt_tokens(body, CHAT) >= exact
        assert estimator.prompt_tokens(body, CHAT) >= exact


@settings(max_examples=300, deadline=None)
@given(
    prompt=st.integers(0, 2_000_000),
    requested=st.one_of(st.none(), st.integers(1, 200_000)),
    cap=st.one_of(st.none(), st.decimals("0.000001", "50", places=6)),
    n=st.one_of(st.none(), st.integers(1, 4)),
    prices=st.tuples(*[st.decimals("0", "100", places=p) for p in (0, 2, 3)]),
    cache=st.sampled_from([None, {"type": "ephemeral"}, {"type": "ephemeral", "ttl": "1h"}]),
    endpoint=st.sampled_from([CHAT, MESSAGES, RESPONSES]),
)
def test_cap_figures_are_worst_case_cost_digit_for_digit(
    prompt: int,
    requested: int | None,
    cap: Decimal | None,
    n: int | None,
    prices: tuple[Decimal, Decimal, Decimal],
    cache: dict[str, str] | None,
    endpoint: Any,
) -> None:
    """The cap's figures are worst_case_cost's Decimals, exponent included (they reach the
    budget ledger and the signals), however it computes them."""
    price = Price(prices[0], prices[1] + D("0.01"), prices[2])
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    if cache is not None:
        body["system"] = [{"type": "text", "text": "x", "cache_control": cache}]
    if requested is not None:
        set_max_output_tokens(body, endpoint, requested)
    if n is not None:
        body["n"] = n
    multiplier = D(1)
    if endpoint is MESSAGES and cache is not None:
        multiplier = D(2) if "ttl" in cache else D("1.25")
    limit = requested if requested is not None else 4096
    worst = worst_case_cost(price, prompt, limit, choices=n or 1, input_multiplier=multiplier)
    try:
        out = apply_cost_cap(body, endpoint, price, cap, "clamp", prompt, 4096)
    except RequestRejected:
        assert cap is not None and worst > cap
        return
    assert out.worst_case_usd is not None
    if not out.clamped:
        assert out.worst_case_usd.as_tuple() == worst.as_tuple()
    if cap is not None:
        prompt_cost = worst_case_cost(price, prompt, 0, input_multiplier=multiplier)
        affordable = int((cap - prompt_cost) * 1_000_000 // (price.output_per_mtok * (n or 1)))
        assert out.output_token_limit == affordable


def _reference_char_estimate(body: dict[str, Any]) -> int:
    """The estimate as first written: the stack walker over every prompt field, in order."""
    parts: list[str] = []
    direct = 8
    for field in tokens._PROMPT_FIELDS:
        value = body.get(field)
        if value is None:
            continue
        direct += tokens._collect_deep(value, parts)
        if field in tokens._LIST_FIELDS and isinstance(value, list):
            direct += 4 * len(value)
    size = sum(len(p.encode("utf-8", "surrogatepass")) for p in parts)
    return direct + -(-size // 3)


class _Str(str):
    pass


_json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.sampled_from(["image", "image_url", "input_image", "text"]).map(lambda t: {"type": t})
    | st.text().map(_Str)
)
_json = st.recursive(
    _json_leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=5) | st.integers(0, 9), inner, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(body=st.dictionaries(st.sampled_from([*tokens._PROMPT_FIELDS, "model", "n"]), _json))
def test_char_estimate_and_walk_match_the_stack_walker(body: dict[str, Any]) -> None:
    """The fast recursive walk finds the same strings, in the same order, and the same direct
    tokens as the stack walker it falls back to; the estimate is the same number."""
    assert CharEstimator().prompt_tokens(body, CHAT) == _reference_char_estimate(body)
    for value in body.values():
        fast: list[str] = []
        slow: list[str] = []
        assert tokens._collect(value, fast) == tokens._collect_deep(value, slow)
        assert fast == slow


def test_char_estimate_of_a_very_deep_request() -> None:
    """Nesting far below the recursion limit is walked without recursion, and counted."""
    deep: Any = {"role": "user", "content": "x" * 30}
    for i in range(20_000):
        deep = [deep] if i % 2 else {"k": deep}
    body = {"messages": [deep]}
    assert CharEstimator().prompt_tokens(body, CHAT) == _reference_char_estimate(body)
