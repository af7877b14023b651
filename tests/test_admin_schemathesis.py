"""schemathesis against the admin API's own ``/openapi.json``: no 500, and every answer is
what the document says (status codes, content types, headers, response schemas).

The admin app runs under uvicorn on a relay whose store is a TOML file (the strictest
format: no null), with a rate limit high enough never to be the answer. Each operation gets
generated requests that fit its schema and requests that do not, all with the bearer token.
(schemathesis' pytest plugin does not run on this pytest, so the cases are driven with
hypothesis directly: the same strategies and checks.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import BaseSchema, Case, GenerationMode, checks

from relaymw import Relay
from relaymw.admin_openapi import openapi_document
from relaymw.stores import FileStore
from relaymw.testing import FakeLLM, serve_asgi
from tests.support import relay_document

TOKEN = "schemathesis-token-4b8d2f6a"
# Left out on purpose: the document cannot say that a route's tags must be registered or
# that weights sum to 100, so schema-valid data may rightly get a 422; and unknown query
# parameters or an empty ``end_time`` are ignored rather than refused.
LENIENT = [checks.positive_data_acceptance, checks.negative_data_rejection]
OPERATIONS = [
    (method.upper(), path)
    for path, item in openapi_document()["paths"].items()
    for method in item
    if method != "parameters"
]


@pytest.fixture(scope="module")
def admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path: Path = tmp_path_factory.mktemp("admin") / "relay.toml"
    with FakeLLM() as fake:
        FileStore(path).save(relay_document(fake.base_url))
        relay = Relay.from_store(path)
        admin = relay.admin_app(token=TOKEN, rate_limit="100000/second")
        try:
            with serve_asgi(admin) as url:
                yield url
        finally:
            relay.close()


@pytest.fixture(scope="module")
def admin_schema(admin_url: str) -> BaseSchema:
    return schemathesis.openapi.from_url(f"{admin_url}/openapi.json")


@pytest.mark.parametrize(
    ("method", "path", "mode"),
    [
        (method, path, mode)
        for method, path in OPERATIONS
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        if path != "/openapi.json" or mode is GenerationMode.POSITIVE  # nothing to get wrong
    ],
)
def test_no_operation_answers_500_or_off_its_document(
    admin_schema: BaseSchema, admin_url: str, method: str, path: str, mode: GenerationMode
) -> None:
    operation = admin_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def call(case: Case[Any]) -> None:
        case.call_and_validate(
            base_url=admin_url,
            headers={"Authorization": f"Bearer {TOKEN}"},
            excluded_checks=LENIENT,
        )

    call()


def test_every_endpoint_is_in_the_document() -> None:
    assert len(OPERATIONS) == 14
    assert ("PATCH", "/routes/traffic") in OPERATIONS and ("GET", "/audit") in OPERATIONS
