"""The progressive rollout controller: ramp a canary stage by stage while its figures pass.

A rollout of ``to`` on route ``alias`` sets the canary's weight to each stage in turn (the
other rules share the remainder in the proportions they had when the rollout started),
waits ``interval_seconds``, then analyses the canary's metrics *since the stage started*
(from the first metric bucket that begins after its start: the bucket the stage started in
also holds requests from before it, which would speak for a canary that has since changed):

* fewer than ``min_requests`` canary requests (or, with ``baseline``, stable ones): **hold**
  and look again shortly, saying so;
* a limit crossed (error rate above ``max_error_rate``, p99 above ``max_p99_ms``) or, with
  ``baseline``, the canary worse than the stable version (the sequential error-rate test and
  the p99 comparison of :mod:`relaymw.health`): **roll back** (the canary to 0, the others
  back to their weights from before the rollout), record why, stop;
* otherwise **pass**: the next stage, or done after the last one.

Its state lives in the store (``rollout:<alias>``), written before and after every weight
change, so a controller stopped at any point (Ctrl-C, a crash) resumes where it was: the same
stage, the same stage start. Weights changed by anyone else (an operator, a health-check
ejection) stop the rollout without touching them.

:class:`RolloutController` is driven by :meth:`~RolloutController.step`, which does what is
due and answers how long to wait, so it runs under ``time.sleep`` (:meth:`run`) or inside an
event loop (``relaymw demo``). No framework imports here: the live views are the CLI's.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs

from relaymw.config import normalize_weights
from relaymw.control import ControlError, Figures, ReleaseControl, RouteView
from relaymw.health import ALPHA, LATENCY_MIN_REQUESTS, LATENCY_TOLERANCE, baseline_error_test

__all__ = [
    "Analysis",
    "Criteria",
    "Plan",
    "Reporter",
    "RolloutController",
    "RolloutState",
    "analyse",
    "parse_interval",
    "parse_stages",
    "state_name",
]

Status = Literal["running", "succeeded", "rolled_back", "aborted"]
Outcome = Literal["pass", "fail", "hold"]
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}
_INTERVAL = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_TOLERANCE = 0.01  # weights are equal within this (two decimals are stored)


def parse_interval(text: str) -> float:
    """Seconds from ``30s``, ``10m``, ``1h``, ``500ms`` or plain seconds (``45``, ``0.5``)."""
    match = _INTERVAL.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 10m, 1h or seconds)")
    seconds = float(match[1]) * _UNITS[match[2] or ""]
    if seconds <= 0:
        raise ValueError(f"the duration must be more than 0: {text!r}")
    return seconds


def parse_stages(text: str) -> tuple[float, ...]:
    """``"5,25,50,100"`` → weights, each in (0, 100] and each higher than the one before."""
    try:
        stages = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"stages must be numbers separated by commas: {text!r}") from None
    if not stages:
        raise ValueError("give at least one stage, e.g. 5,25,50,100")
    if any(not (0 < s <= 100) or math.isnan(s) for s in stages):
        raise ValueError(f"every stage must be a weight above 0 and at most 100: {text!r}")
    if any(b <= a for a, b in itertools.pairwise(stages)):
        raise ValueError(f"stages must increase: {text!r}")
    return stages


def state_name(alias: str) -> str:
    """The store state holding ``alias``'s rollout."""
    return f"rollout:{alias}"


@attrs.frozen
class Criteria:
    """When a stage passes. ``None`` turns a limit off."""

    max_error_rate: float | None = 0.05
    max_p99_ms: float | None = None
    baseline: bool = False
    min_requests: int = 100


@attrs.frozen
class Plan:
    alias: str
    to: str
    stages: tuple[float, ...] = (5.0, 25.0, 50.0, 100.0)
    interval_seconds: float = 600.0
    criteria: Criteria = Criteria()


