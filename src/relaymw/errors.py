"""The exception tree. Every relaymw error derives from :class:`RelayError`."""

from __future__ import annotations

from collections.abc import Sequence

import attrs

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "RelayError",
    "RequestRejected",
    "StoreConflictError",
    "StoreError",
    "StoreReadOnlyError",
    "UpstreamConnectionError",
    "UpstreamError",
    "UpstreamTimeout",
]


class RelayError(Exception):
    """Base of every error relaymw raises on purpose."""


@attrs.frozen
class ConfigIssue:
    """One problem in a document, at ``path`` (``routes[0].route_rules[1].weight``)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(RelayError, ValueError):
    """A configuration document was rejected; ``issues`` lists every problem found."""

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        self.issues = list(issues)
        lines = "\n".join(f"  - {i}" for i in self.issues)
        super().__init__(f"invalid relaymw configuration ({len(self.issues)} problem(s)):\n{lines}")


class StoreError(RelayError):
    """A configuration store could not be read or written."""


class StoreReadOnlyError(StoreError):
    """The store cannot be written (an HTTP store, for instance)."""


class StoreConflictError(StoreError):
    """A compare-and-set write lost: the document changed since it was read."""


class RequestRejected(RelayError):
    """A request relaymw answers itself with an error in the client's protocol shape.

    ``code`` is machine-readable (``invalid_json``, ``rate_limited``, ``budget_exceeded`` ...);
    ``headers`` are added to the response (``Retry-After``, ``RateLimit-*``).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = list(headers)


class UpstreamError(RelayError):
    """The upstream could not be reached or did not answer in time."""


class UpstreamTimeout(UpstreamError):
    """Connecting, or waiting for the next bytes of a response, took longer than allowed."""


class UpstreamConnectionError(UpstreamError):
    """The connection was refused, reset or closed before the response was complete."""
