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
