"""Engines and sessions for the metadata database, with the schema migrated on first use.

SQLite (the embedded default) gets WAL and a busy timeout so that several processes
can share it; PostgreSQL is used through psycopg 3.
"""

from __future__ import annotations

import fcntl
import logging
import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
_migrated: set[str] = set()
_migrate_lock = threading.Lock()
# Any fixed number identifies our migration lock among PostgreSQL advisory locks.
_ADVISORY_LOCK_KEY = 727_274_001


def create_db_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=40)


def migrate(engine: Engine) -> None:
    """Create or upgrade the schema to the newest revision; safe to call from many processes at once."""
    key = engine.url.render_as_string(hide_password=False)
    with _migrate_lock:
        if key in _migrated:
            return
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        if engine.url.get_backend_name() == "postgresql":
            with engine.connect() as connection:
                connection.execute(
                    text("SELECT pg_advisory_lock(:key)"), {"key": _ADVISORY_LOCK_KEY}
                )
                try:
                    config.attributes["connection"] = connection
                    command.upgrade(config, "head")
                    connection.commit()
                finally:
                    connection.execute(
                        text("SELECT pg_advisory_unlock(:key)"),
                        {"key": _ADVISORY_LOCK_KEY},
                    )
                    connection.commit()
        else:
            lock_path = Path(engine.url.database or "resumable").with_suffix(
                ".migrate.lock"
            )
            if engine.url.database in (None, "", ":memory:"):
                lock_path = Path("/tmp/resumable-memory.migrate.lock")
            with open(lock_path, "w") as lock_file:
                fcntl.flock(lock_file, fcntl.LOCK_EX)
                with engine.connect() as connection:
                    config.attributes["connection"] = connection
                    command.upgrade(config, "head")
                    connection.commit()
        _migrated.add(key)


def session_factory(url: str) -> sessionmaker[Session]:
    """A session factory for `url`, with the schema already migrated."""
    engine = create_db_engine(url)
    migrate(engine)
    return sessionmaker(engine, expire_on_commit=False)
