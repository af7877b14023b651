"""Prices, the cost of a call and the per-request cost cap. Money is ``Decimal`` USD, never float.

Prices are USD per million tokens. Three rates are modelled: fresh input, output, and cached
input (a cache *read*). Anthropic also bills cache *writes* (``cache_creation_input_tokens``):
relaymw charges them at ``CACHE_WRITE_MULTIPLIER`` (1.25) * the input price, the price of the
default 5-minute cache; 1-hour cache writes (2x) are under-charged by 0.75 * input per token.
Long-context surcharges (Claude Sonnet 4.5 above 200k prompt tokens) are not modelled: configure
a price override when you send such prompts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from decimal import ROUND_UP, Decimal
from typing import Any, Literal

import attrs

from relaymw import signals
from relaymw.config import Price, Route, Version
from relaymw.errors import RequestRejected
from relaymw.protocols import Endpoint, Usage

__all__ = [
    "CACHE_WRITE_MULTIPLIER",
    "DEFAULT_PRICING",
    "MILLION",
    "CapOutcome",
    "apply_cost_cap",
    "cost_of",
    "cost_of_usage",
    "cost_pico",
    "effective_cap",
    "max_output_tokens",
    "pico_rates",
    "price_for",
    "set_max_output_tokens",
    "worst_case_cost",
]

log = logging.getLogger("relaymw.cost")

MILLION = Decimal(1_000_000)
CACHE_WRITE_MULTIPLIER = Decimal("1.25")
CACHE_WRITE_1H_MULTIPLIER = Decimal(2)
_ONE = Decimal(1)
D = Decimal

# USD per million tokens, as the providers publish them (input, output, cached input).
DEFAULT_PRICING: dict[str, Price] = {
    "gpt-4.1": Price(D("2.00"), D("8.00"), D("0.50")),
    "gpt-4.1-mini": Price(D("0.40"), D("1.60"), D("0.10")),
    "gpt-4.1-nano": Price(D("0.10"), D("0.40"), D("0.025")),
    "claude-sonnet-4-5": Price(D("3.00"), D("15.00"), D("0.30")),
    "claude-sonnet-4": Price(D("3.00"), D("15.00"), D("0.30")),
    "gemini-2.5-flash": Price(D("0.30"), D("2.50"), D("0.03")),
    "deepseek-v3.2": Price(D("0.28"), D("0.42"), D("0.028")),
    "deepseek-chat": Price(D("0.28"), D("0.42"), D("0.028")),
    "deepseek-reasoner": Price(D("0.28"), D("0.42"), D("0.028")),
}

_DATE_SUFFIX = re.compile(r"-(?:\d{8}|\d{4}-\d{2}-\d{2})$")


def price_for(model: str, overrides: Mapping[str, Price]) -> Price | None:
    """The price of ``model``: a configured override first, then the built-in table; a dated
    snapshot name (``claude-sonnet-4-20250514``) falls back to its family's price."""
    price = overrides.get(model)
    if price is None:
        price = DEFAULT_PRICING.get(model)
    if price is not None:
        return price
    undated = _DATE_SUFFIX.sub("", model)
    if undated != model:
        return price_for(undated, overrides)
    return None


def cost_of(
    price: Price | None,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    cache_creation_tokens: int = 0,
) -> Decimal:
    """The cost of a call. ``prompt_tokens`` counts every input token; of those,
    ``cached_tokens`` are billed at the cached price (the input price when none is published)
    and ``cache_creation_tokens`` at ``CACHE_WRITE_MULTIPLIER`` * the input price."""
    if price is None:
        return Decimal(0)
    cached_price = price.cached_input_per_mtok
    if cached_price is None:
        cached_price = price.input_per_mtok
    fresh = prompt_tokens - cached_tokens - cache_creation_tokens
    total = (
        fresh * price.input_per_mtok
        + cached_tokens * cached_price
        + cache_creation_tokens * price.input_per_mtok * CACHE_WRITE_MULTIPLIER
        + completion_tokens * price.output_per_mtok
    )
    return total / MILLION


def cost_of_usage(price: Price | None, usage: Usage) -> Decimal:
    """:func:`cost_of` for a :class:`~relaymw.protocols.Usage` (cache reads and writes)."""
    return cost_of(
        price,
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.cached_tokens,
        usage.cache_creation_tokens,
    )


PICO_PER_USD = 10**12
_PICO_PER_MTOK_USD = Decimal(1_000_000)  # USD per million tokens -> pico-USD per token

# Per-token prices in whole pico-USD: (fresh input, output, cached input, cache write).
PicoRates = tuple[int, int, int, int]


