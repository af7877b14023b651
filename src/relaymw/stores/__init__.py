"""Configuration stores: where the document lives and how changes reach every worker.

A store is chosen by URI: a path (``relay.toml``), ``redis://...`` or ``https://...``.
Schemes are registered with :func:`register_scheme`, so a store added later (or by a
user) plugs in without touching the core.
"""

from __future__ import annotations

from relaymw.stores.base import RawDocument, Store, open_store, register_scheme
from relaymw.stores.file import FileStore

__all__ = ["FileStore", "RawDocument", "Store", "open_store", "register_scheme"]
