"""The operations ledger: operations, their attempts, the trainer lease and the resume claim.

Every function takes the SQLAlchemy `Session` as a keyword argument and leaves the commit
to the caller that owns the unit of work. The two races that matter are settled by
conditional UPDATEs, which the database applies atomically on PostgreSQL and SQLite alike:

- `claim_resume`: of any number of concurrent resumes of one interrupted attempt, exactly
  one changes the row; the others read back the winner.
- `acquire_trainer`: of two runs that would train one operation at once, one holds the
  lease and the other is told who does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from resumable.errors import InvalidSpec, OperationNotFound
from resumable.models import Attempt, Operation, utcnow
from resumable.spec import TrainingSpec

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_operation_id(value: str) -> str:
    """Refuse malformed ids before they reach a query or a path."""
    if not isinstance(value, str) or not _ID.match(value) or ".." in value:
        raise InvalidSpec(
            f"{value!r} is not an operation or flow run id: expected up to 64 letters, digits, '-', '_' or '.'"
        )
    return value


def create_operation(
    *, session: Session, operation_id: str, spec: TrainingSpec
) -> Operation:
    """Record a new operation, whose first attempt is the flow run `operation_id`; idempotent."""
    check_operation_id(operation_id)
    existing = session.get(Operation, operation_id)
    if existing is not None:
        return existing
    operation = Operation(
        id=operation_id,
        spec=spec.model_dump(mode="json"),
        fingerprint=spec.fingerprint(),
        latest_run_id=operation_id,
        attempts=1,
        last_known_state="RUNNING",
    )
    session.add(operation)
    session.flush()  # the attempt's foreign key needs the operation row first
    session.add(Attempt(flow_run_id=operation_id, operation_id=operation_id, number=1))
    session.flush()
    return operation


def find_operation(*, session: Session, id_or_run: str) -> Operation | None:
    """The operation named by its own id or by any of its attempts' flow run ids."""
    check_operation_id(id_or_run)
    operation = session.get(Operation, id_or_run)
    if operation is not None:
        return operation
    attempt = session.get(Attempt, id_or_run)
    return session.get(Operation, attempt.operation_id) if attempt else None


def get_operation(*, session: Session, id_or_run: str) -> Operation:
    operation = find_operation(session=session, id_or_run=id_or_run)
    if operation is None:
        raise OperationNotFound(id_or_run)
    return operation


def list_operations(*, session: Session, limit: int = 200) -> list[Operation]:
    return list(
        session.scalars(
            select(Operation).order_by(Operation.created_at.desc()).limit(limit)
        )
    )


def list_attempts(*, session: Session, operation_id: str) -> list[Attempt]:
    query = (
        select(Attempt)
        .where(Attempt.operation_id == operation_id)
        .order_by(Attempt.number)
    )
    return list(session.scalars(query))


def register_attempt(
    *,
    session: Session,
    operation_id: str,
    flow_run_id: str,
    resumed_from_checkpoint_id: str | None = None,
    host: str | None = None,
) -> Attempt:
    """Record `flow_run_id` as an attempt of the operation (idempotent) and make it the latest.

    `host` names the machine running it now; a run started again (Retry) records its new host.
    """
    check_operation_id(flow_run_id)
    operation = get_operation(session=session, id_or_run=operation_id)
    attempt = session.get(Attempt, flow_run_id)
    if attempt is not None and attempt.operation_id != operation.id:
        raise InvalidSpec(
            f"flow run {flow_run_id} is already an attempt of operation {attempt.operation_id}, not of {operation.id}"
        )
    if attempt is None:
        attempt = Attempt(
            flow_run_id=flow_run_id,
            operation_id=operation.id,
            number=operation.attempts + 1,
            resumed_from_checkpoint_id=resumed_from_checkpoint_id,
            host=host,
        )
        session.add(attempt)
        operation.attempts = attempt.number
        operation.latest_run_id = flow_run_id
        session.flush()
    elif host is not None:
        attempt.host = host
    return attempt


def record_state(
    *, session: Session, operation_id: str, flow_run_id: str, state: str
) -> None:
    """Remember the last state a run reported, for listings when Prefect is out of reach."""
    session.execute(
        update(Operation)
        .where(Operation.id == operation_id, Operation.latest_run_id == flow_run_id)
        .values(last_known_state=state, updated_at=utcnow())
    )


