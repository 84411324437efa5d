"""Fault injection for tests and the fault suite: off unless `RESUMABLE_FAULT_PLAN` names a file.

The plan is a JSON list of faults, each `{"at": POINT, "epoch": E, "batch": B, "action": A}`.
A fault fires once: it is removed from the file before it acts, so a resumed run does not
meet it again. Points: `batch` (before the batch's update), `save_write` (while a checkpoint's
files are written), `save_manifest` (after the files, before the manifest is written),
`save_commit` (after the manifest, before the row is committed). Actions: `raise`
(an `InjectedFault`), `kill` (SIGKILL of this process), `sigterm` (SIGTERM to this process),
`nan` (the batch's loss becomes NaN), `pass` (nothing; it only uses up one passage),
`hold` (create the file `held_path(point)` and wait there until someone removes it, so that a
test can act on the rest of the system while this process stands at a known point).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from resumable.errors import ResumableError

PLAN_VARIABLE = "RESUMABLE_FAULT_PLAN"


class InjectedFault(ResumableError, RuntimeError):
    """An error raised on purpose by a fault plan."""


def _plan_path() -> Path | None:
    value = os.environ.get(PLAN_VARIABLE)
    return Path(value) if value else None


def take_fault(point: str, epoch: int = -1, batch: int = -1) -> str | None:
    """Remove and return the action of the fault planned at this point, if any."""
    path = _plan_path()
    if path is None or not path.exists():
        return None
    plan: list[dict[str, Any]] = json.loads(path.read_text() or "[]")
    for index, fault in enumerate(plan):
        if fault.get("at") != point:
            continue
        if fault.get("epoch", epoch) != epoch or fault.get("batch", batch) != batch:
            continue
        del plan[index]
        staged = path.with_suffix(".tmp")
        staged.write_text(json.dumps(plan))
        os.replace(staged, path)
        return str(fault.get("action", "raise"))
    return None


def fire(point: str, epoch: int = -1, batch: int = -1) -> str | None:
    """Act on a planned fault: raise or kill here; other actions are returned to the caller."""
    action = take_fault(point, epoch, batch)
    if action == "raise":
        raise InjectedFault(f"injected fault at {point} (epoch {epoch}, batch {batch})")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    if action == "hold":
        _hold(held_path(point))
    return action


def held_path(point: str) -> Path:
    """The file a `hold` at `point` creates and waits on; removing it lets the process go on."""
    plan = _plan_path()
    if plan is None:
        raise RuntimeError(f"{PLAN_VARIABLE} is not set")
    return plan.with_name(f"{plan.name}.held-{point}")


def _hold(marker: Path, limit_seconds: float = 600.0) -> None:
    marker.write_text(str(os.getpid()))
    deadline = time.monotonic() + limit_seconds
    while marker.exists():
        if time.monotonic() > deadline:
            marker.unlink(missing_ok=True)
            raise InjectedFault(
                f"held at {marker} for {limit_seconds:.0f} s; nobody released it"
            )
        time.sleep(0.05)


def enabled() -> bool:
    return _plan_path() is not None
