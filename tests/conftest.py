"""Shared fixtures: metadata databases (SQLite and real PostgreSQL) and checkpoint stores."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from resumable.checkpoints.store import CheckpointStore
from resumable.db import session_factory

POSTGRES_URL = os.environ.get(
    "RESUMABLE_TEST_POSTGRES_URL",
    "postgresql+psycopg://postgres@127.0.0.1:5432/resumable_test",
)


def ensure_postgres_database(url: str) -> None:
    """Create the test database if it is missing; fail (in CI) or skip when PostgreSQL is down."""
    parsed = make_url(url)
    admin = f"host={parsed.host or '127.0.0.1'} port={parsed.port or 5432} user={parsed.username or 'postgres'} dbname=postgres"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as connection:
            exists = connection.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (parsed.database,)
            ).fetchone()
            if not exists:
                connection.execute(f'CREATE DATABASE "{parsed.database}"')
    except psycopg.OperationalError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(
            f"PostgreSQL is not reachable at {parsed.host}:{parsed.port} ({err}); `.ci/run` starts it"
        )


def fresh_postgres_database(name: str) -> str:
    """An empty PostgreSQL database named `name` (dropped first if it exists); returns its URL."""
    url = make_url(POSTGRES_URL).set(database=name)
    ensure_postgres_database(url.render_as_string(hide_password=False))
    admin = (
        f"host={url.host} port={url.port or 5432} user={url.username} dbname=postgres"
    )
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{name}"')
    return url.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    ensure_postgres_database(POSTGRES_URL)
    return POSTGRES_URL


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'meta.db'}"


@pytest.fixture
def sessions(db_url: str) -> sessionmaker[Session]:
    return session_factory(db_url)


@pytest.fixture
def store(sessions: sessionmaker[Session], tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(sessions, (tmp_path / "checkpoints").as_uri())


@pytest.fixture
def memory_store(tmp_path: Path) -> Iterator[CheckpointStore]:
    root = f"memory://resumable-tests/{uuid.uuid4().hex}"
    yield CheckpointStore(session_factory(f"sqlite:///{tmp_path / 'meta.db'}"), root)


@pytest.fixture
def operation_id() -> str:
    return f"op-{uuid.uuid4().hex[:12]}"
