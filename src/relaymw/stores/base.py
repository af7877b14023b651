"""The :class:`Store` protocol and the URI registry."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import attrs

from relaymw.errors import StoreError

__all__ = ["RawDocument", "Store", "open_store", "register_scheme"]


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
