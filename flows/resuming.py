"""The `resume-training` flow; its deployment is the resume deployment."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State
from pydantic import BaseModel

from resumable.errors import ResumableError
from resumable.resuming import ResumeResult
from tasks.resuming import (
    claim_resume,
    load_last_good_checkpoint,
    report_refusal,
    schedule_remaining_epochs,
    validate_resume,
)


class ResumeResponse(BaseModel):
    success: bool
    data: ResumeResult


@flow(
    name="resume-training", flow_run_name="resume-{operation_id}", persist_result=False
)
def resume_training(operation_id: str, automatic: bool = False) -> State:
    """Resume an interrupted training operation exactly once, from its last good checkpoint.

    Args:
        operation_id: The operation's id, or the flow run id of any of its attempts.
        automatic: Set by the auto-resume automation; such resumes count against the
            operation's cap of automatic attempts.

    Returns:
        A COMPLETED state holding a `ResumeResponse` (the scheduled `train-model` run and where it
        resumes from) and saying so in its message; or
        a FAILED state whose one-line message says why the resume was refused and what to do.
    """
    logger = get_run_logger()
    owner = f"resume-flow-run:{flow_run.id}"
    try:
        candidate = validate_resume(operation_id)
        claim_resume(candidate, owner, automatic)
        record = load_last_good_checkpoint(candidate, owner)
        result = schedule_remaining_epochs(candidate, record, owner)
    except ResumableError as err:
        report_refusal(operation_id, err, owner)
        message = f"Resume refused: {err}"
        logger.error(message)
        return Failed(message=message)
    message = (
        f"Resumed operation {result.operation_id} from its {result.resumed_from.checkpoint_type} checkpoint "
        f"(epoch {result.resumed_from.epoch}, batch {result.resumed_from.batch}) as flow run {result.flow_run_id}"
    )
    logger.info(message)
    return Completed(message=message, data=ResumeResponse(success=True, data=result))
