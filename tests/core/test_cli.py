"""The `resumable` CLI with a fake orchestrator: tables, JSON and every documented exit code."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from resumable import cli, operations
from resumable.checkpoints.saver import CheckpointSaver
from resumable.service import OperationsService
from resumable.settings import Settings
from resumable.spec import TrainingSpec
from resumable.training import Trainer
from tests.helpers.fakes import FakeGateway, seed_operation

SPEC = TrainingSpec(recipe="tiny", epochs=2, batch_size=16)
runner = CliRunner()


@pytest.fixture
def gateway() -> FakeGateway:
    return FakeGateway()


@pytest.fixture
def service(
    sessions, store, gateway: FakeGateway, monkeypatch: pytest.MonkeyPatch
) -> OperationsService:
    service = OperationsService(sessions, store, gateway, Settings())
    monkeypatch.setattr(cli, "service", lambda: service)
    return service


def interrupted(
    service: OperationsService,
    gateway: FakeGateway,
    operation_id: str,
    state: str = "CANCELLED",
) -> None:
    seed_operation(
        service.sessions, service.store, gateway, operation_id, state=state, batches=2
    )


def test_resume_prints_where_it_resumed_and_exits_0(
    service, gateway, operation_id: str
) -> None:
    interrupted(service, gateway, operation_id)
    result = runner.invoke(cli.app, ["resume", operation_id])
    assert result.exit_code == 0, result.output
    assert "from its cancellation checkpoint (epoch 0, batch 2)" in result.output


def test_resume_json_is_the_api_body(service, gateway, operation_id: str) -> None:
    interrupted(service, gateway, operation_id)
    result = runner.invoke(cli.app, ["resume", operation_id, "--json"])
    body = json.loads(result.stdout)
    assert (
        body["success"] is True
        and body["data"]["resumed_from"]["checkpoint_type"] == "cancellation"
    )


def test_exit_codes(service, gateway, operation_id: str) -> None:
    interrupted(service, gateway, operation_id, state="RUNNING")
    assert runner.invoke(cli.app, ["resume"]).exit_code == 2  # usage: missing id
    assert runner.invoke(cli.app, ["resume", "../etc"]).exit_code == 2  # malformed id
    assert runner.invoke(cli.app, ["resume", "no-such-operation"]).exit_code == 3
    conflict = runner.invoke(cli.app, ["resume", operation_id])
    assert conflict.exit_code == 4 and "is RUNNING" in conflict.output
    gateway.reachable = False
    assert runner.invoke(cli.app, ["resume", operation_id]).exit_code == 5
    assert runner.invoke(cli.app, ["cancel", operation_id]).exit_code == 5


def test_a_second_resume_is_a_conflict(service, gateway, operation_id: str) -> None:
    interrupted(service, gateway, operation_id)
    assert runner.invoke(cli.app, ["resume", operation_id]).exit_code == 0
    second = runner.invoke(cli.app, ["resume", operation_id])
    assert second.exit_code == 4 and "already resumed" in second.output


def test_listing_and_showing(service, gateway, operation_id: str) -> None:
    interrupted(service, gateway, operation_id)
    table = runner.invoke(cli.app, ["ops", "ls", "--resumable"])
    assert table.exit_code == 0 and operation_id in table.output
    listed = json.loads(runner.invoke(cli.app, ["ops", "ls", "--json"]).stdout)
    assert any(o["id"] == operation_id and o["resumable"] for o in listed)
    shown = runner.invoke(cli.app, ["ops", "show", operation_id])
    assert "cancellation e0 b2" in shown.output
    checkpoints = json.loads(
        runner.invoke(cli.app, ["checkpoints", "ls", operation_id, "--json"]).stdout
    )
    assert [(c["kind"], c["epoch"], c["batch"]) for c in checkpoints] == [
        ("cancellation", 0, 2)
    ]
    assert runner.invoke(cli.app, ["checkpoints", "ls", "missing-op"]).exit_code == 3


def test_cancel_of_a_finished_operation_is_a_conflict(
    service, gateway, operation_id: str
) -> None:
    interrupted(service, gateway, operation_id, state="COMPLETED")
    result = runner.invoke(cli.app, ["cancel", operation_id])
    assert result.exit_code == 4 and "nothing to cancel" in result.output


def test_watch_follows_the_resumed_run_until_it_ends(
    service, gateway, operation_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    interrupted(service, gateway, operation_id)
    states = iter(["SCHEDULED", "RUNNING", "COMPLETED"])
    monkeypatch.setattr(cli.time, "sleep", lambda _: None)
    monkeypatch.setattr(
        gateway,
        "flow_run_state",
        lambda run: next(states) if run != operation_id else "CANCELLED",
    )
    result = runner.invoke(cli.app, ["resume", operation_id, "--watch"])
    assert result.exit_code == 0, result.output
    assert "ended COMPLETED" in result.output


def test_plot_writes_a_png_of_the_loss_across_attempts(
    service, gateway, operation_id: str, tmp_path
) -> None:
    with service.sessions.begin() as session:
        operations.create_operation(
            session=session, operation_id=operation_id, spec=SPEC
        )
    trainer = Trainer(SPEC)
    trainer.train()
    CheckpointSaver(
        service.store,
        operation_id=operation_id,
        flow_run_id=operation_id,
        policy=SPEC.checkpoint,
    ).save_blocking(trainer, "final")
    target = tmp_path / "loss.png"
    result = runner.invoke(cli.app, ["plot", operation_id, "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "epochs 1–2" in result.output
    assert runner.invoke(cli.app, ["plot", "no-such-op"]).exit_code == 3
