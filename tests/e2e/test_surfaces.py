"""Every way in, against a real Prefect server, real workers and PostgreSQL metadata.

The HTTP API, the `resumable` CLI, the resume deployment (through run_deployment, the
prefect CLI and Prefect's REST API) and the UI's own Retry and Pause/Resume calls.
"""

from __future__ import annotations

import contextvars
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.states import Cancelling

from resumable.spec import TrainingSpec
from tests.e2e.conftest import (
    ApiServer,
    Stack,
    assert_bit_identical,
    cli_env,
    start_api_server,
    uninterrupted_tensors,
    wait_for,
)

pytestmark = pytest.mark.slow

SPEC = TrainingSpec(
    recipe="tiny",
    recipe_options={"seconds_per_batch": 0.12},
    epochs=4,
    batch_size=16,
    seed=9,
    device="cpu",
)
# Slow enough that a continuation is still running while the losers of a race are answered.
SLOW = SPEC.model_copy(
    update={"recipe_options": {"seconds_per_batch": 0.5}, "epochs": 6}
)
CLI = str(Path(sys.executable).with_name("resumable"))
PREFECT = str(Path(sys.executable).with_name("prefect"))


def failed_operation(stack: Stack, spec: TrainingSpec = SPEC) -> str:
    stack.plan_faults({"at": "batch", "epoch": 1, "batch": 2, "action": "raise"})
    operation_id = stack.start_training(spec)
    assert stack.wait_final(operation_id, 90).type.value == "FAILED"
    stack.plan_faults()
    return operation_id


def cancelled_operation(stack: Stack, spec: TrainingSpec = SPEC) -> str:
    operation_id = stack.start_training(spec)
    wait_for(lambda: stack.store.latest_good(operation_id), 90, "a periodic checkpoint")
    stack.client.set_flow_run_state(operation_id, Cancelling(message="test"))
    assert stack.wait_final(operation_id, 60).type.value == "CANCELLED"
    # The worker reports the cancellation once more after the process has exited; a Retry
    # that lands before that report is overwritten by it (Prefect 3.9), so wait for it.
    wait_for(
        lambda: "cancelled successfully" in (stack.state(operation_id).message or ""),
        30,
        "the worker's own report",
    )
    return operation_id


def trained_by(stack: Stack, operation_id: str) -> set[str]:
    return {
        r.flow_run_id
        for r in stack.store.list_checkpoints(operation_id, include_all=True)
        if r.kind in ("periodic", "final")
    }


def test_fifty_mixed_resume_requests_give_exactly_one_continuation(
    stack: Stack, api_server: ApiServer
) -> None:
    from prefect.deployments import run_deployment

    operation_id = failed_operation(stack, SLOW)

    def by_api() -> tuple[str, int, str]:
        response = httpx.post(
            f"{api_server.url}/operations/{operation_id}/resume", timeout=120
        )
        return "api", response.status_code, response.text

    def by_deployment() -> tuple[str, str, str]:
        run = run_deployment(
            "resume-training/default",
            parameters={"operation_id": operation_id},
            timeout=0,
            as_subflow=False,
        )
        state = stack.wait_final(str(run.id), 300)
        return "deployment", state.type.value, state.message or ""

    def by_cli() -> tuple[str, int, str]:
        done = subprocess.run(
            [CLI, "resume", operation_id],
            env=cli_env(stack),
            capture_output=True,
            text=True,
            timeout=300,
        )
        return "cli", done.returncode, done.stdout + done.stderr

    # Every surface takes part; the resume deployment and the CLI each start a process that
    # imports torch and Prefect (seconds of CPU on 2 cores), so most requests are HTTP ones.
    calls = [by_api] * 40 + [by_deployment] * 6 + [by_cli] * 4
    contexts = [contextvars.copy_context() for _ in calls]
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        outcomes = list(
            pool.map(
                lambda pair: pair[0].run(pair[1]), zip(contexts, calls, strict=True)
            )
        )

    winners = [o for o in outcomes if o[1] in (200, 0, "COMPLETED")]
    assert len(winners) == 1, outcomes
    continuation = stack.continuation_of(operation_id)
    from resumable import operations, runtime

    with runtime.sessions(stack.settings)() as session:
        owner = operations.get_operation(
            session=session, id_or_run=operation_id
        ).claim_owner
    for surface, code, text in outcomes:
        if (surface, code, text) in winners:
            continue
        assert code in (409, 4, "FAILED"), (surface, code, text)
        assert continuation in text or owner in text, (surface, code, text)
    scheduled = stack.client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[f"operation:{operation_id}"])
        )
    )
    assert {str(r.id) for r in scheduled} == {
        operation_id,
        continuation,
    }  # the first attempt, and one continuation
    stack.client.set_flow_run_state(continuation, Cancelling(message="test over"))
    stack.wait_final(continuation, 60)


