"""The operator commands: ``status``, ``set-weights``, ``rollback`` and ``rollout`` (SPEC §8).

Each acts on a store directly (``--config FILE|URI``) or on a running admin API (``--admin URL
--token TOKEN``) through a :class:`~relaymw.control.ReleaseControl`. :mod:`relaymw.cli`
registers them; a rollout's live view is :mod:`relaymw.rollout_view`'s.

Exit codes: 0 done, 1 a failure (store or admin API unreachable, refused token), 2 bad usage
(unknown route or tag, weights not summing to 100), 3 a rollout rolled back, 4 a rollout
stopped because its weights were changed by someone else, 130 interrupted (the rollout's
state is kept: run the same command again to resume).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from relaymw.cli import EXIT_OK, EXIT_USAGE, UsageError, _fmt_weight, _table, int_at_least
from relaymw.control import AdminControl, ControlError, Figures, RelayControl, ReleaseControl
from relaymw.errors import RelayError
from relaymw.rollout import (
    Criteria,
    Plan,
    RolloutController,
    RolloutState,
    parse_interval,
    parse_stages,
    state_name,
)
from relaymw.rollout_view import LiveReporter, PlainReporter, clock_text

if TYPE_CHECKING:
    from relaymw.cli import SubParsers

__all__ = ["add_rollback", "add_rollout", "add_set_weights", "add_status"]

EXIT_FAILURE = 1
EXIT_ROLLED_BACK = 3
EXIT_ABORTED = 4
EXIT_INTERRUPTED = 130
TOKEN_ENV = "RELAYMW_ADMIN_TOKEN"


# --- where to act ----------------------------------------------------------------------------


def _target_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where to act (one of)")
    g.add_argument(
        "--config", metavar="FILE|URI",
        help="the configuration store itself: a settings file, redis://...?key=... (serving "
        "processes pick changes up from it)",
    )  # fmt: skip
    g.add_argument(
        "--admin", metavar="URL",
        help="a running admin API, e.g. http://127.0.0.1:8080/relay-admin",
    )  # fmt: skip
    g.add_argument(
        "--token", metavar="TOKEN",
        help=f"the admin API's bearer token (default: the {TOKEN_ENV} environment variable)",
    )  # fmt: skip


def _open(args: argparse.Namespace) -> ReleaseControl:
    if bool(args.config) == bool(args.admin):
        raise UsageError("give either --config FILE|URI or --admin URL")
    if args.admin:
        token = args.token or os.environ.get(TOKEN_ENV)
        if not token:
            raise UsageError(f"--admin needs a token: --token TOKEN or {TOKEN_ENV}")
        return AdminControl(args.admin, token)
    try:
        return RelayControl.open(args.config)
    except (OSError, RelayError) as exc:
        raise UsageError(f"cannot open {args.config}: {exc}") from exc


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name in this environment (getpass raises various errors)
        return "cli"


def _run(name: str, args: argparse.Namespace, body: Callable[[ReleaseControl], int]) -> int:
    """Open the target, run ``body`` and turn refusals into messages and exit codes."""
    try:
        control = _open(args)
    except UsageError as exc:
        print(f"relaymw {name}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return body(control)
    except UsageError as exc:
        print(f"relaymw {name}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ControlError as exc:
        print(f"relaymw {name}: {exc}", file=sys.stderr)
        return EXIT_USAGE if exc.usage else EXIT_FAILURE
    finally:
        control.close()


def _weights_text(rules: Any) -> str:
    return " ".join(f"{t}={_fmt_weight(w)}" for t, w in rules)


def _duration(text: str) -> float:
    try:
        return parse_interval(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --- status ----------------------------------------------------------------------------------


def add_status(sub: SubParsers) -> None:
    p = sub.add_parser(
        "status",
        help="routes, weights and each version's metrics and health",
        description="Show each route's rules and weights, ejected versions, each version's "
        "figures over --window (requests, error rate, p50/p99 latency, cost per million "
        "tokens) and its health against the route's health_check thresholds, and the "
        "route's rollout if one was run. With --config, figures are the serving workers' "
        "only when [metrics] storage_uri is redis (otherwise this process has none).",
    )
    p.add_argument("alias", nargs="?", metavar="ALIAS", help="one route (default: all)")
    _target_options(p)
    p.add_argument(
        "--window", type=_duration, default=3600.0, metavar="DURATION",
        help="how far back the figures go: 30s, 10m, 1h ... (default: 1h)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(handler=_cmd_status)


def _health(figures: Figures, check: dict[str, Any], ejected: bool) -> str:
    if ejected:
        return "ejected"
    if not check.get("enabled"):
        return "-"
    if figures.request_count < int(check.get("min_requests") or 0):
        return "too few requests"
    threshold = check.get("error_rate_threshold")
    if threshold is not None and figures.error_rate > float(threshold):
        return "failing: error rate"
    p99_limit = check.get("latency_p99_threshold_ms")
    p99 = figures.latency_p99_ms
    if p99_limit is not None and p99 is not None and p99 > float(p99_limit):
        return "failing: p99"
    return "ok"


def _status_report(control: ReleaseControl, alias: str | None, window: float) -> dict[str, Any]:
    views = [control.route(alias)] if alias else control.routes()
    end = time.time()
    start = end - window
    routes = []
    for view in views:
        versions = []
        for tag, weight in view.rules:
            figures = control.figures(tag, start, end, view.alias)
            out = tag in view.ejected
            versions.append(
                {
                    "version_tag": tag,
                    "weight": weight,
                    "ejected": out,
                    "health": _health(figures, view.health_check, out),
                    "metrics": figures.as_dict(),
                }
            )
        routes.append(
            {
                "model_alias": view.alias,
                "active_version": view.active_version,
                "health_check": view.health_check,
                "versions": versions,
                "rollout": control.read_state(state_name(view.alias)),
            }
        )
    return {
        "source": control.describe(),
        "window_seconds": window,
        "metrics_note": control.metrics_note,
        "routes": routes,
    }


_STATUS_COLUMNS = ("version", "weight", "requests", "error rate", "p50", "p99", "cost/Mtok")


def _version_cells(v: dict[str, Any]) -> list[str]:
    m = v["metrics"]
    n = m["request_count"]
    ms = [("-" if m[k] is None else f"{m[k]:.0f} ms") for k in ("latency_p50_ms", "latency_p99_ms")]
    per_mtok = float(m["cost_per_token"]) * 1_000_000
    return [
        v["version_tag"] + (" (ejected)" if v["ejected"] else ""),
        f"{_fmt_weight(v['weight'])}%",
        str(n),
        f"{m['error_rate']:.1%}" if n else "-",
        *ms,
        f"${per_mtok:.2f}" if n else "-",
    ]


def rollout_line(state: dict[str, Any], now: float | None = None) -> str:
    """One line about a route's stored rollout."""
    try:
        s = RolloutState.from_dict(state)
    except (TypeError, KeyError, ValueError):
        return "rollout: (unreadable state)"
    head = f"rollout to {s.to} ({s.status})"
    if s.status != "running":
        return f"{head}: {s.reason}"
    stage = f"stage {s.stage_index + 1}/{len(s.stages)} at {_fmt_weight(s.weight)}%"
    if s.stage_started_at is None:
        return f"{head}: {stage}, being applied"
    elapsed = (now or time.time()) - s.stage_started_at
    return f"{head}: {stage}, {clock_text(elapsed)} into the stage (interval " + (
        f"{clock_text(s.interval_seconds)}); resume with the same command if it is not running"
    )


