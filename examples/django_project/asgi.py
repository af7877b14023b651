"""ASGI entry point: Django wrapped in relaymw.

Run it from the repository root::

    uvicorn examples.django_project.asgi:application --port 8000
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

from examples.django_project.llm import relay
from relaymw import RelayMiddleware

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_project.settings")

application = RelayMiddleware(get_asgi_application(), relay=relay)
