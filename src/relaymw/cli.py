"""The ``relaymw`` command line (SPEC §8).

Each subcommand is registered by a small ``_add_<name>(sub)`` function that adds its parser
and sets ``handler`` to a function taking the parsed arguments and returning an exit code;
add new commands to :data:`COMMANDS`. ``main`` returns the exit code instead of exiting so
that tests and embedding code can call it in-process.

Exit codes: 0 success, 1 an unexpected failure, 2 bad usage or an invalid configuration;
``rollout`` adds 3 (rolled back), 4 (stopped by someone else's weight change) and 130
(interrupted, state kept): see :mod:`relaymw.release_cli`.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from relaymw.config import RelayConfig, build_config, load_document, normalize_weights
from relaymw.errors import ConfigError, ConfigIssue
from relaymw.routing import RouteTable

__all__ = ["COMMANDS", "build_parser", "main"]

EXIT_OK = 0
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]
if TYPE_CHECKING:
    # What a registration function receives: the object ``add_subparsers()`` returns (not
    # subscriptable at run time, hence only for the type checker).
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


class UsageError(Exception):
    """A problem with the command's arguments or input, reported without a traceback."""


# --- shared helpers ------------------------------------------------------------------------------


def _issue_line(issue: ConfigIssue) -> str:
    # A YAML syntax error spans several lines; indent the rest so each issue stays one entry.
    path = issue.path or "(document)"
    return f"{path}: " + issue.message.replace("\n", "\n    ")


def _print_issues(issues: Sequence[ConfigIssue], out: TextIO) -> None:
    for issue in issues:
        print(_issue_line(issue), file=out)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _fmt_weight(w: float) -> str:
    return f"{w:.2f}".rstrip("0").rstrip(".")


def _read_config(path: str) -> tuple[dict[str, Any], RelayConfig] | int:
    """Load ``path`` or report why not on stderr and return the exit code."""
    try:
        doc = load_document(path)
        return doc, build_config(doc)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(f"relaymw: cannot read {path}: {reason}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(
            f"{path}: invalid configuration ({_plural(len(exc.issues), 'problem')})",
            file=sys.stderr,
        )
        _print_issues(exc.issues, sys.stderr)
        return EXIT_USAGE


# --- validate ------------------------------------------------------------------------------------


def _add_validate(sub: SubParsers) -> None:
    p = sub.add_parser(
        "validate",
        help="check a configuration file and list every problem",
        description="Check a configuration file (TOML, YAML or JSON by suffix). `${ENV}` "
        "references are resolved from the environment, so unset secrets are reported too. "
        "Every problem is listed as `path: message`, one per line, on stderr.",
    )
    p.add_argument("file", metavar="FILE", help="the settings file")
    p.set_defaults(handler=_cmd_validate)


def _cmd_validate(args: argparse.Namespace) -> int:
    loaded = _read_config(args.file)
    if isinstance(loaded, int):
        return loaded
    _, config = loaded
    print(
        f"{args.file}: valid ({_plural(len(config.versions), 'version')}, "
        f"{_plural(len(config.routes), 'route')}, "
        f"{_plural(len(config.upstreams), 'upstream')})"
    )
    return EXIT_OK


# --- simulate ------------------------------------------------------------------------------------