def _print_plain(report: dict[str, Any]) -> None:
    lines: list[str] = []
    for r in report["routes"]:
        lines.append(f"route {r['model_alias']} (active: {r['active_version']})")
        rows = [[*_version_cells(v), v["health"]] for v in r["versions"]]
        lines += _table([*_STATUS_COLUMNS, "health"], rows)
        if r["rollout"]:
            lines.append("  " + rollout_line(r["rollout"]))
        lines.append("")
    lines.append(_footer(report))
    print("\n".join(lines))


def _footer(report: dict[str, Any]) -> str:
    text = f"figures: the last {clock_text(report['window_seconds'])}, from {report['source']}"
    if report["metrics_note"]:
        text += f"\nnote: {report['metrics_note']}"
    return text


def _print_rich(report: dict[str, Any]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    colours = {"ok": "green", "-": "dim", "too few requests": "yellow"}
    for r in report["routes"]:
        title = Text(f"{r['model_alias']} (active: {r['active_version']})")
        table = Table(title=title, box=box.SIMPLE_HEAD)
        for col in (*_STATUS_COLUMNS, "health"):
            left = col in ("version", "health")
            table.add_column(col, justify="left" if left else "right", no_wrap=col == "version")
        for v in r["versions"]:
            cells = [Text(c) for c in _version_cells(v)]
            table.add_row(*cells, Text(v["health"], style=colours.get(v["health"], "red")))
        console.print(table)
        if r["rollout"]:
            console.print(Text("  " + rollout_line(r["rollout"])))
    console.print(Text(_footer(report), style="dim"))


def _cmd_status(args: argparse.Namespace) -> int:
    def body(control: ReleaseControl) -> int:
        report = _status_report(control, args.alias, args.window)
        if args.json:
            print(json.dumps(report, indent=2, default=str))
        elif sys.stdout.isatty() and _has_rich():
            _print_rich(report)
        else:
            _print_plain(report)
        return EXIT_OK

    return _run("status", args, body)


def _has_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


# --- set-weights and rollback ----------------------------------------------------------------


def add_set_weights(sub: SubParsers) -> None:
    p = sub.add_parser(
        "set-weights",
        help="set a route's weights",
        description="Set the named versions' weights on a route; rules not named keep "
        "theirs, a version not yet in the route is added last (the canary's place, which "
        "keeps stickiness). The result must sum to 100. The change is validated, written "
        "to the store (or sent to the admin API) and recorded in the change log.",
    )
    p.add_argument("alias", metavar="ALIAS")
    p.add_argument("pairs", nargs="+", metavar="TAG=W")
    _target_options(p)
    p.set_defaults(handler=_cmd_set_weights)


def _parse_weights(pairs: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for text in pairs:
        tag, sep, weight = text.partition("=")
        try:
            w = float(weight)
        except ValueError:
            w = float("nan")
        if not sep or not tag or not (0 <= w < float("inf")):
            raise UsageError(f"expected TAG=WEIGHT with a weight >= 0, got {text!r}")
        out[tag] = w
    return out


def _cmd_set_weights(args: argparse.Namespace) -> int:
    def body(control: ReleaseControl) -> int:
        weights = _parse_weights(args.pairs)
        before = control.route(args.alias)
        after = control.set_weights(args.alias, weights, actor=_actor(), action="set-weights")
        print(
            f"{args.alias}: {_weights_text(after.rules)} (was {_weights_text(before.rules)}; "
            f"active: {after.active_version})"
        )
        return EXIT_OK

    return _run("set-weights", args, body)


def add_rollback(sub: SubParsers) -> None:
    p = sub.add_parser(
        "rollback",
        help="send all of a route's traffic to one version",
        description="Set TAG to 100 and every other rule of the route to 0, now.",
    )
    p.add_argument("alias", metavar="ALIAS")
    p.add_argument("tag", metavar="TAG")
    _target_options(p)
    p.set_defaults(handler=_cmd_rollback)


def _cmd_rollback(args: argparse.Namespace) -> int:
    def body(control: ReleaseControl) -> int:
        after = control.rollback(args.alias, args.tag, actor=_actor())
        print(f"{args.alias}: rolled back to {args.tag}: {_weights_text(after.rules)}")
        return EXIT_OK

    return _run("rollback", args, body)


# --- rollout ---------------------------------------------------------------------------------


def _error_rate(text: str) -> float | None:
    if text.lower() in ("off", "none"):
        return None
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (e.g. 0.05 or 5%)") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a rate is between 0 and 1 (or 0% and 100%): {text!r}")
    return value


def _milliseconds(text: str) -> float | None:
    if text.lower() in ("off", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of milliseconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value


def _stages(text: str) -> tuple[float, ...]:
    try:
        return parse_stages(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_rollout(sub: SubParsers) -> None:
    p = sub.add_parser(
        "rollout",
        help="ramp a canary stage by stage while its metrics pass; roll back when not",
        description="Set the canary TAG's weight to each stage in turn (the other rules share "
        "the rest in their current proportions), wait --interval, and analyse the canary's "
        "figures since the stage started: hold while it has fewer than --min-requests, "
        "advance when every limit passes, and on a failure roll back (the canary to 0, the "
        "others to their weights before the rollout), say why and exit 3. The state is kept "
        "in the store: after Ctrl-C, the same command resumes the stage where it was.",
    )
    p.add_argument("alias", metavar="ALIAS")
    p.add_argument("--to", required=True, metavar="TAG", help="the canary version")
    p.add_argument(
        "--stages", type=_stages, default=(5.0, 25.0, 50.0, 100.0), metavar="W,W,...",
        help="the canary's weight at each stage (default: 5,25,50,100)",
    )  # fmt: skip
    p.add_argument(
        "--interval", type=_duration, default=600.0, metavar="DURATION",
        help="how long each stage runs before it is analysed: 30s, 10m, 1h or seconds "
        "(default: 10m)",
    )  # fmt: skip
    p.add_argument(
        "--max-error-rate", type=_error_rate, default=0.05, metavar="R",
        help="fail above this error rate: 0.05 or 5%%; off to disable (default: 0.05)",
    )  # fmt: skip
    p.add_argument(
        "--max-p99-ms", type=_milliseconds, default=None, metavar="M",
        help="fail above this p99 latency in milliseconds (default: no limit)",
    )  # fmt: skip
    p.add_argument(
        "--baseline", action="store_true",
        help="also fail when the canary is worse than the stable version over the same "
        "window (a sequential error-rate test, and p99 more than 1.5x the stable's)",
    )  # fmt: skip
    p.add_argument(
        "--min-requests", type=int_at_least(0), default=100, metavar="N",
        help="hold a stage until the canary (and, with --baseline, the stable version) has "
        "N requests in it (default: 100)",
    )  # fmt: skip
    p.add_argument(
        "--reset", action="store_true",
        help="abandon a saved rollout of this route instead of resuming it",
    )  # fmt: skip
    p.add_argument("--plain", action="store_true", help="print lines instead of a live view")
    _target_options(p)
    p.set_defaults(handler=_cmd_rollout)


def _cmd_rollout(args: argparse.Namespace) -> int:
    criteria = Criteria(args.max_error_rate, args.max_p99_ms, args.baseline, args.min_requests)
    plan = Plan(args.alias, args.to, args.stages, args.interval, criteria)
    live = not args.plain and sys.stdout.isatty() and _has_rich()

    def body(control: ReleaseControl) -> int:
        reporter = LiveReporter() if live else PlainReporter()
        controller = RolloutController(control, plan, reporter, reset=args.reset)
        try:
            with reporter:
                state = controller.run()
        except KeyboardInterrupt:
            s = controller.state
            where = f" at stage {s.stage_index + 1}/{len(s.stages)}" if s else ""
            print(
                f"\nrelaymw rollout: interrupted{where}; its state is kept in "
                f"{control.describe()}: run the same command again to resume",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
        return {"succeeded": EXIT_OK, "rolled_back": EXIT_ROLLED_BACK}.get(
            state.status, EXIT_ABORTED
        )

    return _run("rollout", args, body)
