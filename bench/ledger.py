"""Ledger costs on PostgreSQL: finding the latest good checkpoint, and 50 concurrent resumes.

- Latest-good lookup for an operation with 100 checkpoints against one with 100,000 (goal:
  ratio at most 2), medians of many lookups.
- 50 concurrent resume requests of one interrupted operation through `Resumer.resume`
  (validate, claim, verify, schedule) with PostgreSQL real and Prefect replaced by an
  in-process stand-in: winners (goal exactly 1) and answer times, over several rounds.

Usage: python bench/ledger.py [--database-url URL] [--rounds 5] [--no-write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import delete, insert
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from common import machine, median, verdict, write_section

from resumable import operations
from resumable.checkpoints.saver import CheckpointSaver
from resumable.checkpoints.store import CheckpointStore
from resumable.db import session_factory
from resumable.errors import ResumableError
from resumable.models import Checkpoint, utcnow
from resumable.resuming import Resumer
from resumable.settings import Settings
from resumable.spec import TrainingSpec
from resumable.training import Trainer
from tests.helpers.fakes import FakeGateway

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/resumable_bench"


def fresh_database(url: str) -> None:
    parsed = make_url(url)
    admin = f"host={parsed.host} port={parsed.port or 5432} user={parsed.username} dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{parsed.database}"')


def seed_checkpoints(store: CheckpointStore, operation_id: str, count: int) -> None:
    now = utcnow()
    rows: list[dict[str, Any]] = []
    for step in range(count):
        rows.append(
            {
                "id": uuid.uuid4().hex,
                "operation_id": operation_id,
                "flow_run_id": None,
                "kind": "periodic",
                "epoch": step // 100,
                "batch": step % 100,
                "step": step,
                "created_at": now - timedelta(seconds=count - step),
                "committed_at": now,
                "size_bytes": 1,
                "metrics": {},
                "status": "committed" if step % 7 else "pruned",
                "status_reason": None,
                "manifest_sha256": None,
                "fingerprint": "x",
            }
        )
        if len(rows) == 10_000:
            with store.sessions.begin() as session:
                session.execute(insert(Checkpoint), rows)
            rows = []
    if rows:
        with store.sessions.begin() as session:
            session.execute(insert(Checkpoint), rows)


def time_lookups(store: CheckpointStore, operation_id: str, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        store.latest_good(operation_id)
        samples.append(time.perf_counter() - started)
    return median(samples)


def race(
    resumer: Resumer, gateway: FakeGateway, operation_id: str, requests: int
) -> tuple[int, list[float]]:
    def one(n: int) -> tuple[bool, float]:
        started = time.perf_counter()
        try:
            resumer.resume(operation_id, owner=f"bench-{n}")
            won = True
        except ResumableError:
            won = False
        return won, time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=requests) as pool:
        results = list(pool.map(one, range(requests)))
    return sum(won for won, _ in results), [seconds for _, seconds in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=DEFAULT_URL)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    fresh_database(args.database_url)
    sessions = session_factory(args.database_url)
    store = CheckpointStore(
        sessions, Path(tempfile.mkdtemp(prefix="resumable-bench-")).as_uri()
    )
    seed_checkpoints(store, "op-small", 100)
    seed_checkpoints(store, "op-big", 100_000)
    with sessions() as session:
        session.connection().exec_driver_sql("ANALYZE checkpoints")
    time_lookups(store, "op-big", 20)  # warm the pool and the caches of both
    small = time_lookups(store, "op-small", 500)
    big = time_lookups(store, "op-big", 500)
    with sessions.begin() as session:
        session.execute(
            delete(Checkpoint).where(
                Checkpoint.operation_id.in_(["op-small", "op-big"])
            )
        )

    gateway = FakeGateway()
    resumer = Resumer(sessions, store, gateway, Settings())
    spec = TrainingSpec(recipe="tiny", epochs=2, batch_size=16)
    trainer = Trainer(spec)
    trainer.train(max_batches=3)
    winners, times = [], []
    for round_ in range(args.rounds):
        operation_id = f"op-race-{round_}-{uuid.uuid4().hex[:6]}"
        with sessions.begin() as session:
            operations.create_operation(
                session=session, operation_id=operation_id, spec=spec
            )
        gateway.states[operation_id] = "CANCELLED"
        CheckpointSaver(
            store, operation_id=operation_id, flow_run_id=None, policy=spec.checkpoint
        ).save_blocking(trainer, "cancellation")
        won, seconds = race(resumer, gateway, operation_id, 50)
        winners.append(won)
        times += seconds
    times.sort()
    p99 = times[min(len(times) - 1, int(0.99 * len(times)))]

    ratio = big / small
    lines = [
        "## Ledger on PostgreSQL",
        "",
        f"Machine: {machine()}. PostgreSQL at `{make_url(args.database_url).render_as_string(hide_password=True)}`.",
        f"Command: `python bench/ledger.py --rounds {args.rounds}` (run by `make bench`).",
        "",
        "| measure | result | goal | |",
        "|---|---|---|---|",
        f"| latest good checkpoint among 100 | {small * 1e3:.2f} ms | | |",
        f"| latest good checkpoint among 100,000 | {big * 1e3:.2f} ms | | |",
        f"| ratio 100,000 / 100 | {ratio:.2f}× | ≤ 2× | {verdict(ratio, 2.0)} |",
        f"| winners of 50 concurrent resumes, {args.rounds} rounds | {', '.join(map(str, winners))} | exactly 1 each | {'met' if set(winners) == {1} else '**missed**'} |",
        f"| answer time of a resume request, median | {statistics.median(times) * 1e3:.0f} ms | | |",
        f"| answer time of a resume request, 99th percentile | {p99 * 1e3:.0f} ms | | |",
        "",
        "The resume race runs the whole decision (validate, claim, verify the checkpoint, schedule) on",
        "50 threads of one process against real PostgreSQL; Prefect is replaced by an in-process stand-in,",
        "so the times leave out Prefect's own answer time. The end-to-end race through the HTTP API, the",
        "resume deployment and the CLI together is a test (`tests/e2e/test_surfaces.py`), not a benchmark.",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section("ledger", table)


if __name__ == "__main__":
    main()
