"""Health checks: which versions to eject, from the metrics of a sliding window (SPEC §6).

:class:`HealthChecker` only *decides*: it returns an :class:`Evaluation` whose
:class:`Ejection` entries the engine acts on (``version_ejected``, weights shared out with
:func:`share_out`, written back to the store). It never ejects a route's last eligible
version (eligible: weight > 0 and not ejected); that case is a :class:`Note`.

Mode ``"threshold"``: a version with at least ``min_requests`` in the window is ejected when
its error rate is *above* ``error_rate_threshold`` or its p99 latency *above*
``latency_p99_threshold_ms``. When every eligible version crosses, the highest-weight one is
kept (the others are ejected, lowest weight first).

Mode ``"baseline"``: the stable version (the highest-weight eligible one; the first listed on
a tie) is never ejected; every other eligible version is a canary compared with it.

* Errors: a sequential test valid at every look, the one-sided normal-mixture SPRT (mSPRT,
  Johari, Pekelis & Walsh, "Always valid inference", 2017/2022) of H0 "canary error rate <=
  stable error rate" at level ``alpha`` = 0.01. With ``V = p(1-p)(1/n_c + 1/n_s)`` (``p`` the
  pooled rate, add-one smoothed) and ``z`` the signed root of the binomial likelihood-ratio
  statistic for equal rates (much closer to normal for rare errors than the Wald z), the
  statistic is ``2 sqrt(V/(V+tau2)) exp(z² tau2 / (2(V+tau2))) Phi(z sqrt(tau2/(V+tau2)))``
  (a half-normal mixing distribution of variance ``tau2`` = 0.003 on the difference of the
  two rates); the canary is ejected when it reaches ``1/alpha``. It is computed from the two
  versions' (requests, errors) counts at each look, so it works on counts aggregated in Redis.
  Its guarantee (up to the normal approximation, checked by simulation in
  ``bench/bench_baseline.py``, figures in ``bench/results_health.md``) is for counts that only
  grow: pass ``since`` (the stage's start) to :meth:`HealthChecker.evaluate`; over a sliding
  ``window_seconds`` each new window is, in effect, a new test. Each canary is tested at level
  ``alpha`` on its own. Both versions need ``min_requests`` (else a hold, "insufficient_data";
  the same minimum as threshold mode: the statistic needs no other).
* Latency: canary p99 > stable p99 * (1 + ``latency_tolerance``) (default 0.5) with both at
  ``max(min_requests, latency_min_requests)`` requests (default 100: with fewer, a p99 is the
  window's slowest call or next to it). A plain comparison, not a sequential test.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import attrs

from relaymw.config import HealthCheck, Route, normalize_weights
from relaymw.metrics import MetricsRegistry, VersionMetrics

__all__ = [
    "Ejection",
    "Evaluation",
    "HealthChecker",
    "Note",
    "baseline_error_test",
    "msprt_log_lambda",
    "share_out",
]

log = logging.getLogger("relaymw.health")

ALPHA = 0.01
TAU2 = 0.003
LATENCY_TOLERANCE = 0.5
LATENCY_MIN_REQUESTS = 100

_RouteState = tuple[Route, Iterable[str]] | tuple[Route, Iterable[str], float | None]
Reason = Literal["error_rate", "latency_p99", "baseline_error_rate", "baseline_latency_p99"]


@attrs.frozen
class Ejection:
    """Eject ``version`` from ``route``; ``evidence`` holds the window's figures (JSON-ready)."""

    route: str
    version: str
    reason: Reason
    evidence: dict[str, Any] = attrs.field(hash=False)


@attrs.frozen
class Note:
    """No action: ``"last_version"`` (would be ejected but is the last eligible version),
    ``"insufficient_data"`` (fewer than the minimum of requests), ``"inconclusive"``
    (baseline: the test has not concluded)."""

    route: str
    version: str
    kind: Literal["last_version", "insufficient_data", "inconclusive"]
    evidence: dict[str, Any] = attrs.field(hash=False)


@attrs.frozen
class Evaluation:
    route: str
    ejections: tuple[Ejection, ...] = ()
    notes: tuple[Note, ...] = ()


def share_out(weights: Mapping[str, float], ejected: str) -> dict[str, float]:
    """``weights`` with ``ejected`` at 0 and its weight shared out in proportion among the
    others, rounded to 2 decimals and summing to 100 (the rounding residue goes to the
    largest). Raises ``ValueError`` when no other version has weight."""
    if ejected not in weights:
        raise KeyError(ejected)
    rest = [t for t in weights if t != ejected]
    if sum(weights[t] for t in rest) <= 0:
        raise ValueError(f"cannot eject {ejected!r}: no other version has weight")
    shared = dict(zip(rest, normalize_weights([weights[t] for t in rest]), strict=True))
    return {t: 0.0 if t == ejected else shared[t] for t in weights}