def test_the_api_answers_each_outcome(stack: Stack, api_server: ApiServer) -> None:
    operation_id = cancelled_operation(stack)
    resumed = httpx.post(
        f"{api_server.url}/operations/{operation_id}/resume", timeout=60
    )
    assert resumed.status_code == 200, resumed.text
    data = resumed.json()["data"]
    assert data["resumed_from"]["checkpoint_type"] == "cancellation"
    again = httpx.post(f"{api_server.url}/operations/{operation_id}/resume", timeout=60)
    assert again.status_code == 409 and data["flow_run_id"] in again.text
    assert (
        httpx.post(f"{api_server.url}/operations/unknown-operation/resume").status_code
        == 404
    )
    assert httpx.post(f"{api_server.url}/operations/bad%20id/resume").status_code == 422
    assert stack.wait_final(data["flow_run_id"]).type.value == "COMPLETED"
    assert (
        httpx.post(f"{api_server.url}/operations/{operation_id}/resume").json()["state"]
        == "COMPLETED"
    )
    listed = httpx.get(
        f"{api_server.url}/operations", params={"status": "COMPLETED"}
    ).json()["data"]
    assert operation_id in {o["id"] for o in listed}


def test_the_api_answers_503_with_nothing_claimed_when_prefect_is_down(
    stack: Stack,
) -> None:
    from deployments.local import free_port

    operation_id = cancelled_operation(stack)
    server = start_api_server(
        stack, {"PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    )
    try:
        response = httpx.post(
            f"{server.url}/operations/{operation_id}/resume", timeout=120
        )
    finally:
        server.process.terminate()
    assert response.status_code == 503, response.text
    from resumable import operations, runtime

    with runtime.sessions(stack.settings)() as session:
        assert (
            operations.get_operation(
                session=session, id_or_run=operation_id
            ).claim_owner
            is None
        )


def test_the_api_needs_its_token_when_one_is_set(stack: Stack) -> None:
    server = start_api_server(stack, {"RESUMABLE_API_TOKEN": "t0ken"})
    try:
        assert httpx.get(f"{server.url}/operations").status_code == 401
        assert (
            httpx.get(
                f"{server.url}/operations", headers={"Authorization": "Bearer t0ken"}
            ).status_code
            == 200
        )
    finally:
        server.process.terminate()


def test_the_cli_resumes_and_watches_and_exits_with_the_documented_codes(
    stack: Stack,
) -> None:
    from deployments.local import free_port

    operation_id = cancelled_operation(stack)
    env = cli_env(stack)
    watched = subprocess.run(
        [CLI, "resume", operation_id, "--watch"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert watched.returncode == 0, watched.stderr
    assert (
        "from its cancellation checkpoint" in watched.stdout
        and "ended COMPLETED" in watched.stdout
    )
    assert_bit_identical(
        stack.store.load_latest_good(operation_id).state.tensors,
        uninterrupted_tensors(SPEC),
    )
    codes = {
        "conflict": subprocess.run(
            [CLI, "resume", operation_id], env=env, capture_output=True, timeout=120
        ).returncode,
        "not found": subprocess.run(
            [CLI, "resume", "no-such-op"], env=env, capture_output=True, timeout=120
        ).returncode,
        "usage": subprocess.run(
            [CLI, "resume", "bad/id"], env=env, capture_output=True, timeout=120
        ).returncode,
        "unreachable": subprocess.run(
            [CLI, "resume", operation_id],
            env={**env, "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"},
            capture_output=True,
            timeout=120,
        ).returncode,
    }
    assert codes == {"conflict": 4, "not found": 3, "usage": 2, "unreachable": 5}


def test_the_prefect_cli_and_rest_api_give_the_same_outcomes(stack: Stack) -> None:
    operation_id = cancelled_operation(stack)
    refused = subprocess.run(
        [
            PREFECT,
            "deployment",
            "run",
            "resume-training/default",
            "-p",
            "operation_id=no-such-op",
            "--watch",
        ],
        env=cli_env(stack),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode != 0
    assert "does not exist" in refused.stdout + refused.stderr

    deployment = stack.rest("GET", "/deployments/name/resume-training/default").json()[
        "id"
    ]
    created = stack.rest(
        "POST",
        f"/deployments/{deployment}/create_flow_run",
        json={"parameters": {"operation_id": operation_id}},
    )
    assert created.status_code == 201
    state = stack.wait_final(created.json()["id"], 180)
    assert state.type.value == "COMPLETED" and "Resumed operation" in state.message

    watched = subprocess.run(
        [
            PREFECT,
            "deployment",
            "run",
            "resume-training/default",
            "-p",
            f"operation_id={operation_id}",
            "--watch",
        ],
        env=cli_env(stack),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Resume refused" in watched.stdout + watched.stderr
    stack.wait_final(stack.continuation_of(operation_id))


def test_ui_retry_of_a_cancelled_run_continues_its_checkpoint_and_of_a_completed_run_does_nothing(
    stack: Stack,
) -> None:
    operation_id = cancelled_operation(stack)
    stopped = stack.store.latest_good(operation_id)

    retry = {
        "state": {
            "type": "SCHEDULED",
            "name": "AwaitingRetry",
            "message": "Retry from the UI",
        },
        "force": True,
    }
    assert (
        stack.rest(
            "POST", f"/flow_runs/{operation_id}/set_state", json=retry
        ).status_code
        == 201
    )
    wait_for(
        lambda: stack.state(operation_id).type.value != "SCHEDULED",
        60,
        "the retry to start",
    )
    assert stack.wait_final(operation_id, 120).type.value == "COMPLETED"

    final = stack.store.load_latest_good(operation_id)
    assert final.record.flow_run_id == operation_id and final.record.kind == "final"
    restarted = [
        r
        for r in stack.store.list_checkpoints(operation_id, include_all=True)
        if r.step > stopped.step
    ]
    assert restarted and all(r.flow_run_id == operation_id for r in restarted)
    assert_bit_identical(final.state.tensors, uninterrupted_tensors(SPEC))

    assert (
        stack.rest(
            "POST", f"/flow_runs/{operation_id}/set_state", json=retry
        ).status_code
        == 201
    )
    wait_for(
        lambda: stack.state(operation_id).type.value != "SCHEDULED",
        60,
        "the second retry to start",
    )
    state = stack.wait_final(operation_id, 120)
    assert state.type.value == "COMPLETED" and "already completed" in state.message
    assert stack.store.latest_good(operation_id).id == final.record.id


def test_ui_pause_saves_a_checkpoint_and_resume_continues_from_it(stack: Stack) -> None:
    operation_id = stack.start_training(SPEC)
    wait_for(lambda: stack.store.latest_good(operation_id), 90, "a periodic checkpoint")

    pause = {
        "state": {
            "type": "PAUSED",
            "name": "Suspended",
            "state_details": {"pause_reschedule": True},
        }
    }
    assert (
        stack.rest(
            "POST", f"/flow_runs/{operation_id}/set_state", json=pause
        ).status_code
        == 201
    )
    paused = wait_for(
        lambda: (
            (r := stack.store.latest_good(operation_id)) is not None
            and r.kind == "cancellation"
            and r
        ),
        60,
        "the pause checkpoint",
    )
    assert stack.state(operation_id).type.value == "PAUSED"

    assert (
        stack.rest("POST", f"/flow_runs/{operation_id}/resume", json={}).status_code
        == 201
    )
    assert stack.wait_final(operation_id, 120).type.value == "COMPLETED"
    checkpoints = stack.store.list_checkpoints(operation_id, include_all=True)
    assert all(
        r.step >= paused.step for r in checkpoints if r.created_at > paused.created_at
    )
    assert_bit_identical(
        stack.store.load_latest_good(operation_id).state.tensors,
        uninterrupted_tensors(SPEC),
    )


def test_a_ui_retry_racing_a_resume_trains_once(stack: Stack) -> None:
    from prefect.deployments import run_deployment

    operation_id = cancelled_operation(stack, SLOW)
    stopped = stack.store.latest_good(operation_id)
    retry = {"state": {"type": "SCHEDULED", "name": "AwaitingRetry"}, "force": True}
    resume_run = run_deployment(
        "resume-training/default",
        parameters={"operation_id": operation_id},
        timeout=0,
        as_subflow=False,
    )
    stack.rest("POST", f"/flow_runs/{operation_id}/set_state", json=retry)

    resume_state = stack.wait_final(str(resume_run.id), 180)
    runs = [operation_id] + (
        [stack.continuation_of(operation_id)]
        if resume_state.type.value == "COMPLETED"
        else []
    )
    finals = {run: stack.wait_final(run, 240) for run in runs}

    after = [
        r
        for r in stack.store.list_checkpoints(operation_id, include_all=True)
        if r.step > stopped.step
    ]
    assert len({r.flow_run_id for r in after}) == 1, "two runs trained the operation"
    if len(runs) == 2:
        loser = [
            run
            for run, state in finals.items()
            if "is being trained by" in (state.message or "")
        ]
        assert len(loser) == 1, {run: s.message for run, s in finals.items()}
    else:
        assert "cannot be resumed" in resume_state.message
    assert_bit_identical(
        stack.store.load_latest_good(operation_id).state.tensors,
        uninterrupted_tensors(SLOW),
    )


def test_a_resume_that_died_after_its_claim_is_finished_by_running_it_again(
    stack: Stack, api_server: ApiServer
) -> None:
    from prefect.deployments import run_deployment

    operation_id = cancelled_operation(stack)
    stack.plan_faults({"at": "resume_after_claim", "action": "kill"})
    run = run_deployment(
        "resume-training/default",
        parameters={"operation_id": operation_id},
        timeout=0,
        as_subflow=False,
    )
    assert stack.wait_final(str(run.id), 120).type.value == "CRASHED"
    # The claim is held by the dead run: another request is refused, naming it...
    refused = httpx.post(
        f"{api_server.url}/operations/{operation_id}/resume", timeout=60
    )
    assert refused.status_code == 409 and str(run.id) in refused.text
    # ...and rerunning the same resume (the UI's Retry on it) finishes it. The worker reports
    # the crash once more when it notices the process has gone, and that late report
    # overwrites a Retry that came first (Prefect 3.9); a person would click Retry again.
    retry = {"state": {"type": "SCHEDULED", "name": "AwaitingRetry"}, "force": True}
    for _ in range(3):
        assert (
            stack.rest("POST", f"/flow_runs/{run.id}/set_state", json=retry).status_code
            == 201
        )
        state = stack.wait_final(str(run.id), 120)
        if not (
            state.type.value == "CRASHED"
            and "infrastructure exited" in (state.message or "")
        ):
            break
    assert state.type.value == "COMPLETED", state.message
    assert (
        stack.wait_final(stack.continuation_of(operation_id)).type.value == "COMPLETED"
    )
