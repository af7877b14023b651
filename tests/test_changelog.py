"""The change log and named states kept beside the document, in every store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relaymw import Relay
from relaymw.changelog import MemoryJournal, changes_between, redact
from relaymw.engine import set_route_weights
from relaymw.errors import StoreReadOnlyError
from relaymw.stores import FileStore, RedisStore
from relaymw.testing import FakeLLM
from tests.support import UPSTREAM_KEY, relay_document


@pytest.fixture(params=["file", "redis"])
def relay(request: pytest.FixtureRequest, tmp_path: Path, fake_llm: FakeLLM) -> Iterator[Relay]:
    document = relay_document(fake_llm.base_url)
    if request.param == "file":
        path = tmp_path / "relay.json"
        path.write_text(json.dumps(document))
        store: Any = FileStore(path)
    else:
        redis_url = request.getfixturevalue("redis_url")
        key = request.getfixturevalue("redis_prefix") + ":config"
        store = RedisStore(redis_url, key=key)
        store.save(document)
    relay = Relay.from_store(store, watch=False)
    yield relay
    relay.close()


def test_a_weight_change_is_logged_with_who_when_before_and_after(relay: Relay) -> None:
    relay.update_document(
        lambda doc: set_route_weights(doc, "chat-production", {"gpt-v1": 80, "gpt-v2": 20}),
        actor="alice",
        action="set-weights",
    )
    (entry,) = relay.changes()
    assert entry["actor"] == "alice" and entry["action"] == "set-weights"
    assert entry["target"] == "route:chat-production"
    assert [r["weight"] for r in entry["before"]["route_rules"]] == [50, 50]
    assert [r["weight"] for r in entry["after"]["route_rules"]] == [80, 20]
    assert entry["revision"] == relay.snapshot.revision
    assert entry["at"].endswith("+00:00") and len(entry["id"]) == 32


def test_newest_first_limited_and_shared_by_every_reader(relay: Relay) -> None:
    for share in (10, 20, 30):
        relay.update_document(
            lambda doc, s=share: set_route_weights(
                doc, "chat-production", {"gpt-v1": 100 - s, "gpt-v2": s}
            ),
            actor=f"op{share}",
        )
    assert [e["actor"] for e in relay.changes()] == ["op30", "op20", "op10"]
    assert [e["actor"] for e in relay.changes(limit=2)] == ["op30", "op20"]
    assert relay.changes(limit=0) == []
    # A second relay on the same store (another worker, the CLI) reads the same log.
    assert relay.store is not None
    other = Relay.from_store(relay.store, watch=False)
    assert [e["id"] for e in other.changes()] == [e["id"] for e in relay.changes()]


def test_an_invalid_change_writes_nothing_and_logs_nothing(relay: Relay) -> None:
    from relaymw.errors import ConfigError

    with pytest.raises(ConfigError):
        relay.update_document(
            lambda doc: set_route_weights(doc, "chat-production", {"gpt-v1": 60, "gpt-v2": 45})
        )
    assert relay.changes() == []


def test_secrets_never_reach_the_log(relay: Relay) -> None:
    def rotate(doc: dict[str, Any]) -> dict[str, Any]:
        doc["upstreams"]["openai"]["api_key"] = "sk-rotated-secret-456"
        doc["sticky"] = {"secret": "cookie-secret-789"}
        return doc

    relay.update_document(rotate, actor="bob")
    text = json.dumps(relay.changes())
    assert UPSTREAM_KEY not in text and "sk-rotated-secret-456" not in text
    assert "cookie-secret-789" not in text
    targets = {e["target"]: e for e in relay.changes()}
    assert targets["upstream:openai"]["after"]["api_key"] == "***"
    assert targets["sticky"]["before"] is None and targets["sticky"]["after"]["secret"] == "***"


def test_named_states_are_kept_in_the_store(relay: Relay) -> None:
    assert relay.read_state("rollout:chat-production") is None
    relay.write_state("rollout:chat-production", {"stage": 2, "status": "running"})
    assert relay.store is not None
    other = Relay.from_store(relay.store, watch=False)
    assert other.read_state("rollout:chat-production") == {"stage": 2, "status": "running"}
    other.write_state("rollout:chat-production", None)
    assert relay.read_state("rollout:chat-production") is None
    relay.write_state("rollout:chat-production", None)  # deleting twice is fine


def test_the_file_journal_lives_beside_the_document(tmp_path: Path, fake_llm: FakeLLM) -> None:
    path = tmp_path / "relay.toml"
    store = FileStore(path)
    store.save(relay_document(fake_llm.base_url))
    store.write_state("rollout:a/b c", {"x": 1})
    store.append_change({"id": "1"})
    assert (tmp_path / "relay.toml.changes.jsonl").read_text() == '{"id": "1"}\n'
    (state,) = (tmp_path / "relay.toml.state").iterdir()
    assert "/" not in state.name and json.loads(state.read_text()) == {"x": 1}


def test_redact_keeps_env_references_and_nested_structure() -> None:
    doc = {
        "upstreams": {"a": {"api_key": "${OPENAI_API_KEY}", "base_url": "u"}},
        "x": [{"token": "t0ken", "authorization": "Bearer abc"}, {"password": ""}],
        "y": {"api_key": "${A:-sk-default}"},
    }
    assert redact(doc) == {
        "upstreams": {"a": {"api_key": "${OPENAI_API_KEY}", "base_url": "u"}},
        "x": [{"token": "***", "authorization": "***"}, {"password": ""}],
        "y": {"api_key": "***"},
    }


def test_changes_between_names_each_changed_object() -> None:
    before = {"versions": [{"version_tag": "a"}], "routes": [], "pricing": {}}
    after = {"versions": [{"version_tag": "a"}, {"version_tag": "b"}], "routes": []}
    entries = changes_between(before, after, actor="x", action="y", revision="r")
    assert [(e["target"], e["before"], e["after"]) for e in entries] == [
        ("pricing", {}, None),
        ("version:b", None, {"version_tag": "b"}),
    ]


def test_a_read_only_journal_refuses_state() -> None:
    journal = MemoryJournal(writable=False)
    with pytest.raises(StoreReadOnlyError):
        journal.write_state("x", {})
    assert journal.read_state("x") is None and journal.changes() == []
