"""Settings of the minimal Django example: no database, no apps, one view."""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "insecure-example-key-change-me")
DEBUG = os.environ.get("DJANGO_DEBUG", "0") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",")

INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []  # relaymw wraps the whole application instead (see wsgi.py)
DATABASES: dict[str, dict[str, str]] = {}

ROOT_URLCONF = "examples.django_project.urls"
WSGI_APPLICATION = "examples.django_project.wsgi.application"  # used by `manage.py runserver`
USE_TZ = True
