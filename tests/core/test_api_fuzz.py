"""Requests generated from the API's own OpenAPI schema never get a 500."""

from __future__ import annotations

import tempfile

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from resumable.api import create_app
from resumable.checkpoints.store import CheckpointStore
from resumable.db import session_factory
from resumable.service import OperationsService
from resumable.settings import Settings
from tests.helpers.fakes import FakeGateway

_folder = tempfile.mkdtemp(prefix="resumable-fuzz-")
_sessions = session_factory(f"sqlite:///{_folder}/fuzz.db")
APP = create_app(
    OperationsService(
        _sessions,
        CheckpointStore(_sessions, f"file://{_folder}/checkpoints"),
        FakeGateway(),
        Settings(),
    ),
    Settings(),
)
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP)
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.label)
def test_no_generated_request_gets_a_server_error(operation) -> None:
    @settings(
        max_examples=30,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=operation.as_strategy())
    def check(case) -> None:
        response = case.call()
        case.validate_response(response, checks=(not_a_server_error,))

    check()


def test_the_schema_covers_every_route() -> None:
    labels = {op.label for op in OPERATIONS}
    assert labels == {
        "GET /operations",
        "GET /operations/{operation_id}",
        "GET /operations/{operation_id}/checkpoints",
        "POST /operations/{operation_id}/cancel",
        "POST /operations/{operation_id}/resume",
    }
