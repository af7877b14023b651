"""Admission for one LLM call: cost cap, rate limits and budget; and settling it afterwards.

A :class:`Guard` belongs to one configuration. Its limiter and ledger hold connections and
counters, so a new configuration keeps them when their settings did not change. A call that
has no cap, no limits and no budget costs one dict lookup here.

The order, for every call: the cost cap (may lower ``max_tokens`` or reject with 400), the
request and token rate limits (429), then the budget reservation of the worst case (402).
After the response: actual tokens are counted against the token limits and the reservation
is reconciled to the actual cost (or released when nothing was billed).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import attrs

from relaymw.budgets import BudgetLedger, BudgetScopes, Reservation
from relaymw.config import Price, RelayConfig, Route, Version
from relaymw.cost import apply_cost_cap, effective_cap
from relaymw.limiting import RateLimiter
from relaymw.protocols import Endpoint
from relaymw.snapshot import KeyFunction, RequestView, VersionChoice
from relaymw.tokens import TokenEstimator, default_estimator

__all__ = ["DEFAULT_MAX_OUTPUT", "Admission", "Guard"]

# The output a worst case assumes when neither the client nor the version limits it.
DEFAULT_MAX_OUTPUT = 4096


class Admission:
    """What one call was admitted with, needed again to settle it."""

    __slots__ = (
        "headers",
        "identity",
        "output_token_limit",
        "price",
        "prompt_tokens",
        "reservation",
        "route",
        "settled",
        "version",
        "worst_case",
    )

    def __init__(
        self, route: Route, version: Version, price: Price | None, prompt_tokens: int
    ) -> None:
        self.route = route
        self.version = version
        self.price = price
        self.prompt_tokens = prompt_tokens
        self.worst_case: Decimal | None = None
        self.output_token_limit: int | None = None
        self.identity = "anonymous"
        self.reservation: Reservation | None = None
        self.headers: list[tuple[str, str]] = []
        self.settled = False


class Guard:
    estimator: TokenEstimator
    limiter: RateLimiter
    ledger: BudgetLedger | None

    def __init__(
        self,
        config: RelayConfig,
        sender: Any,
        *,
        estimator: TokenEstimator | None = None,
        identity: KeyFunction | None = None,
        previous: Guard | None = None,
    ) -> None:
        self.config = config
        self.sender = sender
        self.identity_func = identity
        self.estimator = estimator or (previous.estimator if previous else default_estimator())
        old = previous.config if previous else None
        self.retired: list[Any] = []  # what the previous guard had and this one does not keep
        if previous and old is not None and old.rate_limiting == config.rate_limiting:
            self.limiter = previous.limiter
        else:
            self.limiter = RateLimiter(config.rate_limiting)
            if previous:
                self.retired.append(previous.limiter)
        same_budgets = old is not None and (old.budgets, old.budgeting) == (
            config.budgets,
            config.budgeting,
        )
        if previous and same_budgets:
            self.ledger = previous.ledger
        else:
            self.ledger = (
                BudgetLedger(
                    config.budgets,
                    config.budgeting.storage_uri,
                    fail_open=config.budgeting.fail_open,
                    sender=sender,
                )
                if config.budgets
                else None
            )
            if previous and previous.ledger is not None:
                self.retired.append(previous.ledger)
        # In-app calls were counted against request limits when the page request came in.
        self._token_only: dict[tuple[str, str], tuple[Route, Version]] = {}

    def prepare(
        self,
        body: dict[str, Any],
        endpoint: Endpoint,
        choice: VersionChoice,
        route: Route,
        price: Price | None,
        in_app: bool = False,
    ) -> Admission | None:
        """The cost cap, applied to ``body`` in place; None when nothing guards this call.
        ``price`` is the chosen version's (the engine keeps it per configuration and tag)."""
        version = choice.version
        cap = effective_cap(route, version)
        limited = bool(
            route.rate_limits or route.token_limits or version.rate_limits or version.token_limits
        )
        if cap is None and not limited and self.ledger is None:
            return None
        if in_app and limited:
            route, version = self._without_request_limits(route, version)
        prompt = self.estimator.prompt_tokens(body, endpoint)
        admission = Admission(route, version, price, prompt)
        outcome = apply_cost_cap(
            body,
            endpoint,
            price,
            cap,
            route.cost_policy,
            prompt,
            DEFAULT_MAX_OUTPUT,
            sender=self.sender,
            route=route.model_alias,
            version=version.version_tag,
        )
        admission.worst_case = outcome.worst_case_usd
        admission.output_token_limit = outcome.output_token_limit
        return admission

    def _without_request_limits(self, route: Route, version: Version) -> tuple[Route, Version]:
        key = (route.model_alias, version.version_tag)
        found = self._token_only.get(key)
        if found is None:
            found = (attrs.evolve(route, rate_limits=()), attrs.evolve(version, rate_limits=()))
            self._token_only[key] = found
        return found

    def _scopes(self, admission: Admission) -> BudgetScopes:
        return BudgetScopes(admission.route.model_alias, admission.identity)

    def admit(self, admission: Admission, request: RequestView) -> None:
        """Rate limits then the budget reservation; raises ``RequestRejected``."""
        admission.identity = self.limiter.identity(request, self.identity_func)
        admission.headers = self.limiter.check(
            admission.route, admission.version, admission.identity, admission.prompt_tokens
        )
        if self.ledger is not None:
            admission.reservation = self.ledger.reserve(
                self._scopes(admission), admission.worst_case or Decimal(0)
            )

    async def aadmit(self, admission: Admission, request: RequestView) -> None:
        admission.identity = self.limiter.identity(request, self.identity_func)
        admission.headers = await self.limiter.acheck(
            admission.route, admission.version, admission.identity, admission.prompt_tokens
        )
        if self.ledger is not None:
            admission.reservation = await self.ledger.areserve(
                self._scopes(admission), admission.worst_case or Decimal(0)
            )

    def check_page(
        self, route: Route, version: Version, request: RequestView
    ) -> list[tuple[str, str]]:
        """Request limits for an in-app page request (its LLM calls count tokens)."""
        if not (route.rate_limits or version.rate_limits):
            return []
        return self.limiter.check(
            route, version, self.limiter.identity(request, self.identity_func), 0
        )

    async def acheck_page(
        self, route: Route, version: Version, request: RequestView
    ) -> list[tuple[str, str]]:
        if not (route.rate_limits or version.rate_limits):
            return []
        identity = self.limiter.identity(request, self.identity_func)
        headers: list[tuple[str, str]] = await self.limiter.acheck(route, version, identity, 0)
        return headers

    def settle(self, admission: Admission, tokens: int, cost: Decimal, billed: bool) -> None:
        """Count actual tokens and reconcile the reservation, once. ``billed`` is False when the
        upstream produced nothing to pay for (it failed, or never answered)."""
        if admission.settled:
            return
        admission.settled = True
        self.limiter.record_tokens(admission.route, admission.version, admission.identity, tokens)
        if self.ledger is not None:
            if billed:
                self.ledger.reconcile(admission.reservation, cost)
            else:
                self.ledger.release(admission.reservation)

    async def asettle(self, admission: Admission, tokens: int, cost: Decimal, billed: bool) -> None:
        if admission.settled:
            return
        admission.settled = True
        record = self.limiter.arecord_tokens(
            admission.route, admission.version, admission.identity, tokens
        )
        if self.ledger is None:
            await record
            return
        # The budget's command is queued first, so that the token count's joins its write:
        # one round trip (and one wake-up) for both.
        try:
            reconcile = self.ledger.areconcile_soon(
                admission.reservation, cost if billed else Decimal(0)
            )
        except BaseException:  # an invalid cost: the tokens are counted all the same
            await record
            raise
        try:
            await record
        finally:
            await reconcile

    def close(self) -> None:
        for item in (self.limiter, self.ledger):
            if item is not None:
                item.close()

    async def aclose(self) -> None:
        for item in (self.limiter, self.ledger):
            if item is not None:
                await item.aclose()
