"""The ledger's two races, settled by conditional UPDATEs on real SQLite and PostgreSQL."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from resumable import operations
from resumable.errors import InvalidSpec, OperationNotFound
from resumable.models import Operation, utcnow
from resumable.spec import TrainingSpec

SPEC = TrainingSpec(recipe="tiny", epochs=2)


def make_operation(sessions: sessionmaker[Session], operation_id: str) -> None:
    with sessions.begin() as session:
        operations.create_operation(
            session=session, operation_id=operation_id, spec=SPEC
        )


def claim(
    sessions: sessionmaker[Session],
    operation_id: str,
    owner: str,
    run: str | None = None,
    ttl: float = 600,
):
    with sessions.begin() as session:
        return operations.claim_resume(
            session=session,
            operation_id=operation_id,
            interrupted_run_id=run or operation_id,
            owner=owner,
            ttl_seconds=ttl,
        )


def test_fifty_concurrent_claims_have_exactly_one_winner(
    sessions: sessionmaker[Session], operation_id: str
) -> None:
    make_operation(sessions, operation_id)
    with ThreadPoolExecutor(max_workers=50) as pool:
        claims = list(
            pool.map(lambda n: claim(sessions, operation_id, f"request-{n}"), range(50))
        )
    winners = [c for c in claims if c.won]
    assert len(winners) == 1
    assert {c.owner for c in claims if not c.won} == {winners[0].owner}


def test_the_same_owner_may_claim_again_to_finish_a_half_done_resume(
    sessions: sessionmaker[Session], operation_id: str
) -> None:
    make_operation(sessions, operation_id)
    assert claim(sessions, operation_id, "resume-run-1").won
    assert claim(sessions, operation_id, "resume-run-1").won
    assert not claim(sessions, operation_id, "resume-run-2").won


def test_a_claim_that_scheduled_nothing_expires(
    sessions: sessionmaker[Session], operation_id: str
) -> None:
    make_operation(sessions, operation_id)
    assert claim(sessions, operation_id, "dead-claimer").won
    with sessions.begin() as session:
        session.execute(
            update(Operation)
            .where(Operation.id == operation_id)
            .values(claimed_at=utcnow() - timedelta(hours=1))
        )
    assert claim(sessions, operation_id, "next", ttl=60).won


def test_a_claim_ends_with_the_run_it_scheduled(
    sessions: sessionmaker[Session], operation_id: str
) -> None:
    make_operation(sessions, operation_id)
    assert claim(sessions, operation_id, "first").won
    with sessions.begin() as session:
        operations.record_continuation(
            session=session,
            operation_id=operation_id,
            owner="first",
            flow_run_id=f"{operation_id}-2",
            resumed_from_checkpoint_id="c1",
        )
    assert not claim(
        sessions, operation_id, "late", run=operation_id
    ).won  # the old attempt is no longer the latest
    assert claim(
        sessions, operation_id, "second", run=f"{operation_id}-2"
    ).won  # the continuation, once interrupted, can be claimed
    with sessions() as session:
        assert (
            operations.get_operation(session=session, id_or_run=f"{operation_id}-2").id
            == operation_id
        )
        assert [
            a.number
            for a in operations.list_attempts(
                session=session, operation_id=operation_id
            )
        ] == [1, 2]


def test_one_of_two_runs_holds_the_trainer_lease(
    sessions: sessionmaker[Session], operation_id: str
) -> None:
    make_operation(sessions, operation_id)
    with ThreadPoolExecutor(max_workers=2) as pool:
        holders = list(
            pool.map(
                lambda run: _acquire(sessions, operation_id, run), ["run-a", "run-b"]
            )
        )
    assert sorted(h is None for h in holders) == [False, True]
    winner = "run-a" if holders[0] is None else "run-b"
    assert (
        _acquire(sessions, operation_id, winner) is None
    )  # re-entrant for the holder (a Retry of the same run)
    with sessions.begin() as session:
        operations.release_trainer(
            session=session, operation_id=operation_id, flow_run_id=winner
        )
    assert _acquire(sessions, operation_id, "run-c") is None


def _acquire(
    sessions: sessionmaker[Session], operation_id: str, run: str
) -> str | None:
    with sessions.begin() as session:
        return operations.acquire_trainer(
            session=session, operation_id=operation_id, flow_run_id=run
        )


def test_unknown_and_malformed_ids(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        with pytest.raises(OperationNotFound, match="resumable ops ls"):
            operations.get_operation(session=session, id_or_run="no-such-operation")
        for bad in ["../x", "", "a b", "x" * 65, "drop table;"]:
            with pytest.raises(InvalidSpec):
                operations.get_operation(session=session, id_or_run=bad)
