"""The :class:`Store` protocol and the URI registry."""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import attrs

from relaymw.errors import StoreError

__all__ = [
    "Journal",
    "RawDocument",
    "Store",
    "call_safely",
    "forget_after_fork",
    "open_store",
    "register_scheme",
    "rewatch_after_fork",
]

log = logging.getLogger("relaymw")


@attrs.frozen
class RawDocument:
    """A document as a store holds it: the text, its format and a revision for compare-and-set."""

    data: bytes = attrs.field(repr=False)
    format: str  # "toml" | "yaml" | "json"
    revision: str
    source: str  # a description without credentials, for messages and signals


@runtime_checkable
class Store(Protocol):
    """Where a configuration document lives.

    ``watch`` starts noticing changes in the background and calls ``on_change`` with each new
    document, or ``on_error`` when the store cannot be read (the caller keeps its
    last-known-good configuration). Calling it again while the watcher runs does nothing;
    after a fork, when the watcher thread is gone, it starts a new one.

    ``save`` writes a whole document atomically; with ``expected_revision`` it is a
    compare-and-set and raises ``StoreConflictError`` when the document changed meanwhile.
    Read-only stores raise ``StoreReadOnlyError``.
    """

    writable: bool

    def describe(self) -> str: ...

    def load(self) -> RawDocument: ...

    def watch(
        self,
        on_change: Callable[[RawDocument], None],
        on_error: Callable[[Exception], None],
    ) -> None: ...

    def save(self, document: dict[str, Any], expected_revision: str | None = None) -> str: ...

    def close(self) -> None: ...


@runtime_checkable
class Journal(Protocol):
    """What a store may keep beside its document: the change log and small named states.

    ``changes`` answers newest first. ``write_state(name, None)`` deletes. A store without
    these methods gets an in-process journal (see :mod:`relaymw.changelog`).
    """

    def append_change(self, entry: dict[str, Any]) -> None: ...

    def changes(self, limit: int = 100) -> list[dict[str, Any]]: ...

    def read_state(self, name: str) -> dict[str, Any] | None: ...

    def write_state(self, name: str, value: dict[str, Any] | None) -> None: ...


StoreFactory = Callable[[str], Store]
_schemes: dict[str, StoreFactory] = {}


def register_scheme(scheme: str, factory: StoreFactory) -> None:
    """Make ``open_store("<scheme>://...")`` build a store with ``factory(uri)``."""
    _schemes[scheme.lower()] = factory


def open_store(source: str | os.PathLike[str] | Store) -> Store:
    """A store for a path, a registered URI scheme, or a :class:`Store` given as is."""
    if isinstance(source, Store):
        return source
    text = os.fspath(source)
    scheme, sep, _ = text.partition("://")
    if sep:
        factory = _schemes.get(scheme.lower())
        if factory is None:
            known = ", ".join(sorted(_schemes)) or "none"
            raise StoreError(
                f"no store for {scheme}:// URIs (registered schemes: {known}; "
                "a plain path is a file store)"
            )
        return factory(text)
    from relaymw.stores.file import FileStore

    return FileStore(text)


def call_safely(callback: Callable[[Any], None], argument: Any) -> None:
    """Run a store callback from a watcher thread; its failure is logged, never fatal."""
    try:
        callback(argument)
    except Exception:
        log.exception("relaymw: a store callback failed")


# Threads do not survive fork (gunicorn --preload): a watching store watches anew in the child.
# A WeakSet, with the callbacks kept on the store: the registry never keeps a store alive.
_watching: weakref.WeakSet[Any] = weakref.WeakSet()


def rewatch_after_fork(
    store: Any, on_change: Callable[..., None], on_error: Callable[..., None]
) -> None:
    store._relaymw_callbacks = (on_change, on_error)
    _watching.add(store)


def forget_after_fork(store: Any) -> None:
    _watching.discard(store)


def _after_fork_in_child() -> None:
    for store in list(_watching):
        store.watch(*store._relaymw_callbacks)


os.register_at_fork(after_in_child=_after_fork_in_child)
