"""Process-wide services built from settings: one engine per database, one store, one resumer.

Flows, tasks, the API and the CLI all get their database sessions and checkpoint store
here, so a process opens each database once and migrates it once.
"""

from __future__ import annotations

from functools import lru_cache

from sqlalchemy.orm import Session, sessionmaker

from resumable.checkpoints.store import CheckpointStore
from resumable.db import session_factory
from resumable.settings import Settings, get_settings


@lru_cache(maxsize=8)
def _sessions(url: str) -> sessionmaker[Session]:
    return session_factory(url)


def sessions(settings: Settings | None = None) -> sessionmaker[Session]:
    return _sessions((settings or get_settings()).resolved_database_url())


@lru_cache(maxsize=8)
def _store(url: str, root: str, stale_after: float) -> CheckpointStore:
    return CheckpointStore(_sessions(url), root, stale_after_seconds=stale_after)


def checkpoint_store(settings: Settings | None = None) -> CheckpointStore:
    settings = settings or get_settings()
    return _store(
        settings.resolved_database_url(),
        settings.resolved_checkpoint_url(),
        settings.stale_save_seconds,
    )
