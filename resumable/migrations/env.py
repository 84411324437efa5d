"""Alembic environment: migrations run on the connection `resumable.db.migrate` hands over."""

from __future__ import annotations

from alembic import context

from resumable.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run migrations through resumable.db.migrate, which supplies the connection"
    )

context.configure(
    connection=connection, target_metadata=Base.metadata, render_as_batch=True
)
with context.begin_transaction():
    context.run_migrations()
