"""The change log of the configuration: who changed what, when, and what it was before.

Every write through :meth:`relaymw.Relay.update_document` appends one entry per changed
object (a version, a route, an upstream, or a whole section such as ``pricing``). Entries
live in the store beside the document, so every worker, the admin API and the CLI read the
same log; secrets are redacted before an entry is written anywhere.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections import deque
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from relaymw.errors import StoreReadOnlyError

__all__ = ["MemoryJournal", "changes_between", "redact"]

_SECRET_KEYS = frozenset({"api_key", "secret", "token", "tokens", "password", "authorization"})
# A bare "${NAME}" reference tells where a secret comes from without being one.
_ENV_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")
REDACTED = "***"

# Sections whose items have a name of their own: one entry per item, not per section.
_KEYED_LISTS = {"versions": ("version", "version_tag"), "routes": ("route", "model_alias")}


def redact(node: Any) -> Any:
    """``node`` with the value of every secret-named key replaced (``${ENV}`` references kept)."""
    if isinstance(node, Mapping):
        return {
            k: _redacted_value(v) if str(k).lower() in _SECRET_KEYS else redact(v)
            for k, v in node.items()
        }
    if isinstance(node, (list, tuple)):
        return [redact(v) for v in node]
    return node


def _redacted_value(value: Any) -> Any:
    if value in (None, "") or (isinstance(value, str) and _ENV_REFERENCE.match(value)):
        return value
    return REDACTED


def _objects(document: Mapping[str, Any]) -> dict[str, Any]:
    """The document as ``{target: object}``: ``version:TAG``, ``route:ALIAS``, ``upstream:NAME``
    and one target per other section."""
    objects: dict[str, Any] = {}
    for section, value in document.items():
        keyed = _KEYED_LISTS.get(section)
        if keyed is not None and isinstance(value, list):
            kind, field = keyed
            for index, item in enumerate(value):
                name = item.get(field) if isinstance(item, Mapping) else None
                objects[f"{kind}:{name if name is not None else f'#{index}'}"] = item
        elif section == "upstreams" and isinstance(value, Mapping):
            for name, upstream in value.items():
                objects[f"upstream:{name}"] = upstream
        else:
            objects[section] = value
    return objects


def changes_between(
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    *,
    actor: str,
    action: str,
    revision: str,
) -> list[dict[str, Any]]:
    """One change-log entry per object that differs between two documents, secrets redacted."""
    old, new = _objects(before), _objects(after)
    at = datetime.now(timezone.utc).isoformat()
    return [
        {
            "id": uuid.uuid4().hex,
            "at": at,
            "actor": actor,
            "action": action,
            "target": target,
            "before": redact(old.get(target)),
            "after": redact(new.get(target)),
            "revision": revision,
        }
        for target in [*old, *(t for t in new if t not in old)]
        if old.get(target) != new.get(target)
    ]


class MemoryJournal:
    """The change log and state of a relay whose store keeps none (or that has no store)."""

    def __init__(self, keep: int = 10_000, writable: bool = True) -> None:
        self._entries: deque[dict[str, Any]] = deque(maxlen=keep)
        self._state: dict[str, dict[str, Any]] = {}
        self._writable = writable
        self._lock = threading.Lock()

    def append_change(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._entries.append(entry)

    def changes(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            return list(reversed(self._entries))[: max(0, limit)]

    def read_state(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._state.get(name)

    def write_state(self, name: str, value: dict[str, Any] | None) -> None:
        if not self._writable:
            raise StoreReadOnlyError("this configuration store is read-only; it keeps no state")
        with self._lock:
            if value is None:
                self._state.pop(name, None)
            else:
                self._state[name] = value
