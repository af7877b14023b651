"""The ``relaymw`` command line: ``validate`` and ``simulate`` (SPEC §8)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from relaymw import cli
from relaymw.cli import build_parser, main
from relaymw.config import parse_document

VALID = """
[upstreams.up]
base_url = "https://api.example.com/v1"
api_key = "${RELAYMW_CLI_TEST_KEY:-sk-test}"
protocol = "openai"

[[versions]]
version_tag = "v1"
model = "gpt-4.1"
upstream_endpoint = "up"

[[versions]]
version_tag = "v2"
model = "gpt-4.1-mini"
upstream_endpoint = "up"

[[versions]]
version_tag = "v3"
model = "gpt-4.1-nano"
upstream_endpoint = "up"

[[routes]]
model_alias = "review"
route_rules = [{ version_tag = "v1", weight = 95 }, { version_tag = "v2", weight = 5 }]
sticky_sessions = { key = "header:x-user-id" }

[[routes]]
model_alias = "chat"
route_rules = [{ version_tag = "v1", weight = 50 }, { version_tag = "v2", weight = 50 }]
"""

# Four independent problems: a bad tag, an unknown upstream, a weight sum, an unknown key.
INVALID = """
bogus = true

[upstreams.up]
base_url = "https://api.example.com/v1"

[[versions]]
version_tag = "Bad_Tag"
model = "m"
upstream_endpoint = "up"

[[versions]]
version_tag = "v1"
model = "m"
upstream_endpoint = "elsewhere"