def pico_rates(price: Price | None) -> PicoRates | None:
    """``price`` per token in whole pico-USD, when every rate :func:`cost_of` uses is one (any
    published price with at most 6 decimals per million tokens, 5 for the cache-write rate);
    None otherwise, or without a price. With these, a cost is integer arithmetic, exactly
    ``cost_of(...) * 10**12``."""
    if price is None:
        return None
    cached = price.cached_input_per_mtok
    if cached is None:
        cached = price.input_per_mtok
    rates = []
    for rate in (
        price.input_per_mtok,
        price.output_per_mtok,
        cached,
        price.input_per_mtok * CACHE_WRITE_MULTIPLIER,
    ):
        pico = rate * _PICO_PER_MTOK_USD
        if pico != pico.to_integral_value():
            return None
        rates.append(int(pico))
    return rates[0], rates[1], rates[2], rates[3]


def cost_pico(rates: PicoRates, usage: Usage) -> int:
    """:func:`cost_of_usage` in pico-USD, from :func:`pico_rates`: exact, no ``Decimal``."""
    fresh_rate, output_rate, cached_rate, write_rate = rates
    cached, written = usage.cached_tokens, usage.cache_creation_tokens
    return (
        (usage.prompt_tokens - cached - written) * fresh_rate
        + cached * cached_rate
        + written * write_rate
        + usage.completion_tokens * output_rate
    )


def worst_case_cost(
    price: Price,
    prompt_tokens: int,
    max_output_tokens: int,
    *,
    choices: int = 1,
    input_multiplier: Decimal = Decimal(1),
) -> Decimal:
    """The most a call can cost: every prompt token at the full input price (* a cache-write
    multiplier when the prompt may be written to a cache), ``max_output_tokens`` per choice."""
    return (
        prompt_tokens * price.input_per_mtok * input_multiplier
        + max_output_tokens * choices * price.output_per_mtok
    ) / MILLION


# --- the per-request cap ---------------------------------------------------------------------

# The max-token fields each endpoint reads; the first is the one set when the body has none.
_MAX_KEYS: dict[str, tuple[str, ...]] = {
    "chat": ("max_tokens", "max_completion_tokens"),
    "completions": ("max_tokens",),
    "messages": ("max_tokens",),
    "responses": ("max_output_tokens",),
}


def _positive_int(v: object) -> int | None:
    """A positive whole count from a JSON number, else None (null, junk, 0, NaN, infinity)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1 <= v < 2**53:
        return None
    return int(v)


def max_output_tokens(body: Mapping[str, Any], endpoint: Endpoint) -> int | None:
    """The output-token limit the body sets (the lowest, when it spells two); None if none
    (a missing, null, non-numeric or non-positive value: the upstream would not honour it)."""
    lowest = None
    for key in _MAX_KEYS.get(endpoint.kind, ()):
        value = body.get(key)
        if value is None:
            continue
        # A plain int in range is its own answer (the usual body); anything else is checked.
        n = value if value.__class__ is int and 1 <= value < 2**53 else _positive_int(value)
        if n and (lowest is None or n < lowest):
            lowest = n
    return lowest


def set_max_output_tokens(body: dict[str, Any], endpoint: Endpoint, value: int) -> None:
    """Set the output-token limit: every max-token key the body has, else the endpoint's own."""
    keys = _MAX_KEYS.get(endpoint.kind, ())
    present = [k for k in keys if k in body]
    for key in present or keys[:1]:
        body[key] = value


def effective_cap(route: Route | None, version: Version) -> Decimal | None:
    """The per-request cost limit: the route's when it sets one, else the version's."""
    if route is not None and route.cost_limit_per_request is not None:
        return route.cost_limit_per_request
    return version.cost_limit_per_request


@attrs.frozen
class CapOutcome:
    """What :func:`apply_cost_cap` decided.

    ``worst_case_usd`` is the worst case of the body as it will be sent (None when the model has
    no price); ``max_output_tokens`` the output limit in it (0 for embeddings); ``clamped``
    whether it was lowered; ``output_token_limit`` how many output tokens the cap pays for with
    this prompt (None without a cap): a stream whose ``StreamObserver.output_tokens`` passes it
    should be cut.
    """

    worst_case_usd: Decimal | None
    max_output_tokens: int
    clamped: bool = False
    output_token_limit: int | None = None


def _choices(body: Mapping[str, Any]) -> int:
    """How many completions one call generates (``n``, legacy ``best_of``)."""
    n, best_of = body.get("n"), body.get("best_of")
    if n is None and best_of is None:  # the usual body: one choice
        return 1
    return max(_positive_int(n) or 1, _positive_int(best_of) or 1)


def _cache_write_multiplier(body: Mapping[str, Any], endpoint: Endpoint) -> Decimal:
    """Anthropic bills prompt tokens written to its cache above the input price."""
    if endpoint.kind != "messages":
        return _ONE
    found: list[Any] = []
    _find_cache_control(body, found)
    if not found:
        return _ONE
    if any(isinstance(c, dict) and c.get("ttl") == "1h" for c in found):
        return CACHE_WRITE_1H_MULTIPLIER
    return CACHE_WRITE_MULTIPLIER