def _ll(errors: int, n: int, p: float) -> float:
    """Binomial log-likelihood (without the binomial coefficient)."""
    out = errors * math.log(p) if errors else 0.0
    return out + (n - errors) * math.log1p(-p) if n > errors else out


def msprt_log_lambda(
    n_stable: int, e_stable: int, n_canary: int, e_canary: int, tau2: float = TAU2
) -> float:
    """The log of the one-sided mSPRT statistic for "the canary's error rate is higher than
    the stable's" (see the module docstring); ``-inf`` when the canary does not look worse."""
    if n_stable <= 0 or n_canary <= 0 or e_canary * n_stable <= e_stable * n_canary:
        return -math.inf
    n = n_canary + n_stable
    pc, ps, pooled = e_canary / n_canary, e_stable / n_stable, (e_canary + e_stable) / n
    z2 = 2.0 * (
        _ll(e_canary, n_canary, pc)
        + _ll(e_stable, n_stable, ps)
        - _ll(e_canary, n_canary, pooled)
        - _ll(e_stable, n_stable, pooled)
    )
    p = (e_canary + e_stable + 1) / (n + 2)
    v = p * (1.0 - p) * (1.0 / n_canary + 1.0 / n_stable)
    shrink = tau2 / (v + tau2)
    w = math.sqrt(max(z2, 0.0) * shrink)
    return (
        math.log(2.0)
        + 0.5 * math.log1p(-shrink)
        + 0.5 * z2 * shrink
        + math.log(0.5 * math.erfc(-w / math.sqrt(2.0)))
    )


def baseline_error_test(
    n_stable: int,
    e_stable: int,
    n_canary: int,
    e_canary: int,
    alpha: float = ALPHA,
    tau2: float = TAU2,
) -> tuple[bool, float]:
    """``(reject, log_lambda)``: reject "canary error rate <= stable's" at level ``alpha``."""
    log_lambda = msprt_log_lambda(n_stable, e_stable, n_canary, e_canary, tau2)
    return log_lambda >= -math.log(alpha), log_lambda


def _figures(m: VersionMetrics) -> dict[str, Any]:
    return {
        "request_count": m.request_count,
        "error_count": m.error_count,
        "error_rate": m.error_rate,
        "latency_p50_ms": m.latency_p50_ms,
        "latency_p99_ms": m.latency_p99_ms,
    }