[[routes]]
model_alias = "review"
route_rules = [{ version_tag = "v1", weight = 60 }, { version_tag = "v1", weight = 45 }]
"""


@pytest.fixture
def valid_file(tmp_path: Path) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(VALID)
    return path


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- validate ------------------------------------------------------------------------------------


def test_validate_valid_toml(valid_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(valid_file)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{valid_file}: valid (3 versions, 2 routes, 1 upstream)\n"
    assert err == ""


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_validate_valid_yaml_and_json(
    tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = parse_document(VALID, "toml")
    text = yaml.safe_dump(doc) if suffix == "yaml" else json.dumps(doc)
    path = write(tmp_path, f"relay.{suffix}", text)
    assert main(["validate", str(path)]) == 0
    assert "valid (3 versions, 2 routes, 1 upstream)" in capsys.readouterr().out


def test_validate_lists_every_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "relay.toml", INVALID)
    assert main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == f"{path}: invalid configuration (5 problems)"
    assert sorted(lines[1:]) == sorted(
        [
            "versions[0].version_tag: 'Bad_Tag' is not a valid version tag: use 1-64 lowercase "
            "letters, digits, '-' and '.', starting and ending with a letter or digit",
            "versions[1].upstream_endpoint: unknown upstream 'elsewhere' (known: up)",
            "routes[0].route_rules[1].version_tag: 'v1' is listed twice",
            "routes[0].route_rules[1].weight: weights sum to 105, not 100 "
            "(normalized: 57.14, 42.86)",
            "(document): extra fields found (bogus)",
        ]
    )


def test_validate_syntax_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "relay.toml", "[[versions]\nversion_tag = 1\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[1].startswith("(document): TOML syntax error: ")


def test_validate_multiline_syntax_error_stays_one_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "relay.yaml", "a: [1, 2\n")
    assert main(["validate", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[1].startswith("(document): YAML syntax error")
    # The parser's own continuation lines are indented under their entry.
    assert all(line.startswith("    ") for line in lines[2:])


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_validate_unreadable_file(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nope.toml" if kind == "missing" else tmp_path
    assert main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"relaymw: cannot read {path}: ")
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_validate_names_missing_env_var_but_not_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RELAYMW_CLI_SECRET", "sk-live-never-print-me")
    monkeypatch.delenv("RELAYMW_CLI_UNSET", raising=False)
    text = VALID.replace(
        'api_key = "${RELAYMW_CLI_TEST_KEY:-sk-test}"',
        'api_key = "${RELAYMW_CLI_SECRET}"\nanthropic_version = "${RELAYMW_CLI_UNSET}"',
    )
    path = write(tmp_path, "relay.toml", text)
    assert main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert (
        "upstreams.up.anthropic_version: environment variable RELAYMW_CLI_UNSET is not set" in err
    )
    assert "sk-live-never-print-me" not in out + err


# --- the parser ----------------------------------------------------------------------------------


def test_no_command_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: relaymw" in err
    assert "validate" in err and "simulate" in err


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import relaymw

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"relaymw {relaymw.__version__}"


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--requests" in out and "--set" in out and "--seed" in out


def test_commands_are_registered_by_small_functions(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # How other commands (serve, status, ...) plug in: append a registration function.
    def add_hello(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        p = sub.add_parser("hello")
        p.add_argument("name")
        p.set_defaults(handler=lambda args: print(f"hi {args.name}") or 7)

    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, add_hello])
    assert main(["hello", "you"]) == 7
    assert capsys.readouterr().out == "hi you\n"
    assert isinstance(build_parser(), argparse.ArgumentParser)


# --- simulate ------------------------------------------------------------------------------------

# A table row: tag, [old weight,] weight, share of requests, share of users.
ROW = re.compile(
    r"^  (?P<tag>\S+)\s+(?:(?P<old>[\d.]+)%\s+)?(?P<w>[\d.]+)%"
    r"\s+(?P<req>[\d.]+)%\s+(?P<users>[\d.]+)%$"
)
KEPT = re.compile(r"sticky users kept their version: (\d+)/(\d+) \(([\d.]+)%\); moved: (\d+)")


def sections(out: str) -> dict[str, list[re.Match[str]]]:
    """Table rows per section title (``route ALIAS`` or ``route ALIAS after --set ...``)."""
    result: dict[str, list[re.Match[str]]] = {}
    title = ""
    for line in out.splitlines():
        if line.startswith("route "):
            title = line
            result[title] = []
        elif (m := ROW.match(line)) is not None:
            result[title].append(m)
    return result


def test_simulate_split(valid_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", str(valid_file), "--requests", "100000", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("simulating 100000 requests from 10000 users per route (seed 1)\n")
    tables = sections(out)
    assert set(tables) == {"route review", "route chat"}
    for title, weights in (
        ("route review", {"v1": 95, "v2": 5}),
        ("route chat", {"v1": 50, "v2": 50}),
    ):
        rows = {m["tag"]: m for m in tables[title]}
        assert set(rows) == set(weights)
        for tag, w in weights.items():
            assert float(rows[tag]["w"]) == w
            assert abs(float(rows[tag]["req"]) - w) < 1.5
            assert abs(float(rows[tag]["users"]) - w) < 1.5
    # "chat" has no sticky key: the output says how it was simulated.
    assert "sticky by cookie" in out.split("route chat")[1]
    assert "sticky by cookie" not in out.split("route chat")[0]


def test_simulate_is_deterministic_with_a_seed(
    valid_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["simulate", str(valid_file), "--requests", "5000", "--seed", "42"]
    argv += ["--set", "review", "v1=75", "v2=25"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first
    assert main([*argv[:-5], "43", *argv[-4:]]) == 0
    assert capsys.readouterr().out != first


def test_simulate_default_users(valid_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", str(valid_file), "--requests", "250", "--seed", "0"]) == 0
    assert "250 requests from 25 users per route" in capsys.readouterr().out
    assert main(["simulate", str(valid_file), "-n", "5", "--seed", "0"]) == 0
    assert "5 requests from 1 user per route" in capsys.readouterr().out


def test_simulate_set_keeps_canary_users(
    valid_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["simulate", str(valid_file), "--requests", "50000", "--users", "5000", "--seed", "9"]
    argv += ["--set", "review", "v1=75", "v2=25"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    tables = sections(out)
    after = {m["tag"]: m for m in tables["route review after --set v1=75 v2=25"]}
    assert (float(after["v1"]["old"]), float(after["v1"]["w"])) == (95, 75)
    assert (float(after["v2"]["old"]), float(after["v2"]["w"])) == (5, 25)
    assert abs(float(after["v2"]["users"]) - 25) < 2
    m = KEPT.search(out)
    assert m is not None
    kept, users, pct, moved = int(m[1]), int(m[2]), float(m[3]), int(m[4])
    assert users == 5000 and kept + moved == users
    assert pct == round(100 * kept / users, 1)
    # Raising the last rule only moves users onto it: about 20% move, all v1 -> v2.
    assert abs(100 * moved / users - 20) < 2
    assert f"    v1 -> v2: {moved}" in out
    assert "v2 -> v1" not in out
    # Routes without --set get no "after" table.
    assert not any(t.startswith("route chat after") for t in tables)


def test_simulate_set_adds_a_new_version_last(
    valid_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["simulate", str(valid_file), "--requests", "20000", "--seed", "3"]
    argv += ["--set", "chat", "v1=45", "v2=45", "v3=10"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = sections(out)["route chat after --set v1=45 v2=45 v3=10"]
    assert [m["tag"] for m in rows] == ["v1", "v2", "v3"]
    assert float(rows[2]["old"]) == 0 and float(rows[2]["w"]) == 10
    assert "v3 ->" not in out  # nobody had v3 before, so nobody left it


def test_simulate_set_twice_for_two_routes(
    valid_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["simulate", str(valid_file), "-n", "2000", "--seed", "3"]
    argv += ["--set", "chat", "v1=100", "v2=0", "--set", "review", "v1=0", "v2=100"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    kept = [(int(m[1]), int(m[2])) for m in KEPT.finditer(out)]
    assert len(kept) == 2
    chat_after = {m["tag"]: m for m in sections(out)["route chat after --set v1=100 v2=0"]}
    assert float(chat_after["v1"]["req"]) == 100 and float(chat_after["v2"]["req"]) == 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (["review", "v1=60", "v2=45"], "sum to 105, not 100 (normalized: v1=57.14, v2=42.86)"),
        (["review", "v2=25"], "the weights sum to 120, not 100 (normalized: v1=79.17, v2=20.83)"),
        (["nope", "v1=100"], "unknown route 'nope' (known: chat, review)"),
        (["review", "v9=100"], "unknown version tag 'v9'"),
        (["review", "v1"], "expected TAG=WEIGHT, got 'v1'"),
        (["review", "=5"], "expected TAG=WEIGHT, got '=5'"),
        (["review", "v1=lots"], "the weight is not a number"),
        (["review", "v1=105", "v2=-5"], "the weight must be a finite number >= 0"),
        (["review", "v1=nan"], "the weight must be a finite number >= 0"),
        (["review"], "give at least one TAG=WEIGHT"),
    ],
)  # fmt: skip
def test_simulate_bad_set(
    valid_file: Path, changes: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", str(valid_file), "-n", "10", "--set", *changes]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("relaymw simulate: --set")
    assert message in err


def test_simulate_invalid_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "relay.toml", INVALID)
    assert main(["simulate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration (5 problems)" in err
    assert "routes[0].route_rules[1].weight: weights sum to 105" in err


def test_simulate_without_routes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "norules.toml", "[gateway]\nenabled = true\n")
    assert main(["simulate", str(path)]) == 2
    assert "no routes to simulate" in capsys.readouterr().err


def test_an_empty_document_is_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "empty.toml", "")
    assert main(["validate", str(path)]) == 2
    assert "the document is empty" in capsys.readouterr().err


@pytest.mark.parametrize("arg", [["--requests", "0"], ["--users", "-1"], ["--requests", "x"]])
def test_simulate_bad_counts(
    valid_file: Path, arg: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", str(valid_file), *arg]) == 2
    assert "error: argument" in capsys.readouterr().err


# --- the installed console script ----------------------------------------------------------------


def console_script() -> str:
    found = shutil.which("relaymw") or os.path.join(os.path.dirname(sys.executable), "relaymw")
    if not os.path.exists(found):
        pytest.skip("the relaymw console script is not installed")
    return found


def test_console_script(valid_file: Path, tmp_path: Path) -> None:
    script = console_script()
    ok = subprocess.run(
        [script, "validate", str(valid_file)], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"{valid_file}: valid (3 versions, 2 routes, 1 upstream)"

    bad = write(tmp_path, "bad.toml", INVALID)
    failed = subprocess.run(
        [script, "validate", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert failed.returncode == 2
    assert failed.stdout == ""
    assert "versions[1].upstream_endpoint: unknown upstream 'elsewhere'" in failed.stderr
    assert "Traceback" not in failed.stderr
