"""relaymw in a Flask app: wrap ``app.wsgi_app`` and every LLM call is gray-released and metered.

Run it (from the repository root) against a local FakeLLM::

    python -m relaymw.testing --port 8089 &
    waitress-serve --listen=127.0.0.1:8000 examples.flask_app:app
    # or: gunicorn -b 127.0.0.1:8000 --threads 8 examples.flask_app:app
    # or, for development: flask --app examples.flask_app run

``RELAYMW_CONFIG`` picks another configuration; the default is ``relay.toml`` beside this file.

Gateway mode (the OpenAI and Anthropic APIs for the configured route aliases) works as in
``fastapi_app.py``; ``POST /api/review`` shows in-app mode with the synchronous Anthropic SDK.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anthropic
from flask import Flask, request

from relaymw import Relay, RelayWSGIMiddleware, VersionChoice

CONFIG = os.environ.get("RELAYMW_CONFIG", str(Path(__file__).with_name("relay.toml")))

app = Flask(__name__)

# The two lines.
relay = Relay.from_store(CONFIG)
app.wsgi_app = RelayWSGIMiddleware(app.wsgi_app, relay=relay)  # type: ignore[method-assign]

# The Anthropic SDK on relaymw's (sync) transport; relaymw sends the upstream's real key.
llm = anthropic.Anthropic(
    api_key="replaced-by-relaymw",
    http_client=relay.client(flavor="httpx2"),  # the Anthropic SDK wants httpx2 clients
    max_retries=0,
)


@app.post("/api/review")
def review() -> dict[str, Any]:
    # The middleware chose the version (sticky by cookie) before this view runs.
    choice: VersionChoice = request.environ["relaymw.version"]
    code = (request.get_json(silent=True) or {}).get("code", "")
    message = llm.messages.create(
        model="code-review-production",  # a route alias: relaymw sends the chosen version
        max_tokens=1024,
        messages=[{"role": "user", "content": f"Review this code:\n\n{code}"}],
    )
    text = "".join(block.text for block in message.content if block.type == "text")
    return {"version": choice.version_tag, "review": text}


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}
