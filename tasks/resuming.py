"""Tasks of the `resume-training` flow, one per step of `resumable.resuming.Resumer`."""

from __future__ import annotations

from functools import lru_cache

from prefect import task
from prefect.cache_policies import NO_CACHE

from resumable import faults, runtime
from resumable.checkpoints.store import CheckpointRecord
from resumable.errors import ResumableError
from resumable.prefect_gateway import PrefectGateway
from resumable.resuming import ResumeCandidate, Resumer, ResumeResult
from resumable.settings import get_settings


@lru_cache(maxsize=1)
def resumer() -> Resumer:
    settings = get_settings()
    return Resumer(
        runtime.sessions(settings),
        runtime.checkpoint_store(settings),
        PrefectGateway(),
        settings,
    )


@task(name="validate-resume", cache_policy=NO_CACHE)
def validate_resume(operation_id: str) -> ResumeCandidate:
    """The operation exists and its latest attempt is CANCELLED, FAILED or CRASHED."""
    return resumer().validate(operation_id)


@task(name="claim-resume", cache_policy=NO_CACHE)
def claim_resume(
    candidate: ResumeCandidate, owner: str, automatic: bool = False
) -> None:
    """Take the resume of the interrupted attempt with one conditional UPDATE; one claimer wins."""
    resumer().claim(candidate, owner=owner, automatic=automatic)
    faults.fire("resume_after_claim")


@task(name="load-last-good-checkpoint", cache_policy=NO_CACHE)
def load_last_good_checkpoint(
    candidate: ResumeCandidate, owner: str
) -> CheckpointRecord:
    """Load and verify the newest good checkpoint, before any GPU is asked for."""
    return resumer().verify_checkpoint(candidate, owner=owner)


@task(name="schedule-remaining-epochs", cache_policy=NO_CACHE)
def schedule_remaining_epochs(
    candidate: ResumeCandidate, record: CheckpointRecord, owner: str
) -> ResumeResult:
    """Create the `train-model` run on the GPU pool, idempotently for this interrupted attempt."""
    return resumer().schedule(candidate, record, owner=owner)


def report_refusal(operation_id: str, error: ResumableError, owner: str) -> None:
    """Emit the refused-resume event (automations and notifications watch for it)."""
    resumer().refused(operation_id, error, owner=owner)
