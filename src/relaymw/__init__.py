"""relaymw: gray releases and cost control for LLM traffic, as ASGI/WSGI middleware.

::

    from relaymw import Relay, RelayMiddleware

    relay = Relay.from_store("relay.toml")
    app.add_middleware(RelayMiddleware, relay=relay)
"""

from __future__ import annotations

from relaymw import signals
from relaymw.asgi import RelayMiddleware
from relaymw.config import RelayConfig, normalize_weights
from relaymw.context import current_version
from relaymw.engine import Relay
from relaymw.errors import ConfigError, RelayError
from relaymw.snapshot import VersionChoice
from relaymw.wsgi import RelayWSGIMiddleware

__all__ = [
    "ConfigError",
    "Relay",
    "RelayConfig",
    "RelayError",
    "RelayMiddleware",
    "RelayWSGIMiddleware",
    "VersionChoice",
    "current_version",
    "normalize_weights",
    "signals",
]

__version__ = "0.1.0"
