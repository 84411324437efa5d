"""Tasks of the `train-model` flow: start the operation, restore, train an epoch, save a checkpoint.

A `TrainingRun` holds what one flow run trains with (trainer, saver, stop requests) and is
handed from task to task; tasks use `NO_CACHE`, since their inputs are live objects.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from resumable import operations, runtime
from resumable.checkpoints.saver import CheckpointSaver, PeriodicSchedule
from resumable.checkpoints.store import CheckpointRecord
from resumable.errors import CheckpointCorrupted, CheckpointNotFound, OperationNotFound
from resumable.settings import get_settings
from resumable.spec import TrainingSpec
from resumable.training import BatchResult, Trainer
from tasks.control import StopRequests
from tasks.reporting import RunReporter

PROJECT_DIR = Path(__file__).resolve().parents[1]


class ResumeReference(BaseModel):
    """Where a resumed run continues: its operation, and the checkpoint the resume verified."""

    operation_id: str
    checkpoint_id: str | None = None


class OperationStart(BaseModel):
    operation_id: str
    attempt: int
    restore_from: str | None  # a checkpoint id, "latest", or None for a fresh start
    already_completed: bool = False
    other_trainer: str | None = None


class EpochOutcome(BaseModel):
    epoch: int
    batch: int
    step: int
    stopped: bool
    finished: bool
    metrics: dict[str, Any]


@dataclass
class TrainingRun:
    """One flow run's live training objects."""

    spec: TrainingSpec
    operation_id: str
    flow_run_id: str
    attempt: int
    stop: StopRequests
    trainer: Trainer | None = None
    saver: CheckpointSaver | None = None
    schedule: PeriodicSchedule | None = None
    started: bool = (
        False  # true once the trainer holds the state this run continues from
    )
    prepared: bool = False
    periodic_saves: list[str] = field(default_factory=list)
    reporter: RunReporter | None = None

    @property
    def label(self) -> str:
        return f"operation {self.operation_id} attempt {self.attempt}"


def _checkpoint_summary(record: CheckpointRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "kind": record.kind,
        "epoch": record.epoch,
        "batch": record.batch,
        "size_bytes": record.size_bytes,
    }


@task(name="start-operation", cache_policy=NO_CACHE)
def start_operation(
    spec: TrainingSpec, resume: ResumeReference | None, flow_run_id: str
) -> OperationStart:
    """Record this run as an operation's attempt and take the operation's trainer lease.

    A fresh run starts an operation named by its own flow run id. A resumed run continues
    the operation it is given. A run that is already an attempt (the UI's Retry, or Resume
    after Pause, run the same flow run id again) continues its operation's last good checkpoint.
    """
    logger = get_run_logger()
    sessions = runtime.sessions()
    restore_from: str | None
    with sessions.begin() as session:
        operation: operations.Operation | None
        if resume is not None:
            operation = operations.get_operation(
                session=session, id_or_run=resume.operation_id
            )
            restore_from = resume.checkpoint_id or "latest"
        else:
            operation = operations.find_operation(
                session=session, id_or_run=flow_run_id
            )
            if operation is None:
                operation = operations.create_operation(
                    session=session, operation_id=flow_run_id, spec=spec
                )
                restore_from = None
            else:
                restore_from = "latest"
                logger.info(
                    "flow run %s runs again (Retry or Resume): continuing operation %s",
                    flow_run_id,
                    operation.id,
                )
        holder = operations.acquire_trainer(
            session=session,
            operation_id=operation.id,
            flow_run_id=flow_run_id,
            holder_has_ended=_run_has_ended,
        )
        if holder is not None:
            return OperationStart(
                operation_id=operation.id,
                attempt=0,
                restore_from=None,
                other_trainer=holder,
            )
        attempt = operations.register_attempt(
            session=session,
            operation_id=operation.id,
            flow_run_id=flow_run_id,
            resumed_from_checkpoint_id=resume.checkpoint_id if resume else None,
            host=socket.gethostname(),
        )
        operations.record_state(
            session=session,
            operation_id=operation.id,
            flow_run_id=flow_run_id,
            state="RUNNING",
        )
        operation_id, number = operation.id, attempt.number

    completed = False
    if restore_from == "latest":
        latest = runtime.checkpoint_store().latest_good(operation_id)
        completed = latest is not None and latest.kind == "final"
        if latest is None:
            logger.info(
                "operation %s has no checkpoint yet: this run starts it from the beginning",
                operation_id,
            )
            restore_from = None
    _label_attempt(flow_run_id, operation_id, number, resume)
    logger.info(
        "operation %s attempt %d on host %s (code in %s): %s",
        operation_id,
        number,
        socket.gethostname(),
        PROJECT_DIR,
        "fresh start"
        if restore_from is None
        else f"continues from {restore_from} checkpoint",
    )
    return OperationStart(
        operation_id=operation_id,
        attempt=number,
        restore_from=restore_from,
        already_completed=completed,
    )


