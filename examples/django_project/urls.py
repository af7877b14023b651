"""One in-app LLM endpoint and a health check."""

from __future__ import annotations

import json

from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.views.decorators.http import require_GET, require_POST

from examples.django_project.llm import client
from relaymw import VersionChoice, current_version


@require_POST
def review(request: HttpRequest) -> JsonResponse:
    # relaymw chose the version (sticky by cookie) before Django saw the request. Under WSGI
    # it is in request.META (environ keys appear there); current_version() works under both.
    choice: VersionChoice | None = request.META.get("relaymw.version") or current_version()
    assert choice is not None, "/api/review must be listed in the route's paths"
    code = json.loads(request.body or b"{}").get("code", "")
    message = client.messages.create(
        model="code-review-production",  # a route alias: relaymw sends the chosen version
        max_tokens=1024,
        messages=[{"role": "user", "content": f"Review this code:\n\n{code}"}],
    )
    text = "".join(block.text for block in message.content if block.type == "text")
    return JsonResponse({"version": choice.version_tag, "review": text})


@require_GET
def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


urlpatterns = [
    path("api/review", review),
    path("health", health),
]
