"""What Prefect orchestration and an interruption cost, on a real local stack.

Measured in one run, on the `demo` recipe, with a local Prefect server and process workers:

- orchestration overhead: the `train-model` flow's running time (Running to Completed, per-epoch
  checkpoints and artifacts included) against the bare trainer loop on the same spec, each in
  one process that builds the trainer and trains (goal: at most 1.05x for a run of a minute or more);
- the cost of an interruption: a run cancelled half-way and resumed, against the uninterrupted
  flow run, broken down into its parts (goal: the resume decision and the restore under 2 s each);
- lost work: batches trained twice after a cancellation (goal 0) and after a SIGKILL with a
  seconds-based checkpoint interval (goal: at most what the interval allows).

Usage: python bench/orchestration.py [--epochs 12] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from common import machine, verdict, write_section

from deployments.local import LocalStack, free_port


def spec(epochs: int, **checkpoint: Any) -> dict[str, Any]:
    return {
        "recipe": "demo",
        "recipe_options": {"series": 1536},  # epochs of about 4 s on 2 cores
        "epochs": epochs,
        "batch_size": 64,
        "learning_rate": 3e-3,
        "seed": 3,
        "device": "cpu",
        "checkpoint": {"every_epochs": 1, "keep_last": 3, **checkpoint},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs", type=int, default=12, help="about 5 s each on 2 cores"
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="resumable-bench-stack-"))
    plan = data_dir / "faults.json"
    plan.write_text("[]")
    stack = LocalStack(
        data_dir=data_dir,
        port=free_port(),
        extra_env={"RESUMABLE_FAULT_PLAN": str(plan)},
    )
    stack.up(progress=False)
    os.environ.update(stack.env())
    try:
        rows = measure(args.epochs, plan)
    finally:
        stack.down(progress=False)
    table = "\n".join(rows)
    print(table)
    if not args.no_write:
        write_section("orchestration", table)


# The bare loop: one fresh process that builds the trainer and trains, timed over the same
# span as the flow's Running to Completed (imports come before both; building the trainer
# is inside both, and its first call imports torch's compiler stack, about 1.5 s here).
BARE_LOOP = """
import json, sys, time
from resumable.spec import TrainingSpec
from resumable.training import Trainer
spec = TrainingSpec.model_validate_json(sys.argv[1])
started = time.perf_counter()
trainer = Trainer(spec)
trainer.train()
print(json.dumps([time.perf_counter() - started, trainer.steps_per_epoch]))
"""


def bare_loop(spec: dict[str, Any]) -> tuple[float, int]:
    """Seconds the bare trainer loop takes on `spec` in a process of its own, and batches per epoch."""
    done = subprocess.run(
        [sys.executable, "-c", BARE_LOOP, json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
    )
    seconds, steps_per_epoch = json.loads(done.stdout.strip().splitlines()[-1])
    return float(seconds), int(steps_per_epoch)


def measure(epochs: int, plan: Path) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    from resumable import operations, runtime

    store = runtime.checkpoint_store()

    def final(client: Any, run_id: Any, timeout: float = 1800) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(0.2)
        raise TimeoutError(f"flow run {run_id} did not finish")

    def running_seconds(client: Any, run_id: Any) -> tuple[float, datetime, datetime]:
        states = client.read_flow_run_states(run_id)
        started = next(s.timestamp for s in states if s.type.value == "RUNNING")
        ended = states[-1].timestamp
        return (ended - started).total_seconds(), started, ended

    def task_seconds(client: Any, run_id: Any, name: str) -> float:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
        matching = [
            r for r in runs if r.name.startswith(name) and r.total_run_time is not None
        ]
        return sum(r.total_run_time.total_seconds() for r in matching)

    bare_seconds, steps_per_epoch = bare_loop(spec(epochs))

    with get_client(sync_client=True) as client:
        whole = run_deployment(
            "train-model/gpu",
            parameters={"spec": spec(epochs)},
            timeout=0,
            as_subflow=False,
        )
        whole_run = final(client, whole.id)
        flow_seconds, _, _ = running_seconds(client, whole.id)
        whole_total = (whole_run.state.timestamp - whole_run.created).total_seconds()

        # Cancel half-way, resume, and time the parts.
        first = run_deployment(
            "train-model/gpu",
            parameters={"spec": spec(epochs)},
            timeout=0,
            as_subflow=False,
        )
        operation_id = str(first.id)
        while (
            latest := store.latest_good(operation_id)
        ) is None or latest.epoch < epochs // 2:
            time.sleep(0.1)
        time.sleep(0.4)
        cancel_at = datetime.now().astimezone()
        client.set_flow_run_state(first.id, Cancelling(message="benchmark"))
        first_run = final(client, first.id)
        stopped = store.latest_good(operation_id)
        cancel_to_committed = (stopped.committed_at - cancel_at).total_seconds()
        cancel_to_ended = (first_run.state.timestamp - cancel_at).total_seconds()

        resume = run_deployment(
            "resume-training/default",
            parameters={"operation_id": operation_id},
            timeout=0,
            as_subflow=False,
        )
        resume_run = final(client, resume.id)
        decision, resume_started, _ = running_seconds(client, resume.id)
        resume_pickup = (resume_started - resume_run.created).total_seconds()
        with runtime.sessions()() as session:
            continuation = uuid.UUID(
                operations.get_operation(
                    session=session, id_or_run=operation_id
                ).continuation_run_id
            )
        second_run = final(client, continuation)
        _, second_started, _ = running_seconds(client, continuation)
        worker_start = (second_started - second_run.created).total_seconds()
        restore = task_seconds(client, continuation, "restore-checkpoint")
        interrupted_total = (
            first_run.state.timestamp - first_run.created
        ).total_seconds() + (
            second_run.state.timestamp - resume_run.created
        ).total_seconds()
        # Where the first attempt says it stopped, against where the continuation restored from.
        stop = re.search(
            r"stopped at epoch (\d+) batch (\d+)", first_run.state.message or ""
        )
        assert stop is not None, first_run.state.message
        first_steps = int(stop.group(1)) * steps_per_epoch + int(stop.group(2))
        with runtime.sessions()() as session:
            attempt = next(
                a
                for a in operations.list_attempts(
                    session=session, operation_id=operation_id
                )
                if a.number == 2
            )
        restored = store.get(attempt.resumed_from_checkpoint_id)
        trained_twice_cancel = first_steps - restored.step

        # SIGKILL between two seconds-based checkpoints.
        interval = 5.0
        kill_epoch = epochs // 2
        plan.write_text(
            json.dumps(
                [
                    {
                        "at": "batch",
                        "epoch": kill_epoch,
                        "batch": steps_per_epoch // 2,
                        "action": "kill",
                    }
                ]
            )
        )
        killed = run_deployment(
            "train-model/gpu",
            parameters={
                "spec": spec(epochs, every_epochs=None, every_seconds=interval)
            },
            timeout=0,
            as_subflow=False,
        )
        final(client, killed.id)
        last = store.latest_good(str(killed.id))
        kill_step = kill_epoch * steps_per_epoch + steps_per_epoch // 2
        lost_after_kill = kill_step - last.step
        seconds_per_batch = bare_seconds / (epochs * steps_per_epoch)
        allowed = int(interval / seconds_per_batch) + 1

    overhead = flow_seconds / bare_seconds
    cost = interrupted_total - whole_total
    return [
        "## Orchestration and interruptions",
        "",
        f"`demo` recipe with 1536 series, {epochs} epochs of {steps_per_epoch} batches, a checkpoint every epoch; "
        "a local Prefect server on SQLite with process workers.",
        f"Machine: {machine()}.",
        f"Command: `python bench/orchestration.py --epochs {epochs}` (run by `make bench`).",
        "",
        "| measure | result | goal | |",
        "|---|---|---|---|",
        f"| bare trainer loop, build and train, in a process of its own | {bare_seconds:.1f} s | | |",
        f"| `train-model` flow, Running to Completed (per-epoch checkpoints, artifacts) | {flow_seconds:.1f} s | | |",
        f"| orchestration overhead | {overhead:.3f}× | ≤ 1.05× | {verdict(overhead, 1.05)} |",
        f"| uninterrupted flow run, created to Completed | {whole_total:.1f} s | | |",
        f"| cancelled at epoch {stopped.epoch} batch {stopped.batch} and resumed, created to Completed | {interrupted_total:.1f} s | | |",
        f"| cost of the interruption | {cost:.1f} s | dominated by process start and polling | |",
        f"| · cancel request to cancellation checkpoint committed | {cancel_to_committed:.2f} s | | |",
        f"| · cancel request to run CANCELLED | {cancel_to_ended:.2f} s | | |",
        f"| · resume run: worker pickup and process start | {resume_pickup:.2f} s | | |",
        f"| · resume decision (validate, claim, verify, schedule) | {decision:.2f} s | < 2 s | {verdict(decision, 2.0)} |",
        f"| · continuation: worker pickup and process start | {worker_start:.2f} s | | |",
        f"| · restore (load, verify, apply) | {restore:.2f} s | < 2 s | {verdict(restore, 2.0)} |",
        f"| batches trained twice after the cancellation | {trained_twice_cancel} (stopped after step {first_steps}, resumed at step {restored.step}) | 0 | {verdict(trained_twice_cancel, 0)} |",
        f"| batches trained twice after a SIGKILL, checkpoints every {interval:.0f} s | {lost_after_kill} | ≤ {allowed} | {verdict(lost_after_kill, allowed)} |",
        "",
        "The resume decision is the resume flow run's own running time; worker pickup and process start",
        "(Python, torch and Prefect imports on 2 cores, and the workers' 1-second polling) are listed apart.",
    ]


if __name__ == "__main__":
    main()
