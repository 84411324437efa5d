"""The resume decision with a fake orchestrator: every outcome, and nothing left claimed on refusal."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from resumable.checkpoints.store import CheckpointStore
from resumable.errors import (
    CheckpointNotFound,
    NotResumable,
    OperationNotFound,
    ResumeConflict,
)
from resumable.resuming import Resumer
from resumable.settings import Settings
from resumable.spec import TrainingSpec
from tests.helpers.fakes import FakeGateway, seed_operation

SPEC = TrainingSpec(recipe="tiny", epochs=2, batch_size=16)


@pytest.fixture
def gateway() -> FakeGateway:
    return FakeGateway()


@pytest.fixture
def resumer(
    sessions: sessionmaker[Session], store: CheckpointStore, gateway: FakeGateway
) -> Resumer:
    return Resumer(sessions, store, gateway, Settings(auto_resume_cap=1))


def interrupted_operation(
    resumer: Resumer,
    gateway: FakeGateway,
    operation_id: str,
    state: str = "CANCELLED",
    checkpoint: bool = True,
) -> None:
    seed_operation(
        resumer.sessions,
        resumer.store,
        gateway,
        operation_id,
        state=state,
        batches=5 if checkpoint else None,
    )


def test_a_cancelled_operation_resumes_from_its_checkpoint(
    resumer: Resumer, gateway: FakeGateway, operation_id: str
) -> None:
    interrupted_operation(resumer, gateway, operation_id)
    result = resumer.resume(operation_id, owner="test")
    assert (
        result.status == "SCHEDULED"
        and result.flow_run_id in gateway.scheduled.values()
        and result.attempt == 2
    )
    assert (
        result.resumed_from.checkpoint_type,
        result.resumed_from.epoch,
        result.resumed_from.batch,
    ) == ("cancellation", 0, 5)


@pytest.mark.parametrize(
    "state", ["RUNNING", "SCHEDULED", "PENDING", "CANCELLING", "PAUSED", "COMPLETED"]
)
def test_an_operation_that_is_not_interrupted_is_not_resumable(
    resumer: Resumer, gateway: FakeGateway, operation_id: str, state: str
) -> None:
    interrupted_operation(resumer, gateway, operation_id, state=state)
    with pytest.raises(NotResumable, match=state) as caught:
        resumer.resume(operation_id, owner="test")
    assert caught.value.state == state


def test_an_unknown_operation_is_not_found(resumer: Resumer) -> None:
    with pytest.raises(OperationNotFound):
        resumer.resume("does-not-exist", owner="test")


def test_without_a_checkpoint_the_claim_is_given_back(
    resumer: Resumer, gateway: FakeGateway, operation_id: str
) -> None:
    interrupted_operation(
        resumer, gateway, operation_id, state="CRASHED", checkpoint=False
    )
    with pytest.raises(CheckpointNotFound):
        resumer.resume(operation_id, owner="first")
    with pytest.raises(CheckpointNotFound):
        resumer.resume(
            operation_id, owner="second"
        )  # not a conflict: nothing stayed claimed


def test_a_second_resume_is_a_conflict_naming_the_winner(
    resumer: Resumer, gateway: FakeGateway, operation_id: str
) -> None:
    interrupted_operation(resumer, gateway, operation_id, state="FAILED")
    won = resumer.resume(operation_id, owner="first")
    with pytest.raises(ResumeConflict, match=won.flow_run_id) as caught:
        resumer.resume(operation_id, owner="second")
    assert caught.value.winner == "first"


def test_a_resume_by_attempt_id_resumes_the_operation(
    resumer: Resumer, gateway: FakeGateway, operation_id: str
) -> None:
    interrupted_operation(resumer, gateway, operation_id)
    first = resumer.resume(operation_id, owner="one")
    gateway.states[first.flow_run_id] = "CRASHED"
    second = resumer.resume(first.flow_run_id, owner="two")
    assert second.operation_id == operation_id and second.attempt == 3


def test_automatic_resumes_stop_at_the_cap(
    resumer: Resumer, gateway: FakeGateway, operation_id: str
) -> None:
    interrupted_operation(resumer, gateway, operation_id, state="CRASHED")
    first = resumer.resume(operation_id, owner="auto-1", automatic=True)
    gateway.states[first.flow_run_id] = "CRASHED"
    with pytest.raises(NotResumable, match="cap of 1 automatic"):
        resumer.resume(operation_id, owner="auto-2", automatic=True)
    assert resumer.resume(operation_id, owner="by-hand").attempt == 3
