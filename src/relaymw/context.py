"""The version chosen for the current request, for in-app handlers."""

from __future__ import annotations

from contextvars import ContextVar

from relaymw.snapshot import VersionChoice

__all__ = ["current_version"]

_current: ContextVar[VersionChoice | None] = ContextVar("relaymw_version", default=None)


def current_version() -> VersionChoice | None:
    """The version chosen for the request being handled (in-app mode), or None."""
    return _current.get()
