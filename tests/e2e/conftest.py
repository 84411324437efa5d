"""A real local stack for end-to-end tests: Prefect server, process workers, metadata on PostgreSQL.

One stack serves the whole session (it takes ~20 s to start). Tests that plan faults
write them to the file the workers read (`RESUMABLE_FAULT_PLAN`); it is emptied after
each test, and tests run one at a time.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun, State
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_CLIENT_MAX_RETRIES,
    temporary_settings,
)

from deployments.local import LocalStack, free_port
from resumable import operations, runtime
from resumable.checkpoints.store import CheckpointStore
from resumable.settings import Settings
from resumable.spec import TrainingSpec
from resumable.training import Trainer
from tests.conftest import fresh_postgres_database

pytestmark = pytest.mark.slow


@dataclass
class Stack:
    local: LocalStack
    settings: Settings
    fault_plan: Path
    client: SyncPrefectClient

    @property
    def store(self) -> CheckpointStore:
        return runtime.checkpoint_store(self.settings)

    def rest(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call Prefect's REST API as the UI does; a 503 (SQLite busy) is retried, as Prefect's own client does."""
        import httpx

        deadline = time.monotonic() + 60
        while True:
            response = httpx.request(
                method, f"{self.local.api_url}{path}", timeout=30, **kwargs
            )
            if response.status_code != 503 or time.monotonic() > deadline:
                return response
            time.sleep(0.2)

    def plan_faults(self, *faults: dict[str, Any]) -> None:
        self.fault_plan.write_text(json.dumps(list(faults)))

    def start_training(self, spec: TrainingSpec, **kwargs: Any) -> str:
        from prefect.deployments import run_deployment

        run = run_deployment(
            "train-model/gpu",
            parameters={"spec": spec.model_dump(mode="json")},
            timeout=0,
            as_subflow=False,
            **kwargs,
        )
        return str(run.id)

    def resume(self, operation_id: str, timeout: float = 180) -> FlowRun:
        from prefect.deployments import run_deployment

        run = run_deployment(
            "resume-training/default",
            parameters={"operation_id": operation_id},
            timeout=0,
            as_subflow=False,
        )
        self.wait_final(str(run.id), timeout)
        return self.client.read_flow_run(run.id)

    def state(self, flow_run_id: str) -> State | None:
        return self.client.read_flow_run(uuid.UUID(flow_run_id)).state

    def wait_final(self, flow_run_id: str, timeout: float = 180) -> State:
        return wait_for(
            lambda: _final(self.state(flow_run_id)),
            timeout,
            f"flow run {flow_run_id} to end",
        )

    def wait_state(
        self, flow_run_id: str, state_type: str, timeout: float = 120
    ) -> State:
        return wait_for(
            lambda: (
                (s := self.state(flow_run_id)) is not None
                and s.type.value == state_type
                and s
            ),
            timeout,
            f"flow run {flow_run_id} to be {state_type}",
        )

    def continuation_of(self, operation_id: str) -> str:
        with runtime.sessions(self.settings)() as session:
            run = operations.get_operation(
                session=session, id_or_run=operation_id
            ).continuation_run_id
        assert run is not None, f"operation {operation_id} has no continuation"
        return run


def _final(state: State | None) -> State | None:
    return state if state is not None and state.is_final() else None


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("stack")
    fault_plan = data_dir / "faults.json"
    fault_plan.write_text("[]")
    database_url = fresh_postgres_database("resumable_e2e")
    local = LocalStack(
        data_dir=data_dir,
        port=free_port(),
        database_url=database_url,
        extra_env={"RESUMABLE_FAULT_PLAN": str(fault_plan)},
    )
    local.up(progress=False)
    settings = Settings(data_dir=data_dir, database_url=database_url)
    try:
        with (
            # The test process is a client of the stack like any other: same address, same
            # retries of SQLite's 503 answers under bursts (see LocalStack.env).
            temporary_settings(
                updates={
                    PREFECT_API_URL: local.api_url,
                    PREFECT_CLIENT_MAX_RETRIES: int(
                        local.env()["PREFECT_CLIENT_MAX_RETRIES"]
                    ),
                }
            ),
            get_client(sync_client=True) as client,
        ):
            yield Stack(
                local=local, settings=settings, fault_plan=fault_plan, client=client
            )
    finally:
        local.down(progress=False)


@pytest.fixture(autouse=True)
def _clear_fault_plan(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "stack" in request.fixturenames:
        request.getfixturevalue("stack").plan_faults()


def uninterrupted_tensors(spec: TrainingSpec) -> dict[str, torch.Tensor]:
    """The parameters and optimizer state an uninterrupted run of `spec` ends with.

    Computed without the tiny recipe's `seconds_per_batch` pause, which changes no number.
    """
    options = {k: v for k, v in spec.recipe_options.items() if k != "seconds_per_batch"}
    trainer = Trainer(spec.model_copy(update={"recipe_options": options}))
    trainer.train()
    return {
        k: v.clone()
        for k, v in trainer.capture_state().tensors.items()
        if not k.startswith("rng.")
    }


def assert_bit_identical(
    stored: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> None:
    stored = {k: v for k, v in stored.items() if not k.startswith("rng.")}
    assert stored.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(stored[k], expected[k])]
    assert not different, f"tensors differ from the uninterrupted run: {different}"


@dataclass
class ApiServer:
    url: str
    process: Any


def start_api_server(
    stack: Stack, extra_env: dict[str, str] | None = None
) -> ApiServer:
    """`resumable api` in its own process, with the stack's settings; returns once it answers."""
    import os
    import subprocess
    import sys

    import httpx

    port = free_port()
    env = {**os.environ, **stack.local.env(), **(extra_env or {})}
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("resumable")), "api", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return process.poll() is not None and pytest.fail("`resumable api` exited")

    wait_for(answers, 60, "the operations API to answer")
    return ApiServer(url=url, process=process)


@pytest.fixture(scope="session")
def api_server(stack: Stack) -> Iterator[ApiServer]:
    server = start_api_server(stack)
    yield server
    server.process.terminate()
    server.process.wait(10)


def cli_env(stack: Stack, **extra: str) -> dict[str, str]:
    import os

    return {**os.environ, **stack.local.env(), **extra}
