"""The `resumable` command line: operations, checkpoints, resume, cancel, and the HTTP API.

Exit codes: 0 done, 2 usage (including a malformed id), 3 not found, 4 conflict (not
resumable, already resumed, nothing to cancel), 5 the Prefect server cannot be reached.
Tables are for people; `--json` prints the same data for scripts.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from resumable.errors import (
    CheckpointNotFound,
    InvalidSpec,
    NotCancellable,
    NotResumable,
    OperationNotFound,
    ResumableError,
)
from resumable.resuming import OrchestratorUnavailable

EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CONFLICT, EXIT_UNREACHABLE = 2, 3, 4, 5

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Training operations that survive interruption.",
)
ops_app = typer.Typer(no_args_is_help=True, help="List and inspect operations.")
checkpoints_app = typer.Typer(
    no_args_is_help=True, help="List an operation's checkpoints."
)
app.add_typer(ops_app, name="ops")
app.add_typer(checkpoints_app, name="checkpoints")

# Without a terminal (pipes, tests) rich would wrap tables at 80 columns and cut the ids.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")
]
IdArgument = Annotated[
    str,
    typer.Argument(help="An operation id, or the flow run id of any of its attempts."),
]


@lru_cache(maxsize=1)
def service() -> Any:
    from resumable.api import build_service
    from resumable.settings import get_settings

    return build_service(get_settings())


@contextmanager
def reported() -> Iterator[None]:
    """Turn the project's errors into a message on stderr and the documented exit code."""
    try:
        yield
    except (OperationNotFound, CheckpointNotFound) as error:
        _fail(error, EXIT_NOT_FOUND)
    except (NotResumable, NotCancellable) as error:
        _fail(error, EXIT_CONFLICT)
    except InvalidSpec as error:
        _fail(error, EXIT_USAGE)
    except OrchestratorUnavailable as error:
        _fail(error, EXIT_UNREACHABLE)
    except ResumableError as error:
        _fail(error, 1)


def _fail(error: Exception, code: int) -> NoReturn:
    err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _checkpoint_cell(checkpoint: Any) -> str:
    if checkpoint is None:
        return "-"
    return f"{checkpoint.kind} e{checkpoint.epoch} b{checkpoint.batch}"


