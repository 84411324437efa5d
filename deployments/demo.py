"""`make demo`: train, cancel in the middle of an epoch, resume, and compare with an uninterrupted run.

Brings the local stack up (unless it is already up), trains the `demo` recipe on the
`train-model/gpu` deployment, cancels it through the Prefect API once it is half-way,
shows the cancellation checkpoint, resumes it through the `resume-training/default`
deployment, waits for it, trains the same spec without interruption, and prints a table.
It stops the stack it started, unless `RESUMABLE_DEMO_KEEP=1` keeps it up for the UI.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from typing import Any

from deployments.local import default_stack, free_port

SPEC: dict[str, Any] = {
    "recipe": "demo",
    "epochs": 8,
    "batch_size": 64,
    "learning_rate": 3e-3,
    "seed": 7,
    "checkpoint": {"every_epochs": 1, "keep_last": 3},
}


def main() -> None:
    stack = default_stack()
    started_here = not (stack.state_file.exists() and stack.healthy())
    if started_here and not _port_free(stack.port):
        stack.port = free_port()
    stack.up()
    os.environ.update(stack.env())
    try:
        run_demo(stack.ui_url)
    finally:
        if started_here and os.environ.get("RESUMABLE_DEMO_KEEP") != "1":
            stack.down()
        elif started_here:
            print(
                f"\nThe stack stays up for the UI at {stack.ui_url}; stop it with `make down`."
            )


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def run_demo(ui_url: str) -> None:
    # Imported here: Prefect reads its settings when imported, after the stack's environment is set.
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    from resumable import operations, runtime

    store = runtime.checkpoint_store()
    epochs = SPEC["epochs"]

    print(
        f"\n1. Training the `demo` recipe for {epochs} epochs (operation = its first flow run)"
    )
    first = run_deployment(
        "train-model/gpu", parameters={"spec": SPEC}, timeout=0, as_subflow=False
    )
    operation_id = str(first.id)
    print(
        f"   operation {operation_id}\n   watch it: {ui_url}/runs/flow-run/{operation_id}"
    )
    shown: set[str] = set()
    bar = _ProgressBar(operation_id)
    while True:
        bar.update()
        _show_new_checkpoints(store, operation_id, shown, bar.print)
        latest = store.latest_good(operation_id)
        if latest is not None and latest.epoch >= epochs // 2:
            break
        time.sleep(0.2)
    time.sleep(0.45)  # part of the way into the next epoch
    bar.update()
    bar.close()

    print("\n2. Cancelling it through the Prefect API, in the middle of an epoch")
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(first.id, Cancelling(message="cancelled by the demo"))
        cancelled = _wait_final(client, first.id)
    stopped = store.latest_good(operation_id)
    assert stopped is not None
    print(
        f"   state: {cancelled.type.value}; {stopped.kind} checkpoint at epoch {stopped.epoch}, batch {stopped.batch}"
    )

    print("\n3. Resuming through the resume deployment (resume-training/default)")
    resume = run_deployment(
        "resume-training/default",
        parameters={"operation_id": operation_id},
        timeout=300,
        as_subflow=False,
    )
    print(f"   {resume.state.type.value}: {resume.state.message}")
    with runtime.sessions()() as session:
        continuation = operations.get_operation(
            session=session, id_or_run=operation_id
        ).continuation_run_id
    if resume.state.type.value != "COMPLETED" or continuation is None:
        sys.exit("the resume was refused; see the message above")
    bar = _ProgressBar(operation_id)
    with get_client(sync_client=True) as client:
        while True:
            bar.update()
            _show_new_checkpoints(store, operation_id, shown, bar.print)
            state = client.read_flow_run(uuid.UUID(continuation)).state
            if state is not None and state.is_final():
                break
            time.sleep(0.3)
    bar.update()
    _show_new_checkpoints(store, operation_id, shown, bar.print)
    bar.close()
    print(f"   resumed run {continuation}: {state.type.value}")

    print("\n4. Training the same spec without interruption, to compare")
    reference = run_deployment(
        "train-model/gpu", parameters={"spec": SPEC}, timeout=600, as_subflow=False
    )
    print(f"   {reference.state.type.value}")

    resumed_final = store.load_latest_good(operation_id)
    reference_final = store.load_latest_good(str(reference.id))
    identical = _identical(resumed_final.state.tensors, reference_final.state.tensors)
    history = resumed_final.state.meta["history"]
    print()
    print(
        _table(
            [
                ("operation", operation_id),
                ("epochs", str(epochs)),
                (
                    "stopped at",
                    f"epoch {stopped.epoch}, batch {stopped.batch} ({stopped.kind} checkpoint)",
                ),
                (
                    "resumed from",
                    f"epoch {stopped.epoch}, batch {stopped.batch}, as flow run {continuation[:8]}…",
                ),
                ("final loss (resumed)", f"{history[-1]['loss']:.6f}"),
                (
                    "final loss (uninterrupted)",
                    f"{reference_final.state.meta['history'][-1]['loss']:.6f}",
                ),
                (
                    "final accuracy",
                    f"{history[-1]['accuracy']:.3f} (epoch 1: {history[0]['accuracy']:.3f})",
                ),
                ("bit-identical", "yes" if identical else "NO"),
            ]
        )
    )
    if not identical:
        sys.exit("the resumed run's parameters differ from the uninterrupted run's")


class _ProgressBar:
    """A terminal progress bar fed by the operation's progress artifact in Prefect."""

    def __init__(self, operation_id: str) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from tasks.reporting import artifact_key

        self.key = artifact_key("progress", operation_id)
        self.progress = Progress(
            TextColumn("   training"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}% of all batches"),
            TimeElapsedColumn(),
        )
        self.task = self.progress.add_task("train", total=100.0)
        self.progress.start()

    def update(self) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
        from prefect.client.schemas.sorting import ArtifactSort

        with get_client(sync_client=True) as client:
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[self.key])),
                sort=ArtifactSort.UPDATED_DESC,
                limit=1,
            )
        if found and found[0].data is not None:
            self.progress.update(self.task, completed=float(found[0].data))

    def print(self, line: str) -> None:
        self.progress.console.print(line, highlight=False)

    def close(self) -> None:
        self.progress.stop()


