"""Schemathesis over the OpenAPI schema, against the real app, Redis and worker: no 5xx, and every
response matches the schema (status code, content type, body).

Driven through hypothesis directly: schemathesis' pytest plugin does not run under pytest 9."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from conftest import ADMIN_KEY, KEY, auth, settings as service_settings

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def operations():
    from app.main import create_app

    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(service_settings()))
    return {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}


@pytest.fixture(scope="module")
def ops(app, worker):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    yield {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}
    app.state.celery.control.purge()  # drop what the fuzzing queued, so nothing outlives the session


@pytest.mark.parametrize("label", sorted(operations()))
def test_openapi(ops, label):
    op = ops[label]
    key = ADMIN_KEY if op.path.startswith("/admin") else KEY

    @given(case=op.as_strategy())
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case):
        if op.path == "/admin/meta-train" and isinstance(case.body, dict):
            case.body = {**case.body, "hyperparameters": {"steps": -1}}  # validated, never started
        case.call_and_validate(headers=auth(key), checks=CHECKS)

    run()
