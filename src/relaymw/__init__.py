"""relaymw: gray releases and cost control for LLM traffic, as ASGI/WSGI middleware."""

from __future__ import annotations

from relaymw.config import normalize_weights

__all__ = ["normalize_weights"]
