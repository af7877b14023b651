"""The one relay of the process, shared by wsgi.py, asgi.py and the view."""

from __future__ import annotations

import os
from pathlib import Path

import anthropic

from relaymw import Relay

CONFIG = os.environ.get("RELAYMW_CONFIG", str(Path(__file__).parents[1] / "relay.toml"))

relay = Relay.from_store(CONFIG)

# The Anthropic SDK on relaymw's transport; relaymw sends the upstream's real key.
client = anthropic.Anthropic(
    api_key="replaced-by-relaymw",
    http_client=relay.client(flavor="httpx2"),  # the Anthropic SDK wants httpx2 clients
    max_retries=0,
)
