"""Artifacts and events of interrupted operations, and opt-in auto-resume, against a real Prefect server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.states import Cancelling

from deployments.automations import disable_auto_resume, enable_auto_resume
from resumable.spec import TrainingSpec
from tasks.reporting import artifact_key
from tests.e2e.conftest import (
    Stack,
    assert_bit_identical,
    uninterrupted_tensors,
    wait_for,
)

pytestmark = pytest.mark.slow

SPEC = TrainingSpec(
    recipe="tiny",
    recipe_options={"seconds_per_batch": 0.12},
    epochs=4,
    batch_size=16,
    seed=21,
    device="cpu",
)
TOTAL_BATCHES = 24


def artifacts(stack: Stack, kind: str, operation_id: str) -> list[Any]:
    """Every version of one of the operation's artifacts, oldest first."""
    found = stack.client.read_artifacts(
        artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[artifact_key(kind, operation_id)])
        )
    )
    return sorted(found, key=lambda a: a.created)


def operation_events(stack: Stack, operation_id: str) -> list[dict[str, Any]]:
    response = stack.rest(
        "POST",
        "/events/filter",
        json={
            "filter": {
                "resource": {"id": [f"resumable.operation.{operation_id}"]},
                "occurred": {"since": "2000-01-01T00:00:00Z"},
            },
            "limit": 50,
        },
    )
    response.raise_for_status()
    return response.json()["events"]


def test_artifacts_and_events_tell_one_story_across_a_cancel_and_a_resume(
    stack: Stack,
) -> None:
    operation_id = stack.start_training(SPEC)
    wait_for(lambda: stack.store.latest_good(operation_id), 90, "a periodic checkpoint")
    stack.client.set_flow_run_state(operation_id, Cancelling(message="test"))
    assert stack.wait_final(operation_id, 60).type.value == "CANCELLED"
    stopped = stack.store.latest_good(operation_id)
    resume = stack.resume(operation_id)
    continuation = stack.continuation_of(operation_id)
    assert stack.wait_final(continuation).type.value == "COMPLETED", (
        resume.state.message
    )

    progress = artifacts(stack, "progress", operation_id)
    assert [a.flow_run_id for a in progress][-2:] == [
        operation_id,
        continuation,
    ] or len(progress) >= 2
    by_run = {str(a.flow_run_id): float(a.data) for a in progress}
    assert by_run[operation_id] == pytest.approx(
        100 * stopped.step / TOTAL_BATCHES, abs=0.01
    )
    assert by_run[continuation] == pytest.approx(100.0)

    metrics = json.loads(artifacts(stack, "metrics", operation_id)[-1].data)
    final = stack.store.load_latest_good(operation_id)
    assert [row["epoch"] for row in metrics] == [1, 2, 3, 4]
    assert [row["loss"] for row in metrics] == [
        round(r["loss"], 6) for r in final.state.meta["history"]
    ]

    checkpoints = json.loads(artifacts(stack, "checkpoints", operation_id)[-1].data)
    listed = {(row["kind"], row["flow_run"]) for row in checkpoints}
    assert ("cancellation", operation_id) in listed and (
        "final",
        continuation,
    ) in listed

    loss = artifacts(stack, "loss", operation_id)[-1]
    assert loss.type == "markdown" and "epochs 1–4" in loss.data

    def expected_events() -> list[dict[str, Any]] | None:
        found = operation_events(stack, operation_id)
        names = [e["event"] for e in found]
        return (
            found
            if "resumable.operation.resumed" in names
            and names.count("resumable.checkpoint.committed") >= 3
            else None
        )

    found = wait_for(expected_events, 60, "the operation's events")
    committed = [e for e in found if e["event"] == "resumable.checkpoint.committed"]
    runs = {
        r["prefect.resource.id"]
        for e in committed
        for r in e["related"]
        if r["prefect.resource.role"] == "flow-run"
    }
    assert runs == {
        f"prefect.flow-run.{operation_id}",
        f"prefect.flow-run.{continuation}",
    }
    assert any(
        r["prefect.resource.role"] == "deployment"
        for e in committed
        for r in e["related"]
    )
    resumed = next(e for e in found if e["event"] == "resumable.operation.resumed")
    assert resumed["payload"]["flow_run_id"] == continuation


def test_a_resume_refused_is_an_event(stack: Stack) -> None:
    operation_id = stack.start_training(SPEC.model_copy(update={"epochs": 1}))
    assert stack.wait_final(operation_id).type.value == "COMPLETED"
    assert stack.resume(operation_id).state.type.value == "FAILED"
    refused = wait_for(
        lambda: [
            e
            for e in operation_events(stack, operation_id)
            if e["event"] == "resumable.resume.refused"
        ],
        60,
        "the refused-resume event",
    )
    assert "COMPLETED" in refused[0]["payload"]["reason"]


@pytest.fixture
def auto_resume(stack: Stack) -> Iterator[None]:
    enable_auto_resume(["crashed"])
    yield
    disable_auto_resume()


def test_auto_resume_brings_a_killed_run_back_to_the_same_parameters(
    stack: Stack, auto_resume: None
) -> None:
    stack.plan_faults({"at": "batch", "epoch": 2, "batch": 3, "action": "kill"})
    operation_id = stack.start_training(SPEC)
    assert stack.wait_final(operation_id, 90).type.value == "CRASHED"

    continuation = wait_for(
        lambda: _continuation(stack, operation_id),
        120,
        "the automation to resume the operation",
    )
    assert stack.wait_final(continuation, 180).type.value == "COMPLETED"
    assert_bit_identical(
        stack.store.load_latest_good(operation_id).state.tensors,
        uninterrupted_tensors(SPEC),
    )


def test_auto_resume_stops_at_the_cap_and_leaves_the_operation_resumable_by_hand(
    stack: Stack, auto_resume: None
) -> None:
    stack.plan_faults(
        *(
            {"at": "batch", "epoch": epoch, "batch": batch, "action": "kill"}
            for epoch, batch in ((1, 3), (2, 3), (3, 2), (3, 4))
        )
    )
    operation_id = stack.start_training(SPEC)

    refused = wait_for(
        lambda: [
            e
            for e in operation_events(stack, operation_id)
            if e["event"] == "resumable.resume.refused"
        ],
        420,
        "the refused-resume event at the cap",
    )
    assert "cap of 3 automatic resumes" in refused[0]["payload"]["reason"]
    from resumable import operations, runtime

    with runtime.sessions(stack.settings)() as session:
        operation = operations.get_operation(session=session, id_or_run=operation_id)
        assert (operation.auto_resumes, operation.attempts) == (3, 4)
    assert stack.state(operation.latest_run_id).type.value == "CRASHED"

    by_hand = stack.resume(operation_id)
    assert by_hand.state.type.value == "COMPLETED", by_hand.state.message
    assert (
        stack.wait_final(stack.continuation_of(operation_id), 180).type.value
        == "COMPLETED"
    )
    assert_bit_identical(
        stack.store.load_latest_good(operation_id).state.tensors,
        uninterrupted_tensors(SPEC),
    )


def _continuation(stack: Stack, operation_id: str) -> str | None:
    from resumable import operations, runtime

    with runtime.sessions(stack.settings)() as session:
        return operations.get_operation(
            session=session, id_or_run=operation_id
        ).continuation_run_id