@ops_app.command("ls")
def ops_ls(
    resumable: Annotated[
        bool,
        typer.Option("--resumable", help="Only operations that can be resumed now."),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """List operations, newest first, with their status and latest good checkpoint."""
    with reported():
        views = service().list_operations(resumable=True if resumable else None)
    if as_json:
        _print_json([v.model_dump(mode="json") for v in views])
        return
    table = Table(
        "operation",
        "status",
        "recipe",
        "attempts",
        "latest checkpoint",
        "resumable",
        "updated",
    )
    for view in views:
        status = view.status + ("*" if view.status_source == "ledger" else "")
        table.add_row(
            view.id,
            status,
            view.recipe,
            str(view.attempts),
            _checkpoint_cell(view.latest_checkpoint),
            "yes" if view.resumable else "no",
            f"{view.updated_at:%Y-%m-%d %H:%M:%S}",
        )
    out.print(table)
    if any(v.status_source == "ledger" for v in views):
        out.print("* Prefect could not be reached: the last status the ledger saw")


@ops_app.command("show")
def ops_show(operation_id: IdArgument, as_json: JsonOption = False) -> None:
    """Show one operation: status, spec, attempts and claim."""
    with reported():
        detail = service().get(operation_id)
    if as_json:
        _print_json(detail.model_dump(mode="json"))
        return
    table = Table(show_header=False)
    for name, value in (
        ("operation", detail.id),
        ("status", f"{detail.status} ({detail.status_source})"),
        ("resumable", "yes" if detail.resumable else "no"),
        ("recipe", detail.recipe),
        ("epochs", str(detail.epochs)),
        ("latest checkpoint", _checkpoint_cell(detail.latest_checkpoint)),
        (
            "attempts",
            ", ".join(
                f"#{a.number} {a.flow_run_id}" + (f" on {a.host}" if a.host else "")
                for a in detail.attempt_runs
            ),
        ),
        ("resume claimed by", detail.claim_owner or "-"),
    ):
        table.add_row(name, value)
    out.print(table)


@checkpoints_app.command("ls")
def checkpoints_ls(
    operation_id: IdArgument,
    include_all: Annotated[
        bool, typer.Option("--all", help="Also pruned, corrupted and abandoned ones.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """List an operation's checkpoints, newest position first."""
    with reported():
        views = service().checkpoints(operation_id, include_all=include_all)
    if as_json:
        _print_json([v.model_dump(mode="json") for v in views])
        return
    table = Table(
        "checkpoint", "kind", "epoch", "batch", "step", "size", "status", "created"
    )
    for view in views:
        table.add_row(
            view.id,
            view.kind,
            str(view.epoch),
            str(view.batch),
            str(view.step),
            f"{view.size_bytes / 1e6:.1f} MB",
            view.status,
            f"{view.created_at:%Y-%m-%d %H:%M:%S}",
        )
    out.print(table)


@app.command()
def resume(
    operation_id: IdArgument,
    watch: Annotated[
        bool, typer.Option("--watch", help="Show progress until the resumed run ends.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Resume an interrupted operation from its last good checkpoint (exactly once)."""
    with reported():
        result = service().resume(operation_id, owner=f"cli:{uuid.uuid4().hex}")
    if as_json:
        _print_json({"success": True, "data": result.model_dump(mode="json")})
    else:
        source = result.resumed_from
        out.print(
            f"Resumed operation {result.operation_id} from its {source.checkpoint_type} checkpoint "
            f"(epoch {source.epoch}, batch {source.batch}) as flow run {result.flow_run_id}",
            highlight=False,
        )
    if watch:
        with reported():
            code = watch_run(result.operation_id, result.flow_run_id)
        raise typer.Exit(code)


def watch_run(
    operation_id: str, flow_run_id: str, poll: Callable[[str], str | None] | None = None
) -> int:
    """Show a live progress bar for a training run until it ends; 0 if it completed, else 1."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    svc = service()
    poll = poll or svc.gateway.flow_run_state
    detail = svc.get(operation_id)
    epochs = detail.epochs
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("epoch {task.completed:.0f}/{task.total:.0f}"),
        TimeElapsedColumn(),
        console=err,
    ) as progress:
        task = progress.add_task("scheduled", total=epochs)
        while True:
            state = poll(flow_run_id) or "UNKNOWN"
            checkpoints = svc.checkpoints(operation_id)
            latest = checkpoints[0] if checkpoints else None
            done = latest.epoch + (latest.batch > 0) * 0.5 if latest else 0
            loss = (
                f", loss {latest.metrics['loss']:.4f}"
                if latest and "loss" in latest.metrics
                else ""
            )
            progress.update(
                task, completed=min(done, epochs), description=f"{state.lower()}{loss}"
            )
            if state in {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}:
                break
            time.sleep(1.0)
    out.print(f"flow run {flow_run_id} ended {state}", highlight=False)
    return 0 if state == "COMPLETED" else 1


@app.command()
def cancel(operation_id: IdArgument, as_json: JsonOption = False) -> None:
    """Cancel an operation's running attempt; it saves a cancellation checkpoint and ends CANCELLED."""
    with reported():
        result = service().cancel(operation_id)
    if as_json:
        _print_json({"success": True, "data": result.model_dump(mode="json")})
    else:
        out.print(
            f"Cancelling flow run {result.flow_run_id} of operation {result.operation_id} ({result.status})",
            highlight=False,
        )


@app.command()
def plot(
    operation_id: IdArgument,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="PNG file to write (default: loss-<operation>.png)."
        ),
    ] = None,
) -> None:
    """Draw the operation's loss curve, across every attempt, to a PNG file."""
    from resumable.charts import text_chart, write_loss_png

    with reported():
        svc = service()
        checkpoints = svc.checkpoints(operation_id)
        if not checkpoints:
            raise CheckpointNotFound(operation_id, "nothing to plot")
        history = svc.store.load_meta(checkpoints[0].id)["history"]
        detail_id = svc.get(operation_id).id
    if not history:
        _fail(
            ResumableError(
                f"operation {detail_id} has not finished an epoch yet; nothing to plot"
            ),
            EXIT_NOT_FOUND,
        )
    path = write_loss_png(
        history, output or Path(f"loss-{detail_id}.png"), title=f"operation {detail_id}"
    )
    out.print(text_chart([record["loss"] for record in history]), highlight=False)
    out.print(f"wrote {path}", highlight=False)


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
) -> None:
    """Serve the operations HTTP API (OpenAPI docs at /docs)."""
    import uvicorn

    uvicorn.run(
        "resumable.api:app_from_settings",
        factory=True,
        host=host,
        port=port,
        log_level="info",
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