def _run_has_ended(flow_run_id: str) -> bool:
    """Whether a flow run is in a final state (so the trainer lease it holds is free)."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(uuid.UUID(flow_run_id)).state
    except Exception as err:  # unknown or unreadable: assume it may still train
        logging.getLogger(__name__).warning(
            "cannot read the state of flow run %s: %r", flow_run_id, err
        )
        return False
    return state is not None and state.is_final()


def _label_attempt(
    flow_run_id: str, operation_id: str, attempt: int, resume: ResumeReference | None
) -> None:
    """Tag the run with its operation and attempt, and link a resumed attempt to where it came from."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.client.orchestration import get_client

    tags = {f"operation:{operation_id}", f"attempt:{attempt}"}
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(uuid.UUID(flow_run_id))
        if not tags <= set(run.tags):
            client.update_flow_run(run.id, tags=sorted(set(run.tags) | tags))
    if attempt > 1:
        with runtime.sessions()() as session:
            attempts = operations.list_attempts(
                session=session, operation_id=operation_id
            )
        previous = [a for a in attempts if a.number < attempt]
        lines = [f"Attempt {attempt} of operation `{operation_id}`."]
        if previous:
            lines.append(
                f"Previous attempt: [{previous[-1].flow_run_id}](/runs/flow-run/{previous[-1].flow_run_id})."
            )
        checkpoint = (
            resume.checkpoint_id
            if resume and resume.checkpoint_id
            else "the latest good checkpoint"
        )
        lines.append(f"Resumed from checkpoint `{checkpoint}`.")
        create_markdown_artifact(
            markdown="\n\n".join(lines),
            key=f"lineage-{operation_id}".lower()[:100],
            description="Where this attempt came from",
        )


@task(name="build-trainer", cache_policy=NO_CACHE)
def build_trainer(run: TrainingRun) -> dict[str, Any]:
    """Build the model, optimizer and data for the spec (fails at once for an unavailable device)."""
    run.trainer = Trainer(run.spec)
    settings = get_settings()
    store = runtime.checkpoint_store(settings)
    run.saver = CheckpointSaver(
        store,
        operation_id=run.operation_id,
        flow_run_id=run.flow_run_id,
        policy=run.spec.checkpoint,
    )
    run.schedule = PeriodicSchedule(run.spec.checkpoint)
    run.reporter = RunReporter(run.operation_id, run.flow_run_id, run.label)
    cleaned = store.clean_staged_leftovers(run.operation_id)
    if cleaned:
        get_run_logger().info(
            "%s: removed %d staged leftover(s) of interrupted saves",
            run.label,
            len(cleaned),
        )
    return {
        "device": run.trainer.device.type,
        "batches_per_epoch": run.trainer.steps_per_epoch,
        "epochs": run.spec.epochs,
    }


@task(name="restore-checkpoint", cache_policy=NO_CACHE)
def restore_checkpoint(run: TrainingRun, checkpoint_id: str) -> dict[str, Any]:
    """Load a checkpoint with every hash verified and continue from it.

    `checkpoint_id` may be "latest"; a named checkpoint that turns out corrupted falls back to
    the newest good one.
    """
    logger = get_run_logger()
    assert run.trainer is not None
    store = runtime.checkpoint_store()
    if checkpoint_id == "latest":
        loaded = store.load_latest_good(run.operation_id)
    else:
        try:
            loaded = store.load(checkpoint_id)
        except (CheckpointCorrupted, CheckpointNotFound) as err:
            logger.warning(
                "%s: checkpoint %s cannot be used (%s); falling back to the newest good one",
                run.label,
                checkpoint_id,
                err,
            )
            loaded = store.load_latest_good(run.operation_id)
    for skipped, reason in loaded.skipped:
        logger.warning(
            "%s: skipped corrupted checkpoint %s: %s", run.label, skipped, reason
        )
    if run.reporter is not None:
        run.reporter.corrupted(loaded.skipped)
    for warning in run.trainer.restore_state(loaded.state, loaded.record.id):
        logger.warning("%s: %s", run.label, warning)
    run.started = True
    record = loaded.record
    logger.info(
        "%s: restored %s checkpoint %s; continuing at epoch %d batch %d (step %d)",
        run.label,
        record.kind,
        record.id,
        run.trainer.epoch,
        run.trainer.batch,
        run.trainer.step,
    )
    return _checkpoint_summary(record)


