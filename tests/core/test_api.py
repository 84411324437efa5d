"""The operations HTTP API in-process, on real databases, with a fake orchestrator: every status code."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from resumable.api import create_app
from resumable.checkpoints.store import CheckpointStore
from resumable.service import OperationsService
from resumable.settings import Settings
from resumable.spec import TrainingSpec
from tests.helpers.fakes import FakeGateway, seed_operation

SPEC = TrainingSpec(recipe="tiny", epochs=2, batch_size=16)


@pytest.fixture
def gateway() -> FakeGateway:
    return FakeGateway()


@pytest.fixture
def service(
    sessions: sessionmaker[Session], store: CheckpointStore, gateway: FakeGateway
) -> OperationsService:
    return OperationsService(sessions, store, gateway, Settings())


@pytest.fixture
def client(service: OperationsService) -> TestClient:
    return TestClient(create_app(service, Settings()))


def add_operation(
    service: OperationsService,
    gateway: FakeGateway,
    operation_id: str,
    state: str,
    checkpoint: bool = True,
) -> None:
    seed_operation(
        service.sessions,
        service.store,
        gateway,
        operation_id,
        state=state,
        batches=3 if checkpoint else None,
    )


def test_resume_answers_200_with_where_it_resumed_from(
    client: TestClient, service, gateway, operation_id: str
) -> None:
    add_operation(service, gateway, operation_id, "CANCELLED")
    response = client.post(f"/operations/{operation_id}/resume")
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True
    data = body["data"]
    assert data["operation_id"] == operation_id and data["status"] == "SCHEDULED"
    assert data["flow_run_id"] in gateway.scheduled.values()
    assert {
        k: data["resumed_from"][k] for k in ("checkpoint_type", "epoch", "batch")
    } == {"checkpoint_type": "cancellation", "epoch": 0, "batch": 3}
    assert "created_at" in data["resumed_from"]


def test_resume_of_an_unknown_operation_is_404(client: TestClient) -> None:
    response = client.post("/operations/does-not-exist/resume")
    assert response.status_code == 404
    assert response.json()["error"] == "operation_not_found"


def test_resume_without_a_checkpoint_is_404(
    client: TestClient, service, gateway, operation_id: str
) -> None:
    add_operation(service, gateway, operation_id, "CRASHED", checkpoint=False)
    response = client.post(f"/operations/{operation_id}/resume")
    assert response.status_code == 404
    assert response.json()["error"] == "checkpoint_not_found"


@pytest.mark.parametrize(
    "state", ["RUNNING", "COMPLETED", "SCHEDULED", "PENDING", "CANCELLING", "PAUSED"]
)
def test_resume_of_an_operation_that_is_not_interrupted_is_409_naming_the_state(
    client: TestClient, service, gateway, operation_id: str, state: str
) -> None:
    add_operation(service, gateway, operation_id, state)
    response = client.post(f"/operations/{operation_id}/resume")
    assert response.status_code == 409
    assert response.json()["state"] == state and state in response.json()["detail"]


def test_concurrent_resumes_give_one_200_and_409s_naming_the_winner(
    client: TestClient, service, gateway, operation_id: str
) -> None:
    add_operation(service, gateway, operation_id, "FAILED")
    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(
            pool.map(
                lambda _: client.post(f"/operations/{operation_id}/resume"), range(20)
            )
        )
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] + [409] * 19
    winner = next(
        r.json()["data"]["flow_run_id"] for r in responses if r.status_code == 200
    )
    owner = service.get(operation_id).claim_owner
    for response in (r for r in responses if r.status_code == 409):
        body = response.json()
        assert body["error"] == "already_resumed"
        assert body["winner"] == owner or body.get("flow_run_id") == winner


@pytest.mark.parametrize(
    "bad", ["a%20b", "x" * 65, "-leading-dash", "semi;colon", "a..b"]
)
def test_a_malformed_id_is_422(client: TestClient, bad: str) -> None:
    response = client.post(f"/operations/{bad}/resume")
    assert response.status_code == 422
    assert response.json()["error"] == "invalid"


def test_an_unreachable_prefect_is_503_and_nothing_is_claimed(
    client: TestClient, service, gateway, operation_id: str
) -> None:
    add_operation(service, gateway, operation_id, "CANCELLED")
    gateway.reachable = False
    response = client.post(f"/operations/{operation_id}/resume")
    assert response.status_code == 503
    assert service.get(operation_id).claim_owner is None
    gateway.reachable = True
    assert client.post(f"/operations/{operation_id}/resume").status_code == 200


def test_listing_filters_by_status_and_resumability(
    client: TestClient, service, gateway, operation_id: str
) -> None:
    add_operation(service, gateway, operation_id, "CANCELLED")
    add_operation(service, gateway, f"{operation_id}-done", "COMPLETED")
    resumable = client.get("/operations", params={"resumable": "true"}).json()["data"]
    assert operation_id in {
        o["id"] for o in resumable
    } and f"{operation_id}-done" not in {o["id"] for o in resumable}
    completed = client.get("/operations", params={"status": "completed"}).json()["data"]
    assert f"{operation_id}-done" in {o["id"] for o in completed}


def test_show_and_checkpoints_accept_an_attempt_id(
    client: TestClient, service, gateway, operation_id: str
) -> None:
    add_operation(service, gateway, operation_id, "CANCELLED")
    resumed = client.post(f"/operations/{operation_id}/resume").json()["data"][
        "flow_run_id"
    ]
    detail = client.get(f"/operations/{resumed}").json()["data"]
    assert detail["id"] == operation_id and [
        a["number"] for a in detail["attempt_runs"]
    ] == [1, 2]
    checkpoints = client.get(f"/operations/{resumed}/checkpoints").json()["data"]
    assert [c["kind"] for c in checkpoints] == ["cancellation"]
    assert client.get("/operations/nope/checkpoints").status_code == 404


def test_cancel_asks_prefect_to_cancel_the_latest_attempt(
    client: TestClient, service, gateway, operation_id: str
) -> None:
    add_operation(service, gateway, operation_id, "RUNNING")
    response = client.post(f"/operations/{operation_id}/cancel")
    assert response.status_code == 200 and gateway.cancelled == [operation_id]
    gateway.states[operation_id] = "COMPLETED"
    assert client.post(f"/operations/{operation_id}/cancel").status_code == 409


def test_with_a_token_every_request_needs_it(
    service: OperationsService, gateway, operation_id: str
) -> None:
    client = TestClient(create_app(service, Settings(api_token=SecretStr("s3cret"))))
    add_operation(service, gateway, operation_id, "CANCELLED")
    assert client.get("/operations").status_code == 401
    assert (
        client.post(
            f"/operations/{operation_id}/resume",
            headers={"Authorization": "Bearer wrong"},
        ).status_code
        == 401
    )
    assert service.get(operation_id).claim_owner is None
    assert (
        client.get(
            "/operations", headers={"Authorization": "Bearer s3cret"}
        ).status_code
        == 200
    )
    assert (
        client.post(
            f"/operations/{operation_id}/resume",
            headers={"Authorization": "Bearer s3cret"},
        ).status_code
        == 200
    )
