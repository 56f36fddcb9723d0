"""Schemathesis fuzzes every operation of the OpenAPI schema: no 5xx, and every response
(errors included) matches the schema."""

from __future__ import annotations

from dataclasses import replace

import pytest
import schemathesis

# imported here, while the collection runs alone: from_asgi imports it on first use, and
# pytest rewrites (parses) it then, beside the app's threads; CPython 3.11's AST builder
# keeps one recursion count for all threads and raised "AST constructor recursion depth
# mismatch" on a CI run (python/cpython#106905)
import schemathesis.specs.openapi.schemas
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from cliplens.server import ServerSettings, create_app

CHECKS = [
    schemathesis.checks.not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir, photos):
    from cliplens.catalog.db import Catalog
    from cliplens.catalog.update import update_catalog
    from cliplens.models.ref import ModelRef

    db = tmp_path_factory.mktemp("schema") / "catalog.db"
    with Catalog(db) as cat:
        update_catalog(cat, ModelRef(f"local:{tiny_model_dir}"), [photos], workers=0)
    settings = ServerSettings(model=f"local:{tiny_model_dir}", db=db, timeout_s=30)
    # clip-retrieval's routes too; OpenAI's (under /openai/v1) are always served
    return create_app(replace(settings, clip_retrieval=True))


def test_no_server_errors_and_no_schema_violations(app):
    # each operation is fuzzed on its own, so a failure names it
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {operation.path for operation in operations}
    assert {"/knn-service", "/metadata", "/openai/v1/embeddings", "/openai/v1/models"} <= paths
    assert len(operations) >= 20
    for operation in operations:

        @given(operation.as_strategy())
        @settings(
            max_examples=25,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case):
            case.call_and_validate(checks=CHECKS)

        fuzz()