def _find_cache_control(node: Any, found: list[Any]) -> None:
    # A stack, not recursion: a request nested thousands of levels deep must not overflow.
    stack = [node]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "cache_control":
                    found.append(value)
                elif isinstance(value, (dict, list)):
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(item for item in node if isinstance(item, (dict, list)))


_FOUR_PLACES = Decimal("0.0001")


def _usd(value: Decimal, exact: bool = False) -> str:
    """Dollars for a message, 4 decimals: rounded up (a worst case is never understated), or
    in full when ``exact`` and the value has more (a configured limit is shown as written)."""
    if (exact and value != value.quantize(_FOUR_PLACES)) or 0 < value < _FOUR_PLACES:
        return f"${value.normalize():f}"
    return f"${value.quantize(_FOUR_PLACES, ROUND_UP)}"


def apply_cost_cap(
    body: dict[str, Any],
    endpoint: Endpoint,
    price: Price | None,
    cap: Decimal | None,
    policy: Literal["clamp", "reject"],
    prompt_tokens: int,
    default_max_output: int,
    *,
    sender: Any = None,
    route: str | None = None,
    version: str | None = None,
) -> CapOutcome:
    """Enforce the per-request cost limit ``cap`` on ``body`` (modified in place).

    Worst case = ``prompt_tokens`` * input price (* the cache-write multiplier when an Anthropic
    prompt sets ``cache_control``) + max output tokens * choices * output price, where the max
    output is the body's limit or ``default_max_output``. When a cap applies the limit is always
    written into the body, so the upstream can never generate more than was paid for.

    ``clamp`` lowers the limit to ``floor((cap - prompt cost) / (output price * choices))`` and
    rejects only when that is below 1; ``reject`` answers 400 ``cost_limit_exceeded`` as soon as
    the worst case exceeds the cap. Either action sends ``signals.cost_limit_exceeded``. A cap on
    a model without a price cannot be enforced: that is a 500 ``price_unknown`` (fail closed).
    """
    requested = max_output_tokens(body, endpoint)
    generates = endpoint.kind != "embeddings"
    limit = (requested if requested is not None else default_max_output) if generates else 0
    if price is None:
        if cap is None:
            return CapOutcome(None, limit)
        raise RequestRejected(
            500,
            "price_unknown",
            f"version {version or '?'} has a per-request cost limit but its model has no price;"
            " add one under [pricing] so the limit can be enforced",
        )
    choices = _choices(body)
    multiplier = _cache_write_multiplier(body, endpoint)
    # worst_case_cost's sum, its prompt part computed once; "* 1" would change nothing.
    prompt_part = prompt_tokens * price.input_per_mtok
    if multiplier is not _ONE:
        prompt_part *= multiplier
    worst = (prompt_part + limit * choices * price.output_per_mtok) / MILLION
    if cap is None:
        return CapOutcome(worst, limit)
    # The same value as worst_case_cost(..., 0, ...), whose "+ 0 * output price" only pads
    # the exponent: prompt_cost is only compared, subtracted and rounded, never shown as is.
    prompt_cost = prompt_part / MILLION
    per_token = price.output_per_mtok * choices
    affordable: int | None = None
    if generates and per_token > 0 and prompt_cost <= cap:
        affordable = int((cap - prompt_cost) * MILLION // per_token)
    if worst <= cap:
        if generates and requested is None:
            set_max_output_tokens(body, endpoint, limit)
        return CapOutcome(worst, limit, False, affordable)

    def reject() -> RequestRejected:
        signals.send(
            signals.cost_limit_exceeded,
            sender,
            route=route,
            version=version,
            limit_usd=cap,
            worst_case_usd=worst,
            action="reject",
        )
        detail = ""
        if prompt_cost > cap:
            detail = (
                f" (the prompt alone, about {prompt_tokens} tokens, may cost {_usd(prompt_cost)})"
            )
        return RequestRejected(
            400,
            "cost_limit_exceeded",
            f"worst-case cost {_usd(worst)} exceeds the per-request limit {_usd(cap, True)}"
            f" by {_usd(worst - cap)}{detail}",
        )

    if policy == "reject" or not generates or affordable is None or affordable < 1:
        raise reject()
    set_max_output_tokens(body, endpoint, affordable)
    signals.send(
        signals.cost_limit_exceeded,
        sender,
        route=route,
        version=version,
        limit_usd=cap,
        worst_case_usd=worst,
        action="clamp",
    )
    clamped = worst_case_cost(
        price, prompt_tokens, affordable, choices=choices, input_multiplier=multiplier
    )
    return CapOutcome(clamped, affordable, True, affordable)
