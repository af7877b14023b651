"""Configuration stores: where the document lives and how changes reach every worker.

A store is chosen by URI: a path (``relay.toml``), ``redis://...`` or ``https://...``.
Schemes are registered with :func:`register_scheme`, so a store added later (or by a
user) plugs in without touching the core.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from relaymw.stores.base import RawDocument, Store, open_store, register_scheme
from relaymw.stores.file import FileStore

if TYPE_CHECKING:
    from relaymw.stores.http import HttpStore
    from relaymw.stores.redis import RedisStore

__all__ = [
    "FileStore",
    "HttpStore",
    "RawDocument",
    "RedisStore",
    "Store",
    "open_store",
    "register_scheme",
]


def _redis(uri: str) -> Store:
    # redis is an optional extra: imported only when a redis:// store is asked for.
    from relaymw.stores.redis import RedisStore

    return RedisStore(uri)


def _http(uri: str) -> Store:
    from relaymw.stores.http import HttpStore

    return HttpStore(uri)


for _scheme in ("redis", "rediss"):
    register_scheme(_scheme, _redis)
for _scheme in ("http", "https"):
    register_scheme(_scheme, _http)


def __getattr__(name: str) -> object:
    if name == "RedisStore":
        from relaymw.stores.redis import RedisStore

        return RedisStore
    if name == "HttpStore":
        from relaymw.stores.http import HttpStore

        return HttpStore
    raise AttributeError(name)
