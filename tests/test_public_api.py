"""The public names are a contract (SPEC §3): adding or removing one is a deliberate act."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import relaymw
import relaymw.signals
import relaymw.stores
import relaymw.testing


def test_top_level_names_are_pinned() -> None:
    assert sorted(relaymw.__all__) == [
        "ConfigError",
        "Relay",
        "RelayConfig",
        "RelayError",
        "RelayMiddleware",
        "RelayWSGIMiddleware",
        "VersionChoice",
        "current_version",
        "normalize_weights",
        "signals",
    ]
    for name in relaymw.__all__:
        assert getattr(relaymw, name) is not None


def test_stores_and_testing_names() -> None:
    assert {"FileStore", "Store", "open_store", "register_scheme"} <= set(relaymw.stores.__all__)
    assert "FakeLLM" in relaymw.testing.__all__


def test_every_spec_signal_exists() -> None:
    spec = [
        "version_selected",
        "request_finished",
        "rate_limited",
        "cost_limit_exceeded",
        "budget_threshold",
        "budget_exceeded",
        "upstream_error",
        "version_ejected",
        "weights_changed",
        "config_loaded",
        "config_rejected",
        "store_unavailable",
    ]
    for name in spec:
        assert name in relaymw.signals.__all__
        assert hasattr(getattr(relaymw.signals, name), "connect")


def python_ok(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` run in a fresh interpreter, which must exit 0."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_core_imports_no_web_framework() -> None:
    """The core and both adapters load without any web framework (or aiohttp's server)."""
    code = (
        "import sys, relaymw, relaymw.engine, relaymw.asgi, relaymw.wsgi, relaymw.stores;"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('starlette', 'fastapi', 'flask', 'django', 'uvicorn', 'werkzeug')"
        " or m == 'aiohttp.web'];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    python_ok(code)


def compiled_modules() -> list[str]:
    """The modules pyproject.toml has the mypyc build compile."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    with open(Path(__file__).parents[1] / "pyproject.toml", "rb") as f:
        hook = tomllib.load(f)["tool"]["hatch"]["build"]["targets"]["wheel"]["hooks"]["mypyc"]
    return [Path(path).stem for path in hook["include"]]


def test_hot_path_is_compiled_exactly_when_expected() -> None:
    """``tox -e compiled`` (RELAYMW_EXPECT_COMPILED=1) must import the mypyc build, and every
    other run the sources: a compiled module left in src/ by a build would shadow them."""
    import importlib

    expect = os.environ.get("RELAYMW_EXPECT_COMPILED") == "1"
    modules = {name: importlib.import_module(f"relaymw.{name}") for name in compiled_modules()}
    files = {name: module.__file__ or "" for name, module in modules.items()}
    assert len(files) >= 4
    wrong = {n: f for n, f in files.items() if f.endswith(".py") == expect}
    assert not wrong, f"expected {'compiled' if expect else 'source'} modules: {wrong}"


def test_imports_and_relays_without_the_redis_extra() -> None:
    """``pip install relaymw`` without ``[redis]``: redis-py is imported only for a redis://
    storage, so the package, its adapters and a relay on the default config all load."""
    code = (
        "import sys; sys.modules['redis'] = None; sys.modules['hiredis'] = None;"
        "import relaymw, relaymw.asgi, relaymw.wsgi, relaymw.limiting, relaymw.budgets;"
        "relay = relaymw.Relay(health=False, watch=False);"
        "print(sorted(relay.snapshot.routes))"
    )
    out = python_ok(code)
    assert out.stdout.startswith("[") and out.stdout.strip() != "[]", out.stdout
