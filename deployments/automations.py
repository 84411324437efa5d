"""Opt-in auto-resume: a Prefect automation that runs the resume deployment when a training run
of `train-model/gpu` ends CRASHED (and, if asked, FAILED).

The automation only asks; the resume deployment decides, with the same validation and
atomic claim as every other resume. Its runs pass `automatic=true`, so they count against
the operation's cap (`RESUMABLE_AUTO_RESUME_CAP`, default 3); past the cap the claim is
refused, a `resumable.resume.refused` event is emitted, and the operation is left
resumable by hand.

Enable it with `RESUMABLE_AUTO_RESUME=crashed` (or `crashed,failed`) before `make up`, or
call `enable_auto_resume()` against any Prefect server.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from uuid import UUID

AUTOMATION_NAME = "resumable: auto-resume train-model/gpu"
STATES = {"crashed": "Crashed", "failed": "Failed"}


def enable_auto_resume(
    on: Iterable[str] = ("crashed",),
    *,
    train_deployment: str = "train-model/gpu",
    resume_deployment: str = "resume-training/default",
    name: str = AUTOMATION_NAME,
) -> UUID:
    """Create (or replace) the auto-resume automation; returns its id."""
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import EventTrigger, Posture

    wanted = [s.strip().lower() for s in on if s.strip()]
    unknown = sorted(set(wanted) - set(STATES))
    if unknown or not wanted:
        raise ValueError(
            f"auto-resume can follow {sorted(STATES)} runs, not {unknown or wanted!r}"
        )
    disable_auto_resume(name)
    with get_client(sync_client=True) as client:
        train = client.read_deployment_by_name(train_deployment)
        resume = client.read_deployment_by_name(resume_deployment)
    automation = Automation(
        name=name,
        description="Resume a crashed training run from its last good checkpoint, up to the operation's cap.",
        trigger=EventTrigger(
            expect={f"prefect.flow-run.{STATES[s]}" for s in wanted},
            match_related={
                "prefect.resource.id": f"prefect.deployment.{train.id}",
                "prefect.resource.role": "deployment",
            },
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[
            RunDeployment(
                source="selected",
                deployment_id=resume.id,
                parameters={
                    "operation_id": {
                        "__prefect_kind": "jinja",
                        "template": "{{ flow_run.id }}",
                    },
                    "automatic": True,
                },
            )
        ],
    ).create()
    return automation.id


def disable_auto_resume(name: str = AUTOMATION_NAME) -> int:
    """Delete the auto-resume automations of this name; returns how many there were."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found = client.read_automations_by_name(name)
        for automation in found:
            client.delete_automation(automation.id)
    return len(found)


LOST_RUNS_NAME = "resumable: mark lost training runs crashed"
# A training run's own ends: any of them, instead of the next heartbeat, means "not lost".
_RUN_ENDS = {
    f"prefect.flow-run.{state}"
    for state in ("Completed", "Failed", "Cancelled", "Crashed", "Paused", "Suspended")
}


def enable_lost_run_detection(
    lost_after_seconds: float = 120.0,
    *,
    train_deployment: str = "train-model/gpu",
    name: str = LOST_RUNS_NAME,
) -> UUID:
    """Create (or replace) the automation that marks a training run CRASHED when it falls silent.

    A training run emits `resumable.training.heartbeat` every `RESUMABLE_HEARTBEAT_SECONDS`
    (10 by default). When a machine is lost with its worker, nobody reports the run's end and
    it would stay RUNNING for ever, blocking every resume. This proactive trigger waits, after
    each heartbeat, `lost_after_seconds` for the next one or for the run's own end; failing
    both, it sets the run CRASHED, which makes it resumable (and, with auto-resume on, resumes
    it). Choose `lost_after_seconds` well above the heartbeat interval and above the longest
    Prefect server outage you expect: a live run that is marked CRASHED stops at its next batch
    boundary without writing anything (`RunDeclaredLost`), and is resumed like a lost one.
    """
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    from resumable.events import TRAINING_HEARTBEAT

    if lost_after_seconds < 10:
        raise ValueError(
            f"lost_after_seconds must be at least 10 (Prefect's least wait), not {lost_after_seconds}"
        )
    disable_lost_run_detection(name)
    with get_client(sync_client=True) as client:
        train = client.read_deployment_by_name(train_deployment)
    automation = Automation(
        name=name,
        description=f"A training run of {train_deployment} silent for {lost_after_seconds:g} s has lost its machine.",
        trigger=EventTrigger(
            after={TRAINING_HEARTBEAT},
            expect={TRAINING_HEARTBEAT, *_RUN_ENDS},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={
                "prefect.resource.id": f"prefect.deployment.{train.id}",
                "prefect.resource.role": "deployment",
            },
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=lost_after_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"lost: no heartbeat for {lost_after_seconds:g} s (its machine or worker is gone)",
            )
        ],
    ).create()
    return automation.id


def disable_lost_run_detection(name: str = LOST_RUNS_NAME) -> int:
    """Delete the lost-run automations of this name; returns how many there were."""
    return disable_auto_resume(name)
