"""WSGI entry point: Django wrapped in relaymw.

Run it from the repository root::

    gunicorn -b 127.0.0.1:8000 --threads 8 examples.django_project.wsgi:application
    waitress-serve --listen=127.0.0.1:8000 examples.django_project.wsgi:application
"""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

from examples.django_project.llm import relay
from relaymw import RelayWSGIMiddleware

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_project.settings")

application = RelayWSGIMiddleware(get_wsgi_application(), relay=relay)
