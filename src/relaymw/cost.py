"""Prices and the cost of a call. Money is ``Decimal`` USD, never float."""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal

from relaymw.config import Price

__all__ = ["DEFAULT_PRICING", "MILLION", "cost_of", "price_for"]

MILLION = Decimal(1_000_000)
D = Decimal

# USD per million tokens, as the providers publish them (input, output, cached input).
DEFAULT_PRICING: dict[str, Price] = {
    "gpt-4.1": Price(D("2.00"), D("8.00"), D("0.50")),
    "claude-sonnet-4-5": Price(D("3.00"), D("15.00"), D("0.30")),
    "claude-sonnet-4": Price(D("3.00"), D("15.00"), D("0.30")),
    "gemini-2.5-flash": Price(D("0.30"), D("2.50"), D("0.03")),
    "deepseek-v3.2": Price(D("0.28"), D("0.42"), D("0.028")),
    "deepseek-chat": Price(D("0.28"), D("0.42"), D("0.028")),
}

_DATE_SUFFIX = re.compile(r"-(?:\d{8}|\d{4}-\d{2}-\d{2})$")


def price_for(model: str, overrides: Mapping[str, Price]) -> Price | None:
    """The price of ``model``: a configured override first, then the built-in table; a dated
    snapshot name (``claude-sonnet-4-20250514``) falls back to its family's price."""
    for table in (overrides, DEFAULT_PRICING):
        price = table.get(model)
        if price is not None:
            return price
    undated = _DATE_SUFFIX.sub("", model)
    if undated != model:
        return price_for(undated, overrides)
    return None


def cost_of(
    price: Price | None, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
) -> Decimal:
    """The cost of a call; cached prompt tokens at the cached price where one is published."""
    if price is None:
        return Decimal(0)
    cached_price = price.cached_input_per_mtok
    if cached_price is None:
        cached_tokens = 0
        cached_price = Decimal(0)
    fresh = prompt_tokens - cached_tokens
    total = (
        fresh * price.input_per_mtok
        + cached_tokens * cached_price
        + completion_tokens * price.output_per_mtok
    )
    return total / MILLION
