"""The rollout controller end to end: live traffic from the openai SDK through a real server
(uvicorn, RelayMiddleware, the admin API mounted beside it) to FakeLLM, while the controller
ramps a canary through RelayControl (in process) or AdminControl (over HTTP)."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from relaymw import Relay, RelayMiddleware
from relaymw.control import AdminControl, ControlError, Figures, RelayControl, ReleaseControl
from relaymw.rollout import (
    Criteria,
    Plan,
    RolloutController,
    RolloutState,
    analyse,
    parse_interval,
    parse_stages,
    state_name,
)
from relaymw.rollout_view import PlainReporter
from relaymw.stores import FileStore
from relaymw.stores.file import dump_document
from relaymw.testing import FakeLLM, serve_asgi
from tests.rollout_support import ALIAS, CANARY, CANARY_MODEL, STABLE, Traffic, rollout_document

TOKEN = "admin-token-for-rollout-tests"


@pytest.fixture
def bucket_seconds() -> int:
    """The served relay's metric buckets (a test may parametrize it)."""
    return 1


@pytest.fixture
def served(tmp_path: Path, fake_llm: FakeLLM, bucket_seconds: int) -> Iterator[tuple[Relay, str]]:
    """The serving relay on a file store, and the URL of its app (gateway + /relay-admin)."""
    path = tmp_path / "relay.toml"
    doc = rollout_document(fake_llm.base_url)
    doc["metrics"] = {"bucket_seconds": bucket_seconds}
    path.write_bytes(dump_document(doc, "toml"))
    relay = Relay.from_store(FileStore(path, poll_interval=0.1))
    app = Starlette(routes=[Mount("/relay-admin", app=relay.admin_app(token=TOKEN))])
    app.add_middleware(RelayMiddleware, relay=relay)
    try:
        with serve_asgi(app) as url:
            yield relay, url
    finally:
        relay.close()


@pytest.fixture(params=["relay", "admin"])
def control(request: pytest.FixtureRequest, served: tuple[Relay, str]) -> Iterator[ReleaseControl]:
    relay, url = served
    c: ReleaseControl = (
        RelayControl(relay)
        if request.param == "relay"
        else AdminControl(f"{url}/relay-admin", TOKEN)
    )
    yield c
    c.close()


def controller(
    control: ReleaseControl,
    out: io.StringIO,
    stages: tuple[float, ...] = (5, 25, 50, 100),
    interval: float = 0.7,
    **criteria: object,
) -> RolloutController:
    settings: dict[str, object] = {"max_error_rate": 0.2, "min_requests": 5} | criteria
    plan = Plan(ALIAS, CANARY, stages, interval, Criteria(**settings))  # type: ignore[arg-type]
    return RolloutController(control, plan, PlainReporter(out))


def weights(relay: Relay) -> dict[str, float]:
    route = relay.snapshot.routes[ALIAS].route
    return {r.version_tag: r.weight for r in route.route_rules}


def test_a_good_canary_goes_from_5_to_100_by_itself(
    served: tuple[Relay, str], control: ReleaseControl
) -> None:
    relay, url = served
    out = io.StringIO()
    with Traffic(url) as traffic:
        state = controller(control, out).run()
        after = traffic.snapshot()
    assert state.status == "succeeded", out.getvalue()
    assert [h["weight"] for h in state.history] == [5, 25, 50, 100]
    assert all(h["outcome"] == "pass" and h["canary"]["request_count"] >= 5 for h in state.history)
    assert weights(relay) == {STABLE: 0, CANARY: 100}
    stored = relay.read_state(state_name(ALIAS))
    assert stored is not None and stored["status"] == "succeeded"
    # Both versions answered live traffic, and nothing failed.
    assert after[(STABLE, 200)] > 0 and after[(CANARY, 200)] > 0
    assert sum(n for (_, status), n in after.items() if status != 200) == 0
    text = out.getvalue()
    for stage in ("1/4 (5%)", "2/4 (25%)", "3/4 (50%)", "4/4 (100%)"):
        assert f"stage {stage} passed: error rate 0.0%" in text
    assert "rollout succeeded" in text
    # Every weight change is in the change log (over the admin API, as its PATCH).
    actions = [e["action"] for e in relay.changes() if e["target"] == f"route:{ALIAS}"]
    expected = "rollout" if isinstance(control, RelayControl) else "set-weights"
    assert actions == [expected] * 4