@attrs.define
class RolloutState:
    """What the store keeps (JSON): enough to resume, and the record of what happened."""

    alias: str
    to: str
    stable: str  # what a failed stage falls back to, and the baseline's reference
    stages: list[float]
    interval_seconds: float
    criteria: Criteria
    base_weights: dict[str, float]  # the other rules' weights when the rollout started
    started_at: float
    stage_index: int = 0
    stage_started_at: float | None = None  # None: this stage's weights are not yet set
    status: Status = "running"
    reason: str | None = None
    history: list[dict[str, Any]] = attrs.Factory(list)

    @property
    def weight(self) -> float:
        return self.stages[self.stage_index]

    def weights(self, canary: float) -> dict[str, float]:
        """Every rule's weight with the canary at ``canary``."""
        others = list(self.base_weights)
        shared = normalize_weights([self.base_weights[t] for t in others], 100.0 - canary)
        return dict(zip(others, shared, strict=True)) | {self.to: canary}

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutState:
        fields = {f.name for f in attrs.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["criteria"] = Criteria(**data.get("criteria", {}))
        return cls(**values)


@attrs.frozen
class Analysis:
    """A stage's verdict; ``reasons`` say why it failed or holds, or what it passed."""

    outcome: Outcome
    reasons: tuple[str, ...]
    canary: Figures
    stable: Figures | None = None


def _pct(rate: float) -> str:
    return f"{rate:.1%}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def analyse(criteria: Criteria, canary: Figures, stable: Figures | None = None) -> Analysis:
    """The verdict on a stage's figures. ``stable`` is the stable version's figures over the
    same window when a baseline comparison is wanted and possible (it carries traffic)."""
    need = criteria.min_requests
    holds = []
    if canary.request_count < need:
        holds.append(f"the canary has {canary.request_count} of {need} requests needed")
    if criteria.baseline and stable is not None and stable.request_count < need:
        holds.append(f"the stable version has {stable.request_count} of {need} requests needed")
    if holds:
        return Analysis("hold", tuple(holds), canary, stable)
    c = canary
    failed, passed = [], []
    errors = f"error rate {_pct(c.error_rate)} ({c.error_count}/{c.request_count})"
    if criteria.max_error_rate is not None:
        limit = _pct(criteria.max_error_rate)
        if c.error_rate > criteria.max_error_rate:
            failed.append(f"{errors} is above the limit of {limit}")
        else:
            passed.append(f"{errors} <= {limit}")
    if criteria.max_p99_ms is not None and c.latency_p99_ms is not None:
        p99, limit = _ms(c.latency_p99_ms), _ms(criteria.max_p99_ms)
        if c.latency_p99_ms > criteria.max_p99_ms:
            failed.append(f"p99 latency {p99} is above the limit of {limit}")
        else:
            passed.append(f"p99 {p99} <= {limit}")
    if criteria.baseline and stable is not None:
        failed_before = len(failed)
        failed += _baseline_failures(criteria, c, stable)
        if len(failed) == failed_before:
            passed.append("no worse than the stable version")
    if failed:
        return Analysis("fail", tuple(failed), canary, stable)
    return Analysis("pass", tuple(passed) or ("no limits set",), canary, stable)


def _baseline_failures(criteria: Criteria, c: Figures, s: Figures) -> list[str]:
    """The canary against the stable version, as the health check's baseline mode does."""
    out = []
    reject, log_lambda = baseline_error_test(
        s.request_count, s.error_count, c.request_count, c.error_count
    )
    if reject:
        out.append(
            f"error rate {_pct(c.error_rate)} ({c.error_count}/{c.request_count}) is "
            f"significantly higher than the stable version's {_pct(s.error_rate)} "
            f"({s.error_count}/{s.request_count}); sequential test at alpha={ALPHA}, "
            f"log-likelihood ratio {log_lambda:.2f} >= {-math.log(ALPHA):.2f}"
        )
    enough = min(c.request_count, s.request_count) >= max(
        criteria.min_requests, LATENCY_MIN_REQUESTS
    )
    if (
        enough
        and c.latency_p99_ms is not None
        and s.latency_p99_ms is not None
        and c.latency_p99_ms > s.latency_p99_ms * (1.0 + LATENCY_TOLERANCE)
    ):
        out.append(
            f"p99 latency {_ms(c.latency_p99_ms)} is more than {1 + LATENCY_TOLERANCE:g} x "
            f"the stable version's {_ms(s.latency_p99_ms)}"
        )
    return out


class Reporter:
    """Receives the controller's progress; every method does nothing unless overridden."""

    def started(self, state: RolloutState, resumed: bool) -> None:
        pass

    def stage_started(self, state: RolloutState, weights: Mapping[str, float]) -> None:
        pass

    def progress(self, state: RolloutState, elapsed: float, figures: Figures | None) -> None:
        pass

    def analysed(self, state: RolloutState, analysis: Analysis) -> None:
        """A stage's verdict: ``pass`` or ``hold`` (a failure arrives at :meth:`finished`)."""

    def finished(self, state: RolloutState, analysis: Analysis | None) -> None:
        pass


class RolloutController:
    """Runs one rollout through a :class:`ReleaseControl`; see the module docstring.

    ``reset`` abandons a saved rollout of the route instead of resuming it."""

    def __init__(
        self,
        control: ReleaseControl,
        plan: Plan,
        reporter: Reporter | None = None,
        *,
        reset: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.control, self.plan = control, plan
        self.reporter = reporter or Reporter()
        self.reset, self.clock = reset, clock
        self.name = state_name(plan.alias)
        self.state: RolloutState | None = None
        self.last_analysis: Analysis | None = None
        interval = plan.interval_seconds
        self.poll = min(1.0, max(0.05, interval / 10))  # seconds between looks
        self.refresh = min(1.0, max(0.25, interval / 5))  # between route checks and figures
        self.hold_wait = min(2.0, max(0.5, interval / 5))  # between looks while holding
        self._next_refresh = 0.0

    # --- driving ----------------------------------------------------------------------------

    def run(self, sleep: Callable[[float], None] = time.sleep) -> RolloutState:
        """Start (or resume) and step until the rollout ends; Ctrl-C leaves the state saved."""
        state = self.start()
        while (delay := self.step()) is not None:
            sleep(delay)
        return state

    def start(self) -> RolloutState:
        """Resume the route's running rollout, or begin this plan's."""
        saved = self.control.read_state(self.name)
        resumed = saved is not None and saved.get("status") == "running" and not self.reset
        if resumed and saved is not None:
            state = RolloutState.from_dict(saved)
            if state.to != self.plan.to:
                raise ControlError(
                    f"a rollout of {state.alias} to {state.to} is in progress (stage "
                    f"{state.stage_index + 1}/{len(state.stages)}): run it again with "
                    f"--to {state.to} to resume it, or add --reset to abandon it"
                )
        else:
            state = self._begin(self.control.route(self.plan.alias))
            self.control.write_state(self.name, state.as_dict())
        self.state = state
        self.reporter.started(state, resumed)
        return state

    def _begin(self, route: RouteView) -> RolloutState:
        plan = self.plan
        known = self.control.versions()
        if plan.to not in known:
            raise ControlError(
                f"unknown version tag {plan.to!r} (known: {', '.join(known) or 'none'}); "
                f"register it first",
                404,
            )
        base = {t: w for t, w in route.rules if t != plan.to}
        carrying = [(t, w) for t, w in route.rules if t != plan.to and w > 0]
        if not carrying:
            raise ControlError(
                f"{plan.alias}: no other version carries traffic, so there is nothing to "
                f"roll back to; set weights first (relaymw set-weights)"
            )
        stable = max(carrying, key=lambda r: r[1])[0]
        return RolloutState(
            plan.alias,
            plan.to,
            stable,
            list(plan.stages),
            plan.interval_seconds,
            plan.criteria,
            base,
            self.clock(),
        )

    def step(self) -> float | None:
        """Do what is due now; the seconds to wait before the next call, None when done."""
        state = self.state if self.state is not None else self.start()
        if state.status != "running":
            return None
        if state.stage_started_at is None:
            self._enter_stage(state)
            return self.poll
        now = self.clock()
        elapsed = now - state.stage_started_at
        refresh = now >= self._next_refresh
        if refresh:
            self._next_refresh = now + self.refresh
            changed = self._changed_outside(state)
            if changed is not None:
                self._end(state, "aborted", changed, None)
                return None
        if elapsed < state.interval_seconds:
            figures = self._figures(state.to, state.stage_started_at, now) if refresh else None
            self.reporter.progress(state, elapsed, figures)
            return min(self.poll, state.interval_seconds - elapsed)
        analysis = self._analyse(state, now)
        self.last_analysis = analysis
        if analysis.outcome == "hold":
            self.reporter.analysed(state, analysis)
            return self.hold_wait
        self._record(state, analysis, now)
        if analysis.outcome == "fail":
            self._roll_back(state, analysis)
            return None
        self.reporter.analysed(state, analysis)
        if state.stage_index + 1 == len(state.stages):
            reason = f"all {len(state.stages)} stages passed; {state.to} at {state.weight:g}%"
            self._end(state, "succeeded", reason, analysis)
            return None
        state.stage_index += 1
        state.stage_started_at = None
        self.control.write_state(self.name, state.as_dict())
        self._enter_stage(state)
        return self.poll

    # --- the steps --------------------------------------------------------------------------

    def _enter_stage(self, state: RolloutState) -> None:
        # Saved before the change (stage_started_at None) and after it, so a controller
        # stopped in between sets the same weights again when it resumes.
        weights = state.weights(state.weight)
        self.control.set_weights(state.alias, weights, actor="rollout", action="rollout")
        state.stage_started_at = self.clock()
        self.control.write_state(self.name, state.as_dict())
        self._next_refresh = 0.0
        self.reporter.stage_started(state, weights)

    def _changed_outside(self, state: RolloutState) -> str | None:
        route = self.control.route(state.alias)
        now = route.weights.get(state.to, 0.0)
        if state.to in route.ejected:
            return f"the health check ejected {state.to}; weights left as they are"
        if abs(now - state.weight) > _TOLERANCE:
            shown = ", ".join(f"{t}={w:g}" for t, w in route.rules)
            return (
                f"the weights of {state.alias} were changed outside the rollout "
                f"({shown}; expected {state.to} at {state.weight:g}); left as they are"
            )
        return None

    def _figures(self, tag: str, start: float, end: float) -> Figures:
        return self.control.figures(tag, start, end, self.plan.alias, since=True)

    def _analyse(self, state: RolloutState, now: float) -> Analysis:
        start = state.stage_started_at or now
        canary = self._figures(state.to, start, now)
        stable = None
        if state.criteria.baseline and state.weights(state.weight).get(state.stable, 0) > 0:
            stable = self._figures(state.stable, start, now)
        return analyse(state.criteria, canary, stable)

    def _record(self, state: RolloutState, analysis: Analysis, now: float) -> None:
        state.history.append(
            {
                "stage": state.stage_index,
                "weight": state.weight,
                "started_at": state.stage_started_at,
                "ended_at": now,
                "outcome": analysis.outcome,
                "reasons": list(analysis.reasons),
                "canary": analysis.canary.as_dict(),
                "stable": analysis.stable.as_dict() if analysis.stable else None,
            }
        )

    def _roll_back(self, state: RolloutState, analysis: Analysis) -> None:
        weights = state.weights(0.0)
        self.control.set_weights(state.alias, weights, actor="rollout", action="rollback")
        shown = ", ".join(f"{t}={w:g}" for t, w in weights.items())
        reason = (
            f"stage {state.stage_index + 1}/{len(state.stages)} ({state.weight:g}%) failed: "
            + "; ".join(analysis.reasons)
            + f"; rolled back to {shown}"
        )
        self._end(state, "rolled_back", reason, analysis)

    def _end(
        self, state: RolloutState, status: Status, reason: str, analysis: Analysis | None
    ) -> None:
        state.status, state.reason = status, reason
        self.control.write_state(self.name, state.as_dict())
        self.reporter.finished(state, analysis)
