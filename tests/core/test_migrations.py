"""The schema is what the migrations make: upgrades keep existing rows, and the models and
the newest revision agree on every backend."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text

from resumable.db import MIGRATIONS
from resumable.models import Base
from tests.conftest import fresh_postgres_database


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return fresh_postgres_database("resumable_migrations_test")
    return f"sqlite:///{tmp_path / 'meta.db'}"


def _upgrade(url: str, revision: str) -> None:
    engine = create_engine(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    engine.dispose()


def test_upgrade_from_the_first_revision_keeps_operations_and_attempts(
    empty_db_url: str,
) -> None:
    _upgrade(empty_db_url, "0001")
    operation_id = str(uuid.uuid4())
    engine = create_engine(empty_db_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO operations (id, spec, fingerprint, created_at, updated_at,"
                " latest_run_id, attempts, last_known_state, auto_resumes)"
                " VALUES (:id, '{}', 'f', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, :id, 1,"
                " 'CANCELLED', 0)"
            ),
            {"id": operation_id},
        )
        connection.execute(
            text(
                "INSERT INTO attempts (flow_run_id, operation_id, number, created_at)"
                " VALUES (:id, :id, 1, CURRENT_TIMESTAMP)"
            ),
            {"id": operation_id},
        )

    _upgrade(empty_db_url, "head")

    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT operation_id, number, host FROM attempts")
        ).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [(operation_id, 1, None)]


def test_models_match_the_newest_revision(empty_db_url: str) -> None:
    _upgrade(empty_db_url, "head")
    engine = create_engine(empty_db_url)
    with engine.connect() as connection:
        differences = compare_metadata(
            MigrationContext.configure(connection), Base.metadata
        )
    engine.dispose()
    assert differences == []
