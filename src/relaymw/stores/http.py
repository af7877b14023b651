"""A read-only configuration document served over HTTP(S), polled with ``If-None-Match``.

``HttpStore("https://config.internal/relay.json", poll_interval=5.0, headers=None,
timeout=2.0)``. One daemon thread polls with a conditional GET: ``304`` costs nothing, a
``200`` with a new ETag (or, without ETags, a new SHA-256 of the body) is handed to
``on_change``. The format follows the ``Content-Type`` (JSON, TOML or YAML), then the URL's
suffix, then JSON. Any failure (a 5xx, a timeout, a refused connection, a body that is not
text) goes to ``on_error`` once per outage and polling goes on; the relay keeps its
last-known-good configuration meanwhile.

Authentication: pass ``headers={"Authorization": "Bearer ..."}``, or set
``RELAYMW_HTTP_STORE_AUTH`` (used as the ``Authorization`` value when no such header is given;
a bare token gets ``Bearer`` in front). Credentials in the URL (``user:pass@``, token-like
query values) work but never appear in :meth:`HttpStore.describe` or in error messages.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from relaymw.errors import StoreError, StoreReadOnlyError
from relaymw.stores.base import (
    RawDocument,
    call_safely,
    forget_after_fork,
    register_scheme,
    rewatch_after_fork,
)

__all__ = ["AUTH_ENV", "HttpStore"]

log = logging.getLogger("relaymw")

AUTH_ENV = "RELAYMW_HTTP_STORE_AUTH"
OnChange = Callable[[RawDocument], None]
OnError = Callable[[Exception], None]
_SECRET_NAME = re.compile(r"token|key|secret|sig|auth|pass|cred|session|jwt", re.IGNORECASE)
_TOKEN_VALUE = re.compile(r"[A-Za-z0-9_\-.~+/=%]{16,}")
_NOT_TEXT = ("image/", "audio/", "video/", "font/", "application/zip", "application/pdf")


def safe_url(url: str) -> str:
    """``url`` without userinfo and with token-like query values replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    query = [
        (k, "***" if _SECRET_NAME.search(k) or _TOKEN_VALUE.fullmatch(v) else v)
        for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urllib.parse.urlunsplit(
        (parts.scheme, netloc, parts.path, urllib.parse.urlencode(query, safe="*"), "")
    )


def _format(content_type: str, path: str) -> str:
    for fmt, marks in (("json", ("json",)), ("toml", ("toml",)), ("yaml", ("yaml", "yml"))):
        if any(m in content_type for m in marks):
            return fmt
    suffix = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    return {"toml": "toml", "yaml": "yaml", "yml": "yaml"}.get(suffix, "json")


class HttpStore:
    """A document at an HTTP(S) URL; read-only (see the module docs)."""

    writable = False

    def __init__(
        self,
        url: str,
        poll_interval: float = 5.0,
        headers: Mapping[str, str] | None = None,
        timeout: float = 2.0,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise StoreError(f"an HTTP store needs an http:// or https:// URL, not {url[:8]}...")
        self.url = url
        self.poll_interval = poll_interval
        self.timeout = timeout
        self._path = parts.path
        self._safe = safe_url(url)
        sent = dict(headers or {})
        token = os.environ.get(AUTH_ENV, "").strip()
        if token and not any(k.lower() == "authorization" for k in sent):
            sent["Authorization"] = token if " " in token else f"Bearer {token}"
        auth = [v for k, v in sent.items() if k.lower() == "authorization" and v]
        self._secrets = auth + [v.split(" ", 1)[-1] for v in auth]
        self._secrets += [s for s in (parts.password, parts.username) if s]
        self._headers = sent
        self._client = self._new_client()
        self._last: tuple[str, str | None] | None = None  # (revision, etag) of the last load
        self._callbacks: tuple[OnChange, OnError] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _new_client(self) -> httpx.Client:
        self._pid = os.getpid()  # httpx pools are not fork-safe: a child makes its own
        return httpx.Client(headers=self._headers, timeout=self.timeout, follow_redirects=True)

    def describe(self) -> str:
        return f"HTTP store {self._safe}"

    def _scrub(self, text: str) -> str:
        text = text.replace(self.url, self._safe)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _fetch(self, etag: str | None) -> tuple[RawDocument, str | None] | None:
        """GET the document; None on ``304 Not Modified``. Raises :class:`StoreError`."""
        where = f"the {self.describe()}"
        headers = {"If-None-Match": etag} if etag else None
        if self._pid != os.getpid():
            self._client = self._new_client()
        try:
            response = self._client.get(self.url, headers=headers)
        except httpx.TimeoutException:
            raise StoreError(f"{where} did not answer within {self.timeout:g} s") from None
        except httpx.HTTPError as exc:
            detail = self._scrub(str(exc)) or type(exc).__name__
            raise StoreError(f"cannot reach {where}: {detail}") from None
        if response.status_code == 304 and etag:
            return None
        if response.status_code != 200:
            raise StoreError(f"{where} answered HTTP {response.status_code}, not 200")
        content_type = response.headers.get("content-type", "").lower()
        data = response.content
        if content_type.startswith(_NOT_TEXT):
            raise StoreError(f"{where} answered {content_type}, not a configuration document")
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise StoreError(f"{where} answered a body that is not UTF-8 text") from None
        new_etag = response.headers.get("etag")
        revision = new_etag or "sha256:" + hashlib.sha256(data).hexdigest()[:16]
        fmt = _format(content_type, self._path)
        return RawDocument(data, fmt, revision, self.describe()), new_etag

    def load(self) -> RawDocument:
        fetched = self._fetch(None)
        assert fetched is not None  # an unconditional GET never gets 304
        raw, etag = fetched
        self._last = (raw.revision, etag)
        return raw

    def watch(self, on_change: OnChange, on_error: OnError) -> None:
        """Start polling; a no-op while it runs. In a forked child (``gunicorn --preload``;
        the relay and this module's fork hook both call it) a fresh client and thread."""
        if self._pid != os.getpid():
            self._client = self._new_client()
            self._stop = threading.Event()
            self._thread = None
        if self._thread is not None and self._thread.is_alive():
            return
        self._callbacks = (on_change, on_error)
        rewatch_after_fork(self, on_change, on_error)
        self._thread = threading.Thread(
            target=self._run,
            args=(on_change, on_error, self._last),
            name="relaymw-http-store",
            daemon=True,
        )
        self._thread.start()

    def _run(
        self, on_change: OnChange, on_error: OnError, last: tuple[str, str | None] | None
    ) -> None:
        seen, etag = last if last is not None else (None, None)
        failing = False
        stop = self._stop
        while not stop.wait(self.poll_interval):
            try:
                fetched = self._fetch(etag)
            except StoreError as exc:
                if not failing and not stop.is_set():  # once per outage
                    failing = True
                    call_safely(on_error, exc)
                continue
            except RuntimeError:  # the client was closed under us by close()
                break
            if failing:
                failing = False
                log.info("relaymw: the %s answers again", self.describe())
            if fetched is None:
                continue
            raw, etag = fetched
            if raw.revision == seen:
                continue
            seen = raw.revision
            self._last = (raw.revision, etag)  # where a forked child starts from
            call_safely(on_change, raw)

    def save(self, document: dict[str, Any], expected_revision: str | None = None) -> str:
        raise StoreReadOnlyError(
            f"the {self.describe()} is read-only; change the document at its source"
        )

    def close(self) -> None:
        self._stop.set()
        self._callbacks = None
        forget_after_fork(self)
        if self._thread is not None:
            self._thread.join(self.timeout + 1)
            self._thread = None
        self._client.close()


register_scheme("http", HttpStore)
register_scheme("https", HttpStore)
