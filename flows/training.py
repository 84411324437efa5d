"""The `train-model` flow: one attempt of a training operation, checkpointed through every interruption."""

from __future__ import annotations

import signal
from typing import Any

from prefect import flow, get_run_logger
from prefect.exceptions import Pause, TerminationSignal
from prefect.runtime import deployment, flow_run
from prefect.states import Cancelled, Completed, State

from resumable.errors import RunDeclaredLost
from resumable.events import operation_resource
from resumable.settings import get_settings
from resumable.spec import TrainingSpec
from tasks.control import StopRequests
from tasks.training import (
    ResumeReference,
    TrainingRun,
    build_trainer,
    finish_run,
    restore_checkpoint,
    save_checkpoint,
    start_operation,
    train_epoch,
)


def _heartbeat_related(operation_id: str) -> list[dict[str, str]]:
    related = [
        {**operation_resource(operation_id), "prefect.resource.role": "operation"}
    ]
    if deployment.id:
        related.append(
            {
                "prefect.resource.id": f"prefect.deployment.{deployment.id}",
                "prefect.resource.role": "deployment",
            }
        )
    return related


def flow_run_state() -> State | None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run.id).state


@flow(name="train-model", flow_run_name="train-{spec.recipe}", persist_result=False)
def train_model(
    spec: TrainingSpec, resume: ResumeReference | None = None
) -> dict[str, Any] | State:
    """Train `spec`, or continue the operation in `resume`, checkpointing as the spec's policy says.

    Args:
        spec: What to train. A resumed run must keep the fingerprinted fields of its operation.
        resume: The operation and checkpoint to continue; set by the resume deployment.

    Returns:
        A summary (operation, attempt, final checkpoint, history) when training completes;
        a CANCELLED state, with a `cancellation` checkpoint committed, when the run is cancelled.

    Raises:
        Exception: whatever stopped training, after a `failure` checkpoint of the last
            consistent batch boundary was committed. A run killed outright (SIGKILL, a lost
            node) ends CRASHED and leaves its last periodic checkpoint.

    Note:
        Cancellation is noticed at the next batch boundary. A batch that runs longer than
        Prefect's 30-second grace period is cut short by SIGKILL, and the run then resumes
        from its last periodic checkpoint instead.
    """
    logger = get_run_logger()
    flow_run_id = str(flow_run.id)
    start = start_operation(spec, resume, flow_run_id)
    if start.other_trainer is not None:
        message = f"operation {start.operation_id} is being trained by flow run {start.other_trainer}; this run exits without training"
        logger.warning(message)
        return Cancelled(message=message)
    if start.already_completed:
        message = f"operation {start.operation_id} has already completed; nothing to train (start a new run to train again)"
        logger.info(message)
        finish_run(
            TrainingRun(
                spec, start.operation_id, flow_run_id, start.attempt, StopRequests(None)
            ),
            "COMPLETED",
        )
        return Completed(message=message)

    run = TrainingRun(
        spec=spec,
        operation_id=start.operation_id,
        flow_run_id=flow_run_id,
        attempt=start.attempt,
        stop=StopRequests(
            flow_run_id,
            heartbeat_seconds=get_settings().heartbeat_seconds,
            heartbeat_related=_heartbeat_related(start.operation_id),
            run_logger=logger,
        ),
    )
    final_state = "FAILED"
    with run.stop:
        try:
            build_trainer(run)
            if start.restore_from is not None:
                restore_checkpoint(run, start.restore_from)
            else:
                run.started = True
            assert run.trainer is not None
            while not run.trainer.finished and not run.stop.requested:
                train_epoch(run)

            if run.stop.lost:
                raise RunDeclaredLost(
                    f"{run.label} was marked CRASHED by the server while it trained (its"
                    " heartbeats stopped arriving); it stops here and writes no checkpoint,"
                    " since another run may be continuing the operation"
                )

            if run.stop.requested:
                checkpoint = save_checkpoint(run, "cancellation")
                message = (
                    f"{run.label} stopped at epoch {checkpoint['epoch']} batch {checkpoint['batch']} "
                    f"({run.stop.reason}); cancellation checkpoint {checkpoint['id']} is committed"
                )
                logger.info(message)
                current = run.stop.current_state()
                if run.stop.reason == "pause" or current == "PAUSED":
                    # Paused from the UI: leave the run PAUSED and its worker free; Resume starts
                    # this flow run again from the top, and it continues from this checkpoint.
                    final_state = "PAUSED"
                    logger.info(
                        "%s paused; resume it from the Prefect UI to continue",
                        run.label,
                    )
                    raise Pause(state=flow_run_state())
                if run.stop.signalled and current not in ("CANCELLING", "CANCELLED"):
                    # A SIGTERM that is not a Prefect cancellation (a node shutting down): end as the
                    # signal asks, through Prefect's own handling, after the checkpoint is safe.
                    final_state = "CRASHED"
                    raise TerminationSignal(signal=signal.SIGTERM)
                final_state = "CANCELLED"
                return Cancelled(message=message)

            checkpoint = save_checkpoint(run, "final")
            final_state = "COMPLETED"
            return {
                "operation_id": run.operation_id,
                "attempt": run.attempt,
                "final_checkpoint": checkpoint,
                "history": run.trainer.history,
            }
        except Pause:
            # Prefect refuses to start a task of a paused run, so the pause may surface here,
            # from the task call, rather than through the stop requests: save without a task.
            if (
                run.trainer is not None
                and run.started
                and run.trainer.is_consistent
                and final_state != "PAUSED"
            ):
                checkpoint = save_checkpoint.fn(run, "cancellation")
                logger.info(
                    "%s paused at epoch %d batch %d; checkpoint %s is committed",
                    run.label,
                    checkpoint["epoch"],
                    checkpoint["batch"],
                    checkpoint["id"],
                )
            final_state = "PAUSED"
            raise
        except Exception as err:
            trainer = run.trainer
            if isinstance(err, RunDeclaredLost) or run.stop.lost:
                logger.error("%s", err)
            elif trainer is not None and run.started and trainer.is_consistent:
                save_checkpoint(run, "failure")
            elif trainer is not None and run.started:
                logger.error(
                    "%s: failed in the middle of an update; the last periodic checkpoint is the newest consistent state",
                    run.label,
                )
            raise
        finally:
            finish_run(run, final_state)