def _show_new_checkpoints(
    store: Any, operation_id: str, shown: set[str], say: Any = print
) -> None:
    for record in reversed(store.list_checkpoints(operation_id)):
        if record.id in shown:
            continue
        shown.add(record.id)
        metrics = record.metrics
        detail = (
            f", loss {metrics['loss']:.4f}, accuracy {metrics.get('accuracy', 0):.3f}"
            if "loss" in metrics
            else ""
        )
        say(
            f"   {record.kind:>12} checkpoint: epoch {record.epoch}, batch {record.batch}{detail}"
        )


def _wait_final(client: Any, flow_run_id: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.read_flow_run(flow_run_id).state
        if state is not None and state.is_final():
            return state
        time.sleep(0.2)
    raise TimeoutError(f"flow run {flow_run_id} did not finish within {timeout} s")


def _identical(ours: dict[str, Any], theirs: dict[str, Any]) -> bool:
    import torch

    keys = {k for k in ours if not k.startswith("rng.")}
    return keys == {k for k in theirs if not k.startswith("rng.")} and all(
        torch.equal(ours[k], theirs[k]) for k in keys
    )


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    rule = (
        "+" + "-" * (width + 2) + "+" + "-" * (max(len(v) for _, v in rows) + 2) + "+"
    )
    lines = (
        [rule]
        + [
            f"| {name.ljust(width)} | {value.ljust(len(rule) - width - 7)} |"
            for name, value in rows
        ]
        + [rule]
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
