"""Several machines on one: worker hosts in their own network namespaces, an S3 server, and a
Prefect server on PostgreSQL that they all reach over the network.

Each `Host` has its own network namespace (it reaches the control host only through a veth
pair, never through 127.0.0.1), its own host name (a UTS namespace), its own copy of the
project as its working folder, its own Prefect home and data folder. Hosts share nothing
but the network: the Prefect API, PostgreSQL (through a TCP forwarder, since PostgreSQL
listens on loopback only) and the checkpoint store, an S3 bucket served by moto.

Needs root for `ip netns` and `unshare`, as on the development and CI machines.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
PROJECT_PARTS = ("resumable", "flows", "tasks", "deployments", "prefect.yaml")
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "resumable-test",
    "AWS_SECRET_ACCESS_KEY": "resumable-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}
HOST_MARK = "RESUMABLE_TEST_HOST"


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}"
        )


class TcpForwarder:
    """Accepts on `listen` and pipes each connection to `target`; for services on loopback."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(listen, reuse_port=False)
        self.port = self.server.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pipe, args=(source, sink), daemon=True
                ).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()
            with self._lock:
                self._open -= {source, sink}

    def close(self) -> None:
        self.server.close()
        with self._lock:
            for end in list(self._open):
                end.close()


@dataclass
class Host:
    """A worker machine: network namespace, host name, working folder, Prefect home."""

    name: str
    index: int
    root: Path
    control_ip: str  # the control host's address as this host sees it
    env: dict[str, str] = field(default_factory=dict)
    worker: subprocess.Popen[bytes] | None = None
    netns: str = ""
    booted: bool = False

    def __post_init__(self) -> None:
        self.netns = f"rs{os.getpid()}h{self.index}"
        self.mark = f"{self.name}-{uuid.uuid4().hex[:8]}"

    def boot(self) -> None:
        """Create the namespace and its link to the control host; copy the project (once)."""
        if self.booted:
            return
        ns, outer, inner = self.netns, f"{self.netns}-o", f"{self.netns}-i"
        subnet = f"10.231.{self.index}"
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        _run("ip", "link", "set", inner, "netns", ns)
        _run("ip", "addr", "add", f"{subnet}.1/24", "dev", outer)
        _run("ip", "link", "set", outer, "up")
        _run(
            "ip",
            "netns",
            "exec",
            ns,
            "ip",
            "addr",
            "add",
            f"{subnet}.2/24",
            "dev",
            inner,
        )
        _run("ip", "netns", "exec", ns, "ip", "link", "set", inner, "up")
        _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        self.control_ip = f"{subnet}.1"
        self.booted = True
        project = self.root / "project"
        if project.exists():
            return
        for part in PROJECT_PARTS:
            source = PROJECT_DIR / part
            if source.is_dir():
                shutil.copytree(
                    source, project / part, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                project.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, project / part)

    @property
    def project(self) -> Path:
        return self.root / "project"

    def plan_faults(self, *faults: dict[str, object]) -> Path:
        """Plan faults for this host's runs; returns the file a `hold` creates (see `resumable.faults`)."""
        plan = self.root / "faults.json"
        plan.write_text(json.dumps(list(faults)))
        return plan.with_name(f"{plan.name}.held-{faults[0]['at']}") if faults else plan

    def start_worker(self, pool: str = "gpu") -> None:
        """Start the host's worker, unless it is running."""
        if self.worker is not None and self.worker.poll() is None:
            return
        prefect = Path(sys.executable).with_name("prefect")
        command = (
            f"hostname {self.name} && exec {prefect} worker start --pool {pool}"
            f" --type process --name {self.name}"
        )
        logs = self.root / "worker.log"
        with open(logs, "ab") as log:
            self.worker = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.netns,
                    "unshare",
                    "--uts",
                    "sh",
                    "-c",
                    command,
                ],
                cwd=self.project,
                env={**os.environ, **self.env, HOST_MARK: self.mark},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop_worker(self) -> None:
        """Stop the worker, when it runs nothing: SIGTERM, and SIGKILL if it lingers."""
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(5)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait(10)

    def run_processes(self) -> list[int]:
        """The processes of this host other than its worker: the runs it started."""
        worker = self.worker.pid if self.worker is not None else None
        return [pid for pid in self.processes() if pid != worker]

    def kill_worker(self) -> None:
        """SIGKILL the worker process alone; the runs it started go on."""
        assert self.worker is not None
        self.worker.kill()
        self.worker.wait(10)

    def processes(self) -> list[int]:
        """Every process started on this host (they carry the host's mark in their environment)."""
        found = []
        needle = f"{HOST_MARK}={self.mark}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if needle in environ.split(b"\0"):
                found.append(int(entry.name))
        return found

    def power_off(self) -> None:
        """The machine is gone: every process on it is killed at once, then its network."""
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.worker is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.worker.wait(10)
        deadline = time.monotonic() + 10
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(RuntimeError):
            _run("ip", "netns", "del", self.netns)
        self.booted = False


def restart_postgres() -> None:
    """Restart the machine's PostgreSQL cluster (fast shutdown: every connection is cut)."""
    listing = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True
    ).stdout.split()
    version, name = listing[0], listing[1]
    _run("pg_ctlcluster", version, name, "restart", "-m", "fast")
