"""Past one machine: worker hosts that share only the network, and the faults of a cluster.

The control host runs the Prefect server (on PostgreSQL), the control pool's worker (resume
flows) and the operations CLI. Worker hosts `host-a` and `host-b` each run a `gpu` pool
worker in their own network namespace, from their own copy of the project, and reach the
Prefect API, PostgreSQL and the S3 checkpoint bucket over the network (see `cluster.py`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_CLIENT_MAX_RETRIES,
    temporary_settings,
)
from sqlalchemy.engine import make_url

from deployments.local import LocalStack, free_port
from resumable import operations, runtime
from resumable.settings import Settings
from resumable.spec import CheckpointPolicy, TrainingSpec
from tests.conftest import fresh_postgres_database
from tests.e2e.cluster import S3_ENV, Host, TcpForwarder, restart_postgres
from tests.e2e.conftest import (
    Stack,
    assert_bit_identical,
    uninterrupted_tensors,
    wait_for,
)

pytestmark = pytest.mark.slow

BUCKET = "resumable-checkpoints"
SPEC = TrainingSpec(
    recipe="tiny",
    recipe_options={"seconds_per_batch": 0.12},
    epochs=6,
    batch_size=16,
    seed=11,
    device="cpu",
    checkpoint=CheckpointPolicy(every_seconds=1.0),
)
CLI = str(Path(sys.executable).with_name("resumable"))
HEARTBEAT_SECONDS = 1
LOST_AFTER = 12  # seconds; Prefect waits at least 10


@dataclass
class Cluster(Stack):
    hosts: dict[str, Host] = field(default_factory=dict)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CLI, *args],
            env={**os.environ, **self.local.env()},
            capture_output=True,
            text=True,
            timeout=300,
        )

    def plan_held(self, point: str) -> Path:
        """Plan a `hold` for the control host's runs at `point`; returns the file it creates."""
        self.plan_faults({"at": point, "action": "hold"})
        return self.fault_plan.with_name(f"{self.fault_plan.name}.held-{point}")

    def wait_held(self, held: Path, flow_run_id: str, what: str) -> None:
        """Wait until a planned `hold` is reached; fail at once if the run ends first."""

        def reached() -> bool:
            if held.exists():
                return True
            state = self.state(flow_run_id)
            if state is not None and state.is_final():
                pytest.fail(
                    f"{flow_run_id} ended {state.type.value} before {what}: {state.message}"
                )
            return False

        wait_for(reached, 120, what)

    def start_resume(self, operation_id: str) -> str:
        from prefect.deployments import run_deployment

        run = run_deployment(
            "resume-training/default",
            parameters={"operation_id": operation_id},
            timeout=0,
            as_subflow=False,
        )
        return str(run.id)

    def logs(self, flow_run_id: str) -> str:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        logs = self.client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(flow_run_id)]))
        )
        return "\n".join(log.message for log in logs)

    def attempts(self, operation_id: str) -> list[tuple[int, str | None]]:
        with runtime.sessions(self.settings)() as session:
            return [
                (a.number, a.host)
                for a in operations.list_attempts(
                    session=session, operation_id=operation_id
                )
            ]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    ledger_url = fresh_postgres_database("resumable_hosts")
    prefect_url = (
        make_url(fresh_postgres_database("resumable_prefect_hosts"))
        .set(drivername="postgresql+asyncpg")
        .render_as_string(hide_password=False)
    )
    moto_port = free_port()
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "0.0.0.0", "-p", str(moto_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    postgres = TcpForwarder(("0.0.0.0", 0), ("127.0.0.1", 5432))
    s3_env = {
        **S3_ENV,
        "RESUMABLE_CHECKPOINT_URL": f"s3://{BUCKET}/checkpoints",
    }
    fault_plan = root / "faults.json"
    fault_plan.write_text("[]")
    local = LocalStack(
        data_dir=root / "control",
        port=free_port(),
        bind_host="0.0.0.0",
        database_url=ledger_url,
        prefect_database_url=prefect_url,
        workers=("control",),
        extra_env={
            **s3_env,
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{moto_port}",
            "RESUMABLE_FAULT_PLAN": str(fault_plan),
        },
    )
    saved_environ = dict(os.environ)
    os.environ.update(local.extra_env)  # the test process reads the bucket too
    hosts: dict[str, Host] = {}
    try:
        _create_bucket()
        local.up(progress=False)
        for index, name in enumerate(("host-a", "host-b"), start=1):
            host = Host(name=name, index=index, root=root / name, control_ip="")
            host.boot()
            ledger_on_host = make_url(ledger_url).set(
                host=host.control_ip, port=postgres.port
            )
            host.env = {
                **local.env(),
                "PREFECT_API_URL": f"http://{host.control_ip}:{local.port}/api",
                "PREFECT_HOME": str(host.root / "prefect-home"),
                "RESUMABLE_DATA_DIR": str(host.root / "data"),
                "RESUMABLE_PROJECT_DIR": str(host.project),
                "RESUMABLE_DATABASE_URL": ledger_on_host.render_as_string(
                    hide_password=False
                ),
                "AWS_ENDPOINT_URL": f"http://{host.control_ip}:{moto_port}",
                "RESUMABLE_FAULT_PLAN": str(host.root / "faults.json"),
                "RESUMABLE_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
            }
            hosts[name] = host
        settings = Settings(
            data_dir=local.data_dir,
            database_url=ledger_url,
            checkpoint_url=s3_env["RESUMABLE_CHECKPOINT_URL"],
        )
        with (
            temporary_settings(
                updates={PREFECT_API_URL: local.api_url, PREFECT_CLIENT_MAX_RETRIES: 12}
            ),
            get_client(sync_client=True) as client,
        ):
            yield Cluster(
                local=local,
                settings=settings,
                fault_plan=fault_plan,
                client=client,
                hosts=hosts,
            )
    finally:
        for host in hosts.values():
            host.power_off()
        local.down(progress=False)
        postgres.close()
        moto.terminate()
        moto.wait(10)
        os.environ.clear()
        os.environ.update(saved_environ)


def _create_bucket() -> None:
    import fsspec

    def created() -> bool:
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        try:
            fs.mkdir(BUCKET)
        except OSError:
            return False
        return True

    wait_for(created, 30, "the S3 server to create the bucket")


def test_a_run_whose_worker_died_is_cancelled_on_its_host_and_resumed_on_another(
    cluster: Cluster,
) -> None:
    host_a, host_b = cluster.hosts["host-a"], cluster.hosts["host-b"]
    held = host_a.plan_faults({"at": "batch", "epoch": 1, "batch": 3, "action": "hold"})
    host_a.start_worker()
    operation_id = cluster.start_training(SPEC)
    cluster.wait_held(held, operation_id, "the run on host-a to reach epoch 1 batch 3")

    # The worker dies while its run trains; no worker is left to signal the run, so it
    # must see its cancellation by polling its own state, and go on by itself till then.
    host_a.kill_worker()
    cancelled = cluster.cli("cancel", operation_id)
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    wait_for(
        lambda: "is CANCELLING: it stops" in cluster.logs(operation_id),
        60,
        "the run to see its cancellation (its poller runs beside the held batch)",
    )
    held.unlink()
    state = cluster.wait_final(operation_id, 60)
    assert state.type.value == "CANCELLED", state.message
    stopped = cluster.store.latest_good(operation_id)
    assert stopped.kind == "cancellation" and stopped.flow_run_id == operation_id
    assert (stopped.epoch, stopped.batch) > (1, 3)
    host_a.power_off()

    host_b.start_worker()
    resumed = cluster.cli("resume", operation_id)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    continuation = cluster.continuation_of(operation_id)
    assert cluster.wait_final(continuation, 180).type.value == "COMPLETED"

    assert cluster.attempts(operation_id) == [(1, "host-a"), (2, "host-b")]
    for run, host in ((operation_id, host_a), (continuation, host_b)):
        assert f"on host {host.name} (code in {host.project})" in cluster.logs(run)
    final = cluster.store.load_latest_good(operation_id)
    assert final.record.kind == "final" and final.record.flow_run_id == continuation
    assert_bit_identical(final.state.tensors, uninterrupted_tensors(SPEC))


@pytest.mark.faults
def test_a_host_lost_with_its_worker_is_marked_crashed_and_resumed_on_another(
    cluster: Cluster,
) -> None:
    from deployments.automations import (
        disable_lost_run_detection,
        enable_lost_run_detection,
    )

    host_a, host_b = cluster.hosts["host-a"], cluster.hosts["host-b"]
    host_b.stop_worker()  # so that the first attempt can only run on host-a
    host_a.boot()
    enable_lost_run_detection(LOST_AFTER)
    try:
        held = host_a.plan_faults(
            {"at": "batch", "epoch": 2, "batch": 1, "action": "hold"}
        )
        host_a.start_worker()
        operation_id = cluster.start_training(SPEC)
        cluster.wait_held(
            held, operation_id, "the run on host-a to reach epoch 2 batch 1"
        )

        # The machine is gone: its worker and its run die together, and nobody reports it.
        host_a.power_off()
        state = cluster.wait_state(operation_id, "CRASHED", 120)
        assert "lost: no heartbeat" in (state.message or "")
    finally:
        disable_lost_run_detection()

    host_b.start_worker()
    resumed = cluster.cli("resume", operation_id)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    continuation = cluster.continuation_of(operation_id)
    assert cluster.wait_final(continuation, 180).type.value == "COMPLETED"
    assert cluster.attempts(operation_id) == [(1, "host-a"), (2, "host-b")]
    final = cluster.store.load_latest_good(operation_id)
    assert_bit_identical(final.state.tensors, uninterrupted_tensors(SPEC))


@pytest.mark.faults
def test_a_live_run_declared_lost_stops_without_writing(cluster: Cluster) -> None:
    from prefect.states import Crashed

    host_b = cluster.hosts["host-b"]
    host_b.start_worker()
    held = host_b.plan_faults({"at": "batch", "epoch": 2, "batch": 1, "action": "hold"})
    operation_id = cluster.start_training(SPEC)
    cluster.wait_held(held, operation_id, "the run to reach epoch 2 batch 1")
    before = {
        c.id for c in cluster.store.list_checkpoints(operation_id, include_all=True)
    }

    # As if the lost-run automation had fired while the run was alive (a network partition).
    cluster.client.set_flow_run_state(
        uuid.UUID(operation_id), Crashed(message="lost: test"), force=True
    )
    wait_for(
        lambda: "declared lost" in cluster.logs(operation_id),
        60,
        "the run to notice it was declared lost (its poller runs beside the held batch)",
    )
    held.unlink()
    wait_for(lambda: not host_b.run_processes(), 60, "the run's process to exit")
    assert "writes no checkpoint" in cluster.logs(operation_id)

    after = {
        c.id for c in cluster.store.list_checkpoints(operation_id, include_all=True)
    }
    assert after == before, "a run declared lost wrote a checkpoint"
    assert cluster.state(operation_id).type.value in ("CRASHED", "FAILED")


def _every_committed_checkpoint_loads(cluster: Cluster, operation_id: str) -> None:
    for record in cluster.store.list_checkpoints(operation_id):
        cluster.store.load(record.id)


@pytest.mark.faults
def test_the_prefect_server_restarted_during_a_resume_and_during_training(
    cluster: Cluster,
) -> None:
    host_b = cluster.hosts["host-b"]
    host_b.start_worker()
    host_b.plan_faults({"at": "batch", "epoch": 1, "batch": 3, "action": "raise"})
    operation_id = cluster.start_training(SPEC)
    assert cluster.wait_final(operation_id, 120).type.value == "FAILED"

    # The resume has claimed the operation when the server goes away, and schedules after.
    resume_held = cluster.plan_held("resume_after_claim")
    training_held = host_b.plan_faults(
        {"at": "batch", "epoch": 4, "batch": 2, "action": "hold"}
    )
    resume = cluster.start_resume(operation_id)
    cluster.wait_held(resume_held, resume, "the resume to hold after its claim")
    cluster.local.restart_server(down_seconds=2)
    resume_held.unlink()
    state = cluster.wait_final(resume, 120)
    assert state.type.value == "COMPLETED", state.message

    # The continuation is training on host-b when the server goes away again.
    continuation = cluster.continuation_of(operation_id)
    cluster.wait_held(
        training_held, continuation, "the continuation to reach epoch 4 batch 2"
    )
    cluster.local.restart_server(down_seconds=2)
    training_held.unlink()
    assert cluster.wait_final(continuation, 120).type.value == "COMPLETED"

    final = cluster.store.load_latest_good(operation_id)
    assert final.record.kind == "final" and final.record.flow_run_id == continuation
    assert_bit_identical(final.state.tensors, uninterrupted_tensors(SPEC))
    _every_committed_checkpoint_loads(cluster, operation_id)


@pytest.mark.faults
@pytest.mark.postgres
def test_postgresql_restarted_during_a_run(cluster: Cluster) -> None:
    host_b = cluster.hosts["host-b"]
    host_b.start_worker()
    held = host_b.plan_faults({"at": "batch", "epoch": 2, "batch": 2, "action": "hold"})
    operation_id = cluster.start_training(SPEC)
    cluster.wait_held(held, operation_id, "the run to reach epoch 2 batch 2")
    before = cluster.store.latest_good(operation_id)

    # Every connection to PostgreSQL (the ledger's and the Prefect server's) is cut.
    restart_postgres()
    held.unlink()
    state = cluster.wait_final(operation_id, 120)

    assert state.type.value == "COMPLETED", state.message
    checkpoints = cluster.store.list_checkpoints(operation_id)
    assert any(c.step > before.step for c in checkpoints), (
        "no checkpoint was committed after the restart"
    )
    final = cluster.store.load_latest_good(operation_id)
    assert final.record.kind == "final"
    assert_bit_identical(final.state.tensors, uninterrupted_tensors(SPEC))
    _every_committed_checkpoint_loads(cluster, operation_id)