@task(name="train-epoch", cache_policy=NO_CACHE)
def train_epoch(run: TrainingRun) -> EpochOutcome:
    """Train to the end of the current epoch, or until a stop is requested at a batch boundary.

    Periodic checkpoints are saved asynchronously whenever the policy says one is due.
    """
    logger = get_run_logger()
    trainer, saver, schedule = run.trainer, run.saver, run.schedule
    assert trainer is not None and saver is not None and schedule is not None
    run.started = True
    epoch = trainer.epoch
    started = time.monotonic()

    reporter = run.reporter
    assert reporter is not None

    def after_batch(result: BatchResult) -> None:
        if not run.prepared:
            # Reserve the host buffers in the background, once the optimizer has state.
            saver.prepare(trainer)
            run.prepared = True
        if not trainer.finished and not run.stop.lost and schedule.due(trainer):
            saver.save_async(trainer)
            schedule.saved()
        reporter.checkpoints_committed(saver.drain_committed())
        saver.check_failures()
        reporter.progress(trainer)

    reason = trainer.train(
        until_epoch_end=True,
        should_stop=lambda: run.stop.requested,
        on_batch_end=after_batch,
    )
    if trainer.batch == 0 and trainer.history and trainer.history[-1]["epoch"] == epoch:
        reporter.epoch_done(trainer)
        record = trainer.history[-1]
        logger.info(
            "%s: epoch %d/%d done in %.1fs, loss %.4f%s",
            run.label,
            epoch + 1,
            run.spec.epochs,
            time.monotonic() - started,
            record["loss"],
            "".join(
                f", {k} {v:.4f}"
                for k, v in record.items()
                if k not in ("epoch", "loss", "lr", "seconds", "samples_per_second")
            ),
        )
    return EpochOutcome(
        epoch=trainer.epoch,
        batch=trainer.batch,
        step=trainer.step,
        stopped=reason == "stopped",
        finished=trainer.finished,
        metrics=trainer.latest_metrics(),
    )


@task(name="save-checkpoint", cache_policy=NO_CACHE)
def save_checkpoint(run: TrainingRun, kind: str) -> dict[str, Any]:
    """Save and commit a checkpoint before returning (waits for any save in flight first)."""
    assert run.trainer is not None and run.saver is not None
    record = run.saver.save_blocking(run.trainer, kind, after_failure=kind == "failure")
    if run.reporter is not None:
        # A blocking save ends an attempt (cancellation, failure, final): publish everything now.
        run.reporter.checkpoints_committed(run.saver.drain_committed(), force=True)
        run.reporter.epoch_done(run.trainer, force=True)
    get_run_logger().info(
        "%s: %s checkpoint %s committed at epoch %d batch %d (%.1f MB)",
        run.label,
        kind,
        record.id,
        record.epoch,
        record.batch,
        record.size_bytes / 1e6,
    )
    return _checkpoint_summary(record)


def finish_run(run: TrainingRun, state: str) -> None:
    """Wait for a save in flight, give the trainer lease back and remember the run's last state."""
    if run.saver is not None:
        run.saver.close()
    try:
        with runtime.sessions().begin() as session:
            operations.release_trainer(
                session=session,
                operation_id=run.operation_id,
                flow_run_id=run.flow_run_id,
            )
            operations.record_state(
                session=session,
                operation_id=run.operation_id,
                flow_run_id=run.flow_run_id,
                state=state,
            )
    except OperationNotFound:
        logging.getLogger(__name__).warning(
            "%s: operation disappeared before the run ended", run.label
        )