class HealthChecker:
    """Evaluates routes' health checks on a :class:`MetricsRegistry`'s windows."""

    def __init__(
        self,
        metrics: MetricsRegistry,
        *,
        interval_seconds: float = 0.5,
        alpha: float = ALPHA,
        tau2: float = TAU2,
        latency_tolerance: float = LATENCY_TOLERANCE,
        latency_min_requests: int = LATENCY_MIN_REQUESTS,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.metrics = metrics
        self.interval_seconds = interval_seconds
        self.alpha, self.tau2 = alpha, tau2
        self.latency_tolerance = latency_tolerance
        self.latency_min_requests = latency_min_requests
        self._clock = clock or metrics.clock  # default: the registry's
        self._due: dict[str, float] = {}
        self._lock = threading.Lock()

    def maybe_evaluate(
        self,
        route: Route,
        ejected: Iterable[str] = (),
        now: float | None = None,
        since: float | None = None,
    ) -> Evaluation | None:
        """:meth:`evaluate`, at most once per ``interval_seconds`` per route (None otherwise):
        cheap enough to call after every request."""
        t = self._clock() if now is None else now
        with self._lock:
            if t < self._due.get(route.model_alias, -math.inf):
                return None
            self._due[route.model_alias] = t + self.interval_seconds
        return self.evaluate(route, ejected, t, since)

    def evaluate(
        self,
        route: Route,
        ejected: Iterable[str] = (),
        now: float | None = None,
        since: float | None = None,
    ) -> Evaluation:
        """The decisions for ``route`` now; ``ejected`` are the tags already ejected. In
        baseline mode, ``since`` (epoch seconds: when the route's weights last changed) makes
        the window the current stage's whole life, up to the metrics' retention, instead of
        ``window_seconds``: the sequential test's guarantee is for counts that only grow."""
        hc = route.health_check
        out = set(ejected)
        weights = {r.version_tag: r.weight for r in route.route_rules if r.weight > 0}
        eligible = [t for t in weights if t not in out]
        if not hc.enabled or not eligible or (hc.mode == "baseline" and len(eligible) < 2):
            return Evaluation(route.model_alias)
        t = self._clock() if now is None else now
        seconds: float = hc.window_seconds
        if hc.mode == "baseline" and since is not None:
            seconds = max(0.0, min(t - since, self.metrics.retention_seconds))
        stats = {tag: self.metrics.window(route.model_alias, tag, seconds, t) for tag in eligible}
        if hc.mode == "baseline":
            return self._baseline(route.model_alias, hc, eligible, weights, stats, seconds)
        return self._threshold(route.model_alias, hc, eligible, weights, stats)

    def _threshold(
        self,
        alias: str,
        hc: HealthCheck,
        eligible: list[str],
        weights: dict[str, float],
        stats: dict[str, VersionMetrics],
    ) -> Evaluation:
        notes: list[Note] = []
        crossing: list[Ejection] = []
        for tag in eligible:
            m = stats[tag]
            evidence = _figures(m) | {
                "mode": "threshold",
                "error_rate_threshold": hc.error_rate_threshold,
                "latency_p99_threshold_ms": hc.latency_p99_threshold_ms,
                "min_requests": hc.min_requests,
                "window_seconds": hc.window_seconds,
            }
            if m.request_count < hc.min_requests:
                notes.append(Note(alias, tag, "insufficient_data", evidence))
            elif m.error_rate > hc.error_rate_threshold:
                crossing.append(Ejection(alias, tag, "error_rate", evidence))
            elif (
                hc.latency_p99_threshold_ms is not None
                and m.latency_p99_ms is not None
                and m.latency_p99_ms > hc.latency_p99_threshold_ms
            ):
                crossing.append(Ejection(alias, tag, "latency_p99", evidence))
        # Lowest weight first (stable order: rule order on ties), so the version kept when
        # every eligible one crosses is the highest-weight one.
        crossing.sort(key=lambda e: weights[e.version])
        ejections: list[Ejection] = []
        for e in crossing:
            if len(eligible) - len(ejections) > 1:
                ejections.append(e)
            else:
                notes.append(
                    Note(alias, e.version, "last_version", e.evidence | {"reason": e.reason})
                )
        return Evaluation(alias, tuple(ejections), tuple(notes))

    def _baseline(
        self,
        alias: str,
        hc: HealthCheck,
        eligible: list[str],
        weights: dict[str, float],
        stats: dict[str, VersionMetrics],
        seconds: float,
    ) -> Evaluation:
        stable = max(eligible, key=lambda t: weights[t])  # the first listed on a tie
        s = stats[stable]
        notes: list[Note] = []
        ejections: list[Ejection] = []
        latency_min = max(hc.min_requests, self.latency_min_requests)
        for tag in eligible:
            if tag == stable:
                continue
            c = stats[tag]
            reject, log_lambda = baseline_error_test(
                s.request_count,
                s.error_count,
                c.request_count,
                c.error_count,
                self.alpha,
                self.tau2,
            )
            evidence = _figures(c) | {
                "mode": "baseline",
                "stable_version": stable,
                **{f"stable_{k}": v for k, v in _figures(s).items()},
                "log_lambda": log_lambda,
                "log_threshold": -math.log(self.alpha),
                "alpha": self.alpha,
                "tau2": self.tau2,
                "latency_tolerance": self.latency_tolerance,
                "min_requests": hc.min_requests,
                "window_seconds": seconds,
            }
            if c.request_count < hc.min_requests or s.request_count < hc.min_requests:
                notes.append(Note(alias, tag, "insufficient_data", evidence))
            elif reject:
                ejections.append(Ejection(alias, tag, "baseline_error_rate", evidence))
            elif (
                min(c.request_count, s.request_count) >= latency_min
                and c.latency_p99_ms is not None
                and s.latency_p99_ms is not None
                and c.latency_p99_ms > s.latency_p99_ms * (1.0 + self.latency_tolerance)
            ):
                ejections.append(Ejection(alias, tag, "baseline_latency_p99", evidence))
            else:
                notes.append(Note(alias, tag, "inconclusive", evidence))
        return Evaluation(alias, tuple(ejections), tuple(notes))

    def run_in_background(
        self,
        routes: Callable[[], Iterable[_RouteState]],
        on_evaluation: Callable[[Evaluation], None],
    ) -> Callable[[], None]:
        """Evaluate ``routes()`` (``(route, ejected tags)`` or ``(route, ejected, since)``) every
        ``interval_seconds`` in a daemon thread, handing evaluations with ejections to
        ``on_evaluation``; returns a function that stops the thread. Use it when queries are
        not cheap (Redis), so the request path never waits on them."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self.interval_seconds):
                try:
                    for route, ejected, *since in routes():
                        ev = self.evaluate(route, ejected, since=since[0] if since else None)
                        if ev.ejections:
                            on_evaluation(ev)
                except Exception:
                    log.exception("relaymw: health check failed")

        threading.Thread(target=loop, name="relaymw-health", daemon=True).start()
        return stop.set
