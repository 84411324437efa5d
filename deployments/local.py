"""The local stack: a Prefect server on SQLite, the `gpu` and `control` work pools with one
process worker each, and the deployments of `prefect.yaml`, all under the project's data folder.

`python -m deployments.local up` starts it and prints the UI address; `down` stops exactly
the processes `up` started (their ids are kept in `DATA_DIR/stack.json`). Tests and the
demo start private stacks on free ports with `LocalStack(...).up()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROJECT_DIR = Path(__file__).resolve().parents[1]
POOLS = ("gpu", "control")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _prefect() -> list[str]:
    return [str(Path(sys.executable).with_name("prefect"))]


@dataclass
class LocalStack:
    data_dir: Path
    port: int = 4200
    database_url: str | None = None
    prefect_database_url: str | None = None
    workers: tuple[str, ...] = POOLS
    extra_env: dict[str, str] = field(default_factory=dict)
    auto_resume: tuple[str, ...] = ()  # "crashed" and/or "failed"; empty: off
    # Mark training runs silent for this long CRASHED (a machine lost with its worker); None: off.
    lost_after: float | None = None
    # The address the server listens on; 0.0.0.0 lets workers on other hosts reach it.
    bind_host: str = "127.0.0.1"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state_file(self) -> Path:
        return self.data_dir / "stack.json"

    def env(self) -> dict[str, str]:
        """The environment every process of the stack, and every client of it, runs with."""
        env = {
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(self.data_dir / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "1",
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
            # SQLite answers 503 ("database is locked") under bursts of concurrent runs; Prefect's
            # client retries those, and a local stack gives it more tries than its default 5.
            "PREFECT_CLIENT_MAX_RETRIES": "12",
            # So that `prefect deployment run --watch` shows the runs' log lines, refusals included.
            "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "true",
            "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": "true",
            "RESUMABLE_DATA_DIR": str(self.data_dir),
            "RESUMABLE_PROJECT_DIR": str(PROJECT_DIR),
            "PYTHONUNBUFFERED": "1",
        }
        if self.database_url:
            env["RESUMABLE_DATABASE_URL"] = self.database_url
        if self.prefect_database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.prefect_database_url
        env.update(self.extra_env)
        return env

    def _run_env(self) -> dict[str, str]:
        return {**os.environ, **self.env()}

    def _spawn(self, name: str, args: list[str]) -> int:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                args,
                cwd=PROJECT_DIR,
                env=self._run_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return process.pid

    def _cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*_prefect(), *args],
            cwd=PROJECT_DIR,
            env=self._run_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"`prefect {' '.join(args)}` failed:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def _cli_python(self, code: str, *args: str) -> None:
        result = subprocess.run(
            [sys.executable, "-c", code, *args],
            cwd=PROJECT_DIR,
            env=self._run_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{code!r} failed:\n{result.stdout}\n{result.stderr}")

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def up(self, *, progress: bool = True) -> LocalStack:
        """Start the server, create the pools, deploy, start the workers; returns once all are ready."""
        say = print if progress else (lambda *a, **k: None)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.state_file.exists() and self.healthy():
            say(f"the local stack is already up: {self.ui_url}")
            return self
        pids: dict[str, int] = {}
        say(f"starting the Prefect server on {self.ui_url} ...")
        pids["server"] = self._start_server()
        self._write_state(pids)
        for pool in POOLS:
            result = self._cli(
                "work-pool", "create", pool, "--type", "process", check=False
            )
            if (
                result.returncode != 0
                and "already exists" not in result.stdout + result.stderr
            ):
                raise RuntimeError(
                    f"could not create work pool {pool!r}:\n{result.stdout}\n{result.stderr}"
                )
        say("deploying train-model/gpu and resume-training/default ...")
        self._cli("--no-prompt", "deploy", "--all")
        if self.auto_resume:
            self._cli_python(
                "from deployments.automations import enable_auto_resume; import sys; enable_auto_resume(sys.argv[1].split(','))",
                ",".join(self.auto_resume),
            )
            say(f"auto-resume is on for {', '.join(self.auto_resume)} training runs")
        if self.lost_after is not None:
            self._cli_python(
                "from deployments.automations import enable_lost_run_detection; import sys; enable_lost_run_detection(float(sys.argv[1]))",
                str(self.lost_after),
            )
            say(
                f"training runs silent for {self.lost_after:g} s are marked CRASHED (lost)"
            )
        for pool in self.workers:
            pids[f"worker-{pool}"] = self._spawn(
                f"worker-{pool}",
                [
                    *_prefect(),
                    "worker",
                    "start",
                    "--pool",
                    pool,
                    "--type",
                    "process",
                    "--name",
                    f"{pool}-local",
                ],
            )
        self._write_state(pids)
        say(
            f"up: Prefect UI at {self.ui_url}, workers for pools {', '.join(self.workers)}"
        )
        return self

    def _start_server(self) -> int:
        pid = self._spawn(
            "server",
            [
                *_prefect(),
                "server",
                "start",
                "--host",
                self.bind_host,
                "--port",
                str(self.port),
            ],
        )
        deadline = time.monotonic() + 120
        while not self.healthy():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the Prefect server did not answer within 120 s; see {self.data_dir / 'logs' / 'server.log'}"
                )
            time.sleep(0.25)
        return pid

    def restart_server(self, *, down_seconds: float = 0.0) -> None:
        """Stop the Prefect server, wait `down_seconds`, start it again on the same port.

        Runs and workers stay up; Prefect's clients retry while it is away.
        """
        state = json.loads(self.state_file.read_text())
        _stop_group(state["pids"]["server"])
        time.sleep(down_seconds)
        state["pids"]["server"] = self._start_server()
        self._write_state(state["pids"])

    def _write_state(self, pids: dict[str, int]) -> None:
        self.state_file.write_text(
            json.dumps({"api_url": self.api_url, "pids": pids}, indent=1)
        )

    def down(self, *, progress: bool = True) -> None:
        """Stop exactly the processes `up` started."""
        if not self.state_file.exists():
            if progress:
                print("nothing to stop: the local stack is not up")
            return
        pids: dict[str, int] = json.loads(self.state_file.read_text())["pids"]
        # Workers first, so they do not see the server vanish under them.
        for name in sorted(pids, key=lambda n: n == "server"):
            _stop_group(pids[name])
        self.state_file.unlink()
        if progress:
            print(f"down: stopped {', '.join(sorted(pids))}")


def _stop_group(pid: int, grace: float = 15.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def default_stack() -> LocalStack:
    data_dir = Path(
        os.environ.get("RESUMABLE_DATA_DIR", PROJECT_DIR / ".resumable")
    ).resolve()
    lost_after = os.environ.get("RESUMABLE_LOST_AFTER_SECONDS")
    return LocalStack(
        data_dir=data_dir,
        port=int(os.environ.get("RESUMABLE_PREFECT_PORT", "4200")),
        auto_resume=tuple(
            s for s in os.environ.get("RESUMABLE_AUTO_RESUME", "").split(",") if s
        ),
        lost_after=float(lost_after) if lost_after else None,
    )


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    stack = default_stack()
    if command == "up":
        stack.up()
        print("\nTo use it from this shell:")
        for name in ("PREFECT_API_URL", "RESUMABLE_DATA_DIR"):
            print(f"  export {name}={stack.env()[name]}")
    elif command == "down":
        stack.down()
    else:
        sys.exit("usage: python -m deployments.local up|down")


if __name__ == "__main__":
    main()