def test_a_failing_canary_is_rolled_back_and_says_why(
    served: tuple[Relay, str],
    control: ReleaseControl,
    fake_llm: FakeLLM,
    capsys: pytest.CaptureFixture[str],
) -> None:
    relay, url = served
    fake_llm.set(CANARY_MODEL, status=503, error_rate=1.0)
    out = io.StringIO()
    with Traffic(url):
        state = controller(control, out).run()
    assert state.status == "rolled_back"
    assert state.history[-1]["outcome"] == "fail" and state.history[-1]["weight"] == 5
    assert state.reason is not None
    assert "stage 1/4 (5%) failed: error rate 100.0%" in state.reason
    assert "is above the limit of 20.0%" in state.reason
    assert weights(relay) == {STABLE: 100, CANARY: 0}
    stored = relay.read_state(state_name(ALIAS))
    assert stored is not None and stored["status"] == "rolled_back"
    assert stored["reason"] == state.reason
    assert "rollout ROLLED BACK: stage 1/4 (5%) failed" in out.getvalue()
    assert "is above the limit of 20.0%" in capsys.readouterr().err
    # After the rollback, live traffic reaches the stable version only.
    with Traffic(url) as traffic:
        time.sleep(0.5)
    assert set(traffic.snapshot()) == {(STABLE, 200)}


@pytest.mark.parametrize("bucket_seconds", [5])
def test_a_stage_is_judged_without_the_requests_of_its_first_bucket_from_before_it(
    served: tuple[Relay, str], control: ReleaseControl, fake_llm: FakeLLM, bucket_seconds: int
) -> None:
    # The canary answers well at 100 %, then starts failing and is rolled out again within
    # the same metric bucket: the good answers from before the stage must not dilute the
    # stage's 100 % error rate. Five-second buckets leave a loaded machine room to start
    # the stage in the good answers' bucket.
    relay, url = served
    control.set_weights(ALIAS, {STABLE: 0, CANARY: 100}, actor="test", action="set-weights")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="client", max_retries=0)
    while time.time() % bucket_seconds > 0.5:  # early in a bucket
        time.sleep(0.01)
    for _ in range(10):
        client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "hi"}])
    last_good = time.time()
    good = relay.metrics(CANARY, last_good, last_good + 0.001, ALIAS)
    assert good.request_count >= 10 and good.error_count == 0
    fake_llm.set(CANARY_MODEL, status=503, error_rate=1.0)
    control.set_weights(ALIAS, {STABLE: 100, CANARY: 0}, actor="test", action="set-weights")
    out = io.StringIO()
    with Traffic(url):
        state = controller(control, out).run()
    started = state.history[0]["started_at"]
    assert started // bucket_seconds == last_good // bucket_seconds, (
        "the stage must start in the good answers' bucket"
    )
    assert state.status == "rolled_back", out.getvalue()
    assert state.reason is not None
    assert "stage 1/4 (5%) failed: error rate 100.0%" in state.reason, state.reason


def test_baseline_rolls_back_a_canary_worse_than_the_stable_version(
    served: tuple[Relay, str], fake_llm: FakeLLM
) -> None:
    relay, url = served
    fake_llm.set(CANARY_MODEL, status=503, error_rate=1.0)
    out = io.StringIO()
    with Traffic(url):
        ctl = controller(
            RelayControl(relay), out, max_error_rate=None, baseline=True, min_requests=8
        )
        state = ctl.run()
    assert state.status == "rolled_back", out.getvalue()
    assert state.reason is not None
    assert "significantly higher than the stable version's 0.0%" in state.reason
    assert ctl.last_analysis is not None and ctl.last_analysis.stable is not None
    assert ctl.last_analysis.stable.request_count >= 8
    assert weights(relay) == {STABLE: 100, CANARY: 0}


def test_it_holds_while_the_canary_has_too_few_requests(
    served: tuple[Relay, str], control: ReleaseControl
) -> None:
    relay, url = served
    out = io.StringIO()
    ctl = controller(control, out, stages=(50, 100), interval=0.3)
    result: list[RolloutState] = []
    runner = threading.Thread(target=lambda: result.append(ctl.run()), daemon=True)
    runner.start()
    time.sleep(1.5)  # five intervals without a single request
    held = relay.read_state(state_name(ALIAS))
    assert held is not None and held["status"] == "running" and held["stage_index"] == 0
    assert "stage 1/2 (50%) holding: the canary has 0 of 5 requests needed" in out.getvalue()
    assert weights(relay) == {STABLE: 50, CANARY: 50}
    with Traffic(url):
        runner.join(30)
    assert result and result[0].status == "succeeded", out.getvalue()
    assert weights(relay) == {STABLE: 0, CANARY: 100}


