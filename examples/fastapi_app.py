"""relaymw in a FastAPI app: two lines, then every LLM call is gray-released and metered.

Run it (from the repository root) against a local FakeLLM::

    python -m relaymw.testing --port 8089 &
    uvicorn examples.fastapi_app:app --port 8000

``RELAYMW_CONFIG`` picks another configuration (a path, ``redis://...`` or ``https://...``);
the default is ``relay.toml`` beside this file. ``RELAYMW_PRINT_METRICS=1`` prints a line per
LLM call (see ``examples/custom_sink.py``).

What you get:

* **Gateway mode**: the app now also answers the OpenAI and Anthropic APIs for the route
  aliases of the configuration, so existing SDK code only changes its base URL::

      openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
          .chat.completions.create(model="chat-production", messages=[...])

* **In-app mode**: ``POST /api/review`` below is listed in the route's ``paths``, so relaymw
  picks its version (sticky by cookie) before the handler runs; the handler's LLM calls go
  through ``relay.async_client()`` and are rewritten for that version.

      curl -c jar -b jar -X POST localhost:8000/api/review -H 'content-type: application/json' \\
           -d '{"code": "def add(a, b): return a - b"}'
"""

from __future__ import annotations

import os
from pathlib import Path

import anthropic
from fastapi import FastAPI
from pydantic import BaseModel

from relaymw import Relay, RelayMiddleware, current_version

CONFIG = os.environ.get("RELAYMW_CONFIG", str(Path(__file__).with_name("relay.toml")))

app = FastAPI(title="relaymw FastAPI example")

# The two lines.
relay = Relay.from_store(CONFIG)
app.add_middleware(RelayMiddleware, relay=relay)

if os.environ.get("RELAYMW_PRINT_METRICS") == "1":
    from examples.custom_sink import install

    install()

# The Anthropic SDK on relaymw's transport. The model name is a route alias: relaymw swaps in
# the chosen version's model, parameters, system prompt, base URL and API key (the key below
# is never sent anywhere).
llm = anthropic.AsyncAnthropic(
    api_key="replaced-by-relaymw",
    http_client=relay.async_client(flavor="httpx2"),  # the Anthropic SDK wants httpx2 clients
    max_retries=0,
)


class ReviewRequest(BaseModel):
    code: str


class ReviewResponse(BaseModel):
    version: str
    review: str


@app.post("/api/review")
async def review(body: ReviewRequest) -> ReviewResponse:
    choice = current_version()  # also at request.state.relay
    assert choice is not None, "/api/review must be listed in the route's paths"
    message = await llm.messages.create(
        model="code-review-production",
        max_tokens=1024,
        messages=[{"role": "user", "content": f"Review this code:\n\n{body.code}"}],
    )
    text = "".join(block.text for block in message.content if block.type == "text")
    return ReviewResponse(version=choice.version_tag, review=text)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}  # not LLM-bound: relaymw passes it straight through