def acquire_trainer(
    *,
    session: Session,
    operation_id: str,
    flow_run_id: str,
    holder_has_ended: Callable[[str], bool] | None = None,
) -> str | None:
    """Take the operation's trainer lease and make this run its latest attempt.

    Returns None on success, else the run that holds the lease. A lease whose holder has
    ended (`holder_has_ended`, asked of Prefect) is taken over, again by a conditional
    UPDATE, so a run that crashed while holding it does not block its operation forever.
    A run that loses does not stay the latest attempt.
    """
    taken = session.execute(
        update(Operation)
        .where(
            Operation.id == operation_id,
            or_(
                Operation.trainer_run_id.is_(None),
                Operation.trainer_run_id == flow_run_id,
            ),
        )
        .values(
            trainer_run_id=flow_run_id, latest_run_id=flow_run_id, updated_at=utcnow()
        )
    )
    if taken.rowcount == 1:  # type: ignore[attr-defined]
        return None
    holder = session.scalar(
        select(Operation.trainer_run_id).where(Operation.id == operation_id)
    )
    if holder is not None and holder_has_ended is not None and holder_has_ended(holder):
        taken = session.execute(
            update(Operation)
            .where(Operation.id == operation_id, Operation.trainer_run_id == holder)
            .values(
                trainer_run_id=flow_run_id,
                latest_run_id=flow_run_id,
                updated_at=utcnow(),
            )
        )
        if taken.rowcount == 1:  # type: ignore[attr-defined]
            return None
        holder = session.scalar(
            select(Operation.trainer_run_id).where(Operation.id == operation_id)
        )
    session.execute(
        update(Operation)
        .where(Operation.id == operation_id, Operation.latest_run_id == flow_run_id)
        .values(latest_run_id=Operation.trainer_run_id)
    )
    return holder or "(unknown)"


def release_trainer(*, session: Session, operation_id: str, flow_run_id: str) -> None:
    session.execute(
        update(Operation)
        .where(Operation.id == operation_id, Operation.trainer_run_id == flow_run_id)
        .values(trainer_run_id=None, updated_at=utcnow())
    )


@dataclass(frozen=True)
class Claim:
    won: bool
    owner: str | None
    continuation_run_id: str | None
    auto_resumes: int = 0


def claim_resume(
    *,
    session: Session,
    operation_id: str,
    interrupted_run_id: str,
    owner: str,
    ttl_seconds: float,
    automatic: bool = False,
    auto_cap: int | None = None,
) -> Claim:
    """Claim the resume of `interrupted_run_id` for `owner` with one conditional UPDATE.

    The claim is taken when the interrupted run is still the operation's latest attempt and
    no live claim on it exists. A claim is live until its continuation is scheduled (then
    that run is the latest attempt, and a later interruption of it can be claimed anew), or
    until `ttl_seconds` pass without a continuation (its claimer died). The same owner may
    claim again, so a resume that died half-way is finished by rerunning it. An automatic
    claim also needs the operation to be under its cap of automatic resumes.
    """
    stale_before = utcnow() - timedelta(seconds=ttl_seconds)
    conditions: list[Any] = [
        Operation.id == operation_id,
        Operation.latest_run_id == interrupted_run_id,
        or_(
            Operation.claimed_run_id.is_(None),
            Operation.claimed_run_id != interrupted_run_id,
            Operation.claim_owner == owner,
            (Operation.continuation_run_id.is_(None))
            & (Operation.claimed_at < stale_before),
        ),
    ]
    values: dict[str, Any] = {
        "claimed_run_id": interrupted_run_id,
        "claim_owner": owner,
        "claimed_at": utcnow(),
        "continuation_run_id": None,
        "updated_at": utcnow(),
    }
    if automatic:
        conditions.append(
            Operation.auto_resumes < (auto_cap if auto_cap is not None else 0)
        )
        values["auto_resumes"] = Operation.auto_resumes + 1
    result = session.execute(update(Operation).where(*conditions).values(**values))
    if result.rowcount == 1:  # type: ignore[attr-defined]
        return Claim(won=True, owner=owner, continuation_run_id=None)
    row = session.execute(
        select(
            Operation.claim_owner, Operation.continuation_run_id, Operation.auto_resumes
        ).where(Operation.id == operation_id)
    ).one_or_none()
    if row is None:
        raise OperationNotFound(operation_id)
    return Claim(
        won=False, owner=row[0], continuation_run_id=row[1], auto_resumes=row[2]
    )


def release_claim(*, session: Session, operation_id: str, owner: str) -> None:
    """Give up a claim that could not be carried through (its checkpoint turned out bad)."""
    session.execute(
        update(Operation)
        .where(
            Operation.id == operation_id,
            Operation.claim_owner == owner,
            Operation.continuation_run_id.is_(None),
        )
        .values(claimed_run_id=None, claim_owner=None, claimed_at=None)
    )


def record_continuation(
    *,
    session: Session,
    operation_id: str,
    owner: str,
    flow_run_id: str,
    resumed_from_checkpoint_id: str,
) -> None:
    """Record the run a claim scheduled; it becomes the operation's latest attempt."""
    session.execute(
        update(Operation)
        .where(Operation.id == operation_id, Operation.claim_owner == owner)
        .values(
            continuation_run_id=flow_run_id,
            last_known_state="SCHEDULED",
            updated_at=utcnow(),
        )
    )
    register_attempt(
        session=session,
        operation_id=operation_id,
        flow_run_id=flow_run_id,
        resumed_from_checkpoint_id=resumed_from_checkpoint_id,
    )