def test_an_interrupted_rollout_resumes_its_stage_where_it_was(
    served: tuple[Relay, str], control: ReleaseControl
) -> None:
    relay, url = served
    first = controller(control, io.StringIO(), interval=1.0)

    def sleep(seconds: float) -> None:
        # Ctrl-C in the middle of the second stage.
        s = first.state
        if (
            s
            and s.stage_index == 1
            and s.stage_started_at
            and time.time() > s.stage_started_at + 0.4
        ):
            raise KeyboardInterrupt
        time.sleep(seconds)

    with Traffic(url):
        with pytest.raises(KeyboardInterrupt):
            first.run(sleep)
        saved = relay.read_state(state_name(ALIAS))
        assert saved is not None and saved["status"] == "running"
        assert saved["stage_index"] == 1 and len(saved["history"]) == 1
        assert weights(relay) == {STABLE: 75, CANARY: 25}
        time.sleep(0.2)  # the controller is away for a while
        out = io.StringIO()
        state = controller(control, out, interval=1.0).run()
    assert state.status == "succeeded"
    assert "resuming the rollout of chat-production to gpt-v2 at stage 2/4 (25%)" in out.getvalue()
    # The second stage kept its start: it was not begun again.
    assert state.history[1]["started_at"] == saved["stage_started_at"]
    assert [h["weight"] for h in state.history] == [5, 25, 50, 100]
    assert "stage 1/4" not in out.getvalue()


def test_weights_changed_by_someone_else_stop_the_rollout(
    served: tuple[Relay, str], control: ReleaseControl
) -> None:
    relay, url = served
    out = io.StringIO()
    ctl = controller(control, out, interval=5.0)
    result: list[RolloutState] = []
    runner = threading.Thread(target=lambda: result.append(ctl.run()), daemon=True)
    with Traffic(url):
        runner.start()
        deadline = time.monotonic() + 10
        while weights(relay).get(CANARY) != 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        RelayControl(relay).rollback(ALIAS, STABLE, actor="operator")
        runner.join(10)
    assert result and result[0].status == "aborted"
    assert "changed outside the rollout" in (result[0].reason or "")
    assert weights(relay) == {STABLE: 100, CANARY: 0}  # left as the operator set them


def test_a_running_rollout_to_another_version_is_not_overwritten(
    served: tuple[Relay, str],
) -> None:
    relay, _ = served
    control = RelayControl(relay)
    first = controller(control, io.StringIO())
    first.start()
    other = Plan(ALIAS, "claude-v1", (5, 100), 1.0, Criteria())
    with pytest.raises(ControlError, match=r"in progress .* --reset"):
        RolloutController(control, other).start()


# --- the pieces ----------------------------------------------------------------------------


def test_intervals_and_stages_parse() -> None:
    assert [parse_interval(t) for t in ("30s", "10m", "1h", "45", "0.5", "500ms")] == [
        30, 600, 3600, 45, 0.5, 0.5,
    ]  # fmt: skip
    for bad in ("", "10x", "-1", "0", "m"):
        with pytest.raises(ValueError):
            parse_interval(bad)
    assert parse_stages("5,25,50,100") == (5, 25, 50, 100)
    for bad in ("", "5,5", "50,25", "0,10", "5,101", "a"):
        with pytest.raises(ValueError):
            parse_stages(bad)


def test_analysis_rules() -> None:
    c = Criteria(max_error_rate=0.05, max_p99_ms=500, min_requests=20)
    ok = Figures(request_count=100, error_count=2, error_rate=0.02, latency_p99_ms=300)
    assert analyse(c, ok).outcome == "pass"
    few = Figures(request_count=19, error_count=19, error_rate=1.0)
    hold = analyse(c, few)
    assert hold.outcome == "hold" and hold.reasons == ("the canary has 19 of 20 requests needed",)
    slow_and_bad = Figures(request_count=100, error_count=6, error_rate=0.06, latency_p99_ms=501)
    failed = analyse(c, slow_and_bad)
    assert failed.outcome == "fail"
    assert failed.reasons == (
        "error rate 6.0% (6/100) is above the limit of 5.0%",
        "p99 latency 501 ms is above the limit of 500 ms",
    )
    # Baseline: the same 6% passes against a stable version that fails as often...
    b = Criteria(max_error_rate=None, baseline=True, min_requests=20)
    same = Figures(request_count=1000, error_count=60, error_rate=0.06, latency_p99_ms=400)
    assert analyse(b, slow_and_bad, same).outcome == "pass"
    # ... and fails against one that does not; a stable short of data holds.
    clean = Figures(request_count=1000, error_count=0, error_rate=0.0, latency_p99_ms=400)
    worse = analyse(b, slow_and_bad, clean)
    assert worse.outcome == "fail" and len(worse.reasons) == 1
    assert "significantly higher than the stable version's 0.0% (0/1000)" in worse.reasons[0]
    # A p99 above 1.5x the stable's fails too, once both have 100 requests.
    assert analyse(b, ok, Figures(request_count=100, latency_p99_ms=199)).reasons == (
        "p99 latency 300 ms is more than 1.5 x the stable version's 199 ms",
    )
    assert analyse(b, slow_and_bad, Figures(request_count=3)).outcome == "hold"
