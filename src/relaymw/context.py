"""The version chosen for the current request, for in-app handlers."""

from __future__ import annotations

from contextvars import ContextVar

from relaymw.snapshot import RequestView, VersionChoice

__all__ = ["current_version"]

_current: ContextVar[VersionChoice | None] = ContextVar("relaymw_version", default=None)
# The in-app request being handled: its identity is what the handler's LLM calls spend.
_current_request: ContextVar[RequestView | None] = ContextVar("relaymw_request", default=None)


def current_version() -> VersionChoice | None:
    """The version chosen for the request being handled (in-app mode), or None."""
    return _current.get()