def int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type=`` for integers ``>= minimum`` (and ``<= maximum``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return value

    return parse


_positive_int = int_at_least(1)


def _add_simulate(sub: SubParsers) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate traffic: the realised split, and stickiness across weight changes",
        description="Send N simulated requests per route from U users, each user a sticky "
        "key assigned exactly as `sticky_sessions.key` assigns it, and print each version's "
        "configured weight against its realised share. With --set, apply new weights and "
        "report the new split and how many users kept their version.",
    )
    p.add_argument("file", metavar="FILE", help="the settings file")
    p.add_argument(
        "--requests", "-n", type=_positive_int, default=10_000, metavar="N",
        help="requests per route (default: 10000)",
    )  # fmt: skip
    p.add_argument(
        "--users", "-u", type=_positive_int, default=None, metavar="U",
        help="distinct users per route (default: N // 10, at least 1)",
    )  # fmt: skip
    p.add_argument(
        "--set", dest="changes", action="append", nargs="+", default=[],
        metavar=("ALIAS", "TAG=W"),
        help="new weights for a route, e.g. --set code-review-production v1=75 v2=25; "
        "rules not named keep their weight, a version not yet in the route is added last, "
        "and the result must sum to 100 (repeatable)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=None, metavar="S", help="random seed")
    p.set_defaults(handler=_cmd_simulate)


def _parse_pair(alias: str, text: str) -> tuple[str, float]:
    tag, sep, weight = text.partition("=")
    if not sep or not tag:
        raise UsageError(f"--set {alias}: expected TAG=WEIGHT, got {text!r}")
    try:
        w = float(weight)
    except ValueError:
        raise UsageError(f"--set {alias}: {text!r}: the weight is not a number") from None
    if not (w >= 0 and w != float("inf")):  # also rejects NaN
        raise UsageError(f"--set {alias}: {text!r}: the weight must be a finite number >= 0")
    return tag, w


def _apply_changes(
    doc: dict[str, Any], config: RelayConfig, changes: Sequence[Sequence[str]]
) -> tuple[RelayConfig, dict[str, list[tuple[str, float]]]]:
    """Apply ``--set`` changes to a copy of ``doc`` and validate it like any document.

    Returns the new configuration and, per changed alias, the pairs as given.
    """
    new_doc = copy.deepcopy(doc)
    index = {r.model_alias: i for i, r in enumerate(config.routes)}
    known_tags = {v.version_tag for v in config.versions}
    given: dict[str, list[tuple[str, float]]] = {}
    for change in changes:
        alias, *pairs = change
        if alias not in index:
            known = ", ".join(sorted(index)) or "none"
            raise UsageError(f"--set: unknown route {alias!r} (known: {known})")
        if not pairs:
            raise UsageError(f"--set {alias}: give at least one TAG=WEIGHT")
        rules: list[dict[str, Any]] = new_doc["routes"][index[alias]]["route_rules"]
        for tag, weight in (_parse_pair(alias, p) for p in pairs):
            if tag not in known_tags:
                raise UsageError(f"--set {alias}: unknown version tag {tag!r}")
            for rule in rules:
                if rule.get("version_tag") == tag:
                    rule["weight"] = weight
                    break
            else:
                # A new version goes last: the canary position, which keeps stickiness.
                rules.append({"version_tag": tag, "weight": weight})
            given.setdefault(alias, []).append((tag, weight))
        total = sum(float(r["weight"]) for r in rules)
        if abs(total - 100) > 0.01:
            shown = ", ".join(
                f"{r['version_tag']}={_fmt_weight(w)}"
                for r, w in zip(
                    rules, normalize_weights([float(r["weight"]) for r in rules]), strict=True
                )
            )
            raise UsageError(
                f"--set {alias}: the weights sum to {_fmt_weight(total)}, not 100 "
                f"(normalized: {shown})"
            )
    # The same validation as any document, so nothing --set produces could not be loaded.
    return build_config(new_doc), given


def _route_weights(config: RelayConfig) -> dict[str, list[tuple[str, float]]]:
    return {
        r.model_alias: [(x.version_tag, x.weight) for x in r.route_rules] for r in config.routes
    }


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = []
    for row in (header, *rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "-"


def _cmd_simulate(args: argparse.Namespace) -> int:
    loaded = _read_config(args.file)
    if isinstance(loaded, int):
        return loaded
    doc, config = loaded
    if not config.routes:
        print(f"{args.file}: no routes to simulate", file=sys.stderr)
        return EXIT_USAGE
    try:
        new_config, given = _apply_changes(doc, config, args.changes)
    except UsageError as exc:
        print(f"relaymw simulate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print("relaymw simulate: the new weights are invalid:", file=sys.stderr)
        _print_issues(exc.issues, sys.stderr)
        return EXIT_USAGE

    n_requests: int = args.requests
    n_users: int = args.users if args.users is not None else max(1, n_requests // 10)
    old_weights, new_weights = _route_weights(config), _route_weights(new_config)
    rng = random.Random(args.seed)
    out: list[str] = [
        f"simulating {_plural(n_requests, 'request')} from {_plural(n_users, 'user')} per route"
        + (f" (seed {args.seed})" if args.seed is not None else "")
    ]
    for route in config.routes:
        alias = route.model_alias
        # Users are random ids, so that another seed is another population; each request
        # comes from a random user, as real traffic would.
        users = [f"user-{rng.getrandbits(64):016x}" for _ in range(n_users)]
        requests = [rng.randrange(n_users) for _ in range(n_requests)]
        table = RouteTable.build(alias, old_weights[alias])
        before = [table.for_key(u) for u in users]
        out.append("")
        out.append(f"route {alias}")
        if not route.sticky_sessions.key:
            # Without a key the route is sticky by cookie: a live cookie keeps its version
            # through any weight change that leaves it eligible. Keys show the worst case.
            out.append("  (sticky by cookie; users simulated with sticky keys)")
        out.extend(_split_lines(old_weights[alias], before, requests))
        if alias not in given:
            continue
        new_table = RouteTable.build(alias, new_weights[alias])
        after = [new_table.for_key(u) for u in users]
        pairs = " ".join(f"{t}={_fmt_weight(w)}" for t, w in given[alias])
        out.append("")
        out.append(f"route {alias} after --set {pairs}")
        out.extend(_split_lines(new_weights[alias], after, requests, old=old_weights[alias]))
        kept = sum(a == b for a, b in zip(before, after, strict=True))
        moved = n_users - kept
        out.append(
            f"  sticky users kept their version: {kept}/{n_users} "
            f"({100 * kept / n_users:.1f}%); moved: {moved}"
        )
        moves = Counter((a, b) for a, b in zip(before, after, strict=True) if a != b)
        for (a, b), n in sorted(moves.items(), key=lambda kv: (-kv[1], kv[0])):
            out.append(f"    {a} -> {b}: {n}")
    print("\n".join(out))
    return EXIT_OK


def _split_lines(
    weights: Sequence[tuple[str, float]],
    assigned: Sequence[str],
    requests: Sequence[int],
    old: Sequence[tuple[str, float]] | None = None,
) -> list[str]:
    by_request = Counter(assigned[u] for u in requests)
    by_user = Counter(assigned)
    previous: Mapping[str, float] = dict(old or ())
    header = [
        "version",
        *(["old weight"] if old is not None else []),
        "weight",
        "requests",
        "users",
    ]
    rows = []
    for tag, w in weights:
        row = [tag]
        if old is not None:
            row.append(f"{_fmt_weight(previous.get(tag, 0.0))}%")
        row += [
            f"{_fmt_weight(w)}%",
            _pct(by_request[tag], len(requests)),
            _pct(by_user[tag], len(assigned)),
        ]
        rows.append(row)
    return _table(header, rows)


# --- serve and demo ------------------------------------------------------------------------------


def _add_serve(sub: SubParsers) -> None:
    p = sub.add_parser(
        "serve",
        help="run a standalone gateway",
        description="Run a standalone gateway under uvicorn. Without --config it serves the "
        "embedded default configuration against a FakeLLM it starts itself.",
    )
    p.add_argument("--config", metavar="FILE|URI", help="a settings file or store URI")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--admin-token",
        metavar="TOKEN",
        help="also serve the version-control API under /admin with this bearer token "
        "(default: $RELAYMW_ADMIN_TOKEN; name several with "
        "$RELAYMW_ADMIN_TOKENS='alice=TOKEN,ci=TOKEN'); prefer the environment, "
        "a command line shows in ps",
    )
    p.set_defaults(handler=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from relaymw.errors import RelayError
    from relaymw.serve import serve

    try:
        serve(args.config, args.host, args.port, admin_token=args.admin_token)
    except RelayError as exc:
        print(f"relaymw: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _add_demo(sub: SubParsers) -> None:
    p = sub.add_parser(
        "demo",
        help="a whole 5→25→50→100%% rollout on a local FakeLLM, in under a minute",
        description="FakeLLM, an app with the middleware and simulated users, while the "
        "rollout controller (as `relaymw rollout` runs it) ramps the canary 5 → 25 → 50 → "
        "100% through the config store, analysing each stage; a live table shows each "
        "version's requests, error rate, latency and cost.",
    )
    p.add_argument(
        "--users",
        type=int_at_least(20, 10_000),  # relaymw.demo.MIN_USERS, and one per bucket at most
        default=40,
        help="simulated users, 20 to 10000 (20 puts one on the 5%% canary; default 40)",
    )
    p.add_argument(
        "--stage-seconds", type=float, default=10.0, help="seconds per ramp stage (default 10)"
    )
    p.add_argument("--plain", action="store_true", help="print lines instead of a live table")
    p.set_defaults(handler=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from relaymw.demo import run_demo

    run_demo(args.users, args.stage_seconds, live=False if args.plain else None)
    return EXIT_OK


# --- operating a release: status, set-weights, rollback, rollout --------------------------------
# Defined in relaymw.release_cli, imported when the parser is built (that module imports this
# one's helpers).


def _add_status(sub: SubParsers) -> None:
    from relaymw.release_cli import add_status

    add_status(sub)


def _add_set_weights(sub: SubParsers) -> None:
    from relaymw.release_cli import add_set_weights

    add_set_weights(sub)


def _add_rollback(sub: SubParsers) -> None:
    from relaymw.release_cli import add_rollback

    add_rollback(sub)


def _add_rollout(sub: SubParsers) -> None:
    from relaymw.release_cli import add_rollout

    add_rollout(sub)


# --- entry point ---------------------------------------------------------------------------------

COMMANDS: list[Callable[[SubParsers], None]] = [
    _add_validate,
    _add_simulate,
    _add_serve,
    _add_demo,
    _add_status,
    _add_set_weights,
    _add_rollback,
    _add_rollout,
]


def build_parser() -> argparse.ArgumentParser:
    from relaymw import __version__

    parser = argparse.ArgumentParser(
        prog="relaymw",
        description="Gray releases and cost control for LLM traffic.",
    )
    parser.add_argument("--version", action="version", version=f"relaymw {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `relaymw simulate ... | head`: stop quietly, and keep Python from complaining
        # about the closed stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
