"""The train-model flow and the resume deployment against a real Prefect server and process workers."""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor

import pytest
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.states import Cancelling

from resumable.spec import CheckpointPolicy, TrainingSpec
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
    seed=5,
    device="cpu",
)


def test_a_run_cancelled_mid_epoch_resumes_from_the_next_batch_to_the_same_parameters(
    stack: Stack,
) -> None:
    operation_id = stack.start_training(SPEC)
    wait_for(
        lambda: stack.store.latest_good(operation_id),
        90,
        "the first periodic checkpoint",
    )

    stack.client.set_flow_run_state(operation_id, Cancelling(message="test"))
    state = stack.wait_final(operation_id, 60)

    assert state.type.value == "CANCELLED"
    stopped = stack.store.latest_good(operation_id)
    assert stopped.kind == "cancellation" and stopped.flow_run_id == operation_id
    assert stopped.batch > 0, "the cancellation should land in the middle of an epoch"
    assert f"epoch {stopped.epoch} batch {stopped.batch}" in state.message

    resume = stack.resume(operation_id)
    assert resume.state.type.value == "COMPLETED", resume.state.message
    assert (
        f"cancellation checkpoint (epoch {stopped.epoch}, batch {stopped.batch})"
        in resume.state.message
    )
    continuation = stack.continuation_of(operation_id)
    assert stack.wait_final(continuation).type.value == "COMPLETED"

    final = stack.store.load_latest_good(operation_id)
    assert final.record.kind == "final" and final.record.flow_run_id == continuation
    assert final.state.meta["position"]["step"] == 24
    assert_bit_identical(final.state.tensors, uninterrupted_tensors(SPEC))


@pytest.mark.faults
def test_an_exception_at_a_chosen_batch_fails_with_a_failure_checkpoint_and_resumes_bit_identical(
    stack: Stack,
) -> None:
    stack.plan_faults({"at": "batch", "epoch": 2, "batch": 3, "action": "raise"})
    operation_id = stack.start_training(SPEC)

    state = stack.wait_final(operation_id, 90)

    assert state.type.value == "FAILED"
    assert "injected fault" in state.message
    failure = stack.store.latest_good(operation_id)
    assert (failure.kind, failure.epoch, failure.batch) == ("failure", 2, 3)

    resume = stack.resume(operation_id)
    assert resume.state.type.value == "COMPLETED", resume.state.message
    assert (
        stack.wait_final(stack.continuation_of(operation_id)).type.value == "COMPLETED"
    )
    assert_bit_identical(
        stack.store.load_latest_good(operation_id).state.tensors,
        uninterrupted_tensors(SPEC),
    )


@pytest.mark.faults
def test_a_killed_run_crashes_and_resumes_from_its_last_periodic_checkpoint(
    stack: Stack,
) -> None:
    stack.plan_faults({"at": "batch", "epoch": 2, "batch": 4, "action": "kill"})
    operation_id = stack.start_training(SPEC)

    state = stack.wait_final(operation_id, 90)

    assert state.type.value == "CRASHED"
    latest = stack.store.latest_good(operation_id)
    assert (latest.kind, latest.epoch, latest.batch) == ("periodic", 2, 0)
    resume = stack.resume(operation_id)
    assert "periodic checkpoint (epoch 2, batch 0)" in resume.state.message
    assert (
        stack.wait_final(stack.continuation_of(operation_id)).type.value == "COMPLETED"
    )
    assert_bit_identical(
        stack.store.load_latest_good(operation_id).state.tensors,
        uninterrupted_tensors(SPEC),
    )


def test_resume_is_refused_for_a_running_and_then_a_completed_operation(
    stack: Stack,
) -> None:
    stack.plan_faults({"at": "batch", "epoch": 0, "batch": 2, "action": "hold"})
    held = stack.fault_plan.with_name(f"{stack.fault_plan.name}.held-batch")
    operation_id = stack.start_training(SPEC.model_copy(update={"epochs": 2}))
    wait_for(held.exists, 120, "the run to stand at epoch 0 batch 2")

    refused = stack.resume(operation_id)
    held.unlink()

    assert refused.state.type.value == "FAILED"
    assert "is RUNNING and cannot be resumed" in refused.state.message
    assert stack.wait_final(operation_id, 120).type.value == "COMPLETED"
    refused = stack.resume(operation_id)
    assert refused.state.type.value == "FAILED"
    assert "is COMPLETED and cannot be resumed" in refused.state.message


def test_resume_of_an_unknown_operation_is_refused_as_not_found(stack: Stack) -> None:
    refused = stack.resume("no-such-operation")
    assert refused.state.type.value == "FAILED"
    assert "does not exist" in refused.state.message


def test_resume_of_an_operation_without_a_checkpoint_is_refused(stack: Stack) -> None:
    stack.plan_faults({"at": "batch", "epoch": 0, "batch": 2, "action": "kill"})
    operation_id = stack.start_training(
        SPEC.model_copy(update={"checkpoint": CheckpointPolicy(every_epochs=None)})
    )
    assert stack.wait_final(operation_id, 90).type.value == "CRASHED"

    refused = stack.resume(operation_id)

    assert refused.state.type.value == "FAILED"
    assert "has no good checkpoint" in refused.state.message


def test_ten_concurrent_resume_runs_schedule_exactly_one_training_run(
    stack: Stack,
) -> None:
    from prefect.deployments import run_deployment

    stack.plan_faults({"at": "batch", "epoch": 1, "batch": 2, "action": "raise"})
    operation_id = stack.start_training(SPEC)
    assert stack.wait_final(operation_id, 90).type.value == "FAILED"

    def start_resume() -> object:
        return run_deployment(
            "resume-training/default",
            parameters={"operation_id": operation_id},
            timeout=0,
            as_subflow=False,
        )

    # Each thread runs in a copy of this context, which holds the stack's Prefect settings.
    contexts = [contextvars.copy_context() for _ in range(10)]
    with ThreadPoolExecutor(max_workers=10) as pool:
        runs = list(pool.map(lambda context: context.run(start_resume), contexts))
    states = [stack.wait_final(str(run.id), 240) for run in runs]

    completed = [s for s in states if s.type.value == "COMPLETED"]
    assert len(completed) == 1, [s.message for s in states]
    continuation = stack.continuation_of(operation_id)
    from resumable import operations, runtime

    with runtime.sessions(stack.settings)() as session:
        owner = operations.get_operation(
            session=session, id_or_run=operation_id
        ).claim_owner
    for refused in (s for s in states if s.type.value != "COMPLETED"):
        assert refused.type.value == "FAILED", refused.message
        assert continuation in refused.message or owner in refused.message, (
            refused.message
        )
    scheduled = stack.client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[f"operation:{operation_id}"])
        )
    )
    assert {str(run.id) for run in scheduled} == {
        operation_id,
        continuation,
    }  # the first attempt, and one continuation
    assert stack.wait_final(continuation).type.value == "COMPLETED"


def test_asking_for_cuda_on_a_machine_without_one_fails_at_once(stack: Stack) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    operation_id = stack.start_training(SPEC.model_copy(update={"device": "cuda"}))
    state = stack.wait_final(operation_id, 60)
    assert state.type.value == "FAILED"
    assert "no usable CUDA device" in state.message
